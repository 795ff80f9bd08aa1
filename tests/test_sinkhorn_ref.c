/* tests/test_sinkhorn_ref.c - the float64 Sinkhorn reference against closed
 * forms and identities: marginals, the sorted 1-D matching, vanishing cost
 * of identical measures, debiased divergence of a measure with itself,
 * DUAL's envelope gradient (d value / d C = P) and the x-gradient against
 * central finite differences, eps-scaling, ragged batches, warm starts, the
 * cached teacher self-term, and every bad argument (status, nothing written). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdl_test.h"
#include "kdloss/kdloss_ref.h"

#define SENTINEL (-12345.0)

/* The arguments of one n x m problem (f64), no array given. */
static kdl_sinkhorn_args_t one_problem(int64_t n, int64_t m) { return kdl_test_ot_args(1, n, m); }

/* One problem between the points x [n, dim] and y [m, dim]. */
static kdl_sinkhorn_args_t points_problem(int64_t n, int64_t m, int64_t dim, const double *x, const double *y)
{
    kdl_sinkhorn_args_t a = one_problem(n, m);
    a.x = x;
    a.y = y;
    a.dim = dim;
    return a;
}

static void tight(kdl_sinkhorn_desc_t *d, double eps)
{
    kdl_sinkhorn_desc_init(d);
    d->epsilon = eps;
    d->tol = 1e-13;
    d->max_iter = 200000;
    d->check_every = 5;
}

/* A cost uniform in [0, hi) and random log-weights of an n x m problem. */
static void random_problem(kdl_rng_t *r, int64_t n, int64_t m, double hi, double *C, double *la, double *lb)
{
    kdl_fill_uniform(r, C, n * m, 0, hi);
    kdl_fill_logw(r, la, n);
    kdl_fill_logw(r, lb, m);
}

/* Points every output of a at the given arrays. */
static void bind_outputs(kdl_sinkhorn_args_t *a, double *value, double *err, int64_t *iters, double *f, double *g,
                         double *plan, double *grad_x)
{
    a->value = value;
    a->marginal_error = err;
    a->iterations = iters;
    a->f = f;
    a->g = g;
    a->plan = plan;
    a->grad_x = grad_x;
}

/* One problem, cost given, f64; returns the value. */
static double solve1(const kdl_sinkhorn_desc_t *d, int64_t n, int64_t m, const double *C, const double *la,
                     const double *lb, double *plan, double *f, double *g, int64_t *iters, double *err)
{
    kdl_sinkhorn_args_t a = one_problem(n, m);
    a.cost = C;
    a.log_a = la;
    a.log_b = lb;
    double v = NAN;
    bind_outputs(&a, &v, err, iters, f, g, plan, NULL);
    kdl_status_t st = kdl_ref_sinkhorn(d, &a);
    cr_assert_eq(st, KDL_STATUS_SUCCESS, "%s: %s", kdl_status_string(st), kdl_get_last_error());
    return v;
}

Test(sinkhorn_ref, defaults_and_names)
{
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    cr_expect_eq(d.struct_size, sizeof d);
    cr_expect_eq(d.epsilon, 0.1);
    cr_expect_eq(d.max_iter, 1000);
    cr_expect_eq(d.tol, 1e-6);
    cr_expect_eq(d.check_every, 10);
    cr_expect_eq(d.eps_scaling, 0);
    cr_expect_eq(d.eps_scaling_factor, 0.8);
    cr_expect_eq(d.eps_stage_iter, 1);
    cr_expect_eq(d.value, KDL_OT_VALUE_TRANSPORT);
    cr_expect_eq(d.debias, 0);
    cr_expect_eq(d.metric, KDL_OT_METRIC_SQEUCLIDEAN);
    kdl_sinkhorn_args_t a;
    kdl_sinkhorn_args_init(&a);
    cr_expect_eq(a.struct_size, sizeof a);
    cr_expect_eq(a.dtype, KDL_DTYPE_F32);
    cr_expect_null(a.cost);
    for (int k = 0; k < KDL_OT_METRIC_COUNT_; k++)
        cr_expect_eq(kdl_ot_metric_from_name(kdl_ot_metric_name((kdl_ot_metric_t)k)), k);
    for (int k = 0; k < KDL_OT_VALUE_COUNT_; k++)
        cr_expect_eq(kdl_ot_value_from_name(kdl_ot_value_name((kdl_ot_value_t)k)), k);
    cr_expect_eq(kdl_ot_metric_from_name("l2"), -1);
    cr_expect_eq(kdl_ot_value_from_name(NULL), -1);
}

