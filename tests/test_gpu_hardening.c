/*
 * tests/test_gpu_hardening.c - GPU robustness of the fused loss (skipped
 * visibly without a CUDA device; see docs/hardening.md for what has and has
 * not been run on hardware):
 *
 *   determinism     loss and gradient bitwise identical across 10 repeated
 *                   calls and across two streams, every divergence and
 *                   reduction, bf16 and f32, V = 151936 and an odd V;
 *   past 2^31       N = 16384, V = 151936 bf16 (N*V = 2.49e9 elements, 4.6 GiB
 *                   per tensor): rows before, across and after element 2^31
 *                   (row 14134 straddles it) against the float64 reference
 *                   computed on those rows alone;
 *   workspace       one byte too small: KDL_STATUS_WORKSPACE_TOO_SMALL;
 *   memory full     with the device's memory taken, kdl_create and the loss
 *                   return a status (or succeed: the loss allocates nothing),
 *                   never crash, and work again afterwards;
 *   wrong device    a call from a thread whose current device is not the
 *                   handle's: KDL_STATUS_WRONG_DEVICE before anything else,
 *                   nothing written, and the same call succeeds once the
 *                   handle's device is current again (with two devices; the
 *                   handle's recorded device moved instead on one device).
 *
 * Inputs are built on the host in chunks of rows from a small pool of
 * random rows, each row made unique by a row-dependent outlier position, so
 * a wrong (e.g. 32-bit wrapped) row offset reads different data.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdl_test.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"

#ifdef KDL_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "gpu_internal.h" /* struct kdl_context: the one-device mismatch test */

static void cuda_ok(cudaError_t e, const char *what, int line)
{
    cr_assert_eq(e, cudaSuccess, "line %d: %s: %s", line, what, cudaGetErrorString(e));
}
#define CUDA_OK(call) cuda_ok((call), #call, __LINE__)

/* GPU status check that turns "kernels not built yet" into a visible skip. */
#define GPU_CALL(st_expr, what)                                                                                  \
    do {                                                                                                         \
        kdl_status_t st_ = (st_expr);                                                                            \
        if (st_ == KDL_STATUS_NOT_IMPLEMENTED) cr_skip_test("GPU loss not implemented in this build: %s", what); \
        cr_assert_eq(st_, KDL_STATUS_SUCCESS, "%s: %s (%s)", what, kdl_status_string(st_), kdl_get_last_error()); \
    } while (0)

enum { POOL = 61 };

/* Row i of a synthetic logit matrix: pool row (i * 17 + salt) % POOL, plus an
 * outlier of +6 at a row-dependent position.  Written as dtype t into dst. */
typedef struct synth {
    int64_t V;
    double *pool; /* [POOL, V] */
} synth_t;

static void synth_init(synth_t *sy, int64_t V, uint64_t seed)
{
    sy->V = V;
    sy->pool = (double *)malloc((size_t)POOL * (size_t)V * sizeof(double));
    cr_assert_not_null(sy->pool);
    kdl_rng_t r = {seed};
    for (int p = 0; p < POOL; p++) kdl_fill_logits(&r, sy->pool + (size_t)p * (size_t)V, V, 2.0);
}

static void synth_row(const synth_t *sy, int64_t i, uint64_t salt, double *out)
{
    const double *src = sy->pool + (size_t)((i * 17 + (int64_t)salt) % POOL) * (size_t)sy->V;
    memcpy(out, src, (size_t)sy->V * sizeof(double));
    out[(i * 7919 + (int64_t)salt) % sy->V] += 6.0;
}

