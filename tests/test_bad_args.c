/*
 * tests/test_bad_args.c - every public entry point against every kind of bad
 * argument, table-driven (DESIGN section 3: a specific status before any
 * work, nothing written).
 *
 * Each case mutates a valid problem in one way and names the status it must
 * get.  Outputs are pre-filled with a sentinel byte and must come back
 * untouched; the last-error detail must be set.  The valid problem itself is
 * run first and must succeed, so a case fails only because of its mutation.
 *
 * Covered:
 *   kdl_ref_loss_forward_backward, kdl_loss_validate (same table, f64, f32
 *   and bf16 inputs);
 *   kdl_ref_sparse_loss, kdl_sparse_validate, kdl_sparse_check_indices;
 *   kdl_ref_sinkhorn, kdl_sinkhorn_validate (plus non-finite costs);
 *   kdl_ref_sinkd, kdl_sinkd_validate;
 *   kdl_ref_fused_linear_loss, kdl_fused_linear_validate;
 *   kdl_create, kdl_destroy, kdl_set_stream, kdl_get_stream,
 *   kdl_loss_workspace_size, kdl_loss_forward_backward with a NULL handle
 *   (any build), and on a GPU the loss table through the GPU entry points
 *   with device buffers, plus a workspace one byte too small (GPU-only,
 *   skipped visibly without a device);
 *   kdl_status_string for every status and unknown values.
 * Not covered yet (docs/hardening.md keeps the list): the GPU entry points
 * kdl_sinkhorn, kdl_sinkd, kdl_sparse_loss, kdl_shard_step,
 * kdl_fused_linear_loss and their workspace queries (no CUDA implementation
 * had landed: a CUDA build would not link them), and the shard protocol
 * kdl_shard_sizes / kdl_ref_shard_step.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kdl_test.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"

#ifdef KDL_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#define SENTINEL 0xA5

static int all_sentinel(const void *p, size_t bytes)
{
    const unsigned char *c = (const unsigned char *)p;
    for (size_t i = 0; i < bytes; i++)
        if (c[i] != SENTINEL) return 0;
    return 1;
}

/* =================================================================== loss */

enum { LN = 3, LV = 7, LLD = 9 };

typedef void (*loss_mut_t)(kdl_loss_desc_t *, kdl_loss_args_t *);

typedef struct loss_case {
    const char *name;
    kdl_status_t want;
    loss_mut_t mutate;
    int ref_only; /* 1: valid on the GPU path, or only meaningful with f64 data */
} loss_case_t;

/* ---- NULL pointers */
static void m_null_student(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->student = NULL; }
static void m_null_teacher(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->teacher = NULL; }
static void m_null_loss(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->loss = NULL; }
static void m_null_loss_none(kdl_loss_desc_t *d, kdl_loss_args_t *a)
{
    d->reduction = KDL_REDUCTION_NONE;
    a->loss = NULL;
}
/* ---- sizes and strides */
static void m_rows_neg(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->rows = -1; }
static void m_rows_min(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->rows = INT64_MIN; }
static void m_vocab_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->vocab = 0; }
static void m_vocab_neg(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->vocab = -5; }
static void m_ld_s_small(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->ld_student = a->vocab - 1; }
static void m_ld_s_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->ld_student = 0; }
static void m_ld_s_neg(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->ld_student = -LLD; }
static void m_ld_t_small(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->ld_teacher = a->vocab - 1; }
static void m_ld_g_small(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->ld_grad = 1; }
/* ---- descriptor parameters */
static void m_tau_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->temperature = 0; }
static void m_tau_negzero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->temperature = -0.0; }
static void m_tau_neg(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->temperature = -2; }
static void m_tau_nan(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->temperature = NAN; }
static void m_tau_inf(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->temperature = INFINITY; }
static void m_tau_ninf(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->temperature = -INFINITY; }
static void m_scale_nan(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->scale = NAN; }
static void m_scale_inf(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->scale = INFINITY; }
static void m_scale_ninf(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->scale = -INFINITY; }
static void m_alpha_one(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->alpha = 1; }
static void m_alpha_neg(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->alpha = -1e-300; }
static void m_alpha_nan(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->alpha = NAN; }
static void m_alpha_inf(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->alpha = INFINITY; }
static void m_beta_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->beta = 0; }
static void m_beta_one(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->beta = 1; }
static void m_beta_nan(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->beta = NAN; }
static void m_beta_ninf(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->beta = -INFINITY; }
static void m_mu_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->mu = 0; }
static void m_mu_one(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->mu = 1; }
static void m_mu_nan(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->mu = NAN; }
static void m_mu_inf(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->mu = INFINITY; }
static void m_topk_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->top_k = 0; }
static void m_topk_neg(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->top_k = -1; }
static void m_topk_big(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->top_k = a->vocab + 1; }
static void m_topk_max(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->top_k = INT64_MAX; }
/* ---- enums and dtypes */
static void m_div_count(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->divergence = KDL_DIV_COUNT_; }
static void m_div_neg(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->divergence = (kdl_divergence_t)-1; }
static void m_rule_count(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->head_rule = KDL_HEAD_COUNT_; }
static void m_red_count(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->reduction = KDL_REDUCTION_COUNT_; }
static void m_red_neg(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->reduction = (kdl_reduction_t)-7; }
static void m_sdt_bad(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->student_dtype = (kdl_dtype_t)4; }
static void m_tdt_bad(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->teacher_dtype = (kdl_dtype_t)99; }
static void m_gdt_bad(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->grad_dtype = (kdl_dtype_t)-1; }
static void m_odt_bad(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->out_dtype = (kdl_dtype_t)7; }
static void m_odt_f16(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->out_dtype = KDL_DTYPE_F16; }
static void m_odt_bf16(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->out_dtype = KDL_DTYPE_BF16; }
/* grad dtype neither the student's nor f32 (nor f64 on the reference) */
static void m_gdt_other(kdl_loss_desc_t *d, kdl_loss_args_t *a)
{
    a->grad_dtype = a->student_dtype == KDL_DTYPE_BF16 ? KDL_DTYPE_F16 : KDL_DTYPE_BF16;
}
/* ---- struct versions */
static void m_dsize_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->struct_size = 0; }
static void m_dsize_big(kdl_loss_desc_t *d, kdl_loss_args_t *a) { d->struct_size = sizeof *d + 8; }
static void m_asize_zero(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->struct_size = 0; }
static void m_asize_small(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->struct_size = sizeof *a - 8; }
/* ---- sizes that overflow */
static void m_ovf_rows(kdl_loss_desc_t *d, kdl_loss_args_t *a)
{
    a->rows = INT64_MAX / 4;
    a->ld_student = a->ld_teacher = a->ld_grad = 1 << 20;
}
static void m_ovf_ld(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->ld_student = INT64_MAX; }
static void m_ovf_ld_grad(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->ld_grad = INT64_MAX / 2; }
static void m_ovf_bytes(kdl_loss_desc_t *d, kdl_loss_args_t *a)
{
    /* (rows-1)*ld + V fits int64; the byte count (4- and 8-byte types) or
     * the per-row outputs (rows * 8 bytes) do not fit size_t */
    a->rows = INT64_MAX - 10;
    a->vocab = 1;
    a->ld_student = a->ld_teacher = a->ld_grad = 1;
    d->top_k = 1;
}
static void m_ovf_vocab(kdl_loss_desc_t *d, kdl_loss_args_t *a)
{
    a->vocab = INT64_MAX;
    a->ld_student = a->ld_teacher = a->ld_grad = INT64_MAX;
}

