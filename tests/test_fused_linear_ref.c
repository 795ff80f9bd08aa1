/*
 * tests/test_fused_linear_ref.c - the fused linear + loss reference
 * (kdloss_ext.h part 3) against independent answers: central finite
 * differences of the loss with respect to every entry of H and W, and the
 * dense reference on logits the test materialises itself (its own matrix
 * products for the logits and for dH, dW).  Version 2 of the args: the
 * upstream per-row gradient (reduction NONE) and the bias against finite
 * differences of sum_i g_i loss_i, 16-bit inputs and gradients, version-1
 * callers, and the statuses of the new arguments.  Version 3 (the teacher
 * as a linear layer): against the same reference given teacher logits the
 * test forms itself, version-2 callers, rows = 0, the chunk rule and the
 * new statuses.  Version 4 (the sparse teacher): against kdl_ref_sparse_loss
 * on logits the test forms itself, with dH, dW, db formed from its dL;
 * version-3 callers, rows = 0 and the new statuses.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ext_internal.h"
#include "kdl_ext_fixtures.h"
#include "kdl_test.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"

#define MAXN 6
#define MAXV 40
#define MAXD 12


typedef struct fres {
    double loss[MAXN];
    double dH[MAXN * MAXD];
    double dW[MAXV * MAXD];
    int64_t info, valid;
    kdl_status_t status;
} fres_t;

static kdl_fused_linear_args_t fargs(const void *H, const void *W, const double *T, const int64_t *labels,
                                     int64_t N, int64_t D, int64_t V, fres_t *r)
{
    kdl_fused_linear_args_t a = kdl_ext_fused_args(N, D, V, H, W, KDL_DTYPE_F64, T, KDL_DTYPE_F64, r->dH, r->dW, r->loss);
    a.labels = labels;
    a.info = &r->info;
    a.valid_rows = &r->valid;
    return a;
}

static void run_fused(const kdl_loss_desc_t *d, const double *H, const double *W, const double *T,
                      const int64_t *labels, int64_t N, int64_t D, int64_t V, fres_t *r)
{
    memset(r, 0, sizeof *r);
    kdl_fused_linear_args_t a = fargs(H, W, T, labels, N, D, V, r);
    r->status = kdl_ref_fused_linear_loss(d, &a);
}

/* H [N, D] (sigma 1), W [V, D] (sigma sw), T [N, V] (sigma st): normal
 * values from seeds seed, seed + 1, seed + 2. */
static void random_hwt(uint64_t seed, int64_t N, int64_t D, int64_t V, double sw, double st, double *H, double *W,
                       double *T)
{
    kdl_ext_random_normal(seed, H, N * D, 1.0);
    kdl_ext_random_normal(seed + 1, W, V * D, sw);
    kdl_ext_random_normal(seed + 2, T, N * V, st);
}

/* One float64 problem for finite differences: logits H W^T (+ b when b is
 * not NULL); with g (reduction NONE) the value is sum_i g_i loss_i. */
typedef struct fprob {
    const kdl_loss_desc_t *d;
    const double *H, *W, *b, *T, *g;
    const int64_t *labels;
    int64_t N, D, V;
} fprob_t;

static double loss_value(const fprob_t *p)
{
    fres_t r;
    memset(&r, 0, sizeof r);
    kdl_fused_linear_args_t a = fargs(p->H, p->W, p->T, p->labels, p->N, p->D, p->V, &r);
    a.bias = p->b;
    a.grad_hidden = a.grad_weight = NULL;
    kdl_ext_ref_fused(p->d, &a, "finite differences");
    if (!p->g) return r.loss[0];
    double s = 0;
    for (int64_t i = 0; i < p->N; i++) s += p->g[i] * r.loss[i];
    return s;
}

/* fd[j] = d loss_value(p) / d x[j], j < n, by central differences (x is
 * one of p's arrays; each entry is restored). */
static void central_diff(const fprob_t *p, double *x, int64_t n, double *fd)
{
    const double h = 1e-5;
    for (int64_t j = 0; j < n; j++) {
        double x0 = x[j];
        x[j] = x0 + h;
        double up = loss_value(p);
        x[j] = x0 - h;
        double dn = loss_value(p);
        x[j] = x0;
        fd[j] = (up - dn) / (2 * h);
    }
}

/* d(loss)/dH and d(loss)/dW by central differences (SUM or MEAN loss). */
static void check_fd(kdl_divergence_t div, kdl_reduction_t red, double tau, uint64_t seed)
{
    enum { N = 3, D = 5, V = 13 };
    double H[N * D], W[V * D], T[N * V];
    random_hwt(seed, N, D, V, 0.7, 2.0, H, W, T);
    const int64_t labels[N] = {1, -100, 4};
    kdl_loss_desc_t d = kdl_test_desc(div, red);
    d.temperature = tau;
    d.scale = 1.25;
    fres_t base;
    run_fused(&d, H, W, T, labels, N, D, V, &base);
    cr_assert_eq(base.status, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect_eq(base.valid, 2);
    double fdH[N * D], fdW[V * D];
    const fprob_t p = {&d, H, W, NULL, T, NULL, labels, N, D, V};
    central_diff(&p, H, N * D, fdH);
    central_diff(&p, W, V * D, fdW);
    char what[64];
    snprintf(what, sizeof what, "%s red %d tau %g", kdl_divergence_name(div), (int)red, tau);
    kdl_tol_t tol = {1e-6, 1e-8};
    KDL_EXPECT_CLOSE(what, base.dH, fdH, N * D, tol);
    KDL_EXPECT_CLOSE(what, base.dW, fdW, V * D, tol);
    for (int k = 0; k < D; k++) cr_expect(base.dH[1 * D + k] == 0.0, "ignored row has zero dH");
}

Test(finite_difference, dH_and_dW_every_divergence)
{
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        if (kdl_all_divs[k] == KDL_DIV_AKL) continue; /* frozen weights: below */
        check_fd(kdl_all_divs[k], KDL_REDUCTION_MEAN, 1.0, 100 + 5 * k);
        check_fd(kdl_all_divs[k], KDL_REDUCTION_SUM, 2.0, 200 + 5 * k);
    }
}

/* AKL: the weights are constants for the gradient.  With one row whose
 * weights the dense reference reports, w_h FKL + w_t RKL is differentiated
 * with them frozen. */
Test(finite_difference, akl_with_frozen_weights)
{
    enum { N = 1, D = 4, V = 11 };
    double H[N * D], W[V * D], T[N * V];
    random_hwt(300, N, D, V, 0.8, 2.0, H, W, T);
    double L[V];
    kdl_ext_logits(N, D, V, H, W, NULL, L);
    double wh, wt, dl;
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
    kdl_loss_args_t la = kdl_ext_dense_args(N, V, L, KDL_DTYPE_F64, T, KDL_DTYPE_F64, NULL, &dl);
    la.stat_w_head = &wh;
    la.stat_w_tail = &wt;
    kdl_ext_ref_dense(&d, &la, "akl weights");
    fres_t base;
    run_fused(&d, H, W, T, NULL, N, D, V, &base);
    cr_assert_eq(base.status, KDL_STATUS_SUCCESS);
    kdl_loss_desc_t df = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM), dr = kdl_test_desc(KDL_DIV_RKL, KDL_REDUCTION_SUM);
    /* w_h d FKL + w_t d RKL, each by central differences */
    double fdH[D], fdW[V * D], fH[2][D], fW[2][V * D];
    for (int t = 0; t < 2; t++) {
        const fprob_t p = {t ? &dr : &df, H, W, NULL, T, NULL, NULL, N, D, V};
        central_diff(&p, H, D, fH[t]);
        central_diff(&p, W, V * D, fW[t]);
    }
    for (int j = 0; j < D; j++) fdH[j] = wh * fH[0][j] + wt * fH[1][j];
    for (int j = 0; j < V * D; j++) fdW[j] = wh * fW[0][j] + wt * fW[1][j];
    kdl_tol_t tol = {1e-6, 1e-8};
    KDL_EXPECT_CLOSE("akl dH", base.dH, fdH, D, tol);
    KDL_EXPECT_CLOSE("akl dW", base.dW, fdW, V * D, tol);
}

/* The dense reference on logits materialised by the test; dH = dL W and
 * dW = dL^T H by the test's own loops. */
