/*
 * host/gpu_ext.c - host wrappers of the extension kernels (kdloss_ext.h):
 * argument and workspace checks, then launches on the handle's stream
 * (kernels/ext.cu) and, for the fused linear path, the cuBLAS GEMMs around
 * the dense loss kernel (kernels/loss.cu, through kdl_loss_launch).  No
 * allocation, no host synchronisation.
 *
 * Compiled and linked in CUDA builds; not yet run on a GPU (see
 * docs/extensions.md, "What ran where").
 */
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "ext_internal.h"
#include "ext_launch.h"
#include "gpu_internal.h"
#include "launch.h"

/* ------------------------------------------------------------ sparse */
/* The sparse row kernel's shared memory (dynamic: the support bitmap of V
 * bits, the k entries, AKL's sort keys; plus its static part) against the
 * device's opt-in limit; `path` names the caller in the message. */
static kdl_status_t sparse_smem_check(kdl_handle_t h, const kdl_loss_desc_t *d, int64_t vocab, int64_t k,
                                      const char *path)
{
    const size_t smem = kdl_ext_sparse_smem_bytes(vocab, k, d->divergence == KDL_DIV_AKL) + KDL_EXT_SPARSE_STATIC_SMEM;
    if (smem > h->smem_per_block_optin)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED,
                        "%s: vocab %lld, k %lld need %zu bytes of shared memory (device: %zu)", path,
                        (long long)vocab, (long long)k, smem, h->smem_per_block_optin);
    return KDL_STATUS_SUCCESS;
}

static kdl_status_t sparse_check(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, size_t *need)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_sparse_validate(d, a, 0);
    if (st) return st;
    if (a->vocab > INT32_MAX) return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "sparse GPU path: vocab > 2^31 - 1");
    if (a->rows > INT32_MAX) return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "sparse GPU path: rows > 2^31 - 1 (one block per row)");
    st = sparse_smem_check(h, d, a->vocab, a->k, "sparse GPU path");
    if (st) return st;
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
    kdl_status_t st = kdl_handle_check(h); /* NULL handle, another current device */
    if (st) return st;
    size_t need = 0;
    st = sparse_check(h, d, a, &need);
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
    kdl_status_t st = kdl_handle_check(h); /* NULL handle, another current device */
    if (st) return st;
    st = kdl_shard_validate(d, a, 0);
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
static int is16(kdl_dtype_t t) { return t == KDL_DTYPE_F16 || t == KDL_DTYPE_BF16; }

/* a: loaded (kdl_fused_linear_args_load) */
static kdl_status_t fused_check(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a,
                                kdl_ext_fused_layout_t *lay)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_fused_linear_validate(d, a, 0);
    if (st) return st;
    int64_t c = kdl_fused_linear_chunk_rows(a);
    const int teacher = kdl_ext_fused_teacher(a);
    if (teacher == KDL_EXT_FUSED_TEACHER_SPARSE) {
        st = sparse_smem_check(h, d, a->vocab, a->k, "fused linear GPU path, sparse teacher");
        if (st) return st;
    }
    if (a->vocab > INT_MAX || a->hidden > INT_MAX || c > INT_MAX || a->ld_hidden > INT_MAX ||
        a->ld_weight > INT_MAX || a->ld_grad_hidden > INT_MAX || a->ld_grad_weight > INT_MAX ||
        a->rows > INT32_MAX ||
        (a->teacher_hidden && (a->teacher_hidden_size > INT_MAX || a->ld_teacher_hidden > INT_MAX ||
                               a->ld_teacher_weight > INT_MAX)))
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "fused linear GPU path: a dimension exceeds cuBLAS's int");
    if (a->vocab > KDL_LOSS_MAX_VOCAB)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "vocab = %lld exceeds the GPU limit %lld", (long long)a->vocab,
                        (long long)KDL_LOSS_MAX_VOCAB);
    *lay = kdl_ext_fused_layout(c, a->vocab, is16(a->hidden_dtype), a->grad_bias != NULL, teacher);
    if (!lay->total)
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "workspace of chunk %lld x vocab %lld", (long long)c,
                        (long long)a->vocab);
    if (c > 0 && kdl_ext_dense_ws_bytes(c) != kdl_loss_ws_bytes(c))
        return kdl_fail(KDL_STATUS_INTERNAL_ERROR, "dense workspace formula out of date");
    if (c > 0 && kdl_ext_sparse_rows_ws_bytes(c) != kdl_ext_sparse_ws_bytes(c))
        return kdl_fail(KDL_STATUS_INTERNAL_ERROR, "sparse workspace formula out of date");
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_fused_linear_workspace_size(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *args,
                                             size_t *bytes)
{
    if (!bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "bytes is NULL");
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_fused_linear_args_t a;
    kdl_status_t st = kdl_fused_linear_args_load(args, &a);
    if (st) return st;
    kdl_ext_fused_layout_t lay = {0, 0, 0, 0, 0, 0, 0};
    st = fused_check(h, d, &a, &lay);
    if (st) return st;
    *bytes = lay.total;
    return KDL_STATUS_SUCCESS;
}

