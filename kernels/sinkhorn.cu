/*
 * kernels/sinkhorn.cu - batched log-domain Sinkhorn and the SinKD loss on
 * the GPU.  Interface and vocabulary: kernels/sinkhorn.cuh; host side:
 * host/gpu_sinkhorn.c; maths: DESIGN section 2 and docs/sinkhorn.md.
 *
 * Kernels and what each reads / writes (C = cost, n x m per problem):
 *
 *   k_sqnorms      X rows -> |x|^2                        (SQEUCLIDEAN cost)
 *   k_sq_fixup     C += |x_i|^2 + |y_j|^2, clamped >= 0   (after the cuBLAS
 *                  GEMM wrote -2 x.y)
 *   k_l1           C_ij = sum_k |x_ik - y_jk|: 16 x 16 tiles, d staged in
 *                  shared memory 32 at a time, optionally split along d
 *   k_l1_reduce    sums the d-split partials in split order
 *   k_scan         per row: min, max, finite check of C (row tiles)
 *   k_prep         per problem: diameter, log-weight check, eps schedule,
 *                  state reset
 *   k_f_update     f_i = -eps LSE_j(lb_j + (g_j - C_ij)/eps): one warp per
 *                  row, online LSE (cost units for eps < 1, log units
 *                  above, as the reference), C read once; fused with the
 *                  row-marginal error of the previous iterate when a check
 *                  is due: sum_j P_ij = a_i exp((f_old_i - f_new_i)/eps)
 *   k_check        per problem: err = sum_i |.|, converged -> done
 *   k_g_update     g_j = -eps LSE_i(la_i + (f_i - C_ij)/eps): 32 columns per
 *                  CTA (coalesced rows), 8 warps split the rows, partial
 *                  LSEs merged in warp order; C read once
 *   k_finish       P (optional plan, each entry capped at b_j as the
 *                  reference's), row sums of P C and |sum_j P_ij - a_i|,
 *                  final f
 *   k_final_err    per problem: the reported error from those terms (the
 *                  returned plan's, as the reference's row_error)
 *   k_combine      per caller problem: value (debias), outputs, info
 *   k_grad_x       x-gradient through the cost, plan fixed
 *   k_softmax      SinKD: p = softmax(x / tau) per row, invalid-row flags
 *   k_sinkd_groups / k_sinkd_plan / k_sinkd_grad   SinKD epilogue
 *
 * Every problem iterates in parallel: the f and g kernels run over tiles
 * of all problems at once; a problem that converged (or has non-finite
 * input) is marked done and its tiles return at their first instruction
 * thereafter.  All arithmetic is FP32 except the schedule and the final
 * value sums (FP64); all reductions are in a fixed order (warp butterflies
 * of commutative merges, shared-memory trees, loops in index order), so
 * results are bitwise reproducible; no floating-point atomics.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "launch_ex.cuh"
#include "sinkhorn.cuh"

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kBlock = 256;

/* ------------------------------------------------------------ LSE helpers */
/* An online log-sum-exp: the terms t_k, value m + log2(s) / k, with
 * s = sum exp2((t_k - m) k) (see SoftMin below for the units). */
struct Lse {
    float m, s;
};

/* The f and g updates, f_i = -eps LSE_j(lb_j + (g_j - C_ij)/eps) and its
 * mirror, in the two forms of the reference's neg_soft_min
 * (host/ref_sinkhorn.c), chosen by the iteration's eps as there:
 *   eps <  1: cost units, t_k = r_k + eps lw_k (r = g_j - C_ij or
 *             f_i - C_ij), T = max t_k, result -(T + eps ln sum exp((t_k - T)/eps));
 *   eps >= 1: log units, t_k = lw_k + r_k/eps, result -eps (T + ln sum exp(t_k - T)).
 * The log form alone, (g_j - C_ij) log2(e)/eps in FP32, overflowed to -inf
 * for every j of a row once min_j (C_ij - g_j)/eps passed about 2.4e38
 * (eps = 1e-37 with costs near 100): f = +inf, then NaN everywhere with
 * SUCCESS (docs/sinkhorn-review.md #11, the device side of hardening F7).
 * In cost units t_k - T <= 0 and k = log2(e)/eps <= 1.3e38 is finite for
 * every eps >= FLT_MIN (the GPU path refuses smaller eps), so the exponent
 * is at worst -inf (a zero term) and the sum is >= 1: finite for every
 * accepted eps.  eps lw_k would overflow for a huge eps, hence the log form
 * there.  An online sum over the t_k: m = max so far, s = sum of
 * exp2((t_k - m) k). */
struct SoftMin {
    float rs;  /* factor of r_k in t_k: 1 or 1/eps         */
    float ws;  /* factor of lw_k (natural log): eps or 1    */
    float k;   /* log2(e)/eps or log2(e): (t - T) k in log2 */
    float os;  /* the result is -os (T + ws ln s): 1 or eps  */
};

__device__ __forceinline__ SoftMin soft_min_at(float eps)
{
    SoftMin q;
    if (eps < 1.0f) {
        q.rs = 1.0f;
        q.ws = eps;
        q.k = kLog2e / eps;
        q.os = 1.0f;
    } else {
        q.rs = 1.0f / eps;
        q.ws = 1.0f;
        q.k = kLog2e;
        q.os = eps;
    }
    return q;
}

/* t_k of one term; -inf for a zero weight (lw = -inf) whatever r is: a zero
 * weight's row or column contributes nothing, and its potential is not
 * bounded by anything (docs/hardening.md F11). */
__device__ __forceinline__ float sm_term(const SoftMin &q, float lw, float r)
{
    return lw == -INFINITY ? -INFINITY : fmaf(q.ws, lw, r * q.rs);
}

__device__ __forceinline__ void sm_add(Lse &a, float t, float k)
{
    if (t > a.m) {
        a.s = a.s * exp2f((a.m - t) * k) + 1.0f; /* a.m = -inf: (-inf) k = -inf, s = 1 */
        a.m = t;
    } else if (t != -INFINITY) {
        a.s += exp2f((t - a.m) * k);
    }
}

/* Deterministic for a fixed merge order.  Not guaranteed commutative bit for
 * bit: nvcc contracts a*x + b*y into fma(a, x, b*y) by default, so after a
 * butterfly the lanes may differ in the last bit; callers read one lane
 * (lane 0 in k_f_update) or merge in a fixed order (k_g_update), so the
 * results stay reproducible run to run. */
__device__ __forceinline__ Lse sm_merge(Lse a, Lse b, float k)
{
    if (a.m == -INFINITY) return b;
    if (b.m == -INFINITY) return a;
    const float M = fmaxf(a.m, b.m);
    Lse r;
    r.m = M;
    r.s = a.s * exp2f((a.m - M) * k) + b.s * exp2f((b.m - M) * k);
    return r;
}

__device__ __forceinline__ Lse warp_sm(Lse a, float k)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Lse b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
        b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
        a = sm_merge(a, b, k);
    }
    return a;
}

/* -os (T + ws ln s) */
__device__ __forceinline__ float sm_result(const SoftMin &q, Lse a)
{
    return -q.os * fmaf(q.ws * kLn2, log2f(a.s), a.m);
}

/* The FP32 eps of iteration it: the schedule's, at most FLT_MAX (an
 * annealing stage starts at the cost's diameter, which for FP32 costs can
 * reach 2 FLT_MAX). */
__device__ __forceinline__ float eps_of(const kdl_ot_schedule_t &sch, int64_t it)
{
    const double e = kdl_ot_schedule_eps(&sch, it);
    return e < (double)FLT_MAX ? (float)e : FLT_MAX;
}

/* Natural log weight of row i (la given, or uniform). */
__device__ __forceinline__ float logw(const float *lw, int i, float uniform)
{
    return lw ? lw[i] : uniform;
}

