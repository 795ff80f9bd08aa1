/*
 * bench/bench_gpu.cu - CUDA-event timing of kdloss for `kdloss bench`
 * (method in bench_gpu.h and README.md in this folder).
 *
 * Reads and writes: per (shape, dtype) it allocates the student and teacher
 * logits [N, V] and the gradient [N, V] in the student dtype (several sets
 * when one set is small next to L2), fills the inputs with random logits by
 * fill_logits(), and per divergence calls kdl_loss_forward_backward with
 * reduction mean on the handle's stream.  The other ops (sparse top-k
 * teacher, fused linear + loss, uniform and ragged Sinkhorn (sinkhorn_op),
 * SinKD) allocate their own inputs once per row set (time_sparse,
 * time_fused, time_sinkhorn / time_ragged, time_sinkd).  Every op shares
 * the same steps: the workspace (op_workspace), a reference check on a few
 * rows or problems (host_bufs, finish_check), then time_row (time_calls:
 * L2 flush, warm-up, CUDA events; finish_row: peak memory, tolerance).
 * The only kernels in this file fill inputs; everything timed is the
 * library's.
 *
 * The code for the sparse, fused_linear, sinkhorn_ragged and sinkd ops was
 * compiled (sm_90a) but has not run on a device: no GPU was lent to the
 * sessions that wrote it (nor to the one that added the bf16 / f16
 * fused_linear rows and their tolerance, fused_tol16).
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
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ot.h"
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

/* n random logits of standard deviation sigma (fill_logits) at dst. */
int launch_fill_sigma(bench *b, void *dst, kdl_dtype_t t, size_t n, unsigned long long seed, float sigma)
{
    int blocks = (int)((n + 255) / 256);
    int cap = (b->meta->sm_count > 0 ? b->meta->sm_count : 32) * 32;
    if (blocks > cap) blocks = cap;
    if (blocks < 1) blocks = 1;
    fill_logits<<<blocks, 256, 0, b->stream>>>(dst, (int)t, (long long)n, seed, sigma);
    CU(cudaGetLastError());
    return 0;
}

/* The logits of every op: standard deviation 2. */
int launch_fill(bench *b, void *dst, kdl_dtype_t t, size_t n, unsigned long long seed)
{
    return launch_fill_sigma(b, dst, t, n, seed, 2.0f);
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

/* A failed library call of the loss and the uniform Sinkhorn rows: the
 * row's status (status_to_row); returns 0 to go on, -1 to stop. */
int row_status(bench *b, kdlb_row_t *row, kdl_status_t st)
{
    return status_to_row(row, st) ? 0 : fail(b, "%s", row->note);
}

/* A failed library call of the other ops: NOT_IMPLEMENTED and NOT_SUPPORTED
 * (a configuration this path does not take) are rows with status
 * "not_implemented", the rest "error".  Returns 0 to go on, -1 to stop. */
int ext_status(bench *b, kdlb_row_t *row, kdl_status_t st)
{
    if (st == KDL_STATUS_NOT_SUPPORTED) {
        row->status = "not_implemented";
        row->note = note("not supported on the GPU path: %s", kdl_get_last_error());
        return 0;
    }
    return row_status(b, row, st);
}

typedef int (*status_fn)(bench *, kdlb_row_t *, kdl_status_t);

/* ======================================== shared by the timed operations */
/* Device buffers of one op, freed together. */
struct dev_bufs {
    void *p[16];
    int n;
    dev_bufs() : n(0) {}
    ~dev_bufs()
    {
        for (int i = 0; i < n; i++) cudaFree(p[i]);
    }
    /* 0 ok, 1 out of memory, -1 another CUDA failure (b->err set) */
    int alloc(bench *b, void **out, size_t bytes)
    {
        int r = try_malloc(b, out, bytes);
        if (r == 0 && *out) p[n++] = *out;
        return r;
    }
};

/* Host buffers of a reference check (copies of device buffers and the
 * reference's results), freed together.  After the first failure every
 * further request returns NULL: err 1 no host memory, -1 a CUDA failure
 * (b->err set). */
struct host_bufs {
    void *p[8];
    int n, err;
    host_bufs() : n(0), err(0) {}
    ~host_bufs()
    {
        for (int i = 0; i < n; i++) free(p[i]);
    }
    void *keep(void *q)
    {
        if (q && n == (int)(sizeof p / sizeof p[0])) { /* more than the callers ask for */
            free(q);
            q = NULL;
        }
        if (!q) err = 1;
        else p[n++] = q;
        return q;
    }
    /* zeroed doubles */
    double *doubles(size_t count)
    {
        return err ? NULL : (double *)keep(calloc(count ? count : 1, sizeof(double)));
    }
    /* a copy of the bytes at d, after the stream's work */
    void *copy(bench *b, const void *d, size_t bytes)
    {
        if (err) return NULL;
        void *h = keep(malloc(bytes ? bytes : 1));
        if (!h) return NULL;
        cudaError_t e = cudaStreamSynchronize(b->stream);
        if (e == cudaSuccess) e = cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost);
        if (e != cudaSuccess) {
            err = fail(b, "reference check: %s", cudaGetErrorString(e));
            return NULL;
        }
        return h;
    }
};

/* max(|loss - ref| / max(|ref|, 1e-6), ||g - rg|| / ||rg||) over n entries
 * (g in dtype t; g NULL: the loss alone). */
double loss_grad_err(double loss, double ref, const void *g, kdl_dtype_t t, const double *rg, size_t n)
{
    double el = fabs(loss - ref) / fmax(fabs(ref), 1e-6), eg = 0.0;
    if (g) {
        double num = 0.0, den = 0.0;
        for (size_t i = 0; i < n; i++) {
            double d = host_value(g, t, i) - rg[i];
            num += d * d;
            den += rg[i] * rg[i];
        }
        eg = den > 0.0 ? sqrt(num / den) : sqrt(num);
    }
    return isnan(el) || isnan(eg) ? INFINITY : fmax(el, eg);
}

/* The outcome of a reference check: its relative error when the reference
 * ran (rs SUCCESS), else why there is none. */
void set_check(kdlb_row_t *row, kdl_status_t rs, double rel_err)
{
    if (rs == KDL_STATUS_SUCCESS)
        row->check_rel_err = rel_err;
    else
        row->note = note("check skipped: reference returned %s", kdl_status_string(rs));
}