Test(dense, equals_dense_on_materialised_logits)
{
    enum { N = 5, D = 7, V = 33 };
    double H[N * D], W[V * D], T[N * V], L[N * V], dL[N * V];
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        kdl_ext_random_normal(400 + k, H, N * D, 1.0);
        kdl_ext_random_normal(500 + k, W, V * D, 0.9);
        kdl_ext_random_normal(600 + k, T, N * V, 2.0);
        kdl_ext_logits(N, D, V, H, W, NULL, L);
        kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_NONE);
        d.temperature = 1.5;
        double dloss[N];
        kdl_loss_args_t la = kdl_ext_dense_args(N, V, L, KDL_DTYPE_F64, T, KDL_DTYPE_F64, dL, dloss);
        kdl_ext_ref_dense(&d, &la, kdl_divergence_name(kdl_all_divs[k]));
        double wantH[N * D], wantW[V * D];
        for (int i = 0; i < N; i++)
            for (int j = 0; j < D; j++) {
                double s = 0;
                for (int v = 0; v < V; v++) s += dL[i * V + v] * W[v * D + j];
                wantH[i * D + j] = s;
            }
        for (int v = 0; v < V; v++)
            for (int j = 0; j < D; j++) {
                double s = 0;
                for (int i = 0; i < N; i++) s += dL[i * V + v] * H[i * D + j];
                wantW[v * D + j] = s;
            }
        fres_t r;
        run_fused(&d, H, W, T, NULL, N, D, V, &r);
        cr_assert_eq(r.status, KDL_STATUS_SUCCESS);
        kdl_tol_t tol = {1e-12, 1e-14};
        const char *name = kdl_divergence_name(kdl_all_divs[k]);
        KDL_EXPECT_CLOSE(name, r.loss, dloss, N, tol);
        KDL_EXPECT_CLOSE(name, r.dH, wantH, N * D, tol);
        KDL_EXPECT_CLOSE(name, r.dW, wantW, V * D, tol);
    }
}

Test(rows, invalid_teacher_row_contributes_nothing)
{
    enum { N = 3, D = 4, V = 9 };
    double H[N * D], W[V * D], T[N * V];
    random_hwt(700, N, D, V, 1.0, 1.0, H, W, T);
    T[1 * V + 3] = NAN;
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_JSD, KDL_REDUCTION_MEAN);
    fres_t all, two;
    run_fused(&d, H, W, T, NULL, N, D, V, &all);
    cr_assert_eq(all.status, KDL_STATUS_SUCCESS);
    cr_expect_eq(all.info, 1);
    cr_expect_eq(all.valid, 2);
    for (int k = 0; k < D; k++) cr_expect(all.dH[D + k] == 0.0);
    /* the same as the two valid rows alone */
    double H2[2 * D], T2[2 * V];
    memcpy(H2, H, D * sizeof(double));
    memcpy(H2 + D, H + 2 * D, D * sizeof(double));
    memcpy(T2, T, V * sizeof(double));
    memcpy(T2 + V, T + 2 * V, V * sizeof(double));
    run_fused(&d, H2, W, T2, NULL, 2, D, V, &two);
    kdl_tol_t tol = {1e-13, 1e-15};
    KDL_EXPECT_CLOSE("loss", all.loss, two.loss, 1, tol);
    KDL_EXPECT_CLOSE("dW", all.dW, two.dW, V * D, tol);
}

Test(rows, empty_batch_zeroes_dW)
{
    enum { D = 3, V = 4 };
    double W[V * D];
    kdl_ext_random_normal(800, W, V * D, 1.0);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_MEAN);
    fres_t r;
    memset(&r, 0, sizeof r);
    for (int j = 0; j < V * D; j++) r.dW[j] = 9;
    kdl_fused_linear_args_t a = fargs(NULL, W, NULL, NULL, 0, D, V, &r);
    cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect(r.loss[0] == 0.0);
    for (int j = 0; j < V * D; j++) cr_expect(r.dW[j] == 0.0);
}

Test(dtypes, f32_inputs_convert_exactly)
{
    enum { N = 2, D = 6, V = 10 };
    double H[N * D], W[V * D], T[N * V], H2[N * D], W2[V * D];
    float Hf[N * D], Wf[V * D];
    random_hwt(900, N, D, V, 1.0, 1.0, H, W, T);
    kdl_to_dtype(H, Hf, KDL_DTYPE_F32, N * D);
    kdl_to_dtype(W, Wf, KDL_DTYPE_F32, V * D);
    kdl_from_dtype(Hf, H2, KDL_DTYPE_F32, N * D);
    kdl_from_dtype(Wf, W2, KDL_DTYPE_F32, V * D);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_RKL, KDL_REDUCTION_SUM);
    fres_t want, got;
    run_fused(&d, H2, W2, T, NULL, N, D, V, &want);
    memset(&got, 0, sizeof got);
    kdl_fused_linear_args_t a = fargs(Hf, Wf, T, NULL, N, D, V, &got);
    a.hidden_dtype = a.weight_dtype = KDL_DTYPE_F32;
    cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect(got.loss[0] == want.loss[0]);
    for (int j = 0; j < N * D; j++) cr_expect(got.dH[j] == want.dH[j]);
}

/* One bad-argument case: zero H [2, 3], W [5, 3] and T [2, 5], fkl with
 * sum; the loss and both gradients hold a sentinel. */
enum { BAD_N = 2, BAD_D = 3, BAD_V = 5 };
typedef struct bad_case {
    double H[BAD_N * BAD_D], W[BAD_V * BAD_D], T[BAD_N * BAD_V];
    kdl_loss_desc_t d;
    kdl_fused_linear_args_t a;
    fres_t r;
} bad_case_t;

static void bad_setup(bad_case_t *c)
{
    memset(c, 0, sizeof *c);
    c->d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    c->r.loss[0] = 42;
    for (int k = 0; k < BAD_N * BAD_D; k++) c->r.dH[k] = 42;
    for (int k = 0; k < BAD_V * BAD_D; k++) c->r.dW[k] = 42;
    c->a = fargs(c->H, c->W, c->T, NULL, BAD_N, BAD_D, BAD_V, &c->r);
}

static kdl_status_t bad_call(bad_case_t *c) { return kdl_ref_fused_linear_loss(&c->d, &c->a); }

static int bad_untouched(const bad_case_t *c)
{
    int ok = c->r.loss[0] == 42;
    for (int k = 0; k < BAD_N * BAD_D; k++) ok &= c->r.dH[k] == 42;
    for (int k = 0; k < BAD_V * BAD_D; k++) ok &= c->r.dW[k] == 42;
    return ok;
}

#define BAD(what, expected, mutate) \
    KDL_EXPECT_BAD(bad_case_t, bad_setup, bad_call, bad_untouched, what, expected, mutate)

