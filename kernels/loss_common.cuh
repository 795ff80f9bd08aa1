/*
 * kernels/loss_common.cuh - device helpers of the fused loss kernel
 * (kernels/loss.cu): dtype traits, 8-element chunks moved as 16-byte
 * vectors (scalar fallback for unaligned rows and the row tail), the
 * gradient store in f32/f16/bf16, the online log2-domain LSE, and the
 * cluster (distributed shared memory) barrier and peer access.
 */
#ifndef KDLOSS_KERNELS_LOSS_COMMON_CUH
#define KDLOSS_KERNELS_LOSS_COMMON_CUH

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace kdl {

namespace cg = cooperative_groups;

/* Elements per chunk: one 16-byte vector of a 16-bit dtype, two of f32.
 * Thread tid owns chunks tid, tid + blockDim, ... of its CTA's slice in
 * every pass, so consecutive threads touch consecutive 16-byte words. */
constexpr int kChunk = 8;

/* ------------------------------------------------------------ dtype traits */
struct TF32 {
    using R = uint32_t; /* raw storage */
    static constexpr int kDtype = 0;
    static constexpr int kBytes = 4;
    static __device__ __forceinline__ float to_float(uint32_t r) { return __uint_as_float(r); }
};
struct TF16 {
    using R = uint16_t;
    static constexpr int kDtype = 1;
    static constexpr int kBytes = 2;
    static __device__ __forceinline__ float to_float(uint16_t r) { return __half2float(__ushort_as_half(r)); }
};
struct TBF16 {
    using R = uint16_t;
    static constexpr int kDtype = 2;
    static constexpr int kBytes = 2;
    static __device__ __forceinline__ float to_float(uint16_t r) { return __uint_as_float((uint32_t)r << 16); }
};

/* ------------------------------------------------------------------ chunks */
template <class T> struct Chunk {
    static constexpr int kVec = T::kBytes * kChunk / 16; /* 16-byte words: 2 (f32) or 1 */
    uint4 u[kVec];
};

__device__ __forceinline__ uint32_t u4_get(const uint4 &v, int i)
{
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ void u4_set(uint4 &v, int i, uint32_t w)
{
    if (i == 0) v.x = w;
    else if (i == 1) v.y = w;
    else if (i == 2) v.z = w;
    else v.w = w;
}

/* Raw element k (constant after unrolling) of a chunk. */
template <class T> __device__ __forceinline__ typename T::R chunk_raw(const Chunk<T> &c, int k)
{
    if constexpr (T::kBytes == 4) {
        return u4_get(c.u[k >> 2], k & 3);
    } else {
        uint32_t w = u4_get(c.u[0], (k >> 1) & 3);
        return (uint16_t)((k & 1) ? (w >> 16) : (w & 0xFFFFu));
    }
}

/* v[k] = element k as float for k < m, -inf (absent: probability 0) after. */
template <class T> __device__ __forceinline__ void chunk_to_float(const Chunk<T> &c, int m, float v[kChunk])
{
#pragma unroll
    for (int k = 0; k < kChunk; ++k) v[k] = k < m ? T::to_float(chunk_raw(c, k)) : -INFINITY;
}

/* Loads the m (<= 8) elements at p into c, zero-filling the rest.  vec:
 * p is 16-byte aligned (row base, stride and slice start allow it).
 * STREAM_HINT: read once (staged path), evict first. */
template <class T, bool STREAM_HINT>
__device__ __forceinline__ void chunk_load_global(Chunk<T> &c, const typename T::R *p, int m, bool vec)
{
    if (vec && m == kChunk) {
        const uint4 *q = reinterpret_cast<const uint4 *>(p);
#pragma unroll
        for (int i = 0; i < Chunk<T>::kVec; ++i) c.u[i] = STREAM_HINT ? __ldcs(q + i) : __ldg(q + i);
        return;
    }
    if constexpr (T::kBytes == 4) {
#pragma unroll
        for (int k = 0; k < kChunk; ++k) u4_set(c.u[k >> 2], k & 3, k < m ? (uint32_t)__ldg(p + k) : 0u);
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            uint32_t lo = 2 * i < m ? (uint32_t)__ldg(p + 2 * i) : 0u;
            uint32_t hi = 2 * i + 1 < m ? (uint32_t)__ldg(p + 2 * i + 1) : 0u;
            u4_set(c.u[0], i, lo | (hi << 16));
        }
    }
}

/* Half `part` (elements 4*part .. 4*part+3) of a chunk, for consumers that
 * work half a chunk at a time: f32 loads only its 16-byte word u[part];
 * 16-bit chunks are one word, loaded whole for part 0 (part 1 loads nothing). */
template <class T>
__device__ __forceinline__ void chunk_load_global_part(Chunk<T> &c, const typename T::R *p, int m, bool vec, int part)
{
    if constexpr (Chunk<T>::kVec == 1) {
        if (part == 0) chunk_load_global<T, false>(c, p, m, vec);
    } else {
        if (vec && m == kChunk) {
            c.u[part] = __ldg(reinterpret_cast<const uint4 *>(p) + part);
            return;
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int e = 4 * part + k;
            u4_set(c.u[part], k, e < m ? (uint32_t)__ldg(p + e) : 0u);
        }
    }
}

/* ---------------------------------------------------------- gradient store */
/* Stores the m (<= 8) values of v at element offset 0 of p (a row slice of
 * dtype dt: 0 f32, 1 f16, 2 bf16), 16-byte vector stores when vec and the
 * chunk is whole, element stores otherwise.  Written once: evict first. */
__device__ __forceinline__ void store_chunk(void *p, int dt, int m, bool vec, const float v[kChunk])
{
    if (dt == 0) {
        float *g = static_cast<float *>(p);
        if (vec && m == kChunk) {
            __stcs(reinterpret_cast<float4 *>(g), make_float4(v[0], v[1], v[2], v[3]));
            __stcs(reinterpret_cast<float4 *>(g) + 1, make_float4(v[4], v[5], v[6], v[7]));
        } else {
#pragma unroll
            for (int k = 0; k < kChunk; ++k)
                if (k < m) g[k] = v[k];
        }
        return;
    }
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (dt == 1) {
            __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
            w[i] = (uint32_t)__half_as_ushort(h.x) | ((uint32_t)__half_as_ushort(h.y) << 16);
        } else {
            __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
            w[i] = (uint32_t)__bfloat16_as_ushort(h.x) | ((uint32_t)__bfloat16_as_ushort(h.y) << 16);
        }
    }
    uint16_t *g = static_cast<uint16_t *>(p);
    if (vec && m == kChunk) {
        __stcs(reinterpret_cast<uint4 *>(g), make_uint4(w[0], w[1], w[2], w[3]));
    } else {
#pragma unroll
        for (int k = 0; k < kChunk; ++k)
            if (k < m) g[k] = (uint16_t)((k & 1) ? (w[k >> 1] >> 16) : (w[k >> 1] & 0xFFFFu));
    }
}

