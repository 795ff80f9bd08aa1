/* tests/test_ot_findings.c - regression tests of the Sinkhorn and SinKD
 * reference findings of tests/fuzz/fuzz_ref_ot.c (docs/hardening.md F7, F8,
 * F10): extreme but valid eps and tau must give finite results that agree
 * with the limits the maths has, never NaN with KDL_STATUS_SUCCESS.  Each
 * failed before its fix (the fuzzer's inputs are in
 * tests/fuzz/corpus/fuzz_ref_ot/regression_*). */
#include <criterion/criterion.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kdl_test.h"
#include "kdloss/kdloss_ref.h"
#include "ot_internal.h"

/* One n x m problem with a given cost and uniform weights; value, f, g and
 * plan in f64.  Returns the status. */
static kdl_status_t solve(const double *C, int64_t n, int64_t m, double eps, int64_t max_iter, double tol,
                          kdl_ot_value_t kind, double *value, double *f, double *g, double *plan, double *err)
{
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_args_t a;
    kdl_sinkhorn_desc_init(&d);
    kdl_sinkhorn_args_init(&a);
    d.epsilon = eps;
    d.max_iter = max_iter;
    d.tol = tol;
    d.check_every = 1;
    d.value = kind;
    a.batch = 1;
    a.n = n;
    a.m = m;
    a.dtype = KDL_DTYPE_F64;
    a.cost = C;
    a.value = value;
    a.f = f;
    a.g = g;
    a.plan = plan;
    a.marginal_error = err;
    return kdl_ref_sinkhorn(&d, &a);
}

/* F7: eps tiny against the cost.  (g_j - C_ij)/eps overflowed to -inf for
 * every j, the log-sum-exp became exp(-inf - -inf) = NaN: f, g, value NaN
 * with SUCCESS.  Now the potentials are the c-transforms (the eps -> 0
 * limit) and the plan is the optimal assignment: for C = [[0, 1], [1, 0]]
 * the identity, value 0, potentials with f_i + g_j = C_ij on the diagonal. */
