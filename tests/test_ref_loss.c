/*
 * tests/test_ref_loss.c - the float64 CPU reference against independent
 * answers: hand-computed closed forms, mathematical properties, central
 * finite differences, and the masking / invalid-row / reduction policy.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdl_test.h"
#include "kdloss/kdloss_ref.h"

#define MAXN 8
#define MAXV 64


/* Results of one reference call on float64 [N,V] rows (ld = V). */
typedef struct run {
    double loss[MAXN];
    double grad[MAXN * MAXV];
    double fkl[MAXN], rkl[MAXN], g_head[MAXN], g_tail[MAXN], w_head[MAXN], w_tail[MAXN];
    int64_t head_size[MAXN];
    int64_t info, valid;
    kdl_status_t status;
} run_t;

/* Arguments over float64 [N, V] student and teacher rows ld apart, with the
 * gradient (same stride) and the loss; a caller may change the dtypes. */
static kdl_loss_args_t f64_args(int64_t N, int64_t V, int64_t ld, const void *S, const void *T, void *grad,
                                double *loss)
{
    return kdl_test_loss_args(N, V, ld, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, grad, KDL_DTYPE_F64, loss);
}

static void run_ref(const kdl_loss_desc_t *d, const double *S, const double *T, const int64_t *labels,
                    int64_t N, int64_t V, run_t *r)
{
    memset(r, 0, sizeof *r);
    kdl_loss_args_t a = f64_args(N, V, V, S, T, r->grad, r->loss);
    a.labels = labels;
    a.stat_fkl = r->fkl;
    a.stat_rkl = r->rkl;
    a.stat_g_head = r->g_head;
    a.stat_g_tail = r->g_tail;
    a.stat_w_head = r->w_head;
    a.stat_w_tail = r->w_tail;
    a.stat_head_size = r->head_size;
    a.info = &r->info;
    a.valid_rows = &r->valid;
    r->status = kdl_ref_loss_forward_backward(d, &a);
}

/* Loss of one row (reduction SUM). */
static double loss1(const kdl_loss_desc_t *d0, const double *s, const double *t, int64_t V)
{
    kdl_loss_desc_t d = *d0;
    d.reduction = KDL_REDUCTION_SUM;
    run_t r;
    run_ref(&d, s, t, NULL, 1, V, &r);
    cr_assert_eq(r.status, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    return r.loss[0];
}

/* Student and teacher rows from their seeds (kdl_random_rows). */
static void random_pair(uint64_t seed_s, uint64_t seed_t, double *s, double *t, int64_t n, double sigma)
{
    kdl_random_rows(seed_s, s, n, sigma);
    kdl_random_rows(seed_t, t, n, sigma);
}

/* FKL and RKL of one row (reduction SUM). */
static void fkl_and_rkl(const double *s, const double *t, int64_t V, double *fkl, double *rkl)
{
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    *fkl = loss1(&d, s, t, V);
    d.divergence = KDL_DIV_RKL;
    *rkl = loss1(&d, s, t, V);
}

/* ------------------------------------------------------------ closed forms */

Test(closed_form, identical_rows_give_zero_for_every_divergence)
{
    double s[40];
    kdl_random_rows(1, s, 40, 2.0);
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_SUM);
        double l = loss1(&d, s, s, 40);
        cr_expect(fabs(l) < 1e-14, "%s: %g", kdl_divergence_name(kdl_all_divs[k]), l);
    }
}

/* p = (1/2, 1/2), q = (1/4, 3/4): every divergence by hand. */
Test(closed_form, two_tokens_by_hand)
{
    const double t[2] = {0.0, 0.0}, s[2] = {0.0, log(3.0)};
    const double p0 = 0.5, p1 = 0.5, q0 = 0.25, q1 = 0.75;
    const double fkl = p0 * log(p0 / q0) + p1 * log(p1 / q1);
    const double rkl = q0 * log(q0 / p0) + q1 * log(q1 / p1);
    const double m0 = 0.5 * p0 + 0.5 * q0, m1 = 0.5 * p1 + 0.5 * q1;
    const double jsd = 0.5 * (p0 * log(p0 / m0) + p1 * log(p1 / m1)) + 0.5 * (q0 * log(q0 / m0) + q1 * log(q1 / m1));
    const double sm0 = 0.1 * p0 + 0.9 * q0, sm1 = 0.1 * p1 + 0.9 * q1;
    const double skl = p0 * log(p0 / sm0) + p1 * log(p1 / sm1);
    const double rm0 = 0.1 * q0 + 0.9 * p0, rm1 = 0.1 * q1 + 0.9 * p1;
    const double srkl = q0 * log(q0 / rm0) + q1 * log(q1 / rm1);
    /* AKL, reference rule, mu = 1/2: tie broken to token 0, head {0}:
     * g_head = g_tail = 1/4, weights 1/2. */
    const double expect[KDL_DIV_COUNT_] = {fkl, rkl, fkl + rkl, 0.5 * fkl + 0.5 * rkl, jsd, 0.25, skl, srkl};
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_SUM);
        double l = loss1(&d, s, t, 2);
        cr_expect(fabs(l - expect[kdl_all_divs[k]]) < 1e-14, "%s: got %.17g want %.17g",
                  kdl_divergence_name(kdl_all_divs[k]), l, expect[kdl_all_divs[k]]);
    }
}

