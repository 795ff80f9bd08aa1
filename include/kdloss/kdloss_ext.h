/*
 * kdloss_ext.h - distillation beyond one GPU's logits: three extensions of
 * the fused loss, each with a GPU entry point (kdloss.h's handle, device
 * pointers, asynchronous on the handle's stream) and a float64 CPU reference
 * (host pointers, no CUDA needed).  Included by no other kdloss header: a
 * program that wants these calls includes this one.
 *
 *   1. Sparse teacher  (kdl_sparse_loss / kdl_ref_sparse_loss)
 *      The teacher is given per token as its top-k (indices, log-probs), not
 *      as full logits.  Two modes:
 *        RENORMALISED  p^ = the top-k renormalised on the support, 0 outside;
 *                      the student q is the full-vocabulary softmax (NOT
 *                      renormalised); the loss is the dense divergence
 *                      D(p^, q) over all V tokens.  FKL, JSD, TVD, SKL, SRKL.
 *                      (RKL, FKL_RKL, AKL contain KL(q||p^), which is +inf
 *                      whenever the student puts mass outside the support:
 *                      KDL_STATUS_NOT_SUPPORTED; use TAIL_BUCKET.)
 *        TAIL_BUCKET   k + 1 cells: the k support tokens with the teacher's
 *                      given p_j and the student's q_j, plus one bucket with
 *                      the rest, 1 - sum p_j against the student's mass
 *                      outside the support.  Every divergence; the AKL head
 *                      is chosen among the support tokens by the
 *                      descriptor's rule (the bucket is always tail).
 *      The gradient reaches all V student logits (tokens outside the support
 *      through the softmax normaliser and, in TAIL_BUCKET, the bucket).
 *
 *   2. Vocabulary-parallel (kdl_shard_step / kdl_ref_shard_step)
 *      V split into contiguous slices over shards (ranks).  Each shard calls
 *      a step function repeatedly; after each step the caller all-reduces a
 *      fixed-size float64 exchange buffer with the operation the step names
 *      (MAX or SUM) using its own communicator (NCCL, torch.distributed, MPI).
 *      The last step writes the loss (identical on every shard) and the
 *      gradient of the shard's slice.  Agrees with the unsharded loss to
 *      rounding, with the same AKL head (ties by global index).
 *
 *   3. Fused linear + loss (kdl_fused_linear_loss / kdl_ref_fused_linear_loss)
 *      From student hidden states H [N,d] and the output projection W [V,d]
 *      (student logits = H W^T, plus an optional bias b [V]) and given
 *      teacher logits [N,V]: the loss, dH [N,d], dW [V,d] and optionally
 *      db [V], chunk by chunk over rows, never holding the [N,V] student
 *      logits.  H and W in float32, or both in bf16 or both in f16.
 *
 * Definitions, buffer layouts and the memory model: docs/extensions.md.
 * Every call checks its arguments before anything is written or launched; a
 * bad argument returns its specific status and leaves the outputs untouched.
 * The descriptor is the dense loss's kdl_loss_desc_t (divergence,
 * temperature, alpha, beta, head rule, mu, top_k, reduction, scale,
 * ignore_index), with the dense meaning.
 */
#ifndef KDLOSS_EXT_H
#define KDLOSS_EXT_H

#include <stddef.h>
#include <stdint.h>

#include "kdloss/kdloss.h"
#include "kdloss/kdloss_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ======================================================== 1. sparse teacher */

/* Largest support size k per row. */
#define KDL_SPARSE_MAX_K 1024

/* TAIL_BUCKET: a row whose given teacher mass sum_j exp(lp_j) exceeds
 * 1 + KDL_SPARSE_MASS_TOL is invalid (not a sub-distribution); between 1 and
 * 1 + tol the bucket mass is taken as 0 (log-prob rounding).  With k = V (no
 * token off the support to hold the rest) a mass below 1 - tol is invalid
 * too. */
#define KDL_SPARSE_MASS_TOL 1e-3

typedef enum kdl_sparse_mode {
    KDL_SPARSE_RENORMALISED = 0, /* teacher renormalised on the support, student full-vocab */
    KDL_SPARSE_TAIL_BUCKET = 1,  /* k support cells + one bucket of the remaining mass      */
    KDL_SPARSE_MODE_COUNT_ = 2
} kdl_sparse_mode_t;

