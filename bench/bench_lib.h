/*
 * bench/bench_lib.h - the CPU-checkable half of the throughput benchmark
 * (`kdloss bench`): the configuration matrix and its option parsing, the
 * bytes-moved model, ms -> GB/s -> fraction-of-copy-bandwidth arithmetic,
 * percentiles, and the JSON writer.  No CUDA here: tests/test_bench.c
 * compiles this file directly and checks it on a machine without a GPU.
 * The timing half is bench/bench_gpu.h.
 *
 * Byte model (what the floor of a memory-bound kernel must move, each tensor
 * once, at its dtype; README.md in this folder says more):
 *   loss, forward + backward:  rows * vocab * (size(student) + size(teacher)
 *                                              + size(grad))
 *       the scalar loss, the workspace and any statistics are not counted.
 *   Sinkhorn, per iteration:   2 * B * n * m * 4 bytes
 *       the f32 cost C is read twice (once for the f update, a row-wise
 *       LSE, once for the g update, a column-wise LSE); potentials and
 *       marginals, O(B (n + m)), are not counted.
 *   sparse (top-k teacher), loss + grad:
 *       rows * vocab * (size(student) + size(grad))
 *       + rows * k * (8 + size(logprobs))      read S, read the top-k
 *                                             (int64 indices + log-probs),
 *                                             write dS
 *   fused_linear, loss + dH + dW:
 *       (rows + vocab) * hidden * (size(hw) + size(grad))
 *       + rows * vocab * size(teacher)         read H, W, T; write dH, dW
 *       (H, W and T in the row's dtype; grad = kdlb_fused_grad_dtype: f32
 *       for f32 inputs, the inputs' dtype for bf16 / f16.  The GEMMs,
 *       6 N V d flops, dominate: GB/s is far below the copy bandwidth by
 *       nature; the row's point is ms and peak_extra_bytes, compared with
 *       the logits a non-fused call materialises, rows * vocab * size(dtype)
 *       (logits_dtype_bytes) and in float32, rows * vocab * 4 (logits_bytes))
 *   fused_linear with the teacher as a linear layer (H_t [rows, d_t],
 *   W_t [vocab, d_t], d_t = hidden; no teacher logits read):
 *       (rows + vocab) * hidden * (size(hw) + size(grad))
 *       + (rows + vocab) * d_t * size(hw)      read H, W, H_t, W_t; write dH, dW
 *       (the GEMMs, 6 N V d + 2 N V d_t flops; the logits a non-fused call
 *       materialises are both the student's and the teacher's:
 *       2 * rows * vocab * size(dtype) and 2 * rows * vocab * 4)
 *   sinkhorn_ragged, per iteration: sum over problems of 2 * n_b * m_b * 4
 *   sinkd, loss + grad: as the loss, rows * vocab * (size(s) + size(t)
 *       + size(grad)) (the n x n costs and plans per group are not counted)
 * GB/s are decimal (1e9 bytes per second).  The copy bandwidth counts the
 * bytes read plus the bytes written of a device-to-device copy.
 */
#ifndef KDLOSS_BENCH_LIB_H
#define KDLOSS_BENCH_LIB_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kdloss/kdloss_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------ the matrix */
#define KDLB_MAX_SHAPES 16

typedef struct kdlb_shape {
    int64_t rows;  /* N */
    int64_t vocab; /* V */
} kdlb_shape_t;

typedef struct kdlb_sinkhorn_shape {
    int64_t batch, n, m; /* B problems of n x m; batch 0: no Sinkhorn row */
} kdlb_sinkhorn_shape_t;

/* The operations of the benchmark (--ops).  Each is a bit of
 * kdlb_options_t.ops; the rows are timed in this order. */
