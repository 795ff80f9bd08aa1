/*
 * tests/test_sparse_ref.c - the float64 reference of the sparse-teacher loss
 * (kdloss_ext.h part 1) against independent answers: the dense reference
 * when the support is the whole vocabulary (both modes, every divergence the
 * mode defines), closed forms by hand, central finite differences of the
 * loss with k < V (tokens outside the support included), and the policy on
 * bad indices, bad log-probs and bad arguments.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdl_ext_fixtures.h"
#include "kdl_test.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"

#define MAXN 6
#define MAXV 64


typedef struct srun {
    double loss[MAXN];
    double grad[MAXN * MAXV];
    int64_t info, valid, bad_index;
    kdl_status_t status;
} srun_t;

static kdl_sparse_args_t sargs(kdl_sparse_mode_t mode, const double *S, const int64_t *idx, const double *lt,
                               const int64_t *labels, int64_t N, int64_t V, int64_t k, srun_t *r)
{
    kdl_sparse_args_t a = kdl_ext_sparse_args(mode, N, V, k, S, idx, lt, r->grad, r->loss);
    a.labels = labels;
    a.info = &r->info;
    a.valid_rows = &r->valid;
    a.bad_index_rows = &r->bad_index;
    return a;
}

static void run_sparse(const kdl_loss_desc_t *d, kdl_sparse_mode_t mode, const double *S, const int64_t *idx,
                       const double *lt, const int64_t *labels, int64_t N, int64_t V, int64_t k, srun_t *r)
{
    memset(r, 0, sizeof *r);
    kdl_sparse_args_t a = sargs(mode, S, idx, lt, labels, N, V, k, r);
    r->status = kdl_ref_sparse_loss(d, &a);
}

static void run_dense(const kdl_loss_desc_t *d, const double *S, const double *T, int64_t N, int64_t V,
                      double *loss, double *grad)
{
    kdl_loss_args_t a = kdl_ext_dense_args(N, V, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, grad, loss);
    kdl_ext_ref_dense(d, &a, "full support");
}

/* A random permutation of [0, V) (Fisher-Yates). */
static void permutation(uint64_t seed, int64_t *p, int64_t V)
{
    kdl_rng_t g = {seed};
    for (int64_t v = 0; v < V; v++) p[v] = v;
    for (int64_t v = V - 1; v > 0; v--) {
        int64_t j = (int64_t)(kdl_rng_next(&g) % (uint64_t)(v + 1));
        int64_t t = p[v];
        p[v] = p[j];
        p[j] = t;
    }
}

/* Full support: row i's indices are a permutation, log-probs the teacher's
 * full log-softmax at tau, so both modes must reproduce the dense loss. */
static void full_support(const double *T, int64_t N, int64_t V, double tau, uint64_t seed, int64_t *idx,
                         double *lt)
{
    double lp[MAXV];
    for (int64_t i = 0; i < N; i++) {
        kdl_ext_log_softmax(T + i * V, V, tau, lp);
        permutation(seed + (uint64_t)i, idx + i * V, V);
        for (int64_t j = 0; j < V; j++) lt[i * V + j] = lp[idx[i * V + j]];
    }
}

/* ---------------------------------------------- equality with the dense loss */

static void check_full_support(kdl_sparse_mode_t mode, kdl_divergence_t div, kdl_head_rule_t rule, double tau,
                               kdl_reduction_t red, uint64_t seed)
{
    enum { N = 4, V = 37 };
    double S[N * V], T[N * V], lt[N * V];
    int64_t idx[N * V];
    kdl_random_rows(seed, S, N * V, 2.0);
    kdl_random_rows(seed + 100, T, N * V, 2.0);
    full_support(T, N, V, tau, seed + 200, idx, lt);
    kdl_loss_desc_t d = kdl_test_desc(div, red);
    d.temperature = tau;
    d.head_rule = rule;
    d.top_k = 5;
    d.mu = 0.6;
    d.scale = 1.3;
    double dl[N], dg[N * V];
    run_dense(&d, S, T, N, V, dl, dg);
    srun_t r;
    run_sparse(&d, mode, S, idx, lt, NULL, N, V, V, &r);
    cr_assert_eq(r.status, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    char what[96];
    snprintf(what, sizeof what, "%s %s rule %d tau %g red %d", kdl_sparse_mode_name(mode), kdl_divergence_name(div),
             (int)rule, tau, (int)red);
    kdl_tol_t tol = {1e-12, 1e-14};
    KDL_EXPECT_CLOSE(what, r.loss, dl, red == KDL_REDUCTION_NONE ? N : 1, tol);
    KDL_EXPECT_CLOSE(what, r.grad, dg, N * V, tol);
    cr_expect_eq(r.valid, N);
    cr_expect_eq(r.info, 0);
}

Test(full_support, renormalised_equals_dense_for_each_defined_divergence)
{
    const double taus[] = {1.0, 2.0};
    const kdl_reduction_t reds[] = {KDL_REDUCTION_MEAN, KDL_REDUCTION_NONE};
    int n = 0;
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        if (!kdl_sparse_supports(KDL_SPARSE_RENORMALISED, kdl_all_divs[k])) continue;
        n++;
        for (int ti = 0; ti < 2; ti++)
            for (int ri = 0; ri < 2; ri++)
                check_full_support(KDL_SPARSE_RENORMALISED, kdl_all_divs[k], KDL_HEAD_REFERENCE, taus[ti], reds[ri],
                                   10 + 7 * k + 3 * ti + ri);
    }
    cr_expect_eq(n, 5, "renormalised defines FKL, JSD, TVD, SKL, SRKL");
}