Test(ot_findings, f7_sinkhorn_tiny_eps_is_the_unregularised_limit)
{
    const double C[4] = {0, 1, 1, 0};
    const double eps_list[] = {1e-300, 4.9e-324, 1e-30};
    for (size_t e = 0; e < sizeof eps_list / sizeof eps_list[0]; e++) {
        for (int kind = 0; kind < 2; kind++) {
            double v = NAN, f[2], g[2], P[4], err = NAN;
            kdl_status_t st = solve(C, 2, 2, eps_list[e], 50, 0, (kdl_ot_value_t)kind, &v, f, g, P, &err);
            cr_assert_eq(st, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
            cr_expect(isfinite(f[0]) && isfinite(f[1]) && isfinite(g[0]) && isfinite(g[1]),
                      "eps %g: f %g %g g %g %g", eps_list[e], f[0], f[1], g[0], g[1]);
            cr_expect(fabs(f[0] + g[0]) < 1e-12 && fabs(f[1] + g[1]) < 1e-12, "eps %g: f + g on the diagonal",
                      eps_list[e]);
            cr_expect(fabs(v) < 1e-12, "eps %g kind %d: value %g, the exact OT value is 0", eps_list[e], kind, v);
            cr_expect(fabs(P[0] - 0.5) < 1e-12 && fabs(P[3] - 0.5) < 1e-12 && P[1] == 0 && P[2] == 0,
                      "eps %g: plan %g %g %g %g", eps_list[e], P[0], P[1], P[2], P[3]);
            cr_expect(err < 1e-12, "eps %g: marginal error %g", eps_list[e], err);
        }
    }
}

/* F7, the other end: eps = 1e300 (valid, finite).  The cost-unit form of the
 * fix must not be used there (eps log a overflows); the plan is the
 * independent coupling a b^T and TRANSPORT is the mean cost. */
Test(ot_findings, f7_sinkhorn_huge_eps_is_the_independent_coupling)
{
    const double C[6] = {0, -0.375, 1e3, 2, 5, 7};
    const double eps_list[] = {1e300, DBL_MAX};
    for (size_t e = 0; e < 2; e++) {
        double v = NAN, f[3], g[2], P[6], err = NAN;
        kdl_status_t st = solve(C, 3, 2, eps_list[e], 3, 0, KDL_OT_VALUE_TRANSPORT, &v, f, g, P, &err);
        cr_assert_eq(st, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
        double mean = 0;
        for (int k = 0; k < 6; k++) {
            mean += C[k] / 6;
            cr_expect(fabs(P[k] - 1.0 / 6) < 1e-12, "eps %g: P[%d] = %g", eps_list[e], k, P[k]);
        }
        cr_expect(fabs(v - mean) < 1e-9 * fabs(mean), "eps %g: value %.17g, mean cost %.17g", eps_list[e], v, mean);
        cr_expect(isfinite(f[0]) && isfinite(g[0]) && !isnan(err), "eps %g: f %g g %g err %g", eps_list[e], f[0], g[0],
                  err);
    }
}

/* F7 and the plan: at eps tiny against the cost the rounding of
 * f_i + g_j - C_ij (about 1e-16 |C|) divided by eps made plan entries inf;
 * now no entry exceeds its column's weight, and none is NaN. */
Test(ot_findings, f7_sinkhorn_plan_bounded_by_the_column_weights)
{
    double C[12];
    for (int k = 0; k < 12; k++) C[k] = 1e6 * (0.1 + (double)((k * 7) % 12));
    double v, f[3], g[4], P[12], err;
    kdl_status_t st = solve(C, 3, 4, 1e-290, 40, 0, KDL_OT_VALUE_TRANSPORT, &v, f, g, P, &err);
    cr_assert_eq(st, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    for (int k = 0; k < 12; k++) cr_expect(P[k] >= 0 && P[k] <= 0.25, "P[%d] = %g", k, P[k]);
    cr_expect(isfinite(v) && v >= 0 && isfinite(err), "value %g err %g", v, err);
}

/* F10: eps-scaling from a diameter of 7e67 down to eps = 1e-300 (factor
 * 0.5).  log(eps / D) was log(0) = -inf: a schedule of 10^15 stages whose
 * kept stages had eps = D 0.5^(10^15) = 0, so the iterations divided by 0
 * (NaN).  Now the stages are the last max_iter - 1 of the true schedule:
 * decreasing, each above eps, a factor 0.5 apart. */
Test(ot_findings, f10_eps_scaling_schedule_far_below_the_diameter)
{
    const double D = 6.88453e67, eps = 1e-300;
    kdl_ot_schedule_t s = kdl_ot_schedule_make(D, eps, 1, 0.5, 1, 19);
    cr_expect_eq(s.stages, 18);
    cr_expect(s.first > 1200 && s.first < 1230, "first stage index %lld", (long long)s.first);
    double prev = INFINITY;
    for (int64_t it = 1; it <= 18; it++) {
        double e = kdl_ot_schedule_eps(&s, it);
        cr_expect(e > eps && e < prev, "iteration %lld: eps %g", (long long)it, e);
        if (it > 1) cr_expect(fabs(e / prev - 0.5) < 1e-9, "ratio %g", e / prev);
        prev = e;
    }
    cr_expect_eq(kdl_ot_schedule_eps(&s, 19), eps);
    /* the last annealing stage is the first above eps */
    cr_expect(kdl_ot_schedule_eps(&s, 18) * 0.5 <= eps * (1 + 1e-9));

    /* and through the reference: points 8e33 apart, debiased, eps-scaling */
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_args_t a;
    kdl_sinkhorn_desc_init(&d);
    kdl_sinkhorn_args_init(&a);
    d.epsilon = eps;
    d.max_iter = 19;
    d.tol = 0;
    d.eps_scaling = 1;
    d.eps_scaling_factor = 0.5;
    d.debias = 1;
    const double x[4] = {0, 0, -8.3e33, 1}, y[4] = {0, 0, 1, 2};
    double v = NAN, err = NAN;
    a.batch = 1;
    a.n = a.m = 2;
    a.dim = 2;
    a.dtype = KDL_DTYPE_F64;
    a.x = x;
    a.y = y;
    a.value = &v;
    a.marginal_error = &err;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect(!isnan(v) && !isnan(err), "value %g, marginal error %g", v, err);
}

/* F8: SinKD with a tiny temperature.  softmax(s/tau) computed s/tau first:
 * a finite logit over tau = 1e-300 is inf, inf - inf = NaN, and a valid
 * group got loss NaN with SUCCESS.  The limit is the arg-max indicator: the
 * same loss as at tau = 1e-3 when the logits are separated by >= 1. */
Test(ot_findings, f8_sinkd_tiny_tau_is_the_argmax_limit)
{
    const int64_t N = 3, V = 4;
    const double S[12] = {5, 1, -2, 0, 0.5, 7, 3, -1, -9, -3, 0, 2};
    const double T[12] = {1, 4, 0, -2, 2, 8, 1, 0, -1, -6, 5, 1};
    double ref_loss = NAN, ref_grad[12];
    const double taus[] = {1e-3, 1e-300, 4.9e-324};
    for (int k = 0; k < 3; k++) {
        kdl_sinkd_desc_t d;
        kdl_sinkd_args_t a;
        kdl_sinkd_desc_init(&d);
        kdl_sinkd_args_init(&a);
        d.temperature = taus[k];
        d.max_iter = 30;
        a.rows = N;
        a.vocab = V;
        a.student = S;
        a.teacher = T;
        a.ld_student = a.ld_teacher = a.ld_grad = V;
        a.student_dtype = a.teacher_dtype = a.grad_dtype = a.out_dtype = KDL_DTYPE_F64;
        double loss = NAN, grad[12];
        int64_t info = -1;
        a.loss = &loss;
        a.grad = grad;
        a.info = &info;
        cr_assert_eq(kdl_ref_sinkd(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
        cr_expect_eq(info, 0);
        cr_expect(isfinite(loss) && loss >= 0, "tau %g: loss %g", taus[k], loss);
        for (int q = 0; q < 12; q++) cr_expect(!isnan(grad[q]), "tau %g: gradient NaN", taus[k]);
        if (k == 0) {
            ref_loss = loss;
            memcpy(ref_grad, grad, sizeof grad);
        } else {
            cr_expect(fabs(loss - ref_loss) <= 1e-12 * ref_loss, "tau %g: loss %.17g, at tau 1e-3 %.17g", taus[k],
                      loss, ref_loss);
            /* the one-hot softmax has a zero Jacobian: q (h - q.h) = 0 */
            for (int q = 0; q < 12; q++) cr_expect(grad[q] == 0 && ref_grad[q] == 0, "gradient[%d] %g", q, grad[q]);
        }
    }
}

/* F11: a zero weight on both sides (log-weight -inf; the self problem of a
 * debiased divergence has them on both sides) and a tiny eps: the potentials
 * of a zero-weight row and column are unbounded (here f_1 = g_1 = 64),
 * (f_1 + g_1 - C_11)/eps = +inf and P_11 = exp(-inf + inf) = NaN, so the
 * marginal error and the value were NaN with SUCCESS.  A zero weight's row
 * and column of P are 0 by definition. */
Test(ot_findings, f11_zero_weights_on_both_sides_tiny_eps)
{
    const double C[4] = {0, 64, 64, 0}, lw[2] = {0, -INFINITY};
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_args_t a;
    kdl_sinkhorn_desc_init(&d);
    kdl_sinkhorn_args_init(&a);
    d.epsilon = 4.9e-324;
    d.max_iter = 10;
    d.tol = 0;
    double v = NAN, err = NAN, P[4], f[2] = {-6.4375, 0};
    a.batch = 1;
    a.n = a.m = 2;
    a.dtype = KDL_DTYPE_F64;
    a.cost = C;
    a.log_a = lw;
    a.log_b = lw;
    a.f_init = f;
    a.value = &v;
    a.marginal_error = &err;
    a.plan = P;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect(P[1] == 0 && P[2] == 0 && P[3] == 0, "zero-weight row and column: %g %g %g", P[1], P[2], P[3]);
    cr_expect(fabs(P[0] - 1) < 1e-12, "P_00 = %g", P[0]);
    cr_expect(v == 0 && err < 1e-12, "value %g, marginal error %g", v, err);
}
