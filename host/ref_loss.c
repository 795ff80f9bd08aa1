/*
 * host/ref_loss.c - float64 CPU reference of the fused distillation loss.
 *
 * The oracle for the GPU path: every input converted exactly to double,
 * every sum in double, the AKL head found by a full sort (the GPU uses a
 * radix select), the per-element maths from kdloss/detail/elem.h.
 *
 * Per row i (DESIGN section 1):
 *   1. ignored (labels[i] == ignore_index) -> loss 0, zero gradient, uncounted;
 *      invalid (NaN or +inf logit, or every logit -inf, in student or teacher)
 *      -> loss NaN, zero gradient, counted in *info, out of the reduction;
 *   2. lq = s/tau - LSE(s/tau), lp = t/tau - LSE(t/tau);
 *   3. AKL head and gaps (teacher order: p descending, ties by lower index);
 *   4. loss = sum of element terms, G = sum of qg, dz = qg - q G, ds = dz/tau.
 * The gradient is d(reduced, scaled loss)/ds: (scale dz)/tau per row for NONE
 * and SUM, (scale/valid_rows dz)/tau for MEAN (multiplied before dividing, so
 * an exact zero stays zero for any tau).  scale = 0 gives loss 0 and a zero
 * gradient, even where the unscaled loss is +inf; invalid rows stay NaN.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kdloss/detail/elem.h"
#include "kdloss/kdloss_ref.h"

enum { ROW_VALID = 0, ROW_IGNORED = 1, ROW_INVALID = 2 };

struct ranked {
    double p;
    int64_t v;
};

typedef struct ref_scratch {
    double *lp, *lq, *qg;
    struct ranked *order; /* teacher order, for the AKL head */
} ref_scratch_t;

typedef struct row_stats {
    double loss, fkl, rkl, g_head, g_tail, w_head, w_tail;
    int64_t head_size;
} row_stats_t;

static int row_state(const kdl_loss_desc_t *d, const kdl_loss_args_t *a, int64_t i)
{
    if (a->labels && a->labels[i] == d->ignore_index) return ROW_IGNORED;
    const int64_t V = a->vocab;
    int s_finite = 0, t_finite = 0;
    for (int64_t v = 0; v < V; v++) {
        double s = kdl_load_as_double(a->student, a->student_dtype, i * a->ld_student + v);
        double t = kdl_load_as_double(a->teacher, a->teacher_dtype, i * a->ld_teacher + v);
        if (isnan(s) || isnan(t) || s == INFINITY || t == INFINITY) return ROW_INVALID;
        s_finite |= s != -INFINITY;
        t_finite |= t != -INFINITY;
    }
    return (s_finite && t_finite) ? ROW_VALID : ROW_INVALID;
}

/* out[v] = x[v]/tau - LSE(x/tau) for row i of a typed matrix, computed as
 * (x[v] - max)/tau - log sum exp((x - max)/tau): x/tau alone overflows for a
 * tiny tau, (x - max)/tau only goes to -inf (probability 0), the limit. */
static void log_softmax_row(const void *base, kdl_dtype_t t, int64_t ld, int64_t i, int64_t V,
                            double tau, double *out)
{
    double mx = -INFINITY;
    for (int64_t v = 0; v < V; v++) {
        out[v] = kdl_load_as_double(base, t, i * ld + v);
        if (out[v] > mx) mx = out[v];
    }
    double sum = 0;
    for (int64_t v = 0; v < V; v++) {
        out[v] = (out[v] - mx) / tau;
        sum += exp(out[v]);
    }
    double lse = log(sum);
    for (int64_t v = 0; v < V; v++) out[v] -= lse;
}

/* Teacher order: probability descending, ties by lower index. */
static int cmp_teacher_order(const void *x, const void *y)
{
    const struct ranked *a = (const struct ranked *)x, *b = (const struct ranked *)y;
    if (a->p != b->p) return a->p > b->p ? -1 : 1;
    return (a->v > b->v) - (a->v < b->v);
}

