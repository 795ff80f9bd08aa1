/*
 * tests/test_sinkhorn_cli.c - `kdloss sinkhorn` and `kdloss sinkd` end to
 * end: runs the built binary (KDL_CLI_PATH) with fork/exec and checks
 *   - the numbers against kdl_ref_sinkhorn / kdl_ref_sinkd called here on
 *     the same inputs (bit for bit: the JSON prints 17 digits);
 *   - the JSON contract (one valid object, the arrays over problems);
 *   - --plan-out / --grad-out files (float64 with the cpu backend, shapes);
 *   - bad usage and bad files: exit 2, one line on stderr, nothing on
 *     stdout, no output file and no leftover temporary.
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdl_cli_run.h"
#include "kdl_test.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ref.h"
#include "npy.h"

/* Temporary files of this suite: KDL_TEST_TMPDIR/skcli_<pid>_<name>. */
static void tpath(char *buf, size_t len, const char *name)
{
    kdl_tmp_path(buf, len, "skcli", name);
}

static void save(const char *name, kdl_npy_dtype_t t, int ndim, const int64_t *shape, const void *data, char *path,
                 size_t len)
{
    kdl_tmp_npy(path, len, "skcli", name, t, ndim, shape, data);
}

/* A path for an output file, with no file there. */
static void out_path(const char *name, char *path, size_t len)
{
    tpath(path, len, name);
    unlink(path);
}

static void load_npy(const char *path, kdl_npy_array_t *arr)
{
    char msg[256];
    cr_assert_eq(kdl_npy_load(path, arr, msg, sizeof msg), KDL_NPY_OK, "%s", msg);
}

static void expect_usage_error(const kdl_cli_result_t *r, const char *what, const char *cmd)
{
    kdl_expect_cli_error(r, 2, cmd, NULL, what);
}

/* A command line that must be refused. */
typedef struct cli_case {
    const char *what;
    const char *args[16];
} cli_case_t;

/* Each case is a usage error of cmd that writes no output file at out (and
 * leaves no temporary). */
static void expect_refusals(const cli_case_t *cases, size_t n, const char *cmd, const char *out)
{
    for (size_t c = 0; c < n; c++) {
        kdl_cli_result_t r;
        kdl_run_cli(&r, cases[c].args);
        expect_usage_error(&r, cases[c].what, cmd);
        cr_expect(!kdl_file_exists(out), "%s: the output file was written", cases[c].what);
        cr_expect(kdl_no_temporaries(out), "%s: a temporary was left", cases[c].what);
    }
}

/* ------------------------------------------------------------ sinkhorn */
Test(sinkhorn_cli, help_exits_zero)
{
    kdl_cli_result_t r;
    KDL_CLI(&r, "sinkhorn", "--help");
    cr_expect_eq(r.code, 0);
    cr_expect(strstr(r.out, "usage: kdloss sinkhorn") != NULL);
    KDL_CLI(&r, "sinkd", "--help");
    cr_expect_eq(r.code, 0);
    cr_expect(strstr(r.out, "usage: kdloss sinkd") != NULL);
}

Test(sinkhorn_cli, one_cost_matches_the_reference_and_writes_the_plan)
{
    kdl_rng_t rng = {1};
    const int64_t n = 4, m = 6, shape[2] = {4, 6};
    double C[24];
    for (int k = 0; k < 24; k++) C[k] = kdl_rng_uniform(&rng);
    char cp[512], pp[512];
    save("cost.npy", KDL_NPY_F64, 2, shape, C, cp, sizeof cp);
    out_path("plan.npy", pp, sizeof pp);
    kdl_cli_result_t r;
    KDL_CLI(&r, "sinkhorn", "--cost", cp, "--epsilon", "0.05", "--tol", "1e-9", "--plan-out", pp, "--backend", "cpu");
    cr_assert_eq(r.code, 0, "%s", r.err);
    cr_expect(kdl_json_valid_object(r.out), "%s", r.out);
    cr_expect(strstr(r.out, "\"backend\": \"cpu\"") != NULL);

    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.epsilon = 0.05;
    d.tol = 1e-9;
    kdl_sinkhorn_args_t a = kdl_test_ot_args(1, n, m);
    a.cost = C;
    double v, e, P[24];
    int64_t it;
    a.value = &v;
    a.marginal_error = &e;
    a.iterations = &it;
    a.plan = P;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS);
    double got[4];
    cr_assert_eq(kdl_json_read_array(r.out, "value", got, 4), 1);
    cr_expect(got[0] == v, "value %.17g vs %.17g", got[0], v);
    cr_assert_eq(kdl_json_read_array(r.out, "iterations", got, 4), 1);
    cr_expect(got[0] == (double)it);
    cr_assert_eq(kdl_json_read_array(r.out, "marginal_error", got, 4), 1);
    cr_expect(got[0] == e);

    kdl_npy_array_t pa;
    load_npy(pp, &pa);
    cr_expect(pa.dtype == KDL_NPY_F64 && pa.ndim == 2 && pa.shape[0] == n && pa.shape[1] == m);
    cr_expect(!memcmp(pa.data, P, sizeof P), "plan file differs from the reference plan");
    kdl_npy_free(&pa);
    unlink(pp);
    unlink(cp);
}