Test(closed_form, akl_three_tokens_weights_by_hand)
{
    /* p = (.5, .3, .2), q = (.4, .1, .5); reference rule mu = .55: head {0}. */
    const double t[3] = {log(0.5), log(0.3), log(0.2)}, s[3] = {log(0.4), log(0.1), log(0.5)};
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
    d.mu = 0.55;
    run_t r;
    run_ref(&d, s, t, NULL, 1, 3, &r);
    cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
    cr_expect_eq(r.head_size[0], 1);
    cr_expect(fabs(r.g_head[0] - 0.1) < 1e-14 && fabs(r.g_tail[0] - 0.5) < 1e-14);
    cr_expect(fabs(r.w_head[0] - 1.0 / 6) < 1e-14 && fabs(r.w_tail[0] - 5.0 / 6) < 1e-14);
    double fkl = 0.5 * log(0.5 / 0.4) + 0.3 * log(0.3 / 0.1) + 0.2 * log(0.2 / 0.5);
    double rkl = 0.4 * log(0.4 / 0.5) + 0.1 * log(0.1 / 0.3) + 0.5 * log(0.5 / 0.2);
    cr_expect(fabs(r.loss[0] - (fkl / 6 + 5 * rkl / 6)) < 1e-14);
    /* mass rule, mu = .6: c_0 = 0, c_1 = .5 < .6, c_2 = .8: head {0, 1} */
    d.head_rule = KDL_HEAD_MASS;
    d.mu = 0.6;
    run_ref(&d, s, t, NULL, 1, 3, &r);
    cr_expect_eq(r.head_size[0], 2);
    cr_expect(fabs(r.g_head[0] - 0.3) < 1e-14 && fabs(r.g_tail[0] - 0.3) < 1e-14);
    /* reference rule, same mu: c_1 = .5 <= .6 < c_2: head {0} */
    d.head_rule = KDL_HEAD_REFERENCE;
    run_ref(&d, s, t, NULL, 1, 3, &r);
    cr_expect_eq(r.head_size[0], 1);
    /* top-k, K = 3: everything is head */
    d.head_rule = KDL_HEAD_TOPK;
    d.top_k = 3;
    run_ref(&d, s, t, NULL, 1, 3, &r);
    cr_expect_eq(r.head_size[0], 3);
    cr_expect(fabs(r.w_head[0] - 1.0) < 1e-15 && r.w_tail[0] == 0.0);
    cr_expect(fabs(r.loss[0] - fkl) < 1e-14);
}

Test(closed_form, akl_tied_teacher_breaks_ties_by_lower_index)
{
    /* uniform teacher over 4 tokens, q = (.1, .1, .1, .7) */
    const double t[4] = {1, 1, 1, 1}, s[4] = {log(0.1), log(0.1), log(0.1), log(0.7)};
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
    d.mu = 0.6;
    run_t r;
    run_ref(&d, s, t, NULL, 1, 4, &r); /* reference: c_2 = .5 <= .6 < c_3: head {0,1} */
    cr_expect_eq(r.head_size[0], 2);
    cr_expect(fabs(r.g_head[0] - 0.3) < 1e-14, "g_head %g (head must be tokens 0 and 1)", r.g_head[0]);
    cr_expect(fabs(r.g_tail[0] - 0.6) < 1e-14);
    d.head_rule = KDL_HEAD_MASS; /* c_0, c_1, c_2 < .6: head {0,1,2} */
    run_ref(&d, s, t, NULL, 1, 4, &r);
    cr_expect_eq(r.head_size[0], 3);
    cr_expect(fabs(r.g_head[0] - 0.45) < 1e-14);
    d.head_rule = KDL_HEAD_TOPK;
    d.top_k = 1;
    run_ref(&d, s, t, NULL, 1, 4, &r);
    cr_expect_eq(r.head_size[0], 1);
    cr_expect(fabs(r.g_head[0] - 0.15) < 1e-14);
}

