/*
 * tests/test_ext_cli.c - the extension subcommands end to end (sparse-loss,
 * fused-linear, shard-check): runs the built binary (KDL_CLI_PATH) on .npy
 * files written here, and checks the JSON numbers and output files against
 * the float64 references called here, and the error contract: exit 2, one
 * line on stderr naming the subcommand, nothing on stdout, no output file.
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdl_cli_run.h"
#include "kdl_ext_fixtures.h"
#include "kdl_test.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"
#include "npy.h"

/* Temporary files of this suite: KDL_TEST_TMPDIR/extcli_<pid>_<name>. */
static void tpath(char *buf, size_t len, const char *name)
{
    kdl_tmp_path(buf, len, "extcli", name);
}

static int exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* Saves data as the .npy file tpath(name) ([d0] or [d0, d1]); its path into path. */
static void save(char *path, const char *name, kdl_npy_dtype_t t, int ndim, int64_t d0, int64_t d1, const void *data)
{
    int64_t shape[2] = {d0, d1};
    char msg[256];
    tpath(path, 512, name);
    cr_assert_eq(kdl_npy_save(path, t, ndim, shape, data, msg, sizeof msg), KDL_NPY_OK, "%s", msg);
}

/* Removes each file of a NULL-terminated list. */
static void unlink_list(const char *const *paths)
{
    for (; *paths; paths++) unlink(*paths);
}
#define UNLINK(...) unlink_list((const char *const[]){__VA_ARGS__, NULL})

static void load_f64(const char *path, double *dst, int64_t n)
{
    kdl_npy_array_t a;
    char msg[256];
    cr_assert_eq(kdl_npy_load(path, &a, msg, sizeof msg), KDL_NPY_OK, "%s: %s", path, msg);
    cr_assert_eq(a.count, n, "%s: %lld elements, want %lld", path, (long long)a.count, (long long)n);
    for (int64_t i = 0; i < n; i++) dst[i] = kdl_npy_get_double(&a, i);
    kdl_npy_free(&a);
}

/* The error contract; and when no_file is not NULL, that file was not written. */
static void expect_usage_error(const kdl_cli_result_t *r, const char *cmd, const char *no_file)
{
    cr_expect_eq(r->code, 2, "exit %d, stderr: %s", r->code, r->err);
    cr_expect_str_empty(r->out, "stdout must be empty on error: %s", r->out);
    char pfx[64];
    snprintf(pfx, sizeof pfx, "kdloss %s: ", cmd);
    cr_expect(strncmp(r->err, pfx, strlen(pfx)) == 0, "stderr: %s", r->err);
    const char *nl = strchr(r->err, '\n');
    cr_expect(nl && nl[1] == '\0', "one line on stderr: %s", r->err);
    if (no_file) cr_expect(!exists(no_file), "%s was written", no_file);
}

/* A fused-linear --backend cuda run in *r: without a device, exit 2 with
 * one line saying so and neither gradient file written (returns 0); with
 * one, exit 0 on the cuda backend (returns 1). */
static int fused_ran_on_cuda(const kdl_cli_result_t *r, const char *ghp, const char *gwp)
{
    if (!kdl_device_available()) {
        expect_usage_error(r, "fused-linear", ghp);
        cr_expect(strstr(r->err, "no CUDA device") != NULL, "%s", r->err);
        cr_expect(!exists(gwp), "%s was written", gwp);
        return 0;
    }
    cr_assert_eq(r->code, 0, "exit %d: %s", r->code, r->err);
    cr_expect(strstr(r->out, "\"backend\": \"cuda\"") != NULL, "%s", r->out);
    return 1;
}

/* ------------------------------------------------------------ sparse-loss */
enum { SN = 3, SV = 12, SK = 4 };

static void sparse_inputs(double *S, int64_t *I, double *P)
{
    kdl_rng_t g = {41};
    kdl_fill_logits(&g, S, SN * SV, 1.5);
    for (int i = 0; i < SN; i++) {
        double mass = 0;
        for (int j = 0; j < SK; j++) {
            I[i * SK + j] = (j * 5 + i * 3) % SV;
            double p = 0.4 / (j + 1);
            mass += p;
            P[i * SK + j] = log(p);
        }
        (void)mass;
    }
}

static void sparse_ref(kdl_sparse_mode_t mode, kdl_divergence_t div, const double *S, const int64_t *I,
                       const double *P, double *loss, double *grad)
{
    kdl_loss_desc_t d = kdl_test_desc(div, KDL_REDUCTION_MEAN);
    d.temperature = 1.5;
    kdl_sparse_args_t a = kdl_ext_sparse_args(mode, SN, SV, SK, S, I, P, grad, loss);
    kdl_ext_ref_sparse(&d, &a, kdl_sparse_mode_name(mode));
}

Test(sparse_loss, json_and_gradient_match_the_reference)
{
    double S[SN * SV], P[SN * SK];
    int64_t I[SN * SK];
    sparse_inputs(S, I, P);
    char sp[512], ip[512], pp[512], gp[512];
    tpath(gp, sizeof gp, "g.npy");
    save(sp, "s.npy", KDL_NPY_F64, 2, SN, SV, S);
    save(ip, "i.npy", KDL_NPY_I64, 2, SN, SK, I);
    save(pp, "p.npy", KDL_NPY_F64, 2, SN, SK, P);
    const char *modes[2] = {"renormalised", "tail"};
    const kdl_divergence_t divs[2] = {KDL_DIV_JSD, KDL_DIV_AKL};
    const char *divn[2] = {"jsd", "akl"};
    for (int m = 0; m < 2; m++) {
        kdl_cli_result_t r;
        KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", pp, "--mode", modes[m],
            "--divergence", divn[m], "--temperature", "1.5", "--grad-out", gp, "--backend", "cpu");
        cr_assert_eq(r.code, 0, "exit %d: %s", r.code, r.err);
        double loss, grad[SN * SV], got[SN * SV];
        sparse_ref((kdl_sparse_mode_t)m, divs[m], S, I, P, &loss, grad);
        double l = kdl_json_read_number(r.out, "loss");
        cr_expect(fabs(l - loss) <= 1e-15 * fabs(loss), "%s: loss %.17g want %.17g", modes[m], l, loss);
        cr_expect(kdl_json_read_number(r.out, "k") == SK && kdl_json_read_number(r.out, "valid_rows") == SN, "%s", r.out);
        cr_expect(strstr(r.out, "\"backend\": \"cpu\"") != NULL);
        load_f64(gp, got, SN * SV);
        kdl_tol_t tol = {0, 0};
        KDL_EXPECT_CLOSE(modes[m], got, grad, SN * SV, tol);
        unlink(gp);
    }
    UNLINK(sp, ip, pp);
}