Test(full_support, tail_bucket_equals_dense_for_every_divergence)
{
    const double taus[] = {1.0, 0.5};
    for (size_t k = 0; k < KDL_NDIVS; k++)
        for (int ti = 0; ti < 2; ti++)
            check_full_support(KDL_SPARSE_TAIL_BUCKET, kdl_all_divs[k], KDL_HEAD_REFERENCE, taus[ti], KDL_REDUCTION_SUM,
                               300 + 5 * k + ti);
}

Test(full_support, tail_bucket_akl_each_head_rule_equals_dense)
{
    for (int rule = 0; rule < KDL_HEAD_COUNT_; rule++)
        check_full_support(KDL_SPARSE_TAIL_BUCKET, KDL_DIV_AKL, (kdl_head_rule_t)rule, 1.0, KDL_REDUCTION_MEAN,
                           400 + rule);
}

Test(full_support, tied_teacher_akl_head_by_vocabulary_index)
{
    /* uniform teacher over 8 tokens, support listed in reverse order: the
     * head must be chosen by vocabulary index, not by position. */
    enum { V = 8 };
    double S[V], T[V], lt[V];
    int64_t idx[V];
    kdl_random_rows(5, S, V, 1.0);
    for (int v = 0; v < V; v++) T[v] = 0.25;
    double lp[V];
    kdl_ext_log_softmax(T, V, 1.0, lp);
    for (int j = 0; j < V; j++) {
        idx[j] = V - 1 - j;
        lt[j] = lp[idx[j]];
    }
    for (int rule = 0; rule < KDL_HEAD_COUNT_; rule++) {
        kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
        d.head_rule = (kdl_head_rule_t)rule;
        d.mu = 0.3;
        d.top_k = 3;
        double dl[1], dg[V];
        run_dense(&d, S, T, 1, V, dl, dg);
        srun_t r;
        run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, NULL, 1, V, V, &r);
        cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
        kdl_tol_t tol = {1e-12, 1e-14};
        KDL_EXPECT_CLOSE("tied loss", r.loss, dl, 1, tol);
        KDL_EXPECT_CLOSE("tied grad", r.grad, dg, V, tol);
    }
}

/* ------------------------------------------------------------ by hand */

Test(closed_form, fkl_both_modes_by_hand)
{
    /* V = 4, student uniform (q = 1/4), support {2, 0} with p = (.5, .25). */
    const double S[4] = {0, 0, 0, 0};
    const int64_t idx[2] = {2, 0};
    const double lt[2] = {log(0.5), log(0.25)};
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    srun_t r;
    /* renormalised: p^ = (2/3 on token 2, 1/3 on token 0);
     * FKL = 2/3 log(8/3) + 1/3 log(4/3); grad = q - p^ */
    run_sparse(&d, KDL_SPARSE_RENORMALISED, S, idx, lt, NULL, 1, 4, 2, &r);
    cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
    double want = 2.0 / 3 * log(8.0 / 3) + 1.0 / 3 * log(4.0 / 3);
    cr_expect(fabs(r.loss[0] - want) < 1e-15, "got %.17g want %.17g", r.loss[0], want);
    const double g_ren[4] = {0.25 - 1.0 / 3, 0.25, 0.25 - 2.0 / 3, 0.25};
    kdl_tol_t tol = {1e-14, 1e-15};
    KDL_EXPECT_CLOSE("renormalised grad", r.grad, g_ren, 4, tol);
    /* tail: cells (token 2: p .5, q .25), (token 0: .25, .25), bucket (.25, .5);
     * FKL = .5 log 2 + 0 + .25 log(.5); dz_v = q_v (g_c - sum q g) with
     * g = -p/q per cell: sum q g = -1; token 2: .25(-2 + 1) = -.25; token 0: 0;
     * tokens 1, 3 share the bucket: .25 (-.5 + 1) = .125 */
    run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, NULL, 1, 4, 2, &r);
    cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
    want = 0.5 * log(2.0) + 0.25 * log(0.5);
    cr_expect(fabs(r.loss[0] - want) < 1e-15, "got %.17g want %.17g", r.loss[0], want);
    const double g_tail[4] = {0, 0.125, -0.25, 0.125};
    KDL_EXPECT_CLOSE("tail grad", r.grad, g_tail, 4, tol);
}