Test(sinkhorn_ref, plan_marginals_match_a_and_b)
{
    kdl_rng_t r = {11};
    const int64_t n = 7, m = 5;
    double C[35], la[7], lb[5], P[35], f[7], g[5], err;
    int64_t it;
    random_problem(&r, n, m, 2, C, la, lb);
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.epsilon = 0.2;
    d.tol = 1e-10;
    d.max_iter = 100000;
    solve1(&d, n, m, C, la, lb, P, f, g, &it, &err);
    cr_expect(err <= 1e-10, "err %g", err);
    cr_expect(it % d.check_every == 0 && it < d.max_iter, "iterations %lld", (long long)it);
    double rerr = 0;
    for (int64_t i = 0; i < n; i++) {
        double s = 0;
        for (int64_t j = 0; j < m; j++) s += P[i * m + j];
        rerr += fabs(s - exp(la[i]));
    }
    cr_expect(fabs(rerr - err) <= 1e-14, "reported %g, recomputed %g", err, rerr);
    for (int64_t j = 0; j < m; j++) {
        double s = 0;
        for (int64_t i = 0; i < n; i++) s += P[i * m + j];
        cr_expect(fabs(s - exp(lb[j])) <= 1e-14, "column %lld sums to %.17g", (long long)j, s);
    }
    /* P from the returned potentials */
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < m; j++) {
            double p = exp(la[i] + lb[j] + (f[i] + g[j] - C[i * m + j]) / d.epsilon);
            cr_expect(fabs(p - P[i * m + j]) <= 1e-15 + 1e-13 * p);
        }
}

Test(sinkhorn_ref, sorted_1d_points_give_the_sorted_matching_cost)
{
    /* 1-D, n = m, uniform weights, |x - y|^2: the OT plan matches the i-th
     * smallest x with the i-th smallest y; the cost is the mean of squared
     * gaps.  Points on a grid so the matching gap is well separated. */
    const int64_t n = 12;
    double x[12], y[12];
    kdl_rng_t r = {5};
    for (int64_t i = 0; i < n; i++) {
        x[i] = (double)i + 0.3 * kdl_rng_uniform(&r);
        y[i] = (double)i + 0.5 + 0.3 * kdl_rng_uniform(&r);
    }
    /* shuffle y's order: the solver must not care */
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t k = (int64_t)(kdl_rng_next(&r) % (uint64_t)(i + 1));
        double t = y[i];
        y[i] = y[k];
        y[k] = t;
    }
    double ys[12];
    memcpy(ys, y, sizeof ys);
    for (int64_t i = 1; i < n; i++) /* insertion sort */
        for (int64_t k = i; k > 0 && ys[k - 1] > ys[k]; k--) {
            double t = ys[k];
            ys[k] = ys[k - 1];
            ys[k - 1] = t;
        }
    double exact = 0;
    for (int64_t i = 0; i < n; i++) exact += (x[i] - ys[i]) * (x[i] - ys[i]) / (double)n;

    kdl_sinkhorn_desc_t d;
    tight(&d, 1e-3); /* 1e-3 of the unit gap, ~1e-5 of the cost scale */
    d.tol = 1e-11;
    d.eps_scaling = 1;
    kdl_sinkhorn_args_t a = points_problem(n, n, 1, x, y);
    double v = NAN, err = NAN;
    int64_t it = 0;
    a.value = &v;
    a.marginal_error = &err;
    a.iterations = &it;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect(err <= 1e-11, "err %g after %lld iterations", err, (long long)it);
    cr_expect(fabs(v - exact) <= 1e-6 * exact, "transport %.12g, sorted matching %.12g", v, exact);
}

Test(sinkhorn_ref, identical_measures_cost_vanishes_as_eps_goes_to_zero)
{
    /* x == y with a zero-diagonal cost: <P, C> -> 0 as eps -> 0. */
    const int64_t n = 9;
    double x[18];
    kdl_rng_t r = {21};
    kdl_fill_uniform(&r, x, n * 2, 0, 1);
    double prev = INFINITY;
    const double eps_list[] = {1e-1, 3e-2, 1e-2, 1e-3};
    for (size_t k = 0; k < 4; k++) {
        kdl_sinkhorn_desc_t d;
        tight(&d, eps_list[k]);
        d.tol = 1e-12;
        d.eps_scaling = 1;
        kdl_sinkhorn_args_t a = points_problem(n, n, 2, x, x);
        double v = NAN;
        a.value = &v;
        cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS);
        cr_expect(v >= 0 && v < prev, "eps %g: value %g (previous %g)", eps_list[k], v, prev);
        prev = v;
    }
    cr_expect(prev < 1e-6, "eps 1e-3: transport value %g should be ~0", prev);
}

/* The debiased divergence between the points x and y [n, dim], eps 0.05,
 * weights exp(lw) on both sides (uniform when lw is NULL). */
