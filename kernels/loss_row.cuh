/*
 * kernels/loss_row.cuh - the fused row kernel of the distillation loss,
 * templated on the student and teacher dtypes (instantiated in
 * kernels/loss_rows_{f32,f16,bf16}.cu, launched by kernels/loss.cu).
 *
 * One CTA, or one cluster of C CTAs, per row; CTA (row, rank) owns the
 * contiguous slice [rank*chunks_per*8, (rank+1)*chunks_per*8) of the row.
 * Every pass gives thread tid the chunks tid, tid + 512, ... of the slice.
 *
 *   pass 1  read the slice (16-byte vectors when aligned), stage it in
 *           dynamic shared memory (staged paths), online max m of the raw
 *           logits and sum of 2^((v - m) log2(e)/tau) (exp2 of prescaled
 *           differences) for student and teacher, NaN / +inf check; CUB
 *           block reduce, then a cluster allreduce through distributed
 *           shared memory, combined in rank order.  Later passes use
 *           log q = (s - m)/tau - LSE, the reference's form (tau -> 0 is the
 *           arg-max limit, never inf - inf).
 *   pass 2  (AKL, or head statistics wanted) radix select of the head
 *           boundary over teacher-logit keys, 8 bits a round, count and
 *           fixed-point mass histograms in shared memory (integer atomics),
 *           summed over the cluster (kernels/radix_select.h).
 *   pass 3  element terms (kdloss/detail/elem.h, float): loss, G = sum of
 *           qg, KL(p||q), KL(q||p), head/tail gaps |p - q| (boundary ties
 *           ordered by index through a CUB block scan).
 *   pass 4  dz = qg - q G (kdl_elem_dz_f); stored (g dz)/tau, g = scale
 *           (/counted rows, MEAN), exact zeros kept (as kdl_scaled_grad),
 *           in the gradient dtype.  MEAN with invalid rows: a second
 *           launch (redo) rewrites the valid rows' gradient with
 *           g = scale/valid rows, so it is rounded once.
 * Rank 0 writes the row's loss (per-token, or into the workspace for the
 * reduction) and statistics; an invalid row bumps an integer counter.  No
 * float atomics: results are bitwise identical run to run.
 */
#ifndef KDLOSS_KERNELS_LOSS_ROW_CUH
#define KDLOSS_KERNELS_LOSS_ROW_CUH

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/warp/warp_scan.cuh>

#include "kdloss/detail/elem.h"
#include "kdloss/kdloss_types.h"
#include "loss_common.cuh"
#include "radix_select.h"

