/*
 * tests/test_gpu_loss.c - the fused CUDA loss (kdl_loss_forward_backward)
 * against the float64 reference (kdl_ref_loss_forward_backward), fed the
 * exact same f32/f16/bf16 values.
 *
 * Matrix: every divergence x dtype pair (f32, f16, bf16, mixed) x head rule
 * on random rows; adversarial batches (bf16 ties, -inf entries, one-hot
 * teachers, identical rows, V = 1 and 1271, ld > V with NaN-poisoned
 * padding, misaligned bases, ignored and invalid rows); real vocabularies
 * (32000, 128256, 151936) through every launch path (KDL_LOSS_PATH);
 * reductions, scale, temperature, out dtype f64; MEAN with invalid rows
 * (16-bit gradients within 1/2 ulp of the reference, review F2);
 * determinism (two runs bitwise equal); workspace too small; empty batch.
 *
 * Tolerances: loss and statistics use input_tol() (f32 inputs: 1e-5
 * relative, 4e-6 absolute; f16/bf16 inputs: 1e-3).  Gradients:
 * |got - ref| <= rtol |ref| + atol_j with atol_j = |g| 3e-6 (q_j + p_j)(2 + |log q_j| +
 * |log p_j|) (float32 error of the element terms, g = the gradient factor)
 * and rtol 1e-5 (f32 gradient), 2e-3 (f16), 8e-3 (bf16: two output ulps),
 * through kdl_compare on values divided by atol_j.  The AKL head boundary
 * is checked exactly (head_size); mu is moved off any cumulative mass
 * within 1e-5 of it (docs/kernels.md: float32 boundary caveat).
 *
 * Every test starts with KDL_SKIP_WITHOUT_GPU(): without a device the suite
 * reports them skipped.
 */
#define _POSIX_C_SOURCE 200809L /* setenv, unsetenv */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kdl_test.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ref.h"

#ifndef KDL_HAVE_CUDA
Test(gpu_loss, built_without_cuda)
{
    cr_skip_test("kdloss built without CUDA: GPU loss tests skipped");
}
#else
#include <cuda_runtime_api.h>

#include "../kernels/launch.h"

#define CUDA_OK(call)                                                                          \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        cr_assert_eq(e_, cudaSuccess, "%s: %s", #call, cudaGetErrorString(e_));                \
    } while (0)


/* ------------------------------------------------------------ row kinds */
enum row_kind {
    ROW_RANDOM,
    ROW_TIES16,     /* narrow teacher: long runs of equal 16-bit values       */
    ROW_NEGINF,     /* a third of the vocabulary -inf in both (masked tokens) */
    ROW_ONEHOT,     /* teacher one huge logit                                 */
    ROW_IDENTICAL,  /* student == teacher                                     */
    ROW_SHIFTED,    /* student = teacher + 100 (shift invariance)             */
    ROW_FEWVALUES,  /* teacher in {0,1,2,3}: few, huge tie groups             */
    ROW_IGNORED,    /* label == ignore_index                                  */
    ROW_NAN,        /* a NaN student logit: invalid                           */
    ROW_POSINF,     /* a +inf teacher logit: invalid                          */
    ROW_ALLNEGINF   /* every student logit -inf: invalid                      */
};

/* ---------------------------------------------------------------- a case */
typedef struct gcase {
    kdl_loss_desc_t d;
    int64_t N, V, lds, ldt, ldg;
    kdl_dtype_t sdt, tdt, gdt, odt;
    int grad, stats, labels;
    int misalign; /* offset every base pointer by one element */
    const enum row_kind *kinds; /* N kinds, or NULL: all random */
    uint64_t seed;
} gcase_t;

static gcase_t case_default(int64_t N, int64_t V, kdl_dtype_t sdt, kdl_dtype_t tdt)
{
    gcase_t c;
    memset(&c, 0, sizeof c);
    kdl_loss_desc_init(&c.d);
    c.N = N;
    c.V = V;
    c.lds = c.ldt = c.ldg = V;
    c.sdt = sdt;
    c.tdt = tdt;
    c.gdt = sdt;
    c.odt = KDL_DTYPE_F32;
    c.grad = 1;
    c.stats = 1;
    c.seed = 1;
    return c;
}

/* Results of one run, as doubles; grad compacted to [N, V]. */
typedef struct result {
    kdl_status_t st;
    double *loss; /* N (NONE) or 1 */
    double *grad;
    double *stat[6]; /* fkl rkl g_head g_tail w_head w_tail */
    int64_t *hs;
    int64_t info, valid;
    int pad_ok; /* GPU: grad padding untouched */
} result_t;

static const char *stat_names[6] = {"fkl", "rkl", "g_head", "g_tail", "w_head", "w_tail"};

/* Host inputs in their dtypes, with ld padding poisoned by NaN bytes. */
typedef struct inputs {
    void *s, *t;     /* base + misalign elements = the pointer passed */
    size_t s_bytes, t_bytes;
    int64_t *labels;
} inputs_t;

static void poison(void *buf, kdl_dtype_t t, int64_t n)
{
    for (int64_t i = 0; i < n; i++) kdl_store_from_double(buf, t, i, NAN);
}

static double gen_teacher(kdl_rng_t *g, enum row_kind k, int64_t j, int64_t V, double sigma)
{
    switch (k) {
    case ROW_TIES16: return 0.05 * kdl_rng_normal(g);
    case ROW_FEWVALUES: return (double)(kdl_rng_next(g) % 4);
    case ROW_ONEHOT: return j == V / 2 ? 40.0 : sigma * kdl_rng_normal(g);
    default: return sigma * kdl_rng_normal(g);
    }
}

static void make_inputs(const gcase_t *c, inputs_t *in)
{
    const int64_t N = c->N, V = c->V;
    size_t ss = kdl_dtype_size(c->sdt), ts = kdl_dtype_size(c->tdt);
    int64_t ns = N * c->lds + 1, nt = N * c->ldt + 1;
    in->s_bytes = (size_t)ns * ss;
    in->t_bytes = (size_t)nt * ts;
    char *sb = malloc(in->s_bytes), *tb = malloc(in->t_bytes);
    cr_assert(sb && tb);
    poison(sb, c->sdt, ns);
    poison(tb, c->tdt, nt);
    in->s = sb + (c->misalign ? ss : 0);
    in->t = tb + (c->misalign ? ts : 0);
    in->labels = c->labels ? malloc((size_t)(N > 0 ? N : 1) * sizeof(int64_t)) : NULL;
    kdl_rng_t g = {c->seed * 0x9e3779b97f4a7c15ull + (uint64_t)V};
    double *srow = malloc((size_t)V * sizeof(double)), *trow = malloc((size_t)V * sizeof(double));
    cr_assert(srow && trow);
    for (int64_t i = 0; i < N; i++) {
        enum row_kind k = c->kinds ? c->kinds[i] : ROW_RANDOM;
        double sigma = 1.0 + (double)(i % 3);
        kdl_fill_logits(&g, srow, V, sigma);
        for (int64_t j = 0; j < V; j++) trow[j] = gen_teacher(&g, k, j, V, sigma);
        if (k == ROW_RANDOM || k == ROW_NEGINF || k == ROW_IGNORED) kdl_fill_logits(&g, trow, V, sigma);
        if (k == ROW_IDENTICAL || k == ROW_SHIFTED)
            for (int64_t j = 0; j < V; j++) srow[j] = trow[j] + (k == ROW_SHIFTED ? 100.0 : 0.0);
        if (k == ROW_NEGINF)
            for (int64_t j = 1; j < V; j += 3) srow[j] = trow[j] = -INFINITY;
        if (k == ROW_NAN) srow[V / 2] = NAN;
        if (k == ROW_POSINF) trow[V - 1] = INFINITY;
        if (k == ROW_ALLNEGINF)
            for (int64_t j = 0; j < V; j++) srow[j] = -INFINITY;
        kdl_to_dtype(srow, (char *)in->s + (size_t)(i * c->lds) * ss, c->sdt, V);
        kdl_to_dtype(trow, (char *)in->t + (size_t)(i * c->ldt) * ts, c->tdt, V);
        if (in->labels)
            in->labels[i] = k == ROW_IGNORED ? c->d.ignore_index : (int64_t)(kdl_rng_next(&g) % (uint64_t)V);
    }
    free(srow);
    free(trow);
}

static void free_inputs(const gcase_t *c, inputs_t *in)
{
    free((char *)in->s - (c->misalign ? kdl_dtype_size(c->sdt) : 0));
    free((char *)in->t - (c->misalign ? kdl_dtype_size(c->tdt) : 0));
    free(in->labels);
}

