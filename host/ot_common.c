/*
 * host/ot_common.c - Sinkhorn and SinKD: descriptor and argument defaults,
 * name tables, and the argument checks shared by the GPU path and the
 * float64 reference (kdloss_ot.h).  Built in every configuration (with and
 * without CUDA).
 */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "kdloss/kdloss_ot.h"
#include "ot_internal.h"

/* ------------------------------------------------------------ name tables */
static const char *const metric_names[KDL_OT_METRIC_COUNT_] = {"sqeuclidean", "l1"};
static const char *const value_names[KDL_OT_VALUE_COUNT_] = {"transport", "dual"};

const char *kdl_ot_metric_name(kdl_ot_metric_t m)
{
    return (unsigned)m < KDL_OT_METRIC_COUNT_ ? metric_names[m] : "unknown";
}
int kdl_ot_metric_from_name(const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < KDL_OT_METRIC_COUNT_; i++)
        if (!strcmp(metric_names[i], name)) return i;
    return -1;
}
const char *kdl_ot_value_name(kdl_ot_value_t v)
{
    return (unsigned)v < KDL_OT_VALUE_COUNT_ ? value_names[v] : "unknown";
}
int kdl_ot_value_from_name(const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < KDL_OT_VALUE_COUNT_; i++)
        if (!strcmp(value_names[i], name)) return i;
    return -1;
}

/* ---------------------------------------------------------------- defaults */
void kdl_sinkhorn_desc_init(kdl_sinkhorn_desc_t *d)
{
    if (!d) return;
    memset(d, 0, sizeof *d);
    d->struct_size = sizeof *d;
    d->epsilon = 0.1;
    d->max_iter = 1000;
    d->tol = 1e-6;
    d->check_every = 10;
    d->eps_scaling = 0;
    d->eps_scaling_factor = 0.8;
    d->eps_stage_iter = 1;
    d->value = KDL_OT_VALUE_TRANSPORT;
    d->debias = 0;
    d->metric = KDL_OT_METRIC_SQEUCLIDEAN;
}

void kdl_sinkhorn_args_init(kdl_sinkhorn_args_t *a)
{
    if (!a) return;
    memset(a, 0, sizeof *a);
    a->struct_size = sizeof *a;
    a->dtype = KDL_DTYPE_F32;
}

void kdl_sinkd_desc_init(kdl_sinkd_desc_t *d)
{
    if (!d) return;
    memset(d, 0, sizeof *d);
    d->struct_size = sizeof *d;
    d->group_size = 0;
    d->temperature = 2.0;
    d->epsilon = 0.1;
    d->max_iter = 20;
    d->tol = 0.0;
    d->check_every = 10;
    d->metric = KDL_OT_METRIC_L1;
    d->scale = 1.0;
}

void kdl_sinkd_args_init(kdl_sinkd_args_t *a)
{
    if (!a) return;
    memset(a, 0, sizeof *a);
    a->struct_size = sizeof *a;
    a->student_dtype = KDL_DTYPE_F32;
    a->teacher_dtype = KDL_DTYPE_F32;
    a->grad_dtype = KDL_DTYPE_F32;
    a->out_dtype = KDL_DTYPE_F32;
}

/* ------------------------------------------------------------ size helpers */
/* a*b + c into *out, 0 on int64 overflow (a, b, c >= 0). */
static int mul_add_ok(int64_t a, int64_t b, int64_t c, int64_t *out)
{
    if (b != 0 && a > (INT64_MAX - c) / b) return 0;
    *out = a * b + c;
    return 1;
}

kdl_status_t kdl_ot_totals(const kdl_sinkhorn_args_t *a, kdl_ot_totals_t *t)
{
    memset(t, 0, sizeof *t);
    const int64_t B = a->batch;
    for (int64_t b = 0; b < B; b++) {
        int64_t n = a->sizes_n ? a->sizes_n[b] : a->n;
        int64_t m = a->sizes_m ? a->sizes_m[b] : a->m;
        if (n < 1 || m < 1)
            return kdl_fail(KDL_STATUS_BAD_SIZE, "problem %lld is %lld x %lld (sizes must be >= 1)",
                            (long long)b, (long long)n, (long long)m);
        if (n > INT32_MAX || m > INT32_MAX)
            return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "problem %lld: a side exceeds 2^31 - 1",
                            (long long)b);
        if (!mul_add_ok(n, m, t->nm, &t->nm) || !mul_add_ok(n, n, t->nn, &t->nn) ||
            !mul_add_ok(m, m, t->mm, &t->mm) || !mul_add_ok(1, n, t->rows, &t->rows) ||
            !mul_add_ok(1, m, t->cols, &t->cols))
            return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "packed sizes overflow int64");
        if (n > t->max_n) t->max_n = n;
        if (m > t->max_m) t->max_m = m;
        if (n * m > t->max_nm) t->max_nm = n * m;
    }
    int64_t dim = a->dim > 0 ? a->dim : 1;
    int64_t tmp;
    if (!mul_add_ok(t->rows, dim, 0, &tmp) || !mul_add_ok(t->cols, dim, 0, &tmp))
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "points sizes overflow int64");
    /* every packed array must also fit size_t bytes at 8 bytes per element */
    const uint64_t lim = (uint64_t)SIZE_MAX / 8;
    if ((uint64_t)t->nm > lim || (uint64_t)t->nn > lim || (uint64_t)t->mm > lim ||
        (uint64_t)t->rows * (uint64_t)dim > lim || (uint64_t)t->cols * (uint64_t)dim > lim ||
        (uint64_t)B > lim)
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "packed sizes overflow size_t");
    return KDL_STATUS_SUCCESS;
}

