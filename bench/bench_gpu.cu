/*
 * bench/bench_gpu.cu - CUDA-event timing of kdloss for `kdloss bench`
 * (method in bench_gpu.h and README.md in this folder).
 *
 * Reads and writes: per (shape, dtype) it allocates the student and teacher
 * logits [N, V] and the gradient [N, V] in the student dtype (several sets
 * when one set is small next to L2), fills the inputs with random logits by
 * fill_logits(), and per divergence calls kdl_loss_forward_backward with
 * reduction mean on the handle's stream.  The only kernel in this file is
 * that fill; everything timed is the library's.
 *
 * Build: part of the kdl_bench_lib target (bench/CMakeLists.txt), linked into
 * the `kdloss` command.  Without CUDA, bench_gpu_stub.c replaces this file.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_gpu.h"
#include "bench_lib.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ref.h"

namespace {

/* ------------------------------------------------------------ the notes */
/* Row notes live here for the life of the process (one run per process). */
char g_notes[1024][200];
int g_n_notes = 0;

const char *note(const char *fmt, ...)
{
    if (g_n_notes >= 1024) return "(more notes than room)";
    char *s = g_notes[g_n_notes++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s, sizeof g_notes[0], fmt, ap);
    va_end(ap);
    return s;
}

/* ------------------------------------------------------------ the inputs */
__device__ __forceinline__ unsigned long long mix64(unsigned long long z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* n logits of N(0, sigma^2) (Box-Muller on a counter hash), plus about one
 * outlier of +4 sigma + 3 per 32768 elements, so rows have a peaked softmax
 * as real LM logits do.  Never all zeros. */
__global__ void fill_logits(void *dst, int dtype, long long n, unsigned long long seed, float sigma)
{
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        unsigned long long h = mix64(seed + (unsigned long long)i * 0x9e3779b97f4a7c15ull);
        float u1 = ((float)(h >> 40) + 1.0f) * 0x1p-24f;         /* (0, 1] */
        float u2 = (float)((h >> 16) & 0xffffffull) * 0x1p-24f;  /* [0, 1) */
        float x = sigma * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
        if ((h & 0x7fffull) == 0) x += 4.0f * sigma + 3.0f;
        switch (dtype) {
        case KDL_DTYPE_F32: ((float *)dst)[i] = x; break;
        case KDL_DTYPE_F16: ((__half *)dst)[i] = __float2half_rn(x); break;
        default: ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(x); break;
        }
    }
}

double host_value(const void *base, kdl_dtype_t t, size_t i)
{
    switch (t) {
    case KDL_DTYPE_F32: return (double)((const float *)base)[i];
    case KDL_DTYPE_F16: return (double)__half2float(((const __half *)base)[i]);
    case KDL_DTYPE_BF16: return (double)__bfloat162float(((const __nv_bfloat16 *)base)[i]);
    case KDL_DTYPE_F64: return ((const double *)base)[i];
    }
    return NAN;
}

/* ------------------------------------------------------------ the state */
struct bench {
    const kdlb_options_t *o;
    kdlb_meta_t *meta;
    cudaStream_t stream;
    kdl_handle_t h;
    cudaEvent_t *ev_start, *ev_stop;
    int n_events;
    void *flush;
    size_t flush_bytes;
    int flush_round;
    double *samples;
    char *err;
    size_t errlen;
    /* inputs of the current (shape, dtype) */
    int cur_shape, cur_dtype;
    int n_sets;
    void *S[8], *T[8], *G[8];
    int inputs_oom;
    float *loss;
};

int fail(bench *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->err, b->errlen, fmt, ap);
    va_end(ap);
    return -1;
}

#define CU(call)                                                                                  \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess)                                                                    \
            return fail(b, "%s: %s (%s:%d)", #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
    } while (0)

int launch_fill(bench *b, void *dst, kdl_dtype_t t, size_t n, unsigned long long seed)
{
    int blocks = (int)((n + 255) / 256);
    int cap = (b->meta->sm_count > 0 ? b->meta->sm_count : 32) * 32;
    if (blocks > cap) blocks = cap;
    if (blocks < 1) blocks = 1;
    fill_logits<<<blocks, 256, 0, b->stream>>>(dst, (int)t, (long long)n, seed, 2.0f);
    CU(cudaGetLastError());
    return 0;
}