namespace kdl {

constexpr int kBlock = 512;   /* threads per CTA                       */
constexpr int kMinBlocks = 1; /* launch bound: <= 128 registers/thread */

/* Everything the row kernel reads, by value. */
struct LossParams {
    const void *s, *t;
    int64_t lds, ldt;
    const int64_t *labels;
    int64_t ignore_index;
    void *grad; /* NULL: no gradient */
    int64_t ldg;
    int grad_dt;
    int vec_g;
    int out_dt;
    void *loss;
    void *st_fkl, *st_rkl, *st_gh, *st_gt, *st_wh, *st_wt;
    int64_t *st_hs;
    float *row_loss;          /* workspace: per-row loss (0: not in the reduction) */
    unsigned long long *hdr;  /* workspace: [0] rows counted, [1] invalid rows     */
    int div, rule, reduction;
    float inv_tau, k2, coef; /* 1/tau, log2(e)/tau (both clamped to FLT_MAX), JSD beta or SKL/SRKL alpha */
    float log_c, log_1mc;    /* log(coef) (-inf at 0), log(1 - coef): as kdl_elem_params_make_f */
    double scale, tau;
    unsigned long long K, mu_fx;
    int64_t row0;   /* first row of this launch                               */
    int64_t row_end; /* one past its last row                                */
    int64_t row_step; /* clusters in the grid: cluster k has rows row0 + k, + row_step, ... */
    int redo;       /* gradient pass of MEAN with invalid rows (see the kernel) */
    int V;
    int chunks_per; /* chunks in each CTA's slice                             */
    int cluster;    /* CTAs per row                                           */
    int vec_s, vec_t;
    int staged;     /* row slice copied to dynamic shared memory in pass 1  */
    int need_head, need_kl;
    uint32_t key_mask;
    int rounds;
};

struct Stats1 {
    float ms, ss, mt, st; /* (max logit, sum of 2^((v - max) log2(e)/tau)) of student and teacher */
    int bad;              /* NaN or +inf seen                             */
};
struct Stats1Op {
    float k2;
    __device__ __forceinline__ Stats1 operator()(const Stats1 &a, const Stats1 &b) const
    {
        Stats1 r = a;
        lse2_merge(r.ms, r.ss, b.ms, b.ss, k2);
        lse2_merge(r.mt, r.st, b.mt, b.st, k2);
        r.bad = a.bad | b.bad;
        return r;
    }
};

struct Terms {
    float loss, G;   /* divergence (not AKL): sum of terms, sum of qg */
    float fkl, rkl;  /* KL(p||q), KL(q||p)                            */
    float Gf, Gr;    /* sums of qg of FKL and RKL (AKL's G)           */
    float gh, gt;    /* head and tail gaps                            */
};
struct TermsOp {
    __device__ __forceinline__ Terms operator()(const Terms &a, const Terms &b) const
    {
        Terms r;
        r.loss = a.loss + b.loss;
        r.G = a.G + b.G;
        r.fkl = a.fkl + b.fkl;
        r.rkl = a.rkl + b.rkl;
        r.Gf = a.Gf + b.Gf;
        r.Gr = a.Gr + b.Gr;
        r.gh = a.gh + b.gh;
        r.gt = a.gt + b.gt;
        return r;
    }
};

struct Pick {
    int found, bin;
    unsigned long long before_cnt, before_mass;
};

using BlockReduce1 = cub::BlockReduce<Stats1, kBlock>;
using BlockReduce3 = cub::BlockReduce<Terms, kBlock>;
using BlockScanI = cub::BlockScan<int, kBlock>;
using WarpScanU64 = cub::WarpScan<unsigned long long>;

struct SharedState {
    union {
        typename BlockReduce1::TempStorage r1;
        typename BlockReduce3::TempStorage r3;
        typename BlockScanI::TempStorage scan;
        typename WarpScanU64::TempStorage wscan[2];
    } cub;
    /* this CTA's radix histograms, double-buffered by round (peers read them) */
    unsigned int hcnt[2][KDL_RS_BINS];
    unsigned long long hmass[2][KDL_RS_BINS];
    /* the row's histograms (sum over the cluster) */
    unsigned int gcnt[KDL_RS_BINS];
    unsigned long long gmass[KDL_RS_BINS];
    Stats1 x1, b1; /* exchange slot (peers read) and broadcast, pass 1 */
    Terms x3, b3;  /* same, pass 3                                     */
    Pick pick;
    kdl_rs_result sel;
    unsigned long long tie_base; /* ties of the boundary key in lower ranks */
};

/* The CTA's view of its slice: global row (at the slice start) and, on the
 * staged paths, the copy in dynamic shared memory.  Staged or not is a
 * run-time flag (uniform branch per chunk): one kernel per dtype pair. */
template <class ST, class TT> struct RowView {
    const typename ST::R *gs;
    const typename TT::R *gt;
    uint4 *ss, *st; /* staged slices, 16-byte aligned, padded to whole chunks */
    int n, nch;     /* elements and chunks in the slice */
    bool vs, vt;    /* global vector loads allowed */
    bool staged;

    __device__ __forceinline__ int width(int c) const { return min(kChunk, n - c * kChunk); }

    /* Raw chunk c of the slice (elements past n: zero bits, masked by chunk_val). */
    __device__ __forceinline__ void load_s(int c, Chunk<ST> &ch) const
    {
        if (staged) {
#pragma unroll
            for (int i = 0; i < Chunk<ST>::kVec; ++i) ch.u[i] = ss[c * Chunk<ST>::kVec + i];
        } else {
            chunk_load_global<ST, false>(ch, gs + (int64_t)c * kChunk, width(c), vs);
        }
    }
    __device__ __forceinline__ void load_t(int c, Chunk<TT> &ch) const
    {
        if (staged) {
#pragma unroll
            for (int i = 0; i < Chunk<TT>::kVec; ++i) ch.u[i] = st[c * Chunk<TT>::kVec + i];
        } else {
            chunk_load_global<TT, false>(ch, gt + (int64_t)c * kChunk, width(c), vt);
        }
    }
    /* Half `part` of chunk c (see chunk_load_global_part): fewer live registers. */
    __device__ __forceinline__ void load_s_part(int c, int part, Chunk<ST> &ch) const
    {
        if (Chunk<ST>::kVec == 1 && part == 1) return;
        if (staged)
            ch.u[part] = ss[c * Chunk<ST>::kVec + part];
        else
            chunk_load_global_part<ST>(ch, gs + (int64_t)c * kChunk, width(c), vs, part);
    }
    __device__ __forceinline__ void load_t_part(int c, int part, Chunk<TT> &ch) const
    {
        if (Chunk<TT>::kVec == 1 && part == 1) return;
        if (staged)
            ch.u[part] = st[c * Chunk<TT>::kVec + part];
        else
            chunk_load_global_part<TT>(ch, gt + (int64_t)c * kChunk, width(c), vt, part);
    }
};

/* Element k of a raw chunk as float, -inf (absent) for k >= m.  Converted
 * where used: a 16-bit chunk stays 4 registers. */
template <class T> __device__ __forceinline__ float chunk_val(const Chunk<T> &ch, int k, int m)
{
    return k < m ? T::to_float(chunk_raw(ch, k)) : -INFINITY;
}

__device__ __forceinline__ unsigned long long mass_fx(float p)
{
    return __float2ull_rn(p * 4503599627370496.0f); /* p * 2^52, exact scaling */
}

/* Warp 0: one round's bin choice.  Lane l owns bins 255-8l down to 248-8l;
 * per-lane running sums, a warp exclusive scan, and the first bin (from the
 * top) whose inclusion reaches the boundary (kdl_rs_reached: monotone). */
__device__ __forceinline__ void pick_bin_warp(SharedState &sh, int rule, unsigned long long K,
                                              unsigned long long mu_fx, unsigned long long above_cnt,
                                              unsigned long long above_mass)
{
    const int lane = threadIdx.x & 31;
    unsigned long long lc[8], lm[8], cr = 0, mr = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int bin = KDL_RS_BINS - 1 - (lane * 8 + j);
        cr += sh.gcnt[bin];
        mr += sh.gmass[bin];
        lc[j] = cr;
        lm[j] = mr;
    }
    unsigned long long cex, mex;
    WarpScanU64(sh.cub.wscan[0]).ExclusiveSum(cr, cex);
    WarpScanU64(sh.cub.wscan[1]).ExclusiveSum(mr, mex);
    int jf = 8, bin_f = 0;
    unsigned long long bc = 0, bm = 0;
#pragma unroll
    for (int j = 7; j >= 0; --j) {
        const unsigned long long c = above_cnt + cex + lc[j], m = above_mass + mex + lm[j];
        if (kdl_rs_reached(rule, c, m, K, mu_fx)) {
            const int bin = KDL_RS_BINS - 1 - (lane * 8 + j);
            jf = j;
            bin_f = bin;
            bc = c - sh.gcnt[bin];
            bm = m - sh.gmass[bin];
        }
    }
    const unsigned bal = __ballot_sync(0xffffffffu, jf < 8);
    if (bal == 0) {
        if (lane == 0) sh.pick.found = 0;
    } else if (lane == __ffs(bal) - 1) {
        sh.pick.found = 1;
        sh.pick.bin = bin_f;
        sh.pick.before_cnt = bc;
        sh.pick.before_mass = bm;
    }
}