Test(api, chunk_rows_and_bad_arguments)
{
    kdl_fused_linear_args_t ch; /* the chunk-size rule's inputs */
    kdl_fused_linear_args_init(&ch);
    ch.rows = 100;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 12);
    ch.rows = 5;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 1);
    ch.rows = 1 << 20;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 4096);
    /* 16-bit H and W: c·V·6 bytes <= N·V·2 / 8, so N/24 */
    ch.hidden_dtype = ch.weight_dtype = KDL_DTYPE_BF16;
    ch.rows = 8192;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 341);
    cr_expect_leq(kdl_fused_linear_chunk_rows(&ch) * 6, 8192 * 2 / 8);
    ch.weight_dtype = KDL_DTYPE_F32; /* mixed (reference only): the F32 rule */
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 1024);
    ch.hidden_dtype = KDL_DTYPE_F32;
    /* With V known, the whole workspace (not only the chunk) within 1/8 of
     * the logits: 1024 rows are exactly 1/8 at F32, so one row less. */
    ch.vocab = 151936;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 1023);
    cr_expect_leq((double)kdl_ext_fused_workspace_bytes(&ch), 8192.0 * 151936 * 4 / 8);
    cr_expect_gt((double)kdl_ext_fused_layout(1024, 151936, 0, 0, 0).total, 8192.0 * 151936 * 4 / 8);
    ch.hidden_dtype = ch.weight_dtype = KDL_DTYPE_BF16;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 341);
    cr_expect_leq((double)kdl_ext_fused_workspace_bytes(&ch), 8192.0 * 151936 * 2 / 8);
    ch.hidden_dtype = ch.weight_dtype = KDL_DTYPE_F32;
    ch.vocab = 0;
    ch.chunk_rows = 64;
    ch.rows = 10;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 10);

    enum { D = BAD_D, V = BAD_V };
    BAD("hidden = 0", KDL_STATUS_BAD_SIZE, c->a.hidden = 0);
    BAD("vocab = 0", KDL_STATUS_BAD_SIZE, c->a.vocab = 0);
    BAD("rows = -2", KDL_STATUS_BAD_SIZE, c->a.rows = -2);
    BAD("chunk_rows = -1", KDL_STATUS_BAD_SIZE, c->a.chunk_rows = -1);
    BAD("ld_hidden = D - 1", KDL_STATUS_BAD_STRIDE, c->a.ld_hidden = D - 1);
    BAD("ld_weight = D - 1", KDL_STATUS_BAD_STRIDE, c->a.ld_weight = D - 1);
    BAD("ld_teacher = V - 1", KDL_STATUS_BAD_STRIDE, c->a.ld_teacher = V - 1);
    BAD("ld_grad_hidden = 1", KDL_STATUS_BAD_STRIDE, c->a.ld_grad_hidden = 1);
    BAD("ld_grad_weight = 1", KDL_STATUS_BAD_STRIDE, c->a.ld_grad_weight = 1);
    BAD("weight = NULL", KDL_STATUS_NULL_POINTER, c->a.weight = NULL);
    BAD("hidden_states = NULL", KDL_STATUS_NULL_POINTER, c->a.hidden_states = NULL);
    BAD("teacher = NULL", KDL_STATUS_NULL_POINTER, c->a.teacher = NULL);
    BAD("loss = NULL", KDL_STATUS_NULL_POINTER, c->a.loss = NULL);
    BAD("grad_dtype = KDL_DTYPE_BF16", KDL_STATUS_NOT_SUPPORTED, c->a.grad_dtype = KDL_DTYPE_BF16);
    BAD("struct_size = 0", KDL_STATUS_BAD_STRUCT_SIZE, c->a.struct_size = 0);
    BAD("mu = 1.5", KDL_STATUS_BAD_MU, c->d.mu = 1.5);
    /* the GPU path's narrower contract, checked without a device */
    bad_case_t b;
    bad_setup(&b);
    cr_expect_eq(kdl_fused_linear_validate(&b.d, &b.a, 0), KDL_STATUS_NOT_SUPPORTED, "f64 hidden on the GPU path");
    b.a.hidden_dtype = b.a.weight_dtype = b.a.teacher_dtype = b.a.grad_dtype = KDL_DTYPE_F32;
    cr_expect_eq(kdl_fused_linear_validate(&b.d, &b.a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    b.d.divergence = KDL_DIV_AKL; /* the GPU path runs the dense kernel, AKL included */
    cr_expect_eq(kdl_fused_linear_validate(&b.d, &b.a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
}
#undef BAD

/* ------------------------------------------------------------ version 2 */

/* grad_output g (NONE) and bias b: dH, dW, db of the reference equal the
 * central differences of sum_i g_i loss_i with respect to H, W and b. */
static void check_fd_v2(kdl_divergence_t div, uint64_t seed)
{
    enum { N = 4, D = 4, V = 11 };
    double H[N * D], W[V * D], b[V], T[N * V], g[N], db[V];
    kdl_ext_random_normal(seed, H, N * D, 1.0);
    kdl_ext_random_normal(seed + 1, W, V * D, 0.7);
    kdl_ext_random_normal(seed + 2, b, V, 0.5);
    kdl_ext_random_normal(seed + 3, T, N * V, 2.0);
    kdl_ext_random_normal(seed + 4, g, N, 1.5); /* any sign, as autograd may pass */
    const int64_t labels[N] = {1, 2, -100, 0};
    kdl_loss_desc_t d = kdl_test_desc(div, KDL_REDUCTION_NONE);
    d.temperature = 1.5;
    d.scale = 0.8;
    fres_t base;
    memset(&base, 0, sizeof base);
    kdl_fused_linear_args_t a = fargs(H, W, T, labels, N, D, V, &base);
    a.bias = b;
    a.grad_bias = db;
    a.grad_output = g;
    a.grad_output_dtype = KDL_DTYPE_F64;
    cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    /* sum_i g_i loss_i (invalid rows, NaN, are excluded by the labels) */
    double fdH[N * D], fdW[V * D], fdb[V];
    const fprob_t p = {&d, H, W, b, T, g, labels, N, D, V};
    central_diff(&p, H, N * D, fdH);
    central_diff(&p, W, V * D, fdW);
    central_diff(&p, b, V, fdb);
    char what[64];
    snprintf(what, sizeof what, "grad_output + bias, %s", kdl_divergence_name(div));
    kdl_tol_t tol = {1e-6, 1e-8};
    KDL_EXPECT_CLOSE(what, base.dH, fdH, N * D, tol);
    KDL_EXPECT_CLOSE(what, base.dW, fdW, V * D, tol);
    KDL_EXPECT_CLOSE(what, db, fdb, V, tol);
}

Test(finite_difference, grad_output_and_bias_every_divergence)
{
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        if (kdl_all_divs[k] == KDL_DIV_AKL) continue; /* weights frozen: not a plain derivative */
        check_fd_v2(kdl_all_divs[k], 700 + 7 * k);
    }
}

/* SUM with a bias: db = column sums of dL, against finite differences. */
Test(finite_difference, bias_with_sum)
{
    enum { N = 3, D = 3, V = 9 };
    double H[N * D], W[V * D], b[V], T[N * V], db[V], fdb[V];
    kdl_ext_random_normal(810, H, N * D, 1.0);
    kdl_ext_random_normal(811, W, V * D, 0.7);
    kdl_ext_random_normal(812, b, V, 1.0);
    kdl_ext_random_normal(813, T, N * V, 2.0);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_JSD, KDL_REDUCTION_SUM);
    fres_t r;
    memset(&r, 0, sizeof r);
    kdl_fused_linear_args_t a = fargs(H, W, T, NULL, N, D, V, &r);
    a.bias = b;
    a.grad_bias = db;
    cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    const fprob_t p = {&d, H, W, b, T, NULL, NULL, N, D, V};
    central_diff(&p, b, V, fdb);
    kdl_tol_t tol = {1e-6, 1e-8};
    KDL_EXPECT_CLOSE("bias, SUM", db, fdb, V, tol);
    /* and the bias is the logits' shift: dH, dW equal those of H W^T + b formed by the dense reference */
    double sum = 0;
    for (int v = 0; v < V; v++) sum += db[v];
    cr_expect(fabs(sum) < 1e-12, "softmax-shift invariance: sum of db = %g", sum); /* every divergence's dz sums to 0 */
}

/* 16-bit H, W with 16-bit gradients: the reference converts the bf16 / f16
 * values exactly and rounds only the outputs: equal to the float64 run on
 * the converted values, then rounded. */
Test(dtypes, sixteen_bit_inputs_and_gradients)
{
    enum { N = 3, D = 6, V = 10 };
    const kdl_dtype_t dts[2] = {KDL_DTYPE_BF16, KDL_DTYPE_F16};
    for (int t = 0; t < 2; t++) {
        double H[N * D], W[V * D], T[N * V], H2[N * D], W2[V * D];
        uint16_t Hh[N * D], Wh[V * D], gH[N * D], gW[V * D];
        kdl_ext_random_normal(920 + t, H, N * D, 1.0);
        kdl_ext_random_normal(930 + t, W, V * D, 1.0);
        kdl_ext_random_normal(940 + t, T, N * V, 1.0);
        kdl_to_dtype(H, Hh, dts[t], N * D);
        kdl_to_dtype(W, Wh, dts[t], V * D);
        kdl_from_dtype(Hh, H2, dts[t], N * D);
        kdl_from_dtype(Wh, W2, dts[t], V * D);
        kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_SKL, KDL_REDUCTION_MEAN);
        fres_t want, got;
        run_fused(&d, H2, W2, T, NULL, N, D, V, &want);
        memset(&got, 0, sizeof got);
        kdl_fused_linear_args_t a = fargs(Hh, Wh, T, NULL, N, D, V, &got);
        a.hidden_dtype = a.weight_dtype = a.grad_dtype = dts[t];
        a.grad_hidden = gH;
        a.grad_weight = gW;
        cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
        cr_expect(got.loss[0] == want.loss[0]);
        uint16_t w16[V * D];
        kdl_to_dtype(want.dH, w16, dts[t], N * D);
        for (int j = 0; j < N * D; j++) cr_expect(gH[j] == w16[j], "dH[%d] %s", j, kdl_dtype_name(dts[t]));
        kdl_to_dtype(want.dW, w16, dts[t], V * D);
        for (int j = 0; j < V * D; j++) cr_expect(gW[j] == w16[j], "dW[%d] %s", j, kdl_dtype_name(dts[t]));
        /* 16-bit gradients need 16-bit inputs of that dtype */
        a.weight_dtype = KDL_DTYPE_F32;
        a.weight = W;
        cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_NOT_SUPPORTED);
    }
}

/* Makes *a what a caller built against an older version passes: struct_size
 * old_size, and garbage (0x5A) in every byte past it, where the newer
 * versions have their fields. */
static void as_older_caller(kdl_fused_linear_args_t *a, size_t old_size)
{
    memset((unsigned char *)a + old_size, 0x5A, sizeof *a - old_size);
    a->struct_size = old_size;
}

/* A caller built against version 1 (struct_size at valid_rows) still works,
 * and the fields it does not know do not matter. */
Test(api, version_1_callers)
{
    enum { N = 3, D = 4, V = 7 };
    double H[N * D], W[V * D], T[N * V];
    random_hwt(950, N, D, V, 1.0, 1.0, H, W, T);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_TVD, KDL_REDUCTION_NONE);
    fres_t want, got;
    run_fused(&d, H, W, T, NULL, N, D, V, &want);
    cr_assert_eq(want.status, KDL_STATUS_SUCCESS);
    /* a version-1 struct followed by garbage where version 2 has its fields */
    memset(&got, 0, sizeof got);
    kdl_fused_linear_args_t a = fargs(H, W, T, NULL, N, D, V, &got);
    as_older_caller(&a, KDL_FUSED_LINEAR_ARGS_V1_SIZE);
    cr_assert_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    for (int i = 0; i < N; i++) cr_expect(got.loss[i] == want.loss[i]);
    for (int j = 0; j < V * D; j++) cr_expect(got.dW[j] == want.dW[j]);
    a.struct_size = KDL_FUSED_LINEAR_ARGS_V1_SIZE + 8;
    cr_expect_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_BAD_STRUCT_SIZE);
    cr_expect_eq(kdl_fused_linear_validate(&d, NULL, 1), KDL_STATUS_NULL_POINTER);
    kdl_fused_linear_args_t init;
    kdl_fused_linear_args_init(&init);
    cr_expect_eq(init.struct_size, sizeof init);
    cr_expect(init.grad_output == NULL && init.bias == NULL && init.grad_bias == NULL);
    cr_expect_eq(init.grad_output_dtype, KDL_DTYPE_F32);
}