/* Head size by the descriptor's rule, from the sorted teacher order. */
static int64_t head_size(const kdl_loss_desc_t *d, const struct ranked *order, int64_t V)
{
    if (d->head_rule == KDL_HEAD_TOPK) return d->top_k;
    double c = 0; /* c_k, inclusive cumulative mass */
    int64_t h = 0;
    for (int64_t k = 0; k < V; k++) {
        double prev = c;
        c += order[k].p;
        if (d->head_rule == KDL_HEAD_REFERENCE ? c <= d->mu : prev < d->mu)
            h = k + 1;
        else
            break;
    }
    return h < 1 ? 1 : h; /* REFERENCE keeps the top-1 token always */
}

/* Head/tail gaps and AKL weights of one row. */
static void akl_stats(const kdl_loss_desc_t *d, const ref_scratch_t *sc, int64_t V, row_stats_t *rs)
{
    for (int64_t v = 0; v < V; v++) {
        sc->order[v].p = exp(sc->lp[v]);
        sc->order[v].v = v;
    }
    qsort(sc->order, (size_t)V, sizeof *sc->order, cmp_teacher_order);
    rs->head_size = head_size(d, sc->order, V);
    rs->g_head = rs->g_tail = 0;
    for (int64_t k = 0; k < V; k++) {
        double gap = fabs(sc->order[k].p - exp(sc->lq[sc->order[k].v]));
        if (k < rs->head_size)
            rs->g_head += gap;
        else
            rs->g_tail += gap;
    }
    kdl_akl_weights_d(rs->g_head, rs->g_tail, &rs->w_head, &rs->w_tail);
}

static int wants_head_stats(const kdl_loss_desc_t *d, const kdl_loss_args_t *a)
{
    return d->divergence == KDL_DIV_AKL || a->stat_g_head || a->stat_g_tail || a->stat_w_head ||
           a->stat_w_tail || a->stat_head_size;
}

/* Loss, statistics and (if grad given) the gradient row of a valid row i:
 * grad = (gscale dz) / tau. */
static void valid_row(const kdl_loss_desc_t *d, const kdl_loss_args_t *a, const ref_scratch_t *sc,
                      int64_t i, double gscale, row_stats_t *rs)
{
    const int64_t V = a->vocab;
    log_softmax_row(a->student, a->student_dtype, a->ld_student, i, V, d->temperature, sc->lq);
    log_softmax_row(a->teacher, a->teacher_dtype, a->ld_teacher, i, V, d->temperature, sc->lp);

    rs->fkl = rs->rkl = 0;
    for (int64_t v = 0; v < V; v++) {
        rs->fkl += kdl_kl_term_d(exp(sc->lp[v]), sc->lp[v], sc->lq[v]);
        rs->rkl += kdl_kl_term_d(exp(sc->lq[v]), sc->lq[v], sc->lp[v]);
    }
    rs->g_head = rs->g_tail = 0;
    rs->w_head = rs->w_tail = 0.5;
    rs->head_size = 0;
    if (wants_head_stats(d, a)) akl_stats(d, sc, V, rs);

    double coef = d->divergence == KDL_DIV_JSD ? d->beta : d->alpha;
    kdl_elem_params_d pr = kdl_elem_params_make_d((int)d->divergence, coef, rs->w_head, rs->w_tail);
    double loss = 0, G = 0;
    for (int64_t v = 0; v < V; v++) {
        kdl_elem_d e = kdl_elem_eval_d(&pr, sc->lp[v], sc->lq[v]);
        loss += e.loss;
        G += e.qg;
        sc->qg[v] = e.qg;
    }
    rs->loss = loss;
    if (!a->grad) return;
    for (int64_t v = 0; v < V; v++) {
        double dz = kdl_elem_dz_d(sc->qg[v], exp(sc->lq[v]), G);
        kdl_store_from_double(a->grad, a->grad_dtype, i * a->ld_grad + v,
                              kdl_scaled_grad(gscale, dz, d->temperature));
    }
}

static void zero_grad_row(const kdl_loss_args_t *a, int64_t i)
{
    if (!a->grad) return;
    for (int64_t v = 0; v < a->vocab; v++) kdl_store_from_double(a->grad, a->grad_dtype, i * a->ld_grad + v, 0.0);
}

