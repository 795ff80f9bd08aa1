/*
 * host/ext_common.c - pieces shared by the extension references and GPU
 * wrappers (kdloss_ext.h): the descriptor check, the span check, the names of
 * the sparse modes.
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

int kdl_ext_span_ok(int64_t rows, int64_t cols, int64_t ld, size_t elem)
{
    if (rows <= 0) return 1;
    if (ld > 0 && rows - 1 > (INT64_MAX - cols) / ld) return 0;
    int64_t n = (rows - 1) * ld + cols;
    return (uint64_t)n <= (uint64_t)SIZE_MAX / elem;
}

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

size_t kdl_ext_fused_workspace_bytes(int64_t chunk, int64_t vocab)
{
    if (chunk <= 0 || vocab <= 0) return 256;
    if ((uint64_t)chunk > (SIZE_MAX / 8 - 1024) / (uint64_t)vocab) return 0;
    return align256((size_t)chunk * (size_t)vocab * 4) + align256((size_t)chunk * (sizeof(double) + 1)) + 256;
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
