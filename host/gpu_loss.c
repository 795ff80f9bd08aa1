/*
 * host/gpu_loss.c - host wrapper of the fused loss kernels (kernels/loss.cu):
 * argument check (kdl_loss_validate), workspace size and check, the empty
 * batch, the KDL_LOSS_PATH / KDL_LOSS_CLUSTER overrides, dispatch to the
 * launcher, and the plan of the last call (for tests and benchmarks).
 *
 * Nothing here allocates or synchronises: the empty batch is two or three
 * cudaMemsetAsync on the handle's stream, everything else is the launcher's
 * three kernel launches (four for MEAN with a gradient).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_internal.h"
#include "launch.h"

static _Thread_local kdl_loss_plan_t kdl_last_plan; /* path AUTO until a call succeeds */

kdl_loss_plan_t kdl_loss_last_plan(void) { return kdl_last_plan; }

kdl_status_t kdl_loss_workspace_size(kdl_handle_t h, const kdl_loss_desc_t *desc,
                                     const kdl_loss_args_t *args, size_t *bytes)
{
    if (!h || !bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or bytes is NULL");
    kdl_status_t st = kdl_loss_validate(desc, args, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    *bytes = kdl_loss_ws_bytes_for(args->rows, desc->reduction);
    return KDL_STATUS_SUCCESS;
}

/* Debugging and test knobs (documented in docs/kernels.md):
 * KDL_LOSS_PATH = auto | smem | cluster | stream, KDL_LOSS_CLUSTER = 1..16. */
static void read_overrides(kdl_loss_path_t *path, int *cluster)
{
    *path = KDL_LOSS_PATH_AUTO;
    *cluster = 0;
    const char *p = getenv("KDL_LOSS_PATH");
    if (p) {
        if (strcmp(p, "smem") == 0) *path = KDL_LOSS_PATH_SMEM;
        else if (strcmp(p, "cluster") == 0) *path = KDL_LOSS_PATH_CLUSTER;
        else if (strcmp(p, "stream") == 0) *path = KDL_LOSS_PATH_STREAM;
    }
    const char *c = getenv("KDL_LOSS_CLUSTER");
    if (c) {
        long v = strtol(c, NULL, 10);
        if (v >= 1 && v <= 16) *cluster = (int)v;
    }
}

/* The empty batch: no launch; SUM/MEAN loss 0, info and valid_rows 0. */
static kdl_status_t empty_batch(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_loss_args_t *a)
{
    if (d->reduction != KDL_REDUCTION_NONE)
        KDL_CUDA_CHECK(cudaMemsetAsync(a->loss, 0, kdl_dtype_size(a->out_dtype), h->stream));
    if (a->info) KDL_CUDA_CHECK(cudaMemsetAsync(a->info, 0, sizeof(int64_t), h->stream));
    if (a->valid_rows) KDL_CUDA_CHECK(cudaMemsetAsync(a->valid_rows, 0, sizeof(int64_t), h->stream));
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_loss_forward_backward(kdl_handle_t h, const kdl_loss_desc_t *desc,
                                       const kdl_loss_args_t *args, void *workspace,
                                       size_t workspace_bytes)
{
    kdl_status_t st = kdl_handle_check(h); /* NULL handle, another current device */
    if (st != KDL_STATUS_SUCCESS) return st;
    st = kdl_loss_validate(desc, args, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (args->vocab > KDL_LOSS_MAX_VOCAB)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "vocab = %lld exceeds the GPU limit %lld",
                        (long long)args->vocab, (long long)KDL_LOSS_MAX_VOCAB);

    size_t need = kdl_loss_ws_bytes_for(args->rows, desc->reduction);
    if (workspace_bytes < need)
        return kdl_fail(KDL_STATUS_WORKSPACE_TOO_SMALL, "workspace_bytes = %zu < %zu needed", workspace_bytes,
                        need);
    if (need > 0 && !workspace) return kdl_fail(KDL_STATUS_NULL_POINTER, "workspace is NULL");
    if (need > 0 && ((uintptr_t)workspace % 16u) != 0)
        return kdl_fail(KDL_STATUS_BAD_PARAM, "workspace must be 16-byte aligned");

    if (args->rows == 0) return empty_batch(h, desc, args);

    kdl_loss_launch_t L;
    memset(&L, 0, sizeof L);
    L.desc = desc;
    L.args = args;
    L.workspace = workspace;
    L.stream = h->stream;
    L.cache = &h->loss_cache;
    L.cc_major = h->cc_major;
    L.sm_count = h->sm_count;
    L.cluster_launch = h->cluster_launch;
    L.smem_per_block_optin = h->smem_per_block_optin;
    read_overrides(&L.force_path, &L.force_cluster);

    kdl_loss_plan_t plan;
    memset(&plan, 0, sizeof plan);
    st = kdl_loss_launch(&L, &plan);
    if (st == KDL_STATUS_SUCCESS) kdl_last_plan = plan;
    return st;
}
