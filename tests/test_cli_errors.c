/*
 * tests/test_cli_errors.c - the error paths of the `kdloss` command that a
 * CPU can reach, each held to the contract (DESIGN section 4, cli_util.h):
 * exactly one line on stderr naming the flag or file, nothing on stdout,
 * exit 2 for bad usage or input and 1 for a failure while writing, no
 * output file and no temporary left behind, an existing file at an output
 * path unchanged.
 *
 *   - top level: no subcommand, an unknown one, --version, --help;
 *   - shapes: empty vocabularies, --x/--y shapes, points with d = 0, empty
 *     problems, batched side inputs, --cost-xx with points;
 *   - output files that cannot be written (loss, sinkhorn, sinkd,
 *     shard-check and fused-linear with the teacher as a linear layer),
 *     made to fail without privileges
 *     (so also when CI runs as root, where permissions do not deny): a
 *     parent that is a regular file (ENOTDIR), a directory as the path
 *     (EISDIR), a name whose temporary is too long (ENAMETOOLONG), a file
 *     size limit (RLIMIT_FSIZE: EFBIG in the .npy writer), and a
 *     stdout that cannot be written (a closed pipe) after the output file
 *     was staged.
 *
 * Expected messages are built from strerror() of the errno each case makes,
 * not copied from the command's output.
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdl_cli_run.h"
#include "kdloss/kdloss_types.h"
#include "npy.h"

/* Files of this suite: KDL_TEST_TMPDIR/clierr_<pid>_<name>. */
static void tpath(char *buf, size_t len, const char *name) { kdl_tmp_path(buf, len, "clierr", name); }

static void npy(const char *name, kdl_npy_dtype_t t, int ndim, const int64_t *shape, const void *data, char *path,
                size_t len)
{
    kdl_tmp_npy(path, len, "clierr", name, t, ndim, shape, data);
}

/* One command line that must fail with `code` and a stderr line holding
 * `needle`, leaving nothing at `out` (when not NULL) and no temporary. */
typedef struct err_case {
    const char *what, *needle;
    int code;
    const char *args[24];
} err_case_t;

static void expect_cases(const err_case_t *cases, size_t n, const char *cmd, const char *out)
{
    for (size_t k = 0; k < n; k++) {
        kdl_cli_result_t r;
        kdl_run_cli(&r, cases[k].args);
        kdl_expect_cli_error(&r, cases[k].code, cmd, cases[k].needle, cases[k].what);
        if (out) {
            cr_expect(!kdl_file_exists(out), "%s: an output file was written", cases[k].what);
            cr_expect(kdl_no_temporaries(out), "%s: a temporary was left", cases[k].what);
        }
    }
}

/* Valid inputs for each subcommand that writes a file. */
typedef struct inputs {
    char s[512], t[512]; /* logits [rows, vocab]; s is also sinkhorn's cost */
} inputs_t;

static void inputs_make(inputs_t *in, int64_t rows, int64_t vocab)
{
    static double S[40000], T[40000];
    for (int64_t k = 0; k < rows * vocab; k++) {
        S[k] = (double)((k * 7) % 11) / 5.0;
        T[k] = (double)((k * 5) % 13) / 6.0;
    }
    const int64_t sh[2] = {rows, vocab};
    npy("s.npy", KDL_NPY_F64, 2, sh, S, in->s, sizeof in->s);
    npy("t.npy", KDL_NPY_F64, 2, sh, T, in->t, sizeof in->t);
}

static void inputs_remove(const inputs_t *in) { unlink(in->s), unlink(in->t); }

enum { CMD_LOSS, CMD_SINKHORN, CMD_SINKD, CMD_SHARD, CMD_FUSED, CMD_COUNT };
static const char *const cmd_names[CMD_COUNT] = {"loss", "sinkhorn", "sinkd", "shard-check", "fused-linear"};