/* The new arguments' statuses; nothing is written on failure. */
Test(api, version_2_bad_arguments)
{
    enum { N = 2, D = 3, V = 5 };
    double H[N * D] = {0}, W[V * D] = {0}, T[N * V] = {0}, g[N + 1] = {1, 1, 1}, b[V + 1] = {0}, db[V + 1];
    kdl_loss_desc_t none = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_NONE);
    fres_t r;
    memset(&r, 0, sizeof r);
    r.loss[0] = 42;
    db[0] = 42;
#define EXPECT_V2(want, red, mutate)                                                                \
    do {                                                                                            \
        kdl_loss_desc_t dd = none;                                                                  \
        dd.reduction = red;                                                                         \
        kdl_fused_linear_args_t a = fargs(H, W, T, NULL, N, D, V, &r);                              \
        a.grad_output = g;                                                                          \
        a.grad_output_dtype = KDL_DTYPE_F64;                                                        \
        a.grad_bias = db;                                                                           \
        mutate;                                                                                     \
        kdl_status_t st = kdl_ref_fused_linear_loss(&dd, &a);                                       \
        cr_expect_eq(st, want, "%s: %s (%s)", #mutate, kdl_status_string(st), kdl_get_last_error()); \
        cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", #mutate);                       \
        cr_expect(r.loss[0] == 42 && db[0] == 42, "%s wrote an output", #mutate);                   \
    } while (0)
    EXPECT_V2(KDL_STATUS_BAD_PARAM, KDL_REDUCTION_SUM, (void)0);
    EXPECT_V2(KDL_STATUS_BAD_PARAM, KDL_REDUCTION_MEAN, (void)0);
    EXPECT_V2(KDL_STATUS_BAD_ENUM, KDL_REDUCTION_NONE, a.grad_output_dtype = (kdl_dtype_t)7);
    EXPECT_V2(KDL_STATUS_MISALIGNED, KDL_REDUCTION_NONE, a.grad_output = (const char *)g + 4);
    EXPECT_V2(KDL_STATUS_MISALIGNED, KDL_REDUCTION_NONE, a.bias = (const char *)b + 4);
    EXPECT_V2(KDL_STATUS_MISALIGNED, KDL_REDUCTION_NONE, a.grad_bias = (char *)db + 4);
    EXPECT_V2(KDL_STATUS_NOT_SUPPORTED, KDL_REDUCTION_NONE, a.grad_dtype = KDL_DTYPE_F16);
#undef EXPECT_V2
    /* without grad_output SUM is fine, and grad_bias alone too */
    kdl_loss_desc_t sum = none;
    sum.reduction = KDL_REDUCTION_SUM;
    kdl_fused_linear_args_t a = fargs(H, W, T, NULL, N, D, V, &r);
    a.grad_bias = db;
    cr_expect_eq(kdl_fused_linear_validate(&sum, &a, 1), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    /* GPU contract: hidden and weight of one dtype; 16-bit gradients only with 16-bit inputs */
    a.hidden_dtype = a.weight_dtype = a.teacher_dtype = a.grad_dtype = KDL_DTYPE_F32;
    cr_expect_eq(kdl_fused_linear_validate(&sum, &a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    a.hidden_dtype = KDL_DTYPE_BF16;
    cr_expect_eq(kdl_fused_linear_validate(&sum, &a, 0), KDL_STATUS_NOT_SUPPORTED, "bf16 H with f32 W");
    a.weight_dtype = KDL_DTYPE_BF16;
    cr_expect_eq(kdl_fused_linear_validate(&sum, &a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    a.grad_dtype = KDL_DTYPE_BF16;
    cr_expect_eq(kdl_fused_linear_validate(&sum, &a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    a.grad_dtype = KDL_DTYPE_F16;
    cr_expect_eq(kdl_fused_linear_validate(&sum, &a, 0), KDL_STATUS_NOT_SUPPORTED, "f16 grads of bf16 inputs");
    a.grad_dtype = KDL_DTYPE_F64;
    cr_expect_eq(kdl_fused_linear_validate(&sum, &a, 0), KDL_STATUS_NOT_SUPPORTED, "f64 grads on the GPU");
}

/* ------------------------------------------------------------ version 3 */
/* The teacher as a linear layer: the reference given H_t, W_t (+ b_t) must
 * equal the reference given the teacher logits H_t W_t^T (+ b_t) that the
 * test forms itself in float64 (its own loop over the stored values) as an
 * F64 teacher.  Strided everywhere: ld_hidden > d, d_t != d, ld_teacher_hidden
 * and ld_teacher_weight > d_t. */
/* The outputs of one run, for the version 3 and version 4 tests: their
 * problems share V, d and ld_hidden, and have at most FL_NMAX rows. */
enum { FL_NMAX = 6, FL_V = 17, FL_D = 4, FL_LDH = 6 };

typedef struct fl_out {
    double loss[FL_NMAX], dH[FL_NMAX * FL_LDH], dW[FL_V * FL_D], db[FL_V];
    int64_t info, valid, bad;
    kdl_status_t status;
} fl_out_t;

/* Two runs agree: status, loss (nloss values), dH of the first rows rows,
 * dW, db within 1e-13 relative, and the counters exactly; ref names the
 * second run in the message. */
static void fl_expect_same(const char *what, const char *ref, const fl_out_t *got, const fl_out_t *want,
                           int nloss, int rows)
{
    cr_expect_eq(got->status, KDL_STATUS_SUCCESS, "%s: %s", what, kdl_get_last_error());
    cr_expect_eq(want->status, KDL_STATUS_SUCCESS, "%s (%s): %s", what, ref, kdl_get_last_error());
    const kdl_tol_t tol = {1e-13, 1e-15};
    KDL_EXPECT_CLOSE(what, got->loss, want->loss, nloss, tol);
    KDL_EXPECT_CLOSE(what, got->dH, want->dH, rows * FL_LDH, tol);
    KDL_EXPECT_CLOSE(what, got->dW, want->dW, FL_V * FL_D, tol);
    KDL_EXPECT_CLOSE(what, got->db, want->db, FL_V, tol);
    cr_expect(got->info == want->info && got->valid == want->valid && got->bad == want->bad,
              "%s: counters %lld/%lld/%lld, expected %lld/%lld/%lld", what, (long long)got->info,
              (long long)got->valid, (long long)got->bad, (long long)want->info, (long long)want->valid,
              (long long)want->bad);
}

enum { TL_N = 5, TL_D = FL_D, TL_LDH = FL_LDH, TL_V = FL_V, TL_DT = 7, TL_LDTH = 9, TL_LDTW = 8 };

typedef struct tl_prob {
    kdl_dtype_t sdt, tdt;                  /* student H, W, b; teacher H_t, W_t, b_t */
    double H[TL_N * TL_LDH], W[TL_V * TL_D], b[TL_V];     /* stored in sdt (byte buffers) */
    double Ht[TL_N * TL_LDTH], Wt[TL_V * TL_LDTW], bt[TL_V]; /* stored in tdt */
    double T[TL_N * TL_V];                 /* the test's teacher logits */
    int64_t labels[TL_N];
} tl_prob_t;

typedef fl_out_t tl_out_t;

/* n normal values (sigma) from seed, stored in dt at dst, and read back
 * into back (float64, the stored values exactly). */
static void tl_fill(uint64_t seed, int64_t n, double sigma, kdl_dtype_t dt, void *dst, double *back)
{
    double x[TL_V * TL_LDTW];
    kdl_ext_random_normal(seed, x, n, sigma);
    kdl_to_dtype(x, dst, dt, n);
    kdl_from_dtype(dst, back, dt, n);
}

static void tl_make(tl_prob_t *p, kdl_dtype_t sdt, kdl_dtype_t tdt, int teacher_bias, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    p->sdt = sdt;
    p->tdt = tdt;
    double Ht[TL_N * TL_LDTH], Wt[TL_V * TL_LDTW], bt[TL_V], scratch[TL_V * TL_LDTW];
    tl_fill(seed, TL_N * TL_LDH, 1.0, sdt, p->H, scratch);
    tl_fill(seed + 1, TL_V * TL_D, 0.7, sdt, p->W, scratch);
    tl_fill(seed + 2, TL_V, 0.5, sdt, p->b, scratch);
    tl_fill(seed + 3, TL_N * TL_LDTH, 1.0, tdt, p->Ht, Ht);
    tl_fill(seed + 4, TL_V * TL_LDTW, 0.6, tdt, p->Wt, Wt);
    tl_fill(seed + 5, TL_V, 0.8, tdt, p->bt, bt);
    /* the teacher logits in float64 from the stored values; the padding
     * columns of the strided H_t and W_t are never read */
    for (int i = 0; i < TL_N; i++)
        for (int v = 0; v < TL_V; v++) {
            double s = 0;
            for (int k = 0; k < TL_DT; k++) s += Ht[i * TL_LDTH + k] * Wt[v * TL_LDTW + k];
            p->T[i * TL_V + v] = teacher_bias ? s + bt[v] : s;
        }
    const int64_t labels[TL_N] = {2, -100, 0, 16, -100};
    memcpy(p->labels, labels, sizeof labels);
}

/* The call on p: the teacher as a linear layer (tlin, with or without b_t)
 * or as the test's float64 logits; student bias and every gradient. */
static kdl_fused_linear_args_t tl_args(const tl_prob_t *p, int tlin, int teacher_bias, tl_out_t *o)
{
    kdl_fused_linear_args_t a = kdl_ext_fused_args(TL_N, TL_D, TL_V, p->H, p->W, p->sdt, p->T, KDL_DTYPE_F64,
                                                   o->dH, o->dW, o->loss);
    a.ld_hidden = a.ld_grad_hidden = TL_LDH;
    a.bias = p->b;
    a.grad_bias = o->db;
    a.labels = p->labels;
    a.info = &o->info;
    a.valid_rows = &o->valid;
    if (tlin) {
        a.teacher = NULL;
        a.teacher_dtype = (kdl_dtype_t)99; /* unused with the teacher as a linear layer, */
        a.ld_teacher = 0;                  /* and so not checked */
        a.teacher_hidden = p->Ht;
        a.teacher_hidden_size = TL_DT;
        a.ld_teacher_hidden = TL_LDTH;
        a.teacher_weight = p->Wt;
        a.ld_teacher_weight = TL_LDTW;
        a.teacher_bias = teacher_bias ? p->bt : NULL;
        a.teacher_linear_dtype = p->tdt;
    }
    return a;
}

static void tl_run(const kdl_loss_desc_t *d, const tl_prob_t *p, int tlin, int teacher_bias, tl_out_t *o)
{
    memset(o, 0, sizeof *o);
    kdl_fused_linear_args_t a = tl_args(p, tlin, teacher_bias, o);
    o->status = kdl_ref_fused_linear_loss(d, &a);
}

static void tl_expect_same(const char *what, const tl_out_t *got, const tl_out_t *want, int nloss)
{
    fl_expect_same(what, "teacher logits", got, want, nloss, TL_N);
}

/* want: p (logit teacher) through d with the current struct; *a: the args
 * for got as a caller built against old_size passes them (filled in place,
 * so the garbage bytes stay as written). */
static void tl_older_caller(const kdl_loss_desc_t *d, const tl_prob_t *p, size_t old_size, tl_out_t *want,
                            tl_out_t *got, kdl_fused_linear_args_t *a)
{
    tl_run(d, p, 0, 0, want);
    cr_assert_eq(want->status, KDL_STATUS_SUCCESS);
    memset(got, 0, sizeof *got);
    *a = tl_args(p, 0, 0, got);
    as_older_caller(a, old_size);
}

Test(teacher_linear, equals_teacher_logits_every_divergence)
{
    const kdl_dtype_t dts[3][2] = {{KDL_DTYPE_F32, KDL_DTYPE_F32},
                                   {KDL_DTYPE_BF16, KDL_DTYPE_BF16},
                                   {KDL_DTYPE_F32, KDL_DTYPE_BF16}};
    const kdl_reduction_t reds[3] = {KDL_REDUCTION_NONE, KDL_REDUCTION_SUM, KDL_REDUCTION_MEAN};
    int runs = 0;
    for (size_t k = 0; k < KDL_NDIVS; k++)
        for (int t = 0; t < 3; t++)
            for (int bias = 0; bias < 2; bias++) {
                tl_prob_t p;
                tl_make(&p, dts[t][0], dts[t][1], bias, 1000 + 10 * k + 3 * t + bias);
                for (int r = 0; r < 3; r++) {
                    kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], reds[r]);
                    d.temperature = 1.5;
                    tl_out_t got, want;
                    tl_run(&d, &p, 1, bias, &got);
                    tl_run(&d, &p, 0, bias, &want);
                    char what[96];
                    snprintf(what, sizeof what, "%s, %s/%s, %s, teacher bias %d", kdl_divergence_name(kdl_all_divs[k]),
                             kdl_dtype_name(dts[t][0]), kdl_dtype_name(dts[t][1]), kdl_reduction_name(reds[r]), bias);
                    tl_expect_same(what, &got, &want, reds[r] == KDL_REDUCTION_NONE ? TL_N : 1);
                    cr_expect_eq(want.valid, 3, "%s", what);
                    runs++;
                }
            }
    cr_expect_eq(runs, (int)KDL_NDIVS * 18);
}

/* The teacher's bias is used (the runs above would agree if neither side
 * added it): with b_t the loss differs from the call without it. */
Test(teacher_linear, teacher_bias_matters)
{
    tl_prob_t p;
    tl_make(&p, KDL_DTYPE_F32, KDL_DTYPE_F32, 1, 1200);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    tl_out_t with, without;
    tl_run(&d, &p, 1, 1, &with);
    tl_run(&d, &p, 1, 0, &without);
    cr_assert_eq(with.status, KDL_STATUS_SUCCESS);
    cr_assert_eq(without.status, KDL_STATUS_SUCCESS);
    cr_expect(fabs(with.loss[0] - without.loss[0]) > 1e-3, "%g vs %g", with.loss[0], without.loss[0]);
}

/* rows = 0: H_t may be NULL (an empty tensor's data pointer) beside W_t, as
 * H and T may; the loss is 0 and dW, db are zeroed, as without the teacher
 * layer.  Both teacher sources at once is still BAD_PARAM. */
Test(teacher_linear, empty_batch)
{
    tl_prob_t p;
    tl_make(&p, KDL_DTYPE_F32, KDL_DTYPE_F32, 1, 1300);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_MEAN);
    for (int c = 0; c < 3; c++) {
        tl_out_t o;
        memset(&o, 0, sizeof o);
        o.loss[0] = 42;
        for (int j = 0; j < TL_V * TL_D; j++) o.dW[j] = 9;
        for (int j = 0; j < TL_V; j++) o.db[j] = 9;
        kdl_fused_linear_args_t a = tl_args(&p, 1, 1, &o);
        a.rows = 0;
        a.hidden_states = NULL;
        if (c == 0) a.teacher_hidden = NULL;      /* W_t and b_t alone */
        if (c == 1) a.teacher_weight = NULL;      /* H_t alone */
        if (c == 2) a.teacher_hidden = a.teacher_weight = NULL; /* b_t alone */
        cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS, "case %d: %s", c, kdl_get_last_error());
        cr_expect(o.loss[0] == 0.0, "case %d", c);
        for (int j = 0; j < TL_V * TL_D; j++) cr_expect(o.dW[j] == 0.0, "case %d dW[%d]", c, j);
        for (int j = 0; j < TL_V; j++) cr_expect(o.db[j] == 0.0, "case %d db[%d]", c, j);
        /* the sizes are still checked, and one source only */
        a.teacher_hidden_size = 0;
        cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_BAD_SIZE, "case %d", c);
        a.teacher_hidden_size = TL_DT;
        a.teacher = p.T;
        cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_BAD_PARAM, "case %d", c);
    }
}

/* A caller built against version 2 (struct_size at grad_bias), with garbage
 * where version 3 has its fields, behaves as before: its teacher logits. */
Test(teacher_linear, version_2_callers)
{
    tl_prob_t p;
    tl_make(&p, KDL_DTYPE_F32, KDL_DTYPE_F32, 0, 1400);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_NONE);
    tl_out_t want, got;
    kdl_fused_linear_args_t a;
    tl_older_caller(&d, &p, KDL_FUSED_LINEAR_ARGS_V2_SIZE, &want, &got, &a);
    cr_assert_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_assert_eq(kdl_fused_linear_validate(&d, &a, 0), KDL_STATUS_NOT_SUPPORTED, "f64 teacher on the GPU");
    got.status = kdl_ref_fused_linear_loss(&d, &a);
    tl_expect_same("version 2", &got, &want, TL_N);
    for (int i = 0; i < TL_N; i++) cr_expect(got.loss[i] == want.loss[i] || (isnan(got.loss[i]) && isnan(want.loss[i])));
    /* the full struct with the same garbage is a teacher-linear call with
     * both sources: refused */
    a.struct_size = sizeof a;
    cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_BAD_ENUM); /* teacher_linear_dtype 0x5A5A5A5A */
    a.teacher_linear_dtype = KDL_DTYPE_F32;
    cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_BAD_PARAM);
    a.struct_size = KDL_FUSED_LINEAR_ARGS_V2_SIZE + 8;
    cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_BAD_STRUCT_SIZE);
    kdl_fused_linear_args_t init;
    kdl_fused_linear_args_init(&init);
    cr_expect(init.teacher_hidden == NULL && init.teacher_weight == NULL && init.teacher_bias == NULL);
    cr_expect_eq(init.teacher_linear_dtype, KDL_DTYPE_F32);
}