/* Fills rows [0, N) of a device matrix (ld = V) chunk by chunk. */
static void synth_upload(const synth_t *sy, int64_t N, uint64_t salt, kdl_dtype_t t, void *dev)
{
    const int64_t chunk = 256, V = sy->V;
    const size_t es = kdl_dtype_size(t);
    double *rowd = (double *)malloc((size_t)V * sizeof(double));
    unsigned char *host = (unsigned char *)malloc((size_t)chunk * (size_t)V * es);
    cr_assert(rowd && host);
    for (int64_t i0 = 0; i0 < N; i0 += chunk) {
        int64_t n = N - i0 < chunk ? N - i0 : chunk;
        for (int64_t k = 0; k < n; k++) {
            synth_row(sy, i0 + k, salt, rowd);
            kdl_to_dtype(rowd, host + (size_t)k * (size_t)V * es, t, V);
        }
        CUDA_OK(cudaMemcpy((unsigned char *)dev + (size_t)i0 * (size_t)V * es, host, (size_t)n * (size_t)V * es,
                           cudaMemcpyHostToDevice));
    }
    free(rowd);
    free(host);
}

static void synth_free(synth_t *sy) { free(sy->pool); }

typedef struct gpu_problem {
    int64_t N, V;
    kdl_dtype_t in_dtype, grad_dtype;
    void *s, *t, *grad, *loss, *ws;
    int64_t *info;
    size_t ws_bytes;
} gpu_problem_t;

static void problem_alloc(gpu_problem_t *p, int64_t N, int64_t V, kdl_dtype_t in, kdl_dtype_t gd)
{
    memset(p, 0, sizeof *p);
    p->N = N;
    p->V = V;
    p->in_dtype = in;
    p->grad_dtype = gd;
    const size_t n = (size_t)N * (size_t)V;
    CUDA_OK(cudaMalloc(&p->s, n * kdl_dtype_size(in)));
    CUDA_OK(cudaMalloc(&p->t, n * kdl_dtype_size(in)));
    CUDA_OK(cudaMalloc(&p->grad, n * kdl_dtype_size(gd)));
    CUDA_OK(cudaMalloc(&p->loss, (size_t)N * sizeof(float) + 16));
    CUDA_OK(cudaMalloc((void **)&p->info, sizeof(int64_t)));
}

/* Student and teacher logits of problem p from generator seed `seed`. */
static void problem_fill(gpu_problem_t *p, uint64_t seed)
{
    synth_t sy;
    synth_init(&sy, p->V, seed);
    synth_upload(&sy, p->N, 1, p->in_dtype, p->s);
    synth_upload(&sy, p->N, 2, p->in_dtype, p->t);
    synth_free(&sy);
}

static void problem_free(gpu_problem_t *p)
{
    cudaFree(p->s);
    cudaFree(p->t);
    cudaFree(p->grad);
    cudaFree(p->loss);
    cudaFree(p->info);
    cudaFree(p->ws);
}

static void problem_args(const gpu_problem_t *p, kdl_loss_args_t *a)
{
    kdl_loss_args_init(a);
    a->rows = p->N;
    a->vocab = p->V;
    a->student = p->s;
    a->teacher = p->t;
    a->ld_student = a->ld_teacher = a->ld_grad = p->V;
    a->student_dtype = a->teacher_dtype = p->in_dtype;
    a->grad = p->grad;
    a->grad_dtype = p->grad_dtype;
    a->out_dtype = KDL_DTYPE_F32;
    a->loss = p->loss;
    a->info = p->info;
}

/* Queries the workspace and (re)allocates it. */
static void problem_workspace(kdl_handle_t h, gpu_problem_t *p, const kdl_loss_desc_t *d)
{
    kdl_loss_args_t a;
    problem_args(p, &a);
    size_t need = 0;
    GPU_CALL(kdl_loss_workspace_size(h, d, &a, &need), "workspace query");
    if (need > p->ws_bytes) {
        cudaFree(p->ws);
        p->ws = NULL;
        CUDA_OK(cudaMalloc(&p->ws, need));
        p->ws_bytes = need;
    }
}

