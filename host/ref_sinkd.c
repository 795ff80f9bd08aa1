/*
 * host/ref_sinkd.c - float64 CPU reference of the SinKD loss (kdl_ref_sinkd).
 *
 * Per group g of n rows (DESIGN section 2, "SinKD loss"):
 *   1. the group is invalid when one of its rows has a NaN or +inf logit, or
 *      all logits -inf, in student or teacher: group_loss NaN, zero gradient
 *      rows, counted in *info, left out of the mean;
 *   2. p_s,i = softmax(s_i / tau), p_t,j = softmax(t_j / tau), from
 *      max-shifted log-sum-exp in double (-inf logits: probability 0);
 *   3. C_ij = sum_v |p_s,iv - p_t,jv|  (L1)  or  sum_v (p_s,iv - p_t,jv)^2;
 *   4. kdl_ref_ot_solve with uniform marginals 1/n, no eps-scaling:
 *      group loss <P, C>;
 *   5. loss = scale * mean over valid groups.
 * Gradient, the plan P held fixed, c = scale / G_valid:
 *   h_iv = c * sum_j P_ij dC(p_s,iv, p_t,jv)   (sign(.) or 2(.), sign(0) = 0)
 *   ds_iv = q_iv (h_iv - sum_u q_iu h_iu) / tau,   q = p_s.
 * Every allocation is made before any output is written.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kdloss/kdloss_ref.h"
#include "ot_internal.h"

/* 1 when row i of a typed matrix has no NaN / +inf and a finite logit. */
static int row_ok(const void *x, kdl_dtype_t t, int64_t ld, int64_t i, int64_t V)
{
    int any = 0;
    for (int64_t v = 0; v < V; v++) {
        double z = kdl_load_as_double(x, t, i * ld + v);
        if (isnan(z) || z == INFINITY) return 0;
        any |= z > -INFINITY;
    }
    return any;
}

/* p[v] = softmax(x_i / tau)[v] in double, as (x - max x)/tau: x/tau alone
 * overflows to inf for a tiny tau (a finite logit of a valid row, tau =
 * 1e-300), and inf - inf made the whole row NaN with SUCCESS (docs/hardening.md
 * F8); shifted first, the differences only go to -inf (probability 0, the
 * arg-max indicator in the limit), as in the dense reference. */
static void softmax_row(const void *x, kdl_dtype_t t, int64_t ld, int64_t i, int64_t V, double tau,
                        double *p)
{
    double mx = -INFINITY;
    for (int64_t v = 0; v < V; v++) {
        p[v] = kdl_load_as_double(x, t, i * ld + v);
        if (p[v] > mx) mx = p[v];
    }
    double s = 0;
    for (int64_t v = 0; v < V; v++) {
        p[v] = (p[v] - mx) / tau;
        s += exp(p[v]);
    }
    double ls = log(s);
    for (int64_t v = 0; v < V; v++) p[v] = exp(p[v] - ls);
}

static double dist(kdl_ot_metric_t metric, const double *u, const double *w, int64_t V)
{
    double c = 0;
    for (int64_t v = 0; v < V; v++) {
        double t = u[v] - w[v];
        c += metric == KDL_OT_METRIC_L1 ? fabs(t) : t * t;
    }
    return c;
}

static double dcost(kdl_ot_metric_t metric, double t)
{
    if (metric == KDL_OT_METRIC_L1) return (t > 0) - (t < 0);
    return 2.0 * t;
}

