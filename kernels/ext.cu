/*
 * kernels/ext.cu - CUDA kernels of the extensions (kdloss_ext.h).
 *
 * Compiled and linked in every CUDA build; NOT yet run on a GPU (the session
 * that wrote them had no device): the GPU tests (tests/test_gpu_ext.c)
 * compare them with the float64 references and skip without a device.
 *
 * 1. Sparse teacher, one block per row (sparse_row_kernel):
 *      reads  S row once for the student's log-sum-exp (online max/sum, the
 *             off-support part separately through a shared-memory bitmap of
 *             the support, which also catches repeated indices), the k
 *             teacher indices and log-probs, and S again at the k indices
 *             (a gather, L2 hits);
 *      writes the gradient row: a second pass over S (the row was just read:
 *             mostly L2) for q_v, dz = q_v (g_off - G) outside the support,
 *             qg_j - q_j G on it;
 *      AKL (tail mode): bitonic sort of the k support keys in shared memory,
 *             head scan by one thread (k <= 1024).
 *    Then one block sums the row losses in a fixed order (deterministic) and
 *    writes loss and counters.  MEAN with a gradient: the rows not ignored
 *    are counted first (fused_count_kernel), the rows write the gradient
 *    scaled by 1/counted, and a last pass rescales it by counted/valid only
 *    when some row was invalid (the valid count is known only after every
 *    row; the pass returns at once for a factor of 1).
 * 2. Vocabulary-parallel, one kernel pair per step: an absorb kernel (one
 *    thread per row: reduced exchange -> state; the AKL boundary-bin search
 *    and the tie resolution of ext_internal.h) then a block-per-row kernel
 *    that reads the slice and writes the next exchange (sum-exp, a 256-bin
 *    histogram in shared memory, tie counts, partial sums) or, at the last
 *    step, the gradient of the slice.  Two launches because a row's new
 *    exchange overlaps other rows' reduced input.
 * 3. Fused linear: the loss and dL of each chunk come from the dense loss
 *    kernel (kernels/loss.cu, launched by host/gpu_ext.c), or with the
 *    sparse teacher from sparse_row_kernel above (kdl_ext_sparse_launch,
 *    its gradient written over the float32 logits in place: every read of
 *    a row's other elements ends before the G reduction, and each gradient
 *    element is written by the thread that has just read its logit); here only the
 *    small kernels around it: the bias broadcast before the logits GEMM,
 *    the grad_output row scaling (and rounding to 16 bits), the bias column
 *    sums, a one-thread accumulator per chunk, and a finish kernel (outputs;
 *    MEAN scales dH, dW, db by 1/valid).
 *
 * All row offsets are 64-bit.  Element maths: kdloss/detail/elem.h (_f).
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "ext_internal.h"
#include "ext_launch.h"
#include "internal.h"
#include "launch_ex.cuh"

namespace {

constexpr int kThreads = KDL_EXT_THREADS;

/* ------------------------------------------------------------ loads, stores */
__device__ __forceinline__ float ld_f(const void *p, int dt, int64_t i)
{
    switch (dt) {
    case KDL_DTYPE_F32: return ((const float *)p)[i];
    case KDL_DTYPE_F16: return __half2float(((const __half *)p)[i]);
    case KDL_DTYPE_BF16: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    default: return NAN;
    }
}

__device__ __forceinline__ uint64_t ld_bits(const void *p, int dt, int64_t i)
{
    if (dt == KDL_DTYPE_F32) return __float_as_uint(((const float *)p)[i]);
    return ((const unsigned short *)p)[i];
}

__device__ __forceinline__ float bits_to_f(uint64_t b, int dt)
{
    if (dt == KDL_DTYPE_F32) return __uint_as_float((uint32_t)b);
    if (dt == KDL_DTYPE_F16) return __half2float(__ushort_as_half((unsigned short)b));
    return __uint_as_float((uint32_t)b << 16);
}


__device__ __forceinline__ void st_f(void *p, int dt, int64_t i, float v)
{
    switch (dt) {
    case KDL_DTYPE_F32: ((float *)p)[i] = v; break;
    case KDL_DTYPE_F16: ((__half *)p)[i] = __float2half_rn(v); break;
    case KDL_DTYPE_BF16: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v); break;
    default: break;
    }
}

__device__ __forceinline__ void st_out(void *p, int dt, int64_t i, double v)
{
    if (dt == KDL_DTYPE_F64)
        ((double *)p)[i] = v;
    else
        ((float *)p)[i] = (float)v;
}

/* --------------------------------------------------------- block reductions */
struct SumD {
    __device__ double operator()(double a, double b) const { return a + b; }
};
struct MaxF {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MaxD {
    __device__ double operator()(double a, double b) const { return fmax(a, b); }
};
struct OrI {
    __device__ int operator()(int a, int b) const { return a | b; }
};

/* Reduces v over the block; every thread gets the result.  scratch: 32
 * elements of shared memory; a __syncthreads() pair inside. */
template <class T, class Op> __device__ T block_reduce(T v, T *scratch, Op op)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = scratch[0];
    for (int w = 1; w < nw; w++) r = op(r, scratch[w]);
    return r;
}

/* Online log-sum-exp of raw logits x scaled by k = 1/tau (clamped to
 * FLT_MAX on the host): (m, s) = (running max of x, sum of exp((x - m) k)).
 * The max is subtracted before the scaling, as in the reference, so a tiny
 * tau gives the limit (probability 0 below the max) instead of inf - inf;
 * (x - m) k is 0 at the max for any finite k.  -inf is skipped. */
__device__ __forceinline__ void lse_add(float &m, float &s, float x, float k)
{
    if (x == -INFINITY) return;
    if (x > m) {
        s = (m == -INFINITY ? 0.0f : s * __expf((m - x) * k)) + 1.0f;
        m = x;
    } else {
        s += __expf((x - m) * k);
    }
}

/* lse_add in double with no temperature (the teacher's log-probs):
 * (m, s) = (running max, sum of exp(x - m)); -inf is skipped, NaN makes s
 * NaN (such a row is invalid before its LSE is used). */
__device__ __forceinline__ void lse_add_d(double &m, double &s, double x)
{
    if (x == -INFINITY) return;
    if (x > m) {
        s = (m == -INFINITY ? 0.0 : s * exp(m - x)) + 1.0;
        m = x;
    } else {
        s += exp(x - m);
    }
}

/* Block log-sum-exp of the per-thread pairs of lse_add: returns the block's
 * max M and sets *S = sum exp((x - M) k) (so LSE(x k) = M k + log S). */
__device__ float block_lse(float m, float s, float k, float *fscr, double *dscr, double *S)
{
    float M = block_reduce(m, fscr, MaxF());
    double part = (M == -INFINITY || m == -INFINITY) ? 0.0 : (double)s * exp(((double)m - (double)M) * (double)k);
    *S = block_reduce(part, dscr, SumD());
    return M;
}

/* log q of a logit x: (x - M) k - log S, the reference's form. */
__device__ __forceinline__ float log_prob(float x, float M, float k, float logS)
{
    return fmaf(x - M, k, -logS);
}

/* Loss output scaling as host/internal.h kdl_scaled_loss: scale 0 switches
 * the term off, even an infinite one; NaN (an invalid row) stays NaN. */
__device__ __forceinline__ double scaled_loss(double scale, double x)
{
    return (scale == 0.0 && !isnan(x)) ? 0.0 : scale * x;
}

/* Gradient entry (g dz)/tau as host/internal.h kdl_scaled_grad, with
 * inv_tau = 1/tau: g = 0 gives 0 whatever dz is (0 * inf is not NaN), and an
 * exact zero stays zero for any tau (0 * inf again). */
__device__ __forceinline__ float scaled_grad(float g, float dz, float inv_tau)
{
    return (g == 0.0f || dz == 0.0f) ? 0.0f : (g * dz) * inv_tau;
}

__device__ __forceinline__ kdl_elem_params_f make_params(int div, float coef, float wh, float wt)
{
    return kdl_elem_params_make_f(div, coef, wh, wt);
}