Test(sparse_loss, errors_exit_2_and_write_nothing)
{
    double S[SN * SV], P[SN * SK];
    int64_t I[SN * SK];
    sparse_inputs(S, I, P);
    char sp[512], ip[512], pp[512], gp[512], bp[512], dp[512];
    tpath(gp, sizeof gp, "g2.npy");
    save(sp, "s2.npy", KDL_NPY_F64, 2, SN, SV, S);
    save(ip, "i2.npy", KDL_NPY_I64, 2, SN, SK, I);
    save(pp, "p2.npy", KDL_NPY_F64, 2, SN, SK, P);
    int64_t B[SN * SK];
    memcpy(B, I, sizeof B);
    B[1 * SK + 2] = SV; /* out of range in row 1 */
    save(bp, "bad_i.npy", KDL_NPY_I64, 2, SN, SK, B);
    memcpy(B, I, sizeof B);
    B[2 * SK + 3] = B[2 * SK + 0]; /* repeated in row 2 */
    save(dp, "dup_i.npy", KDL_NPY_I64, 2, SN, SK, B);
    kdl_cli_result_t r;
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", bp, "--teacher-logprobs", pp, "--mode", "tail",
        "--grad-out", gp);
    expect_usage_error(&r, "sparse-loss", gp);
    cr_expect(strstr(r.err, "row 1") != NULL, "%s", r.err);
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", dp, "--teacher-logprobs", pp, "--mode", "tail",
        "--grad-out", gp);
    expect_usage_error(&r, "sparse-loss", gp);
    cr_expect(strstr(r.err, "repeated") != NULL, "%s", r.err);
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", pp, "--mode",
        "renormalised", "--divergence", "rkl", "--grad-out", gp);
    expect_usage_error(&r, "sparse-loss", gp);
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", pp);
    expect_usage_error(&r, "sparse-loss", NULL); /* --mode is required */
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", sp, "--mode", "tail");
    expect_usage_error(&r, "sparse-loss", NULL); /* log-probs of the wrong shape */
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", pp, "--teacher-logprobs", pp, "--mode", "tail");
    expect_usage_error(&r, "sparse-loss", NULL); /* float indices */
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", pp, "--mode", "bogus");
    expect_usage_error(&r, "sparse-loss", NULL);
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", pp, "--mode", "tail",
        "--temperature", "0");
    expect_usage_error(&r, "sparse-loss", NULL);
    KDL_CLI(&r, "sparse-loss", "--help");
    cr_expect_eq(r.code, 0);
    cr_expect(strstr(r.out, "renormalised") != NULL);
    UNLINK(sp, ip, pp, bp, dp);
}

/* ----------------------------------------------------------- fused-linear */
enum { FN = 4, FD = 5, FV = 9 };

/* H [FN, FD], W [FV, FD] (sigma 0.8), T [FN, FV] (sigma 2) drawn from g and
 * saved as float64 files <prefix>h.npy, <prefix>w.npy, <prefix>t.npy. */
static void fused_inputs(kdl_rng_t *g, const char *prefix, double *H, double *W, double *T, char *hp, char *wp,
                         char *tp)
{
    char name[32];
    kdl_ext_fill_normal(g, H, FN * FD, 0.0, 1.0);
    kdl_ext_fill_normal(g, W, FV * FD, 0.0, 0.8);
    kdl_ext_fill_normal(g, T, FN * FV, 0.0, 2.0);
    snprintf(name, sizeof name, "%sh.npy", prefix);
    save(hp, name, KDL_NPY_F64, 2, FN, FD, H);
    snprintf(name, sizeof name, "%sw.npy", prefix);
    save(wp, name, KDL_NPY_F64, 2, FV, FD, W);
    snprintf(name, sizeof name, "%st.npy", prefix);
    save(tp, name, KDL_NPY_F64, 2, FN, FV, T);
}

Test(fused_linear, json_and_gradients_match_the_reference)
{
    double H[FN * FD], W[FV * FD], T[FN * FV];
    kdl_rng_t g = {7};
    char hp[512], wp[512], tp[512], ghp[512], gwp[512];
    fused_inputs(&g, "", H, W, T, hp, wp, tp);
    tpath(ghp, sizeof ghp, "gh.npy");
    tpath(gwp, sizeof gwp, "gw.npy");
    kdl_cli_result_t r;
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--divergence", "rkl", "--reduction",
        "sum", "--grad-hidden-out", ghp, "--grad-weight-out", gwp, "--chunk-rows", "2");
    cr_assert_eq(r.code, 0, "exit %d: %s", r.code, r.err);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_RKL, KDL_REDUCTION_SUM);
    double loss, dH[FN * FD], dW[FV * FD], gotH[FN * FD], gotW[FV * FD];
    kdl_fused_linear_args_t a = kdl_ext_fused_args(FN, FD, FV, H, W, KDL_DTYPE_F64, T, KDL_DTYPE_F64, dH, dW, &loss);
    kdl_ext_ref_fused(&d, &a, "fused-linear");
    double l = kdl_json_read_number(r.out, "loss");
    cr_expect(fabs(l - loss) <= 1e-15 * fabs(loss), "loss %.17g want %.17g", l, loss);
    cr_expect(kdl_json_read_number(r.out, "chunk_rows") == 2);
    cr_expect(kdl_json_read_number(r.out, "logits_bytes") == FN * FV * 4);
    cr_expect(kdl_json_read_number(r.out, "workspace_bytes") > 0, "%s", r.out);
    load_f64(ghp, gotH, FN * FD);
    load_f64(gwp, gotW, FV * FD);
    kdl_tol_t tol = {0, 0};
    KDL_EXPECT_CLOSE("dH", gotH, dH, FN * FD, tol);
    KDL_EXPECT_CLOSE("dW", gotW, dW, FV * FD, tol);
    UNLINK(ghp, gwp);
    /* errors: shapes that disagree, a bad chunk; no output file */
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", tp, "--teacher", tp, "--grad-hidden-out", ghp);
    expect_usage_error(&r, "fused-linear", ghp);
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--chunk-rows", "0", "--grad-weight-out",
        gwp);
    expect_usage_error(&r, "fused-linear", gwp);
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp);
    expect_usage_error(&r, "fused-linear", NULL);
    KDL_CLI(&r, "fused-linear", "--help");
    cr_expect_eq(r.code, 0);
    UNLINK(hp, wp, tp);
}

