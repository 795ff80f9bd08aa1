/* tests/test_bench.c - the CPU half of the benchmark (bench/bench_lib.c):
 * byte model against closed forms, GB/s and fraction arithmetic,
 * percentiles on known arrays, the JSON writer (exact strings, and they
 * parse), matrix and option parsing with bad input, file names; and
 * `kdloss bench` without a GPU: exit code 2 and one line.
 *
 * bench_lib.c is compiled into this test directly (the bench/ target is
 * defined before tests/ and is not linked here). */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../bench/bench_lib.c"
#include "kdl_cli_run.h"
#include "kdl_test.h"

/* The no-device path can only be seen where there is no device. */
#define KDL_SKIP_IF_GPU_PRESENT()                                                        \
    do {                                                                                 \
        if (kdl_test_have_gpu()) cr_skip_test("a CUDA device is present: no-device path"); \
    } while (0)

/* ------------------------------------------------------- a JSON checker */
/* kdl_json_valid (kdl_cli_run.h): 1 when s is one RFC 8259 JSON value. */

Test(bench_json_checker, accepts_and_rejects)
{
    cr_expect(kdl_json_valid("{\"a\": [1, -2.5e-3, true, null, \"x\\n\"]}"));
    cr_expect(!kdl_json_valid("{\"a\": nan}"));
    cr_expect(!kdl_json_valid("{\"a\": 1,}"));
    cr_expect(!kdl_json_valid("[01]"));
}

/* ------------------------------------------------------------ byte model */
/* Expected byte counts of kdlb_loss_bytes / kdlb_sparse_bytes. */
typedef struct bytes_case {
    int64_t rows, vocab, k; /* k: sparse only */
    kdl_dtype_t a, b, c;    /* the three dtypes the model takes */
    uint64_t want;
} bytes_case_t;

#define BF16 KDL_DTYPE_BF16
#define F16 KDL_DTYPE_F16
#define F32 KDL_DTYPE_F32

static void expect_bytes(uint64_t (*model)(const bytes_case_t *), const bytes_case_t *cases, size_t n)
{
    for (size_t i = 0; i < n; i++)
        cr_expect_eq(model(&cases[i]), cases[i].want, "case %zu: %lld x %lld (k %lld)", i, (long long)cases[i].rows,
                     (long long)cases[i].vocab, (long long)cases[i].k);
}

static uint64_t loss_model(const bytes_case_t *c) { return kdlb_loss_bytes(c->rows, c->vocab, c->a, c->b, c->c); }

static uint64_t sparse_model(const bytes_case_t *c)
{
    return kdlb_sparse_bytes(c->rows, c->vocab, c->k, c->a, c->b, c->c);
}

#define N_CASES(t) (sizeof(t) / sizeof((t)[0]))

Test(bench_bytes, loss_closed_forms_per_dtype_and_shape)
{
    /* N * V * 3 * size: bf16/f16 2 bytes, f32 4 bytes; the mixed row: bf16
     * student, f32 teacher, f32 gradient = 2 + 4 + 4 bytes. */
    const bytes_case_t cases[] = {
        {4096, 32000, 0, BF16, BF16, BF16, UINT64_C(786432000)},
        {4096, 32000, 0, F16, F16, F16, UINT64_C(786432000)},
        {4096, 32000, 0, F32, F32, F32, UINT64_C(1572864000)},
        {8192, 128256, 0, BF16, BF16, BF16, UINT64_C(6304038912)},
        {8192, 128256, 0, F32, F32, F32, UINT64_C(12608077824)},
        {8192, 151936, 0, BF16, BF16, BF16, UINT64_C(7467958272)},
        {8192, 151936, 0, F32, F32, F32, UINT64_C(14935916544)},
        {8192, 151936, 0, BF16, F32, F32, UINT64_C(12446597120)},
        {0, 151936, 0, BF16, BF16, BF16, 0},
    };
    expect_bytes(loss_model, cases, N_CASES(cases));
}

Test(bench_bytes, loss_bad_inputs_give_zero)
{
    const bytes_case_t cases[] = {
        {-1, 10, 0, F32, F32, F32, 0},
        {10, -1, 0, F32, F32, F32, 0},
        {10, 10, 0, (kdl_dtype_t)99, F32, F32, 0},
        {INT64_MAX, INT64_MAX, 0, F32, F32, F32, 0},
        {INT64_C(1) << 40, INT64_C(1) << 22, 0, F32, F32, F32, 0}, /* 2^62 elements * 12 bytes overflows */
    };
    expect_bytes(loss_model, cases, N_CASES(cases));
}

Test(bench_bytes, sinkhorn_reads_the_cost_twice_per_iteration)
{
    cr_expect_eq(kdlb_sinkhorn_iter_bytes(64, 1024, 1024), UINT64_C(536870912));
    cr_expect_eq(kdlb_sinkhorn_iter_bytes(1, 3, 5), UINT64_C(120));
    cr_expect_eq(kdlb_sinkhorn_iter_bytes(-1, 3, 5), 0u);
}

Test(bench_bytes, sparse_reads_s_and_the_topk_writes_ds)
{
    /* N V (2 + 2) + N k (8 + 2) in bf16; f32 log-probs: 8 + 4 bytes per
     * support entry */
    const bytes_case_t cases[] = {
        {8192, 151936, 8, BF16, BF16, BF16, UINT64_C(4979294208)},
        {8192, 151936, 64, BF16, BF16, BF16, UINT64_C(4983881728)},
        {8192, 151936, 1024, BF16, BF16, BF16, UINT64_C(5062524928)},
        {4096, 32000, 64, BF16, BF16, BF16, UINT64_C(526909440)},
        {2, 10, 3, BF16, F32, F32, UINT64_C(2 * 10 * 6 + 2 * 3 * 12)},
        {-1, 10, 3, BF16, BF16, BF16, 0},
        {1, 10, 3, (kdl_dtype_t)9, BF16, BF16, 0},
        {INT64_C(1) << 40, INT64_C(1) << 22, 1, F32, F32, F32, 0},
    };
    expect_bytes(sparse_model, cases, N_CASES(cases));
}

Test(bench_bytes, fused_linear_and_materialised_logits)
{
    /* (N + V) d (4 + 4) + N V 4 at f32 */
    cr_expect_eq(kdlb_fused_linear_bytes(4096, 4096, 151936, KDL_DTYPE_F32, KDL_DTYPE_F32, KDL_DTYPE_F32),
                 UINT64_C(7602176000));
    cr_expect_eq(kdlb_fused_linear_bytes(1024, 1024, 32000, KDL_DTYPE_F32, KDL_DTYPE_F32, KDL_DTYPE_F32),
                 UINT64_C(401604608));
    cr_expect_eq(kdlb_fused_linear_bytes(1, 2, 3, KDL_DTYPE_BF16, KDL_DTYPE_BF16, KDL_DTYPE_F32),
                 UINT64_C((1 + 3) * 2 * 6 + 1 * 3 * 2));
    cr_expect_eq(kdlb_logits_f32_bytes(4096, 151936), UINT64_C(2489319424));
    cr_expect_eq(kdlb_logits_f32_bytes(8192, 151936), UINT64_C(4978638848));
    cr_expect_eq(kdlb_logits_f32_bytes(-1, 3), 0u);
    cr_expect_eq(kdlb_fused_linear_bytes(1, -2, 3, KDL_DTYPE_F32, KDL_DTYPE_F32, KDL_DTYPE_F32), 0u);
}