/* Exclusive scan of a 0/1 flag over the block in thread order; *total gets
 * the block's count.  scratch: 33 ints of shared memory. */
__device__ int block_excl_scan(int flag, int *scratch, int *total)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    unsigned ball = __ballot_sync(0xffffffffu, flag);
    int in_warp = __popc(ball & ((1u << lane) - 1u));
    __syncthreads();
    if (lane == 0) scratch[warp] = __popc(ball);
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < nw; w++) {
        if (w < warp) before += scratch[w];
        all += scratch[w];
    }
    *total = all;
    return before + in_warp;
}

/* =========================================================== sparse teacher */
/* Row class byte of the sparse kernel: KDL_EXT_ROW_* plus this one (an
 * invalid row whose reason is a bad index, also counted in bad_index_rows). */
constexpr unsigned char kRowBadIndex = 3;

struct SparseP {
    int mode, div, sdt, tdt, gdt, rule, has_grad, akl;
    float coef, inv_tau;         /* inv_tau clamped to FLT_MAX */
    double mu;                   /* double, as the reference compares it */
    double scale;                /* the gradient factor is (float)scale, or (float)(scale/counted) */
    const double *counted;       /* MEAN with a gradient: the rows not ignored (acc[7], written
                                  * by fused_count_kernel first); NULL otherwise */
    int64_t N, V, k, top_k, ld_s, ld_i, ld_p, ld_g, ignore_index;
    const void *S;
    const int64_t *idx;
    const void *lp;
    const int64_t *labels;
    void *grad;
    double *row_loss;   /* [N] */
    unsigned char *cls; /* [N]: KDL_EXT_ROW_VALID, _IGNORED, _INVALID or kRowBadIndex */
};

/* Static shared memory of sparse_row_kernel, for the opt-in check. */
constexpr size_t kSparseStaticSmem = 32 * sizeof(float) + 32 * sizeof(double) + 33 * sizeof(int) +
                                     sizeof(unsigned long long) + 2 * sizeof(double);
static_assert(kSparseStaticSmem <= KDL_EXT_SPARSE_STATIC_SMEM, "KDL_EXT_SPARSE_STATIC_SMEM too small");

__device__ void zero_row(void *g, int dt, int64_t off, int64_t V)
{
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) st_f(g, dt, off + v, 0.0f);
}

__device__ __forceinline__ bool in_support(const uint32_t *bm, int64_t v) { return (bm[v >> 5] >> (v & 31)) & 1u; }

__global__ void __launch_bounds__(kThreads) sparse_row_kernel(SparseP P)
{
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ float fscr[32];
    __shared__ double dscr[32];
    __shared__ int iscr[33];
    __shared__ unsigned long long boundary_key;
    __shared__ double sh_wh, sh_wt;
    const int64_t i = blockIdx.x, V = P.V, k = P.k;
    const int64_t W = (V + 31) / 32;
    const float kt = P.inv_tau;
    uint32_t *bm = (uint32_t *)smem;
    int *sidx = (int *)(bm + W);
    float *slt = (float *)(sidx + k);
    float *sqg = slt + k;
    int64_t kp = 1;
    while (kp < k) kp <<= 1;
    /* AKL only (the launcher sizes this region only then) */
    unsigned long long *keys = (unsigned long long *)(((uintptr_t)(sqg + k) + 15) & ~(uintptr_t)15);
    const int64_t offS = i * P.ld_s, offG = i * P.ld_g;

    if (P.labels && P.labels[i] == P.ignore_index) {
        if (P.has_grad) zero_row(P.grad, P.gdt, offG, V);
        if (threadIdx.x == 0) {
            P.row_loss[i] = 0;
            P.cls[i] = KDL_EXT_ROW_IGNORED;
        }
        return;
    }
    for (int64_t w = threadIdx.x; w < W; w += blockDim.x) bm[w] = 0;
    __syncthreads();
    int bad = 0, badidx = 0;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
        int64_t v = P.idx[i * P.ld_i + j];
        if (v < 0 || v >= V) {
            badidx = 1;
            v = 0;
        } else {
            uint32_t bit = 1u << (v & 31);
            if (atomicOr(&bm[v >> 5], bit) & bit) badidx = 1;
        }
        sidx[j] = (int)v;
        float t = ld_f(P.lp, P.tdt, i * P.ld_p + j);
        if (isnan(t) || t > 0) bad = 1;
        slt[j] = t;
    }
    __syncthreads();
    /* student: LSE over all V and over the tokens outside the support */
    float m = -INFINITY, s = 0, mo = -INFINITY, so = 0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        float x = ld_f(P.S, P.sdt, offS + v);
        if (isnan(x) || x == INFINITY) {
            bad = 1;
            continue;
        }
        lse_add(m, s, x, kt);
        if (!in_support(bm, v)) lse_add(mo, so, x, kt);
    }
    bad = block_reduce(bad, iscr, OrI());
    badidx = block_reduce(badidx, iscr, OrI());
    double Ss, So;
    const float M = block_lse(m, s, kt, fscr, dscr, &Ss);
    const float Mo = block_lse(mo, so, kt, fscr, dscr, &So);
    /* teacher LSE over the support (log-probs: no temperature), in double
     * as the reference: the TAIL mass thresholds below then classify a row
     * as the reference does (a float LSE is off by about 1e-7) */
    double mt = -INFINITY, st = 0;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) lse_add_d(mt, st, slt[j]);
    const double Mt = block_reduce(mt, dscr, MaxD());
    const double St = block_reduce((Mt == -INFINITY || mt == -INFINITY) ? 0.0 : st * exp(mt - Mt), dscr, SumD());
    const double lse_td = Mt == -INFINITY ? -INFINITY : Mt + log(St);
    const float lse_t = (float)lse_td;
    if (!bad && !badidx && M != -INFINITY) {
        if (P.mode == KDL_SPARSE_RENORMALISED && Mt == -INFINITY) bad = 1;
        if (P.mode == KDL_SPARSE_TAIL_BUCKET && lse_td > log1p(KDL_SPARSE_MASS_TOL)) bad = 1;
        /* k = V: no off-support token to hold a residual mass (as the reference) */
        if (P.mode == KDL_SPARSE_TAIL_BUCKET && k == V && lse_td < log1p(-KDL_SPARSE_MASS_TOL)) bad = 1;
    }
    if (bad || badidx || M == -INFINITY) {
        if (P.has_grad) zero_row(P.grad, P.gdt, offG, V);
        if (threadIdx.x == 0) {
            P.row_loss[i] = NAN;
            P.cls[i] = badidx ? kRowBadIndex : (unsigned char)KDL_EXT_ROW_INVALID;
        }
        return;
    }
    /* log q_v = (x_v - M) k - log Ss; log q_b = LSE_off - LSE (directly) */
    const float logS = (float)log(Ss), logSo = Mo == -INFINITY ? 0.0f : (float)log(So);
    const float lq_b =
        Mo == -INFINITY ? -INFINITY : (float)(((double)Mo - (double)M) * (double)kt + log(So) - log(Ss));
    const float lp_b = (k == V || lse_td >= 0) ? -INFINITY : (float)log(-expm1(lse_td));

    /* AKL (tail): head among the support cells, in teacher order */
    float wh = 0.5f, wt = 0.5f;
    if (P.akl) {
        for (int64_t j = threadIdx.x; j < kp; j += blockDim.x)
            keys[j] = j < k ? ((unsigned long long)kdl_ext_order_key(__float_as_uint(slt[j]), 4) << 32) |
                                  (unsigned long long)(uint32_t)sidx[j]
                            : ~0ull;
        __syncthreads();
        for (int64_t size = 2; size <= kp; size <<= 1)
            for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
                for (int64_t t = threadIdx.x; t < kp; t += blockDim.x) {
                    int64_t u = t ^ stride;
                    if (u > t) {
                        bool up = (t & size) == 0;
                        unsigned long long a = keys[t], b = keys[u];
                        if ((a > b) == up) {
                            keys[t] = b;
                            keys[u] = a;
                        }
                    }
                }
                __syncthreads();
            }
        if (threadIdx.x == 0) {
            int64_t h = 0;
            if (P.rule == KDL_HEAD_TOPK) {
                h = P.top_k;
            } else {
                double c = 0;
                for (int64_t r = 0; r < k; r++) {
                    double prev = c;
                    float t = __uint_as_float((uint32_t)kdl_ext_order_key_bits(keys[r] >> 32, 4));
                    c += exp((double)t);
                    if (P.rule == KDL_HEAD_REFERENCE ? c <= P.mu : prev < P.mu)
                        h = r + 1;
                    else
                        break;
                }
                if (h < 1) h = 1;
            }
            boundary_key = keys[h - 1];
        }
        __syncthreads();
        double gh = 0, gt = 0;
        for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
            unsigned long long key = ((unsigned long long)kdl_ext_order_key(__float_as_uint(slt[j]), 4) << 32) |
                                     (unsigned long long)(uint32_t)sidx[j];
            float q = __expf(log_prob(ld_f(P.S, P.sdt, offS + sidx[j]), M, kt, logS));
            double gap = fabs((double)__expf(slt[j]) - (double)q);
            if (key <= boundary_key)
                gh += gap;
            else
                gt += gap;
        }
        gh = block_reduce(gh, dscr, SumD());
        gt = block_reduce(gt, dscr, SumD());
        if (threadIdx.x == 0) {
            gt += fabs((double)__expf(lp_b) - (double)__expf(lq_b));
            double a, b;
            kdl_akl_weights_d(gh, gt, &a, &b);
            sh_wh = a;
            sh_wt = b;
        }
        __syncthreads();
        wh = (float)sh_wh;
        wt = (float)sh_wt;
    }
    const kdl_elem_params_f pr = make_params(P.div, P.coef, wh, wt);
    double loss = 0, G = 0;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
        float lq = log_prob(ld_f(P.S, P.sdt, offS + sidx[j]), M, kt, logS);
        float lp = P.mode == KDL_SPARSE_RENORMALISED ? slt[j] - lse_t : slt[j];
        kdl_elem_f e = kdl_elem_eval_f(&pr, lp, lq);
        loss += e.loss;
        G += e.qg;
        sqg[j] = e.qg;
    }
    /* RENORMALISED: an off-support token's element is linear in its q (the
     * constant c_off per unit q); TAIL_BUCKET: the bucket cell's element. */
    const kdl_elem_f c_off = kdl_elem_eval_f(&pr, -INFINITY, 0.0f);
    const kdl_elem_f e_b = kdl_elem_eval_f(&pr, lp_b, lq_b);
    if (threadIdx.x == 0) {
        if (P.mode == KDL_SPARSE_RENORMALISED) {
            float q_off = __expf(lq_b);
            if (q_off > 0) {
                loss += (double)c_off.loss * q_off;
                G += (double)c_off.qg * q_off;
            }
        } else {
            loss += e_b.loss;
            G += e_b.qg;
        }
    }
    loss = block_reduce(loss, dscr, SumD());
    G = block_reduce(G, dscr, SumD());
    if (threadIdx.x == 0) {
        P.row_loss[i] = loss;
        P.cls[i] = KDL_EXT_ROW_VALID;
    }
    if (!P.has_grad) return;
    const float Gf = (float)G;
    /* MEAN: 1/counted before the gradient's one rounding (rows_finish_kernel
     * leaves the factor counted/valid, exactly 1 unless a row is invalid), so
     * a 16-bit gradient never holds SUM's magnitude (up to N times MEAN's) */
    const float gscale = (float)(P.counted ? P.scale / *P.counted : P.scale);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        if (in_support(bm, v)) continue;
        const float x = ld_f(P.S, P.sdt, offS + v);
        const float q = __expf(log_prob(x, M, kt, logS));
        float qg;
        if (P.mode == KDL_SPARSE_RENORMALISED) {
            qg = q > 0 ? c_off.qg * q : 0.0f;
        } else {
            /* (q_v / q_b) qg_b with the share in log space: q_b can underflow
             * while the share and qg_b (-p_b for FKL) are not small */
            const float share = x == -INFINITY ? 0.0f : __expf(log_prob(x, Mo, kt, logSo));
            qg = share > 0 ? share * e_b.qg : 0.0f;
        }
        st_f(P.grad, P.gdt, offG + v, scaled_grad(gscale, kdl_elem_dz_f(qg, q, Gf), kt));
    }
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
        float q = __expf(log_prob(ld_f(P.S, P.sdt, offS + sidx[j]), M, kt, logS));
        st_f(P.grad, P.gdt, offG + sidx[j], scaled_grad(gscale, kdl_elem_dz_f(sqg[j], q, Gf), kt));
    }
}

