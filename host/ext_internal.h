/*
 * host/ext_internal.h - helpers shared by the extension files (sparse
 * teacher, vocabulary-parallel, fused linear): the descriptor check and the
 * AKL teacher-order key, the latter __host__ __device__ so the reference
 * and the kernels order tokens by the very same bits.  Not installed.
 */
#ifndef KDLOSS_HOST_EXT_INTERNAL_H
#define KDLOSS_HOST_EXT_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "kdloss/detail/elem.h"
#include "kdloss/kdloss_ext.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Row classes, as in the dense reference. */
enum { KDL_EXT_ROW_VALID = 0, KDL_EXT_ROW_IGNORED = 1, KDL_EXT_ROW_INVALID = 2 };

#ifndef __CUDACC__
/* Checks the descriptor (struct size, enums, temperature, scale, alpha,
 * beta, mu, top_k in [1, vocab]) and out_dtype exactly as kdl_loss_validate
 * does, by running it on an empty dense problem of this vocabulary.
 * Clears the last error first. */
kdl_status_t kdl_ext_validate_desc(const kdl_loss_desc_t *desc, int64_t vocab, kdl_dtype_t out_dtype);
/* The sparse and shard paths' dtype rules: known dtypes, f64 only in the
 * reference, a gradient in the student's dtype or f32 (f64 in the reference). */
kdl_status_t kdl_ext_check_dtypes(kdl_dtype_t student, kdl_dtype_t teacher, int has_grad,
                                  kdl_dtype_t grad, int allow_f64);

/* 1 when (rows - 1) * ld + cols elements of elem bytes fit int64 and size_t. */
int kdl_ext_span_ok(int64_t rows, int64_t cols, int64_t ld, size_t elem);

/* Copies a caller's fused-linear args into *out as a whole current struct:
 * a version-1, -2 or -3 caller (struct_size KDL_FUSED_LINEAR_ARGS_V1_SIZE,
 * _V2_SIZE or _V3_SIZE) gets the later fields at their kdl_fused_linear_args_init() defaults.  NULL args:
 * KDL_STATUS_NULL_POINTER; another struct_size: KDL_STATUS_BAD_STRUCT_SIZE.
 * Every fused-linear entry point reads its args only through this. */
kdl_status_t kdl_fused_linear_args_load(const kdl_fused_linear_args_t *in, kdl_fused_linear_args_t *out);
/* The kdl_sparse_args_t of the sparse teacher: mode, k, indices, log-probs,
 * labels, loss and counters from args; student = hidden_states in its dtype
 * with ld V (a stand-in for the checks: callers set the logits they form),
 * no gradient. */
void kdl_fused_linear_sparse_view(const kdl_fused_linear_args_t *args, kdl_sparse_args_t *s);

/* Device workspace of the fused linear + loss GPU path for a chunk of c
 * rows, each piece 256-byte aligned, in this order:
 *   logits  float32 chunk [c, V]: the logits, then (F32 inputs, or with
 *           grad_output) d loss / d logits written over them in place;
 *   teacher teacher_linear only: the float32 teacher logits of the chunk
 *           [c, V], H_t,c W_t^T (+ b_t) (only read by the loss kernel);
 *   dl16    16-bit inputs only: dL of the chunk in the inputs' dtype [c, V];
 *   dense   the loss kernel's workspace for c rows: the dense kernel's
 *           (kdl_loss_ws_bytes: 256-byte header + one float per row), or
 *           with the sparse teacher the sparse launcher's
 *           (kdl_ext_sparse_ws_bytes: c doubles, c bytes, 256 bytes);
 *   bias    grad_bias only: float64 column sums of dL [V];
 *   acc     256 bytes of per-call accumulators (double[4]: loss sum, valid,
 *           invalid, 1/valid; then the chunk's loss (double), invalid and
 *           valid counts (int64) as the dense call writes them; [7] the
 *           16-bit MEAN row count; [8] the chunk's bad-index rows (int64,
 *           sparse teacher), [9] their sum over the chunks (double)).
 * c = 0 (N = 0): only acc, at offset 0.  total = 0 on size_t overflow.
 * teacher: how the chunk's teacher is given (KDL_EXT_FUSED_TEACHER_*). */
enum { KDL_EXT_FUSED_TEACHER_LOGITS = 0, KDL_EXT_FUSED_TEACHER_LINEAR = 1, KDL_EXT_FUSED_TEACHER_SPARSE = 2 };
typedef struct kdl_ext_fused_layout {
    size_t logits, teacher, dl16, dense, bias, acc, total;
} kdl_ext_fused_layout_t;
kdl_ext_fused_layout_t kdl_ext_fused_layout(int64_t chunk, int64_t vocab, int sixteen, int grad_bias,
                                            int teacher);
/* The dense part above: the formula of kernels/loss.cu kdl_loss_ws_bytes
 * (the GPU wrapper checks that they agree). */
size_t kdl_ext_dense_ws_bytes(int64_t rows);
/* Its sparse counterpart: kernels/ext.cu kdl_ext_sparse_ws_bytes (checked
 * likewise). */
