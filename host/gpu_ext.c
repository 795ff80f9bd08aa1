/*
 * host/gpu_ext.c - host wrappers of the extension kernels (kdloss_ext.h):
 * argument and workspace checks, then launches on the handle's stream
 * (kernels/ext.cu) and, for the fused linear path, the cuBLAS GEMMs.  No
 * allocation, no host synchronisation.
 *
 * Compiled and linked in CUDA builds; not yet run on a GPU (see
 * docs/extensions.md, "What ran where").
 */
#include <limits.h>
#include <stdint.h>

#include "ext_internal.h"
#include "ext_launch.h"
#include "gpu_internal.h"

/* ------------------------------------------------------------ sparse */
static kdl_status_t sparse_check(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, size_t *need)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_sparse_validate(d, a, 0);
    if (st) return st;
    if (a->vocab > INT32_MAX) return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "sparse GPU path: vocab > 2^31 - 1");
    if (a->rows > INT32_MAX) return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "sparse GPU path: rows > 2^31 - 1 (one block per row)");
    /* dynamic + static shared memory of the row kernel */
    size_t smem = kdl_ext_sparse_smem_bytes(a->vocab, a->k, d->divergence == KDL_DIV_AKL) + KDL_EXT_SPARSE_STATIC_SMEM;
    if (smem > h->smem_per_block_optin)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "sparse GPU path: vocab %lld needs %zu bytes of shared memory (device: %zu)",
                        (long long)a->vocab, smem, h->smem_per_block_optin);
    *need = kdl_ext_sparse_ws_bytes(a->rows);
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_sparse_workspace_size(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_sparse_args_t *a,
                                       size_t *bytes)
{
    if (!bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "bytes is NULL");
    size_t need = 0;
    kdl_status_t st = sparse_check(h, d, a, &need);
    if (st) return st;
    *bytes = need;
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_sparse_loss(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, void *ws,
                             size_t ws_bytes)
{
    size_t need = 0;
    kdl_status_t st = sparse_check(h, d, a, &need);
    if (st) return st;
    if (ws_bytes < need)
        return kdl_fail(KDL_STATUS_WORKSPACE_TOO_SMALL, "workspace %zu bytes, need %zu", ws_bytes, need);
    if (!ws) return kdl_fail(KDL_STATUS_NULL_POINTER, "workspace is NULL");
    if ((uintptr_t)ws % 16u) return kdl_fail(KDL_STATUS_BAD_PARAM, "workspace must be 16-byte aligned");
    return kdl_ext_sparse_launch(d, a, ws, h->smem_per_block_optin, h->stream);
}

/* ---------------------------------------------------- vocabulary-parallel */
kdl_status_t kdl_shard_step(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_shard_args_t *a, int step,
                            kdl_shard_op_t *op, int64_t *count)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_shard_validate(d, a, 0);
    if (st) return st;
    if (!op || !count) return kdl_fail(KDL_STATUS_NULL_POINTER, "op or count is NULL");
    int akl = d->divergence == KDL_DIV_AKL;
    int nsteps = kdl_shard_num_steps(akl, a->teacher_dtype);
    if (step < 0 || step >= nsteps) return kdl_fail(KDL_STATUS_BAD_PARAM, "step %d not in [0, %d)", step, nsteps);
    if (a->rows > INT32_MAX) return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "rows > 2^31 - 1");
    int digit;
    kdl_shard_phase_t ph = kdl_shard_phase_of(akl, a->teacher_dtype, step, &digit);
    st = kdl_ext_shard_launch(d, a, (int)ph, digit, h->stream);
    if (st) return st;
    kdl_shard_op_count(akl, a->teacher_dtype, a->rows, a->num_shards, step, op, count);
    return KDL_STATUS_SUCCESS;
}

/* ------------------------------------------------------------ fused linear */
static kdl_status_t fused_check(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a,
                                size_t *need)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_fused_linear_validate(d, a, 0);
    if (st) return st;
    int64_t c = kdl_fused_linear_chunk_rows(a);
    if (a->vocab > INT_MAX || a->hidden > INT_MAX || c > INT_MAX || a->ld_hidden > INT_MAX ||
        a->ld_weight > INT_MAX || a->ld_grad_hidden > INT_MAX || a->ld_grad_weight > INT_MAX ||
        a->rows > INT32_MAX)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "fused linear GPU path: a dimension exceeds cuBLAS's int");
    *need = kdl_ext_fused_workspace_bytes(c, a->vocab);
    if (!*need) return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "workspace of chunk %lld x vocab %lld", (long long)c,
                                (long long)a->vocab);
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_fused_linear_workspace_size(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a,
                                             size_t *bytes)
{
    if (!bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "bytes is NULL");
    size_t need = 0;
    kdl_status_t st = fused_check(h, d, a, &need);
    if (st) return st;
    *bytes = need;
    return KDL_STATUS_SUCCESS;
}

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

