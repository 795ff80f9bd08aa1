/*
 * kernels/radix_select.h - the AKL head boundary by radix select, written
 * once for the CUDA kernel (kernels/loss.cu) and its CPU model
 * (tests/test_radix_model.c).  Plain C11 that nvcc also compiles as
 * __host__ __device__; no CUDA header needed.
 *
 * Teacher order (DESIGN section 1): probability descending, ties by lower
 * vocabulary index first.  Probability order is logit order, so the select
 * runs over an order-preserving unsigned key of the teacher logit:
 *
 *   key(v) = bits(v) with the sign bit flipped (v >= 0) or all bits
 *            inverted (v < 0); -0 is folded into +0 first (same p), and the
 *            low bits a 16-bit dtype cannot hold are masked to 0, so every
 *            candidate is settled after 2 (bf16), 3 (f16) or 4 (f32) rounds
 *            of 8 bits.  -inf gets the smallest key of any logit.
 *
 * Each round builds, over the candidates (tokens whose key matches the
 * digits chosen so far), a 256-bin histogram of counts and of teacher mass,
 * and picks, scanning bins from the largest digit down, the first bin whose
 * inclusion makes the running (count, mass) reach the rule's boundary:
 *
 *   TOPK       count >= K
 *   REFERENCE  mass  >  mu        (head: c_k <= mu, plus the top-1 token)
 *   MASS       mass  >= mu        (head: c_(k-1) < mu)
 *
 * After the last round the bin is one key T: "above" tokens (key > T) come
 * first, then the ties (key == T, all of the same mass) in index order;
 * kdl_rs_resolve() says how many ties are in the head.  No sort.
 *
 * Mass is fixed point: p in units of 2^-52, summed in uint64.  Integer sums
 * are exact and independent of summation order, so the choice is
 * deterministic (shared-memory atomics, any cluster split) and the model
 * reproduces the kernel bit for bit from the same p values.  On the GPU p is
 * float32 (exp2 of the prescaled logit minus the row's LSE); the float64
 * reference sums float64 p, so a cumulative mass within a few float32 ulps
 * of mu can land on the other side (docs/kernels.md).
 */
#ifndef KDLOSS_KERNELS_RADIX_SELECT_H
#define KDLOSS_KERNELS_RADIX_SELECT_H

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define KDL_RS_HD __host__ __device__
#else
#define KDL_RS_HD
#endif

/* Rule ids as in kdl_head_rule_t. */
enum { KDL_RS_REFERENCE = 0, KDL_RS_MASS = 1, KDL_RS_TOPK = 2 };

/* Membership mode of a resolved head. */
enum {
    KDL_RS_ABOVE = 0,       /* head = tokens with key >  T                        */
    KDL_RS_AT_OR_ABOVE = 1, /* head = tokens with key >= T (all ties in)          */
    KDL_RS_SPLIT = 2        /* key > T, plus the first ties_in tokens of key T by index */
};

#define KDL_RS_BINS 256
#define KDL_RS_FX_SCALE 4503599627370496.0 /* 2^52: mass units per probability 1 */

typedef struct kdl_rs_result {
    uint32_t key;      /* boundary key T                                   */
    int mode;          /* KDL_RS_ABOVE, KDL_RS_AT_OR_ABOVE, KDL_RS_SPLIT   */
    uint64_t ties;     /* tokens with key == T (0 when every token is in)  */
    uint64_t ties_in;  /* ties in the head                                 */
    int64_t head_size; /* tokens in the head                               */
} kdl_rs_result;

static inline KDL_RS_HD uint32_t kdl_rs_float_bits(float v)
{
#if defined(__CUDA_ARCH__)
    return __float_as_uint(v);
#else
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
#endif
}

/* Key bits a logit of this dtype (0 f32, 1 f16, 2 bf16) can set. */
static inline KDL_RS_HD uint32_t kdl_rs_key_mask(int dtype)
{
    return dtype == 2 ? 0xFFFF0000u : dtype == 1 ? 0xFFFFE000u : 0xFFFFFFFFu;
}

/* Rounds of 8 bits that settle every key of this dtype. */
static inline KDL_RS_HD int kdl_rs_rounds(int dtype) { return dtype == 2 ? 2 : dtype == 1 ? 3 : 4; }