typedef enum kdlb_op {
    KDLB_OP_LOSS = 1 << 0,            /* dense loss + grad (kdl_loss_forward_backward)   */
    KDLB_OP_SINKHORN = 1 << 1,        /* uniform-batch Sinkhorn (kdl_sinkhorn)           */
    KDLB_OP_SPARSE = 1 << 2,          /* top-k teacher loss + grad (kdl_sparse_loss)     */
    KDLB_OP_FUSED_LINEAR = 1 << 3,    /* H W^T + loss, dH, dW (kdl_fused_linear_loss)    */
    KDLB_OP_SINKHORN_RAGGED = 1 << 4, /* one ragged-batch Sinkhorn call (sizes_n/m)      */
    KDLB_OP_SINKD = 1 << 5,           /* SinKD loss + grad (kdl_sinkd)                   */
    KDLB_OP_ALL = (1 << 6) - 1
} kdlb_op_t;
#define KDLB_N_OPS 6
/* "loss", "sinkhorn", "sparse", "fused_linear", "sinkhorn_ragged", "sinkd";
 * NULL for anything else. */
const char *kdlb_op_name(kdlb_op_t op);

#define KDLB_MAX_SPARSE_K 8
#define KDLB_MAX_RAGGED 64

typedef struct kdlb_fused_shape {
    int64_t rows, hidden, vocab; /* H [rows, hidden], W [vocab, hidden] */
} kdlb_fused_shape_t;

typedef struct kdlb_sinkd_shape {
    int64_t rows, vocab, group; /* N rows in groups of `group`; 0 rows: no SinKD row */
} kdlb_sinkd_shape_t;

typedef struct kdlb_options {
    kdlb_shape_t shapes[KDLB_MAX_SHAPES];
    int n_shapes;
    kdl_dtype_t dtypes[3];
    int n_dtypes;
    kdl_divergence_t divergences[KDL_DIV_COUNT_];
    int n_divergences;
    kdl_head_rule_t head_rules[KDL_HEAD_COUNT_]; /* AKL only */
    int n_head_rules;
    int repeats;              /* timed runs per configuration, >= 1      */
    int warmup;               /* untimed runs before them, >= 0          */
    double mu;                /* AKL head mass                           */
    int64_t top_k;            /* AKL HEAD_TOPK size (clamped to V)       */
    int check;                /* 1: compare with the CPU reference first */
    kdlb_sinkhorn_shape_t sinkhorn;
    int sinkhorn_iters;       /* iterations timed per Sinkhorn run       */
    int quick;                /* --quick given                           */
    unsigned ops;             /* kdlb_op_t bits; default KDLB_OP_ALL     */
    /* op "sparse": RENORMALISED FKL, student / log-probs / grad in sparse_dtype */
    kdlb_shape_t sparse_shapes[KDLB_MAX_SHAPES];
    int n_sparse_shapes;
    int64_t sparse_k[KDLB_MAX_SPARSE_K];
    int n_sparse_k;
    kdl_dtype_t sparse_dtype; /* bf16                                     */
    /* op "fused_linear": JSD (beta 0.5), two rows per shape and dtype of
     * `dtypes` (H, W in it; dH, dW in kdlb_fused_grad_dtype of it): the
     * teacher's logits T [N, V] in it, then the teacher as a linear layer
     * (H_t [N, d], W_t [V, d] in it, d_t = d) */
    kdlb_fused_shape_t fused_shapes[KDLB_MAX_SHAPES];
    int n_fused_shapes;
    /* op "sinkhorn_ragged": one call over these problems (sinkhorn_iters iterations) */
    int64_t ragged_n[KDLB_MAX_RAGGED], ragged_m[KDLB_MAX_RAGGED];
    int n_ragged;
    /* op "sinkd": L1 and squared-L2 rows, sinkd_iters iterations */
    kdlb_sinkd_shape_t sinkd;
    int sinkd_iters;          /* 20                                       */
    kdl_dtype_t sinkd_dtype;  /* bf16                                     */
    const char *json_out;     /* NULL: no JSON file                      */
    const char *commit;       /* recorded in the JSON, "unknown" default */
} kdlb_options_t;

