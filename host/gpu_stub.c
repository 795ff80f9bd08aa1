/*
 * host/gpu_stub.c - the GPU API in a build without CUDA (KDL_ENABLE_CUDA=OFF):
 * every entry point checks its arguments like the real one, then returns
 * KDL_STATUS_NO_DEVICE.
 */
#include "internal.h"
#include "kdloss/kdloss.h"

int kdl_device_available(void) { return 0; }

kdl_status_t kdl_create(kdl_handle_t *handle)
{
    if (!handle) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    *handle = NULL;
    return kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
kdl_status_t kdl_destroy(kdl_handle_t handle) { return KDL_STATUS_SUCCESS; }
kdl_status_t kdl_set_stream(kdl_handle_t h, kdl_stream_t s)
{
    return kdl_fail(h ? KDL_STATUS_NO_DEVICE : KDL_STATUS_NULL_POINTER, "no device");
}
kdl_status_t kdl_get_stream(kdl_handle_t h, kdl_stream_t *s)
{
    if (!h || !s) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or stream is NULL");
    return kdl_fail(KDL_STATUS_NO_DEVICE, "no device");
}
kdl_status_t kdl_loss_workspace_size(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_loss_args_t *a,
                                     size_t *bytes)
{
    if (!h || !bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or bytes is NULL");
    kdl_status_t st = kdl_loss_validate(d, a, 0);
    return st ? st : kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
kdl_status_t kdl_loss_forward_backward(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_loss_args_t *a,
                                       void *ws, size_t wsb)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_loss_validate(d, a, 0);
    return st ? st : kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}

/* ---- Sinkhorn and SinKD (kdloss_ot.h): check, then no device */
kdl_status_t kdl_sinkhorn_workspace_size(kdl_handle_t h, const kdl_sinkhorn_desc_t *d,
                                         const kdl_sinkhorn_args_t *a, size_t *bytes)
{
    if (!h || !bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or bytes is NULL");
    kdl_status_t st = kdl_sinkhorn_validate(d, a, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    return kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
kdl_status_t kdl_sinkhorn(kdl_handle_t h, const kdl_sinkhorn_desc_t *d, const kdl_sinkhorn_args_t *a,
                          void *ws, size_t wsb)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_sinkhorn_validate(d, a, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    return kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
kdl_status_t kdl_sinkd_workspace_size(kdl_handle_t h, const kdl_sinkd_desc_t *d, const kdl_sinkd_args_t *a,
                                      size_t *bytes)
{
    if (!h || !bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or bytes is NULL");
    kdl_status_t st = kdl_sinkd_validate(d, a, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    return kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
kdl_status_t kdl_sinkd(kdl_handle_t h, const kdl_sinkd_desc_t *d, const kdl_sinkd_args_t *a, void *ws,
                       size_t wsb)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_sinkd_validate(d, a, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    return kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}

/* ---- extensions (kdloss_ext.h): argument checks, then NO_DEVICE */
#include "ext_internal.h"

kdl_status_t kdl_sparse_workspace_size(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_sparse_args_t *a,
                                       size_t *bytes)
{
    if (!h || !bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or bytes is NULL");
    kdl_status_t st = kdl_sparse_validate(d, a, 0);
    return st ? st : kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
kdl_status_t kdl_sparse_loss(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, void *ws,
                             size_t wsb)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_sparse_validate(d, a, 0);
    return st ? st : kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
kdl_status_t kdl_shard_step(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_shard_args_t *a, int step,
                            kdl_shard_op_t *op, int64_t *count)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_shard_validate(d, a, 0);
    if (st) return st;
    if (!op || !count) return kdl_fail(KDL_STATUS_NULL_POINTER, "op or count is NULL");
    int nsteps = kdl_shard_num_steps(d->divergence == KDL_DIV_AKL, a->teacher_dtype);
    if (step < 0 || step >= nsteps) return kdl_fail(KDL_STATUS_BAD_PARAM, "step %d not in [0, %d)", step, nsteps);
    return kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
kdl_status_t kdl_fused_linear_workspace_size(kdl_handle_t h, const kdl_loss_desc_t *d,
                                             const kdl_fused_linear_args_t *a, size_t *bytes)
{
    if (!h || !bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or bytes is NULL");
    kdl_status_t st = kdl_fused_linear_validate(d, a, 0);
    return st ? st : kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
kdl_status_t kdl_fused_linear_loss(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a,
                                   void *ws, size_t wsb)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_fused_linear_validate(d, a, 0);
    return st ? st : kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