static void result_alloc(const gcase_t *c, result_t *r)
{
    memset(r, 0, sizeof *r);
    int64_t nl = c->d.reduction == KDL_REDUCTION_NONE ? c->N : 1;
    r->loss = calloc((size_t)(nl > 0 ? nl : 1), sizeof(double));
    r->grad = calloc((size_t)(c->N * c->V > 0 ? c->N * c->V : 1), sizeof(double));
    for (int k = 0; k < 6; k++) r->stat[k] = calloc((size_t)(c->N > 0 ? c->N : 1), sizeof(double));
    r->hs = calloc((size_t)(c->N > 0 ? c->N : 1), sizeof(int64_t));
    r->pad_ok = 1;
}

static void result_free(result_t *r)
{
    free(r->loss);
    free(r->grad);
    for (int k = 0; k < 6; k++) free(r->stat[k]);
    free(r->hs);
}

static void fill_args(const gcase_t *c, kdl_loss_args_t *a)
{
    kdl_loss_args_init(a);
    a->rows = c->N;
    a->vocab = c->V;
    a->ld_student = c->lds;
    a->ld_teacher = c->ldt;
    a->student_dtype = c->sdt;
    a->teacher_dtype = c->tdt;
}

static void run_ref(const gcase_t *c, const inputs_t *in, result_t *r)
{
    result_alloc(c, r);
    kdl_loss_args_t a;
    fill_args(c, &a);
    a.student = in->s;
    a.teacher = in->t;
    a.labels = in->labels;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = r->loss;
    if (c->grad) {
        a.grad = r->grad;
        a.ld_grad = c->V;
        a.grad_dtype = KDL_DTYPE_F64;
    }
    if (c->stats) {
        a.stat_fkl = r->stat[0];
        a.stat_rkl = r->stat[1];
        a.stat_g_head = r->stat[2];
        a.stat_g_tail = r->stat[3];
        a.stat_w_head = r->stat[4];
        a.stat_w_tail = r->stat[5];
        a.stat_head_size = r->hs;
    }
    a.info = &r->info;
    a.valid_rows = &r->valid;
    r->st = kdl_ref_loss_forward_backward(&c->d, &a);
}

/* Device buffers of one run. */
typedef struct dev {
    void *s, *t, *g, *loss, *stat[6], *ws;
    int64_t *labels, *hs, *info, *valid;
    size_t g_bytes, ws_bytes;
} dev_t_;

static void dev_alloc(const gcase_t *c, const inputs_t *in, dev_t_ *D, kdl_handle_t h, kdl_loss_args_t *a)
{
    memset(D, 0, sizeof *D);
    const size_t ss = kdl_dtype_size(c->sdt), ts = kdl_dtype_size(c->tdt), gs = kdl_dtype_size(c->gdt),
                 os = kdl_dtype_size(c->odt);
    const int64_t N = c->N;
    char *base;
    CUDA_OK(cudaMalloc((void **)&base, in->s_bytes));
    CUDA_OK(cudaMemcpy(base, (const char *)in->s - (c->misalign ? ss : 0), in->s_bytes, cudaMemcpyHostToDevice));
    D->s = base + (c->misalign ? ss : 0);
    CUDA_OK(cudaMalloc((void **)&base, in->t_bytes));
    CUDA_OK(cudaMemcpy(base, (const char *)in->t - (c->misalign ? ts : 0), in->t_bytes, cudaMemcpyHostToDevice));
    D->t = base + (c->misalign ? ts : 0);
    if (in->labels) {
        CUDA_OK(cudaMalloc((void **)&D->labels, (size_t)(N > 0 ? N : 1) * sizeof(int64_t)));
        if (N > 0) CUDA_OK(cudaMemcpy(D->labels, in->labels, (size_t)N * sizeof(int64_t), cudaMemcpyHostToDevice));
    }
    fill_args(c, a);
    a->student = D->s;
    a->teacher = D->t;
    a->labels = D->labels;
    a->out_dtype = c->odt;
    int64_t nl = c->d.reduction == KDL_REDUCTION_NONE ? N : 1;
    CUDA_OK(cudaMalloc(&D->loss, (size_t)(nl > 0 ? nl : 1) * os));
    CUDA_OK(cudaMemset(D->loss, 0xFF, (size_t)(nl > 0 ? nl : 1) * os));
    a->loss = D->loss;
    if (c->grad) {
        D->g_bytes = (size_t)(N * c->ldg + 1) * gs;
        CUDA_OK(cudaMalloc((void **)&base, D->g_bytes));
        CUDA_OK(cudaMemset(base, 0xFF, D->g_bytes)); /* NaN pattern: padding must stay so */
        D->g = base + (c->misalign ? gs : 0);
        a->grad = D->g;
        a->ld_grad = c->ldg;
        a->grad_dtype = c->gdt;
    }
    if (c->stats) {
        for (int k = 0; k < 6; k++) {
            CUDA_OK(cudaMalloc(&D->stat[k], (size_t)(N > 0 ? N : 1) * os));
            CUDA_OK(cudaMemset(D->stat[k], 0xFF, (size_t)(N > 0 ? N : 1) * os));
        }
        CUDA_OK(cudaMalloc((void **)&D->hs, (size_t)(N > 0 ? N : 1) * sizeof(int64_t)));
        a->stat_fkl = D->stat[0];
        a->stat_rkl = D->stat[1];
        a->stat_g_head = D->stat[2];
        a->stat_g_tail = D->stat[3];
        a->stat_w_head = D->stat[4];
        a->stat_w_tail = D->stat[5];
        a->stat_head_size = D->hs;
    }
    CUDA_OK(cudaMalloc((void **)&D->info, sizeof(int64_t)));
    CUDA_OK(cudaMalloc((void **)&D->valid, sizeof(int64_t)));
    CUDA_OK(cudaMemset(D->info, 0xFF, sizeof(int64_t)));
    CUDA_OK(cudaMemset(D->valid, 0xFF, sizeof(int64_t)));
    a->info = D->info;
    a->valid_rows = D->valid;
    cr_assert_eq(kdl_loss_workspace_size(h, &c->d, a, &D->ws_bytes), KDL_STATUS_SUCCESS, "%s",
                 kdl_get_last_error());
    if (D->ws_bytes) CUDA_OK(cudaMalloc(&D->ws, D->ws_bytes));
    CUDA_OK(cudaDeviceSynchronize()); /* the poison memsets land before the call's stream runs */
}

static void dev_free(const gcase_t *c, dev_t_ *D)
{
    cudaFree((char *)D->s - (c->misalign ? kdl_dtype_size(c->sdt) : 0));
    cudaFree((char *)D->t - (c->misalign ? kdl_dtype_size(c->tdt) : 0));
    if (D->g) cudaFree((char *)D->g - (c->misalign ? kdl_dtype_size(c->gdt) : 0));
    cudaFree(D->labels);
    cudaFree(D->loss);
    for (int k = 0; k < 6; k++) cudaFree(D->stat[k]);
    cudaFree(D->hs);
    cudaFree(D->info);
    cudaFree(D->valid);
    cudaFree(D->ws);
}

/* Raw bytes of a run's outputs, for the determinism check. */
typedef struct raw {
    unsigned char *loss, *grad;
    size_t loss_bytes, grad_bytes;
} raw_t;

