/*
 * host/common.c - version, status strings, last-error detail, descriptor and
 * argument defaults, the argument check shared by the GPU path and the
 * reference, and the name tables used by the CLI and the bindings.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "kdloss/kdloss_types.h"

int kdl_get_version(void) { return KDL_VERSION; }

/* ------------------------------------------------------------- last error */
static _Thread_local char kdl_last_error_buf[512];

kdl_status_t kdl_fail(kdl_status_t status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(kdl_last_error_buf, sizeof kdl_last_error_buf, fmt, ap);
    va_end(ap);
    return status;
}

void kdl_clear_error(void) { kdl_last_error_buf[0] = '\0'; }

const char *kdl_get_last_error(void) { return kdl_last_error_buf; }

const char *kdl_status_string(kdl_status_t s)
{
    switch (s) {
    case KDL_STATUS_SUCCESS: return "KDL_STATUS_SUCCESS: success";
    case KDL_STATUS_BAD_PARAM: return "KDL_STATUS_BAD_PARAM: bad parameter";
    case KDL_STATUS_NULL_POINTER: return "KDL_STATUS_NULL_POINTER: a required pointer is NULL";
    case KDL_STATUS_BAD_SIZE: return "KDL_STATUS_BAD_SIZE: a size is out of range";
    case KDL_STATUS_BAD_STRIDE: return "KDL_STATUS_BAD_STRIDE: row stride smaller than the row";
    case KDL_STATUS_BAD_TEMPERATURE: return "KDL_STATUS_BAD_TEMPERATURE: temperature must be finite and > 0";
    case KDL_STATUS_BAD_ALPHA: return "KDL_STATUS_BAD_ALPHA: alpha must be in [0, 1)";
    case KDL_STATUS_BAD_BETA: return "KDL_STATUS_BAD_BETA: beta must be in (0, 1)";
    case KDL_STATUS_BAD_MU: return "KDL_STATUS_BAD_MU: mu must be in (0, 1)";
    case KDL_STATUS_BAD_TOP_K: return "KDL_STATUS_BAD_TOP_K: top_k must be in [1, vocab]";
    case KDL_STATUS_BAD_SCALE: return "KDL_STATUS_BAD_SCALE: scale must be finite";
    case KDL_STATUS_BAD_ENUM: return "KDL_STATUS_BAD_ENUM: unknown enum value";
    case KDL_STATUS_SIZE_OVERFLOW: return "KDL_STATUS_SIZE_OVERFLOW: sizes overflow";
    case KDL_STATUS_WORKSPACE_TOO_SMALL: return "KDL_STATUS_WORKSPACE_TOO_SMALL: workspace smaller than queried";
    case KDL_STATUS_BAD_STRUCT_SIZE: return "KDL_STATUS_BAD_STRUCT_SIZE: struct_size not recognised (use the init function)";
    case KDL_STATUS_BAD_EPSILON: return "KDL_STATUS_BAD_EPSILON: epsilon must be finite and > 0";
    case KDL_STATUS_BAD_ITERATIONS: return "KDL_STATUS_BAD_ITERATIONS: iteration counts must be >= 1";
    case KDL_STATUS_BAD_TOLERANCE: return "KDL_STATUS_BAD_TOLERANCE: tolerance must be >= 0";
    case KDL_STATUS_BAD_GROUP: return "KDL_STATUS_BAD_GROUP: rows must be a positive multiple of the group size";
    case KDL_STATUS_MISALIGNED: return "KDL_STATUS_MISALIGNED: a pointer is not aligned to its element size";
    case KDL_STATUS_BAD_SCHEDULE: return "KDL_STATUS_BAD_SCHEDULE: epsilon-scaling factor must be in (0, 1)";
    case KDL_STATUS_NOT_SUPPORTED: return "KDL_STATUS_NOT_SUPPORTED: not supported on this path";
    case KDL_STATUS_NOT_IMPLEMENTED: return "KDL_STATUS_NOT_IMPLEMENTED: not implemented";
    case KDL_STATUS_ARCH_MISMATCH: return "KDL_STATUS_ARCH_MISMATCH: no kernel image for this device";
    case KDL_STATUS_NO_DEVICE: return "KDL_STATUS_NO_DEVICE: no CUDA device";
    case KDL_STATUS_CUDA_ERROR: return "KDL_STATUS_CUDA_ERROR: CUDA runtime error";
    case KDL_STATUS_CUBLAS_ERROR: return "KDL_STATUS_CUBLAS_ERROR: cuBLAS error";
    case KDL_STATUS_ALLOC_FAILED: return "KDL_STATUS_ALLOC_FAILED: allocation failed";
    case KDL_STATUS_INTERNAL_ERROR: return "KDL_STATUS_INTERNAL_ERROR: internal error";
    case KDL_STATUS_WRONG_DEVICE:
        return "KDL_STATUS_WRONG_DEVICE: the calling thread's current CUDA device is not the handle's";
    case KDL_STATUS_NONFINITE_INPUT: return "KDL_STATUS_NONFINITE_INPUT: non-finite input";
    case KDL_STATUS_COUNT_: break;
    }
    return "KDL_STATUS_UNKNOWN: unknown status";
}