/* Names used by the CLI: "renormalised", "tail"; -1 for an unknown name. */
const char *kdl_sparse_mode_name(kdl_sparse_mode_t m);
int kdl_sparse_mode_from_name(const char *name);

/* Where the data is (device pointers for kdl_sparse_loss, host pointers for
 * the reference).  Always start from kdl_sparse_args_init(). */
typedef struct kdl_sparse_args {
    size_t struct_size;             /* = sizeof(kdl_sparse_args_t), set by init */
    kdl_sparse_mode_t mode;         /* default KDL_SPARSE_RENORMALISED          */
    int64_t rows;                   /* N >= 0                                   */
    int64_t vocab;                  /* V >= 1                                   */
    int64_t k;                      /* support size per row, [1, min(V, 1024)]  */

    const void *student;            /* [N, ld_student] logits, required if N > 0 */
    int64_t ld_student;             /* >= V                                     */
    kdl_dtype_t student_dtype;

    /* Row i's support: indices[i*ld_indices + j], j < k, distinct, in [0, V),
     * any order; logprobs[i*ld_logprobs + j] is the teacher's log-probability
     * of that token AT THE DISTILLATION TEMPERATURE (the temperature divides
     * the student's logits only; teacher log-probs taken at tau = 1 can be
     * divided by tau by the caller: in RENORMALISED mode that is exact). */
    const int64_t *teacher_indices; /* [N, ld_indices], required if N > 0     */
    int64_t ld_indices;             /* >= k                                     */
    const void *teacher_logprobs;   /* [N, ld_logprobs], required if N > 0    */
    int64_t ld_logprobs;            /* >= k                                     */
    kdl_dtype_t teacher_dtype;      /* of the log-probs                         */

    const int64_t *labels;          /* optional [N]; == ignore_index ignores the row */

    void *grad;                     /* optional [N, ld_grad]: d loss / d student logits */
    int64_t ld_grad;                /* >= V when grad is given                  */
    kdl_dtype_t grad_dtype;         /* student's dtype or F32 (F64: reference)  */

    kdl_dtype_t out_dtype;          /* F32 (default) or F64: loss               */
    void *loss;                     /* required: [1] (SUM, MEAN) or [N] (NONE)  */

    int64_t *info;                  /* optional [1]: invalid rows (any reason)  */
    int64_t *valid_rows;            /* optional [1]: rows in the reduction      */
    int64_t *bad_index_rows;        /* optional [1]: rows invalid because an index
                                     * is out of [0, V) or repeated in the row   */
} kdl_sparse_args_t;

void kdl_sparse_args_init(kdl_sparse_args_t *args);

/* Argument check shared by both paths (allow_f64: 1 for the reference).
 * k < 1, k > 1024 or k > V: KDL_STATUS_BAD_TOP_K; ld_indices or ld_logprobs
 * < k: KDL_STATUS_BAD_STRIDE; a divergence the mode does not define:
 * KDL_STATUS_NOT_SUPPORTED; AKL with HEAD_TOPK and desc->top_k > k:
 * KDL_STATUS_BAD_TOP_K (the head lies within the support).  Data (indices,
 * log-probs, logits) is never inspected here: bad data makes invalid rows. */
kdl_status_t kdl_sparse_validate(const kdl_loss_desc_t *desc, const kdl_sparse_args_t *args,
                                 int allow_f64);

/* 1 when the mode defines the divergence (see the table above). */
int kdl_sparse_supports(kdl_sparse_mode_t mode, kdl_divergence_t div);

/* Host-side check of an index matrix, for callers that want a status rather
 * than invalid rows: KDL_STATUS_BAD_PARAM (detail names the first bad row,
 * position and value) when an index is out of [0, V) or repeated in its row.
 * Host pointers only.  For indices in device memory there is deliberately
 * no separate check: kdl_sparse_loss checks every row's indices itself (a
 * shared-memory bitmap per row, no extra pass) and reports them through
 * bad_index_rows (and info); a caller that wants a status reads
 * *bad_index_rows after the call (one synchronisation) and fails when it is
 * non-zero.  Copying the indices to the host for this function costs a
 * transfer of N*k*8 bytes and reads them a second time. */
kdl_status_t kdl_sparse_check_indices(int64_t rows, int64_t vocab, int64_t k, const int64_t *indices,
                                      int64_t ld_indices);