Test(bench_bytes, fused_linear_16_bit_rows)
{
    /* a 16-bit row: H, W, T and dH, dW all 2 bytes, (N + V) d (2 + 2) + N V 2 */
    cr_expect_eq(kdlb_fused_grad_dtype(KDL_DTYPE_BF16), KDL_DTYPE_BF16);
    cr_expect_eq(kdlb_fused_grad_dtype(KDL_DTYPE_F16), KDL_DTYPE_F16);
    cr_expect_eq(kdlb_fused_grad_dtype(KDL_DTYPE_F32), KDL_DTYPE_F32);
    cr_expect_eq(kdlb_fused_grad_dtype(KDL_DTYPE_F64), KDL_DTYPE_F32);
    cr_expect_eq(kdlb_fused_linear_bytes(4096, 4096, 151936, KDL_DTYPE_BF16, KDL_DTYPE_BF16,
                                         kdlb_fused_grad_dtype(KDL_DTYPE_BF16)),
                 UINT64_C(3801088000)); /* 156032 * 4096 * 4 + 4096 * 151936 * 2 */
    cr_expect_eq(kdlb_fused_linear_bytes(1024, 1024, 32000, KDL_DTYPE_F16, KDL_DTYPE_F16, KDL_DTYPE_F16),
                 UINT64_C(200802304)); /* 33024 * 1024 * 4 + 1024 * 32000 * 2 */
    /* half the f32 row's bytes: every tensor is half as wide */
    cr_expect_eq(2 * kdlb_fused_linear_bytes(1024, 1024, 32000, KDL_DTYPE_BF16, KDL_DTYPE_BF16, KDL_DTYPE_BF16),
                 kdlb_fused_linear_bytes(1024, 1024, 32000, KDL_DTYPE_F32, KDL_DTYPE_F32, KDL_DTYPE_F32));
    /* the logits materialised in the row's dtype and in f32 */
    cr_expect_eq(kdlb_logits_bytes(4096, 151936, KDL_DTYPE_BF16), UINT64_C(1244659712));
    cr_expect_eq(kdlb_logits_bytes(4096, 151936, KDL_DTYPE_F32), kdlb_logits_f32_bytes(4096, 151936));
    cr_expect_eq(kdlb_logits_bytes(1024, 32000, KDL_DTYPE_F16), UINT64_C(65536000));
    cr_expect_eq(kdlb_logits_bytes(1, 1, (kdl_dtype_t)9), 0u);
    cr_expect_eq(kdlb_logits_bytes(-1, 1, KDL_DTYPE_BF16), 0u);
    cr_expect_eq(kdlb_logits_bytes(INT64_C(1) << 62, 8, KDL_DTYPE_BF16), 0u); /* overflow */
    /* the workspace of the library's 16-bit default chunk (docs/extensions.md
     * "Memory model"), at N = 4096: c = 4096 / 24 = 170, c V 4 + c V 2 +
     * 256 + align256(c 4) + 256 = 103,316,480 + 51,658,240 + 256 + 768 + 256
     * = 154,976,000 bytes: 0.1245 of the bf16 logits, half that of f32 */
    const double pd = kdlb_peak_over_logits(154976000, kdlb_logits_bytes(4096, 151936, KDL_DTYPE_BF16));
    cr_expect(fabs(pd - 154976000.0 / 1244659712.0) < 1e-15, "%g", pd);
    cr_expect(pd > 0.1245 && pd <= 0.125, "%g", pd);
    cr_expect(fabs(kdlb_peak_over_logits(154976000, kdlb_logits_f32_bytes(4096, 151936)) - pd / 2) < 1e-15);
    cr_expect(isnan(kdlb_peak_over_logits(-1, 100)));
    cr_expect(isnan(kdlb_peak_over_logits(5, 0)));
}

/* The teacher as a linear layer (H_t [N, d_t], W_t [V, d_t] read instead
 * of T [N, V]), and the logits a non-fused call materialises: both. */
Test(bench_bytes, fused_linear_teacher_as_a_linear_layer)
{
    /* (N + V) d (2 + 2) + (N + V) d_t 2 = 156032 * 4096 * 4 + 156032 * 4096 * 2 */
    cr_expect_eq(kdlb_fused_linear_tl_bytes(4096, 4096, 4096, 151936, KDL_DTYPE_BF16, KDL_DTYPE_BF16, KDL_DTYPE_BF16),
                 UINT64_C(3834642432));
    /* f32: 156032 * 4096 * 8 + 156032 * 4096 * 4 */
    cr_expect_eq(kdlb_fused_linear_tl_bytes(4096, 4096, 4096, 151936, KDL_DTYPE_F32, KDL_DTYPE_F32, KDL_DTYPE_F32),
                 UINT64_C(7669284864));
    /* d_t != d and mixed sizes: (1 + 5) 2 (2 + 4) + (1 + 5) 3 2 = 72 + 36 */
    cr_expect_eq(kdlb_fused_linear_tl_bytes(1, 2, 3, 5, KDL_DTYPE_BF16, KDL_DTYPE_BF16, KDL_DTYPE_F32), UINT64_C(108));
    /* f16 teacher with an f32 student: (1 + 5) 2 8 + (1 + 5) 3 2 = 96 + 36 */
    cr_expect_eq(kdlb_fused_linear_tl_bytes(1, 2, 3, 5, KDL_DTYPE_F32, KDL_DTYPE_F16, KDL_DTYPE_F32), UINT64_C(132));
    cr_expect_eq(kdlb_fused_linear_tl_bytes(1, 2, -3, 5, KDL_DTYPE_F32, KDL_DTYPE_F32, KDL_DTYPE_F32), 0u);
    cr_expect_eq(kdlb_fused_linear_tl_bytes(1, 2, 3, 5, KDL_DTYPE_F32, (kdl_dtype_t)9, KDL_DTYPE_F32), 0u);
    cr_expect_eq(kdlb_fused_linear_tl_bytes(1, 2, INT64_C(1) << 62, 5, KDL_DTYPE_F32, KDL_DTYPE_F32, KDL_DTYPE_F32),
                 0u); /* overflow */
    /* the logits avoided: the student's, and with the teacher as a linear layer the teacher's too */
    cr_expect_eq(kdlb_fused_logits_bytes(4096, 151936, KDL_DTYPE_BF16, 0), UINT64_C(1244659712));
    cr_expect_eq(kdlb_fused_logits_bytes(4096, 151936, KDL_DTYPE_BF16, 1), UINT64_C(2489319424));
    cr_expect_eq(kdlb_fused_logits_bytes(4096, 151936, KDL_DTYPE_F32, 1), UINT64_C(4978638848));
    cr_expect_eq(kdlb_fused_logits_bytes(1024, 32000, KDL_DTYPE_F16, 1), UINT64_C(131072000));
    cr_expect_eq(kdlb_fused_logits_bytes(-1, 3, KDL_DTYPE_F32, 1), 0u);
    cr_expect_eq(kdlb_fused_logits_bytes(INT64_C(1) << 60, 4, KDL_DTYPE_BF16, 0), UINT64_C(1) << 63);
    cr_expect_eq(kdlb_fused_logits_bytes(INT64_C(1) << 60, 4, KDL_DTYPE_BF16, 1), 0u); /* 2^64: overflow */
    /* the library's bf16 workspace with the teacher's f32 logits chunk too (docs/extensions.md
     * "Memory model"): default chunk c = N / 40 = 102 rows, c V 4 (logits) + c V 4 (the teacher's)
     * + c V 2 (dL) + 256 + align256(c 4) + 256 = 61,989,888 * 2 + 30,994,944 + 256 + 512 + 256
     * = 154,975,744 bytes: 0.0623 of the two bf16 logits */
    const double pd = kdlb_peak_over_logits(154975744, kdlb_fused_logits_bytes(4096, 151936, KDL_DTYPE_BF16, 1));
    cr_expect(fabs(pd - 154975744.0 / 2489319424.0) < 1e-15 && pd > 0.0622 && pd < 0.0623, "%g", pd);
}

Test(bench_bytes, ragged_sums_the_uniform_model_over_problems)
{
    cr_expect_eq(kdlb_ragged_iter_bytes(kdlb_ragged_default_n, kdlb_ragged_default_m,
                                        KDLB_RAGGED_DEFAULT_COUNT),
                 UINT64_C(87236608));
    cr_expect_eq(kdlb_ragged_iter_bytes(kdlb_ragged_quick_n, kdlb_ragged_quick_m,
                                        KDLB_RAGGED_QUICK_COUNT),
                 UINT64_C(3440640));
    const int64_t n[] = {1024, 3}, m[] = {1024, 5};
    /* one problem: the uniform model with B = 1 */
    cr_expect_eq(kdlb_ragged_iter_bytes(n, m, 1), kdlb_sinkhorn_iter_bytes(1, 1024, 1024));
    cr_expect_eq(kdlb_ragged_iter_bytes(n, m, 2), UINT64_C(8388608 + 120));
    const int64_t bad[] = {4, -1};
    cr_expect_eq(kdlb_ragged_iter_bytes(bad, m, 2), 0u);
    cr_expect_eq(kdlb_ragged_iter_bytes(NULL, m, 1), 0u);
    cr_expect_eq(kdlb_ragged_iter_bytes(NULL, NULL, 0), 0u);
    /* the default list spans 64 to 2048 on both sides */
    int64_t lo = INT64_MAX, hi = 0;
    for (int b = 0; b < KDLB_RAGGED_DEFAULT_COUNT; b++) {
        int64_t v[2] = {kdlb_ragged_default_n[b], kdlb_ragged_default_m[b]};
        for (int k = 0; k < 2; k++) {
            lo = v[k] < lo ? v[k] : lo;
            hi = v[k] > hi ? v[k] : hi;
        }
    }
    cr_expect(lo == 64 && hi == 2048);
}