/* --bias (float32, with float64 weights: the reference's float64 copies),
 * --grad-output with --reduction none, --grad-bias-out: against the
 * reference called directly. */
Test(fused_linear, bias_and_grad_output)
{
    double H[FN * FD], W[FV * FD], T[FN * FV], G[FN], b64[FV];
    float b[FV];
    kdl_rng_t g = {17};
    char hp[512], wp[512], tp[512], bp[512], gp[512], ghp[512], gbp[512];
    fused_inputs(&g, "b", H, W, T, hp, wp, tp);
    kdl_ext_fill_normal(&g, G, FN, 0.0, 1.0);
    for (int j = 0; j < FV; j++) b64[j] = b[j] = (float)kdl_rng_normal(&g);
    tpath(ghp, sizeof ghp, "bgh.npy");
    tpath(gbp, sizeof gbp, "bgb.npy");
    save(bp, "bb.npy", KDL_NPY_F32, 1, FV, 0, b);
    save(gp, "bg.npy", KDL_NPY_F64, 1, FN, 0, G);
    kdl_cli_result_t r;
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--divergence", "jsd", "--reduction",
        "none", "--bias", bp, "--grad-output", gp, "--grad-hidden-out", ghp, "--grad-bias-out", gbp);
    cr_assert_eq(r.code, 0, "exit %d: %s", r.code, r.err);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_JSD, KDL_REDUCTION_NONE);
    double loss[FN], dH[FN * FD], db[FV], got[FN * FD];
    kdl_fused_linear_args_t a = kdl_ext_fused_args(FN, FD, FV, H, W, KDL_DTYPE_F64, T, KDL_DTYPE_F64, dH, NULL, loss);
    a.bias = b64;
    a.grad_output = G;
    a.grad_output_dtype = KDL_DTYPE_F64;
    a.grad_bias = db;
    kdl_ext_ref_fused(&d, &a, "fused-linear --bias --grad-output");
    double jl[FN];
    cr_assert_eq(kdl_json_read_array(r.out, "loss", jl, FN), FN, "%s", r.out);
    kdl_tol_t tol = {0, 0};
    KDL_EXPECT_CLOSE("loss", jl, loss, FN, tol);
    load_f64(ghp, got, FN * FD);
    KDL_EXPECT_CLOSE("dH", got, dH, FN * FD, tol);
    load_f64(gbp, got, FV);
    KDL_EXPECT_CLOSE("db", got, db, FV, tol);
    UNLINK(ghp, gbp);
    /* errors: grad_output with a reduction, a bias of the wrong length; no output file */
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--grad-output", gp, "--grad-bias-out",
        gbp);
    expect_usage_error(&r, "fused-linear", gbp);
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--bias", gp, "--grad-bias-out", gbp);
    expect_usage_error(&r, "fused-linear", gbp);
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--grad-hidden-out", ghp,
        "--grad-bias-out", ghp);
    expect_usage_error(&r, "fused-linear", NULL);
    UNLINK(hp, wp, tp, bp, gp);
}

/* The dtype of an .npy file's data. */
static kdl_npy_dtype_t file_dtype(const char *path)
{
    kdl_npy_array_t a;
    char msg[256];
    cr_assert_eq(kdl_npy_load(path, &a, msg, sizeof msg), KDL_NPY_OK, "%s: %s", path, msg);
    kdl_npy_dtype_t t = a.dtype;
    kdl_npy_free(&a);
    return t;
}

/* float16 H and W (float32 T): --backend cpu is the float64 reference on
 * the float16 values (float64 files); the JSON memory model is the cuda
 * call's, which takes float16 H and W as they are: its workspace is that of
 * float32 inputs plus the chunk's 16-bit dL buffer, align256(c V 2) bytes
 * (the same run with float32 H and W files gives the other).  --backend
 * cuda: without a device one line and exit 2, nothing written; with one,
 * the float16 inputs against the reference at float16 dL rounding, float32
 * gradient files. */
