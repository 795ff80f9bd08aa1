/*
 * host/ref_sparse.c - float64 CPU reference of the sparse-teacher loss
 * (kdloss_ext.h part 1), plus the argument check both paths share.
 *
 * Row i has the student logits s [V] (z = s/tau, lq = z - LSE(z) over all V)
 * and the teacher's support J = {j_1..j_k} with given log-probs lt_j.
 *
 *   RENORMALISED  lp_v = lt_v - LSE_J(lt) on J, -inf elsewhere; the loss is
 *                 the dense divergence over all V tokens, sum_v elem(lp_v,
 *                 lq_v), and dz_v = qg_v - q_v G, G = sum_v qg_v, exactly
 *                 as in the dense reference.
 *   TAIL_BUCKET   k + 1 cells: cell j in J has (lt_j, lq_j); the bucket b has
 *                 lp_b = log(1 - sum_J exp(lt)) (computed as log(-expm1(
 *                 LSE_J(lt)))), -inf when k = V (where a given mass below
 *                 1 - KDL_SPARSE_MASS_TOL makes the row invalid: there is no
 *                 token to hold the rest), and lq_b = LSE_{v not in J}
 *                 lq_v.  Loss sum over cells of elem(lp_c, lq_c), G = sum of
 *                 qg_c; dz_j = qg_j - q_j G on J and, outside J, where q_b
 *                 is the sum of the q_v: dz_v = (q_v/q_b) qg_b - q_v G
 *                 (chain rule through q_b = sum_{v not in J} q_v).
 *                 AKL: the head is chosen among the support cells only, in
 *                 teacher order (lt descending, ties by lower vocabulary
 *                 index), cumulative mass of the given p; the bucket is tail.
 *
 * The element maths comes from kdloss/detail/elem.h, as everywhere.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ext_internal.h"
#include "internal.h"
#include "kdloss/kdloss_ref.h"

/* ------------------------------------------------------------ arguments */
void kdl_sparse_args_init(kdl_sparse_args_t *a)
{
    if (!a) return;
    memset(a, 0, sizeof *a);
    a->struct_size = sizeof *a;
    a->mode = KDL_SPARSE_RENORMALISED;
    a->student_dtype = KDL_DTYPE_F32;
    a->teacher_dtype = KDL_DTYPE_F32;
    a->grad_dtype = KDL_DTYPE_F32;
    a->out_dtype = KDL_DTYPE_F32;
}

int kdl_sparse_supports(kdl_sparse_mode_t mode, kdl_divergence_t div)
{
    if ((unsigned)div >= KDL_DIV_COUNT_) return 0;
    if (mode == KDL_SPARSE_TAIL_BUCKET) return 1;
    if (mode == KDL_SPARSE_RENORMALISED)
        return div == KDL_DIV_FKL || div == KDL_DIV_JSD || div == KDL_DIV_TVD || div == KDL_DIV_SKL ||
               div == KDL_DIV_SRKL;
    return 0;
}