/* Writes the flush buffer: afterwards no line of any input is in L2. */
int flush_l2(bench *b)
{
    CU(cudaMemsetAsync(b->flush, (b->flush_round++) & 0xff, b->flush_bytes, b->stream));
    return 0;
}

/* Allocation that reports "out of memory" as 1 (and clears the error),
 * other failures as -1. */
int try_malloc(bench *b, void **p, size_t bytes)
{
    *p = NULL;
    if (bytes == 0) return 0;
    cudaError_t e = cudaMalloc(p, bytes);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        *p = NULL;
        return 1;
    }
    if (e != cudaSuccess) return fail(b, "cudaMalloc(%zu): %s", bytes, cudaGetErrorString(e));
    return 0;
}

void free_inputs(bench *b)
{
    for (int s = 0; s < 8; s++) {
        cudaFree(b->S[s]);
        cudaFree(b->T[s]);
        cudaFree(b->G[s]);
        b->S[s] = b->T[s] = b->G[s] = NULL;
    }
    b->n_sets = 0;
}

/* ------------------------------------------------- copy bandwidth (D2D) */
int measure_copy(bench *b)
{
    size_t l2 = (size_t)b->meta->l2_bytes;
    size_t bytes = 16 * l2 > ((size_t)1 << 30) ? 16 * l2 : ((size_t)1 << 30);
    bytes &= ~(((size_t)2 << 20) - 1); /* whole 2 MiB pages */
    void *src = NULL, *dst = NULL;
    for (;;) {
        int r1 = try_malloc(b, &src, bytes);
        if (r1 < 0) return -1;
        int r2 = r1 ? 1 : try_malloc(b, &dst, bytes);
        if (r2 < 0) return -1;
        if (!r1 && !r2) break;
        cudaFree(src);
        cudaFree(dst);
        src = dst = NULL;
        if (bytes <= ((size_t)256 << 20)) return fail(b, "no room for the copy-bandwidth buffers");
        bytes /= 2;
    }
    if (launch_fill(b, src, KDL_DTYPE_F32, bytes / 4, 0x5eedc0deull)) return -1;
    int reps = b->o->repeats > 10 ? b->o->repeats : 10;
    if (reps > b->n_events) reps = b->n_events;
    for (int w = 0; w < 3; w++) CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, b->stream));
    for (int r = 0; r < reps; r++) {
        if (flush_l2(b)) return -1;
        CU(cudaEventRecord(b->ev_start[r], b->stream));
        CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, b->stream));
        CU(cudaEventRecord(b->ev_stop[r], b->stream));
    }
    CU(cudaStreamSynchronize(b->stream));
    for (int r = 0; r < reps; r++) {
        float ms = 0.0f;
        CU(cudaEventElapsedTime(&ms, b->ev_start[r], b->ev_stop[r]));
        b->samples[r] = ms;
    }
    double med = kdlb_median(b->samples, (size_t)reps);
    b->meta->copy_bytes = bytes;
    b->meta->copy_gb_per_s = kdlb_copy_gb_per_s(bytes, med);
    CU(cudaFree(src));
    CU(cudaFree(dst));
    return 0;
}

/* ------------------------------------------------------------ the inputs */
/* Makes the inputs of case c current.  Returns 0 (b->inputs_oom says
 * whether they fit), -1 on a CUDA failure. */
