/*
 * host/gpu_handle.c - handle life cycle: device properties read once at
 * creation, the stream, the cuBLAS handle.
 *
 * cuBLAS (Sinkhorn, SinKD, fused linear) is created here, in kdl_create, so
 * that no later call allocates behind the caller's back (cublasCreate
 * allocates device memory and may synchronise; it is also not allowed
 * inside a CUDA graph capture).  A failure here does not fail kdl_create:
 * the loss and the other cuBLAS-free entry points do not need it.  The
 * handle is then NULL and the first call that needs it tries again, and
 * returns KDL_STATUS_CUBLAS_ERROR if it still fails (docs/kernels.md).
 *
 * A handle belongs to the device current at kdl_create.  Every entry point
 * that enqueues work starts with kdl_handle_check, which refuses a call
 * from a thread whose current device is another one
 * (KDL_STATUS_WRONG_DEVICE): the library does not switch devices for the
 * caller (review R4-2; the Python binding makes the tensors' device current).
 */
#include <stdlib.h>

#include "gpu_internal.h"

kdl_status_t kdl_cuda_status(cudaError_t err, const char *what, const char *file, int line)
{
    if (err == cudaSuccess) return KDL_STATUS_SUCCESS;
    if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver)
        return kdl_fail(KDL_STATUS_NO_DEVICE, "%s: %s (%s:%d)", what, cudaGetErrorString(err), file, line);
    if (err == cudaErrorNoKernelImageForDevice)
        return kdl_fail(KDL_STATUS_ARCH_MISMATCH, "%s: %s (%s:%d)", what, cudaGetErrorString(err), file,
                        line);
    return kdl_fail(KDL_STATUS_CUDA_ERROR, "%s: %s (%s:%d)", what, cudaGetErrorString(err), file, line);
}

int kdl_device_available(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError(); /* clear the sticky-free error */
        return 0;
    }
    return n > 0;
}

/* Creates h->cublas in strict FP32 (no TF32 tensor-op math unless a caller
 * asks); h->cublas stays NULL on failure. */
static kdl_status_t create_cublas(struct kdl_context *h)
{
    if (cublasCreate(&h->cublas) != CUBLAS_STATUS_SUCCESS) {
        h->cublas = NULL;
        /* an allocation failure inside must not surface as the "last
         * error" of a later, unrelated launch check */
        (void)cudaGetLastError();
        return kdl_fail(KDL_STATUS_CUBLAS_ERROR, "cublasCreate");
    }
    if (cublasSetMathMode(h->cublas, CUBLAS_DEFAULT_MATH) != CUBLAS_STATUS_SUCCESS) {
        cublasDestroy(h->cublas);
        h->cublas = NULL;
        (void)cudaGetLastError();
        return kdl_fail(KDL_STATUS_CUBLAS_ERROR, "cublasSetMathMode");
    }
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_handle_check(kdl_handle_t h)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    int current = -1;
    const cudaError_t e = cudaGetDevice(&current);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* reported here */
        return kdl_cuda_status(e, "cudaGetDevice", __FILE__, __LINE__);
    }
    if (current != h->device)
        return kdl_fail(KDL_STATUS_WRONG_DEVICE,
                        "the calling thread's current CUDA device is %d, the handle's is %d (cudaSetDevice(%d) "
                        "before the call)",
                        current, h->device, h->device);
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_create(kdl_handle_t *handle)
{
    kdl_clear_error();
    if (!handle) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    *handle = NULL;
    if (!kdl_device_available()) return kdl_fail(KDL_STATUS_NO_DEVICE, "no CUDA device is present");
    struct kdl_context *h = (struct kdl_context *)calloc(1, sizeof *h);
    if (!h) return kdl_fail(KDL_STATUS_ALLOC_FAILED, "handle allocation");
    kdl_status_t st = kdl_cuda_status(cudaGetDevice(&h->device), "cudaGetDevice", __FILE__, __LINE__);
    struct cudaDeviceProp prop;
    if (st == KDL_STATUS_SUCCESS)
        st = kdl_cuda_status(cudaGetDeviceProperties(&prop, h->device), "cudaGetDeviceProperties",
                             __FILE__, __LINE__);
    if (st != KDL_STATUS_SUCCESS) {
        free(h);
        return st;
    }
    h->cc_major = prop.major;
    h->cc_minor = prop.minor;
    h->sm_count = prop.multiProcessorCount;
    h->smem_per_block_optin = prop.sharedMemPerBlockOptin;
    h->l2_bytes = (size_t)prop.l2CacheSize;
    int cluster = 0;
    if (cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, h->device) != cudaSuccess) {
        (void)cudaGetLastError();
        cluster = 0;
    }
    h->cluster_launch = cluster;
    h->stream = 0;
    /* eager, not fatal: a loss-only user works without cuBLAS (see the top) */
    if (create_cublas(h) != KDL_STATUS_SUCCESS) kdl_clear_error();
    *handle = h;
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_destroy(kdl_handle_t h)
{
    if (!h) return KDL_STATUS_SUCCESS;
    if (h->cublas) cublasDestroy(h->cublas);
    free(h);
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_set_stream(kdl_handle_t h, kdl_stream_t stream)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    h->stream = (cudaStream_t)stream;
    if (h->cublas && cublasSetStream(h->cublas, h->stream) != CUBLAS_STATUS_SUCCESS)
        return kdl_fail(KDL_STATUS_CUBLAS_ERROR, "cublasSetStream");
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_get_stream(kdl_handle_t h, kdl_stream_t *stream)
{
    if (!h || !stream) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or stream is NULL");
    *stream = (kdl_stream_t)h->stream;
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_get_cublas(kdl_handle_t h, cublasHandle_t *out)
{
    if (!h->cublas) { /* kdl_create could not create it: try again */
        kdl_status_t st = create_cublas(h);
        if (st != KDL_STATUS_SUCCESS) return st;
    }
    if (cublasSetStream(h->cublas, h->stream) != CUBLAS_STATUS_SUCCESS)
        return kdl_fail(KDL_STATUS_CUBLAS_ERROR, "cublasSetStream");
    *out = h->cublas;
    return KDL_STATUS_SUCCESS;
}