template <class T> __device__ __forceinline__ T warp_sum(T v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Fixed-tree block reduction over kBlock threads (every thread must call
 * it): the same pairing order every run. */
template <class T, class Op> __device__ __forceinline__ T block_reduce(T v, T *sh, Op op)
{
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = kBlock / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] = op(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    T r = sh[0];
    __syncthreads();
    return r;
}

struct AddOp {
    template <class T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ double block_sum(double v, double *sh) { return block_reduce(v, sh, AddOp()); }
__device__ float block_sum_f(float v, float *sh) { return block_reduce(v, sh, AddOp()); }
__device__ float block_max_f(float v, float *sh) { return block_reduce(v, sh, MaxOp()); }

/* log2 weight of row i (la given in natural log, or uniform). */
__device__ __forceinline__ float logw2(const float *lw, int i, float uniform2)
{
    return lw ? lw[i] * kLog2e : uniform2;
}

/* dC(u, v)/du for t = u_k - v_k. */
__device__ __forceinline__ float dcost(int metric, float t)
{
    if (metric == KDL_OT_METRIC_L1) return (float)((t > 0.0f) - (t < 0.0f));
    return 2.0f * t;
}

/* ------------------------------------------------------------------ costs */
__global__ void __launch_bounds__(kBlock) k_sqnorms(const float *__restrict__ X, int64_t rows, int64_t d,
                                                    float *__restrict__ out)
{
    const int64_t r = (int64_t)blockIdx.x * (kBlock / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const float *x = X + r * d;
    float s = 0.0f;
    for (int64_t k = lane; k < d; k += 32) s = fmaf(x[k], x[k], s);
    s = warp_sum(s);
    if (lane == 0) out[r] = s;
}

__global__ void __launch_bounds__(kBlock) k_sq_fixup(const kdl_otk_job_t *__restrict__ jobs,
                                                     const kdl_otk_tile_t *__restrict__ tiles)
{
    const kdl_otk_tile_t t = tiles[blockIdx.x];
    const kdl_otk_job_t J = jobs[t.prob];
    const int i = t.r0 + (int)(threadIdx.x / KDL_OTK_COST_TILE);
    const int j = t.c0 + (int)(threadIdx.x % KDL_OTK_COST_TILE);
    if (i >= J.n || j >= J.m) return;
    float *c = J.C + (int64_t)i * J.m + j;
    /* clamp at 0 but keep NaN: fmaxf(0, NaN) is 0, which would hide a NaN /
     * inf point (inf - inf in the expansion) from k_scan's non-finite flag */
    const float v = J.nx[i] + J.ny[j] + *c;
    *c = v < 0.0f ? 0.0f : v;
}

/* L1 pairwise sums over the cost tiles: thread (ti, tj) of the 16 x 16 tile
 * owns entry (r0 + ti, c0 + tj); the d range of split blockIdx.y is staged
 * 32 coordinates at a time.  kDot == false: the cost sum_k |x_ik - y_jk|;
 * kDot == true: SinKD's gradient term D_ij = sum_k x_ik sign(x_ik - y_jk)
 * (same tiles, same order).  Output: dst + coff (dst NULL: the job's C)
 * when dsplit == 1, else partial[s * total + coff + i m + j]. */
template <bool kDot>
__global__ void __launch_bounds__(kBlock) k_l1(const kdl_otk_job_t *__restrict__ jobs,
                                               const kdl_otk_tile_t *__restrict__ tiles, int64_t d, int dsplit,
                                               float *__restrict__ partial, int64_t total, float *__restrict__ dst)
{
    constexpr int T = KDL_OTK_COST_TILE, K = 32;
    __shared__ float xs[T][K + 1], ys[T][K + 1];
    const kdl_otk_tile_t t = tiles[blockIdx.x];
    const kdl_otk_job_t J = jobs[t.prob];
    const int ti = threadIdx.x / T, tj = threadIdx.x % T;
    const int64_t per = (d + dsplit - 1) / dsplit;
    const int64_t k0 = (int64_t)blockIdx.y * per;
    const int64_t k1 = k0 + per < d ? k0 + per : d;
    float acc = 0.0f;
    for (int64_t kb = k0; kb < k1; kb += K) {
        /* 2 x 16 x 32 values, 256 threads: 4 loads each, 32 consecutive per row */
        for (int q = threadIdx.x; q < T * K; q += kBlock) {
            const int rr = q / K, kk = q % K;
            const int64_t k = kb + kk;
            const int xi = t.r0 + rr, yj = t.c0 + rr;
            xs[rr][kk] = (k < k1 && xi < J.n) ? J.X[(int64_t)xi * d + k] : 0.0f;
            ys[rr][kk] = (k < k1 && yj < J.m) ? J.Y[(int64_t)yj * d + k] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < K; kk++) {
            const float x = xs[ti][kk], u = x - ys[tj][kk];
            if (kDot)
                acc = fmaf(x, (float)((u > 0.0f) - (u < 0.0f)), acc);
            else
                acc += fabsf(u);
        }
        __syncthreads();
    }
    const int i = t.r0 + ti, j = t.c0 + tj;
    if (i >= J.n || j >= J.m) return;
    if (dsplit == 1)
        (dst ? dst + J.coff : J.C)[(int64_t)i * J.m + j] = acc;
    else
        partial[(int64_t)blockIdx.y * total + J.coff + (int64_t)i * J.m + j] = acc;
}

__global__ void __launch_bounds__(kBlock) k_l1_reduce(const float *__restrict__ partial, int dsplit,
                                                      int64_t total, float *__restrict__ packed)
{
    for (int64_t e = (int64_t)blockIdx.x * kBlock + threadIdx.x; e < total; e += (int64_t)gridDim.x * kBlock) {
        float s = 0.0f;
        for (int q = 0; q < dsplit; q++) s += partial[(int64_t)q * total + e];
        packed[e] = s;
    }
}

/* ----------------------------------------------------------------- solver */
/* Row min / max / finiteness of C into rowerr (min, NaN if a value is not
 * finite) and rowval (max). */
__global__ void __launch_bounds__(kBlock) k_scan(const kdl_otk_prob_t *__restrict__ probs,
                                                 const kdl_otk_tile_t *__restrict__ tiles)
{
    const kdl_otk_tile_t t = tiles[blockIdx.x];
    const kdl_otk_prob_t &p = probs[t.prob];
    const int i = t.r0 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (i >= p.n) return;
    const float *c = p.C + (int64_t)i * p.m;
    float mn = INFINITY, mx = -INFINITY;
    int bad = 0;
    for (int j = lane; j < p.m; j += 32) {
        const float v = c[j];
        bad |= !isfinite(v);
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) {
        p.rowerr[i] = bad ? NAN : mn;
        p.rowval[i] = mx;
    }
}

__global__ void __launch_bounds__(kBlock) k_prep(const kdl_otk_prob_t *__restrict__ probs,
                                                 kdl_otk_state_t *__restrict__ state, kdl_otk_params_t prm)
{
    __shared__ float sh[kBlock];
    const kdl_otk_prob_t &p = probs[blockIdx.x];
    float mn = INFINITY, mx = -INFINITY;
    int bad = 0, any_a = p.la == nullptr, any_b = p.lb == nullptr;
    for (int i = threadIdx.x; i < p.n; i += kBlock) {
        const float lo = p.rowerr[i];
        bad |= isnan(lo);
        mn = fminf(mn, lo);
        mx = fmaxf(mx, p.rowval[i]);
        if (p.la) {
            const float v = p.la[i];
            bad |= isnan(v) || v == INFINITY;
            any_a |= v > -INFINITY;
        }
    }
    if (p.lb)
        for (int j = threadIdx.x; j < p.m; j += kBlock) {
            const float v = p.lb[j];
            bad |= isnan(v) || v == INFINITY;
            any_b |= v > -INFINITY;
        }
    bad = __syncthreads_or(bad);
    any_a = __syncthreads_or(any_a);
    any_b = __syncthreads_or(any_b);
    mx = block_max_f(mx, sh);
    mn = -block_max_f(-mn, sh);
    if (threadIdx.x == 0) {
        kdl_otk_state_t s;
        s.sched = kdl_ot_schedule_make((double)mx - (double)mn, prm.eps, prm.eps_scaling, prm.factor,
                                       prm.stage_iter, prm.max_iter);
        s.iters = 0;
        s.err = NAN;
        s.done = (bad || !any_a || !any_b) ? 2 : 0;
        s.fbuf = 0;
        state[blockIdx.x] = s;
    }
}

__global__ void __launch_bounds__(kBlock) k_f_update(const kdl_otk_prob_t *__restrict__ probs,
                                                     const kdl_otk_state_t *__restrict__ state,
                                                     const kdl_otk_tile_t *__restrict__ tiles, int64_t it,
                                                     const int64_t *__restrict__ itp, int final_pass,
                                                     kdl_otk_params_t prm)
{
    const kdl_otk_tile_t t = tiles[blockIdx.x];
    if (state[t.prob].done) return;
    if (itp) it = *itp; /* inside the graph loop: the iteration is on the device */
    const kdl_otk_prob_t &p = probs[t.prob];
    const int i = t.r0 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (i >= p.n) return;
    const kdl_ot_schedule_t sch = state[t.prob].sched;
    const float eps = eps_of(sch, it);
    const SoftMin q = soft_min_at(eps);
    const float lb_uni = -logf((float)p.m);
    const float *__restrict__ c = p.C + (int64_t)i * p.m;
    const float *__restrict__ g = p.g;
    Lse acc = {-INFINITY, 0.0f};
    for (int j = lane; j < p.m; j += 32) sm_add(acc, sm_term(q, logw(p.lb, j, lb_uni), g[j] - c[j]), q.k);
    acc = warp_sm(acc, q.k);
    if (lane != 0) return;
    const float fnew = sm_result(q, acc);
    p.f[it & 1][i] = fnew;
    const int64_t prev = it - 1;
    if (final_pass || (prev >= 1 && kdl_ot_check_due(&sch, prev, prm.tol, prm.check_every))) {
        /* row sum of P(f_old, g) = a_i exp((f_old - f_new)/eps).  A zero
         * weight (la = -inf) is a zero row of P: term 0, as the reference
         * (a_i * expm1 would be 0 * inf = NaN when the zero-weight row's f
         * moved by more than ~88 eps, common at small eps).  A large x is
         * taken in the log domain so a tiny a_i times a huge e^x does not
         * overflow before the product. */
        const float la2 = logw2(p.la, i, -log2f((float)p.n));
        const float fo = p.f[prev & 1][i];
        const float x = (fo - fnew) / eps;
        float e;
        if (la2 == -INFINITY)
            e = 0.0f;
        else if (x < 80.0f)
            e = fabsf(exp2f(la2) * expm1f(x));
        else
            e = exp2f(la2 + x * kLog2e); /* a e^x - a = a e^x to float precision */
        p.rowerr[i] = e;
    }
}

__global__ void __launch_bounds__(kBlock) k_check(const kdl_otk_prob_t *__restrict__ probs,
                                                  kdl_otk_state_t *__restrict__ state, int64_t it,
                                                  const int64_t *__restrict__ itp, int final_pass,
                                                  kdl_otk_params_t prm)
{
    __shared__ double sh[kBlock];
    kdl_otk_state_t *s = state + blockIdx.x;
    if (s->done) return;
    if (itp) it = *itp;
    const int64_t prev = it - 1;
    const kdl_ot_schedule_t sch = s->sched;
    const bool due = prev >= 1 && kdl_ot_check_due(&sch, prev, prm.tol, prm.check_every);
    if (!due && !final_pass) return;
    const kdl_otk_prob_t &p = probs[blockIdx.x];
    double acc = 0.0;
    for (int i = threadIdx.x; i < p.n; i += kBlock) acc += (double)p.rowerr[i];
    const double err = block_sum(acc, sh);
    if (threadIdx.x == 0 && (final_pass || err <= prm.tol)) {
        s->done = 1;
        s->iters = prev;
        s->fbuf = (int32_t)(prev & 1);
        s->err = (float)err;
    }
}

__global__ void __launch_bounds__(kBlock) k_g_update(const kdl_otk_prob_t *__restrict__ probs,
                                                     const kdl_otk_state_t *__restrict__ state,
                                                     const kdl_otk_tile_t *__restrict__ tiles, int64_t it,
                                                     const int64_t *__restrict__ itp, int fsel, int init_only)
{
    __shared__ Lse part[kBlock / 32][32];
    const kdl_otk_tile_t t = tiles[blockIdx.x];
    if (state[t.prob].done) return;
    if (itp) {
        it = *itp;
        fsel = (int)(it & 1);
    }
    const kdl_otk_prob_t &p = probs[t.prob];
    if (init_only && !p.warm_f) return;
    const kdl_ot_schedule_t sch = state[t.prob].sched;
    const SoftMin q = soft_min_at(eps_of(sch, it));
    const float la_uni = -logf((float)p.n);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = t.c0 + lane;
    const float *__restrict__ f = p.f[fsel];
    Lse acc = {-INFINITY, 0.0f};
    if (j < p.m)
        for (int i = w; i < p.n; i += kBlock / 32)
            sm_add(acc, sm_term(q, logw(p.la, i, la_uni), f[i] - p.C[(int64_t)i * p.m + j]), q.k);
    part[w][lane] = acc;
    __syncthreads();
    if (w == 0 && j < p.m) {
        Lse r = part[0][lane];
#pragma unroll
        for (int u = 1; u < kBlock / 32; u++) r = sm_merge(r, part[u][lane], q.k);
        p.g[j] = sm_result(q, r);
    }
}

#if CUDART_VERSION >= 12040
#define KDL_OTK_GRAPH_LOOP 1
/* The device-side loop (a CUDA graph "while" node whose body is one
 * iteration: f update, check, g update, k_loop_ctrl).  *itp is the
 * iteration the body runs next; the loop goes on while a problem is still
 * iterating and the next iteration is <= max_iter. */
__global__ void k_loop_init(int64_t *__restrict__ itp) { *itp = 1; }

__global__ void __launch_bounds__(kBlock) k_loop_ctrl(const kdl_otk_state_t *__restrict__ state, int64_t nprob,
                                                      int64_t *__restrict__ itp, int64_t max_iter,
                                                      cudaGraphConditionalHandle cond)
{
    int active = 0;
    for (int64_t p = threadIdx.x; p < nprob; p += kBlock) active |= state[p].done == 0;
    active = __syncthreads_or(active);
    if (threadIdx.x == 0) {
        const int64_t next = *itp + 1;
        *itp = next;
        cudaGraphSetConditional(cond, (active && next <= max_iter) ? 1u : 0u);
    }
}
#endif

/* log2 P_ij = la2_i + lb2_j + (f_i + g_j - C_ij) log2(e)/eps, capped at
 * lb2_j as the reference's plan_ij (host/ref_sinkhorn.c): g ends every
 * iteration as the g update of f, so a column of P sums to b_j and no entry
 * exceeds b_j.  Without the cap, potentials from a larger eps (max_iter
 * stopping inside the eps-scaling stages) put f_i + g_j - C_ij up to about
 * (eps_stage/eps) log n times eps above 0 at the final eps: exp2f overflowed
 * to inf, the plan had inf (and inf * 0 = NaN in P C) and TRANSPORT was
 * inf or NaN where the reference is finite (docs/sinkhorn-review.md #6).
 * NaN stays NaN (the comparison is false); -inf stays -inf.  A zero weight
 * (la2 or lb2 = -inf) gives -inf (P_ij = 0) without forming the exponent,
 * as the reference's plan_ij: at a tiny eps fg_c * k of a zero-weight row
 * and column can be +inf, and -inf + inf was NaN in the plan, <P, C>, the
 * marginal error and the x-gradient (docs/hardening.md F11). */
__device__ __forceinline__ float plan_log2(float la2, float lb2, float fg_c, float k)
{
    if (la2 == -INFINITY || lb2 == -INFINITY) return -INFINITY;
    const float e = la2 + lb2 + fg_c * k;
    return e > lb2 ? lb2 : e;
}

/* Plan, row sums of P C, final f (done == 1); NaN everywhere for done == 2. */
__global__ void __launch_bounds__(kBlock, 4) k_finish(const kdl_otk_prob_t *__restrict__ probs,
                                                   const kdl_otk_state_t *__restrict__ state,
                                                   const kdl_otk_tile_t *__restrict__ tiles, float eps)
{
    const kdl_otk_tile_t t = tiles[blockIdx.x];
    const kdl_otk_prob_t &p = probs[t.prob];
    const int done = state[t.prob].done, fbuf = state[t.prob].fbuf;
    const int i = t.r0 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (i >= p.n) return;
    float *plan = p.plan ? p.plan + (int64_t)i * p.m : nullptr;
    if (done != 1) {
        if (plan)
            for (int j = lane; j < p.m; j += 32) plan[j] = NAN;
        if (lane == 0) {
            p.rowval[i] = NAN;
            if (p.f_out) p.f_out[i] = NAN;
        }
        return;
    }
    const float k = kLog2e / eps;
    const float fi = (fbuf ? p.f[1] : p.f[0])[i];
    const float la2 = logw2(p.la, i, -log2f((float)p.n));
    const float lb_uni = -log2f((float)p.m);
    const float *__restrict__ c = p.C + (int64_t)i * p.m;
    /* the row sums of P C and of P in double, as the reference's: a float
     * sum over m/32 terms per lane had a relative error up to about
     * (m/32) 2^-24, an absolute floor under the marginal error of a
     * max_iter stop (docs/sinkhorn-review.md #12) and in TRANSPORT */
    double acc = 0.0, rsum = 0.0;
    for (int j = lane; j < p.m; j += 32) {
        const float P = exp2f(plan_log2(la2, logw2(p.lb, j, lb_uni), fi + p.g[j] - c[j], k));
        if (plan) plan[j] = P;
        acc = fma((double)P, (double)c[j], acc);
        rsum += (double)P;
    }
    acc = warp_sum(acc);
    rsum = warp_sum(rsum);
    if (lane == 0) {
        p.rowval[i] = (float)acc;
        /* a_i in double from the caller's log-weight, as the reference's */
        const double ai = p.la ? exp((double)p.la[i]) : 1.0 / (double)p.n;
        p.rowerr[i] = (float)fabs(rsum - ai); /* for k_final_err */
        if (p.f_out) p.f_out[i] = fi;
    }
}

/* The marginal error every solved problem reports: sum_i |sum_j P_ij - a_i|
 * of the plan it returns (capped, at the final eps), from k_finish's row
 * terms (double row sums), as the reference's row_error of its final
 * iterate.  The stopping checks use the fused row error of k_f_update
 * (a_i exp((f_old - f_new)/eps), no pass over C), which is the same number
 * up to rounding when eps is not tiny against the potentials; it was
 * reported as is until the third review, and differed (1) when max_iter
 * stopped inside the eps-scaling stages (the final pass measured at the
 * schedule's eps, uncapped; docs/sinkhorn-review.md #6) and (2) at eps
 * below about 1e-7 |f| (hardening F7's regime), where f is a fixed point
 * in FP32 (the fused error is 0) while rounding of f + g - C leaves the
 * plan's rows off their weights (the reference measures the plan: 0.5 for
 * the cost [[100, 164], [164, 100]] at eps = 1e-37; third review R5). */
__global__ void __launch_bounds__(kBlock) k_final_err(const kdl_otk_prob_t *__restrict__ probs,
                                                      kdl_otk_state_t *__restrict__ state)
{
    __shared__ double sh[kBlock];
    kdl_otk_state_t *s = state + blockIdx.x;
    if (s->done != 1) return;
    const kdl_otk_prob_t &p = probs[blockIdx.x];
    double acc = 0.0;
    for (int i = threadIdx.x; i < p.n; i += kBlock) acc += (double)p.rowerr[i];
    const double err = block_sum(acc, sh);
    if (threadIdx.x == 0) s->err = (float)err;
}

/* Value of solver problem q: TRANSPORT sum of row sums, DUAL <a,f> + <b,g>. */
__device__ double problem_value(const kdl_otk_prob_t &p, const kdl_otk_state_t &s, int dual, double *sh)
{
    double acc = 0.0;
    if (dual) {
        const float *f = p.f[s.fbuf];
        const double ua = 1.0 / p.n, ub = 1.0 / p.m;
        for (int i = threadIdx.x; i < p.n; i += kBlock) {
            const double w = p.la ? exp((double)p.la[i]) : ua;
            if (w > 0) acc += w * (double)f[i];
        }
        for (int j = threadIdx.x; j < p.m; j += kBlock) {
            const double w = p.lb ? exp((double)p.lb[j]) : ub;
            if (w > 0) acc += w * (double)p.g[j];
        }
    } else {
        for (int i = threadIdx.x; i < p.n; i += kBlock) acc += (double)p.rowval[i];
    }
    return block_sum(acc, sh);
}

__global__ void __launch_bounds__(kBlock) k_combine(kdl_otk_combine_t L)
{
    __shared__ double sh[kBlock];
    const int64_t b = blockIdx.x, B = L.batch;
    const kdl_otk_prob_t &p = L.probs[b];
    const kdl_otk_state_t s = L.state[b];
    int bad = s.done == 2;
    double v = bad ? 0.0 : problem_value(p, s, L.dual, sh);
    double vyy = 0.0;
    if (L.debias) {
        const kdl_otk_state_t sx = L.state[B + b];
        bad |= sx.done == 2;
        const double vxx = sx.done == 2 ? 0.0 : problem_value(L.probs[B + b], sx, L.dual, sh);
        if (L.yy_solved) {
            const kdl_otk_state_t sy = L.state[2 * B + b];
            bad |= sy.done == 2;
            vyy = sy.done == 2 ? (double)NAN : problem_value(L.probs[2 * B + b], sy, L.dual, sh);
        } else {
            vyy = (double)L.self_yy_in[b];
        }
        v = v - 0.5 * vxx - 0.5 * vyy;
    }
    if (L.g_out) {
        float *go = L.g_out + L.g_off[b];
        for (int j = threadIdx.x; j < p.m; j += kBlock) go[j] = bad ? NAN : p.g[j];
    }
    if (bad && s.done != 2) {
        /* only a self problem was flagged (a non-finite cost_xx / cost_yy):
         * k_finish wrote this problem's f and plan as valid; the documented
         * policy is NaN for all of the problem's outputs */
        if (p.f_out)
            for (int i = threadIdx.x; i < p.n; i += kBlock) p.f_out[i] = NAN;
        if (p.plan)
            for (int64_t e = threadIdx.x; e < (int64_t)p.n * p.m; e += kBlock) p.plan[e] = NAN;
    }
    if (threadIdx.x != 0) return;
    L.value[b] = bad ? NAN : (float)v;
    if (L.iterations) L.iterations[b] = bad ? 0 : s.iters;
    if (L.marginal_error) L.marginal_error[b] = bad ? NAN : s.err;
    if (L.debias && L.yy_solved && L.self_yy_out) L.self_yy_out[b] = (float)vyy;
    if (bad && L.info) atomicAdd(L.info, 1ull); /* integer: order-free */
}

__global__ void __launch_bounds__(128) k_grad_x(const kdl_otk_prob_t *__restrict__ probs,
                                                const kdl_otk_state_t *__restrict__ state,
                                                const kdl_otk_tile_t *__restrict__ tiles, int64_t t0, int64_t d,
                                                int metric, float eps)
{
    __shared__ float w[128];
    const kdl_otk_tile_t t = tiles[t0 + blockIdx.x];
    const kdl_otk_prob_t &p = probs[t.prob];
    const kdl_otk_state_t s = state[t.prob];
    const int64_t kc = (int64_t)blockIdx.y * 128 + threadIdx.x;
    const int rows = p.n - t.r0 < KDL_OTK_ROWS_PER_TILE ? p.n - t.r0 : KDL_OTK_ROWS_PER_TILE;
    if (s.done != 1) {
        if (kc < d)
            for (int r = 0; r < rows; r++) p.grad[(int64_t)(t.r0 + r) * d + kc] = NAN;
        return;
    }
    const float k = kLog2e / eps;
    const float *__restrict__ f = p.f[s.fbuf];
    const float la_uni = -log2f((float)p.n), lb_uni = -log2f((float)p.m);
    for (int r = 0; r < rows; r++) {
        const int i = t.r0 + r;
        const float xi = kc < d ? p.X[(int64_t)i * d + kc] : 0.0f;
        const float fi = f[i], gi = p.sym ? p.g[i] : 0.0f;
        const float la2i = logw2(p.la, i, la_uni);
        const float lb2i = p.sym ? logw2(p.lb, i, lb_uni) : 0.0f;
        float acc = 0.0f;
        for (int j0 = 0; j0 < p.m; j0 += 128) {
            const int j = j0 + threadIdx.x;
            float wj = 0.0f;
            if (j < p.m) {
                wj = exp2f(plan_log2(la2i, logw2(p.lb, j, lb_uni), fi + p.g[j] - p.C[(int64_t)i * p.m + j], k));
                if (p.sym) /* P_ji of the self problem (n == m, la == lb), capped at b_i */
                    wj += exp2f(plan_log2(logw2(p.la, j, la_uni), lb2i, f[j] + gi - p.C[(int64_t)j * p.m + i], k));
            }
            __syncthreads();
            w[threadIdx.x] = wj;
            __syncthreads();
            if (kc < d) {
                const int cnt = p.m - j0 < 128 ? p.m - j0 : 128;
                for (int q = 0; q < cnt; q++)
                    acc = fmaf(w[q], dcost(metric, xi - p.Y[(int64_t)(j0 + q) * d + kc]), acc);
            }
        }
        if (kc < d) {
            float *gp = p.grad + (int64_t)i * d + kc;
            if (p.sym)
                *gp -= 0.5f * acc;
            else
                *gp = acc;
        }
    }
}

/* ------------------------------------------------------------------ SinKD */
template <int DT> __device__ __forceinline__ float load_logit(const void *x, int64_t i)
{
    if (DT == 0) return ((const float *)x)[i];
    if (DT == 1) return __half2float(((const __half *)x)[i]);
    return __bfloat162float(((const __nv_bfloat16 *)x)[i]);
}

template <int DT>
__global__ void __launch_bounds__(kBlock, 1) k_softmax(const void *__restrict__ x, int64_t ld, int64_t V, float k2,
                                                    float *__restrict__ probs, int32_t *__restrict__ bad)
{
    __shared__ float sh[kBlock];
    const int64_t r = blockIdx.x;
    float mx = -INFINITY;
    int nonfinite = 0, any = 0;
    for (int64_t v = threadIdx.x; v < V; v += kBlock) {
        const float z = load_logit<DT>(x, r * ld + v);
        nonfinite |= isnan(z) || z == INFINITY;
        any |= z > -INFINITY;
        mx = fmaxf(mx, z);
    }
    nonfinite = __syncthreads_or(nonfinite);
    any = __syncthreads_or(any);
    float *out = probs + r * V;
    if (nonfinite || !any) {
        for (int64_t v = threadIdx.x; v < V; v += kBlock) out[v] = 0.0f;
        if (threadIdx.x == 0) bad[r] = 1;
        return;
    }
    /* (z - max z) k2, the reference's (x - max)/tau (docs/hardening.md F8).
     * z k2 - max(z k2) overflowed to inf - inf = NaN once z log2(e)/tau
     * passed FLT_MAX (a logit above 2.4e38 tau: about 3 at tau = FLT_MIN,
     * 2.4e9 at tau = 1e-29): a valid group's loss NaN with SUCCESS.  Short
     * of that it rounded z k2 before the shift (half an ulp of 1e7 is 0.5 in
     * log2: a factor of 1.4 in a probability).  z - max z <= 0, so the
     * exponent is at worst -inf (probability 0), and the sum is >= 1. */
    mx = block_max_f(mx, sh);
    float s = 0.0f;
    for (int64_t v = threadIdx.x; v < V; v += kBlock) s += exp2f((load_logit<DT>(x, r * ld + v) - mx) * k2);
    s = block_sum_f(s, sh);
    const float l2s = log2f(s);
    for (int64_t v = threadIdx.x; v < V; v += kBlock) out[v] = exp2f((load_logit<DT>(x, r * ld + v) - mx) * k2 - l2s);
    if (threadIdx.x == 0) bad[r] = 0;
}

__device__ __forceinline__ void store_out(void *base, int f64, int64_t i, double v)
{
    if (f64)
        ((double *)base)[i] = v;
    else
        ((float *)base)[i] = (float)v;
}

/* One CTA: group losses, validity, loss, coefficient, info. */
__global__ void __launch_bounds__(kBlock) k_sinkd_groups(kdl_otk_sinkd_epi_t L, int32_t *__restrict__ gvalid)
{
    __shared__ double sh[kBlock];
    double sum = 0.0, cnt = 0.0;
    for (int64_t g = threadIdx.x; g < L.groups; g += kBlock) {
        const kdl_otk_state_t s = L.state[g];
        int ok = s.done == 1;
        for (int64_t i = 0; i < L.n && ok; i++) ok = !L.bad_s[g * L.n + i] && !L.bad_t[g * L.n + i];
        double v = 0.0;
        if (ok) {
            const float *rv = L.probs[g].rowval;
            for (int64_t i = 0; i < L.n; i++) v += (double)rv[i];
            v *= L.scale;
            sum += v;
            cnt += 1.0;
        }
        gvalid[g] = ok;
        if (L.group_loss) store_out(L.group_loss, L.out_f64, g, ok ? v : (double)NAN);
        if (L.iterations) L.iterations[g] = ok ? s.iters : 0;
        if (L.marginal_error) store_out(L.marginal_error, L.out_f64, g, ok ? (double)s.err : (double)NAN);
    }
    sum = block_sum(sum, sh);
    cnt = block_sum(cnt, sh);
    if (threadIdx.x == 0) {
        store_out(L.loss, L.out_f64, 0, cnt > 0 ? sum / cnt : 0.0);
        *L.coef = cnt > 0 ? (float)(L.scale / cnt) : 0.0f;
        if (L.info) *L.info = (unsigned long long)(L.groups - (int64_t)cnt);
    }
}

__global__ void __launch_bounds__(kBlock) k_sinkd_plan(const float *__restrict__ P, const int32_t *__restrict__ gvalid,
                                                       int64_t nn, int64_t total, void *out, int f64)
{
    for (int64_t e = (int64_t)blockIdx.x * kBlock + threadIdx.x; e < total; e += (int64_t)gridDim.x * kBlock)
        store_out(out, f64, e, gvalid[e / nn] ? (double)P[e] : (double)NAN);
}

template <int GT> __device__ __forceinline__ void store_grad(void *g, int64_t i, float v)
{
    if (GT == 0)
        ((float *)g)[i] = v;
    else if (GT == 1)
        ((__half *)g)[i] = __float2half_rn(v);
    else
        ((__nv_bfloat16 *)g)[i] = __float2bfloat16_rn(v);
}

/* SinKD gradient with the plan P fixed (c = coef, q = p_s, t = p_t):
 *   h_iv  = sum_j P_ij dC(q_iv - t_jv),   dot_i = sum_v q_iv h_iv,
 *   ds_iv = c q_iv (h_iv - dot_i) / tau.
 * dot_i comes from n x n quantities, so every element is written in one
 * pass:
 *   squared L2: h_iv = 2 (rsum_i q_iv - (P T)_iv) with rsum_i = sum_j P_ij,
 *     dot_i = 2 rsum_i |q_i|^2 - 2 sum_j P_ij q_i.t_j
 *           = rsum_i |q_i|^2 - sum_j P_ij |t_j|^2 + sum_j P_ij C_ij
 *     (q_i.t_j = (|q_i|^2 + |t_j|^2 - C_ij) / 2 is the cost's own
 *     expansion); P T is a cuBLAS GEMM, chunk by chunk of the vocabulary;
 *   L1: dot_i = sum_j P_ij D_ij, D_ij = sum_v q_iv sign(q_iv - t_jv) (k_l1
 *     in its dot mode); h is accumulated by a tiled kernel that stages the
 *     teacher rows in shared memory and reuses each for 16 student rows.
 * One warp per row r = g n + i (P, C and D are [G, n, n] row-major, so row
 * r of any of them starts at r n). */
__global__ void __launch_bounds__(kBlock) k_sinkd_rowprep(const float *__restrict__ P, const float *__restrict__ CD,
                                                          const float *__restrict__ nx, const float *__restrict__ ny,
                                                          const int32_t *__restrict__ gvalid, int64_t N, int64_t n,
                                                          int metric, float *__restrict__ rsum,
                                                          float *__restrict__ dot)
{
    const int64_t r = (int64_t)blockIdx.x * (kBlock / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= N) return;
    const int64_t g = r / n;
    if (!gvalid[g]) {
        if (lane == 0) rsum[r] = dot[r] = 0.0f;
        return;
    }
    const float *Pi = P + r * n, *Ci = CD + r * n;
    const float *nyg = metric == KDL_OT_METRIC_L1 ? nullptr : ny + g * n;
    float s = 0.0f, t = 0.0f;
    for (int64_t j = lane; j < n; j += 32) {
        const float p = Pi[j];
        s += p;
        t = fmaf(p, nyg ? Ci[j] - nyg[j] : Ci[j], t);
    }
    s = warp_sum(s);
    t = warp_sum(t);
    if (lane == 0) {
        rsum[r] = s;
        dot[r] = nyg ? fmaf(s, nx[r], t) : t;
    }
}

/* Squared L2, one vocabulary chunk [v0, v0 + vc): H holds (P T) of the
 * chunk, row r at H + r ldh.  Rows by blockIdx.y (grid-stride). */
template <int GT>
__global__ void __launch_bounds__(kBlock) k_sinkd_grad_sq(const float *__restrict__ ps, const float *__restrict__ H,
                                                          const float *__restrict__ rsum,
                                                          const float *__restrict__ dot,
                                                          const int32_t *__restrict__ gvalid,
                                                          const float *__restrict__ coefp, int64_t N, int64_t n,
                                                          int64_t V, int64_t v0, int64_t vc, int64_t ldh,
                                                          float inv_tau, void *grad, int64_t ld)
{
    const int64_t col = (int64_t)blockIdx.x * kBlock + threadIdx.x;
    if (col >= vc) return;
    const float coef = *coefp;
    for (int64_t r = blockIdx.y; r < N; r += gridDim.y) {
        const int64_t v = v0 + col;
        if (!gvalid[r / n]) {
            store_grad<GT>(grad, r * ld + v, 0.0f);
            continue;
        }
        const float q = ps[r * V + v];
        const float h = 2.0f * (rsum[r] * q - H[r * ldh + col]);
        store_grad<GT>(grad, r * ld + v, coef * q * (h - dot[r]) * inv_tau);
    }
}

/* L1: a CTA per (16 student rows of one group) x (128 vocabulary columns);
 * thread (rsub, col) owns rows rsub, rsub + 2, ..., rsub + 14 at column col.
 * Teacher rows are staged 16 at a time, with the matching 16 x 16 block of
 * P; h accumulates over j in index order (deterministic). */
constexpr int kGR = 16, kGV = 128, kGJ = 16, kGK = kGR / (kBlock / kGV);
static_assert(kGR * kGJ == kBlock && kBlock % kGV == 0 && kGR % (kBlock / kGV) == 0, "SinKD L1 gradient tiling");

template <int GT>
__global__ void __launch_bounds__(kBlock) k_sinkd_grad_l1(const float *__restrict__ ps, const float *__restrict__ pt,
                                                          const float *__restrict__ P, const float *__restrict__ dot,
                                                          const int32_t *__restrict__ gvalid,
                                                          const float *__restrict__ coefp, int64_t n, int64_t V,
                                                          int64_t rt_per_group, int64_t vtiles, int64_t total,
                                                          float inv_tau, void *grad, int64_t ld)
{
    __shared__ float ts[kGJ][kGV];
    __shared__ float pp[kGR][kGJ + 1];
    const int col = threadIdx.x % kGV, rsub = threadIdx.x / kGV;
    const float coef = *coefp;
    for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
        const int64_t vt = tile % vtiles, rt = tile / vtiles;
        const int64_t g = rt / rt_per_group, i0 = (rt % rt_per_group) * kGR;
        const int64_t v = vt * kGV + col;
        if (!gvalid[g]) { /* the same for the whole CTA */
#pragma unroll
            for (int k = 0; k < kGK; k++) {
                const int64_t i = i0 + rsub + 2 * k;
                if (i < n && v < V) store_grad<GT>(grad, (g * n + i) * ld + v, 0.0f);
            }
            continue;
        }
        float q[kGK], h[kGK];
#pragma unroll
        for (int k = 0; k < kGK; k++) {
            const int64_t i = i0 + rsub + 2 * k;
            q[k] = (i < n && v < V) ? ps[(g * n + i) * V + v] : 0.0f;
            h[k] = 0.0f;
        }
        const float *T = pt + g * n * V;
        for (int64_t j0 = 0; j0 < n; j0 += kGJ) {
            for (int e = threadIdx.x; e < kGJ * kGV; e += kBlock) {
                const int jj = e / kGV, cc = e % kGV;
                const int64_t j = j0 + jj, vv = vt * kGV + cc;
                ts[jj][cc] = (j < n && vv < V) ? T[j * V + vv] : 0.0f;
            }
            {
                const int rr = threadIdx.x / kGJ, jj = threadIdx.x % kGJ; /* 256 = 16 x 16 */
                const int64_t i = i0 + rr, j = j0 + jj;
                pp[rr][jj] = (i < n && j < n) ? P[(g * n + i) * n + j] : 0.0f;
            }
            __syncthreads();
            const int jn = n - j0 < kGJ ? (int)(n - j0) : kGJ;
            for (int jj = 0; jj < jn; jj++) {
                const float t = ts[jj][col];
#pragma unroll
                for (int k = 0; k < kGK; k++) {
                    const float u = q[k] - t;
                    h[k] = fmaf(pp[rsub + 2 * k][jj], (float)((u > 0.0f) - (u < 0.0f)), h[k]);
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int k = 0; k < kGK; k++) {
            const int64_t i = i0 + rsub + 2 * k;
            if (i < n && v < V) {
                const int64_t r = g * n + i;
                store_grad<GT>(grad, r * ld + v, coef * q[k] * (h[k] - dot[r]) * inv_tau);
            }
        }
    }
}

/* A host-to-device copy carried in a kernel parameter (16 KiB per
 * launch): stream capture records a kernel's parameters by value, while a
 * captured cudaMemcpyAsync from host memory reads the host address when
 * the graph is launched, and the staging buffer is freed on return. */
constexpr int kUploadBytes = 16384;
struct UploadChunk {
    unsigned char b[kUploadBytes];
};

__global__ void __launch_bounds__(kBlock) k_upload(unsigned char *__restrict__ dst, unsigned n,
                                                   const __grid_constant__ UploadChunk c)
{
    for (unsigned k = blockIdx.x * kBlock + threadIdx.x; k < n; k += gridDim.x * kBlock) dst[k] = c.b[k];
}

int grid_for(int64_t total)
{
    int64_t b = (total + kBlock - 1) / kBlock;
    if (b > 65536) b = 65536;
    return (int)(b > 0 ? b : 1);
}

} // namespace

/* ================================================================ launchers */
extern "C" cudaError_t kdl_otk_upload(void *dst, const void *src, size_t bytes, cudaStream_t stream)
{
    if (bytes == 0) return cudaSuccess;
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    cudaError_t e = cudaStreamIsCapturing(stream, &cap);
    if (e != cudaSuccess) return e;
    if (cap == cudaStreamCaptureStatusNone) return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream);
    static thread_local UploadChunk c; /* 16 KiB: not on the caller's stack */
    for (size_t off = 0; off < bytes; off += kUploadBytes) {
        const unsigned n = (unsigned)(bytes - off < (size_t)kUploadBytes ? bytes - off : (size_t)kUploadBytes);
        memcpy(c.b, (const unsigned char *)src + off, n);
        unsigned char *to = (unsigned char *)dst + off;
        unsigned count = n;
        void *args[] = {&to, &count, &c}; /* c by address: no 16 KiB copy on the stack */
        e = kdl::launch_ex_args((const void *)k_upload, (n + kBlock - 1) / kBlock, kBlock, 0, stream, args);
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}

extern "C" cudaError_t kdl_otk_sqnorms(const float *X, int64_t rows, int64_t d, float *out, cudaStream_t stream)
{
    if (rows <= 0) return cudaSuccess;
    const int64_t blocks = (rows + kBlock / 32 - 1) / (kBlock / 32);
    return kdl::launch_ex(k_sqnorms, (unsigned)blocks, kBlock, 0, stream, X, rows, d, out);
}

extern "C" cudaError_t kdl_otk_sq_fixup(const kdl_otk_job_t *jobs, const kdl_otk_tile_t *tiles, int64_t ntiles,
                                        cudaStream_t stream)
{
    if (ntiles <= 0) return cudaSuccess;
    return kdl::launch_ex(k_sq_fixup, (unsigned)ntiles, kBlock, 0, stream, jobs, tiles);
}

extern "C" cudaError_t kdl_otk_l1(const kdl_otk_job_t *jobs, const kdl_otk_tile_t *tiles, int64_t ntiles, int64_t d,
                                  int dsplit, float *partial, int64_t total, float *dot_out, cudaStream_t stream)
{
    if (ntiles <= 0) return cudaSuccess;
    const dim3 grid((unsigned)ntiles, (unsigned)dsplit);
    if (dot_out) return kdl::launch_ex(k_l1<true>, grid, kBlock, 0, stream, jobs, tiles, d, dsplit, partial, total, dot_out);
    return kdl::launch_ex(k_l1<false>, grid, kBlock, 0, stream, jobs, tiles, d, dsplit, partial, total, nullptr);
}

extern "C" cudaError_t kdl_otk_l1_reduce(const float *partial, int dsplit, int64_t total, float *packed,
                                         cudaStream_t stream)
{
    if (total <= 0) return cudaSuccess;
    return kdl::launch_ex(k_l1_reduce, grid_for(total), kBlock, 0, stream, partial, dsplit, total, packed);
}

#ifdef KDL_OTK_GRAPH_LOOP
/* One kernel node of the loop body, after `dep` (NULL: the first). */
static cudaError_t body_kernel(cudaGraph_t body, cudaGraphNode_t *node, cudaGraphNode_t dep, const void *fn,
                               unsigned grid, void **args)
{
    cudaKernelNodeParams kp;
    memset(&kp, 0, sizeof kp);
    kp.func = (void *)fn;
    kp.gridDim = dim3(grid);
    kp.blockDim = dim3(kBlock);
    kp.kernelParams = args;
    return cudaGraphAddKernelNode(node, body, dep ? &dep : nullptr, dep ? 1 : 0, &kp);
}

/* The iterations 1..max_iter as a graph with a "while" node, launched on
 * the stream; the loop stops on the device (k_loop_ctrl).  The graph is
 * built and instantiated per call and released at once (an in-flight
 * executable graph is freed when it completes).  cudaErrorNotSupported:
 * not possible here (the stream is being captured, or the driver has no
 * conditional nodes): the caller enqueues the iterations instead. */
static cudaError_t graph_loop(const kdl_otk_solve_t *S)
{
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(S->stream, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone)
        return cudaErrorNotSupported;
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    cudaError_t e = cudaGraphCreate(&graph, 0);
    if (e != cudaSuccess) return cudaErrorNotSupported;
    do {
        cudaGraphConditionalHandle cond;
        e = cudaGraphConditionalHandleCreate(&cond, graph, 1u, cudaGraphCondAssignDefault);
        if (e != cudaSuccess) break;
        /* the struct's union has members with constructors: zeroed storage */
        alignas(cudaGraphNodeParams) unsigned char cp_mem[sizeof(cudaGraphNodeParams)];
        memset(cp_mem, 0, sizeof cp_mem);
        cudaGraphNodeParams &cp = *reinterpret_cast<cudaGraphNodeParams *>(cp_mem);
        cp.type = cudaGraphNodeTypeConditional;
        cp.conditional.handle = cond;
        cp.conditional.type = cudaGraphCondTypeWhile;
        cp.conditional.size = 1;
        cudaGraphNode_t loop;
#if CUDART_VERSION >= 13000
        e = cudaGraphAddNode(&loop, graph, nullptr, nullptr, 0, &cp);
#else
        e = cudaGraphAddNode(&loop, graph, nullptr, 0, &cp);
#endif
        if (e != cudaSuccess) break;
        cudaGraph_t body = cp.conditional.phGraph_out[0];
        const kdl_otk_prob_t *probs = S->probs;
        kdl_otk_state_t *state = S->state;
        const kdl_otk_tile_t *rt = S->rtiles, *ct = S->ctiles;
        const int64_t *itp_c = S->iter_dev;
        int64_t *itp = S->iter_dev;
        int64_t it0 = 0, nprob = S->nprob, max_iter = S->prm.max_iter;
        int zero = 0, fsel = 0;
        kdl_otk_params_t prm = S->prm;
        void *a_f[] = {&probs, &state, &rt, &it0, &itp_c, &zero, &prm};
        void *a_c[] = {&probs, &state, &it0, &itp_c, &zero, &prm};
        void *a_g[] = {&probs, &state, &ct, &it0, &itp_c, &fsel, &zero};
        void *a_l[] = {&state, &nprob, &itp, &max_iter, &cond};
        cudaGraphNode_t nf, nc, ng, nl;
        if ((e = body_kernel(body, &nf, nullptr, (const void *)k_f_update, (unsigned)S->nrtiles, a_f)) != cudaSuccess ||
            (e = body_kernel(body, &nc, nf, (const void *)k_check, (unsigned)S->nprob, a_c)) != cudaSuccess ||
            (e = body_kernel(body, &ng, nc, (const void *)k_g_update, (unsigned)S->nctiles, a_g)) != cudaSuccess ||
            (e = body_kernel(body, &nl, ng, (const void *)k_loop_ctrl, 1u, a_l)) != cudaSuccess)
            break;
        e = cudaGraphInstantiate(&exec, graph, 0);
        if (e != cudaSuccess) {
            exec = nullptr;
            break;
        }
        e = kdl::launch_ex(k_loop_init, 1, 1, 0, S->stream, itp);
        if (e == cudaSuccess) e = cudaGraphLaunch(exec, S->stream);
        if (e != cudaSuccess) {
            /* the launch itself failed: a real error, reported as such */
            cudaGraphExecDestroy(exec);
            cudaGraphDestroy(graph);
            return e;
        }
    } while (0);
    if (exec) cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* building failed: not sticky, fall back */
        return cudaErrorNotSupported;
    }
    return cudaSuccess;
}
#endif

extern "C" cudaError_t kdl_otk_run_solver(const kdl_otk_solve_t *S)
{
    if (S->nprob <= 0) return cudaSuccess;
    cudaStream_t st = S->stream;
    const unsigned nr = (unsigned)S->nrtiles, nc = (unsigned)S->nctiles, np = (unsigned)S->nprob;
    const kdl_otk_params_t prm = S->prm;
    cudaError_t e;
#define KDL_OTK_TRY(call)                                                                                    \
    do {                                                                                                     \
        if ((e = (call)) != cudaSuccess) return e;                                                           \
    } while (0)
    KDL_OTK_TRY(kdl::launch_ex(k_scan, nr, kBlock, 0, st, S->probs, S->rtiles));
    KDL_OTK_TRY(kdl::launch_ex(k_prep, np, kBlock, 0, st, S->probs, S->state, prm));
    if (S->any_warm_f)
        KDL_OTK_TRY(kdl::launch_ex(k_g_update, nc, kBlock, 0, st, S->probs, S->state, S->ctiles, 1, nullptr, 1, 1));
    /* With eps-scaling the first checked iteration depends on each problem's
     * diameter: test after every iteration (k_check returns at once when
     * nothing is due).  Without it, only every check_every iterations. */
    const int check_each = prm.eps_scaling && prm.tol > 0;
    bool looped = false;
#ifdef KDL_OTK_GRAPH_LOOP
    /* With a tolerance, the loop runs on the device so that it ends when
     * the last problem converges: no max_iter launches queued behind it. */
    if (prm.tol > 0 && prm.max_iter >= 1 && S->iter_dev && S->use_graph) {
        e = graph_loop(S);
        if (e == cudaSuccess)
            looped = true;
        else if (e != cudaErrorNotSupported)
            return e;
    }
#endif
    for (int64_t it = 1; !looped && it <= prm.max_iter; it++) {
        KDL_OTK_TRY(kdl::launch_ex(k_f_update, nr, kBlock, 0, st, S->probs, S->state, S->rtiles, it, nullptr, 0, prm));
        const int64_t prev = it - 1;
        if (prm.tol > 0 && prev >= 1 && (check_each || prev % prm.check_every == 0))
            KDL_OTK_TRY(kdl::launch_ex(k_check, np, kBlock, 0, st, S->probs, S->state, it, nullptr, 0, prm));
        KDL_OTK_TRY(
            kdl::launch_ex(k_g_update, nc, kBlock, 0, st, S->probs, S->state, S->ctiles, it, nullptr, (int)(it & 1), 0));
    }
    /* the final iterate's marginal error (and done for everyone left) */
    KDL_OTK_TRY(
        kdl::launch_ex(k_f_update, nr, kBlock, 0, st, S->probs, S->state, S->rtiles, prm.max_iter + 1, nullptr, 1, prm));
    KDL_OTK_TRY(kdl::launch_ex(k_check, np, kBlock, 0, st, S->probs, S->state, prm.max_iter + 1, nullptr, 1, prm));
    KDL_OTK_TRY(kdl::launch_ex(k_finish, nr, kBlock, 0, st, S->probs, S->state, S->rtiles, (float)prm.eps));
    return kdl::launch_ex(k_final_err, np, kBlock, 0, st, S->probs, S->state);
#undef KDL_OTK_TRY
}

extern "C" cudaError_t kdl_otk_grad_x(const kdl_otk_prob_t *probs, const kdl_otk_state_t *state,
                                      const kdl_otk_tile_t *rtiles, int64_t t0, int64_t nt, int64_t d, int metric,
                                      double eps, cudaStream_t stream)
{
    if (nt <= 0) return cudaSuccess;
    const unsigned gy = (unsigned)((d + 127) / 128);
    return kdl::launch_ex(k_grad_x, dim3((unsigned)nt, gy), 128, 0, stream, probs, state, rtiles, t0, d, metric,
                          (float)eps);
}

extern "C" cudaError_t kdl_otk_sinkhorn_combine(const kdl_otk_combine_t *L)
{
    if (L->batch <= 0) return cudaSuccess;
    return kdl::launch_ex(k_combine, (unsigned)L->batch, kBlock, 0, L->stream, *L);
}

extern "C" cudaError_t kdl_otk_softmax_rows(const void *x, int dtype, int64_t ld, int64_t N, int64_t V, double tau,
                                            float *probs, int32_t *bad, cudaStream_t stream)
{
    if (N <= 0) return cudaSuccess;
    const float k2 = (float)(1.4426950408889634 / tau);
    switch (dtype) {
    case 0: return kdl::launch_ex(k_softmax<0>, (unsigned)N, kBlock, 0, stream, x, ld, V, k2, probs, bad);
    case 1: return kdl::launch_ex(k_softmax<1>, (unsigned)N, kBlock, 0, stream, x, ld, V, k2, probs, bad);
    default: return kdl::launch_ex(k_softmax<2>, (unsigned)N, kBlock, 0, stream, x, ld, V, k2, probs, bad);
    }
}

extern "C" cudaError_t kdl_otk_sinkd_epilogue(const kdl_otk_sinkd_epi_t *L)
{
    int32_t *gvalid = L->gvalid;
    const cudaError_t e = kdl::launch_ex(k_sinkd_groups, 1, kBlock, 0, L->stream, *L, gvalid);
    if (e != cudaSuccess) return e;
    const int64_t nn = L->n * L->n, total = L->groups * nn;
    if (L->plan && L->P)
        return kdl::launch_ex(k_sinkd_plan, grid_for(total), kBlock, 0, L->stream, L->P, gvalid, nn, total, L->plan,
                              L->out_f64);
    return cudaSuccess;
}

extern "C" cudaError_t kdl_otk_sinkd_rowprep(const kdl_otk_sinkd_grad_t *L)
{
    if (L->N <= 0) return cudaSuccess;
    const int64_t blocks = (L->N + kBlock / 32 - 1) / (kBlock / 32);
    return kdl::launch_ex(k_sinkd_rowprep, (unsigned)blocks, kBlock, 0, L->stream, L->P, L->CD, L->nx, L->ny, L->gvalid,
                          L->N, L->n, L->metric, L->rsum, L->dot);
}

extern "C" cudaError_t kdl_otk_sinkd_grad_sq(const kdl_otk_sinkd_grad_t *L, const float *H, int64_t v0, int64_t vc,
                                             int64_t ldh)
{
    if (L->N <= 0 || vc <= 0) return cudaSuccess;
    const dim3 grid((unsigned)((vc + kBlock - 1) / kBlock), (unsigned)(L->N < 65535 ? L->N : 65535));
    const float inv_tau = (float)(1.0 / L->tau);
#define KDL_SQ_ARGS                                                                                  \
    L->ps, H, L->rsum, L->dot, L->gvalid, L->coef, L->N, L->n, L->V, v0, vc, ldh, inv_tau, L->grad, \
        L->ld_grad
    cudaError_t e;
    switch (L->grad_dtype) {
    case 0: e = kdl::launch_ex(k_sinkd_grad_sq<0>, grid, kBlock, 0, L->stream, KDL_SQ_ARGS); break;
    case 1: e = kdl::launch_ex(k_sinkd_grad_sq<1>, grid, kBlock, 0, L->stream, KDL_SQ_ARGS); break;
    default: e = kdl::launch_ex(k_sinkd_grad_sq<2>, grid, kBlock, 0, L->stream, KDL_SQ_ARGS); break;
    }
#undef KDL_SQ_ARGS
    return e;
}

extern "C" cudaError_t kdl_otk_sinkd_grad_l1(const kdl_otk_sinkd_grad_t *L)
{
    if (L->N <= 0) return cudaSuccess;
    const int64_t rt = (L->n + kGR - 1) / kGR, vt = (L->V + kGV - 1) / kGV;
    const int64_t total = (L->N / L->n) * rt * vt;
    const unsigned blocks = (unsigned)(total < (int64_t)INT32_MAX ? total : (int64_t)INT32_MAX);
    const float inv_tau = (float)(1.0 / L->tau);
#define KDL_L1_ARGS                                                                                      \
    L->ps, L->pt, L->P, L->dot, L->gvalid, L->coef, L->n, L->V, rt, vt, total, inv_tau, L->grad, L->ld_grad
    cudaError_t e;
    switch (L->grad_dtype) {
    case 0: e = kdl::launch_ex(k_sinkd_grad_l1<0>, blocks, kBlock, 0, L->stream, KDL_L1_ARGS); break;
    case 1: e = kdl::launch_ex(k_sinkd_grad_l1<1>, blocks, kBlock, 0, L->stream, KDL_L1_ARGS); break;
    default: e = kdl::launch_ex(k_sinkd_grad_l1<2>, blocks, kBlock, 0, L->stream, KDL_L1_ARGS); break;
    }
#undef KDL_L1_ARGS
    return e;
}
