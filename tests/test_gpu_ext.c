/*
 * tests/test_gpu_ext.c - the extension kernels (kdloss_ext.h) against the
 * float64 references: sparse teacher (both modes, every divergence each
 * defines, bad indices, a 151936 vocabulary that needs opt-in shared
 * memory), vocabulary-parallel steps over 3 shards on one device with the
 * reduces done on the host (loss, gradient, AKL head), and fused linear +
 * loss (loss, dH, dW; chunks that do not divide N).
 *
 * Every GPU test starts with KDL_SKIP_WITHOUT_GPU(): on a machine without a
 * CUDA device they are reported as skipped, visibly.  The argument checks
 * that need no device run everywhere.
 */
#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdl_test.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"

#ifdef KDL_HAVE_CUDA
#include <cuda_runtime_api.h>

#define CUDA_OK(call)                                                                          \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        cr_assert_eq(e_, cudaSuccess, "%s: %s", #call, cudaGetErrorString(e_));                \
    } while (0)

static void *dup_dev(const void *src, size_t bytes)
{
    void *p = NULL;
    CUDA_OK(cudaMalloc(&p, bytes ? bytes : 1));
    if (src && bytes) CUDA_OK(cudaMemcpy(p, src, bytes, cudaMemcpyHostToDevice));
    return p;
}
static void get_dev(void *dst, const void *src, size_t bytes) { CUDA_OK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost)); }

/* Float32-appropriate tolerance relative to the largest reference entry. */
static kdl_tol_t scaled_tol(const double *ref, size_t n, double rel)
{
    double m = 0;
    for (size_t j = 0; j < n; j++)
        if (isfinite(ref[j])) m = fmax(m, fabs(ref[j]));
    kdl_tol_t t = {rel, rel * m + 1e-12};
    return t;
}
#endif

/* ------------------------------------------------------ no device needed */
Test(args, checked_before_any_device_use)
{
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_MEAN);
    kdl_sparse_args_t s;
    kdl_sparse_args_init(&s);
    cr_expect_eq(kdl_sparse_loss(NULL, &d, &s, NULL, 0), KDL_STATUS_NULL_POINTER);
    kdl_fused_linear_args_t f;
    kdl_fused_linear_args_init(&f);
    cr_expect_eq(kdl_fused_linear_loss(NULL, &d, &f, NULL, 0), KDL_STATUS_NULL_POINTER);
    kdl_shard_args_t a;
    kdl_shard_args_init(&a);
    kdl_shard_op_t op;
    int64_t cnt;
    cr_expect_eq(kdl_shard_step(NULL, &d, &a, 0, &op, &cnt), KDL_STATUS_NULL_POINTER);
    size_t b;
    cr_expect_eq(kdl_sparse_workspace_size(NULL, &d, &s, &b), KDL_STATUS_NULL_POINTER);
}