static void run_gpu_raw(kdl_handle_t h, const gcase_t *c, const inputs_t *in, result_t *r, raw_t *raw)
{
    result_alloc(c, r);
    dev_t_ D;
    kdl_loss_args_t a;
    dev_alloc(c, in, &D, h, &a);
    r->st = kdl_loss_forward_backward(h, &c->d, &a, D.ws, D.ws_bytes);
    CUDA_OK(cudaDeviceSynchronize());
    if (r->st != KDL_STATUS_SUCCESS) {
        cr_log_info("kdl_loss_forward_backward: %s (%s)", kdl_status_string(r->st), kdl_get_last_error());
        dev_free(c, &D);
        return;
    }
    const int64_t N = c->N, V = c->V;
    const size_t os = kdl_dtype_size(c->odt), gs = kdl_dtype_size(c->gdt);
    int64_t nl = c->d.reduction == KDL_REDUCTION_NONE ? N : 1;
    void *tmp = malloc((size_t)(nl > 0 ? nl : 1) * 8 + D.g_bytes + 16);
    cr_assert(tmp);
    if (nl > 0) {
        CUDA_OK(cudaMemcpy(tmp, D.loss, (size_t)nl * os, cudaMemcpyDeviceToHost));
        kdl_from_dtype(tmp, r->loss, c->odt, nl);
        if (raw) {
            raw->loss_bytes = (size_t)nl * os;
            raw->loss = malloc(raw->loss_bytes);
            memcpy(raw->loss, tmp, raw->loss_bytes);
        }
    }
    if (c->grad) {
        unsigned char *gb = malloc(D.g_bytes);
        cr_assert(gb);
        CUDA_OK(cudaMemcpy(gb, (char *)D.g - (c->misalign ? gs : 0), D.g_bytes, cudaMemcpyDeviceToHost));
        const unsigned char *g0 = gb + (c->misalign ? gs : 0);
        for (int64_t i = 0; i < N; i++) {
            kdl_from_dtype(g0 + (size_t)(i * c->ldg) * gs, r->grad + i * V, c->gdt, V);
            /* bytes between V and ld_grad (and before a misaligned base) keep 0xFF */
            const unsigned char *pad = g0 + (size_t)(i * c->ldg + V) * gs;
            size_t pad_bytes = (size_t)(c->ldg - V) * gs;
            if (i == N - 1) pad_bytes = (size_t)(gb + D.g_bytes - pad);
            for (size_t b = 0; b < pad_bytes; b++)
                if (pad[b] != 0xFF) r->pad_ok = 0;
        }
        if (c->misalign)
            for (size_t b = 0; b < gs; b++)
                if (gb[b] != 0xFF) r->pad_ok = 0;
        if (raw) {
            raw->grad_bytes = D.g_bytes;
            raw->grad = gb;
        } else {
            free(gb);
        }
    }
    if (c->stats && N > 0) {
        for (int k = 0; k < 6; k++) {
            CUDA_OK(cudaMemcpy(tmp, D.stat[k], (size_t)N * os, cudaMemcpyDeviceToHost));
            kdl_from_dtype(tmp, r->stat[k], c->odt, N);
        }
        CUDA_OK(cudaMemcpy(r->hs, D.hs, (size_t)N * sizeof(int64_t), cudaMemcpyDeviceToHost));
    }
    CUDA_OK(cudaMemcpy(&r->info, D.info, sizeof(int64_t), cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(&r->valid, D.valid, sizeof(int64_t), cudaMemcpyDeviceToHost));
    free(tmp);
    dev_free(c, &D);
}

static void run_gpu(kdl_handle_t h, const gcase_t *c, const inputs_t *in, result_t *r)
{
    run_gpu_raw(h, c, in, r, NULL);
}

/* ------------------------------------------------------------ tolerances */
static int is16(kdl_dtype_t t) { return t == KDL_DTYPE_F16 || t == KDL_DTYPE_BF16; }

/* Loss and statistics.  f32 inputs: 1e-5 relative plus 4e-6 absolute
 * (review R4-7).  A per-row KL is sum p (lp - lq) with lp, lq formed from two
 * float LSEs of magnitude up to about 10, each good to a few 1e-7: where the
 * true KL is tiny (ROW_SHIFTED: 1e-11) the kernel's value is up to about 1e-6
 * off per KL, 2e-6 for Jeffreys; kdl_tol_for's 1e-6 would fail there on
 * rounding alone.  A wrong term, weight or head is far larger. */
static kdl_tol_t input_tol(const gcase_t *c)
{
    kdl_tol_t t = kdl_tol_for(is16(c->sdt) || is16(c->tdt) ? KDL_DTYPE_BF16 : KDL_DTYPE_F32);
    if (!is16(c->sdt) && !is16(c->tdt) && t.atol < 4e-6) t.atol = 4e-6;
    return t;
}

/* log-softmax of row i of a typed host matrix, in double. */
static void log_softmax(const void *base, kdl_dtype_t t, int64_t ld, int64_t i, int64_t V, double tau, double *out)
{
    double mx = -INFINITY;
    for (int64_t j = 0; j < V; j++) {
        out[j] = kdl_load_as_double(base, t, i * ld + j) / tau;
        if (out[j] > mx) mx = out[j];
    }
    double s = 0;
    for (int64_t j = 0; j < V; j++) s += exp(out[j] - mx);
    for (int64_t j = 0; j < V; j++) out[j] -= mx + log(s);
}

/* atol_j of every gradient element (see the top of the file): the float32
 * error of the element terms, at least floor_abs; [N, V], malloc'd. */
static double *grad_atol(const gcase_t *c, const inputs_t *in, int64_t valid, double floor_abs)
{
    const int64_t N = c->N, V = c->V;
    double gfac = fabs(c->d.scale / c->d.temperature);
    if (c->d.reduction == KDL_REDUCTION_MEAN && valid > 0) gfac /= (double)valid;
    double *lq = malloc((size_t)V * sizeof(double)), *lp = malloc((size_t)V * sizeof(double));
    double *w = malloc((size_t)(N * V > 0 ? N * V : 1) * sizeof(double));
    cr_assert(lq && lp && w);
    for (int64_t i = 0; i < N; i++) {
        log_softmax(in->s, c->sdt, c->lds, i, V, c->d.temperature, lq);
        log_softmax(in->t, c->tdt, c->ldt, i, V, c->d.temperature, lp);
        for (int64_t j = 0; j < V; j++) {
            double q = exp(lq[j]), p = exp(lp[j]);
            double a = gfac * 3e-6 * (q + p) * (2 + (isfinite(lq[j]) ? fabs(lq[j]) : 0) + (isfinite(lp[j]) ? fabs(lp[j]) : 0));
            if (!(a > floor_abs)) a = floor_abs; /* also NaN rows */
            w[i * V + j] = a;
        }
    }
    free(lq);
    free(lp);
    return w;
}

static void compare_grad(const gcase_t *c, const inputs_t *in, const result_t *got, const result_t *ref)
{
    const int64_t N = c->N, V = c->V;
    double rtol = c->gdt == KDL_DTYPE_F32 ? 1e-5 : c->gdt == KDL_DTYPE_F16 ? 2e-3 : 8e-3;
    double floor_abs = c->gdt == KDL_DTYPE_F16 ? 6e-8 : 1e-30;
    double *w = grad_atol(c, in, ref->valid, floor_abs);
    double *g = malloc((size_t)(N * V) * sizeof(double)), *gn = malloc((size_t)(N * V) * sizeof(double));
    cr_assert(g && gn);
    for (int64_t k = 0; k < N * V; k++) {
        g[k] = ref->grad[k] / w[k];
        gn[k] = got->grad[k] / w[k];
    }
    kdl_tol_t tol = {rtol, 1.0};
    KDL_EXPECT_CLOSE("grad (scaled by atol_j)", gn, g, (size_t)(N * V), tol);
    free(g);
    free(w);
    free(gn);
}

static void compare(const gcase_t *c, const inputs_t *in, const result_t *got, const result_t *ref, const char *what)
{
    cr_assert_eq(ref->st, KDL_STATUS_SUCCESS, "%s: reference: %s", what, kdl_get_last_error());
    cr_assert_eq(got->st, KDL_STATUS_SUCCESS, "%s: gpu: %s", what, kdl_status_string(got->st));
    cr_expect_eq(got->info, ref->info, "%s: info %lld, reference %lld", what, (long long)got->info,
                 (long long)ref->info);
    cr_expect_eq(got->valid, ref->valid, "%s: valid_rows %lld, reference %lld", what, (long long)got->valid,
                 (long long)ref->valid);
    kdl_tol_t tol = input_tol(c);
    int64_t nl = c->d.reduction == KDL_REDUCTION_NONE ? c->N : 1;
    char label[160];
    snprintf(label, sizeof label, "%s: loss", what);
    KDL_EXPECT_CLOSE(label, got->loss, ref->loss, (size_t)nl, tol);
    if (c->stats) {
        for (int k = 0; k < 6; k++) {
            snprintf(label, sizeof label, "%s: %s", what, stat_names[k]);
            KDL_EXPECT_CLOSE(label, got->stat[k], ref->stat[k], (size_t)c->N, tol);
        }
        for (int64_t i = 0; i < c->N; i++)
            cr_expect_eq(got->hs[i], ref->hs[i], "%s: head_size[%lld] %lld, reference %lld", what, (long long)i,
                         (long long)got->hs[i], (long long)ref->hs[i]);
    }
    if (c->grad) {
        compare_grad(c, in, got, ref);
        cr_expect(got->pad_ok, "%s: gradient padding (ld_grad > V) was written", what);
    }
}

static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* Moves mu off every cumulative teacher mass (float64 order) by >= 1e-5, so
 * that float32 probabilities on the GPU cannot put the boundary elsewhere. */
static void safe_mu(gcase_t *c, const inputs_t *in)
{
    if (c->d.head_rule == KDL_HEAD_TOPK) return;
    const int64_t N = c->N, V = c->V;
    double *cum = malloc((size_t)(N * V > 0 ? N * V : 1) * sizeof(double));
    double *lp = malloc((size_t)V * sizeof(double));
    cr_assert(cum && lp);
    int64_t n = 0;
    for (int64_t i = 0; i < N; i++) {
        log_softmax(in->t, c->tdt, c->ldt, i, V, c->d.temperature, lp);
        double *p = cum + n;
        int ok = 1;
        for (int64_t j = 0; j < V; j++) {
            p[j] = exp(lp[j]);
            if (isnan(p[j])) ok = 0;
        }
        if (!ok) continue;
        qsort(p, (size_t)V, sizeof(double), cmp_desc);
        for (int64_t j = 1; j < V; j++) p[j] += p[j - 1];
        n += V;
    }
    for (int tries = 0; tries < 200; tries++) {
        int near = 0;
        for (int64_t k = 0; k < n && !near; k++) near = fabs(cum[k] - c->d.mu) < 1e-5;
        if (!near) break;
        c->d.mu += 1.37e-4;
        if (c->d.mu >= 0.999) c->d.mu -= 0.5;
    }
    free(cum);
    free(lp);
}

/* Reference and GPU on one case; returns 1 when the GPU path ran. */
static int check_case(kdl_handle_t h, gcase_t *c, const char *what)
{
    inputs_t in;
    make_inputs(c, &in);
    safe_mu(c, &in);
    result_t ref, got;
    run_ref(c, &in, &ref);
    run_gpu(h, c, &in, &got);
    int ran = got.st == KDL_STATUS_SUCCESS;
    if (got.st != KDL_STATUS_NOT_SUPPORTED) compare(c, &in, &got, &ref, what);
    result_free(&ref);
    result_free(&got);
    free_inputs(c, &in);
    return ran;
}

static kdl_handle_t new_handle(void)
{
    kdl_handle_t h = NULL;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    return h;
}

static void set_path(const char *path, int cluster)
{
    if (path)
        setenv("KDL_LOSS_PATH", path, 1);
    else
        unsetenv("KDL_LOSS_PATH");
    if (cluster > 0) {
        char b[16];
        snprintf(b, sizeof b, "%d", cluster);
        setenv("KDL_LOSS_CLUSTER", b, 1);
    } else {
        unsetenv("KDL_LOSS_CLUSTER");
    }
}

static const kdl_dtype_t pairs[][2] = {{KDL_DTYPE_F32, KDL_DTYPE_F32},  {KDL_DTYPE_F16, KDL_DTYPE_F16},
                                       {KDL_DTYPE_BF16, KDL_DTYPE_BF16}, {KDL_DTYPE_F32, KDL_DTYPE_BF16},
                                       {KDL_DTYPE_BF16, KDL_DTYPE_F16},  {KDL_DTYPE_F16, KDL_DTYPE_F32}};
#define NPAIRS ((int)(sizeof pairs / sizeof pairs[0]))

/* ======================================================= small (sanitizer) */

/* The quick subset scripts/gpu-check.sh runs under compute-sanitizer:
 * every path and the tie split on small rows. */
Test(gpu_small, paths_ties_and_masks)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    static const enum row_kind kinds[] = {ROW_TIES16, ROW_IGNORED, ROW_NEGINF, ROW_NAN, ROW_FEWVALUES, ROW_ALLNEGINF};
    const char *paths[] = {"smem", "cluster", "stream", "stream"};
    const int clusters[] = {0, 2, 0, 3};
    for (int pi = 0; pi < 4; pi++) {
        set_path(paths[pi], clusters[pi]);
        for (int rule = 0; rule < 3; rule++) {
            gcase_t c = case_default(6, 1271, KDL_DTYPE_BF16, KDL_DTYPE_BF16);
            c.d.divergence = KDL_DIV_AKL;
            c.d.head_rule = (kdl_head_rule_t)rule;
            c.d.top_k = 300;
            c.d.reduction = KDL_REDUCTION_MEAN;
            c.labels = 1;
            c.kinds = kinds;
            c.lds = 1280;
            c.ldt = 1300;
            c.ldg = 1290;
            char what[96];
            snprintf(what, sizeof what, "path %s/%d rule %d", paths[pi], clusters[pi], rule);
            check_case(h, &c, what);
            kdl_loss_plan_t pl = kdl_loss_last_plan();
            cr_log_info("%s: path %d cluster %d smem %zu+%zu", what, (int)pl.path, pl.cluster, pl.smem_dynamic,
                        pl.smem_static);
        }
    }
    set_path(NULL, 0);
    kdl_destroy(h);
}