/* Row losses -> outputs; acc[3] = the MEAN rescale of the gradient:
 * acc[7]/valid when the rows wrote it pre-scaled by 1/acc[7] (pre), else
 * 1/valid. */
__global__ void __launch_bounds__(kThreads)
    rows_finish_kernel(int64_t N, const double *row_loss, const unsigned char *cls, int reduction, double scale,
                       void *loss, int out_dt, int64_t *info, int64_t *valid_rows, int64_t *bad_rows, double *acc,
                       int pre)
{
    __shared__ double dscr[32];
    double sum = 0, nv = 0, ni = 0, nb = 0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
        int c = cls[i];
        if (c == KDL_EXT_ROW_VALID) {
            sum += row_loss[i];
            nv += 1;
        } else if (c != KDL_EXT_ROW_IGNORED) {
            ni += 1;
            nb += c == kRowBadIndex;
        }
        if (reduction == KDL_REDUCTION_NONE)
            st_out(loss, out_dt, i,
                   c == KDL_EXT_ROW_VALID ? scaled_loss(scale, row_loss[i]) : c == KDL_EXT_ROW_IGNORED ? 0.0 : NAN);
    }
    sum = block_reduce(sum, dscr, SumD());
    nv = block_reduce(nv, dscr, SumD());
    ni = block_reduce(ni, dscr, SumD());
    nb = block_reduce(nb, dscr, SumD());
    if (threadIdx.x == 0) {
        if (reduction == KDL_REDUCTION_SUM) st_out(loss, out_dt, 0, scaled_loss(scale, sum));
        if (reduction == KDL_REDUCTION_MEAN) st_out(loss, out_dt, 0, nv > 0 ? scaled_loss(scale, sum) / nv : 0.0);
        if (info) *info = (int64_t)ni;
        if (valid_rows) *valid_rows = (int64_t)nv;
        if (bad_rows) *bad_rows = (int64_t)nb;
        acc[3] = nv > 0 ? (pre ? acc[7] / nv : 1.0 / nv) : 0.0;
    }
}

/* x[r * ld + c] *= *factor for r < rows, c < cols (a gradient rescale);
 * nothing to do for a factor of exactly 1 (x * 1 is x). */
__global__ void scale_rows_kernel(void *x, int dt, int64_t rows, int64_t cols, int64_t ld, const double *factor)
{
    const float f = (float)*factor;
    if (f == 1.0f) return;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
        for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < cols; c += (int64_t)gridDim.x * blockDim.x)
            st_f(x, dt, r * ld + c, ld_f(x, dt, r * ld + c) * f);
}

/* The status of one launch, from its own error (kdl::launch_ex): never a
 * cudaGetLastError(), which would also report an unrelated error left
 * pending on the thread by the caller (docs/kernels-review.md R4-8). */
kdl_status_t launch_status(cudaError_t e, const char *what)
{
    if (e == cudaSuccess) return KDL_STATUS_SUCCESS;
    if (e == cudaErrorNoKernelImageForDevice)
        return kdl_fail(KDL_STATUS_ARCH_MISMATCH, "%s: %s", what, cudaGetErrorString(e));
    return kdl_fail(KDL_STATUS_CUDA_ERROR, "%s: %s", what, cudaGetErrorString(e));
}