kdl_status_t kdl_sparse_validate(const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, int allow_f64)
{
    kdl_clear_error();
    KDL_CHECK_STRUCT_PAIR(d, a);
    if (a->vocab < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "vocab = %lld < 1", (long long)a->vocab);
    kdl_status_t st = kdl_ext_validate_desc(d, a->vocab, a->out_dtype);
    if (st != KDL_STATUS_SUCCESS) return st;
    if ((unsigned)a->mode >= KDL_SPARSE_MODE_COUNT_)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "sparse mode %d unknown", (int)a->mode);
    st = kdl_ext_check_dtypes(a->student_dtype, a->teacher_dtype, a->grad != NULL, a->grad_dtype, allow_f64);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (!kdl_sparse_supports(a->mode, d->divergence))
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED,
                        "divergence %s is not defined in sparse mode %s (KL(q||p) is +inf when the "
                        "student has mass outside the support; use mode tail)",
                        kdl_divergence_name(d->divergence), kdl_sparse_mode_name(a->mode));
    if (a->rows < 0) return kdl_fail(KDL_STATUS_BAD_SIZE, "rows = %lld < 0", (long long)a->rows);
    if (a->k < 1 || a->k > KDL_SPARSE_MAX_K || a->k > a->vocab)
        return kdl_fail(KDL_STATUS_BAD_TOP_K, "k = %lld not in [1, min(vocab = %lld, %d)]", (long long)a->k,
                        (long long)a->vocab, KDL_SPARSE_MAX_K);
    if (d->divergence == KDL_DIV_AKL && d->head_rule == KDL_HEAD_TOPK && d->top_k > a->k)
        return kdl_fail(KDL_STATUS_BAD_TOP_K, "AKL head top_k = %lld > support size k = %lld",
                        (long long)d->top_k, (long long)a->k);
    if (a->ld_student < a->vocab)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_student = %lld < vocab = %lld", (long long)a->ld_student,
                        (long long)a->vocab);
    if (a->ld_indices < a->k)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_indices = %lld < k = %lld", (long long)a->ld_indices,
                        (long long)a->k);
    if (a->ld_logprobs < a->k)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_logprobs = %lld < k = %lld", (long long)a->ld_logprobs,
                        (long long)a->k);
    if (a->grad && a->ld_grad < a->vocab)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_grad = %lld < vocab = %lld", (long long)a->ld_grad,
                        (long long)a->vocab);
    if (a->rows > 0 && !a->student) return kdl_fail(KDL_STATUS_NULL_POINTER, "student is NULL");
    if (a->rows > 0 && !a->teacher_indices) return kdl_fail(KDL_STATUS_NULL_POINTER, "teacher_indices is NULL");
    if (a->rows > 0 && !a->teacher_logprobs)
        return kdl_fail(KDL_STATUS_NULL_POINTER, "teacher_logprobs is NULL");
    if (!a->loss && !(d->reduction == KDL_REDUCTION_NONE && a->rows == 0))
        return kdl_fail(KDL_STATUS_NULL_POINTER, "loss is NULL");
    const kdl_array_ref_t arrays[] = {{a->student, kdl_dtype_size(a->student_dtype), "student"},
                                      {a->teacher_indices, 8, "teacher_indices"},
                                      {a->teacher_logprobs, kdl_dtype_size(a->teacher_dtype), "teacher_logprobs"},
                                      {a->labels, 8, "labels"},
                                      {a->grad, kdl_dtype_size(a->grad_dtype), "grad"},
                                      {a->loss, kdl_dtype_size(a->out_dtype), "loss"},
                                      {a->info, 8, "info"},
                                      {a->valid_rows, 8, "valid_rows"},
                                      {a->bad_index_rows, 8, "bad_index_rows"}};
    st = kdl_check_alignment(arrays, sizeof arrays / sizeof arrays[0]);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (!kdl_ext_span_ok(a->rows, a->vocab, a->ld_student, kdl_dtype_size(a->student_dtype)) ||
        !kdl_ext_span_ok(a->rows, a->k, a->ld_indices, sizeof(int64_t)) ||
        !kdl_ext_span_ok(a->rows, a->k, a->ld_logprobs, kdl_dtype_size(a->teacher_dtype)) ||
        (a->grad && !kdl_ext_span_ok(a->rows, a->vocab, a->ld_grad, kdl_dtype_size(a->grad_dtype))) ||
        (uint64_t)a->rows > (uint64_t)SIZE_MAX / 8)
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "rows x stride overflows");
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_sparse_check_indices(int64_t rows, int64_t vocab, int64_t k, const int64_t *idx,
                                      int64_t ld)
{
    kdl_clear_error();
    if (rows < 0 || vocab < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "rows %lld, vocab %lld", (long long)rows, (long long)vocab);
    if (k < 1 || k > KDL_SPARSE_MAX_K || k > vocab)
        return kdl_fail(KDL_STATUS_BAD_TOP_K, "k = %lld not in [1, min(vocab, %d)]", (long long)k, KDL_SPARSE_MAX_K);
    if (ld < k) return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_indices = %lld < k = %lld", (long long)ld, (long long)k);
    if (rows > 0 && !idx) return kdl_fail(KDL_STATUS_NULL_POINTER, "indices is NULL");
    const kdl_array_ref_t arrays[] = {{idx, sizeof(int64_t), "indices"}};
    kdl_status_t st = kdl_check_alignment(arrays, 1);
    if (st != KDL_STATUS_SUCCESS) return st;
    if ((uint64_t)vocab > SIZE_MAX / sizeof(int64_t))
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "vocab %lld", (long long)vocab);
    int64_t *seen = (int64_t *)malloc((size_t)vocab * sizeof(int64_t));
    if (!seen) return kdl_fail(KDL_STATUS_ALLOC_FAILED, "index check scratch");
    for (int64_t v = 0; v < vocab; v++) seen[v] = -1;
    st = KDL_STATUS_SUCCESS;
    for (int64_t i = 0; i < rows && st == KDL_STATUS_SUCCESS; i++)
        for (int64_t j = 0; j < k; j++) {
            int64_t v = idx[i * ld + j];
            if (v < 0 || v >= vocab) {
                st = kdl_fail(KDL_STATUS_BAD_PARAM, "teacher index %lld at row %lld, position %lld is not in [0, %lld)",
                              (long long)v, (long long)i, (long long)j, (long long)vocab);
                break;
            }
            if (seen[v] == i) {
                st = kdl_fail(KDL_STATUS_BAD_PARAM, "teacher index %lld repeated in row %lld (position %lld)",
                              (long long)v, (long long)i, (long long)j);
                break;
            }
            seen[v] = i;
        }
    free(seen);
    return st;
}

