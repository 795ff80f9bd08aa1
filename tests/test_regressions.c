/*
 * tests/test_regressions.c - every input a fuzzer or a sanitizer run found,
 * kept as a test (docs/hardening.md, "Findings", names them F1, F2, ...).
 *
 * Each finding has two tests: the exact bytes the fuzzer saved, fed to the
 * same oracle (the fuzz target's LLVMFuzzerTestOneInput, compiled in here
 * under another name: it abort()s on a violation, which Criterion reports as
 * a crash), and a plain API-level test of the behaviour that was wrong.
 * Findings that are reported but not fixed yet are skipped visibly, with
 * the expected behaviour written down, so they turn into checks by deleting
 * the skip line.
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kdl_test.h"
#include "kdloss/kdloss_ref.h"

/* The ref-loss fuzz target's oracle, as a function. */
#define LLVMFuzzerTestOneInput kdl_fuzz_ref_loss_one
#include "fuzz/fuzz_ref_loss.c"
#undef LLVMFuzzerTestOneInput
#undef CHECK

static void fuzz_ref_loss_bytes(const uint8_t *bytes, size_t n)
{
    setenv("KDL_FUZZ_STRICT", "1", 1); /* no known-issue gate: the full oracle */
    kdl_fuzz_ref_loss_one(bytes, n);
}

/* One row of f64 logits through the reference; grad and per-row loss out. */
static kdl_status_t run_row(kdl_divergence_t div, double tau, double alpha, double scale, const double *s,
                            const double *t, int64_t V, double *loss, double *grad)
{
    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = div;
    d.temperature = tau;
    d.alpha = alpha;
    d.scale = scale;
    d.reduction = KDL_REDUCTION_NONE;
    kdl_loss_args_t a;
    kdl_loss_args_init(&a);
    a.rows = 1;
    a.vocab = V;
    a.student = s;
    a.teacher = t;
    a.ld_student = a.ld_teacher = a.ld_grad = V;
    a.student_dtype = a.teacher_dtype = a.grad_dtype = a.out_dtype = KDL_DTYPE_F64;
    a.loss = loss;
    a.grad = grad;
    return kdl_ref_loss_forward_backward(&d, &a);
}

/* ---------------------------------------------------------------------------
 * F4 (fixed): SRKL gradient NaN when alpha is 0 or tiny.  The element maths
 * computed a q/m as alpha * exp(lq - lm); q/m reaches 1/alpha (unbounded at
 * alpha = 0) where the teacher's probability underflows, exp overflowed, and
 * 0 * inf or -inf - (-inf) gave NaN gradient entries with a finite loss.
 * Fix: exp(log alpha + lq - lm) (<= 1), include/kdloss/detail/elem_impl.inc.
 * Found by fuzz_ref_loss: srkl none, alpha 4.94e-324, bf16 student, f64
 * teacher with a -1.9e304 logit. */
static const uint8_t f4_bytes[] = {
    0x07, 0x00, 0xf2, 0x03, 0x00, 0x00, 0x13, 0x0d, 0xe8, 0x03, 0x00, 0x00, 0x0d, 0x0d, 0x0d, 0x0d,
    0x0d, 0x0d, 0x0d, 0x41, 0x00, 0x00, 0x37, 0x13, 0xff, 0x00, 0xb2, 0xb2, 0xb2, 0xb2, 0xc8, 0x1c,
    0x0d, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x14, 0x1c, 0xff, 0x1c, 0x1c};

Test(regressions, f4_srkl_tiny_alpha_fuzz_bytes) { fuzz_ref_loss_bytes(f4_bytes, sizeof f4_bytes); }

Test(regressions, f4_srkl_alpha_zero_is_rkl_with_a_finite_gradient)
{
    /* The teacher puts (numerically) no mass on token 0: p_0 = exp(-1000) = 0
     * in double, while the student does.  SRKL at alpha 0 is RKL; both have
     * an infinite loss here, so compare on a case with p_0 tiny but the loss
     * finite: lp_0 = -800 (exp underflows only in q/m). */
    const double s[4] = {3.0, 0.0, 0.5, -1.0};
    const double t[4] = {-800.0, 1.0, 0.0, 2.0};
    double ls, lr, gs[4], gr[4];
    cr_assert_eq(run_row(KDL_DIV_SRKL, 1.0, 0.0, 1.0, s, t, 4, &ls, gs), KDL_STATUS_SUCCESS);
    cr_assert_eq(run_row(KDL_DIV_RKL, 1.0, 0.1, 1.0, s, t, 4, &lr, gr), KDL_STATUS_SUCCESS);
    cr_expect(isfinite(ls), "srkl alpha 0 loss %g", ls);
    cr_expect(fabs(ls - lr) <= 1e-12 * fabs(lr), "srkl(alpha 0) %.17g != rkl %.17g", ls, lr);
    for (int v = 0; v < 4; v++) {
        cr_expect(isfinite(gs[v]), "grad[%d] = %g", v, gs[v]);
        cr_expect(fabs(gs[v] - gr[v]) <= 1e-9 * (1 + fabs(gr[v])), "grad[%d] srkl %.17g rkl %.17g", v, gs[v], gr[v]);
    }
    /* alpha = 1e-320 (subnormal): same numbers to rounding */
    cr_assert_eq(run_row(KDL_DIV_SRKL, 1.0, 1e-320, 1.0, s, t, 4, &ls, gs), KDL_STATUS_SUCCESS);
    for (int v = 0; v < 4; v++) cr_expect(isfinite(gs[v]), "alpha 1e-320: grad[%d] = %g", v, gs[v]);
}