/* Stores v[0..3] as elements 4h .. 4h+3 of the chunk at p (those below m):
 * half a chunk at a time keeps 4 values live instead of 8.  vec and a whole
 * chunk: one 16-byte (f32) or 8-byte (16-bit) store. */
__device__ __forceinline__ void store_quad(void *p, int dt, int h, int m, bool vec, const float v[4])
{
    const int base = 4 * h;
    if (dt == 0) {
        float *g = static_cast<float *>(p) + base;
        if (vec && m == kChunk) {
            __stcs(reinterpret_cast<float4 *>(g), make_float4(v[0], v[1], v[2], v[3]));
        } else {
#pragma unroll
            for (int k = 0; k < 4; ++k)
                if (base + k < m) g[k] = v[k];
        }
        return;
    }
    uint32_t w[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (dt == 1) {
            __half2 x = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
            w[i] = (uint32_t)__half_as_ushort(x.x) | ((uint32_t)__half_as_ushort(x.y) << 16);
        } else {
            __nv_bfloat162 x = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
            w[i] = (uint32_t)__bfloat16_as_ushort(x.x) | ((uint32_t)__bfloat16_as_ushort(x.y) << 16);
        }
    }
    uint16_t *g = static_cast<uint16_t *>(p) + base;
    if (vec && m == kChunk) {
        __stcs(reinterpret_cast<uint2 *>(g), make_uint2(w[0], w[1]));
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (base + k < m) g[k] = (uint16_t)((k & 1) ? (w[k >> 1] >> 16) : (w[k >> 1] & 0xFFFFu));
    }
}