/* Defaults: every op; shapes 4096:32000,8192:128256,8192:151936; dtypes
 * bf16,f32; all divergences; all head rules; repeats 20; warmup 5; mu 0.5;
 * top_k 64; check on; Sinkhorn 64:1024:1024 for 100 iterations; sparse
 * 8192:151936 with k 8,64,1024 (bf16); fused linear 4096:4096:151936 (in
 * each of `dtypes`: bf16 and f32);
 * ragged Sinkhorn over KDLB_RAGGED_DEFAULT (24 problems, sides 64 to 2048);
 * SinKD 512:32000:64, 20 iterations (bf16); no JSON; commit "unknown".
 * --quick: shapes 4096:32000, dtype bf16, head rule reference, repeats 5,
 * warmup 2, no uniform Sinkhorn, sparse 4096:32000, fused linear
 * 1024:1024:32000, ragged KDLB_RAGGED_QUICK (8 problems, 64 to 512), SinKD
 * 256:8192:64, unless those options are given too (explicit options win
 * whatever their order). */
void kdlb_options_default(kdlb_options_t *o);

/* Parses argv[1..argc-1] (argv[0] is the subcommand's name).  Accepts
 * "--opt VALUE" and "--opt=VALUE".  Returns 0 on success, 1 when --help was
 * asked for, -1 on a bad option (err gets a one-line reason, no newline).
 * Pointers in o point into argv. */
int kdlb_parse_options(int argc, char **argv, kdlb_options_t *o, char *err, size_t errlen);

/* Usage text of `kdloss bench`. */
void kdlb_usage(FILE *f);

/* List parsers, each: comma-separated, no empty item, no duplicate; return
 * the number of items written to out (<= max) or -1 with err set. */
int kdlb_parse_shapes(const char *s, kdlb_shape_t *out, int max, char *err, size_t errlen);
int kdlb_parse_dtypes(const char *s, kdl_dtype_t *out, int max, char *err, size_t errlen);
int kdlb_parse_divergences(const char *s, kdl_divergence_t *out, int max, char *err,
                           size_t errlen);
int kdlb_parse_head_rules(const char *s, kdl_head_rule_t *out, int max, char *err,
                          size_t errlen);
/* "B:n:m" or "none" (batch 0).  0 on success, -1 with err set. */
int kdlb_parse_sinkhorn(const char *s, kdlb_sinkhorn_shape_t *out, char *err, size_t errlen);
/* --ops: names of kdlb_op_name or "all"; the bits, or 0 with err set. */
unsigned kdlb_parse_ops(const char *s, char *err, size_t errlen);
/* --sparse-k: k in [1, 1024] each (KDL_SPARSE_MAX_K); count or -1. */
int kdlb_parse_k_list(const char *s, int64_t *out, int max, char *err, size_t errlen);
/* --fused-shapes: N:d:V items; count or -1. */
int kdlb_parse_fused_shapes(const char *s, kdlb_fused_shape_t *out, int max, char *err,
                            size_t errlen);
/* --ragged-sizes: n:m items (or n alone: n:n), each side in [1, 65536];
 * count or -1. */
int kdlb_parse_ragged(const char *s, int64_t *n, int64_t *m, int max, char *err, size_t errlen);
/* --sinkd: "N:V:G" with G dividing N, or "none" (rows 0).  0 or -1. */
int kdlb_parse_sinkd(const char *s, kdlb_sinkd_shape_t *out, char *err, size_t errlen);

/* The fixed ragged lists: problem b is KDLB_RAGGED_*_N[b] x _M[b]. */
#define KDLB_RAGGED_DEFAULT_COUNT 24
#define KDLB_RAGGED_QUICK_COUNT 8
extern const int64_t kdlb_ragged_default_n[KDLB_RAGGED_DEFAULT_COUNT];
extern const int64_t kdlb_ragged_default_m[KDLB_RAGGED_DEFAULT_COUNT];
extern const int64_t kdlb_ragged_quick_n[KDLB_RAGGED_QUICK_COUNT];
extern const int64_t kdlb_ragged_quick_m[KDLB_RAGGED_QUICK_COUNT];

/* One loss configuration of the matrix. */
typedef struct kdlb_case {
    int shape_index, dtype_index;
    kdlb_shape_t shape;
    kdl_dtype_t dtype;
    kdl_divergence_t divergence;
    int has_head_rule;        /* 1 for AKL */
    kdl_head_rule_t head_rule;
} kdlb_case_t;

/* Number of loss configurations: shapes x dtypes x (non-AKL divergences +
 * head rules if AKL is chosen).  Order of kdlb_case_at: shape, then dtype,
 * then divergence in the given order, AKL expanded over the head rules. */