/* Runs once on the handle's stream, waits, copies loss and gradient back. */
static void run_once(kdl_handle_t h, gpu_problem_t *p, const kdl_loss_desc_t *d, unsigned char *loss_out,
                     size_t loss_bytes, unsigned char *grad_out, size_t grad_bytes)
{
    kdl_loss_args_t a;
    problem_args(p, &a);
    CUDA_OK(cudaMemset(p->grad, 0xA5, grad_bytes));
    CUDA_OK(cudaMemset(p->loss, 0xA5, loss_bytes));
    GPU_CALL(kdl_loss_forward_backward(h, d, &a, p->ws, p->ws_bytes), kdl_divergence_name(d->divergence));
    kdl_stream_t s = NULL;
    cr_assert_eq(kdl_get_stream(h, &s), KDL_STATUS_SUCCESS);
    CUDA_OK(cudaStreamSynchronize((cudaStream_t)s));
    CUDA_OK(cudaMemcpy(loss_out, p->loss, loss_bytes, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(grad_out, p->grad, grad_bytes, cudaMemcpyDeviceToHost));
}
#endif /* KDL_HAVE_CUDA */

/* ============================================================ determinism */
Test(gpu_hardening, bitwise_deterministic_runs_and_streams)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    kdl_handle_t h = NULL;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS);
    cudaStream_t st[2];
    CUDA_OK(cudaStreamCreateWithFlags(&st[0], cudaStreamNonBlocking));
    CUDA_OK(cudaStreamCreateWithFlags(&st[1], cudaStreamNonBlocking));
    const struct {
        int64_t N, V;
        kdl_dtype_t in, gd;
    } shapes[] = {{64, 151936, KDL_DTYPE_BF16, KDL_DTYPE_BF16}, {37, 32003, KDL_DTYPE_F32, KDL_DTYPE_F32},
                  {5, 128256, KDL_DTYPE_F16, KDL_DTYPE_F32}};
    for (size_t sh = 0; sh < sizeof shapes / sizeof shapes[0]; sh++) {
        gpu_problem_t p;
        problem_alloc(&p, shapes[sh].N, shapes[sh].V, shapes[sh].in, shapes[sh].gd);
        problem_fill(&p, 1000 + sh);
        const size_t grad_bytes = (size_t)p.N * (size_t)p.V * kdl_dtype_size(p.grad_dtype);
        const size_t loss_bytes = (size_t)p.N * sizeof(float);
        unsigned char *l0 = malloc(loss_bytes), *g0 = malloc(grad_bytes), *l1 = malloc(loss_bytes),
                      *g1 = malloc(grad_bytes);
        cr_assert(l0 && g0 && l1 && g1);
        for (int div = 0; div < KDL_DIV_COUNT_; div++)
            for (int red = 0; red < KDL_REDUCTION_COUNT_; red++) {
                kdl_loss_desc_t d;
                kdl_loss_desc_init(&d);
                d.divergence = (kdl_divergence_t)div;
                d.reduction = (kdl_reduction_t)red;
                d.temperature = 2.0;
                d.top_k = 8;
                d.head_rule = div % 2 ? KDL_HEAD_MASS : KDL_HEAD_REFERENCE;
                const size_t lb = red == KDL_REDUCTION_NONE ? loss_bytes : sizeof(float);
                problem_workspace(h, &p, &d);
                cr_assert_eq(kdl_set_stream(h, (kdl_stream_t)st[0]), KDL_STATUS_SUCCESS);
                run_once(h, &p, &d, l0, lb, g0, grad_bytes);
                for (int rep = 0; rep < 10; rep++) {
                    cr_assert_eq(kdl_set_stream(h, (kdl_stream_t)st[rep % 2]), KDL_STATUS_SUCCESS);
                    run_once(h, &p, &d, l1, lb, g1, grad_bytes);
                    cr_expect(memcmp(l0, l1, lb) == 0, "N %lld V %lld %s %s run %d (stream %d): loss differs",
                              (long long)p.N, (long long)p.V, kdl_divergence_name(d.divergence),
                              kdl_reduction_name(d.reduction), rep, rep % 2);
                    cr_expect(memcmp(g0, g1, grad_bytes) == 0, "N %lld V %lld %s %s run %d (stream %d): grad differs",
                              (long long)p.N, (long long)p.V, kdl_divergence_name(d.divergence),
                              kdl_reduction_name(d.reduction), rep, rep % 2);
                }
            }
        free(l0);
        free(g0);
        free(l1);
        free(g1);
        problem_free(&p);
    }
    kdl_set_stream(h, NULL);
    cudaStreamDestroy(st[0]);
    cudaStreamDestroy(st[1]);
    kdl_destroy(h);
