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
    kdl_loss_args_t a = kdl_test_loss_args(1, V, V, s, KDL_DTYPE_F64, t, KDL_DTYPE_F64, grad, KDL_DTYPE_F64, loss);
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

/* ===========================================================================
 * Findings in the command (fuzz_cli_args).  The command's sources are not in
 * the library this suite links, so these replay the fuzzer's argument
 * vector through the built `kdloss` (KDL_CLI_PATH) on fixtures like the
 * fuzz target's, and check the same contract: exit 2, one line on stderr
 * starting "kdloss <sub>: ", nothing on stdout, no output file.  Under the
 * sanitizer build (scripts/test.sh) the command is built with ASan + UBSan
 * and aborts on a report, which shows here as a wrong exit status. */
#include <sys/stat.h>
#include <unistd.h>

#include "kdl_cli_run.h"
#include "npy.h"

static void reg_path(char *buf, size_t len, const char *name) { kdl_tmp_path(buf, len, "regr", name); }

static int reg_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

static void reg_save_f32(const char *path, int64_t d0, int64_t d1, const float *data)
{
    const int64_t shape[2] = {d0, d1};
    char msg[256];
    cr_assert_eq(kdl_npy_save(path, KDL_NPY_F32, 2, shape, data, msg, sizeof msg), KDL_NPY_OK, "%s", msg);
}

static void reg_expect_usage_error(const kdl_cli_result_t *r, const char *cmd)
{
    char pfx[64];
    snprintf(pfx, sizeof pfx, "kdloss %s: ", cmd);
    cr_expect_eq(r->code, 2, "exit %d, stderr: %s", r->code, r->err);
    cr_expect_str_empty(r->out, "stdout must be empty on error: %s", r->out);
    cr_expect(strncmp(r->err, pfx, strlen(pfx)) == 0, "stderr: %s", r->err);
    const char *nl = strchr(r->err, '\n');
    cr_expect(nl && nl[1] == '\0', "one line on stderr: %s", r->err);
}

/* The fuzz target's fused-linear fixtures: hidden [2,3], weight [5,3],
 * teacher [2,5]. */
static void fused_fixtures(char *hp, char *wp, char *tp, size_t len)
{
    const float hs[6] = {1, -0.5f, 0.25f, 0, 2, -1};
    const float wt[15] = {0.1f, 0.2f, 0.3f, -0.1f, 0, 0.5f, 1, 1, 1, -1, 0.5f, 0, 0.3f, -0.2f, 0.1f};
    const float t[10] = {0.5f, 2, 1, 4, 3, 0, 0, 1, -2, 1};
    reg_path(hp, len, "hs.npy");
    reg_path(wp, len, "wt.npy");
    reg_path(tp, len, "t.npy");
    reg_save_f32(hp, 2, 3, hs);
    reg_save_f32(wp, 5, 3, wt);
    reg_save_f32(tp, 2, 5, t);
}

/* ---------------------------------------------------------------------------
 * F5 (fixed): fused-linear wrote its two outputs one after the other, each
 * atomically; when the second could not be written (here: it names a
 * directory) the run failed with exit 2 but left the first, dH, behind.
 * Fuzz input: corpus seed_fused_bad_second_output.  Now both are written
 * as one (kdl_cli_save_npy_all): all temporaries first, no directory
 * targets, then the renames. */
Test(regressions, f5_fused_linear_failed_second_output_leaves_no_first)
{
    char hp[512], wp[512], tp[512], gh[512];
    fused_fixtures(hp, wp, tp, sizeof hp);
    reg_path(gh, sizeof gh, "gh.npy");
    unlink(gh);
    kdl_cli_result_t r;
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--backend", "cpu",
            "--grad-hidden-out", gh, "--grad-weight-out", KDL_TEST_TMPDIR);
    reg_expect_usage_error(&r, "fused-linear");
    cr_expect(!reg_exists(gh), "the failed run left %s", gh);

    /* the other order, and an existing first output stays as it was */
    FILE *f = fopen(gh, "w");
    cr_assert(f);
    fputs("old", f);
    fclose(f);
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--backend", "cpu",
            "--grad-weight-out", gh, "--grad-hidden-out", KDL_TEST_TMPDIR);
    reg_expect_usage_error(&r, "fused-linear");
    char buf[16];
    kdl_slurp(gh, buf, sizeof buf);
    cr_expect_str_eq(buf, "old", "an existing output file was changed by a failed run");
    unlink(gh);
}

Test(regressions, f5_fused_linear_both_outputs_or_same_file)
{
    char hp[512], wp[512], tp[512], gh[512], gw[512];
    fused_fixtures(hp, wp, tp, sizeof hp);
    reg_path(gh, sizeof gh, "gh2.npy");
    reg_path(gw, sizeof gw, "gw2.npy");
    kdl_cli_result_t r;
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--backend", "cpu",
            "--grad-hidden-out", gh, "--grad-weight-out", gw);
    cr_assert_eq(r.code, 0, "stderr: %s", r.err);
    cr_expect(reg_exists(gh) && reg_exists(gw));
    kdl_npy_array_t a;
    char msg[256];
    cr_assert_eq(kdl_npy_load(gw, &a, msg, sizeof msg), KDL_NPY_OK, "%s", msg);
    cr_expect(a.ndim == 2 && a.shape[0] == 5 && a.shape[1] == 3, "dW shape");
    kdl_npy_free(&a);
    unlink(gh);
    unlink(gw);
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--backend", "cpu",
            "--grad-hidden-out", gh, "--grad-weight-out", gh);
    reg_expect_usage_error(&r, "fused-linear");
    cr_expect(!reg_exists(gh));
}

/* ---------------------------------------------------------------------------
 * F6 (fixed): shard-check --split added its widths in int64 without a
 * bound: "--split 9223372036854775807,9223372036854775807" overflowed the
 * sum (undefined behaviour; UBSan aborts; otherwise "widths sum to -2").
 * Fuzz input: corpus seed_shard_bad_split_huge.  Now each width must fit in
 * what is left of the vocabulary, and a width is digits only. */
Test(regressions, f6_shard_check_split_sum_overflow)
{
    const float s[10] = {1, 2, 3, 4, 5, -1, 0, 0.5f, 2, 1};
    char sp[512];
    reg_path(sp, sizeof sp, "s.npy");
    reg_save_f32(sp, 2, 5, s);
    const char *bad[] = {"9223372036854775807,9223372036854775807", "4,9223372036854775807",
                         "99999999999999999999,1", "+2,3", " 2,3", "2,-3", "2,3,", "5"};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        kdl_cli_result_t r;
        KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", sp, "--shards", "2", "--split", bad[k], "--backend",
                "cpu");
        reg_expect_usage_error(&r, "shard-check");
        cr_expect(strstr(r.err, "--split") && !strstr(r.err, "sum to -"), "--split %s: %s", bad[k], r.err);
    }
    kdl_cli_result_t r;
    KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", sp, "--shards", "2", "--split", "2,3", "--backend", "cpu");
    cr_expect_eq(r.code, 0, "--split 2,3: %s", r.err);
}