int kdlb_case_count(const kdlb_options_t *o);
int kdlb_case_at(const kdlb_options_t *o, int index, kdlb_case_t *c); /* 0 ok, -1 out of range */
/* Loss cases: kdlb_case_count when the op "loss" is chosen, else 0. */
int kdlb_loss_case_count(const kdlb_options_t *o);
/* Rows of each op the options ask for: loss cases; 1 uniform Sinkhorn;
 * sparse shapes x k values with k <= min(V, 1024); fused shapes x dtypes x
 * 2 teachers (shape, then dtype, then the teacher's logits before the
 * teacher as a linear layer); 1 ragged call; 2 SinKD rows (L1, squared L2). */
int kdlb_op_row_count(const kdlb_options_t *o, kdlb_op_t op);
/* Sum over the ops: the rows kdlb_gpu_run fills at most. */
int kdlb_row_capacity(const kdlb_options_t *o);

/* ------------------------------------------------------------ byte model */
/* rows * vocab * (size(s) + size(t) + size(g)); 0 for a negative size, an
 * unknown dtype or an overflow of uint64. */
uint64_t kdlb_loss_bytes(int64_t rows, int64_t vocab, kdl_dtype_t student, kdl_dtype_t teacher,
                         kdl_dtype_t grad);
/* 2 * B * n * m * sizeof(float); 0 on a negative size or an overflow. */
uint64_t kdlb_sinkhorn_iter_bytes(int64_t batch, int64_t n, int64_t m);
/* rows * vocab * (size(s) + size(g)) + rows * k * (8 + size(lp)); 0 on a
 * negative size, an unknown dtype or an overflow. */
uint64_t kdlb_sparse_bytes(int64_t rows, int64_t vocab, int64_t k, kdl_dtype_t student,
                           kdl_dtype_t logprobs, kdl_dtype_t grad);
/* (rows + vocab) * hidden * (size(hw) + size(g)) + rows * vocab * size(t). */
uint64_t kdlb_fused_linear_bytes(int64_t rows, int64_t hidden, int64_t vocab, kdl_dtype_t hw,
                                 kdl_dtype_t teacher, kdl_dtype_t grad);
/* The teacher as a linear layer: (rows + vocab) * hidden * (size(hw) +
 * size(g)) + (rows + vocab) * teacher_hidden * size(t) (t: H_t's and W_t's
 * dtype); 0 on a negative size, an unknown dtype or an overflow. */
uint64_t kdlb_fused_linear_tl_bytes(int64_t rows, int64_t hidden, int64_t teacher_hidden, int64_t vocab,
                                    kdl_dtype_t hw, kdl_dtype_t teacher, kdl_dtype_t grad);
/* The gradient dtype of a fused_linear row with H and W in hw: F32 for F32,
 * hw itself for BF16 and F16 (what autograd gives a 16-bit parameter);
 * F32 for anything else. */
kdl_dtype_t kdlb_fused_grad_dtype(kdl_dtype_t hw);
/* rows * vocab * size(dtype): the logits a non-fused call materialises in
 * that dtype; 0 on a negative size, an unknown dtype or an overflow. */
uint64_t kdlb_logits_bytes(int64_t rows, int64_t vocab, kdl_dtype_t dtype);
/* The logits a non-fused fused_linear row materialises in dtype: the
 * student's, rows * vocab * size(dtype), and with teacher_linear the
 * teacher's too (twice that); 0 as kdlb_logits_bytes. */
uint64_t kdlb_fused_logits_bytes(int64_t rows, int64_t vocab, kdl_dtype_t dtype, int teacher_linear);
/* rows * vocab * 4: the float32 logits (kdlb_logits_bytes at F32). */
uint64_t kdlb_logits_f32_bytes(int64_t rows, int64_t vocab);
/* peak / logits, NaN when peak < 0 (unknown) or logits == 0. */
double kdlb_peak_over_logits(int64_t peak_extra_bytes, uint64_t logits_bytes);
/* sum_b 2 * n[b] * m[b] * 4; 0 on a negative size or an overflow. */
uint64_t kdlb_ragged_iter_bytes(const int64_t *n, const int64_t *m, int count);