/* The argv (NULL-terminated) of command c writing its file to out. */
static void command(const inputs_t *in, int c, const char *out, const char **argv)
{
    const char *loss[] = {"loss", "--divergence", "fkl", "--student", in->s, "--teacher", in->t, "--backend", "cpu",
                          "--grad-out", out, NULL};
    const char *sinkhorn[] = {"sinkhorn", "--cost", in->s, "--epsilon", "0.5", "--max-iter", "20", "--backend", "cpu",
                              "--plan-out", out, NULL};
    const char *sinkd[] = {"sinkd", "--student", in->s, "--teacher", in->t, "--max-iter", "3", "--backend", "cpu",
                           "--grad-out", out, NULL};
    const char *shard[] = {"shard-check", "--student", in->s, "--teacher", in->t, "--shards", "2", "--backend", "cpu",
                           "--grad-out", out, NULL};
    /* the teacher as a linear layer: H = H_t = s [N, V], W = W_t = t [N, V]
     * (so the logits are [N, N]); the output dH has the inputs' shape */
    const char *fused[] = {"fused-linear", "--hidden", in->s, "--weight", in->t, "--teacher-hidden", in->s,
                           "--teacher-weight", in->t, "--backend", "cpu", "--grad-hidden-out", out, NULL};
    const char *const *src = c == CMD_LOSS       ? loss
                             : c == CMD_SINKHORN ? sinkhorn
                             : c == CMD_SINKD    ? sinkd
                             : c == CMD_SHARD    ? shard
                                                 : fused;
    size_t k = 0;
    for (; src[k]; k++) argv[k] = src[k];
    argv[k] = NULL;
}

/* ------------------------------------------------------------ top level */

Test(cli_errors, top_level_usage_errors_version_and_help)
{
    kdl_cli_result_t r;
    KDL_CLI(&r, "frobnicate");
    kdl_expect_cli_error(&r, 2, NULL, "'frobnicate'", "unknown subcommand");
    kdl_run_cli(&r, (const char *const[]){NULL});
    kdl_expect_cli_error(&r, 2, NULL, "no subcommand", "no arguments");

    char want[64];
    snprintf(want, sizeof want, "kdloss %d.%d.%d\n", KDL_VERSION_MAJOR, KDL_VERSION_MINOR, KDL_VERSION_PATCH);
    KDL_CLI(&r, "--version");
    cr_expect_eq(r.code, 0);
    cr_expect_str_eq(r.out, want);
    cr_expect_eq(r.err[0], '\0');

    const char *names[] = {"loss", "sinkhorn", "sinkd", "bench", "demo", "sparse-loss", "fused-linear", "shard-check"};
    const char *help[] = {"--help", "-h", "help"};
    for (size_t h = 0; h < 3; h++) {
        KDL_CLI(&r, help[h]);
        cr_expect_eq(r.code, 0, "%s: exit %d", help[h], r.code);
        cr_expect(!strncmp(r.out, "usage: kdloss SUBCOMMAND", 24), "%s: %s", help[h], r.out);
        for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
            char line[64];
            snprintf(line, sizeof line, "\n  %s ", names[k]);
            cr_expect(strstr(r.out, line), "%s does not list %s", help[h], names[k]);
        }
        cr_expect_eq(r.err[0], '\0');
    }
}

Test(cli_errors, stdout_that_cannot_be_written_is_exit_one)
{
    kdl_cli_result_t r;
    const char *top[][2] = {{"--help", NULL}, {"--version", NULL}};
    for (size_t k = 0; k < 2; k++) {
        kdl_run_cli_closed_stdout(&r, top[k]);
        kdl_expect_cli_error(&r, 1, NULL, strerror(EPIPE), top[k][0]);
    }
    const char *sub[][3] = {{"loss", "--help", NULL}, {"sinkhorn", "--help", NULL}, {"sinkd", "--help", NULL},
                            {"demo", "--help", NULL}, {"demo", "--backend=cpu", NULL}};
    for (size_t k = 0; k < sizeof sub / sizeof sub[0]; k++) {
        kdl_run_cli_closed_stdout(&r, sub[k]);
        kdl_expect_cli_error(&r, 1, sub[k][0], strerror(EPIPE), sub[k][1]);
    }
}

/* ------------------------------------------------------------- options */