/* ====================================================== divergence matrix */

Test(gpu_loss, every_divergence_dtype_and_rule)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    for (int k = 0; k < (int)KDL_NDIVS; k++) {
        for (int pi = 0; pi < NPAIRS; pi++) {
            for (int rule = 0; rule < 3; rule++) {
                gcase_t c = case_default(5, 1271, pairs[pi][0], pairs[pi][1]);
                c.d.divergence = kdl_all_divs[k];
                c.d.head_rule = (kdl_head_rule_t)rule;
                c.d.mu = 0.3 + 0.1 * rule;
                c.d.top_k = 17 + 100 * rule;
                c.d.temperature = rule == 1 ? 2.0 : 1.0;
                c.d.reduction = (kdl_reduction_t)(pi % 3);
                c.d.scale = pi == 2 ? 4.0 : 1.0;
                c.seed = (uint64_t)(k * 100 + pi * 10 + rule);
                c.gdt = (pi % 2) ? KDL_DTYPE_F32 : pairs[pi][0];
                c.odt = (pi % 2) ? KDL_DTYPE_F64 : KDL_DTYPE_F32;
                char what[96];
                snprintf(what, sizeof what, "%s %s/%s rule %d", kdl_divergence_name(kdl_all_divs[k]),
                         kdl_dtype_name(pairs[pi][0]), kdl_dtype_name(pairs[pi][1]), rule);
                check_case(h, &c, what);
            }
        }
    }
    kdl_destroy(h);
}

/* ========================================================== adversarial */

Test(gpu_loss, adversarial_rows_every_divergence)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    static const enum row_kind kinds[] = {ROW_RANDOM,  ROW_TIES16,   ROW_NEGINF,    ROW_ONEHOT,
                                          ROW_IDENTICAL, ROW_SHIFTED, ROW_FEWVALUES, ROW_IGNORED,
                                          ROW_NAN,     ROW_POSINF,   ROW_ALLNEGINF, ROW_TIES16};
    const int64_t N = (int64_t)(sizeof kinds / sizeof kinds[0]);
    for (int k = 0; k < (int)KDL_NDIVS; k++) {
        for (int pi = 0; pi < 3; pi++) { /* same-dtype pairs: identical rows stay identical */
            for (int rule = 0; rule < 3; rule++) {
                gcase_t c = case_default(N, 1271, pairs[pi][0], pairs[pi][1]);
                c.d.divergence = kdl_all_divs[k];
                c.d.head_rule = (kdl_head_rule_t)rule;
                c.d.top_k = 640;
                c.d.reduction = KDL_REDUCTION_NONE;
                c.labels = 1;
                c.kinds = kinds;
                c.lds = 1271 + 9; /* ld > V, NaN-poisoned padding */
                c.ldt = 1271 + 16;
                c.ldg = 1271 + 5;
                c.seed = (uint64_t)(1000 + k * 10 + pi);
                char what[96];
                snprintf(what, sizeof what, "adversarial %s %s rule %d", kdl_divergence_name(kdl_all_divs[k]),
                         kdl_dtype_name(pairs[pi][0]), rule);
                check_case(h, &c, what);
            }
        }
    }
    kdl_destroy(h);
}

Test(gpu_loss, odd_shapes_and_misaligned_bases)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    const int64_t Vs[] = {1, 2, 7, 8, 9, 15, 1271, 4097};
    for (size_t vi = 0; vi < sizeof Vs / sizeof Vs[0]; vi++) {
        for (int pi = 0; pi < NPAIRS; pi++) {
            for (int mis = 0; mis < 2; mis++) {
                gcase_t c = case_default(3, Vs[vi], pairs[pi][0], pairs[pi][1]);
                c.d.divergence = (vi % 2) ? KDL_DIV_AKL : KDL_DIV_JSD;
                c.d.head_rule = (kdl_head_rule_t)(vi % 3);
                c.d.top_k = Vs[vi] > 2 ? Vs[vi] / 2 : 1;
                c.d.reduction = KDL_REDUCTION_NONE;
                c.misalign = mis;
                c.lds = Vs[vi] + mis;
                c.ldt = Vs[vi] + 3 * mis;
                c.ldg = Vs[vi] + 2 * mis;
                c.seed = (uint64_t)(vi * 31 + (size_t)pi * 7 + (size_t)mis);
                char what[96];
                snprintf(what, sizeof what, "V=%lld %s/%s misalign %d", (long long)Vs[vi], kdl_dtype_name(pairs[pi][0]),
                         kdl_dtype_name(pairs[pi][1]), mis);
                check_case(h, &c, what);
            }
        }
    }
    kdl_destroy(h);
}

/* Student -inf where the teacher has mass: FKL is +inf, not NaN. */
Test(gpu_loss, infinite_terms_are_honest)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    gcase_t c = case_default(1, 64, KDL_DTYPE_F32, KDL_DTYPE_F32);
    c.d.reduction = KDL_REDUCTION_SUM;
    c.grad = 0;
    inputs_t in;
    make_inputs(&c, &in);
    ((float *)in.s)[5] = -INFINITY;
    for (int k = 0; k < 3; k++) {
        c.d.divergence = k == 0 ? KDL_DIV_FKL : k == 1 ? KDL_DIV_FKL_RKL : KDL_DIV_AKL;
        result_t ref, got;
        run_ref(&c, &in, &ref);
        run_gpu(h, &c, &in, &got);
        compare(&c, &in, &got, &ref, kdl_divergence_name(c.d.divergence));
        cr_expect(isinf(got.loss[0]) && got.loss[0] > 0, "%s: loss %g", kdl_divergence_name(c.d.divergence),
                  got.loss[0]);
        result_free(&ref);
        result_free(&got);
    }
    free_inputs(&c, &in);
    kdl_destroy(h);
}