Test(closed_form, reference_rule_keeps_top1_when_it_exceeds_mu)
{
    const double t[3] = {5, 0, 0}, s[3] = {0, 0, 0};
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
    d.mu = 0.3; /* p_0 ~ .987 > mu: head is {0} all the same */
    run_t r;
    run_ref(&d, s, t, NULL, 1, 3, &r);
    cr_expect_eq(r.head_size[0], 1);
    d.head_rule = KDL_HEAD_MASS;
    run_ref(&d, s, t, NULL, 1, 3, &r);
    cr_expect_eq(r.head_size[0], 1);
}

Test(closed_form, constant_logits_are_uniform)
{
    /* teacher uniform over V, student one-hot-ish: FKL = -log V - mean log q */
    enum { V = 16 };
    double t[V], s[V];
    for (int v = 0; v < V; v++) {
        t[v] = 3.25;
        s[v] = v == 0 ? 2.0 : 0.0;
    }
    double lse = log(exp(2.0) + (V - 1));
    double want = 0;
    for (int v = 0; v < V; v++) want += (1.0 / V) * (log(1.0 / V) - (s[v] - lse));
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    cr_expect(fabs(loss1(&d, s, t, V) - want) < 1e-14);
}

Test(closed_form, temperature_divides_the_logits)
{
    double s[20], t[20], s2[20], t2[20];
    random_pair(3, 4, s, t, 20, 2.0);
    for (int v = 0; v < 20; v++) {
        s2[v] = s[v] / 2.5;
        t2[v] = t[v] / 2.5;
    }
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_SUM);
        double plain = loss1(&d, s2, t2, 20);
        d.temperature = 2.5;
        double tempered = loss1(&d, s, t, 20);
        cr_expect(fabs(plain - tempered) < 1e-13 * (1 + fabs(plain)), "%s", kdl_divergence_name(kdl_all_divs[k]));
    }
}

/* ------------------------------------------------------------- properties */

Test(properties, bounds_hold_on_random_rows)
{
    for (uint64_t seed = 10; seed < 40; seed++) {
        double s[50], t[50];
        kdl_random_rows(seed, s, 50, 1.0 + (double)(seed % 5));
        kdl_random_rows(seed * 7 + 1, t, 50, 1.0 + (double)(seed % 3));
        for (size_t k = 0; k < KDL_NDIVS; k++) {
            kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_SUM);
            double l = loss1(&d, s, t, 50);
            cr_expect(l >= -1e-15, "%s negative: %g", kdl_divergence_name(kdl_all_divs[k]), l);
            if (kdl_all_divs[k] == KDL_DIV_JSD) cr_expect(l <= log(2.0) + 1e-15);
            if (kdl_all_divs[k] == KDL_DIV_TVD) cr_expect(l <= 1.0 + 1e-15);
        }
    }
}

Test(properties, jeffreys_is_the_sum_and_stats_agree)
{
    double s[30], t[30];
    random_pair(5, 6, s, t, 30, 2.0);
    double f, r;
    fkl_and_rkl(s, t, 30, &f, &r);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL_RKL, KDL_REDUCTION_SUM);
    run_t rr;
    run_ref(&d, s, t, NULL, 1, 30, &rr);
    cr_expect(fabs(rr.loss[0] - (f + r)) < 1e-13);
    cr_expect(fabs(rr.fkl[0] - f) < 1e-13 && fabs(rr.rkl[0] - r) < 1e-13);
    cr_expect(fabs(rr.w_head[0] + rr.w_tail[0] - 1.0) < 1e-15);
    /* g_head + g_tail = 2 TVD */
    d.divergence = KDL_DIV_TVD;
    double tvd = loss1(&d, s, t, 30);
    cr_expect(fabs(rr.g_head[0] + rr.g_tail[0] - 2 * tvd) < 1e-13);
}

Test(properties, akl_weights_are_half_when_p_equals_q)
{
    double s[12];
    kdl_random_rows(7, s, 12, 1.0);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
    run_t r;
    run_ref(&d, s, s, NULL, 1, 12, &r);
    cr_expect_eq(r.w_head[0], 0.5);
    cr_expect_eq(r.w_tail[0], 0.5);
    cr_expect(fabs(r.loss[0]) < 1e-15);
}

Test(properties, shift_by_100_changes_nothing)
{
    double s[25], t[25], s2[25], t2[25];
    random_pair(8, 9, s, t, 25, 3.0);
    for (int v = 0; v < 25; v++) {
        s2[v] = s[v] + 100.0;
        t2[v] = t[v] - 100.0;
    }
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_SUM);
        double a = loss1(&d, s, t, 25), b = loss1(&d, s2, t2, 25);
        cr_expect(fabs(a - b) < 1e-11 * (1 + fabs(a)), "%s: %.17g vs %.17g", kdl_divergence_name(kdl_all_divs[k]), a, b);
    }
}

Test(properties, jsd_is_symmetric_at_half)
{
    double s[25], t[25];
    random_pair(11, 12, s, t, 25, 2.0);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_JSD, KDL_REDUCTION_SUM);
    cr_expect(fabs(loss1(&d, s, t, 25) - loss1(&d, t, s, 25)) < 1e-14);
}

