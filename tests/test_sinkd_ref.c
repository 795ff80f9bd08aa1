/* tests/test_sinkd_ref.c - the float64 SinKD reference: its loss against
 * kdl_ref_sinkhorn on the softmax cost and against SinKD's own mass-n
 * normalisation; its gradient against central finite differences
 * (a) of the loss with the plan frozen (what "plan held fixed" means: exact
 * for any iteration count) and (b) of the converged entropic OT dual value
 * (envelope theorem: the same gradient); groups, invalid rows, 16-bit
 * inputs, strides, and every bad argument (status, nothing written). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kdl_test.h"
#include "kdloss/kdloss_ref.h"

#define SENTINEL (-12345.0)

static void softmax(const double *x, int64_t V, double tau, double *p)
{
    double mx = -INFINITY, s = 0;
    for (int64_t v = 0; v < V; v++) mx = fmax(mx, x[v] / tau);
    for (int64_t v = 0; v < V; v++) s += exp(x[v] / tau - mx);
    for (int64_t v = 0; v < V; v++) p[v] = exp(x[v] / tau - mx) / s;
}

/* C [G][n][n] from logits [N, V] (contiguous). */
static void group_costs(const double *S, const double *T, int64_t N, int64_t V, int64_t n, double tau,
                        kdl_ot_metric_t metric, double *C)
{
    double *ps = malloc(sizeof(double) * (size_t)(N * V)), *pt = malloc(sizeof(double) * (size_t)(N * V));
    for (int64_t r = 0; r < N; r++) {
        softmax(S + r * V, V, tau, ps + r * V);
        softmax(T + r * V, V, tau, pt + r * V);
    }
    for (int64_t g = 0; g < N / n; g++)
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < n; j++) {
                double c = 0;
                for (int64_t v = 0; v < V; v++) {
                    double t = ps[(g * n + i) * V + v] - pt[(g * n + j) * V + v];
                    c += metric == KDL_OT_METRIC_L1 ? fabs(t) : t * t;
                }
                C[(g * n + i) * n + j] = c;
            }
    free(ps);
    free(pt);
}

typedef struct run {
    double loss, gl[8], plan[8 * 64], err[8];
    int64_t it[8], info;
} run_t;

static kdl_status_t run_sinkd(const kdl_sinkd_desc_t *d, const double *S, const double *T, int64_t N,
                              int64_t V, double *grad, run_t *out)
{
    kdl_sinkd_args_t a = kdl_test_sinkd_args(N, V, V, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, grad, KDL_DTYPE_F64);
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = &out->loss;
    a.group_loss = out->gl;
    a.plan = out->plan;
    a.iterations = out->it;
    a.marginal_error = out->err;
    a.info = &out->info;
    return kdl_ref_sinkd(d, &a);
}

/* kdl_ref_sinkhorn over the G n x n costs C (f64): values v, and the plans
 * and iteration counts when P and it are not NULL. */