static const loss_case_t loss_cases[] = {
    {"student NULL", KDL_STATUS_NULL_POINTER, m_null_student, 0},
    {"teacher NULL", KDL_STATUS_NULL_POINTER, m_null_teacher, 0},
    {"loss NULL (mean)", KDL_STATUS_NULL_POINTER, m_null_loss, 0},
    {"loss NULL (none, rows > 0)", KDL_STATUS_NULL_POINTER, m_null_loss_none, 0},
    {"rows -1", KDL_STATUS_BAD_SIZE, m_rows_neg, 0},
    {"rows INT64_MIN", KDL_STATUS_BAD_SIZE, m_rows_min, 0},
    {"vocab 0", KDL_STATUS_BAD_SIZE, m_vocab_zero, 0},
    {"vocab -5", KDL_STATUS_BAD_SIZE, m_vocab_neg, 0},
    {"ld_student V-1", KDL_STATUS_BAD_STRIDE, m_ld_s_small, 0},
    {"ld_student 0", KDL_STATUS_BAD_STRIDE, m_ld_s_zero, 0},
    {"ld_student < 0", KDL_STATUS_BAD_STRIDE, m_ld_s_neg, 0},
    {"ld_teacher V-1", KDL_STATUS_BAD_STRIDE, m_ld_t_small, 0},
    {"ld_grad 1", KDL_STATUS_BAD_STRIDE, m_ld_g_small, 0},
    {"tau 0", KDL_STATUS_BAD_TEMPERATURE, m_tau_zero, 0},
    {"tau -0", KDL_STATUS_BAD_TEMPERATURE, m_tau_negzero, 0},
    {"tau -2", KDL_STATUS_BAD_TEMPERATURE, m_tau_neg, 0},
    {"tau NaN", KDL_STATUS_BAD_TEMPERATURE, m_tau_nan, 0},
    {"tau inf", KDL_STATUS_BAD_TEMPERATURE, m_tau_inf, 0},
    {"tau -inf", KDL_STATUS_BAD_TEMPERATURE, m_tau_ninf, 0},
    {"scale NaN", KDL_STATUS_BAD_SCALE, m_scale_nan, 0},
    {"scale inf", KDL_STATUS_BAD_SCALE, m_scale_inf, 0},
    {"scale -inf", KDL_STATUS_BAD_SCALE, m_scale_ninf, 0},
    {"alpha 1", KDL_STATUS_BAD_ALPHA, m_alpha_one, 0},
    {"alpha < 0", KDL_STATUS_BAD_ALPHA, m_alpha_neg, 0},
    {"alpha NaN", KDL_STATUS_BAD_ALPHA, m_alpha_nan, 0},
    {"alpha inf", KDL_STATUS_BAD_ALPHA, m_alpha_inf, 0},
    {"beta 0", KDL_STATUS_BAD_BETA, m_beta_zero, 0},
    {"beta 1", KDL_STATUS_BAD_BETA, m_beta_one, 0},
    {"beta NaN", KDL_STATUS_BAD_BETA, m_beta_nan, 0},
    {"beta -inf", KDL_STATUS_BAD_BETA, m_beta_ninf, 0},
    {"mu 0", KDL_STATUS_BAD_MU, m_mu_zero, 0},
    {"mu 1", KDL_STATUS_BAD_MU, m_mu_one, 0},
    {"mu NaN", KDL_STATUS_BAD_MU, m_mu_nan, 0},
    {"mu inf", KDL_STATUS_BAD_MU, m_mu_inf, 0},
    {"top_k 0", KDL_STATUS_BAD_TOP_K, m_topk_zero, 0},
    {"top_k -1", KDL_STATUS_BAD_TOP_K, m_topk_neg, 0},
    {"top_k V+1", KDL_STATUS_BAD_TOP_K, m_topk_big, 0},
    {"top_k INT64_MAX", KDL_STATUS_BAD_TOP_K, m_topk_max, 0},
    {"divergence COUNT_", KDL_STATUS_BAD_ENUM, m_div_count, 0},
    {"divergence -1", KDL_STATUS_BAD_ENUM, m_div_neg, 0},
    {"head rule COUNT_", KDL_STATUS_BAD_ENUM, m_rule_count, 0},
    {"reduction COUNT_", KDL_STATUS_BAD_ENUM, m_red_count, 0},
    {"reduction -7", KDL_STATUS_BAD_ENUM, m_red_neg, 0},
    {"student dtype 4", KDL_STATUS_BAD_ENUM, m_sdt_bad, 0},
    {"teacher dtype 99", KDL_STATUS_BAD_ENUM, m_tdt_bad, 0},
    {"grad dtype -1", KDL_STATUS_BAD_ENUM, m_gdt_bad, 0},
    {"out dtype 7", KDL_STATUS_BAD_ENUM, m_odt_bad, 0},
    {"out dtype f16", KDL_STATUS_NOT_SUPPORTED, m_odt_f16, 0},
    {"out dtype bf16", KDL_STATUS_NOT_SUPPORTED, m_odt_bf16, 0},
    {"grad dtype other", KDL_STATUS_NOT_SUPPORTED, m_gdt_other, 0},
    {"desc struct_size 0", KDL_STATUS_BAD_STRUCT_SIZE, m_dsize_zero, 0},
    {"desc struct_size +8", KDL_STATUS_BAD_STRUCT_SIZE, m_dsize_big, 0},
    {"args struct_size 0", KDL_STATUS_BAD_STRUCT_SIZE, m_asize_zero, 0},
    {"args struct_size -8", KDL_STATUS_BAD_STRUCT_SIZE, m_asize_small, 0},
    {"rows x ld overflows int64", KDL_STATUS_SIZE_OVERFLOW, m_ovf_rows, 0},
    {"ld_student INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, m_ovf_ld, 0},
    {"ld_grad INT64_MAX/2", KDL_STATUS_SIZE_OVERFLOW, m_ovf_ld_grad, 0},
    {"bytes overflow size_t", KDL_STATUS_SIZE_OVERFLOW, m_ovf_bytes, 0},
    {"vocab INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, m_ovf_vocab, 0},
};
#define N_LOSS_CASES (sizeof loss_cases / sizeof loss_cases[0])

/* Host buffers of one loss problem; every output sentinel-filled. */
typedef struct loss_bufs {
    void *s, *t, *loss, *grad, *stat[6];
    int64_t *hs, *info, *valid, *labels;
    size_t in_bytes, loss_bytes, grad_bytes, stat_bytes;
} loss_bufs_t;

static void loss_bufs_make(loss_bufs_t *b, kdl_dtype_t in_dtype)
{
    memset(b, 0, sizeof *b);
    const size_t e = kdl_dtype_size(in_dtype);
    b->in_bytes = (size_t)LN * LLD * e;
    b->loss_bytes = LN * sizeof(double);
    b->grad_bytes = (size_t)LN * LLD * sizeof(double);
    b->stat_bytes = LN * sizeof(double);
    b->s = malloc(b->in_bytes);
    b->t = malloc(b->in_bytes);
    double x[LN * LLD], y[LN * LLD];
    kdl_rng_t r = {77};
    kdl_fill_logits(&r, x, LN * LLD, 2.0);
    kdl_fill_logits(&r, y, LN * LLD, 2.0);
    kdl_to_dtype(x, b->s, in_dtype, LN * LLD);
    kdl_to_dtype(y, b->t, in_dtype, LN * LLD);
    b->loss = malloc(b->loss_bytes);
    b->grad = malloc(b->grad_bytes);
    for (int k = 0; k < 6; k++) b->stat[k] = malloc(b->stat_bytes);
    b->hs = (int64_t *)malloc(LN * sizeof(int64_t));
    b->info = (int64_t *)malloc(sizeof(int64_t));
    b->valid = (int64_t *)malloc(sizeof(int64_t));
    b->labels = (int64_t *)malloc(LN * sizeof(int64_t));
    b->labels[0] = 1;
    b->labels[1] = -100;
    b->labels[2] = 4;
}

static void loss_bufs_fill(loss_bufs_t *b)
{
    memset(b->loss, SENTINEL, b->loss_bytes);
    memset(b->grad, SENTINEL, b->grad_bytes);
    for (int k = 0; k < 6; k++) memset(b->stat[k], SENTINEL, b->stat_bytes);
    memset(b->hs, SENTINEL, LN * sizeof(int64_t));
    memset(b->info, SENTINEL, sizeof(int64_t));
    memset(b->valid, SENTINEL, sizeof(int64_t));
}

static int loss_bufs_untouched(const loss_bufs_t *b)
{
    int ok = all_sentinel(b->loss, b->loss_bytes) && all_sentinel(b->grad, b->grad_bytes) &&
             all_sentinel(b->hs, LN * sizeof(int64_t)) && all_sentinel(b->info, sizeof(int64_t)) &&
             all_sentinel(b->valid, sizeof(int64_t));
    for (int k = 0; k < 6; k++) ok = ok && all_sentinel(b->stat[k], b->stat_bytes);
    return ok;
}

static void loss_bufs_free(loss_bufs_t *b)
{
    free(b->s);
    free(b->t);
    free(b->loss);
    free(b->grad);
    for (int k = 0; k < 6; k++) free(b->stat[k]);
    free(b->hs);
    free(b->info);
    free(b->valid);
    free(b->labels);
}

/* The valid problem: AKL (reads every descriptor field), reduction NONE,
 * every optional output, strides > V, labels. */
static void loss_problem(const loss_bufs_t *b, kdl_dtype_t in_dtype, kdl_dtype_t out_dtype, kdl_loss_desc_t *d,
                         kdl_loss_args_t *a)
{
    kdl_loss_desc_init(d);
    d->divergence = KDL_DIV_AKL;
    d->reduction = KDL_REDUCTION_NONE;
    d->top_k = 2;
    kdl_loss_args_init(a);
    a->rows = LN;
    a->vocab = LV;
    a->student = b->s;
    a->teacher = b->t;
    a->ld_student = a->ld_teacher = a->ld_grad = LLD;
    a->student_dtype = a->teacher_dtype = in_dtype;
    a->labels = b->labels;
    a->grad = b->grad;
    a->grad_dtype = out_dtype;
    a->out_dtype = out_dtype;
    a->loss = b->loss;
    a->stat_fkl = b->stat[0];
    a->stat_rkl = b->stat[1];
    a->stat_g_head = b->stat[2];
    a->stat_g_tail = b->stat[3];
    a->stat_w_head = b->stat[4];
    a->stat_w_tail = b->stat[5];
    a->stat_head_size = b->hs;
    a->info = b->info;
    a->valid_rows = b->valid;
}

Test(bad_args, ref_loss_table)
{
    const kdl_dtype_t dtypes[][2] = {{KDL_DTYPE_F64, KDL_DTYPE_F64}, {KDL_DTYPE_F32, KDL_DTYPE_F32}, {KDL_DTYPE_BF16, KDL_DTYPE_F32}};
    for (size_t t = 0; t < sizeof dtypes / sizeof dtypes[0]; t++) {
        loss_bufs_t b;
        loss_bufs_make(&b, dtypes[t][0]);
        kdl_loss_desc_t d;
        kdl_loss_args_t a;
        loss_problem(&b, dtypes[t][0], dtypes[t][1], &d, &a);
        loss_bufs_fill(&b);
        cr_assert_eq(kdl_ref_loss_forward_backward(&d, &a), KDL_STATUS_SUCCESS, "the valid problem fails: %s",
                     kdl_get_last_error());
        for (size_t c = 0; c < N_LOSS_CASES; c++) {
            const loss_case_t *lc = &loss_cases[c];
            loss_problem(&b, dtypes[t][0], dtypes[t][1], &d, &a);
            lc->mutate(&d, &a);
            loss_bufs_fill(&b);
            kdl_status_t st = kdl_ref_loss_forward_backward(&d, &a);
            cr_expect_eq(st, lc->want, "[%s] %s: got %s (%s), want %s", kdl_dtype_name(dtypes[t][0]), lc->name,
                         kdl_status_string(st), kdl_get_last_error(), kdl_status_string(lc->want));
            cr_expect(kdl_get_last_error()[0] != '\0', "%s: no last-error detail", lc->name);
            cr_expect(loss_bufs_untouched(&b), "[%s] %s: an output was written", kdl_dtype_name(dtypes[t][0]), lc->name);
            cr_expect_eq(kdl_loss_validate(&d, &a, 1), lc->want, "%s: kdl_loss_validate disagrees", lc->name);
        }
        loss_bufs_free(&b);
    }
    cr_expect_eq(kdl_ref_loss_forward_backward(NULL, NULL), KDL_STATUS_NULL_POINTER);
    kdl_loss_desc_t d;
    kdl_loss_args_t a;
    kdl_loss_desc_init(&d);
    kdl_loss_args_init(&a);
    cr_expect_eq(kdl_ref_loss_forward_backward(&d, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_loss_forward_backward(NULL, &a), KDL_STATUS_NULL_POINTER);
}

/* Rows 0 is an empty batch, not an error: SUCCESS, with NULL inputs allowed,
 * and nothing but the counters written. */
Test(bad_args, ref_loss_empty_batch_is_not_an_error)
{
    loss_bufs_t b;
    loss_bufs_make(&b, KDL_DTYPE_F32);
    kdl_loss_desc_t d;
    kdl_loss_args_t a;
    loss_problem(&b, KDL_DTYPE_F32, KDL_DTYPE_F32, &d, &a);
    loss_bufs_fill(&b);
    a.rows = 0;
    a.student = a.teacher = NULL;
    a.loss = NULL; /* allowed for NONE with no rows */
    cr_expect_eq(kdl_ref_loss_forward_backward(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect(all_sentinel(b.grad, b.grad_bytes));
    loss_bufs_free(&b);
}

/* ============================================================ GPU handle */

Test(bad_args, handle_calls_without_a_handle)
{
    kdl_handle_t h = (kdl_handle_t)0x1;
    cr_expect_eq(kdl_create(NULL), KDL_STATUS_NULL_POINTER);
    if (!kdl_device_available()) {
        cr_expect_eq(kdl_create(&h), KDL_STATUS_NO_DEVICE);
        cr_expect_null(h, "kdl_create left a handle without a device");
    }
    cr_expect_eq(kdl_destroy(NULL), KDL_STATUS_SUCCESS);
    cr_expect_eq(kdl_set_stream(NULL, NULL), KDL_STATUS_NULL_POINTER);
    kdl_stream_t s = (kdl_stream_t)0x5;
    cr_expect_eq(kdl_get_stream(NULL, &s), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(s, (kdl_stream_t)0x5, "kdl_get_stream wrote without a handle");

    loss_bufs_t b;
    loss_bufs_make(&b, KDL_DTYPE_F32);
    kdl_loss_desc_t d;
    kdl_loss_args_t a;
    loss_problem(&b, KDL_DTYPE_F32, KDL_DTYPE_F32, &d, &a);
    loss_bufs_fill(&b);
    size_t bytes = 12345;
    cr_expect_eq(kdl_loss_workspace_size(NULL, &d, &a, &bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(bytes, 12345);
    cr_expect_eq(kdl_loss_forward_backward(NULL, &d, &a, NULL, 0), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_loss_forward_backward(NULL, NULL, NULL, NULL, 0), KDL_STATUS_NULL_POINTER);
    cr_expect(loss_bufs_untouched(&b));
    loss_bufs_free(&b);
}

Test(bad_args, status_strings)
{
    for (int s = 0; s <= KDL_STATUS_COUNT_ + 1; s++) {
        const char *m = kdl_status_string((kdl_status_t)s);
        cr_assert_not_null(m);
        cr_expect(strncmp(m, "KDL_STATUS_", 11) == 0, "status %d: '%s'", s, m);
    }
    cr_expect_not_null(kdl_status_string((kdl_status_t)-1));
    cr_expect_not_null(kdl_get_last_error());
}

/* --------------------------------------------------- the table on a GPU */
#ifdef KDL_HAVE_CUDA
/* Device copies of the host buffers (inputs copied, outputs sentinel). */
typedef struct dev_bufs {
    void *p[16];
    int n;
} dev_bufs_t;

static void *dev_copy(dev_bufs_t *db, const void *host, size_t bytes)
{
    void *d = NULL;
    cr_assert_eq(cudaMalloc(&d, bytes), cudaSuccess);
    cr_assert_eq(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    db->p[db->n++] = d;
    return d;
}

static int dev_untouched(const void *dev, size_t bytes)
{
    unsigned char *h = (unsigned char *)malloc(bytes);
    cr_assert_eq(cudaMemcpy(h, dev, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    int ok = all_sentinel(h, bytes);
    free(h);
    return ok;
}

/* Points every pointer of a at a device copy of the host buffers. */
static void to_device(const loss_bufs_t *b, kdl_loss_args_t *a, dev_bufs_t *db)
{
    a->student = dev_copy(db, b->s, b->in_bytes);
    a->teacher = dev_copy(db, b->t, b->in_bytes);
    a->labels = (const int64_t *)dev_copy(db, b->labels, LN * sizeof(int64_t));
    a->loss = dev_copy(db, b->loss, b->loss_bytes);
    a->grad = dev_copy(db, b->grad, b->grad_bytes);
    void **stats[6] = {&a->stat_fkl, &a->stat_rkl, &a->stat_g_head, &a->stat_g_tail, &a->stat_w_head, &a->stat_w_tail};
    for (int k = 0; k < 6; k++) *stats[k] = dev_copy(db, b->stat[k], b->stat_bytes);
    a->stat_head_size = (int64_t *)dev_copy(db, b->hs, LN * sizeof(int64_t));
    a->info = (int64_t *)dev_copy(db, b->info, sizeof(int64_t));
    a->valid_rows = (int64_t *)dev_copy(db, b->valid, sizeof(int64_t));
}

static int dev_outputs_untouched(const loss_bufs_t *b, const dev_bufs_t *db)
{
    /* db->p: s, t, labels, loss, grad, 6 stats, hs, info, valid */
    const size_t sizes[14] = {0, 0, 0, b->loss_bytes, b->grad_bytes, b->stat_bytes, b->stat_bytes, b->stat_bytes,
                              b->stat_bytes, b->stat_bytes, b->stat_bytes, LN * sizeof(int64_t), sizeof(int64_t),
                              sizeof(int64_t)};
    int ok = 1;
    for (int k = 3; k < 14; k++) ok = ok && dev_untouched(db->p[k], sizes[k]);
    return ok;
}

static void dev_free(dev_bufs_t *db)
{
    for (int k = 0; k < db->n; k++) cudaFree(db->p[k]);
    db->n = 0;
}
#endif

Test(bad_args, gpu_loss_table)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    kdl_handle_t h = NULL;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS);
    loss_bufs_t b;
    loss_bufs_make(&b, KDL_DTYPE_F32);
    loss_bufs_fill(&b);
    kdl_loss_desc_t d;
    kdl_loss_args_t a;
    dev_bufs_t db = {{0}, 0};
    void *ws = NULL;
    const size_t ws_bytes = 64u << 20;
    cr_assert_eq(cudaMalloc(&ws, ws_bytes), cudaSuccess);

    loss_problem(&b, KDL_DTYPE_F32, KDL_DTYPE_F32, &d, &a);
    to_device(&b, &a, &db);
    size_t need = 0;
    cr_assert_eq(kdl_loss_workspace_size(h, &d, &a, &need), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_assert(need <= ws_bytes);
    cr_assert_eq(kdl_loss_forward_backward(h, &d, &a, ws, ws_bytes), KDL_STATUS_SUCCESS, "the valid problem fails: %s",
                 kdl_get_last_error());
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    dev_free(&db);

    for (size_t c = 0; c < N_LOSS_CASES; c++) {
        const loss_case_t *lc = &loss_cases[c];
        if (lc->ref_only) continue;
        loss_problem(&b, KDL_DTYPE_F32, KDL_DTYPE_F32, &d, &a);
        to_device(&b, &a, &db);
        lc->mutate(&d, &a);
        size_t bytes = 12345;
        kdl_status_t st = kdl_loss_workspace_size(h, &d, &a, &bytes);
        cr_expect_eq(st, lc->want, "workspace_size %s: got %s (%s)", lc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect_eq(bytes, 12345, "workspace_size %s wrote *bytes", lc->name);
        st = kdl_loss_forward_backward(h, &d, &a, ws, ws_bytes);
        cr_expect_eq(st, lc->want, "%s: got %s (%s)", lc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect_eq(cudaDeviceSynchronize(), cudaSuccess, "%s", lc->name);
        cr_expect(dev_outputs_untouched(&b, &db), "%s: a device output was written", lc->name);
        dev_free(&db);
    }

    /* f64 logits: the reference's, not the GPU's */
    loss_bufs_t b64;
    loss_bufs_make(&b64, KDL_DTYPE_F64);
    loss_bufs_fill(&b64);
    loss_problem(&b64, KDL_DTYPE_F64, KDL_DTYPE_F32, &d, &a);
    to_device(&b64, &a, &db);
    cr_expect_eq(kdl_loss_forward_backward(h, &d, &a, ws, ws_bytes), KDL_STATUS_NOT_SUPPORTED);
    cr_expect(dev_outputs_untouched(&b64, &db));
    dev_free(&db);
    loss_bufs_free(&b64);

    /* NULL bytes, NULL stream out */
    loss_problem(&b, KDL_DTYPE_F32, KDL_DTYPE_F32, &d, &a);
    cr_expect_eq(kdl_loss_workspace_size(h, &d, &a, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_get_stream(h, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_loss_forward_backward(h, NULL, &a, ws, ws_bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_loss_forward_backward(h, &d, NULL, ws, ws_bytes), KDL_STATUS_NULL_POINTER);

    cudaFree(ws);
    loss_bufs_free(&b);
    kdl_destroy(h);
#endif
}

/* A workspace one byte smaller than queried (and NULL with a non-zero
 * size): KDL_STATUS_WORKSPACE_TOO_SMALL, nothing written.  Looks for a
 * configuration that needs a workspace; says so when none does. */
Test(bad_args, gpu_workspace_too_small)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    kdl_handle_t h = NULL;
    cr_assert_eq(kdl_create(&h), KDL_STATUS_SUCCESS);
    loss_bufs_t b;
    loss_bufs_make(&b, KDL_DTYPE_F32);
    loss_bufs_fill(&b);
    kdl_loss_desc_t d;
    kdl_loss_args_t a;
    dev_bufs_t db = {{0}, 0};
    int tested = 0;
    for (int div = 0; div < KDL_DIV_COUNT_; div++)
        for (int red = 0; red < KDL_REDUCTION_COUNT_; red++) {
            loss_problem(&b, KDL_DTYPE_F32, KDL_DTYPE_F32, &d, &a);
            to_device(&b, &a, &db);
            d.divergence = (kdl_divergence_t)div;
            d.reduction = (kdl_reduction_t)red;
            size_t need = 0;
            cr_assert_eq(kdl_loss_workspace_size(h, &d, &a, &need), KDL_STATUS_SUCCESS);
            if (need > 0) {
                void *ws = NULL;
                cr_assert_eq(cudaMalloc(&ws, need), cudaSuccess);
                kdl_status_t st = kdl_loss_forward_backward(h, &d, &a, ws, need - 1);
                cr_expect_eq(st, KDL_STATUS_WORKSPACE_TOO_SMALL, "%s/%s: got %s", kdl_divergence_name(d.divergence),
                             kdl_reduction_name(d.reduction), kdl_status_string(st));
                st = kdl_loss_forward_backward(h, &d, &a, NULL, need);
                cr_expect(st == KDL_STATUS_WORKSPACE_TOO_SMALL || st == KDL_STATUS_NULL_POINTER,
                          "NULL workspace of %zu bytes: got %s", need, kdl_status_string(st));
                cr_expect_eq(cudaDeviceSynchronize(), cudaSuccess);
                cr_expect(dev_outputs_untouched(&b, &db), "workspace too small: an output was written");
                cudaFree(ws);
                tested++;
            }
            dev_free(&db);
        }
    if (!tested) cr_log_warn("no loss configuration needs a workspace: WORKSPACE_TOO_SMALL not reachable");
    loss_bufs_free(&b);
    kdl_destroy(h);
#endif
}

/* ========================================================= sparse teacher */

enum { SN = 2, SV = 9, SK = 3 };

typedef void (*sparse_mut_t)(kdl_loss_desc_t *, kdl_sparse_args_t *);
typedef struct sparse_case {
    const char *name;
    kdl_status_t want;
    sparse_mut_t mutate;
} sparse_case_t;

static void sm_null_student(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->student = NULL; }
static void sm_null_idx(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->teacher_indices = NULL; }
static void sm_null_lp(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->teacher_logprobs = NULL; }
static void sm_null_loss(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->loss = NULL; }
static void sm_rows_neg(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->rows = -3; }
static void sm_vocab_zero(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->vocab = 0; }
static void sm_k_zero(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->k = 0; }
static void sm_k_big(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->k = SV + 1; }
static void sm_k_max(kdl_loss_desc_t *d, kdl_sparse_args_t *a)
{
    a->vocab = a->ld_student = a->ld_grad = 4096;
    a->k = a->ld_indices = a->ld_logprobs = KDL_SPARSE_MAX_K + 1;
}
static void sm_ld_s(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->ld_student = SV - 1; }
static void sm_ld_i(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->ld_indices = SK - 1; }
static void sm_ld_l(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->ld_logprobs = 0; }
static void sm_ld_g(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->ld_grad = SV - 1; }
static void sm_mode(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->mode = KDL_SPARSE_MODE_COUNT_; }
static void sm_rkl_renorm(kdl_loss_desc_t *d, kdl_sparse_args_t *a)
{
    a->mode = KDL_SPARSE_RENORMALISED;
    d->divergence = KDL_DIV_RKL;
}
static void sm_akl_topk(kdl_loss_desc_t *d, kdl_sparse_args_t *a)
{
    a->mode = KDL_SPARSE_TAIL_BUCKET; /* AKL is not defined on the renormalised teacher */
    d->divergence = KDL_DIV_AKL;
    d->head_rule = KDL_HEAD_TOPK;
    d->top_k = SK + 1;
}
static void sm_tau(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->temperature = NAN; }
static void sm_scale(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->scale = -INFINITY; }
static void sm_beta(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->beta = 1; }
static void sm_div(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->divergence = KDL_DIV_COUNT_; }
static void sm_sdt(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->student_dtype = (kdl_dtype_t)5; }
static void sm_odt(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->out_dtype = KDL_DTYPE_BF16; }
static void sm_gdt(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->grad_dtype = KDL_DTYPE_BF16; }
static void sm_size(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->struct_size = 1; }
static void sm_dsize(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->struct_size = 1; }
static void sm_ovf(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->ld_indices = INT64_MAX; }
static void sm_ovf_rows(kdl_loss_desc_t *d, kdl_sparse_args_t *a)
{
    a->rows = INT64_MAX / 8;
    a->ld_student = a->ld_grad = 1 << 20;
}

static const sparse_case_t sparse_cases[] = {
    {"student NULL", KDL_STATUS_NULL_POINTER, sm_null_student},
    {"indices NULL", KDL_STATUS_NULL_POINTER, sm_null_idx},
    {"logprobs NULL", KDL_STATUS_NULL_POINTER, sm_null_lp},
    {"loss NULL", KDL_STATUS_NULL_POINTER, sm_null_loss},
    {"rows < 0", KDL_STATUS_BAD_SIZE, sm_rows_neg},
    {"vocab 0", KDL_STATUS_BAD_SIZE, sm_vocab_zero},
    {"k 0", KDL_STATUS_BAD_TOP_K, sm_k_zero},
    {"k > V", KDL_STATUS_BAD_TOP_K, sm_k_big},
    {"k > 1024", KDL_STATUS_BAD_TOP_K, sm_k_max},
    {"ld_student < V", KDL_STATUS_BAD_STRIDE, sm_ld_s},
    {"ld_indices < k", KDL_STATUS_BAD_STRIDE, sm_ld_i},
    {"ld_logprobs 0", KDL_STATUS_BAD_STRIDE, sm_ld_l},
    {"ld_grad < V", KDL_STATUS_BAD_STRIDE, sm_ld_g},
    {"mode COUNT_", KDL_STATUS_BAD_ENUM, sm_mode},
    {"rkl renormalised", KDL_STATUS_NOT_SUPPORTED, sm_rkl_renorm},
    {"akl top_k > k", KDL_STATUS_BAD_TOP_K, sm_akl_topk},
    {"tau NaN", KDL_STATUS_BAD_TEMPERATURE, sm_tau},
    {"scale -inf", KDL_STATUS_BAD_SCALE, sm_scale},
    {"beta 1", KDL_STATUS_BAD_BETA, sm_beta},
    {"divergence COUNT_", KDL_STATUS_BAD_ENUM, sm_div},
    {"student dtype 5", KDL_STATUS_BAD_ENUM, sm_sdt},
    {"out dtype bf16", KDL_STATUS_NOT_SUPPORTED, sm_odt},
    {"grad dtype other", KDL_STATUS_NOT_SUPPORTED, sm_gdt},
    {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, sm_size},
    {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, sm_dsize},
    {"ld_indices INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, sm_ovf},
    {"rows x ld overflows", KDL_STATUS_SIZE_OVERFLOW, sm_ovf_rows},
};

Test(bad_args, ref_sparse_table)
{
    double S[SN * SV], lp[SN * SK], loss[SN], grad[SN * SV];
    int64_t idx[SN * SK] = {0, 4, 8, 1, 2, 3}, info, valid, bad_idx;
    kdl_rng_t r = {5};
    kdl_fill_logits(&r, S, SN * SV, 1.0);
    for (int i = 0; i < SN * SK; i++) lp[i] = log(0.3);
    for (int tail = 0; tail < 2; tail++)
        for (size_t c = 0; c < sizeof sparse_cases / sizeof sparse_cases[0]; c++) {
            kdl_loss_desc_t d;
            kdl_loss_desc_init(&d);
            d.divergence = KDL_DIV_FKL;
            d.reduction = KDL_REDUCTION_NONE;
            kdl_sparse_args_t a;
            kdl_sparse_args_init(&a);
            a.mode = tail ? KDL_SPARSE_TAIL_BUCKET : KDL_SPARSE_RENORMALISED;
            a.rows = SN;
            a.vocab = SV;
            a.k = SK;
            a.student = S;
            a.ld_student = a.ld_grad = SV;
            a.student_dtype = a.teacher_dtype = a.grad_dtype = a.out_dtype = KDL_DTYPE_F64;
            a.teacher_indices = idx;
            a.teacher_logprobs = lp;
            a.ld_indices = a.ld_logprobs = SK;
            a.grad = grad;
            a.loss = loss;
            a.info = &info;
            a.valid_rows = &valid;
            a.bad_index_rows = &bad_idx;
            memset(loss, SENTINEL, sizeof loss);
            memset(grad, SENTINEL, sizeof grad);
            memset(&info, SENTINEL, sizeof info);
            memset(&valid, SENTINEL, sizeof valid);
            memset(&bad_idx, SENTINEL, sizeof bad_idx);
            if (c == 0) { /* the valid problem */
                cr_assert_eq(kdl_ref_sparse_loss(&d, &a), KDL_STATUS_SUCCESS, "valid sparse problem: %s",
                             kdl_get_last_error());
                memset(loss, SENTINEL, sizeof loss);
                memset(grad, SENTINEL, sizeof grad);
                memset(&info, SENTINEL, sizeof info);
                memset(&valid, SENTINEL, sizeof valid);
                memset(&bad_idx, SENTINEL, sizeof bad_idx);
            }
            sparse_cases[c].mutate(&d, &a);
            kdl_status_t st = kdl_ref_sparse_loss(&d, &a);
            cr_expect_eq(st, sparse_cases[c].want, "[%s] %s: got %s (%s)", tail ? "tail" : "renormalised",
                         sparse_cases[c].name, kdl_status_string(st), kdl_get_last_error());
            cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", sparse_cases[c].name);
            cr_expect(all_sentinel(loss, sizeof loss) && all_sentinel(grad, sizeof grad) &&
                          all_sentinel(&info, sizeof info) && all_sentinel(&valid, sizeof valid) &&
                          all_sentinel(&bad_idx, sizeof bad_idx),
                      "%s: an output was written", sparse_cases[c].name);
            cr_expect_eq(kdl_sparse_validate(&d, &a, 1), sparse_cases[c].want, "%s: validate disagrees",
                         sparse_cases[c].name);
        }
    cr_expect_eq(kdl_ref_sparse_loss(NULL, NULL), KDL_STATUS_NULL_POINTER);

    /* the index checker */
    int64_t dup[SK] = {1, 1, 2}, out[SK] = {0, 9, 2}, neg[SK] = {0, -1, 2}, ok[SK] = {8, 0, 3};
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, ok, SK), KDL_STATUS_SUCCESS);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, dup, SK), KDL_STATUS_BAD_PARAM);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, out, SK), KDL_STATUS_BAD_PARAM);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, neg, SK), KDL_STATUS_BAD_PARAM);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, NULL, SK), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_sparse_check_indices(-1, SV, SK, ok, SK), KDL_STATUS_BAD_SIZE);
    cr_expect_eq(kdl_sparse_check_indices(1, 0, SK, ok, SK), KDL_STATUS_BAD_SIZE);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, 0, ok, SK), KDL_STATUS_BAD_TOP_K);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, ok, SK - 1), KDL_STATUS_BAD_STRIDE);
    cr_expect_eq(kdl_sparse_check_indices(0, SV, SK, NULL, SK), KDL_STATUS_SUCCESS);
}

/* ============================================================ Sinkhorn */

enum { OB = 2, ON = 3, OM = 4 };

typedef void (*ot_mut_t)(kdl_sinkhorn_desc_t *, kdl_sinkhorn_args_t *);
typedef struct ot_case {
    const char *name;
    kdl_status_t want;
    ot_mut_t mutate;
} ot_case_t;

static double ot_x[OB * ON * 2], ot_y[OB * OM * 2], ot_cxx[OB * ON * ON];
static const int64_t ot_sizes_bad[OB] = {3, 0}, ot_sizes_n[OB] = {3, 3}, ot_sizes_huge[OB] = {INT64_MAX / 2, 3};

static void om_null_cost(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->cost = NULL; }
static void om_null_value(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->value = NULL; }
static void om_cost_and_points(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    a->x = ot_x;
    a->y = ot_y;
    a->dim = 2;
}
static void om_x_only(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    a->cost = NULL;
    a->x = ot_x;
    a->dim = 2;
}
static void om_dim0(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    a->cost = NULL;
    a->x = ot_x;
    a->y = ot_y;
    a->dim = 0;
}
static void om_grad_x_cost(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->grad_x = ot_x; }
static void om_batch_neg(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->batch = -1; }
static void om_n0(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->n = 0; }
static void om_m_neg(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->m = -4; }
static void om_sizes_one(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->sizes_n = ot_sizes_n; }
static void om_sizes_zero(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    a->sizes_n = ot_sizes_bad;
    a->sizes_m = ot_sizes_n;
}
static void om_sizes_huge(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    a->sizes_n = ot_sizes_huge;
    a->sizes_m = ot_sizes_n;
}
static void om_n_huge(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    a->n = (int64_t)1 << 31;
    a->m = 2;
}
static void om_nm_overflow(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    a->batch = INT64_MAX / 4;
    a->n = a->m = INT32_MAX;
}
static void om_eps0(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->epsilon = 0; }
static void om_eps_nan(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->epsilon = NAN; }
static void om_eps_inf(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->epsilon = INFINITY; }
static void om_iter0(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->max_iter = 0; }
static void om_check0(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->check_every = 0; }
static void om_tol_neg(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->tol = -1e-9; }
static void om_tol_nan(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->tol = NAN; }
static void om_factor1(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    d->eps_scaling = 1;
    d->eps_scaling_factor = 1.0;
}
static void om_factor_nan(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    d->eps_scaling = 1;
    d->eps_scaling_factor = NAN;
}
static void om_stage0(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    d->eps_scaling = 1;
    d->eps_stage_iter = 0;
}
static void om_value_enum(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->value = KDL_OT_VALUE_COUNT_; }
static void om_metric_enum(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->metric = (kdl_ot_metric_t)-1; }
static void om_dtype_enum(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->dtype = (kdl_dtype_t)9; }
static void om_dtype_f16(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->dtype = KDL_DTYPE_F16; }
static void om_debias_no_cxx(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->debias = 1; }
static void om_debias_no_cyy(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    d->debias = 1;
    a->cost_xx = ot_cxx;
}
static void om_self_no_ptr(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    d->debias = 1;
    a->cost_xx = ot_cxx;
    a->self_yy_given = 1;
}
static void om_dsize(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { d->struct_size = 0; }
static void om_asize(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->struct_size = sizeof *a + 1; }

static const ot_case_t ot_cases[] = {
    {"cost NULL", KDL_STATUS_NULL_POINTER, om_null_cost},
    {"value NULL", KDL_STATUS_NULL_POINTER, om_null_value},
    {"cost and points", KDL_STATUS_BAD_PARAM, om_cost_and_points},
    {"x without y", KDL_STATUS_NULL_POINTER, om_x_only},
    {"dim 0", KDL_STATUS_BAD_SIZE, om_dim0},
    {"grad_x with a cost", KDL_STATUS_BAD_PARAM, om_grad_x_cost},
    {"batch -1", KDL_STATUS_BAD_SIZE, om_batch_neg},
    {"n 0", KDL_STATUS_BAD_SIZE, om_n0},
    {"m -4", KDL_STATUS_BAD_SIZE, om_m_neg},
    {"sizes_n without sizes_m", KDL_STATUS_NULL_POINTER, om_sizes_one},
    {"ragged size 0", KDL_STATUS_BAD_SIZE, om_sizes_zero},
    {"ragged size > 2^31", KDL_STATUS_SIZE_OVERFLOW, om_sizes_huge},
    {"n = 2^31", KDL_STATUS_SIZE_OVERFLOW, om_n_huge},
    {"B n m overflows", KDL_STATUS_SIZE_OVERFLOW, om_nm_overflow},
    {"eps 0", KDL_STATUS_BAD_EPSILON, om_eps0},
    {"eps NaN", KDL_STATUS_BAD_EPSILON, om_eps_nan},
    {"eps inf", KDL_STATUS_BAD_EPSILON, om_eps_inf},
    {"max_iter 0", KDL_STATUS_BAD_ITERATIONS, om_iter0},
    {"check_every 0", KDL_STATUS_BAD_ITERATIONS, om_check0},
    {"tol < 0", KDL_STATUS_BAD_TOLERANCE, om_tol_neg},
    {"tol NaN", KDL_STATUS_BAD_TOLERANCE, om_tol_nan},
    {"eps factor 1", KDL_STATUS_BAD_SCHEDULE, om_factor1},
    {"eps factor NaN", KDL_STATUS_BAD_SCHEDULE, om_factor_nan},
    {"eps stage iter 0", KDL_STATUS_BAD_ITERATIONS, om_stage0},
    {"value enum", KDL_STATUS_BAD_ENUM, om_value_enum},
    {"metric enum", KDL_STATUS_BAD_ENUM, om_metric_enum},
    {"dtype enum", KDL_STATUS_BAD_ENUM, om_dtype_enum},
    {"dtype f16", KDL_STATUS_NOT_SUPPORTED, om_dtype_f16},
    {"debias without cost_xx", KDL_STATUS_NULL_POINTER, om_debias_no_cxx},
    {"debias without cost_yy", KDL_STATUS_NULL_POINTER, om_debias_no_cyy},
    {"self_yy_given, self_yy NULL", KDL_STATUS_NULL_POINTER, om_self_no_ptr},
    {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, om_dsize},
    {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, om_asize},
};

Test(bad_args, ref_sinkhorn_table)
{
    double C[OB * ON * OM], value[OB], err[OB], f[OB * ON], g[OB * OM], plan[OB * ON * OM];
    int64_t iters[OB];
    for (int i = 0; i < OB * ON * OM; i++) C[i] = (double)((i * 7) % 5) / 4.0;
    for (size_t c = 0; c <= sizeof ot_cases / sizeof ot_cases[0]; c++) {
        kdl_sinkhorn_desc_t d;
        kdl_sinkhorn_desc_init(&d);
        kdl_sinkhorn_args_t a;
        kdl_sinkhorn_args_init(&a);
        a.batch = OB;
        a.n = ON;
        a.m = OM;
        a.dtype = KDL_DTYPE_F64;
        a.cost = C;
        a.value = value;
        a.iterations = iters;
        a.marginal_error = err;
        a.f = f;
        a.g = g;
        a.plan = plan;
        memset(value, SENTINEL, sizeof value);
        memset(err, SENTINEL, sizeof err);
        memset(f, SENTINEL, sizeof f);
        memset(g, SENTINEL, sizeof g);
        memset(plan, SENTINEL, sizeof plan);
        memset(iters, SENTINEL, sizeof iters);
        if (c == sizeof ot_cases / sizeof ot_cases[0]) { /* last: the valid problem */
            cr_expect_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS, "valid problem: %s", kdl_get_last_error());
            break;
        }
        ot_cases[c].mutate(&d, &a);
        kdl_status_t st = kdl_ref_sinkhorn(&d, &a);
        cr_expect_eq(st, ot_cases[c].want, "%s: got %s (%s)", ot_cases[c].name, kdl_status_string(st),
                     kdl_get_last_error());
        cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", ot_cases[c].name);
        cr_expect(all_sentinel(value, sizeof value) && all_sentinel(err, sizeof err) && all_sentinel(f, sizeof f) &&
                      all_sentinel(g, sizeof g) && all_sentinel(plan, sizeof plan) && all_sentinel(iters, sizeof iters),
                  "%s: an output was written", ot_cases[c].name);
        cr_expect_eq(kdl_sinkhorn_validate(&d, &a, 1), ot_cases[c].want, "%s: validate disagrees", ot_cases[c].name);
    }
    cr_expect_eq(kdl_ref_sinkhorn(NULL, NULL), KDL_STATUS_NULL_POINTER);

    /* Non-finite data: the reference refuses before writing (the GPU flags
     * the problem instead). */
    const double bad[] = {NAN, INFINITY, -INFINITY};
    for (int k = 0; k < 3; k++) {
        kdl_sinkhorn_desc_t d;
        kdl_sinkhorn_desc_init(&d);
        kdl_sinkhorn_args_t a;
        kdl_sinkhorn_args_init(&a);
        a.batch = OB;
        a.n = ON;
        a.m = OM;
        a.dtype = KDL_DTYPE_F64;
        double Cb[OB * ON * OM];
        memcpy(Cb, C, sizeof Cb);
        Cb[OB * ON * OM - 1] = bad[k];
        a.cost = Cb;
        a.value = value;
        memset(value, SENTINEL, sizeof value);
        cr_expect_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_NONFINITE_INPUT, "cost %g", bad[k]);
        cr_expect(all_sentinel(value, sizeof value), "cost %g: value written", bad[k]);
    }
}