/* ------------------------------------------------------- Sinkhorn checks */
static kdl_status_t check_solver(double eps, int64_t max_iter, double tol, int64_t check_every)
{
    if (!(eps > 0) || !isfinite(eps)) return kdl_fail(KDL_STATUS_BAD_EPSILON, "epsilon = %g", eps);
    if (max_iter < 1)
        return kdl_fail(KDL_STATUS_BAD_ITERATIONS, "max_iter = %lld < 1", (long long)max_iter);
    if (check_every < 1)
        return kdl_fail(KDL_STATUS_BAD_ITERATIONS, "check_every = %lld < 1", (long long)check_every);
    if (!(tol >= 0)) return kdl_fail(KDL_STATUS_BAD_TOLERANCE, "tol = %g", tol);
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_sinkhorn_validate(const kdl_sinkhorn_desc_t *d, const kdl_sinkhorn_args_t *a,
                                   int allow_f64)
{
    kdl_clear_error();
    KDL_CHECK_STRUCT_PAIR(d, a);

    if ((unsigned)d->value >= KDL_OT_VALUE_COUNT_)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "value %d unknown", (int)d->value);
    if ((unsigned)d->metric >= KDL_OT_METRIC_COUNT_)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "metric %d unknown", (int)d->metric);
    if ((unsigned)a->dtype > KDL_DTYPE_F64) return kdl_fail(KDL_STATUS_BAD_ENUM, "dtype %d unknown", (int)a->dtype);
    if (a->dtype != KDL_DTYPE_F32 && a->dtype != KDL_DTYPE_F64)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "Sinkhorn dtype must be f32 or f64");
    if (!allow_f64 && a->dtype == KDL_DTYPE_F64)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "f64 Sinkhorn is supported by the reference only");

    kdl_status_t st = check_solver(d->epsilon, d->max_iter, d->tol, d->check_every);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (d->eps_scaling) {
        if (!(d->eps_scaling_factor > 0 && d->eps_scaling_factor < 1))
            return kdl_fail(KDL_STATUS_BAD_SCHEDULE, "eps_scaling_factor = %g not in (0, 1)",
                            d->eps_scaling_factor);
        if (d->eps_stage_iter < 1)
            return kdl_fail(KDL_STATUS_BAD_ITERATIONS, "eps_stage_iter = %lld < 1",
                            (long long)d->eps_stage_iter);
    }

    if (a->batch < 0) return kdl_fail(KDL_STATUS_BAD_SIZE, "batch = %lld < 0", (long long)a->batch);
    if (!a->sizes_n != !a->sizes_m)
        return kdl_fail(KDL_STATUS_NULL_POINTER, "sizes_n and sizes_m must be given together");
    /* Every array aligned to its element, before anything reads the size
     * arrays or writes info (also for an empty batch). */
    const size_t e = kdl_dtype_size(a->dtype);
    const kdl_array_ref_t arrays[] = {
        {a->sizes_n, 8, "sizes_n"}, {a->sizes_m, 8, "sizes_m"},   {a->cost, e, "cost"},
        {a->x, e, "x"},             {a->y, e, "y"},               {a->log_a, e, "log_a"},
        {a->log_b, e, "log_b"},     {a->f_init, e, "f_init"},     {a->g_init, e, "g_init"},
        {a->cost_xx, e, "cost_xx"}, {a->cost_yy, e, "cost_yy"},   {a->self_yy, e, "self_yy"},
        {a->value, e, "value"},     {a->iterations, 8, "iterations"}, {a->marginal_error, e, "marginal_error"},
        {a->f, e, "f"},             {a->g, e, "g"},               {a->plan, e, "plan"},
        {a->grad_x, e, "grad_x"},   {a->info, 8, "info"}};
    st = kdl_check_alignment(arrays, sizeof arrays / sizeof arrays[0]);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (a->batch == 0) return KDL_STATUS_SUCCESS; /* nothing is read or written */
    if (!a->sizes_n && (a->n < 1 || a->m < 1))
        return kdl_fail(KDL_STATUS_BAD_SIZE, "n = %lld, m = %lld (must be >= 1)", (long long)a->n,
                        (long long)a->m);

    const int points = a->x || a->y;
    if (a->cost && points) return kdl_fail(KDL_STATUS_BAD_PARAM, "give either cost or points x, y, not both");
    if (!a->cost && !points) return kdl_fail(KDL_STATUS_NULL_POINTER, "cost (or points x, y) is NULL");
    if (points && (!a->x || !a->y)) return kdl_fail(KDL_STATUS_NULL_POINTER, "x or y is NULL");
    if (points && a->dim < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "dim = %lld < 1", (long long)a->dim);
    if (a->grad_x && !points)
        return kdl_fail(KDL_STATUS_BAD_PARAM, "grad_x needs the points x, y (not a cost)");
    if (d->debias) {
        if (points && (a->cost_xx || a->cost_yy))
            return kdl_fail(KDL_STATUS_BAD_PARAM, "cost_xx/cost_yy are built from the points; pass NULL");
        if (!points && !a->cost_xx) return kdl_fail(KDL_STATUS_NULL_POINTER, "debias: cost_xx is NULL");
        if (!points && !a->cost_yy && !a->self_yy_given)
            return kdl_fail(KDL_STATUS_NULL_POINTER, "debias: cost_yy is NULL (and self_yy not given)");
        if (a->self_yy_given && !a->self_yy)
            return kdl_fail(KDL_STATUS_NULL_POINTER, "self_yy_given but self_yy is NULL");
    }
    if (!a->value) return kdl_fail(KDL_STATUS_NULL_POINTER, "value is NULL");

    kdl_ot_totals_t t;
    return kdl_ot_totals(a, &t);
}