size_t kdl_ext_sparse_rows_ws_bytes(int64_t rows);
/* The teacher kind of (loaded) args: KDL_EXT_FUSED_TEACHER_*. */
int kdl_ext_fused_teacher(const kdl_fused_linear_args_t *args);
/* The layout's total for (loaded) args: chunk, dtypes, grad_bias and
 * the teacher kind. */
size_t kdl_ext_fused_workspace_bytes(const kdl_fused_linear_args_t *args);
#endif

/* 1 when (loaded) fused-linear args ask for the sparse teacher (version 4):
 * teacher_indices, teacher_logprobs or k set (host code, kernels/ext.cu's
 * launchers included). */
int kdl_fused_linear_sparse(const kdl_fused_linear_args_t *args);

/* Teacher-order key of a logit of the given byte width (2, 4 or 8) from its
 * raw bits: larger logit -> smaller key, so ascending (key, index) is the
 * AKL teacher order (probability descending, ties by lower index).  -0 is
 * keyed as +0 (they are equal logits).  Width 8 bits in, 64-bit key out;
 * narrower widths use the low 16 or 32 bits of both. */
static inline KDL_HD uint64_t kdl_ext_order_key(uint64_t bits, int width_bytes)
{
    int nb = 8 * width_bytes;
    uint64_t sign = (uint64_t)1 << (nb - 1);
    uint64_t mask = nb == 64 ? ~(uint64_t)0 : (((uint64_t)1 << nb) - 1);
    bits &= mask;
    if (bits == sign) bits = 0; /* -0 -> +0 */
    uint64_t asc = (bits & sign) ? (~bits & mask) : (bits | sign); /* ascending with value */
    return ~asc & mask;
}

/* Inverse of kdl_ext_order_key: the raw bits of the logit (+0 for a zero). */
static inline KDL_HD uint64_t kdl_ext_order_key_bits(uint64_t key, int width_bytes)
{
    int nb = 8 * width_bytes;
    uint64_t sign = (uint64_t)1 << (nb - 1);
    uint64_t mask = nb == 64 ? ~(uint64_t)0 : (((uint64_t)1 << nb) - 1);
    uint64_t asc = ~key & mask;
    return (asc & sign) ? (asc & ~sign) : (~asc & mask);
}

/* ------------------------------------------- vocabulary-parallel state */
/* The opaque state of kdl_shard_args_t.state: a header, then one record per
 * row.  Shared by the reference and the kernels (same layout on host and
 * device). */
typedef struct kdl_shard_header {
    int64_t valid_rows;   /* known from step 1 on */
    int64_t invalid_rows;
    int64_t pad[2];
} kdl_shard_header_t;

typedef struct kdl_shard_row {
    double m_s, m_t;       /* global max of the raw logits s and t (step 0's MAX)     */
    double z_s, z_t;       /* global sum of exp((x - m)/tau) (step 1's SUM)           */
    double lse_s, lse_t;   /* log(z): log q = (s - m_s)/tau - lse_s, log p likewise   */
    double mass_before;    /* AKL: teacher mass (relative to m_t, unnormalised) of the
                            * tokens before the current key prefix                    */
    double w_head, w_tail; /* AKL weights (last step)                                 */
    double loss, G;        /* row loss and sum of qg (last step)                      */
    uint64_t prefix;       /* AKL: resolved digits of the boundary key                */
    int64_t count_before;  /* AKL: tokens before the prefix                           */
    int64_t n_tie;         /* AKL: tokens whose key is the boundary key               */
    int64_t j_take;        /* AKL: how many of them (lowest indices first) are head  */
    int64_t tie_before;    /* AKL: tied tokens in lower-ranked shards                 */
    int64_t head_size;
    int32_t cls;           /* KDL_EXT_ROW_*                                           */
    int32_t all_head;      /* AKL: no boundary found: every token is head             */
} kdl_shard_row_t;

/* Steps of the protocol (see kdloss_ext.h). */
#define KDL_SHARD_PARTIAL_FIELDS 8
enum {
    KDL_SHARD_P_LOSS = 0, KDL_SHARD_P_G = 1, KDL_SHARD_P_FKL = 2, KDL_SHARD_P_RKL = 3,
    KDL_SHARD_P_GF = 4, KDL_SHARD_P_GR = 5, KDL_SHARD_P_GHEAD = 6, KDL_SHARD_P_GTAIL = 7
};
typedef enum kdl_shard_phase {
    KDL_SHARD_PH_MAX = 0,     /* write local maxima and bad flag             */
    KDL_SHARD_PH_NORM = 1,    /* absorb maxima, write sum-exp (+ digit 0)    */
    KDL_SHARD_PH_DIGIT = 2,   /* absorb digit d-1, write digit d histogram   */
    KDL_SHARD_PH_TIE = 3,     /* absorb the last digit, write tie counts     */
    KDL_SHARD_PH_PARTIAL = 4, /* absorb (sum-exp or ties), write partials    */
    KDL_SHARD_PH_FINISH = 5   /* absorb partials, write loss and gradient    */
} kdl_shard_phase_t;