Test(sinkhorn_cli, batch_with_log_weights_and_dual_value)
{
    kdl_rng_t rng = {2};
    const int64_t B = 3, n = 3, m = 5, sc[3] = {3, 3, 5}, sa[2] = {3, 3}, sb[2] = {3, 5};
    float C[45], la[9], lb[15];
    for (int k = 0; k < 45; k++) C[k] = (float)kdl_rng_uniform(&rng);
    for (int b = 0; b < 3; b++) {
        for (int i = 0; i < 3; i++) la[b * 3 + i] = (float)log((i + 1.0) / 6.0);
        for (int j = 0; j < 5; j++) lb[b * 5 + j] = (float)log(1.0 / 5);
    }
    char cp[512], ap[512], bp[512];
    save("bcost.npy", KDL_NPY_F32, 3, sc, C, cp, sizeof cp);
    save("loga.npy", KDL_NPY_F32, 2, sa, la, ap, sizeof ap);
    save("logb.npy", KDL_NPY_F32, 2, sb, lb, bp, sizeof bp);
    kdl_cli_result_t r;
    KDL_CLI(&r, "sinkhorn", "--cost", cp, "--log-a", ap, "--log-b", bp, "--epsilon", "0.1", "--value", "dual",
        "--max-iter", "500", "--check-every", "7", "--backend", "cpu");
    cr_assert_eq(r.code, 0, "%s", r.err);
    cr_expect(kdl_json_valid_object(r.out));
    double Cd[45], lad[9], lbd[15];
    for (int k = 0; k < 45; k++) Cd[k] = C[k];
    for (int k = 0; k < 9; k++) lad[k] = la[k];
    for (int k = 0; k < 15; k++) lbd[k] = lb[k];
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.epsilon = 0.1;
    d.value = KDL_OT_VALUE_DUAL;
    d.max_iter = 500;
    d.check_every = 7;
    kdl_sinkhorn_args_t a = kdl_test_ot_args(B, n, m);
    a.cost = Cd;
    a.log_a = lad;
    a.log_b = lbd;
    double v[3];
    int64_t it[3];
    a.value = v;
    a.iterations = it;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS);
    double got[8];
    cr_assert_eq(kdl_json_read_array(r.out, "value", got, 8), 3);
    for (int b = 0; b < 3; b++) cr_expect(got[b] == v[b]);
    cr_assert_eq(kdl_json_read_array(r.out, "iterations", got, 8), 3);
    for (int b = 0; b < 3; b++) cr_expect(got[b] == (double)it[b] && it[b] % 7 == 0);
    cr_expect(strstr(r.out, "\"value_kind\": \"dual\"") != NULL);
    unlink(cp), unlink(ap), unlink(bp);
}