Test(closed_form, tail_rkl_and_tvd_by_hand)
{
    /* same row: cells p = (.5, .25, .25), q = (.25, .25, .5) */
    const double S[4] = {0, 0, 0, 0};
    const int64_t idx[2] = {2, 0};
    const double lt[2] = {log(0.5), log(0.25)};
    srun_t r;
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_RKL, KDL_REDUCTION_SUM);
    run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, NULL, 1, 4, 2, &r);
    double want = 0.25 * log(0.5) + 0 + 0.5 * log(2.0);
    cr_expect(fabs(r.loss[0] - want) < 1e-15, "rkl got %.17g want %.17g", r.loss[0], want);
    d.divergence = KDL_DIV_TVD;
    run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, NULL, 1, 4, 2, &r);
    cr_expect(fabs(r.loss[0] - 0.25) < 1e-15, "tvd got %.17g", r.loss[0]);
    /* renormalised TVD: 1/2 (|2/3 - 1/4| + |1/3 - 1/4| + 1/4 + 1/4) = 1/2 (5/12 + 1/12 + 1/2) = 1/2 */
    run_sparse(&d, KDL_SPARSE_RENORMALISED, S, idx, lt, NULL, 1, 4, 2, &r);
    cr_expect(fabs(r.loss[0] - 0.5) < 1e-15, "renormalised tvd got %.17g", r.loss[0]);
}

Test(closed_form, teacher_at_student_gives_zero)
{
    /* TAIL with the student's own top-k log-probs: every divergence is 0 and
     * so is the gradient (the bucket matches too). */
    enum { V = 20, K = 6 };
    double S[V], lq[V], lt[K];
    int64_t idx[K], perm[V];
    kdl_random_rows(9, S, V, 2.0);
    kdl_ext_log_softmax(S, V, 1.0, lq);
    permutation(10, perm, V);
    for (int j = 0; j < K; j++) {
        idx[j] = perm[j];
        lt[j] = lq[idx[j]];
    }
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_SUM);
        srun_t r;
        run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, NULL, 1, V, K, &r);
        cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
        cr_expect(fabs(r.loss[0]) < 1e-14, "%s loss %g", kdl_divergence_name(kdl_all_divs[k]), r.loss[0]);
        if (kdl_all_divs[k] == KDL_DIV_TVD) continue; /* |p - q| has a kink at p = q */
        for (int v = 0; v < V; v++)
            cr_expect(fabs(r.grad[v]) < 1e-14, "%s grad[%d] %g", kdl_divergence_name(kdl_all_divs[k]), v, r.grad[v]);
    }
}

/* ----------------------------------------------------- finite differences */