/* ------------------------------------------------------------- numbers */
Test(bench_numbers, gb_per_s_and_fraction)
{
    cr_expect_float_eq(kdlb_gb_per_s(UINT64_C(3000000000), 1.0), 3000.0, 1e-9);
    cr_expect_float_eq(kdlb_gb_per_s(UINT64_C(7467958272), 2.5), 2987.1833088, 1e-6);
    cr_expect_float_eq(kdlb_copy_gb_per_s(UINT64_C(1) << 30, 1.0), 2147.483648, 1e-9);
    cr_expect_float_eq(kdlb_fraction_of_copy(2700.0, 3000.0), 0.9, 1e-15);
    cr_expect(isnan(kdlb_gb_per_s(100, 0.0)));
    cr_expect(isnan(kdlb_gb_per_s(100, -1.0)));
    cr_expect(isnan(kdlb_gb_per_s(100, NAN)));
    cr_expect(isnan(kdlb_gb_per_s(100, INFINITY)));
    cr_expect(isnan(kdlb_fraction_of_copy(1.0, 0.0)));
    cr_expect(isnan(kdlb_fraction_of_copy(1.0, NAN)));
    cr_expect(isnan(kdlb_fraction_of_copy(NAN, 3000.0)));
}

Test(bench_numbers, percentiles_on_known_arrays)
{
    const double a[] = {5, 1, 4, 2, 3};
    cr_expect_float_eq(kdlb_median(a, 5), 3.0, 1e-15);
    cr_expect_float_eq(kdlb_percentile(a, 5, 20.0), 1.8, 1e-12);
    cr_expect_float_eq(kdlb_percentile(a, 5, 80.0), 4.2, 1e-12);
    cr_expect_float_eq(kdlb_percentile(a, 5, 0.0), 1.0, 1e-15);
    cr_expect_float_eq(kdlb_percentile(a, 5, 100.0), 5.0, 1e-15);
    cr_expect_eq(a[0], 5.0); /* input untouched */
    const double b[] = {4, 1, 3, 2};
    cr_expect_float_eq(kdlb_median(b, 4), 2.5, 1e-15);
    cr_expect_float_eq(kdlb_percentile(b, 4, 25.0), 1.75, 1e-12);
    const double c[] = {7.5};
    cr_expect_eq(kdlb_median(c, 1), 7.5);
    cr_expect_eq(kdlb_percentile(c, 1, 90.0), 7.5);
    cr_expect(isnan(kdlb_median(a, 0)));
    cr_expect(isnan(kdlb_percentile(a, 5, -1.0)));
    cr_expect(isnan(kdlb_percentile(a, 5, 100.5)));
    kdlb_summary_t s;
    kdlb_summarize(a, 5, &s);
    cr_expect_eq(s.min, 1.0);
    cr_expect_eq(s.max, 5.0);
    cr_expect_eq(s.n, 5u);
}

Test(bench_numbers, row_times_from_samples)
{
    kdlb_row_t r;
    kdlb_row_init(&r);
    r.bytes = UINT64_C(3000000000);
    const double ms[] = {1.2, 1.0, 0.9, 1.1, 5.0}; /* one outlier: the median ignores it */
    kdlb_row_set_times(&r, ms, 5, 4000.0);
    cr_expect_float_eq(r.ms, 1.1, 1e-12);
    cr_expect_eq(r.repeats, 5);
    cr_expect_float_eq(r.gb_per_s, 3000.0 / 1.1, 1e-9);
    cr_expect_float_eq(r.fraction_of_copy_bandwidth, 3000.0 / 1.1 / 4000.0, 1e-12);
    cr_expect_float_eq(r.ms_p20, 0.98, 1e-12);
    cr_expect_float_eq(r.ms_p80, 1.96, 1e-12);
}

/* ------------------------------------------------------------------ JSON */
/* A fresh row of op (the default "loss" when NULL) with its divergence,
 * dtype and [rows, vocab] shape. */
static kdlb_row_t new_row(const char *op, const char *divergence, const char *dtype, int64_t rows, int64_t vocab)
{
    kdlb_row_t r;
    kdlb_row_init(&r);
    if (op) r.op = op;
    r.divergence = divergence;
    r.dtype = dtype;
    r.rows = rows;
    r.vocab = vocab;
    return r;
}

/* A row that ran: status ok, the times of 20 repeats, and its bandwidth
 * against a 3000 GB/s copy. */
static void set_ok_times(kdlb_row_t *r, double ms, double p20, double p80, uint64_t bytes)
{
    r->status = "ok";
    r->ms = ms;
    r->ms_p20 = p20;
    r->ms_p80 = p80;
    r->repeats = 20;
    r->bytes = bytes;
    r->gb_per_s = kdlb_gb_per_s(r->bytes, r->ms);
    r->fraction_of_copy_bandwidth = kdlb_fraction_of_copy(r->gb_per_s, 3000.0);
}

Test(bench_json, loss_row_exact_string)
{
    kdlb_row_t r = new_row(NULL, "akl", "bf16", 8192, 151936);
    r.head_rule = "reference";
    set_ok_times(&r, 2.5, 2.4, 2.625, UINT64_C(7467958272));
    r.peak_extra_bytes = 0;
    r.check_rel_err = 0.00123;
    char buf[1024];
    int n = kdlb_json_row(&r, buf, sizeof buf);
    const char *want =
        "{\"impl\": \"kdloss\", \"op\": \"loss\", \"divergence\": \"akl\", \"dtype\": \"bf16\", "
        "\"rows\": 8192, \"vocab\": 151936, \"head_rule\": \"reference\", \"status\": \"ok\", "
        "\"ms\": 2.5, \"ms_p20\": 2.4, \"ms_p80\": 2.625, \"repeats\": 20, \"bytes\": 7467958272, "
        "\"gb_per_s\": 2987.18, \"fraction_of_copy_bandwidth\": 0.995728, \"peak_extra_bytes\": 0, "
        "\"check_rel_err\": 0.00123, \"note\": null}";
    cr_expect_str_eq(buf, want);
    cr_expect_eq(n, (int)strlen(want));
    cr_expect(kdl_json_valid(buf));
}

Test(bench_json, sinkhorn_row_nulls_and_escapes)
{
    kdlb_row_t r;
    kdlb_row_init(&r);
    r.op = "sinkhorn";
    r.dtype = "f32";
    r.batch = 64;
    r.n = 1024;
    r.m = 1024;
    r.iterations = 100;
    r.status = "not_implemented";
    r.bytes = kdlb_sinkhorn_iter_bytes(64, 1024, 1024);
    r.note = "kdl_sinkhorn \"TODO\"\n\x01";
    char buf[1024];
    kdlb_json_row(&r, buf, sizeof buf);
    const char *want =
        "{\"impl\": \"kdloss\", \"op\": \"sinkhorn\", \"dtype\": \"f32\", \"batch\": 64, \"n\": 1024, "
        "\"m\": 1024, \"iterations\": 100, \"status\": \"not_implemented\", \"ms\": null, "
        "\"ms_p20\": null, \"ms_p80\": null, \"repeats\": 0, \"bytes\": 536870912, "
        "\"gb_per_s\": null, \"fraction_of_copy_bandwidth\": null, \"peak_extra_bytes\": null, "
        "\"check_rel_err\": null, \"note\": \"kdl_sinkhorn \\\"TODO\\\"\\n\\u0001\"}";
    cr_expect_str_eq(buf, want);
    cr_expect(kdl_json_valid(buf));
}

Test(bench_json, truncation_reports_the_needed_length)
{
    kdlb_row_t r;
    kdlb_row_init(&r);
    char big[1024], small[16];
    int need = kdlb_json_row(&r, big, sizeof big);
    int got = kdlb_json_row(&r, small, sizeof small);
    cr_expect_eq(got, need);
    cr_expect_eq(strlen(small), sizeof small - 1);
    cr_expect(strncmp(small, big, sizeof small - 1) == 0);
}

/* buf starts with the literal want */
static int starts_with(const char *buf, const char *want) { return !strncmp(buf, want, strlen(want)); }