static void sinkhorn_groups(const kdl_sinkhorn_desc_t *sd, int64_t G, int64_t n, const double *C, double *v,
                            double *P, int64_t *it)
{
    kdl_sinkhorn_args_t a = kdl_test_ot_args(G, n, n);
    a.cost = C;
    a.value = v;
    a.plan = P;
    a.iterations = it;
    cr_assert_eq(kdl_ref_sinkhorn(sd, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
}

static void logits(uint64_t seed, double *x, int64_t n)
{
    kdl_rng_t r = {seed};
    kdl_fill_logits(&r, x, n, 1.5);
}

/* Student and teacher logits (seeds ss, st) and the default descriptor with
 * the given group size. */
static kdl_sinkd_desc_t logits_and_desc(uint64_t ss, uint64_t st, double *S, double *T, int64_t n,
                                        int64_t group_size)
{
    logits(ss, S, n);
    logits(st, T, n);
    kdl_sinkd_desc_t d;
    kdl_sinkd_desc_init(&d);
    d.group_size = group_size;
    return d;
}

Test(sinkd_ref, defaults)
{
    kdl_sinkd_desc_t d;
    kdl_sinkd_desc_init(&d);
    cr_expect_eq(d.struct_size, sizeof d);
    cr_expect_eq(d.group_size, 0);
    cr_expect_eq(d.temperature, 2.0);
    cr_expect_eq(d.epsilon, 0.1);
    cr_expect_eq(d.max_iter, 20);
    cr_expect_eq(d.tol, 0.0);
    cr_expect_eq(d.check_every, 10);
    cr_expect_eq(d.metric, KDL_OT_METRIC_L1);
    cr_expect_eq(d.scale, 1.0);
    kdl_sinkd_args_t a;
    kdl_sinkd_args_init(&a);
    cr_expect_eq(a.struct_size, sizeof a);
    cr_expect_eq(a.out_dtype, KDL_DTYPE_F32);
}

static void check_against_sinkhorn(kdl_ot_metric_t metric)
{
    const int64_t N = 6, V = 11, n = 3, G = 2;
    double S[66], T[66], C[18];
    kdl_sinkd_desc_t d = logits_and_desc(1 + metric, 100 + metric, S, T, N * V, n);
    d.metric = metric;
    d.scale = 0.7;
    run_t r;
    cr_assert_eq(run_sinkd(&d, S, T, N, V, NULL, &r), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    group_costs(S, T, N, V, n, d.temperature, metric, C);
    kdl_sinkhorn_desc_t sd;
    kdl_sinkhorn_desc_init(&sd);
    sd.epsilon = d.epsilon;
    sd.max_iter = d.max_iter;
    sd.tol = 0;
    double v[2], P[18];
    int64_t it[2];
    sinkhorn_groups(&sd, G, n, C, v, P, it);
    kdl_tol_t tol = {1e-12, 1e-14};
    double want_gl[2] = {0.7 * v[0], 0.7 * v[1]}, want_loss = 0.35 * (v[0] + v[1]);
    KDL_EXPECT_CLOSE("group loss", r.gl, want_gl, 2, tol);
    KDL_EXPECT_CLOSE("loss", &r.loss, &want_loss, 1, tol);
    KDL_EXPECT_CLOSE("plan", r.plan, P, 18, tol);
    cr_expect(r.it[0] == 20 && r.it[1] == 20 && it[0] == 20);
    cr_expect_eq(r.info, 0);
}

Test(sinkd_ref, loss_is_sinkhorn_transport_on_the_softmax_cost_l1) { check_against_sinkhorn(KDL_OT_METRIC_L1); }
Test(sinkd_ref, loss_is_sinkhorn_transport_on_the_softmax_cost_sqeuclidean)
{
    check_against_sinkhorn(KDL_OT_METRIC_SQEUCLIDEAN);
}

Test(sinkd_ref, sinkd_codes_mass_n_value_is_n_times_ours)
{
    /* SinKD's code: K = exp(-C/eps); 20 times: rows /= row sums, columns /=
     * column sums (mass n); value sum(P * C).  Ours has mass 1. */
    const int64_t N = 5, V = 9, n = 5;
    double S[45], T[45], C[25], K[25];
    kdl_sinkd_desc_t d = logits_and_desc(7, 8, S, T, N * V, 0);
    run_t r;
    cr_assert_eq(run_sinkd(&d, S, T, N, V, NULL, &r), KDL_STATUS_SUCCESS);
    group_costs(S, T, N, V, n, d.temperature, d.metric, C);
    for (int k = 0; k < 25; k++) K[k] = exp(-C[k] / d.epsilon);
    for (int it = 0; it < 20; it++) {
        for (int i = 0; i < n; i++) {
            double s = 0;
            for (int j = 0; j < n; j++) s += K[i * n + j];
            for (int j = 0; j < n; j++) K[i * n + j] /= s;
        }
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int i = 0; i < n; i++) s += K[i * n + j];
            for (int i = 0; i < n; i++) K[i * n + j] /= s;
        }
    }
    double theirs = 0;
    for (int k = 0; k < 25; k++) theirs += K[k] * C[k];
    cr_expect(fabs(theirs - n * r.loss) <= 1e-12 * theirs, "SinKD code %.15g, n x ours %.15g", theirs,
              n * r.loss);
}

/* Loss with every group's plan frozen at P (from a previous run). */
static double frozen_loss(const double *S, const double *T, int64_t N, int64_t V, int64_t n,
                          const kdl_sinkd_desc_t *d, const double *P)
{
    double C[64 * 8];
    group_costs(S, T, N, V, n, d->temperature, d->metric, C);
    double sum = 0;
    for (int64_t k = 0; k < N * n; k++) sum += P[k] * C[k];
    return d->scale * sum / (double)(N / n);
}

/* A loss as a function of the student logits, for finite differences. */
typedef struct loss_fd {
    const double *T;
    int64_t N, V, n;
    const kdl_sinkd_desc_t *d;
    const double *plan;
} loss_fd_t;

static double frozen_of_student(void *ctx, const double *S)
{
    const loss_fd_t *c = (const loss_fd_t *)ctx;
    return frozen_loss(S, c->T, c->N, c->V, c->n, c->d, c->plan);
}

static void check_frozen_fd(kdl_ot_metric_t metric)
{
    const int64_t N = 6, V = 7, n = 3;
    double S[42], T[42], grad[42], fd[42];
    kdl_sinkd_desc_t d = logits_and_desc(21 + metric, 22 + metric, S, T, N * V, n);
    d.metric = metric;
    d.scale = 1.5;
    d.temperature = 1.3;
    run_t r;
    cr_assert_eq(run_sinkd(&d, S, T, N, V, grad, &r), KDL_STATUS_SUCCESS);
    loss_fd_t ctx = {T, N, V, n, &d, r.plan};
    kdl_central_diff(frozen_of_student, &ctx, S, N * V, 1e-6, fd);
    kdl_tol_t tol = {1e-6, 1e-9};
    KDL_EXPECT_CLOSE(metric == KDL_OT_METRIC_L1 ? "sinkd grad l1 (plan frozen)" : "sinkd grad sq (plan frozen)",
                     grad, fd, (size_t)(N * V), tol);
}

Test(sinkd_ref, gradient_matches_fd_of_the_frozen_plan_loss_l1) { check_frozen_fd(KDL_OT_METRIC_L1); }
Test(sinkd_ref, gradient_matches_fd_of_the_frozen_plan_loss_sqeuclidean)
{
    check_frozen_fd(KDL_OT_METRIC_SQEUCLIDEAN);
}

/* scale/G sum_g W_eps(C_g(s)), W the converged entropic OT dual value. */
static double dual_loss(const double *S, const double *T, int64_t N, int64_t V, int64_t n,
                        const kdl_sinkd_desc_t *d)
{
    double C[64 * 8], v[8];
    group_costs(S, T, N, V, n, d->temperature, d->metric, C);
    kdl_sinkhorn_desc_t sd;
    kdl_sinkhorn_desc_init(&sd);
    sd.epsilon = d->epsilon;
    sd.max_iter = 1000000;
    sd.tol = 1e-14;
    sd.check_every = 1;
    sd.value = KDL_OT_VALUE_DUAL;
    sinkhorn_groups(&sd, N / n, n, C, v, NULL, NULL);
    double s = 0;
    for (int64_t g = 0; g < N / n; g++) s += v[g];
    return d->scale * s / (double)(N / n);
}

static double dual_of_student(void *ctx, const double *S)
{
    const loss_fd_t *c = (const loss_fd_t *)ctx;
    return dual_loss(S, c->T, c->N, c->V, c->n, c->d);
}

Test(sinkd_ref, converged_gradient_is_the_envelope_gradient_of_the_dual_value)
{
    /* With the plan converged, "plan held fixed" is the exact gradient of
     * the entropic OT value W_eps(C(s)) (dW/dC = P). */
    const int64_t N = 4, V = 6, n = 2;
    double S[24], T[24], grad[24], fd[24];
    kdl_sinkd_desc_t d = logits_and_desc(31, 32, S, T, N * V, n);
    d.metric = KDL_OT_METRIC_SQEUCLIDEAN;
    d.epsilon = 0.05;
    d.max_iter = 1000000;
    d.tol = 1e-14;
    d.check_every = 1;
    run_t r;
    cr_assert_eq(run_sinkd(&d, S, T, N, V, grad, &r), KDL_STATUS_SUCCESS);
    cr_expect(r.err[0] <= 1e-14 && r.err[1] <= 1e-14, "converged: %g %g", r.err[0], r.err[1]);
    loss_fd_t ctx = {T, N, V, n, &d, NULL};
    kdl_central_diff(dual_of_student, &ctx, S, N * V, 1e-5, fd);
    kdl_tol_t tol = {1e-5, 1e-9};
    KDL_EXPECT_CLOSE("sinkd grad vs d W_eps / ds", grad, fd, (size_t)(N * V), tol);
}

Test(sinkd_ref, groups_are_independent_and_averaged)
{
    const int64_t N = 6, V = 5, n = 2, G = 3;
    double S[30], T[30], grad[30], g1[10];
    kdl_sinkd_desc_t d = logits_and_desc(41, 42, S, T, N * V, n);
    run_t r, r1;
    cr_assert_eq(run_sinkd(&d, S, T, N, V, grad, &r), KDL_STATUS_SUCCESS);
    double mean = 0;
    for (int64_t g = 0; g < G; g++) {
        cr_assert_eq(run_sinkd(&d, S + g * n * V, T + g * n * V, n, V, g1, &r1), KDL_STATUS_SUCCESS);
        cr_expect(r1.loss == r.gl[g], "group %lld", (long long)g);
        mean += r1.loss / G;
        for (int64_t k = 0; k < n * V; k++)
            cr_expect(fabs(grad[g * n * V + k] - g1[k] / G) <= 1e-15 + 1e-13 * fabs(g1[k] / G));
    }
    cr_expect(fabs(r.loss - mean) <= 1e-15);
    /* group_size 0: all rows one group */
    kdl_sinkd_desc_t d0;
    kdl_sinkd_desc_init(&d0);
    run_t ra, rb;
    cr_assert_eq(run_sinkd(&d0, S, T, N, V, NULL, &ra), KDL_STATUS_SUCCESS);
    d0.group_size = N;
    cr_assert_eq(run_sinkd(&d0, S, T, N, V, NULL, &rb), KDL_STATUS_SUCCESS);
    cr_expect(ra.loss == rb.loss);
}

Test(sinkd_ref, invalid_group_is_left_out_and_counted)
{
    const int64_t N = 6, V = 5, n = 2;
    double S[30], T[30], grad[30], ref_grad[30];
    kdl_sinkd_desc_t d = logits_and_desc(51, 52, S, T, N * V, n);
    run_t r, good;
    /* reference: groups 0 and 2 only */
    double S2[20], T2[20], g2[20];
    memcpy(S2, S, sizeof(double) * 10);
    memcpy(S2 + 10, S + 20, sizeof(double) * 10);
    memcpy(T2, T, sizeof(double) * 10);
    memcpy(T2 + 10, T + 20, sizeof(double) * 10);
    cr_assert_eq(run_sinkd(&d, S2, T2, 4, V, g2, &good), KDL_STATUS_SUCCESS);
    memcpy(ref_grad, g2, sizeof(double) * 10);
    for (int k = 10; k < 20; k++) ref_grad[k] = 0;
    memcpy(ref_grad + 20, g2 + 10, sizeof(double) * 10);

    const char *what[3] = {"NaN teacher logit", "+inf student logit", "all -inf student row"};
    for (int c = 0; c < 3; c++) {
        double Sb[30], Tb[30];
        memcpy(Sb, S, sizeof Sb);
        memcpy(Tb, T, sizeof Tb);
        if (c == 0) Tb[3 * V + 2] = NAN;
        if (c == 1) Sb[2 * V + 4] = INFINITY;
        if (c == 2)
            for (int v = 0; v < V; v++) Sb[3 * V + v] = -INFINITY;
        cr_assert_eq(run_sinkd(&d, Sb, Tb, N, V, grad, &r), KDL_STATUS_SUCCESS);
        cr_expect_eq(r.info, 1, "%s", what[c]);
        cr_expect(isnan(r.gl[1]), "%s", what[c]);
        cr_expect(r.loss == good.loss, "%s: loss %g, want %g", what[c], r.loss, good.loss);
        kdl_tol_t tol = {1e-15, 0};
        KDL_EXPECT_CLOSE(what[c], grad, ref_grad, 30, tol);
    }
    /* every group invalid: loss 0, gradient 0 */
    double Sb[30];
    memcpy(Sb, S, sizeof Sb);
    for (int g = 0; g < 3; g++) Sb[g * 2 * V] = NAN;
    cr_assert_eq(run_sinkd(&d, Sb, T, N, V, grad, &r), KDL_STATUS_SUCCESS);
    cr_expect(r.loss == 0 && r.info == 3);
    for (int k = 0; k < 30; k++) cr_expect(grad[k] == 0);
}

Test(sinkd_ref, masked_logit_has_probability_and_gradient_zero)
{
    const int64_t N = 4, V = 6;
    double S[24], T[24], grad[24];
    logits(61, S, N * V);
    logits(62, T, N * V);
    S[5] = -INFINITY;
    T[V + 2] = -INFINITY;
    kdl_sinkd_desc_t d;
    kdl_sinkd_desc_init(&d);
    d.group_size = 2;
    run_t r;
    cr_assert_eq(run_sinkd(&d, S, T, N, V, grad, &r), KDL_STATUS_SUCCESS);
    cr_expect_eq(r.info, 0);
    cr_expect(isfinite(r.loss) && r.loss > 0);
    cr_expect(grad[5] == 0);
    for (int k = 0; k < 24; k++) cr_expect(isfinite(grad[k]));
}

Test(sinkd_ref, sixteen_bit_inputs_and_strides)
{
    /* f16/bf16 logits give exactly the f64 answer on the rounded values; a
     * row stride ld > V leaves the padding of the gradient untouched. */
    const int64_t N = 4, V = 5, ld = 8;
    double S[32], T[32];
    logits(71, S, N * ld);
    logits(72, T, N * ld);
    uint16_t S16[32], T16[32];
    kdl_to_dtype(S, S16, KDL_DTYPE_F16, N * ld);
    kdl_to_dtype(T, T16, KDL_DTYPE_BF16, N * ld);
    double Sr[20], Tr[20];
    for (int64_t i = 0; i < N; i++)
        for (int64_t v = 0; v < V; v++) {
            Sr[i * V + v] = kdl_load_as_double(S16, KDL_DTYPE_F16, i * ld + v);
            Tr[i * V + v] = kdl_load_as_double(T16, KDL_DTYPE_BF16, i * ld + v);
        }
    kdl_sinkd_desc_t d;
    kdl_sinkd_desc_init(&d);
    d.group_size = 2;
    run_t want;
    double gwant[20];
    cr_assert_eq(run_sinkd(&d, Sr, Tr, N, V, gwant, &want), KDL_STATUS_SUCCESS);

    float loss = NAN;
    float grad[32];
    for (int k = 0; k < 32; k++) grad[k] = (float)SENTINEL;
    kdl_sinkd_args_t a = kdl_test_sinkd_args(N, V, ld, S16, KDL_DTYPE_F16, T16, KDL_DTYPE_BF16, grad, KDL_DTYPE_F32);
    a.loss = &loss;
    cr_assert_eq(kdl_ref_sinkd(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect(loss == (float)want.loss);
    for (int64_t i = 0; i < N; i++)
        for (int64_t v = 0; v < ld; v++) {
            if (v < V)
                cr_expect(grad[i * ld + v] == (float)gwant[i * V + v]);
            else
                cr_expect(grad[i * ld + v] == (float)SENTINEL, "padding written at %lld,%lld", (long long)i,
                          (long long)v);
        }
}

Test(sinkd_ref, tolerance_stops_early)
{
    const int64_t N = 4, V = 5;
    double S[20], T[20];
    kdl_sinkd_desc_t d = logits_and_desc(81, 82, S, T, N * V, 0);
    d.max_iter = 100000;
    d.tol = 1e-9;
    d.check_every = 3;
    run_t r;
    cr_assert_eq(run_sinkd(&d, S, T, N, V, NULL, &r), KDL_STATUS_SUCCESS);
    cr_expect(r.it[0] < 100000 && r.it[0] % 3 == 0 && r.err[0] <= 1e-9, "%lld iterations, err %g",
              (long long)r.it[0], r.err[0]);
}

Test(sinkd_ref, empty_batch_gives_zero)
{
    kdl_sinkd_desc_t d;
    kdl_sinkd_desc_init(&d);
    d.group_size = 4;
    kdl_sinkd_args_t a;
    kdl_sinkd_args_init(&a);
    a.rows = 0;
    a.vocab = 3;
    a.ld_student = a.ld_teacher = 3;
    double loss = SENTINEL;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = &loss;
    cr_expect_eq(kdl_ref_sinkd(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect_eq(loss, 0.0);
}

/* ------------------------------------------------------- bad arguments */
typedef struct bad {
    double S[12], T[12], grad[12], loss, gl[2], plan[8];
    kdl_sinkd_desc_t d;
    kdl_sinkd_args_t a;
} bad_t;

static void bad_setup(bad_t *c)
{
    logits(91, c->S, 12);
    logits(92, c->T, 12);
    for (int k = 0; k < 12; k++) c->grad[k] = SENTINEL;
    for (int k = 0; k < 8; k++) c->plan[k] = SENTINEL;
    c->loss = c->gl[0] = c->gl[1] = SENTINEL;
    kdl_sinkd_desc_init(&c->d);
    c->d.group_size = 2;
    c->a = kdl_test_sinkd_args(4, 3, 3, c->S, KDL_DTYPE_F64, c->T, KDL_DTYPE_F64, c->grad, KDL_DTYPE_F64);
    c->a.out_dtype = KDL_DTYPE_F64;
    c->a.loss = &c->loss;
    c->a.group_loss = c->gl;
    c->a.plan = c->plan;
}

static int bad_untouched(const bad_t *c)
{
    int ok = c->loss == SENTINEL && c->gl[0] == SENTINEL && c->gl[1] == SENTINEL;
    for (int k = 0; k < 12; k++) ok &= c->grad[k] == SENTINEL;
    for (int k = 0; k < 8; k++) ok &= c->plan[k] == SENTINEL;
    return ok;
}

static kdl_status_t bad_call(bad_t *c) { return kdl_ref_sinkd(&c->d, &c->a); }

#define BAD(what, expected, mutate) KDL_EXPECT_BAD(bad_t, bad_setup, bad_call, bad_untouched, what, expected, mutate)

Test(sinkd_ref, the_good_case_succeeds)
{
    bad_t c;
    bad_setup(&c);
    cr_expect_eq(kdl_ref_sinkd(&c.d, &c.a), KDL_STATUS_SUCCESS);
    cr_expect(c.loss != SENTINEL && c.grad[0] != SENTINEL);
}

Test(sinkd_ref, bad_arguments_each_have_their_status)
{
    BAD("rows not a multiple of n", KDL_STATUS_BAD_GROUP, c->d.group_size = 3);
    BAD("group_size < 0", KDL_STATUS_BAD_GROUP, c->d.group_size = -1);
    BAD("tau 0", KDL_STATUS_BAD_TEMPERATURE, c->d.temperature = 0);
    BAD("tau inf", KDL_STATUS_BAD_TEMPERATURE, c->d.temperature = INFINITY);
    BAD("eps 0", KDL_STATUS_BAD_EPSILON, c->d.epsilon = 0);
    BAD("eps NaN", KDL_STATUS_BAD_EPSILON, c->d.epsilon = NAN);
    BAD("max_iter 0", KDL_STATUS_BAD_ITERATIONS, c->d.max_iter = 0);
    BAD("check_every 0", KDL_STATUS_BAD_ITERATIONS, c->d.check_every = 0);
    BAD("tol < 0", KDL_STATUS_BAD_TOLERANCE, c->d.tol = -1);
    BAD("scale NaN", KDL_STATUS_BAD_SCALE, c->d.scale = NAN);
    BAD("metric", KDL_STATUS_BAD_ENUM, c->d.metric = (kdl_ot_metric_t)5);
    BAD("rows < 0", KDL_STATUS_BAD_SIZE, c->a.rows = -2);
    BAD("vocab 0", KDL_STATUS_BAD_SIZE, c->a.vocab = 0);
    BAD("ld_student < V", KDL_STATUS_BAD_STRIDE, c->a.ld_student = 2);
    BAD("ld_grad < V", KDL_STATUS_BAD_STRIDE, c->a.ld_grad = 1);
    BAD("student NULL", KDL_STATUS_NULL_POINTER, c->a.student = NULL);
    BAD("loss NULL", KDL_STATUS_NULL_POINTER, c->a.loss = NULL);
    BAD("out f16", KDL_STATUS_NOT_SUPPORTED, c->a.out_dtype = KDL_DTYPE_F16);
    BAD("grad bf16 for f64 student", KDL_STATUS_NOT_SUPPORTED, c->a.grad_dtype = KDL_DTYPE_BF16);
    BAD("desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, c->d.struct_size = 1);
    BAD("args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, c->a.struct_size = 1);
    cr_expect_eq(kdl_ref_sinkd(NULL, NULL), KDL_STATUS_NULL_POINTER);
    bad_t c;
    bad_setup(&c);
    cr_expect_eq(kdl_sinkd_validate(&c.d, &c.a, 0), KDL_STATUS_NOT_SUPPORTED, "the GPU path takes no f64");
}