int prepare_inputs(bench *b, const kdlb_case_t *c)
{
    if (c->shape_index == b->cur_shape && c->dtype_index == b->cur_dtype) return 0;
    free_inputs(b);
    b->cur_shape = c->shape_index;
    b->cur_dtype = c->dtype_index;
    b->inputs_oom = 0;
    size_t elems = (size_t)c->shape.rows * (size_t)c->shape.vocab;
    size_t es = kdl_dtype_size(c->dtype);
    uint64_t footprint = kdlb_loss_bytes(c->shape.rows, c->shape.vocab, c->dtype, c->dtype, c->dtype);
    uint64_t l2x4 = 4 * (uint64_t)b->meta->l2_bytes;
    int sets = 1;
    if (footprint > 0 && footprint < l2x4) {
        sets = (int)((l2x4 + footprint - 1) / footprint);
        if (sets > 8) sets = 8;
    }
    for (int s = 0; s < sets; s++) {
        int r = try_malloc(b, &b->S[s], elems * es);
        if (!r) r = try_malloc(b, &b->T[s], elems * es);
        if (!r) r = try_malloc(b, &b->G[s], elems * es);
        if (r < 0) return -1;
        if (r > 0) {
            if (s == 0) {
                free_inputs(b);
                b->inputs_oom = 1;
                return 0;
            }
            cudaFree(b->S[s]);
            cudaFree(b->T[s]);
            cudaFree(b->G[s]);
            b->S[s] = b->T[s] = b->G[s] = NULL;
            sets = s; /* fewer sets: still flushed between runs */
            break;
        }
        unsigned long long seed = 0x243f6a8885a308d3ull ^ ((unsigned long long)c->shape_index << 40) ^
                                  ((unsigned long long)c->dtype_index << 32) ^ (unsigned long long)s;
        if (launch_fill(b, b->S[s], c->dtype, elems, seed)) return -1;
        if (launch_fill(b, b->T[s], c->dtype, elems, seed ^ 0x13198a2e03707344ull)) return -1;
        /* the gradient is poisoned (all bits set: NaN); the library overwrites it */
        CU(cudaMemsetAsync(b->G[s], 0xff, elems * es, b->stream));
    }
    b->n_sets = sets;
    CU(cudaStreamSynchronize(b->stream));
    return 0;
}

void make_desc(const kdlb_options_t *o, const kdlb_case_t *c, kdl_loss_desc_t *d)
{
    kdl_loss_desc_init(d);
    d->divergence = c->divergence;
    d->reduction = KDL_REDUCTION_MEAN;
    if (c->has_head_rule) d->head_rule = c->head_rule;
    d->mu = o->mu;
    d->top_k = o->top_k < c->shape.vocab ? o->top_k : c->shape.vocab;
}

void make_args(bench *b, const kdlb_case_t *c, int set, int64_t rows, kdl_loss_args_t *a)
{
    kdl_loss_args_init(a);
    a->rows = rows;
    a->vocab = c->shape.vocab;
    a->student = b->S[set];
    a->ld_student = c->shape.vocab;
    a->student_dtype = c->dtype;
    a->teacher = b->T[set];
    a->ld_teacher = c->shape.vocab;
    a->teacher_dtype = c->dtype;
    a->grad = b->G[set];
    a->ld_grad = c->shape.vocab;
    a->grad_dtype = c->dtype;
    a->out_dtype = KDL_DTYPE_F32;
    a->loss = b->loss;
}

/* Sets the row's status from a failed library call.  Returns 1 if the run
 * can go on, 0 if the device may be unusable. */
int status_to_row(kdlb_row_t *row, kdl_status_t st)
{
    if (st == KDL_STATUS_NOT_IMPLEMENTED) {
        row->status = "not_implemented";
        row->note = note("%s", kdl_get_last_error());
        return 1;
    }
    row->status = "error";
    row->note = note("%s (%s)", kdl_status_string(st), kdl_get_last_error());
    return st != KDL_STATUS_CUDA_ERROR;
}

/* --------------------------------------------------- reference check */
/* Runs the first rows of case c on the device and in the float64 reference;
 * sets row->check_rel_err = max(|loss - ref| / max(|ref|, 1e-6),
 * ||grad - ref|| / ||ref||).  Returns the library's status (SUCCESS after a
 * completed check), or KDL_STATUS_CUDA_ERROR with b->err set. */
