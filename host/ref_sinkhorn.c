/*
 * host/ref_sinkhorn.c - float64 CPU reference of batched log-domain Sinkhorn
 * (kdl_ref_sinkhorn) and the single-problem solver the SinKD reference
 * shares (kdl_ref_ot_solve).
 *
 * The oracle for kdl_sinkhorn: every input converted exactly to double, every
 * log-sum-exp max-shifted in double, every sum in a fixed order.  The cost
 * from points is computed directly (sum_k (x_k - y_k)^2 or sum_k |x_k - y_k|),
 * not by the |x|^2 + |y|^2 - 2 x.y expansion the GPU uses.
 *
 * One iteration (DESIGN section 2), at the eps of its stage:
 *     f_i = -eps LSE_j(lb_j + (g_j - C_ij)/eps)
 *     g_j = -eps LSE_i(la_i + (f_i - C_ij)/eps)
 * Stopping: after iteration it of the final stage, when tol > 0 and
 * it % check_every == 0, err = sum_i |sum_j P_ij - a_i|; stop if err <= tol.
 *
 * Nothing is written to the caller's outputs until every problem is solved:
 * results go to double scratch first, then are stored in the output dtype.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kdloss/kdloss_ref.h"
#include "ot_internal.h"

/* ------------------------------------------------------ one problem */
static double la_of(const kdl_ref_ot_problem_t *p, int64_t i)
{
    return p->la ? p->la[i] : -log((double)p->n);
}
static double lb_of(const kdl_ref_ot_problem_t *p, int64_t j)
{
    return p->lb ? p->lb[j] : -log((double)p->m);
}

/*
 * -eps LSE_k(lw_k + r_k/eps) of one row or column (r_k = g_j - C_ij with
 * lw = lb for an f update, f_i - C_ij with lw = la for a g update), the
 * argument of row k given by arg(p, pot, fixed, k, &lw, &r).  Two forms of the
 * same number:
 *   eps < 1:  in cost units, t_k = r_k + eps lw_k, T = max t_k,
 *             -(T + eps log sum exp((t_k - T)/eps)).  r_k/eps alone would
 *             overflow to -inf for every k when eps is tiny against the cost
 *             (eps = 1e-300, C = 1), and the max-shifted sum of the log form
 *             is then exp(-inf - -inf) = NaN (docs/hardening.md F7); here the
 *             sum is >= 1 and the result finite for any eps in (0, 1) (the
 *             limit eps -> 0 is the c-transform min_k (-r_k)).
 *   eps >= 1: in log units, u_k = lw_k + r_k/eps, -eps (U + log sum exp(u_k - U)):
 *             eps lw_k would overflow for a huge eps (1e308 times log(1/3)).
 */
typedef void (*ot_arg_fn)(const kdl_ref_ot_problem_t *p, const double *pot, int64_t fixed, int64_t k,
                          double *lw, double *r);

static void f_arg(const kdl_ref_ot_problem_t *p, const double *g, int64_t i, int64_t j, double *lw, double *r)
{
    *lw = lb_of(p, j);
    *r = g[j] - p->C[i * p->m + j];
}

static void g_arg(const kdl_ref_ot_problem_t *p, const double *f, int64_t j, int64_t i, double *lw, double *r)
{
    *lw = la_of(p, i);
    *r = f[i] - p->C[i * p->m + j];
}

static double neg_soft_min(const kdl_ref_ot_problem_t *p, ot_arg_fn arg, const double *pot, int64_t fixed,
                           int64_t count, double eps)
{
    double lw, r, mx = -INFINITY, s = 0;
    if (eps < 1) {
        for (int64_t k = 0; k < count; k++) {
            arg(p, pot, fixed, k, &lw, &r);
            double t = r + eps * lw;
            if (t > mx) mx = t;
        }
        for (int64_t k = 0; k < count; k++) {
            arg(p, pot, fixed, k, &lw, &r);
            s += exp((r + eps * lw - mx) / eps);
        }
        return -(mx + eps * log(s));
    }
    for (int64_t k = 0; k < count; k++) {
        arg(p, pot, fixed, k, &lw, &r);
        double u = lw + r / eps;
        if (u > mx) mx = u;
    }
    for (int64_t k = 0; k < count; k++) {
        arg(p, pot, fixed, k, &lw, &r);
        s += exp(lw + r / eps - mx);
    }
    return -eps * (mx + log(s));
}

