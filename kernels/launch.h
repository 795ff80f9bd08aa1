/*
 * kernels/launch.h - C entry points of the CUDA loss kernels (kernels/loss.cu),
 * called by the host wrapper host/gpu_loss.c.  Not installed.
 *
 * The wrapper validates the arguments and the workspace; the launcher plans
 * the launch (which path, cluster size, shared memory) from the device
 * fields it is given, enqueues the kernels on the stream and maps CUDA
 * errors to statuses.  No allocation, no host synchronisation.
 */
#ifndef KDLOSS_KERNELS_LAUNCH_H
#define KDLOSS_KERNELS_LAUNCH_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "kdloss/kdloss_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Where a row lives while the fused kernel works on it. */
typedef enum kdl_loss_path {
    KDL_LOSS_PATH_AUTO = 0,    /* chosen from the device and the row size        */
    KDL_LOSS_PATH_SMEM = 1,    /* whole row staged in one CTA's shared memory    */
    KDL_LOSS_PATH_CLUSTER = 2, /* row split over a thread-block cluster, each
                                  slice staged in its CTA's shared memory; the
                                  reductions go through distributed shared memory */
    KDL_LOSS_PATH_STREAM = 3   /* nothing staged: each pass re-reads the row
                                  (from L2); one CTA per row or a cluster per row */
} kdl_loss_path_t;

/* What the launcher decided (for tests, benchmarks, and the docs). */
typedef struct kdl_loss_plan {
    kdl_loss_path_t path; /* never AUTO after a launch                       */
    int cluster;          /* CTAs per row (1: no cluster)                    */
    int threads;          /* threads per CTA                                 */
    size_t smem_dynamic;  /* dynamic shared memory per CTA, bytes            */
    size_t smem_static;   /* static shared memory per CTA, bytes             */
    int launches;         /* kernel launches enqueued                        */
} kdl_loss_plan_t;

struct kdl_loss_cache; /* host/gpu_internal.h: the handle's memo of per-kernel setup */

typedef struct kdl_loss_launch {
    const kdl_loss_desc_t *desc;  /* validated                                */
    const kdl_loss_args_t *args;  /* validated, rows > 0                      */
    void *workspace;              /* >= kdl_loss_ws_bytes_for(rows, reduction), 16-byte aligned */
    cudaStream_t stream;
    /* the handle's memo (NULL: none, every call asks CUDA again): kernel
     * attributes read, shared-memory cap and cluster permission set, and
     * cluster residency answers, for the handle's device (review F7) */
    struct kdl_loss_cache *cache;
    /* device fields, from the handle */
    int cc_major;
    int sm_count;
    int cluster_launch;
    size_t smem_per_block_optin;
    /* overrides (0: automatic); set from KDL_LOSS_PATH / KDL_LOSS_CLUSTER */
    kdl_loss_path_t force_path;
    int force_cluster;
} kdl_loss_launch_t;

/* Workspace bytes for `rows` rows (0 when rows == 0): enough for every
 * reduction (header + one float per row). */
size_t kdl_loss_ws_bytes(int64_t rows);

/* Workspace bytes a call of this reduction needs: NONE keeps no per-row
 * loss, only the 256-byte header (review F8); SUM and MEAN as above. */
size_t kdl_loss_ws_bytes_for(int64_t rows, kdl_reduction_t reduction);

/* May a gradient [rows, ldg] of gsz-byte elements share memory with logits
 * x [rows, ldx] of xsz-byte elements?  1 when the spans do not overlap, or
 * (not MEAN) when the gradient is x itself: same base, stride and element
 * size.  Any other overlap is refused with KDL_STATUS_NOT_SUPPORTED. */
int kdl_loss_grad_alias_ok(const void *g, int64_t ldg, size_t gsz, const void *x, int64_t ldx, size_t xsz,
                           int64_t rows, int64_t vocab, int mean);

/* Largest vocabulary the kernels index with 32-bit in-row offsets. */
#define KDL_LOSS_MAX_VOCAB ((int64_t)1 << 30)

/* Plans and enqueues prep, fused row kernel and finalize on L->stream.
 * Returns SUCCESS, NOT_SUPPORTED (a forced path that cannot run here),
 * or the mapped CUDA error.  *plan (may be NULL) receives the decision. */
kdl_status_t kdl_loss_launch(const kdl_loss_launch_t *L, kdl_loss_plan_t *plan);

/* The plan of the calling thread's last successful kdl_loss_forward_backward
 * (host/gpu_loss.c); path AUTO before the first. */
kdl_loss_plan_t kdl_loss_last_plan(void);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_KERNELS_LAUNCH_H */
