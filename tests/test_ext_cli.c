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
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdl_cli_run.h"
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

static void save(const char *path, kdl_npy_dtype_t t, int ndim, int64_t d0, int64_t d1, const void *data)
{
    int64_t shape[2] = {d0, d1};
    char msg[256];
    cr_assert_eq(kdl_npy_save(path, t, ndim, shape, data, msg, sizeof msg), KDL_NPY_OK, "%s", msg);
}

static void load_f64(const char *path, double *dst, int64_t n)
{
    kdl_npy_array_t a;
    char msg[256];
    cr_assert_eq(kdl_npy_load(path, &a, msg, sizeof msg), KDL_NPY_OK, "%s: %s", path, msg);
    cr_assert_eq(a.count, n, "%s: %lld elements, want %lld", path, (long long)a.count, (long long)n);
    for (int64_t i = 0; i < n; i++) dst[i] = kdl_npy_get_double(&a, i);
    kdl_npy_free(&a);
}

static void expect_usage_error(const kdl_cli_result_t *r, const char *cmd)
{
    cr_expect_eq(r->code, 2, "exit %d, stderr: %s", r->code, r->err);
    cr_expect_str_empty(r->out, "stdout must be empty on error: %s", r->out);
    char pfx[64];
    snprintf(pfx, sizeof pfx, "kdloss %s: ", cmd);
    cr_expect(strncmp(r->err, pfx, strlen(pfx)) == 0, "stderr: %s", r->err);
    const char *nl = strchr(r->err, '\n');
    cr_expect(nl && nl[1] == '\0', "one line on stderr: %s", r->err);
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
    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = div;
    d.temperature = 1.5;
    kdl_sparse_args_t a;
    kdl_sparse_args_init(&a);
    a.mode = mode;
    a.rows = SN;
    a.vocab = SV;
    a.k = SK;
    a.student = S;
    a.ld_student = SV;
    a.student_dtype = KDL_DTYPE_F64;
    a.teacher_indices = I;
    a.ld_indices = SK;
    a.teacher_logprobs = P;
    a.ld_logprobs = SK;
    a.teacher_dtype = KDL_DTYPE_F64;
    a.grad = grad;
    a.ld_grad = SV;
    a.grad_dtype = KDL_DTYPE_F64;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = loss;
    cr_assert_eq(kdl_ref_sparse_loss(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
}

Test(sparse_loss, json_and_gradient_match_the_reference)
{
    double S[SN * SV], P[SN * SK];
    int64_t I[SN * SK];
    sparse_inputs(S, I, P);
    char sp[512], ip[512], pp[512], gp[512];
    tpath(sp, sizeof sp, "s.npy");
    tpath(ip, sizeof ip, "i.npy");
    tpath(pp, sizeof pp, "p.npy");
    tpath(gp, sizeof gp, "g.npy");
    save(sp, KDL_NPY_F64, 2, SN, SV, S);
    save(ip, KDL_NPY_I64, 2, SN, SK, I);
    save(pp, KDL_NPY_F64, 2, SN, SK, P);
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
    unlink(sp);
    unlink(ip);
    unlink(pp);
}

Test(sparse_loss, errors_exit_2_and_write_nothing)
{
    double S[SN * SV], P[SN * SK];
    int64_t I[SN * SK];
    sparse_inputs(S, I, P);
    char sp[512], ip[512], pp[512], gp[512], bp[512], dp[512];
    tpath(sp, sizeof sp, "s2.npy");
    tpath(ip, sizeof ip, "i2.npy");
    tpath(pp, sizeof pp, "p2.npy");
    tpath(gp, sizeof gp, "g2.npy");
    tpath(bp, sizeof bp, "bad_i.npy");
    tpath(dp, sizeof dp, "dup_i.npy");
    save(sp, KDL_NPY_F64, 2, SN, SV, S);
    save(ip, KDL_NPY_I64, 2, SN, SK, I);
    save(pp, KDL_NPY_F64, 2, SN, SK, P);
    int64_t B[SN * SK];
    memcpy(B, I, sizeof B);
    B[1 * SK + 2] = SV; /* out of range in row 1 */
    save(bp, KDL_NPY_I64, 2, SN, SK, B);
    memcpy(B, I, sizeof B);
    B[2 * SK + 3] = B[2 * SK + 0]; /* repeated in row 2 */
    save(dp, KDL_NPY_I64, 2, SN, SK, B);
    kdl_cli_result_t r;
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", bp, "--teacher-logprobs", pp, "--mode", "tail",
        "--grad-out", gp);
    expect_usage_error(&r, "sparse-loss");
    cr_expect(strstr(r.err, "row 1") != NULL, "%s", r.err);
    cr_expect(!exists(gp));
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", dp, "--teacher-logprobs", pp, "--mode", "tail",
        "--grad-out", gp);
    expect_usage_error(&r, "sparse-loss");
    cr_expect(strstr(r.err, "repeated") != NULL, "%s", r.err);
    cr_expect(!exists(gp));
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", pp, "--mode",
        "renormalised", "--divergence", "rkl", "--grad-out", gp);
    expect_usage_error(&r, "sparse-loss");
    cr_expect(!exists(gp));
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", pp);
    expect_usage_error(&r, "sparse-loss"); /* --mode is required */
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", sp, "--mode", "tail");
    expect_usage_error(&r, "sparse-loss"); /* log-probs of the wrong shape */
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", pp, "--teacher-logprobs", pp, "--mode", "tail");
    expect_usage_error(&r, "sparse-loss"); /* float indices */
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", pp, "--mode", "bogus");
    expect_usage_error(&r, "sparse-loss");
    KDL_CLI(&r, "sparse-loss", "--student", sp, "--teacher-indices", ip, "--teacher-logprobs", pp, "--mode", "tail",
        "--temperature", "0");
    expect_usage_error(&r, "sparse-loss");
    KDL_CLI(&r, "sparse-loss", "--help");
    cr_expect_eq(r.code, 0);
    cr_expect(strstr(r.out, "renormalised") != NULL);
    unlink(sp);
    unlink(ip);
    unlink(pp);
    unlink(bp);
    unlink(dp);
}