static double debiased(int value, int64_t n, int64_t dim, const double *x, const double *y, const double *lw)
{
    kdl_sinkhorn_desc_t d;
    tight(&d, 0.05);
    d.debias = 1;
    d.value = (kdl_ot_value_t)value;
    kdl_sinkhorn_args_t a = points_problem(n, n, dim, x, y);
    a.log_a = a.log_b = lw;
    double v = NAN;
    a.value = &v;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    return v;
}

Test(sinkhorn_ref, debiased_divergence_of_a_measure_with_itself_is_zero)
{
    const int64_t n = 10, dim = 3;
    double x[30], la[10];
    kdl_rng_t r = {3};
    kdl_fill_uniform(&r, x, n * dim, -1, 1);
    kdl_fill_logw(&r, la, n);
    for (int value = 0; value < 2; value++) {
        double v = debiased(value, n, dim, x, x, la);
        cr_expect(fabs(v) <= 1e-12, "%s: S(a,a) = %g", kdl_ot_value_name((kdl_ot_value_t)value), v);
    }
    /* and a positive divergence between two different clouds (DUAL) */
    double y[30];
    kdl_fill_uniform(&r, y, n * dim, 0, 2);
    double v = debiased(KDL_OT_VALUE_DUAL, n, dim, x, y, NULL);
    cr_expect(v > 0.1, "S(a,b) = %g", v);
}

Test(sinkhorn_ref, dual_equals_transport_plus_eps_kl)
{
    /* At the fixed point, <a,f> + <b,g> = <P,C> + eps KL(P || a x b). */
    kdl_rng_t r = {8};
    const int64_t n = 6, m = 8;
    double C[48], la[6], lb[8], P[48];
    random_problem(&r, n, m, 1, C, la, lb);
    kdl_sinkhorn_desc_t d;
    tight(&d, 0.07);
    double vt = solve1(&d, n, m, C, la, lb, P, NULL, NULL, NULL, NULL);
    d.value = KDL_OT_VALUE_DUAL;
    double vd = solve1(&d, n, m, C, la, lb, NULL, NULL, NULL, NULL, NULL);
    double kl = 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < m; j++) kl += P[i * m + j] * (log(P[i * m + j]) - la[i] - lb[j]);
    cr_expect(fabs(vd - (vt + d.epsilon * kl)) <= 1e-11, "dual %.15g, transport + eps KL %.15g", vd,
              vt + d.epsilon * kl);
}

/* The value as a function of the cost, for finite differences. */
typedef struct cost_fd {
    const kdl_sinkhorn_desc_t *d;
    int64_t n, m;
    const double *la, *lb;
} cost_fd_t;

static double value_of_cost(void *ctx, const double *C)
{
    const cost_fd_t *c = (const cost_fd_t *)ctx;
    return solve1(c->d, c->n, c->m, C, c->la, c->lb, NULL, NULL, NULL, NULL, NULL);
}

Test(sinkhorn_ref, dual_gradient_wrt_cost_is_the_plan)
{
    /* Envelope theorem: d(<a,f> + <b,g>)/dC_ij = P_ij.  Central differences. */
    kdl_rng_t r = {13};
    const int64_t n = 5, m = 4;
    double C[20], la[5], lb[4], P[20];
    random_problem(&r, n, m, 1, C, la, lb);
    kdl_sinkhorn_desc_t d;
    tight(&d, 0.1);
    d.value = KDL_OT_VALUE_DUAL;
    solve1(&d, n, m, C, la, lb, P, NULL, NULL, NULL, NULL);
    double fd[20];
    cost_fd_t ctx = {&d, n, m, la, lb};
    kdl_central_diff(value_of_cost, &ctx, C, n * m, 1e-5, fd);
    kdl_tol_t tol = {1e-6, 1e-8};
    KDL_EXPECT_CLOSE("dV/dC vs P", fd, P, (size_t)(n * m), tol);
}