/* ---------------------------------------------------------- SinKD checks */
kdl_status_t kdl_sinkd_validate(const kdl_sinkd_desc_t *d, const kdl_sinkd_args_t *a, int allow_f64)
{
    kdl_clear_error();
    KDL_CHECK_STRUCT_PAIR(d, a);

    if ((unsigned)d->metric >= KDL_OT_METRIC_COUNT_)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "metric %d unknown", (int)d->metric);
    kdl_logit_layout_t layout = {a->rows,       a->vocab,      a->student_dtype, a->teacher_dtype,
                                 a->out_dtype,  a->ld_student, a->ld_teacher,    a->grad,
                                 a->grad_dtype, a->ld_grad};
    kdl_status_t st = kdl_check_logit_layout(&layout, allow_f64);
    if (st != KDL_STATUS_SUCCESS) return st;

    if (!(d->temperature > 0) || !isfinite(d->temperature))
        return kdl_fail(KDL_STATUS_BAD_TEMPERATURE, "temperature = %g", d->temperature);
    st = check_solver(d->epsilon, d->max_iter, d->tol, d->check_every);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (!isfinite(d->scale)) return kdl_fail(KDL_STATUS_BAD_SCALE, "scale = %g", d->scale);
    if (d->group_size < 0)
        return kdl_fail(KDL_STATUS_BAD_GROUP, "group_size = %lld < 0", (long long)d->group_size);
    if (d->group_size > 0 && a->rows % d->group_size != 0)
        return kdl_fail(KDL_STATUS_BAD_GROUP, "rows = %lld is not a multiple of group_size = %lld",
                        (long long)a->rows, (long long)d->group_size);
    if (kdl_sinkd_group(d, a) > INT32_MAX)
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "group size exceeds 2^31 - 1");

    if (a->rows > 0 && !a->student) return kdl_fail(KDL_STATUS_NULL_POINTER, "student is NULL");
    if (a->rows > 0 && !a->teacher) return kdl_fail(KDL_STATUS_NULL_POINTER, "teacher is NULL");
    if (!a->loss) return kdl_fail(KDL_STATUS_NULL_POINTER, "loss is NULL");

    const size_t oe = kdl_dtype_size(a->out_dtype);
    const kdl_array_ref_t arrays[] = {{a->student, kdl_dtype_size(a->student_dtype), "student"},
                                      {a->teacher, kdl_dtype_size(a->teacher_dtype), "teacher"},
                                      {a->grad, kdl_dtype_size(a->grad_dtype), "grad"},
                                      {a->loss, oe, "loss"},
                                      {a->group_loss, oe, "group_loss"},
                                      {a->plan, oe, "plan"},
                                      {a->iterations, 8, "iterations"},
                                      {a->marginal_error, oe, "marginal_error"},
                                      {a->info, 8, "info"}};
    st = kdl_check_alignment(arrays, sizeof arrays / sizeof arrays[0]);
    if (st != KDL_STATUS_SUCCESS) return st;

    int64_t n = kdl_sinkd_group(d, a);
    if (!kdl_logit_spans_ok(&layout) ||
        (n > 0 && (uint64_t)a->rows > (uint64_t)SIZE_MAX / 8 / (uint64_t)n) ||
        (a->rows > 0 && (uint64_t)a->vocab > (uint64_t)SIZE_MAX / 8 / (uint64_t)a->rows))
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "rows x stride overflows");
    return KDL_STATUS_SUCCESS;
}

int64_t kdl_sinkd_group(const kdl_sinkd_desc_t *d, const kdl_sinkd_args_t *a)
{
    return d->group_size > 0 ? d->group_size : a->rows;
}