/* f_i = -eps LSE_j(lb_j + (g_j - C_ij)/eps) for every i. */
static void f_update(const kdl_ref_ot_problem_t *p, double eps, const double *g, double *f)
{
    for (int64_t i = 0; i < p->n; i++) f[i] = neg_soft_min(p, f_arg, g, i, p->m, eps);
}

/* g_j = -eps LSE_i(la_i + (f_i - C_ij)/eps) for every j. */
static void g_update(const kdl_ref_ot_problem_t *p, double eps, const double *f, double *g)
{
    for (int64_t j = 0; j < p->m; j++) g[j] = neg_soft_min(p, g_arg, f, j, p->n, eps);
}

/*
 * P_ij = exp(la_i + lb_j + (f_i + g_j - C_ij)/eps), the exponent capped at
 * lb_j: g is always the g update of f (an iteration ends with it), so each
 * column of P sums to b_j and no entry exceeds b_j.  Without the cap, the
 * rounding of f_i + g_j - C_ij (about 1e-16 |C|) divided by a tiny eps made
 * entries overflow to inf, and <P, C>, the marginal error and the SinKD loss
 * inf or NaN (docs/hardening.md F7).  NaN stays NaN.
 */
static double plan_ij(const kdl_ref_ot_problem_t *p, double eps, const double *f, const double *g,
                      int64_t i, int64_t j)
{
    /* a zero weight makes its row or column of P zero (kdloss_ot.h); the
     * potentials of such a row and column are not bounded by anything, and
     * at a tiny eps (f_i + g_j - C_ij)/eps was +inf there: -inf + inf = NaN
     * (docs/hardening.md F11) */
    if (la_of(p, i) == -INFINITY || lb_of(p, j) == -INFINITY) return 0.0;
    double e = la_of(p, i) + lb_of(p, j) + (f[i] + g[j] - p->C[i * p->m + j]) / eps;
    if (e > lb_of(p, j)) e = lb_of(p, j);
    return exp(e);
}

/* sum_i |sum_j P_ij - a_i| */
static double row_error(const kdl_ref_ot_problem_t *p, double eps, const double *f, const double *g)
{
    double err = 0;
    for (int64_t i = 0; i < p->n; i++) {
        double r = 0;
        for (int64_t j = 0; j < p->m; j++) r += plan_ij(p, eps, f, g, i, j);
        err += fabs(r - exp(la_of(p, i)));
    }
    return err;
}

void kdl_ref_ot_plan(const kdl_ref_ot_problem_t *p, double eps, const double *f, const double *g,
                     double *P)
{
    for (int64_t i = 0; i < p->n; i++)
        for (int64_t j = 0; j < p->m; j++) P[i * p->m + j] = plan_ij(p, eps, f, g, i, j);
}

kdl_status_t kdl_ref_ot_solve(const kdl_ref_ot_solver_t *s, const kdl_ref_ot_problem_t *p, double *f,
                              double *g, int64_t *iters, double *err, double *value)
{
    const int64_t n = p->n, m = p->m;
    double cmin = INFINITY, cmax = -INFINITY;
    for (int64_t k = 0; k < n * m; k++) {
        if (p->C[k] < cmin) cmin = p->C[k];
        if (p->C[k] > cmax) cmax = p->C[k];
    }
    kdl_ot_schedule_t sch = kdl_ot_schedule_make(cmax - cmin, s->eps, s->eps_scaling, s->factor,
                                                 s->stage_iter, s->max_iter);

    if (p->g_init) {
        memcpy(g, p->g_init, (size_t)m * sizeof *g);
    } else if (p->f_init) {
        g_update(p, kdl_ot_schedule_eps(&sch, 1), p->f_init, g);
    } else {
        for (int64_t j = 0; j < m; j++) g[j] = 0;
    }

    int64_t it = 0;
    int measured = 0;
    double e = s->eps;
    while (it < s->max_iter) {
        it++;
        double eps_it = kdl_ot_schedule_eps(&sch, it);
        f_update(p, eps_it, g, f);
        g_update(p, eps_it, f, g);
        measured = 0;
        if (kdl_ot_check_due(&sch, it, s->tol, s->check_every)) {
            e = row_error(p, s->eps, f, g);
            measured = 1;
            if (e <= s->tol) break;
        }
    }
    if (!measured) e = row_error(p, s->eps, f, g);
    *iters = it;
    *err = e;

    double v = 0;
    if (s->value == KDL_OT_VALUE_DUAL) {
        for (int64_t i = 0; i < n; i++)
            if (la_of(p, i) > -INFINITY) v += exp(la_of(p, i)) * f[i];
        for (int64_t j = 0; j < m; j++)
            if (lb_of(p, j) > -INFINITY) v += exp(lb_of(p, j)) * g[j];
    } else {
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < m; j++) v += plan_ij(p, s->eps, f, g, i, j) * p->C[i * m + j];
    }
    *value = v;
    return KDL_STATUS_SUCCESS;
}

