/*
 * tests/test_fused_linear_ref.c - the fused linear + loss reference
 * (kdloss_ext.h part 3) against independent answers: central finite
 * differences of the loss with respect to every entry of H and W, and the
 * dense reference on logits the test materialises itself (its own matrix
 * products for the logits and for dH, dW).
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static void random_fill(uint64_t seed, double *x, int64_t n, double sigma)
{
    kdl_rng_t g = {seed};
    for (int64_t i = 0; i < n; i++) x[i] = sigma * kdl_rng_normal(&g);
}

static kdl_fused_linear_args_t fargs(const void *H, const void *W, const double *T, const int64_t *labels,
                                     int64_t N, int64_t D, int64_t V, fres_t *r)
{
    kdl_fused_linear_args_t a;
    kdl_fused_linear_args_init(&a);
    a.rows = N;
    a.hidden = D;
    a.vocab = V;
    a.hidden_states = H;
    a.ld_hidden = D;
    a.hidden_dtype = KDL_DTYPE_F64;
    a.weight = W;
    a.ld_weight = D;
    a.weight_dtype = KDL_DTYPE_F64;
    a.teacher = T;
    a.ld_teacher = V;
    a.teacher_dtype = KDL_DTYPE_F64;
    a.labels = labels;
    a.grad_hidden = r->dH;
    a.ld_grad_hidden = D;
    a.grad_weight = r->dW;
    a.ld_grad_weight = D;
    a.grad_dtype = KDL_DTYPE_F64;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = r->loss;
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

static double loss_of(const kdl_loss_desc_t *d, const double *H, const double *W, const double *T,
                      const int64_t *labels, int64_t N, int64_t D, int64_t V)
{
    fres_t r;
    run_fused(d, H, W, T, labels, N, D, V, &r);
    cr_assert_eq(r.status, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    return r.loss[0];
}

/* d(loss)/dH and d(loss)/dW by central differences (SUM or MEAN loss). */
static void check_fd(kdl_divergence_t div, kdl_reduction_t red, double tau, uint64_t seed)
{
    enum { N = 3, D = 5, V = 13 };
    double H[N * D], W[V * D], T[N * V];
    random_fill(seed, H, N * D, 1.0);
    random_fill(seed + 1, W, V * D, 0.7);
    random_fill(seed + 2, T, N * V, 2.0);
    const int64_t labels[N] = {1, -100, 4};
    kdl_loss_desc_t d = kdl_test_desc(div, red);
    d.temperature = tau;
    d.scale = 1.25;
    fres_t base;
    run_fused(&d, H, W, T, labels, N, D, V, &base);
    cr_assert_eq(base.status, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect_eq(base.valid, 2);
    const double h = 1e-5;
    double fdH[N * D], fdW[V * D];
    for (int j = 0; j < N * D; j++) {
        double x = H[j];
        H[j] = x + h;
        double up = loss_of(&d, H, W, T, labels, N, D, V);
        H[j] = x - h;
        double dn = loss_of(&d, H, W, T, labels, N, D, V);
        H[j] = x;
        fdH[j] = (up - dn) / (2 * h);
    }
    for (int j = 0; j < V * D; j++) {
        double x = W[j];
        W[j] = x + h;
        double up = loss_of(&d, H, W, T, labels, N, D, V);
        W[j] = x - h;
        double dn = loss_of(&d, H, W, T, labels, N, D, V);
        W[j] = x;
        fdW[j] = (up - dn) / (2 * h);
    }
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
    random_fill(300, H, N * D, 1.0);
    random_fill(301, W, V * D, 0.8);
    random_fill(302, T, N * V, 2.0);
    double L[V];
    for (int v = 0; v < V; v++) {
        L[v] = 0;
        for (int k = 0; k < D; k++) L[v] += H[k] * W[v * D + k];
    }
    double wh, wt, dl;
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
    kdl_loss_args_t la;
    kdl_loss_args_init(&la);
    la.rows = 1;
    la.vocab = V;
    la.student = L;
    la.teacher = T;
    la.ld_student = la.ld_teacher = V;
    la.student_dtype = la.teacher_dtype = la.out_dtype = KDL_DTYPE_F64;
    la.loss = &dl;
    la.stat_w_head = &wh;
    la.stat_w_tail = &wt;
    cr_assert_eq(kdl_ref_loss_forward_backward(&d, &la), KDL_STATUS_SUCCESS);
    fres_t base;
    run_fused(&d, H, W, T, NULL, N, D, V, &base);
    cr_assert_eq(base.status, KDL_STATUS_SUCCESS);
    kdl_loss_desc_t df = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM), dr = kdl_test_desc(KDL_DIV_RKL, KDL_REDUCTION_SUM);
    double fdH[D], fdW[V * D];
    for (int j = 0; j < D + V * D; j++) {
        double *x = j < D ? &H[j] : &W[j - D];
        double x0 = *x;
        *x = x0 + 1e-5;
        double up = wh * loss_of(&df, H, W, T, NULL, N, D, V) + wt * loss_of(&dr, H, W, T, NULL, N, D, V);
        *x = x0 - 1e-5;
        double dn = wh * loss_of(&df, H, W, T, NULL, N, D, V) + wt * loss_of(&dr, H, W, T, NULL, N, D, V);
        *x = x0;
        (j < D ? fdH : fdW)[j < D ? j : j - D] = (up - dn) / 2e-5;
    }
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
        random_fill(400 + k, H, N * D, 1.0);
        random_fill(500 + k, W, V * D, 0.9);
        random_fill(600 + k, T, N * V, 2.0);
        for (int i = 0; i < N; i++)
            for (int v = 0; v < V; v++) {
                double s = 0;
                for (int j = 0; j < D; j++) s += H[i * D + j] * W[v * D + j];
                L[i * V + v] = s;
            }
        kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], KDL_REDUCTION_NONE);
        d.temperature = 1.5;
        double dloss[N];
        kdl_loss_args_t la;
        kdl_loss_args_init(&la);
        la.rows = N;
        la.vocab = V;
        la.student = L;
        la.teacher = T;
        la.ld_student = la.ld_teacher = la.ld_grad = V;
        la.student_dtype = la.teacher_dtype = la.grad_dtype = la.out_dtype = KDL_DTYPE_F64;
        la.grad = dL;
        la.loss = dloss;
        cr_assert_eq(kdl_ref_loss_forward_backward(&d, &la), KDL_STATUS_SUCCESS);
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
    random_fill(700, H, N * D, 1.0);
    random_fill(701, W, V * D, 1.0);
    random_fill(702, T, N * V, 1.0);
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
    random_fill(800, W, V * D, 1.0);
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
    random_fill(900, H, N * D, 1.0);
    random_fill(901, W, V * D, 1.0);
    random_fill(902, T, N * V, 1.0);
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