Test(cli_errors, empty_output_file_names)
{
    inputs_t in;
    inputs_make(&in, 2, 3);
    const char *flags[CMD_COUNT] = {"--grad-out", "--plan-out", "--grad-out", "--grad-out", "--grad-hidden-out"};
    for (int c = 0; c < CMD_COUNT; c++) {
        const char *argv[32];
        command(&in, c, "", argv);
        kdl_cli_result_t r;
        kdl_run_cli(&r, argv); /* "--grad-out" "" */
        char needle[64];
        snprintf(needle, sizeof needle, "%s needs a file name", flags[c]);
        kdl_expect_cli_error(&r, 2, cmd_names[c], needle, "empty name");
    }
    kdl_cli_result_t r;
    KDL_CLI(&r, "sinkhorn", "--cost", in.s, "--epsilon", "1", "--plan-out=");
    kdl_expect_cli_error(&r, 2, "sinkhorn", "--plan-out needs a file name", "--plan-out=");
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", in.s, "--teacher", in.t, "--grad-out");
    kdl_expect_cli_error(&r, 2, "loss", "--grad-out needs a value", "no value at the end");
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", in.s, "--teacher", in.t, "--stats=yes");
    kdl_expect_cli_error(&r, 2, "loss", "--stats takes no value", "a switch with a value");
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", in.s, "--divergence", "rkl");
    kdl_expect_cli_error(&r, 2, "loss", "--divergence given twice", "twice");
    KDL_CLI(&r, "loss", "--", in.s);
    kdl_expect_cli_error(&r, 2, "loss", "unexpected argument '--'", "bare --");
    inputs_remove(&in);
}

/* Option values the parser refuses, each naming its flag; -h is --help. */
Test(cli_errors, option_values)
{
    inputs_t in;
    inputs_make(&in, 2, 3);
#define L(...) {"loss", "--divergence", "fkl", "--student", in.s, "--teacher", in.t, __VA_ARGS__}
    const err_case_t cases[] = {
        {"empty number", "--temperature: '' is not a number", 2, L("--temperature", "")},
        {"leading space", "--temperature: ' 1' is not a number", 2, L("--temperature", " 1")},
        {"trailing text", "--mu: '0.5x' is not a number", 2, L("--mu", "0.5x")},
        {"empty integer", "--top-k: '' is not an integer", 2, L("--top-k", "")},
        {"integer overflow", "--top-k must be an integer in [1, 9223372036854775807]", 2,
         L("--top-k", "99999999999999999999")},
        {"value that is an option", "--grad-out needs a value", 2, L("--grad-out", "--stats")},
        {"positional argument", "unexpected argument 'extra'", 2, L("extra")},
        {"single dash", "unexpected argument '-x'", 2, L("-x")},
        {"unknown option with =", "unknown option '--blur'", 2, L("--blur=1")},
    };
#undef L
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        kdl_cli_result_t r;
        kdl_run_cli(&r, cases[k].args);
        kdl_expect_cli_error(&r, cases[k].code, "loss", cases[k].needle, cases[k].what);
    }
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--ignore-index", "-99999999999999999999", "--divergence", "fkl", "--student", in.s,
            "--teacher", in.t);
    kdl_expect_cli_error(&r, 2, "loss", "--ignore-index must be an integer in [-9223372036854775808, ", "ERANGE low");
    KDL_CLI(&r, "loss", "--student", "nowhere.npy", "-h");
    cr_expect_eq(r.code, 0, "-h: exit %d", r.code);
    cr_expect(!strncmp(r.out, "usage: kdloss loss", 18), "-h: '%.80s'", r.out);
    inputs_remove(&in);
}

/* -------------------------------------------------------------- shapes */

Test(cli_errors, loss_empty_vocabulary)
{
    const int64_t s20[2] = {2, 0}, s23[2] = {2, 3}, s0[1] = {0};
    double d[6] = {0, 1, 2, 3, 4, 5};
    char e[512], g[512], e1[512], out[512];
    npy("v0.npy", KDL_NPY_F32, 2, s20, d, e, sizeof e);
    npy("v3.npy", KDL_NPY_F64, 2, s23, d, g, sizeof g);
    npy("v0_1d.npy", KDL_NPY_F64, 1, s0, d, e1, sizeof e1);
    tpath(out, sizeof out, "never.npy");
    unlink(out);
    const err_case_t cases[] = {
        {"[2, 0] student", "--student", 2, {"loss", "--divergence", "fkl", "--student", e, "--teacher", e, "--grad-out", out}},
        {"[2, 0] teacher", "--teacher", 2, {"loss", "--divergence", "fkl", "--student", g, "--teacher", e, "--grad-out", out}},
        {"[0] student", "vocabulary (last dimension) is empty", 2,
         {"loss", "--divergence", "rkl", "--student", e1, "--teacher", e1, "--grad-out", out}},
    };
    expect_cases(cases, sizeof cases / sizeof cases[0], "loss", out);
    unlink(e), unlink(g), unlink(e1);
}