cudaError_t scale_launch(void *x, int dt, int64_t rows, int64_t cols, int64_t ld, const double *factor, cudaStream_t s)
{
    if (rows <= 0 || cols <= 0) return cudaSuccess;
    dim3 grid((unsigned)((cols + kThreads - 1) / kThreads < 64 ? (cols + kThreads - 1) / kThreads : 64),
              (unsigned)(rows < 65535 ? rows : 65535));
    return kdl::launch_ex(scale_rows_kernel, grid, kThreads, 0, s, x, dt, rows, cols, ld, factor);
}

/* One launch, its status returned from the enclosing function on failure. */
#define KDL_EXT_LAUNCH(what, call)                                                                               \
    do {                                                                                                         \
        const kdl_status_t kdl_st_ = launch_status((call), what);                                                \
        if (kdl_st_ != KDL_STATUS_SUCCESS) return kdl_st_;                                                       \
    } while (0)

size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

/* ========================================================= vocabulary-parallel */
struct ShardP {
    int div, rule, sdt, tdt, gdt, D, width, akl, has_grad, reduction, out_dt;
    double tau, mu, scale, coef;
    int64_t N, Vl, R, rank, top_k, ld_s, ld_t, ld_g, ignore_index, F;
    const void *S, *T;
    const int64_t *labels;
    void *grad;
    kdl_shard_header_t *hdr;
    kdl_shard_row_t *rows;
    double *ex;
    void *loss;
    int64_t *info, *valid_rows, *head_size;
    unsigned char *head_mask;
};

__device__ __forceinline__ uint64_t tkey(const ShardP &P, int64_t i, int64_t v)
{
    return kdl_ext_order_key(ld_bits(P.T, P.tdt, i * P.ld_t + v), P.width);
}

/* (x - m)/tau of a raw logit x against the row's global maximum m of the raw
 * logits, in double and with the reference's operations (host/ref_shard.c:
 * the max subtracted before dividing by tau), so the exchange is the
 * reference's to rounding of the sums and a tiny tau with large logits gives
 * the tau -> 0 limit, not inf - inf (docs/hardening.md F9). */
__device__ __forceinline__ double shard_z(const ShardP &P, const void *p, int dt, int64_t off, double m)
{
    return ((double)ld_f(p, dt, off) - m) / P.tau;
}

/* log q (or log p) = (x - m)/tau - log z, formed in double and rounded once
 * to float for the element maths. */
__device__ __forceinline__ float shard_logp(const ShardP &P, const void *p, int dt, int64_t off, double m, double lse)
{
    return (float)(shard_z(P, p, dt, off, m) - lse);
}

/* Teacher mass of the AKL histograms as an unsigned 128-bit fixed-point
 * number with 80 fraction bits, hi = the bits from 2^-16 up, lo = the 64
 * below: integer sums are exact, so a bin's mass does not depend on the
 * order of the shared-memory atomics (a double atomicAdd's would).  Masses
 * are <= 1 (relative to the global max), so hi cannot overflow; bits below
 * 2^-80 are dropped (at most 2^-80 per token). */
__device__ __forceinline__ void mass_fx_add(unsigned long long *hi, unsigned long long *lo, double m)
{
    const double a = m * 65536.0; /* exact */
    const double ah = floor(a);
    const unsigned long long h = (unsigned long long)ah;
    const unsigned long long l = (unsigned long long)((a - ah) * 18446744073709551616.0); /* < 2^64 */
    const unsigned long long old = atomicAdd(lo, l);
    atomicAdd(hi, h + (old + l < old ? 1ull : 0ull)); /* the carry out of lo */
}

__device__ __forceinline__ double mass_fx_value(unsigned long long hi, unsigned long long lo)
{
    return (double)hi * (1.0 / 65536.0) + (double)lo * (1.0 / 1208925819614629174706176.0); /* 2^-16, 2^-80 */
}

/* ---- absorb kernels: one thread per row */
__global__ void shard_absorb_max(ShardP P)
{
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= P.N) return;
    const double *ex = P.ex + i * 3;
    kdl_shard_row_t r;
    memset(&r, 0, sizeof r);
    r.m_s = ex[0];
    r.m_t = ex[1];
    if (P.labels && P.labels[i] == P.ignore_index)
        r.cls = KDL_EXT_ROW_IGNORED;
    else if (ex[2] != 0 || r.m_s == -INFINITY || r.m_t == -INFINITY)
        r.cls = KDL_EXT_ROW_INVALID;
    else
        r.cls = KDL_EXT_ROW_VALID;
    P.rows[i] = r;
    if (r.cls == KDL_EXT_ROW_VALID) atomicAdd((unsigned long long *)&P.hdr->valid_rows, 1ull);
    if (r.cls == KDL_EXT_ROW_INVALID) atomicAdd((unsigned long long *)&P.hdr->invalid_rows, 1ull);
}

__device__ void absorb_digit_row(const ShardP &P, kdl_shard_row_t &r, const double *cnt, int digit)
{
    if (r.cls != KDL_EXT_ROW_VALID || r.all_head) return;
    const double *mass = cnt + KDL_SHARD_BINS;
    int b = kdl_shard_find_bin(P.rule, P.mu, P.top_k, cnt, mass, r.z_t, &r.count_before, &r.mass_before);
    if (b < 0) {
        r.all_head = 1;
        r.head_size = r.count_before;
        return;
    }
    r.prefix = (r.prefix << 8) | (uint64_t)b;
    if (digit == P.D - 1) {
        r.n_tie = (int64_t)cnt[b];
        double x = bits_to_f(kdl_ext_order_key_bits(r.prefix, P.width), P.tdt);
        double p = exp((x - r.m_t) / P.tau - r.lse_t);
        r.j_take = kdl_shard_tie_take(P.rule, P.mu, P.top_k, r.count_before, r.mass_before / r.z_t, r.n_tie, p);
        r.head_size = r.count_before + r.j_take;
    }
}

__global__ void shard_absorb_norm(ShardP P, int64_t F)
{
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= P.N) return;
    kdl_shard_row_t r = P.rows[i];
    const double *ex = P.ex + i * F;
    r.z_s = ex[0];
    r.z_t = ex[1];
    r.lse_s = log(r.z_s); /* of the shifted sums: lq = (s - m_s)/tau - lse_s */
    r.lse_t = log(r.z_t);
    if (P.akl) absorb_digit_row(P, r, ex + 2, 0);
    P.rows[i] = r;
}

__global__ void shard_absorb_digit(ShardP P, int digit)
{
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= P.N) return;
    kdl_shard_row_t r = P.rows[i];
    absorb_digit_row(P, r, P.ex + i * 2 * KDL_SHARD_BINS, digit);
    P.rows[i] = r;
}

__global__ void shard_absorb_tie(ShardP P)
{
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= P.N) return;
    const double *ex = P.ex + i * P.R;
    int64_t before = 0;
    for (int64_t s = 0; s < P.rank; s++) before += (int64_t)ex[s];
    P.rows[i].tie_before = before;
}

__global__ void shard_absorb_partial(ShardP P)
{
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= P.N) return;
    kdl_shard_row_t r = P.rows[i];
    if (r.cls == KDL_EXT_ROW_VALID) {
        const double *ex = P.ex + i * KDL_SHARD_PARTIAL_FIELDS;
        r.w_head = r.w_tail = 0.5;
        if (P.akl) {
            kdl_akl_weights_d(ex[KDL_SHARD_P_GHEAD], ex[KDL_SHARD_P_GTAIL], &r.w_head, &r.w_tail);
            r.loss = (r.w_head > 0 ? r.w_head * ex[KDL_SHARD_P_FKL] : 0) + (r.w_tail > 0 ? r.w_tail * ex[KDL_SHARD_P_RKL] : 0);
            r.G = r.w_head * ex[KDL_SHARD_P_GF] + (r.w_tail > 0 ? r.w_tail * ex[KDL_SHARD_P_GR] : 0);
        } else {
            r.loss = ex[KDL_SHARD_P_LOSS];
            r.G = ex[KDL_SHARD_P_G];
        }
    }
    P.rows[i] = r;
}