/* --------------------------------------------------------------- numbers */
/* bytes / (ms * 1e-3) / 1e9; NaN when ms is not finite and > 0. */
double kdlb_gb_per_s(uint64_t bytes, double ms);
/* A device-to-device copy of buffer_bytes moves 2 * buffer_bytes. */
double kdlb_copy_gb_per_s(uint64_t buffer_bytes, double ms);
/* gb_per_s / copy_gb_per_s; NaN when either is not finite or copy <= 0. */
double kdlb_fraction_of_copy(double gb_per_s, double copy_gb_per_s);

/* p-th percentile (0 <= p <= 100) with linear interpolation between the
 * closest ranks (numpy's default): sorted x, position p/100 * (n - 1).
 * x is not modified.  NaN for n == 0, p out of range or an allocation
 * failure. */
double kdlb_percentile(const double *x, size_t n, double p);
double kdlb_median(const double *x, size_t n);

typedef struct kdlb_summary {
    double median, p20, p80, min, max;
    size_t n;
} kdlb_summary_t;
void kdlb_summarize(const double *x, size_t n, kdlb_summary_t *s);

/* ------------------------------------------------------------------ rows */
typedef struct kdlb_row {
    const char *impl;          /* "kdloss", "torch_eager", ...                 */
    const char *op;            /* kdlb_op_name: "loss", "sinkhorn", "sparse", ... */
    const char *dtype;         /* "bf16", "f32", ...                           */
    /* op "loss" (sparse, fused_linear: divergence, rows, vocab too) */
    const char *divergence;    /* "fkl", ...                                   */
    const char *head_rule;     /* AKL: "reference" | "mass" | "topk"; else NULL */
    int64_t rows, vocab;
    /* op "sinkhorn" (sinkhorn_ragged: batch, n = sum n_b, m = sum m_b, iterations;
     * sinkd: iterations) */
    int64_t batch, n, m, iterations;
    /* op "sparse" */
    const char *mode;          /* "renormalised"                               */
    int64_t k;
    /* op "fused_linear" */
    int64_t hidden, chunk_rows;
    const char *grad_dtype;    /* of dH, dW: "f32", or the inputs' "bf16" / "f16" */
    uint64_t logits_bytes;     /* rows * vocab * 4: the f32 logits materialised (kdlb_fused_logits_bytes) */
    uint64_t logits_dtype_bytes; /* rows * vocab * size(dtype): in the row's dtype */
    int64_t teacher_hidden;    /* 0: the teacher's logits given; > 0: the teacher as a linear
                                * layer H_t [rows, teacher_hidden] W_t^T (both logits_* doubled) */
    /* op "sinkhorn_ragged": problem b is sizes_n[b] x sizes_m[b] (batch of them) */
    const int64_t *sizes_n, *sizes_m;
    /* op "sinkd" */
    const char *metric;        /* "l1" | "sqeuclidean"                         */
    int64_t group_size;
    /* results */
    const char *status;        /* "ok", "not_implemented", "mismatch", "oom", "error" */
    double ms;                 /* median; Sinkhorn: per iteration              */
    double ms_p20, ms_p80;
    int repeats;
    uint64_t bytes;            /* byte model of one run (Sinkhorn: one iteration) */
    double gb_per_s;
    double fraction_of_copy_bandwidth;
    int64_t peak_extra_bytes;  /* device bytes beyond inputs and outputs; -1 unknown */
    double check_rel_err;      /* vs the float64 reference; NaN: not checked   */
    const char *note;          /* reason for a status other than "ok"; may be NULL */
} kdlb_row_t;

/* A row with every number NaN / 0 / -1 and status "error". */
void kdlb_row_init(kdlb_row_t *r);
/* Fills ms, ms_p20, ms_p80, repeats, gb_per_s and the fraction from the
 * timed samples (ms each), r->bytes and the copy bandwidth. */
void kdlb_row_set_times(kdlb_row_t *r, const double *ms, size_t n, double copy_gb_per_s);