/* ------------------------------------------------------------ name tables */
static const char *const div_names[KDL_DIV_COUNT_] = {"fkl", "rkl", "fkl_rkl", "akl",
                                                      "jsd", "tvd", "skl",     "srkl"};
static const char *const rule_names[KDL_HEAD_COUNT_] = {"reference", "mass", "topk"};
static const char *const red_names[KDL_REDUCTION_COUNT_] = {"none", "sum", "mean"};
static const char *const dtype_names[4] = {"f32", "f16", "bf16", "f64"};

static int lookup(const char *const *table, int n, const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < n; i++)
        if (strcmp(table[i], name) == 0) return i;
    return -1;
}

const char *kdl_divergence_name(kdl_divergence_t d)
{
    return (unsigned)d < KDL_DIV_COUNT_ ? div_names[d] : "unknown";
}
int kdl_divergence_from_name(const char *name) { return lookup(div_names, KDL_DIV_COUNT_, name); }
const char *kdl_head_rule_name(kdl_head_rule_t r)
{
    return (unsigned)r < KDL_HEAD_COUNT_ ? rule_names[r] : "unknown";
}
int kdl_head_rule_from_name(const char *name) { return lookup(rule_names, KDL_HEAD_COUNT_, name); }
const char *kdl_reduction_name(kdl_reduction_t r)
{
    return (unsigned)r < KDL_REDUCTION_COUNT_ ? red_names[r] : "unknown";
}
int kdl_reduction_from_name(const char *name) { return lookup(red_names, KDL_REDUCTION_COUNT_, name); }
const char *kdl_dtype_name(kdl_dtype_t t) { return (unsigned)t < 4 ? dtype_names[t] : "unknown"; }

size_t kdl_dtype_size(kdl_dtype_t t)
{
    switch (t) {
    case KDL_DTYPE_F32: return 4;
    case KDL_DTYPE_F16: return 2;
    case KDL_DTYPE_BF16: return 2;
    case KDL_DTYPE_F64: return 8;
    }
    return 0;
}

/* ---------------------------------------------------------------- defaults */
void kdl_loss_desc_init(kdl_loss_desc_t *d)
{
    if (!d) return;
    memset(d, 0, sizeof *d);
    d->struct_size = sizeof *d;
    d->divergence = KDL_DIV_FKL;
    d->temperature = 1.0;
    d->alpha = 0.1;
    d->beta = 0.5;
    d->head_rule = KDL_HEAD_REFERENCE;
    d->mu = 0.5;
    d->top_k = 1;
    d->reduction = KDL_REDUCTION_MEAN;
    d->scale = 1.0;
    d->ignore_index = -100;
}

void kdl_loss_args_init(kdl_loss_args_t *a)
{
    if (!a) return;
    memset(a, 0, sizeof *a);
    a->struct_size = sizeof *a;
    a->student_dtype = KDL_DTYPE_F32;
    a->teacher_dtype = KDL_DTYPE_F32;
    a->grad_dtype = KDL_DTYPE_F32;
    a->out_dtype = KDL_DTYPE_F32;
}