/* ------------------------------------------------------------ the batch */
static int all_finite(const void *x, kdl_dtype_t t, int64_t off, int64_t count)
{
    for (int64_t k = 0; k < count; k++)
        if (!isfinite(kdl_load_as_double(x, t, off + k))) return 0;
    return 1;
}

/* Log-weights: no NaN, no +inf, at least one > -inf. */
static int logw_ok(const void *x, kdl_dtype_t t, int64_t off, int64_t count)
{
    int any = 0;
    for (int64_t k = 0; k < count; k++) {
        double v = kdl_load_as_double(x, t, off + k);
        if (isnan(v) || v == INFINITY) return 0;
        any |= v > -INFINITY;
    }
    return any;
}

/* Cost between point sets X [n,d] and Y [m,d] (double) into C [n*m]. */
static void points_cost(kdl_ot_metric_t metric, const double *X, const double *Y, int64_t n, int64_t m,
                        int64_t d, double *C)
{
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < m; j++) {
            double c = 0;
            for (int64_t k = 0; k < d; k++) {
                double t = X[i * d + k] - Y[j * d + k];
                c += metric == KDL_OT_METRIC_L1 ? fabs(t) : t * t;
            }
            C[i * m + j] = c;
        }
}

/* dC(u, v)/du for one coordinate difference t = u_k - v_k. */
static double dcost(kdl_ot_metric_t metric, double t)
{
    if (metric == KDL_OT_METRIC_L1) return (t > 0) - (t < 0);
    return 2.0 * t;
}

static void load_block(const void *src, kdl_dtype_t t, int64_t off, int64_t count, double *dst)
{
    for (int64_t k = 0; k < count; k++) dst[k] = kdl_load_as_double(src, t, off + k);
}

typedef struct scratch {
    double *C, *Cxx, *Cyy, *X, *Y, *la, *lb, *fi, *gi, *fxx, *gxx, *fyy, *gyy, *P;
    /* results, stored into the caller's arrays at the end */
    double *value, *err, *f, *g, *plan, *grad, *self_yy;
    int64_t *iters;
} scratch_t;

static void free_scratch(scratch_t *s)
{
    double **all[] = {&s->C,   &s->Cxx,  &s->Cyy, &s->X,  &s->Y,    &s->la,   &s->lb,
                      &s->fi,  &s->gi,   &s->fxx, &s->gxx, &s->fyy, &s->gyy,  &s->P,
                      &s->value, &s->err, &s->f,  &s->g,  &s->plan, &s->grad, &s->self_yy};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) {
        free(*all[k]);
        *all[k] = NULL;
    }
    free(s->iters);
    s->iters = NULL;
}

static double *alloc_d(int64_t count, int *ok)
{
    double *p = (double *)malloc((size_t)(count > 0 ? count : 1) * sizeof(double));
    if (!p) *ok = 0;
    return p;
}

