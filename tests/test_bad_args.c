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
 * Covered (counts per table in docs/hardening.md):
 *   kdl_ref_loss_forward_backward, kdl_loss_validate (same table, f64, f32
 *   and bf16 inputs); kdl_loss_workspace_size, kdl_loss_forward_backward
 *   (the table with host buffers through the GPU entry points, and on a GPU
 *   with device buffers, plus a workspace one byte too small);
 *   kdl_ref_sparse_loss, kdl_sparse_validate, kdl_sparse_check_indices,
 *   kdl_sparse_workspace_size, kdl_sparse_loss;
 *   kdl_ref_sinkhorn, kdl_sinkhorn_validate (plus non-finite costs),
 *   kdl_sinkhorn_workspace_size, kdl_sinkhorn;
 *   kdl_ref_sinkd, kdl_sinkd_validate, kdl_sinkd_workspace_size, kdl_sinkd;
 *   kdl_ref_shard_step, kdl_shard_validate, kdl_shard_sizes, kdl_shard_step;
 *   kdl_ref_fused_linear_loss, kdl_fused_linear_validate,
 *   kdl_fused_linear_workspace_size, kdl_fused_linear_loss;
 *   kdl_create, kdl_destroy, kdl_set_stream, kdl_get_stream and every GPU
 *   entry point with a NULL handle (any build); the extension workspaces
 *   one byte too small or misaligned (GPU only);
 *   kdl_status_string for every status and unknown values.
 * Each extension table has a reference half (f64 data; rows marked ON_GPU
 * skipped) and a GPU half (f32 data; rows marked ON_REF skipped) that runs
 * through the GPU entry points with host buffers: every invalid argument is
 * refused before any launch or use of the data.  The GPU half needs a
 * handle: a real one on a device, a dummy in a build without CUDA (the
 * stubs check, then return NO_DEVICE: the valid problem must give that);
 * a CUDA build without a device skips it visibly.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ext_internal.h" /* kdl_shard_validate, the shard step check both paths share */
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
/* ---- misaligned bases: floats one byte off, int64 arrays four */
#define MIS(p, off) ((void *)((char *)(uintptr_t)(p) + (off)))
static void m_mis_student(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->student = MIS(a->student, 1); }
static void m_mis_teacher(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->teacher = MIS(a->teacher, 1); }
static void m_mis_grad(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->grad = MIS(a->grad, 1); }
static void m_mis_loss(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->loss = MIS(a->loss, 1); }
static void m_mis_labels(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->labels = MIS(a->labels, 4); }
static void m_mis_stat(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->stat_w_tail = MIS(a->stat_w_tail, 1); }
static void m_mis_hs(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->stat_head_size = MIS(a->stat_head_size, 4); }
static void m_mis_info(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->info = MIS(a->info, 4); }
static void m_mis_valid(kdl_loss_desc_t *d, kdl_loss_args_t *a) { a->valid_rows = MIS(a->valid_rows, 1); }

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
    {"student misaligned", KDL_STATUS_MISALIGNED, m_mis_student, 0},
    {"teacher misaligned", KDL_STATUS_MISALIGNED, m_mis_teacher, 0},
    {"grad misaligned", KDL_STATUS_MISALIGNED, m_mis_grad, 0},
    {"loss misaligned", KDL_STATUS_MISALIGNED, m_mis_loss, 0},
    {"labels misaligned", KDL_STATUS_MISALIGNED, m_mis_labels, 0},
    {"stat_w_tail misaligned", KDL_STATUS_MISALIGNED, m_mis_stat, 0},
    {"stat_head_size misaligned", KDL_STATUS_MISALIGNED, m_mis_hs, 0},
    {"info misaligned", KDL_STATUS_MISALIGNED, m_mis_info, 0},
    {"valid_rows misaligned", KDL_STATUS_MISALIGNED, m_mis_valid, 0},
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

/* ------------------------------------- the GPU entry points check first */
/*
 * The extension tables (and the loss table once more) also run through the
 * GPU entry points, with host buffers: an invalid argument is refused before
 * any launch or any use of the data, so nothing is read or written on any
 * build.  The handle: a real one on a device; in a build without CUDA a
 * dummy (the stubs check the arguments first, then return NO_DEVICE without
 * touching it, so the valid problem must give NO_DEVICE); a CUDA build
 * without a device cannot create one and skips visibly (the NULL-handle
 * checks in gpu_entry_points_without_a_handle run there).
 */
enum { ON_BOTH = 0, ON_REF = 1, ON_GPU = 2 };

typedef struct gpu_ctx {
    kdl_handle_t h;
    int device;
    void *ws;        /* a 16-byte aligned workspace (device memory on a device) */
    size_t ws_bytes;
} gpu_ctx_t;

#ifndef KDL_HAVE_CUDA
static _Alignas(16) unsigned char dummy_handle_storage[64];
#endif

static void gpu_ctx_open(gpu_ctx_t *g)
{
    memset(g, 0, sizeof *g);
    if (kdl_test_have_gpu()) {
#ifdef KDL_HAVE_CUDA
        cr_assert_eq(kdl_create(&g->h), KDL_STATUS_SUCCESS);
        g->device = 1;
        g->ws_bytes = 64u << 20;
        cr_assert_eq(cudaMalloc(&g->ws, g->ws_bytes), cudaSuccess);
        return;
#endif
    }
#ifndef KDL_HAVE_CUDA
    g->h = (kdl_handle_t)(void *)dummy_handle_storage;
    g->ws = dummy_handle_storage;
    g->ws_bytes = sizeof dummy_handle_storage;
#else
    cr_skip_test("no CUDA device: kdl_create gives no handle here, so the GPU entry points stop at the "
                 "handle (see gpu_entry_points_without_a_handle); a build without CUDA runs this table "
                 "through the stubs");
#endif
}

static void gpu_ctx_close(gpu_ctx_t *g)
{
#ifdef KDL_HAVE_CUDA
    if (g->device) {
        cr_expect_eq(cudaDeviceSynchronize(), cudaSuccess);
        cudaFree(g->ws);
        kdl_destroy(g->h);
    }
#endif
    memset(g, 0, sizeof *g);
}

/* What the valid problem gives through a GPU entry point: checked, then
 * NO_DEVICE on the stubs; on a device it is not run (host buffers), only
 * the shared validator is asked. */
#define GPU_VALID_EXPECT(g, call, what)                                                              \
    do {                                                                                             \
        if (!(g)->device) {                                                                          \
            kdl_status_t st_ = (call);                                                               \
            cr_expect_eq(st_, KDL_STATUS_NO_DEVICE, "%s, valid problem: got %s (%s)", (what),        \
                         kdl_status_string(st_), kdl_get_last_error());                              \
        }                                                                                            \
    } while (0)

