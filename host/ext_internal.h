/*
 * host/ext_internal.h - helpers shared by the extension files (sparse
 * teacher, vocabulary-parallel, fused linear): the descriptor check and the
 * AKL teacher-order key, the latter __host__ __device__ so the reference
 * and the kernels order tokens by the very same bits.  Not installed.
 */
#ifndef KDLOSS_HOST_EXT_INTERNAL_H
#define KDLOSS_HOST_EXT_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "kdloss/detail/elem.h"
#include "kdloss/kdloss_ext.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Row classes, as in the dense reference. */
enum { KDL_EXT_ROW_VALID = 0, KDL_EXT_ROW_IGNORED = 1, KDL_EXT_ROW_INVALID = 2 };

#ifndef __CUDACC__
/* Checks the descriptor (struct size, enums, temperature, scale, alpha,
 * beta, mu, top_k in [1, vocab]) and out_dtype exactly as kdl_loss_validate
 * does, by running it on an empty dense problem of this vocabulary.
 * Clears the last error first. */
kdl_status_t kdl_ext_validate_desc(const kdl_loss_desc_t *desc, int64_t vocab, kdl_dtype_t out_dtype);

/* 1 when (rows - 1) * ld + cols elements of elem bytes fit int64 and size_t. */
int kdl_ext_span_ok(int64_t rows, int64_t cols, int64_t ld, size_t elem);
#endif

/* Teacher-order key of a logit of the given byte width (2, 4 or 8) from its
 * raw bits: larger logit -> smaller key, so ascending (key, index) is the
 * AKL teacher order (probability descending, ties by lower index).  -0 is
 * keyed as +0 (they are equal logits).  Width 8 bits in, 64-bit key out;
 * narrower widths use the low 16 or 32 bits of both. */
static inline KDL_HD uint64_t kdl_ext_order_key(uint64_t bits, int width_bytes)
{
    int nb = 8 * width_bytes;
    uint64_t sign = (uint64_t)1 << (nb - 1);
    uint64_t mask = nb == 64 ? ~(uint64_t)0 : (((uint64_t)1 << nb) - 1);
    bits &= mask;
    if (bits == sign) bits = 0; /* -0 -> +0 */
    uint64_t asc = (bits & sign) ? (~bits & mask) : (bits | sign); /* ascending with value */
    return ~asc & mask;
}

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_HOST_EXT_INTERNAL_H */
