/*
 * host/ref_fused_linear.c - float64 CPU reference of the fused linear + loss
 * (kdloss_ext.h part 3), plus the argument check and chunk choice the GPU
 * path shares.
 *
 * Straightforward on purpose (it is the oracle): L = H W^T (+ b)
 * materialised in float64 [N,V] (and, with the teacher as a linear layer,
 * the teacher logits H_t W_t^T (+ b_t) likewise, given to the dense
 * reference as an F64 teacher), the dense reference
 * kdl_ref_loss_forward_backward on (L, teacher) gives the loss and
 * dL = d loss / d L, row i scaled by grad_output[i] when given, then
 * dH = dL W, dW = dL^T H and db = column sums of dL as plain loops (no
 * skipping of zero rows, so a non-finite hidden row poisons dW exactly as a
 * GEMM would).
 *
 * Versions of kdl_fused_linear_args_t: every entry point reads the caller's
 * struct through kdl_fused_linear_args_load, which accepts the version-1
 * to version-3 sizes and fills the later fields with their defaults.
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "ext_internal.h"
#include "internal.h"
#include "kdloss/kdloss_ref.h"

void kdl_fused_linear_args_init(kdl_fused_linear_args_t *a)
{
    if (!a) return;
    memset(a, 0, sizeof *a);
    a->struct_size = sizeof *a;
    a->hidden_dtype = KDL_DTYPE_F32;
    a->weight_dtype = KDL_DTYPE_F32;
    a->teacher_dtype = KDL_DTYPE_F32;
    a->grad_dtype = KDL_DTYPE_F32;
    a->out_dtype = KDL_DTYPE_F32;
    a->grad_output_dtype = KDL_DTYPE_F32;
    a->teacher_linear_dtype = KDL_DTYPE_F32;
    a->teacher_logprobs_dtype = KDL_DTYPE_F32;
    a->sparse_mode = KDL_SPARSE_RENORMALISED;
}

_Static_assert(KDL_FUSED_LINEAR_ARGS_V1_SIZE == offsetof(kdl_fused_linear_args_t, valid_rows) + sizeof(int64_t *),
               "version 1 of kdl_fused_linear_args_t ended at valid_rows");
_Static_assert(KDL_FUSED_LINEAR_ARGS_V2_SIZE == offsetof(kdl_fused_linear_args_t, grad_bias) + sizeof(void *),
               "version 2 of kdl_fused_linear_args_t ended at grad_bias");
_Static_assert(KDL_FUSED_LINEAR_ARGS_V3_SIZE ==
                   (offsetof(kdl_fused_linear_args_t, teacher_linear_dtype) + sizeof(kdl_dtype_t) +
                    _Alignof(kdl_fused_linear_args_t) - 1) / _Alignof(kdl_fused_linear_args_t) *
                       _Alignof(kdl_fused_linear_args_t),
               "version 3 of kdl_fused_linear_args_t ended at teacher_linear_dtype (its sizeof padded it)");

kdl_status_t kdl_fused_linear_args_load(const kdl_fused_linear_args_t *in, kdl_fused_linear_args_t *out)
{
    if (!in) return kdl_fail(KDL_STATUS_NULL_POINTER, "args is NULL");
    size_t sz;
    memcpy(&sz, in, sizeof sz);
    kdl_fused_linear_args_init(out);
    if (sz == sizeof *out) {
        memcpy(out, in, sizeof *out);
    } else if (sz == KDL_FUSED_LINEAR_ARGS_V1_SIZE || sz == KDL_FUSED_LINEAR_ARGS_V2_SIZE ||
               sz == KDL_FUSED_LINEAR_ARGS_V3_SIZE) {
        memcpy(out, in, sz); /* the rest keeps init's defaults */
        out->struct_size = sizeof *out;
    } else {
        return kdl_fail(KDL_STATUS_BAD_STRUCT_SIZE,
                        "args->struct_size is %zu, expected %zu (or %zu, version 3; %zu, version 2; %zu, version 1)",
                        sz, sizeof *out, (size_t)KDL_FUSED_LINEAR_ARGS_V3_SIZE, (size_t)KDL_FUSED_LINEAR_ARGS_V2_SIZE,
                        (size_t)KDL_FUSED_LINEAR_ARGS_V1_SIZE);
    }
    return KDL_STATUS_SUCCESS;
}