Test(bench_json, other_ops_rows_exact_strings)
{
    char buf[2048];
    kdlb_row_t r = new_row("sparse", "fkl", "bf16", 8192, 151936);
    r.mode = "renormalised";
    r.k = 64;
    set_ok_times(&r, 2.0, 1.9, 2.1,
                 kdlb_sparse_bytes(8192, 151936, 64, KDL_DTYPE_BF16, KDL_DTYPE_BF16, KDL_DTYPE_BF16));
    r.peak_extra_bytes = 1024;
    kdlb_json_row(&r, buf, sizeof buf);
    cr_expect_str_eq(buf,
                     "{\"impl\": \"kdloss\", \"op\": \"sparse\", \"divergence\": \"fkl\", "
                     "\"mode\": \"renormalised\", \"dtype\": \"bf16\", \"rows\": 8192, "
                     "\"vocab\": 151936, \"k\": 64, \"status\": \"ok\", \"ms\": 2, \"ms_p20\": 1.9, "
                     "\"ms_p80\": 2.1, \"repeats\": 20, \"bytes\": 4983881728, "
                     "\"gb_per_s\": 2491.94, \"fraction_of_copy_bandwidth\": 0.830647, "
                     "\"peak_extra_bytes\": 1024, \"check_rel_err\": null, \"note\": null}");
    cr_expect(kdl_json_valid(buf));

    r = new_row("fused_linear", "jsd", "f32", 4096, 151936);
    r.grad_dtype = "f32";
    r.hidden = 4096;
    r.chunk_rows = 512;
    r.logits_bytes = kdlb_logits_f32_bytes(4096, 151936);
    r.logits_dtype_bytes = kdlb_logits_bytes(4096, 151936, KDL_DTYPE_F32);
    r.peak_extra_bytes = 311164928;
    kdlb_json_row(&r, buf, sizeof buf);
    cr_expect(starts_with(buf,
                      "{\"impl\": \"kdloss\", \"op\": \"fused_linear\", \"divergence\": \"jsd\", "
                      "\"dtype\": \"f32\", \"grad_dtype\": \"f32\", \"rows\": 4096, \"hidden\": 4096, "
                      "\"vocab\": 151936, \"chunk_rows\": 512, \"logits_bytes\": 2489319424, "
                      "\"logits_dtype_bytes\": 2489319424, \"teacher\": \"logits\", \"teacher_hidden\": null, "
                      "\"status\": \"error\", "),
              "%s", buf);
    cr_expect(strstr(buf, "\"peak_extra_bytes\": 311164928") != NULL);
    cr_expect(kdl_json_valid(buf));

    /* a bf16 row that ran: 16-bit gradients, both logits sizes, the whole line */
    r = new_row("fused_linear", "jsd", "bf16", 4096, 151936);
    r.grad_dtype = "bf16";
    r.hidden = 4096;
    r.chunk_rows = 170;
    r.logits_bytes = kdlb_logits_f32_bytes(4096, 151936);
    r.logits_dtype_bytes = kdlb_logits_bytes(4096, 151936, KDL_DTYPE_BF16);
    set_ok_times(&r, 40.0, 39.5, 40.5,
                 kdlb_fused_linear_bytes(4096, 4096, 151936, KDL_DTYPE_BF16, KDL_DTYPE_BF16, KDL_DTYPE_BF16));
    r.peak_extra_bytes = 154976000;
    r.check_rel_err = 0.0042;
    r.note = "grad_dtype bf16; check tolerance 0.022";
    kdlb_json_row(&r, buf, sizeof buf);
    cr_expect_str_eq(buf,
                     "{\"impl\": \"kdloss\", \"op\": \"fused_linear\", \"divergence\": \"jsd\", "
                     "\"dtype\": \"bf16\", \"grad_dtype\": \"bf16\", \"rows\": 4096, \"hidden\": 4096, "
                     "\"vocab\": 151936, \"chunk_rows\": 170, \"logits_bytes\": 2489319424, "
                     "\"logits_dtype_bytes\": 1244659712, \"teacher\": \"logits\", \"teacher_hidden\": null, "
                     "\"status\": \"ok\", \"ms\": 40, \"ms_p20\": 39.5, "
                     "\"ms_p80\": 40.5, \"repeats\": 20, \"bytes\": 3801088000, \"gb_per_s\": 95.0272, "
                     "\"fraction_of_copy_bandwidth\": 0.0316757, \"peak_extra_bytes\": 154976000, "
                     "\"check_rel_err\": 0.0042, \"note\": \"grad_dtype bf16; check tolerance 0.022\"}");
    cr_expect(kdl_json_valid(buf));
    /* the same row with the teacher as a linear layer: both logits avoided, the teacher's H_t, W_t read */
    r.teacher_hidden = 4096;
    r.logits_bytes = kdlb_fused_logits_bytes(4096, 151936, KDL_DTYPE_F32, 1);
    r.logits_dtype_bytes = kdlb_fused_logits_bytes(4096, 151936, KDL_DTYPE_BF16, 1);
    set_ok_times(&r, 50.0, 49.5, 50.5,
                 kdlb_fused_linear_tl_bytes(4096, 4096, 4096, 151936, KDL_DTYPE_BF16, KDL_DTYPE_BF16, KDL_DTYPE_BF16));
    r.note = NULL;
    kdlb_json_row(&r, buf, sizeof buf);
    cr_expect_str_eq(buf,
                     "{\"impl\": \"kdloss\", \"op\": \"fused_linear\", \"divergence\": \"jsd\", "
                     "\"dtype\": \"bf16\", \"grad_dtype\": \"bf16\", \"rows\": 4096, \"hidden\": 4096, "
                     "\"vocab\": 151936, \"chunk_rows\": 170, \"logits_bytes\": 4978638848, "
                     "\"logits_dtype_bytes\": 2489319424, \"teacher\": \"linear\", \"teacher_hidden\": 4096, "
                     "\"status\": \"ok\", \"ms\": 50, \"ms_p20\": 49.5, "
                     "\"ms_p80\": 50.5, \"repeats\": 20, \"bytes\": 3834642432, \"gb_per_s\": 76.6928, "
                     "\"fraction_of_copy_bandwidth\": 0.0255643, \"peak_extra_bytes\": 154976000, "
                     "\"check_rel_err\": 0.0042, \"note\": null}");
    cr_expect(kdl_json_valid(buf));
    /* a peer's row: no chunk, absent grad_dtype is null */
    r.impl = "torch_eager";
    r.grad_dtype = NULL;
    kdlb_json_row(&r, buf, sizeof buf);
    cr_expect(strstr(buf, "\"grad_dtype\": null, ") != NULL, "%s", buf);
    cr_expect(kdl_json_valid(buf));

    kdlb_row_init(&r);
    r.impl = "torch_eager";
    r.op = "sinkhorn_ragged";
    r.dtype = "f32";
    const int64_t n[] = {64, 2048, 96}, m[] = {128, 64, 96};
    r.batch = 3;
    r.n = 64 + 2048 + 96;
    r.m = 128 + 64 + 96;
    r.iterations = 100;
    r.sizes_n = n;
    r.sizes_m = m;
    kdlb_json_row(&r, buf, sizeof buf);
    cr_expect(starts_with(buf,
                      "{\"impl\": \"torch_eager\", \"op\": \"sinkhorn_ragged\", \"dtype\": \"f32\", "
                      "\"batch\": 3, \"n\": 2208, \"m\": 288, \"iterations\": 100, "
                      "\"sizes_n\": [64, 2048, 96], \"sizes_m\": [128, 64, 96], \"status\": "),
              "%s", buf);
    cr_expect(kdl_json_valid(buf));
    r.sizes_n = r.sizes_m = NULL; /* absent arrays are null */
    kdlb_json_row(&r, buf, sizeof buf);
    cr_expect(strstr(buf, "\"sizes_n\": null, \"sizes_m\": null") != NULL, "%s", buf);
    cr_expect(kdl_json_valid(buf));

    r = new_row("sinkd", NULL, "bf16", 512, 32000);
    r.metric = "l1";
    r.group_size = 64;
    r.iterations = 20;
    kdlb_json_row(&r, buf, sizeof buf);
    cr_expect(starts_with(buf,
                      "{\"impl\": \"kdloss\", \"op\": \"sinkd\", \"metric\": \"l1\", \"dtype\": \"bf16\", "
                      "\"rows\": 512, \"vocab\": 32000, \"group_size\": 64, \"iterations\": 20, "
                      "\"status\": \"error\""),
              "%s", buf);
    cr_expect(kdl_json_valid(buf));
}

Test(bench_json, ragged_row_of_64_problems_fits_the_document_line)
{
    kdlb_options_t o;
    kdlb_options_default(&o);
    kdlb_row_t r;
    kdlb_row_init(&r);
    int64_t n[KDLB_MAX_RAGGED], m[KDLB_MAX_RAGGED];
    for (int i = 0; i < KDLB_MAX_RAGGED; i++) n[i] = m[i] = 65536;
    r.op = "sinkhorn_ragged";
    r.batch = KDLB_MAX_RAGGED;
    r.sizes_n = n;
    r.sizes_m = m;
    r.note = "a note of some length, as the harness writes them: 200 characters at most .........";
    char buf[2048];
    int need = kdlb_json_row(&r, buf, sizeof buf);
    cr_expect(need < (int)sizeof buf, "%d", need); /* kdlb_json_write's line buffer */
    cr_expect(kdl_json_valid(buf));
}