/* The reference's limits (README): tau -> 0 is the arg-max indicator, not
 * inf - inf; scale = 0 switches the term off, even an infinite one. */
Test(gpu_loss, tiny_temperature_and_zero_scale)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    static const enum row_kind kinds[] = {ROW_RANDOM, ROW_IDENTICAL, ROW_NAN, ROW_IGNORED};
    const kdl_divergence_t divs[] = {KDL_DIV_FKL, KDL_DIV_RKL, KDL_DIV_JSD, KDL_DIV_TVD, KDL_DIV_AKL};
    for (size_t k = 0; k < sizeof divs / sizeof divs[0]; k++) {
        for (int red = 0; red < 3; red++) {
            gcase_t c = case_default(4, 97, KDL_DTYPE_F32, KDL_DTYPE_F32);
            c.d.divergence = divs[k];
            c.d.reduction = (kdl_reduction_t)red;
            c.d.temperature = 1e-30;
            c.d.head_rule = KDL_HEAD_TOPK;
            c.d.top_k = 5;
            c.labels = 1;
            c.kinds = kinds;
            c.stats = 0;
            check_case(h, &c, "tau 1e-30");
        }
    }
    /* scale 0 with a row whose loss is +inf (student -inf where the teacher has mass) */
    gcase_t c = case_default(2, 64, KDL_DTYPE_F32, KDL_DTYPE_F32);
    inputs_t in;
    make_inputs(&c, &in);
    ((float *)in.s)[3] = -INFINITY;
    for (int red = 0; red < 3; red++) {
        c.d.divergence = KDL_DIV_FKL;
        c.d.reduction = (kdl_reduction_t)red;
        c.d.scale = 0.0;
        c.stats = 0;
        result_t ref, got;
        run_ref(&c, &in, &ref);
        run_gpu(h, &c, &in, &got);
        compare(&c, &in, &got, &ref, "scale 0");
        cr_expect(got.loss[0] == 0.0, "scale 0: loss %g", got.loss[0]);
        for (int64_t j = 0; j < c.N * c.V; j++)
            if (got.grad[j] != 0.0) {
                cr_expect(0, "scale 0: gradient[%lld] = %g", (long long)j, got.grad[j]);
                break;
            }
        result_free(&ref);
        result_free(&got);
    }
    free_inputs(&c, &in);
    kdl_destroy(h);
}

/* ============================================================ real sizes */

static void real_size(kdl_dtype_t sdt, kdl_dtype_t tdt, int64_t V, kdl_divergence_t div)
{
    kdl_handle_t h = new_handle();
    const char *paths[] = {NULL, "smem", "cluster", "stream", "stream"};
    const int clusters[] = {0, 0, 0, 0, 4};
    for (int pi = 0; pi < 5; pi++) {
        set_path(paths[pi], clusters[pi]);
        gcase_t c = case_default(3, V, sdt, tdt);
        c.d.divergence = div;
        c.d.head_rule = (kdl_head_rule_t)(pi % 3);
        c.d.top_k = V / 10;
        c.d.reduction = KDL_REDUCTION_MEAN;
        c.d.temperature = 2.0;
        c.d.scale = 4.0;
        c.gdt = sdt;
        c.stats = div == KDL_DIV_AKL || pi == 0; /* also the paths without head and KL statistics */
        c.seed = (uint64_t)V + (uint64_t)pi;
        char what[96];
        snprintf(what, sizeof what, "V=%lld %s/%s %s path %s/%d", (long long)V, kdl_dtype_name(sdt), kdl_dtype_name(tdt),
                 kdl_divergence_name(div), paths[pi] ? paths[pi] : "auto", clusters[pi]);
        int ran = check_case(h, &c, what);
        kdl_loss_plan_t pl = kdl_loss_last_plan();
        if (ran)
            cr_log_info("%s: path %d cluster %d smem %zu+%zu", what, (int)pl.path, pl.cluster, pl.smem_dynamic,
                        pl.smem_static);
        else
            cr_log_info("%s: not supported here (%s)", what, kdl_get_last_error());
        if (paths[pi] == NULL) cr_expect(ran, "%s: the automatic path must always run", what);
    }
    set_path(NULL, 0);
    kdl_destroy(h);
}

Test(gpu_loss, real_vocab_32000)
{
    KDL_SKIP_WITHOUT_GPU();
    real_size(KDL_DTYPE_BF16, KDL_DTYPE_BF16, 32000, KDL_DIV_AKL);
    real_size(KDL_DTYPE_F32, KDL_DTYPE_F32, 32000, KDL_DIV_FKL);
}

Test(gpu_loss, real_vocab_128256)
{
    KDL_SKIP_WITHOUT_GPU();
    real_size(KDL_DTYPE_BF16, KDL_DTYPE_BF16, 128256, KDL_DIV_JSD);
    real_size(KDL_DTYPE_F16, KDL_DTYPE_F32, 128256, KDL_DIV_AKL);
}

Test(gpu_loss, real_vocab_151936)
{
    KDL_SKIP_WITHOUT_GPU();
    real_size(KDL_DTYPE_BF16, KDL_DTYPE_BF16, 151936, KDL_DIV_AKL);
    real_size(KDL_DTYPE_F32, KDL_DTYPE_F32, 151936, KDL_DIV_SRKL);
}

/* ================================================= reductions and masks */

Test(gpu_loss, mean_with_invalid_rows_rescales_the_gradient)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    static const enum row_kind kinds[] = {ROW_RANDOM, ROW_NAN, ROW_RANDOM, ROW_IGNORED, ROW_POSINF, ROW_RANDOM};
    for (int pi = 0; pi < 3; pi++) {
        gcase_t c = case_default(6, 999, pairs[pi][0], pairs[pi][1]);
        c.d.divergence = KDL_DIV_RKL;
        c.d.reduction = KDL_REDUCTION_MEAN;
        c.d.scale = 0.5;
        c.labels = 1;
        c.kinds = kinds;
        check_case(h, &c, "mean with invalid rows");
    }
    kdl_destroy(h);
}

/* Unit in the last place of a 16-bit dtype at magnitude x (normal or
 * subnormal), in double. */
static double ulp16(kdl_dtype_t t, double x)
{
    const int mant = t == KDL_DTYPE_F16 ? 10 : 7, emin = t == KDL_DTYPE_F16 ? -14 : -126;
    int e = emin + 1;
    if (x != 0.0) frexp(fabs(x), &e); /* |x| = f 2^e, f in [1/2, 1) */
    e -= 1;
    return ldexp(1.0, (e < emin ? emin : e) - mant);
}

static int row_is_invalid(enum row_kind k) { return k == ROW_NAN || k == ROW_POSINF || k == ROW_ALLNEGINF; }

/* Review F2: MEAN with invalid rows and a 16-bit gradient.  The gradient is
 * rounded once: every element is within 1/2 ulp (of the 16-bit dtype) of
 * the float64 reference, plus the float32 error of the element terms
 * (atol_j + 1e-5 |ref|).  Rounding (scale/counted) dz and then rescaling by
 * counted/valid, as before the fix, misses this by up to 1/2 ulp.  And the
 * valid rows' gradient is bitwise the one of the same call with the invalid
 * rows ignored instead (then counted = valid: the same scale, the same plan). */