int kdl_fused_linear_sparse(const kdl_fused_linear_args_t *a)
{
    return a->teacher_indices || a->teacher_logprobs || a->k != 0;
}

void kdl_fused_linear_sparse_view(const kdl_fused_linear_args_t *a, kdl_sparse_args_t *s)
{
    kdl_sparse_args_init(s);
    s->mode = a->sparse_mode;
    s->rows = a->rows;
    s->vocab = a->vocab;
    s->k = a->k;
    /* the student logits are formed inside the call: H stands in for them in
     * the pointer checks (its own were made already; its dtype keeps the
     * alignment check true) until a caller sets the real ones */
    s->student = a->hidden_states;
    s->ld_student = a->vocab;
    s->student_dtype = a->hidden_dtype;
    s->teacher_indices = a->teacher_indices;
    s->ld_indices = a->ld_teacher_indices;
    s->teacher_logprobs = a->teacher_logprobs;
    s->ld_logprobs = a->ld_teacher_logprobs;
    s->teacher_dtype = a->teacher_logprobs_dtype;
    s->labels = a->labels;
    s->out_dtype = a->out_dtype;
    s->loss = a->loss;
    s->info = a->info;
    s->valid_rows = a->valid_rows;
    s->bad_index_rows = a->bad_index_rows;
}

static int is16(kdl_dtype_t t) { return t == KDL_DTYPE_F16 || t == KDL_DTYPE_BF16; }

/* The teacher as a linear layer is asked for (version 3): by teacher_hidden,
 * or at rows = 0 by teacher_weight or teacher_bias alone (validate_loaded). */
static int layer_asked(const kdl_fused_linear_args_t *a)
{
    return a->teacher_hidden || a->teacher_weight || a->teacher_bias;
}

/* Default chunk: the whole workspace stays at most 1/8 of one [N, V] logits
 * tensor in the inputs' dtype (H and W), what a non-fused call would
 * materialise for the student alone.  Per chunk row the workspace holds
 * float32 logits (4 bytes a column), with 16-bit H and W the 16-bit dL (2),
 * and with the teacher as a linear layer (teacher_hidden) the float32
 * teacher logits (4):
 *   F32:             c·V·4       <= N·V·4 / 8   c = N/8
 *   F32, teacher:    c·V·(4+4)   <= N·V·4 / 8   c = N/16
 *   16-bit:          c·V·(4+2)   <= N·V·2 / 8   c = N/24
 *   16-bit, teacher: c·V·(4+2+4) <= N·V·2 / 8   c = N/40
 * Then c drops by as many rows as the small per-call buffers need (one row
 * at a large V) so that the total, not only the chunk, is within the 1/8. */
int64_t kdl_fused_linear_chunk_rows(const kdl_fused_linear_args_t *a)
{
    if (!a || a->rows <= 0) return 0;
    int64_t c = a->chunk_rows;
    if (c <= 0) {
        const int sixteen = is16(a->hidden_dtype) && is16(a->weight_dtype), teacher = kdl_ext_fused_teacher(a);
        const int tlin = teacher == KDL_EXT_FUSED_TEACHER_LINEAR;
        c = a->rows / (sixteen ? (tlin ? 40 : 24) : (tlin ? 16 : 8));
        if (c < 1) c = 1;
        if (c > 4096) c = 4096;
        if (a->vocab > 0) {
            const double budget = (double)a->rows * (double)a->vocab * (sixteen ? 2.0 : 4.0) / 8.0;
            while (c > 1 &&
                   (double)kdl_ext_fused_layout(c, a->vocab, sixteen, a->grad_bias != NULL, teacher).total > budget)
                c--;
        }
    }
    return c < a->rows ? c : a->rows;
}