/* Reference.  Rows are invalid (loss NaN, zero gradient row, counted in
 * *info, out of the reduction) when: a student logit is NaN or +inf, or all
 * are -inf; a teacher log-prob is NaN or > 0; an index is out of [0, V) or
 * repeated (also counted in *bad_index_rows); RENORMALISED: every log-prob
 * is -inf; TAIL_BUCKET: the given mass exceeds 1 + KDL_SPARSE_MASS_TOL, or k = V and
 * it is below 1 - KDL_SPARSE_MASS_TOL. */
kdl_status_t kdl_ref_sparse_loss(const kdl_loss_desc_t *desc, const kdl_sparse_args_t *args);

/* GPU.  Workspace: kdl_sparse_workspace_size (N doubles of row losses, N
 * bytes of row classes, 256 bytes of counters, each 256-byte aligned).  The
 * kernel also needs shared memory: ceil(V/32)*4 bytes for the support bitmap,
 * 12 bytes per support entry (AKL: 8 more per entry, rounded up to a power
 * of two, for the sort keys); V beyond what the device's opt-in shared memory
 * holds is KDL_STATUS_NOT_SUPPORTED.  MEAN with a gradient writes it already
 * scaled by scale/counted (counted: the rows not ignored), rounded once to
 * the gradient's dtype; a rescale by counted/valid runs only when some row
 * was invalid. */
kdl_status_t kdl_sparse_workspace_size(kdl_handle_t handle, const kdl_loss_desc_t *desc,
                                       const kdl_sparse_args_t *args, size_t *bytes);
kdl_status_t kdl_sparse_loss(kdl_handle_t handle, const kdl_loss_desc_t *desc,
                             const kdl_sparse_args_t *args, void *workspace, size_t workspace_bytes);

/* ================================================== 2. vocabulary-parallel */

/* What the caller does with the exchange buffer after a step. */
typedef enum kdl_shard_op {
    KDL_SHARD_OP_DONE = 0, /* the last step ran: loss and gradient are written */
    KDL_SHARD_OP_MAX = 1,  /* all-reduce exchange[0, count) with MAX           */
    KDL_SHARD_OP_SUM = 2   /* all-reduce exchange[0, count) with SUM           */
} kdl_shard_op_t;

/* Radix digit of the AKL head select: 2^8 bins per round. */
#define KDL_SHARD_DIGIT_BITS 8
#define KDL_SHARD_BINS 256

/* One shard's view.  Every shard passes the same desc, rows, vocab,
 * num_shards, labels and dtypes; slices are contiguous, disjoint, cover
 * [0, vocab), and shard_rank orders them (rank r's slice lies before rank
 * r+1's).  Each shard checks what it can see: num_shards in [1, vocab]
 * and a non-empty slice inside [0, vocab) (else KDL_STATUS_BAD_SIZE);
 * shard_rank in [0, num_shards), rank 0's slice starting at column 0, the
 * last rank's ending at vocab, at least r columns before rank r's slice and
 * num_shards - 1 - r after it (else KDL_STATUS_BAD_PARAM).  Always start
 * from kdl_shard_args_init(). */
typedef struct kdl_shard_args {
    size_t struct_size;          /* = sizeof(kdl_shard_args_t), set by init   */
    int64_t rows;                /* N >= 0                                    */
    int64_t vocab;               /* V: the whole vocabulary                   */
    int64_t vocab_offset;        /* first global column of this slice         */
    int64_t vocab_local;         /* columns in the slice, >= 1                */
    int32_t shard_rank;          /* [0, num_shards)                           */
    int32_t num_shards;          /* >= 1                                      */

    const void *student;         /* [N, ld_student]: the slice, column 0 = vocab_offset */
    int64_t ld_student;          /* >= vocab_local                            */
    kdl_dtype_t student_dtype;
    const void *teacher;         /* [N, ld_teacher]: the teacher's slice      */
    int64_t ld_teacher;
    kdl_dtype_t teacher_dtype;
    const int64_t *labels;       /* optional [N], the same on every shard     */

    void *grad;                  /* optional [N, ld_grad]: the slice of d loss / d student */
    int64_t ld_grad;
    kdl_dtype_t grad_dtype;

    kdl_dtype_t out_dtype;       /* F32 (default) or F64                      */
    void *loss;                  /* required: [1] or [N] (NONE), written by the last step */
    int64_t *info;               /* optional [1]: invalid rows                */
    int64_t *valid_rows;         /* optional [1]                              */
    int64_t *stat_head_size;     /* optional [N]: AKL head size (AKL only)    */
    unsigned char *head_mask;    /* optional [N, vocab_local]: 1 where the slice's token is in
                                  * the AKL head (AKL only; for tests and inspection) */

    void *state;                 /* kdl_shard_sizes()'s state_bytes, kept between steps */
    double *exchange;            /* kdl_shard_sizes()'s exchange_count doubles, reduced
                                  * by the caller after every step but the last */
} kdl_shard_args_t;