Test(api, chunk_rows_and_bad_arguments)
{
    kdl_fused_linear_args_t c;
    kdl_fused_linear_args_init(&c);
    c.rows = 100;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&c), 12);
    c.rows = 5;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&c), 1);
    c.rows = 1 << 20;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&c), 4096);
    c.chunk_rows = 64;
    c.rows = 10;
    cr_expect_eq(kdl_fused_linear_chunk_rows(&c), 10);

    enum { N = 2, D = 3, V = 5 };
    double H[N * D] = {0}, W[V * D] = {0}, T[N * V] = {0};
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    fres_t r;
    memset(&r, 0, sizeof r);
    r.loss[0] = 42;
#define EXPECT_STATUS(want, mutate)                                                           \
    do {                                                                                      \
        kdl_loss_desc_t dd = d;                                                               \
        kdl_fused_linear_args_t a = fargs(H, W, T, NULL, N, D, V, &r);                        \
        mutate;                                                                               \
        kdl_status_t st = kdl_ref_fused_linear_loss(&dd, &a);                                 \
        cr_expect_eq(st, want, "%s: %s (%s)", #mutate, kdl_status_string(st), kdl_get_last_error()); \
        cr_expect(r.loss[0] == 42, "%s wrote the loss", #mutate);                             \
    } while (0)
    EXPECT_STATUS(KDL_STATUS_BAD_SIZE, a.hidden = 0);
    EXPECT_STATUS(KDL_STATUS_BAD_SIZE, a.vocab = 0);
    EXPECT_STATUS(KDL_STATUS_BAD_SIZE, a.rows = -2);
    EXPECT_STATUS(KDL_STATUS_BAD_SIZE, a.chunk_rows = -1);
    EXPECT_STATUS(KDL_STATUS_BAD_STRIDE, a.ld_hidden = D - 1);
    EXPECT_STATUS(KDL_STATUS_BAD_STRIDE, a.ld_weight = D - 1);
    EXPECT_STATUS(KDL_STATUS_BAD_STRIDE, a.ld_teacher = V - 1);
    EXPECT_STATUS(KDL_STATUS_BAD_STRIDE, a.ld_grad_hidden = 1);
    EXPECT_STATUS(KDL_STATUS_BAD_STRIDE, a.ld_grad_weight = 1);
    EXPECT_STATUS(KDL_STATUS_NULL_POINTER, a.weight = NULL);
    EXPECT_STATUS(KDL_STATUS_NULL_POINTER, a.hidden_states = NULL);
    EXPECT_STATUS(KDL_STATUS_NULL_POINTER, a.teacher = NULL);
    EXPECT_STATUS(KDL_STATUS_NULL_POINTER, a.loss = NULL);
    EXPECT_STATUS(KDL_STATUS_NOT_SUPPORTED, a.grad_dtype = KDL_DTYPE_BF16);
    EXPECT_STATUS(KDL_STATUS_BAD_STRUCT_SIZE, a.struct_size = 0);
    EXPECT_STATUS(KDL_STATUS_BAD_MU, dd.mu = 1.5);
#undef EXPECT_STATUS
    /* the GPU path's narrower contract, checked without a device */
    kdl_fused_linear_args_t a = fargs(H, W, T, NULL, N, D, V, &r);
    cr_expect_eq(kdl_fused_linear_validate(&d, &a, 0), KDL_STATUS_NOT_SUPPORTED, "f64 hidden on the GPU path");
    a.hidden_dtype = a.weight_dtype = a.teacher_dtype = a.grad_dtype = KDL_DTYPE_F32;
    cr_expect_eq(kdl_fused_linear_validate(&d, &a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    d.divergence = KDL_DIV_AKL;
    cr_expect_eq(kdl_fused_linear_validate(&d, &a, 0), KDL_STATUS_NOT_SUPPORTED);
}