/* value of a points problem (f64), with grad_x optionally */
static double solve_points(const kdl_sinkhorn_desc_t *d, int64_t n, int64_t m, int64_t dim, const double *x,
                           const double *y, double *grad)
{
    kdl_sinkhorn_args_t a = points_problem(n, m, dim, x, y);
    double v = NAN;
    a.value = &v;
    a.grad_x = grad;
    kdl_status_t st = kdl_ref_sinkhorn(d, &a);
    cr_assert_eq(st, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    return v;
}

/* The value as a function of the points x, for finite differences. */
typedef struct points_fd {
    const kdl_sinkhorn_desc_t *d;
    int64_t n, m, dim;
    const double *y;
} points_fd_t;

static double value_of_x(void *ctx, const double *x)
{
    const points_fd_t *p = (const points_fd_t *)ctx;
    return solve_points(p->d, p->n, p->m, p->dim, x, p->y, NULL);
}

static void check_grad_x(kdl_ot_metric_t metric, int debias)
{
    kdl_rng_t r = {(uint64_t)(17 + 2 * metric + debias)};
    const int64_t n = 5, m = 6, dim = 3;
    double x[15], y[18], gx[15], fd[15];
    kdl_fill_uniform(&r, x, n * dim, -1, 1);
    kdl_fill_uniform(&r, y, m * dim, -0.5, 1.5);
    kdl_sinkhorn_desc_t d;
    tight(&d, 0.3);
    d.value = KDL_OT_VALUE_DUAL;
    d.metric = metric;
    d.debias = debias;
    solve_points(&d, n, m, dim, x, y, gx);
    points_fd_t ctx = {&d, n, m, dim, y};
    kdl_central_diff(value_of_x, &ctx, x, n * dim, 1e-6, fd);
    kdl_tol_t tol = {1e-6, 1e-8};
    KDL_EXPECT_CLOSE(metric == KDL_OT_METRIC_L1 ? "grad_x l1" : "grad_x sqeuclidean", gx, fd,
                     (size_t)(n * dim), tol);
}

Test(sinkhorn_ref, grad_x_matches_finite_differences_sqeuclidean) { check_grad_x(KDL_OT_METRIC_SQEUCLIDEAN, 0); }
Test(sinkhorn_ref, grad_x_matches_finite_differences_l1) { check_grad_x(KDL_OT_METRIC_L1, 0); }
Test(sinkhorn_ref, grad_x_debiased_matches_finite_differences_sqeuclidean)
{
    check_grad_x(KDL_OT_METRIC_SQEUCLIDEAN, 1);
}
Test(sinkhorn_ref, grad_x_debiased_matches_finite_differences_l1) { check_grad_x(KDL_OT_METRIC_L1, 1); }

Test(sinkhorn_ref, eps_scaling_same_answer_fewer_iterations)
{
    /* 10 + 10 points in the unit square, eps = 3e-3 (~1e-3 of the cost's
     * diameter): plain Sinkhorn needs ~180k iterations to reach 1e-6, the
     * annealed one ~2k. */
    kdl_rng_t r = {10};
    const int64_t n = 10, m = 10, dim = 2;
    double x[20], y[20];
    kdl_fill_uniform(&r, x, n * dim, 0, 1);
    kdl_fill_uniform(&r, y, m * dim, 0, 1);
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.epsilon = 3e-3;
    d.tol = 1e-6;
    d.max_iter = 400000;
    kdl_sinkhorn_args_t a = points_problem(n, m, dim, x, y);
    double v0 = NAN, v1 = NAN, e0, e1;
    int64_t it0 = 0, it1 = 0;
    a.value = &v0;
    a.iterations = &it0;
    a.marginal_error = &e0;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS);
    d.eps_scaling = 1;
    a.value = &v1;
    a.iterations = &it1;
    a.marginal_error = &e1;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect(e0 <= 1e-6 && e1 <= 1e-6, "errors %g %g", e0, e1);
    cr_expect(fabs(v0 - v1) <= 1e-5 * fabs(v0), "plain %.15g, scaled %.15g", v0, v1);
    cr_expect(10 * it1 < it0, "eps-scaling took %lld iterations, plain %lld", (long long)it1, (long long)it0);
    cr_log_info("eps 3e-3: %lld iterations plain, %lld with eps-scaling", (long long)it0, (long long)it1);
}

Test(sinkhorn_ref, eps_scaling_zero_diameter_does_not_crash)
{
    double C[12];
    for (int k = 0; k < 12; k++) C[k] = 0.75;
    double P[12], err;
    int64_t it;
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.eps_scaling = 1;
    d.epsilon = 1e-3;
    double v = solve1(&d, 3, 4, C, NULL, NULL, P, NULL, NULL, &it, &err);
    cr_expect(fabs(v - 0.75) <= 1e-15, "value %g", v);
    for (int k = 0; k < 12; k++) cr_expect(fabs(P[k] - 1.0 / 12) <= 1e-15);
    cr_expect(it == d.check_every, "converged at the first check: %lld", (long long)it);
}

Test(sinkhorn_ref, eps_scaling_schedule_is_capped_by_max_iter)
{
    /* diameter 1, eps 1e-6: the full schedule is 62 stages at 0.8; with
     * max_iter 10 the annealing keeps 9 iterations and the final stage 1. */
    double C[4] = {0, 1, 1, 0};
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.eps_scaling = 1;
    d.epsilon = 1e-6;
    d.max_iter = 10;
    int64_t it = 0;
    double err;
    double v = solve1(&d, 2, 2, C, NULL, NULL, NULL, NULL, NULL, &it, &err);
    cr_expect_eq(it, 10);
    cr_expect(isfinite(v) && isfinite(err));
}