/* ----------------------------------------------------------- fused-linear */
enum { FN = 4, FD = 5, FV = 9 };

Test(fused_linear, json_and_gradients_match_the_reference)
{
    double H[FN * FD], W[FV * FD], T[FN * FV];
    kdl_rng_t g = {7};
    for (int j = 0; j < FN * FD; j++) H[j] = kdl_rng_normal(&g);
    for (int j = 0; j < FV * FD; j++) W[j] = 0.8 * kdl_rng_normal(&g);
    for (int j = 0; j < FN * FV; j++) T[j] = 2 * kdl_rng_normal(&g);
    char hp[512], wp[512], tp[512], ghp[512], gwp[512];
    tpath(hp, sizeof hp, "h.npy");
    tpath(wp, sizeof wp, "w.npy");
    tpath(tp, sizeof tp, "t.npy");
    tpath(ghp, sizeof ghp, "gh.npy");
    tpath(gwp, sizeof gwp, "gw.npy");
    save(hp, KDL_NPY_F64, 2, FN, FD, H);
    save(wp, KDL_NPY_F64, 2, FV, FD, W);
    save(tp, KDL_NPY_F64, 2, FN, FV, T);
    kdl_cli_result_t r;
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--divergence", "rkl", "--reduction",
        "sum", "--grad-hidden-out", ghp, "--grad-weight-out", gwp, "--chunk-rows", "2");
    cr_assert_eq(r.code, 0, "exit %d: %s", r.code, r.err);
    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = KDL_DIV_RKL;
    d.reduction = KDL_REDUCTION_SUM;
    double loss, dH[FN * FD], dW[FV * FD], gotH[FN * FD], gotW[FV * FD];
    kdl_fused_linear_args_t a;
    kdl_fused_linear_args_init(&a);
    a.rows = FN;
    a.hidden = FD;
    a.vocab = FV;
    a.hidden_states = H;
    a.ld_hidden = FD;
    a.hidden_dtype = KDL_DTYPE_F64;
    a.weight = W;
    a.ld_weight = FD;
    a.weight_dtype = KDL_DTYPE_F64;
    a.teacher = T;
    a.ld_teacher = FV;
    a.teacher_dtype = KDL_DTYPE_F64;
    a.grad_hidden = dH;
    a.ld_grad_hidden = FD;
    a.grad_weight = dW;
    a.ld_grad_weight = FD;
    a.grad_dtype = KDL_DTYPE_F64;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = &loss;
    cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS);
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
    unlink(ghp);
    unlink(gwp);
    /* errors: shapes that disagree, a bad chunk; no output file */
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", tp, "--teacher", tp, "--grad-hidden-out", ghp);
    expect_usage_error(&r, "fused-linear");
    cr_expect(!exists(ghp));
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--chunk-rows", "0", "--grad-weight-out",
        gwp);
    expect_usage_error(&r, "fused-linear");
    cr_expect(!exists(gwp));
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp);
    expect_usage_error(&r, "fused-linear");
    KDL_CLI(&r, "fused-linear", "--help");
    cr_expect_eq(r.code, 0);
    unlink(hp);
    unlink(wp);
    unlink(tp);
}

/* --bias (float32, with float64 weights: the reference's float64 copies),
 * --grad-output with --reduction none, --grad-bias-out: against the
 * reference called directly. */