/* Sum-reduced loss of one row. */
static double sloss(const kdl_loss_desc_t *d0, kdl_sparse_mode_t mode, const double *s, const int64_t *idx,
                    const double *lt, int64_t V, int64_t k)
{
    kdl_loss_desc_t d = *d0;
    d.reduction = KDL_REDUCTION_SUM;
    srun_t r;
    run_sparse(&d, mode, s, idx, lt, NULL, 1, V, k, &r);
    cr_assert_eq(r.status, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    return r.loss[0];
}

/* A random support of size k with log-probs of a random teacher's top
 * tokens (mass < 1, so the bucket is non-empty). */
static void random_support(uint64_t seed, int64_t V, int64_t k, double tau, int64_t *idx, double *lt)
{
    double T[MAXV], lp[MAXV];
    int64_t perm[MAXV];
    kdl_random_rows(seed, T, V, 2.0);
    kdl_ext_log_softmax(T, V, tau, lp);
    permutation(seed + 1, perm, V);
    for (int64_t j = 0; j < k; j++) {
        idx[j] = perm[j];
        lt[j] = lp[perm[j]];
    }
}

/* One random student row [V] (sigma) from seed and a random support [K]
 * from seed + 1. */
static void random_row(uint64_t seed, int64_t V, int64_t K, double sigma, double *S, int64_t *idx, double *lt)
{
    kdl_random_rows(seed, S, V, sigma);
    random_support(seed + 1, V, K, 1.0, idx, lt);
}

/* N random student rows [N, V] (sigma 1) and random supports [N, K]: rows
 * from seed, row i's support from seed + 10 + i. */
static void random_batch(uint64_t seed, int64_t N, int64_t V, int64_t K, double *S, int64_t *idx, double *lt)
{
    kdl_random_rows(seed, S, N * V, 1.0);
    for (int64_t i = 0; i < N; i++) random_support(seed + 10 + (uint64_t)i, V, K, 1.0, idx + i * K, lt + i * K);
}

static void check_fd(kdl_sparse_mode_t mode, kdl_divergence_t div, double tau, kdl_reduction_t red, uint64_t seed)
{
    enum { V = 23, K = 7 };
    double s[V], lt[K];
    int64_t idx[K];
    kdl_random_rows(seed, s, V, 1.5);
    random_support(seed + 50, V, K, tau, idx, lt);
    kdl_loss_desc_t d = kdl_test_desc(div, red);
    d.temperature = tau;
    d.scale = 0.8;
    srun_t base;
    run_sparse(&d, mode, s, idx, lt, NULL, 1, V, K, &base);
    cr_assert_eq(base.status, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    double fd[V];
    const double h = 1e-5;
    for (int j = 0; j < V; j++) {
        double sv = s[j];
        s[j] = sv + h;
        double up = sloss(&d, mode, s, idx, lt, V, K);
        s[j] = sv - h;
        double dn = sloss(&d, mode, s, idx, lt, V, K);
        s[j] = sv;
        fd[j] = (up - dn) / (2 * h);
    }
    char what[64];
    snprintf(what, sizeof what, "%s %s tau %g", kdl_sparse_mode_name(mode), kdl_divergence_name(div), tau);
    kdl_tol_t tol = {1e-6, 1e-8};
    KDL_EXPECT_CLOSE(what, base.grad, fd, V, tol);
    /* tokens outside the support get gradient too */
    int off_nonzero = 0;
    for (int v = 0; v < V; v++) {
        int in = 0;
        for (int j = 0; j < K; j++) in |= idx[j] == v;
        if (!in && base.grad[v] != 0) off_nonzero++;
    }
    cr_expect(off_nonzero > 0, "%s: no gradient outside the support", what);
}

Test(finite_difference, every_defined_divergence_both_modes)
{
    const double taus[] = {1.0, 1.7};
    for (int m = 0; m < KDL_SPARSE_MODE_COUNT_; m++)
        for (size_t k = 0; k < KDL_NDIVS; k++) {
            if (kdl_all_divs[k] == KDL_DIV_AKL) continue; /* weights frozen: below */
            if (!kdl_sparse_supports((kdl_sparse_mode_t)m, kdl_all_divs[k])) continue;
            for (int ti = 0; ti < 2; ti++)
                check_fd((kdl_sparse_mode_t)m, kdl_all_divs[k], taus[ti], KDL_REDUCTION_SUM, 500 + 13 * m + 3 * k + ti);
        }
}

/* AKL: the weights are constants for the gradient; the test computes them
 * itself (head by sorting the support, gaps from its own softmax) and
 * differentiates w_h FKL + w_t RKL with them frozen. */
Test(finite_difference, tail_akl_with_frozen_weights_each_rule)
{
    enum { V = 19, K = 8 };
    for (int rule = 0; rule < KDL_HEAD_COUNT_; rule++) {
        double s[V], lt[K], lq[V];
        int64_t idx[K];
        kdl_random_rows(600 + rule, s, V, 1.5);
        random_support(650 + rule, V, K, 1.0, idx, lt);
        kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
        d.head_rule = (kdl_head_rule_t)rule;
        d.top_k = 3;
        d.mu = 0.4;
        /* the head, independently: support positions by lt descending */
        int ord[K];
        for (int j = 0; j < K; j++) ord[j] = j;
        for (int a = 0; a < K; a++)
            for (int b = a + 1; b < K; b++)
                if (lt[ord[b]] > lt[ord[a]] || (lt[ord[b]] == lt[ord[a]] && idx[ord[b]] < idx[ord[a]])) {
                    int t = ord[a];
                    ord[a] = ord[b];
                    ord[b] = t;
                }
        int h = 0;
        double c = 0;
        if (rule == KDL_HEAD_TOPK)
            h = 3;
        else {
            for (int r = 0; r < K; r++) {
                double prev = c;
                c += exp(lt[ord[r]]);
                if (rule == KDL_HEAD_REFERENCE ? c <= d.mu : prev < d.mu)
                    h = r + 1;
                else
                    break;
            }
            if (h < 1) h = 1;
        }
        kdl_ext_log_softmax(s, V, 1.0, lq);
        double gh = 0, gt = 0, pin = 0, qin = 0;
        for (int r = 0; r < K; r++) {
            double p = exp(lt[ord[r]]), q = exp(lq[idx[ord[r]]]);
            pin += p;
            qin += q;
            if (r < h)
                gh += fabs(p - q);
            else
                gt += fabs(p - q);
        }
        gt += fabs((1 - pin) - (1 - qin));
        double wh = gh / (gh + gt), wt = gt / (gh + gt);
        srun_t base;
        run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, s, idx, lt, NULL, 1, V, K, &base);
        cr_assert_eq(base.status, KDL_STATUS_SUCCESS);
        kdl_loss_desc_t df = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM), dr = kdl_test_desc(KDL_DIV_RKL, KDL_REDUCTION_SUM);
        double fkl = sloss(&df, KDL_SPARSE_TAIL_BUCKET, s, idx, lt, V, K);
        double rkl = sloss(&dr, KDL_SPARSE_TAIL_BUCKET, s, idx, lt, V, K);
        cr_expect(fabs(base.loss[0] - (wh * fkl + wt * rkl)) < 1e-13, "rule %d loss %.17g want %.17g", rule,
                  base.loss[0], wh * fkl + wt * rkl);
        double fd[V];
        for (int j = 0; j < V; j++) {
            double sv = s[j];
            s[j] = sv + 1e-5;
            double up = wh * sloss(&df, KDL_SPARSE_TAIL_BUCKET, s, idx, lt, V, K) +
                        wt * sloss(&dr, KDL_SPARSE_TAIL_BUCKET, s, idx, lt, V, K);
            s[j] = sv - 1e-5;
            double dn = wh * sloss(&df, KDL_SPARSE_TAIL_BUCKET, s, idx, lt, V, K) +
                        wt * sloss(&dr, KDL_SPARSE_TAIL_BUCKET, s, idx, lt, V, K);
            s[j] = sv;
            fd[j] = (up - dn) / 2e-5;
        }
        kdl_tol_t tol = {1e-6, 1e-8};
        KDL_EXPECT_CLOSE(kdl_head_rule_name((kdl_head_rule_t)rule), base.grad, fd, V, tol);
    }
}