Test(sinkhorn_ref, small_eps_is_stable)
{
    /* eps = 1e-3 of the cost scale, no scaling, a fixed 3000 iterations
     * (convergence to a tight tol takes ~1e6 here): the log domain keeps
     * every potential and plan entry finite, the columns exact. */
    kdl_rng_t r = {41};
    const int64_t n = 20, m = 30;
    double *C = malloc(sizeof(double) * n * m), *P = malloc(sizeof(double) * n * m);
    kdl_fill_uniform(&r, C, n * m, 0, 1000);
    double f[20], g[30], err;
    int64_t it;
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.epsilon = 1.0;
    d.max_iter = 3000;
    d.tol = 0;
    double v = solve1(&d, n, m, C, NULL, NULL, P, f, g, &it, &err);
    cr_expect(isfinite(v) && v >= 0 && v <= 1000, "value %g", v);
    cr_expect(isfinite(err) && err < 0.1, "err %g after %lld", err, (long long)it);
    for (int64_t k = 0; k < n * m; k++) cr_expect(isfinite(P[k]) && P[k] >= 0);
    for (int64_t k = 0; k < n; k++) cr_expect(isfinite(f[k]));
    for (int64_t k = 0; k < m; k++) cr_expect(isfinite(g[k]));
    for (int64_t j = 0; j < m; j++) {
        double s = 0;
        for (int64_t i = 0; i < n; i++) s += P[i * m + j];
        cr_expect(fabs(s - 1.0 / m) <= 1e-14, "column %lld sums to %.17g", (long long)j, s);
    }
    free(C);
    free(P);
}

Test(sinkhorn_ref, tol_zero_runs_exactly_max_iter)
{
    double C[6] = {0, 1, 2, 1, 0, 1};
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.tol = 0;
    d.max_iter = 37;
    int64_t it = 0;
    double err = NAN;
    solve1(&d, 2, 3, C, NULL, NULL, NULL, NULL, NULL, &it, &err);
    cr_expect_eq(it, 37);
    cr_expect(isfinite(err) && err >= 0);
}

Test(sinkhorn_ref, ragged_batch_equals_problems_one_by_one)
{
    kdl_rng_t r = {51};
    const int64_t B = 3, ns[3] = {4, 1, 6}, ms[3] = {3, 5, 6}, dim = 2;
    double x[22], y[28], la[11], lb[14];
    kdl_fill_uniform(&r, x, 11 * dim, 0, 1);
    kdl_fill_uniform(&r, y, 14 * dim, 0, 1);
    for (int64_t b = 0, r0 = 0, c0 = 0; b < B; r0 += ns[b], c0 += ms[b], b++) {
        kdl_fill_logw(&r, la + r0, ns[b]);
        kdl_fill_logw(&r, lb + c0, ms[b]);
    }
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.epsilon = 0.05;
    d.tol = 1e-9;
    d.debias = 1;
    d.value = KDL_OT_VALUE_DUAL;
    kdl_sinkhorn_args_t a = points_problem(0, 0, dim, x, y);
    a.batch = B;
    a.sizes_n = ns;
    a.sizes_m = ms;
    a.log_a = la;
    a.log_b = lb;
    double v[3], err[3], f[11], g[14], plan[12 + 5 + 36], gx[22];
    int64_t it[3];
    bind_outputs(&a, v, err, it, f, g, plan, gx);
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    for (int64_t b = 0, r0 = 0, c0 = 0, p0 = 0; b < B; r0 += ns[b], c0 += ms[b], p0 += ns[b] * ms[b], b++) {
        kdl_sinkhorn_args_t s = a;
        s.batch = 1;
        s.sizes_n = s.sizes_m = NULL;
        s.n = ns[b];
        s.m = ms[b];
        s.x = x + r0 * dim;
        s.y = y + c0 * dim;
        s.log_a = la + r0;
        s.log_b = lb + c0;
        double v1, e1, f1[6], g1[6], p1[36], gx1[12];
        int64_t it1;
        bind_outputs(&s, &v1, &e1, &it1, f1, g1, p1, gx1);
        cr_assert_eq(kdl_ref_sinkhorn(&d, &s), KDL_STATUS_SUCCESS);
        /* the same arithmetic in the same order: bitwise equal */
        cr_expect(v1 == v[b] && e1 == err[b] && it1 == it[b], "problem %lld differs", (long long)b);
        cr_expect(!memcmp(f1, f + r0, sizeof(double) * ns[b]));
        cr_expect(!memcmp(g1, g + c0, sizeof(double) * ms[b]));
        cr_expect(!memcmp(p1, plan + p0, sizeof(double) * ns[b] * ms[b]));
        cr_expect(!memcmp(gx1, gx + r0 * dim, sizeof(double) * ns[b] * dim));
    }
}