/* ------------------------------------------------------------------ JSON */
/* Writes the JSON object of one row into buf (NUL-terminated).  Returns the
 * length it needs (as snprintf), so a result >= len means truncated.
 * Keys, in this order: impl, op, then the op's keys:
 *   loss             divergence, dtype, rows, vocab, head_rule
 *   sinkhorn         dtype, batch, n, m, iterations
 *   sparse           divergence, mode, dtype, rows, vocab, k
 *   fused_linear     divergence, dtype, grad_dtype, rows, hidden, vocab,
 *                    chunk_rows, logits_bytes, logits_dtype_bytes, teacher
 *                    ("logits" or "linear"), teacher_hidden (null for
 *                    "logits")
 *   sinkhorn_ragged  dtype, batch, n, m, iterations, sizes_n, sizes_m
 *                    (arrays of batch integers; n, m their sums)
 *   sinkd            metric, dtype, rows, vocab, group_size, iterations
 * then status, ms, ms_p20, ms_p80, repeats, bytes, gb_per_s,
 * fraction_of_copy_bandwidth, peak_extra_bytes, check_rel_err, note.
 * Numbers: integers in decimal, reals with %.6g, NaN and infinities as
 * null; absent strings (and absent size arrays) as null. */
int kdlb_json_row(const kdlb_row_t *r, char *buf, size_t len);

/* Writes s as a JSON string literal (quotes included) into buf. */
int kdlb_json_string(const char *s, char *buf, size_t len);

typedef struct kdlb_meta {
    const char *date;          /* ISO 8601 UTC, "2026-11-23T12:00:00Z"    */
    const char *commit;
    char device_name[256];
    int cc_major, cc_minor, sm_count;
    uint64_t l2_bytes, memory_bytes;
    int driver_version, runtime_version; /* CUDA's encoding, 13000 = 13.0 */
    double copy_gb_per_s;
    uint64_t copy_bytes;       /* size of the copied buffer               */
    uint64_t l2_flush_bytes;   /* bytes written between timed runs        */
    const kdlb_options_t *options;
} kdlb_meta_t;

/* The whole document: {"schema": "kdloss-bench/1", "meta": {...},
 * "rows": [ ... ]}, one row per line.  Returns 0, or -1 on a write error. */
int kdlb_json_write(FILE *f, const kdlb_meta_t *m, const kdlb_row_t *rows, size_t n_rows);

/* Writes the document to path through path + ".tmp" and a rename, so a
 * failed run leaves no partial file.  0 ok, -1 with err set. */
int kdlb_json_write_file(const char *path, const kdlb_meta_t *m, const kdlb_row_t *rows,
                         size_t n_rows, char *err, size_t errlen);

/* ------------------------------------------------------------- file names */
/* Device name as a file-name part: every run of characters outside
 * [A-Za-z0-9] becomes one '-', none at either end ("NVIDIA H100 80GB HBM3"
 * -> "NVIDIA-H100-80GB-HBM3"); "unknown" when nothing is left. */
void kdlb_slug(const char *in, char *out, size_t len);
/* "<date>-<slug(device)>-<commit>.json", date as YYYY-MM-DD. */
int kdlb_result_name(const char *date_ymd, const char *device, const char *commit, char *out,
                     size_t len);

/* ----------------------------------------------------------------- table */
/* What a row is, in one short string (progress line, table): e.g.
 * "fkl/- bf16 8192x151936", "sparse fkl k=64 bf16 8192x151936",
 * "fused_linear jsd f32 4096x4096x151936" (with grad_dtype set: "fused_linear
 * jsd bf16 grad=bf16 4096x4096x151936"; the teacher as a linear layer adds
 * " teacher=linear:4096", its d_t), "sinkhorn_ragged f32 24 problems
 * (64..2048)", "sinkd l1 bf16 512x32000/64".  Returns snprintf's length. */
int kdlb_row_label(const kdlb_row_t *r, char *buf, size_t len);

/* One line per row: impl, divergence/op, head rule, dtype, shape, ms, GB/s,
 * % of copy bandwidth, status; fused_linear rows with a known peak add
 * "peak/logits <dtype> X, f32 Y" (kdlb_peak_over_logits against
 * logits_dtype_bytes and logits_bytes). */
void kdlb_print_table(FILE *f, const kdlb_row_t *rows, size_t n_rows, double copy_gb_per_s);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_BENCH_LIB_H */
