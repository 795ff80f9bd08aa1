/*
 * host/ref_fused_linear.c - float64 CPU reference of the fused linear + loss
 * (kdloss_ext.h part 3), plus the argument check and chunk choice the GPU
 * path shares.
 *
 * Straightforward on purpose (it is the oracle): L = H W^T materialised in
 * float64 [N,V], the dense reference kdl_ref_loss_forward_backward on (L,
 * teacher) gives the loss and dL = d loss / d L, then dH = dL W and
 * dW = dL^T H as plain triple loops (no skipping of zero rows, so a
 * non-finite hidden row poisons dW exactly as a GEMM would).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ext_internal.h"
#include "internal.h"
#include "kdloss/kdloss_ref.h"

void kdl_fused_linear_args_init(kdl_fused_linear_args_t *a)
{
    if (!a) return;
    memset(a, 0, sizeof *a);
    a->struct_size = sizeof *a;
    a->hidden_dtype = KDL_DTYPE_F32;
    a->weight_dtype = KDL_DTYPE_F32;
    a->teacher_dtype = KDL_DTYPE_F32;
    a->grad_dtype = KDL_DTYPE_F32;
    a->out_dtype = KDL_DTYPE_F32;
}

int64_t kdl_fused_linear_chunk_rows(const kdl_fused_linear_args_t *a)
{
    if (!a || a->rows <= 0) return 0;
    int64_t c = a->chunk_rows;
    if (c <= 0) {
        c = a->rows / 8;
        if (c < 1) c = 1;
        if (c > 4096) c = 4096;
    }
    return c < a->rows ? c : a->rows;
}

kdl_status_t kdl_fused_linear_validate(const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a, int allow_f64)
{
    kdl_clear_error();
    KDL_CHECK_STRUCT_PAIR(d, a);
    if (a->vocab < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "vocab = %lld < 1", (long long)a->vocab);
    kdl_status_t st = kdl_ext_validate_desc(d, a->vocab, a->out_dtype);
    if (st != KDL_STATUS_SUCCESS) return st;
    if ((unsigned)a->hidden_dtype > KDL_DTYPE_F64 || (unsigned)a->weight_dtype > KDL_DTYPE_F64 ||
        (unsigned)a->teacher_dtype > KDL_DTYPE_F64 || (unsigned)a->grad_dtype > KDL_DTYPE_F64)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "unknown dtype");
    if (allow_f64) {
        if ((a->grad_hidden || a->grad_weight) && a->grad_dtype != KDL_DTYPE_F32 && a->grad_dtype != KDL_DTYPE_F64)
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "grad_dtype must be f32 or f64");
    } else {
        if (a->hidden_dtype != KDL_DTYPE_F32 || a->weight_dtype != KDL_DTYPE_F32)
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "the GPU path takes f32 hidden states and weights");
        if (a->teacher_dtype == KDL_DTYPE_F64)
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "f64 data is supported by the reference only");
        if ((a->grad_hidden || a->grad_weight) && a->grad_dtype != KDL_DTYPE_F32)
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "the GPU path writes f32 gradients");
        if (d->divergence == KDL_DIV_AKL)
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "AKL is not on the fused-linear GPU path");
    }
    if (a->rows < 0) return kdl_fail(KDL_STATUS_BAD_SIZE, "rows = %lld < 0", (long long)a->rows);
    if (a->hidden < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "hidden = %lld < 1", (long long)a->hidden);
    if (a->chunk_rows < 0) return kdl_fail(KDL_STATUS_BAD_SIZE, "chunk_rows = %lld < 0", (long long)a->chunk_rows);
    if (a->ld_hidden < a->hidden)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_hidden = %lld < hidden = %lld", (long long)a->ld_hidden,
                        (long long)a->hidden);
    if (a->ld_weight < a->hidden)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_weight = %lld < hidden = %lld", (long long)a->ld_weight,
                        (long long)a->hidden);
    if (a->ld_teacher < a->vocab)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_teacher = %lld < vocab = %lld", (long long)a->ld_teacher,
                        (long long)a->vocab);
    if (a->grad_hidden && a->ld_grad_hidden < a->hidden)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_grad_hidden = %lld < hidden = %lld",
                        (long long)a->ld_grad_hidden, (long long)a->hidden);
    if (a->grad_weight && a->ld_grad_weight < a->hidden)
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "ld_grad_weight = %lld < hidden = %lld",
                        (long long)a->ld_grad_weight, (long long)a->hidden);
    if (a->rows > 0 && !a->hidden_states) return kdl_fail(KDL_STATUS_NULL_POINTER, "hidden_states is NULL");
    if (a->rows > 0 && !a->weight) return kdl_fail(KDL_STATUS_NULL_POINTER, "weight is NULL");
    if (a->rows > 0 && !a->teacher) return kdl_fail(KDL_STATUS_NULL_POINTER, "teacher is NULL");
    if (!a->loss && !(d->reduction == KDL_REDUCTION_NONE && a->rows == 0))
        return kdl_fail(KDL_STATUS_NULL_POINTER, "loss is NULL");
    size_t gsz = kdl_dtype_size(a->grad_dtype);
    const kdl_array_ref_t arrays[] = {{a->hidden_states, kdl_dtype_size(a->hidden_dtype), "hidden_states"},
                                      {a->weight, kdl_dtype_size(a->weight_dtype), "weight"},
                                      {a->teacher, kdl_dtype_size(a->teacher_dtype), "teacher"},
                                      {a->labels, 8, "labels"},
                                      {a->grad_hidden, gsz, "grad_hidden"},
                                      {a->grad_weight, gsz, "grad_weight"},
                                      {a->loss, kdl_dtype_size(a->out_dtype), "loss"},
                                      {a->info, 8, "info"},
                                      {a->valid_rows, 8, "valid_rows"}};
    st = kdl_check_alignment(arrays, sizeof arrays / sizeof arrays[0]);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (!kdl_ext_span_ok(a->rows, a->hidden, a->ld_hidden, kdl_dtype_size(a->hidden_dtype)) ||
        !kdl_ext_span_ok(a->vocab, a->hidden, a->ld_weight, kdl_dtype_size(a->weight_dtype)) ||
        !kdl_ext_span_ok(a->rows, a->vocab, a->ld_teacher, kdl_dtype_size(a->teacher_dtype)) ||
        (a->grad_hidden && !kdl_ext_span_ok(a->rows, a->hidden, a->ld_grad_hidden, gsz)) ||
        (a->grad_weight && !kdl_ext_span_ok(a->vocab, a->hidden, a->ld_grad_weight, gsz)) ||
        !kdl_ext_span_ok(a->rows, a->vocab, a->vocab, sizeof(double)) || (uint64_t)a->rows > (uint64_t)SIZE_MAX / 8)
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "sizes overflow");
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_ref_fused_linear_loss(const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a)
{
    kdl_status_t st = kdl_fused_linear_validate(d, a, 1);
    if (st != KDL_STATUS_SUCCESS) return st;
    const int64_t N = a->rows, V = a->vocab, D = a->hidden;
    size_t nl = (size_t)(N > 0 ? N : 1) * (size_t)V;
    double *L = (double *)malloc(nl * sizeof(double));
    double *dL = (double *)malloc(nl * sizeof(double));
    double *h = (double *)malloc((size_t)D * sizeof(double));
    if (!L || !dL || !h) {
        free(L);
        free(dL);
        free(h);
        return kdl_fail(KDL_STATUS_ALLOC_FAILED, "reference logits [%lld, %lld]", (long long)N, (long long)V);
    }
    for (int64_t i = 0; i < N; i++) {
        for (int64_t k = 0; k < D; k++) h[k] = kdl_load_as_double(a->hidden_states, a->hidden_dtype, i * a->ld_hidden + k);
        for (int64_t v = 0; v < V; v++) {
            double s = 0;
            for (int64_t k = 0; k < D; k++) s += h[k] * kdl_load_as_double(a->weight, a->weight_dtype, v * a->ld_weight + k);
            L[i * V + v] = s;
        }
    }
    kdl_loss_args_t la;
    kdl_loss_args_init(&la);
    la.rows = N;
    la.vocab = V;
    la.student = L;
    la.ld_student = V;
    la.student_dtype = KDL_DTYPE_F64;
    la.teacher = a->teacher;
    la.ld_teacher = a->ld_teacher;
    la.teacher_dtype = a->teacher_dtype;
    la.labels = a->labels;
    la.grad = dL;
    la.ld_grad = V;
    la.grad_dtype = KDL_DTYPE_F64;
    la.out_dtype = a->out_dtype;
    la.loss = a->loss;
    la.info = a->info;
    la.valid_rows = a->valid_rows;
    st = kdl_ref_loss_forward_backward(d, &la);
    if (st == KDL_STATUS_SUCCESS && a->grad_hidden)
        for (int64_t i = 0; i < N; i++)
            for (int64_t k = 0; k < D; k++) {
                double s = 0;
                for (int64_t v = 0; v < V; v++)
                    s += dL[i * V + v] * kdl_load_as_double(a->weight, a->weight_dtype, v * a->ld_weight + k);
                kdl_store_from_double(a->grad_hidden, a->grad_dtype, i * a->ld_grad_hidden + k, s);
            }
    if (st == KDL_STATUS_SUCCESS && a->grad_weight)
        for (int64_t v = 0; v < V; v++)
            for (int64_t k = 0; k < D; k++) {
                double s = 0;
                for (int64_t i = 0; i < N; i++)
                    s += dL[i * V + v] * kdl_load_as_double(a->hidden_states, a->hidden_dtype, i * a->ld_hidden + k);
                kdl_store_from_double(a->grad_weight, a->grad_dtype, v * a->ld_grad_weight + k, s);
            }
    free(L);
    free(dL);
    free(h);
    return st;
}