static kdl_status_t blas(cublasStatus_t s, const char *what)
{
    return s == CUBLAS_STATUS_SUCCESS ? KDL_STATUS_SUCCESS : kdl_fail(KDL_STATUS_CUBLAS_ERROR, "%s: status %d", what, (int)s);
}

kdl_status_t kdl_fused_linear_loss(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a,
                                   void *ws, size_t ws_bytes)
{
    size_t need = 0;
    kdl_status_t st = fused_check(h, d, a, &need);
    if (st) return st;
    if (ws_bytes < need)
        return kdl_fail(KDL_STATUS_WORKSPACE_TOO_SMALL, "workspace %zu bytes, need %zu", ws_bytes, need);
    if (!ws) return kdl_fail(KDL_STATUS_NULL_POINTER, "workspace is NULL");
    if ((uintptr_t)ws % 16u) return kdl_fail(KDL_STATUS_BAD_PARAM, "workspace must be 16-byte aligned");
    const int64_t N = a->rows, V = a->vocab, D = a->hidden, C = kdl_fused_linear_chunk_rows(a);
    /* the layout of kdl_ext_fused_workspace_bytes: logits [C, V], row losses
     * [C] and classes [C], accumulators; with N = 0 (C = 0) only the 256
     * bytes of accumulators, at offset 0 */
    float *L = (float *)ws;
    double *row_loss = (double *)((char *)ws + align256((size_t)C * (size_t)V * 4));
    double *acc = (double *)((char *)row_loss + align256((size_t)C * (sizeof(double) + 1)));
    KDL_CUDA_CHECK(cudaMemsetAsync(acc, 0, 4 * sizeof(double), h->stream));
    if (N == 0 && a->grad_weight)
        KDL_CUDA_CHECK(cudaMemset2DAsync(a->grad_weight, (size_t)a->ld_grad_weight * 4, 0, (size_t)D * 4, (size_t)V,
                                         h->stream));
    cublasHandle_t cb = NULL;
    if (N > 0) {
        st = kdl_get_cublas(h, &cb);
        if (st) return st;
    }
    const float one = 1.0f, zero = 0.0f;
    const float *H = (const float *)a->hidden_states, *W = (const float *)a->weight;
    for (int64_t r0 = 0; r0 < N; r0 += C) {
        int c = (int)(N - r0 < C ? N - r0 : C);
        const float *Hc = H + r0 * a->ld_hidden;
        /* L^T (V x c, column-major, ld V) = W (as d x V, ld ld_w)^T . H_c (as d x c) */
        st = blas(cublasSgemm(cb, CUBLAS_OP_T, CUBLAS_OP_N, (int)V, c, (int)D, &one, W, (int)a->ld_weight, Hc,
                              (int)a->ld_hidden, &zero, L, (int)V),
                  "cublasSgemm logits");
        if (st) return st;
        st = kdl_ext_fused_chunk_launch(d, a, L, r0, c, row_loss, acc, h->stream);
        if (st) return st;
        if (a->grad_hidden) {
            float *dHc = (float *)a->grad_hidden + r0 * a->ld_grad_hidden;
            st = blas(cublasSgemm(cb, CUBLAS_OP_N, CUBLAS_OP_N, (int)D, c, (int)V, &one, W, (int)a->ld_weight, L,
                                  (int)V, &zero, dHc, (int)a->ld_grad_hidden),
                      "cublasSgemm dH");
            if (st) return st;
        }
        if (a->grad_weight) {
            const float *beta = r0 == 0 ? &zero : &one;
            st = blas(cublasSgemm(cb, CUBLAS_OP_N, CUBLAS_OP_T, (int)D, (int)V, c, &one, Hc, (int)a->ld_hidden, L,
                                  (int)V, beta, (float *)a->grad_weight, (int)a->ld_grad_weight),
                      "cublasSgemm dW");
            if (st) return st;
        }
    }
    return kdl_ext_fused_finish_launch(d, a, acc, h->stream);
}