#ifdef KDL_HAVE_CUDA
/* ---------------------------------------------------------- sparse teacher */
static void sparse_case(kdl_sparse_mode_t mode, kdl_divergence_t div, kdl_reduction_t red, int64_t N, int64_t V,
                        int64_t k, uint64_t seed, int bad_rows)
{
    size_t nv = (size_t)(N * V), nk = (size_t)(N * k);
    double *S = (double *)malloc(nv * sizeof(double)), *P = (double *)malloc(nk * sizeof(double));
    float *Sf = (float *)malloc(nv * 4), *Pf = (float *)malloc(nk * 4);
    int64_t *I = (int64_t *)malloc(nk * 8);
    kdl_rng_t g = {seed};
    kdl_fill_logits(&g, S, (int64_t)nv, 2.0);
    /* row i: support {(13 i + j) mod V}, log-probs of a random top-k
     * teacher holding 0.9 of the mass (the tail bucket 0.1) */
    double *t = (double *)malloc((size_t)k * sizeof(double));
    for (int64_t i = 0; i < N; i++) {
        kdl_fill_logits(&g, t, k, 2.0);
        double mx = -INFINITY, z = 0;
        for (int64_t j = 0; j < k; j++) mx = fmax(mx, t[j]);
        for (int64_t j = 0; j < k; j++) z += exp(t[j] - mx);
        for (int64_t j = 0; j < k; j++) {
            I[i * k + j] = (i * 13 + j) % V;
            P[i * k + j] = t[j] - mx - log(z) + log(0.9);
        }
    }
    free(t);
    if (bad_rows && N > 2) {
        I[1 * k + 0] = V;             /* out of range */
        I[2 * k + 1] = I[2 * k + 0];  /* repeated */
    }
    kdl_to_dtype(S, Sf, KDL_DTYPE_F32, (int64_t)nv);
    kdl_to_dtype(P, Pf, KDL_DTYPE_F32, (int64_t)nk);
    kdl_from_dtype(Sf, S, KDL_DTYPE_F32, (int64_t)nv);
    kdl_from_dtype(Pf, P, KDL_DTYPE_F32, (int64_t)nk);

    kdl_loss_desc_t d = kdl_test_desc(div, red);
    d.temperature = 1.3;
    size_t nl = red == KDL_REDUCTION_NONE ? (size_t)N : 1;
    double *rl = (double *)calloc(nl, sizeof(double)), *rg = (double *)calloc(nv, sizeof(double));
    int64_t rinfo = 0, rvalid = 0, rbad = 0;
    kdl_sparse_args_t a;
    kdl_sparse_args_init(&a);
    a.mode = mode;
    a.rows = N;
    a.vocab = V;
    a.k = k;
    a.student = S;
    a.ld_student = V;
    a.student_dtype = KDL_DTYPE_F64;
    a.teacher_indices = I;
    a.ld_indices = k;
    a.teacher_logprobs = P;
    a.ld_logprobs = k;
    a.teacher_dtype = KDL_DTYPE_F64;
    a.grad = rg;
    a.ld_grad = V;
    a.grad_dtype = KDL_DTYPE_F64;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = rl;
    a.info = &rinfo;
    a.valid_rows = &rvalid;
    a.bad_index_rows = &rbad;
    cr_assert_eq(kdl_ref_sparse_loss(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());

    kdl_handle_t h;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS);
    kdl_sparse_args_t da = a;
    da.student = dup_dev(Sf, nv * 4);
    da.student_dtype = KDL_DTYPE_F32;
    da.teacher_indices = (const int64_t *)dup_dev(I, nk * 8);
    da.teacher_logprobs = dup_dev(Pf, nk * 4);
    da.teacher_dtype = KDL_DTYPE_F32;
    da.grad = dup_dev(NULL, nv * 4);
    da.grad_dtype = KDL_DTYPE_F32;
    da.loss = dup_dev(NULL, nl * 8);
    da.info = (int64_t *)dup_dev(NULL, 8);
    da.valid_rows = (int64_t *)dup_dev(NULL, 8);
    da.bad_index_rows = (int64_t *)dup_dev(NULL, 8);
    size_t wsb = 0;
    cr_assert_eq(kdl_sparse_workspace_size(h, &d, &da, &wsb), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    void *ws = dup_dev(NULL, wsb);
    if (wsb) cr_expect_eq(kdl_sparse_loss(h, &d, &da, ws, wsb - 1), KDL_STATUS_WORKSPACE_TOO_SMALL);
    cr_assert_eq(kdl_sparse_loss(h, &d, &da, ws, wsb), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    CUDA_OK(cudaDeviceSynchronize());
    double *gl = (double *)malloc(nl * 8), *gg = (double *)malloc(nv * 8);
    float *g32 = (float *)malloc(nv * 4);
    int64_t ginfo, gvalid, gbad;
    get_dev(gl, da.loss, nl * 8);
    get_dev(g32, da.grad, nv * 4);
    get_dev(&ginfo, da.info, 8);
    get_dev(&gvalid, da.valid_rows, 8);
    get_dev(&gbad, da.bad_index_rows, 8);
    for (size_t j = 0; j < nv; j++) gg[j] = g32[j];
    char what[96];
    snprintf(what, sizeof what, "sparse %s %s red %d V %lld k %lld", kdl_sparse_mode_name(mode), kdl_divergence_name(div),
             (int)red, (long long)V, (long long)k);
    KDL_EXPECT_CLOSE(what, gl, rl, nl, scaled_tol(rl, nl, 2e-4));
    KDL_EXPECT_CLOSE(what, gg, rg, nv, scaled_tol(rg, nv, 2e-4));
    cr_expect(ginfo == rinfo && gvalid == rvalid && gbad == rbad, "%s: counters", what);
    cudaFree((void *)da.student);
    cudaFree((void *)da.teacher_indices);
    cudaFree((void *)da.teacher_logprobs);
    cudaFree(da.grad);
    cudaFree(da.loss);
    cudaFree(da.info);
    cudaFree(da.valid_rows);
    cudaFree(da.bad_index_rows);
    cudaFree(ws);
    kdl_destroy(h);
    free(S);
    free(P);
    free(Sf);
    free(Pf);
    free(I);
    free(rl);
    free(rg);
    free(gl);
    free(gg);
    free(g32);
}

Test(gpu_sparse, every_divergence_both_modes)
{
    KDL_SKIP_WITHOUT_GPU();
    for (int m = 0; m < KDL_SPARSE_MODE_COUNT_; m++)
        for (size_t k = 0; k < KDL_NDIVS; k++) {
            if (!kdl_sparse_supports((kdl_sparse_mode_t)m, kdl_all_divs[k])) continue;
            sparse_case((kdl_sparse_mode_t)m, kdl_all_divs[k], KDL_REDUCTION_NONE, 6, 1283, 37, 10 + k, 0);
            sparse_case((kdl_sparse_mode_t)m, kdl_all_divs[k], KDL_REDUCTION_MEAN, 6, 1283, 37, 20 + k, 1);
        }
}

Test(gpu_sparse, full_k_and_large_vocabulary)
{
    KDL_SKIP_WITHOUT_GPU();
    sparse_case(KDL_SPARSE_TAIL_BUCKET, KDL_DIV_AKL, KDL_REDUCTION_SUM, 3, 1024, 1024, 31, 0);
    sparse_case(KDL_SPARSE_RENORMALISED, KDL_DIV_FKL, KDL_REDUCTION_MEAN, 2, 151936, 1024, 32, 0);
    sparse_case(KDL_SPARSE_TAIL_BUCKET, KDL_DIV_JSD, KDL_REDUCTION_SUM, 2, 151936, 64, 33, 0);
}

/* ----------------------------------------------------- vocabulary-parallel */
static void shard_case(kdl_divergence_t div, kdl_head_rule_t rule, int64_t N, int64_t V, uint64_t seed)
{
    enum { R = 3 };
    size_t nv = (size_t)(N * V);
    double *S = (double *)malloc(nv * 8), *T = (double *)malloc(nv * 8);
    float *Sf = (float *)malloc(nv * 4), *Tf = (float *)malloc(nv * 4);
    kdl_rng_t g = {seed};
    kdl_fill_logits(&g, S, (int64_t)nv, 2.0);
    kdl_fill_logits(&g, T, (int64_t)nv, 2.0);
    T[3] = T[V / 2] = T[V - 2]; /* a tie across shards in row 0 */
    kdl_to_dtype(S, Sf, KDL_DTYPE_F32, (int64_t)nv);
    kdl_to_dtype(T, Tf, KDL_DTYPE_F32, (int64_t)nv);
    kdl_loss_desc_t d = kdl_test_desc(div, KDL_REDUCTION_MEAN);
    d.head_rule = rule;
    d.top_k = 17;
    /* reference: the dense loss on the same float32 data */
    double rl = 0, *rg = (double *)calloc(nv, 8);
    int64_t *rhs = (int64_t *)calloc((size_t)N, 8);
    kdl_loss_args_t la;
    kdl_loss_args_init(&la);
    la.rows = N;
    la.vocab = V;
    la.student = Sf;
    la.teacher = Tf;
    la.ld_student = la.ld_teacher = la.ld_grad = V;
    la.student_dtype = la.teacher_dtype = KDL_DTYPE_F32;
    la.grad = rg;
    la.grad_dtype = la.out_dtype = KDL_DTYPE_F64;
    la.loss = &rl;
    la.stat_head_size = rhs;
    cr_assert_eq(kdl_ref_loss_forward_backward(&d, &la), KDL_STATUS_SUCCESS);

    kdl_handle_t h;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS);
    float *dS = (float *)dup_dev(Sf, nv * 4), *dT = (float *)dup_dev(Tf, nv * 4), *dG = (float *)dup_dev(NULL, nv * 4);
    double *dl = (double *)dup_dev(NULL, 8);
    int64_t *dhs = (int64_t *)dup_dev(NULL, (size_t)N * 8);
    const int64_t w[R] = {V / 3, V / 2, V - V / 3 - V / 2};
    kdl_shard_args_t a[R];
    void *state[R];
    double *ex[R];
    size_t sb = 0, ec = 0;
    int ns = 0;
    int64_t off = 0;
    for (int r = 0; r < R; r++) {
        kdl_shard_args_init(&a[r]);
        a[r].rows = N;
        a[r].vocab = V;
        a[r].vocab_offset = off;
        a[r].vocab_local = w[r];
        a[r].shard_rank = r;
        a[r].num_shards = R;
        a[r].student = dS + off;
        a[r].teacher = dT + off;
        a[r].ld_student = a[r].ld_teacher = a[r].ld_grad = V;
        a[r].grad = dG + off;
        a[r].out_dtype = KDL_DTYPE_F64;
        a[r].loss = dl;
        a[r].stat_head_size = r == 0 ? dhs : NULL;
        cr_assert_eq(kdl_shard_sizes(&d, &a[r], &sb, &ec, &ns), KDL_STATUS_SUCCESS);
        state[r] = dup_dev(NULL, sb);
        ex[r] = (double *)dup_dev(NULL, ec * 8);
        a[r].state = state[r];
        a[r].exchange = ex[r];
        off += w[r];
    }
    double *acc = (double *)malloc(ec * 8), *tmp = (double *)malloc(ec * 8);
    for (int step = 0; step < ns; step++) {
        kdl_shard_op_t op = KDL_SHARD_OP_DONE;
        int64_t cnt = 0;
        for (int r = 0; r < R; r++)
            cr_assert_eq(kdl_shard_step(h, &d, &a[r], step, &op, &cnt), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
        if (op == KDL_SHARD_OP_DONE) break;
        for (int r = 0; r < R; r++) {
            get_dev(tmp, ex[r], (size_t)cnt * 8);
            for (int64_t j = 0; j < cnt; j++)
                acc[j] = r == 0 ? tmp[j] : op == KDL_SHARD_OP_MAX ? fmax(acc[j], tmp[j]) : acc[j] + tmp[j];
        }
        for (int r = 0; r < R; r++) CUDA_OK(cudaMemcpy(ex[r], acc, (size_t)cnt * 8, cudaMemcpyHostToDevice));
    }
    CUDA_OK(cudaDeviceSynchronize());
    double gl;
    float *g32 = (float *)malloc(nv * 4);
    double *gg = (double *)malloc(nv * 8);
    int64_t *ghs = (int64_t *)malloc((size_t)N * 8);
    get_dev(&gl, dl, 8);
    get_dev(g32, dG, nv * 4);
    get_dev(ghs, dhs, (size_t)N * 8);
    for (size_t j = 0; j < nv; j++) gg[j] = g32[j];
    char what[64];
    snprintf(what, sizeof what, "shard %s rule %d", kdl_divergence_name(div), (int)rule);
    KDL_EXPECT_CLOSE(what, &gl, &rl, 1, scaled_tol(&rl, 1, 2e-4));
    KDL_EXPECT_CLOSE(what, gg, rg, nv, scaled_tol(rg, nv, 2e-4));
    if (div == KDL_DIV_AKL)
        for (int64_t i = 0; i < N; i++) cr_expect_eq(ghs[i], rhs[i], "%s row %lld head size", what, (long long)i);
    for (int r = 0; r < R; r++) {
        cudaFree(state[r]);
        cudaFree(ex[r]);
    }
    cudaFree(dS);
    cudaFree(dT);
    cudaFree(dG);
    cudaFree(dl);
    cudaFree(dhs);
    kdl_destroy(h);
    free(S);
    free(T);
    free(Sf);
    free(Tf);
    free(rg);
    free(rhs);
    free(acc);
    free(tmp);
    free(g32);
    free(gg);
    free(ghs);
}

Test(gpu_shard, three_shards_equal_unsharded)
{
    KDL_SKIP_WITHOUT_GPU();
    for (size_t k = 0; k < KDL_NDIVS; k++) shard_case(kdl_all_divs[k], KDL_HEAD_REFERENCE, 5, 3001, 100 + k);
    shard_case(KDL_DIV_AKL, KDL_HEAD_MASS, 4, 32000, 200);
    shard_case(KDL_DIV_AKL, KDL_HEAD_TOPK, 4, 32000, 201);
}

/* ------------------------------------------------------------ fused linear */
static void fused_case(kdl_divergence_t div, kdl_reduction_t red, int64_t N, int64_t D, int64_t V, int64_t chunk,
                       uint64_t seed)
{
    size_t nh = (size_t)(N * D), nw = (size_t)(V * D), nt = (size_t)(N * V);
    float *H = (float *)malloc(nh * 4), *W = (float *)malloc(nw * 4), *T = (float *)malloc(nt * 4);
    kdl_rng_t g = {seed};
    for (size_t j = 0; j < nh; j++) H[j] = (float)kdl_rng_normal(&g);
    for (size_t j = 0; j < nw; j++) W[j] = (float)(0.2 * kdl_rng_normal(&g));
    for (size_t j = 0; j < nt; j++) T[j] = (float)(2 * kdl_rng_normal(&g));
    int64_t *labels = (int64_t *)malloc((size_t)N * 8);
    for (int64_t i = 0; i < N; i++) labels[i] = i % 5 == 3 ? -100 : 1;
    kdl_loss_desc_t d = kdl_test_desc(div, red);
    size_t nl = red == KDL_REDUCTION_NONE ? (size_t)N : 1;
    double *rl = (double *)calloc(nl, 8), *rh = (double *)calloc(nh, 8), *rw = (double *)calloc(nw, 8);
    kdl_fused_linear_args_t a;
    kdl_fused_linear_args_init(&a);
    a.rows = N;
    a.hidden = D;
    a.vocab = V;
    a.hidden_states = H;
    a.ld_hidden = D;
    a.weight = W;
    a.ld_weight = D;
    a.teacher = T;
    a.ld_teacher = V;
    a.labels = labels;
    a.grad_hidden = rh;
    a.ld_grad_hidden = D;
    a.grad_weight = rw;
    a.ld_grad_weight = D;
    a.grad_dtype = KDL_DTYPE_F64;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = rl;
    a.chunk_rows = chunk;
    cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    kdl_handle_t h;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS);
    kdl_fused_linear_args_t da = a;
    da.hidden_states = dup_dev(H, nh * 4);
    da.weight = dup_dev(W, nw * 4);
    da.teacher = dup_dev(T, nt * 4);
    da.labels = (const int64_t *)dup_dev(labels, (size_t)N * 8);
    da.grad_hidden = dup_dev(NULL, nh * 4);
    da.grad_weight = dup_dev(NULL, nw * 4);
    da.grad_dtype = KDL_DTYPE_F32;
    da.loss = dup_dev(NULL, nl * 8);
    size_t wsb = 0;
    cr_assert_eq(kdl_fused_linear_workspace_size(h, &d, &da, &wsb), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    void *ws = dup_dev(NULL, wsb);
    cr_assert_eq(kdl_fused_linear_loss(h, &d, &da, ws, wsb), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    CUDA_OK(cudaDeviceSynchronize());
    double *gl = (double *)malloc(nl * 8), *gh = (double *)malloc(nh * 8), *gw = (double *)malloc(nw * 8);
    float *f = (float *)malloc((nh > nw ? nh : nw) * 4);
    get_dev(gl, da.loss, nl * 8);
    get_dev(f, da.grad_hidden, nh * 4);
    for (size_t j = 0; j < nh; j++) gh[j] = f[j];
    get_dev(f, da.grad_weight, nw * 4);
    for (size_t j = 0; j < nw; j++) gw[j] = f[j];
    char what[64];
    snprintf(what, sizeof what, "fused %s red %d chunk %lld", kdl_divergence_name(div), (int)red, (long long)chunk);
    KDL_EXPECT_CLOSE(what, gl, rl, nl, scaled_tol(rl, nl, 5e-4));
    KDL_EXPECT_CLOSE(what, gh, rh, nh, scaled_tol(rh, nh, 5e-4));
    KDL_EXPECT_CLOSE(what, gw, rw, nw, scaled_tol(rw, nw, 5e-4));
    cudaFree((void *)da.hidden_states);
    cudaFree((void *)da.weight);
    cudaFree((void *)da.teacher);
    cudaFree((void *)da.labels);
    cudaFree(da.grad_hidden);
    cudaFree(da.grad_weight);
    cudaFree(da.loss);
    cudaFree(ws);
    kdl_destroy(h);
    free(H);
    free(W);
    free(T);
    free(labels);
    free(rl);
    free(rh);
    free(rw);
    free(gl);
    free(gh);
    free(gw);
    free(f);
}

Test(gpu_fused_linear, every_gpu_divergence_against_reference)
{
    KDL_SKIP_WITHOUT_GPU();
    for (size_t k = 0; k < KDL_NDIVS; k++) {
        if (kdl_all_divs[k] == KDL_DIV_AKL) continue;
        fused_case(kdl_all_divs[k], KDL_REDUCTION_MEAN, 37, 48, 1001, 8, 300 + k);
        fused_case(kdl_all_divs[k], KDL_REDUCTION_NONE, 13, 32, 517, 0, 400 + k);
    }
}

Test(gpu_fused_linear, akl_is_not_supported_and_workspace_checked)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_MEAN);
    float dummy[64] = {0};
    double loss;
    kdl_fused_linear_args_t a;
    kdl_fused_linear_args_init(&a);
    a.rows = 2;
    a.hidden = 4;
    a.vocab = 8;
    a.hidden_states = a.weight = a.teacher = dummy;
    a.ld_hidden = a.ld_weight = 4;
    a.ld_teacher = 8;
    a.loss = &loss;
    size_t b;
    cr_expect_eq(kdl_fused_linear_workspace_size(h, &d, &a, &b), KDL_STATUS_NOT_SUPPORTED);
    d.divergence = KDL_DIV_FKL;
    cr_expect_eq(kdl_fused_linear_workspace_size(h, &d, &a, &b), KDL_STATUS_SUCCESS);
    cr_expect_eq(kdl_fused_linear_loss(h, &d, &a, dummy, 16), KDL_STATUS_WORKSPACE_TOO_SMALL);
    kdl_destroy(h);
}
#endif /* KDL_HAVE_CUDA */