Test(fused_linear, float16_hidden_and_weight)
{
    enum { C = 3 };
    double H[FN * FD], W[FV * FD], T[FN * FV];
    uint16_t h16[FN * FD], w16[FV * FD];
    float t32[FN * FV], h32[FN * FD], w32[FV * FD];
    kdl_rng_t g = {23};
    char hp[512], wp[512], tp[512], hp16[512], wp16[512], tp32[512], hp32[512], wp32[512], ghp[512], gwp[512];
    fused_inputs(&g, "x", H, W, T, hp, wp, tp);
    kdl_to_dtype(H, h16, KDL_DTYPE_F16, FN * FD);
    kdl_to_dtype(W, w16, KDL_DTYPE_F16, FV * FD);
    kdl_to_dtype(T, t32, KDL_DTYPE_F32, FN * FV);
    kdl_from_dtype(h16, H, KDL_DTYPE_F16, FN * FD); /* the float16 values, exactly */
    kdl_from_dtype(w16, W, KDL_DTYPE_F16, FV * FD);
    for (int i = 0; i < FN * FD; i++) h32[i] = (float)H[i];
    for (int i = 0; i < FV * FD; i++) w32[i] = (float)W[i];
    save(hp16, "xh16.npy", KDL_NPY_F16, 2, FN, FD, h16);
    save(wp16, "xw16.npy", KDL_NPY_F16, 2, FV, FD, w16);
    save(tp32, "xt32.npy", KDL_NPY_F32, 2, FN, FV, t32);
    save(hp32, "xh32.npy", KDL_NPY_F32, 2, FN, FD, h32);
    save(wp32, "xw32.npy", KDL_NPY_F32, 2, FV, FD, w32);
    tpath(ghp, sizeof ghp, "xgh.npy");
    tpath(gwp, sizeof gwp, "xgw.npy");

    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_SKL, KDL_REDUCTION_MEAN);
    d.temperature = 2.0;
    double loss, dH[FN * FD], dW[FV * FD], got[FV * FD];
    kdl_fused_linear_args_t a =
        kdl_ext_fused_args(FN, FD, FV, h16, w16, KDL_DTYPE_F16, t32, KDL_DTYPE_F32, dH, dW, &loss);
    kdl_ext_ref_fused(&d, &a, "fused-linear float16");

    kdl_cli_result_t r;
    KDL_CLI(&r, "fused-linear", "--hidden", hp16, "--weight", wp16, "--teacher", tp32, "--divergence", "skl",
        "--temperature", "2", "--chunk-rows", "3", "--grad-hidden-out", ghp, "--grad-weight-out", gwp, "--backend",
        "cpu");
    cr_assert_eq(r.code, 0, "exit %d: %s", r.code, r.err);
    cr_expect(strstr(r.out, "\"backend\": \"cpu\"") != NULL, "%s", r.out);
    double l = kdl_json_read_number(r.out, "loss");
    cr_expect(fabs(l - loss) <= 1e-15 * fabs(loss), "loss %.17g want %.17g", l, loss);
    cr_expect(kdl_json_read_number(r.out, "chunk_rows") == C, "%s", r.out);
    double ws16 = kdl_json_read_number(r.out, "workspace_bytes");
    cr_expect_eq(file_dtype(ghp), KDL_NPY_F64);
    cr_expect_eq(file_dtype(gwp), KDL_NPY_F64);
    kdl_tol_t exact = {0, 0};
    load_f64(ghp, got, FN * FD);
    KDL_EXPECT_CLOSE("dH", got, dH, FN * FD, exact);
    load_f64(gwp, got, FV * FD);
    KDL_EXPECT_CLOSE("dW", got, dW, FV * FD, exact);
    UNLINK(ghp, gwp);
    /* the same values as float32 files: the same loss, the float32 call's workspace */
    KDL_CLI(&r, "fused-linear", "--hidden", hp32, "--weight", wp32, "--teacher", tp32, "--divergence", "skl",
        "--temperature", "2", "--chunk-rows", "3", "--backend", "cpu");
    cr_assert_eq(r.code, 0, "exit %d: %s", r.code, r.err);
    cr_expect(fabs(kdl_json_read_number(r.out, "loss") - loss) <= 1e-15 * fabs(loss), "%s", r.out);
    const double dl16 = (double)(((size_t)C * FV * 2 + 255) / 256 * 256);
    cr_expect(ws16 - kdl_json_read_number(r.out, "workspace_bytes") == dl16, "workspace %.17g (float16) vs %s", ws16,
              r.out);

    KDL_CLI(&r, "fused-linear", "--hidden", hp16, "--weight", wp16, "--teacher", tp32, "--divergence", "skl",
        "--temperature", "2", "--chunk-rows", "3", "--grad-hidden-out", ghp, "--grad-weight-out", gwp, "--backend",
        "cuda");
    if (fused_ran_on_cuda(&r, ghp, gwp)) {
        l = kdl_json_read_number(r.out, "loss");
        cr_expect(fabs(l - loss) <= 1e-5 * fabs(loss) + 1e-7, "cuda loss %.17g want %.17g", l, loss);
        cr_expect_eq(file_dtype(ghp), KDL_NPY_F32);
        cr_expect_eq(file_dtype(gwp), KDL_NPY_F32);
        /* dL is rounded to float16 before the two GEMMs: |dH~ - dH| <= u sum_v |dL_iv| |W_vk| (u = 2^-11),
         * likewise dW over the rows with |H|; twice that, plus float32 rounding */
        double L[FN * FV], dL[FN * FV], dl_loss, bh[FN * FD] = {0}, bw[FV * FD] = {0};
        kdl_ext_logits(FN, FD, FV, H, W, NULL, L);
        kdl_loss_args_t la = kdl_ext_dense_args(FN, FV, L, KDL_DTYPE_F64, t32, KDL_DTYPE_F32, dL, &dl_loss);
        kdl_ext_ref_dense(&d, &la, "fused-linear dL");
        const double u2 = 2 * ldexp(1.0, -11);
        for (int i = 0; i < FN; i++)
            for (int v = 0; v < FV; v++)
                for (int k = 0; k < FD; k++) {
                    bh[i * FD + k] += u2 * fabs(dL[i * FV + v] * W[v * FD + k]);
                    bw[v * FD + k] += u2 * fabs(dL[i * FV + v] * H[i * FD + k]);
                }
        kdl_tol_t th = kdl_ext_tol_rel_max(dH, FN * FD, 1e-5), tw = kdl_ext_tol_rel_max(dW, FV * FD, 1e-5);
        load_f64(ghp, got, FN * FD);
        for (int j = 0; j < FN * FD; j++)
            cr_expect(fabs(got[j] - dH[j]) <= bh[j] + th.atol, "cuda dH[%d] %.9g, reference %.9g", j, got[j], dH[j]);
        load_f64(gwp, got, FV * FD);
        for (int j = 0; j < FV * FD; j++)
            cr_expect(fabs(got[j] - dW[j]) <= bw[j] + tw.atol, "cuda dW[%d] %.9g, reference %.9g", j, got[j], dW[j]);
    }
    UNLINK(ghp, gwp, hp, wp, tp, hp16, wp16, tp32, hp32, wp32);
}

/* ------------------------------- fused-linear, the teacher as a linear layer */
enum { FDT = 3 }; /* the teacher's hidden size d_t, != FD */