/* The chunk rule with the teacher's float32 chunk in the workspace. */
Test(teacher_linear, chunk_rows)
{
    kdl_fused_linear_args_t ch;
    kdl_fused_linear_args_init(&ch);
    double one = 0;
    ch.teacher_hidden = &one;
    ch.rows = 100;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 6); /* N/16 */
    ch.rows = 8192;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 512);
    ch.hidden_dtype = ch.weight_dtype = KDL_DTYPE_BF16;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 204); /* N/40 */
    /* with V: the whole workspace within 1/8 of one [N, V] logits tensor */
    ch.vocab = 151936;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 204);
    cr_expect_leq((double)kdl_ext_fused_workspace_bytes(&ch), 8192.0 * 151936 * 2 / 8);
    cr_expect_gt((double)kdl_ext_fused_layout(205, 151936, 1, 0, 1).total, 8192.0 * 151936 * 2 / 8);
    ch.grad_bias = &one;
    cr_expect_leq((double)kdl_ext_fused_workspace_bytes(&ch), 8192.0 * 151936 * 2 / 8);
    ch.grad_bias = NULL;
    ch.hidden_dtype = ch.weight_dtype = KDL_DTYPE_F32;
    /* 512 rows are exactly 1/8 at F32: one row less */
    cr_expect_eq(kdl_fused_linear_chunk_rows(&ch), 511);
    cr_expect_leq((double)kdl_ext_fused_workspace_bytes(&ch), 8192.0 * 151936 * 4 / 8);
    cr_expect_gt((double)kdl_ext_fused_layout(512, 151936, 0, 0, 1).total, 8192.0 * 151936 * 4 / 8);
    /* the teacher region: c·V·4 bytes more, after the student logits */
    kdl_ext_fused_layout_t with = kdl_ext_fused_layout(3, 100, 1, 1, 1), without = kdl_ext_fused_layout(3, 100, 1, 1, 0);
    cr_expect_eq(with.total - without.total, 3 * 100 * 4 + 256 - (3 * 100 * 4) % 256);
    cr_expect_eq(with.teacher, with.logits + 3 * 100 * 4 + 256 - (3 * 100 * 4) % 256);
    cr_expect(with.dl16 >= with.teacher + 3 * 100 * 4);
}