/* The checked loss of a call (after the stream's work); 0 or -1. */
int device_loss(bench *b, float *gl)
{
    CU(cudaMemcpy(gl, b->loss, sizeof *gl, cudaMemcpyDeviceToHost));
    return 0;
}

/* The end of a loss check, once the host copies are requested from hb:
 * the device's loss, then run_ref() (the float64 reference, writing *rl
 * and the gradient rg) and check_rel_err = loss_grad_err of the loss and of
 * the device gradient g (dtype t, n entries).  No host memory: a note.
 * Returns 0, or -1 on a CUDA failure (b->err set). */
template <class R>
int finish_check(bench *b, kdlb_row_t *row, host_bufs &hb, R run_ref, const double *rl, const void *g,
                 kdl_dtype_t t, const double *rg, size_t n)
{
    float gl = 0.0f;
    if (hb.err < 0 || (!hb.err && device_loss(b, &gl))) return -1;
    if (hb.err) {
        row->note = note("check skipped: host allocation");
        return 0;
    }
    kdl_status_t rs = run_ref();
    set_check(row, rs, loss_grad_err(gl, *rl, g, t, rg, n));
    return 0;
}

/* Warm-up calls (at least min_warmup), then timed calls, each after an L2
 * flush and between a pair of events, all enqueued before one
 * synchronisation; enqueue(k) returns the library's status.  Samples
 * (ms / per_unit) go to b->samples.  Returns 0 (*reps set), 1 when a
 * library call failed (*st set), -1 on a CUDA failure (b->err set; a failed
 * kernel also marks the row "error"). */
template <class F>
int time_calls(bench *b, kdlb_row_t *row, F enqueue, double per_unit, int min_warmup, int *reps, kdl_status_t *st)
{
    const kdlb_options_t *o = b->o;
    *st = KDL_STATUS_SUCCESS;
    *reps = 0;
    const int warm = o->warmup > min_warmup ? o->warmup : min_warmup;
    for (int w = 0; w < warm; w++) {
        if (flush_l2(b)) return -1;
        if ((*st = enqueue(w)) != KDL_STATUS_SUCCESS) {
            cudaStreamSynchronize(b->stream);
            return 1;
        }
    }
    int n = o->repeats < b->n_events ? o->repeats : b->n_events;
    for (int k = 0; k < n; k++) {
        if (flush_l2(b)) return -1;
        CU(cudaEventRecord(b->ev_start[k], b->stream));
        *st = enqueue(k);
        CU(cudaEventRecord(b->ev_stop[k], b->stream));
        if (*st != KDL_STATUS_SUCCESS) {
            cudaStreamSynchronize(b->stream);
            return 1;
        }
    }
    cudaError_t e = cudaStreamSynchronize(b->stream);
    if (e != cudaSuccess) {
        row->status = "error";
        row->note = note("kernel failed: %s", cudaGetErrorString(e));
        return fail(b, "%s: kernel failed: %s", row->op, cudaGetErrorString(e));
    }
    for (int k = 0; k < n; k++) {
        float ms = 0.0f;
        CU(cudaEventElapsedTime(&ms, b->ev_start[k], b->ev_stop[k]));
        b->samples[k] = ms / per_unit;
    }
    *reps = n;
    return 0;
}

/* Times, reports and checks one row after its calls: peak_extra_bytes =
 * workspace + any drop of free device memory since free0; status mismatch
 * above tol. */
int finish_row(bench *b, kdlb_row_t *row, int reps, size_t ws_bytes, size_t free0, double tol)
{
    size_t free1 = 0, total = 0;
    CU(cudaMemGetInfo(&free1, &total));
    size_t hidden = free0 > free1 ? free0 - free1 : 0; /* allocations the calls kept */
    row->peak_extra_bytes = (int64_t)(ws_bytes + hidden);
    kdlb_row_set_times(row, b->samples, (size_t)reps, b->meta->copy_gb_per_s);
    if (!isnan(row->check_rel_err) && !(row->check_rel_err <= tol)) { /* NaN: not checked */
        row->status = "mismatch";
        row->note = note("relative error %.3g vs the float64 reference (tolerance %g)", row->check_rel_err, tol);
        return 0;
    }
    row->status = "ok";
    return 0;
}

/* time_calls, then finish_row (a failed call: the row's status by
 * on_fail).  Returns 0 to go on, -1 to stop. */
template <class F>
int time_row(bench *b, kdlb_row_t *row, F enqueue, double per_unit, int min_warmup, status_fn on_fail,
             size_t ws_bytes, size_t free0, double tol)
{
    int reps = 0;
    kdl_status_t st;
    int r = time_calls(b, row, enqueue, per_unit, min_warmup, &reps, &st);
    if (r < 0) return -1;
    if (r > 0) return on_fail(b, row, st);
    return finish_row(b, row, reps, ws_bytes, free0, tol);
}

double dtype_tol(kdl_dtype_t t) { return t == KDL_DTYPE_F32 ? 1e-4 : 1e-2; }

/* A row that does not fit: status "oom". */
int oom_row(kdlb_row_t *row, const char *what, unsigned long long bytes)
{
    row->status = "oom";
    row->note = note("%s of %llu bytes does not fit", what, bytes);
    return 0;
}

/* The workspace of an op after its size query st: allocated in m, then the
 * free device memory (*free0).  Returns 0 to go on, 1 when the row is done
 * (failed query: status by on_fail; no memory: "oom"), -1 to stop. */
int op_workspace(bench *b, kdlb_row_t *row, dev_bufs &m, kdl_status_t st, size_t ws_bytes, void **ws,
                 size_t *free0, status_fn on_fail)
{
    if (st != KDL_STATUS_SUCCESS) return on_fail(b, row, st) < 0 ? -1 : 1;
    int r = m.alloc(b, ws, ws_bytes);
    if (r < 0) return -1;
    if (r > 0) return oom_row(row, "workspace", ws_bytes) + 1;
    size_t total = 0;
    CU(cudaMemGetInfo(free0, &total));
    return 0;
}

