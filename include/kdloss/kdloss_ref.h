/*
 * kdloss_ref.h - the float64 CPU reference of every kdloss operation.
 *
 * Same descriptor and argument structs as the GPU API, host pointers.  Inputs
 * of any dtype are converted exactly to double; all arithmetic is double.
 * Independent of the GPU path (shares only the element maths of
 * kdloss/detail/elem.h and the argument check), it is the oracle the GPU
 * tests compare against.  Needs no CUDA.
 */
#ifndef KDLOSS_REF_H
#define KDLOSS_REF_H

#include "kdloss/kdloss_types.h"
#include "kdloss/kdloss_ot.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Loss, gradient and statistics as kdl_loss_forward_backward computes them,
 * with host pointers.  Allocates host scratch (KDL_STATUS_ALLOC_FAILED if
 * that fails); nothing is written on failure. */
kdl_status_t kdl_ref_loss_forward_backward(const kdl_loss_desc_t *desc,
                                           const kdl_loss_args_t *args);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_REF_H */