Test(fused_linear, bias_and_grad_output)
{
    double H[FN * FD], W[FV * FD], T[FN * FV], G[FN], b64[FV];
    float b[FV];
    kdl_rng_t g = {17};
    for (int j = 0; j < FN * FD; j++) H[j] = kdl_rng_normal(&g);
    for (int j = 0; j < FV * FD; j++) W[j] = 0.8 * kdl_rng_normal(&g);
    for (int j = 0; j < FN * FV; j++) T[j] = 2 * kdl_rng_normal(&g);
    for (int j = 0; j < FN; j++) G[j] = kdl_rng_normal(&g);
    for (int j = 0; j < FV; j++) b64[j] = b[j] = (float)kdl_rng_normal(&g);
    char hp[512], wp[512], tp[512], bp[512], gp[512], ghp[512], gbp[512];
    tpath(hp, sizeof hp, "bh.npy");
    tpath(wp, sizeof wp, "bw.npy");
    tpath(tp, sizeof tp, "bt.npy");
    tpath(bp, sizeof bp, "bb.npy");
    tpath(gp, sizeof gp, "bg.npy");
    tpath(ghp, sizeof ghp, "bgh.npy");
    tpath(gbp, sizeof gbp, "bgb.npy");
    save(hp, KDL_NPY_F64, 2, FN, FD, H);
    save(wp, KDL_NPY_F64, 2, FV, FD, W);
    save(tp, KDL_NPY_F64, 2, FN, FV, T);
    save(bp, KDL_NPY_F32, 1, FV, 0, b);
    save(gp, KDL_NPY_F64, 1, FN, 0, G);
    kdl_cli_result_t r;
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--divergence", "jsd", "--reduction",
        "none", "--bias", bp, "--grad-output", gp, "--grad-hidden-out", ghp, "--grad-bias-out", gbp);
    cr_assert_eq(r.code, 0, "exit %d: %s", r.code, r.err);
    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = KDL_DIV_JSD;
    d.reduction = KDL_REDUCTION_NONE;
    double loss[FN], dH[FN * FD], db[FV], got[FN * FD];
    kdl_fused_linear_args_t a;
    kdl_fused_linear_args_init(&a);
    a.rows = FN;
    a.hidden = FD;
    a.vocab = FV;
    a.hidden_states = H;
    a.ld_hidden = FD;
    a.hidden_dtype = KDL_DTYPE_F64;
    a.weight = W;
    a.ld_weight = FD;
    a.weight_dtype = KDL_DTYPE_F64;
    a.teacher = T;
    a.ld_teacher = FV;
    a.teacher_dtype = KDL_DTYPE_F64;
    a.bias = b64;
    a.grad_output = G;
    a.grad_output_dtype = KDL_DTYPE_F64;
    a.grad_hidden = dH;
    a.ld_grad_hidden = FD;
    a.grad_bias = db;
    a.grad_dtype = KDL_DTYPE_F64;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = loss;
    cr_assert_eq(kdl_ref_fused_linear_loss(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    double jl[FN];
    cr_assert_eq(kdl_json_read_array(r.out, "loss", jl, FN), FN, "%s", r.out);
    kdl_tol_t tol = {0, 0};
    KDL_EXPECT_CLOSE("loss", jl, loss, FN, tol);
    load_f64(ghp, got, FN * FD);
    KDL_EXPECT_CLOSE("dH", got, dH, FN * FD, tol);
    load_f64(gbp, got, FV);
    KDL_EXPECT_CLOSE("db", got, db, FV, tol);
    unlink(ghp);
    unlink(gbp);
    /* errors: grad_output with a reduction, a bias of the wrong length; no output file */
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--grad-output", gp, "--grad-bias-out",
        gbp);
    expect_usage_error(&r, "fused-linear");
    cr_expect(!exists(gbp));
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--bias", gp, "--grad-bias-out", gbp);
    expect_usage_error(&r, "fused-linear");
    cr_expect(!exists(gbp));
    KDL_CLI(&r, "fused-linear", "--hidden", hp, "--weight", wp, "--teacher", tp, "--grad-hidden-out", ghp,
        "--grad-bias-out", ghp);
    expect_usage_error(&r, "fused-linear");
    unlink(hp);
    unlink(wp);
    unlink(tp);
    unlink(bp);
    unlink(gp);
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
    tpath(sp, sizeof sp, "ss.npy");
    tpath(tp, sizeof tp, "st.npy");
    tpath(gp, sizeof gp, "sg.npy");
    save(sp, KDL_NPY_F64, 2, N, V, S);
    save(tp, KDL_NPY_F64, 2, N, V, T);
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
    expect_usage_error(&r, "shard-check");
    cr_expect(!exists(gp));
    KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", tp, "--shards", "0");
    expect_usage_error(&r, "shard-check");
    KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", tp, "--shards", "41");
    expect_usage_error(&r, "shard-check");
    KDL_CLI(&r, "shard-check", "--student", sp, "--teacher", tp);
    expect_usage_error(&r, "shard-check");
    KDL_CLI(&r, "shard-check", "--help");
    cr_expect_eq(r.code, 0);
    unlink(sp);
    unlink(tp);
}

Test(main, subcommands_are_listed)
{
    kdl_cli_result_t r;
    KDL_CLI(&r, "--help");
    cr_expect_eq(r.code, 0);
    cr_expect(strstr(r.out, "sparse-loss") && strstr(r.out, "fused-linear") && strstr(r.out, "shard-check"), "%s",
              r.out);
}
