/*
 * tests/support/kdl_test.h - shared test helpers: the one comparator
 * (atol + rtol*|ref|, NaN/Inf aware, reports the count and the first
 * mismatching indices), a seeded generator of adversarial logits, uniform
 * values and log-weights, central finite differences, the bad-argument case
 * (status, nothing written), and the visible GPU skip.
 */
#ifndef KDL_TEST_H
#define KDL_TEST_H

#include <stddef.h>
#include <stdint.h>

#include "kdloss/kdloss_ot.h"
#include "kdloss/kdloss_types.h"

/* Tolerances per input dtype (relative, absolute). */
typedef struct kdl_tol {
    double rtol, atol;
} kdl_tol_t;
kdl_tol_t kdl_tol_for(kdl_dtype_t input_dtype);

/* Compares got[i] to ref[i] for i < n: |got - ref| <= atol + rtol*|ref|,
 * NaN matches NaN only, +inf matches +inf only.  Returns the number of
 * mismatches; on mismatch writes a readable report (count, first indices,
 * values) into msg (may be NULL). */
size_t kdl_compare(const char *what, const double *got, const double *ref, size_t n, kdl_tol_t tol,
                   char *msg, size_t msg_len);

/* Criterion assertion over kdl_compare. */
#define KDL_EXPECT_CLOSE(what, got, ref, n, tol)                                            \
    do {                                                                                    \
        char kdl_msg_[1024];                                                                \
        size_t kdl_bad_ = kdl_compare((what), (got), (ref), (n), (tol), kdl_msg_, sizeof kdl_msg_); \
        cr_expect(kdl_bad_ == 0, "%s", kdl_msg_);                                           \
    } while (0)

/* One bad-argument case: a fresh T set up by setup(&c_), changed by the
 * statement(s) `mutate` (which see `T *c`); then call(&c_) must give the
 * status `expected`, and untouched(&c_) (nothing written) must hold. */
#define KDL_EXPECT_BAD(T, setup, call, untouched, what, expected, mutate)                                 \
    do {                                                                                                 \
        T c_;                                                                                            \
        setup(&c_);                                                                                      \
        {                                                                                                \
            T *c = &c_;                                                                                  \
            mutate;                                                                                      \
        }                                                                                                \
        kdl_status_t st_ = call(&c_);                                                                    \
        cr_expect_eq(st_, (expected), "%s: got %s (%s), expected %s", (what), kdl_status_string(st_),    \
                     kdl_get_last_error(), kdl_status_string(expected));                                \
        cr_expect(untouched(&c_), "%s: an output was written", (what));                                  \
    } while (0)

/* Central differences: fd[k] = (value(ctx, x + h e_k) - value(ctx, x - h e_k)) / 2h
 * for k < n, x[k] restored after each. */
typedef double (*kdl_fd_value_t)(void *ctx, const double *x);
void kdl_central_diff(kdl_fd_value_t value, void *ctx, double *x, int64_t n, double h, double *fd);

/* Every divergence, in enum order, and their count. */
extern const kdl_divergence_t kdl_all_divs[KDL_DIV_COUNT_];
#define KDL_NDIVS ((size_t)KDL_DIV_COUNT_)

/* A descriptor with the defaults of kdl_loss_desc_init and the given
 * divergence and reduction. */
kdl_loss_desc_t kdl_test_desc(kdl_divergence_t div, kdl_reduction_t red);

/* Sinkhorn arguments for a batch of n x m problems in float64, no array
 * given yet. */
kdl_sinkhorn_args_t kdl_test_ot_args(int64_t batch, int64_t n, int64_t m);

/* Loss arguments over [N, V] student and teacher logits (dtypes sdt, tdt)
 * and a gradient (gdt, also the loss's out_dtype), all rows ld apart; the
 * loss array given, no other output. */
kdl_loss_args_t kdl_test_loss_args(int64_t N, int64_t V, int64_t ld, const void *S, kdl_dtype_t sdt, const void *T,
                                   kdl_dtype_t tdt, void *grad, kdl_dtype_t gdt, void *loss);

/* SinKD arguments over [N, V] student and teacher logits (dtypes sdt, tdt)
 * and a gradient (gdt), all rows ld apart; no other output given yet. */
kdl_sinkd_args_t kdl_test_sinkd_args(int64_t N, int64_t V, int64_t ld, const void *S, kdl_dtype_t sdt, const void *T,
                                     kdl_dtype_t tdt, void *grad, kdl_dtype_t gdt);

/* Deterministic generator (splitmix64). */
typedef struct kdl_rng {
    uint64_t s;
} kdl_rng_t;
uint64_t kdl_rng_next(kdl_rng_t *r);
double kdl_rng_uniform(kdl_rng_t *r); /* [0,1) */
double kdl_rng_normal(kdl_rng_t *r);

/* Fills n logits: normal(0, sigma) plus a few large outliers so the
 * softmax is peaked, as real LM logits are. */
void kdl_fill_logits(kdl_rng_t *r, double *x, int64_t n, double sigma);

/* kdl_fill_logits from a fresh generator seeded with seed: the same rows
 * for the same seed, in any test. */
void kdl_random_rows(uint64_t seed, double *x, int64_t n, double sigma);

/* n values uniform in [lo, hi). */
void kdl_fill_uniform(kdl_rng_t *r, double *x, int64_t n, double lo, double hi);

/* n random normalised log-weights: log(w_i / sum w), w_i uniform in
 * [0.5, 1.5). */
void kdl_fill_logw(kdl_rng_t *r, double *lw, int64_t n);

/* Converts doubles to a typed buffer (rounding to the dtype) and back, so a
 * test can hand the reference exactly what a 16-bit tensor holds. */
void kdl_to_dtype(const double *src, void *dst, kdl_dtype_t t, int64_t n);
void kdl_from_dtype(const void *src, double *dst, kdl_dtype_t t, int64_t n);

/* 1 when a CUDA device is present.  Without one, a GPU test calls
 * KDL_SKIP_WITHOUT_GPU() first: it prints a visible skip and cr_skip_test()s. */
int kdl_test_have_gpu(void);
#define KDL_SKIP_WITHOUT_GPU()                                                               \
    do {                                                                                     \
        if (!kdl_test_have_gpu()) cr_skip_test("no CUDA device present: GPU test skipped");  \
    } while (0)

#endif