/* ================================================================ SinKD */

enum { KN = 4, KV = 6 };

typedef void (*kd_mut_t)(kdl_sinkd_desc_t *, kdl_sinkd_args_t *);
typedef struct kd_case {
    const char *name;
    kdl_status_t want;
    kd_mut_t mutate;
} kd_case_t;

static void km_null_s(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->student = NULL; }
static void km_null_t(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->teacher = NULL; }
static void km_null_loss(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->loss = NULL; }
static void km_rows_neg(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->rows = -2; }
static void km_vocab0(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->vocab = 0; }
static void km_ld_s(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->ld_student = KV - 1; }
static void km_ld_t(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->ld_teacher = 1; }
static void km_ld_g(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->ld_grad = 0; }
static void km_group(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->group_size = 3; }
static void km_group_neg(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->group_size = -1; }
static void km_tau(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->temperature = 0; }
static void km_tau_inf(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->temperature = INFINITY; }
static void km_eps(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->epsilon = -0.1; }
static void km_iter(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->max_iter = -5; }
static void km_check(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->check_every = 0; }
static void km_tol(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->tol = NAN; }
static void km_scale(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->scale = NAN; }
static void km_metric(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->metric = KDL_OT_METRIC_COUNT_; }
static void km_sdt(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->student_dtype = (kdl_dtype_t)4; }
static void km_odt(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->out_dtype = KDL_DTYPE_F16; }
static void km_gdt(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->grad_dtype = KDL_DTYPE_BF16; }
static void km_dsize(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->struct_size = 3; }
static void km_asize(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->struct_size = 0; }
static void km_ovf(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->ld_student = INT64_MAX; }
static void km_group_huge(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a)
{
    a->rows = (int64_t)1 << 32;
    d->group_size = 0; /* one group of 2^32 rows */
}