/* op_workspace's result as the op's return value: 0 (row done) or -1 */
#define OP_DONE(r) ((r) < 0 ? -1 : 0)

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
    host_bufs hb;
    kdl_loss_args_t h = a;
    h.student = hb.copy(b, b->S[0], n * es);
    h.teacher = hb.copy(b, b->T[0], n * es);
    const void *hg = hb.copy(b, b->G[0], n * es);
    double *rg = hb.doubles(n), rl = 0.0;
    h.grad = rg;
    h.grad_dtype = KDL_DTYPE_F64;
    h.out_dtype = KDL_DTYPE_F64;
    h.loss = &rl;
    if (finish_check(b, row, hb, [&] { return kdl_ref_loss_forward_backward(d, &h); }, &rl, hg, c->dtype, rg, n))
        return KDL_STATUS_CUDA_ERROR;
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
    dev_bufs m;
    void *ws = NULL;
    size_t ws_bytes = 0, free0 = 0;
    kdl_status_t st = kdl_loss_workspace_size(b->h, &d, &a, &ws_bytes);
    int r = op_workspace(b, row, m, st, ws_bytes, &ws, &free0, row_status);
    if (r) return OP_DONE(r);

    if (o->check) {
        st = check_case(b, c, &d, ws, ws_bytes, row);
        if (st == KDL_STATUS_CUDA_ERROR && b->err[0]) return -1;
        if (st != KDL_STATUS_SUCCESS) return row_status(b, row, st);
    }
    return time_row(
        b, row,
        [&](int k) {
            make_args(b, c, k % b->n_sets, c->shape.rows, &a);
            return kdl_loss_forward_backward(b->h, &d, &a, ws, ws_bytes);
        },
        1.0, 0, row_status, ws_bytes, free0, dtype_tol(c->dtype));
}

/* ------------------------------------------------------------ Sinkhorn */
/* C = x^2 elementwise: non-negative costs from the normal fill. */
__global__ void square_inplace(float *x, long long n)
{
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] = x[i] * x[i];
}

/* One kdl_sinkhorn call over B problems, n x m each (sizes_n NULL) or
 * sizes_n[b] x sizes_m[b] (host arrays), given f32 costs (random,
 * non-negative, seed) packed back to back, eps 0.1, exactly sinkhorn_iters
 * iterations (tol 0: no stopping test), value TRANSPORT.  ms per iteration
 * = median run / iterations.  Checked first on the first check_batch
 * problems with min(iters, 20) iterations against kdl_ref_sinkhorn (the
 * largest relative error of their values).  row->bytes is the caller's. */
int sinkhorn_op(bench *b, kdlb_row_t *row, int64_t B, int64_t n, int64_t m, const int64_t *sizes_n,
                const int64_t *sizes_m, unsigned long long seed, int64_t check_batch, int min_warmup,
                status_fn on_fail)
{
    const kdlb_options_t *o = b->o;
    const int64_t K = o->sinkhorn_iters;
    size_t nc = 0, n1 = 0; /* cost entries: all problems, the checked ones */
    for (int64_t i = 0; i < B; i++) {
        size_t e = sizes_n ? (size_t)sizes_n[i] * (size_t)sizes_m[i] : (size_t)n * (size_t)m;
        nc += e;
        if (i < check_batch) n1 += e;
    }
    dev_bufs mb;
    void *C, *val, *ws = NULL;
    int r = mb.alloc(b, &C, nc * sizeof(float));
    if (!r) r = mb.alloc(b, &val, (size_t)B * sizeof(float));
    if (r < 0) return -1;
    if (r > 0) return oom_row(row, "cost", nc * sizeof(float));
    if (launch_fill(b, C, KDL_DTYPE_F32, nc, seed)) return -1;
    square_inplace<<<b->meta->sm_count * 32, 256, 0, b->stream>>>((float *)C, (long long)nc);
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
    a.sizes_n = sizes_n;
    a.sizes_m = sizes_m;
    a.dtype = KDL_DTYPE_F32;
    a.cost = C;
    a.value = val;
    size_t ws_bytes = 0, free0 = 0;
    kdl_status_t st = kdl_sinkhorn_workspace_size(b->h, &d, &a, &ws_bytes);
    if ((r = op_workspace(b, row, mb, st, ws_bytes, &ws, &free0, on_fail))) return OP_DONE(r);

    if (o->check) {
        kdl_sinkhorn_desc_t dc = d;
        dc.max_iter = K < 20 ? K : 20;
        kdl_sinkhorn_args_t ac = a;
        ac.batch = check_batch;
        size_t wc = 0;
        st = kdl_sinkhorn_workspace_size(b->h, &dc, &ac, &wc);
        if (st == KDL_STATUS_SUCCESS && wc <= ws_bytes) {
            st = kdl_sinkhorn(b->h, &dc, &ac, ws, ws_bytes);
            if (st != KDL_STATUS_SUCCESS) return on_fail(b, row, st);
            host_bufs hb;
            const float *hc = (const float *)hb.copy(b, C, n1 * sizeof(float));
            const float *hv = (const float *)hb.copy(b, val, (size_t)check_batch * sizeof(float));
            double *hd = hb.doubles(n1), *rv = hb.doubles((size_t)check_batch);
            if (hb.err < 0) return -1;
            if (!hb.err) {
                /* the reference in f64 (every array of one dtype): a double
                 * copy of the same f32 costs */
                for (size_t i = 0; i < n1; i++) hd[i] = hc[i];
                kdl_sinkhorn_args_t ar = ac;
                ar.dtype = KDL_DTYPE_F64;
                ar.cost = hd;
                ar.value = rv;
                kdl_status_t rs = kdl_ref_sinkhorn(&dc, &ar);
                double worst = 0.0;
                for (int64_t i = 0; i < check_batch; i++) {
                    double ei = fabs((double)hv[i] - rv[i]) / fmax(fabs(rv[i]), 1e-12);
                    worst = isnan(ei) ? INFINITY : fmax(worst, ei);
                }
                set_check(row, rs, worst);
            } else {
                row->note = note("check skipped: host allocation");
            }
        } else if (st != KDL_STATUS_SUCCESS) {
            return on_fail(b, row, st);
        }
    }
    return time_row(
        b, row, [&](int) { return kdl_sinkhorn(b->h, &d, &a, ws, ws_bytes); }, (double)K, min_warmup, on_fail,
        ws_bytes, free0, 1e-3);
}

/* The uniform op: B problems of n x m; ms and bytes per iteration
 * (kdlb_sinkhorn_iter_bytes: the cost read twice); checked on problem 0;
 * at least one warm-up. */
int time_sinkhorn(bench *b, kdlb_row_t *row)
{
    row->bytes = kdlb_sinkhorn_iter_bytes(row->batch, row->n, row->m);
    return sinkhorn_op(b, row, row->batch, row->n, row->m, NULL, NULL, 0x0c05700c05700ull, 1, 1, row_status);
}