/* ------------------------------------------------------------ reference */
typedef struct sparse_scratch {
    double *lq;       /* [V] student log-softmax                      */
    double *qg;       /* [V] RENORMALISED: per-token qg               */
    int64_t *pos;     /* [V] position in the support, or -1           */
    int64_t *stamp;   /* [V] row that last marked the token (dup check) */
    double *lt;       /* [k] given teacher log-probs                  */
    double *cqg;      /* [k+1] TAIL: per-cell qg                      */
} sparse_scratch_t;

typedef struct row_cls {
    unsigned char state;
    unsigned char bad_index;
} row_cls_t;

static double lse_of(const double *x, int64_t n)
{
    double mx = -INFINITY;
    for (int64_t j = 0; j < n; j++)
        if (x[j] > mx) mx = x[j];
    if (mx == -INFINITY) return -INFINITY;
    double s = 0;
    for (int64_t j = 0; j < n; j++) s += exp(x[j] - mx);
    return mx + log(s);
}

static row_cls_t classify(const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, sparse_scratch_t *sc,
                          int64_t i)
{
    row_cls_t c = {KDL_EXT_ROW_VALID, 0};
    if (a->labels && a->labels[i] == d->ignore_index) {
        c.state = KDL_EXT_ROW_IGNORED;
        return c;
    }
    const int64_t V = a->vocab, k = a->k;
    int finite = 0;
    for (int64_t v = 0; v < V; v++) {
        double s = kdl_load_as_double(a->student, a->student_dtype, i * a->ld_student + v);
        if (isnan(s) || s == INFINITY) {
            c.state = KDL_EXT_ROW_INVALID;
            break;
        }
        finite |= s != -INFINITY;
    }
    if (!finite) c.state = KDL_EXT_ROW_INVALID;
    for (int64_t j = 0; j < k; j++) {
        int64_t v = a->teacher_indices[i * a->ld_indices + j];
        if (v < 0 || v >= V || sc->stamp[v] == i) {
            c.state = KDL_EXT_ROW_INVALID;
            c.bad_index = 1;
            break;
        }
        sc->stamp[v] = i;
    }
    for (int64_t j = 0; j < k; j++) {
        sc->lt[j] = kdl_load_as_double(a->teacher_logprobs, a->teacher_dtype, i * a->ld_logprobs + j);
        if (isnan(sc->lt[j]) || sc->lt[j] > 0) c.state = KDL_EXT_ROW_INVALID;
    }
    if (c.state != KDL_EXT_ROW_VALID) return c;
    double lse_t = lse_of(sc->lt, k);
    if (a->mode == KDL_SPARSE_RENORMALISED && lse_t == -INFINITY) c.state = KDL_EXT_ROW_INVALID;
    if (a->mode == KDL_SPARSE_TAIL_BUCKET && lse_t > log1p(KDL_SPARSE_MASS_TOL)) c.state = KDL_EXT_ROW_INVALID;
    /* k = V: no token is off the support, so the bucket has nothing to hold
     * a residual mass 1 - sum p; beyond the same tolerance the row is not a
     * distribution (mirror of the rule above); within it the bucket is 0 */
    if (a->mode == KDL_SPARSE_TAIL_BUCKET && k == V && lse_t < log1p(-KDL_SPARSE_MASS_TOL))
        c.state = KDL_EXT_ROW_INVALID;
    return c;
}