kdl_status_t check_case(bench *b, const kdlb_case_t *c, const kdl_loss_desc_t *d, void *ws,
                        size_t ws_bytes, kdlb_row_t *row)
{
    int64_t rows = c->shape.rows < 4 ? c->shape.rows : 4;
    int64_t V = c->shape.vocab;
    size_t n = (size_t)rows * (size_t)V, es = kdl_dtype_size(c->dtype);
    kdl_loss_args_t a;
    make_args(b, c, 0, rows, &a);
    size_t need = 0;
    kdl_status_t st = kdl_loss_workspace_size(b->h, d, &a, &need);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (need > ws_bytes) { /* fewer rows never need more; be safe anyway */
        row->note = note("check skipped: workspace for %lld rows exceeds the full one", (long long)rows);
        return KDL_STATUS_SUCCESS;
    }
    st = kdl_loss_forward_backward(b->h, d, &a, ws, ws_bytes);
    if (st != KDL_STATUS_SUCCESS) return st;
    unsigned char *hs = (unsigned char *)malloc(n * es), *ht = (unsigned char *)malloc(n * es);
    unsigned char *hg = (unsigned char *)malloc(n * es);
    double *rg = (double *)malloc(n * sizeof(double));
    float gl = 0.0f;
    double rl = 0.0;
    cudaError_t e = cudaSuccess;
    if (!hs || !ht || !hg || !rg) {
        free(hs), free(ht), free(hg), free(rg);
        row->note = note("check skipped: host allocation");
        return KDL_STATUS_SUCCESS;
    }
    if (e == cudaSuccess) e = cudaStreamSynchronize(b->stream);
    if (e == cudaSuccess) e = cudaMemcpy(hs, b->S[0], n * es, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess) e = cudaMemcpy(ht, b->T[0], n * es, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess) e = cudaMemcpy(hg, b->G[0], n * es, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess) e = cudaMemcpy(&gl, b->loss, sizeof gl, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        free(hs), free(ht), free(hg), free(rg);
        fail(b, "reference check: %s", cudaGetErrorString(e));
        return KDL_STATUS_CUDA_ERROR;
    }
    kdl_loss_args_t r;
    kdl_loss_args_init(&r);
    r.rows = rows;
    r.vocab = V;
    r.student = hs;
    r.ld_student = V;
    r.student_dtype = c->dtype;
    r.teacher = ht;
    r.ld_teacher = V;
    r.teacher_dtype = c->dtype;
    r.grad = rg;
    r.ld_grad = V;
    r.grad_dtype = KDL_DTYPE_F64;
    r.out_dtype = KDL_DTYPE_F64;
    r.loss = &rl;
    kdl_status_t rst = kdl_ref_loss_forward_backward(d, &r);
    if (rst != KDL_STATUS_SUCCESS) {
        row->note = note("check skipped: reference returned %s", kdl_status_string(rst));
    } else {
        double num = 0.0, den = 0.0;
        for (size_t i = 0; i < n; i++) {
            double g = host_value(hg, c->dtype, i), diff = g - rg[i];
            num += diff * diff;
            den += rg[i] * rg[i];
        }
        double eg = den > 0.0 ? sqrt(num / den) : sqrt(num);
        double el = fabs((double)gl - rl) / fmax(fabs(rl), 1e-6);
        row->check_rel_err = isnan(eg) || isnan(el) ? INFINITY : fmax(eg, el);
    }
    free(hs), free(ht), free(hg), free(rg);
    return KDL_STATUS_SUCCESS;
}