Test(finite_difference, mean_reduction_divides_by_valid_rows)
{
    enum { N = 3, V = 11, K = 4 };
    double S[N * V], lt[N * K];
    int64_t idx[N * K];
    const int64_t labels[N] = {1, -100, 2};
    random_batch(700, N, V, K, S, idx, lt);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_JSD, KDL_REDUCTION_MEAN);
    srun_t mean, sum;
    run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, labels, N, V, K, &mean);
    d.reduction = KDL_REDUCTION_SUM;
    run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, labels, N, V, K, &sum);
    cr_assert_eq(mean.status, KDL_STATUS_SUCCESS);
    cr_expect_eq(mean.valid, 2);
    cr_expect(fabs(mean.loss[0] - sum.loss[0] / 2) < 1e-15);
    for (int v = 0; v < N * V; v++) cr_expect(fabs(mean.grad[v] - sum.grad[v] / 2) < 1e-16);
    for (int v = V; v < 2 * V; v++) cr_expect(mean.grad[v] == 0.0, "ignored row has zero gradient");
}

/* --------------------------------------------------------- bad data, rows */

Test(bad_data, out_of_range_and_repeated_indices_make_invalid_rows)
{
    enum { N = 4, V = 10, K = 3 };
    double S[N * V], lt[N * K];
    int64_t idx[N * K];
    random_batch(800, N, V, K, S, idx, lt);
    idx[1 * K + 2] = V;      /* out of range */
    idx[2 * K + 1] = idx[2 * K + 0]; /* repeated */
    idx[3 * K + 0] = -1;     /* negative */
    for (int m = 0; m < KDL_SPARSE_MODE_COUNT_; m++) {
        kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_NONE);
        srun_t r;
        for (int v = 0; v < N * V; v++) r.grad[v] = 7;
        run_sparse(&d, (kdl_sparse_mode_t)m, S, idx, lt, NULL, N, V, K, &r);
        cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
        cr_expect_eq(r.info, 3);
        cr_expect_eq(r.bad_index, 3);
        cr_expect_eq(r.valid, 1);
        cr_expect(isfinite(r.loss[0]) && isnan(r.loss[1]) && isnan(r.loss[2]) && isnan(r.loss[3]));
        for (int v = V; v < N * V; v++) cr_expect(r.grad[v] == 0.0);
    }
    kdl_status_t st = kdl_sparse_check_indices(N, V, K, idx, K);
    cr_expect_eq(st, KDL_STATUS_BAD_PARAM);
    cr_expect(strstr(kdl_get_last_error(), "row 1") != NULL, "detail: %s", kdl_get_last_error());
    cr_expect_eq(kdl_sparse_check_indices(1, V, K, idx, K), KDL_STATUS_SUCCESS);
    cr_expect_eq(kdl_sparse_check_indices(3, V, K, idx + K, K), KDL_STATUS_BAD_PARAM);
}

