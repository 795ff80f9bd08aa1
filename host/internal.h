/*
 * host/internal.h - helpers shared inside the library (not installed):
 * the last-error detail, exact 16-bit float conversions, typed element
 * access for the reference and the CLI.
 */
#ifndef KDLOSS_HOST_INTERNAL_H
#define KDLOSS_HOST_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kdloss/kdloss_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Records a printf-style detail for kdl_get_last_error() and returns status. */
kdl_status_t kdl_fail(kdl_status_t status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void kdl_clear_error(void);

/* The common head of every validator: desc and args non-NULL and their
 * struct_size (the first member of every kdloss struct) as this build's.
 * NULL_POINTER or BAD_STRUCT_SIZE with the detail set, else SUCCESS. */
kdl_status_t kdl_check_struct_pair(const void *desc, size_t desc_size, const void *args, size_t args_size);
#define KDL_CHECK_STRUCT_PAIR(d, a)                                                           \
    do {                                                                                      \
        kdl_status_t kdl_sp_ = kdl_check_struct_pair((d), sizeof *(d), (a), sizeof *(a));    \
        if (kdl_sp_ != KDL_STATUS_SUCCESS) return kdl_sp_;                                    \
    } while (0)

/* One array an entry point was given: base pointer, element size in bytes
 * (the alignment the kernels and the reference's typed accesses assume),
 * name for the detail. */
typedef struct kdl_array_ref {
    const void *p;
    size_t elem;
    const char *name;
} kdl_array_ref_t;

/* The alignment check of every validator: KDL_STATUS_MISALIGNED (detail
 * names the first array) when a non-NULL base is not a multiple of its
 * element size; NULL bases and elements of 0 or 1 byte pass. */
kdl_status_t kdl_check_alignment(const kdl_array_ref_t *arrays, size_t count);

/* Layout of a [rows, vocab] student/teacher logit pair with an optional
 * gradient, shared by every entry point that reads such logits (the loss,
 * SinKD): one check of dtypes, sizes, strides and byte spans. */
typedef struct kdl_logit_layout {
    int64_t rows, vocab;
    kdl_dtype_t student_dtype, teacher_dtype, out_dtype;
    int64_t ld_student, ld_teacher;
    const void *grad; /* NULL: no gradient, grad_dtype and ld_grad unused */
    kdl_dtype_t grad_dtype;
    int64_t ld_grad;
} kdl_logit_layout_t;

/* Dtypes (BAD_ENUM / NOT_SUPPORTED: out f32 or f64, f64 logits only when
 * allow_f64, gradient in the student's dtype or f32), sizes (BAD_SIZE),
 * strides (BAD_STRIDE).  Sets the last-error detail. */
kdl_status_t kdl_check_logit_layout(const kdl_logit_layout_t *l, int allow_f64);
/* 1 when every [rows, ld] span fits in int64 elements and size_t bytes. */
int kdl_logit_spans_ok(const kdl_logit_layout_t *l);
/* 1 when (rows - 1) * ld + vocab elements of elem bytes fit in size_t. */
int kdl_span_ok(int64_t rows, int64_t vocab, int64_t ld, size_t elem);
/* 1 for a known dtype, F64 only when allow_f64. */
static inline int kdl_dtype_allowed(kdl_dtype_t t, int allow_f64)
{
    return (unsigned)t <= KDL_DTYPE_F64 && (allow_f64 || t != KDL_DTYPE_F64);
}

/* IEEE binary16 -> float, exact (subnormals, inf, NaN included). */
static inline float kdl_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400u));
            man &= 0x3ffu;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp - 15 + 127) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* bfloat16 -> float, exact. */
static inline float kdl_bf16_to_float(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* float -> bfloat16, round to nearest even; NaN stays NaN. */
static inline uint16_t kdl_float_to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* float -> binary16, round to nearest even, overflow to inf. */
static inline uint16_t kdl_float_to_half(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520: inf */
    if (ax < 0x38800000u) { /* below 2^-14: subnormal or zero */
        if (ax < 0x33000000u) return sign; /* < 2^-25 rounds to 0 */
        uint32_t e = ax >> 23;
        uint32_t man = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t half_man = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1u);
        uint32_t halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (half_man & 1u))) half_man++;
        return (uint16_t)(sign | half_man);
    }
    uint32_t r = ax - 0x38000000u; /* rebias exponent 127 -> 15 */
    uint32_t h = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

/* Element i of a typed array, as double (exact for every dtype). */
static inline double kdl_load_as_double(const void *base, kdl_dtype_t t, int64_t i)
{
    switch (t) {
    case KDL_DTYPE_F32: return (double)((const float *)base)[i];
    case KDL_DTYPE_F16: return (double)kdl_half_to_float(((const uint16_t *)base)[i]);
    case KDL_DTYPE_BF16: return (double)kdl_bf16_to_float(((const uint16_t *)base)[i]);
    case KDL_DTYPE_F64: return ((const double *)base)[i];
    }
    return NAN;
}

/* Stores v into element i of a typed array, rounding to nearest (16-bit
 * types go through float). */
static inline void kdl_store_from_double(void *base, kdl_dtype_t t, int64_t i, double v)
{
    switch (t) {
    case KDL_DTYPE_F32: ((float *)base)[i] = (float)v; break;
    case KDL_DTYPE_F16: ((uint16_t *)base)[i] = kdl_float_to_half((float)v); break;
    case KDL_DTYPE_BF16: ((uint16_t *)base)[i] = kdl_float_to_bf16((float)v); break;
    case KDL_DTYPE_F64: ((double *)base)[i] = v; break;
    }
}

/* scale * x for a loss output: scale = 0 gives 0 even for an infinite x
 * (the term is switched off); NaN, the mark of an invalid row, stays NaN. */
static inline double kdl_scaled_loss(double scale, double x)
{
    return (scale == 0 && !isnan(x)) ? 0.0 : scale * x;
}

/* Gradient entry (gscale * dz) / tau, gscale = scale (or scale / valid rows):
 * multiplied before dividing so that an exact zero stays zero for any tau,
 * and gscale = 0 gives 0 whatever dz is. */
static inline double kdl_scaled_grad(double gscale, double dz, double tau)
{
    return gscale == 0 ? 0.0 : (gscale * dz) / tau;
}

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_HOST_INTERNAL_H */
