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

struct kdl_context {
    int device;              /* CUDA device id at creation                     */
    int cc_major, cc_minor;  /* compute capability                             */
    int sm_count;            /* multiprocessors                                */
    int cluster_launch;      /* 1 when thread-block clusters are supported     */
    size_t smem_per_block_optin; /* max dynamic shared memory per block        */
    size_t l2_bytes;
    cudaStream_t stream;     /* the handle's stream (0: legacy default)        */
    cublasHandle_t cublas;   /* created on first use (Sinkhorn, SinKD)         */
};

/* Maps a CUDA error to KDL_STATUS_CUDA_ERROR with a last-error detail naming
 * the call and the place; SUCCESS for cudaSuccess. */
kdl_status_t kdl_cuda_status(cudaError_t err, const char *what, const char *file, int line);
#define KDL_CUDA_CHECK(call)                                                                  \
    do {                                                                                      \
        kdl_status_t kdl_st_ = kdl_cuda_status((call), #call, __FILE__, __LINE__);            \
        if (kdl_st_ != KDL_STATUS_SUCCESS) return kdl_st_;                                    \
    } while (0)

/* The handle's cuBLAS handle, bound to its stream, created on first use. */
kdl_status_t kdl_get_cublas(kdl_handle_t h, cublasHandle_t *out);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_HOST_GPU_INTERNAL_H */