Test(bad_data, positive_or_nan_logprobs_and_excess_mass)
{
    enum { N = 5, V = 10, K = 3 };
    double S[N * V], lt[N * K];
    int64_t idx[N * K];
    random_batch(900, N, V, K, S, idx, lt);
    lt[1 * K + 0] = 0.01;           /* > 0 */
    lt[2 * K + 1] = NAN;
    lt[3 * K + 0] = log(0.6);       /* mass 1.2: invalid in TAIL only */
    lt[3 * K + 1] = log(0.6);
    lt[3 * K + 2] = log(1e-9);
    lt[4 * K + 0] = lt[4 * K + 1] = lt[4 * K + 2] = -INFINITY; /* no mass: invalid in RENORMALISED only */
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_NONE);
    srun_t r;
    run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, NULL, N, V, K, &r);
    cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
    cr_expect_eq(r.info, 3);
    cr_expect_eq(r.bad_index, 0);
    cr_expect(isnan(r.loss[1]) && isnan(r.loss[2]) && isnan(r.loss[3]) && isfinite(r.loss[4]));
    run_sparse(&d, KDL_SPARSE_RENORMALISED, S, idx, lt, NULL, N, V, K, &r);
    cr_expect_eq(r.info, 3);
    cr_expect(isnan(r.loss[1]) && isnan(r.loss[2]) && isfinite(r.loss[3]) && isnan(r.loss[4]));
}

Test(bad_data, student_nan_inf_and_all_masked)
{
    enum { N = 3, V = 6, K = 2 };
    double S[N * V], lt[N * K];
    int64_t idx[N * K];
    random_batch(950, N, V, K, S, idx, lt);
    S[0 * V + 3] = NAN;
    S[1 * V + 1] = INFINITY;
    for (int v = 0; v < V; v++) S[2 * V + v] = -INFINITY;
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_MEAN);
    srun_t r;
    run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, NULL, N, V, K, &r);
    cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
    cr_expect_eq(r.info, 3);
    cr_expect_eq(r.valid, 0);
    cr_expect(r.loss[0] == 0.0, "mean over no valid rows is 0, got %g", r.loss[0]);
}

Test(bad_data, masked_student_outside_support_is_honest)
{
    /* student -inf on every token outside the support: the student's bucket
     * is empty; a teacher tail mass > 0 makes FKL +inf (never NaN), JSD and
     * TVD stay finite. */
    enum { V = 5, K = 2 };
    const double S[V] = {0.5, -INFINITY, 1.0, -INFINITY, -INFINITY};
    const int64_t idx[K] = {0, 2};
    const double lt[K] = {log(0.5), log(0.3)};
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    srun_t r;
    run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, NULL, 1, V, K, &r);
    cr_expect(r.loss[0] == INFINITY, "fkl %g", r.loss[0]);
    d.divergence = KDL_DIV_JSD;
    run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, NULL, 1, V, K, &r);
    cr_expect(isfinite(r.loss[0]) && r.loss[0] > 0);
    for (int v = 0; v < V; v++) cr_expect(isfinite(r.grad[v]), "jsd grad %d", v);
    cr_expect(r.grad[1] == 0.0 && r.grad[3] == 0.0, "masked tokens get no gradient");
}

/* ------------------------------------------------------------ bad args */

/* One bad-argument case: the single row of seed 1000 (V 8, K 3), tail
 * bucket mode, fkl with sum; the loss holds a sentinel. */
enum { BAD_V = 8, BAD_K = 3 };
typedef struct bad_case {
    double S[BAD_V], lt[BAD_K];
    int64_t idx[BAD_K];
    kdl_loss_desc_t d;
    kdl_sparse_args_t a;
    srun_t r;
} bad_case_t;

static void bad_setup(bad_case_t *c)
{
    random_row(1000, BAD_V, BAD_K, 1.0, c->S, c->idx, c->lt);
    c->d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    memset(&c->r, 0, sizeof c->r);
    c->r.loss[0] = 42;
    c->a = sargs(KDL_SPARSE_TAIL_BUCKET, c->S, c->idx, c->lt, NULL, 1, BAD_V, BAD_K, &c->r);
}

static kdl_status_t bad_call(bad_case_t *c) { return kdl_ref_sparse_loss(&c->d, &c->a); }

static int bad_untouched(const bad_case_t *c) { return c->r.loss[0] == 42; }

#define BAD(what, expected, mutate) \
    KDL_EXPECT_BAD(bad_case_t, bad_setup, bad_call, bad_untouched, what, expected, mutate)