/* Teacher order of the support cells: given p descending, ties by lower
 * vocabulary index.  qsort context through a file-scope pointer is not
 * thread-safe, so sort (key, vocab index, position) triples instead. */
struct cell_rank {
    double lt;
    int64_t v, pos;
};
static int cmp_cell(const void *x, const void *y)
{
    const struct cell_rank *a = (const struct cell_rank *)x, *b = (const struct cell_rank *)y;
    if (a->lt != b->lt) return a->lt > b->lt ? -1 : 1;
    return (a->v > b->v) - (a->v < b->v);
}

/* Head (marked in in_head[pos]) of the support cells by the descriptor's
 * rule, over the given teacher probabilities in teacher order. */
static int64_t tail_head(const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, int64_t i, const double *lt,
                         struct cell_rank *rk, unsigned char *in_head)
{
    const int64_t k = a->k;
    for (int64_t j = 0; j < k; j++) {
        rk[j].lt = lt[j];
        rk[j].v = a->teacher_indices[i * a->ld_indices + j];
        rk[j].pos = j;
        in_head[j] = 0;
    }
    qsort(rk, (size_t)k, sizeof *rk, cmp_cell);
    int64_t h = 0;
    if (d->head_rule == KDL_HEAD_TOPK) {
        h = d->top_k;
    } else {
        double c = 0;
        for (int64_t r = 0; r < k; r++) {
            double prev = c;
            c += exp(rk[r].lt);
            if (d->head_rule == KDL_HEAD_REFERENCE ? c <= d->mu : prev < d->mu)
                h = r + 1;
            else
                break;
        }
        if (h < 1) h = 1;
    }
    for (int64_t r = 0; r < h; r++) in_head[rk[r].pos] = 1;
    return h;
}

static void store_grad(const kdl_sparse_args_t *a, int64_t i, int64_t v, double g)
{
    kdl_store_from_double(a->grad, a->grad_dtype, i * a->ld_grad + v, g);
}

/* Loss of valid row i; writes its gradient row ((gscale dz)/tau) if asked. */
static double valid_row(const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, sparse_scratch_t *sc,
                        struct cell_rank *rk, unsigned char *in_head, int64_t i, double gscale)
{
    const int64_t V = a->vocab, k = a->k;
    const double tau = d->temperature;
    /* (s - max s)/tau: s/tau alone overflows for a tiny tau */
    double smax = -INFINITY;
    for (int64_t v = 0; v < V; v++) {
        sc->lq[v] = kdl_load_as_double(a->student, a->student_dtype, i * a->ld_student + v);
        if (sc->lq[v] > smax) smax = sc->lq[v];
    }
    for (int64_t v = 0; v < V; v++) sc->lq[v] = (sc->lq[v] - smax) / tau;
    double lse_s = lse_of(sc->lq, V);
    for (int64_t v = 0; v < V; v++) sc->lq[v] -= lse_s;
    for (int64_t j = 0; j < k; j++)
        sc->lt[j] = kdl_load_as_double(a->teacher_logprobs, a->teacher_dtype, i * a->ld_logprobs + j);
    for (int64_t v = 0; v < V; v++) sc->pos[v] = -1;
    for (int64_t j = 0; j < k; j++) sc->pos[a->teacher_indices[i * a->ld_indices + j]] = j;
    double coef = d->divergence == KDL_DIV_JSD ? d->beta : d->alpha;
    double loss = 0, G = 0;

