/*
 * kdloss/detail/elem.h - the divergence maths, written once.
 *
 * Element functions of every divergence, shared by the float64 CPU reference
 * (C11) and the CUDA kernels (__host__ __device__).  Each is instantiated
 * twice from elem_impl.inc: suffix _d (double, the reference) and _f (float,
 * the kernels).  Adding a divergence means adding it here (and to the enum).
 *
 * Inputs are log-probabilities lp = log p_v (teacher) and lq = log q_v
 * (student), computed as logit/tau minus the row's LSE, never log(softmax).
 * -inf means probability 0.  Conventions: 0 log 0 = 0; a term whose weighting
 * probability is > 0 while the other is 0 is +inf, never NaN.
 *
 * Gradient: with g_v = dl/dq_v, every divergence has
 *     dl/dz_j = q_j (g_j - sum_v q_v g_v),  z = s/tau,  dl/ds_j = dl/dz_j / tau.
 * The element function returns qg = q_j g_j (finite wherever q_j = 0, which
 * g_j alone is not for FKL) and the row computes G = sum_v qg_v, then
 * dz_j = qg_j - q_j G (kdl_elem_dz_*).
 */
#ifndef KDLOSS_DETAIL_ELEM_H
#define KDLOSS_DETAIL_ELEM_H

#include <math.h>

#if defined(__CUDACC__)
#define KDL_HD __host__ __device__
#else
#define KDL_HD
#endif

#ifdef __cplusplus
extern "C++" {
#endif

/* Divergence ids as in kdl_divergence_t (kept as plain ints here so this
 * header needs nothing else). */
enum {
    KDL_ELEM_FKL = 0,
    KDL_ELEM_RKL = 1,
    KDL_ELEM_FKL_RKL = 2,
    KDL_ELEM_AKL = 3,
    KDL_ELEM_JSD = 4,
    KDL_ELEM_TVD = 5,
    KDL_ELEM_SKL = 6,
    KDL_ELEM_SRKL = 7
};

#define KDL_REAL double
#define KDL_SFX(name) name##_d
#define KDL_EXP exp
#define KDL_LOG log
#define KDL_LOG1P log1p
#define KDL_FABS fabs
#define KDL_INF ((double)INFINITY)
#include "kdloss/detail/elem_impl.inc"
#undef KDL_REAL
#undef KDL_SFX
#undef KDL_EXP
#undef KDL_LOG
#undef KDL_LOG1P
#undef KDL_FABS
#undef KDL_INF

#define KDL_REAL float
#define KDL_SFX(name) name##_f
#define KDL_EXP expf
#define KDL_LOG logf
#define KDL_LOG1P log1pf
#define KDL_FABS fabsf
#define KDL_INF ((float)INFINITY)
#include "kdloss/detail/elem_impl.inc"
#undef KDL_REAL
#undef KDL_SFX
#undef KDL_EXP
#undef KDL_LOG
#undef KDL_LOG1P
#undef KDL_FABS
#undef KDL_INF

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_DETAIL_ELEM_H */