/* ---------------------------------------------------- one loss config */
/* Returns 0 to go on, -1 to stop the run (b->err set). */
int time_case(bench *b, const kdlb_case_t *c, kdlb_row_t *row)
{
    const kdlb_options_t *o = b->o;
    if (prepare_inputs(b, c)) return -1;
    row->bytes = kdlb_loss_bytes(c->shape.rows, c->shape.vocab, c->dtype, c->dtype, c->dtype);
    if (b->inputs_oom) {
        row->status = "oom";
        row->note = note("inputs of %llu bytes do not fit in device memory",
                         (unsigned long long)row->bytes);
        return 0;
    }
    kdl_loss_desc_t d;
    make_desc(o, c, &d);
    kdl_loss_args_t a;
    make_args(b, c, 0, c->shape.rows, &a);
    size_t ws_bytes = 0;
    kdl_status_t st = kdl_loss_workspace_size(b->h, &d, &a, &ws_bytes);
    if (st != KDL_STATUS_SUCCESS) return status_to_row(row, st) ? 0 : fail(b, "%s", row->note);
    void *ws = NULL;
    int r = try_malloc(b, &ws, ws_bytes);
    if (r < 0) return -1;
    if (r > 0) {
        row->status = "oom";
        row->note = note("workspace of %zu bytes does not fit", ws_bytes);
        return 0;
    }
    size_t free0 = 0, free1 = 0, total = 0;
    CU(cudaMemGetInfo(&free0, &total));

    if (o->check) {
        st = check_case(b, c, &d, ws, ws_bytes, row);
        if (st == KDL_STATUS_CUDA_ERROR && b->err[0]) {
            cudaFree(ws);
            return -1;
        }
        if (st != KDL_STATUS_SUCCESS) {
            cudaFree(ws);
            return status_to_row(row, st) ? 0 : fail(b, "%s", row->note);
        }
    }
    for (int w = 0; w < o->warmup; w++) {
        make_args(b, c, w % b->n_sets, c->shape.rows, &a);
        if (flush_l2(b)) return -1;
        st = kdl_loss_forward_backward(b->h, &d, &a, ws, ws_bytes);
        if (st != KDL_STATUS_SUCCESS) {
            cudaFree(ws);
            return status_to_row(row, st) ? 0 : fail(b, "%s", row->note);
        }
    }
    int reps = o->repeats < b->n_events ? o->repeats : b->n_events;
    for (int k = 0; k < reps; k++) {
        make_args(b, c, k % b->n_sets, c->shape.rows, &a);
        if (flush_l2(b)) return -1;
        CU(cudaEventRecord(b->ev_start[k], b->stream));
        st = kdl_loss_forward_backward(b->h, &d, &a, ws, ws_bytes);
        CU(cudaEventRecord(b->ev_stop[k], b->stream));
        if (st != KDL_STATUS_SUCCESS) {
            cudaStreamSynchronize(b->stream);
            cudaFree(ws);
            return status_to_row(row, st) ? 0 : fail(b, "%s", row->note);
        }
    }
    cudaError_t e = cudaStreamSynchronize(b->stream);
    if (e != cudaSuccess) {
        row->status = "error";
        row->note = note("kernel failed: %s", cudaGetErrorString(e));
        return fail(b, "%s %s: %s", kdl_divergence_name(c->divergence), kdl_dtype_name(c->dtype),
                    cudaGetErrorString(e));
    }
    for (int k = 0; k < reps; k++) {
        float ms = 0.0f;
        CU(cudaEventElapsedTime(&ms, b->ev_start[k], b->ev_stop[k]));
        b->samples[k] = ms;
    }
    CU(cudaMemGetInfo(&free1, &total));
    CU(cudaFree(ws));
    size_t hidden = free0 > free1 ? free0 - free1 : 0; /* allocations the call kept */
    row->peak_extra_bytes = (int64_t)(ws_bytes + hidden);
    kdlb_row_set_times(row, b->samples, (size_t)reps, b->meta->copy_gb_per_s);
    double tol = c->dtype == KDL_DTYPE_F32 ? 1e-4 : 1e-2;
    if (!isnan(row->check_rel_err)) { /* NaN: not checked */
        if (!(row->check_rel_err <= tol)) {
            row->status = "mismatch";
            row->note = note("relative error %.3g vs the float64 reference (tolerance %g)",
                             row->check_rel_err, tol);
            return 0;
        }
    }
    row->status = "ok";
    return 0;
}

/* ------------------------------------------------------------ Sinkhorn */
/* C = x^2 elementwise: non-negative costs from the normal fill. */
__global__ void square_inplace(float *x, long long n)
{
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] = x[i] * x[i];
}

/* B problems of n x m, cost given (f32, random, non-negative), eps 0.1,
 * exactly o->sinkhorn_iters iterations (tol 0: no stopping test), value
 * TRANSPORT.  ms per iteration = median run / iterations; bytes per
 * iteration = kdlb_sinkhorn_iter_bytes (the cost read twice).  Checked first
 * against kdl_ref_sinkhorn on problem 0 with min(iters, 20) iterations. */