static const kd_case_t kd_cases[] = {
    {"student NULL", KDL_STATUS_NULL_POINTER, km_null_s},
    {"teacher NULL", KDL_STATUS_NULL_POINTER, km_null_t},
    {"loss NULL", KDL_STATUS_NULL_POINTER, km_null_loss},
    {"rows < 0", KDL_STATUS_BAD_SIZE, km_rows_neg},
    {"vocab 0", KDL_STATUS_BAD_SIZE, km_vocab0},
    {"ld_student < V", KDL_STATUS_BAD_STRIDE, km_ld_s},
    {"ld_teacher < V", KDL_STATUS_BAD_STRIDE, km_ld_t},
    {"ld_grad 0", KDL_STATUS_BAD_STRIDE, km_ld_g},
    {"rows not a multiple of the group", KDL_STATUS_BAD_GROUP, km_group},
    {"group_size < 0", KDL_STATUS_BAD_GROUP, km_group_neg},
    {"tau 0", KDL_STATUS_BAD_TEMPERATURE, km_tau},
    {"tau inf", KDL_STATUS_BAD_TEMPERATURE, km_tau_inf},
    {"eps < 0", KDL_STATUS_BAD_EPSILON, km_eps},
    {"max_iter < 1", KDL_STATUS_BAD_ITERATIONS, km_iter},
    {"check_every 0", KDL_STATUS_BAD_ITERATIONS, km_check},
    {"tol NaN", KDL_STATUS_BAD_TOLERANCE, km_tol},
    {"scale NaN", KDL_STATUS_BAD_SCALE, km_scale},
    {"metric enum", KDL_STATUS_BAD_ENUM, km_metric},
    {"student dtype 4", KDL_STATUS_BAD_ENUM, km_sdt},
    {"out dtype f16", KDL_STATUS_NOT_SUPPORTED, km_odt},
    {"grad dtype other", KDL_STATUS_NOT_SUPPORTED, km_gdt},
    {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, km_dsize},
    {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, km_asize},
    {"ld_student INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, km_ovf},
    {"group of 2^32 rows", KDL_STATUS_SIZE_OVERFLOW, km_group_huge},
};

Test(bad_args, ref_sinkd_table)
{
    double S[KN * KV], T[KN * KV], loss, grad[KN * KV], gl[2], plan[2 * 2 * 2], err[2];
    int64_t iters[2], info;
    kdl_rng_t r = {31};
    kdl_fill_logits(&r, S, KN * KV, 1.0);
    kdl_fill_logits(&r, T, KN * KV, 1.0);
    for (size_t c = 0; c <= sizeof kd_cases / sizeof kd_cases[0]; c++) {
        kdl_sinkd_desc_t d;
        kdl_sinkd_desc_init(&d);
        d.group_size = 2;
        kdl_sinkd_args_t a;
        kdl_sinkd_args_init(&a);
        a.rows = KN;
        a.vocab = KV;
        a.student = S;
        a.teacher = T;
        a.ld_student = a.ld_teacher = a.ld_grad = KV;
        a.student_dtype = a.teacher_dtype = a.grad_dtype = a.out_dtype = KDL_DTYPE_F64;
        a.grad = grad;
        a.loss = &loss;
        a.group_loss = gl;
        a.plan = plan;
        a.iterations = iters;
        a.marginal_error = err;
        a.info = &info;
        memset(&loss, SENTINEL, sizeof loss);
        memset(grad, SENTINEL, sizeof grad);
        memset(gl, SENTINEL, sizeof gl);
        memset(plan, SENTINEL, sizeof plan);
        memset(err, SENTINEL, sizeof err);
        memset(iters, SENTINEL, sizeof iters);
        memset(&info, SENTINEL, sizeof info);
        if (c == sizeof kd_cases / sizeof kd_cases[0]) {
            cr_expect_eq(kdl_ref_sinkd(&d, &a), KDL_STATUS_SUCCESS, "valid problem: %s", kdl_get_last_error());
            break;
        }
        kd_cases[c].mutate(&d, &a);
        kdl_status_t st = kdl_ref_sinkd(&d, &a);
        cr_expect_eq(st, kd_cases[c].want, "%s: got %s (%s)", kd_cases[c].name, kdl_status_string(st),
                     kdl_get_last_error());
        cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", kd_cases[c].name);
        cr_expect(all_sentinel(&loss, sizeof loss) && all_sentinel(grad, sizeof grad) && all_sentinel(gl, sizeof gl) &&
                      all_sentinel(plan, sizeof plan) && all_sentinel(err, sizeof err) &&
                      all_sentinel(iters, sizeof iters) && all_sentinel(&info, sizeof info),
                  "%s: an output was written", kd_cases[c].name);
        cr_expect_eq(kdl_sinkd_validate(&d, &a, 1), kd_cases[c].want, "%s: validate disagrees", kd_cases[c].name);
    }
    cr_expect_eq(kdl_ref_sinkd(NULL, NULL), KDL_STATUS_NULL_POINTER);
}

/* ======================================================= fused linear */

enum { FN = 3, FD = 4, FV = 5 };

typedef void (*fl_mut_t)(kdl_loss_desc_t *, kdl_fused_linear_args_t *);
typedef struct fl_case {
    const char *name;
    kdl_status_t want;
    fl_mut_t mutate;
} fl_case_t;

static void fm_null_h(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->hidden_states = NULL; }
static void fm_null_w(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->weight = NULL; }
static void fm_null_t(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->teacher = NULL; }
static void fm_null_loss(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->loss = NULL; }
static void fm_rows(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->rows = -1; }
static void fm_hidden(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->hidden = 0; }
static void fm_vocab(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->vocab = -1; }
static void fm_chunk(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->chunk_rows = -1; }
static void fm_ld_h(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_hidden = FD - 1; }
static void fm_ld_w(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_weight = 0; }
static void fm_ld_t(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_teacher = FV - 1; }
static void fm_ld_gh(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_grad_hidden = 1; }
static void fm_ld_gw(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_grad_weight = FD - 1; }
static void fm_gdt(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->grad_dtype = KDL_DTYPE_F16; }
static void fm_hdt(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->hidden_dtype = (kdl_dtype_t)6; }
static void fm_tau(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->temperature = -1; }
static void fm_mu(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->mu = 2; }
static void fm_topk(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->top_k = FV + 1; }
static void fm_odt(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->out_dtype = KDL_DTYPE_BF16; }
static void fm_size(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->struct_size = 2; }
static void fm_dsize(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->struct_size = 2; }
static void fm_ovf(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_weight = INT64_MAX; }
static void fm_ovf_logits(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a)
{
    /* every input fits, the reference's materialised [N, V] float64 logits do not */
    a->rows = (int64_t)1 << 40;
    a->vocab = (int64_t)1 << 30;
    a->ld_teacher = a->vocab;
    a->hidden = a->ld_hidden = a->ld_weight = a->ld_grad_hidden = a->ld_grad_weight = 1;
    d->top_k = 1;
}

static const fl_case_t fl_cases[] = {
    {"hidden_states NULL", KDL_STATUS_NULL_POINTER, fm_null_h},
    {"weight NULL", KDL_STATUS_NULL_POINTER, fm_null_w},
    {"teacher NULL", KDL_STATUS_NULL_POINTER, fm_null_t},
    {"loss NULL", KDL_STATUS_NULL_POINTER, fm_null_loss},
    {"rows < 0", KDL_STATUS_BAD_SIZE, fm_rows},
    {"hidden 0", KDL_STATUS_BAD_SIZE, fm_hidden},
    {"vocab < 0", KDL_STATUS_BAD_SIZE, fm_vocab},
    {"chunk_rows < 0", KDL_STATUS_BAD_SIZE, fm_chunk},
    {"ld_hidden < d", KDL_STATUS_BAD_STRIDE, fm_ld_h},
    {"ld_weight 0", KDL_STATUS_BAD_STRIDE, fm_ld_w},
    {"ld_teacher < V", KDL_STATUS_BAD_STRIDE, fm_ld_t},
    {"ld_grad_hidden < d", KDL_STATUS_BAD_STRIDE, fm_ld_gh},
    {"ld_grad_weight < d", KDL_STATUS_BAD_STRIDE, fm_ld_gw},
    {"grad dtype f16", KDL_STATUS_NOT_SUPPORTED, fm_gdt},
    {"hidden dtype 6", KDL_STATUS_BAD_ENUM, fm_hdt},
    {"tau < 0", KDL_STATUS_BAD_TEMPERATURE, fm_tau},
    {"mu 2", KDL_STATUS_BAD_MU, fm_mu},
    {"top_k > V", KDL_STATUS_BAD_TOP_K, fm_topk},
    {"out dtype bf16", KDL_STATUS_NOT_SUPPORTED, fm_odt},
    {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, fm_size},
    {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, fm_dsize},
    {"ld_weight INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, fm_ovf},
    {"N x V logits overflow", KDL_STATUS_SIZE_OVERFLOW, fm_ovf_logits},
};

Test(bad_args, ref_fused_linear_table)
{
    double H[FN * FD], W[FV * FD], T[FN * FV], loss[FN], dH[FN * FD], dW[FV * FD];
    int64_t info, valid;
    kdl_rng_t r = {8};
    kdl_fill_logits(&r, H, FN * FD, 1.0);
    kdl_fill_logits(&r, W, FV * FD, 1.0);
    kdl_fill_logits(&r, T, FN * FV, 1.0);
    for (size_t c = 0; c <= sizeof fl_cases / sizeof fl_cases[0]; c++) {
        kdl_loss_desc_t d;
        kdl_loss_desc_init(&d);
        d.divergence = KDL_DIV_JSD;
        d.reduction = KDL_REDUCTION_NONE;
        kdl_fused_linear_args_t a;
        kdl_fused_linear_args_init(&a);
        a.rows = FN;
        a.hidden = FD;
        a.vocab = FV;
        a.hidden_states = H;
        a.ld_hidden = FD;
        a.weight = W;
        a.ld_weight = FD;
        a.teacher = T;
        a.ld_teacher = FV;
        a.hidden_dtype = a.weight_dtype = a.teacher_dtype = a.grad_dtype = a.out_dtype = KDL_DTYPE_F64;
        a.grad_hidden = dH;
        a.ld_grad_hidden = FD;
        a.grad_weight = dW;
        a.ld_grad_weight = FD;
        a.loss = loss;
        a.info = &info;
        a.valid_rows = &valid;
        memset(loss, SENTINEL, sizeof loss);
        memset(dH, SENTINEL, sizeof dH);
        memset(dW, SENTINEL, sizeof dW);
        memset(&info, SENTINEL, sizeof info);
        memset(&valid, SENTINEL, sizeof valid);
        if (c == sizeof fl_cases / sizeof fl_cases[0]) {
            cr_expect_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS, "valid problem: %s",
                         kdl_get_last_error());
            break;
        }
        fl_cases[c].mutate(&d, &a);
        kdl_status_t st = kdl_ref_fused_linear_loss(&d, &a);
        cr_expect_eq(st, fl_cases[c].want, "%s: got %s (%s)", fl_cases[c].name, kdl_status_string(st),
                     kdl_get_last_error());
        cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", fl_cases[c].name);
        cr_expect(all_sentinel(loss, sizeof loss) && all_sentinel(dH, sizeof dH) && all_sentinel(dW, sizeof dW) &&
                      all_sentinel(&info, sizeof info) && all_sentinel(&valid, sizeof valid),
                  "%s: an output was written", fl_cases[c].name);
        cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), fl_cases[c].want, "%s: validate disagrees",
                     fl_cases[c].name);
    }
    cr_expect_eq(kdl_ref_fused_linear_loss(NULL, NULL), KDL_STATUS_NULL_POINTER);
}