/* Pass 2: the head boundary of the row (result in sh.sel, sh.tie_base). */
template <class ST, class TT>
__device__ __forceinline__ void head_select(const RowView<ST, TT> &row, const LossParams &P,
                                            SharedState &sh, float max_t, float lse2_t, int C, int rank)
{
    const int tid = threadIdx.x;
    uint32_t prefix = 0;
    unsigned long long above_cnt = 0, above_mass = 0;
    for (int r = 0; r < P.rounds; ++r) {
        const int b = r & 1;
        for (int i = tid; i < KDL_RS_BINS; i += kBlock) {
            sh.hcnt[b][i] = 0u;
            sh.hmass[b][i] = 0ull;
        }
        __syncthreads();
        for (int c = tid; c < row.nch; c += kBlock) {
            Chunk<TT> ct;
            const int m = row.width(c);
            row.load_t(c, ct);
#pragma unroll
            for (int k = 0; k < kChunk; ++k) {
                if (k < m) {
                    const float v = chunk_val(ct, k, m);
                    const uint32_t key = kdl_rs_key(v, P.key_mask);
                    if (kdl_rs_candidate(key, prefix, r)) {
                        const int d = kdl_rs_digit(key, r);
                        atomicAdd(&sh.hcnt[b][d], 1u);
                        atomicAdd(&sh.hmass[b][d], mass_fx(exp2f(fmaf(v - max_t, P.k2, -lse2_t))));
                    }
                }
            }
        }
        row_barrier(C); /* every CTA's histogram complete and visible */
        for (int i = tid; i < KDL_RS_BINS; i += kBlock) {
            unsigned int cs = 0;
            unsigned long long ms = 0;
            for (int q = 0; q < C; ++q) {
                cs += peer_ptr(&sh.hcnt[b][0], q, C)[i];
                ms += peer_ptr(&sh.hmass[b][0], q, C)[i];
            }
            sh.gcnt[i] = cs;
            sh.gmass[i] = ms;
        }
        __syncthreads();
        if (tid < 32) pick_bin_warp(sh, P.rule, P.K, P.mu_fx, above_cnt, above_mass);
        __syncthreads();
        const Pick pk = sh.pick;
        if (!pk.found) { /* only in round 0: the row's mass never reaches mu */
            if (tid == 0) {
                kdl_rs_all_in((unsigned long long)P.V, &sh.sel);
                sh.tie_base = 0;
            }
            break;
        }
        prefix |= (uint32_t)pk.bin << (24 - 8 * r);
        above_cnt = pk.before_cnt;
        above_mass = pk.before_mass;
        if (r == P.rounds - 1 && tid == 0) {
            kdl_rs_resolve(P.rule, prefix, above_cnt, above_mass, sh.gcnt[pk.bin], sh.gmass[pk.bin], P.K,
                           P.mu_fx, &sh.sel);
            unsigned long long base = 0;
            for (int q = 0; q < rank; ++q) base += peer_ptr(&sh.hcnt[b][0], q, C)[pk.bin];
            sh.tie_base = base;
        }
    }
    __syncthreads();
}