int time_sinkhorn(bench *b, kdlb_row_t *row)
{
    const kdlb_options_t *o = b->o;
    int64_t B = row->batch, n = row->n, m = row->m, K = o->sinkhorn_iters;
    size_t nc = (size_t)B * (size_t)n * (size_t)m;
    row->bytes = kdlb_sinkhorn_iter_bytes(B, n, m);
    float *C = NULL, *val = NULL;
    void *ws = NULL;
    int r = try_malloc(b, (void **)&C, nc * sizeof(float));
    if (!r) r = try_malloc(b, (void **)&val, (size_t)B * sizeof(float));
    if (r < 0) return -1;
    if (r > 0) {
        cudaFree(C);
        row->status = "oom";
        row->note = note("cost of %zu bytes does not fit", nc * sizeof(float));
        return 0;
    }
    if (launch_fill(b, C, KDL_DTYPE_F32, nc, 0x0c05700c05700ull)) return -1;
    square_inplace<<<b->meta->sm_count * 32, 256, 0, b->stream>>>(C, (long long)nc);
    CU(cudaGetLastError());

    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.epsilon = 0.1;
    d.max_iter = K;
    d.tol = 0.0;
    d.value = KDL_OT_VALUE_TRANSPORT;
    kdl_sinkhorn_args_t a;
    kdl_sinkhorn_args_init(&a);
    a.batch = B;
    a.n = n;
    a.m = m;
    a.dtype = KDL_DTYPE_F32;
    a.cost = C;
    a.value = val;
    size_t ws_bytes = 0;
    kdl_status_t st = kdl_sinkhorn_workspace_size(b->h, &d, &a, &ws_bytes);
    if (st == KDL_STATUS_SUCCESS) {
        r = try_malloc(b, &ws, ws_bytes);
        if (r < 0) return -1;
        if (r > 0) {
            cudaFree(C), cudaFree(val);
            row->status = "oom";
            row->note = note("workspace of %zu bytes does not fit", ws_bytes);
            return 0;
        }
    }
    /* check: problem 0, min(K, 20) iterations, against the float64 reference */
    if (st == KDL_STATUS_SUCCESS && o->check) {
        kdl_sinkhorn_desc_t dc = d;
        dc.max_iter = K < 20 ? K : 20;
        kdl_sinkhorn_args_t ac = a;
        ac.batch = 1;
        size_t wc = 0;
        st = kdl_sinkhorn_workspace_size(b->h, &dc, &ac, &wc);
        if (st == KDL_STATUS_SUCCESS && wc <= ws_bytes) st = kdl_sinkhorn(b->h, &dc, &ac, ws, ws_bytes);
        if (st == KDL_STATUS_SUCCESS && wc <= ws_bytes) {
            size_t n1 = (size_t)n * (size_t)m;
            float *hc = (float *)malloc(n1 * sizeof(float));
            float gv = 0.0f;
            double rv = 0.0;
            if (hc) {
                CU(cudaStreamSynchronize(b->stream));
                CU(cudaMemcpy(hc, C, n1 * sizeof(float), cudaMemcpyDeviceToHost));
                CU(cudaMemcpy(&gv, val, sizeof gv, cudaMemcpyDeviceToHost));
                /* the reference in f64 (every array of one dtype): a double
                 * copy of the same f32 costs */
                double *hd = (double *)malloc(n1 * sizeof(double));
                if (hd) {
                    for (size_t i = 0; i < n1; i++) hd[i] = hc[i];
                    kdl_sinkhorn_args_t ar;
                    kdl_sinkhorn_args_init(&ar);
                    ar.batch = 1;
                    ar.n = n;
                    ar.m = m;
                    ar.dtype = KDL_DTYPE_F64;
                    ar.cost = hd;
                    ar.value = &rv;
                    kdl_status_t rs = kdl_ref_sinkhorn(&dc, &ar);
                    if (rs == KDL_STATUS_SUCCESS)
                        row->check_rel_err = fabs((double)gv - rv) / fmax(fabs(rv), 1e-12);
                    else
                        row->note = note("check skipped: reference returned %s", kdl_status_string(rs));
                    free(hd);
                }
                free(hc);
            }
        }
    }
    for (int w = 0; st == KDL_STATUS_SUCCESS && w < (o->warmup > 0 ? o->warmup : 1); w++) {
        if (flush_l2(b)) return -1;
        st = kdl_sinkhorn(b->h, &d, &a, ws, ws_bytes);
    }
    int reps = o->repeats < b->n_events ? o->repeats : b->n_events;
    for (int k = 0; st == KDL_STATUS_SUCCESS && k < reps; k++) {
        if (flush_l2(b)) return -1;
        CU(cudaEventRecord(b->ev_start[k], b->stream));
        st = kdl_sinkhorn(b->h, &d, &a, ws, ws_bytes);
        CU(cudaEventRecord(b->ev_stop[k], b->stream));
    }
    cudaError_t e = cudaStreamSynchronize(b->stream);
    if (e != cudaSuccess) {
        row->status = "error";
        row->note = note("kernel failed: %s", cudaGetErrorString(e));
        return fail(b, "sinkhorn: %s", cudaGetErrorString(e));
    }
    if (st != KDL_STATUS_SUCCESS) {
        cudaFree(C), cudaFree(val), cudaFree(ws);
        return status_to_row(row, st) ? 0 : fail(b, "%s", row->note);
    }
    for (int k = 0; k < reps; k++) {
        float ms = 0.0f;
        CU(cudaEventElapsedTime(&ms, b->ev_start[k], b->ev_stop[k]));
        b->samples[k] = ms / (double)K;
    }
    cudaFree(C), cudaFree(val), cudaFree(ws);
    row->peak_extra_bytes = (int64_t)ws_bytes;
    kdlb_row_set_times(row, b->samples, (size_t)reps, b->meta->copy_gb_per_s);
    if (!isnan(row->check_rel_err) && !(row->check_rel_err <= 1e-3)) {
        row->status = "mismatch";
        row->note = note("value relative error %.3g vs the float64 reference (tolerance 1e-3)",
                         row->check_rel_err);
        return 0;
    }
    row->status = "ok";
    return 0;
}