/* Each new argument's status; nothing is written on failure. */
static void bad_setup_tl(bad_case_t *c)
{
    bad_setup(c);
    c->a.teacher = NULL;
    c->a.teacher_hidden = c->H; /* H_t [2, 3] and W_t [5, 3]: zeros */
    c->a.teacher_hidden_size = BAD_D;
    c->a.ld_teacher_hidden = BAD_D;
    c->a.teacher_weight = c->W;
    c->a.ld_teacher_weight = BAD_D;
    c->a.teacher_bias = c->T;
    c->a.teacher_linear_dtype = KDL_DTYPE_F64;
}

static kdl_status_t bad_call_gpu_rule(bad_case_t *c) { return kdl_fused_linear_validate(&c->d, &c->a, 0); }

#define BAD(what, expected, mutate) \
    KDL_EXPECT_BAD(bad_case_t, bad_setup_tl, bad_call, bad_untouched, what, expected, mutate)
#define BAD_PLAIN(what, expected, mutate) \
    KDL_EXPECT_BAD(bad_case_t, bad_setup, bad_call, bad_untouched, what, expected, mutate)
#define BAD_GPU(what, expected, mutate) \
    KDL_EXPECT_BAD(bad_case_t, bad_setup_tl, bad_call_gpu_rule, bad_untouched, what, expected, mutate)

