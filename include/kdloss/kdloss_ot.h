/*
 * kdloss_ot.h - batched log-domain Sinkhorn and the SinKD loss: descriptor
 * and argument types, GPU and reference entry points.
 * (Filled in by the Sinkhorn work; see DESIGN section 2.)
 */
#ifndef KDLOSS_OT_H
#define KDLOSS_OT_H

#include "kdloss/kdloss_types.h"

#endif /* KDLOSS_OT_H */