/* ---------------------------------------------------------------------------
 * F1 (fixed): tiny temperature.  Every logit finite, tau > 0 and
 * finite (accepted), but x/tau overflows to +-inf, the log-softmax computes
 * inf - inf, and the loss of a valid row is NaN with KDL_STATUS_SUCCESS.
 * Expected: the tau -> 0 limit, computed as (x - max x)/tau (never
 * overflows: the row's maximum maps to 0, every other logit to a finite
 * value or -inf), so the softmax becomes the arg-max indicator; or a
 * documented rejection.  Found by fuzz_ref_loss: fkl mean, tau 4.94e-324. */
static const uint8_t f1_bytes[] = {0x3c, 0x02, 0x0a, 0xc4, 0xc4, 0x00, 0x01, 0x08, 0x5d, 0x02, 0x0a,
                                   0x3c, 0x0a, 0x3c, 0x3c, 0x15, 0xff, 0xff, 0x7a, 0x5d, 0x02, 0x3c,
                                   0x0a, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};

Test(regressions, f1_tiny_temperature_fuzz_bytes)
{
    fuzz_ref_loss_bytes(f1_bytes, sizeof f1_bytes);
}

Test(regressions, f1_tiny_temperature_has_a_limit)
{
    const double s[3] = {2.0, 1.0, -3.0}, t[3] = {0.5, 4.0, 0.0};
    double loss, grad[3];
    cr_assert_eq(run_row(KDL_DIV_FKL, 1e-310, 0.1, 1.0, s, t, 3, &loss, grad), KDL_STATUS_SUCCESS);
    /* student one-hot on token 0, teacher on token 1: KL(p||q) = +inf */
    cr_expect(loss == INFINITY, "fkl at tau 1e-310: %g", loss);
    cr_assert_eq(run_row(KDL_DIV_TVD, 1e-310, 0.1, 1.0, s, t, 3, &loss, grad), KDL_STATUS_SUCCESS);
    cr_expect(loss == 1.0, "tvd at tau 1e-310: %g", loss);
    for (int v = 0; v < 3; v++) cr_expect(!isnan(grad[v]), "grad[%d] NaN", v);
}

/* ---------------------------------------------------------------------------
 * F2 (fixed): scale 0 times an infinite loss.  scale = 0 is
 * accepted (finite); a row with loss +inf (legal: README "Infinite losses")
 * then reports 0 * inf = NaN with KDL_STATUS_SUCCESS, in the per-row loss
 * and in SUM/MEAN.  Expected (proposed): scale 0 gives loss 0 and a zero
 * gradient (the term is switched off), as the 0 log 0 = 0 convention. */
Test(regressions, f2_scale_zero_times_infinite_loss)
{
    const double s[3] = {0.0, 1.0, -INFINITY}, t[3] = {0.0, 1.0, 2.0}; /* FKL: teacher mass where q = 0 */
    double loss, grad[3];
    cr_assert_eq(run_row(KDL_DIV_FKL, 1.0, 0.1, 0.0, s, t, 3, &loss, grad), KDL_STATUS_SUCCESS);
    cr_expect(loss == 0.0, "scale 0: loss %g", loss);
    for (int v = 0; v < 3; v++) cr_expect(grad[v] == 0.0, "scale 0: grad[%d] = %g", v, grad[v]);
}

/* ---------------------------------------------------------------------------
 * F3 (fixed): scale/tau overflows.  The gradient factor scale/tau
 * is computed first; with scale 1e300 and tau 1e-10 it is +inf, and every
 * gradient entry that is exactly 0 (a token with q = 0) becomes inf * 0 =
 * NaN while the loss is finite.  Expected: 0 stays 0 (multiply dz by scale,
 * then divide by tau, or test dz == 0). */
Test(regressions, f3_gradient_factor_overflow)
{
    const double s[3] = {0.0, 1.0, -INFINITY}, t[3] = {0.0, 1.0, -INFINITY};
    double loss, grad[3];
    cr_assert_eq(run_row(KDL_DIV_FKL, 1e-10, 0.1, 1e300, s, t, 3, &loss, grad), KDL_STATUS_SUCCESS);
    cr_expect(!isnan(loss));
    cr_expect(grad[2] == 0.0, "q = 0 token: grad %g", grad[2]);
    for (int v = 0; v < 3; v++) cr_expect(!isnan(grad[v]), "grad[%d] NaN", v);
}