static void mean_invalid_exact(kdl_handle_t h, const char *path, int cluster, kdl_dtype_t sdt, kdl_dtype_t tdt,
                               kdl_divergence_t div, const enum row_kind *kinds, int64_t N, uint64_t seed)
{
    set_path(path, cluster);
    gcase_t c = case_default(N, 1271, sdt, tdt);
    c.d.divergence = div;
    c.d.head_rule = KDL_HEAD_TOPK;
    c.d.top_k = 100;
    c.d.reduction = KDL_REDUCTION_MEAN;
    c.d.scale = 0.7;
    c.d.temperature = 1.5;
    c.labels = 1;
    c.kinds = kinds;
    c.seed = seed;
    char what[128];
    snprintf(what, sizeof what, "MEAN invalid rows %s %s/%s grad %s path %s/%d", kdl_divergence_name(div),
             kdl_dtype_name(sdt), kdl_dtype_name(tdt), kdl_dtype_name(c.gdt), path ? path : "auto", cluster);
    inputs_t in;
    make_inputs(&c, &in);
    result_t ref, got;
    run_ref(&c, &in, &ref);
    run_gpu(h, &c, &in, &got);
    if (got.st == KDL_STATUS_NOT_SUPPORTED) {
        cr_log_info("%s: not supported here (%s)", what, kdl_get_last_error());
    } else {
        compare(&c, &in, &got, &ref, what);
        cr_expect(ref.info > 0 && ref.valid > 0, "%s: the case needs invalid and valid rows", what);
        const int64_t NV = c.N * c.V;
        double *w = grad_atol(&c, &in, ref.valid, 1e-30);
        int64_t bad = 0, worst_at = -1;
        double worst = 0.0; /* |got - ref| in half ulps of the 16-bit dtype */
        for (int64_t k = 0; k < NV; k++) {
            const double r = ref.grad[k], slack = w[k] + 1e-5 * fabs(r);
            const double half = 0.5 * ulp16(c.gdt, fabs(r) + slack), err = fabs(got.grad[k] - r);
            if (!(err <= half + slack)) bad++;
            if (err / half > worst || err != err) {
                worst = err / half;
                worst_at = k;
            }
        }
        cr_expect_eq(bad, 0, "%s: %lld of %lld gradient elements beyond 1/2 ulp + float32 error; worst %.3g half ulps "
                              "at %lld (got %.9g, reference %.9g)",
                     what, (long long)bad, (long long)NV, worst, (long long)worst_at,
                     worst_at >= 0 ? got.grad[worst_at] : 0.0, worst_at >= 0 ? ref.grad[worst_at] : 0.0);
        cr_log_info("%s: worst gradient error %.3f half ulps (%s)", what, worst, kdl_dtype_name(c.gdt));
        free(w);

        /* the same call with the invalid rows ignored */
        for (int64_t i = 0; i < N; i++)
            if (row_is_invalid(kinds[i])) in.labels[i] = c.d.ignore_index;
        result_t alt;
        run_gpu(h, &c, &in, &alt);
        cr_assert_eq(alt.st, KDL_STATUS_SUCCESS, "%s: %s", what, kdl_get_last_error());
        cr_expect_eq(alt.info, 0);
        cr_expect_eq(alt.valid, got.valid);
        int64_t differ = 0;
        for (int64_t i = 0; i < N; i++)
            if (!row_is_invalid(kinds[i]) && kinds[i] != ROW_IGNORED)
                differ += memcmp(got.grad + i * c.V, alt.grad + i * c.V, (size_t)c.V * sizeof(double)) != 0;
        cr_expect_eq(differ, 0, "%s: the gradient of %lld valid rows differs from the call with the invalid rows "
                                "ignored", what, (long long)differ);
        cr_expect(fabs(got.loss[0] - alt.loss[0]) <= 1e-6 * fabs(alt.loss[0]), "%s: loss %.9g, with them ignored %.9g",
                  what, got.loss[0], alt.loss[0]);
        result_free(&alt);
    }
    result_free(&ref);
    result_free(&got);
    free_inputs(&c, &in);
}

Test(gpu_loss, mean_with_invalid_rows_rounds_the_16bit_gradient_once)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    static const enum row_kind one[] = {ROW_RANDOM, ROW_RANDOM, ROW_NAN, ROW_RANDOM, ROW_IGNORED, ROW_RANDOM};
    static const enum row_kind several[] = {ROW_POSINF,  ROW_RANDOM, ROW_NAN,    ROW_RANDOM,
                                            ROW_IGNORED, ROW_RANDOM, ROW_ALLNEGINF, ROW_RANDOM};
    static const kdl_dtype_t dts[][2] = {{KDL_DTYPE_BF16, KDL_DTYPE_BF16},
                                         {KDL_DTYPE_F16, KDL_DTYPE_F16},
                                         {KDL_DTYPE_BF16, KDL_DTYPE_F32},
                                         {KDL_DTYPE_F16, KDL_DTYPE_BF16}};
    const char *paths[] = {NULL, "smem", "cluster", "cluster", "stream", "stream"};
    const int clusters[] = {0, 0, 2, 3, 0, 3};
    for (int pi = 0; pi < 6; pi++) {
        for (int di = 0; di < 4; di++) {
            const kdl_divergence_t div = di % 2 ? KDL_DIV_AKL : KDL_DIV_FKL;
            mean_invalid_exact(h, paths[pi], clusters[pi], dts[di][0], dts[di][1], div, one, 6,
                               (uint64_t)(7 + 10 * pi + di));
            mean_invalid_exact(h, paths[pi], clusters[pi], dts[di][0], dts[di][1], div, several, 8,
                               (uint64_t)(107 + 10 * pi + di));
        }
    }
    set_path(NULL, 0);
    kdl_destroy(h);
}

Test(gpu_loss, all_ignored_gives_zero)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    static const enum row_kind kinds[] = {ROW_IGNORED, ROW_IGNORED, ROW_IGNORED};
    for (int red = 0; red < 3; red++) {
        gcase_t c = case_default(3, 500, KDL_DTYPE_F32, KDL_DTYPE_F32);
        c.d.divergence = KDL_DIV_AKL;
        c.d.reduction = (kdl_reduction_t)red;
        c.d.ignore_index = -1;
        c.labels = 1;
        c.kinds = kinds;
        check_case(h, &c, "all ignored");
    }
    kdl_destroy(h);
}

Test(gpu_loss, empty_batch_writes_zero_without_a_launch)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    for (int red = 1; red < 3; red++) {
        gcase_t c = case_default(0, 100, KDL_DTYPE_BF16, KDL_DTYPE_BF16);
        c.d.reduction = (kdl_reduction_t)red;
        c.odt = red == 1 ? KDL_DTYPE_F64 : KDL_DTYPE_F32;
        inputs_t in;
        make_inputs(&c, &in);
        result_t got;
        run_gpu(h, &c, &in, &got);
        cr_expect_eq(got.st, KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
        cr_expect(got.loss[0] == 0.0, "loss %g", got.loss[0]);
        cr_expect_eq(got.info, 0);
        cr_expect_eq(got.valid, 0);
        result_free(&got);
        free_inputs(&c, &in);
    }
    kdl_destroy(h);
}

/* ========================================================= determinism */

Test(gpu_loss, two_runs_are_bitwise_equal)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    const int64_t Vs[] = {1271, 151936};
    for (int vi = 0; vi < 2; vi++) {
        for (int red = 0; red < 3; red++) {
            gcase_t c = case_default(vi ? 4 : 64, Vs[vi], KDL_DTYPE_BF16, KDL_DTYPE_BF16);
            c.d.divergence = KDL_DIV_AKL;
            c.d.reduction = (kdl_reduction_t)red;
            inputs_t in;
            make_inputs(&c, &in);
            result_t r1, r2;
            raw_t a, b;
            memset(&a, 0, sizeof a);
            memset(&b, 0, sizeof b);
            run_gpu_raw(h, &c, &in, &r1, &a);
            run_gpu_raw(h, &c, &in, &r2, &b);
            cr_assert_eq(r1.st, KDL_STATUS_SUCCESS);
            cr_assert_eq(r2.st, KDL_STATUS_SUCCESS);
            cr_expect(a.loss_bytes == b.loss_bytes && memcmp(a.loss, b.loss, a.loss_bytes) == 0,
                      "V=%lld reduction %d: loss differs between runs", (long long)Vs[vi], red);
            cr_expect(a.grad_bytes == b.grad_bytes && memcmp(a.grad, b.grad, a.grad_bytes) == 0,
                      "V=%lld reduction %d: gradient differs between runs", (long long)Vs[vi], red);
            for (int k = 0; k < 6; k++)
                cr_expect(memcmp(r1.stat[k], r2.stat[k], (size_t)c.N * sizeof(double)) == 0, "%s differs",
                          stat_names[k]);
            free(a.loss);
            free(a.grad);
            free(b.loss);
            free(b.grad);
            result_free(&r1);
            result_free(&r2);
            free_inputs(&c, &in);
        }
    }
    kdl_destroy(h);
}

/* ================================================================ errors */

/* A small f32 case (4 x 300) on the device for the error tests. */
static gcase_t small_case(kdl_handle_t h, kdl_reduction_t red, inputs_t *in, dev_t_ *D, kdl_loss_args_t *a)
{
    gcase_t c = case_default(4, 300, KDL_DTYPE_F32, KDL_DTYPE_F32);
    c.d.reduction = red;
    make_inputs(&c, in);
    dev_alloc(&c, in, D, h, a);
    return c;
}

/* The loss output still holds dev_alloc's 0xFF bytes. */
static void expect_loss_untouched(const dev_t_ *D, const char *what)
{
    CUDA_OK(cudaDeviceSynchronize());
    uint32_t loss_bits = 0;
    CUDA_OK(cudaMemcpy(&loss_bits, D->loss, sizeof loss_bits, cudaMemcpyDeviceToHost));
    cr_expect_eq(loss_bits, 0xFFFFFFFFu, "loss written on a %s call", what);
}