Test(cli_errors, sinkhorn_shapes)
{
    double z[64] = {0};
    const int64_t x32[2] = {3, 2}, y42[2] = {4, 2}, y43[2] = {4, 3}, v3[1] = {3}, x4d[4] = {1, 1, 3, 2},
                  bx[3] = {2, 3, 2}, by[3] = {3, 4, 2}, x30[2] = {3, 0}, y40[2] = {4, 0}, x02[2] = {0, 2},
                  c03[2] = {0, 3}, c20[2] = {2, 0}, bc[3] = {2, 2, 3}, c22[2] = {2, 2}, la2[1] = {2};
    char px32[512], py42[512], py43[512], pv3[512], px4d[512], pbx[512], pby[512], px30[512], py40[512], px02[512],
        pc03[512], pc20[512], pbc[512], pc22[512], pla2[512], out[512];
    npy("x32.npy", KDL_NPY_F64, 2, x32, z, px32, 512);
    npy("y42.npy", KDL_NPY_F32, 2, y42, z, py42, 512);
    npy("y43.npy", KDL_NPY_F64, 2, y43, z, py43, 512);
    npy("v3.npy", KDL_NPY_F64, 1, v3, z, pv3, 512);
    npy("x4d.npy", KDL_NPY_F64, 4, x4d, z, px4d, 512);
    npy("bx.npy", KDL_NPY_F64, 3, bx, z, pbx, 512);
    npy("by.npy", KDL_NPY_F64, 3, by, z, pby, 512);
    npy("x30.npy", KDL_NPY_F64, 2, x30, z, px30, 512);
    npy("y40.npy", KDL_NPY_F64, 2, y40, z, py40, 512);
    npy("x02.npy", KDL_NPY_F64, 2, x02, z, px02, 512);
    npy("c03.npy", KDL_NPY_F64, 2, c03, z, pc03, 512);
    npy("c20.npy", KDL_NPY_F16, 2, c20, z, pc20, 512);
    npy("bc.npy", KDL_NPY_F64, 3, bc, z, pbc, 512);
    npy("c22.npy", KDL_NPY_F64, 2, c22, z, pc22, 512);
    npy("la2.npy", KDL_NPY_F64, 1, la2, z, pla2, 512);
    tpath(out, sizeof out, "never_plan.npy");
    unlink(out);
#define SK(...) {"sinkhorn", "--epsilon", "0.5", "--plan-out", out, __VA_ARGS__}
    const err_case_t cases[] = {
        {"--cost-xx with points", "--cost-xx/--cost-yy go with --cost", 2, SK("--x", px32, "--y", py42, "--cost-xx", pc22)},
        {"--cost-yy with points", "--cost-xx/--cost-yy go with --cost", 2, SK("--x", px32, "--y", py42, "--cost-yy", pc22)},
        {"1-D --x", "shape [3], expected [n, d] or [B, n, d]", 2, SK("--x", pv3, "--y", py42)},
        {"4-D --cost", "shape [1, 1, 3, 2], expected [n, m] or [B, n, m]", 2, SK("--cost", px4d)},
        {"4-D --x", "shape [1, 1, 3, 2], expected [n, d] or [B, n, d]", 2, SK("--x", px4d, "--y", py42)},
        {"--y of another d", "expected [m, 2] (as --x)", 2, SK("--x", px32, "--y", py43)},
        {"--y of another rank", "--y", 2, SK("--x", px32, "--y", pby)},
        {"batched --y of another B", "expected [2, m, 2] (as --x)", 2, SK("--x", pbx, "--y", pby)},
        {"d = 0", "points have no coordinates (d = 0)", 2, SK("--x", px30, "--y", py40)},
        {"no points", "empty problem: n = 0, m = 4", 2, SK("--x", px02, "--y", py42)},
        {"[0, 3] cost", "empty problem: n = 0, m = 3", 2, SK("--cost", pc03)},
        {"[2, 0] cost", "empty problem: n = 2, m = 0", 2, SK("--cost", pc20)},
        {"batched cost, 2-D --cost-xx", "--cost-xx", 2,
         SK("--cost", pbc, "--debias", "--cost-xx", pc22, "--cost-yy", pc22)},
        {"batched cost, 1-D --log-a", "expected [2, 2]", 2, SK("--cost", pbc, "--log-a", pla2)},
    };
#undef SK
    expect_cases(cases, sizeof cases / sizeof cases[0], "sinkhorn", out);
    const char *all[] = {px32, py42, py43, pv3, px4d, pbx, pby, px30, py40, px02, pc03, pc20, pbc, pc22, pla2};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) unlink(all[k]);
}