Test(properties, beta_and_alpha_limits)
{
    double s[25], t[25];
    random_pair(13, 14, s, t, 25, 1.5);
    double fkl, rkl;
    fkl_and_rkl(s, t, 25, &fkl, &rkl);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    /* JSD_beta / beta -> KL(p||q) as beta -> 0, JSD_beta / (1-beta) -> KL(q||p) as beta -> 1 */
    d.divergence = KDL_DIV_JSD;
    d.beta = 1e-9; /* first-order error ~ beta * chi2, rounding ~ 1e-16 / beta */
    cr_expect(fabs(loss1(&d, s, t, 25) / d.beta - fkl) < 1e-4 * fkl);
    d.beta = 1 - 1e-9;
    cr_expect(fabs(loss1(&d, s, t, 25) / (1 - d.beta) - rkl) < 1e-4 * rkl);
    /* skew divergences at alpha = 0 are the plain ones */
    d.divergence = KDL_DIV_SKL;
    d.alpha = 0;
    cr_expect(fabs(loss1(&d, s, t, 25) - fkl) < 1e-14);
    d.divergence = KDL_DIV_SRKL;
    cr_expect(fabs(loss1(&d, s, t, 25) - rkl) < 1e-14);
}

Test(properties, masked_tokens_equal_a_smaller_vocabulary)
{
    /* -inf at the same places in both rows == dropping those tokens */
    enum { V = 20 };
    double s[V], t[V], s_small[V], t_small[V];
    random_pair(15, 16, s, t, V, 2.0);
    int n = 0;
    for (int v = 0; v < V; v++) {
        if (v % 3 == 1) {
            s[v] = t[v] = -INFINITY;
        } else {
            s_small[n] = s[v];
            t_small[n] = t[v];
            n++;
        }
    }
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_SUM);
        run_t full, small;
        run_ref(&d, s, t, NULL, 1, V, &full);
        run_ref(&d, s_small, t_small, NULL, 1, n, &small);
        cr_expect(fabs(full.loss[0] - small.loss[0]) < 1e-13, "%s", kdl_divergence_name(kdl_all_divs[k]));
        int j = 0;
        for (int v = 0; v < V; v++) {
            if (v % 3 == 1) {
                cr_expect_eq(full.grad[v], 0.0, "masked token %d has gradient", v);
            } else {
                cr_expect(fabs(full.grad[v] - small.grad[j]) < 1e-13);
                j++;
            }
        }
    }
}

Test(properties, teacher_zero_where_student_positive_is_infinite_not_nan)
{
    const double t[3] = {0, 0, -INFINITY}, s[3] = {0, 1, 2};
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    double f = loss1(&d, s, t, 3);
    cr_expect(isfinite(f) && f > 0);
    d.divergence = KDL_DIV_RKL;
    cr_expect(isinf(loss1(&d, s, t, 3)) && loss1(&d, s, t, 3) > 0);
    d.divergence = KDL_DIV_FKL; /* and the other way round */
    cr_expect(isinf(loss1(&d, t, s, 3)));
    /* the bounded divergences stay finite */
    const kdl_divergence_t bounded[] = {KDL_DIV_JSD, KDL_DIV_TVD, KDL_DIV_SKL, KDL_DIV_SRKL};
    for (int k = 0; k < 4; k++) {
        d.divergence = bounded[k];
        cr_expect(isfinite(loss1(&d, s, t, 3)), "%s", kdl_divergence_name(bounded[k]));
        cr_expect(isfinite(loss1(&d, t, s, 3)), "%s swapped", kdl_divergence_name(bounded[k]));
    }
}

Test(properties, extreme_logits_stay_finite)
{
    double s[6] = {1e4, -1e4, 0, 3e3, -5e3, 1e4}, t[6] = {-1e4, 1e4, 2e3, 0, 1e4, -3e3};
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_SUM);
        run_t r;
        run_ref(&d, s, t, NULL, 1, 6, &r);
        cr_expect(!isnan(r.loss[0]), "%s", kdl_divergence_name(kdl_all_divs[k]));
        for (int v = 0; v < 6; v++) cr_expect(isfinite(r.grad[v]), "%s grad %d", kdl_divergence_name(kdl_all_divs[k]), v);
    }
}

Test(properties, one_token_vocabulary_is_zero)
{
    const double s[1] = {3.0}, t[1] = {-2.0};
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_SUM);
        run_t r;
        run_ref(&d, s, t, NULL, 1, 1, &r);
        cr_expect_eq(r.status, KDL_STATUS_SUCCESS);
        cr_expect(fabs(r.loss[0]) < 1e-15 && fabs(r.grad[0]) < 1e-15);
    }
}