static kdl_status_t blas(cublasStatus_t s, const char *what)
{
    return s == CUBLAS_STATUS_SUCCESS ? KDL_STATUS_SUCCESS : kdl_fail(KDL_STATUS_CUBLAS_ERROR, "%s: status %d", what, (int)s);
}

static cudaDataType_t cuda_type(kdl_dtype_t t)
{
    return t == KDL_DTYPE_BF16 ? CUDA_R_16BF : t == KDL_DTYPE_F16 ? CUDA_R_16F : CUDA_R_32F;
}

/* C (m x n, column-major, ld ldc, type tc) = alpha op(A) op(B) + beta C with
 * float32 scalars: cublasSgemm for all-F32 (strict FP32 under the handle's
 * CUBLAS_DEFAULT_MATH: no TF32), cublasGemmEx with CUBLAS_COMPUTE_32F
 * (16-bit products, float32 accumulation) otherwise. */
static kdl_status_t gemm(cublasHandle_t cb, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                         const void *A, kdl_dtype_t tA, int lda, const void *B, kdl_dtype_t tB, int ldb, float beta,
                         void *C, kdl_dtype_t tC, int ldc, const char *what)
{
    const float one = 1.0f;
    if (tA == KDL_DTYPE_F32 && tB == KDL_DTYPE_F32 && tC == KDL_DTYPE_F32)
        return blas(cublasSgemm(cb, ta, tb, m, n, k, &one, (const float *)A, lda, (const float *)B, ldb, &beta,
                                (float *)C, ldc),
                    what);
    return blas(cublasGemmEx(cb, ta, tb, m, n, k, &one, A, cuda_type(tA), lda, B, cuda_type(tB), ldb, &beta, C,
                             cuda_type(tC), ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                what);
}

/* A linear layer's logits for a chunk of c rows into the float32 chunk out
 * (c x V, row stride V): out^T (V x c, column-major) = W (as Dk x V, ld
 * ldw)^T . X (as Dk x c, ld ldx), X and W of dtype dt; with a bias (dtype
 * dt) broadcast into out first and the GEMM adding to it (beta = 1). */
static kdl_status_t chunk_logits(kdl_handle_t h, cublasHandle_t cb, int c, int64_t V, int64_t Dk, const void *X,
                                 int64_t ldx, const void *W, int64_t ldw, const void *bias, kdl_dtype_t dt, float *out,
                                 const char *what)
{
    float beta = 0.0f;
    if (bias) {
        kdl_status_t st = kdl_ext_fused_bias_fill(out, c, V, bias, (int)dt, h->stream);
        if (st) return st;
        beta = 1.0f;
    }
    return gemm(cb, CUBLAS_OP_T, CUBLAS_OP_N, (int)V, c, (int)Dk, W, dt, (int)ldw, X, dt, (int)ldx, beta, out,
                KDL_DTYPE_F32, (int)V, what);
}

/* The sparse teacher's loss and dL of the chunk of c rows at r0 (loss and
 * counters as the dense call below has them: rows r0.. of the per-row loss
 * for NONE, else the scaled sum as double into acc[4]; invalid, valid and
 * bad-index rows as int64 at acc + 5, 6, 8).  dd: SUM for MEAN.  grad: dL
 * (NULL: none) over L in place when it is L; ws: the sparse workspace of c
 * rows. */
static kdl_status_t sparse_chunk(kdl_handle_t h, const kdl_loss_desc_t *dd, const kdl_fused_linear_args_t *a,
                                 int64_t r0, int c, float *L, void *grad, kdl_dtype_t grad_dtype, double *acc,
                                 void *ws)
{
    kdl_sparse_args_t sa;
    kdl_fused_linear_sparse_view(a, &sa);
    sa.rows = c;
    sa.student = L;
    sa.ld_student = a->vocab;
    sa.student_dtype = KDL_DTYPE_F32;
    sa.teacher_indices = a->teacher_indices + (size_t)r0 * (size_t)a->ld_teacher_indices;
    sa.teacher_logprobs = (const char *)a->teacher_logprobs +
                          (size_t)r0 * (size_t)a->ld_teacher_logprobs * kdl_dtype_size(a->teacher_logprobs_dtype);
    sa.labels = a->labels ? a->labels + r0 : NULL;
    sa.grad = grad;
    sa.ld_grad = a->vocab;
    sa.grad_dtype = grad_dtype;
    if (dd->reduction == KDL_REDUCTION_NONE) {
        sa.loss = (char *)a->loss + (size_t)r0 * kdl_dtype_size(a->out_dtype);
    } else {
        sa.out_dtype = KDL_DTYPE_F64;
        sa.loss = acc + 4;
    }
    sa.info = (int64_t *)(acc + 5);
    sa.valid_rows = (int64_t *)(acc + 6);
    sa.bad_index_rows = (int64_t *)(acc + 8);
    return kdl_ext_sparse_launch(dd, &sa, ws, h->smem_per_block_optin, h->stream);
}

/*
 * Per chunk of c rows (rows r0 .. r0 + c - 1):
 *   1. L = H_c W^T (+ b): the bias broadcast into L first, then the GEMM
 *      with beta = 1.  With the teacher as a linear layer (teacher_hidden),
 *      T_c = H_t,c W_t^T (+ b_t) the same way into the workspace's float32
 *      teacher chunk (H_t, W_t of teacher_linear_dtype; the same GEMM
 *      helper: strict FP32 for F32, FP32 accumulation for 16-bit); the loss
 *      kernel then reads T_c (ld V, F32) instead of the caller's rows.  The
 *      teacher is frozen: nothing is written back to H_t, W_t or b_t.
 *   2. The dense loss kernel (kdl_loss_launch, as kdl_loss_forward_backward
 *      runs it) on the float32 chunk L against T_c, reduction SUM for SUM
 *      and MEAN (MEAN's 1/valid is applied at the end: the valid count of
 *      the whole call is known only after the last chunk), NONE for NONE
 *      (per-row losses straight into loss + r0).  Its gradient dL goes
 *        - F32 inputs, any input with grad_output, 16-bit MEAN: over L, in place (safe:
 *          the dense kernel reads every element of a row in passes 1-3,
 *          which end in a row-wide reduction every thread of the row's CTA
 *          or cluster joins, before pass 4; in pass 4 each thread reads
 *          the student element it then overwrites, and no element is read
 *          after it was written; staged paths read pass 4's student from
 *          shared memory anyway).  This holds because the dense kernel is
 *          never given MEAN here: MEAN with a gradient adds a second
 *          ("redo") launch that re-reads the student rows after the first
 *          wrote their gradient, which in place would read dL as logits;
 *        - 16-bit inputs without grad_output, SUM or NONE: into the separate
 *          16-bit buffer, rounded once from float32 (what autograd does);
 *      with grad_output, rows are then scaled by grad_output[r0 + r] (in
 *      place, or rounded once into the 16-bit buffer); 16-bit MEAN: float32
 *      in place, then scaled by 1/counted rows and rounded once into the
 *      16-bit buffer (the finish kernels scale by counted/valid).
 *      With the sparse teacher (version 4) the chunk's loss and dL come
 *      from the sparse launcher instead (kdl_ext_sparse_launch: one block
 *      per row, then its row-sum kernel) on the float32 chunk L with the
 *      chunk's index and log-prob rows, the same reductions (SUM for SUM
 *      and MEAN, never its own MEAN: that path counts rows and rescales the
 *      gradient after the rows wrote it), its workspace of c rows in place
 *      of the dense one, and dL where the dense call puts it.  In place is
 *      safe: sparse_row_kernel reads the row's other logits (the LSE
 *      passes, the support gathers for AKL and the loss) only before its
 *      last block-wide reduction (G); after it each thread reads the logit
 *      it then overwrites, the off-support pass and the support pass touch
 *      disjoint elements (the shared-memory bitmap; rows with a repeated
 *      index have left with a zero row), and nothing is read from shared
 *      memory that a gradient write changes.  Its bad-index count goes to
 *      acc + 8, summed over the chunks into acc[9].
 *   3. The chunk's loss and counts into the accumulators.
 *   4. dH_c = dL W, dW (+)= dL^T H_c, db (+)= colsum(dL).
 * Then the finish kernels (loss, counters, db, MEAN scale).
 */
kdl_status_t kdl_fused_linear_loss(kdl_handle_t h, const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *args,
                                   void *ws, size_t ws_bytes)
{
    kdl_status_t st = kdl_handle_check(h); /* NULL handle, another current device */
    if (st) return st;
    kdl_fused_linear_args_t x;
    st = kdl_fused_linear_args_load(args, &x);
    if (st) return st;
    const kdl_fused_linear_args_t *a = &x;
    kdl_ext_fused_layout_t lay = {0, 0, 0, 0, 0, 0, 0};
    st = fused_check(h, d, a, &lay);
    if (st) return st;
    if (ws_bytes < lay.total)
        return kdl_fail(KDL_STATUS_WORKSPACE_TOO_SMALL, "workspace %zu bytes, need %zu", ws_bytes, lay.total);
    if (!ws) return kdl_fail(KDL_STATUS_NULL_POINTER, "workspace is NULL");
    if ((uintptr_t)ws % 16u) return kdl_fail(KDL_STATUS_BAD_PARAM, "workspace must be 16-byte aligned");
    const int64_t N = a->rows, V = a->vocab, D = a->hidden, C = kdl_fused_linear_chunk_rows(a);
    const kdl_dtype_t hdt = a->hidden_dtype, gdt = a->grad_dtype;
    const int sixteen = is16(hdt);
    float *L = (float *)((char *)ws + lay.logits);
    float *Tw = (float *)((char *)ws + lay.teacher); /* teacher_hidden only */
    void *dl16 = (char *)ws + lay.dl16;
    void *dense_ws = (char *)ws + lay.dense;
    double *acc_b = (double *)((char *)ws + lay.bias);
    double *acc = (double *)((char *)ws + lay.acc);
    /* acc[0..3] and the bad-index slots acc[8], acc[9] (acc[4..6] are
     * written by each chunk's loss call, acc[7] by kdl_ext_fused_count) */
    KDL_CUDA_CHECK(cudaMemsetAsync(acc, 0, 10 * sizeof(double), h->stream));
    if (N == 0) {
        const size_t gsz = kdl_dtype_size(gdt);
        if (a->grad_weight)
            KDL_CUDA_CHECK(cudaMemset2DAsync(a->grad_weight, (size_t)a->ld_grad_weight * gsz, 0, (size_t)D * gsz,
                                             (size_t)V, h->stream));
        if (a->grad_bias) KDL_CUDA_CHECK(cudaMemsetAsync(a->grad_bias, 0, (size_t)V * gsz, h->stream));
        return kdl_ext_fused_finish_launch(d, a, acc, acc_b, 0, h->stream);
    }
    cublasHandle_t cb = NULL;
    st = kdl_get_cublas(h, &cb);
    if (st) return st;
    st = blas(cublasSetPointerMode(cb, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
    if (st) return st;

    const int want_dl = a->grad_hidden || a->grad_weight || a->grad_bias;
    /* where dL lives for the backward GEMMs, and its dtype */
    void *dL = sixteen ? dl16 : (void *)L;
    const kdl_dtype_t dldt = sixteen ? hdt : KDL_DTYPE_F32;
    /* 16-bit MEAN: dL is scaled by 1/counted rows (acc[7], counted on the
     * device) before its rounding, so dL, dH and dW have MEAN's magnitude:
     * with SUM's (up to N times larger; MEAN's 1/valid waits for the last
     * chunk) f16 overflowed where the MEAN result fits, and the final
     * 1/valid was a second rounding even without invalid rows (now
     * counted/valid = 1 then). */
    const int pre = sixteen && want_dl && d->reduction == KDL_REDUCTION_MEAN;
    if (pre) {
        st = kdl_ext_fused_count(a->labels, N, d->ignore_index, acc, h->stream);
        if (st) return st;
    }
    /* the dense kernel's gradient: straight into dL, or float32 in place
     * first when rows are scaled by grad_output or by 1/counted */
    const int direct = !a->grad_output && !pre;
    kdl_loss_desc_t dd = *d;
    if (dd.reduction == KDL_REDUCTION_MEAN) dd.reduction = KDL_REDUCTION_SUM;
    const size_t tsz = kdl_dtype_size(a->teacher_dtype), osz = kdl_dtype_size(a->out_dtype);
    const int sparse = kdl_fused_linear_sparse(a);

    for (int64_t r0 = 0; r0 < N; r0 += C) {
        const int c = (int)(N - r0 < C ? N - r0 : C);
        const void *Hc = (const char *)a->hidden_states + (size_t)r0 * (size_t)a->ld_hidden * kdl_dtype_size(hdt);
        /* 1. L = H_c W^T (+ b); with the teacher as a linear layer, T_c = H_t,c W_t^T (+ b_t) */
        st = chunk_logits(h, cb, c, V, D, Hc, a->ld_hidden, a->weight, a->ld_weight, a->bias, hdt, L, "logits GEMM");
        if (st) return st;
        if (a->teacher_hidden) {
            const kdl_dtype_t tdt = a->teacher_linear_dtype;
            const void *Htc = (const char *)a->teacher_hidden +
                              (size_t)r0 * (size_t)a->ld_teacher_hidden * kdl_dtype_size(tdt);
            st = chunk_logits(h, cb, c, V, a->teacher_hidden_size, Htc, a->ld_teacher_hidden, a->teacher_weight,
                              a->ld_teacher_weight, a->teacher_bias, tdt, Tw, "teacher logits GEMM");
            if (st) return st;
        }

        /* 2. loss and dL of the chunk: the sparse launcher or the dense loss kernel */
        if (sparse) {
            st = sparse_chunk(h, &dd, a, r0, c, L, want_dl ? (direct ? dL : (void *)L) : NULL,
                              direct ? dldt : KDL_DTYPE_F32, acc, dense_ws);
            if (st) return st;
        } else {
            kdl_loss_args_t la;
            kdl_loss_args_init(&la);
            la.rows = c;
            la.vocab = V;
            la.student = L;
            la.ld_student = V;
            la.student_dtype = KDL_DTYPE_F32;
            if (a->teacher_hidden) {
                la.teacher = Tw;
                la.ld_teacher = V;
                la.teacher_dtype = KDL_DTYPE_F32;
            } else {
                la.teacher = (const char *)a->teacher + (size_t)r0 * (size_t)a->ld_teacher * tsz;
                la.ld_teacher = a->ld_teacher;
                la.teacher_dtype = a->teacher_dtype;
            }
            la.labels = a->labels ? a->labels + r0 : NULL;
            if (want_dl) {
                la.grad = direct ? dL : (void *)L;
                la.grad_dtype = direct ? dldt : KDL_DTYPE_F32;
                la.ld_grad = V;
            }
            if (d->reduction == KDL_REDUCTION_NONE) {
                la.out_dtype = a->out_dtype;
                la.loss = (char *)a->loss + (size_t)r0 * osz;
            } else {
                la.out_dtype = KDL_DTYPE_F64;
                la.loss = acc + 4;
            }
            la.info = (int64_t *)(acc + 5);
            la.valid_rows = (int64_t *)(acc + 6);
            kdl_loss_launch_t LL;
            memset(&LL, 0, sizeof LL);
            LL.desc = &dd;
            LL.args = &la;
            LL.workspace = dense_ws;
            LL.stream = h->stream;
            LL.cache = &h->loss_cache; /* the handle's memo (kernels-review R4-6) */
            LL.cc_major = h->cc_major;
            LL.sm_count = h->sm_count;
            LL.cluster_launch = h->cluster_launch;
            LL.smem_per_block_optin = h->smem_per_block_optin;
            st = kdl_loss_launch(&LL, NULL);
            if (st) return st;
        }
        st = kdl_ext_fused_chunk_acc(d, acc, h->stream);
        if (st) return st;
        if (!want_dl) continue;
        if (!direct) {
            st = kdl_ext_fused_rowscale(L, c, V, a->grad_output, (int)a->grad_output_dtype, r0, dL, (int)dldt, acc,
                                        h->stream);
            if (st) return st;
        }

        /* 4. backward GEMMs and the bias column sums */
        if (a->grad_hidden) {
            /* dH_c^T (d x c, ld ld_gh) = W^T (d x V) . dL^T (V x c) */
            void *dHc = (char *)a->grad_hidden + (size_t)r0 * (size_t)a->ld_grad_hidden * kdl_dtype_size(gdt);
            st = gemm(cb, CUBLAS_OP_N, CUBLAS_OP_N, (int)D, c, (int)V, a->weight, hdt, (int)a->ld_weight, dL, dldt,
                      (int)V, 0.0f, dHc, gdt, (int)a->ld_grad_hidden, "dH GEMM");
            if (st) return st;
        }
        if (a->grad_weight) {
            /* dW^T (d x V, ld ld_gw) (+)= H_c^T (d x c) . dL (c x V) */
            st = gemm(cb, CUBLAS_OP_N, CUBLAS_OP_T, (int)D, (int)V, c, Hc, hdt, (int)a->ld_hidden, dL, dldt, (int)V,
                      r0 == 0 ? 0.0f : 1.0f, a->grad_weight, gdt, (int)a->ld_grad_weight, "dW GEMM");
            if (st) return st;
        }
        if (a->grad_bias) {
            st = kdl_ext_fused_colsum(dL, (int)dldt, c, V, acc_b, r0 == 0, h->stream);
            if (st) return st;
        }
    }
    return kdl_ext_fused_finish_launch(d, a, acc, acc_b, pre, h->stream);
}