Test(bad_args, each_returns_its_status_and_writes_nothing)
{
    enum { V = BAD_V, K = BAD_K };
    BAD("k = 0", KDL_STATUS_BAD_TOP_K, c->a.k = 0);
    BAD("k = V + 1", KDL_STATUS_BAD_TOP_K, c->a.k = V + 1);
    BAD("k = 1025, vocab = 4096, ld_student = 4096", KDL_STATUS_BAD_TOP_K,
        c->a.k = 1025; c->a.vocab = 4096; c->a.ld_student = 4096);
    BAD("ld_indices = K - 1", KDL_STATUS_BAD_STRIDE, c->a.ld_indices = K - 1);
    BAD("ld_logprobs = K - 1", KDL_STATUS_BAD_STRIDE, c->a.ld_logprobs = K - 1);
    BAD("ld_student = V - 1", KDL_STATUS_BAD_STRIDE, c->a.ld_student = V - 1);
    BAD("ld_grad = V - 1", KDL_STATUS_BAD_STRIDE, c->a.ld_grad = V - 1);
    BAD("rows = -1", KDL_STATUS_BAD_SIZE, c->a.rows = -1);
    BAD("vocab = 0", KDL_STATUS_BAD_SIZE, c->a.vocab = 0);
    BAD("teacher_indices = NULL", KDL_STATUS_NULL_POINTER, c->a.teacher_indices = NULL);
    BAD("teacher_logprobs = NULL", KDL_STATUS_NULL_POINTER, c->a.teacher_logprobs = NULL);
    BAD("student = NULL", KDL_STATUS_NULL_POINTER, c->a.student = NULL);
    BAD("loss = NULL", KDL_STATUS_NULL_POINTER, c->a.loss = NULL);
    BAD("mode = (kdl_sparse_mode_t)7", KDL_STATUS_BAD_ENUM, c->a.mode = (kdl_sparse_mode_t)7);
    BAD("struct_size = 3", KDL_STATUS_BAD_STRUCT_SIZE, c->a.struct_size = 3);
    BAD("temperature = 0", KDL_STATUS_BAD_TEMPERATURE, c->d.temperature = 0);
    BAD("beta = 1", KDL_STATUS_BAD_BETA, c->d.beta = 1);
    BAD("divergence = (kdl_divergence_t)99", KDL_STATUS_BAD_ENUM, c->d.divergence = (kdl_divergence_t)99);
    BAD("mode = KDL_SPARSE_RENORMALISED, divergence = KDL_DIV_RKL", KDL_STATUS_NOT_SUPPORTED,
        c->a.mode = KDL_SPARSE_RENORMALISED; c->d.divergence = KDL_DIV_RKL);
    BAD("mode = KDL_SPARSE_RENORMALISED, divergence = KDL_DIV_AKL", KDL_STATUS_NOT_SUPPORTED,
        c->a.mode = KDL_SPARSE_RENORMALISED; c->d.divergence = KDL_DIV_AKL);
    BAD("mode = KDL_SPARSE_RENORMALISED, divergence = KDL_DIV_FKL_RKL", KDL_STATUS_NOT_SUPPORTED,
        c->a.mode = KDL_SPARSE_RENORMALISED; c->d.divergence = KDL_DIV_FKL_RKL);
    BAD("divergence = KDL_DIV_AKL, head_rule = KDL_HEAD_TOPK, top_k = K + 1", KDL_STATUS_BAD_TOP_K,
        c->d.divergence = KDL_DIV_AKL; c->d.head_rule = KDL_HEAD_TOPK; c->d.top_k = K + 1);
    BAD("grad_dtype = KDL_DTYPE_BF16", KDL_STATUS_NOT_SUPPORTED, c->a.grad_dtype = KDL_DTYPE_BF16);
    cr_expect_eq(kdl_ref_sparse_loss(NULL, NULL), KDL_STATUS_NULL_POINTER);
}
#undef BAD