/* The check of kdl_fused_linear_validate on already loaded args.
 *
 * The teacher as a linear layer (tlin) is asked for by teacher_hidden, or,
 * at rows = 0, by teacher_weight or teacher_bias alone: like every other
 * array, H_t and W_t are required only when there are rows (an empty
 * tensor's data pointer may be NULL), so an empty call of a teacher-linear
 * caller passes whatever its empty H_t gives.  Its sizes, strides and dtype
 * are checked in both cases; `teacher`, teacher_dtype and ld_teacher are
 * then unused and not checked (teacher must be NULL). */
static kdl_status_t validate_loaded(const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a, int allow_f64)
{
    KDL_CHECK_STRUCT_PAIR(d, a);
    const int tlin = layer_asked(a);
    const int sparse = kdl_fused_linear_sparse(a);
    if (a->vocab < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "vocab = %lld < 1", (long long)a->vocab);
    kdl_status_t st = kdl_ext_validate_desc(d, a->vocab, a->out_dtype);
    if (st != KDL_STATUS_SUCCESS) return st;
    if ((unsigned)a->hidden_dtype > KDL_DTYPE_F64 || (unsigned)a->weight_dtype > KDL_DTYPE_F64 ||
        (!tlin && !sparse && (unsigned)a->teacher_dtype > KDL_DTYPE_F64) || (unsigned)a->grad_dtype > KDL_DTYPE_F64 ||
        (unsigned)a->grad_output_dtype > KDL_DTYPE_F64)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "unknown dtype");
    if (tlin && (unsigned)a->teacher_linear_dtype > KDL_DTYPE_F64)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "unknown teacher_linear_dtype %d", (int)a->teacher_linear_dtype);
    const int grads = a->grad_hidden || a->grad_weight || a->grad_bias;
    /* gradients: F32, the inputs' common 16-bit dtype, or (reference) F64 */
    const int g16 = is16(a->grad_dtype) && a->hidden_dtype == a->grad_dtype && a->weight_dtype == a->grad_dtype;
    if (grads && a->grad_dtype != KDL_DTYPE_F32 && !g16 && !(allow_f64 && a->grad_dtype == KDL_DTYPE_F64))
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED,
                        allow_f64 ? "grad_dtype must be f32, f64, or the 16-bit dtype of both hidden_states and weight"
                                  : "grad_dtype must be f32, or the 16-bit dtype of both hidden_states and weight");
    if (!allow_f64) {
        if (a->hidden_dtype == KDL_DTYPE_F64 || a->weight_dtype == KDL_DTYPE_F64 ||
            (!tlin && !sparse && a->teacher_dtype == KDL_DTYPE_F64) ||
            (tlin && a->teacher_linear_dtype == KDL_DTYPE_F64))
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "f64 data is supported by the reference only");
        if (a->hidden_dtype != a->weight_dtype)
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "the GPU path takes hidden_states and weight of one dtype (f32, bf16 or f16)");
    }
    if (a->grad_output && d->reduction != KDL_REDUCTION_NONE)
        return kdl_fail(KDL_STATUS_BAD_PARAM, "grad_output is for reduction NONE only (per-row losses)");
    if ((a->teacher != NULL) + tlin + sparse > 1)
        return kdl_fail(KDL_STATUS_BAD_PARAM,
                        "more than one teacher source among teacher, teacher_hidden (/ teacher_weight / teacher_bias) "
                        "and teacher_indices (/ teacher_logprobs / k)");
    if (tlin && !a->teacher_hidden && a->rows > 0)
        return kdl_fail(KDL_STATUS_BAD_PARAM, "teacher_weight or teacher_bias without teacher_hidden");
    if (a->rows < 0) return kdl_fail(KDL_STATUS_BAD_SIZE, "rows = %lld < 0", (long long)a->rows);
    if (a->hidden < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "hidden = %lld < 1", (long long)a->hidden);
    if (a->chunk_rows < 0) return kdl_fail(KDL_STATUS_BAD_SIZE, "chunk_rows = %lld < 0", (long long)a->chunk_rows);
    const int64_t dt = a->teacher_hidden_size;
    if (tlin && dt < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "teacher_hidden_size = %lld < 1", (long long)dt);
    if (a->ld_hidden < a->hidden)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_hidden = %lld < hidden = %lld", (long long)a->ld_hidden,
                        (long long)a->hidden);
    if (a->ld_weight < a->hidden)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_weight = %lld < hidden = %lld", (long long)a->ld_weight,
                        (long long)a->hidden);
    if (tlin && a->ld_teacher_hidden < dt)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_teacher_hidden = %lld < teacher_hidden_size = %lld",
                        (long long)a->ld_teacher_hidden, (long long)dt);
    if (tlin && a->ld_teacher_weight < dt)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_teacher_weight = %lld < teacher_hidden_size = %lld",
                        (long long)a->ld_teacher_weight, (long long)dt);
    if (!tlin && !sparse && a->ld_teacher < a->vocab)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_teacher = %lld < vocab = %lld", (long long)a->ld_teacher,
                        (long long)a->vocab);
    if (a->grad_hidden && a->ld_grad_hidden < a->hidden)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_grad_hidden = %lld < hidden = %lld",
                        (long long)a->ld_grad_hidden, (long long)a->hidden);
    if (a->grad_weight && a->ld_grad_weight < a->hidden)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_grad_weight = %lld < hidden = %lld",
                        (long long)a->ld_grad_weight, (long long)a->hidden);
    if (a->rows > 0 && !a->hidden_states) return kdl_fail(KDL_STATUS_NULL_POINTER, "hidden_states is NULL");
    if (a->rows > 0 && !a->weight) return kdl_fail(KDL_STATUS_NULL_POINTER, "weight is NULL");
    if (a->rows > 0 && !tlin && !sparse && !a->teacher) return kdl_fail(KDL_STATUS_NULL_POINTER, "teacher is NULL");
    if (a->rows > 0 && tlin && !a->teacher_weight) return kdl_fail(KDL_STATUS_NULL_POINTER, "teacher_weight is NULL");
    if (!a->loss && !(d->reduction == KDL_REDUCTION_NONE && a->rows == 0))
        return kdl_fail(KDL_STATUS_NULL_POINTER, "loss is NULL");
    const size_t gsz = kdl_dtype_size(a->grad_dtype), tsz = tlin ? kdl_dtype_size(a->teacher_linear_dtype) : 1;
    const kdl_array_ref_t arrays[] = {{a->hidden_states, kdl_dtype_size(a->hidden_dtype), "hidden_states"},
                                      {a->weight, kdl_dtype_size(a->weight_dtype), "weight"},
                                      {a->teacher, kdl_dtype_size(a->teacher_dtype), "teacher"},
                                      {a->labels, 8, "labels"},
                                      {a->grad_hidden, gsz, "grad_hidden"},
                                      {a->grad_weight, gsz, "grad_weight"},
                                      {a->loss, kdl_dtype_size(a->out_dtype), "loss"},
                                      {a->info, 8, "info"},
                                      {a->valid_rows, 8, "valid_rows"},
                                      {a->grad_output, kdl_dtype_size(a->grad_output_dtype), "grad_output"},
                                      {a->bias, kdl_dtype_size(a->weight_dtype), "bias"},
                                      {a->grad_bias, gsz, "grad_bias"},
                                      {a->teacher_hidden, tsz, "teacher_hidden"},
                                      {a->teacher_weight, tsz, "teacher_weight"},
                                      {a->teacher_bias, tsz, "teacher_bias"}};
    st = kdl_check_alignment(arrays, sizeof arrays / sizeof arrays[0]);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (!kdl_ext_span_ok(a->rows, a->hidden, a->ld_hidden, kdl_dtype_size(a->hidden_dtype)) ||
        !kdl_ext_span_ok(a->vocab, a->hidden, a->ld_weight, kdl_dtype_size(a->weight_dtype)) ||
        (!tlin && !sparse && !kdl_ext_span_ok(a->rows, a->vocab, a->ld_teacher, kdl_dtype_size(a->teacher_dtype))) ||
        (tlin && !kdl_ext_span_ok(a->rows, dt, a->ld_teacher_hidden, tsz)) ||
        (tlin && !kdl_ext_span_ok(a->vocab, dt, a->ld_teacher_weight, tsz)) ||
        (a->grad_hidden && !kdl_ext_span_ok(a->rows, a->hidden, a->ld_grad_hidden, gsz)) ||
        (a->grad_weight && !kdl_ext_span_ok(a->vocab, a->hidden, a->ld_grad_weight, gsz)) ||
        !kdl_ext_span_ok(a->rows, a->vocab, a->vocab, sizeof(double)) || (uint64_t)a->rows > (uint64_t)SIZE_MAX / 8)
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "sizes overflow");
    if (sparse) { /* the sparse teacher's rules, by the sparse check itself */
        kdl_sparse_args_t s;
        kdl_fused_linear_sparse_view(a, &s);
        return kdl_sparse_validate(d, &s, allow_f64);
    }
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_fused_linear_validate(const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a, int allow_f64)
{
    kdl_clear_error();
    if (!d) return kdl_fail(KDL_STATUS_NULL_POINTER, "desc is NULL");
    kdl_fused_linear_args_t x;
    kdl_status_t st = kdl_fused_linear_args_load(a, &x);
    if (st != KDL_STATUS_SUCCESS) return st;
    return validate_loaded(d, &x, allow_f64);
}