#endif
}

/* ========================================================== past 2^31 */
Test(gpu_hardening, rows_past_2_pow_31_elements)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    const int64_t N = 16384, V = 151936; /* N*V = 2,489,319,424 > 2^31 */
    size_t free_b = 0, total_b = 0;
    CUDA_OK(cudaMemGetInfo(&free_b, &total_b));
    const size_t need = (size_t)N * (size_t)V * (2 + 2 + 4) + ((size_t)1 << 30);
    if (free_b < need) cr_skip_test("needs %zu GiB of free device memory, %zu free", need >> 30, free_b >> 30);

    kdl_handle_t h = NULL;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS);
    gpu_problem_t p;
    problem_alloc(&p, N, V, KDL_DTYPE_BF16, KDL_DTYPE_F32);
    synth_t sy;
    synth_init(&sy, V, 4242);
    synth_upload(&sy, N, 3, KDL_DTYPE_BF16, p.s);
    synth_upload(&sy, N, 5, KDL_DTYPE_BF16, p.t);

    /* rows before, across (14134 straddles element 2^31) and after 2^31, the
     * last row, and a few more */
    int64_t rows[16] = {0, 1, 8191, 14133, 14134, 14135, 16000, 16383};
    int nr = 8;
    kdl_rng_t r = {99};
    while (nr < 12) rows[nr++] = (int64_t)(kdl_rng_next(&r) % (uint64_t)N);

    const kdl_divergence_t divs[] = {KDL_DIV_FKL, KDL_DIV_AKL, KDL_DIV_JSD};
    float *loss = (float *)malloc((size_t)N * sizeof(float));
    float *grow = (float *)malloc((size_t)V * sizeof(float));
    double *srow = (double *)malloc((size_t)V * sizeof(double)), *trow = (double *)malloc((size_t)V * sizeof(double));
    double *ref_grad = (double *)malloc((size_t)V * sizeof(double)), *got_grad = (double *)malloc((size_t)V * sizeof(double));
    uint16_t *s16 = (uint16_t *)malloc((size_t)V * 2), *t16 = (uint16_t *)malloc((size_t)V * 2);
    cr_assert(loss && grow && srow && trow && ref_grad && got_grad && s16 && t16);
    /* fp32 kernel vs float64 reference over 151936 terms */
    const kdl_tol_t loss_tol = {1e-4, 1e-6}, grad_tol = {2e-3, 1e-9};

    for (size_t k = 0; k < sizeof divs / sizeof divs[0]; k++) {
        kdl_loss_desc_t d;
        kdl_loss_desc_init(&d);
        d.divergence = divs[k];
        d.reduction = KDL_REDUCTION_NONE;
        d.temperature = 1.5;
        problem_workspace(h, &p, &d);
        kdl_loss_args_t a;
        problem_args(&p, &a);
        GPU_CALL(kdl_loss_forward_backward(h, &d, &a, p.ws, p.ws_bytes), "N*V > 2^31");
        CUDA_OK(cudaDeviceSynchronize());
        CUDA_OK(cudaMemcpy(loss, p.loss, (size_t)N * sizeof(float), cudaMemcpyDeviceToHost));
        int64_t info = -1;
        CUDA_OK(cudaMemcpy(&info, p.info, sizeof info, cudaMemcpyDeviceToHost));
        cr_expect_eq(info, 0, "%s: %lld invalid rows", kdl_divergence_name(d.divergence), (long long)info);

        for (int q = 0; q < nr; q++) {
            const int64_t i = rows[q];
            /* the reference sees exactly the bf16 values on the device */
            synth_row(&sy, i, 3, srow);
            kdl_to_dtype(srow, s16, KDL_DTYPE_BF16, V);
            synth_row(&sy, i, 5, trow);
            kdl_to_dtype(trow, t16, KDL_DTYPE_BF16, V);
            double ref_loss = 0;
            kdl_loss_args_t ra;
            kdl_loss_args_init(&ra);
            ra.rows = 1;
            ra.vocab = V;
            ra.student = s16;
            ra.teacher = t16;
            ra.ld_student = ra.ld_teacher = ra.ld_grad = V;
            ra.student_dtype = ra.teacher_dtype = KDL_DTYPE_BF16;
            ra.grad = ref_grad;
            ra.grad_dtype = ra.out_dtype = KDL_DTYPE_F64;
            ra.loss = &ref_loss;
            cr_assert_eq(kdl_ref_loss_forward_backward(&d, &ra), KDL_STATUS_SUCCESS);
            double got_loss = loss[i];
            char what[96];
            snprintf(what, sizeof what, "%s row %lld loss", kdl_divergence_name(d.divergence), (long long)i);
            KDL_EXPECT_CLOSE(what, &got_loss, &ref_loss, 1, loss_tol);
            CUDA_OK(cudaMemcpy(grow, (const float *)p.grad + (size_t)i * (size_t)V, (size_t)V * sizeof(float),
                               cudaMemcpyDeviceToHost));
            for (int64_t v = 0; v < V; v++) got_grad[v] = grow[v];
            snprintf(what, sizeof what, "%s row %lld grad", kdl_divergence_name(d.divergence), (long long)i);
            KDL_EXPECT_CLOSE(what, got_grad, ref_grad, (size_t)V, grad_tol);
        }
    }

    /* workspace one byte short, on the big problem */
    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = KDL_DIV_AKL;
    problem_workspace(h, &p, &d);
    kdl_loss_args_t a;
    problem_args(&p, &a);
    size_t ws_need = 0;
    cr_assert_eq(kdl_loss_workspace_size(h, &d, &a, &ws_need), KDL_STATUS_SUCCESS);
    if (ws_need > 0)
        cr_expect_eq(kdl_loss_forward_backward(h, &d, &a, p.ws, ws_need - 1), KDL_STATUS_WORKSPACE_TOO_SMALL);

    free(loss);
    free(grow);
    free(srow);
    free(trow);
    free(ref_grad);
    free(got_grad);
    free(s16);
    free(t16);
    synth_free(&sy);
    problem_free(&p);
    kdl_destroy(h);