    if (a->mode == KDL_SPARSE_RENORMALISED) {
        double lse_t = lse_of(sc->lt, k);
        kdl_elem_params_d pr = kdl_elem_params_make_d((int)d->divergence, coef, 0.5, 0.5);
        for (int64_t v = 0; v < V; v++) {
            double lp = sc->pos[v] >= 0 ? sc->lt[sc->pos[v]] - lse_t : -INFINITY;
            kdl_elem_d e = kdl_elem_eval_d(&pr, lp, sc->lq[v]);
            loss += e.loss;
            G += e.qg;
            sc->qg[v] = e.qg;
        }
        if (a->grad)
            for (int64_t v = 0; v < V; v++)
                store_grad(a, i, v, kdl_scaled_grad(gscale, kdl_elem_dz_d(sc->qg[v], exp(sc->lq[v]), G), tau));
        return loss;
    }

    /* TAIL_BUCKET: k support cells + the bucket (index k). */
    double lse_t = lse_of(sc->lt, k);
    double lp_b = (k == V || lse_t >= 0) ? -INFINITY : log(-expm1(lse_t));
    double mx = -INFINITY, sum = 0;
    for (int64_t v = 0; v < V; v++)
        if (sc->pos[v] < 0 && sc->lq[v] > mx) mx = sc->lq[v];
    if (mx > -INFINITY)
        for (int64_t v = 0; v < V; v++)
            if (sc->pos[v] < 0) sum += exp(sc->lq[v] - mx);
    double lq_b = mx > -INFINITY ? mx + log(sum) : -INFINITY;

    double w_head = 0.5, w_tail = 0.5;
    if (d->divergence == KDL_DIV_AKL) {
        tail_head(d, a, i, sc->lt, rk, in_head);
        double g_head = 0, g_tail = fabs(exp(lp_b) - exp(lq_b));
        for (int64_t j = 0; j < k; j++) {
            int64_t v = a->teacher_indices[i * a->ld_indices + j];
            double gap = fabs(exp(sc->lt[j]) - exp(sc->lq[v]));
            if (in_head[j])
                g_head += gap;
            else
                g_tail += gap;
        }
        kdl_akl_weights_d(g_head, g_tail, &w_head, &w_tail);
    }
    kdl_elem_params_d pr = kdl_elem_params_make_d((int)d->divergence, coef, w_head, w_tail);
    for (int64_t j = 0; j < k; j++) {
        int64_t v = a->teacher_indices[i * a->ld_indices + j];
        kdl_elem_d e = kdl_elem_eval_d(&pr, sc->lt[j], sc->lq[v]);
        loss += e.loss;
        G += e.qg;
        sc->cqg[j] = e.qg;
    }
    kdl_elem_d eb = kdl_elem_eval_d(&pr, lp_b, lq_b);
    loss += eb.loss;
    G += eb.qg;
    if (a->grad) {
        for (int64_t v = 0; v < V; v++) {
            double q = exp(sc->lq[v]), dz;
            if (sc->pos[v] >= 0) {
                dz = kdl_elem_dz_d(sc->cqg[sc->pos[v]], q, G);
            } else {
                double share = q > 0 ? exp(sc->lq[v] - lq_b) : 0.0; /* q_v / q_b */
                dz = kdl_elem_dz_d(share > 0 ? share * eb.qg : 0.0, q, G);
            }
            store_grad(a, i, v, kdl_scaled_grad(gscale, dz, tau));
        }
    }
    return loss;
}