/* -------------------------------------------------------------- validation */
kdl_status_t kdl_check_struct_pair(const void *desc, size_t desc_size, const void *args, size_t args_size)
{
    if (!desc) return kdl_fail(KDL_STATUS_NULL_POINTER, "desc is NULL");
    if (!args) return kdl_fail(KDL_STATUS_NULL_POINTER, "args is NULL");
    size_t ds, as;
    memcpy(&ds, desc, sizeof ds);
    memcpy(&as, args, sizeof as);
    if (ds != desc_size)
        return kdl_fail(KDL_STATUS_BAD_STRUCT_SIZE, "desc->struct_size is %zu, expected %zu", ds, desc_size);
    if (as != args_size)
        return kdl_fail(KDL_STATUS_BAD_STRUCT_SIZE, "args->struct_size is %zu, expected %zu", as, args_size);
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_check_alignment(const kdl_array_ref_t *arrays, size_t count)
{
    for (size_t k = 0; k < count; k++)
        if (arrays[k].p && arrays[k].elem > 1 && (uintptr_t)arrays[k].p % arrays[k].elem != 0)
            return kdl_fail(KDL_STATUS_MISALIGNED, "%s is not aligned to its %zu-byte element", arrays[k].name,
                            arrays[k].elem);
    return KDL_STATUS_SUCCESS;
}

static int dtype_ok(kdl_dtype_t t) { return kdl_dtype_allowed(t, 1); }

int kdl_span_ok(int64_t rows, int64_t vocab, int64_t ld, size_t elem)
{
    if (rows == 0) return 1;
    if (elem == 0) return 0;
    /* (rows - 1) * ld + vocab elements must fit in int64 and in size_t bytes */
    if (ld > 0 && rows - 1 > (INT64_MAX - vocab) / ld) return 0;
    int64_t n = (rows - 1) * ld + vocab;
    return (uint64_t)n <= (uint64_t)SIZE_MAX / elem;
}

kdl_status_t kdl_check_logit_layout(const kdl_logit_layout_t *l, int allow_f64)
{
    if (!dtype_ok(l->student_dtype) || !dtype_ok(l->teacher_dtype) || !dtype_ok(l->out_dtype) ||
        (l->grad && !dtype_ok(l->grad_dtype)))
        return kdl_fail(KDL_STATUS_BAD_ENUM, "unknown dtype");
    if (l->out_dtype != KDL_DTYPE_F32 && l->out_dtype != KDL_DTYPE_F64)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "out_dtype must be f32 or f64");
    if (!allow_f64 && (l->student_dtype == KDL_DTYPE_F64 || l->teacher_dtype == KDL_DTYPE_F64 ||
                       (l->grad && l->grad_dtype == KDL_DTYPE_F64)))
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "f64 logits are supported by the reference only");
    if (l->grad && l->grad_dtype != l->student_dtype && l->grad_dtype != KDL_DTYPE_F32 &&
        !(allow_f64 && l->grad_dtype == KDL_DTYPE_F64))
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "grad_dtype must be the student's dtype or f32");

    if (l->rows < 0) return kdl_fail(KDL_STATUS_BAD_SIZE, "rows = %lld < 0", (long long)l->rows);
    if (l->vocab < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "vocab = %lld < 1", (long long)l->vocab);
    if (l->ld_student < l->vocab)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_student = %lld < vocab = %lld",
                        (long long)l->ld_student, (long long)l->vocab);
    if (l->ld_teacher < l->vocab)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_teacher = %lld < vocab = %lld",
                        (long long)l->ld_teacher, (long long)l->vocab);
    if (l->grad && l->ld_grad < l->vocab)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_grad = %lld < vocab = %lld", (long long)l->ld_grad,
                        (long long)l->vocab);
    return KDL_STATUS_SUCCESS;
}

int kdl_logit_spans_ok(const kdl_logit_layout_t *l)
{
    return kdl_span_ok(l->rows, l->vocab, l->ld_student, kdl_dtype_size(l->student_dtype)) &&
           kdl_span_ok(l->rows, l->vocab, l->ld_teacher, kdl_dtype_size(l->teacher_dtype)) &&
           (!l->grad || kdl_span_ok(l->rows, l->vocab, l->ld_grad, kdl_dtype_size(l->grad_dtype))) &&
           (uint64_t)l->rows <= (uint64_t)SIZE_MAX / 8;
}