Test(cli_errors, sinkd_shapes)
{
    double z[16] = {0};
    const int64_t e40[2] = {4, 0}, s45[2] = {4, 5}, s3d[3] = {1, 4, 5};
    char pe[512], ps[512], p3[512], out[512];
    npy("e40.npy", KDL_NPY_F32, 2, e40, z, pe, 512);
    npy("s45.npy", KDL_NPY_F32, 2, s45, z, ps, 512);
    npy("s3d.npy", KDL_NPY_F32, 3, s3d, z, p3, 512);
    tpath(out, sizeof out, "never_sd.npy");
    unlink(out);
    const err_case_t cases[] = {
        {"empty vocabulary", "--student", 2, {"sinkd", "--student", pe, "--teacher", pe, "--grad-out", out}},
        {"3-D student", "expected [N, V]", 2, {"sinkd", "--student", p3, "--teacher", ps, "--grad-out", out}},
        {"3-D teacher", "expected [4, 5] (as --student)", 2, {"sinkd", "--student", ps, "--teacher", p3, "--grad-out", out}},
    };
    expect_cases(cases, sizeof cases / sizeof cases[0], "sinkd", out);
    unlink(pe), unlink(ps), unlink(p3);
}

/* The loss inputs' other shape errors: ranks that differ, labels of the
 * wrong dtype, rank or length. */
Test(cli_errors, loss_shapes_and_labels)
{
    double d[6] = {0, 1, 2, 3, 4, 5};
    int64_t l2[2] = {0, 1}, l3[3] = {0, 1, 2};
    const int64_t s23[2] = {2, 3}, s6[1] = {6}, n2[1] = {2}, n3[1] = {3}, m21[2] = {2, 1};
    char ps[512], p6[512], pl2[512], pl3[512], plf[512], pl21[512], out[512];
    npy("s23.npy", KDL_NPY_F64, 2, s23, d, ps, 512);
    npy("s6.npy", KDL_NPY_F64, 1, s6, d, p6, 512);
    npy("l2.npy", KDL_NPY_I64, 1, n2, l2, pl2, 512);
    npy("l3.npy", KDL_NPY_I64, 1, n3, l3, pl3, 512);
    npy("lf.npy", KDL_NPY_F64, 1, n2, d, plf, 512);
    npy("l21.npy", KDL_NPY_I64, 2, m21, l2, pl21, 512);
    tpath(out, sizeof out, "never_loss.npy");
    unlink(out);
#define L(...) {"loss", "--divergence", "jsd", "--grad-out", out, __VA_ARGS__}
    const err_case_t cases[] = {
        {"ranks differ", "student shape [2, 3] and teacher shape [6] differ", 2, L("--student", ps, "--teacher", p6)},
        {"labels float64", "--labels", 2, L("--student", ps, "--teacher", ps, "--labels", plf)},
        {"labels 2-D", "labels must be int64 [2] (one per row), got int64 [2, 1]", 2,
         L("--student", ps, "--teacher", ps, "--labels", pl21)},
        {"labels too long", "got int64 [3]", 2, L("--student", ps, "--teacher", ps, "--labels", pl3)},
    };
#undef L
    expect_cases(cases, sizeof cases / sizeof cases[0], "loss", out);
    kdl_cli_result_t r; /* the same inputs with labels of the right length run */
    KDL_CLI(&r, "loss", "--divergence", "jsd", "--student", ps, "--teacher", ps, "--labels", pl2, "--backend", "cpu");
    cr_expect_eq(r.code, 0, "%s", r.err);
    const char *all[] = {ps, p6, pl2, pl3, plf, pl21};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) unlink(all[k]);
}