kdl_status_t kdl_ref_sinkd(const kdl_sinkd_desc_t *d, const kdl_sinkd_args_t *a)
{
    kdl_status_t st = kdl_sinkd_validate(d, a, 1);
    if (st != KDL_STATUS_SUCCESS) return st;
    const int64_t N = a->rows, V = a->vocab;
    const kdl_dtype_t od = a->out_dtype;
    if (N == 0) {
        kdl_store_from_double(a->loss, od, 0, 0.0);
        if (a->info) *a->info = 0;
        return KDL_STATUS_SUCCESS;
    }
    const int64_t n = kdl_sinkd_group(d, a);
    const int64_t G = N / n;
    const double tau = d->temperature;

    double *ps = (double *)malloc((size_t)(n * V) * sizeof(double));
    double *pt = (double *)malloc((size_t)(n * V) * sizeof(double));
    double *C = (double *)malloc((size_t)(n * n) * sizeof(double));
    double *plans = (double *)malloc((size_t)(G * n * n) * sizeof(double));
    double *f = (double *)malloc((size_t)n * sizeof(double));
    double *g = (double *)malloc((size_t)n * sizeof(double));
    double *gl = (double *)malloc((size_t)G * sizeof(double));
    double *ge = (double *)malloc((size_t)G * sizeof(double));
    int64_t *gi = (int64_t *)malloc((size_t)G * sizeof(int64_t));
    char *valid = (char *)malloc((size_t)G);
    double *h = (double *)malloc((size_t)V * sizeof(double));
    if (!ps || !pt || !C || !plans || !f || !g || !gl || !ge || !gi || !valid || !h) {
        free(ps), free(pt), free(C), free(plans), free(f), free(g), free(gl), free(ge), free(gi);
        free(valid), free(h);
        return kdl_fail(KDL_STATUS_ALLOC_FAILED, "reference SinKD scratch");
    }

    kdl_ref_ot_solver_t sol = {.eps = d->epsilon,
                               .tol = d->tol,
                               .factor = 0.5,
                               .max_iter = d->max_iter,
                               .check_every = d->check_every,
                               .stage_iter = 1,
                               .eps_scaling = 0,
                               .value = KDL_OT_VALUE_TRANSPORT};
    int64_t n_valid = 0;
    double sum = 0;
    for (int64_t gr = 0; gr < G; gr++) {
        int ok = 1;
        for (int64_t i = 0; i < n && ok; i++) {
            int64_t r = gr * n + i;
            ok = row_ok(a->student, a->student_dtype, a->ld_student, r, V) &&
                 row_ok(a->teacher, a->teacher_dtype, a->ld_teacher, r, V);
        }
        valid[gr] = (char)ok;
        double *P = plans + gr * n * n;
        if (!ok) {
            gl[gr] = NAN;
            ge[gr] = NAN;
            gi[gr] = 0;
            for (int64_t k = 0; k < n * n; k++) P[k] = NAN;
            continue;
        }
        for (int64_t i = 0; i < n; i++) {
            softmax_row(a->student, a->student_dtype, a->ld_student, gr * n + i, V, tau, ps + i * V);
            softmax_row(a->teacher, a->teacher_dtype, a->ld_teacher, gr * n + i, V, tau, pt + i * V);
        }
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < n; j++) C[i * n + j] = dist(d->metric, ps + i * V, pt + j * V, V);
        kdl_ref_ot_problem_t pr = {.n = n, .m = n, .C = C};
        kdl_ref_ot_solve(&sol, &pr, f, g, &gi[gr], &ge[gr], &gl[gr]);
        kdl_ref_ot_plan(&pr, d->epsilon, f, g, P);
        gl[gr] *= d->scale;
        sum += gl[gr];
        n_valid++;
    }

    /* ---- store (nothing can fail from here on) */
    kdl_store_from_double(a->loss, od, 0, n_valid ? sum / (double)n_valid : 0.0);
    for (int64_t gr = 0; gr < G; gr++) {
        if (a->group_loss) kdl_store_from_double(a->group_loss, od, gr, gl[gr]);
        if (a->iterations) a->iterations[gr] = gi[gr];
        if (a->marginal_error) kdl_store_from_double(a->marginal_error, od, gr, ge[gr]);
    }
    if (a->plan)
        for (int64_t k = 0; k < G * n * n; k++) kdl_store_from_double(a->plan, od, k, plans[k]);
    if (a->info) *a->info = G - n_valid;

    if (a->grad) {
        const double c = n_valid ? d->scale / (double)n_valid : 0.0;
        for (int64_t gr = 0; gr < G; gr++) {
            const double *P = plans + gr * n * n;
            if (valid[gr])
                for (int64_t i = 0; i < n; i++) {
                    softmax_row(a->student, a->student_dtype, a->ld_student, gr * n + i, V, tau,
                                ps + i * V);
                    softmax_row(a->teacher, a->teacher_dtype, a->ld_teacher, gr * n + i, V, tau,
                                pt + i * V);
                }
            for (int64_t i = 0; i < n; i++) {
                const int64_t r = gr * n + i;
                if (!valid[gr]) {
                    for (int64_t v = 0; v < V; v++)
                        kdl_store_from_double(a->grad, a->grad_dtype, r * a->ld_grad + v, 0.0);
                    continue;
                }
                const double *q = ps + i * V;
                double dot = 0;
                for (int64_t v = 0; v < V; v++) {
                    double acc = 0;
                    for (int64_t j = 0; j < n; j++) acc += P[i * n + j] * dcost(d->metric, q[v] - pt[j * V + v]);
                    h[v] = c * acc;
                    dot += q[v] * h[v];
                }
                for (int64_t v = 0; v < V; v++)
                    kdl_store_from_double(a->grad, a->grad_dtype, r * a->ld_grad + v,
                                          q[v] * (h[v] - dot) / tau);
            }
        }
    }
    free(ps), free(pt), free(C), free(plans), free(f), free(g), free(gl), free(ge), free(gi);
    free(valid), free(h);
    return KDL_STATUS_SUCCESS;
}