void kdl_shard_args_init(kdl_shard_args_t *args);

/* Sizes for this problem: state bytes (opaque, per shard, on the host for the
 * reference and on the device for the GPU path), the exchange buffer's length
 * in doubles (the largest step's count) and the number of steps, the last of
 * which returns KDL_SHARD_OP_DONE.  Any pointer may be NULL.  The sizes
 * depend only on desc, rows, num_shards and teacher_dtype, so every shard
 * gets the same; vocab, num_shards <= vocab, shard_rank and the slice are
 * checked as every step checks them (see kdl_shard_args_t). */
kdl_status_t kdl_shard_sizes(const kdl_loss_desc_t *desc, const kdl_shard_args_t *args,
                             size_t *state_bytes, size_t *exchange_count, int *num_steps);

/* Step `step` (0, 1, ... num_steps-1): absorbs the reduced exchange of the
 * previous step into the state, then writes the next exchange and returns in
 * *op the reduction it needs and in *count how many doubles (from exchange[0])
 * to reduce; at the last step writes loss, gradient and counters and returns
 * KDL_SHARD_OP_DONE (count 0).  The sequence of (op, count) is the same on
 * every shard and known from kdl_shard_sizes' inputs alone:
 *   step 0           MAX  [N,3]   student max, teacher max, bad-data flag
 *   step 1           SUM  [N,2]   sum-exp of student and teacher
 *                         (AKL: [N, 2 + 2*256]: + digit-0 histogram)
 *   AKL steps        SUM  [N,512] histogram of the next key digit
 *                    (one per remaining 8-bit digit of the teacher dtype)
 *   AKL tie step     SUM  [N,num_shards] tokens tied at the boundary, per shard
 *   partial step     SUM  [N,8]   partial loss, G, gaps, KL sums of the slice
 *   last step        DONE         loss, gradient of the slice
 * Layouts: docs/extensions.md. */
kdl_status_t kdl_ref_shard_step(const kdl_loss_desc_t *desc, const kdl_shard_args_t *args, int step,
                                kdl_shard_op_t *op, int64_t *count);

/* GPU: the same protocol, state and exchange in device memory.  op and count
 * are known on the host without synchronising; the caller all-reduces on a
 * stream ordered after the handle's stream (e.g. the same stream with NCCL). */
kdl_status_t kdl_shard_step(kdl_handle_t handle, const kdl_loss_desc_t *desc,
                            const kdl_shard_args_t *args, int step, kdl_shard_op_t *op,
                            int64_t *count);

/* ================================================ 3. fused linear + loss */

/* Always start from kdl_fused_linear_args_init().
 *
 * Versions: struct_size tells which fields the caller knows.  Version 1 ended
 * at valid_rows (KDL_FUSED_LINEAR_ARGS_V1_SIZE bytes), version 2 at grad_bias
 * (KDL_FUSED_LINEAR_ARGS_V2_SIZE), version 3 at teacher_linear_dtype
 * (KDL_FUSED_LINEAR_ARGS_V3_SIZE); a caller built against any of them still
 * works, with the later fields taken as their init defaults (no upstream
 * gradient, no bias, teacher logits from `teacher`, no sparse teacher).  New
 * fields are only ever appended. */