/* -------------------------------------------------- finite differences */

/* Central differences of the reduced, scaled loss over every student logit,
 * compared with the reference gradient.  AKL's weights are constants for the
 * gradient, so its loss is differenced as w_h FKL + w_t RKL with the weights
 * frozen at the unperturbed point. */
static void check_fd(kdl_divergence_t div, kdl_reduction_t red, double tau, double scale, uint64_t seed)
{
    enum { N = 3, V = 9 };
    double S[N * V], T[N * V];
    random_pair(seed, seed + 100, S, T, N * V, 1.5);
    int64_t labels[N] = {0, -100, 5}; /* row 1 ignored */
    kdl_loss_desc_t d = kdl_test_desc(div, red);
    d.temperature = tau;
    d.scale = scale;
    d.alpha = 0.2;
    d.beta = 0.3;
    run_t base;
    run_ref(&d, S, T, labels, N, V, &base);
    cr_assert_eq(base.status, KDL_STATUS_SUCCESS);

    kdl_loss_desc_t df = d, dr = d;
    df.divergence = KDL_DIV_FKL;
    dr.divergence = KDL_DIV_RKL;
    df.reduction = dr.reduction = KDL_REDUCTION_NONE;
    const double h = 1e-5;
    double fd[N * V];
    for (int j = 0; j < N * V; j++) {
        double total[2];
        for (int sgn = 0; sgn < 2; sgn++) {
            double saved = S[j];
            S[j] += sgn ? -h : h;
            run_t r;
            if (div == KDL_DIV_AKL) {
                run_t rf, rr;
                run_ref(&df, S, T, labels, N, V, &rf);
                run_ref(&dr, S, T, labels, N, V, &rr);
                double sum = 0;
                for (int i = 0; i < N; i++)
                    if (labels[i] != -100) sum += base.w_head[i] * rf.loss[i] + base.w_tail[i] * rr.loss[i];
                total[sgn] = red == KDL_REDUCTION_MEAN ? sum / 2 : sum; /* 2 valid rows; scale in rf/rr */
            } else {
                run_ref(&d, S, T, labels, N, V, &r);
                double sum = 0;
                for (int i = 0; i < (red == KDL_REDUCTION_NONE ? N : 1); i++) sum += r.loss[i];
                total[sgn] = sum;
            }
            S[j] = saved;
        }
        fd[j] = (total[0] - total[1]) / (2 * h);
    }
    kdl_tol_t tol = {1e-6, 1e-8};
    char what[96];
    snprintf(what, sizeof what, "%s red=%s tau=%g scale=%g", kdl_divergence_name(div), kdl_reduction_name(red), tau,
             scale);
    KDL_EXPECT_CLOSE(what, base.grad, fd, N * V, tol);
    for (int v = 0; v < V; v++) cr_expect_eq(base.grad[V + v], 0.0, "ignored row has gradient");
}

Test(finite_difference, every_divergence_temperature_and_reduction)
{
    const double taus[] = {1.0, 2.0, 0.7};
    const kdl_reduction_t reds[] = {KDL_REDUCTION_MEAN, KDL_REDUCTION_SUM, KDL_REDUCTION_NONE};
    for (size_t k = 0; k < KDL_NDIVS; k++)
        for (int ti = 0; ti < 3; ti++)
            for (int ri = 0; ri < 3; ri++) check_fd(kdl_all_divs[k], reds[ri], taus[ti], ri == 1 ? 1.7 : 1.0, 40 + k * 9 + ti * 3 + ri);
}

Test(finite_difference, akl_each_head_rule)
{
    /* mass and top-k rules, through the same frozen-weight check */
    for (int rule = 0; rule < KDL_HEAD_COUNT_; rule++) {
        enum { V = 9 };
        double s[V], t[V];
        random_pair(70 + rule, 80 + rule, s, t, V, 1.5);
        kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
        d.head_rule = (kdl_head_rule_t)rule;
        d.top_k = 3;
        run_t base;
        run_ref(&d, s, t, NULL, 1, V, &base);
        kdl_loss_desc_t df = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM), dr = kdl_test_desc(KDL_DIV_RKL, KDL_REDUCTION_SUM);
        double fd[V];
        for (int j = 0; j < V; j++) {
            double sv = s[j];
            s[j] = sv + 1e-5;
            double up = base.w_head[0] * loss1(&df, s, t, V) + base.w_tail[0] * loss1(&dr, s, t, V);
            s[j] = sv - 1e-5;
            double dn = base.w_head[0] * loss1(&df, s, t, V) + base.w_tail[0] * loss1(&dr, s, t, V);
            s[j] = sv;
            fd[j] = (up - dn) / 2e-5;
        }
        kdl_tol_t tol = {1e-6, 1e-8};
        KDL_EXPECT_CLOSE(kdl_head_rule_name((kdl_head_rule_t)rule), base.grad, fd, V, tol);
    }
}