void fill_row_keys(kdlb_row_t *row, const kdlb_case_t *c)
{
    kdlb_row_init(row);
    row->impl = "kdloss";
    row->op = "loss";
    row->divergence = kdl_divergence_name(c->divergence);
    row->dtype = kdl_dtype_name(c->dtype);
    row->rows = c->shape.rows;
    row->vocab = c->shape.vocab;
    row->head_rule = c->has_head_rule ? kdl_head_rule_name(c->head_rule) : NULL;
}

int run(bench *b, kdlb_row_t *rows, size_t *n_rows, kdlb_progress_fn progress, void *ctx)
{
    const kdlb_options_t *o = b->o;
    kdl_status_t st = kdl_create(&b->h);
    if (st != KDL_STATUS_SUCCESS)
        return fail(b, "kdl_create: %s (%s)", kdl_status_string(st), kdl_get_last_error());
    CU(cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking));
    st = kdl_set_stream(b->h, (kdl_stream_t)b->stream);
    if (st != KDL_STATUS_SUCCESS) return fail(b, "kdl_set_stream: %s", kdl_status_string(st));
    b->n_events = o->repeats > 10 ? o->repeats : 10;
    b->ev_start = (cudaEvent_t *)calloc((size_t)b->n_events, sizeof(cudaEvent_t));
    b->ev_stop = (cudaEvent_t *)calloc((size_t)b->n_events, sizeof(cudaEvent_t));
    b->samples = (double *)calloc((size_t)b->n_events, sizeof(double));
    if (!b->ev_start || !b->ev_stop || !b->samples) return fail(b, "host allocation");
    for (int k = 0; k < b->n_events; k++) {
        CU(cudaEventCreate(&b->ev_start[k]));
        CU(cudaEventCreate(&b->ev_stop[k]));
    }
    size_t l2 = (size_t)b->meta->l2_bytes;
    b->flush_bytes = 4 * l2 > ((size_t)256 << 20) ? 4 * l2 : ((size_t)256 << 20);
    b->meta->l2_flush_bytes = b->flush_bytes;
    CU(cudaMalloc(&b->flush, b->flush_bytes));
    CU(cudaMalloc((void **)&b->loss, 2 * sizeof(double)));

    if (measure_copy(b)) return -1;

    int total = kdlb_case_count(o) + (o->sinkhorn.batch > 0 ? 1 : 0);
    int done = 0;
    for (int i = 0; i < kdlb_case_count(o); i++) {
        kdlb_case_t c;
        kdlb_case_at(o, i, &c);
        kdlb_row_t *row = &rows[*n_rows];
        fill_row_keys(row, &c);
        if (progress) progress(ctx, done, total, row);
        (*n_rows)++;
        if (time_case(b, &c, row)) return -1;
        done++;
    }
    free_inputs(b);
    if (o->sinkhorn.batch > 0) {
        kdlb_row_t *row = &rows[*n_rows];
        kdlb_row_init(row);
        row->impl = "kdloss";
        row->op = "sinkhorn";
        row->dtype = "f32";
        row->batch = o->sinkhorn.batch;
        row->n = o->sinkhorn.n;
        row->m = o->sinkhorn.m;
        row->iterations = o->sinkhorn_iters;
        if (progress) progress(ctx, done, total, row);
        (*n_rows)++;
        if (time_sinkhorn(b, row)) return -1;
        done++;
    }
    if (progress) progress(ctx, done, total, NULL);
    return 0;
}