/* out [N, V] = X W^T (+ b), float64, X [N, ldx] of xdt, W [V, ldw] and b [V]
 * of wdt, x a scratch row of D doubles: plain loops. */
static void linear_f64(int64_t N, int64_t D, int64_t V, const void *X, int64_t ldx, kdl_dtype_t xdt, const void *W,
                       int64_t ldw, kdl_dtype_t wdt, const void *b, double *x, double *out)
{
    for (int64_t i = 0; i < N; i++) {
        for (int64_t k = 0; k < D; k++) x[k] = kdl_load_as_double(X, xdt, i * ldx + k);
        for (int64_t v = 0; v < V; v++) {
            double s = 0;
            for (int64_t k = 0; k < D; k++) s += x[k] * kdl_load_as_double(W, wdt, v * ldw + k);
            if (b) s += kdl_load_as_double(b, wdt, v);
            out[i * V + v] = s;
        }
    }
}

kdl_status_t kdl_ref_fused_linear_loss(const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *args)
{
    kdl_status_t st = kdl_fused_linear_validate(d, args, 1);
    if (st != KDL_STATUS_SUCCESS) return st;
    kdl_fused_linear_args_t x;
    (void)kdl_fused_linear_args_load(args, &x); /* succeeded in validate */
    const kdl_fused_linear_args_t *a = &x;
    const int64_t N = a->rows, V = a->vocab, D = a->hidden;
    /* the teacher as a linear layer (as validate_loaded tells it; at N = 0
     * H_t may be NULL and nothing is formed) */
    const int tlin = layer_asked(a);
    const int sparse = kdl_fused_linear_sparse(a);
    const int64_t Dt = tlin ? a->teacher_hidden_size : 0;
    size_t nl = (size_t)(N > 0 ? N : 1) * (size_t)V;
    double *L = (double *)malloc(nl * sizeof(double));
    double *dL = (double *)malloc(nl * sizeof(double));
    double *h = (double *)malloc((size_t)(D > Dt ? D : Dt) * sizeof(double));
    double *T = tlin ? (double *)malloc(nl * sizeof(double)) : NULL;
    if (!L || !dL || !h || (tlin && !T)) {
        free(L);
        free(dL);
        free(h);
        free(T);
        return kdl_fail(KDL_STATUS_ALLOC_FAILED, "reference logits [%lld, %lld]", (long long)N, (long long)V);
    }
    linear_f64(N, D, V, a->hidden_states, a->ld_hidden, a->hidden_dtype, a->weight, a->ld_weight, a->weight_dtype,
               a->bias, h, L);
    if (tlin)
        linear_f64(N, Dt, V, a->teacher_hidden, a->ld_teacher_hidden, a->teacher_linear_dtype, a->teacher_weight,
                   a->ld_teacher_weight, a->teacher_linear_dtype, a->teacher_bias, h, T);
    kdl_loss_args_t la;
    kdl_loss_args_init(&la);
    la.rows = N;
    la.vocab = V;
    la.student = L;
    la.ld_student = V;
    la.student_dtype = KDL_DTYPE_F64;
    la.teacher = tlin ? T : a->teacher;
    la.ld_teacher = tlin ? V : a->ld_teacher;
    la.teacher_dtype = tlin ? KDL_DTYPE_F64 : a->teacher_dtype;
    la.labels = a->labels;
    la.grad = dL;
    la.ld_grad = V;
    la.grad_dtype = KDL_DTYPE_F64;
    la.out_dtype = a->out_dtype;
    la.loss = a->loss;
    la.info = a->info;
    la.valid_rows = a->valid_rows;
    if (sparse) {
        kdl_sparse_args_t sa;
        kdl_fused_linear_sparse_view(a, &sa);
        sa.student = L;
        sa.student_dtype = KDL_DTYPE_F64;
        sa.grad = dL;
        sa.ld_grad = V;
        sa.grad_dtype = KDL_DTYPE_F64;
        st = kdl_ref_sparse_loss(d, &sa);
    } else {
        st = kdl_ref_loss_forward_backward(d, &la);
    }
    if (st == KDL_STATUS_SUCCESS && a->grad_output)
        for (int64_t i = 0; i < N; i++) {
            const double g = kdl_load_as_double(a->grad_output, a->grad_output_dtype, i);
            for (int64_t v = 0; v < V; v++) dL[i * V + v] *= g;
        }
    if (st == KDL_STATUS_SUCCESS && a->grad_hidden)
        for (int64_t i = 0; i < N; i++)
            for (int64_t k = 0; k < D; k++) {
                double s = 0;
                for (int64_t v = 0; v < V; v++)
                    s += dL[i * V + v] * kdl_load_as_double(a->weight, a->weight_dtype, v * a->ld_weight + k);
                kdl_store_from_double(a->grad_hidden, a->grad_dtype, i * a->ld_grad_hidden + k, s);
            }
    if (st == KDL_STATUS_SUCCESS && a->grad_weight)
        for (int64_t v = 0; v < V; v++)
            for (int64_t k = 0; k < D; k++) {
                double s = 0;
                for (int64_t i = 0; i < N; i++)
                    s += dL[i * V + v] * kdl_load_as_double(a->hidden_states, a->hidden_dtype, i * a->ld_hidden + k);
                kdl_store_from_double(a->grad_weight, a->grad_dtype, v * a->ld_grad_weight + k, s);
            }
    if (st == KDL_STATUS_SUCCESS && a->grad_bias)
        for (int64_t v = 0; v < V; v++) {
            double s = 0;
            for (int64_t i = 0; i < N; i++) s += dL[i * V + v];
            kdl_store_from_double(a->grad_bias, a->grad_dtype, v, s);
        }
    free(L);
    free(dL);
    free(h);
    free(T);
    return st;
}