/* ------------------------------------------------- masks and reductions */

Test(masks, all_ignored_gives_zero_loss_and_gradient)
{
    double S[2 * 5], T[2 * 5];
    random_pair(90, 91, S, T, 10, 1.0);
    int64_t labels[2] = {-100, -100};
    for (int red = 0; red < KDL_REDUCTION_COUNT_; red++) {
        for (size_t k = 0; k < KDL_NDIVS; k++) {
            kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], (kdl_reduction_t)red);
            run_t r;
            run_ref(&d, S, T, labels, 2, 5, &r);
            cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
            cr_expect_eq(r.valid, 0);
            cr_expect_eq(r.info, 0);
            cr_expect_eq(r.loss[0], 0.0);
            for (int j = 0; j < 10; j++) cr_expect_eq(r.grad[j], 0.0);
        }
    }
}

Test(masks, custom_ignore_index_and_mean_over_valid_rows)
{
    enum { N = 4, V = 7 };
    double S[N * V], T[N * V];
    random_pair(92, 93, S, T, N * V, 1.0);
    int64_t labels[N] = {3, 7, 7, 0};
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_JSD, KDL_REDUCTION_NONE);
    d.ignore_index = 7;
    run_t none, mean, sum;
    run_ref(&d, S, T, labels, N, V, &none);
    d.reduction = KDL_REDUCTION_MEAN;
    run_ref(&d, S, T, labels, N, V, &mean);
    d.reduction = KDL_REDUCTION_SUM;
    run_ref(&d, S, T, labels, N, V, &sum);
    cr_expect_eq(none.loss[1], 0.0);
    cr_expect_eq(none.loss[2], 0.0);
    cr_expect_eq(mean.valid, 2);
    cr_expect(fabs(sum.loss[0] - (none.loss[0] + none.loss[3])) < 1e-15);
    cr_expect(fabs(mean.loss[0] - sum.loss[0] / 2) < 1e-15);
    for (int j = 0; j < N * V; j++) {
        cr_expect(fabs(mean.grad[j] - sum.grad[j] / 2) < 1e-16);
        cr_expect(fabs(none.grad[j] - sum.grad[j]) < 1e-16);
    }
}

Test(masks, invalid_rows_are_counted_nan_and_excluded)
{
    enum { N = 5, V = 4 };
    double S[N * V], T[N * V];
    random_pair(94, 95, S, T, N * V, 1.0);
    S[1 * V + 2] = NAN;                                      /* row 1: NaN student */
    T[2 * V + 0] = INFINITY;                                 /* row 2: +inf teacher */
    for (int v = 0; v < V; v++) S[3 * V + v] = -INFINITY;   /* row 3: all -inf student */
    int64_t labels[N] = {0, 0, 0, 0, 0};
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_NONE);
    run_t none, mean;
    run_ref(&d, S, T, labels, N, V, &none);
    cr_expect_eq(none.info, 3);
    cr_expect_eq(none.valid, 2);
    for (int i = 1; i <= 3; i++) {
        cr_expect(isnan(none.loss[i]), "row %d", i);
        cr_expect(isnan(none.fkl[i]) && isnan(none.w_head[i]));
        for (int v = 0; v < V; v++) cr_expect_eq(none.grad[i * V + v], 0.0);
    }
    cr_expect(isfinite(none.loss[0]) && isfinite(none.loss[4]));
    d.reduction = KDL_REDUCTION_MEAN;
    run_ref(&d, S, T, labels, N, V, &mean);
    cr_expect(fabs(mean.loss[0] - (none.loss[0] + none.loss[4]) / 2) < 1e-15);
    /* an ignored invalid row is ignored, not counted invalid */
    labels[1] = -100;
    run_ref(&d, S, T, labels, N, V, &mean);
    cr_expect_eq(mean.info, 2);
}