kdl_status_t kdl_loss_validate(const kdl_loss_desc_t *d, const kdl_loss_args_t *a, int allow_f64)
{
    kdl_clear_error();
    KDL_CHECK_STRUCT_PAIR(d, a);

    if ((unsigned)d->divergence >= KDL_DIV_COUNT_)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "divergence %d unknown", (int)d->divergence);
    if ((unsigned)d->head_rule >= KDL_HEAD_COUNT_)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "head_rule %d unknown", (int)d->head_rule);
    if ((unsigned)d->reduction >= KDL_REDUCTION_COUNT_)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "reduction %d unknown", (int)d->reduction);
    kdl_logit_layout_t layout = {a->rows,       a->vocab,      a->student_dtype, a->teacher_dtype,
                                 a->out_dtype,  a->ld_student, a->ld_teacher,    a->grad,
                                 a->grad_dtype, a->ld_grad};
    kdl_status_t st = kdl_check_logit_layout(&layout, allow_f64);
    if (st != KDL_STATUS_SUCCESS) return st;

    if (!(d->temperature > 0) || !isfinite(d->temperature))
        return kdl_fail(KDL_STATUS_BAD_TEMPERATURE, "temperature = %g", d->temperature);
    if (!isfinite(d->scale)) return kdl_fail(KDL_STATUS_BAD_SCALE, "scale = %g", d->scale);
    if (!(d->alpha >= 0 && d->alpha < 1)) return kdl_fail(KDL_STATUS_BAD_ALPHA, "alpha = %g", d->alpha);
    if (!(d->beta > 0 && d->beta < 1)) return kdl_fail(KDL_STATUS_BAD_BETA, "beta = %g", d->beta);
    if (!(d->mu > 0 && d->mu < 1)) return kdl_fail(KDL_STATUS_BAD_MU, "mu = %g", d->mu);
    if (d->top_k < 1 || d->top_k > a->vocab)
        return kdl_fail(KDL_STATUS_BAD_TOP_K, "top_k = %lld not in [1, %lld]", (long long)d->top_k,
                        (long long)a->vocab);

    if (a->rows > 0 && !a->student) return kdl_fail(KDL_STATUS_NULL_POINTER, "student is NULL");
    if (a->rows > 0 && !a->teacher) return kdl_fail(KDL_STATUS_NULL_POINTER, "teacher is NULL");
    if (!a->loss && !(d->reduction == KDL_REDUCTION_NONE && a->rows == 0))
        return kdl_fail(KDL_STATUS_NULL_POINTER, "loss is NULL");

    /* Every array aligned to its element: the kernels' loads and stores
     * (and the reference's typed accesses) assume it. */
    const size_t oe = kdl_dtype_size(a->out_dtype);
    const kdl_array_ref_t arrays[] = {{a->student, kdl_dtype_size(a->student_dtype), "student"},
                                      {a->teacher, kdl_dtype_size(a->teacher_dtype), "teacher"},
                                      {a->grad, kdl_dtype_size(a->grad_dtype), "grad"},
                                      {a->loss, oe, "loss"},
                                      {a->labels, 8, "labels"},
                                      {a->stat_fkl, oe, "stat_fkl"},
                                      {a->stat_rkl, oe, "stat_rkl"},
                                      {a->stat_g_head, oe, "stat_g_head"},
                                      {a->stat_g_tail, oe, "stat_g_tail"},
                                      {a->stat_w_head, oe, "stat_w_head"},
                                      {a->stat_w_tail, oe, "stat_w_tail"},
                                      {a->stat_head_size, 8, "stat_head_size"},
                                      {a->info, 8, "info"},
                                      {a->valid_rows, 8, "valid_rows"}};
    st = kdl_check_alignment(arrays, sizeof arrays / sizeof arrays[0]);
    if (st != KDL_STATUS_SUCCESS) return st;

    if (!kdl_logit_spans_ok(&layout))
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "rows x stride overflows");
    return KDL_STATUS_SUCCESS;
}