Test(bad_args, empty_batch_and_names)
{
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_MEAN);
    srun_t r;
    memset(&r, 0, sizeof r);
    r.loss[0] = 5;
    kdl_sparse_args_t a = sargs(KDL_SPARSE_RENORMALISED, NULL, NULL, NULL, NULL, 0, 10, 2, &r);
    cr_expect_eq(kdl_ref_sparse_loss(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect(r.loss[0] == 0.0 && r.valid == 0 && r.info == 0);
    cr_expect_str_eq(kdl_sparse_mode_name(KDL_SPARSE_TAIL_BUCKET), "tail");
    cr_expect_eq(kdl_sparse_mode_from_name("renormalised"), KDL_SPARSE_RENORMALISED);
    cr_expect_eq(kdl_sparse_mode_from_name("bogus"), -1);
}

Test(dtypes, f32_logprobs_and_student_convert_exactly)
{
    enum { V = 16, K = 5 };
    double S[V], lt[K];
    int64_t idx[K];
    random_row(1100, V, K, 2.0, S, idx, lt);
    float Sf[V], ltf[K];
    double S2[V], lt2[K];
    kdl_to_dtype(S, Sf, KDL_DTYPE_F32, V);
    kdl_to_dtype(lt, ltf, KDL_DTYPE_F32, K);
    kdl_from_dtype(Sf, S2, KDL_DTYPE_F32, V);
    kdl_from_dtype(ltf, lt2, KDL_DTYPE_F32, K);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_JSD, KDL_REDUCTION_SUM);
    srun_t want, got;
    run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S2, idx, lt2, NULL, 1, V, K, &want);
    memset(&got, 0, sizeof got);
    kdl_sparse_args_t a = sargs(KDL_SPARSE_TAIL_BUCKET, NULL, idx, NULL, NULL, 1, V, K, &got);
    a.student = Sf;
    a.student_dtype = KDL_DTYPE_F32;
    a.teacher_logprobs = ltf;
    a.teacher_dtype = KDL_DTYPE_F32;
    cr_assert_eq(kdl_ref_sparse_loss(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect(got.loss[0] == want.loss[0]);
    for (int v = 0; v < V; v++) cr_expect(got.grad[v] == want.grad[v]);
}

/* TAIL_BUCKET with k = V (docs/extensions.md, "Validation and invalid
 * rows"): no token is off the support, so a residual teacher mass 1 - sum p
 * has no cell to go to.  Beyond KDL_SPARSE_MASS_TOL the row is invalid (the
 * mirror of the mass > 1 + tol rule); within it the bucket is 0 and the loss
 * is the sum over the k cells.  Before this rule the 0.998 row was valid
 * with a negative FKL.  RENORMALISED is unaffected (it renormalises), and
 * with k < V the same masses go to the bucket. */
Test(bad_data, tail_bucket_full_support_missing_mass)
{
    enum { N = 5, V = 12 };
    double S[N * V], T[N * V], lt[N * V];
    int64_t idx[N * V];
    kdl_random_rows(1200, S, N * V, 2.0);
    kdl_random_rows(1300, T, N * V, 2.0);
    full_support(T, N, V, 1.0, 1400, idx, lt);
    const double shift[N] = {0, log1p(-2e-3), log1p(-5e-4), 0, log1p(-0.5)};
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < V; j++) lt[i * V + j] += shift[i];
    for (int64_t j = 0; j < V; j++) lt[3 * V + j] = -INFINITY; /* no mass at all */
    const int valid[N] = {1, 0, 1, 0, 0};
    for (int red = 0; red < KDL_REDUCTION_COUNT_; red++) {
        kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, (kdl_reduction_t)red);
        srun_t r;
        run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx, lt, NULL, N, V, V, &r);
        cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
        cr_expect_eq(r.info, 3, "red %d: info %lld", red, (long long)r.info);
        cr_expect_eq(r.valid, 2);
        /* the valid rows' FKL over the V cells by hand: sum_j p_j (lt_j - lq_j) */
        double want[N], total = 0;
        for (int64_t i = 0; i < N; i++) {
            double lq[MAXV], l = 0;
            kdl_ext_log_softmax(S + i * V, V, 1.0, lq);
            for (int64_t j = 0; j < V; j++) l += exp(lt[i * V + j]) * (lt[i * V + j] - lq[idx[i * V + j]]);
            want[i] = valid[i] ? l : NAN;
            if (valid[i]) total += l;
        }
        cr_expect(want[2] > 0, "row 2 (mass 0.9995): FKL %g", want[2]);
        if (red == KDL_REDUCTION_NONE) {
            for (int64_t i = 0; i < N; i++)
                if (valid[i])
                    cr_expect(fabs(r.loss[i] - want[i]) <= 1e-12 * fabs(want[i]), "row %lld: %.17g, by hand %.17g",
                              (long long)i, r.loss[i], want[i]);
                else
                    cr_expect(isnan(r.loss[i]), "row %lld invalid: loss %g", (long long)i, r.loss[i]);
        } else {
            double w = red == KDL_REDUCTION_MEAN ? total / 2 : total;
            cr_expect(fabs(r.loss[0] - w) <= 1e-12 * fabs(w), "red %d: %.17g, by hand %.17g", red, r.loss[0], w);
        }
        for (int64_t i = 0; i < N; i++)
            if (!valid[i])
                for (int64_t v = 0; v < V; v++) cr_expect(r.grad[i * V + v] == 0.0, "row %lld grad", (long long)i);
    }
    /* RENORMALISED: every row but the massless one is valid */
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_NONE);
    srun_t r;
    run_sparse(&d, KDL_SPARSE_RENORMALISED, S, idx, lt, NULL, N, V, V, &r);
    cr_expect_eq(r.info, 1);
    cr_expect(isnan(r.loss[3]) && isfinite(r.loss[1]) && isfinite(r.loss[4]));
    /* k = V - 1 (the first V - 1 columns re-packed): the residual masses go
     * to the bucket, every row valid, FKL >= 0 */
    {
        double lt2[N * (V - 1)];
        int64_t idx2[N * (V - 1)];
        for (int64_t i = 0; i < N; i++)
            for (int64_t j = 0; j < V - 1; j++) {
                lt2[i * (V - 1) + j] = lt[i * V + j];
                idx2[i * (V - 1) + j] = idx[i * V + j];
            }
        run_sparse(&d, KDL_SPARSE_TAIL_BUCKET, S, idx2, lt2, NULL, N, V, V - 1, &r);
        cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
        cr_expect_eq(r.info, 0, "k < V: info %lld", (long long)r.info);
        for (int64_t i = 0; i < N; i++) cr_expect(isfinite(r.loss[i]) && r.loss[i] >= 0, "k < V row %lld: %g",
                                                  (long long)i, r.loss[i]);
    }
}