Test(bench_json, row_labels)
{
    char s[160];
    kdlb_row_t r = new_row(NULL, "akl", "bf16", 8192, 151936);
    r.head_rule = "mass";
    kdlb_row_label(&r, s, sizeof s);
    cr_expect_str_eq(s, "akl/mass bf16 8192x151936");
    r.op = "sparse";
    r.divergence = "fkl";
    r.head_rule = NULL;
    r.k = 64;
    kdlb_row_label(&r, s, sizeof s);
    cr_expect_str_eq(s, "sparse fkl k=64 bf16 8192x151936");
    r.op = "fused_linear";
    r.divergence = "jsd";
    r.dtype = "f32";
    r.rows = 4096;
    r.hidden = 4096;
    kdlb_row_label(&r, s, sizeof s);
    cr_expect_str_eq(s, "fused_linear jsd f32 4096x4096x151936");
    r.dtype = "bf16";
    r.grad_dtype = "bf16";
    kdlb_row_label(&r, s, sizeof s);
    cr_expect_str_eq(s, "fused_linear jsd bf16 grad=bf16 4096x4096x151936");
    r.teacher_hidden = 2048;
    kdlb_row_label(&r, s, sizeof s);
    cr_expect_str_eq(s, "fused_linear jsd bf16 grad=bf16 4096x4096x151936 teacher=linear:2048");
    r.teacher_hidden = 0;
    r.grad_dtype = NULL;
    r.dtype = "f32";
    r.op = "sinkhorn_ragged";
    r.batch = KDLB_RAGGED_DEFAULT_COUNT;
    r.sizes_n = kdlb_ragged_default_n;
    r.sizes_m = kdlb_ragged_default_m;
    kdlb_row_label(&r, s, sizeof s);
    cr_expect_str_eq(s, "sinkhorn_ragged f32 24 problems (64..2048)");
    r.op = "sinkd";
    r.metric = "sqeuclidean";
    r.dtype = "bf16";
    r.rows = 512;
    r.vocab = 32000;
    r.group_size = 64;
    kdlb_row_label(&r, s, sizeof s);
    cr_expect_str_eq(s, "sinkd sqeuclidean bf16 512x32000/64");
    r.op = "sinkhorn";
    r.dtype = "f32";
    r.batch = 64;
    r.n = r.m = 1024;
    kdlb_row_label(&r, s, sizeof s);
    cr_expect_str_eq(s, "sinkhorn f32 64x1024x1024");
}

static kdlb_meta_t test_meta(const kdlb_options_t *o)
{
    kdlb_meta_t m;
    memset(&m, 0, sizeof m);
    m.date = "2026-11-23T12:00:00Z";
    m.commit = "abc1234";
    snprintf(m.device_name, sizeof m.device_name, "NVIDIA H100 80GB HBM3");
    m.cc_major = 9;
    m.sm_count = 132;
    m.l2_bytes = 52428800;
    m.memory_bytes = UINT64_C(85520809984);
    m.driver_version = 13000;
    m.runtime_version = 13000;
    m.copy_gb_per_s = 2990.5;
    m.copy_bytes = UINT64_C(1) << 30;
    m.l2_flush_bytes = UINT64_C(256) << 20;
    m.options = o;
    return m;
}

/* The document kdlb_json_write gives for m and rows, read back (the caller
 * frees it); it is valid JSON. */