/* Zeroes this CTA's slice of a gradient row (ignored and invalid rows). */
__device__ __forceinline__ void zero_grad_slice(void *g, int dt, int n, bool vec)
{
    const int nch = (n + kChunk - 1) / kChunk;
    const int gsz = dt == 0 ? 4 : 2;
    float z[kChunk];
#pragma unroll
    for (int k = 0; k < kChunk; ++k) z[k] = 0.f;
    for (int c = threadIdx.x; c < nch; c += kBlock)
        store_chunk(static_cast<char *>(g) + (int64_t)c * kChunk * gsz, dt, min(kChunk, n - c * kChunk), vec, z);
}

/* Row outputs, by one thread of the row.  state 0 valid, 1 ignored, 2 invalid. */
__device__ inline void write_row(const LossParams &P, int64_t row, int state, float loss, const Terms &t, float wh,
                          float wt, int64_t hs)
{
    double l = loss, fkl = t.fkl, rkl = t.rkl, gh = t.gh, gt = t.gt, w_h = wh, w_t = wt;
    if (state == 1) {
        l = fkl = rkl = gh = gt = w_h = w_t = 0.0;
        hs = 0;
    } else if (state == 2) {
        l = fkl = rkl = gh = gt = w_h = w_t = (double)NAN;
        hs = 0;
        atomicAdd(P.hdr + 1, 1ull);
    }
    if (P.reduction == KDL_REDUCTION_NONE)
        store_out(P.loss, P.out_dt, row, scaled_loss(P.scale, l));
    else
        P.row_loss[row] = state == 0 ? loss : 0.f;
    store_out(P.st_fkl, P.out_dt, row, fkl);
    store_out(P.st_rkl, P.out_dt, row, rkl);
    store_out(P.st_gh, P.out_dt, row, gh);
    store_out(P.st_gt, P.out_dt, row, gt);
    store_out(P.st_wh, P.out_dt, row, w_h);
    store_out(P.st_wt, P.out_dt, row, w_t);
    if (P.st_hs) P.st_hs[row] = hs;
}