#endif
}

/* ======================================================= memory exhausted */
Test(gpu_hardening, device_memory_exhausted_gives_a_status)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    /* A working problem first, its buffers allocated before memory runs out. */
    kdl_handle_t h = NULL;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS);
    gpu_problem_t p;
    problem_alloc(&p, 8, 32000, KDL_DTYPE_F32, KDL_DTYPE_F32);
    problem_fill(&p, 7);
    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = KDL_DIV_AKL;
    problem_workspace(h, &p, &d);

    /* Take every byte cudaMalloc will give, in halving chunks. */
    void *hog[4096];
    int nh = 0;
    size_t chunk = (size_t)1 << 34;
    while (chunk >= ((size_t)1 << 20) && nh < 4096) {
        void *q = NULL;
        if (cudaMalloc(&q, chunk) == cudaSuccess)
            hog[nh++] = q;
        else {
            (void)cudaGetLastError();
            chunk /= 2;
        }
    }
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    cr_log_info("memory taken: %d blocks, %zu MiB left", nh, free_b >> 20);

    /* The loss allocates nothing: it must still run, or return a status. */
    kdl_loss_args_t a;
    problem_args(&p, &a);
    kdl_status_t st = kdl_loss_forward_backward(h, &d, &a, p.ws, p.ws_bytes);
    cr_expect(st == KDL_STATUS_SUCCESS || st == KDL_STATUS_CUDA_ERROR || st == KDL_STATUS_NOT_IMPLEMENTED,
              "loss with memory full: %s (%s)", kdl_status_string(st), kdl_get_last_error());
    cr_expect_eq(cudaDeviceSynchronize(), cudaSuccess);
    /* A second handle: kdl_create also creates cuBLAS, but a cuBLAS failure
     * (likely here) leaves it for the first call that needs it and does
     * not fail kdl_create (docs/kernels.md, Handle) */
    kdl_handle_t h2 = NULL;
    st = kdl_create(&h2);
    cr_expect(st == KDL_STATUS_SUCCESS || st == KDL_STATUS_ALLOC_FAILED || st == KDL_STATUS_CUDA_ERROR,
              "kdl_create with memory full: %s", kdl_status_string(st));
    if (st == KDL_STATUS_SUCCESS) kdl_destroy(h2);
    /* A problem too big for what is left: a status from the caller's own
     * allocation (the library never allocates device memory for the loss) */
    void *big = NULL;
    cr_expect_neq(cudaMalloc(&big, (size_t)1 << 30), cudaSuccess, "memory was not exhausted");
    (void)cudaGetLastError();

    for (int k = 0; k < nh; k++) cudaFree(hog[k]);
    /* and everything works again */
    st = kdl_loss_forward_backward(h, &d, &a, p.ws, p.ws_bytes);
    if (st != KDL_STATUS_NOT_IMPLEMENTED) cr_expect_eq(st, KDL_STATUS_SUCCESS, "after freeing: %s", kdl_status_string(st));
    cr_expect_eq(cudaDeviceSynchronize(), cudaSuccess);
    problem_free(&p);
    kdl_destroy(h);