void cleanup(bench *b)
{
    free_inputs(b);
    if (b->ev_start)
        for (int k = 0; k < b->n_events; k++)
            if (b->ev_start[k]) cudaEventDestroy(b->ev_start[k]);
    if (b->ev_stop)
        for (int k = 0; k < b->n_events; k++)
            if (b->ev_stop[k]) cudaEventDestroy(b->ev_stop[k]);
    free(b->ev_start);
    free(b->ev_stop);
    free(b->samples);
    cudaFree(b->flush);
    cudaFree(b->loss);
    kdl_destroy(b->h);
    if (b->stream) cudaStreamDestroy(b->stream);
}

} /* namespace */

extern "C" int kdlb_gpu_probe(kdlb_meta_t *meta, char *err, size_t errlen)
{
    int n = 0, dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n < 1) {
        (void)cudaGetLastError();
        snprintf(err, errlen, "no CUDA device found");
        return -1;
    }
    cudaDeviceProp p;
    if ((e = cudaGetDevice(&dev)) != cudaSuccess || (e = cudaGetDeviceProperties(&p, dev)) != cudaSuccess) {
        snprintf(err, errlen, "cudaGetDeviceProperties: %s", cudaGetErrorString(e));
        return -1;
    }
    snprintf(meta->device_name, sizeof meta->device_name, "%s", p.name);
    meta->cc_major = p.major;
    meta->cc_minor = p.minor;
    meta->sm_count = p.multiProcessorCount;
    meta->l2_bytes = (uint64_t)p.l2CacheSize;
    meta->memory_bytes = (uint64_t)p.totalGlobalMem;
    meta->driver_version = meta->runtime_version = 0;
    cudaDriverGetVersion(&meta->driver_version);
    cudaRuntimeGetVersion(&meta->runtime_version);
    return 0;
}

extern "C" int kdlb_gpu_run(const kdlb_options_t *o, kdlb_meta_t *meta, kdlb_row_t *rows,
                            size_t *n_rows, kdlb_progress_fn progress, void *ctx, char *err,
                            size_t errlen)
{
    bench b;
    memset(&b, 0, sizeof b);
    b.o = o;
    b.meta = meta;
    b.err = err;
    b.errlen = errlen;
    b.cur_shape = b.cur_dtype = -1;
    if (err && errlen) err[0] = '\0';
    *n_rows = 0;
    meta->copy_gb_per_s = NAN;
    int r = run(&b, rows, n_rows, progress, ctx);
    cleanup(&b);
    return r;
}