kdl_status_t kdl_ref_sinkhorn(const kdl_sinkhorn_desc_t *d, const kdl_sinkhorn_args_t *a)
{
    kdl_status_t st = kdl_sinkhorn_validate(d, a, 1);
    if (st != KDL_STATUS_SUCCESS) return st;
    const int64_t B = a->batch;
    if (B == 0) {
        if (a->info) *a->info = 0;
        return KDL_STATUS_SUCCESS;
    }
    kdl_ot_totals_t T;
    st = kdl_ot_totals(a, &T);
    if (st != KDL_STATUS_SUCCESS) return st;
    const kdl_dtype_t dt = a->dtype;
    const int points = a->x != NULL;
    const int64_t dim = points ? a->dim : 0;
    const int debias = d->debias != 0;
    const int need_yy = debias && !a->self_yy_given;

    /* ---- scan the inputs: nothing is written when one is not finite */
    {
        int64_t r0 = 0, c0 = 0, nm0 = 0, nn0 = 0, mm0 = 0;
        for (int64_t b = 0; b < B; b++) {
            int64_t n = a->sizes_n ? a->sizes_n[b] : a->n, m = a->sizes_m ? a->sizes_m[b] : a->m;
            const char *bad = NULL;
            if (!points && !all_finite(a->cost, dt, nm0, n * m)) bad = "cost";
            if (points && !all_finite(a->x, dt, r0 * dim, n * dim)) bad = "x";
            if (points && !all_finite(a->y, dt, c0 * dim, m * dim)) bad = "y";
            if (a->log_a && !logw_ok(a->log_a, dt, r0, n)) bad = "log_a";
            if (a->log_b && !logw_ok(a->log_b, dt, c0, m)) bad = "log_b";
            if (a->g_init && !all_finite(a->g_init, dt, c0, m)) bad = "g_init";
            if (!a->g_init && a->f_init && !all_finite(a->f_init, dt, r0, n)) bad = "f_init";
            if (debias && !points && !all_finite(a->cost_xx, dt, nn0, n * n)) bad = "cost_xx";
            if (need_yy && !points && !all_finite(a->cost_yy, dt, mm0, m * m)) bad = "cost_yy";
            if (debias && a->self_yy_given && !all_finite(a->self_yy, dt, b, 1)) bad = "self_yy";
            if (bad)
                return kdl_fail(KDL_STATUS_NONFINITE_INPUT, "problem %lld: %s has a non-finite value",
                                (long long)b, bad);
            r0 += n;
            c0 += m;
            nm0 += n * m;
            nn0 += n * n;
            mm0 += m * m;
        }
    }

    /* ---- scratch (every allocation before any output is touched) */
    scratch_t s;
    memset(&s, 0, sizeof s);
    int ok = 1;
    const int64_t mx_n = T.max_n, mx_m = T.max_m;
    s.C = alloc_d(T.max_nm, &ok);
    s.P = alloc_d(debias && mx_n * mx_n > T.max_nm ? mx_n * mx_n : T.max_nm, &ok);
    s.la = alloc_d(mx_n, &ok);
    s.lb = alloc_d(mx_m, &ok);
    s.fi = alloc_d(mx_n, &ok);
    s.gi = alloc_d(mx_m, &ok);
    if (points) {
        s.X = alloc_d(mx_n * dim, &ok);
        s.Y = alloc_d(mx_m * dim, &ok);
    }
    if (debias) {
        s.Cxx = alloc_d(mx_n * mx_n, &ok);
        s.fxx = alloc_d(mx_n, &ok);
        s.gxx = alloc_d(mx_n, &ok);
        s.Cyy = alloc_d(mx_m * mx_m, &ok);
        s.fyy = alloc_d(mx_m, &ok);
        s.gyy = alloc_d(mx_m, &ok);
        s.self_yy = alloc_d(B, &ok);
    }
    s.value = alloc_d(B, &ok);
    s.err = alloc_d(B, &ok);
    s.f = alloc_d(T.rows, &ok);
    s.g = alloc_d(T.cols, &ok);
    if (a->plan) s.plan = alloc_d(T.nm, &ok);
    if (a->grad_x) s.grad = alloc_d(T.rows * dim, &ok);
    s.iters = (int64_t *)malloc((size_t)B * sizeof(int64_t));
    if (!s.iters) ok = 0;
    if (!ok) {
        free_scratch(&s);
        return kdl_fail(KDL_STATUS_ALLOC_FAILED, "reference Sinkhorn scratch");
    }

    kdl_ref_ot_solver_t sol = {.eps = d->epsilon,
                               .tol = d->tol,
                               .factor = d->eps_scaling_factor,
                               .max_iter = d->max_iter,
                               .check_every = d->check_every,
                               .stage_iter = d->eps_stage_iter,
                               .eps_scaling = d->eps_scaling != 0,
                               .value = d->value};

    int64_t r0 = 0, c0 = 0, nm0 = 0, nn0 = 0, mm0 = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = a->sizes_n ? a->sizes_n[b] : a->n, m = a->sizes_m ? a->sizes_m[b] : a->m;
        if (points) {
            load_block(a->x, dt, r0 * dim, n * dim, s.X);
            load_block(a->y, dt, c0 * dim, m * dim, s.Y);
            points_cost(d->metric, s.X, s.Y, n, m, dim, s.C);
        } else {
            load_block(a->cost, dt, nm0, n * m, s.C);
        }
        const double *la = NULL, *lb = NULL;
        if (a->log_a) {
            load_block(a->log_a, dt, r0, n, s.la);
            la = s.la;
        }
        if (a->log_b) {
            load_block(a->log_b, dt, c0, m, s.lb);
            lb = s.lb;
        }
        kdl_ref_ot_problem_t pr = {.n = n, .m = m, .C = s.C, .la = la, .lb = lb};
        if (a->g_init) {
            load_block(a->g_init, dt, c0, m, s.gi);
            pr.g_init = s.gi;
        } else if (a->f_init) {
            load_block(a->f_init, dt, r0, n, s.fi);
            pr.f_init = s.fi;
        }
        double v;
        double *f = s.f + r0, *g = s.g + c0;
        kdl_ref_ot_solve(&sol, &pr, f, g, &s.iters[b], &s.err[b], &v);
        int need_P = a->plan || a->grad_x;
        if (need_P) kdl_ref_ot_plan(&pr, d->epsilon, f, g, s.P);
        if (a->plan) memcpy(s.plan + nm0, s.P, (size_t)(n * m) * sizeof(double));
        if (a->grad_x) {
            double *gx = s.grad + r0 * dim;
            for (int64_t i = 0; i < n; i++)
                for (int64_t k = 0; k < dim; k++) {
                    double acc = 0;
                    for (int64_t j = 0; j < m; j++)
                        acc += s.P[i * m + j] * dcost(d->metric, s.X[i * dim + k] - s.Y[j * dim + k]);
                    gx[i * dim + k] = acc;
                }
        }

        if (debias) {
            /* V(a, a): cost between x and x, marginals a, a */
            int64_t it_unused;
            double e_unused, vxx, vyy;
            if (points)
                points_cost(d->metric, s.X, s.X, n, n, dim, s.Cxx);
            else
                load_block(a->cost_xx, dt, nn0, n * n, s.Cxx);
            kdl_ref_ot_problem_t pxx = {.n = n, .m = n, .C = s.Cxx, .la = la, .lb = la};
            kdl_ref_ot_solve(&sol, &pxx, s.fxx, s.gxx, &it_unused, &e_unused, &vxx);
            if (a->grad_x) {
                /* -1/2 d V(a,a)/dx_i = -1/2 sum_l (Pxx_il + Pxx_li) dC(x_i, x_l)/dx_i */
                kdl_ref_ot_plan(&pxx, d->epsilon, s.fxx, s.gxx, s.P);
                double *gx = s.grad + r0 * dim;
                for (int64_t i = 0; i < n; i++)
                    for (int64_t k = 0; k < dim; k++) {
                        double acc = 0;
                        for (int64_t l = 0; l < n; l++)
                            acc += (s.P[i * n + l] + s.P[l * n + i]) *
                                   dcost(d->metric, s.X[i * dim + k] - s.X[l * dim + k]);
                        gx[i * dim + k] -= 0.5 * acc;
                    }
            }
            if (a->self_yy_given) {
                vyy = kdl_load_as_double(a->self_yy, dt, b);
            } else {
                if (points)
                    points_cost(d->metric, s.Y, s.Y, m, m, dim, s.Cyy);
                else
                    load_block(a->cost_yy, dt, mm0, m * m, s.Cyy);
                kdl_ref_ot_problem_t pyy = {.n = m, .m = m, .C = s.Cyy, .la = lb, .lb = lb};
                kdl_ref_ot_solve(&sol, &pyy, s.fyy, s.gyy, &it_unused, &e_unused, &vyy);
            }
            s.self_yy[b] = vyy;
            v = v - 0.5 * vxx - 0.5 * vyy;
        }
        s.value[b] = v;
        r0 += n;
        c0 += m;
        nm0 += n * m;
        nn0 += n * n;
        mm0 += m * m;
    }

    /* ---- store */
    for (int64_t b = 0; b < B; b++) {
        kdl_store_from_double(a->value, dt, b, s.value[b]);
        if (a->iterations) a->iterations[b] = s.iters[b];
        if (a->marginal_error) kdl_store_from_double(a->marginal_error, dt, b, s.err[b]);
        if (need_yy && a->self_yy) kdl_store_from_double(a->self_yy, dt, b, s.self_yy[b]);
    }
    if (a->f)
        for (int64_t k = 0; k < T.rows; k++) kdl_store_from_double(a->f, dt, k, s.f[k]);
    if (a->g)
        for (int64_t k = 0; k < T.cols; k++) kdl_store_from_double(a->g, dt, k, s.g[k]);
    if (a->plan)
        for (int64_t k = 0; k < T.nm; k++) kdl_store_from_double(a->plan, dt, k, s.plan[k]);
    if (a->grad_x)
        for (int64_t k = 0; k < T.rows * dim; k++) kdl_store_from_double(a->grad_x, dt, k, s.grad[k]);
    if (a->info) *a->info = 0;
    free_scratch(&s);
    return KDL_STATUS_SUCCESS;
}