Test(sinkhorn_ref, warm_start_from_converged_potentials_converges_at_once)
{
    kdl_rng_t r = {61};
    const int64_t n = 8, m = 9;
    double C[72], f[8], g[9], err;
    int64_t it;
    kdl_fill_uniform(&r, C, n * m, 0, 1);
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.epsilon = 0.02;
    d.tol = 1e-9;
    d.max_iter = 100000;
    double v = solve1(&d, n, m, C, NULL, NULL, NULL, f, g, &it, &err);
    cr_expect(it > d.check_every, "cold start took %lld iterations", (long long)it);
    for (int warm = 0; warm < 2; warm++) {
        kdl_sinkhorn_args_t a = one_problem(n, m);
        a.cost = C;
        if (warm == 0)
            a.g_init = g;
        else
            a.f_init = f;
        double v2, e2;
        int64_t it2;
        a.value = &v2;
        a.iterations = &it2;
        a.marginal_error = &e2;
        cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS);
        cr_expect_eq(it2, d.check_every, "warm start (%s) took %lld iterations", warm ? "f" : "g",
                     (long long)it2);
        cr_expect(fabs(v2 - v) <= 1e-8 * fabs(v));
    }
}

/* B [n, n] matrices made self costs: zero diagonal, symmetric. */
static void self_cost(double *M, int64_t B, int64_t n)
{
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < n; j++)
                M[b * n * n + i * n + j] = i == j ? 0 : M[b * n * n + (i < j ? i * n + j : j * n + i)];
}

Test(sinkhorn_ref, cached_teacher_self_term_gives_the_same_divergence)
{
    kdl_rng_t r = {71};
    const int64_t B = 2, n = 5, m = 7;
    double C[70], Cxx[50], Cyy[98];
    kdl_fill_uniform(&r, C, B * n * m, 0, 1);
    kdl_fill_uniform(&r, Cxx, B * n * n, 0, 1);
    kdl_fill_uniform(&r, Cyy, B * m * m, 0, 1);
    self_cost(Cxx, B, n);
    self_cost(Cyy, B, m);
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.debias = 1;
    d.value = KDL_OT_VALUE_DUAL;
    d.tol = 1e-10;
    kdl_sinkhorn_args_t a = kdl_test_ot_args(B, n, m);
    a.cost = C;
    a.cost_xx = Cxx;
    a.cost_yy = Cyy;
    double v1[2], v2[2], syy[2] = {SENTINEL, SENTINEL};
    a.value = v1;
    a.self_yy = syy;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect(syy[0] != SENTINEL && syy[1] != SENTINEL, "self_yy written");
    a.cost_yy = NULL; /* not needed any more */
    a.self_yy_given = 1;
    a.value = v2;
    double syy_copy[2] = {syy[0], syy[1]};
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect(v1[0] == v2[0] && v1[1] == v2[1]);
    cr_expect(syy[0] == syy_copy[0] && syy[1] == syy_copy[1], "an input self_yy is not written");
}

Test(sinkhorn_ref, f32_arrays_match_f64_within_f32_rounding)
{
    kdl_rng_t r = {81};
    const int64_t n = 6, m = 6;
    double C[36], v64;
    float C32[36], v32 = NAN, P32[36];
    kdl_fill_uniform(&r, C, n * m, 0, 1);
    for (int k = 0; k < 36; k++) C[k] = C32[k] = (float)C[k];
    double P[36];
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.tol = 1e-10;
    v64 = solve1(&d, n, m, C, NULL, NULL, P, NULL, NULL, NULL, NULL);
    kdl_sinkhorn_args_t a = one_problem(n, m);
    a.dtype = KDL_DTYPE_F32;
    a.cost = C32;
    a.value = &v32;
    a.plan = P32;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect(v32 == (float)v64);
    for (int k = 0; k < 36; k++) cr_expect(P32[k] == (float)P[k]);
}

Test(sinkhorn_ref, empty_batch_writes_nothing_but_info)
{
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    kdl_sinkhorn_args_t a;
    kdl_sinkhorn_args_init(&a);
    a.batch = 0;
    int64_t info = 7;
    a.info = &info;
    cr_expect_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect_eq(info, 0);
}

/* ------------------------------------------------------- bad arguments */
typedef struct bad_case {
    double C[6], x[4], y[6], la[2], lb[3];
    double value[1], err[1], f[2], g[3], plan[6], gx[4];
    int64_t it[1], sizes_n[1], sizes_m[1];
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_args_t a;
} bad_case_t;

