/*
 * host/ext_common.c - pieces shared by the extension references and GPU
 * wrappers (kdloss_ext.h): the descriptor check, the span check, the fused
 * linear workspace layout, the names of the sparse modes.
 */
#include <stdint.h>

#include "ext_internal.h"
#include "internal.h"

kdl_status_t kdl_ext_validate_desc(const kdl_loss_desc_t *desc, int64_t vocab, kdl_dtype_t out_dtype)
{
    /* An empty dense problem of this vocabulary: kdl_loss_validate then
     * checks exactly the descriptor and the output dtype. */
    double dummy = 0;
    kdl_loss_args_t a;
    kdl_loss_args_init(&a);
    a.rows = 0;
    a.vocab = vocab < 1 ? 1 : vocab;
    a.ld_student = a.ld_teacher = a.vocab;
    a.out_dtype = out_dtype;
    a.loss = &dummy;
    return kdl_loss_validate(desc, &a, 1);
}

kdl_status_t kdl_ext_check_dtypes(kdl_dtype_t student, kdl_dtype_t teacher, int has_grad,
                                  kdl_dtype_t grad, int allow_f64)
{
    if ((unsigned)student > KDL_DTYPE_F64 || (unsigned)teacher > KDL_DTYPE_F64 ||
        (has_grad && (unsigned)grad > KDL_DTYPE_F64))
        return kdl_fail(KDL_STATUS_BAD_ENUM, "unknown dtype");
    if (!kdl_dtype_allowed(student, allow_f64) || !kdl_dtype_allowed(teacher, allow_f64) ||
        (has_grad && !kdl_dtype_allowed(grad, allow_f64)))
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "f64 data is supported by the reference only");
    if (has_grad && grad != student && grad != KDL_DTYPE_F32 && grad != KDL_DTYPE_F64)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "grad_dtype must be the student's dtype or f32");
    return KDL_STATUS_SUCCESS;
}

int kdl_ext_span_ok(int64_t rows, int64_t cols, int64_t ld, size_t elem)
{
    if (rows <= 0) return 1;
    if (ld > 0 && rows - 1 > (INT64_MAX - cols) / ld) return 0;
    int64_t n = (rows - 1) * ld + cols;
    return (uint64_t)n <= (uint64_t)SIZE_MAX / elem;
}

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

size_t kdl_ext_dense_ws_bytes(int64_t rows)
{
    if (rows <= 0) return 0;
    return 256 + align256((size_t)rows * sizeof(float));
}

size_t kdl_ext_sparse_rows_ws_bytes(int64_t rows)
{
    size_t n = rows > 0 ? (size_t)rows : 1;
    return align256(n * sizeof(double)) + align256(n) + 256;
}

int kdl_ext_fused_teacher(const kdl_fused_linear_args_t *a)
{
    if (kdl_fused_linear_sparse(a)) return KDL_EXT_FUSED_TEACHER_SPARSE;
    return a->teacher_hidden ? KDL_EXT_FUSED_TEACHER_LINEAR : KDL_EXT_FUSED_TEACHER_LOGITS;
}

kdl_ext_fused_layout_t kdl_ext_fused_layout(int64_t chunk, int64_t vocab, int sixteen, int grad_bias,
                                            int teacher)
{
    kdl_ext_fused_layout_t L;
    memset(&L, 0, sizeof L);
    if (chunk <= 0 || vocab <= 0) {
        L.total = 256;
        return L;
    }
    /* c * V * 10 + V * 8 + c * 4 + 2048 (sparse teacher: c * V * 6 + c * 9 + ...)
     * must fit size_t: c * V <= SIZE_MAX / 16 */
    if ((uint64_t)chunk > (SIZE_MAX / 16 - 4096) / (uint64_t)vocab || (uint64_t)vocab > SIZE_MAX / 64) return L;
    size_t cv = (size_t)chunk * (size_t)vocab, off = 0;
    L.logits = off;
    off += align256(cv * 4);
    L.teacher = off;
    if (teacher == KDL_EXT_FUSED_TEACHER_LINEAR) off += align256(cv * 4);
    L.dl16 = off;
    if (sixteen) off += align256(cv * 2);
    L.dense = off;
    off += teacher == KDL_EXT_FUSED_TEACHER_SPARSE ? kdl_ext_sparse_rows_ws_bytes(chunk)
                                                   : kdl_ext_dense_ws_bytes(chunk);
    L.bias = off;
    if (grad_bias) off += align256((size_t)vocab * sizeof(double));
    L.acc = off;
    L.total = off + 256;
    return L;
}

size_t kdl_ext_fused_workspace_bytes(const kdl_fused_linear_args_t *a)
{
    int sixteen = a->hidden_dtype == KDL_DTYPE_F16 || a->hidden_dtype == KDL_DTYPE_BF16;
    return kdl_ext_fused_layout(kdl_fused_linear_chunk_rows(a), a->vocab, sixteen, a->grad_bias != NULL,
                                kdl_ext_fused_teacher(a))
        .total;
}

static const char *const mode_names[KDL_SPARSE_MODE_COUNT_] = {"renormalised", "tail"};

const char *kdl_sparse_mode_name(kdl_sparse_mode_t m)
{
    return (unsigned)m < KDL_SPARSE_MODE_COUNT_ ? mode_names[m] : "unknown";
}

int kdl_sparse_mode_from_name(const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < KDL_SPARSE_MODE_COUNT_; i++)
        if (strcmp(mode_names[i], name) == 0) return i;
    return -1;
}