Test(masks, empty_batch_is_zero)
{
    double loss = 123;
    int64_t info = 9, valid = 9;
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_MEAN);
    kdl_loss_args_t a;
    kdl_loss_args_init(&a);
    a.rows = 0;
    a.vocab = 10;
    a.ld_student = a.ld_teacher = 10;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = &loss;
    a.info = &info;
    a.valid_rows = &valid;
    cr_expect_eq(kdl_ref_loss_forward_backward(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect_eq(loss, 0.0);
    cr_expect_eq(info, 0);
    cr_expect_eq(valid, 0);
}

Test(masks, row_stride_leaves_padding_untouched)
{
    enum { N = 3, V = 5, LD = 8 };
    double S[N * LD], T[N * LD], Sd[N * V], Td[N * V], G[N * LD];
    random_pair(96, 97, Sd, Td, N * V, 1.0);
    for (int i = 0; i < N * LD; i++) {
        S[i] = T[i] = NAN; /* padding is NaN: any read of it shows */
        G[i] = -7.0;
    }
    for (int i = 0; i < N; i++)
        for (int v = 0; v < V; v++) {
            S[i * LD + v] = Sd[i * V + v];
            T[i * LD + v] = Td[i * V + v];
        }
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_SRKL, KDL_REDUCTION_MEAN);
    run_t dense;
    run_ref(&d, Sd, Td, NULL, N, V, &dense);
    double loss;
    kdl_loss_args_t a = f64_args(N, V, LD, S, T, G, &loss);
    cr_assert_eq(kdl_ref_loss_forward_backward(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect_eq(loss, dense.loss[0]);
    for (int i = 0; i < N; i++)
        for (int v = 0; v < LD; v++) {
            if (v < V)
                cr_expect_eq(G[i * LD + v], dense.grad[i * V + v]);
            else
                cr_expect_eq(G[i * LD + v], -7.0, "padding written at %d,%d", i, v);
        }
}

Test(dtypes, sixteen_bit_inputs_are_converted_exactly)
{
    enum { N = 2, V = 33 };
    double S[N * V], T[N * V], Sr[N * V], Tr[N * V];
    random_pair(98, 99, S, T, N * V, 2.0);
    const kdl_dtype_t types[] = {KDL_DTYPE_F32, KDL_DTYPE_F16, KDL_DTYPE_BF16};
    for (int si = 0; si < 3; si++)
        for (int ti = 0; ti < 3; ti++) {
            uint32_t sbuf[N * V], tbuf[N * V]; /* large enough for f32 */
            kdl_to_dtype(S, sbuf, types[si], N * V);
            kdl_to_dtype(T, tbuf, types[ti], N * V);
            kdl_from_dtype(sbuf, Sr, types[si], N * V);
            kdl_from_dtype(tbuf, Tr, types[ti], N * V);
            kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
            run_t ref;
            run_ref(&d, Sr, Tr, NULL, N, V, &ref);
            double loss;
            float grad[N * V];
            kdl_loss_args_t a = f64_args(N, V, V, sbuf, tbuf, grad, &loss);
            a.student_dtype = types[si];
            a.teacher_dtype = types[ti];
            a.grad_dtype = KDL_DTYPE_F32;
            cr_assert_eq(kdl_ref_loss_forward_backward(&d, &a), KDL_STATUS_SUCCESS);
            cr_expect_eq(loss, ref.loss[0], "%s/%s", kdl_dtype_name(types[si]), kdl_dtype_name(types[ti]));
            for (int j = 0; j < N * V; j++) cr_expect_eq(grad[j], (float)ref.grad[j]);
        }
}

/* --------------------------------------------------------- bad arguments */

typedef struct bad_case {
    const char *name;
    kdl_status_t want;
    void (*mutate)(kdl_loss_desc_t *, kdl_loss_args_t *);
} bad_case_t;

static void m_null_student(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->student = NULL; }
static void m_null_teacher(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->teacher = NULL; }
static void m_null_loss(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->loss = NULL; }
static void m_neg_rows(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->rows = -1; }
static void m_zero_vocab(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->vocab = 0; }
static void m_ld_student(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->ld_student = a->vocab - 1; }
static void m_ld_teacher(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->ld_teacher = 2; }
static void m_ld_grad(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->ld_grad = 0; }
static void m_tau_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->temperature = 0; }
static void m_tau_neg(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->temperature = -1; }
static void m_tau_nan(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->temperature = NAN; }
static void m_tau_inf(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->temperature = INFINITY; }
static void m_alpha_one(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->alpha = 1.0; }
static void m_alpha_neg(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->alpha = -0.1; }
static void m_beta_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->beta = 0.0; }
static void m_beta_one(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->beta = 1.0; }
static void m_mu_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->mu = 0.0; }
static void m_mu_one(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->mu = 1.0; }
static void m_mu_nan(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->mu = NAN; }
static void m_topk_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->top_k = 0; }
static void m_topk_big(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->top_k = a->vocab + 1; }
static void m_scale_inf(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->scale = INFINITY; }
static void m_div_enum(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->divergence = (kdl_divergence_t)99; }
static void m_rule_enum(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->head_rule = (kdl_head_rule_t)-1; }
static void m_red_enum(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->reduction = (kdl_reduction_t)3; }
static void m_dtype_enum(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->student_dtype = (kdl_dtype_t)7; }
static void m_grad_dtype(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->grad_dtype = KDL_DTYPE_BF16; }
static void m_out_dtype(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->out_dtype = KDL_DTYPE_F16; }
static void m_desc_size(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->struct_size = 8; }
static void m_args_size(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->struct_size = 0; }
static void m_misaligned_student(kdl_loss_desc_t *d, kdl_loss_args_t *a)
{
    a->student = (const char *)a->student + 4; /* f64 rows at a 4-byte offset */
}
static void m_misaligned_loss(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->loss = (char *)a->loss + 1; }
static void m_overflow(kdl_loss_desc_t *d, kdl_loss_args_t *a)
{
    a->rows = INT64_MAX / 4;
    a->ld_student = a->ld_teacher = a->ld_grad = 1 << 20;
}