static void bad_setup(bad_case_t *c)
{
    memset(c, 0, sizeof *c);
    for (int k = 0; k < 6; k++) c->C[k] = 0.1 * k;
    for (int k = 0; k < 4; k++) c->x[k] = 0.2 * k;
    for (int k = 0; k < 6; k++) c->y[k] = 0.3 * k;
    c->la[0] = c->la[1] = log(0.5);
    for (int k = 0; k < 3; k++) c->lb[k] = log(1.0 / 3);
    c->value[0] = c->err[0] = SENTINEL;
    c->f[0] = c->f[1] = c->g[0] = c->g[1] = c->g[2] = SENTINEL;
    for (int k = 0; k < 6; k++) c->plan[k] = SENTINEL;
    for (int k = 0; k < 4; k++) c->gx[k] = SENTINEL;
    c->it[0] = -777;
    kdl_sinkhorn_desc_init(&c->d);
    kdl_sinkhorn_args_init(&c->a);
    c->a.batch = 1;
    c->a.n = 2;
    c->a.m = 3;
    c->a.dtype = KDL_DTYPE_F64;
    c->a.cost = c->C;
    c->a.log_a = c->la;
    c->a.log_b = c->lb;
    c->a.value = c->value;
    c->a.marginal_error = c->err;
    c->a.iterations = c->it;
    c->a.f = c->f;
    c->a.g = c->g;
    c->a.plan = c->plan;
}

static int bad_untouched(const bad_case_t *c)
{
    int ok = c->value[0] == SENTINEL && c->err[0] == SENTINEL && c->it[0] == -777;
    for (int k = 0; k < 2; k++) ok &= c->f[k] == SENTINEL;
    for (int k = 0; k < 3; k++) ok &= c->g[k] == SENTINEL;
    for (int k = 0; k < 6; k++) ok &= c->plan[k] == SENTINEL;
    for (int k = 0; k < 4; k++) ok &= c->gx[k] == SENTINEL;
    return ok;
}

static kdl_status_t bad_call(bad_case_t *c) { return kdl_ref_sinkhorn(&c->d, &c->a); }

/* The problem from the points x [2, dim] and y [3, dim] instead of the cost. */
static void bad_points(bad_case_t *c, int64_t dim)
{
    c->a.cost = NULL;
    c->a.x = c->x;
    c->a.y = c->y;
    c->a.dim = dim;
}

#define BAD(what, expected, mutate)                                                                      \
    KDL_EXPECT_BAD(bad_case_t, bad_setup, bad_call, bad_untouched, what, expected, mutate)

Test(sinkhorn_ref, the_good_case_succeeds)
{
    bad_case_t c;
    bad_setup(&c);
    cr_expect_eq(kdl_ref_sinkhorn(&c.d, &c.a), KDL_STATUS_SUCCESS);
    cr_expect(c.value[0] != SENTINEL && c.it[0] > 0);
}

Test(sinkhorn_ref, bad_epsilon)
{
    BAD("eps 0", KDL_STATUS_BAD_EPSILON, c->d.epsilon = 0);
    BAD("eps < 0", KDL_STATUS_BAD_EPSILON, c->d.epsilon = -0.1);
    BAD("eps NaN", KDL_STATUS_BAD_EPSILON, c->d.epsilon = NAN);
    BAD("eps inf", KDL_STATUS_BAD_EPSILON, c->d.epsilon = INFINITY);
}

Test(sinkhorn_ref, bad_size)
{
    BAD("n 0", KDL_STATUS_BAD_SIZE, c->a.n = 0);
    BAD("m -1", KDL_STATUS_BAD_SIZE, c->a.m = -1);
    BAD("batch -1", KDL_STATUS_BAD_SIZE, c->a.batch = -1);
    BAD("ragged size 0", KDL_STATUS_BAD_SIZE, {
        c->sizes_n[0] = 0;
        c->sizes_m[0] = 3;
        c->a.sizes_n = c->sizes_n;
        c->a.sizes_m = c->sizes_m;
    });
    BAD("dim 0", KDL_STATUS_BAD_SIZE, bad_points(c, 0));
}

Test(sinkhorn_ref, bad_iterations)
{
    BAD("max_iter 0", KDL_STATUS_BAD_ITERATIONS, c->d.max_iter = 0);
    BAD("check_every 0", KDL_STATUS_BAD_ITERATIONS, c->d.check_every = 0);
    BAD("stage_iter 0", KDL_STATUS_BAD_ITERATIONS, {
        c->d.eps_scaling = 1;
        c->d.eps_stage_iter = 0;
    });
}

Test(sinkhorn_ref, bad_tolerance)
{
    BAD("tol < 0", KDL_STATUS_BAD_TOLERANCE, c->d.tol = -1e-9);
    BAD("tol NaN", KDL_STATUS_BAD_TOLERANCE, c->d.tol = NAN);
}