/* sinkhorn's side inputs and option combinations, one case per condition
 * of each check. */
Test(cli_errors, sinkhorn_side_inputs)
{
    double z[64] = {0};
    const int64_t c23[2] = {2, 3}, b23[3] = {2, 2, 3}, v2[1] = {2}, v3[1] = {3}, m22[2] = {2, 2}, m33[2] = {3, 3},
                  m32[2] = {3, 2}, b22[3] = {2, 2, 2}, b33[3] = {2, 3, 3}, b32[3] = {2, 3, 2}, m12[2] = {1, 2},
                  b122[3] = {1, 2, 2};
    char pc[512], pb[512], pv2[512], pv3[512], p22[512], p33[512], p32[512], pb22[512], pb33[512], pb32[512],
        p12[512], pb122[512], missing[512], out[512];
    npy("c23.npy", KDL_NPY_F64, 2, c23, z, pc, 512);
    npy("b23.npy", KDL_NPY_F64, 3, b23, z, pb, 512);
    npy("v2.npy", KDL_NPY_F64, 1, v2, z, pv2, 512);
    npy("v3.npy", KDL_NPY_F64, 1, v3, z, pv3, 512);
    npy("m22.npy", KDL_NPY_F64, 2, m22, z, p22, 512);
    npy("m33.npy", KDL_NPY_F64, 2, m33, z, p33, 512);
    npy("m32.npy", KDL_NPY_F64, 2, m32, z, p32, 512);
    npy("b22.npy", KDL_NPY_F64, 3, b22, z, pb22, 512);
    npy("b33.npy", KDL_NPY_F64, 3, b33, z, pb33, 512);
    npy("b32.npy", KDL_NPY_F64, 3, b32, z, pb32, 512);
    npy("m12.npy", KDL_NPY_F64, 2, m12, z, p12, 512);
    npy("b122.npy", KDL_NPY_F64, 3, b122, z, pb122, 512);
    tpath(missing, sizeof missing, "no_such.npy");
    unlink(missing);
    tpath(out, sizeof out, "never_side.npy");
    unlink(out);
#define SK(...) {"sinkhorn", "--epsilon", "0.5", "--plan-out", out, __VA_ARGS__}
#define DB(xx, yy) SK("--cost", pb, "--debias", "--cost-xx", xx, "--cost-yy", yy)
    const err_case_t cases[] = {
        {"--y alone", "--x and --y go together", 2, SK("--y", pc)},
        {"--debias with --cost-xx only", "--debias with --cost needs --cost-xx and --cost-yy", 2,
         SK("--cost", pc, "--debias", "--cost-xx", p22)},
        {"--y missing", "--y", 2, SK("--x", pc, "--y", missing)},
        {"--log-b missing", "--log-b", 2, SK("--cost", pc, "--log-b", missing)},
        {"--log-b 2-D", "--log-b", 2, SK("--cost", pc, "--log-b", p22)},
        {"--log-b of length n", "expected [3]", 2, SK("--cost", pc, "--log-b", pv2)},
        {"batched --log-b 1-D", "expected [2, 3]", 2, SK("--cost", pb, "--log-b", pv3)},
        {"batched --log-b of another B", "expected [2, 3]", 2, SK("--cost", pb, "--log-b", p12)},
        {"batched --log-b [2, 2]", "expected [2, 3]", 2, SK("--cost", pb, "--log-b", p22)},
        {"--cost-xx [2, 3]", "--cost-xx", 2, SK("--cost", pc, "--debias", "--cost-xx", pc, "--cost-yy", p33)},
        {"--cost-yy [3, 2]", "--cost-yy", 2, SK("--cost", pc, "--debias", "--cost-xx", p22, "--cost-yy", p32)},
        {"--cost-xx 1-D", "--cost-xx", 2, SK("--cost", pc, "--debias", "--cost-xx", pv2, "--cost-yy", p33)},
        {"batched --cost-xx of another B", "expected [2, 2, 2]", 2, DB(pb122, pb33)},
        {"batched --cost-yy [2, 3, 2]", "expected [2, 3, 3]", 2, DB(pb22, pb32)},
        {"batched --cost-yy [2, 2, 2]", "expected [2, 3, 3]", 2, DB(pb22, pb22)},
    };
#undef DB
#undef SK
    expect_cases(cases, sizeof cases / sizeof cases[0], "sinkhorn", out);
    kdl_cli_result_t r; /* the batched debiased problem with the right self costs runs */
    KDL_CLI(&r, "sinkhorn", "--epsilon", "0.5", "--cost", pb, "--debias", "--cost-xx", pb22, "--cost-yy", pb33,
            "--backend", "cpu");
    cr_expect_eq(r.code, 0, "%s", r.err);
    const char *all[] = {pc, pb, pv2, pv3, p22, p33, p32, pb22, pb33, pb32, p12, pb122};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) unlink(all[k]);
}