Test(bad_args, each_returns_its_status_and_writes_nothing)
{
    const bad_case_t cases[] = {
        {"null student", KDL_STATUS_NULL_POINTER, m_null_student},
        {"null teacher", KDL_STATUS_NULL_POINTER, m_null_teacher},
        {"null loss", KDL_STATUS_NULL_POINTER, m_null_loss},
        {"rows < 0", KDL_STATUS_BAD_SIZE, m_neg_rows},
        {"vocab 0", KDL_STATUS_BAD_SIZE, m_zero_vocab},
        {"ld_student < V", KDL_STATUS_BAD_STRIDE, m_ld_student},
        {"ld_teacher < V", KDL_STATUS_BAD_STRIDE, m_ld_teacher},
        {"ld_grad < V", KDL_STATUS_BAD_STRIDE, m_ld_grad},
        {"tau 0", KDL_STATUS_BAD_TEMPERATURE, m_tau_zero},
        {"tau < 0", KDL_STATUS_BAD_TEMPERATURE, m_tau_neg},
        {"tau NaN", KDL_STATUS_BAD_TEMPERATURE, m_tau_nan},
        {"tau inf", KDL_STATUS_BAD_TEMPERATURE, m_tau_inf},
        {"alpha 1", KDL_STATUS_BAD_ALPHA, m_alpha_one},
        {"alpha < 0", KDL_STATUS_BAD_ALPHA, m_alpha_neg},
        {"beta 0", KDL_STATUS_BAD_BETA, m_beta_zero},
        {"beta 1", KDL_STATUS_BAD_BETA, m_beta_one},
        {"mu 0", KDL_STATUS_BAD_MU, m_mu_zero},
        {"mu 1", KDL_STATUS_BAD_MU, m_mu_one},
        {"mu NaN", KDL_STATUS_BAD_MU, m_mu_nan},
        {"top_k 0", KDL_STATUS_BAD_TOP_K, m_topk_zero},
        {"top_k > V", KDL_STATUS_BAD_TOP_K, m_topk_big},
        {"scale inf", KDL_STATUS_BAD_SCALE, m_scale_inf},
        {"divergence enum", KDL_STATUS_BAD_ENUM, m_div_enum},
        {"head rule enum", KDL_STATUS_BAD_ENUM, m_rule_enum},
        {"reduction enum", KDL_STATUS_BAD_ENUM, m_red_enum},
        {"dtype enum", KDL_STATUS_BAD_ENUM, m_dtype_enum},
        {"grad dtype", KDL_STATUS_NOT_SUPPORTED, m_grad_dtype},
        {"out dtype", KDL_STATUS_NOT_SUPPORTED, m_out_dtype},
        {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, m_desc_size},
        {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, m_args_size},
        {"size overflow", KDL_STATUS_SIZE_OVERFLOW, m_overflow},
        {"misaligned student", KDL_STATUS_MISALIGNED, m_misaligned_student},
        {"misaligned loss", KDL_STATUS_MISALIGNED, m_misaligned_loss},
    };
    enum { N = 2, V = 6 };
    double S[N * V], T[N * V];
    random_pair(100, 101, S, T, N * V, 1.0);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        double loss[N] = {-42, -42}, grad[N * V], fkl[N] = {-42, -42};
        int64_t info = -42;
        for (int j = 0; j < N * V; j++) grad[j] = -42;
        kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_NONE);
        kdl_loss_args_t a = f64_args(N, V, V, S, T, grad, loss);
        a.stat_fkl = fkl;
        a.info = &info;
        cases[c].mutate(&d, &a);
        kdl_status_t st = kdl_ref_loss_forward_backward(&d, &a);
        cr_expect_eq(st, cases[c].want, "%s: got %s (%s)", cases[c].name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(strlen(kdl_get_last_error()) > 0, "%s: no detail", cases[c].name);
        cr_expect(loss[0] == -42 && loss[1] == -42 && fkl[0] == -42 && info == -42, "%s wrote output", cases[c].name);
        for (int j = 0; j < N * V; j++) cr_expect_eq(grad[j], -42, "%s wrote grad", cases[c].name);
    }
    cr_expect_eq(kdl_ref_loss_forward_backward(NULL, NULL), KDL_STATUS_NULL_POINTER);
}
