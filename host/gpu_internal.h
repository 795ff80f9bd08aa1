/*
 * host/gpu_internal.h - the handle's contents, shared by the host wrappers
 * of the GPU path (C files compiled against the CUDA runtime API).
 */
#ifndef KDLOSS_HOST_GPU_INTERNAL_H
#define KDLOSS_HOST_GPU_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "internal.h"
#include "kdloss/kdloss.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The loss launcher's memo of per-kernel CUDA setup (kernels/loss.cu,
 * review F7): without it every call asked cudaFuncGetAttributes, set the
 * shared-memory cap and (clusters) the non-portable size permission again,
 * and ran cudaOccupancyMaxActiveClusters.  One entry per row kernel
 * (student dtype x teacher dtype, f32/f16/bf16).  Lives in the handle,
 * which one host thread uses at a time (as a cuBLAS handle), and holds for
 * the handle's device: every call that launches has passed
 * kdl_handle_check, so that device is current. */
#define KDL_LOSS_FIT_MEMO 8
typedef struct kdl_loss_kmemo {
    int have_attr;          /* static_smem, code_arch below are read        */
    size_t static_smem;     /* cudaFuncAttributes.sharedSizeBytes           */
    int code_arch;          /* ptxVersion, else binaryVersion               */
    size_t smem_cap;        /* MaxDynamicSharedMemorySize set to this; 0 no */
    int nonportable;        /* NonPortableClusterSizeAllowed set            */
    struct {
        int C;              /* 0: empty slot                                */
        size_t dyn;
        int fits;           /* at least one such cluster can be resident    */
    } fit[KDL_LOSS_FIT_MEMO];
    int next_fit;           /* slot the next answer replaces                */
} kdl_loss_kmemo_t;

struct kdl_loss_cache {
    kdl_loss_kmemo_t k[9];  /* [student dtype * 3 + teacher dtype]          */
};

struct kdl_context {
    int device;              /* CUDA device id at creation                     */
    int cc_major, cc_minor;  /* compute capability                             */
    int sm_count;            /* multiprocessors                                */
    int cluster_launch;      /* 1 when thread-block clusters are supported     */
    size_t smem_per_block_optin; /* max dynamic shared memory per block        */
    size_t l2_bytes;
    cudaStream_t stream;     /* the handle's stream (0: legacy default)        */
    cublasHandle_t cublas;   /* created by kdl_create; if that failed, retried
                                on first use (Sinkhorn, SinKD, fused linear) */
    struct kdl_loss_cache loss_cache; /* the loss launcher's memo          */
};

/* Maps a CUDA error to KDL_STATUS_CUDA_ERROR with a last-error detail naming
 * the call and the place; SUCCESS for cudaSuccess. */
kdl_status_t kdl_cuda_status(cudaError_t err, const char *what, const char *file, int line);
#define KDL_CUDA_CHECK(call)                                                                  \
    do {                                                                                      \
        kdl_status_t kdl_st_ = kdl_cuda_status((call), #call, __FILE__, __LINE__);            \
        if (kdl_st_ != KDL_STATUS_SUCCESS) return kdl_st_;                                    \
    } while (0)

/* The prologue of every GPU entry point that enqueues work (loss, Sinkhorn,
 * SinKD, sparse, shard step, fused linear), before anything else:
 * KDL_STATUS_NULL_POINTER for a NULL handle; KDL_STATUS_WRONG_DEVICE when
 * the calling thread's current CUDA device is not the handle's (the plan
 * uses the handle's device, the launches would go to the current one:
 * docs/kernels-review.md R4-2).  Nothing is launched or written on failure.
 * Workspace queries do not call it: they read only the handle's recorded
 * properties and touch no device. */
kdl_status_t kdl_handle_check(kdl_handle_t h);

/* The handle's cuBLAS handle, bound to its stream (created by kdl_create,
 * or here if that failed: then a failure is KDL_STATUS_CUBLAS_ERROR). */
kdl_status_t kdl_get_cublas(kdl_handle_t h, cublasHandle_t *out);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_HOST_GPU_INTERNAL_H */