Test(teacher_linear, bad_arguments)
{
    { /* the valid teacher-linear problem itself succeeds */
        bad_case_t c;
        bad_setup_tl(&c);
        cr_assert_eq(bad_call(&c), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    }
    BAD("teacher and teacher_hidden", KDL_STATUS_BAD_PARAM, c->a.teacher = c->T);
    BAD("teacher and W_t without H_t", KDL_STATUS_BAD_PARAM, c->a.teacher = c->T; c->a.teacher_hidden = NULL);
    BAD("W_t without H_t", KDL_STATUS_BAD_PARAM, c->a.teacher_hidden = NULL);
    BAD("b_t alone", KDL_STATUS_BAD_PARAM, c->a.teacher_hidden = NULL; c->a.teacher_weight = NULL);
    BAD_PLAIN("teacher_weight with teacher logits", KDL_STATUS_BAD_PARAM, c->a.teacher_weight = c->W);
    BAD_PLAIN("teacher_bias with teacher logits", KDL_STATUS_BAD_PARAM, c->a.teacher_bias = c->W);
    BAD("teacher_weight NULL", KDL_STATUS_NULL_POINTER, c->a.teacher_weight = NULL);
    BAD("teacher_hidden_size 0", KDL_STATUS_BAD_SIZE, c->a.teacher_hidden_size = 0);
    BAD("teacher_hidden_size -3", KDL_STATUS_BAD_SIZE, c->a.teacher_hidden_size = -3);
    BAD("ld_teacher_hidden < d_t", KDL_STATUS_BAD_STRIDE, c->a.ld_teacher_hidden = BAD_D - 1);
    BAD("ld_teacher_weight < d_t", KDL_STATUS_BAD_STRIDE, c->a.ld_teacher_weight = BAD_D - 1);
    BAD("teacher_linear_dtype 7", KDL_STATUS_BAD_ENUM, c->a.teacher_linear_dtype = (kdl_dtype_t)7);
    BAD("teacher_linear_dtype -1", KDL_STATUS_BAD_ENUM, c->a.teacher_linear_dtype = (kdl_dtype_t)-1);
    BAD("teacher_hidden misaligned", KDL_STATUS_MISALIGNED, c->a.teacher_hidden = (const char *)c->H + 4);
    BAD("teacher_weight misaligned", KDL_STATUS_MISALIGNED, c->a.teacher_weight = (const char *)c->W + 2);
    BAD("teacher_bias misaligned", KDL_STATUS_MISALIGNED, c->a.teacher_bias = (const char *)c->T + 1);
    BAD("ld_teacher_weight INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, c->a.ld_teacher_weight = INT64_MAX);
    BAD("ld_teacher_hidden INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, c->a.ld_teacher_hidden = INT64_MAX);
    /* the GPU path: F32, BF16, F16 teacher layers only */
    BAD_GPU("teacher layer f64 on the GPU", KDL_STATUS_NOT_SUPPORTED,
            c->a.hidden_dtype = c->a.weight_dtype = c->a.grad_dtype = KDL_DTYPE_F32);
    BAD_GPU("teacher_linear_dtype 4 on the GPU", KDL_STATUS_BAD_ENUM,
            c->a.hidden_dtype = c->a.weight_dtype = c->a.grad_dtype = KDL_DTYPE_F32;
            c->a.teacher_linear_dtype = (kdl_dtype_t)4);
    const kdl_dtype_t ok16[3] = {KDL_DTYPE_F32, KDL_DTYPE_BF16, KDL_DTYPE_F16};
    for (int t = 0; t < 3; t++) {
        bad_case_t c;
        bad_setup_tl(&c);
        c.a.hidden_dtype = c.a.weight_dtype = c.a.grad_dtype = KDL_DTYPE_F32;
        c.a.teacher_linear_dtype = ok16[t];
        cr_expect_eq(kdl_fused_linear_validate(&c.d, &c.a, 0), KDL_STATUS_SUCCESS, "%s: %s",
                     kdl_dtype_name(ok16[t]), kdl_get_last_error());
    }
}
#undef BAD
#undef BAD_PLAIN
#undef BAD_GPU

/* ================================================ version 4: sparse teacher
 * The fused reference with the teacher as top-k indices and log-probs
 * against kdl_ref_sparse_loss on logits H W^T (+ b) that the test forms in
 * float64 from the stored values, and dH = dL W, dW = dL^T H, db = colsum
 * dL that the test forms from that call's dL (scaled by grad_output with
 * NONE when given). */
enum { SP_N = FL_NMAX, SP_D = FL_D, SP_LDH = FL_LDH, SP_V = FL_V, SP_K = 5, SP_LDI = 7, SP_LDP = 6 };

typedef struct sp_prob {
    kdl_dtype_t sdt, pdt;                             /* H, W, b; log-probs */
    double H[SP_N * SP_LDH], W[SP_V * SP_D], b[SP_V]; /* stored in sdt */
    double Hd[SP_N * SP_LDH], Wd[SP_V * SP_D], bd[SP_V]; /* the stored values in float64 */
    double P[SP_N * SP_LDP];                          /* stored in pdt */
    int64_t I[SP_N * SP_LDI], labels[SP_N];
    double g[SP_N];                                   /* grad_output, float64 */
} sp_prob_t;

typedef fl_out_t sp_out_t;

/* Rows: 1 ignored; with bad_rows, 3 repeats an index and 4 holds V. */
static void sp_make(sp_prob_t *p, kdl_dtype_t sdt, kdl_dtype_t pdt, int bad_rows, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    p->sdt = sdt;
    p->pdt = pdt;
    double x[SP_N * SP_LDH + SP_V * SP_D];
    kdl_ext_random_normal(seed, x, SP_N * SP_LDH, 1.0);
    kdl_to_dtype(x, p->H, sdt, SP_N * SP_LDH);
    kdl_from_dtype(p->H, p->Hd, sdt, SP_N * SP_LDH);
    kdl_ext_random_normal(seed + 1, x, SP_V * SP_D, 0.8);
    kdl_to_dtype(x, p->W, sdt, SP_V * SP_D);
    kdl_from_dtype(p->W, p->Wd, sdt, SP_V * SP_D);
    kdl_ext_random_normal(seed + 2, x, SP_V, 0.5);
    kdl_to_dtype(x, p->b, sdt, SP_V);
    kdl_from_dtype(p->b, p->bd, sdt, SP_V);
    double lp[SP_N * SP_LDP];
    kdl_ext_random_normal(seed + 3, lp, SP_N * SP_LDP, 2.0);
    for (int i = 0; i < SP_N; i++) {
        kdl_ext_topk_logprobs(lp + i * SP_LDP, SP_K, 0.85);
        for (int j = 0; j < SP_K; j++) p->I[i * SP_LDI + j] = (3 * i + 5 * j + 1) % SP_V;
        for (int j = SP_K; j < SP_LDI; j++) p->I[i * SP_LDI + j] = -7; /* padding, never read */
    }
    kdl_to_dtype(lp, p->P, pdt, SP_N * SP_LDP);
    if (bad_rows) {
        p->I[3 * SP_LDI + 2] = p->I[3 * SP_LDI + 0];
        p->I[4 * SP_LDI + 1] = SP_V;
    }
    const int64_t labels[SP_N] = {2, -100, 0, 16, 5, 9};
    memcpy(p->labels, labels, sizeof labels);
    kdl_ext_random_normal(seed + 4, p->g, SP_N, 1.0);
}

static kdl_fused_linear_args_t sp_args(const kdl_sparse_mode_t mode, const sp_prob_t *p, int bias, int gout,
                                       sp_out_t *o)
{
    kdl_fused_linear_args_t a = kdl_ext_fused_args(SP_N, SP_D, SP_V, p->H, p->W, p->sdt, NULL, KDL_DTYPE_F64, o->dH,
                                                   o->dW, o->loss);
    a.ld_hidden = a.ld_grad_hidden = SP_LDH;
    a.bias = bias ? p->b : NULL;
    a.grad_bias = o->db;
    a.labels = p->labels;
    a.info = &o->info;
    a.valid_rows = &o->valid;
    a.grad_output = gout ? p->g : NULL;
    a.grad_output_dtype = KDL_DTYPE_F64;
    a.teacher_dtype = (kdl_dtype_t)99; /* unused with a sparse teacher, and so not checked */
    a.ld_teacher = 0;
    a.teacher_indices = p->I;
    a.ld_teacher_indices = SP_LDI;
    a.teacher_logprobs = p->P;
    a.ld_teacher_logprobs = SP_LDP;
    a.teacher_logprobs_dtype = p->pdt;
    a.sparse_mode = mode;
    a.k = SP_K;
    a.bad_index_rows = &o->bad;
    return a;
}

/* The independent answer: the sparse reference on the test's logits. */
static void sp_expected(const kdl_loss_desc_t *d, kdl_sparse_mode_t mode, const sp_prob_t *p, int bias, int gout,
                        sp_out_t *o)
{
    memset(o, 0, sizeof *o);
    double L[SP_N * SP_V], dL[SP_N * SP_V];
    for (int i = 0; i < SP_N; i++)
        for (int v = 0; v < SP_V; v++) {
            double s = bias ? p->bd[v] : 0.0;
            for (int k = 0; k < SP_D; k++) s += p->Hd[i * SP_LDH + k] * p->Wd[v * SP_D + k];
            L[i * SP_V + v] = s;
        }
    kdl_sparse_args_t s = kdl_ext_sparse_args(mode, SP_N, SP_V, SP_K, L, p->I, p->P, dL, o->loss);
    s.ld_indices = SP_LDI;
    s.ld_logprobs = SP_LDP;
    s.teacher_dtype = p->pdt;
    s.labels = p->labels;
    s.info = &o->info;
    s.valid_rows = &o->valid;
    s.bad_index_rows = &o->bad;
    o->status = kdl_ref_sparse_loss(d, &s);
    if (o->status != KDL_STATUS_SUCCESS) return;
    if (gout)
        for (int i = 0; i < SP_N; i++)
            for (int v = 0; v < SP_V; v++) dL[i * SP_V + v] *= p->g[i];
    for (int i = 0; i < SP_N; i++)
        for (int k = 0; k < SP_D; k++) {
            double t = 0;
            for (int v = 0; v < SP_V; v++) t += dL[i * SP_V + v] * p->Wd[v * SP_D + k];
            o->dH[i * SP_LDH + k] = t;
        }
    for (int v = 0; v < SP_V; v++) {
        for (int k = 0; k < SP_D; k++) {
            double t = 0;
            for (int i = 0; i < SP_N; i++) t += dL[i * SP_V + v] * p->Hd[i * SP_LDH + k];
            o->dW[v * SP_D + k] = t;
        }
        double t = 0;
        for (int i = 0; i < SP_N; i++) t += dL[i * SP_V + v];
        o->db[v] = t;
    }
}

static void sp_expect_same(const char *what, const sp_out_t *got, const sp_out_t *want, int nloss)
{
    fl_expect_same(what, "sparse reference", got, want, nloss, SP_N);
}

static void sp_check(const kdl_loss_desc_t *d, kdl_sparse_mode_t mode, const sp_prob_t *p, int bias, int gout,
                     const char *what, int bad_rows)
{
    sp_out_t got, want;
    sp_expected(d, mode, p, bias, gout, &want);
    memset(&got, 0, sizeof got);
    kdl_fused_linear_args_t a = sp_args(mode, p, bias, gout, &got);
    got.status = kdl_ref_fused_linear_loss(d, &a);
    sp_expect_same(what, &got, &want, d->reduction == KDL_REDUCTION_NONE ? SP_N : 1);
    /* the answer is not vacuous: rows 3 and 4 are bad exactly when asked */
    cr_expect_eq(got.bad, bad_rows ? 2 : 0, "%s", what);
    cr_expect_eq(got.valid, bad_rows ? 3 : 5, "%s", what);
    if (bad_rows)
        for (int r = 3; r <= 4; r++)
            for (int k = 0; k < SP_D; k++) cr_expect(got.dH[r * SP_LDH + k] == 0.0, "%s: bad row %d dH", what, r);
    for (int k = 0; k < SP_D; k++) cr_expect(got.dH[1 * SP_LDH + k] == 0.0, "%s: ignored row dH", what);
}

Test(sparse_teacher, equals_sparse_reference_every_divergence)
{
    const kdl_dtype_t dts[3][2] = {{KDL_DTYPE_F32, KDL_DTYPE_F32},
                                   {KDL_DTYPE_BF16, KDL_DTYPE_F64},
                                   {KDL_DTYPE_F64, KDL_DTYPE_BF16}};
    const kdl_reduction_t reds[3] = {KDL_REDUCTION_NONE, KDL_REDUCTION_SUM, KDL_REDUCTION_MEAN};
    int runs = 0;
    for (int m = 0; m < KDL_SPARSE_MODE_COUNT_; m++)
        for (size_t k = 0; k < KDL_NDIVS; k++) {
            if (!kdl_sparse_supports((kdl_sparse_mode_t)m, kdl_all_divs[k])) continue;
            for (int t = 0; t < 3; t++)
                for (int bias = 0; bias < 2; bias++) {
                    sp_prob_t p;
                    const int bad_rows = (t + bias) % 2;
                    sp_make(&p, dts[t][0], dts[t][1], bad_rows, 2000 + 10 * k + 3 * t + bias + 500 * m);
                    for (int r = 0; r < 3; r++)
                        for (int gout = 0; gout < (reds[r] == KDL_REDUCTION_NONE ? 2 : 1); gout++) {
                            kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], reds[r]);
                            d.temperature = 1.5;
                            d.scale = 0.75;
                            char what[128];
                            snprintf(what, sizeof what, "%s, %s, %s/%s, %s, bias %d, grad_output %d, bad rows %d",
                                     kdl_sparse_mode_name((kdl_sparse_mode_t)m),
                                     kdl_divergence_name(kdl_all_divs[k]), kdl_dtype_name(dts[t][0]),
                                     kdl_dtype_name(dts[t][1]), kdl_reduction_name(reds[r]), bias, gout, bad_rows);
                            sp_check(&d, (kdl_sparse_mode_t)m, &p, bias, gout, what, bad_rows);
                            runs++;
                        }
                }
        }
    /* renormalised: 5 divergences, tail: all; 6 problems x 4 runs each */
    cr_expect_eq(runs, (5 + (int)KDL_NDIVS) * 6 * 4);
}

/* AKL's head rules (the head within the support; TAIL_BUCKET only). */
Test(sparse_teacher, akl_head_rules)
{
    const kdl_head_rule_t rules[3] = {KDL_HEAD_REFERENCE, KDL_HEAD_MASS, KDL_HEAD_TOPK};
    for (int r = 0; r < 3; r++)
        for (int topk = 1; topk <= SP_K; topk += 2) {
            if (rules[r] != KDL_HEAD_TOPK && topk > 1) continue;
            sp_prob_t p;
            sp_make(&p, KDL_DTYPE_F32, KDL_DTYPE_F32, 1, 3000 + 7 * r + topk);
            kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_NONE);
            d.head_rule = rules[r];
            d.mu = 0.4;
            d.top_k = topk;
            char what[64];
            snprintf(what, sizeof what, "akl head rule %d top_k %d", (int)rules[r], topk);
            sp_check(&d, KDL_SPARSE_TAIL_BUCKET, &p, 1, 1, what, 1);
        }
}

