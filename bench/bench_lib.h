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
    const char *json_out;     /* NULL: no JSON file                      */
    const char *commit;       /* recorded in the JSON, "unknown" default */
} kdlb_options_t;

/* Defaults: shapes 4096:32000,8192:128256,8192:151936; dtypes bf16,f32; all
 * divergences; all head rules; repeats 20; warmup 5; mu 0.5; top_k 64;
 * check on; Sinkhorn 64:1024:1024 for 100 iterations; no JSON; commit
 * "unknown".  --quick: shapes 4096:32000, dtype bf16, head rule reference,
 * repeats 5, warmup 2, no Sinkhorn, unless those options are given too
 * (explicit options win whatever their order). */
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

/* ------------------------------------------------------------ byte model */
/* rows * vocab * (size(s) + size(t) + size(g)); 0 for a negative size, an
 * unknown dtype or an overflow of uint64. */
uint64_t kdlb_loss_bytes(int64_t rows, int64_t vocab, kdl_dtype_t student, kdl_dtype_t teacher,
                         kdl_dtype_t grad);
/* 2 * B * n * m * sizeof(float); 0 on a negative size or an overflow. */
uint64_t kdlb_sinkhorn_iter_bytes(int64_t batch, int64_t n, int64_t m);

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
    const char *op;            /* "loss" or "sinkhorn"                         */
    const char *dtype;         /* "bf16", "f32", ...                           */
    /* op "loss" */
    const char *divergence;    /* "fkl", ...                                   */
    const char *head_rule;     /* AKL: "reference" | "mass" | "topk"; else NULL */
    int64_t rows, vocab;
    /* op "sinkhorn" */
    int64_t batch, n, m, iterations;
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
 * Keys, in this order: loss rows: impl, op, divergence, dtype, rows, vocab,
 * head_rule, status, ms, ms_p20, ms_p80, repeats, bytes, gb_per_s,
 * fraction_of_copy_bandwidth, peak_extra_bytes, check_rel_err, note;
 * Sinkhorn rows: impl, op, dtype, batch, n, m, iterations, then status on as
 * for loss rows.  Numbers: integers in decimal, reals with %.6g, NaN and
 * infinities as null; absent strings as null. */
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
/* One line per row: impl, divergence/op, head rule, dtype, shape, ms, GB/s,
 * % of copy bandwidth, status. */
void kdlb_print_table(FILE *f, const kdlb_row_t *rows, size_t n_rows, double copy_gb_per_s);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_BENCH_LIB_H */