typedef struct kdl_fused_linear_args {
    size_t struct_size;          /* = sizeof(kdl_fused_linear_args_t), set by init */
    int64_t rows;                /* N >= 0                                   */
    int64_t hidden;              /* d >= 1                                   */
    int64_t vocab;               /* V >= 1                                   */

    const void *hidden_states;   /* H [N, ld_hidden], required if N > 0      */
    int64_t ld_hidden;           /* >= d                                     */
    kdl_dtype_t hidden_dtype;    /* GPU: F32, BF16 or F16 (= weight_dtype); reference: any */
    const void *weight;          /* W [V, ld_weight]: student logits = H W^T (+ bias) */
    int64_t ld_weight;           /* >= d                                     */
    kdl_dtype_t weight_dtype;    /* GPU: = hidden_dtype; reference: any      */
    const void *teacher;         /* teacher logits [N, ld_teacher]           */
    int64_t ld_teacher;          /* >= V                                     */
    kdl_dtype_t teacher_dtype;
    const int64_t *labels;       /* optional [N]                             */

    void *grad_hidden;           /* optional dH [N, ld_grad_hidden]          */
    int64_t ld_grad_hidden;      /* >= d                                     */
    void *grad_weight;           /* optional dW [V, ld_grad_weight] (overwritten, not accumulated) */
    int64_t ld_grad_weight;      /* >= d                                     */
    kdl_dtype_t grad_dtype;      /* of dH, dW, db: F32, or the inputs' dtype when H and W are
                                  * both BF16 or both F16; reference also F64 */

    int64_t chunk_rows;          /* rows per chunk; 0 = default: max(1, N/8) for F32 H and W,
                                  * max(1, N/24) for 16-bit ones; with teacher_hidden (a float32
                                  * teacher chunk too) N/16 and N/40; at most 4096, then lowered
                                  * until the whole workspace is <= 1/8 of one [N, V] logits
                                  * tensor in H and W's dtype */

    kdl_dtype_t out_dtype;       /* F32 (default) or F64                      */
    void *loss;                  /* required: [1] or [N] (NONE)               */
    int64_t *info;               /* optional [1]: invalid rows                */
    int64_t *valid_rows;         /* optional [1]                              */

    /* ---- version 2 ---- */
    const void *grad_output;     /* optional [N], reduction NONE only: the upstream gradient of
                                  * each row's loss (what autograd passes to the backward of an
                                  * unreduced loss); row i of d loss / d logits is multiplied by
                                  * grad_output[i] before dH, dW, db are formed.  Not allowed
                                  * with SUM or MEAN (KDL_STATUS_BAD_PARAM). */
    kdl_dtype_t grad_output_dtype; /* F32 (default), F16, BF16 or F64         */
    const void *bias;            /* optional b [V] in weight_dtype: logits = H W^T + b */
    void *grad_bias;             /* optional db [V] in grad_dtype (overwritten): column sums of
                                  * d loss / d logits over the rows; allowed without bias (the
                                  * gradient with respect to a zero bias) */

    /* ---- version 3: the teacher as a linear layer too ----
     * With teacher_hidden set, the teacher logits are H_t W_t^T (+ b_t),
     * formed chunk by chunk as the student's are and never stored whole;
     * `teacher` must then be NULL (one source of teacher logits, else
     * KDL_STATUS_BAD_PARAM).  The teacher is frozen: no gradient flows to
     * H_t, W_t or b_t.  teacher_dtype and ld_teacher are unused (and not
     * checked) then.  teacher_weight or teacher_bias without teacher_hidden
     * is KDL_STATUS_BAD_PARAM, except with rows = 0: like every row array,
     * H_t and W_t are required only when N > 0 (NULL_POINTER), so an empty
     * call may pass a NULL H_t (an empty tensor's data) beside W_t; the
     * sizes, strides and dtype below are checked whenever any of the three
     * pointers is set. */
    const void *teacher_hidden;  /* optional H_t [N, ld_teacher_hidden]      */
    int64_t teacher_hidden_size; /* d_t >= 1 (may differ from hidden)        */
    int64_t ld_teacher_hidden;   /* >= d_t                                   */
    const void *teacher_weight;  /* W_t [V, ld_teacher_weight], required with teacher_hidden */
    int64_t ld_teacher_weight;   /* >= d_t                                   */
    const void *teacher_bias;    /* optional b_t [V]                         */
    kdl_dtype_t teacher_linear_dtype; /* of H_t, W_t, b_t; GPU: F32, BF16 or F16; reference: any */

    /* ---- version 4: a sparse (top-k) teacher ----
     * The teacher as top-k indices and log-probabilities per row, exactly as
     * kdl_sparse_args_t has them (part 1: modes, the divergences each mode
     * defines, the AKL head within the support, invalid rows): offline
     * distillation from a teacher served as top-k log-probs, with the
     * student's [N, V] logits never stored.  Asked for by teacher_indices,
     * teacher_logprobs or k != 0; `teacher` and the teacher layer must
     * then be unset (one teacher source among teacher, teacher_hidden and
     * teacher_indices, else KDL_STATUS_BAD_PARAM); teacher_dtype and
     * ld_teacher are unused.  The checks are kdl_sparse_validate's: k
     * outside [1, min(V, 1024)] KDL_STATUS_BAD_TOP_K, ld_teacher_indices or
     * ld_teacher_logprobs < k KDL_STATUS_BAD_STRIDE, a divergence the mode does
     * not define KDL_STATUS_NOT_SUPPORTED, AKL HEAD_TOPK with top_k >
     * k KDL_STATUS_BAD_TOP_K; the data is never inspected (a bad index
     * makes its row invalid, counted in info and bad_index_rows). */
    const int64_t *teacher_indices; /* [N, ld_teacher_indices], required (N > 0) with a sparse teacher */
    int64_t ld_teacher_indices;  /* >= k                                     */
    const void *teacher_logprobs; /* [N, ld_teacher_logprobs], the teacher's log-probs at the temperature */
    int64_t ld_teacher_logprobs; /* >= k                                     */
    kdl_dtype_t teacher_logprobs_dtype; /* F32 (default), F16, BF16; reference also F64 */
    kdl_sparse_mode_t sparse_mode; /* default KDL_SPARSE_RENORMALISED         */
    int64_t k;                   /* support size per row, [1, min(V, 1024)];
                                  * 0 (default): no sparse teacher            */
    int64_t *bad_index_rows;     /* optional [1]: rows invalid because an index is out of
                                  * [0, V) or repeated; written with a sparse teacher only */
} kdl_fused_linear_args_t;