static char *write_document(const kdlb_meta_t *m, const kdlb_row_t *rows, int n)
{
    FILE *f = tmpfile();
    cr_assert_not_null(f);
    cr_expect_eq(kdlb_json_write(f, m, rows, n), 0);
    long len = ftell(f);
    rewind(f);
    char *s = calloc((size_t)len + 1, 1);
    cr_assert_eq(fread(s, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    cr_expect(kdl_json_valid(s), "%s", s);
    return s;
}

Test(bench_json, whole_document_parses)
{
    kdlb_options_t o;
    kdlb_options_default(&o);
    kdlb_meta_t m = test_meta(&o);
    kdlb_row_t rows[2] = {new_row(NULL, "fkl", "f32", 0, 0), new_row("sinkhorn", NULL, NULL, 0, 0)};
    rows[0].status = "not_implemented";
    rows[0].note = "GPU loss kernels not built yet";
    rows[1].impl = "kdloss";
    char *s = write_document(&m, rows, 2);
    cr_expect(strstr(s, "\"schema\": \"kdloss-bench/1\"") != NULL);
    cr_expect(strstr(s, "\"copy_gb_per_s\": 2990.5") != NULL);
    cr_expect(strstr(s, "\"name\": \"NVIDIA H100 80GB HBM3\"") != NULL);
    cr_expect(strstr(s, "\"driver_version\": 13000") != NULL);
    cr_expect(strstr(s, "\"commit\": \"abc1234\"") != NULL);
    free(s);
}

Test(bench_json, file_written_whole_or_not_at_all)
{
    kdlb_options_t o;
    kdlb_options_default(&o);
    kdlb_meta_t m = test_meta(&o);
    kdlb_row_t row;
    kdlb_row_init(&row);
    char path[1024], tmp[1100], err[256];
    snprintf(path, sizeof path, "%s/bench_%d.json", KDL_TEST_TMPDIR, (int)getpid());
    cr_assert_eq(kdlb_json_write_file(path, &m, &row, 1, err, sizeof err), 0, "%s", err);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    cr_expect(access(path, F_OK) == 0);
    cr_expect(access(tmp, F_OK) != 0);
    remove(path);
    snprintf(path, sizeof path, "%s/no/such/dir/x.json", KDL_TEST_TMPDIR);
    cr_expect_eq(kdlb_json_write_file(path, &m, &row, 1, err, sizeof err), -1);
    cr_expect(strstr(err, "cannot write") != NULL, "%s", err);
    cr_expect(access(path, F_OK) != 0);
}

/* ------------------------------------------------------------- parsing */
Test(bench_parse, shapes)
{
    kdlb_shape_t s[KDLB_MAX_SHAPES];
    char err[256];
    cr_expect_eq(kdlb_parse_shapes("4096:32000,8192:128256", s, KDLB_MAX_SHAPES, err, sizeof err), 2);
    cr_expect_eq(s[1].rows, 8192);
    cr_expect_eq(s[1].vocab, 128256);
    const char *bad[] = {"4096", "4096:", ":5", "0:5", "5:0", "-1:5", "4096:32000,", ",1:2",
                         "a:b", "1:2:3", "1:2,1:2", "1 :2", "", "1:2x", "99999999999:1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        cr_expect_eq(kdlb_parse_shapes(bad[i], s, KDLB_MAX_SHAPES, err, sizeof err), -1, "'%s'",
                     bad[i]);
        cr_expect(strncmp(err, "--shapes: ", 10) == 0, "'%s' -> %s", bad[i], err);
    }
    char many[512] = "";
    for (int i = 1; i <= KDLB_MAX_SHAPES + 1; i++) {
        char item[16];
        snprintf(item, sizeof item, "%s%d:7", i > 1 ? "," : "", i);
        strcat(many, item);
    }
    cr_expect_eq(kdlb_parse_shapes(many, s, KDLB_MAX_SHAPES, err, sizeof err), -1);
}

Test(bench_parse, enums)
{
    kdl_dtype_t t[3];
    kdl_divergence_t d[KDL_DIV_COUNT_];
    kdl_head_rule_t h[KDL_HEAD_COUNT_];
    char err[256];
    cr_expect_eq(kdlb_parse_dtypes("bf16,f32", t, 3, err, sizeof err), 2);
    cr_expect_eq(t[0], KDL_DTYPE_BF16);
    cr_expect_eq(t[1], KDL_DTYPE_F32);
    cr_expect_eq(kdlb_parse_dtypes("all", t, 3, err, sizeof err), 3);
    cr_expect_eq(kdlb_parse_dtypes("f64", t, 3, err, sizeof err), -1);
    cr_expect(strstr(err, "f64") != NULL);
    cr_expect_eq(kdlb_parse_dtypes("bf16,bf16", t, 3, err, sizeof err), -1);
    cr_expect(strstr(err, "duplicate") != NULL);
    cr_expect_eq(kdlb_parse_dtypes("", t, 3, err, sizeof err), -1);
    cr_expect_eq(kdlb_parse_divergences("all", d, KDL_DIV_COUNT_, err, sizeof err), KDL_DIV_COUNT_);
    cr_expect_eq(kdlb_parse_divergences("akl,fkl", d, KDL_DIV_COUNT_, err, sizeof err), 2);
    cr_expect_eq(d[0], KDL_DIV_AKL);
    cr_expect_eq(kdlb_parse_divergences("kl", d, KDL_DIV_COUNT_, err, sizeof err), -1);
    cr_expect_eq(kdlb_parse_divergences("fkl,,rkl", d, KDL_DIV_COUNT_, err, sizeof err), -1);
    cr_expect_eq(kdlb_parse_head_rules("topk,mass", h, KDL_HEAD_COUNT_, err, sizeof err), 2);
    cr_expect_eq(h[0], KDL_HEAD_TOPK);
    cr_expect_eq(kdlb_parse_head_rules("all", h, KDL_HEAD_COUNT_, err, sizeof err), 3);
    cr_expect_eq(kdlb_parse_head_rules("top", h, KDL_HEAD_COUNT_, err, sizeof err), -1);
    kdlb_sinkhorn_shape_t sk;
    cr_expect_eq(kdlb_parse_sinkhorn("64:1024:512", &sk, err, sizeof err), 0);
    cr_expect(sk.batch == 64 && sk.n == 1024 && sk.m == 512);
    cr_expect_eq(kdlb_parse_sinkhorn("none", &sk, err, sizeof err), 0);
    cr_expect_eq(sk.batch, 0);
    cr_expect_eq(kdlb_parse_sinkhorn("64:1024", &sk, err, sizeof err), -1);
    cr_expect_eq(kdlb_parse_sinkhorn("64:1024:0", &sk, err, sizeof err), -1);
    cr_expect_eq(kdlb_parse_sinkhorn("1:2:3:4", &sk, err, sizeof err), -1);
}

static int parse(kdlb_options_t *o, char *err, size_t errlen, int n, ...)
{
    char *argv[32];
    va_list ap;
    va_start(ap, n);
    argv[0] = (char *)"bench";
    for (int i = 0; i < n; i++) argv[i + 1] = va_arg(ap, char *);
    va_end(ap);
    return kdlb_parse_options(n + 1, argv, o, err, errlen);
}

Test(bench_parse, option_defaults_and_matrix)
{
    kdlb_options_t o;
    char err[256];
    cr_assert_eq(parse(&o, err, sizeof err, 0), 0);
    cr_expect_eq(o.n_shapes, 3);
    cr_expect_eq(o.shapes[2].rows, 8192);
    cr_expect_eq(o.shapes[2].vocab, 151936);
    cr_expect_eq(o.n_dtypes, 2);
    cr_expect_eq(o.n_divergences, KDL_DIV_COUNT_);
    cr_expect_eq(o.n_head_rules, KDL_HEAD_COUNT_);
    cr_expect_eq(o.repeats, 20);
    cr_expect_eq(o.warmup, 5);
    cr_expect_eq(o.check, 1);
    cr_expect_eq(o.sinkhorn.batch, 64);
    cr_expect_str_eq(o.commit, "unknown");
    cr_expect_null(o.json_out);
    /* 3 shapes x 2 dtypes x (7 divergences + AKL x 3 head rules) */
    cr_expect_eq(kdlb_case_count(&o), 60);
    kdlb_case_t c;
    cr_assert_eq(kdlb_case_at(&o, 0, &c), 0);
    cr_expect(c.shape.vocab == 32000 && c.dtype == KDL_DTYPE_BF16 && c.divergence == KDL_DIV_FKL);
    cr_assert_eq(kdlb_case_at(&o, 3, &c), 0); /* fkl, rkl, fkl_rkl, then akl x 3 */
    cr_expect(c.divergence == KDL_DIV_AKL && c.has_head_rule && c.head_rule == KDL_HEAD_REFERENCE);
    cr_assert_eq(kdlb_case_at(&o, 5, &c), 0);
    cr_expect(c.divergence == KDL_DIV_AKL && c.head_rule == KDL_HEAD_TOPK);
    cr_assert_eq(kdlb_case_at(&o, 6, &c), 0);
    cr_expect(c.divergence == KDL_DIV_JSD && !c.has_head_rule);
    cr_assert_eq(kdlb_case_at(&o, 10, &c), 0);
    cr_expect(c.shape.vocab == 32000 && c.dtype == KDL_DTYPE_F32 && c.divergence == KDL_DIV_FKL);
    cr_assert_eq(kdlb_case_at(&o, 59, &c), 0);
    cr_expect(c.shape.vocab == 151936 && c.dtype == KDL_DTYPE_F32 && c.divergence == KDL_DIV_SRKL);
    cr_expect_eq(kdlb_case_at(&o, 60, &c), -1);
    cr_expect_eq(kdlb_case_at(&o, -1, &c), -1);
}

Test(bench_parse, options_quick_and_overrides)
{
    kdlb_options_t o;
    char err[256];
    cr_assert_eq(parse(&o, err, sizeof err, 1, "--quick"), 0);
    cr_expect_eq(o.n_shapes, 1);
    cr_expect_eq(o.shapes[0].vocab, 32000);
    cr_expect_eq(o.n_dtypes, 1);
    cr_expect_eq(o.n_head_rules, 1);
    cr_expect_eq(o.repeats, 5);
    cr_expect_eq(o.warmup, 2);
    cr_expect_eq(o.sinkhorn.batch, 0);
    cr_expect_eq(kdlb_case_count(&o), 8);
    /* explicit options win whatever their order */
    cr_assert_eq(parse(&o, err, sizeof err, 4, "--repeats", "9", "--quick", "--dtypes=f32"), 0);
    cr_expect_eq(o.repeats, 9);
    cr_expect_eq(o.dtypes[0], KDL_DTYPE_F32);
    cr_expect_eq(o.warmup, 2);
    cr_assert_eq(parse(&o, err, sizeof err, 9, "--shapes=1:7", "--divergences", "akl",
                       "--head-rules", "topk", "--top-k", "3", "--no-check", "--json-out=out.json"),
                 0);
    cr_expect_eq(o.shapes[0].rows, 1);
    cr_expect_eq(o.top_k, 3);
    cr_expect_eq(o.check, 0);
    cr_expect_str_eq(o.json_out, "out.json");
    cr_expect_eq(kdlb_case_count(&o), 2); /* 1 shape x 2 dtypes x akl/topk */
    cr_assert_eq(parse(&o, err, sizeof err, 4, "--commit", "a1b2c3d", "--sinkhorn", "none"), 0);
    cr_expect_str_eq(o.commit, "a1b2c3d");
    cr_expect_eq(o.sinkhorn.batch, 0);
    cr_expect_eq(parse(&o, err, sizeof err, 1, "--help"), 1);
    cr_expect_eq(parse(&o, err, sizeof err, 2, "--quick", "-h"), 1);
}

/* `bench a` (n 1) or `bench a b` (n 2) is refused with one line starting
 * with msg. */
static void expect_refused(kdlb_options_t *o, int n, const char *a, const char *b, const char *msg)
{
    char err[256] = "";
    int r = n == 1 ? parse(o, err, sizeof err, 1, a) : parse(o, err, sizeof err, 2, a, b);
    cr_expect_eq(r, -1, "%s %s", a, n == 2 ? b : "");
    cr_expect(strncmp(err, msg, strlen(msg)) == 0, "got '%s', want '%s...'", err, msg);
    cr_expect(strchr(err, '\n') == NULL);
}

Test(bench_parse, bad_options)
{
    kdlb_options_t o;
    struct {
        int n;
        const char *a, *b;
        const char *msg;
    } bad[] = {
        {1, "--frobnicate", NULL, "unknown option '--frobnicate'"},
        {1, "--repeats", NULL, "--repeats needs a value"},
        {2, "--repeats", "0", "--repeats: expected an integer"},
        {2, "--repeats", "ten", "--repeats: expected an integer"},
        {2, "--warmup", "-1", "--warmup: expected an integer"},
        {2, "--mu", "1", "--mu: expected a number in (0, 1)"},
        {2, "--mu", "nan", "--mu: expected a number in (0, 1)"},
        {2, "--top-k", "0", "--top-k: expected an integer"},
        {2, "--shapes", "4096", "--shapes: bad shape"},
        {2, "--dtypes", "f64", "--dtypes: unknown name 'f64'"},
        {2, "--divergences", "kl", "--divergences: unknown name 'kl'"},
        {2, "--head-rules", "fast", "--head-rules: unknown name 'fast'"},
        {2, "--sinkhorn", "1:2", "--sinkhorn: bad value"},
        {2, "--sinkhorn-iters", "0", "--sinkhorn-iters: expected an integer"},
        {2, "--commit", "abc;rm", "--commit: only letters"},
        {1, "--json-out=", NULL, "--json-out: empty path"},
        {1, "bench", NULL, "unknown option 'bench'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) expect_refused(&o, bad[i].n, bad[i].a, bad[i].b, bad[i].msg);
}

Test(bench_parse, ops_and_the_other_ops_options)
{
    kdlb_options_t o;
    char err[256];
    cr_assert_eq(parse(&o, err, sizeof err, 0), 0);
    cr_expect_eq(o.ops, (unsigned)KDLB_OP_ALL);
    cr_expect(o.n_sparse_shapes == 1 && o.sparse_shapes[0].rows == 8192 &&
              o.sparse_shapes[0].vocab == 151936);
    cr_expect(o.n_sparse_k == 3 && o.sparse_k[0] == 8 && o.sparse_k[1] == 64 && o.sparse_k[2] == 1024);
    cr_expect_eq(o.sparse_dtype, KDL_DTYPE_BF16);
    cr_expect(o.n_fused_shapes == 1 && o.fused_shapes[0].rows == 4096 &&
              o.fused_shapes[0].hidden == 4096 && o.fused_shapes[0].vocab == 151936);
    cr_expect_eq(o.n_ragged, KDLB_RAGGED_DEFAULT_COUNT);
    cr_expect(o.sinkd.rows == 512 && o.sinkd.vocab == 32000 && o.sinkd.group == 64);
    cr_expect_eq(o.sinkd_iters, 20);
    /* rows: 60 loss + 1 Sinkhorn + 3 sparse + 4 fused ((bf16, f32) x (teacher logits, linear))
     * + 1 ragged + 2 SinKD */
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_SPARSE), 3);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_FUSED_LINEAR), 4);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_SINKD), 2);
    cr_expect_eq(kdlb_row_capacity(&o), 71);

    /* --quick: one small shape of each op, no uniform Sinkhorn */
    cr_assert_eq(parse(&o, err, sizeof err, 1, "--quick"), 0);
    cr_expect(o.sparse_shapes[0].rows == 4096 && o.sparse_shapes[0].vocab == 32000);
    cr_expect(o.fused_shapes[0].rows == 1024 && o.fused_shapes[0].hidden == 1024 &&
              o.fused_shapes[0].vocab == 32000);
    cr_expect_eq(o.n_ragged, KDLB_RAGGED_QUICK_COUNT);
    cr_expect(o.sinkd.rows == 256 && o.sinkd.vocab == 8192 && o.sinkd.group == 64);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_FUSED_LINEAR), 2); /* --quick: bf16 only, two teachers */
    cr_expect_eq(kdlb_row_capacity(&o), 8 + 0 + 3 + 2 + 1 + 2);

    /* --ops selects; explicit shapes win over --quick in any order */
    cr_assert_eq(parse(&o, err, sizeof err, 6, "--ops", "sparse,sinkd", "--sparse-shapes=16:100",
                       "--quick", "--sparse-k", "1,100"),
                 0);
    cr_expect_eq(o.ops, (unsigned)(KDLB_OP_SPARSE | KDLB_OP_SINKD));
    cr_expect(o.sparse_shapes[0].rows == 16 && o.sparse_shapes[0].vocab == 100);
    cr_expect_eq(kdlb_loss_case_count(&o), 0);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_LOSS), 0);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_SPARSE), 2);
    cr_expect_eq(kdlb_row_capacity(&o), 4);
    /* k larger than V: no row for that pair */
    cr_assert_eq(parse(&o, err, sizeof err, 4, "--sparse-shapes", "4:7,4:2000", "--sparse-k", "8,1024"),
                 0);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_SPARSE), 2); /* 4:2000 with 8 and 1024 */
    cr_assert_eq(parse(&o, err, sizeof err, 6, "--ops=all", "--fused-shapes", "2:3:5,7:11:13",
                       "--ragged-sizes", "64:128,100", "--sinkd=none"),
                 0);
    cr_expect_eq(o.n_fused_shapes, 2);
    cr_expect(o.fused_shapes[1].rows == 7 && o.fused_shapes[1].hidden == 11 &&
              o.fused_shapes[1].vocab == 13);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_FUSED_LINEAR), 2 * 2 * 2); /* shapes x bf16, f32 x teachers */
    cr_expect(o.n_ragged == 2 && o.ragged_n[0] == 64 && o.ragged_m[0] == 128 && o.ragged_n[1] == 100 &&
              o.ragged_m[1] == 100);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_SINKD), 0);
    cr_assert_eq(parse(&o, err, sizeof err, 2, "--sinkd", "128:4096:32"), 0);
    cr_expect(o.sinkd.rows == 128 && o.sinkd.vocab == 4096 && o.sinkd.group == 32);
    /* --dtypes chooses the fused rows' dtypes too, in any order of the options */
    cr_assert_eq(parse(&o, err, sizeof err, 4, "--dtypes=all", "--ops", "fused_linear", "--fused-shapes=2:3:5"), 0);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_FUSED_LINEAR), 6);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_LOSS), 0);
    cr_expect_eq(kdlb_row_capacity(&o), 6);
    cr_assert_eq(parse(&o, err, sizeof err, 5, "--ops", "fused_linear", "--quick", "--dtypes", "f16,f32"), 0);
    cr_expect_eq(kdlb_op_row_count(&o, KDLB_OP_FUSED_LINEAR), 4);
    cr_expect(o.dtypes[0] == KDL_DTYPE_F16 && o.dtypes[1] == KDL_DTYPE_F32);
    cr_expect_str_eq(kdlb_op_name(KDLB_OP_SINKHORN_RAGGED), "sinkhorn_ragged");
    cr_expect_null(kdlb_op_name((kdlb_op_t)3));
}