/* ------------------------------------------------------- output files */

/* Each command with its output path in a "directory" that is a regular
 * file: the temporary cannot be created (ENOTDIR), exit 2, the file
 * unchanged. */
Test(cli_errors, output_under_a_regular_file)
{
    inputs_t in;
    inputs_make(&in, 2, 3);
    char parent[512], out[600];
    tpath(parent, sizeof parent, "plain_file");
    FILE *f = fopen(parent, "wb");
    cr_assert_not_null(f);
    fputs("not a directory", f);
    fclose(f);
    snprintf(out, sizeof out, "%s/out.npy", parent);
    for (int c = 0; c < CMD_COUNT; c++) {
        const char *argv[32];
        command(&in, c, out, argv);
        kdl_cli_result_t r;
        kdl_run_cli(&r, argv);
        char needle[700];
        snprintf(needle, sizeof needle, "cannot write %s: %s", out, strerror(ENOTDIR));
        kdl_expect_cli_error(&r, 2, cmd_names[c], needle, cmd_names[c]);
        char back[64];
        kdl_slurp(parent, back, sizeof back);
        cr_expect_str_eq(back, "not a directory");
    }
    unlink(parent);
    inputs_remove(&in);
}

/* A directory as the output path: refused before anything is written
 * (EISDIR), the directory still empty, no temporary beside it. */
Test(cli_errors, directory_as_the_output_path)
{
    inputs_t in;
    inputs_make(&in, 2, 3);
    char dir[512];
    tpath(dir, sizeof dir, "out_dir.npy");
    rmdir(dir);
    cr_assert_eq(mkdir(dir, 0755), 0);
    for (int c = 0; c < CMD_COUNT; c++) {
        const char *argv[32];
        command(&in, c, dir, argv);
        kdl_cli_result_t r;
        kdl_run_cli(&r, argv);
        char needle[600];
        snprintf(needle, sizeof needle, "cannot write %s: %s", dir, strerror(EISDIR));
        kdl_expect_cli_error(&r, 2, cmd_names[c], needle, cmd_names[c]);
        cr_expect(kdl_no_temporaries(dir), "%s: a temporary was left", cmd_names[c]);
        struct stat sb;
        cr_expect(stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode));
    }
    cr_expect_eq(rmdir(dir), 0, "the directory is not empty any more");
    inputs_remove(&in);
}

/* A name that fits NAME_MAX while its temporary (".tmp.XXXXXX" added)
 * does not: ENAMETOOLONG, exit 2, nothing created. */
Test(cli_errors, output_name_whose_temporary_is_too_long)
{
    long name_max = pathconf(KDL_TEST_TMPDIR, _PC_NAME_MAX);
    if (name_max < 32 || name_max > 1000) cr_skip_test("NAME_MAX of the temporary directory is %ld", name_max);
    inputs_t in;
    inputs_make(&in, 2, 3);
    char name[1100], out[1700];
    memset(name, 'g', (size_t)name_max - 4);
    name[name_max - 4] = '\0';
    snprintf(out, sizeof out, "%s/%s", KDL_TEST_TMPDIR, name);
    unlink(out);
    for (int c = 0; c < CMD_COUNT; c++) {
        const char *argv[32];
        command(&in, c, out, argv);
        kdl_cli_result_t r;
        kdl_run_cli(&r, argv);
        kdl_expect_cli_error(&r, 2, cmd_names[c], strerror(ENAMETOOLONG), cmd_names[c]);
        cr_expect(!kdl_file_exists(out));
    }
    inputs_remove(&in);
}