/* struct_size of a version-1 caller (the struct up to and including valid_rows). */
#define KDL_FUSED_LINEAR_ARGS_V1_SIZE (offsetof(kdl_fused_linear_args_t, grad_output))
/* struct_size of a version-2 caller (up to and including grad_bias). */
#define KDL_FUSED_LINEAR_ARGS_V2_SIZE (offsetof(kdl_fused_linear_args_t, teacher_hidden))
/* struct_size of a version-3 caller (up to and including teacher_linear_dtype,
 * padded to the struct's alignment as its sizeof was). */
#define KDL_FUSED_LINEAR_ARGS_V3_SIZE (offsetof(kdl_fused_linear_args_t, teacher_indices))

void kdl_fused_linear_args_init(kdl_fused_linear_args_t *args);

/* The chunk the call will use for these arguments (chunk_rows or the default). */
int64_t kdl_fused_linear_chunk_rows(const kdl_fused_linear_args_t *args);

/* Argument check shared by both paths (allow_f64: 1 for the reference).
 * Beyond the sizes, strides, pointers and alignment: grad_output with SUM
 * or MEAN, and two sources of teacher logits (teacher with teacher_hidden,
 * or teacher_weight / teacher_bias without teacher_hidden when N > 0), are
 * KDL_STATUS_BAD_PARAM; a dtype outside the enum (teacher_linear_dtype
 * included) is KDL_STATUS_BAD_ENUM; a grad_dtype that is neither F32, the
 * inputs' common 16-bit dtype nor (reference) F64, H and W of different
 * dtypes on the GPU, and F64 data on the GPU (the teacher layer's included)
 * are KDL_STATUS_NOT_SUPPORTED.  teacher_hidden_size < 1 is BAD_SIZE,
 * ld_teacher_hidden or ld_teacher_weight < teacher_hidden_size BAD_STRIDE.
 * With the sparse teacher (version 4) two teacher sources are BAD_PARAM, and
 * the sparse fields go through kdl_sparse_validate itself (on a
 * kdl_sparse_args_t view of these args: its statuses, see above). */
kdl_status_t kdl_fused_linear_validate(const kdl_loss_desc_t *desc, const kdl_fused_linear_args_t *args,
                                       int allow_f64);