/* ---- write kernels: one block per row */
__global__ void __launch_bounds__(kThreads) shard_write_max(ShardP P)
{
    __shared__ double dscr[32];
    __shared__ int iscr[33];
    const int64_t i = blockIdx.x;
    /* the maxima of the raw logits s and t (exact in double), as the
     * reference's step 0 writes them: exp((x - m)/tau) <= 1 for every tau */
    double ms = -INFINITY, mt = -INFINITY;
    int bad = 0;
    if (!(P.labels && P.labels[i] == P.ignore_index))
        for (int64_t v = threadIdx.x; v < P.Vl; v += blockDim.x) {
            float s = ld_f(P.S, P.sdt, i * P.ld_s + v), t = ld_f(P.T, P.tdt, i * P.ld_t + v);
            if (isnan(s) || isnan(t) || s == INFINITY || t == INFINITY) {
                bad = 1;
                continue;
            }
            ms = fmax(ms, (double)s);
            mt = fmax(mt, (double)t);
        }
    ms = block_reduce(ms, dscr, MaxD());
    mt = block_reduce(mt, dscr, MaxD());
    bad = block_reduce(bad, iscr, OrI());
    if (threadIdx.x == 0) {
        P.ex[i * 3 + 0] = ms;
        P.ex[i * 3 + 1] = mt;
        P.ex[i * 3 + 2] = bad;
    }
}

/* Histogram of `digit` of the row's keys under the prefix: cnt[256], mass[256]. */
__device__ void shard_histogram(const ShardP &P, int64_t i, const kdl_shard_row_t &r, int digit, double *out_cnt,
                                double *out_mass, unsigned int *hc, unsigned long long *hhi, unsigned long long *hlo)
{
    for (int b = threadIdx.x; b < KDL_SHARD_BINS; b += blockDim.x) {
        hc[b] = 0;
        hhi[b] = 0;
        hlo[b] = 0;
    }
    __syncthreads();
    if (r.cls == KDL_EXT_ROW_VALID && !r.all_head) {
        const int shift_hi = 8 * (P.width - digit), shift = 8 * (P.width - 1 - digit);
        for (int64_t v = threadIdx.x; v < P.Vl; v += blockDim.x) {
            uint64_t key = tkey(P, i, v);
            if (digit > 0 && (key >> shift_hi) != r.prefix) continue;
            int b = (int)((key >> shift) & 0xffu);
            atomicAdd(&hc[b], 1u);
            mass_fx_add(&hhi[b], &hlo[b], exp(shard_z(P, P.T, P.tdt, i * P.ld_t + v, r.m_t)));
        }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < KDL_SHARD_BINS; b += blockDim.x) {
        out_cnt[b] = hc[b];
        out_mass[b] = mass_fx_value(hhi[b], hlo[b]);
    }
}

__global__ void __launch_bounds__(kThreads) shard_write_norm(ShardP P, int64_t F)
{
    __shared__ double dscr[32];
    __shared__ unsigned int hc[KDL_SHARD_BINS];
    __shared__ unsigned long long hhi[KDL_SHARD_BINS], hlo[KDL_SHARD_BINS];
    const int64_t i = blockIdx.x;
    const kdl_shard_row_t r = P.rows[i];
    double zs = 0, zt = 0;
    if (r.cls == KDL_EXT_ROW_VALID)
        for (int64_t v = threadIdx.x; v < P.Vl; v += blockDim.x) {
            zs += exp(shard_z(P, P.S, P.sdt, i * P.ld_s + v, r.m_s));
            zt += exp(shard_z(P, P.T, P.tdt, i * P.ld_t + v, r.m_t));
        }
    zs = block_reduce(zs, dscr, SumD());
    zt = block_reduce(zt, dscr, SumD());
    double *ex = P.ex + i * F;
    if (threadIdx.x == 0) {
        ex[0] = zs;
        ex[1] = zt;
    }
    if (P.akl) shard_histogram(P, i, r, 0, ex + 2, ex + 2 + KDL_SHARD_BINS, hc, hhi, hlo);
}

__global__ void __launch_bounds__(kThreads) shard_write_digit(ShardP P, int digit)
{
    __shared__ unsigned int hc[KDL_SHARD_BINS];
    __shared__ unsigned long long hhi[KDL_SHARD_BINS], hlo[KDL_SHARD_BINS];
    const int64_t i = blockIdx.x;
    double *ex = P.ex + i * 2 * KDL_SHARD_BINS;
    shard_histogram(P, i, P.rows[i], digit, ex, ex + KDL_SHARD_BINS, hc, hhi, hlo);
}

__global__ void __launch_bounds__(kThreads) shard_write_tie(ShardP P)
{
    __shared__ double dscr[32];
    const int64_t i = blockIdx.x;
    const kdl_shard_row_t r = P.rows[i];
    double n = 0;
    if (r.cls == KDL_EXT_ROW_VALID && !r.all_head)
        for (int64_t v = threadIdx.x; v < P.Vl; v += blockDim.x) n += tkey(P, i, v) == r.prefix;
    n = block_reduce(n, dscr, SumD());
    for (int64_t s = threadIdx.x; s < P.R; s += blockDim.x) P.ex[i * P.R + s] = s == P.rank ? n : 0.0;
}

/* Head membership of token v (tie rank given for tokens at the boundary key). */
__device__ __forceinline__ int in_head(const kdl_shard_row_t &r, uint64_t key, int64_t tie_rank)
{
    if (r.all_head) return 1;
    if (key != r.prefix) return key < r.prefix;
    return tie_rank < r.j_take;
}

/* Walks the slice in index order, block-wide, calling f(v, head). */
template <class F> __device__ void walk_with_head(const ShardP &P, int64_t i, const kdl_shard_row_t &r, int *iscr, F f)
{
    int64_t running = r.tie_before;
    for (int64_t base = 0; base < P.Vl; base += blockDim.x) {
        int64_t v = base + threadIdx.x;
        uint64_t key = v < P.Vl ? tkey(P, i, v) : ~(uint64_t)0;
        int tied = v < P.Vl && !r.all_head && key == r.prefix;
        int total = 0;
        int rank = block_excl_scan(tied, iscr, &total);
        if (v < P.Vl) f(v, in_head(r, key, running + rank));
        running += total;
    }
}

__global__ void __launch_bounds__(kThreads) shard_write_partial(ShardP P)
{
    __shared__ double dscr[32];
    __shared__ int iscr[33];
    const int64_t i = blockIdx.x;
    const kdl_shard_row_t r = P.rows[i];
    double acc[KDL_SHARD_PARTIAL_FIELDS] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (r.cls == KDL_EXT_ROW_VALID) {
        if (P.akl) {
            walk_with_head(P, i, r, iscr, [&](int64_t v, int head) {
                float lq = shard_logp(P, P.S, P.sdt, i * P.ld_s + v, r.m_s, r.lse_s);
                float lp = shard_logp(P, P.T, P.tdt, i * P.ld_t + v, r.m_t, r.lse_t);
                kdl_elem_f f = kdl_elem_fkl_f(lp, lq), g = kdl_elem_rkl_f(lp, lq);
                acc[KDL_SHARD_P_FKL] += f.loss;
                acc[KDL_SHARD_P_RKL] += g.loss;
                acc[KDL_SHARD_P_GF] += f.qg;
                acc[KDL_SHARD_P_GR] += g.qg;
                const float gap = fabsf(__expf(lp) - __expf(lq));
                /* constant indices keep acc[] in registers (no local memory) */
                if (head)
                    acc[KDL_SHARD_P_GHEAD] += gap;
                else
                    acc[KDL_SHARD_P_GTAIL] += gap;
            });
        } else {
            const kdl_elem_params_f pr = make_params(P.div, (float)P.coef, 0.5f, 0.5f);
            for (int64_t v = threadIdx.x; v < P.Vl; v += blockDim.x) {
                float lq = shard_logp(P, P.S, P.sdt, i * P.ld_s + v, r.m_s, r.lse_s);
                float lp = shard_logp(P, P.T, P.tdt, i * P.ld_t + v, r.m_t, r.lse_t);
                kdl_elem_f e = kdl_elem_eval_f(&pr, lp, lq);
                acc[KDL_SHARD_P_LOSS] += e.loss;
                acc[KDL_SHARD_P_G] += e.qg;
            }
        }
    }
#pragma unroll
    for (int f = 0; f < KDL_SHARD_PARTIAL_FIELDS; f++) {
        double t = block_reduce(acc[f], dscr, SumD());
        if (threadIdx.x == 0) P.ex[i * KDL_SHARD_PARTIAL_FIELDS + f] = t;
    }
}