Test(sinkhorn_cli, points_l1_debiased_with_eps_scaling)
{
    kdl_rng_t rng = {3};
    const int64_t sx[3] = {2, 4, 3}, sy[3] = {2, 5, 3};
    double x[24], y[30];
    for (int k = 0; k < 24; k++) x[k] = kdl_rng_uniform(&rng);
    for (int k = 0; k < 30; k++) y[k] = kdl_rng_uniform(&rng) + 0.5;
    char xp[512], yp[512], pp[512];
    save("x.npy", KDL_NPY_F64, 3, sx, x, xp, sizeof xp);
    save("y.npy", KDL_NPY_F64, 3, sy, y, yp, sizeof yp);
    out_path("plan3.npy", pp, sizeof pp);
    kdl_cli_result_t r;
    KDL_CLI(&r, "sinkhorn", "--x", xp, "--y", yp, "--metric", "l1", "--epsilon", "0.02", "--debias", "--eps-scaling",
        "--eps-factor", "0.7", "--plan-out", pp, "--backend", "cpu");
    cr_assert_eq(r.code, 0, "%s", r.err);
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_desc_init(&d);
    d.epsilon = 0.02;
    d.metric = KDL_OT_METRIC_L1;
    d.debias = 1;
    d.eps_scaling = 1;
    d.eps_scaling_factor = 0.7;
    kdl_sinkhorn_args_t a = kdl_test_ot_args(2, 4, 5);
    a.x = x;
    a.y = y;
    a.dim = 3;
    double v[2], e[2];
    a.value = v;
    a.marginal_error = e;
    cr_assert_eq(kdl_ref_sinkhorn(&d, &a), KDL_STATUS_SUCCESS);
    double got[4];
    cr_assert_eq(kdl_json_read_array(r.out, "value", got, 4), 2);
    cr_expect(got[0] == v[0] && got[1] == v[1]);
    cr_expect(strstr(r.out, "\"debias\": true") != NULL);
    kdl_npy_array_t pa;
    load_npy(pp, &pa);
    cr_expect(pa.ndim == 3 && pa.shape[0] == 2 && pa.shape[1] == 4 && pa.shape[2] == 5);
    kdl_npy_free(&pa);
    unlink(pp), unlink(xp), unlink(yp);
}

Test(sinkhorn_cli, bad_usage_and_bad_files)
{
    const int64_t s2[2] = {2, 3}, s1[1] = {3}, s4[4] = {1, 1, 2, 3}, sxx[2] = {2, 2};
    double C[6] = {0, 1, 2, 1, 0, 1}, Cn[6] = {0, 1, NAN, 1, 0, 1}, la[3] = {0, 0, 0};
    int64_t I[6] = {0};
    char cp[512], np_[512], ap[512], fp[512], ip[512], xxp[512], pp[512], missing[512];
    save("good.npy", KDL_NPY_F64, 2, s2, C, cp, sizeof cp);
    save("nan.npy", KDL_NPY_F64, 2, s2, Cn, np_, sizeof np_);
    save("la3.npy", KDL_NPY_F64, 1, s1, la, ap, sizeof ap);
    save("four.npy", KDL_NPY_F64, 4, s4, C, fp, sizeof fp);
    save("int.npy", KDL_NPY_I64, 2, s2, I, ip, sizeof ip);
    save("cxx.npy", KDL_NPY_F64, 2, sxx, C, xxp, sizeof xxp);
    tpath(pp, sizeof pp, "never.npy");
    tpath(missing, sizeof missing, "missing.npy");
    unlink(pp);
    unlink(missing);
    const cli_case_t cases[] = {
        {"no epsilon", {"sinkhorn", "--cost", cp, "--plan-out", pp}},
        {"no input", {"sinkhorn", "--epsilon", "0.1", "--plan-out", pp}},
        {"cost and points", {"sinkhorn", "--cost", cp, "--x", cp, "--y", cp, "--epsilon", "0.1", "--plan-out", pp}},
        {"x without y", {"sinkhorn", "--x", cp, "--epsilon", "0.1", "--plan-out", pp}},
        {"epsilon 0", {"sinkhorn", "--cost", cp, "--epsilon", "0", "--plan-out", pp}},
        {"epsilon nan", {"sinkhorn", "--cost", cp, "--epsilon", "nan", "--plan-out", pp}},
        {"tol < 0", {"sinkhorn", "--cost", cp, "--epsilon", "0.1", "--tol", "-1", "--plan-out", pp}},
        {"max-iter 0", {"sinkhorn", "--cost", cp, "--epsilon", "0.1", "--max-iter", "0", "--plan-out", pp}},
        {"eps-factor 1", {"sinkhorn", "--cost", cp, "--epsilon", "0.1", "--eps-scaling", "--eps-factor", "1", "--plan-out", pp}},
        {"bad value kind", {"sinkhorn", "--cost", cp, "--epsilon", "0.1", "--value", "primal", "--plan-out", pp}},
        {"metric with cost", {"sinkhorn", "--cost", cp, "--metric", "l1", "--epsilon", "0.1", "--plan-out", pp}},
        {"debias without self costs", {"sinkhorn", "--cost", cp, "--epsilon", "0.1", "--debias", "--plan-out", pp}},
        {"log-a wrong length", {"sinkhorn", "--cost", cp, "--log-a", ap, "--epsilon", "0.1", "--plan-out", pp}},
        {"cost-xx wrong shape", {"sinkhorn", "--cost", cp, "--cost-xx", ap, "--cost-yy", xxp, "--debias", "--epsilon", "0.1", "--plan-out", pp}},
        {"NaN in the cost", {"sinkhorn", "--cost", np_, "--epsilon", "0.1", "--plan-out", pp, "--backend", "cpu"}},
        {"4-D cost", {"sinkhorn", "--cost", fp, "--epsilon", "0.1", "--plan-out", pp}},
        {"int64 cost", {"sinkhorn", "--cost", ip, "--epsilon", "0.1", "--plan-out", pp}},
        {"missing file", {"sinkhorn", "--cost", missing, "--epsilon", "0.1", "--plan-out", pp}},
        {"unknown flag", {"sinkhorn", "--cost", cp, "--epsilon", "0.1", "--blur", "1", "--plan-out", pp}},
        {"bad backend", {"sinkhorn", "--cost", cp, "--epsilon", "0.1", "--backend", "tpu", "--plan-out", pp}},
    };
    expect_refusals(cases, sizeof cases / sizeof cases[0], "sinkhorn", pp);
    if (!kdl_test_have_gpu()) {
        kdl_cli_result_t r;
        KDL_CLI(&r, "sinkhorn", "--cost", cp, "--epsilon", "0.1", "--backend", "cuda", "--plan-out", pp);
        expect_usage_error(&r, "cuda without a device", "sinkhorn");
        cr_expect(!kdl_file_exists(pp));
    }
    /* a plan path in a directory that does not exist: exit 2, nothing printed */
    char bad_dir[600];
    snprintf(bad_dir, sizeof bad_dir, "%s/no/such/dir/p.npy", KDL_TEST_TMPDIR);
    kdl_cli_result_t r;
    KDL_CLI(&r, "sinkhorn", "--cost", cp, "--epsilon", "0.1", "--plan-out", bad_dir, "--backend", "cpu");
    expect_usage_error(&r, "plan in a missing directory", "sinkhorn");
    unlink(cp), unlink(np_), unlink(ap), unlink(fp), unlink(ip), unlink(xxp);
}