/* Pass 1 over the slice: (staged) copy to shared memory, online log2-domain
 * max / sum of the student and the teacher, NaN / +inf seen.  Staged (one
 * CTA per SM may hold a big row): read-once cache hint, and two chunks per
 * thread in flight when both inputs are 16-bit, so that every dtype pair
 * keeps 32 to 64 bytes per thread in flight; unstaged: one chunk (more CTAs
 * per SM, fewer registers). */
template <class ST, class TT, bool STAGED>
__device__ __forceinline__ Stats1 pass1(const RowView<ST, TT> &rv, float k2)
{
    const int tid = threadIdx.x;
    Stats1 my = {-INFINITY, 0.f, -INFINITY, 0.f, 0};
    constexpr int kFlight = (STAGED && ST::kBytes + TT::kBytes <= 4) ? 2 : 1;
    for (int c0 = tid; c0 < rv.nch; c0 += kFlight * kBlock) {
        const int c1 = c0 + kBlock;
        const int m0 = rv.width(c0);
        const int m1 = (kFlight > 1 && c1 < rv.nch) ? rv.width(c1) : 0;
        Chunk<ST> s0, s1;
        Chunk<TT> t0, t1;
        chunk_load_global<ST, STAGED>(s0, rv.gs + (int64_t)c0 * kChunk, m0, rv.vs);
        chunk_load_global<TT, STAGED>(t0, rv.gt + (int64_t)c0 * kChunk, m0, rv.vt);
        if (m1 > 0) {
            chunk_load_global<ST, STAGED>(s1, rv.gs + (int64_t)c1 * kChunk, m1, rv.vs);
            chunk_load_global<TT, STAGED>(t1, rv.gt + (int64_t)c1 * kChunk, m1, rv.vt);
        }
        if constexpr (STAGED) {
#pragma unroll
            for (int i = 0; i < Chunk<ST>::kVec; ++i) rv.ss[c0 * Chunk<ST>::kVec + i] = s0.u[i];
#pragma unroll
            for (int i = 0; i < Chunk<TT>::kVec; ++i) rv.st[c0 * Chunk<TT>::kVec + i] = t0.u[i];
            if (m1 > 0) {
#pragma unroll
                for (int i = 0; i < Chunk<ST>::kVec; ++i) rv.ss[c1 * Chunk<ST>::kVec + i] = s1.u[i];
#pragma unroll
                for (int i = 0; i < Chunk<TT>::kVec; ++i) rv.st[c1 * Chunk<TT>::kVec + i] = t1.u[i];
            }
        }
        float v[kChunk];
        chunk_to_float(s0, m0, v);
        lse2_chunk(my.ms, my.ss, my.bad, v, k2);
        chunk_to_float(t0, m0, v);
        lse2_chunk(my.mt, my.st, my.bad, v, k2);
        if (m1 > 0) {
            chunk_to_float(s1, m1, v);
            lse2_chunk(my.ms, my.ss, my.bad, v, k2);
            chunk_to_float(t1, m1, v);
            lse2_chunk(my.mt, my.st, my.bad, v, k2);
        }
    }
    return my;
}