__global__ void __launch_bounds__(kThreads) shard_write_finish(ShardP P)
{
    __shared__ int iscr[33];
    const int64_t i = blockIdx.x;
    const kdl_shard_row_t r = P.rows[i];
    const int64_t nv = P.hdr->valid_rows;
    /* gradient (g dz)/tau, g = scale (MEAN: / valid rows), as the dense
     * reference's kdl_scaled_grad: g = 0 or dz = 0 gives 0, never 0 * inf */
    double gscale = P.scale;
    if (P.reduction == KDL_REDUCTION_MEAN) gscale = nv ? gscale / (double)nv : 0.0;
    if (r.cls != KDL_EXT_ROW_VALID) {
        for (int64_t v = threadIdx.x; v < P.Vl; v += blockDim.x) {
            if (P.has_grad) st_f(P.grad, P.gdt, i * P.ld_g + v, 0.0f);
            if (P.head_mask) P.head_mask[i * P.Vl + v] = 0;
        }
        return;
    }
    const float G = (float)r.G;
    const kdl_elem_params_f pr = make_params(P.div, (float)P.coef, (float)r.w_head, (float)r.w_tail);
    if (P.has_grad)
        for (int64_t v = threadIdx.x; v < P.Vl; v += blockDim.x) {
            float lq = shard_logp(P, P.S, P.sdt, i * P.ld_s + v, r.m_s, r.lse_s);
            float lp = shard_logp(P, P.T, P.tdt, i * P.ld_t + v, r.m_t, r.lse_t);
            kdl_elem_f e = kdl_elem_eval_f(&pr, lp, lq);
            const float dz = kdl_elem_dz_f(e.qg, __expf(lq), G);
            st_f(P.grad, P.gdt, i * P.ld_g + v,
                 (gscale == 0.0 || dz == 0.0f) ? 0.0f : (float)((gscale * (double)dz) / P.tau));
        }
    if (P.akl && P.head_mask)
        walk_with_head(P, i, r, iscr, [&](int64_t v, int head) { P.head_mask[i * P.Vl + v] = (unsigned char)head; });
}

__global__ void __launch_bounds__(kThreads) shard_finish_out(ShardP P)
{
    __shared__ double dscr[32];
    double sum = 0;
    for (int64_t i = threadIdx.x; i < P.N; i += blockDim.x) {
        const kdl_shard_row_t &r = P.rows[i];
        if (r.cls == KDL_EXT_ROW_VALID) sum += r.loss;
        if (P.reduction == KDL_REDUCTION_NONE)
            st_out(P.loss, P.out_dt, i,
                   r.cls == KDL_EXT_ROW_VALID ? scaled_loss(P.scale, r.loss) : r.cls == KDL_EXT_ROW_IGNORED ? 0.0 : NAN);
        if (P.head_size) P.head_size[i] = r.cls == KDL_EXT_ROW_VALID ? r.head_size : 0;
    }
    sum = block_reduce(sum, dscr, SumD());
    if (threadIdx.x == 0) {
        const int64_t nv = P.hdr->valid_rows;
        if (P.reduction == KDL_REDUCTION_SUM) st_out(P.loss, P.out_dt, 0, scaled_loss(P.scale, sum));
        if (P.reduction == KDL_REDUCTION_MEAN)
            st_out(P.loss, P.out_dt, 0, nv ? scaled_loss(P.scale, sum) / (double)nv : 0.0);
        if (P.info) *P.info = P.hdr->invalid_rows;
        if (P.valid_rows) *P.valid_rows = nv;
    }
}

/* ============================================================ fused linear */
/* The loss and dL of a chunk come from the dense loss kernel (kernels/loss.cu,
 * launched by host/gpu_ext.c through kdl_loss_launch); these are the small
 * kernels around it. */

/* A value of dtype dt (F32, F16, BF16, F64) as double. */
__device__ __forceinline__ double ld_any(const void *p, int dt, int64_t i)
{
    if (dt == KDL_DTYPE_F64) return ((const double *)p)[i];
    return (double)ld_f(p, dt, i);
}

/* L[r*V + v] = b[v] (b in dtype bdt): the bias, which the logits GEMM then
 * accumulates onto with beta = 1. */
__global__ void fused_bias_fill_kernel(float *L, int64_t c, int64_t V, const void *b, int bdt)
{
    for (int64_t r = blockIdx.y; r < c; r += gridDim.y)
        for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < V; v += (int64_t)gridDim.x * blockDim.x)
            L[r * V + v] = ld_f(b, bdt, v);
}

/* out[r*V + v] = L[r*V + v] * f_r, stored in odt: in place (out == L, F32)
 * or rounded once into the 16-bit dL buffer.  f_r = g[row0 + r] (g given:
 * grad_output) or else 1/acc[7] (16-bit MEAN: 1/counted rows, see
 * fused_count_kernel).  Each element is read then written by the same
 * thread, so in place is safe. */
__global__ void fused_rowscale_kernel(float *L, int64_t c, int64_t V, const void *g, int gdt, int64_t row0, void *out,
                                      int odt, const double *acc)
{
    for (int64_t r = blockIdx.y; r < c; r += gridDim.y) {
        const float f = g ? (float)ld_any(g, gdt, row0 + r) : (float)(1.0 / acc[7]);
        for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < V; v += (int64_t)gridDim.x * blockDim.x)
            st_f(out, odt, r * V + v, L[r * V + v] * f);
    }
}

/* acc_b[v] (+)= sum over the c rows of dL[r*V + v] (dtype dt), in float64,
 * rows in order: deterministic.  One thread per column (coalesced rows). */
__global__ void fused_colsum_kernel(const void *dL, int dt, int64_t c, int64_t V, double *acc_b, int first)
{
    for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < V; v += (int64_t)gridDim.x * blockDim.x) {
        double s = 0;
        for (int64_t r = 0; r < c; r++) s += (double)ld_f(dL, dt, r * V + v);
        acc_b[v] = first ? s : acc_b[v] + s;
    }
}

/* After a chunk's loss call (dense or sparse): acc[0] += the chunk's loss
 * (SUM: the call wrote its scaled sum, as double, into acc[4]), acc[1] +=
 * valid, acc[2] += invalid, acc[9] += bad-index rows (int64 at acc + 6,
 * acc + 5, acc + 8; the last is written by the sparse call only and stays
 * 0 from the call's start otherwise). */
__global__ void fused_chunk_acc(int reduction, double *acc)
{
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    if (reduction != KDL_REDUCTION_NONE) acc[0] += acc[4];
    acc[1] += (double)*(const int64_t *)(acc + 6);
    acc[2] += (double)*(const int64_t *)(acc + 5);
    acc[9] += (double)*(const int64_t *)(acc + 8);
}

/* acc[7] = the rows of the call that are not ignored (>= 1; all ignored: 1,
 * dL is 0 then), in a fixed order: 16-bit MEAN scales dL by 1/acc[7] before
 * rounding it, so dL, dH and dW carry MEAN's magnitude (as autograd's) and
 * not SUM's, which is up to N times larger: f16 overflowed (65504) in dL or
 * in the dW accumulated over the rows where the MEAN result fits. */