/* A caller built against version 3 (struct_size at the padded end of
 * teacher_linear_dtype), with garbage where version 4 has its fields,
 * behaves as before: its teacher logits.  Version 4 with the same garbage
 * is refused, and init's defaults ask for no sparse teacher. */
Test(sparse_teacher, version_3_callers)
{
    tl_prob_t p;
    tl_make(&p, KDL_DTYPE_F32, KDL_DTYPE_F32, 0, 1500);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_JSD, KDL_REDUCTION_NONE);
    tl_out_t want, got;
    kdl_fused_linear_args_t a;
    tl_older_caller(&d, &p, KDL_FUSED_LINEAR_ARGS_V3_SIZE, &want, &got, &a);
    got.status = kdl_ref_fused_linear_loss(&d, &a);
    tl_expect_same("version 3", &got, &want, TL_N);
    a.struct_size = sizeof a;
    cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_BAD_PARAM); /* teacher and teacher_indices */
    a.struct_size = KDL_FUSED_LINEAR_ARGS_V3_SIZE + 8;
    cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_BAD_STRUCT_SIZE);
    cr_expect_eq(KDL_FUSED_LINEAR_ARGS_V3_SIZE % 8, 0);
    kdl_fused_linear_args_t init;
    kdl_fused_linear_args_init(&init);
    cr_expect(init.teacher_indices == NULL && init.teacher_logprobs == NULL && init.bad_index_rows == NULL);
    cr_expect(init.k == 0 && init.ld_teacher_indices == 0 && init.ld_teacher_logprobs == 0);
    cr_expect(init.sparse_mode == KDL_SPARSE_RENORMALISED && init.teacher_logprobs_dtype == KDL_DTYPE_F32);
}

/* rows = 0: the loss is 0, dW and db zeroed, nothing read; the sparse rules
 * still apply (a divergence the mode does not define). */
Test(sparse_teacher, empty_batch)
{
    sp_prob_t p;
    sp_make(&p, KDL_DTYPE_F32, KDL_DTYPE_F32, 0, 1600);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_MEAN);
    sp_out_t o;
    memset(&o, 0, sizeof o);
    o.loss[0] = 42;
    for (int j = 0; j < SP_V * SP_D; j++) o.dW[j] = 9;
    kdl_fused_linear_args_t a = sp_args(KDL_SPARSE_RENORMALISED, &p, 1, 0, &o);
    a.rows = 0;
    a.hidden_states = NULL;
    a.teacher_indices = NULL;
    a.teacher_logprobs = NULL;
    cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect(o.loss[0] == 0.0);
    for (int j = 0; j < SP_V * SP_D; j++) cr_expect(o.dW[j] == 0.0);
    d.divergence = KDL_DIV_RKL;
    cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), KDL_STATUS_NOT_SUPPORTED);
}

/* Each sparse argument's status (kdl_sparse_validate's rules, reached
 * through the fused call); nothing is written on failure. */
static void bad_setup_sp(bad_case_t *c)
{
    static const int64_t idx[BAD_N * 2] = {0, 3, 4, 1};
    bad_setup(c);
    c->a.teacher = NULL;
    c->a.teacher_indices = idx;
    c->a.ld_teacher_indices = 2;
    c->a.teacher_logprobs = c->T; /* [2, 5] zeros, read as [2, 2] of ld 5: log-prob 0 (mass 1 each) */
    c->a.ld_teacher_logprobs = BAD_V;
    c->a.teacher_logprobs_dtype = KDL_DTYPE_F64;
    c->a.sparse_mode = KDL_SPARSE_RENORMALISED;
    c->a.k = 2;
}

#define BAD(what, expected, mutate) \
    KDL_EXPECT_BAD(bad_case_t, bad_setup_sp, bad_call, bad_untouched, what, expected, mutate)
#define BAD_GPU(what, expected, mutate) \
    KDL_EXPECT_BAD(bad_case_t, bad_setup_sp, bad_call_gpu_rule, bad_untouched, what, expected, mutate)

Test(sparse_teacher, bad_arguments)
{
    { /* the valid sparse problem itself succeeds */
        bad_case_t c;
        bad_setup_sp(&c);
        cr_assert_eq(bad_call(&c), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
        c.a.hidden_dtype = c.a.weight_dtype = c.a.grad_dtype = KDL_DTYPE_F32;
        c.a.teacher_logprobs_dtype = KDL_DTYPE_BF16;
        cr_expect_eq(bad_call_gpu_rule(&c), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    }
    BAD("teacher and teacher_indices", KDL_STATUS_BAD_PARAM, c->a.teacher = c->T);
    BAD("k with teacher logits", KDL_STATUS_BAD_PARAM,
        c->a.teacher = c->T; c->a.teacher_indices = NULL; c->a.teacher_logprobs = NULL);
    BAD("teacher_hidden and teacher_indices", KDL_STATUS_BAD_PARAM,
        c->a.teacher_hidden = c->H; c->a.teacher_weight = c->W; c->a.teacher_hidden_size = BAD_D;
        c->a.ld_teacher_hidden = c->a.ld_teacher_weight = BAD_D; c->a.teacher_linear_dtype = KDL_DTYPE_F64);
    BAD("teacher_bias and teacher_logprobs", KDL_STATUS_BAD_PARAM, c->a.teacher_bias = c->W);
    BAD("teacher_indices NULL", KDL_STATUS_NULL_POINTER, c->a.teacher_indices = NULL);
    BAD("teacher_logprobs NULL", KDL_STATUS_NULL_POINTER, c->a.teacher_logprobs = NULL);
    BAD("k 0", KDL_STATUS_BAD_TOP_K, c->a.k = 0);
    BAD("k > V", KDL_STATUS_BAD_TOP_K, c->a.k = BAD_V + 1; c->a.ld_teacher_indices = c->a.ld_teacher_logprobs = 8);
    BAD("k > 1024", KDL_STATUS_BAD_TOP_K, c->a.k = 1025);
    BAD("ld_indices < k", KDL_STATUS_BAD_STRIDE, c->a.ld_teacher_indices = 1);
    BAD("ld_logprobs < k", KDL_STATUS_BAD_STRIDE, c->a.ld_teacher_logprobs = 1);
    BAD("sparse_mode 2", KDL_STATUS_BAD_ENUM, c->a.sparse_mode = (kdl_sparse_mode_t)2);
    BAD("teacher_logprobs_dtype 7", KDL_STATUS_BAD_ENUM, c->a.teacher_logprobs_dtype = (kdl_dtype_t)7);
    BAD("rkl renormalised", KDL_STATUS_NOT_SUPPORTED, c->d.divergence = KDL_DIV_RKL);
    BAD("akl renormalised", KDL_STATUS_NOT_SUPPORTED, c->d.divergence = KDL_DIV_AKL);
    BAD("akl head top_k > k", KDL_STATUS_BAD_TOP_K,
        c->a.sparse_mode = KDL_SPARSE_TAIL_BUCKET; c->d.divergence = KDL_DIV_AKL; c->d.head_rule = KDL_HEAD_TOPK;
        c->d.top_k = 3);
    BAD("teacher_indices misaligned", KDL_STATUS_MISALIGNED,
        c->a.teacher_indices = (const int64_t *)(const void *)((const char *)c->a.teacher_indices + 4));
    BAD("teacher_logprobs misaligned", KDL_STATUS_MISALIGNED, c->a.teacher_logprobs = (const char *)c->T + 2);
    BAD("bad_index_rows misaligned", KDL_STATUS_MISALIGNED,
        c->a.bad_index_rows = (int64_t *)(void *)((char *)&c->r.info + 1));
    BAD("ld_indices INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, c->a.ld_teacher_indices = INT64_MAX);
    BAD_GPU("f64 log-probs on the GPU", KDL_STATUS_NOT_SUPPORTED,
            c->a.hidden_dtype = c->a.weight_dtype = c->a.grad_dtype = KDL_DTYPE_F32);
    { /* tail mode with the same AKL head within the support succeeds */
        bad_case_t c;
        bad_setup_sp(&c);
        c.a.sparse_mode = KDL_SPARSE_TAIL_BUCKET;
        c.d.divergence = KDL_DIV_AKL;
        c.d.head_rule = KDL_HEAD_TOPK;
        c.d.top_k = 2;
        cr_expect_eq(kdl_fused_linear_validate(&c.d, &c.a, 1), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    }
}
#undef BAD
#undef BAD_GPU