Test(bench_parse, bad_other_ops_options)
{
    kdlb_options_t o;
    char err[256];
    struct {
        const char *a, *b, *msg;
    } bad[] = {
        {"--ops", "loss,loss", "--ops: duplicate 'loss'"},
        {"--ops", "dense", "--ops: unknown name 'dense'"},
        {"--ops", "", "--ops: empty list"},
        {"--ops", "sparse,", "--ops: empty item"},
        {"--sparse-k", "0", "--sparse-k: bad k '0'"},
        {"--sparse-k", "1025", "--sparse-k: bad k '1025'"},
        {"--sparse-k", "8,8", "--sparse-k: duplicate '8'"},
        {"--sparse-k", "1,2,3,4,5,6,7,8,9", "--sparse-k: more than 8"},
        {"--sparse-shapes", "8192", "--sparse-shapes: bad shape"},
        {"--fused-shapes", "1:2", "--fused-shapes: bad shape '1:2'"},
        {"--fused-shapes", "1:2:0", "--fused-shapes: bad shape"},
        {"--fused-shapes", "1:2:3,1:2:3", "--fused-shapes: duplicate shape"},
        {"--ragged-sizes", "64:0", "--ragged-sizes: bad problem '64:0'"},
        {"--ragged-sizes", "65537", "--ragged-sizes: bad problem"},
        {"--ragged-sizes", "1:2:3", "--ragged-sizes: bad problem"},
        {"--sinkd", "512:32000:60", "--sinkd: bad value"},
        {"--sinkd", "512:32000", "--sinkd: bad value"},
        {"--sinkd", "0:5:1", "--sinkd: bad value"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) expect_refused(&o, 2, bad[i].a, bad[i].b, bad[i].msg);
    char many[1024] = "";
    for (int i = 0; i <= KDLB_MAX_RAGGED; i++) strcat(many, i ? ",64" : "64");
    cr_expect_eq(parse(&o, err, sizeof err, 2, "--ragged-sizes", many), -1);
    cr_expect(strstr(err, "more than 64 problems") != NULL, "%s", err);
}

Test(bench_json, meta_lists_the_ops_and_byte_models)
{
    kdlb_options_t o;
    char err[256];
    cr_assert_eq(parse(&o, err, sizeof err, 2, "--ops", "sparse,fused_linear"), 0);
    kdlb_meta_t m = test_meta(&o);
    char *s = write_document(&m, NULL, 0);
    cr_expect(strstr(s, "\"ops\": [\"sparse\", \"fused_linear\"]") != NULL, "%s", s);
    cr_expect(strstr(s, "\"sparse\": \"rows*vocab*(size(student)+size(grad))+rows*k*(8+size(logprobs))\"") !=
              NULL);
    cr_expect(strstr(s, "\"sinkhorn_ragged\": \"sum_b 2*n_b*m_b*4 per iteration\"") != NULL);
    /* the fused rows' dtypes are the --dtypes list */
    cr_expect(strstr(s, "\"fused_linear\": {\"divergence\": \"jsd\", \"beta\": 0.5, \"dtypes\": [\"bf16\", \"f32\"], "
                        "\"grad_dtype\": \"f32 for f32 inputs, else the inputs' dtype\", "
                        "\"teachers\": [\"logits\", \"linear\"], \"teacher_hidden\": \"hidden\"}") != NULL,
              "%s", s);
    cr_expect(strstr(s, "\"fused_linear_teacher_linear\": "
                        "\"(rows+vocab)*hidden*(size(hw)+size(grad))+(rows+vocab)*teacher_hidden*size(hw)\"") != NULL,
              "%s", s);
    free(s);
    cr_assert_eq(parse(&o, err, sizeof err, 2, "--dtypes", "f16"), 0);
    m = test_meta(&o);
    s = write_document(&m, NULL, 0);
    cr_expect(strstr(s, "\"dtypes\": [\"f16\"]") != NULL, "%s", s);
    free(s);
}

/* ----------------------------------------------------------- file names */
Test(bench_names, slug_and_result_name)
{
    char s[64];
    kdlb_slug("NVIDIA H100 80GB HBM3", s, sizeof s);
    cr_expect_str_eq(s, "NVIDIA-H100-80GB-HBM3");
    kdlb_slug("  NVIDIA  H200 (SXM)/x ", s, sizeof s);
    cr_expect_str_eq(s, "NVIDIA-H200-SXM-x");
    kdlb_slug(" -- ", s, sizeof s);
    cr_expect_str_eq(s, "unknown");
    kdlb_slug("ABCDEFGHIJ", s, 5);
    cr_expect_str_eq(s, "ABCD");
    char name[256];
    kdlb_result_name("2026-11-23", "NVIDIA H100 80GB HBM3", "abc1234", name, sizeof name);
    cr_expect_str_eq(name, "2026-11-23-NVIDIA-H100-80GB-HBM3-abc1234.json");
}

Test(bench_table, fused_rows_show_peak_over_both_logits)
{
    kdlb_row_t rows[2] = {new_row("fused_linear", "jsd", "bf16", 4096, 151936),
                          new_row("fused_linear", "jsd", "f32", 4096, 151936)};
    for (int i = 0; i < 2; i++) {
        rows[i].hidden = 4096;
        rows[i].status = "ok";
        rows[i].logits_bytes = kdlb_logits_f32_bytes(4096, 151936);
    }
    rows[0].logits_dtype_bytes = kdlb_logits_bytes(4096, 151936, KDL_DTYPE_BF16);
    rows[0].peak_extra_bytes = 154976000;           /* 0.1245 of bf16 logits, 0.0623 of f32 */
    rows[1].logits_dtype_bytes = rows[1].logits_bytes; /* peak unknown: no ratios */
    FILE *f = tmpfile();
    kdlb_print_table(f, rows, 2, NAN);
    /* the teacher as a linear layer: against both logits (twice the bf16 and f32 ones) */
    rows[0].teacher_hidden = 4096;
    rows[0].logits_bytes = kdlb_fused_logits_bytes(4096, 151936, KDL_DTYPE_F32, 1);
    rows[0].logits_dtype_bytes = kdlb_fused_logits_bytes(4096, 151936, KDL_DTYPE_BF16, 1);
    rows[0].peak_extra_bytes = 154975744;
    kdlb_print_table(f, rows, 1, NAN);
    rewind(f);
    char line[5][256];
    int n = 0;
    while (n < 5 && fgets(line[n], sizeof line[n], f)) n++;
    fclose(f);
    cr_assert_eq(n, 5);
    cr_expect(strstr(line[1], "4096x4096x151936") && strstr(line[1], "ok (peak/logits bf16 0.1245, f32 0.0623)"),
              "%s", line[1]);
    cr_expect(strstr(line[1], "jsd+HtWt") == NULL, "%s", line[1]);
    cr_expect(strstr(line[2], "peak") == NULL, "%s", line[2]);
    cr_expect(strstr(line[4], "jsd+HtWt") && strstr(line[4], "ok (peak/logits bf16 0.0623, f32 0.0311)"), "%s",
              line[4]);
}

Test(bench_table, prints_a_line_per_row)
{
    kdlb_row_t rows[2] = {new_row(NULL, "fkl", "bf16", 8192, 151936), new_row(NULL, "akl", "f32", 0, 0)};
    rows[0].status = "ok";
    rows[0].ms = 2.5;
    rows[0].gb_per_s = 2987.18;
    rows[0].fraction_of_copy_bandwidth = 0.9957;
    rows[1].head_rule = "mass";
    rows[1].status = "not_implemented";
    FILE *f = tmpfile();
    kdlb_print_table(f, rows, 2, 3000.0);
    rewind(f);
    char line[4][256];
    int n = 0;
    while (n < 4 && fgets(line[n], sizeof line[n], f)) n++;
    fclose(f);
    cr_assert_eq(n, 4);
    cr_expect(strstr(line[0], "GB/s") != NULL);
    cr_expect(strstr(line[1], "8192x151936") && strstr(line[1], "2987.2") && strstr(line[1], "99.6"),
              "%s", line[1]);
    cr_expect(strstr(line[2], "mass") && strstr(line[2], "not_implemented"), "%s", line[2]);
    cr_expect(strstr(line[3], "3000.0 GB/s") != NULL, "%s", line[3]);
}

/* --------------------------------------------- the command without a GPU */
static int run_cli(const char *args, char *out, size_t outlen, char *errtxt, size_t errlen)
{
    char o[512], e[512], cmd[2048];
    snprintf(o, sizeof o, "%s/bench_cli_%d.out", KDL_TEST_TMPDIR, (int)getpid());
    snprintf(e, sizeof e, "%s/bench_cli_%d.err", KDL_TEST_TMPDIR, (int)getpid());
    snprintf(cmd, sizeof cmd, "'%s' bench %s >'%s' 2>'%s' </dev/null", KDL_CLI_PATH, args, o, e);
    int st = system(cmd);
    const char *paths[2] = {o, e};
    char *bufs[2] = {out, errtxt};
    size_t lens[2] = {outlen, errlen};
    for (int k = 0; k < 2; k++) {
        FILE *f = fopen(paths[k], "r");
        size_t n = f ? fread(bufs[k], 1, lens[k] - 1, f) : 0;
        bufs[k][n] = '\0';
        if (f) fclose(f);
        remove(paths[k]);
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

Test(bench_cli, no_gpu_exits_2_with_one_line)
{
    KDL_SKIP_IF_GPU_PRESENT();
    char out[4096], err[4096];
    int rc = run_cli("--quick", out, sizeof out, err, sizeof err);
    cr_expect_eq(rc, 2);
    cr_expect_str_eq(err, "kdloss bench: no CUDA device found\n");
    cr_expect_str_eq(out, "");
    /* JSON requested: still nothing written */
    char path[512], args[600];
    snprintf(path, sizeof path, "%s/bench_nogpu_%d.json", KDL_TEST_TMPDIR, (int)getpid());
    snprintf(args, sizeof args, "--json-out '%s'", path);
    rc = run_cli(args, out, sizeof out, err, sizeof err);
    cr_expect_eq(rc, 2);
    cr_expect(access(path, F_OK) != 0);
}

Test(bench_cli, bad_option_exits_2_with_one_line)
{
    char out[4096], err[4096];
    int rc = run_cli("--repeats 0", out, sizeof out, err, sizeof err);
    cr_expect_eq(rc, 2);
    cr_expect(strncmp(err, "kdloss bench: --repeats: ", 25) == 0, "%s", err);
    cr_expect(strchr(err, '\n') == err + strlen(err) - 1, "one line: %s", err);
    cr_expect_str_eq(out, "");
    rc = run_cli("--shapes 4096", out, sizeof out, err, sizeof err);
    cr_expect_eq(rc, 2);
    cr_expect(strncmp(err, "kdloss bench: --shapes: bad shape '4096'", 40) == 0, "%s", err);
}

Test(bench_cli, help_goes_to_stdout)
{
    char out[8192], err[1024];
    int rc = run_cli("--help", out, sizeof out, err, sizeof err);
    cr_expect_eq(rc, 0);
    cr_expect(strncmp(out, "usage: kdloss bench", 19) == 0, "%s", out);
    cr_expect(strstr(out, "--json-out") != NULL);
    cr_expect_str_eq(err, "");
}