/* ---------------------------------------------------------- online LSE, log2 */
/* (m, s): running max m of the raw logits and s = sum of 2^((v - m) k2),
 * k2 = log2(e)/tau: the max is subtracted before the scaling, so a tiny tau
 * gives the limit (probability 0 below the max) instead of inf - inf.
 * m = -inf, s = 0 is the empty state; +inf or NaN poison s (the row is
 * invalid anyway and flagged separately).  k2 is finite (clamped on the
 * host), so a zero difference scales to 0. */
__device__ __forceinline__ void lse2_merge(float &m, float &s, float m2, float s2, float k2)
{
    float mm = fmaxf(m, m2);
    if (mm == -INFINITY) {
        m = mm;
        s = 0.f;
        return;
    }
    float a = m == -INFINITY ? 0.f : s * exp2f((m - mm) * k2);
    float b = m2 == -INFINITY ? 0.f : s2 * exp2f((m2 - mm) * k2);
    m = mm;
    s = a + b;
}

/* Folds a chunk of logits v (absent ones -inf) into (m, s); bad |= NaN or +inf. */
__device__ __forceinline__ void lse2_chunk(float &m, float &s, int &bad, const float v[kChunk], float k2)
{
    float cm = -INFINITY;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
        bad |= !(v[k] < INFINITY);
        cm = fmaxf(cm, v[k]);
    }
    if (cm == -INFINITY) return;
    float mm = fmaxf(m, cm);
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) acc += exp2f((v[k] - mm) * k2);
    s = (m == -INFINITY ? 0.f : s * exp2f((m - mm) * k2)) + acc;
    m = mm;
}

/* log q (or log p) of a logit: (v - max)/tau - LSE((x - max)/tau). */
__device__ __forceinline__ float log_prob(float v, float vmax, float inv_tau, float lse)
{
    return fmaf(v - vmax, inv_tau, -lse);
}

/* Loss output scaling (host/internal.h kdl_scaled_loss): scale 0 switches
 * the term off, even an infinite one; NaN (an invalid row) stays NaN. */
__device__ __forceinline__ double scaled_loss(double scale, double x)
{
    return (scale == 0.0 && !isnan(x)) ? 0.0 : scale * x;
}

/* ---------------------------------------------------------------- clusters */
/* Barrier over the CTAs working on one row: the cluster (C > 1) or the CTA.
 * cluster.sync() orders shared and distributed shared memory accesses. */
__device__ __forceinline__ void row_barrier(int C)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (C > 1) {
        cg::this_cluster().sync();
        return;
    }
#endif
    __syncthreads();
}

/* This CTA's shared variable p as seen in cluster rank r (p itself when C == 1). */
template <class T> __device__ __forceinline__ T *peer_ptr(T *p, int r, int C)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (C > 1) return cg::this_cluster().map_shared_rank(p, r);
#endif
    return p;
}

__device__ __forceinline__ int cluster_rank(int C)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (C > 1) return (int)cg::this_cluster().block_rank();
#endif
    return 0;
}

/* Allreduce of one value per CTA over the row's CTAs, combined in rank
 * order so that every CTA (and every run) gets the same bits.  v is read in
 * thread 0; xslot and bslot are this call site's own shared slots. */
template <class T, class Op>
__device__ __forceinline__ T row_allreduce(const T &v, T *xslot, T *bslot, Op op, int C)
{
    if (threadIdx.x == 0) *xslot = v;
    row_barrier(C);
    if (threadIdx.x == 0) {
        T acc = *peer_ptr(xslot, 0, C);
        for (int r = 1; r < C; ++r) acc = op(acc, *peer_ptr(xslot, r, C));
        *bslot = acc;
    }
    __syncthreads();
    return *bslot;
}

/* Float output (loss, statistics) of dtype F32 (0) or F64 (3). */
__device__ __forceinline__ void store_out(void *p, int dt, int64_t i, double v)
{
    if (!p) return;
    if (dt == 3)
        static_cast<double *>(p)[i] = v;
    else
        static_cast<float *>(p)[i] = (float)v;
}

} // namespace kdl

#endif /* KDLOSS_KERNELS_LOSS_COMMON_CUH */