/* One fused-linear run on `backend`: JSD (beta 0.3, temperature 1.5),
 * reduction sum, chunks of 3 rows, H and W from hp and wp, the teacher
 * from the arguments in teacher (NULL-terminated); dH and dW into the
 * files ghp and gwp.  Exit code and output in *r. */
static void tl_run(kdl_cli_result_t *r, const char *backend, const char *hp, const char *wp,
                   const char *const *teacher, const char *ghp, const char *gwp)
{
    const char *args[KDL_CLI_MAX_ARGS + 1] = {
        "fused-linear", "--hidden",    hp,    "--weight",     wp,  "--divergence", "jsd",   "--beta",
        "0.3",          "--temperature", "1.5", "--reduction", "sum", "--chunk-rows", "3",     "--backend",
        backend,        "--grad-hidden-out", ghp, "--grad-weight-out", gwp};
    int n = 21;
    while (*teacher) args[n++] = *teacher++;
    args[n] = NULL;
    kdl_run_cli(r, args);
}

/* The loss, dH and dW of a successful tl_run (files removed). */
static void tl_read(const kdl_cli_result_t *r, const char *ghp, const char *gwp, double *loss, double *dH, double *dW)
{
    cr_assert_eq(r->code, 0, "exit %d: %s", r->code, r->err);
    *loss = kdl_json_read_number(r->out, "loss");
    load_f64(ghp, dH, FN * FD);
    load_f64(gwp, dW, FV * FD);
    UNLINK(ghp, gwp);
}

/* Bad case k, the teacher flags in teacher: exit 2 with one line naming
 * `says`, and neither gradient file written. */
static void tl_expect_refused(size_t k, const char *hp, const char *wp, const char *const *teacher, const char *says,
                              const char *ghp, const char *gwp)
{
    kdl_cli_result_t r;
    tl_run(&r, "cpu", hp, wp, teacher, ghp, gwp);
    expect_usage_error(&r, "fused-linear", ghp);
    cr_expect(!exists(gwp), "case %zu: %s was written", k, gwp);
    cr_expect(strstr(r.err, says) != NULL, "case %zu: stderr %s", k, r.err);
}

/* The teacher's logits Ht Wt^T (+ bt when not NULL), formed here in
 * float64, saved as `name` (its path in tlp) for the --teacher run. */
static void tl_save_logits(char *tlp, const char *name, const double *Ht, const double *Wt, const double *bt)
{
    double Tl[FN * FV];
    kdl_ext_logits(FN, FDT, FV, Ht, Wt, bt, Tl);
    save(tlp, name, KDL_NPY_F64, 2, FN, FV, Tl);
}

/* A cpu (or cuda) run with the teacher as Ht, Wt and, when tbp is not
 * NULL, Bt. */
static void tl_run_linear(kdl_cli_result_t *r, const char *backend, const char *hp, const char *wp, const char *thp,
                          const char *twp, const char *tbp, const char *ghp, const char *gwp)
{
    tl_run(r, backend, hp, wp,
           (const char *const[]){"--teacher-hidden", thp, "--teacher-weight", twp, tbp ? "--teacher-bias" : NULL, tbp,
                                 NULL},
           ghp, gwp);
}

/* The two runs agree: the teacher given as Ht, Wt (, Bt) files and as the
 * logits this test formed from them in float64. */
static void tl_expect_same(const char *what, double la, const double *ha, const double *wa, double lb,
                           const double *hb, const double *wb)
{
    cr_expect(fabs(la - lb) <= 1e-12 * fabs(lb), "%s: loss %.17g, with the logits given %.17g", what, la, lb);
    KDL_EXPECT_CLOSE(what, ha, hb, FN * FD, kdl_ext_tol_rel_max(hb, FN * FD, 1e-12));
    KDL_EXPECT_CLOSE(what, wa, wb, FV * FD, kdl_ext_tol_rel_max(wb, FV * FD, 1e-12));
}

/* --teacher-hidden / --teacher-weight / --teacher-bias (float64, d_t != d)
 * against --teacher with Ht Wt^T + Bt formed here in float64; the JSON's
 * teacher keys and memory model (the teacher's float32 logits chunk in the
 * workspace, both logits in logits_bytes); every bad combination. */