Test(gpu_loss, workspace_too_small_writes_nothing)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    inputs_t in;
    dev_t_ D;
    kdl_loss_args_t a;
    gcase_t c = small_case(h, KDL_REDUCTION_SUM, &in, &D, &a);
    cr_assert(D.ws_bytes > 0);
    cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &a, D.ws, D.ws_bytes - 1), KDL_STATUS_WORKSPACE_TOO_SMALL);
    cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &a, NULL, D.ws_bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &a, (char *)D.ws + 4, D.ws_bytes), KDL_STATUS_BAD_PARAM);
    kdl_loss_args_t bad = a;
    bad.student_dtype = KDL_DTYPE_F64;
    cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &bad, D.ws, D.ws_bytes), KDL_STATUS_NOT_SUPPORTED);
    bad = a;
    bad.ld_teacher = c.V - 1;
    cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &bad, D.ws, D.ws_bytes), KDL_STATUS_BAD_STRIDE);
    expect_loss_untouched(&D, "failed");
    int64_t info = 0;
    CUDA_OK(cudaMemcpy(&info, D.info, sizeof info, cudaMemcpyDeviceToHost));
    cr_expect_eq(info, -1, "info written on a failed call");
    dev_free(&c, &D);
    free_inputs(&c, &in);
    kdl_destroy(h);
}

/* MEAN with a gradient may launch the row kernel twice (the redo launch of
 * review F2), re-reading the logits after gradients were written: a
 * gradient over the student or teacher logits is refused before any launch. */
Test(gpu_loss, mean_refuses_a_gradient_over_the_logits)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    inputs_t in;
    dev_t_ D;
    kdl_loss_args_t a;
    gcase_t c = small_case(h, KDL_REDUCTION_MEAN, &in, &D, &a);
    kdl_loss_args_t bad = a;
    bad.grad = (void *)a.student;
    cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &bad, D.ws, D.ws_bytes), KDL_STATUS_NOT_SUPPORTED);
    bad.grad = (char *)a.teacher + 4 * 150; /* overlapping, not equal */
    cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &bad, D.ws, D.ws_bytes), KDL_STATUS_NOT_SUPPORTED);
    expect_loss_untouched(&D, "refused");
    /* the separate gradient buffer still works */
    cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &a, D.ws, D.ws_bytes), KDL_STATUS_SUCCESS, "%s",
                 kdl_get_last_error());
    CUDA_OK(cudaDeviceSynchronize());
    dev_free(&c, &D);
    free_inputs(&c, &in);
    kdl_destroy(h);
}

/* ============================================= fourth review (2026-11-23) */

/* Review R4-1, on the CPU: the launcher's rule for a gradient that shares
 * memory with the logits.  Only the logits buffer itself (same base, row
 * stride, element size) is safe, and only for NONE and SUM; before the fix
 * NONE and SUM accepted any overlap (an offset, another stride, an f32
 * gradient over 16-bit logits), where one thread's gradient store
 * overwrites logits another thread or CTA has not read yet. */
Test(gpu_loss_host, gradient_alias_rule)
{
    static float buf[4 * 16 * 2];
    const int64_t N = 4, V = 8;
    /* disjoint, and adjacent (one span ends where the other starts) */
    cr_expect(kdl_loss_grad_alias_ok(buf, V, 4, buf + N * V, V, 4, N, V, 0));
    cr_expect(kdl_loss_grad_alias_ok(buf + N * V, V, 4, buf, V, 4, N, V, 1));
    /* the logits themselves: NONE and SUM yes, MEAN no (the redo launch) */
    cr_expect(kdl_loss_grad_alias_ok(buf, V, 4, buf, V, 4, N, V, 0));
    cr_expect(!kdl_loss_grad_alias_ok(buf, V, 4, buf, V, 4, N, V, 1));
    cr_expect(kdl_loss_grad_alias_ok(buf, 16, 2, buf, 16, 2, N, V, 0), "16-bit, ld > V: the same buffer");
    /* any other overlap: refused */
    cr_expect(!kdl_loss_grad_alias_ok(buf + 1, V, 4, buf, V, 4, N, V, 0), "offset by one element");
    cr_expect(!kdl_loss_grad_alias_ok(buf + V, V, 4, buf, V, 4, N, V, 0), "offset by one row");
    cr_expect(!kdl_loss_grad_alias_ok(buf, 16, 4, buf, V, 4, N, V, 0), "another row stride");
    cr_expect(!kdl_loss_grad_alias_ok(buf, V, 4, buf, V, 2, N, V, 0), "f32 gradient over 16-bit logits");
    cr_expect(!kdl_loss_grad_alias_ok(buf, V, 2, buf, V, 4, N, V, 0), "16-bit gradient over f32 logits");
    /* no rows: nothing is touched */
    cr_expect(kdl_loss_grad_alias_ok(buf + 1, V, 4, buf, V, 4, 0, V, 1));
}

/* Review F8, on the CPU: NONE needs only the 256-byte header (no per-row
 * loss); SUM and MEAN the header and one float per row; N = 0 nothing. */
Test(gpu_loss_host, workspace_by_reduction)
{
    const int64_t rows[] = {1, 5, 64, 65, 100000};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        cr_expect_eq(kdl_loss_ws_bytes_for(rows[i], KDL_REDUCTION_NONE), (size_t)256);
        cr_expect_eq(kdl_loss_ws_bytes_for(rows[i], KDL_REDUCTION_SUM), kdl_loss_ws_bytes(rows[i]));
        cr_expect_eq(kdl_loss_ws_bytes_for(rows[i], KDL_REDUCTION_MEAN), kdl_loss_ws_bytes(rows[i]));
        cr_expect(kdl_loss_ws_bytes(rows[i]) >= 256 + (size_t)rows[i] * sizeof(float));
    }
    for (int red = 0; red < 3; red++) cr_expect_eq(kdl_loss_ws_bytes_for(0, (kdl_reduction_t)red), (size_t)0);
}

/* Review R4-1 on the device: an in-place gradient (the student buffer
 * itself) gives the reference's gradient for NONE and SUM; an overlap that
 * is not the same buffer, or MEAN in place, is refused before any launch. */
Test(gpu_loss, in_place_gradient_only_as_the_same_buffer)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    for (int red = 0; red < 2; red++) {
        for (int pi = 0; pi < 3; pi++) {
            inputs_t in;
            dev_t_ D;
            kdl_loss_args_t a;
            gcase_t c = case_default(4, 1271, pairs[pi][0], pairs[pi][0]);
            c.d.divergence = KDL_DIV_AKL;
            c.d.reduction = (kdl_reduction_t)red;
            c.lds = c.ldg = 1280;
            c.ldt = 1271;
            c.stats = 0;
            c.seed = (uint64_t)(500 + 10 * red + pi);
            make_inputs(&c, &in);
            safe_mu(&c, &in); /* AKL: the head boundary away from float32 ties with mu */
            result_t ref, got;
            run_ref(&c, &in, &ref);
            dev_alloc(&c, &in, &D, h, &a);
            const size_t ss = kdl_dtype_size(c.sdt);
            kdl_loss_args_t bad = a;
            bad.grad = (char *)a.student + ss; /* one element off */
            bad.ld_grad = c.lds;
            bad.grad_dtype = c.sdt;
            cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &bad, D.ws, D.ws_bytes), KDL_STATUS_NOT_SUPPORTED,
                         "grad one element past the student accepted");
            if (c.sdt != KDL_DTYPE_F32) {
                bad.grad = (void *)a.student; /* f32 gradient over 16-bit logits */
                bad.grad_dtype = KDL_DTYPE_F32;
                cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &bad, D.ws, D.ws_bytes), KDL_STATUS_NOT_SUPPORTED,
                             "f32 grad over 16-bit student accepted");
            }
            bad = a;
            bad.grad = (void *)a.student;
            bad.ld_grad = c.lds + 8; /* same base, another stride */
            bad.grad_dtype = c.sdt;
            cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &bad, D.ws, D.ws_bytes), KDL_STATUS_NOT_SUPPORTED,
                         "grad over the student with another stride accepted");
            expect_loss_untouched(&D, "refused");
            kdl_loss_desc_t mean = c.d;
            mean.reduction = KDL_REDUCTION_MEAN;
            bad.ld_grad = c.lds;
            size_t wsm = 0;
            cr_assert_eq(kdl_loss_workspace_size(h, &mean, &bad, &wsm), KDL_STATUS_SUCCESS);
            void *wsp = NULL;
            CUDA_OK(cudaMalloc(&wsp, wsm));
            cr_expect_eq(kdl_loss_forward_backward(h, &mean, &bad, wsp, wsm), KDL_STATUS_NOT_SUPPORTED,
                         "MEAN in place accepted");

            /* the student buffer itself: works, and is the reference's gradient */
            cr_assert_eq(kdl_loss_forward_backward(h, &c.d, &bad, D.ws, D.ws_bytes), KDL_STATUS_SUCCESS, "%s",
                         kdl_get_last_error());
            CUDA_OK(cudaDeviceSynchronize());
            result_alloc(&c, &got);
            got.st = KDL_STATUS_SUCCESS;
            unsigned char *gb = malloc((size_t)(c.N * c.lds) * ss);
            cr_assert(gb);
            CUDA_OK(cudaMemcpy(gb, a.student, (size_t)(c.N * c.lds) * ss, cudaMemcpyDeviceToHost));
            for (int64_t i = 0; i < c.N; i++) kdl_from_dtype(gb + (size_t)(i * c.lds) * ss, got.grad + i * c.V, c.sdt, c.V);
            const int64_t nl = red == KDL_REDUCTION_NONE ? c.N : 1;
            float lb[8];
            CUDA_OK(cudaMemcpy(lb, D.loss, (size_t)nl * sizeof(float), cudaMemcpyDeviceToHost));
            for (int64_t i = 0; i < nl; i++) got.loss[i] = lb[i];
            char what[96];
            snprintf(what, sizeof what, "in place %s %s: loss", kdl_reduction_name(c.d.reduction), kdl_dtype_name(c.sdt));
            KDL_EXPECT_CLOSE(what, got.loss, ref.loss, (size_t)nl, input_tol(&c));
            compare_grad(&c, &in, &got, &ref);
            free(gb);
            cudaFree(wsp);
            result_free(&ref);
            result_free(&got);
            dev_free(&c, &D);
            free_inputs(&c, &in);
        }
    }
    kdl_destroy(h);
}