/* --------------------------------------------------------------- sinkd */
Test(sinkhorn_cli, sinkd_matches_the_reference_and_writes_the_gradient)
{
    kdl_rng_t rng = {4};
    const int64_t N = 6, V = 9, shape[2] = {6, 9};
    double S[54], T[54];
    kdl_fill_logits(&rng, S, N * V, 1.0);
    kdl_fill_logits(&rng, T, N * V, 1.0);
    uint16_t T16[54];
    kdl_to_dtype(T, T16, KDL_DTYPE_F16, N * V);
    char sp[512], tp[512], gp[512];
    save("s.npy", KDL_NPY_F64, 2, shape, S, sp, sizeof sp);
    save("t16.npy", KDL_NPY_F16, 2, shape, T16, tp, sizeof tp);
    out_path("grad.npy", gp, sizeof gp);
    kdl_cli_result_t r;
    KDL_CLI(&r, "sinkd", "--student", sp, "--teacher", tp, "--group-size", "3", "--temperature", "1.5", "--epsilon", "0.2",
        "--max-iter", "30", "--metric", "sqeuclidean", "--scale", "2", "--grad-out", gp, "--backend", "cpu");
    cr_assert_eq(r.code, 0, "%s", r.err);
    cr_expect(kdl_json_valid_object(r.out), "%s", r.out);
    kdl_sinkd_desc_t d;
    kdl_sinkd_desc_init(&d);
    d.group_size = 3;
    d.temperature = 1.5;
    d.epsilon = 0.2;
    d.max_iter = 30;
    d.metric = KDL_OT_METRIC_SQEUCLIDEAN;
    d.scale = 2;
    double loss, gl[2], grad[54];
    kdl_sinkd_args_t a = kdl_test_sinkd_args(N, V, V, S, KDL_DTYPE_F64, T16, KDL_DTYPE_F16, grad, KDL_DTYPE_F64);
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = &loss;
    a.group_loss = gl;
    cr_assert_eq(kdl_ref_sinkd(&d, &a), KDL_STATUS_SUCCESS);
    cr_expect(kdl_json_read_number(r.out, "loss") == loss);
    double got[4];
    cr_assert_eq(kdl_json_read_array(r.out, "group_loss", got, 4), 2);
    cr_expect(got[0] == gl[0] && got[1] == gl[1]);
    cr_assert_eq(kdl_json_read_array(r.out, "iterations", got, 4), 2);
    cr_expect(got[0] == 30 && got[1] == 30);
    kdl_npy_array_t ga;
    load_npy(gp, &ga);
    cr_expect(ga.dtype == KDL_NPY_F64 && ga.ndim == 2 && ga.shape[0] == N && ga.shape[1] == V);
    cr_expect(!memcmp(ga.data, grad, sizeof grad));
    kdl_npy_free(&ga);
    unlink(gp), unlink(sp), unlink(tp);
}