Test(sinkhorn_ref, bad_schedule)
{
    const double factors[] = {0, 1, NAN};
    const char *const names[] = {"factor 0", "factor 1", "factor NaN"};
    for (int k = 0; k < 3; k++)
        BAD(names[k], KDL_STATUS_BAD_SCHEDULE, {
            c->d.eps_scaling = 1;
            c->d.eps_scaling_factor = factors[k];
        });
}

Test(sinkhorn_ref, nonfinite_input)
{
    BAD("NaN cost", KDL_STATUS_NONFINITE_INPUT, c->C[4] = NAN);
    BAD("inf cost", KDL_STATUS_NONFINITE_INPUT, c->C[0] = INFINITY);
    BAD("NaN log_a", KDL_STATUS_NONFINITE_INPUT, c->la[1] = NAN);
    BAD("+inf log_b", KDL_STATUS_NONFINITE_INPUT, c->lb[1] = INFINITY);
    BAD("all -inf log_a", KDL_STATUS_NONFINITE_INPUT, c->la[0] = c->la[1] = -INFINITY);
    BAD("inf point", KDL_STATUS_NONFINITE_INPUT, {
        bad_points(c, 2);
        c->x[3] = -INFINITY;
    });
}

Test(sinkhorn_ref, minus_inf_log_weight_is_a_zero_weight)
{
    bad_case_t c;
    bad_setup(&c);
    c.la[0] = -INFINITY;
    c.la[1] = 0;
    c.d.tol = 1e-12;
    c.d.max_iter = 100000;
    cr_assert_eq(kdl_ref_sinkhorn(&c.d, &c.a), KDL_STATUS_SUCCESS);
    for (int j = 0; j < 3; j++) cr_expect_eq(c.plan[j], 0.0);
    /* all mass on row 1: transport = sum_j b_j C_1j */
    double exact = (c.C[3] + c.C[4] + c.C[5]) / 3;
    cr_expect(fabs(c.value[0] - exact) <= 1e-12, "%g vs %g", c.value[0], exact);
}

Test(sinkhorn_ref, bad_pointers_enums_and_structs)
{
    BAD("value NULL", KDL_STATUS_NULL_POINTER, c->a.value = NULL);
    BAD("no cost", KDL_STATUS_NULL_POINTER, c->a.cost = NULL);
    BAD("x without y", KDL_STATUS_NULL_POINTER, {
        bad_points(c, 2);
        c->a.y = NULL;
    });
    BAD("sizes_n without sizes_m", KDL_STATUS_NULL_POINTER, {
        c->sizes_n[0] = 2;
        c->a.sizes_n = c->sizes_n;
    });
    BAD("cost and points", KDL_STATUS_BAD_PARAM, {
        bad_points(c, 2);
        c->a.cost = c->C;
    });
    BAD("grad_x with a cost", KDL_STATUS_BAD_PARAM, c->a.grad_x = c->gx);
    BAD("debias without cost_xx", KDL_STATUS_NULL_POINTER, c->d.debias = 1);
    BAD("debias with points and cost_xx", KDL_STATUS_BAD_PARAM, {
        bad_points(c, 2);
        c->d.debias = 1;
        c->a.cost_xx = c->C;
    });
    BAD("self_yy_given without self_yy", KDL_STATUS_NULL_POINTER, {
        c->d.debias = 1;
        c->a.cost_xx = c->C;
        c->a.self_yy_given = 1;
    });
    BAD("value enum", KDL_STATUS_BAD_ENUM, c->d.value = (kdl_ot_value_t)7);
    BAD("metric enum", KDL_STATUS_BAD_ENUM, c->d.metric = (kdl_ot_metric_t)-1);
    BAD("dtype enum", KDL_STATUS_BAD_ENUM, c->a.dtype = (kdl_dtype_t)9);
    BAD("f16 dtype", KDL_STATUS_NOT_SUPPORTED, c->a.dtype = KDL_DTYPE_F16);
    BAD("desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, c->d.struct_size = 8);
    BAD("args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, c->a.struct_size = sizeof c->a + 8);
    BAD("size overflow", KDL_STATUS_SIZE_OVERFLOW, {
        c->a.n = INT64_C(1) << 40;
        c->a.m = 2;
    });
    cr_expect_eq(kdl_ref_sinkhorn(NULL, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_sinkhorn_validate(NULL, NULL, 1), KDL_STATUS_NULL_POINTER);
}

Test(sinkhorn_ref, gpu_path_rejects_f64)
{
    bad_case_t c;
    bad_setup(&c);
    cr_expect_eq(kdl_sinkhorn_validate(&c.d, &c.a, 0), KDL_STATUS_NOT_SUPPORTED);
    c.a.dtype = KDL_DTYPE_F32;
    cr_expect_eq(kdl_sinkhorn_validate(&c.d, &c.a, 0), KDL_STATUS_SUCCESS);
}