Test(fused_linear, teacher_as_a_linear_layer)
{
    double H[FN * FD], W[FV * FD], T[FN * FV], Ht[FN * FDT], Wt[FV * FDT], bt[FV];
    double Wt4[FV * (FDT + 1)] = {0};
    kdl_rng_t g = {31};
    char hp[512], wp[512], tp[512], thp[512], twp[512], tbp[512], tlp[512], ghp[512], gwp[512];
    char bad_d[512], bad_v[512], bad_n[512], bad_b[512];
    fused_inputs(&g, "l", H, W, T, hp, wp, tp);
    kdl_ext_fill_normal(&g, Ht, FN * FDT, 0.0, 1.0);
    kdl_ext_fill_normal(&g, Wt, FV * FDT, 0.0, 1.2);
    kdl_ext_fill_normal(&g, bt, FV, 0.0, 1.0);
    save(thp, "lth.npy", KDL_NPY_F64, 2, FN, FDT, Ht);
    save(twp, "ltw.npy", KDL_NPY_F64, 2, FV, FDT, Wt);
    save(tbp, "ltb.npy", KDL_NPY_F64, 1, FV, 0, bt);
    save(bad_d, "ltw4.npy", KDL_NPY_F64, 2, FV, FDT + 1, Wt4);
    save(bad_v, "ltwv.npy", KDL_NPY_F64, 2, FV - 1, FDT, Wt);
    save(bad_n, "lthn.npy", KDL_NPY_F64, 2, FN - 1, FDT, Ht);
    save(bad_b, "ltbv.npy", KDL_NPY_F64, 1, FV - 1, 0, bt);
    tpath(ghp, sizeof ghp, "lgh.npy");
    tpath(gwp, sizeof gwp, "lgw.npy");
    tpath(tlp, sizeof tlp, "ltl.npy");

    double la, lb, ha[FN * FD], hb[FN * FD], wa[FV * FD], wb[FV * FD];
    kdl_cli_result_t r;
    for (int with_bias = 0; with_bias < 2; with_bias++) {
        tl_save_logits(tlp, "ltl.npy", Ht, Wt, with_bias ? bt : NULL);
        tl_run_linear(&r, "cpu", hp, wp, thp, twp, with_bias ? tbp : NULL, ghp, gwp);
        cr_expect(strncmp(kdl_json_find(r.out, "teacher"), "\"linear\"", 8) == 0, "%s", r.out);
        cr_expect(kdl_json_read_number(r.out, "teacher_hidden") == FDT, "%s", r.out);
        cr_expect(kdl_json_read_number(r.out, "logits_bytes") == 2 * FN * FV * 4, "%s", r.out);
        const double ws_lin = kdl_json_read_number(r.out, "workspace_bytes");
        tl_read(&r, ghp, gwp, &la, ha, wa);
        tl_run(&r, "cpu", hp, wp, (const char *const[]){"--teacher", tlp, NULL}, ghp, gwp);
        cr_expect(strncmp(kdl_json_find(r.out, "teacher"), "\"logits\"", 8) == 0, "%s", r.out);
        cr_expect(kdl_json_read_number(r.out, "logits_bytes") == FN * FV * 4, "%s", r.out);
        cr_expect(ws_lin - kdl_json_read_number(r.out, "workspace_bytes") == (double)((3 * FV * 4 + 255) / 256 * 256),
                  "workspace %.17g (teacher linear) vs %s", ws_lin, r.out);
        tl_read(&r, ghp, gwp, &lb, hb, wb);
        tl_expect_same(with_bias ? "teacher Ht Wt^T + Bt" : "teacher Ht Wt^T", la, ha, wa, lb, hb, wb);
    }
    /* the teacher matters: other logits, another loss */
    tl_run(&r, "cpu", hp, wp, (const char *const[]){"--teacher", tp, NULL}, ghp, gwp);
    tl_read(&r, ghp, gwp, &lb, hb, wb);
    cr_expect(fabs(la - lb) > 1e-3 * fabs(lb), "another teacher, another loss: %.17g %.17g", la, lb);

    /* bad combinations and shapes: exit 2, one line naming the flags, no output file */
    const struct {
        const char *const t[7];
        const char *says;
    } bad[] = {
        {{"--teacher", tp, "--teacher-hidden", thp, "--teacher-weight", twp, NULL}, "--teacher-hidden"},
        {{NULL}, "--teacher-weight"},
        {{"--teacher-weight", twp, NULL}, "--teacher-hidden"},
        {{"--teacher-hidden", thp, NULL}, "--teacher-weight"},
        {{"--teacher-bias", tbp, NULL}, "--teacher-hidden"},
        {{"--teacher-weight", twp, "--teacher-bias", tbp, NULL}, "--teacher-hidden"},
        {{"--teacher", tp, "--teacher-bias", tbp, NULL}, "--teacher"},
        {{"--teacher-hidden", thp, "--teacher-weight", bad_d, NULL}, "teacher-weight [9, 4]"},
        {{"--teacher-hidden", thp, "--teacher-weight", bad_v, NULL}, "teacher-weight [8, 3]"},
        {{"--teacher-hidden", bad_n, "--teacher-weight", twp, NULL}, "teacher-hidden [3, 3]"},
        {{"--teacher-hidden", thp, "--teacher-weight", twp, "--teacher-bias", bad_b, NULL}, "--teacher-bias"},
        {{"--teacher-hidden", thp, "--teacher-weight", twp, "--teacher-bias", thp, NULL}, "--teacher-bias"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++)
        tl_expect_refused(k, hp, wp, bad[k].t, bad[k].says, ghp, gwp);
    UNLINK(hp, wp, tp, thp, twp, tbp, tlp, bad_d, bad_v, bad_n, bad_b);
}

/* float16 Ht and Wt: as they are (no bias), and with a float32 Bt (the
 * cpu backend's float64 copies of the three), against the logits formed
 * here from the float16 values; --backend cuda on float32 H, W: without a
 * device one line and exit 2, nothing written; with one, within float32
 * GEMM error of the reference. */
Test(fused_linear, teacher_linear_float16)
{
    double H[FN * FD], W[FV * FD], T[FN * FV], Ht[FN * FDT], Wt[FV * FDT], bt[FV];
    uint16_t ht16[FN * FDT], wt16[FV * FDT];
    float bt32[FV], h32[FN * FD], w32[FV * FD];
    kdl_rng_t g = {37};
    char hp[512], wp[512], tp[512], thp[512], twp[512], tbp[512], tlp[512], ghp[512], gwp[512], hp32[512], wp32[512];
    fused_inputs(&g, "m", H, W, T, hp, wp, tp);
    kdl_ext_fill_normal(&g, Ht, FN * FDT, 0.0, 1.0);
    kdl_ext_fill_normal(&g, Wt, FV * FDT, 0.0, 1.2);
    kdl_to_dtype(Ht, ht16, KDL_DTYPE_F16, FN * FDT);
    kdl_to_dtype(Wt, wt16, KDL_DTYPE_F16, FV * FDT);
    kdl_from_dtype(ht16, Ht, KDL_DTYPE_F16, FN * FDT); /* the float16 values, exactly */
    kdl_from_dtype(wt16, Wt, KDL_DTYPE_F16, FV * FDT);
    for (int j = 0; j < FV; j++) bt[j] = bt32[j] = (float)kdl_rng_normal(&g);
    save(thp, "mth16.npy", KDL_NPY_F16, 2, FN, FDT, ht16);
    save(twp, "mtw16.npy", KDL_NPY_F16, 2, FV, FDT, wt16);
    save(tbp, "mtb32.npy", KDL_NPY_F32, 1, FV, 0, bt32);
    tpath(ghp, sizeof ghp, "mgh.npy");
    tpath(gwp, sizeof gwp, "mgw.npy");
    tpath(tlp, sizeof tlp, "mtl.npy");
    double la, lb, ha[FN * FD], hb[FN * FD], wa[FV * FD], wb[FV * FD];
    kdl_cli_result_t r;
    for (int with_bias = 0; with_bias < 2; with_bias++) {
        tl_save_logits(tlp, "mtl.npy", Ht, Wt, with_bias ? bt : NULL);
        tl_run_linear(&r, "cpu", hp, wp, thp, twp, with_bias ? tbp : NULL, ghp, gwp);
        tl_read(&r, ghp, gwp, &la, ha, wa);
        tl_run(&r, "cpu", hp, wp, (const char *const[]){"--teacher", tlp, NULL}, ghp, gwp);
        tl_read(&r, ghp, gwp, &lb, hb, wb);
        tl_expect_same(with_bias ? "float16 Ht, Wt, float32 Bt" : "float16 Ht, Wt", la, ha, wa, lb, hb, wb);
    }
    /* the cuda backend (float32 H and W: float64 files need cpu) */
    for (int i = 0; i < FN * FD; i++) h32[i] = (float)H[i];
    for (int i = 0; i < FV * FD; i++) w32[i] = (float)W[i];
    save(hp32, "mh32.npy", KDL_NPY_F32, 2, FN, FD, h32);
    save(wp32, "mw32.npy", KDL_NPY_F32, 2, FV, FD, w32);
    tl_run(&r, "cpu", hp32, wp32, (const char *const[]){"--teacher", tlp, NULL}, ghp, gwp);
    tl_read(&r, ghp, gwp, &lb, hb, wb);
    tl_run_linear(&r, "cuda", hp32, wp32, thp, twp, tbp, ghp, gwp);
    if (fused_ran_on_cuda(&r, ghp, gwp)) {
        tl_read(&r, ghp, gwp, &la, ha, wa);
        cr_expect(fabs(la - lb) <= 1e-5 * fabs(lb), "cuda loss %.17g want %.17g", la, lb);
        KDL_EXPECT_CLOSE("cuda dH", ha, hb, FN * FD, kdl_ext_tol_rel_max(hb, FN * FD, 1e-5));
        KDL_EXPECT_CLOSE("cuda dW", wa, wb, FV * FD, kdl_ext_tol_rel_max(wb, FV * FD, 1e-5));
    }
    UNLINK(ghp, gwp, hp, wp, tp, thp, twp, tbp, tlp, hp32, wp32);
}

/* ------------------------------------- fused-linear, a sparse (top-k) teacher */
enum { FK = 3 }; /* support size */

/* --teacher-indices / --teacher-logprobs / --mode against a sparse-loss run
 * on the logits H W^T this test forms in float64 (same flags: jsd, beta 0.3,
 * temperature 1.5, sum): the loss, and dH = dL W, dW = dL^T H formed here
 * from sparse-loss's dL, within 1e-12; the JSON's teacher keys; every bad
 * combination exits 2 with one line and no output file. */
Test(fused_linear, sparse_teacher)
{
    double H[FN * FD], W[FV * FD], T[FN * FV], L[FN * FV], P[FN * FK], dL[FN * FV];
    int64_t I[FN * FK], Ib[FN * FK];
    kdl_rng_t g = {43};
    char hp[512], wp[512], tp[512], lp[512], ip[512], pp[512], gp[512], ghp[512], gwp[512], badi[512], shorti[512];
    fused_inputs(&g, "s", H, W, T, hp, wp, tp);
    for (int i = 0; i < FN; i++)
        for (int j = 0; j < FK; j++) {
            I[i * FK + j] = (2 * j + 3 * i) % FV;
            P[i * FK + j] = log(0.5 / (j + 1)) - 0.01 * i;
        }
    memcpy(Ib, I, sizeof Ib);
    Ib[2 * FK + 1] = FV; /* out of range in row 2 */
    kdl_ext_logits(FN, FD, FV, H, W, NULL, L);
    save(lp, "sl.npy", KDL_NPY_F64, 2, FN, FV, L);
    save(ip, "si.npy", KDL_NPY_I64, 2, FN, FK, I);
    save(pp, "sp.npy", KDL_NPY_F64, 2, FN, FK, P);
    save(badi, "sib.npy", KDL_NPY_I64, 2, FN, FK, Ib);
    save(shorti, "sis.npy", KDL_NPY_I64, 2, FN - 1, FK, I);
    tpath(gp, sizeof gp, "sg.npy");
    tpath(ghp, sizeof ghp, "sgh.npy");
    tpath(gwp, sizeof gwp, "sgw.npy");
    const char *modes[2] = {"renormalised", "tail"};
    kdl_cli_result_t r;
    for (int m = 0; m < 2; m++) {
        KDL_CLI(&r, "sparse-loss", "--student", lp, "--teacher-indices", ip, "--teacher-logprobs", pp, "--mode", modes[m],
            "--divergence", "jsd", "--beta", "0.3", "--temperature", "1.5", "--reduction", "sum", "--grad-out", gp,
            "--backend", "cpu");
        cr_assert_eq(r.code, 0, "sparse-loss exit %d: %s", r.code, r.err);
        const double want = kdl_json_read_number(r.out, "loss");
        load_f64(gp, dL, FN * FV);
        unlink(gp);
        double wantH[FN * FD] = {0}, wantW[FV * FD] = {0}, loss, gotH[FN * FD], gotW[FV * FD];
        for (int i = 0; i < FN; i++)
            for (int v = 0; v < FV; v++)
                for (int k = 0; k < FD; k++) {
                    wantH[i * FD + k] += dL[i * FV + v] * W[v * FD + k];
                    wantW[v * FD + k] += dL[i * FV + v] * H[i * FD + k];
                }
        tl_run(&r, "cpu", hp, wp,
               (const char *const[]){"--teacher-indices", ip, "--teacher-logprobs", pp, "--mode", modes[m], NULL}, ghp,
               gwp);
        cr_expect(strncmp(kdl_json_find(r.out, "teacher"), "\"sparse\"", 8) == 0, "%s", r.out);
        cr_expect(kdl_json_read_number(r.out, "k") == FK && kdl_json_read_number(r.out, "bad_index_rows") == 0, "%s",
                  r.out);
        cr_expect(strstr(r.out, modes[m]) != NULL, "%s", r.out);
        cr_expect(kdl_json_read_number(r.out, "logits_bytes") == FN * FV * 4, "%s", r.out);
        tl_read(&r, ghp, gwp, &loss, gotH, gotW);
        tl_expect_same(modes[m], loss, gotH, gotW, want, wantH, wantW);
    }
    /* the teacher matters: the dense teacher gives another loss */
    double other, oh[FN * FD], ow[FV * FD], loss, gh[FN * FD], gw[FV * FD];
    tl_run(&r, "cpu", hp, wp, (const char *const[]){"--teacher", tp, NULL}, ghp, gwp);
    tl_read(&r, ghp, gwp, &other, oh, ow);
    tl_run(&r, "cpu", hp, wp, (const char *const[]){"--teacher-indices", ip, "--teacher-logprobs", pp, "--mode", "tail", NULL},
           ghp, gwp);
    tl_read(&r, ghp, gwp, &loss, gh, gw);
    cr_expect(fabs(loss - other) > 1e-3 * fabs(other), "sparse %.17g vs dense %.17g", loss, other);

    const struct {
        const char *const t[9];
        const char *says;
    } bad[] = {
        {{"--teacher", tp, "--teacher-indices", ip, "--teacher-logprobs", pp, "--mode", "tail", NULL}, "not two"},
        {{"--teacher-hidden", hp, "--teacher-weight", wp, "--teacher-indices", ip, "--teacher-logprobs", pp, NULL},
         "not two"},
        {{"--teacher-indices", ip, "--teacher-logprobs", pp, NULL}, "missing --mode"},
        {{"--teacher-indices", ip, "--mode", "tail", NULL}, "missing --teacher-logprobs"},
        {{"--teacher-logprobs", pp, "--mode", "tail", NULL}, "missing --teacher-indices"},
        {{"--mode", "tail", NULL}, "missing --teacher-indices"},
        {{"--teacher-indices", ip, "--teacher-logprobs", pp, "--mode", "bogus", NULL}, "--mode"},
        {{"--teacher-indices", badi, "--teacher-logprobs", pp, "--mode", "tail", NULL}, "row 2"},
        {{"--teacher-indices", shorti, "--teacher-logprobs", pp, "--mode", "tail", NULL}, "shapes disagree"},
        {{"--teacher-indices", pp, "--teacher-logprobs", pp, "--mode", "tail", NULL}, "int64"},
        {{"--teacher-indices", ip, "--teacher-logprobs", ip, "--mode", "tail", NULL}, "--teacher-logprobs"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++)
        tl_expect_refused(k, hp, wp, bad[k].t, bad[k].says, ghp, gwp);
    /* a divergence the mode does not define */
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher-indices", ip, "--teacher-logprobs", pp,
        "--mode", "renormalised", "--divergence", "rkl", "--grad-hidden-out", ghp);
    expect_usage_error(&r, "fused-linear", ghp);
    cr_expect(strstr(r.err, "not defined") != NULL, "%s", r.err);
    UNLINK(hp, wp, tp, lp, ip, pp, badi, shorti);
}

/* ------------------------------------------------------------ shard-check */
Test(shard_check, sharded_equals_unsharded)
{
    enum { N = 3, V = 40 };
    double S[N * V], T[N * V];
    kdl_rng_t g = {99};
    kdl_fill_logits(&g, S, N * V, 2.0);
    kdl_fill_logits(&g, T, N * V, 2.0);
    T[5] = T[17] = T[33]; /* a tie across shards */
    char sp[512], tp[512], gp[512];
    tpath(gp, sizeof gp, "sg.npy");
    save(sp, "ss.npy", KDL_NPY_F64, 2, N, V, S);
    save(tp, "st.npy", KDL_NPY_F64, 2, N, V, T);
    const char *divs[] = {"fkl", "jsd", "akl", "tvd"};
    for (int k = 0; k < 4; k++) {
        kdl_cli_result_t r;
        KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", tp, "--shards", "3", "--divergence", divs[k],
            "--head-rule", "topk", "--top-k", "6", "--grad-out", gp);
        cr_assert_eq(r.code, 0, "exit %d: %s", r.code, r.err);
        double gmax = kdl_json_read_number(r.out, "max_grad");
        cr_expect(kdl_json_read_number(r.out, "max_abs_diff_loss") <= 1e-12 * fabs(kdl_json_read_number(r.out, "loss")), "%s", r.out);
        cr_expect(kdl_json_read_number(r.out, "max_abs_diff_grad") <= 1e-12 * gmax, "%s", r.out);
        cr_expect(strstr(r.out, "\"split\": [14, 13, 13]") != NULL, "%s", r.out);
        if (k == 2) cr_expect(kdl_json_read_number(r.out, "head_size_mismatches") == 0, "%s", r.out);
        double grad[N * V];
        load_f64(gp, grad, N * V);
        unlink(gp);
    }
    kdl_cli_result_t r;
    KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", tp, "--shards", "2", "--split", "1,39", "--divergence", "akl");
    cr_assert_eq(r.code, 0, "%s", r.err);
    cr_expect(strstr(r.out, "\"steps\": [\"max\", \"sum\", ") != NULL, "%s", r.out);
    KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", tp, "--shards", "2", "--split", "10,10", "--grad-out", gp);
    expect_usage_error(&r, "shard-check", gp);
    KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", tp, "--shards", "0");
    expect_usage_error(&r, "shard-check", NULL);
    KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", tp, "--shards", "41");
    expect_usage_error(&r, "shard-check", NULL);
    KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", tp);
    expect_usage_error(&r, "shard-check", NULL);
    KDL_CLI(&r, "shard-check", "--help");
    cr_expect_eq(r.code, 0);
    UNLINK(sp, tp);
}

Test(main, subcommands_are_listed)
{
    kdl_cli_result_t r;
    KDL_CLI(&r, "--help");
    cr_expect_eq(r.code, 0);
    cr_expect(strstr(r.out, "sparse-loss") && strstr(r.out, "fused-linear") && strstr(r.out, "shard-check"), "%s",
              r.out);
}