Test(sinkhorn_cli, sinkd_invalid_group_is_null_and_counted)
{
    kdl_rng_t rng = {5};
    const int64_t shape[2] = {4, 5};
    float S[20], T[20];
    for (int k = 0; k < 20; k++) {
        S[k] = (float)kdl_rng_normal(&rng);
        T[k] = (float)kdl_rng_normal(&rng);
    }
    S[7] = NAN; /* row 1: group 0 of size 2 */
    char sp[512], tp[512];
    save("sn.npy", KDL_NPY_F32, 2, shape, S, sp, sizeof sp);
    save("tn.npy", KDL_NPY_F32, 2, shape, T, tp, sizeof tp);
    kdl_cli_result_t r;
    KDL_CLI(&r, "sinkd", "--student", sp, "--teacher", tp, "--group-size", "2", "--backend", "cpu");
    cr_assert_eq(r.code, 0, "%s", r.err);
    cr_expect(kdl_json_valid_object(r.out), "%s", r.out);
    double got[4];
    cr_assert_eq(kdl_json_read_array(r.out, "group_loss", got, 4), 2);
    cr_expect(isnan(got[0]) && isfinite(got[1]));
    cr_expect(kdl_json_read_number(r.out, "invalid_groups") == 1);
    cr_expect(kdl_json_read_number(r.out, "loss") == got[1]);
    unlink(sp), unlink(tp);
}

Test(sinkhorn_cli, sinkd_bad_usage)
{
    const int64_t s1[2] = {4, 5}, s2[2] = {4, 6}, s3[1] = {5};
    double A[24] = {0};
    char ap[512], bp[512], cp[512], gp[512];
    save("a.npy", KDL_NPY_F64, 2, s1, A, ap, sizeof ap);
    save("b.npy", KDL_NPY_F64, 2, s2, A, bp, sizeof bp);
    save("c.npy", KDL_NPY_F64, 1, s3, A, cp, sizeof cp);
    out_path("g_never.npy", gp, sizeof gp);
    const cli_case_t cases[] = {
        {"no teacher", {"sinkd", "--student", ap, "--grad-out", gp}},
        {"shape mismatch", {"sinkd", "--student", ap, "--teacher", bp, "--grad-out", gp}},
        {"1-D logits", {"sinkd", "--student", cp, "--teacher", cp, "--grad-out", gp}},
        {"group does not divide", {"sinkd", "--student", ap, "--teacher", ap, "--group-size", "3", "--grad-out", gp}},
        {"group 0", {"sinkd", "--student", ap, "--teacher", ap, "--group-size", "0", "--grad-out", gp}},
        {"temperature 0", {"sinkd", "--student", ap, "--teacher", ap, "--temperature", "0", "--grad-out", gp}},
        {"epsilon < 0", {"sinkd", "--student", ap, "--teacher", ap, "--epsilon", "-0.1", "--grad-out", gp}},
        {"metric", {"sinkd", "--student", ap, "--teacher", ap, "--metric", "cosine", "--grad-out", gp}},
        {"scale inf", {"sinkd", "--student", ap, "--teacher", ap, "--scale", "inf", "--grad-out", gp}},
    };
    expect_refusals(cases, sizeof cases / sizeof cases[0], "sinkd", gp);
    unlink(ap), unlink(bp), unlink(cp);
}
