/*
 * host/gpu_loss.c - host wrapper of the fused loss kernels (placeholder until
 * the kernels land: validates, then reports KDL_STATUS_NOT_IMPLEMENTED).
 */
#include "gpu_internal.h"

kdl_status_t kdl_loss_workspace_size(kdl_handle_t h, const kdl_loss_desc_t *desc,
                                     const kdl_loss_args_t *args, size_t *bytes)
{
    if (!h || !bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or bytes is NULL");
    kdl_status_t st = kdl_loss_validate(desc, args, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    *bytes = 0;
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_loss_forward_backward(kdl_handle_t h, const kdl_loss_desc_t *desc,
                                       const kdl_loss_args_t *args, void *workspace,
                                       size_t workspace_bytes)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_loss_validate(desc, args, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    return kdl_fail(KDL_STATUS_NOT_IMPLEMENTED, "GPU loss kernels not built yet");
}