static void store_stats(const kdl_loss_args_t *a, int64_t i, const row_stats_t *rs)
{
    kdl_dtype_t t = a->out_dtype;
    if (a->stat_fkl) kdl_store_from_double(a->stat_fkl, t, i, rs->fkl);
    if (a->stat_rkl) kdl_store_from_double(a->stat_rkl, t, i, rs->rkl);
    if (a->stat_g_head) kdl_store_from_double(a->stat_g_head, t, i, rs->g_head);
    if (a->stat_g_tail) kdl_store_from_double(a->stat_g_tail, t, i, rs->g_tail);
    if (a->stat_w_head) kdl_store_from_double(a->stat_w_head, t, i, rs->w_head);
    if (a->stat_w_tail) kdl_store_from_double(a->stat_w_tail, t, i, rs->w_tail);
    if (a->stat_head_size) a->stat_head_size[i] = rs->head_size;
}

static void free_scratch(ref_scratch_t *sc)
{
    free(sc->lp);
    free(sc->lq);
    free(sc->qg);
    free(sc->order);
}

kdl_status_t kdl_ref_loss_forward_backward(const kdl_loss_desc_t *d, const kdl_loss_args_t *a)
{
    kdl_status_t st = kdl_loss_validate(d, a, 1);
    if (st != KDL_STATUS_SUCCESS) return st;
    const int64_t N = a->rows, V = a->vocab;

    if ((uint64_t)V > SIZE_MAX / sizeof(struct ranked))
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "vocab %lld too large for the reference", (long long)V);
    ref_scratch_t sc = {0};
    unsigned char *state = (unsigned char *)malloc(N > 0 ? (size_t)N : 1);
    sc.lp = (double *)malloc((size_t)V * sizeof(double));
    sc.lq = (double *)malloc((size_t)V * sizeof(double));
    sc.qg = (double *)malloc((size_t)V * sizeof(double));
    sc.order = (struct ranked *)malloc((size_t)V * sizeof(struct ranked));
    if (!state || !sc.lp || !sc.lq || !sc.qg || !sc.order) {
        free(state);
        free_scratch(&sc);
        return kdl_fail(KDL_STATUS_ALLOC_FAILED, "reference scratch for vocab %lld", (long long)V);
    }

    /* Classify rows first: MEAN's gradient needs the number of valid rows. */
    int64_t n_valid = 0, n_invalid = 0;
    for (int64_t i = 0; i < N; i++) {
        state[i] = (unsigned char)row_state(d, a, i);
        n_valid += state[i] == ROW_VALID;
        n_invalid += state[i] == ROW_INVALID;
    }
    double gscale = d->scale;
    if (d->reduction == KDL_REDUCTION_MEAN) gscale = n_valid ? gscale / (double)n_valid : 0.0;

    double total = 0;
    for (int64_t i = 0; i < N; i++) {
        row_stats_t rs;
        memset(&rs, 0, sizeof rs);
        if (state[i] == ROW_VALID) {
            valid_row(d, a, &sc, i, gscale, &rs);
            total += rs.loss;
        } else {
            zero_grad_row(a, i);
            if (state[i] == ROW_INVALID)
                rs.loss = rs.fkl = rs.rkl = rs.g_head = rs.g_tail = rs.w_head = rs.w_tail = NAN;
        }
        store_stats(a, i, &rs);
        if (d->reduction == KDL_REDUCTION_NONE) kdl_store_from_double(a->loss, a->out_dtype, i, kdl_scaled_loss(d->scale, rs.loss));
    }
    if (d->reduction == KDL_REDUCTION_SUM)
        kdl_store_from_double(a->loss, a->out_dtype, 0, kdl_scaled_loss(d->scale, total));
    else if (d->reduction == KDL_REDUCTION_MEAN)
        kdl_store_from_double(a->loss, a->out_dtype, 0, n_valid ? kdl_scaled_loss(d->scale, total) / (double)n_valid : 0.0);
    if (a->info) *a->info = n_invalid;
    if (a->valid_rows) *a->valid_rows = n_valid;

    free(state);
    free_scratch(&sc);
    return KDL_STATUS_SUCCESS;
}
