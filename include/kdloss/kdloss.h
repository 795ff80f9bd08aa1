/*
 * kdloss.h - public GPU API of kdloss: fused distillation losses and batched
 * log-domain Sinkhorn.  cuBLAS-style: an opaque handle bound to a stream,
 * every call enqueues work on that stream and returns a status, no hidden
 * allocation in the hot path (the caller passes a workspace of the queried
 * size), no host synchronisation unless the call says so.
 *
 * Maths and conventions: DESIGN (docs in README.md).  Types: kdloss_types.h.
 */
#ifndef KDLOSS_H
#define KDLOSS_H

#include "kdloss/kdloss_types.h"
#include "kdloss/kdloss_ot.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Same type as cudaStream_t, without including the CUDA headers. */
typedef struct CUstream_st *kdl_stream_t;

typedef struct kdl_context *kdl_handle_t;

/* Creates a handle on the current CUDA device.  KDL_STATUS_NO_DEVICE when no
 * device is present; *handle is then NULL.  The handle belongs to that
 * device: the library never switches devices, and a call made while another
 * device is current returns KDL_STATUS_WRONG_DEVICE before anything is
 * launched or written. */
kdl_status_t kdl_create(kdl_handle_t *handle);
kdl_status_t kdl_destroy(kdl_handle_t handle); /* NULL is accepted */
kdl_status_t kdl_set_stream(kdl_handle_t handle, kdl_stream_t stream);
kdl_status_t kdl_get_stream(kdl_handle_t handle, kdl_stream_t *stream);

/* 1 when a CUDA device usable by kdloss is present, 0 otherwise. */
int kdl_device_available(void);

/* Workspace bytes kdl_loss_forward_backward needs for this problem. */
kdl_status_t kdl_loss_workspace_size(kdl_handle_t handle, const kdl_loss_desc_t *desc,
                                     const kdl_loss_args_t *args, size_t *bytes);

/*
 * Loss and (optionally) its gradient with respect to the student logits, in
 * one fused pass.  All pointers in args are device pointers.  Asynchronous on
 * the handle's stream.  Arguments are checked before any launch; on a bad
 * argument nothing is written.  workspace may be NULL when its size is 0.
 */
kdl_status_t kdl_loss_forward_backward(kdl_handle_t handle, const kdl_loss_desc_t *desc,
                                       const kdl_loss_args_t *args, void *workspace,
                                       size_t workspace_bytes);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_H */
