/*
 * kernels/launch_ex.cuh - one kernel launch that reports its own status.
 *
 * A `<<<>>>` launch followed by cudaGetLastError() also reports an
 * unrelated error left pending on the calling thread (a caller's failed
 * cudaMalloc that nobody cleared, say): the call then fails after some of
 * its kernels were already enqueued (docs/kernels-review.md, R4-8).
 * cudaLaunchKernelEx returns the status of this launch alone.
 *
 * kdl::launch_ex(kernel, grid, block, dynamic_smem, stream, args...) is the
 * `<<<grid, block, dynamic_smem, stream>>>(args...)` launch with no launch
 * attributes; arguments are converted to the kernel's parameter types as
 * for `<<<>>>`.  On failure the error it returns is also consumed from the
 * thread's last-error slot, as the cudaGetLastError() of the old check did,
 * so that the caller is not told about it twice.  Launches the same way
 * inside a stream capture (the kernel node is recorded, not run).
 *
 * A template kernel is passed as `kernel<args>`: naming it instantiates it
 * for the device as a `<<<>>>` launch would (ptxas -v lists the same entry
 * functions, with the same registers, before and after kernels/sinkhorn.cu
 * moved to these helpers).
 */
#ifndef KDLOSS_KERNELS_LAUNCH_EX_CUH
#define KDLOSS_KERNELS_LAUNCH_EX_CUH

#include <cuda_runtime.h>

#include <utility>

namespace kdl {

/* A plain launch: no cluster, no other attributes. */
static inline cudaLaunchConfig_t launch_config(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = dynamic_smem;
    cfg.stream = stream;
    cfg.attrs = nullptr;
    cfg.numAttrs = 0;
    return cfg;
}

/* The same launch from an array of pointers to the arguments (one per
 * kernel parameter, already of its type): for a large by-value parameter
 * that must not be copied onto the stack first. */
static inline cudaError_t launch_ex_args(const void *kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                                         cudaStream_t stream, void **args)
{
    const cudaLaunchConfig_t cfg = launch_config(grid, block, dynamic_smem, stream);
    const cudaError_t e = cudaLaunchKernelExC(&cfg, kernel, args);
    if (e != cudaSuccess) (void)cudaGetLastError(); /* reported here, not again later */
    return e;
}

template <class... Params, class... Args>
static inline cudaError_t launch_ex(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem,
                                    cudaStream_t stream, Args &&...args)
{
    const cudaLaunchConfig_t cfg = launch_config(grid, block, dynamic_smem, stream);
    const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
    if (e != cudaSuccess) (void)cudaGetLastError(); /* reported here, not again later */
    return e;
}

} // namespace kdl

#endif /* KDLOSS_KERNELS_LAUNCH_EX_CUH */