static void free_scratch(sparse_scratch_t *sc)
{
    free(sc->lq);
    free(sc->qg);
    free(sc->pos);
    free(sc->stamp);
    free(sc->lt);
    free(sc->cqg);
}

kdl_status_t kdl_ref_sparse_loss(const kdl_loss_desc_t *d, const kdl_sparse_args_t *a)
{
    kdl_status_t st = kdl_sparse_validate(d, a, 1);
    if (st != KDL_STATUS_SUCCESS) return st;
    const int64_t N = a->rows, V = a->vocab, k = a->k;
    if ((uint64_t)V > SIZE_MAX / sizeof(double))
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "vocab %lld too large for the reference", (long long)V);

    sparse_scratch_t sc = {0};
    row_cls_t *cls = (row_cls_t *)malloc((N > 0 ? (size_t)N : 1) * sizeof *cls);
    struct cell_rank *rk = (struct cell_rank *)malloc((size_t)k * sizeof *rk);
    unsigned char *in_head = (unsigned char *)malloc((size_t)k);
    sc.lq = (double *)malloc((size_t)V * sizeof(double));
    sc.qg = (double *)malloc((size_t)V * sizeof(double));
    sc.pos = (int64_t *)malloc((size_t)V * sizeof(int64_t));
    sc.stamp = (int64_t *)malloc((size_t)V * sizeof(int64_t));
    sc.lt = (double *)malloc((size_t)k * sizeof(double));
    sc.cqg = (double *)malloc((size_t)(k + 1) * sizeof(double));
    if (!cls || !rk || !in_head || !sc.lq || !sc.qg || !sc.pos || !sc.stamp || !sc.lt || !sc.cqg) {
        free(cls);
        free(rk);
        free(in_head);
        free_scratch(&sc);
        return kdl_fail(KDL_STATUS_ALLOC_FAILED, "reference scratch for vocab %lld", (long long)V);
    }
    for (int64_t v = 0; v < V; v++) sc.stamp[v] = -1;

    int64_t n_valid = 0, n_invalid = 0, n_bad_index = 0;
    for (int64_t i = 0; i < N; i++) {
        cls[i] = classify(d, a, &sc, i);
        n_valid += cls[i].state == KDL_EXT_ROW_VALID;
        n_invalid += cls[i].state == KDL_EXT_ROW_INVALID;
        n_bad_index += cls[i].bad_index;
    }
    double gscale = d->scale;
    if (d->reduction == KDL_REDUCTION_MEAN) gscale = n_valid ? gscale / (double)n_valid : 0.0;

    double total = 0;
    for (int64_t i = 0; i < N; i++) {
        double l = 0;
        if (cls[i].state == KDL_EXT_ROW_VALID) {
            l = valid_row(d, a, &sc, rk, in_head, i, gscale);
            total += l;
        } else {
            if (a->grad)
                for (int64_t v = 0; v < V; v++) store_grad(a, i, v, 0.0);
            if (cls[i].state == KDL_EXT_ROW_INVALID) l = NAN;
        }
        if (d->reduction == KDL_REDUCTION_NONE) kdl_store_from_double(a->loss, a->out_dtype, i, kdl_scaled_loss(d->scale, l));
    }
    if (d->reduction == KDL_REDUCTION_SUM)
        kdl_store_from_double(a->loss, a->out_dtype, 0, kdl_scaled_loss(d->scale, total));
    else if (d->reduction == KDL_REDUCTION_MEAN)
        kdl_store_from_double(a->loss, a->out_dtype, 0, n_valid ? kdl_scaled_loss(d->scale, total) / (double)n_valid : 0.0);
    if (a->info) *a->info = n_invalid;
    if (a->valid_rows) *a->valid_rows = n_valid;
    if (a->bad_index_rows) *a->bad_index_rows = n_bad_index;

    free(cls);
    free(rk);
    free(in_head);
    free_scratch(&sc);
    return KDL_STATUS_SUCCESS;
}