#endif
}

/* ========================================================== wrong device */
Test(gpu_hardening_host, wrong_device_status_has_its_own_string)
{
    const char *s = kdl_status_string(KDL_STATUS_WRONG_DEVICE);
    cr_assert_not_null(s);
    cr_expect(strncmp(s, "KDL_STATUS_WRONG_DEVICE:", 24) == 0, "%s", s);
    cr_expect_eq((int)KDL_STATUS_WRONG_DEVICE, 3005); /* runtime group; never renumbered */
    for (int v = 0; v < KDL_STATUS_COUNT_; v++) {
        if (v == (int)KDL_STATUS_WRONG_DEVICE) continue;
        const char *o = kdl_status_string((kdl_status_t)v);
        cr_expect(strcmp(s, o) != 0, "status %d has the same string", v);
    }
}

#ifdef KDL_HAVE_CUDA
/* A valid loss call (AKL, SUM, f32, with gradient) refused while device
 * `other` is current: the loss and gradient sentinels stay as written, the
 * other entry points give the same status before they look at their
 * arguments, and the call runs once the handle's device is current again.
 * `other` < 0: the handle's recorded device is moved instead (one GPU). */
static void wrong_device_case(int other)
{
    int dev = -1;
    CUDA_OK(cudaGetDevice(&dev));
    kdl_handle_t h = NULL;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS);
    gpu_problem_t p;
    problem_alloc(&p, 4, 1000, KDL_DTYPE_F32, KDL_DTYPE_F32);
    problem_fill(&p, 11);
    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = KDL_DIV_AKL;
    d.reduction = KDL_REDUCTION_SUM;
    problem_workspace(h, &p, &d);
    kdl_loss_args_t a;
    problem_args(&p, &a);
    const size_t gbytes = (size_t)p.N * (size_t)p.V * sizeof(float);
    CUDA_OK(cudaMemset(p.grad, 0xA5, gbytes));
    CUDA_OK(cudaMemset(p.loss, 0xA5, sizeof(float)));
    CUDA_OK(cudaMemset(p.info, 0xA5, sizeof(int64_t)));
    CUDA_OK(cudaDeviceSynchronize());

    if (other >= 0)
        CUDA_OK(cudaSetDevice(other));
    else
        h->device = dev + 1; /* as if created on another device */
    kdl_status_t st = kdl_loss_forward_backward(h, &d, &a, p.ws, p.ws_bytes);
    cr_expect_eq(st, KDL_STATUS_WRONG_DEVICE, "loss: %s (%s)", kdl_status_string(st), kdl_get_last_error());
    cr_expect(strstr(kdl_get_last_error(), "current CUDA device") != NULL, "detail: %s", kdl_get_last_error());
    /* the prologue comes first: NULL arguments are not even looked at */
    cr_expect_eq(kdl_loss_forward_backward(h, NULL, NULL, NULL, 0), KDL_STATUS_WRONG_DEVICE);
    cr_expect_eq(kdl_sinkhorn(h, NULL, NULL, NULL, 0), KDL_STATUS_WRONG_DEVICE);
    cr_expect_eq(kdl_sinkd(h, NULL, NULL, NULL, 0), KDL_STATUS_WRONG_DEVICE);
    cr_expect_eq(kdl_sparse_loss(h, NULL, NULL, NULL, 0), KDL_STATUS_WRONG_DEVICE);
    kdl_shard_op_t op;
    int64_t count = 0;
    cr_expect_eq(kdl_shard_step(h, NULL, NULL, 0, &op, &count), KDL_STATUS_WRONG_DEVICE);
    cr_expect_eq(kdl_fused_linear_loss(h, NULL, NULL, NULL, 0), KDL_STATUS_WRONG_DEVICE);
    /* a workspace query reads only the handle: answered on any device */
    size_t need = 0;
    cr_expect_eq(kdl_loss_workspace_size(h, &d, &a, &need), KDL_STATUS_SUCCESS);
    cr_expect_eq(need, p.ws_bytes);

    if (other >= 0)
        CUDA_OK(cudaSetDevice(dev));
    else
        h->device = dev;
    CUDA_OK(cudaDeviceSynchronize());
    unsigned char *g = (unsigned char *)malloc(gbytes);
    cr_assert_not_null(g);
    unsigned char l[sizeof(float)], inf[sizeof(int64_t)];
    CUDA_OK(cudaMemcpy(g, p.grad, gbytes, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(l, p.loss, sizeof l, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(inf, p.info, sizeof inf, cudaMemcpyDeviceToHost));
    size_t touched = 0;
    for (size_t k = 0; k < gbytes; k++) touched += g[k] != 0xA5;
    for (size_t k = 0; k < sizeof l; k++) touched += l[k] != 0xA5;
    for (size_t k = 0; k < sizeof inf; k++) touched += inf[k] != 0xA5;
    cr_expect_eq(touched, 0, "%zu bytes written by a refused call", touched);

    /* the same call on the handle's device runs, and writes */
    GPU_CALL(kdl_loss_forward_backward(h, &d, &a, p.ws, p.ws_bytes), "loss on the handle's device");
    CUDA_OK(cudaDeviceSynchronize());
    float loss = 0.0f;
    CUDA_OK(cudaMemcpy(&loss, p.loss, sizeof loss, cudaMemcpyDeviceToHost));
    cr_expect(isfinite(loss) && loss >= 0.0f, "loss %g", (double)loss);
    free(g);
    problem_free(&p);
    kdl_destroy(h);
}
#endif

Test(gpu_hardening, wrong_device_is_refused_before_any_write)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    int n = 0;
    CUDA_OK(cudaGetDeviceCount(&n));
    if (n < 2) {
        fprintf(stderr, "[SKIP] gpu_hardening::wrong_device_is_refused_before_any_write: %d CUDA device(s), "
                        "needs 2 (one_device_mismatch_is_refused covers the check on one)\n", n);
        cr_skip_test("needs 2 CUDA devices, found %d", n);
    }
    int dev = -1;
    CUDA_OK(cudaGetDevice(&dev));
    wrong_device_case(dev == 0 ? 1 : 0);
#endif
}

Test(gpu_hardening, one_device_mismatch_is_refused)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    wrong_device_case(-1);
#endif
}