/* The fused row kernel.  Grid: clusters of C CTAs (C = 1: single CTAs);
 * cluster k handles rows row0 + k, row0 + k + (clusters in the grid), ...
 * below row_end (the main launch has one cluster per row, so one row each).
 * CTA (row, rank) owns elements [rank*chunks_per*8, (rank+1)*chunks_per*8).
 *
 * redo: MEAN with a gradient launches the kernel a second time, over all
 * rows with a small grid.  When the first launch found no invalid row
 * (hdr[1] == 0) every CTA leaves at once.  Otherwise it recomputes the
 * valid rows exactly as the first launch did (same plan, same bits) and
 * rewrites their gradient with g = scale/valid (valid = hdr[0] - hdr[1]),
 * rounded once to the gradient dtype; it writes nothing else. */
template <class ST, class TT>
__global__ void __launch_bounds__(kBlock, kMinBlocks) loss_row_kernel(const LossParams P)
{
    extern __shared__ uint4 kdl_dyn_smem[];
    __shared__ SharedState sh;

    const int tid = threadIdx.x;
    const int C = P.cluster;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    /* Built for an architecture without clusters (e.g. PTX below compute_90
     * JIT-compiled on Hopper): row_barrier / peer_ptr / cluster_rank fall
     * back to the single-CTA forms, so a cluster launch would silently give
     * every CTA rank 0 and no DSMEM.  Fail loudly instead. */
    if (C > 1) __trap();
#endif
    /* the same value in every CTA (written by the previous launch) */
    if (P.redo && P.hdr[1] == 0) return;
    const int rank = cluster_rank(C);
    for (int64_t row = P.row0 + (int64_t)(blockIdx.x / (unsigned)C); row < P.row_end;
         row += P.row_step) {
        const int64_t lo = (int64_t)rank * P.chunks_per * kChunk;
        const int n = (int)max((int64_t)0, min((int64_t)P.V - lo, (int64_t)P.chunks_per * kChunk));

        RowView<ST, TT> rv;
        rv.gs = static_cast<const typename ST::R *>(P.s) + row * P.lds + lo;
        rv.gt = static_cast<const typename TT::R *>(P.t) + row * P.ldt + lo;
        rv.ss = kdl_dyn_smem;
        rv.st = kdl_dyn_smem + (int64_t)P.chunks_per * Chunk<ST>::kVec;
        rv.n = n;
        rv.nch = (n + kChunk - 1) / kChunk;
        rv.vs = P.vec_s;
        rv.vt = P.vec_t;
        rv.staged = P.staged != 0;
        const int gsz = P.grad_dt == 0 ? 4 : 2;
        void *grow = P.grad ? static_cast<char *>(P.grad) + (row * P.ldg + lo) * gsz : nullptr;

        Terms zero_t = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};

        /* ignored rows: nothing shared, so CTAs may go on independently (their
         * peers skip the row too); the redo launch leaves them as written */
        if (P.labels && __ldg(P.labels + row) == P.ignore_index) {
            if (P.redo) continue;
            if (grow) zero_grad_slice(grow, P.grad_dt, n, P.vec_g);
            if (rank == 0 && tid == 0) write_row(P, row, 1, 0.f, zero_t, 0.f, 0.f, 0);
            continue;
        }

        /* ---- pass 1: stage, online max / sum of 2^x, validity ---- */
        const Stats1 my = rv.staged ? pass1<ST, TT, true>(rv, P.k2) : pass1<ST, TT, false>(rv, P.k2);
        const Stats1Op op1 = {P.k2};
        const Stats1 blk1 = BlockReduce1(sh.cub.r1).Reduce(my, op1);
        const Stats1 all1 = row_allreduce(blk1, &sh.x1, &sh.b1, op1, C);
        const bool invalid = all1.bad || all1.ms == -INFINITY || all1.mt == -INFINITY;

        if (invalid) {
            if (!P.redo) {
                if (grow) zero_grad_slice(grow, P.grad_dt, n, P.vec_g);
                if (rank == 0 && tid == 0) write_row(P, row, 2, 0.f, zero_t, 0.f, 0.f, 0);
            }
        } else {
            /* log q = (s - max s)/tau - lse_s, lse_s = LSE((s - max s)/tau); same for p */
            const float max_s = all1.ms, max_t = all1.mt;
            const float lse2_t = log2f(all1.st);
            const float lse_s = log2f(all1.ss) * 0.693147180559945309f;
            const float lse_t = lse2_t * 0.693147180559945309f;

            /* ---- pass 2: head boundary ---- */
            if (P.need_head) head_select(rv, P, sh, max_t, lse2_t, C, rank);
            /* compact copy: boundary key, mode, ties in the head (< 2^30), ordinal base */
            uint32_t b_key = 0, b_in = 0, tie_run = 0;
            int b_mode = KDL_RS_AT_OR_ABOVE;
            int64_t head_size = 0;
            if (P.need_head) {
                b_key = sh.sel.key;
                b_mode = sh.sel.mode;
                b_in = (uint32_t)sh.sel.ties_in;
                head_size = sh.sel.head_size;
                tie_run = (uint32_t)sh.tie_base;
            }
            const bool split = P.need_head && b_mode == KDL_RS_SPLIT;

            /* ---- pass 3: element terms, gaps ---- */
            /* = kdl_elem_params_make_f(div, coef, 1/2, 1/2); logs from the host */
            const kdl_elem_params_f pr0 = {P.div, P.coef, P.log_c, P.log_1mc, 0.5f, 0.5f};
            Terms my3 = zero_t;
            const int iters = (rv.nch + kBlock - 1) / kBlock;
            for (int it = 0; it < iters; ++it) {
                const int c = it * kBlock + tid;
                const bool has = c < rv.nch; /* a thread past the slice still joins the scan */
                const int m = has ? rv.width(c) : 0;
                uint32_t ord = 0; /* index rank of the next boundary tie among all ties */
                Chunk<TT> ct;     /* SPLIT: loaded whole for the tie count, kept (review F6) */
                if (split) {      /* index order of the chunks: (iteration, thread) */
                    int ties = 0;
                    if (has) {
                        rv.load_t(c, ct);
#pragma unroll
                        for (int k = 0; k < kChunk; ++k)
                            ties += (k < m && kdl_rs_key(chunk_val(ct, k, m), P.key_mask) == b_key);
                    }
                    int excl, total;
                    BlockScanI(sh.cub.scan).ExclusiveSum(ties, excl, total);
                    __syncthreads();
                    ord = tie_run + (uint32_t)excl;
                    tie_run += (uint32_t)total;
                }
                if (!has) continue;
                Chunk<ST> cs;
#pragma unroll
                for (int h = 0; h < 2; ++h) { /* half a chunk at a time: fewer live registers */
                    rv.load_s_part(c, h, cs);
                    if (!split) rv.load_t_part(c, h, ct);
#pragma unroll
                    for (int k = 4 * h; k < 4 * h + 4; ++k) {
                        const float tv = chunk_val(ct, k, m);
                        const float lp = log_prob(tv, max_t, P.inv_tau, lse_t);
                        const float lq = log_prob(chunk_val(cs, k, m), max_s, P.inv_tau, lse_s);
                        if (P.need_kl) {
                            const kdl_elem_f ef = kdl_elem_fkl_f(lp, lq);
                            const kdl_elem_f er = kdl_elem_rkl_f(lp, lq);
                            my3.fkl += ef.loss;
                            my3.rkl += er.loss;
                            my3.Gf += ef.qg;
                            my3.Gr += er.qg;
                        }
                        if (P.div != KDL_ELEM_AKL) {
                            const kdl_elem_f e = kdl_elem_eval_f(&pr0, lp, lq);
                            my3.loss += e.loss;
                            my3.G += e.qg;
                        }
                        if (P.need_head && k < m) {
                            /* = kdl_rs_in_head() with 32-bit ordinals */
                            const uint32_t key = kdl_rs_key(tv, P.key_mask);
                            bool in = key > b_key;
                            if (key == b_key) {
                                in = b_mode == KDL_RS_AT_OR_ABOVE || (b_mode == KDL_RS_SPLIT && ord < b_in);
                                ++ord;
                            }
                            const float gap = fabsf(expf(lp) - expf(lq));
                            if (in)
                                my3.gh += gap;
                            else
                                my3.gt += gap;
                        }
                    }
                }
            }
            const Terms blk3 = BlockReduce3(sh.cub.r3).Reduce(my3, TermsOp());
            const Terms all3 = row_allreduce(blk3, &sh.x3, &sh.b3, TermsOp(), C);

            float wh = 0.5f, wt = 0.5f;
            if (P.need_head) kdl_akl_weights_f(all3.gh, all3.gt, &wh, &wt);
            float loss, G;
            if (P.div == KDL_ELEM_AKL) {
                /* = sum of kdl_elem_eval_f AKL terms: a zero weight drops its KL, even +inf */
                loss = (wh > 0.f ? wh * all3.fkl : 0.f) + (wt > 0.f ? wt * all3.rkl : 0.f);
                G = wh * all3.Gf + (wt > 0.f ? wt * all3.Gr : 0.f);
            } else {
                loss = all3.loss;
                G = all3.G;
            }

            /* outputs now: nothing of them stays live through pass 4 */
            if (!P.redo && rank == 0 && tid == 0) write_row(P, row, 0, loss, all3, wh, wt, head_size);

            /* ---- pass 4: gradient ---- */
            if (grow) {
                /* gradient = (gscale dz)/tau (host/internal.h kdl_scaled_grad): an
                 * exact zero stays zero whatever scale and tau are */
                double gs = P.scale;
                if (P.reduction == KDL_REDUCTION_MEAN) {
                    /* the first launch divides by the rows counted (>= 1: this
                     * row counts): it cannot know whether other rows are valid;
                     * the redo launch by the valid rows (>= 1: this row is) */
                    const unsigned long long rows = P.redo ? P.hdr[0] - P.hdr[1] : P.hdr[0];
                    gs /= (double)rows;
                }
                const float gscale = (float)gs;
                const kdl_elem_params_f pr = {P.div, P.coef, P.log_c, P.log_1mc, wh, wt};
                const int gsz2 = gsz;
                for (int c = tid; c < rv.nch; c += kBlock) {
                    Chunk<ST> cs;
                    Chunk<TT> ct;
                    const int m = rv.width(c);
                    void *gp = static_cast<char *>(grow) + (int64_t)c * kChunk * gsz2;
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        rv.load_s_part(c, h, cs);
                        rv.load_t_part(c, h, ct);
                        float dz[4];
#pragma unroll
                        for (int k = 0; k < 4; ++k) {
                            const float lp = log_prob(chunk_val(ct, 4 * h + k, m), max_t, P.inv_tau, lse_t);
                            const float lq = log_prob(chunk_val(cs, 4 * h + k, m), max_s, P.inv_tau, lse_s);
                            const kdl_elem_f e = kdl_elem_eval_f(&pr, lp, lq);
                            const float z = kdl_elem_dz_f(e.qg, expf(lq), G);
                            dz[k] = (gscale == 0.f || z == 0.f) ? 0.f : (gscale * z) * P.inv_tau;
                        }
                        store_quad(gp, P.grad_dt, h, m, P.vec_g, dz);
                    }
                }
            }
        }
        /* no CTA goes on (or leaves) while a peer may still read its shared
         * memory; C = 1: the next row's pass 1 reuses the shared state */
        row_barrier(C);
    }
}

using RowKernelFn = void (*)(LossParams);

/* The row kernel for a student dtype (one translation unit each) and a
 * teacher dtype (KDL_DTYPE_F32, F16 or BF16). */
RowKernelFn row_kernel_f32(int teacher_dtype);
RowKernelFn row_kernel_f16(int teacher_dtype);
RowKernelFn row_kernel_bf16(int teacher_dtype);

} // namespace kdl

#endif /* KDLOSS_KERNELS_LOSS_ROW_CUH */