__global__ void __launch_bounds__(kThreads) fused_count_kernel(const int64_t *labels, int64_t N, int64_t ignore,
                                                               double *acc)
{
    __shared__ double dscr[32];
    double n = 0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) n += (labels && labels[i] == ignore) ? 0.0 : 1.0;
    n = block_reduce(n, dscr, SumD());
    if (threadIdx.x == 0) acc[7] = n > 0 ? n : 1.0;
}

/* pre: dL was pre-scaled by 1/acc[7] (16-bit MEAN), so the final factor of
 * dH, dW, db is acc[7]/valid (exactly 1 when no counted row was invalid:
 * no second rounding); otherwise 1/valid. */
__global__ void fused_finish_kernel(int reduction, void *loss, int out_dt, int64_t *info, int64_t *valid_rows,
                                    int64_t *bad_rows, double *acc, int pre)
{
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double nv = acc[1];
    /* acc[0] is a sum of chunk losses already scaled (scaled_loss) */
    if (reduction == KDL_REDUCTION_SUM) st_out(loss, out_dt, 0, acc[0]);
    if (reduction == KDL_REDUCTION_MEAN) st_out(loss, out_dt, 0, nv > 0 ? acc[0] / nv : 0.0);
    if (info) *info = (int64_t)acc[2];
    if (valid_rows) *valid_rows = (int64_t)nv;
    if (bad_rows) *bad_rows = (int64_t)acc[9];
    acc[3] = nv > 0 ? (pre ? acc[7] / nv : 1.0 / nv) : 0.0;
}

/* db[v] = acc_b[v] (MEAN: * acc[3] = 1/valid), in the gradient dtype. */
__global__ void fused_bias_out_kernel(const double *acc_b, int64_t V, int mean, const double *acc, void *db, int gdt)
{
    const double f = mean ? acc[3] : 1.0;
    for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < V; v += (int64_t)gridDim.x * blockDim.x)
        st_f(db, gdt, v, (float)(mean ? acc_b[v] * f : acc_b[v]));
}

dim3 grid_2d(int64_t rows, int64_t cols)
{
    int64_t gx = (cols + kThreads - 1) / kThreads;
    return dim3((unsigned)(gx < 64 ? (gx > 0 ? gx : 1) : 64), (unsigned)(rows < 65535 ? (rows > 0 ? rows : 1) : 65535));
}

unsigned grid_1d(int64_t n)
{
    int64_t g = (n + kThreads - 1) / kThreads;
    return (unsigned)(g < 1024 ? (g > 0 ? g : 1) : 1024);
}

} // namespace

/* ================================================================ launchers */
extern "C" size_t kdl_ext_sparse_smem_bytes(int64_t vocab, int64_t k, int akl)
{
    int64_t kp = 1;
    while (kp < k) kp <<= 1;
    size_t words = (size_t)((vocab + 31) / 32);
    /* bitmap, k indices, log-probs and qg; AKL: 16 bytes of alignment and the kp sort keys */
    return words * 4 + (size_t)k * 12 + (akl ? 16 + (size_t)kp * 8 : 0);
}

extern "C" size_t kdl_ext_sparse_ws_bytes(int64_t rows)
{
    size_t n = rows > 0 ? (size_t)rows : 1;
    return align256(n * sizeof(double)) + align256(n) + 256;
}

extern "C" kdl_status_t kdl_ext_sparse_launch(const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, void *ws,
                                              size_t smem_optin, cudaStream_t stream)
{
    const int64_t N = a->rows;
    size_t n = N > 0 ? (size_t)N : 1;
    double *row_loss = (double *)ws;
    unsigned char *cls = (unsigned char *)ws + align256(n * sizeof(double));
    double *acc = (double *)((unsigned char *)ws + align256(n * sizeof(double)) + align256(n));
    SparseP P;
    memset(&P, 0, sizeof P);
    P.mode = (int)a->mode;
    P.div = (int)d->divergence;
    P.sdt = (int)a->student_dtype;
    P.tdt = (int)a->teacher_dtype;
    P.gdt = (int)a->grad_dtype;
    P.rule = (int)d->head_rule;
    P.has_grad = a->grad != NULL;
    P.akl = d->divergence == KDL_DIV_AKL;
    P.coef = (float)(d->divergence == KDL_DIV_JSD ? d->beta : d->alpha);
    P.inv_tau = (float)fmin(1.0 / d->temperature, (double)FLT_MAX);
    P.scale = d->scale;
    const int pre = d->reduction == KDL_REDUCTION_MEAN && a->grad && N > 0;
    P.counted = pre ? acc + 7 : NULL;
    P.mu = d->mu;
    P.N = N;
    P.V = a->vocab;
    P.k = a->k;
    P.top_k = d->top_k;
    P.ld_s = a->ld_student;
    P.ld_i = a->ld_indices;
    P.ld_p = a->ld_logprobs;
    P.ld_g = a->ld_grad;
    P.ignore_index = d->ignore_index;
    P.S = a->student;
    P.idx = a->teacher_indices;
    P.lp = a->teacher_logprobs;
    P.labels = a->labels;
    P.grad = a->grad;
    P.row_loss = row_loss;
    P.cls = cls;
    size_t smem = kdl_ext_sparse_smem_bytes(a->vocab, a->k, P.akl);
    if (smem + KDL_EXT_SPARSE_STATIC_SMEM > smem_optin)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "vocab %lld: support bitmap needs %zu bytes of shared memory, the device has %zu",
                        (long long)a->vocab, smem + KDL_EXT_SPARSE_STATIC_SMEM, smem_optin);
    if (N > INT32_MAX) return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "sparse GPU path: rows > 2^31 - 1");
    /* static + dynamic shared memory above the default 48 KiB needs the opt-in */
    if (smem + KDL_EXT_SPARSE_STATIC_SMEM > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(sparse_row_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return kdl_fail(KDL_STATUS_CUDA_ERROR, "cudaFuncSetAttribute: %s", cudaGetErrorString(e));
    }
    if (pre) {
        const kdl_status_t st = kdl_ext_fused_count(a->labels, N, d->ignore_index, acc, stream);
        if (st) return st;
    }
    if (N > 0) KDL_EXT_LAUNCH("sparse_row_kernel", kdl::launch_ex(sparse_row_kernel, (unsigned)N, kThreads, smem, stream, P));
    KDL_EXT_LAUNCH("rows_finish_kernel",
                   kdl::launch_ex(rows_finish_kernel, 1, kThreads, 0, stream, N, row_loss, cls, (int)d->reduction, d->scale,
                                  a->loss, (int)a->out_dtype, a->info, a->valid_rows, a->bad_index_rows, acc, pre));
    if (pre)
        KDL_EXT_LAUNCH("scale_rows_kernel",
                       scale_launch(a->grad, (int)a->grad_dtype, N, a->vocab, a->ld_grad, acc + 3, stream));
    return KDL_STATUS_SUCCESS;
}