/* ============================================= the other ops (not run yet) */
/* int64 top-k indices, distinct per row: (start_i + j * stride) mod V with
 * stride coprime to V (so j -> j * stride is one-to-one for j < V), and
 * teacher log-probs -log(k) - 2u (u uniform in [0, 1); any values <= 0 are
 * a valid RENORMALISED support). */
__global__ void fill_topk(long long *idx, void *lp, int dtype, long long rows, long long k,
                          long long vocab, long long stride, unsigned long long seed)
{
    long long n = rows * k;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
        long long i = e / k, j = e % k;
        unsigned long long hr = mix64(seed ^ ((unsigned long long)i * 0x9e3779b97f4a7c15ull));
        long long start = (long long)(hr % (unsigned long long)vocab);
        idx[e] = (long long)(((unsigned long long)start + (unsigned long long)j * (unsigned long long)stride) %
                             (unsigned long long)vocab);
        unsigned long long h = mix64(hr + (unsigned long long)j + 1ull);
        float u = (float)(h >> 40) * 0x1p-24f;
        float x = -logf((float)k) - 2.0f * u;
        switch (dtype) {
        case KDL_DTYPE_F32: ((float *)lp)[e] = x; break;
        case KDL_DTYPE_F16: ((__half *)lp)[e] = __float2half_rn(x); break;
        default: ((__nv_bfloat16 *)lp)[e] = __float2bfloat16_rn(x); break;
        }
    }
}