Test(bad_args, gpu_loss_entry_points_check_first)
{
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    loss_bufs_t b;
    loss_bufs_make(&b, KDL_DTYPE_F32);
    kdl_loss_desc_t d;
    kdl_loss_args_t a;
    loss_problem(&b, KDL_DTYPE_F32, KDL_DTYPE_F32, &d, &a);
    loss_bufs_fill(&b);
    cr_assert_eq(kdl_loss_validate(&d, &a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    size_t bytes = 12345;
    GPU_VALID_EXPECT(&g, kdl_loss_workspace_size(g.h, &d, &a, &bytes), "loss workspace");
    GPU_VALID_EXPECT(&g, kdl_loss_forward_backward(g.h, &d, &a, g.ws, g.ws_bytes), "loss");
    cr_expect(loss_bufs_untouched(&b));
    int n = 0;
    for (size_t c = 0; c < N_LOSS_CASES; c++) {
        const loss_case_t *lc = &loss_cases[c];
        if (lc->ref_only) continue;
        loss_problem(&b, KDL_DTYPE_F32, KDL_DTYPE_F32, &d, &a);
        lc->mutate(&d, &a);
        loss_bufs_fill(&b);
        bytes = 12345;
        kdl_status_t st = kdl_loss_workspace_size(g.h, &d, &a, &bytes);
        cr_expect_eq(st, lc->want, "workspace %s: got %s (%s)", lc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect_eq(bytes, 12345, "workspace %s wrote *bytes", lc->name);
        st = kdl_loss_forward_backward(g.h, &d, &a, g.ws, g.ws_bytes);
        cr_expect_eq(st, lc->want, "%s: got %s (%s)", lc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(loss_bufs_untouched(&b), "%s: an output was written", lc->name);
        cr_expect_eq(kdl_loss_validate(&d, &a, 0), lc->want, "%s: validate disagrees", lc->name);
        n++;
    }
    /* f64 logits are the reference's */
    loss_bufs_t b64;
    loss_bufs_make(&b64, KDL_DTYPE_F64);
    loss_problem(&b64, KDL_DTYPE_F64, KDL_DTYPE_F32, &d, &a);
    loss_bufs_fill(&b64);
    cr_expect_eq(kdl_loss_forward_backward(g.h, &d, &a, g.ws, g.ws_bytes), KDL_STATUS_NOT_SUPPORTED);
    cr_expect(loss_bufs_untouched(&b64));
    loss_bufs_free(&b64);
    cr_expect_eq(kdl_loss_workspace_size(g.h, &d, &a, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_loss_forward_backward(g.h, NULL, &a, g.ws, g.ws_bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_loss_forward_backward(g.h, &d, NULL, g.ws, g.ws_bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_get_stream(g.h, NULL), KDL_STATUS_NULL_POINTER);
    cr_log_info("loss GPU entry points: %d cases + f64 + 3 NULL", n);
    loss_bufs_free(&b);
    gpu_ctx_close(&g);
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
    int path; /* ON_BOTH, ON_REF, ON_GPU */
} sparse_case_t;

static void sm_null_student(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->student = NULL; }
static void sm_null_idx(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->teacher_indices = NULL; }
static void sm_null_lp(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->teacher_logprobs = NULL; }
static void sm_null_loss(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->loss = NULL; }
static void sm_rows_neg(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->rows = -3; }
static void sm_vocab_zero(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->vocab = 0; }
static void sm_vocab_neg(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->vocab = -1; }
static void sm_k_zero(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->k = 0; }
static void sm_k_neg(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->k = -2; }
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
static void sm_tau0(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->temperature = 0; }
static void sm_scale(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->scale = -INFINITY; }
static void sm_alpha(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->alpha = NAN; }
static void sm_beta(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->beta = 1; }
static void sm_mu(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->mu = 0; }
static void sm_topk(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->top_k = 0; }
static void sm_div(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->divergence = KDL_DIV_COUNT_; }
static void sm_rule(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->head_rule = (kdl_head_rule_t)-1; }
static void sm_red(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->reduction = KDL_REDUCTION_COUNT_; }
static void sm_sdt(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->student_dtype = (kdl_dtype_t)5; }
static void sm_tdt(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->teacher_dtype = (kdl_dtype_t)-2; }
static void sm_odt(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->out_dtype = KDL_DTYPE_BF16; }
static void sm_gdt(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->grad_dtype = KDL_DTYPE_BF16; }
static void sm_s64(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->student_dtype = KDL_DTYPE_F64; }
static void sm_t64(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->teacher_dtype = KDL_DTYPE_F64; }
static void sm_size(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->struct_size = 1; }
static void sm_dsize(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { d->struct_size = 1; }
static void sm_ovf(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->ld_indices = INT64_MAX; }
static void sm_ovf_rows(kdl_loss_desc_t *d, kdl_sparse_args_t *a)
{
    a->rows = INT64_MAX / 8;
    a->ld_student = a->ld_grad = 1 << 20;
}
static void sm_mis_s(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->student = MIS(a->student, 1); }
static void sm_mis_i(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->teacher_indices = MIS(a->teacher_indices, 4); }
static void sm_mis_l(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->teacher_logprobs = MIS(a->teacher_logprobs, 1); }
static void sm_mis_lab(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->labels = MIS(a->labels, 4); }
static void sm_mis_g(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->grad = MIS(a->grad, 2); }
static void sm_mis_loss(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->loss = MIS(a->loss, 1); }
static void sm_mis_info(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->info = MIS(a->info, 4); }
static void sm_mis_valid(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->valid_rows = MIS(a->valid_rows, 1); }
static void sm_mis_bad(kdl_loss_desc_t *d, kdl_sparse_args_t *a) { a->bad_index_rows = MIS(a->bad_index_rows, 4); }

static const sparse_case_t sparse_cases[] = {
    {"student NULL", KDL_STATUS_NULL_POINTER, sm_null_student, ON_BOTH},
    {"indices NULL", KDL_STATUS_NULL_POINTER, sm_null_idx, ON_BOTH},
    {"logprobs NULL", KDL_STATUS_NULL_POINTER, sm_null_lp, ON_BOTH},
    {"loss NULL", KDL_STATUS_NULL_POINTER, sm_null_loss, ON_BOTH},
    {"rows < 0", KDL_STATUS_BAD_SIZE, sm_rows_neg, ON_BOTH},
    {"vocab 0", KDL_STATUS_BAD_SIZE, sm_vocab_zero, ON_BOTH},
    {"vocab -1", KDL_STATUS_BAD_SIZE, sm_vocab_neg, ON_BOTH},
    {"k 0", KDL_STATUS_BAD_TOP_K, sm_k_zero, ON_BOTH},
    {"k -2", KDL_STATUS_BAD_TOP_K, sm_k_neg, ON_BOTH},
    {"k > V", KDL_STATUS_BAD_TOP_K, sm_k_big, ON_BOTH},
    {"k > 1024", KDL_STATUS_BAD_TOP_K, sm_k_max, ON_BOTH},
    {"ld_student < V", KDL_STATUS_BAD_STRIDE, sm_ld_s, ON_BOTH},
    {"ld_indices < k", KDL_STATUS_BAD_STRIDE, sm_ld_i, ON_BOTH},
    {"ld_logprobs 0", KDL_STATUS_BAD_STRIDE, sm_ld_l, ON_BOTH},
    {"ld_grad < V", KDL_STATUS_BAD_STRIDE, sm_ld_g, ON_BOTH},
    {"mode COUNT_", KDL_STATUS_BAD_ENUM, sm_mode, ON_BOTH},
    {"rkl renormalised", KDL_STATUS_NOT_SUPPORTED, sm_rkl_renorm, ON_BOTH},
    {"akl top_k > k", KDL_STATUS_BAD_TOP_K, sm_akl_topk, ON_BOTH},
    {"tau NaN", KDL_STATUS_BAD_TEMPERATURE, sm_tau, ON_BOTH},
    {"tau 0", KDL_STATUS_BAD_TEMPERATURE, sm_tau0, ON_BOTH},
    {"scale -inf", KDL_STATUS_BAD_SCALE, sm_scale, ON_BOTH},
    {"alpha NaN", KDL_STATUS_BAD_ALPHA, sm_alpha, ON_BOTH},
    {"beta 1", KDL_STATUS_BAD_BETA, sm_beta, ON_BOTH},
    {"mu 0", KDL_STATUS_BAD_MU, sm_mu, ON_BOTH},
    {"top_k 0", KDL_STATUS_BAD_TOP_K, sm_topk, ON_BOTH},
    {"divergence COUNT_", KDL_STATUS_BAD_ENUM, sm_div, ON_BOTH},
    {"head rule -1", KDL_STATUS_BAD_ENUM, sm_rule, ON_BOTH},
    {"reduction COUNT_", KDL_STATUS_BAD_ENUM, sm_red, ON_BOTH},
    {"student dtype 5", KDL_STATUS_BAD_ENUM, sm_sdt, ON_BOTH},
    {"teacher dtype -2", KDL_STATUS_BAD_ENUM, sm_tdt, ON_BOTH},
    {"out dtype bf16", KDL_STATUS_NOT_SUPPORTED, sm_odt, ON_BOTH},
    {"grad dtype other", KDL_STATUS_NOT_SUPPORTED, sm_gdt, ON_BOTH},
    {"student f64 on the GPU", KDL_STATUS_NOT_SUPPORTED, sm_s64, ON_GPU},
    {"teacher f64 on the GPU", KDL_STATUS_NOT_SUPPORTED, sm_t64, ON_GPU},
    {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, sm_size, ON_BOTH},
    {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, sm_dsize, ON_BOTH},
    {"ld_indices INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, sm_ovf, ON_BOTH},
    {"rows x ld overflows", KDL_STATUS_SIZE_OVERFLOW, sm_ovf_rows, ON_BOTH},
    {"student misaligned", KDL_STATUS_MISALIGNED, sm_mis_s, ON_BOTH},
    {"teacher_indices misaligned", KDL_STATUS_MISALIGNED, sm_mis_i, ON_BOTH},
    {"teacher_logprobs misaligned", KDL_STATUS_MISALIGNED, sm_mis_l, ON_BOTH},
    {"labels misaligned", KDL_STATUS_MISALIGNED, sm_mis_lab, ON_BOTH},
    {"grad misaligned", KDL_STATUS_MISALIGNED, sm_mis_g, ON_BOTH},
    {"loss misaligned", KDL_STATUS_MISALIGNED, sm_mis_loss, ON_BOTH},
    {"info misaligned", KDL_STATUS_MISALIGNED, sm_mis_info, ON_BOTH},
    {"valid_rows misaligned", KDL_STATUS_MISALIGNED, sm_mis_valid, ON_BOTH},
    {"bad_index_rows misaligned", KDL_STATUS_MISALIGNED, sm_mis_bad, ON_BOTH},
};
#define N_SPARSE_CASES (sizeof sparse_cases / sizeof sparse_cases[0])

/* Buffers of the sparse problem (doubles: big enough for any dtype). */
typedef struct sp_bufs {
    double S[SN * SV], lp[SN * SK], loss[SN], grad[SN * SV];
    int64_t idx[SN * SK], labels[SN], info, valid, bad_idx;
} sp_bufs_t;

static void sp_init(sp_bufs_t *b)
{
    kdl_rng_t r = {5};
    kdl_fill_logits(&r, b->S, SN * SV, 1.0);
    for (int i = 0; i < SN * SK; i++) b->lp[i] = log(0.3);
    const int64_t idx[SN * SK] = {0, 4, 8, 1, 2, 3};
    memcpy(b->idx, idx, sizeof idx);
    b->labels[0] = 2;
    b->labels[1] = -100;
}

static void sp_fill(sp_bufs_t *b)
{
    memset(b->loss, SENTINEL, sizeof b->loss);
    memset(b->grad, SENTINEL, sizeof b->grad);
    memset(&b->info, SENTINEL, sizeof b->info);
    memset(&b->valid, SENTINEL, sizeof b->valid);
    memset(&b->bad_idx, SENTINEL, sizeof b->bad_idx);
}

static int sp_untouched(const sp_bufs_t *b)
{
    return all_sentinel(b->loss, sizeof b->loss) && all_sentinel(b->grad, sizeof b->grad) &&
           all_sentinel(&b->info, sizeof b->info) && all_sentinel(&b->valid, sizeof b->valid) &&
           all_sentinel(&b->bad_idx, sizeof b->bad_idx);
}

/* The valid problem: every optional array given; f64 on the reference, f32
 * on the GPU path. */
static void sp_problem(sp_bufs_t *b, int tail, int gpu, kdl_loss_desc_t *d, kdl_sparse_args_t *a)
{
    kdl_loss_desc_init(d);
    d->divergence = KDL_DIV_FKL;
    d->reduction = KDL_REDUCTION_NONE;
    kdl_sparse_args_init(a);
    a->mode = tail ? KDL_SPARSE_TAIL_BUCKET : KDL_SPARSE_RENORMALISED;
    a->rows = SN;
    a->vocab = SV;
    a->k = SK;
    a->student = b->S;
    a->ld_student = a->ld_grad = SV;
    a->student_dtype = a->teacher_dtype = a->grad_dtype = a->out_dtype = gpu ? KDL_DTYPE_F32 : KDL_DTYPE_F64;
    a->teacher_indices = b->idx;
    a->teacher_logprobs = b->lp;
    a->ld_indices = a->ld_logprobs = SK;
    a->labels = b->labels;
    a->grad = b->grad;
    a->loss = b->loss;
    a->info = &b->info;
    a->valid_rows = &b->valid;
    a->bad_index_rows = &b->bad_idx;
}

Test(bad_args, ref_sparse_table)
{
    sp_bufs_t b;
    sp_init(&b);
    for (int tail = 0; tail < 2; tail++) {
        kdl_loss_desc_t d;
        kdl_sparse_args_t a;
        sp_problem(&b, tail, 0, &d, &a);
        sp_fill(&b);
        cr_assert_eq(kdl_ref_sparse_loss(&d, &a), KDL_STATUS_SUCCESS, "valid sparse problem: %s", kdl_get_last_error());
        for (size_t c = 0; c < N_SPARSE_CASES; c++) {
            const sparse_case_t *sc = &sparse_cases[c];
            if (sc->path == ON_GPU) continue;
            sp_problem(&b, tail, 0, &d, &a);
            sc->mutate(&d, &a);
            sp_fill(&b);
            kdl_status_t st = kdl_ref_sparse_loss(&d, &a);
            cr_expect_eq(st, sc->want, "[%s] %s: got %s (%s)", tail ? "tail" : "renormalised", sc->name,
                         kdl_status_string(st), kdl_get_last_error());
            cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", sc->name);
            cr_expect(sp_untouched(&b), "%s: an output was written", sc->name);
            cr_expect_eq(kdl_sparse_validate(&d, &a, 1), sc->want, "%s: validate disagrees", sc->name);
        }
    }
    kdl_loss_desc_t d;
    kdl_sparse_args_t a;
    sp_problem(&b, 0, 0, &d, &a);
    cr_expect_eq(kdl_ref_sparse_loss(NULL, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_sparse_loss(NULL, &a), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_sparse_loss(&d, NULL), KDL_STATUS_NULL_POINTER);

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
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SV + 1, ok, SV + 1), KDL_STATUS_BAD_TOP_K);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, ok, SK - 1), KDL_STATUS_BAD_STRIDE);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, (const int64_t *)MIS(ok, 4), SK), KDL_STATUS_MISALIGNED);
    cr_expect_eq(kdl_sparse_check_indices(0, SV, SK, NULL, SK), KDL_STATUS_SUCCESS);
}

Test(bad_args, gpu_sparse_table)
{
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    sp_bufs_t b;
    sp_init(&b);
    kdl_loss_desc_t d;
    kdl_sparse_args_t a;
    for (int tail = 0; tail < 2; tail++) {
        sp_problem(&b, tail, 1, &d, &a);
        sp_fill(&b);
        cr_assert_eq(kdl_sparse_validate(&d, &a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
        size_t bytes = 12345;
        GPU_VALID_EXPECT(&g, kdl_sparse_workspace_size(g.h, &d, &a, &bytes), "sparse workspace");
        GPU_VALID_EXPECT(&g, kdl_sparse_loss(g.h, &d, &a, g.ws, g.ws_bytes), "sparse");
        cr_expect(sp_untouched(&b) && bytes == 12345, "valid problem without a device: something was written");
        for (size_t c = 0; c < N_SPARSE_CASES; c++) {
            const sparse_case_t *sc = &sparse_cases[c];
            if (sc->path == ON_REF) continue;
            sp_problem(&b, tail, 1, &d, &a);
            sc->mutate(&d, &a);
            sp_fill(&b);
            bytes = 12345;
            kdl_status_t st = kdl_sparse_workspace_size(g.h, &d, &a, &bytes);
            cr_expect_eq(st, sc->want, "workspace %s: got %s (%s)", sc->name, kdl_status_string(st),
                         kdl_get_last_error());
            cr_expect_eq(bytes, 12345, "workspace %s wrote *bytes", sc->name);
            st = kdl_sparse_loss(g.h, &d, &a, g.ws, g.ws_bytes);
            cr_expect_eq(st, sc->want, "%s: got %s (%s)", sc->name, kdl_status_string(st), kdl_get_last_error());
            cr_expect(sp_untouched(&b), "%s: an output was written", sc->name);
            cr_expect_eq(kdl_sparse_validate(&d, &a, 0), sc->want, "%s: validate disagrees", sc->name);
        }
    }
    sp_problem(&b, 0, 1, &d, &a);
    size_t bytes = 12345;
    cr_expect_eq(kdl_sparse_workspace_size(g.h, &d, &a, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_sparse_workspace_size(g.h, NULL, &a, &bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_sparse_loss(g.h, &d, NULL, g.ws, g.ws_bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(bytes, 12345);
    gpu_ctx_close(&g);
}

/* ============================================================ Sinkhorn */

enum { OB = 2, ON = 3, OM = 4 };

typedef void (*ot_mut_t)(kdl_sinkhorn_desc_t *, kdl_sinkhorn_args_t *);
typedef struct ot_case {
    const char *name;
    kdl_status_t want;
    ot_mut_t mutate;
    int path;
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

static double ot_la[OB * ON + 1], ot_gx[OB * ON * 2 + 1], ot_syy[OB + 1];
static int64_t ot_sizes_pad[OB + 1] = {ON, ON, ON}, ot_sizes_m[OB] = {OM, OM};
static void om_points(kdl_sinkhorn_args_t *a)
{
    a->cost = NULL;
    a->x = ot_x;
    a->y = ot_y;
    a->dim = 2;
}
static void om_f64_gpu(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->dtype = KDL_DTYPE_F64; }
static void om_mis_cost(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->cost = MIS(a->cost, 1); }
static void om_mis_value(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->value = MIS(a->value, 1); }
static void om_mis_log_a(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->log_a = MIS(ot_la, 1); }
static void om_mis_f(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->f = MIS(a->f, 1); }
static void om_mis_g(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->g = MIS(a->g, 2); }
static void om_mis_plan(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->plan = MIS(a->plan, 1); }
static void om_mis_iters(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->iterations = MIS(a->iterations, 4); }
static void om_mis_err(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->marginal_error = MIS(a->marginal_error, 1); }
static void om_mis_info(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a) { a->info = MIS(a->info, 4); }
static void om_mis_info_empty(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    a->batch = 0; /* written even for an empty batch */
    a->info = MIS(a->info, 4);
}
static void om_mis_sizes(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    a->sizes_n = MIS(ot_sizes_pad, 4); /* read by the validator itself */
    a->sizes_m = ot_sizes_m;
}
static void om_mis_x(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    om_points(a);
    a->x = MIS(ot_x, 1);
}
static void om_mis_grad_x(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    om_points(a);
    a->grad_x = MIS(ot_gx, 1);
}
static void om_mis_cxx(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    d->debias = 1;
    a->cost_xx = MIS(ot_cxx, 1);
    a->self_yy = ot_syy;
    a->self_yy_given = 1;
}
static void om_mis_syy(kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    d->debias = 1;
    a->cost_xx = ot_cxx;
    a->self_yy = MIS(ot_syy, 1);
    a->self_yy_given = 1;
}

static const ot_case_t ot_cases[] = {
    {"cost NULL", KDL_STATUS_NULL_POINTER, om_null_cost, ON_BOTH},
    {"value NULL", KDL_STATUS_NULL_POINTER, om_null_value, ON_BOTH},
    {"cost and points", KDL_STATUS_BAD_PARAM, om_cost_and_points, ON_BOTH},
    {"x without y", KDL_STATUS_NULL_POINTER, om_x_only, ON_BOTH},
    {"dim 0", KDL_STATUS_BAD_SIZE, om_dim0, ON_BOTH},
    {"grad_x with a cost", KDL_STATUS_BAD_PARAM, om_grad_x_cost, ON_BOTH},
    {"batch -1", KDL_STATUS_BAD_SIZE, om_batch_neg, ON_BOTH},
    {"n 0", KDL_STATUS_BAD_SIZE, om_n0, ON_BOTH},
    {"m -4", KDL_STATUS_BAD_SIZE, om_m_neg, ON_BOTH},
    {"sizes_n without sizes_m", KDL_STATUS_NULL_POINTER, om_sizes_one, ON_BOTH},
    {"ragged size 0", KDL_STATUS_BAD_SIZE, om_sizes_zero, ON_BOTH},
    {"ragged size > 2^31", KDL_STATUS_SIZE_OVERFLOW, om_sizes_huge, ON_BOTH},
    {"n = 2^31", KDL_STATUS_SIZE_OVERFLOW, om_n_huge, ON_BOTH},
    {"B n m overflows", KDL_STATUS_SIZE_OVERFLOW, om_nm_overflow, ON_BOTH},
    {"eps 0", KDL_STATUS_BAD_EPSILON, om_eps0, ON_BOTH},
    {"eps NaN", KDL_STATUS_BAD_EPSILON, om_eps_nan, ON_BOTH},
    {"eps inf", KDL_STATUS_BAD_EPSILON, om_eps_inf, ON_BOTH},
    {"max_iter 0", KDL_STATUS_BAD_ITERATIONS, om_iter0, ON_BOTH},
    {"check_every 0", KDL_STATUS_BAD_ITERATIONS, om_check0, ON_BOTH},
    {"tol < 0", KDL_STATUS_BAD_TOLERANCE, om_tol_neg, ON_BOTH},
    {"tol NaN", KDL_STATUS_BAD_TOLERANCE, om_tol_nan, ON_BOTH},
    {"eps factor 1", KDL_STATUS_BAD_SCHEDULE, om_factor1, ON_BOTH},
    {"eps factor NaN", KDL_STATUS_BAD_SCHEDULE, om_factor_nan, ON_BOTH},
    {"eps stage iter 0", KDL_STATUS_BAD_ITERATIONS, om_stage0, ON_BOTH},
    {"value enum", KDL_STATUS_BAD_ENUM, om_value_enum, ON_BOTH},
    {"metric enum", KDL_STATUS_BAD_ENUM, om_metric_enum, ON_BOTH},
    {"dtype enum", KDL_STATUS_BAD_ENUM, om_dtype_enum, ON_BOTH},
    {"dtype f16", KDL_STATUS_NOT_SUPPORTED, om_dtype_f16, ON_BOTH},
    {"debias without cost_xx", KDL_STATUS_NULL_POINTER, om_debias_no_cxx, ON_BOTH},
    {"debias without cost_yy", KDL_STATUS_NULL_POINTER, om_debias_no_cyy, ON_BOTH},
    {"self_yy_given, self_yy NULL", KDL_STATUS_NULL_POINTER, om_self_no_ptr, ON_BOTH},
    {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, om_dsize, ON_BOTH},
    {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, om_asize, ON_BOTH},
    {"f64 on the GPU", KDL_STATUS_NOT_SUPPORTED, om_f64_gpu, ON_GPU},
    {"cost misaligned", KDL_STATUS_MISALIGNED, om_mis_cost, ON_BOTH},
    {"value misaligned", KDL_STATUS_MISALIGNED, om_mis_value, ON_BOTH},
    {"log_a misaligned", KDL_STATUS_MISALIGNED, om_mis_log_a, ON_BOTH},
    {"f misaligned", KDL_STATUS_MISALIGNED, om_mis_f, ON_BOTH},
    {"g misaligned", KDL_STATUS_MISALIGNED, om_mis_g, ON_BOTH},
    {"plan misaligned", KDL_STATUS_MISALIGNED, om_mis_plan, ON_BOTH},
    {"iterations misaligned", KDL_STATUS_MISALIGNED, om_mis_iters, ON_BOTH},
    {"marginal_error misaligned", KDL_STATUS_MISALIGNED, om_mis_err, ON_BOTH},
    {"info misaligned", KDL_STATUS_MISALIGNED, om_mis_info, ON_BOTH},
    {"info misaligned, batch 0", KDL_STATUS_MISALIGNED, om_mis_info_empty, ON_BOTH},
    {"sizes_n misaligned", KDL_STATUS_MISALIGNED, om_mis_sizes, ON_BOTH},
    {"x misaligned", KDL_STATUS_MISALIGNED, om_mis_x, ON_BOTH},
    {"grad_x misaligned", KDL_STATUS_MISALIGNED, om_mis_grad_x, ON_BOTH},
    {"cost_xx misaligned", KDL_STATUS_MISALIGNED, om_mis_cxx, ON_BOTH},
    {"self_yy misaligned", KDL_STATUS_MISALIGNED, om_mis_syy, ON_BOTH},
};
#define N_OT_CASES (sizeof ot_cases / sizeof ot_cases[0])

typedef struct ot_bufs {
    double C[OB * ON * OM], value[OB], err[OB], f[OB * ON], g[OB * OM], plan[OB * ON * OM];
    int64_t iters[OB], info;
} ot_bufs_t;

static void ot_fill(ot_bufs_t *b)
{
    memset(b->value, SENTINEL, sizeof b->value);
    memset(b->err, SENTINEL, sizeof b->err);
    memset(b->f, SENTINEL, sizeof b->f);
    memset(b->g, SENTINEL, sizeof b->g);
    memset(b->plan, SENTINEL, sizeof b->plan);
    memset(b->iters, SENTINEL, sizeof b->iters);
    memset(&b->info, SENTINEL, sizeof b->info);
}

static int ot_untouched(const ot_bufs_t *b)
{
    return all_sentinel(b->value, sizeof b->value) && all_sentinel(b->err, sizeof b->err) &&
           all_sentinel(b->f, sizeof b->f) && all_sentinel(b->g, sizeof b->g) &&
           all_sentinel(b->plan, sizeof b->plan) && all_sentinel(b->iters, sizeof b->iters) &&
           all_sentinel(&b->info, sizeof b->info);
}

/* The valid problem: a given cost, every optional output; f64 on the
 * reference, f32 on the GPU path. */
static void ot_problem(ot_bufs_t *b, int gpu, kdl_sinkhorn_desc_t *d, kdl_sinkhorn_args_t *a)
{
    for (int i = 0; i < OB * ON * OM; i++) b->C[i] = (double)((i * 7) % 5) / 4.0;
    kdl_sinkhorn_desc_init(d);
    kdl_sinkhorn_args_init(a);
    a->batch = OB;
    a->n = ON;
    a->m = OM;
    a->dtype = gpu ? KDL_DTYPE_F32 : KDL_DTYPE_F64;
    a->cost = b->C;
    a->value = b->value;
    a->iterations = b->iters;
    a->marginal_error = b->err;
    a->f = b->f;
    a->g = b->g;
    a->plan = b->plan;
    a->info = &b->info;
}

Test(bad_args, ref_sinkhorn_table)
{
    ot_bufs_t b;
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_args_t a;
    ot_problem(&b, 0, &d, &a);
    ot_fill(&b);
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS, "valid problem: %s", kdl_get_last_error());
    for (size_t c = 0; c < N_OT_CASES; c++) {
        const ot_case_t *oc = &ot_cases[c];
        if (oc->path == ON_GPU) continue;
        ot_problem(&b, 0, &d, &a);
        oc->mutate(&d, &a);
        ot_fill(&b);
        kdl_status_t st = kdl_ref_sinkhorn(&d, &a);
        cr_expect_eq(st, oc->want, "%s: got %s (%s)", oc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", oc->name);
        cr_expect(ot_untouched(&b), "%s: an output was written", oc->name);
        cr_expect_eq(kdl_sinkhorn_validate(&d, &a, 1), oc->want, "%s: validate disagrees", oc->name);
    }
    ot_problem(&b, 0, &d, &a);
    cr_expect_eq(kdl_ref_sinkhorn(NULL, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_sinkhorn(NULL, &a), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_sinkhorn(&d, NULL), KDL_STATUS_NULL_POINTER);

    /* Non-finite data: the reference refuses before writing (the GPU flags
     * the problem instead). */
    const double bad[] = {NAN, INFINITY, -INFINITY};
    for (int k = 0; k < 3; k++) {
        ot_problem(&b, 0, &d, &a);
        b.C[OB * ON * OM - 1] = bad[k];
        ot_fill(&b);
        cr_expect_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_NONFINITE_INPUT, "cost %g", bad[k]);
        cr_expect(ot_untouched(&b), "cost %g: an output was written", bad[k]);
    }
}

Test(bad_args, gpu_sinkhorn_table)
{
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    ot_bufs_t b;
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_args_t a;
    ot_problem(&b, 1, &d, &a);
    ot_fill(&b);
    cr_assert_eq(kdl_sinkhorn_validate(&d, &a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    size_t bytes = 12345;
    GPU_VALID_EXPECT(&g, kdl_sinkhorn_workspace_size(g.h, &d, &a, &bytes), "sinkhorn workspace");
    GPU_VALID_EXPECT(&g, kdl_sinkhorn(g.h, &d, &a, g.ws, g.ws_bytes), "sinkhorn");
    cr_expect(ot_untouched(&b) && bytes == 12345, "valid problem without a device: something was written");
    for (size_t c = 0; c < N_OT_CASES; c++) {
        const ot_case_t *oc = &ot_cases[c];
        if (oc->path == ON_REF) continue;
        ot_problem(&b, 1, &d, &a);
        oc->mutate(&d, &a);
        ot_fill(&b);
        bytes = 12345;
        kdl_status_t st = kdl_sinkhorn_workspace_size(g.h, &d, &a, &bytes);
        cr_expect_eq(st, oc->want, "workspace %s: got %s (%s)", oc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect_eq(bytes, 12345, "workspace %s wrote *bytes", oc->name);
        st = kdl_sinkhorn(g.h, &d, &a, g.ws, g.ws_bytes);
        cr_expect_eq(st, oc->want, "%s: got %s (%s)", oc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(ot_untouched(&b), "%s: an output was written", oc->name);
        cr_expect_eq(kdl_sinkhorn_validate(&d, &a, 0), oc->want, "%s: validate disagrees", oc->name);
    }
    ot_problem(&b, 1, &d, &a);
    cr_expect_eq(kdl_sinkhorn_workspace_size(g.h, &d, &a, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_sinkhorn_workspace_size(g.h, NULL, &a, &bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_sinkhorn(g.h, &d, NULL, g.ws, g.ws_bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(bytes, 12345);
    gpu_ctx_close(&g);
}

/* ================================================================ SinKD */

enum { KN = 4, KV = 6 };

typedef void (*kd_mut_t)(kdl_sinkd_desc_t *, kdl_sinkd_args_t *);
typedef struct kd_case {
    const char *name;
    kdl_status_t want;
    kd_mut_t mutate;
    int path;
} kd_case_t;

static void km_null_s(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->student = NULL; }
static void km_null_t(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->teacher = NULL; }
static void km_null_loss(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->loss = NULL; }
static void km_rows_neg(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->rows = -2; }
static void km_vocab0(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->vocab = 0; }
static void km_vocab_neg(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->vocab = -3; }
static void km_ld_s(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->ld_student = KV - 1; }
static void km_ld_t(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->ld_teacher = 1; }
static void km_ld_g(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->ld_grad = 0; }
static void km_group(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->group_size = 3; }
static void km_group_neg(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->group_size = -1; }
static void km_tau(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->temperature = 0; }
static void km_tau_inf(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->temperature = INFINITY; }
static void km_tau_nan(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->temperature = NAN; }
static void km_eps(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->epsilon = -0.1; }
static void km_eps_nan(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->epsilon = NAN; }
static void km_iter(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->max_iter = -5; }
static void km_check(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->check_every = 0; }
static void km_tol(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->tol = NAN; }
static void km_tol_neg(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->tol = -1; }
static void km_scale(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->scale = NAN; }
static void km_scale_inf(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->scale = -INFINITY; }
static void km_metric(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->metric = KDL_OT_METRIC_COUNT_; }
static void km_sdt(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->student_dtype = (kdl_dtype_t)4; }
static void km_tdt(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->teacher_dtype = (kdl_dtype_t)-1; }
static void km_odt(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->out_dtype = KDL_DTYPE_F16; }
static void km_gdt(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->grad_dtype = KDL_DTYPE_BF16; }
static void km_s64(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->student_dtype = KDL_DTYPE_F64; }
static void km_dsize(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { d->struct_size = 3; }
static void km_asize(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->struct_size = 0; }
static void km_ovf(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->ld_student = INT64_MAX; }
static void km_group_huge(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a)
{
    a->rows = (int64_t)1 << 32;
    d->group_size = 0; /* one group of 2^32 rows */
}
static void km_mis_s(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->student = MIS(a->student, 1); }
static void km_mis_t(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->teacher = MIS(a->teacher, 2); }
static void km_mis_g(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->grad = MIS(a->grad, 1); }
static void km_mis_loss(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->loss = MIS(a->loss, 1); }
static void km_mis_gl(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->group_loss = MIS(a->group_loss, 1); }
static void km_mis_plan(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->plan = MIS(a->plan, 1); }
static void km_mis_iters(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->iterations = MIS(a->iterations, 4); }
static void km_mis_err(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->marginal_error = MIS(a->marginal_error, 1); }
static void km_mis_info(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a) { a->info = MIS(a->info, 4); }
static void km_mis_info_empty(kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a)
{
    a->rows = 0; /* the empty batch writes loss and info */
    a->info = MIS(a->info, 4);
}

static const kd_case_t kd_cases[] = {
    {"student NULL", KDL_STATUS_NULL_POINTER, km_null_s, ON_BOTH},
    {"teacher NULL", KDL_STATUS_NULL_POINTER, km_null_t, ON_BOTH},
    {"loss NULL", KDL_STATUS_NULL_POINTER, km_null_loss, ON_BOTH},
    {"rows < 0", KDL_STATUS_BAD_SIZE, km_rows_neg, ON_BOTH},
    {"vocab 0", KDL_STATUS_BAD_SIZE, km_vocab0, ON_BOTH},
    {"vocab -3", KDL_STATUS_BAD_SIZE, km_vocab_neg, ON_BOTH},
    {"ld_student < V", KDL_STATUS_BAD_STRIDE, km_ld_s, ON_BOTH},
    {"ld_teacher < V", KDL_STATUS_BAD_STRIDE, km_ld_t, ON_BOTH},
    {"ld_grad 0", KDL_STATUS_BAD_STRIDE, km_ld_g, ON_BOTH},
    {"rows not a multiple of the group", KDL_STATUS_BAD_GROUP, km_group, ON_BOTH},
    {"group_size < 0", KDL_STATUS_BAD_GROUP, km_group_neg, ON_BOTH},
    {"tau 0", KDL_STATUS_BAD_TEMPERATURE, km_tau, ON_BOTH},
    {"tau inf", KDL_STATUS_BAD_TEMPERATURE, km_tau_inf, ON_BOTH},
    {"tau NaN", KDL_STATUS_BAD_TEMPERATURE, km_tau_nan, ON_BOTH},
    {"eps < 0", KDL_STATUS_BAD_EPSILON, km_eps, ON_BOTH},
    {"eps NaN", KDL_STATUS_BAD_EPSILON, km_eps_nan, ON_BOTH},
    {"max_iter < 1", KDL_STATUS_BAD_ITERATIONS, km_iter, ON_BOTH},
    {"check_every 0", KDL_STATUS_BAD_ITERATIONS, km_check, ON_BOTH},
    {"tol NaN", KDL_STATUS_BAD_TOLERANCE, km_tol, ON_BOTH},
    {"tol < 0", KDL_STATUS_BAD_TOLERANCE, km_tol_neg, ON_BOTH},
    {"scale NaN", KDL_STATUS_BAD_SCALE, km_scale, ON_BOTH},
    {"scale -inf", KDL_STATUS_BAD_SCALE, km_scale_inf, ON_BOTH},
    {"metric enum", KDL_STATUS_BAD_ENUM, km_metric, ON_BOTH},
    {"student dtype 4", KDL_STATUS_BAD_ENUM, km_sdt, ON_BOTH},
    {"teacher dtype -1", KDL_STATUS_BAD_ENUM, km_tdt, ON_BOTH},
    {"out dtype f16", KDL_STATUS_NOT_SUPPORTED, km_odt, ON_BOTH},
    {"grad dtype other", KDL_STATUS_NOT_SUPPORTED, km_gdt, ON_BOTH},
    {"student f64 on the GPU", KDL_STATUS_NOT_SUPPORTED, km_s64, ON_GPU},
    {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, km_dsize, ON_BOTH},
    {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, km_asize, ON_BOTH},
    {"ld_student INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, km_ovf, ON_BOTH},
    {"group of 2^32 rows", KDL_STATUS_SIZE_OVERFLOW, km_group_huge, ON_BOTH},
    {"student misaligned", KDL_STATUS_MISALIGNED, km_mis_s, ON_BOTH},
    {"teacher misaligned", KDL_STATUS_MISALIGNED, km_mis_t, ON_BOTH},
    {"grad misaligned", KDL_STATUS_MISALIGNED, km_mis_g, ON_BOTH},
    {"loss misaligned", KDL_STATUS_MISALIGNED, km_mis_loss, ON_BOTH},
    {"group_loss misaligned", KDL_STATUS_MISALIGNED, km_mis_gl, ON_BOTH},
    {"plan misaligned", KDL_STATUS_MISALIGNED, km_mis_plan, ON_BOTH},
    {"iterations misaligned", KDL_STATUS_MISALIGNED, km_mis_iters, ON_BOTH},
    {"marginal_error misaligned", KDL_STATUS_MISALIGNED, km_mis_err, ON_BOTH},
    {"info misaligned", KDL_STATUS_MISALIGNED, km_mis_info, ON_BOTH},
    {"info misaligned, rows 0", KDL_STATUS_MISALIGNED, km_mis_info_empty, ON_BOTH},
};
#define N_KD_CASES (sizeof kd_cases / sizeof kd_cases[0])

typedef struct kd_bufs {
    double S[KN * KV], T[KN * KV], loss, grad[KN * KV], gl[2], plan[2 * 2 * 2], err[2];
    int64_t iters[2], info;
} kd_bufs_t;

static void kd_init(kd_bufs_t *b)
{
    kdl_rng_t r = {31};
    kdl_fill_logits(&r, b->S, KN * KV, 1.0);
    kdl_fill_logits(&r, b->T, KN * KV, 1.0);
}

static void kd_fill(kd_bufs_t *b)
{
    memset(&b->loss, SENTINEL, sizeof b->loss);
    memset(b->grad, SENTINEL, sizeof b->grad);
    memset(b->gl, SENTINEL, sizeof b->gl);
    memset(b->plan, SENTINEL, sizeof b->plan);
    memset(b->err, SENTINEL, sizeof b->err);
    memset(b->iters, SENTINEL, sizeof b->iters);
    memset(&b->info, SENTINEL, sizeof b->info);
}

static int kd_untouched(const kd_bufs_t *b)
{
    return all_sentinel(&b->loss, sizeof b->loss) && all_sentinel(b->grad, sizeof b->grad) &&
           all_sentinel(b->gl, sizeof b->gl) && all_sentinel(b->plan, sizeof b->plan) &&
           all_sentinel(b->err, sizeof b->err) && all_sentinel(b->iters, sizeof b->iters) &&
           all_sentinel(&b->info, sizeof b->info);
}

/* Two groups of two rows, every optional output; f64 on the reference, f32
 * on the GPU path. */
static void kd_problem(kd_bufs_t *b, int gpu, kdl_sinkd_desc_t *d, kdl_sinkd_args_t *a)
{
    kdl_sinkd_desc_init(d);
    d->group_size = 2;
    kdl_sinkd_args_init(a);
    a->rows = KN;
    a->vocab = KV;
    a->student = b->S;
    a->teacher = b->T;
    a->ld_student = a->ld_teacher = a->ld_grad = KV;
    a->student_dtype = a->teacher_dtype = a->grad_dtype = a->out_dtype = gpu ? KDL_DTYPE_F32 : KDL_DTYPE_F64;
    a->grad = b->grad;
    a->loss = &b->loss;
    a->group_loss = b->gl;
    a->plan = b->plan;
    a->iterations = b->iters;
    a->marginal_error = b->err;
    a->info = &b->info;
}

Test(bad_args, ref_sinkd_table)
{
    kd_bufs_t b;
    kd_init(&b);
    kdl_sinkd_desc_t d;
    kdl_sinkd_args_t a;
    kd_problem(&b, 0, &d, &a);
    kd_fill(&b);
    cr_assert_eq(kdl_ref_sinkd(&d, &a), KDL_STATUS_SUCCESS, "valid problem: %s", kdl_get_last_error());
    for (size_t c = 0; c < N_KD_CASES; c++) {
        const kd_case_t *kc = &kd_cases[c];
        if (kc->path == ON_GPU) continue;
        kd_problem(&b, 0, &d, &a);
        kc->mutate(&d, &a);
        kd_fill(&b);
        kdl_status_t st = kdl_ref_sinkd(&d, &a);
        cr_expect_eq(st, kc->want, "%s: got %s (%s)", kc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", kc->name);
        cr_expect(kd_untouched(&b), "%s: an output was written", kc->name);
        cr_expect_eq(kdl_sinkd_validate(&d, &a, 1), kc->want, "%s: validate disagrees", kc->name);
    }
    kd_problem(&b, 0, &d, &a);
    cr_expect_eq(kdl_ref_sinkd(NULL, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_sinkd(NULL, &a), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_sinkd(&d, NULL), KDL_STATUS_NULL_POINTER);
}

Test(bad_args, gpu_sinkd_table)
{
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    kd_bufs_t b;
    kd_init(&b);
    kdl_sinkd_desc_t d;
    kdl_sinkd_args_t a;
    kd_problem(&b, 1, &d, &a);
    kd_fill(&b);
    cr_assert_eq(kdl_sinkd_validate(&d, &a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    size_t bytes = 12345;
    GPU_VALID_EXPECT(&g, kdl_sinkd_workspace_size(g.h, &d, &a, &bytes), "sinkd workspace");
    GPU_VALID_EXPECT(&g, kdl_sinkd(g.h, &d, &a, g.ws, g.ws_bytes), "sinkd");
    cr_expect(kd_untouched(&b) && bytes == 12345, "valid problem without a device: something was written");
    for (size_t c = 0; c < N_KD_CASES; c++) {
        const kd_case_t *kc = &kd_cases[c];
        if (kc->path == ON_REF) continue;
        kd_problem(&b, 1, &d, &a);
        kc->mutate(&d, &a);
        kd_fill(&b);
        bytes = 12345;
        kdl_status_t st = kdl_sinkd_workspace_size(g.h, &d, &a, &bytes);
        cr_expect_eq(st, kc->want, "workspace %s: got %s (%s)", kc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect_eq(bytes, 12345, "workspace %s wrote *bytes", kc->name);
        st = kdl_sinkd(g.h, &d, &a, g.ws, g.ws_bytes);
        cr_expect_eq(st, kc->want, "%s: got %s (%s)", kc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(kd_untouched(&b), "%s: an output was written", kc->name);
        cr_expect_eq(kdl_sinkd_validate(&d, &a, 0), kc->want, "%s: validate disagrees", kc->name);
    }
    kd_problem(&b, 1, &d, &a);
    cr_expect_eq(kdl_sinkd_workspace_size(g.h, &d, &a, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_sinkd_workspace_size(g.h, NULL, &a, &bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_sinkd(g.h, &d, NULL, g.ws, g.ws_bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(bytes, 12345);
    gpu_ctx_close(&g);
}

/* ======================================================= fused linear */

enum { FN = 3, FD = 4, FV = 5 };

typedef void (*fl_mut_t)(kdl_loss_desc_t *, kdl_fused_linear_args_t *);
typedef struct fl_case {
    const char *name;
    kdl_status_t want;
    fl_mut_t mutate;
    int path;
} fl_case_t;

static void fm_null_h(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->hidden_states = NULL; }
static void fm_null_w(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->weight = NULL; }
static void fm_null_t(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->teacher = NULL; }
static void fm_null_loss(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->loss = NULL; }
static void fm_rows(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->rows = -1; }
static void fm_hidden(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->hidden = 0; }
static void fm_hidden_neg(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->hidden = -4; }
static void fm_vocab(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->vocab = -1; }
static void fm_vocab0(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->vocab = 0; }
static void fm_chunk(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->chunk_rows = -1; }
static void fm_ld_h(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_hidden = FD - 1; }
static void fm_ld_w(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_weight = 0; }
static void fm_ld_t(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_teacher = FV - 1; }
static void fm_ld_gh(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_grad_hidden = 1; }
static void fm_ld_gw(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->ld_grad_weight = FD - 1; }
static void fm_gdt(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->grad_dtype = KDL_DTYPE_F16; }
static void fm_hdt(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->hidden_dtype = (kdl_dtype_t)6; }
static void fm_wdt(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->weight_dtype = (kdl_dtype_t)-1; }
static void fm_tdt(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->teacher_dtype = (kdl_dtype_t)4; }
static void fm_tau(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->temperature = -1; }
static void fm_tau_nan(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->temperature = NAN; }
static void fm_scale(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->scale = INFINITY; }
static void fm_alpha(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->alpha = 1; }
static void fm_beta(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->beta = 0; }
static void fm_mu(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->mu = 2; }
static void fm_topk(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->top_k = FV + 1; }
static void fm_div(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->divergence = (kdl_divergence_t)-1; }
static void fm_red(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->reduction = KDL_REDUCTION_COUNT_; }
static void fm_odt(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->out_dtype = KDL_DTYPE_BF16; }
static void fm_h64(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->hidden_dtype = KDL_DTYPE_F64; }
static void fm_w16(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->weight_dtype = KDL_DTYPE_F16; }
static void fm_t64(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->teacher_dtype = KDL_DTYPE_F64; }
static void fm_g64(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->grad_dtype = KDL_DTYPE_F64; }
static void fm_akl(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { d->divergence = KDL_DIV_AKL; }
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
static void fm_mis_h(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->hidden_states = MIS(a->hidden_states, 1); }
static void fm_mis_w(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->weight = MIS(a->weight, 2); }
static void fm_mis_t(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->teacher = MIS(a->teacher, 1); }
static void fm_mis_lab(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->labels = MIS(a->labels, 4); }
static void fm_mis_gh(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->grad_hidden = MIS(a->grad_hidden, 1); }
static void fm_mis_gw(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->grad_weight = MIS(a->grad_weight, 3); }
static void fm_mis_loss(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->loss = MIS(a->loss, 1); }
static void fm_mis_info(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->info = MIS(a->info, 4); }
static void fm_mis_valid(kdl_loss_desc_t *d, kdl_fused_linear_args_t *a) { a->valid_rows = MIS(a->valid_rows, 4); }

static const fl_case_t fl_cases[] = {
    {"hidden_states NULL", KDL_STATUS_NULL_POINTER, fm_null_h, ON_BOTH},
    {"weight NULL", KDL_STATUS_NULL_POINTER, fm_null_w, ON_BOTH},
    {"teacher NULL", KDL_STATUS_NULL_POINTER, fm_null_t, ON_BOTH},
    {"loss NULL", KDL_STATUS_NULL_POINTER, fm_null_loss, ON_BOTH},
    {"rows < 0", KDL_STATUS_BAD_SIZE, fm_rows, ON_BOTH},
    {"hidden 0", KDL_STATUS_BAD_SIZE, fm_hidden, ON_BOTH},
    {"hidden -4", KDL_STATUS_BAD_SIZE, fm_hidden_neg, ON_BOTH},
    {"vocab < 0", KDL_STATUS_BAD_SIZE, fm_vocab, ON_BOTH},
    {"vocab 0", KDL_STATUS_BAD_SIZE, fm_vocab0, ON_BOTH},
    {"chunk_rows < 0", KDL_STATUS_BAD_SIZE, fm_chunk, ON_BOTH},
    {"ld_hidden < d", KDL_STATUS_BAD_STRIDE, fm_ld_h, ON_BOTH},
    {"ld_weight 0", KDL_STATUS_BAD_STRIDE, fm_ld_w, ON_BOTH},
    {"ld_teacher < V", KDL_STATUS_BAD_STRIDE, fm_ld_t, ON_BOTH},
    {"ld_grad_hidden < d", KDL_STATUS_BAD_STRIDE, fm_ld_gh, ON_BOTH},
    {"ld_grad_weight < d", KDL_STATUS_BAD_STRIDE, fm_ld_gw, ON_BOTH},
    {"grad dtype f16", KDL_STATUS_NOT_SUPPORTED, fm_gdt, ON_BOTH},
    {"hidden dtype 6", KDL_STATUS_BAD_ENUM, fm_hdt, ON_BOTH},
    {"weight dtype -1", KDL_STATUS_BAD_ENUM, fm_wdt, ON_BOTH},
    {"teacher dtype 4", KDL_STATUS_BAD_ENUM, fm_tdt, ON_BOTH},
    {"tau < 0", KDL_STATUS_BAD_TEMPERATURE, fm_tau, ON_BOTH},
    {"tau NaN", KDL_STATUS_BAD_TEMPERATURE, fm_tau_nan, ON_BOTH},
    {"scale inf", KDL_STATUS_BAD_SCALE, fm_scale, ON_BOTH},
    {"alpha 1", KDL_STATUS_BAD_ALPHA, fm_alpha, ON_BOTH},
    {"beta 0", KDL_STATUS_BAD_BETA, fm_beta, ON_BOTH},
    {"mu 2", KDL_STATUS_BAD_MU, fm_mu, ON_BOTH},
    {"top_k > V", KDL_STATUS_BAD_TOP_K, fm_topk, ON_BOTH},
    {"divergence -1", KDL_STATUS_BAD_ENUM, fm_div, ON_BOTH},
    {"reduction COUNT_", KDL_STATUS_BAD_ENUM, fm_red, ON_BOTH},
    {"out dtype bf16", KDL_STATUS_NOT_SUPPORTED, fm_odt, ON_BOTH},
    {"hidden f64 on the GPU", KDL_STATUS_NOT_SUPPORTED, fm_h64, ON_GPU},
    {"weight f16 on the GPU", KDL_STATUS_NOT_SUPPORTED, fm_w16, ON_GPU},
    {"teacher f64 on the GPU", KDL_STATUS_NOT_SUPPORTED, fm_t64, ON_GPU},
    {"grad f64 on the GPU", KDL_STATUS_NOT_SUPPORTED, fm_g64, ON_GPU},
    {"AKL on the GPU", KDL_STATUS_NOT_SUPPORTED, fm_akl, ON_GPU},
    {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, fm_size, ON_BOTH},
    {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, fm_dsize, ON_BOTH},
    {"ld_weight INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, fm_ovf, ON_BOTH},
    {"N x V logits overflow", KDL_STATUS_SIZE_OVERFLOW, fm_ovf_logits, ON_BOTH},
    {"hidden_states misaligned", KDL_STATUS_MISALIGNED, fm_mis_h, ON_BOTH},
    {"weight misaligned", KDL_STATUS_MISALIGNED, fm_mis_w, ON_BOTH},
    {"teacher misaligned", KDL_STATUS_MISALIGNED, fm_mis_t, ON_BOTH},
    {"labels misaligned", KDL_STATUS_MISALIGNED, fm_mis_lab, ON_BOTH},
    {"grad_hidden misaligned", KDL_STATUS_MISALIGNED, fm_mis_gh, ON_BOTH},
    {"grad_weight misaligned", KDL_STATUS_MISALIGNED, fm_mis_gw, ON_BOTH},
    {"loss misaligned", KDL_STATUS_MISALIGNED, fm_mis_loss, ON_BOTH},
    {"info misaligned", KDL_STATUS_MISALIGNED, fm_mis_info, ON_BOTH},
    {"valid_rows misaligned", KDL_STATUS_MISALIGNED, fm_mis_valid, ON_BOTH},
};
#define N_FL_CASES (sizeof fl_cases / sizeof fl_cases[0])

typedef struct fl_bufs {
    double H[FN * FD], W[FV * FD], T[FN * FV], loss[FN], dH[FN * FD], dW[FV * FD];
    int64_t labels[FN], info, valid;
} fl_bufs_t;

static void fl_init(fl_bufs_t *b)
{
    kdl_rng_t r = {8};
    kdl_fill_logits(&r, b->H, FN * FD, 1.0);
    kdl_fill_logits(&r, b->W, FV * FD, 1.0);
    kdl_fill_logits(&r, b->T, FN * FV, 1.0);
    b->labels[0] = 0;
    b->labels[1] = -100;
    b->labels[2] = 3;
}

static void fl_fill(fl_bufs_t *b)
{
    memset(b->loss, SENTINEL, sizeof b->loss);
    memset(b->dH, SENTINEL, sizeof b->dH);
    memset(b->dW, SENTINEL, sizeof b->dW);
    memset(&b->info, SENTINEL, sizeof b->info);
    memset(&b->valid, SENTINEL, sizeof b->valid);
}

static int fl_untouched(const fl_bufs_t *b)
{
    return all_sentinel(b->loss, sizeof b->loss) && all_sentinel(b->dH, sizeof b->dH) &&
           all_sentinel(b->dW, sizeof b->dW) && all_sentinel(&b->info, sizeof b->info) &&
           all_sentinel(&b->valid, sizeof b->valid);
}

/* JSD, reduction NONE, both gradients, labels; f64 on the reference, f32 on
 * the GPU path. */
static void fl_problem(fl_bufs_t *b, int gpu, kdl_loss_desc_t *d, kdl_fused_linear_args_t *a)
{
    kdl_loss_desc_init(d);
    d->divergence = KDL_DIV_JSD;
    d->reduction = KDL_REDUCTION_NONE;
    kdl_fused_linear_args_init(a);
    a->rows = FN;
    a->hidden = FD;
    a->vocab = FV;
    a->hidden_states = b->H;
    a->ld_hidden = FD;
    a->weight = b->W;
    a->ld_weight = FD;
    a->teacher = b->T;
    a->ld_teacher = FV;
    a->labels = b->labels;
    a->hidden_dtype = a->weight_dtype = a->teacher_dtype = a->grad_dtype = a->out_dtype =
        gpu ? KDL_DTYPE_F32 : KDL_DTYPE_F64;
    a->grad_hidden = b->dH;
    a->ld_grad_hidden = FD;
    a->grad_weight = b->dW;
    a->ld_grad_weight = FD;
    a->loss = b->loss;
    a->info = &b->info;
    a->valid_rows = &b->valid;
}

Test(bad_args, ref_fused_linear_table)
{
    fl_bufs_t b;
    fl_init(&b);
    kdl_loss_desc_t d;
    kdl_fused_linear_args_t a;
    fl_problem(&b, 0, &d, &a);
    fl_fill(&b);
    cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS, "valid problem: %s", kdl_get_last_error());
    for (size_t c = 0; c < N_FL_CASES; c++) {
        const fl_case_t *fc = &fl_cases[c];
        if (fc->path == ON_GPU) continue;
        fl_problem(&b, 0, &d, &a);
        fc->mutate(&d, &a);
        fl_fill(&b);
        kdl_status_t st = kdl_ref_fused_linear_loss(&d, &a);
        cr_expect_eq(st, fc->want, "%s: got %s (%s)", fc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", fc->name);
        cr_expect(fl_untouched(&b), "%s: an output was written", fc->name);
        cr_expect_eq(kdl_fused_linear_validate(&d, &a, 1), fc->want, "%s: validate disagrees", fc->name);
    }
    fl_problem(&b, 0, &d, &a);
    cr_expect_eq(kdl_ref_fused_linear_loss(NULL, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_fused_linear_loss(NULL, &a), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_fused_linear_loss(&d, NULL), KDL_STATUS_NULL_POINTER);
}

Test(bad_args, gpu_fused_linear_table)
{
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    fl_bufs_t b;
    fl_init(&b);
    kdl_loss_desc_t d;
    kdl_fused_linear_args_t a;
    fl_problem(&b, 1, &d, &a);
    fl_fill(&b);
    cr_assert_eq(kdl_fused_linear_validate(&d, &a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    size_t bytes = 12345;
    GPU_VALID_EXPECT(&g, kdl_fused_linear_workspace_size(g.h, &d, &a, &bytes), "fused linear workspace");
    GPU_VALID_EXPECT(&g, kdl_fused_linear_loss(g.h, &d, &a, g.ws, g.ws_bytes), "fused linear");
    cr_expect(fl_untouched(&b) && bytes == 12345, "valid problem without a device: something was written");
    for (size_t c = 0; c < N_FL_CASES; c++) {
        const fl_case_t *fc = &fl_cases[c];
        if (fc->path == ON_REF) continue;
        fl_problem(&b, 1, &d, &a);
        fc->mutate(&d, &a);
        fl_fill(&b);
        bytes = 12345;
        kdl_status_t st = kdl_fused_linear_workspace_size(g.h, &d, &a, &bytes);
        cr_expect_eq(st, fc->want, "workspace %s: got %s (%s)", fc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect_eq(bytes, 12345, "workspace %s wrote *bytes", fc->name);
        st = kdl_fused_linear_loss(g.h, &d, &a, g.ws, g.ws_bytes);
        cr_expect_eq(st, fc->want, "%s: got %s (%s)", fc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(fl_untouched(&b), "%s: an output was written", fc->name);
        cr_expect_eq(kdl_fused_linear_validate(&d, &a, 0), fc->want, "%s: validate disagrees", fc->name);
    }
    fl_problem(&b, 1, &d, &a);
    cr_expect_eq(kdl_fused_linear_workspace_size(g.h, &d, &a, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_fused_linear_workspace_size(g.h, NULL, &a, &bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_fused_linear_loss(g.h, &d, NULL, g.ws, g.ws_bytes), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(bytes, 12345);
    gpu_ctx_close(&g);
}

/* ================================================== vocabulary shards */

enum { HN = 3, HV = 8, HLD = 10 };

typedef struct sh_call {
    int step, null_op, null_count;
} sh_call_t;

typedef void (*sh_mut_t)(kdl_loss_desc_t *, kdl_shard_args_t *, sh_call_t *);
typedef struct sh_case {
    const char *name;
    kdl_status_t want;
    sh_mut_t mutate;
    int path;
} sh_case_t;

#define SH_MUT(fn, body)                                                       \
    static void fn(kdl_loss_desc_t *d, kdl_shard_args_t *a, sh_call_t *call)   \
    {                                                                          \
        body;                                                                  \
    }
SH_MUT(hm_null_s, a->student = NULL)
SH_MUT(hm_null_t, a->teacher = NULL)
SH_MUT(hm_null_loss, a->loss = NULL)
SH_MUT(hm_null_state, a->state = NULL)
SH_MUT(hm_null_exchange, a->exchange = NULL)
SH_MUT(hm_null_op, call->null_op = 1)
SH_MUT(hm_null_count, call->null_count = 1)
SH_MUT(hm_step_neg, call->step = -1)
SH_MUT(hm_step_big, call->step = 12) /* AKL with an f64 teacher: 8 digits + 4 steps */
SH_MUT(hm_rows, a->rows = -1)
SH_MUT(hm_vocab0, a->vocab = 0)
SH_MUT(hm_vocab_neg, a->vocab = -8)
SH_MUT(hm_shards0, a->num_shards = 0)
SH_MUT(hm_shards_big, a->num_shards = HV + 1)
SH_MUT(hm_rank_neg, a->shard_rank = -1)
SH_MUT(hm_rank_big, a->shard_rank = a->num_shards)
SH_MUT(hm_local0, a->vocab_local = 0)
SH_MUT(hm_offset_neg, a->vocab_offset = -1)
SH_MUT(hm_slice_out, a->vocab_offset = 1)
SH_MUT(hm_ld_s, a->ld_student = HV - 1)
SH_MUT(hm_ld_t, a->ld_teacher = 0)
SH_MUT(hm_ld_g, a->ld_grad = -HLD)
SH_MUT(hm_tau, d->temperature = 0)
SH_MUT(hm_tau_inf, d->temperature = INFINITY)
SH_MUT(hm_scale, d->scale = NAN)
SH_MUT(hm_alpha, d->alpha = -0.5)
SH_MUT(hm_beta, d->beta = NAN)
SH_MUT(hm_mu, d->mu = 1)
SH_MUT(hm_topk0, d->top_k = 0)
SH_MUT(hm_topk_big, d->top_k = HV + 1)
SH_MUT(hm_div, d->divergence = KDL_DIV_COUNT_)
SH_MUT(hm_rule, d->head_rule = KDL_HEAD_COUNT_)
SH_MUT(hm_red, d->reduction = (kdl_reduction_t)-1)
SH_MUT(hm_sdt, a->student_dtype = (kdl_dtype_t)4)
SH_MUT(hm_tdt, a->teacher_dtype = (kdl_dtype_t)9)
SH_MUT(hm_odt, a->out_dtype = KDL_DTYPE_F16)
SH_MUT(hm_gdt, a->grad_dtype = KDL_DTYPE_BF16)
SH_MUT(hm_s64, a->student_dtype = KDL_DTYPE_F64)
SH_MUT(hm_dsize, d->struct_size = 0)
SH_MUT(hm_asize, a->struct_size = sizeof *a - 4)
SH_MUT(hm_ovf_ld, a->ld_student = INT64_MAX)
SH_MUT(hm_ovf_rows, a->rows = INT64_MAX / 2; a->ld_student = a->ld_teacher = a->ld_grad = 1 << 20)
SH_MUT(hm_mis_s, a->student = MIS(a->student, 1))
SH_MUT(hm_mis_t, a->teacher = MIS(a->teacher, 1))
SH_MUT(hm_mis_lab, a->labels = MIS(a->labels, 4))
SH_MUT(hm_mis_g, a->grad = MIS(a->grad, 1))
SH_MUT(hm_mis_loss, a->loss = MIS(a->loss, 1))
SH_MUT(hm_mis_info, a->info = MIS(a->info, 4))
SH_MUT(hm_mis_valid, a->valid_rows = MIS(a->valid_rows, 4))
SH_MUT(hm_mis_hs, a->stat_head_size = MIS(a->stat_head_size, 4))
SH_MUT(hm_mis_state, a->state = MIS(a->state, 4))
SH_MUT(hm_mis_exchange, a->exchange = MIS(a->exchange, 4))

static const sh_case_t sh_cases[] = {
    {"student NULL", KDL_STATUS_NULL_POINTER, hm_null_s, ON_BOTH},
    {"teacher NULL", KDL_STATUS_NULL_POINTER, hm_null_t, ON_BOTH},
    {"loss NULL", KDL_STATUS_NULL_POINTER, hm_null_loss, ON_BOTH},
    {"state NULL", KDL_STATUS_NULL_POINTER, hm_null_state, ON_BOTH},
    {"exchange NULL", KDL_STATUS_NULL_POINTER, hm_null_exchange, ON_BOTH},
    {"op NULL", KDL_STATUS_NULL_POINTER, hm_null_op, ON_BOTH},
    {"count NULL", KDL_STATUS_NULL_POINTER, hm_null_count, ON_BOTH},
    {"step -1", KDL_STATUS_BAD_PARAM, hm_step_neg, ON_BOTH},
    {"step = num_steps", KDL_STATUS_BAD_PARAM, hm_step_big, ON_BOTH},
    {"rows -1", KDL_STATUS_BAD_SIZE, hm_rows, ON_BOTH},
    {"vocab 0", KDL_STATUS_BAD_SIZE, hm_vocab0, ON_BOTH},
    {"vocab -8", KDL_STATUS_BAD_SIZE, hm_vocab_neg, ON_BOTH},
    {"num_shards 0", KDL_STATUS_BAD_SIZE, hm_shards0, ON_BOTH},
    {"num_shards > vocab", KDL_STATUS_BAD_SIZE, hm_shards_big, ON_BOTH},
    {"shard_rank -1", KDL_STATUS_BAD_PARAM, hm_rank_neg, ON_BOTH},
    {"shard_rank = num_shards", KDL_STATUS_BAD_PARAM, hm_rank_big, ON_BOTH},
    {"vocab_local 0", KDL_STATUS_BAD_SIZE, hm_local0, ON_BOTH},
    {"vocab_offset -1", KDL_STATUS_BAD_SIZE, hm_offset_neg, ON_BOTH},
    {"slice past vocab", KDL_STATUS_BAD_SIZE, hm_slice_out, ON_BOTH},
    {"ld_student < vocab_local", KDL_STATUS_BAD_STRIDE, hm_ld_s, ON_BOTH},
    {"ld_teacher 0", KDL_STATUS_BAD_STRIDE, hm_ld_t, ON_BOTH},
    {"ld_grad < 0", KDL_STATUS_BAD_STRIDE, hm_ld_g, ON_BOTH},
    {"tau 0", KDL_STATUS_BAD_TEMPERATURE, hm_tau, ON_BOTH},
    {"tau inf", KDL_STATUS_BAD_TEMPERATURE, hm_tau_inf, ON_BOTH},
    {"scale NaN", KDL_STATUS_BAD_SCALE, hm_scale, ON_BOTH},
    {"alpha < 0", KDL_STATUS_BAD_ALPHA, hm_alpha, ON_BOTH},
    {"beta NaN", KDL_STATUS_BAD_BETA, hm_beta, ON_BOTH},
    {"mu 1", KDL_STATUS_BAD_MU, hm_mu, ON_BOTH},
    {"top_k 0", KDL_STATUS_BAD_TOP_K, hm_topk0, ON_BOTH},
    {"top_k > vocab", KDL_STATUS_BAD_TOP_K, hm_topk_big, ON_BOTH},
    {"divergence COUNT_", KDL_STATUS_BAD_ENUM, hm_div, ON_BOTH},
    {"head rule COUNT_", KDL_STATUS_BAD_ENUM, hm_rule, ON_BOTH},
    {"reduction -1", KDL_STATUS_BAD_ENUM, hm_red, ON_BOTH},
    {"student dtype 4", KDL_STATUS_BAD_ENUM, hm_sdt, ON_BOTH},
    {"teacher dtype 9", KDL_STATUS_BAD_ENUM, hm_tdt, ON_BOTH},
    {"out dtype f16", KDL_STATUS_NOT_SUPPORTED, hm_odt, ON_BOTH},
    {"grad dtype other", KDL_STATUS_NOT_SUPPORTED, hm_gdt, ON_BOTH},
    {"student f64 on the GPU", KDL_STATUS_NOT_SUPPORTED, hm_s64, ON_GPU},
    {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, hm_dsize, ON_BOTH},
    {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, hm_asize, ON_BOTH},
    {"ld_student INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, hm_ovf_ld, ON_BOTH},
    {"rows x ld overflows", KDL_STATUS_SIZE_OVERFLOW, hm_ovf_rows, ON_BOTH},
    {"student misaligned", KDL_STATUS_MISALIGNED, hm_mis_s, ON_BOTH},
    {"teacher misaligned", KDL_STATUS_MISALIGNED, hm_mis_t, ON_BOTH},
    {"labels misaligned", KDL_STATUS_MISALIGNED, hm_mis_lab, ON_BOTH},
    {"grad misaligned", KDL_STATUS_MISALIGNED, hm_mis_g, ON_BOTH},
    {"loss misaligned", KDL_STATUS_MISALIGNED, hm_mis_loss, ON_BOTH},
    {"info misaligned", KDL_STATUS_MISALIGNED, hm_mis_info, ON_BOTH},
    {"valid_rows misaligned", KDL_STATUS_MISALIGNED, hm_mis_valid, ON_BOTH},
    {"stat_head_size misaligned", KDL_STATUS_MISALIGNED, hm_mis_hs, ON_BOTH},
    {"state misaligned", KDL_STATUS_MISALIGNED, hm_mis_state, ON_BOTH},
    {"exchange misaligned", KDL_STATUS_MISALIGNED, hm_mis_exchange, ON_BOTH},
};
#define N_SH_CASES (sizeof sh_cases / sizeof sh_cases[0])

/* Buffers of one shard; state and exchange as kdl_shard_sizes asks, with
 * room for the misaligned cases. */
typedef struct sh_bufs {
    double S[HN * HLD], T[HN * HLD], grad[HN * HLD], loss[HN];
    int64_t labels[HN], info, valid, hs[HN];
    unsigned char mask[HN * HV];
    void *state;
    double *exchange;
    size_t state_bytes, exchange_count;
    kdl_shard_op_t op;
    int64_t count;
} sh_bufs_t;

static void sh_fill(sh_bufs_t *b)
{
    memset(b->grad, SENTINEL, sizeof b->grad);
    memset(b->loss, SENTINEL, sizeof b->loss);
    memset(&b->info, SENTINEL, sizeof b->info);
    memset(&b->valid, SENTINEL, sizeof b->valid);
    memset(b->hs, SENTINEL, sizeof b->hs);
    memset(b->mask, SENTINEL, sizeof b->mask);
    memset(b->state, SENTINEL, b->state_bytes);
    memset(b->exchange, SENTINEL, b->exchange_count * sizeof(double));
    memset(&b->op, SENTINEL, sizeof b->op);
    memset(&b->count, SENTINEL, sizeof b->count);
}

static int sh_untouched(const sh_bufs_t *b)
{
    return all_sentinel(b->grad, sizeof b->grad) && all_sentinel(b->loss, sizeof b->loss) &&
           all_sentinel(&b->info, sizeof b->info) && all_sentinel(&b->valid, sizeof b->valid) &&
           all_sentinel(b->hs, sizeof b->hs) && all_sentinel(b->mask, sizeof b->mask) &&
           all_sentinel(b->state, b->state_bytes) && all_sentinel(b->exchange, b->exchange_count * sizeof(double)) &&
           all_sentinel(&b->op, sizeof b->op) && all_sentinel(&b->count, sizeof b->count);
}

/* One shard holding the whole vocabulary (the protocol runs to the end
 * without a peer), AKL with HEAD_TOPK (every step, every descriptor field),
 * reduction NONE, every optional output; f64 on the reference, f32 on the
 * GPU path. */
static void sh_problem(sh_bufs_t *b, int gpu, kdl_loss_desc_t *d, kdl_shard_args_t *a)
{
    kdl_loss_desc_init(d);
    d->divergence = KDL_DIV_AKL;
    d->head_rule = KDL_HEAD_TOPK;
    d->top_k = 3;
    d->reduction = KDL_REDUCTION_NONE;
    kdl_shard_args_init(a);
    a->rows = HN;
    a->vocab = HV;
    a->vocab_offset = 0;
    a->vocab_local = HV;
    a->shard_rank = 0;
    a->num_shards = 1;
    a->student = b->S;
    a->teacher = b->T;
    a->ld_student = a->ld_teacher = a->ld_grad = HLD;
    a->student_dtype = a->teacher_dtype = a->grad_dtype = a->out_dtype = gpu ? KDL_DTYPE_F32 : KDL_DTYPE_F64;
    a->labels = b->labels;
    a->grad = b->grad;
    a->loss = b->loss;
    a->info = &b->info;
    a->valid_rows = &b->valid;
    a->stat_head_size = b->hs;
    a->head_mask = b->mask;
    a->state = b->state;
    a->exchange = b->exchange;
}

static void sh_init(sh_bufs_t *b)
{
    memset(b, 0, sizeof *b);
    kdl_rng_t r = {19};
    kdl_fill_logits(&r, b->S, HN * HLD, 1.0);
    kdl_fill_logits(&r, b->T, HN * HLD, 1.0);
    b->labels[0] = 1;
    b->labels[1] = -100;
    b->labels[2] = 7;
    kdl_loss_desc_t d;
    kdl_shard_args_t a;
    sh_problem(b, 0, &d, &a);
    int steps = 0;
    cr_assert_eq(kdl_shard_sizes(&d, &a, &b->state_bytes, &b->exchange_count, &steps), KDL_STATUS_SUCCESS);
    cr_assert_eq(steps, 12, "AKL with an f64 teacher: 8 digit steps + 4");
    b->state = malloc(b->state_bytes + 8);
    b->exchange = (double *)malloc((b->exchange_count + 1) * sizeof(double));
    cr_assert(b->state && b->exchange);
}

static void sh_free(sh_bufs_t *b)
{
    free(b->state);
    free(b->exchange);
}

Test(bad_args, ref_shard_table)
{
    sh_bufs_t b;
    sh_init(&b);
    kdl_loss_desc_t d;
    kdl_shard_args_t a;
    sh_problem(&b, 0, &d, &a);
    sh_fill(&b);
    for (int step = 0; step < 12; step++) {
        cr_assert_eq(kdl_ref_shard_step(&d, &a, step, &b.op, &b.count), KDL_STATUS_SUCCESS, "valid problem, step %d: %s",
                     step, kdl_get_last_error());
        cr_assert_eq(b.op == KDL_SHARD_OP_DONE, step == 11, "step %d: op %d", step, (int)b.op);
    }
    for (size_t c = 0; c < N_SH_CASES; c++) {
        const sh_case_t *hc = &sh_cases[c];
        if (hc->path == ON_GPU) continue;
        sh_problem(&b, 0, &d, &a);
        sh_call_t call = {0, 0, 0};
        hc->mutate(&d, &a, &call);
        sh_fill(&b);
        kdl_status_t st = kdl_ref_shard_step(&d, &a, call.step, call.null_op ? NULL : &b.op,
                                             call.null_count ? NULL : &b.count);
        cr_expect_eq(st, hc->want, "%s: got %s (%s)", hc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", hc->name);
        cr_expect(sh_untouched(&b), "%s: an output, the state or the exchange was written", hc->name);
        if (!call.null_op && !call.null_count && call.step == 0)
            cr_expect_eq(kdl_shard_validate(&d, &a, 1), hc->want, "%s: validate disagrees", hc->name);
    }
    sh_problem(&b, 0, &d, &a);
    cr_expect_eq(kdl_ref_shard_step(NULL, NULL, 0, &b.op, &b.count), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_shard_step(NULL, &a, 0, &b.op, &b.count), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_ref_shard_step(&d, NULL, 0, &b.op, &b.count), KDL_STATUS_NULL_POINTER);
    sh_free(&b);
}

/* kdl_shard_sizes reads desc->divergence, rows, num_shards and the teacher
 * dtype only; each bad one gets its status and no output is written. */
typedef void (*shs_mut_t)(kdl_loss_desc_t *, kdl_shard_args_t *);
static void hs_dsize(kdl_loss_desc_t *d, kdl_shard_args_t *a) { d->struct_size = 1; }
static void hs_asize(kdl_loss_desc_t *d, kdl_shard_args_t *a) { a->struct_size = 0; }
static void hs_div(kdl_loss_desc_t *d, kdl_shard_args_t *a) { d->divergence = (kdl_divergence_t)-3; }
static void hs_tdt(kdl_loss_desc_t *d, kdl_shard_args_t *a) { a->teacher_dtype = (kdl_dtype_t)4; }
static void hs_rows(kdl_loss_desc_t *d, kdl_shard_args_t *a) { a->rows = -1; }
static void hs_shards(kdl_loss_desc_t *d, kdl_shard_args_t *a) { a->num_shards = 0; }
static void hs_shards_neg(kdl_loss_desc_t *d, kdl_shard_args_t *a) { a->num_shards = INT32_MIN; }
static void hs_ovf(kdl_loss_desc_t *d, kdl_shard_args_t *a) { a->rows = INT64_MAX; }
static void hs_ovf_shards(kdl_loss_desc_t *d, kdl_shard_args_t *a)
{
    a->rows = INT64_MAX / 1024; /* AKL: the tie step needs num_shards doubles per row */
    a->num_shards = INT32_MAX;
}
static const struct {
    const char *name;
    kdl_status_t want;
    shs_mut_t mutate;
} shs_cases[] = {
    {"desc struct_size", KDL_STATUS_BAD_STRUCT_SIZE, hs_dsize},
    {"args struct_size", KDL_STATUS_BAD_STRUCT_SIZE, hs_asize},
    {"divergence -3", KDL_STATUS_BAD_ENUM, hs_div},
    {"teacher dtype 4", KDL_STATUS_BAD_ENUM, hs_tdt},
    {"rows -1", KDL_STATUS_BAD_SIZE, hs_rows},
    {"num_shards 0", KDL_STATUS_BAD_SIZE, hs_shards},
    {"num_shards INT32_MIN", KDL_STATUS_BAD_SIZE, hs_shards_neg},
    {"rows INT64_MAX", KDL_STATUS_SIZE_OVERFLOW, hs_ovf},
    {"rows x num_shards overflows", KDL_STATUS_SIZE_OVERFLOW, hs_ovf_shards},
};

Test(bad_args, shard_sizes_table)
{
    sh_bufs_t b;
    sh_init(&b);
    for (size_t c = 0; c < sizeof shs_cases / sizeof shs_cases[0]; c++) {
        kdl_loss_desc_t d;
        kdl_shard_args_t a;
        sh_problem(&b, 0, &d, &a);
        shs_cases[c].mutate(&d, &a);
        size_t sb = 777, ec = 777;
        int ns = 777;
        kdl_status_t st = kdl_shard_sizes(&d, &a, &sb, &ec, &ns);
        cr_expect_eq(st, shs_cases[c].want, "%s: got %s (%s)", shs_cases[c].name, kdl_status_string(st),
                     kdl_get_last_error());
        cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", shs_cases[c].name);
        cr_expect(sb == 777 && ec == 777 && ns == 777, "%s: an output was written", shs_cases[c].name);
    }
    kdl_loss_desc_t d;
    kdl_shard_args_t a;
    sh_problem(&b, 0, &d, &a);
    cr_expect_eq(kdl_shard_sizes(NULL, &a, NULL, NULL, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_shard_sizes(&d, NULL, NULL, NULL, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_shard_sizes(&d, &a, NULL, NULL, NULL), KDL_STATUS_SUCCESS, "every output may be NULL");
    sh_free(&b);
}

Test(bad_args, gpu_shard_table)
{
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    sh_bufs_t b;
    sh_init(&b);
    kdl_loss_desc_t d;
    kdl_shard_args_t a;
    sh_problem(&b, 1, &d, &a);
    sh_fill(&b);
    cr_assert_eq(kdl_shard_validate(&d, &a, 0), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    GPU_VALID_EXPECT(&g, kdl_shard_step(g.h, &d, &a, 0, &b.op, &b.count), "shard step 0");
    cr_expect(g.device || sh_untouched(&b), "valid problem without a device: something was written");
    for (size_t c = 0; c < N_SH_CASES; c++) {
        const sh_case_t *hc = &sh_cases[c];
        if (hc->path == ON_REF) continue;
        sh_problem(&b, 1, &d, &a);
        sh_call_t call = {0, 0, 0};
        hc->mutate(&d, &a, &call);
        sh_fill(&b);
        kdl_status_t st = kdl_shard_step(g.h, &d, &a, call.step, call.null_op ? NULL : &b.op,
                                         call.null_count ? NULL : &b.count);
        cr_expect_eq(st, hc->want, "%s: got %s (%s)", hc->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(sh_untouched(&b), "%s: an output, the state or the exchange was written", hc->name);
        if (!call.null_op && !call.null_count && call.step == 0)
            cr_expect_eq(kdl_shard_validate(&d, &a, 0), hc->want, "%s: validate disagrees", hc->name);
    }
    /* f32 teacher: AKL has 4 digit steps, so 8 steps in all */
    sh_problem(&b, 1, &d, &a);
    sh_fill(&b);
    cr_expect_eq(kdl_shard_step(g.h, &d, &a, 8, &b.op, &b.count), KDL_STATUS_BAD_PARAM);
    cr_expect(sh_untouched(&b));
    cr_expect_eq(kdl_shard_step(g.h, NULL, &a, 0, &b.op, &b.count), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_shard_step(g.h, &d, NULL, 0, &b.op, &b.count), KDL_STATUS_NULL_POINTER);
    sh_free(&b);
    gpu_ctx_close(&g);
}

/* ============================================ GPU entry points, no handle */

/* Every GPU entry point with a NULL handle (the only one a build without a
 * device can have: kdl_create gives NULL and NO_DEVICE): NULL_POINTER,
 * nothing written, *bytes untouched; any build. */
Test(bad_args, gpu_entry_points_without_a_handle)
{
    size_t bytes = 12345;
    int n = 0;
#define NO_HANDLE(call, untouched)                                                                  \
    do {                                                                                            \
        kdl_status_t st_ = (call);                                                                  \
        cr_expect_eq(st_, KDL_STATUS_NULL_POINTER, "%s: got %s", #call, kdl_status_string(st_));   \
        cr_expect((untouched) && bytes == 12345, "%s: something was written", #call);              \
        n++;                                                                                        \
    } while (0)
    {
        sp_bufs_t b;
        sp_init(&b);
        kdl_loss_desc_t d;
        kdl_sparse_args_t a;
        sp_problem(&b, 0, 1, &d, &a);
        sp_fill(&b);
        NO_HANDLE(kdl_sparse_workspace_size(NULL, &d, &a, &bytes), sp_untouched(&b));
        NO_HANDLE(kdl_sparse_loss(NULL, &d, &a, NULL, 0), sp_untouched(&b));
    }
    {
        ot_bufs_t b;
        kdl_sinkhorn_desc_t d;
        kdl_sinkhorn_args_t a;
        ot_problem(&b, 1, &d, &a);
        ot_fill(&b);
        NO_HANDLE(kdl_sinkhorn_workspace_size(NULL, &d, &a, &bytes), ot_untouched(&b));
        NO_HANDLE(kdl_sinkhorn(NULL, &d, &a, NULL, 0), ot_untouched(&b));
    }
    {
        kd_bufs_t b;
        kd_init(&b);
        kdl_sinkd_desc_t d;
        kdl_sinkd_args_t a;
        kd_problem(&b, 1, &d, &a);
        kd_fill(&b);
        NO_HANDLE(kdl_sinkd_workspace_size(NULL, &d, &a, &bytes), kd_untouched(&b));
        NO_HANDLE(kdl_sinkd(NULL, &d, &a, NULL, 0), kd_untouched(&b));
    }
    {
        fl_bufs_t b;
        fl_init(&b);
        kdl_loss_desc_t d;
        kdl_fused_linear_args_t a;
        fl_problem(&b, 1, &d, &a);
        fl_fill(&b);
        NO_HANDLE(kdl_fused_linear_workspace_size(NULL, &d, &a, &bytes), fl_untouched(&b));
        NO_HANDLE(kdl_fused_linear_loss(NULL, &d, &a, NULL, 0), fl_untouched(&b));
    }
    {
        sh_bufs_t b;
        sh_init(&b);
        kdl_loss_desc_t d;
        kdl_shard_args_t a;
        sh_problem(&b, 1, &d, &a);
        sh_fill(&b);
        NO_HANDLE(kdl_shard_step(NULL, &d, &a, 0, &b.op, &b.count), sh_untouched(&b));
        sh_free(&b);
    }
#undef NO_HANDLE
    cr_log_info("%d GPU entry points refused a NULL handle", n);
}

/* A workspace one byte smaller than queried: WORKSPACE_TOO_SMALL; a
 * misaligned one: BAD_PARAM; nothing written or launched (GPU-only: the
 * size query needs a handle). */
Test(bad_args, gpu_ext_workspace_too_small)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    char *ws = (char *)g.ws;
    size_t need;
#define TOO_SMALL(query, run_with, untouched, what)                                                   \
    do {                                                                                              \
        need = 0;                                                                                     \
        cr_assert_eq((query), KDL_STATUS_SUCCESS, "%s: %s", (what), kdl_get_last_error());            \
        cr_assert(need + 16 <= g.ws_bytes);                                                           \
        if (need > 0) {                                                                               \
            kdl_status_t st_ = run_with(ws, need - 1);                                                \
            cr_expect_eq(st_, KDL_STATUS_WORKSPACE_TOO_SMALL, "%s: got %s", (what), kdl_status_string(st_)); \
            st_ = run_with(ws + 8, need);                                                             \
            cr_expect_eq(st_, KDL_STATUS_BAD_PARAM, "%s, workspace + 8: got %s", (what), kdl_status_string(st_)); \
        } else {                                                                                      \
            cr_log_warn("%s needs no workspace: WORKSPACE_TOO_SMALL not reachable", (what));          \
        }                                                                                             \
        cr_expect_eq(cudaDeviceSynchronize(), cudaSuccess);                                           \
        cr_expect((untouched), "%s: an output was written", (what));                                  \
    } while (0)
    {
        sp_bufs_t b;
        sp_init(&b);
        kdl_loss_desc_t d;
        kdl_sparse_args_t a;
        sp_problem(&b, 0, 1, &d, &a);
        sp_fill(&b);
#define RUN(w, n) kdl_sparse_loss(g.h, &d, &a, (w), (n))
        TOO_SMALL(kdl_sparse_workspace_size(g.h, &d, &a, &need), RUN, sp_untouched(&b), "sparse");
#undef RUN
    }
    {
        ot_bufs_t b;
        kdl_sinkhorn_desc_t d;
        kdl_sinkhorn_args_t a;
        ot_problem(&b, 1, &d, &a);
        ot_fill(&b);
#define RUN(w, n) kdl_sinkhorn(g.h, &d, &a, (w), (n))
        TOO_SMALL(kdl_sinkhorn_workspace_size(g.h, &d, &a, &need), RUN, ot_untouched(&b), "sinkhorn");
#undef RUN
    }
    {
        kd_bufs_t b;
        kd_init(&b);
        kdl_sinkd_desc_t d;
        kdl_sinkd_args_t a;
        kd_problem(&b, 1, &d, &a);
        kd_fill(&b);
#define RUN(w, n) kdl_sinkd(g.h, &d, &a, (w), (n))
        TOO_SMALL(kdl_sinkd_workspace_size(g.h, &d, &a, &need), RUN, kd_untouched(&b), "sinkd");
#undef RUN
    }
    {
        fl_bufs_t b;
        fl_init(&b);
        kdl_loss_desc_t d;
        kdl_fused_linear_args_t a;
        fl_problem(&b, 1, &d, &a);
        fl_fill(&b);
#define RUN(w, n) kdl_fused_linear_loss(g.h, &d, &a, (w), (n))
        TOO_SMALL(kdl_fused_linear_workspace_size(g.h, &d, &a, &need), RUN, fl_untouched(&b), "fused linear");
#undef RUN
    }
#undef TOO_SMALL
    gpu_ctx_close(&g);
#endif
}