extern "C" kdl_status_t kdl_ext_shard_launch(const kdl_loss_desc_t *d, const kdl_shard_args_t *a, int phase, int digit,
                                             cudaStream_t stream)
{
    ShardP P;
    memset(&P, 0, sizeof P);
    P.div = (int)d->divergence;
    P.rule = (int)d->head_rule;
    P.sdt = (int)a->student_dtype;
    P.tdt = (int)a->teacher_dtype;
    P.gdt = (int)a->grad_dtype;
    P.akl = d->divergence == KDL_DIV_AKL;
    P.D = kdl_shard_digits(P.akl, a->teacher_dtype);
    P.width = (int)kdl_dtype_size(a->teacher_dtype);
    P.has_grad = a->grad != NULL;
    P.reduction = (int)d->reduction;
    P.out_dt = (int)a->out_dtype;
    P.tau = d->temperature;
    P.mu = d->mu;
    P.scale = d->scale;
    P.coef = d->divergence == KDL_DIV_JSD ? d->beta : d->alpha;
    P.N = a->rows;
    P.Vl = a->vocab_local;
    P.R = a->num_shards;
    P.rank = a->shard_rank;
    P.top_k = d->top_k;
    P.ld_s = a->ld_student;
    P.ld_t = a->ld_teacher;
    P.ld_g = a->ld_grad;
    P.ignore_index = d->ignore_index;
    P.S = a->student;
    P.T = a->teacher;
    P.labels = a->labels;
    P.grad = a->grad;
    P.hdr = (kdl_shard_header_t *)a->state;
    P.rows = (kdl_shard_row_t *)(P.hdr + 1);
    P.ex = a->exchange;
    P.loss = a->loss;
    P.info = a->info;
    P.valid_rows = a->valid_rows;
    P.head_size = P.akl ? a->stat_head_size : NULL;
    P.head_mask = P.akl ? a->head_mask : NULL;
    const int64_t N = a->rows;
    const unsigned rows_blocks = (unsigned)((N + kThreads - 1) / kThreads);
    const int64_t norm_fields = P.akl ? 2 + 2 * KDL_SHARD_BINS : 2;
    if (N == 0 && phase != KDL_SHARD_PH_FINISH && phase != KDL_SHARD_PH_NORM) return KDL_STATUS_SUCCESS;
    const unsigned nb = (unsigned)N; /* one block per row */
    switch (phase) {
    case KDL_SHARD_PH_MAX: KDL_EXT_LAUNCH("shard_write_max", kdl::launch_ex(shard_write_max, nb, kThreads, 0, stream, P)); break;
    case KDL_SHARD_PH_NORM: {
        cudaError_t e = cudaMemsetAsync(a->state, 0, sizeof(kdl_shard_header_t), stream);
        if (e != cudaSuccess) return kdl_fail(KDL_STATUS_CUDA_ERROR, "cudaMemsetAsync: %s", cudaGetErrorString(e));
        if (N == 0) break;
        KDL_EXT_LAUNCH("shard_absorb_max", kdl::launch_ex(shard_absorb_max, rows_blocks, kThreads, 0, stream, P));
        KDL_EXT_LAUNCH("shard_write_norm", kdl::launch_ex(shard_write_norm, nb, kThreads, 0, stream, P, norm_fields));
        break;
    }
    case KDL_SHARD_PH_DIGIT:
        if (digit == 1)
            KDL_EXT_LAUNCH("shard_absorb_norm",
                           kdl::launch_ex(shard_absorb_norm, rows_blocks, kThreads, 0, stream, P, norm_fields));
        else
            KDL_EXT_LAUNCH("shard_absorb_digit",
                           kdl::launch_ex(shard_absorb_digit, rows_blocks, kThreads, 0, stream, P, digit - 1));
        KDL_EXT_LAUNCH("shard_write_digit", kdl::launch_ex(shard_write_digit, nb, kThreads, 0, stream, P, digit));
        break;
    case KDL_SHARD_PH_TIE:
        KDL_EXT_LAUNCH("shard_absorb_digit", kdl::launch_ex(shard_absorb_digit, rows_blocks, kThreads, 0, stream, P, P.D - 1));
        KDL_EXT_LAUNCH("shard_write_tie", kdl::launch_ex(shard_write_tie, nb, kThreads, 0, stream, P));
        break;
    case KDL_SHARD_PH_PARTIAL:
        if (P.akl)
            KDL_EXT_LAUNCH("shard_absorb_tie", kdl::launch_ex(shard_absorb_tie, rows_blocks, kThreads, 0, stream, P));
        else
            KDL_EXT_LAUNCH("shard_absorb_norm",
                           kdl::launch_ex(shard_absorb_norm, rows_blocks, kThreads, 0, stream, P, norm_fields));
        KDL_EXT_LAUNCH("shard_write_partial", kdl::launch_ex(shard_write_partial, nb, kThreads, 0, stream, P));
        break;
    case KDL_SHARD_PH_FINISH:
        if (N > 0) {
            KDL_EXT_LAUNCH("shard_absorb_partial", kdl::launch_ex(shard_absorb_partial, rows_blocks, kThreads, 0, stream, P));
            KDL_EXT_LAUNCH("shard_write_finish", kdl::launch_ex(shard_write_finish, nb, kThreads, 0, stream, P));
        }
        KDL_EXT_LAUNCH("shard_finish_out", kdl::launch_ex(shard_finish_out, 1, kThreads, 0, stream, P));
        break;
    default: return kdl_fail(KDL_STATUS_INTERNAL_ERROR, "shard phase %d", phase);
    }
    return KDL_STATUS_SUCCESS;
}

extern "C" kdl_status_t kdl_ext_fused_bias_fill(float *L, int64_t c, int64_t V, const void *bias, int bias_dtype,
                                                 cudaStream_t stream)
{
    return launch_status(kdl::launch_ex(fused_bias_fill_kernel, grid_2d(c, V), kThreads, 0, stream, L, c, V, bias, bias_dtype),
                         "fused_bias_fill_kernel");
}

extern "C" kdl_status_t kdl_ext_fused_rowscale(float *L, int64_t c, int64_t V, const void *g, int g_dtype, int64_t row0,
                                               void *out, int out_dtype, const double *acc, cudaStream_t stream)
{
    return launch_status(
        kdl::launch_ex(fused_rowscale_kernel, grid_2d(c, V), kThreads, 0, stream, L, c, V, g, g_dtype, row0, out, out_dtype, acc),
        "fused_rowscale_kernel");
}

extern "C" kdl_status_t kdl_ext_fused_count(const int64_t *labels, int64_t N, int64_t ignore_index, double *acc,
                                            cudaStream_t stream)
{
    return launch_status(kdl::launch_ex(fused_count_kernel, 1, kThreads, 0, stream, labels, N, ignore_index, acc),
                         "fused_count_kernel");
}

extern "C" kdl_status_t kdl_ext_fused_colsum(const void *dL, int dL_dtype, int64_t c, int64_t V, double *acc_bias,
                                             int first, cudaStream_t stream)
{
    return launch_status(kdl::launch_ex(fused_colsum_kernel, grid_1d(V), kThreads, 0, stream, dL, dL_dtype, c, V, acc_bias, first),
                         "fused_colsum_kernel");
}

extern "C" kdl_status_t kdl_ext_fused_chunk_acc(const kdl_loss_desc_t *d, double *acc, cudaStream_t stream)
{
    return launch_status(kdl::launch_ex(fused_chunk_acc, 1, 32, 0, stream, (int)d->reduction, acc), "fused_chunk_acc");
}

extern "C" kdl_status_t kdl_ext_fused_finish_launch(const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a,
                                                    double *acc, const double *acc_bias, int prescaled,
                                                    cudaStream_t stream)
{
    int64_t *bad_rows = kdl_fused_linear_sparse(a) ? a->bad_index_rows : NULL;
    KDL_EXT_LAUNCH("fused_finish_kernel", kdl::launch_ex(fused_finish_kernel, 1, 32, 0, stream, (int)d->reduction, a->loss,
                                                         (int)a->out_dtype, a->info, a->valid_rows, bad_rows, acc,
                                                         prescaled));
    const int mean = d->reduction == KDL_REDUCTION_MEAN;
    if (a->grad_bias && a->rows > 0)
        KDL_EXT_LAUNCH("fused_bias_out_kernel", kdl::launch_ex(fused_bias_out_kernel, grid_1d(a->vocab), kThreads, 0, stream,
                                                               acc_bias, a->vocab, mean, acc, a->grad_bias, (int)a->grad_dtype));
    if (!mean) return KDL_STATUS_SUCCESS;
    const int gdt = (int)a->grad_dtype;
    if (a->grad_hidden)
        KDL_EXT_LAUNCH("scale_rows_kernel",
                       scale_launch(a->grad_hidden, gdt, a->rows, a->hidden, a->ld_grad_hidden, acc + 3, stream));
    if (a->grad_weight)
        KDL_EXT_LAUNCH("scale_rows_kernel",
                       scale_launch(a->grad_weight, gdt, a->vocab, a->hidden, a->ld_grad_weight, acc + 3, stream));
    return KDL_STATUS_SUCCESS;
}