/* Number of 8-bit digits of the teacher key (AKL), 0 otherwise. */
static inline int kdl_shard_digits(int akl, kdl_dtype_t teacher_dtype)
{
    if (!akl) return 0;
    return teacher_dtype == KDL_DTYPE_F64 ? 8 : teacher_dtype == KDL_DTYPE_F32 ? 4 : 2;
}
static inline int kdl_shard_num_steps(int akl, kdl_dtype_t teacher_dtype)
{
    return akl ? kdl_shard_digits(akl, teacher_dtype) + 4 : 4;
}
/* Phase of a step, and for PH_DIGIT the digit it writes. */
static inline kdl_shard_phase_t kdl_shard_phase_of(int akl, kdl_dtype_t teacher_dtype, int step, int *digit)
{
    int D = kdl_shard_digits(akl, teacher_dtype);
    *digit = 0;
    if (step == 0) return KDL_SHARD_PH_MAX;
    if (step == 1) return KDL_SHARD_PH_NORM;
    if (!akl) return step == 2 ? KDL_SHARD_PH_PARTIAL : KDL_SHARD_PH_FINISH;
    if (step <= D) {
        *digit = step - 1;
        return KDL_SHARD_PH_DIGIT;
    }
    if (step == D + 1) return KDL_SHARD_PH_TIE;
    if (step == D + 2) return KDL_SHARD_PH_PARTIAL;
    return KDL_SHARD_PH_FINISH;
}

#ifndef __CUDACC__
/* Argument check of a shard step (both paths). */
kdl_status_t kdl_shard_validate(const kdl_loss_desc_t *desc, const kdl_shard_args_t *args, int allow_f64);
#endif

/* The (op, count) a step returns: the same on both paths and every shard. */
static inline void kdl_shard_op_count(int akl, kdl_dtype_t teacher_dtype, int64_t rows, int64_t num_shards, int step,
                                      kdl_shard_op_t *op, int64_t *count)
{
    int digit;
    switch (kdl_shard_phase_of(akl, teacher_dtype, step, &digit)) {
    case KDL_SHARD_PH_MAX: *op = KDL_SHARD_OP_MAX; *count = 3 * rows; return;
    case KDL_SHARD_PH_NORM: *op = KDL_SHARD_OP_SUM; *count = (akl ? 2 + 2 * KDL_SHARD_BINS : 2) * rows; return;
    case KDL_SHARD_PH_DIGIT: *op = KDL_SHARD_OP_SUM; *count = 2 * KDL_SHARD_BINS * rows; return;
    case KDL_SHARD_PH_TIE: *op = KDL_SHARD_OP_SUM; *count = num_shards * rows; return;
    case KDL_SHARD_PH_PARTIAL: *op = KDL_SHARD_OP_SUM; *count = KDL_SHARD_PARTIAL_FIELDS * rows; return;
    case KDL_SHARD_PH_FINISH: *op = KDL_SHARD_OP_DONE; *count = 0; return;
    }
}

/* Boundary search over one reduced histogram (count[b], raw mass[b] relative
 * to m_t; normalised by z_t): advances count_before / mass_before over the
 * bins wholly before the boundary and returns the bin that holds it, or -1
 * when every remaining token is head.  rule/mu/top_k: the descriptor's. */
static inline KDL_HD int kdl_shard_find_bin(int rule, double mu, int64_t top_k, const double *count,
                                            const double *mass, double z_t, int64_t *count_before,
                                            double *mass_before)
{
    for (int b = 0; b < KDL_SHARD_BINS; b++) {
        int64_t c = (int64_t)count[b];
        double m = mass[b];
        int hit;
        if (rule == 2 /* TOPK */)
            hit = *count_before + c >= top_k;
        else if (rule == 0 /* REFERENCE */)
            hit = (*mass_before + m) / z_t > mu;
        else
            hit = (*mass_before + m) / z_t >= mu;
        if (hit && c > 0) return b;
        *count_before += c;
        *mass_before += m;
    }
    return -1;
}

/* How many of n_tie tokens of probability p each (after count_before tokens
 * of normalised mass c0) the head takes, as the dense reference's
 * sequential scan does; REFERENCE keeps the top-1 token always. */
static inline KDL_HD int64_t kdl_shard_tie_take(int rule, double mu, int64_t top_k, int64_t count_before,
                                                double c0, int64_t n_tie, double p)
{
    int64_t j = 0;
    if (rule == 2) {
        j = top_k - count_before;
    } else {
        double c = c0;
        if (rule == 0) {
            while (j < n_tie && c + p <= mu) {
                c += p;
                j++;
            }
        } else {
            while (j < n_tie && c < mu) {
                c += p;
                j++;
            }
        }
    }
    if (j > n_tie) j = n_tie;
    if (j < 0) j = 0;
    if (count_before + j == 0) j = 1; /* the top-1 token is always head */
    return j;
}

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_HOST_EXT_INTERNAL_H */