long long gcd_ll(long long a, long long b)
{
    while (b) {
        long long t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* ----------------------------------------------------- sparse top-k */
/* RENORMALISED FKL, reduction mean: S [N, V], top-k indices [N, k] int64 and
 * log-probs [N, k], dS [N, V]; student, log-probs and gradient in the row's
 * dtype.  Checked on the first 4 rows against kdl_ref_sparse_loss. */
int time_sparse(bench *b, kdlb_row_t *row)
{
    const kdlb_options_t *o = b->o;
    const int64_t N = row->rows, V = row->vocab, K = row->k;
    const kdl_dtype_t dt = o->sparse_dtype;
    const size_t es = kdl_dtype_size(dt);
    row->bytes = kdlb_sparse_bytes(N, V, K, dt, dt, dt);
    dev_bufs m;
    void *S, *G, *I, *LP, *ws = NULL;
    int r = m.alloc(b, &S, (size_t)N * V * es);
    if (!r) r = m.alloc(b, &G, (size_t)N * V * es);
    if (!r) r = m.alloc(b, &I, (size_t)N * K * sizeof(int64_t));
    if (!r) r = m.alloc(b, &LP, (size_t)N * K * es);
    if (r < 0) return -1;
    if (r > 0) return oom_row(row, "inputs", row->bytes);
    if (launch_fill(b, S, dt, (size_t)N * V, 0x5a5a0001ull ^ (unsigned long long)K)) return -1;
    long long stride = 7919;
    while (gcd_ll(stride, V) != 1) stride += 2;
    stride %= V;
    if (stride == 0) stride = 1;
    int blocks = (int)(((size_t)N * K + 255) / 256);
    if (blocks > b->meta->sm_count * 32) blocks = b->meta->sm_count * 32;
    fill_topk<<<blocks > 0 ? blocks : 1, 256, 0, b->stream>>>((long long *)I, LP, (int)dt, N, K, V, stride,
                                                                0x70b0c0deull);
    CU(cudaGetLastError());
    CU(cudaMemsetAsync(G, 0xff, (size_t)N * V * es, b->stream));

    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = KDL_DIV_FKL;
    d.reduction = KDL_REDUCTION_MEAN;
    kdl_sparse_args_t a;
    kdl_sparse_args_init(&a);
    a.mode = KDL_SPARSE_RENORMALISED;
    a.rows = N;
    a.vocab = V;
    a.k = K;
    a.student = S;
    a.ld_student = V;
    a.student_dtype = dt;
    a.teacher_indices = (const int64_t *)I;
    a.ld_indices = K;
    a.teacher_logprobs = LP;
    a.ld_logprobs = K;
    a.teacher_dtype = dt;
    a.grad = G;
    a.ld_grad = V;
    a.grad_dtype = dt;
    a.out_dtype = KDL_DTYPE_F32;
    a.loss = b->loss;
    size_t ws_bytes = 0, free0 = 0;
    kdl_status_t st = kdl_sparse_workspace_size(b->h, &d, &a, &ws_bytes);
    if ((r = op_workspace(b, row, m, st, ws_bytes, &ws, &free0, ext_status))) return OP_DONE(r);

    if (o->check) {
        kdl_sparse_args_t c = a;
        c.rows = N < 4 ? N : 4;
        size_t nc = (size_t)c.rows * V;
        st = kdl_sparse_loss(b->h, &d, &c, ws, ws_bytes);
        if (st != KDL_STATUS_SUCCESS) return ext_status(b, row, st);
        host_bufs hb;
        kdl_sparse_args_t h = c;
        h.student = hb.copy(b, S, nc * es);
        const void *hg = hb.copy(b, G, nc * es);
        h.teacher_indices = (const int64_t *)hb.copy(b, I, (size_t)c.rows * K * sizeof(int64_t));
        h.teacher_logprobs = hb.copy(b, LP, (size_t)c.rows * K * es);
        double *rg = hb.doubles(nc), rl = 0.0;
        h.grad = rg;
        h.grad_dtype = KDL_DTYPE_F64;
        h.out_dtype = KDL_DTYPE_F64;
        h.loss = &rl;
        if (finish_check(b, row, hb, [&] { return kdl_ref_sparse_loss(&d, &h); }, &rl, hg, dt, rg, nc)) return -1;
    }
    return time_row(
        b, row, [&](int) { return kdl_sparse_loss(b->h, &d, &a, ws, ws_bytes); }, 1.0, 0, ext_status, ws_bytes,
        free0, dtype_tol(dt));
}

/* ------------------------------------------------ fused linear + loss */
/* n elements of src (dtype t) from element off on, as doubles. */
void to_doubles(const void *src, kdl_dtype_t t, size_t off, size_t n, double *dst)
{
    switch (t) {
    case KDL_DTYPE_F32:
        for (size_t i = 0; i < n; i++) dst[i] = (double)((const float *)src)[off + i];
        break;
    case KDL_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) dst[i] = (double)__bfloat162float(((const __nv_bfloat16 *)src)[off + i]);
        break;
    case KDL_DTYPE_F16:
        for (size_t i = 0; i < n; i++) dst[i] = (double)__half2float(((const __half *)src)[off + i]);
        break;
    default:
        for (size_t i = 0; i < n; i++) dst[i] = host_value(src, t, off + i);
        break;
    }
}

/* x rounded once (to nearest even) to the 16-bit dtype t and back. */
double round16(double x, kdl_dtype_t t)
{
    return t == KDL_DTYPE_F16 ? (double)__half2float(__double2half(x))
                              : (double)__bfloat162float(__double2bfloat16(x));
}

/*
 * The check tolerance of a 16-bit fused_linear row (H, W, T in dt, dH in dt,
 * reduction MEAN), from the host copies of the checked rows (H [R, D], W
 * [V, D], T [R, V] in tdt: dt, or F64 with the teacher as a linear layer,
 * its logits formed on the host) and the reference's dH (rd, MEAN).
 *
 * Where the 16-bit path differs from the float64 reference on the same 16-bit
 * H and W (docs/extensions.md "Rounding with 16-bit inputs"): the logits and
 * the loss kernel are float32 (as the f32 path: 1e-4); dL is rounded once to
 * dt (at the SUM scale: MEAN's 1/valid comes at the end); dH is rounded to dt
 * when the chunk's GEMM writes it and again when MEAN scales it.  The tests
 * (tests/test_gpu_ext.c) bound the first elementwise by
 * u sum_v |dL_iv| |W_vk|; at V = 151936 that worst case is of the order of
 * dH itself (dL W cancels, |dL| |W| does not), too loose to catch anything.
 * So the tolerance takes the rounding's actual effect on this row's data:
 * E = ||(round(dL) - dL) W|| / ||dL W|| with dL the float64 reference's
 * (SUM, on logits materialised here) rounded as the kernel rounds; the
 * kernel rounds the float32 dL, which can land on the other neighbour where
 * dL is next to a rounding midpoint, hence twice E.  Then
 *   tol = 1e-4 + 2 (E + 2 (u + s sqrt(R D) / ||dH||))
 * (u = 2^-8 bf16, 2^-11 f16; s = 2^-25, half the f16 subnormal spacing, 0
 * for bf16): the two roundings of dH, u relative each elementwise, so at most
 * u ||dH|| (+ s sqrt(R D)) each in norm, counted twice as the tests do.
 * Returns the tolerance, or NaN when there is no host memory or the dense
 * reference fails.
 */
double fused_tol16(const kdl_loss_desc_t *d, kdl_dtype_t dt, int64_t R, int64_t D, int64_t V, const void *H,
                   const void *W, const void *T, kdl_dtype_t tdt, const double *rd)
{
    const size_t nh = (size_t)R * (size_t)D, nl = (size_t)R * (size_t)V;
    double *Hd = (double *)malloc(nh * sizeof(double)), *w = (double *)malloc((size_t)D * sizeof(double));
    double *L = (double *)malloc(nl * sizeof(double)), *dL = (double *)calloc(nl, sizeof(double));
    double *E = (double *)calloc(nh, sizeof(double)), *G = (double *)calloc(nh, sizeof(double));
    double tol = NAN, loss = 0.0;
    if (!Hd || !w || !L || !dL || !E || !G) goto done;
    to_doubles(H, dt, 0, nh, Hd);
    for (int64_t v = 0; v < V; v++) { /* logits, one row of W at a time */
        to_doubles(W, dt, (size_t)v * (size_t)D, (size_t)D, w);
        for (int64_t i = 0; i < R; i++) {
            const double *h = Hd + (size_t)i * (size_t)D;
            double acc = 0.0;
            for (int64_t k = 0; k < D; k++) acc += h[k] * w[k];
            L[(size_t)i * (size_t)V + (size_t)v] = acc;
        }
    }
    {
        kdl_loss_desc_t ds = *d;
        ds.reduction = KDL_REDUCTION_SUM; /* the scale the kernel rounds dL at */
        kdl_loss_args_t a;
        kdl_loss_args_init(&a);
        a.rows = R;
        a.vocab = V;
        a.student = L;
        a.ld_student = V;
        a.student_dtype = KDL_DTYPE_F64;
        a.teacher = T;
        a.ld_teacher = V;
        a.teacher_dtype = tdt;
        a.grad = dL;
        a.ld_grad = V;
        a.grad_dtype = KDL_DTYPE_F64;
        a.out_dtype = KDL_DTYPE_F64;
        a.loss = &loss;
        if (kdl_ref_loss_forward_backward(&ds, &a) != KDL_STATUS_SUCCESS) goto done;
    }
    for (int64_t v = 0; v < V; v++) { /* E = (round(dL) - dL) W, G = dL W (both SUM scale) */
        to_doubles(W, dt, (size_t)v * (size_t)D, (size_t)D, w);
        for (int64_t i = 0; i < R; i++) {
            const double g = dL[(size_t)i * (size_t)V + (size_t)v], e = round16(g, dt) - g;
            double *er = E + (size_t)i * (size_t)D, *gr = G + (size_t)i * (size_t)D;
            if (g == 0.0) continue;
            for (int64_t k = 0; k < D; k++) {
                er[k] += e * w[k];
                gr[k] += g * w[k];
            }
        }
    }
    {
        double ne = 0.0, ng = 0.0, nr = 0.0;
        for (size_t j = 0; j < nh; j++) {
            ne += E[j] * E[j];
            ng += G[j] * G[j];
            nr += rd[j] * rd[j];
        }
        ne = sqrt(ne), ng = sqrt(ng), nr = sqrt(nr);
        const double u = dt == KDL_DTYPE_F16 ? 0x1p-11 : 0x1p-8, sub = dt == KDL_DTYPE_F16 ? 0x1p-25 : 0.0;
        const double e_rel = ng > 0.0 ? ne / ng : 0.0;
        const double r_rel = u + (nr > 0.0 ? sub * sqrt((double)nh) / nr : 0.0);
        tol = 1e-4 + 2.0 * (e_rel + 2.0 * r_rel);
    }
done:
    free(Hd);
    free(w);
    free(L);
    free(dL);
    free(E);
    free(G);
    return tol;
}

/* JSD (beta 0.5), reduction mean, default chunk: H [N, d], W [V, d] and the
 * teacher logits [N, V] in dt, or with row->teacher_hidden = d_t > 0 the
 * teacher as a linear layer, H_t [N, d_t] and W_t [V, d_t] in dt (its
 * logits formed chunk by chunk by the call, the teacher's GEMM timed with
 * the rest); dH and dW in kdlb_fused_grad_dtype(dt) (f32 for f32, else dt:
 * the gradient autograd gives a 16-bit parameter).
 * Checked on the first 4 rows (loss and dH; dW would need the whole V x d
 * product on the CPU) against kdl_ref_fused_linear_loss: f32 tolerance 1e-4
 * (strict FP32 GEMMs on both sides), 16-bit fused_tol16. */
int time_fused(bench *b, kdlb_row_t *row, kdl_dtype_t dt)
{
    const kdlb_options_t *o = b->o;
    const int64_t N = row->rows, D = row->hidden, V = row->vocab, Dt = row->teacher_hidden;
    const int tlin = Dt > 0;
    const kdl_dtype_t gdt = kdlb_fused_grad_dtype(dt);
    const size_t es = kdl_dtype_size(dt), gs = kdl_dtype_size(gdt);
    row->bytes = tlin ? kdlb_fused_linear_tl_bytes(N, D, Dt, V, dt, dt, gdt) : kdlb_fused_linear_bytes(N, D, V, dt, dt, gdt);
    row->logits_bytes = kdlb_fused_logits_bytes(N, V, KDL_DTYPE_F32, tlin);
    row->logits_dtype_bytes = kdlb_fused_logits_bytes(N, V, dt, tlin);
    dev_bufs m;
    void *H, *W, *T = NULL, *Ht = NULL, *Wt = NULL, *dH, *dW, *ws = NULL;
    int r = m.alloc(b, &H, (size_t)N * D * es);
    if (!r) r = m.alloc(b, &W, (size_t)V * D * es);
    if (!r && !tlin) r = m.alloc(b, &T, (size_t)N * V * es);
    if (!r && tlin) r = m.alloc(b, &Ht, (size_t)N * Dt * es);
    if (!r && tlin) r = m.alloc(b, &Wt, (size_t)V * Dt * es);
    if (!r) r = m.alloc(b, &dH, (size_t)N * D * gs);
    if (!r) r = m.alloc(b, &dW, (size_t)V * D * gs);
    if (r < 0) return -1;
    if (r > 0) return oom_row(row, "inputs and gradients", row->bytes);
    /* logits H W^T of standard deviation about 2, as the other ops' logits */
    if (launch_fill_sigma(b, H, dt, (size_t)N * D, 0xf0f0a1ull, 1.0f)) return -1;
    if (launch_fill_sigma(b, W, dt, (size_t)V * D, 0xf0f0a2ull, 2.0f / sqrtf((float)D))) return -1;
    if (!tlin && launch_fill_sigma(b, T, dt, (size_t)N * V, 0xf0f0a3ull, 2.0f)) return -1;
    /* the teacher's logits H_t W_t^T of standard deviation about 2 too */
    if (tlin && launch_fill_sigma(b, Ht, dt, (size_t)N * Dt, 0xf0f0a4ull, 1.0f)) return -1;
    if (tlin && launch_fill_sigma(b, Wt, dt, (size_t)V * Dt, 0xf0f0a5ull, 2.0f / sqrtf((float)Dt))) return -1;

    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = KDL_DIV_JSD;
    d.beta = 0.5;
    d.reduction = KDL_REDUCTION_MEAN;
    kdl_fused_linear_args_t a;
    kdl_fused_linear_args_init(&a);
    a.rows = N;
    a.hidden = D;
    a.vocab = V;
    a.hidden_states = H;
    a.ld_hidden = D;
    a.hidden_dtype = dt;
    a.weight = W;
    a.ld_weight = D;
    a.weight_dtype = dt;
    if (tlin) {
        a.teacher_hidden = Ht;
        a.teacher_hidden_size = a.ld_teacher_hidden = a.ld_teacher_weight = Dt;
        a.teacher_weight = Wt;
        a.teacher_linear_dtype = dt;
    } else {
        a.teacher = T;
        a.ld_teacher = V;
        a.teacher_dtype = dt;
    }
    a.grad_hidden = dH;
    a.ld_grad_hidden = D;
    a.grad_weight = dW;
    a.ld_grad_weight = D;
    a.grad_dtype = gdt;
    a.out_dtype = KDL_DTYPE_F32;
    a.loss = b->loss;
    row->chunk_rows = kdl_fused_linear_chunk_rows(&a);
    size_t ws_bytes = 0, free0 = 0;
    kdl_status_t st = kdl_fused_linear_workspace_size(b->h, &d, &a, &ws_bytes);
    if ((r = op_workspace(b, row, m, st, ws_bytes, &ws, &free0, ext_status))) return OP_DONE(r);

    double tol = 1e-4; /* strict FP32 GEMMs on both sides: the float32 tolerance */
    if (o->check) {
        kdl_fused_linear_args_t c = a;
        c.rows = N < 4 ? N : 4;
        c.grad_weight = NULL;
        c.chunk_rows = 0;
        size_t wc = 0;
        st = kdl_fused_linear_workspace_size(b->h, &d, &c, &wc);
        if (st == KDL_STATUS_SUCCESS && wc <= ws_bytes) {
            st = kdl_fused_linear_loss(b->h, &d, &c, ws, ws_bytes);
            if (st != KDL_STATUS_SUCCESS) return ext_status(b, row, st);
            const size_t nh = (size_t)c.rows * D;
            host_bufs hb;
            kdl_fused_linear_args_t h = c;
            h.hidden_states = hb.copy(b, H, nh * es);
            h.weight = hb.copy(b, W, (size_t)V * D * es);
            if (tlin) {
                h.teacher_hidden = hb.copy(b, Ht, (size_t)c.rows * Dt * es);
                h.teacher_weight = hb.copy(b, Wt, (size_t)V * Dt * es);
            } else {
                h.teacher = hb.copy(b, T, (size_t)c.rows * V * es);
            }
            const void *hd = hb.copy(b, dH, nh * gs);
            double *rd = hb.doubles(nh), rl = 0.0;
            h.grad_hidden = rd;
            h.grad_dtype = KDL_DTYPE_F64;
            h.out_dtype = KDL_DTYPE_F64;
            h.loss = &rl;
            if (finish_check(b, row, hb, [&] { return kdl_ref_fused_linear_loss(&d, &h); }, &rl, hd, gdt, rd, nh))
                return -1;
            if (gdt != KDL_DTYPE_F32 && !isnan(row->check_rel_err)) {
                /* the teacher's logits of the checked rows in float64 (as the reference forms them) */
                double *tl = tlin ? hb.doubles((size_t)c.rows * V) : NULL, *wt = tlin ? hb.doubles(Dt) : NULL;
                if (tlin && tl && wt) {
                    double *ht = (double *)malloc((size_t)c.rows * Dt * sizeof(double));
                    if (ht) {
                        to_doubles(h.teacher_hidden, dt, 0, (size_t)c.rows * Dt, ht);
                        for (int64_t v = 0; v < V; v++) {
                            to_doubles(h.teacher_weight, dt, (size_t)v * Dt, (size_t)Dt, wt);
                            for (int64_t i = 0; i < c.rows; i++) {
                                double acc = 0.0;
                                for (int64_t k = 0; k < Dt; k++) acc += ht[i * Dt + k] * wt[k];
                                tl[i * V + v] = acc;
                            }
                        }
                    }
                    if (!ht) tl = NULL;
                    free(ht);
                }
                tol = tlin && !tl ? NAN
                                  : fused_tol16(&d, dt, c.rows, D, V, h.hidden_states, h.weight, tlin ? tl : h.teacher,
                                                tlin ? KDL_DTYPE_F64 : dt, rd);
                if (isnan(tol)) {
                    row->check_rel_err = NAN; /* no tolerance: not checked */
                    row->note = note("check skipped: host memory for the 16-bit tolerance");
                } else {
                    row->note = note("grad_dtype %s; check tolerance %.3g (float32 part 1e-4, twice the effect "
                                     "of rounding dL to %s on the checked rows' dH, two roundings of dH)",
                                     kdl_dtype_name(gdt), tol, kdl_dtype_name(dt));
                }
            }
        } else if (st != KDL_STATUS_SUCCESS) {
            return ext_status(b, row, st);
        }
    }
    return time_row(
        b, row, [&](int) { return kdl_fused_linear_loss(b->h, &d, &a, ws, ws_bytes); }, 1.0, 0, ext_status,
        ws_bytes, free0, tol);
}

/* ------------------------------------------------- ragged Sinkhorn */
/* sinkhorn_op over the problems sizes_n[b] x sizes_m[b]; bytes per
 * iteration kdlb_ragged_iter_bytes; checked on the first min(3, B)
 * problems. */
int time_ragged(bench *b, kdlb_row_t *row)
{
    const int64_t B = row->batch;
    row->bytes = kdlb_ragged_iter_bytes(row->sizes_n, row->sizes_m, (int)B);
    return sinkhorn_op(b, row, B, row->sizes_n[0], row->sizes_m[0], row->sizes_n, row->sizes_m,
                       0x0c05700c05701ull, B < 3 ? B : 3, 0, ext_status);
}

/* ------------------------------------------------------------ SinKD */
/* SinKD loss + grad: S, T, dS [N, V] in the row's dtype, groups of
 * group_size rows, the row's metric, tau 2, eps 0.1, exactly sinkd_iters
 * iterations.  Checked on the first group against kdl_ref_sinkd. */
int time_sinkd(bench *b, kdlb_row_t *row, kdl_ot_metric_t metric, void *S, void *T, void *G)
{
    const kdlb_options_t *o = b->o;
    const int64_t N = row->rows, V = row->vocab, n = row->group_size;
    const kdl_dtype_t dt = o->sinkd_dtype;
    const size_t es = kdl_dtype_size(dt);
    row->bytes = kdlb_loss_bytes(N, V, dt, dt, dt);
    dev_bufs m;
    void *ws = NULL;
    kdl_sinkd_desc_t d;
    kdl_sinkd_desc_init(&d);
    d.group_size = n;
    d.metric = metric;
    d.max_iter = o->sinkd_iters;
    d.tol = 0.0;
    kdl_sinkd_args_t a;
    kdl_sinkd_args_init(&a);
    a.rows = N;
    a.vocab = V;
    a.student = S;
    a.ld_student = V;
    a.student_dtype = dt;
    a.teacher = T;
    a.ld_teacher = V;
    a.teacher_dtype = dt;
    a.grad = G;
    a.ld_grad = V;
    a.grad_dtype = dt;
    a.out_dtype = KDL_DTYPE_F32;
    a.loss = b->loss;
    size_t ws_bytes = 0, free0 = 0;
    kdl_status_t st = kdl_sinkd_workspace_size(b->h, &d, &a, &ws_bytes);
    int r = op_workspace(b, row, m, st, ws_bytes, &ws, &free0, ext_status);
    if (r) return OP_DONE(r);

    if (o->check) {
        kdl_sinkd_args_t c = a;
        c.rows = n;
        size_t nc = (size_t)n * V, wc = 0;
        st = kdl_sinkd_workspace_size(b->h, &d, &c, &wc);
        if (st == KDL_STATUS_SUCCESS && wc <= ws_bytes) {
            st = kdl_sinkd(b->h, &d, &c, ws, ws_bytes);
            if (st != KDL_STATUS_SUCCESS) return ext_status(b, row, st);
            host_bufs hb;
            kdl_sinkd_args_t h = c;
            h.student = hb.copy(b, S, nc * es);
            h.teacher = hb.copy(b, T, nc * es);
            const void *hg = hb.copy(b, G, nc * es);
            double *rg = hb.doubles(nc), rl = 0.0;
            h.grad = rg;
            h.grad_dtype = KDL_DTYPE_F64;
            h.out_dtype = KDL_DTYPE_F64;
            h.loss = &rl;
            if (finish_check(b, row, hb, [&] { return kdl_ref_sinkd(&d, &h); }, &rl, hg, dt, rg, nc)) return -1;
        } else if (st != KDL_STATUS_SUCCESS) {
            return ext_status(b, row, st);
        }
    }
    return time_row(
        b, row, [&](int) { return kdl_sinkd(b->h, &d, &a, ws, ws_bytes); }, 1.0, 0, ext_status, ws_bytes, free0,
        dtype_tol(dt));
}

/* The next output row, initialised as kdloss's row of `op`. */
kdlb_row_t *next_row(kdlb_row_t *rows, size_t n_rows, const char *op)
{
    kdlb_row_t *row = &rows[n_rows];
    kdlb_row_init(row);
    row->impl = "kdloss";
    row->op = op;
    return row;
}

/* A row whose keys are set: report it as started and count it. */
void start_row(kdlb_progress_fn progress, void *ctx, int done, int total, kdlb_row_t *row, size_t *n_rows)
{
    if (progress) progress(ctx, done, total, row);
    (*n_rows)++;
}

/* The two SinKD rows share one set of inputs. */
int time_sinkd_rows(bench *b, kdlb_row_t *rows, size_t *n_rows, kdlb_progress_fn progress, void *ctx,
                    int *done, int total)
{
    const kdlb_options_t *o = b->o;
    const int64_t N = o->sinkd.rows, V = o->sinkd.vocab;
    const kdl_dtype_t dt = o->sinkd_dtype;
    const size_t bytes = (size_t)N * V * kdl_dtype_size(dt);
    static const kdl_ot_metric_t metrics[2] = {KDL_OT_METRIC_L1, KDL_OT_METRIC_SQEUCLIDEAN};
    dev_bufs m;
    void *S = NULL, *T = NULL, *G = NULL;
    int r = m.alloc(b, &S, bytes);
    if (!r) r = m.alloc(b, &T, bytes);
    if (!r) r = m.alloc(b, &G, bytes);
    if (r < 0) return -1;
    if (!r) {
        if (launch_fill(b, S, dt, (size_t)N * V, 0x51d0001ull)) return -1;
        if (launch_fill(b, T, dt, (size_t)N * V, 0x51d0002ull)) return -1;
        CU(cudaMemsetAsync(G, 0xff, bytes, b->stream));
    }
    for (int k = 0; k < 2; k++) {
        kdlb_row_t *row = next_row(rows, *n_rows, "sinkd");
        row->metric = kdl_ot_metric_name(metrics[k]);
        row->dtype = kdl_dtype_name(dt);
        row->rows = N;
        row->vocab = V;
        row->group_size = o->sinkd.group;
        row->iterations = o->sinkd_iters;
        start_row(progress, ctx, *done, total, row, n_rows);
        if (r > 0) {
            row->bytes = kdlb_loss_bytes(N, V, dt, dt, dt);
            row->status = "oom";
            row->note = note("inputs of %llu bytes do not fit", (unsigned long long)row->bytes);
        } else if (time_sinkd(b, row, metrics[k], S, T, G)) {
            return -1;
        }
        (*done)++;
    }
    return 0;
}

void fill_row_keys(kdlb_row_t *row, const kdlb_case_t *c)
{
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

    int total = kdlb_row_capacity(o);
    int done = 0;
    for (int i = 0; i < kdlb_loss_case_count(o); i++) {
        kdlb_case_t c;
        kdlb_case_at(o, i, &c);
        kdlb_row_t *row = next_row(rows, *n_rows, "loss");
        fill_row_keys(row, &c);
        start_row(progress, ctx, done, total, row, n_rows);
        if (time_case(b, &c, row)) return -1;
        done++;
    }
    free_inputs(b);
    if (kdlb_op_row_count(o, KDLB_OP_SINKHORN) > 0) {
        kdlb_row_t *row = next_row(rows, *n_rows, "sinkhorn");
        row->dtype = "f32";
        row->batch = o->sinkhorn.batch;
        row->n = o->sinkhorn.n;
        row->m = o->sinkhorn.m;
        row->iterations = o->sinkhorn_iters;
        start_row(progress, ctx, done, total, row, n_rows);
        if (time_sinkhorn(b, row)) return -1;
        done++;
    }
    if (kdlb_op_row_count(o, KDLB_OP_SPARSE) > 0) {
        for (int s = 0; s < o->n_sparse_shapes; s++)
            for (int k = 0; k < o->n_sparse_k; k++) {
                if (o->sparse_k[k] > o->sparse_shapes[s].vocab) continue;
                kdlb_row_t *row = next_row(rows, *n_rows, "sparse");
                row->divergence = "fkl";
                row->mode = kdl_sparse_mode_name(KDL_SPARSE_RENORMALISED);
                row->dtype = kdl_dtype_name(o->sparse_dtype);
                row->rows = o->sparse_shapes[s].rows;
                row->vocab = o->sparse_shapes[s].vocab;
                row->k = o->sparse_k[k];
                start_row(progress, ctx, done, total, row, n_rows);
                if (time_sparse(b, row)) return -1;
                done++;
            }
    }
    if (kdlb_op_row_count(o, KDLB_OP_FUSED_LINEAR) > 0) {
        for (int s = 0; s < o->n_fused_shapes; s++)
            for (int t = 0; t < o->n_dtypes * 2; t++) { /* each dtype: the teacher's logits, then H_t, W_t */
                const kdl_dtype_t dt = o->dtypes[t / 2];
                const int tlin = t % 2;
                kdlb_row_t *row = next_row(rows, *n_rows, "fused_linear");
                row->divergence = "jsd";
                row->dtype = kdl_dtype_name(dt);
                row->grad_dtype = kdl_dtype_name(kdlb_fused_grad_dtype(dt));
                row->rows = o->fused_shapes[s].rows;
                row->hidden = o->fused_shapes[s].hidden;
                row->vocab = o->fused_shapes[s].vocab;
                row->teacher_hidden = tlin ? row->hidden : 0; /* d_t = d */
                row->logits_bytes = kdlb_fused_logits_bytes(row->rows, row->vocab, KDL_DTYPE_F32, tlin);
                row->logits_dtype_bytes = kdlb_fused_logits_bytes(row->rows, row->vocab, dt, tlin);
                start_row(progress, ctx, done, total, row, n_rows);
                if (time_fused(b, row, dt)) return -1;
                done++;
            }
    }
    if (kdlb_op_row_count(o, KDLB_OP_SINKHORN_RAGGED) > 0) {
        kdlb_row_t *row = next_row(rows, *n_rows, "sinkhorn_ragged");
        row->dtype = "f32";
        row->batch = o->n_ragged;
        for (int i = 0; i < o->n_ragged; i++) {
            row->n += o->ragged_n[i];
            row->m += o->ragged_m[i];
        }
        row->sizes_n = o->ragged_n;
        row->sizes_m = o->ragged_m;
        row->iterations = o->sinkhorn_iters;
        start_row(progress, ctx, done, total, row, n_rows);
        if (time_ragged(b, row)) return -1;
        done++;
    }
    if (kdlb_op_row_count(o, KDLB_OP_SINKD) > 0 &&
        time_sinkd_rows(b, rows, n_rows, progress, ctx, &done, total))
        return -1;
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