/* Reference: materialises the [N,V] float64 logits (it is a reference), and
 * with teacher_hidden the [N,V] float64 teacher logits H_t W_t^T (+ b_t)
 * (plain loops, given to the dense reference as an F64 teacher), runs
 * kdl_ref_loss_forward_backward on them (with the sparse teacher
 * kdl_ref_sparse_loss instead, F64 logits and dL), multiplies row i of dL by
 * grad_output[i] when given, then dH = dL W, dW = dL^T H and db = column sums
 * of dL as plain sums (so a non-finite hidden row poisons dW, as a GEMM
 * would).  Every element is converted to float64 exactly; nothing is rounded
 * to 16 bits in between.  chunk_rows is ignored. */
kdl_status_t kdl_ref_fused_linear_loss(const kdl_loss_desc_t *desc, const kdl_fused_linear_args_t *args);

/* GPU: per chunk of c rows,
 *   logits = H_c W^T (+ b)   cuBLAS: F32 inputs cublasSgemm in strict FP32
 *                            (no TF32); 16-bit inputs cublasGemmEx with
 *                            CUBLAS_COMPUTE_32F, a float32 logits chunk;
 *   T_c = H_t,c W_t^T (+ b_t) with teacher_hidden: the same GEMM forms in
 *                            teacher_linear_dtype, into a float32 teacher
 *                            chunk the loss kernel reads as its teacher
 *                            (the teacher gets no gradient);
 *   loss and dL              the dense loss kernel (kdl_loss_forward_backward's,
 *                            every divergence, AKL included), or with the
 *                            sparse teacher the sparse row kernel
 *                            (kdl_sparse_loss's, reduction SUM for MEAN as
 *                            here) on the chunk's index and log-prob rows, on
 *                            the float32 chunk: F32 inputs write dL over the logits in
 *                            place; 16-bit inputs write dL rounded to the
 *                            inputs' dtype into a separate c*V*2-byte buffer
 *                            (as autograd in bf16/f16 rounds it); with
 *                            grad_output, dL is written in float32 in place,
 *                            then scaled by grad_output[i] and (16-bit)
 *                            rounded once into the separate buffer;
 *   dH_c = dL W              cuBLAS (16-bit: A, B 16-bit, C in grad_dtype,
 *                            compute FP32);
 *   dW  += dL^T H_c          cuBLAS with beta = 1 after the first chunk: with
 *                            a float32 dW the sum over chunks is float32; with
 *                            a 16-bit dW every chunk's sum is rounded to 16
 *                            bits (one rounding per chunk: use F32 gradients,
 *                            or chunk_rows = N, where that matters);
 *   db  += column sums of dL a small kernel, float64 accumulator [V] in the
 *                            workspace, converted to grad_dtype once.
 * Then the loss and counters.  MEAN: F32 inputs scale dH, dW, db by
 * 1/valid at the end; 16-bit inputs carry 1/counted (the rows not ignored)
 * in dL before its one 16-bit rounding, and the end factor counted/valid is
 * exactly 1 unless some row was invalid (only then is a 16-bit dH/dW
 * rounded a second time).
 * Workspace (kdl_fused_linear_workspace_size): c*V*4 bytes (+ c*V*4 for
 * the teacher chunk with teacher_hidden, + c*V*2 for 16-bit inputs) + the
 * dense loss workspace of c rows (sparse teacher: the sparse one, c*8 + c +
 * 256 bytes) + V*8 bytes with grad_bias + 256, each piece rounded up to 256
 * bytes; it depends on chunk_rows, the dtypes, grad_bias and the teacher
 * source.  Sparse teacher: the row kernel's shared memory (as
 * kdl_sparse_loss's: V bits, 12 bytes per support entry, AKL's sort keys)
 * beyond the device's opt-in limit is KDL_STATUS_NOT_SUPPORTED; bad indices
 * are counted per chunk and summed into *bad_index_rows.
 * Compiled for sm_90a; not yet run on a device (docs/extensions.md). */
kdl_status_t kdl_fused_linear_workspace_size(kdl_handle_t handle, const kdl_loss_desc_t *desc,
                                             const kdl_fused_linear_args_t *args, size_t *bytes);
kdl_status_t kdl_fused_linear_loss(kdl_handle_t handle, const kdl_loss_desc_t *desc,
                                   const kdl_fused_linear_args_t *args, void *workspace,
                                   size_t workspace_bytes);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_EXT_H */