/* Order-preserving key: larger logit -> larger key; not for NaN. */
static inline KDL_RS_HD uint32_t kdl_rs_key(float v, uint32_t mask)
{
    if (v == 0.0f) v = 0.0f; /* -0 and +0 tie (same probability) */
    uint32_t u = kdl_rs_float_bits(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return u & mask;
}

/* Is key still a candidate after `round` rounds fixed the top digits of prefix? */
static inline KDL_RS_HD int kdl_rs_candidate(uint32_t key, uint32_t prefix, int round)
{
    if (round == 0) return 1;
    int sh = 32 - 8 * round;
    return (key >> sh) == (prefix >> sh);
}

static inline KDL_RS_HD int kdl_rs_digit(uint32_t key, int round)
{
    return (int)((key >> (24 - 8 * round)) & 0xFFu);
}

/* mu in mass units, at least 1 so that an empty prefix never reaches it. */
static inline uint64_t kdl_rs_mu_fx(double mu)
{
    double x = mu * KDL_RS_FX_SCALE + 0.5;
    if (!(x >= 1.0)) return 1;
    if (x >= KDL_RS_FX_SCALE) return (uint64_t)KDL_RS_FX_SCALE;
    return (uint64_t)x;
}

/* Has the running (count, mass) of the teacher order reached the boundary? */
static inline KDL_RS_HD int kdl_rs_reached(int rule, uint64_t cnt, uint64_t mass, uint64_t K, uint64_t mu_fx)
{
    if (rule == KDL_RS_TOPK) return cnt >= K;
    if (rule == KDL_RS_REFERENCE) return mass > mu_fx;
    return mass >= mu_fx; /* KDL_RS_MASS */
}

/* One round's bin choice, serially over the 256 bins from the top (the CPU
 * model; the kernel does the same scan with one bin group per lane of a
 * warp).  above_*: (count, mass) of every token ordered before the
 * candidates.  Returns 1 and the bin, plus the (count, mass) ordered before
 * that bin, or 0 when even all candidates do not reach the boundary. */
static inline KDL_RS_HD int kdl_rs_pick_serial(int rule, const uint32_t *cnt, const uint64_t *mass,
                                               uint64_t above_cnt, uint64_t above_mass, uint64_t K,
                                               uint64_t mu_fx, int *bin, uint64_t *before_cnt,
                                               uint64_t *before_mass)
{
    uint64_t c = above_cnt, m = above_mass;
    for (int b = KDL_RS_BINS - 1; b >= 0; b--) {
        if (kdl_rs_reached(rule, c + cnt[b], m + mass[b], K, mu_fx)) {
            *bin = b;
            *before_cnt = c;
            *before_mass = m;
            return 1;
        }
        c += cnt[b];
        m += mass[b];
    }
    return 0;
}

/* The last round settled the boundary key T: `ties` tokens of mass tie_mass
 * in all (each tie_mass/ties: equal keys are equal logits), after above_cnt
 * tokens of mass above_mass.  Fills r. */
static inline KDL_RS_HD void kdl_rs_resolve(int rule, uint32_t key, uint64_t above_cnt, uint64_t above_mass,
                                            uint64_t ties, uint64_t tie_mass, uint64_t K, uint64_t mu_fx,
                                            kdl_rs_result *r)
{
    uint64_t in;
    if (rule == KDL_RS_TOPK) {
        in = K - above_cnt; /* 1..ties */
    } else {
        /* not reached before the ties, reached with all of them: p > 0 */
        uint64_t p = ties ? tie_mass / ties : 0;
        uint64_t room = mu_fx - above_mass; /* above_mass <= mu_fx here */
        if (p == 0) {
            in = ties;
        } else if (rule == KDL_RS_REFERENCE) {
            /* first m with above + m p > mu is room/p + 1; head ends before it */
            in = room / p;
            if (above_cnt + in == 0) in = 1; /* the top-1 token, always */
        } else {
            /* MASS: first m with above + m p >= mu; the head ends with it */
            in = (room + p - 1) / p;
        }
        if (in > ties) in = ties;
    }
    r->key = key;
    r->ties = ties;
    r->ties_in = in;
    r->mode = in == 0 ? KDL_RS_ABOVE : in == ties ? KDL_RS_AT_OR_ABOVE : KDL_RS_SPLIT;
    r->head_size = (int64_t)(above_cnt + in);
}

/* The boundary is never reached (the whole row's mass is below mu in fixed
 * point): every one of the n_tokens tokens is in the head. */
static inline KDL_RS_HD void kdl_rs_all_in(uint64_t n_tokens, kdl_rs_result *r)
{
    r->key = 0;
    r->mode = KDL_RS_AT_OR_ABOVE; /* every key is >= 0 */
    r->ties = 0;
    r->ties_in = 0;
    r->head_size = (int64_t)n_tokens;
}

/* Is a token of this key in the head?  tie_ordinal: its rank, by index,
 * among the tokens of key r->key (only read in KDL_RS_SPLIT mode). */
static inline KDL_RS_HD int kdl_rs_in_head(const kdl_rs_result *r, uint32_t key, uint64_t tie_ordinal)
{
    if (key != r->key) return key > r->key;
    if (r->mode == KDL_RS_ABOVE) return 0;
    if (r->mode == KDL_RS_AT_OR_ABOVE) return 1;
    return tie_ordinal < r->ties_in;
}

/* CPU model of the kernel's select over one row: keys[] (kdl_rs_key of
 * the teacher logits, masked), mass[] (fixed-point p), n tokens.  Same
 * rounds, candidate test, histograms, bin choice and resolution as the
 * kernel; the kernel splits the histogram over threads and cluster ranks,
 * which integer sums do not see. */
static inline void kdl_rs_select_model(const uint32_t *keys, const uint64_t *mass, int64_t n, int rounds,
                                       int rule, uint64_t K, uint64_t mu_fx, kdl_rs_result *r)
{
    uint32_t cnt[KDL_RS_BINS];
    uint64_t msum[KDL_RS_BINS];
    uint32_t prefix = 0;
    uint64_t above_cnt = 0, above_mass = 0;
    for (int round = 0; round < rounds; round++) {
        memset(cnt, 0, sizeof cnt);
        memset(msum, 0, sizeof msum);
        for (int64_t j = 0; j < n; j++) {
            if (!kdl_rs_candidate(keys[j], prefix, round)) continue;
            int d = kdl_rs_digit(keys[j], round);
            cnt[d]++;
            msum[d] += mass[j];
        }
        int bin;
        uint64_t bc, bm;
        if (!kdl_rs_pick_serial(rule, cnt, msum, above_cnt, above_mass, K, mu_fx, &bin, &bc, &bm)) {
            kdl_rs_all_in((uint64_t)n, r);
            return;
        }
        prefix |= (uint32_t)bin << (24 - 8 * round);
        above_cnt = bc;
        above_mass = bm;
        if (round == rounds - 1)
            kdl_rs_resolve(rule, prefix, above_cnt, above_mass, cnt[bin], msum[bin], K, mu_fx, r);
    }
}

#endif /* KDLOSS_KERNELS_RADIX_SELECT_H */