/* Review F8 on the device: NONE runs with exactly the 256-byte header as
 * its workspace (no per-row loss), and a byte less is refused. */
Test(gpu_loss, none_runs_on_the_header_alone)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    static const enum row_kind kinds[] = {ROW_RANDOM, ROW_NAN, ROW_IGNORED, ROW_TIES16, ROW_RANDOM};
    gcase_t c = case_default(5, 999, KDL_DTYPE_BF16, KDL_DTYPE_BF16);
    c.d.divergence = KDL_DIV_AKL;
    c.d.reduction = KDL_REDUCTION_NONE;
    c.labels = 1;
    c.kinds = kinds;
    inputs_t in;
    make_inputs(&c, &in);
    safe_mu(&c, &in);
    result_t ref, got;
    run_ref(&c, &in, &ref);
    run_gpu(h, &c, &in, &got); /* dev_alloc sizes the workspace by the query */
    compare(&c, &in, &got, &ref, "NONE, header-only workspace");
    result_free(&got);
    dev_t_ D;
    kdl_loss_args_t a;
    dev_alloc(&c, &in, &D, h, &a);
    cr_expect_eq(D.ws_bytes, (size_t)256);
    cr_expect_eq(kdl_loss_forward_backward(h, &c.d, &a, D.ws, D.ws_bytes - 1), KDL_STATUS_WORKSPACE_TOO_SMALL);
    expect_loss_untouched(&D, "too small");
    dev_free(&c, &D);
    result_free(&ref);
    free_inputs(&c, &in);
    kdl_destroy(h);
}

/* Review F7: the per-handle memo of kernel attributes and cluster
 * residency gives the same plan and the same bits on every call, also
 * after a call with another dtype pair and another forced cluster size. */
Test(gpu_loss, memoised_setup_gives_the_same_plan_and_bits)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    const char *paths[] = {NULL, "cluster", "stream"};
    const int clusters[] = {0, 3, 2};
    for (int pi = 0; pi < 3; pi++) {
        set_path(paths[pi], clusters[pi]);
        gcase_t c = case_default(3, 151936, KDL_DTYPE_BF16, KDL_DTYPE_BF16);
        c.d.divergence = KDL_DIV_AKL;
        c.d.reduction = KDL_REDUCTION_SUM;
        c.stats = 0;
        inputs_t in;
        make_inputs(&c, &in);
        result_t r1, r2, r3;
        raw_t a, b, x;
        memset(&a, 0, sizeof a);
        memset(&b, 0, sizeof b);
        memset(&x, 0, sizeof x);
        run_gpu_raw(h, &c, &in, &r1, &a);
        const kdl_loss_plan_t p1 = kdl_loss_last_plan();
        /* another kernel and, forced, another cluster size in between */
        gcase_t o = case_default(2, 40000, KDL_DTYPE_F32, KDL_DTYPE_F16);
        o.stats = 0;
        inputs_t oin;
        make_inputs(&o, &oin);
        set_path(paths[pi], clusters[pi] ? clusters[pi] + 1 : 0);
        run_gpu_raw(h, &o, &oin, &r3, &x);
        set_path(paths[pi], clusters[pi]);
        run_gpu_raw(h, &c, &in, &r2, &b);
        const kdl_loss_plan_t p2 = kdl_loss_last_plan();
        if (r1.st == KDL_STATUS_SUCCESS) {
            cr_expect_eq(r2.st, KDL_STATUS_SUCCESS);
            cr_expect(p1.path == p2.path && p1.cluster == p2.cluster && p1.smem_dynamic == p2.smem_dynamic &&
                          p1.smem_static == p2.smem_static,
                      "path %s: plans differ: %d/%d vs %d/%d", paths[pi] ? paths[pi] : "auto", (int)p1.path,
                      p1.cluster, (int)p2.path, p2.cluster);
            cr_expect(a.loss_bytes == b.loss_bytes && memcmp(a.loss, b.loss, a.loss_bytes) == 0, "loss differs");
            cr_expect(a.grad_bytes == b.grad_bytes && memcmp(a.grad, b.grad, a.grad_bytes) == 0, "grad differs");
        } else {
            cr_expect_eq(r1.st, r2.st, "path %s: status changed between calls", paths[pi] ? paths[pi] : "auto");
        }
        free(a.loss);
        free(a.grad);
        free(b.loss);
        free(b.grad);
        free(x.loss);
        free(x.grad);
        result_free(&r1);
        result_free(&r2);
        result_free(&r3);
        free_inputs(&c, &in);
        free_inputs(&o, &oin);
    }
    set_path(NULL, 0);
    kdl_destroy(h);
}

/* Review R4-8: an unrelated error left pending on the host thread (here a
 * failed allocation the caller did not clear) must not fail the call.
 * Before the fix the prep and finalize kernels were checked with
 * cudaGetLastError(), which returned that stale error after the prep kernel
 * was enqueued: KDL_STATUS_CUDA_ERROR and no loss. */
Test(gpu_loss, a_pending_unrelated_error_does_not_fail_the_call)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    for (int red = 0; red < 3; red++) {
        gcase_t c = case_default(4, 777, KDL_DTYPE_BF16, KDL_DTYPE_BF16);
        c.d.divergence = KDL_DIV_FKL;
        c.d.reduction = (kdl_reduction_t)red;
        c.grad = 0;
        c.stats = 0;
        inputs_t in;
        make_inputs(&c, &in);
        result_t ref;
        run_ref(&c, &in, &ref);
        dev_t_ D;
        kdl_loss_args_t a;
        dev_alloc(&c, &in, &D, h, &a);
        void *huge = NULL;
        cr_assert_neq(cudaMalloc(&huge, (size_t)1 << 62), cudaSuccess, "a 4 EiB allocation succeeded");
        const kdl_status_t st = kdl_loss_forward_backward(h, &c.d, &a, D.ws, D.ws_bytes);
        (void)cudaGetLastError();
        cr_expect_eq(st, KDL_STATUS_SUCCESS, "%s: %s (%s)", kdl_reduction_name(c.d.reduction), kdl_status_string(st),
                     kdl_get_last_error());
        CUDA_OK(cudaDeviceSynchronize());
        const int64_t nl = red == KDL_REDUCTION_NONE ? c.N : 1;
        float lf[4];
        double got[4];
        CUDA_OK(cudaMemcpy(lf, D.loss, (size_t)nl * sizeof(float), cudaMemcpyDeviceToHost));
        for (int64_t i = 0; i < nl; i++) got[i] = lf[i];
        if (st == KDL_STATUS_SUCCESS) KDL_EXPECT_CLOSE("loss after a pending error", got, ref.loss, (size_t)nl, input_tol(&c));
        dev_free(&c, &D);
        result_free(&ref);
        free_inputs(&c, &in);
    }
    kdl_destroy(h);
}

/* Asynchronous on the handle's stream: a stream set on the handle is used. */
Test(gpu_loss, runs_on_the_handle_stream)
{
    KDL_SKIP_WITHOUT_GPU();
    kdl_handle_t h = new_handle();
    cudaStream_t s;
    CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cr_assert_eq(kdl_set_stream(h, (kdl_stream_t)s), KDL_STATUS_SUCCESS);
    gcase_t c = case_default(8, 3000, KDL_DTYPE_BF16, KDL_DTYPE_F32);
    c.d.divergence = KDL_DIV_TVD;
    check_case(h, &c, "non-blocking stream");
    CUDA_OK(cudaStreamSynchronize(s));
    CUDA_OK(cudaStreamDestroy(s));
    kdl_destroy(h);
}
#endif /* KDL_HAVE_CUDA */