/* Runs argv with the file size limit at `limit` bytes (inherited by the
 * command; SIGXFSZ ignored, so a write past the limit fails with EFBIG
 * instead of killing it). */
static void run_with_fsize_limit(kdl_cli_result_t *r, const char *const *argv, rlim_t limit)
{
    struct rlimit old, lim;
    cr_assert_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    lim = old;
    lim.rlim_cur = limit;
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
    kdl_run_cli(r, argv);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, prev);
}

/* The output path before a failing run: absent, or (existing) a file
 * holding "old". */
static void out_before(const char *out, int existing)
{
    unlink(out);
    if (!existing) return;
    FILE *f = fopen(out, "wb");
    cr_assert_not_null(f);
    fputs("old", f);
    fclose(f);
}

/* After a failing run: no temporary, and the output path as it was. */
static void expect_out_as_before(const char *out, int existing, const char *what)
{
    cr_expect(kdl_no_temporaries(out), "%s: a temporary was left", what);
    char back[16];
    kdl_slurp(out, back, sizeof back);
    if (existing)
        cr_expect_str_eq(back, "old", "%s: the existing file changed", what);
    else
        cr_expect(!kdl_file_exists(out), "%s: an output file was left", what);
}

/* A write that fails (EFBIG under a file size limit, which the captured
 * stdout/stderr and a coverage build's .gcda files stay below): exit 1,
 * the temporary removed, no output file, an existing file unchanged.  Each
 * output is a 320,128-byte .npy ([4, 10000] float64).  A 256 KiB limit
 * fails in the .npy writer's fwrite ("write error: ..."); a limit one byte
 * short of the file lets glibc's fwrite write every whole block and leaves
 * the failure to the final flush ("write: ..."; another C library may fail
 * in the fwrite: the contract is the same). */
Test(cli_errors, write_failure_leaves_nothing)
{
    inputs_t in;
    inputs_make(&in, 4, 10000);
    char out[512];
    tpath(out, sizeof out, "fsize_out.npy");
    const rlim_t limits[2] = {256 << 10, 128 + 4 * 10000 * 8 - 1};
    for (int l = 0; l < 2; l++)
        for (int existing = 0; existing < 2; existing++)
            for (int c = 0; c < CMD_COUNT; c++) {
                out_before(out, existing);
                const char *argv[32];
                command(&in, c, out, argv);
                kdl_cli_result_t r;
                run_with_fsize_limit(&r, argv, limits[l]);
                char needle[600], what[64];
                snprintf(needle, sizeof needle, "cannot write %s: ", out);
                snprintf(what, sizeof what, "%s, limit %lu", cmd_names[c], (unsigned long)limits[l]);
                kdl_expect_cli_error(&r, 1, cmd_names[c], needle, what);
                cr_expect(strstr(r.err, strerror(EFBIG)), "%s: '%s'", what, r.err);
                expect_out_as_before(out, existing, what);
            }
    unlink(out);
    inputs_remove(&in);
}

/* The JSON cannot be written (stdout a closed pipe) after the output file
 * was staged: exit 1, the file not put in place (an existing one kept),
 * no temporary. */
Test(cli_errors, stdout_failure_leaves_no_output_file)
{
    inputs_t in;
    inputs_make(&in, 2, 3);
    char out[512];
    tpath(out, sizeof out, "stdout_fail.npy");
    for (int existing = 0; existing < 2; existing++)
        for (int c = 0; c < CMD_COUNT; c++) {
            out_before(out, existing);
            const char *argv[32];
            command(&in, c, out, argv);
            kdl_cli_result_t r;
            kdl_run_cli_closed_stdout(&r, argv);
            kdl_expect_cli_error(&r, 1, cmd_names[c], "cannot write the output", cmd_names[c]);
            expect_out_as_before(out, existing, cmd_names[c]);
            /* the same run with a working stdout writes the file */
            kdl_run_cli(&r, argv);
            cr_expect_eq(r.code, 0, "%s: %s", cmd_names[c], r.err);
            kdl_npy_array_t a;
            char msg[256];
            cr_expect_eq(kdl_npy_load(out, &a, msg, sizeof msg), KDL_NPY_OK, "%s: %s", cmd_names[c], msg);
            kdl_npy_free(&a);
        }
    unlink(out);
    inputs_remove(&in);
}
