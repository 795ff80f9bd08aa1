/*
 * tests/test_cli.c - the `kdloss` command end to end (`loss` and `demo`):
 * runs the built binary (KDL_CLI_PATH) with fork/exec, captures stdout,
 * stderr and the exit status, and checks
 *   - losses against closed forms computed here (two-token rows whose
 *     softmaxes are p = (1/2, 1/2), q = (1/4, 3/4));
 *   - the JSON contract: valid JSON, keys, arrays for --reduction none and
 *     --stats, NaN as null, +inf as "inf";
 *   - labels / --ignore-index, --temperature, --scale, 1-D inputs;
 *   - --grad-out equal to kdl_ref_loss_forward_backward called here;
 *   - bad input: exit 2, one line on stderr "kdloss loss: ...", nothing on
 *     stdout, and no --grad-out file (nor a leftover temporary).
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdl_cli_run.h"
#include "kdl_test.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ref.h"
#include "npy.h"

/* Temporary files of this suite: KDL_TEST_TMPDIR/cli_<pid>_<name>. */
static void tpath(char *buf, size_t len, const char *name)
{
    kdl_tmp_path(buf, len, "cli", name);
}

/* ------------------------------------------------------------ JSON values */

static int jstring_is(const char *json, const char *key, const char *want)
{
    char pat[128];
    snprintf(pat, sizeof pat, "\"%s\": \"%s\"", key, want);
    return strstr(json, pat) != NULL;
}

/* ------------------------------------------------------------ input files */

typedef struct files {
    char s[512], t[512], l[512], g[512];
} files_t;

static void files_init(files_t *f)
{
    tpath(f->s, sizeof f->s, "student.npy");
    tpath(f->t, sizeof f->t, "teacher.npy");
    tpath(f->l, sizeof f->l, "labels.npy");
    tpath(f->g, sizeof f->g, "grad.npy");
}

static void files_cleanup(const files_t *f)
{
    unlink(f->s);
    unlink(f->t);
    unlink(f->l);
    unlink(f->g);
}

static void save(const char *path, kdl_npy_dtype_t t, int ndim, int64_t d0, int64_t d1, const void *data)
{
    int64_t shape[2] = {d0, d1};
    char msg[256];
    cr_assert_eq(kdl_npy_save(path, t, ndim, shape, data, msg, sizeof msg), KDL_NPY_OK, "%s", msg);
}

/* Two-token rows: student softmax q = (1/4, 3/4), teacher p = (1/2, 1/2). */
static void write_pq(const files_t *f, int rows)
{
    double s[16], t[16];
    for (int i = 0; i < rows; i++) {
        s[2 * i] = 0.0;
        s[2 * i + 1] = log(3.0);
        t[2 * i] = t[2 * i + 1] = 1.25;
    }
    save(f->s, KDL_NPY_F64, 2, rows, 2, s);
    save(f->t, KDL_NPY_F64, 2, rows, 2, t);
}

/* The suite's files, with write_pq's rows as student and teacher. */
static void files_setup(files_t *f, int rows)
{
    files_init(f);
    write_pq(f, rows);
}

static double kl2(double a0, double a1, double b0, double b1)
{
    return a0 * log(a0 / b0) + a1 * log(a1 / b1);
}

/* The closed forms for p = (1/2, 1/2), q = (1/4, 3/4). */
static double closed_form(const char *div)
{
    const double p0 = 0.5, p1 = 0.5, q0 = 0.25, q1 = 0.75;
    const double fkl = kl2(p0, p1, q0, q1), rkl = kl2(q0, q1, p0, p1);
    if (!strcmp(div, "fkl")) return fkl;
    if (!strcmp(div, "rkl")) return rkl;
    if (!strcmp(div, "fkl_rkl")) return fkl + rkl;
    if (!strcmp(div, "tvd")) return 0.5 * (fabs(p0 - q0) + fabs(p1 - q1));
    if (!strcmp(div, "jsd")) { /* beta 0.5 */
        double m0 = 0.5 * (p0 + q0), m1 = 0.5 * (p1 + q1);
        return 0.5 * kl2(p0, p1, m0, m1) + 0.5 * kl2(q0, q1, m0, m1);
    }
    if (!strcmp(div, "skl")) { /* alpha 0.1: m = 0.1 p + 0.9 q */
        return kl2(p0, p1, 0.1 * p0 + 0.9 * q0, 0.1 * p1 + 0.9 * q1);
    }
    if (!strcmp(div, "srkl")) { /* m = 0.1 q + 0.9 p */
        return kl2(q0, q1, 0.1 * q0 + 0.9 * p0, 0.1 * q1 + 0.9 * p1);
    }
    if (!strcmp(div, "akl")) { /* reference head {token 0}: gaps 1/4 and 1/4, w = 1/2 */
        return 0.5 * fkl + 0.5 * rkl;
    }
    return NAN;
}

static int file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* No file whose name starts with the basename of path is left in its dir
 * (the atomic writer's temporaries are "PATH.tmp.XXXXXX"). */
static int leftovers(const char *path)
{
    const char *slash = strrchr(path, '/');
    char dir[512];
    snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (!strncmp(e->d_name, slash + 1, strlen(slash + 1))) n++;
    closedir(d);
    return n;
}

static void expect_ok_json(const kdl_cli_result_t *r)
{
    cr_expect_eq(r->code, 0, "exit %d, stderr: %s", r->code, r->err);
    cr_expect_str_empty(r->err);
    cr_expect(kdl_json_valid_object(r->out), "not one JSON object: %s", r->out);
}

/* Exit 2, one stderr line "kdloss loss: ..." (containing hint when not
 * NULL), empty stdout, no gradient file or temporary. */
static void expect_usage_error(const kdl_cli_result_t *r, const files_t *f, const char *hint)
{
    cr_expect_eq(r->code, 2, "exit %d (stderr: %s)", r->code, r->err);
    cr_expect(!strncmp(r->err, "kdloss loss: ", 13), "stderr: %s", r->err);
    size_t n = strlen(r->err);
    cr_expect(n > 13 && r->err[n - 1] == '\n' && strchr(r->err, '\n') == r->err + n - 1,
              "stderr is not one line: [%s]", r->err);
    if (hint) cr_expect(strstr(r->err, hint) != NULL, "stderr lacks '%s': %s", hint, r->err);
    cr_expect_str_empty(r->out);
    cr_expect(!file_exists(f->g), "a gradient file was written");
    cr_expect_eq(leftovers(f->g), 0, "a temporary was left next to the gradient file");
}

/* `kdloss loss --student S --teacher T --grad-out G ...` (the files of f,
 * then the listed arguments) is a usage error mentioning hint. */
#define LOSS_REFUSED(f, hint, ...)                                                                           \
    do {                                                                                                     \
        kdl_cli_result_t r_;                                                                                 \
        KDL_CLI(&r_, "loss", "--student", (f)->s, "--teacher", (f)->t, "--grad-out", (f)->g, __VA_ARGS__);   \
        expect_usage_error(&r_, (f), (hint));                                                                \
    } while (0)

/* ------------------------------------------------------- loss: the values */

Test(cli, loss_every_divergence_matches_its_closed_form)
{
    files_t f;
    files_setup(&f, 1);
    const char *divs[] = {"fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl"};
    for (size_t k = 0; k < sizeof divs / sizeof divs[0]; k++) {
        kdl_cli_result_t r;
        KDL_CLI(&r, "loss", "--divergence", divs[k], "--student", f.s, "--teacher", f.t, "--backend", "cpu");
        expect_ok_json(&r);
        double want = closed_form(divs[k]), got = kdl_json_read_number(r.out, "loss");
        cr_expect(fabs(got - want) <= 1e-14 * fabs(want) + 1e-16, "%s: got %.17g want %.17g", divs[k], got, want);
        cr_expect(jstring_is(r.out, "divergence", divs[k]), "%s", r.out);
        cr_expect(jstring_is(r.out, "backend", "cpu"), "%s", r.out);
        cr_expect_eq(kdl_json_read_number(r.out, "valid_rows"), 1);
        cr_expect_eq(kdl_json_read_number(r.out, "invalid_rows"), 0);
    }
    files_cleanup(&f);
}

Test(cli, loss_default_backend_is_reported)
{
    files_t f;
    files_setup(&f, 1);
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t);
    expect_ok_json(&r);
    /* auto: cuda when a device works, else (always without one) cpu */
    if (kdl_test_have_gpu())
        cr_expect(jstring_is(r.out, "backend", "cuda") || jstring_is(r.out, "backend", "cpu"), "%s", r.out);
    else
        cr_expect(jstring_is(r.out, "backend", "cpu"), "%s", r.out);
    cr_expect(fabs(kdl_json_read_number(r.out, "loss") - closed_form("fkl")) < 1e-6);
    files_cleanup(&f);
}

Test(cli, loss_temperature_and_scale)
{
    /* student logits (0, 2 log 3) at tau = 2 give q = (1/4, 3/4) again */
    files_t f;
    files_init(&f);
    double s[2] = {0.0, 2.0 * log(3.0)}, t[2] = {-4.0, -4.0};
    save(f.s, KDL_NPY_F64, 2, 1, 2, s);
    save(f.t, KDL_NPY_F64, 2, 1, 2, t);
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--temperature", "2", "--scale",
        "3", "--backend", "cpu");
    expect_ok_json(&r);
    double want = 3.0 * closed_form("fkl");
    cr_expect(fabs(kdl_json_read_number(r.out, "loss") - want) < 1e-14, "got %.17g want %.17g", kdl_json_read_number(r.out, "loss"), want);
    files_cleanup(&f);
}

Test(cli, loss_reductions_none_sum_mean)
{
    files_t f;
    files_setup(&f, 3);
    kdl_cli_result_t r;
    double v[8], fkl = closed_form("fkl");
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--reduction", "none", "--backend",
        "cpu");
    expect_ok_json(&r);
    cr_assert_eq(kdl_json_read_array(r.out, "loss", v, 8), 3);
    for (int i = 0; i < 3; i++) cr_expect(fabs(v[i] - fkl) < 1e-14);
    cr_expect(jstring_is(r.out, "reduction", "none"));
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--reduction", "sum", "--backend",
        "cpu");
    expect_ok_json(&r);
    cr_expect(fabs(kdl_json_read_number(r.out, "loss") - 3 * fkl) < 1e-14);
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--reduction=mean", "--backend=cpu");
    expect_ok_json(&r);
    cr_expect(fabs(kdl_json_read_number(r.out, "loss") - fkl) < 1e-14);
    cr_expect_eq(kdl_json_read_number(r.out, "rows"), 3);
    cr_expect_eq(kdl_json_read_number(r.out, "vocab"), 2);
    files_cleanup(&f);
}

Test(cli, loss_stats_are_per_row_arrays)
{
    files_t f;
    files_setup(&f, 2);
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--divergence", "akl", "--student", f.s, "--teacher", f.t, "--stats", "--backend", "cpu");
    expect_ok_json(&r);
    cr_assert_not_null(kdl_json_find(r.out, "stats"), "%s", r.out);
    double v[8];
    const char *keys[] = {"fkl", "rkl", "g_head", "g_tail", "head_size", "w_head", "w_tail"};
    const double want[] = {closed_form("fkl"), closed_form("rkl"), 0.25, 0.25, 1, 0.5, 0.5};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        cr_assert_eq(kdl_json_read_array(r.out, keys[k], v, 8), 2, "stats.%s", keys[k]);
        for (int i = 0; i < 2; i++)
            cr_expect(fabs(v[i] - want[k]) < 1e-14, "stats.%s[%d] = %.17g, want %.17g", keys[k], i, v[i], want[k]);
    }
    files_cleanup(&f);
}

Test(cli, loss_without_stats_has_no_stats_key)
{
    files_t f;
    files_setup(&f, 1);
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--backend", "cpu");
    expect_ok_json(&r);
    cr_expect_null(kdl_json_find(r.out, "stats"));
    files_cleanup(&f);
}

Test(cli, loss_labels_and_ignore_index)
{
    files_t f;
    files_setup(&f, 3);
    int64_t labels[3] = {5, -100, 7};
    save(f.l, KDL_NPY_I64, 1, 3, 0, labels);
    kdl_cli_result_t r;
    double v[8], fkl = closed_form("fkl");
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--labels", f.l, "--reduction",
        "none", "--backend", "cpu");
    expect_ok_json(&r);
    cr_assert_eq(kdl_json_read_array(r.out, "loss", v, 8), 3);
    cr_expect(fabs(v[0] - fkl) < 1e-14 && v[1] == 0.0 && fabs(v[2] - fkl) < 1e-14, "%s", r.out);
    cr_expect_eq(kdl_json_read_number(r.out, "valid_rows"), 2);
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--labels", f.l, "--ignore-index",
        "7", "--reduction", "sum", "--backend", "cpu");
    expect_ok_json(&r);
    cr_expect(fabs(kdl_json_read_number(r.out, "loss") - 2 * fkl) < 1e-14, "%s", r.out);
    cr_expect_eq(kdl_json_read_number(r.out, "valid_rows"), 2);
    files_cleanup(&f);
}

Test(cli, loss_nan_is_null_and_inf_is_a_string)
{
    /* row 0: a NaN student logit (invalid row, loss NaN);
     * row 1: the student gives 0 probability to a teacher token (FKL +inf) */
    files_t f;
    files_init(&f);
    double s[4] = {NAN, 0.0, 0.0, -INFINITY}, t[4] = {0.0, 0.0, 0.0, 0.0};
    save(f.s, KDL_NPY_F64, 2, 2, 2, s);
    save(f.t, KDL_NPY_F64, 2, 2, 2, t);
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--reduction", "none", "--stats",
        "--backend", "cpu");
    expect_ok_json(&r);
    double v[4];
    cr_assert_eq(kdl_json_read_array(r.out, "loss", v, 4), 2);
    cr_expect(isnan(v[0]), "%s", r.out);
    cr_expect(isinf(v[1]) && v[1] > 0, "%s", r.out);
    cr_expect(strstr(r.out, "\"loss\": [null, \"inf\"]") != NULL, "%s", r.out);
    cr_expect_eq(kdl_json_read_number(r.out, "invalid_rows"), 1);
    cr_expect_eq(kdl_json_read_number(r.out, "valid_rows"), 1);
    files_cleanup(&f);
}

Test(cli, loss_mixed_dtypes_and_one_dimensional_input)
{
    /* a 1-D [V] file is one row; student float32, teacher float16 */
    files_t f;
    files_init(&f);
    float s[2] = {0.0f, 1.0f};
    uint16_t t[2] = {0x3c00, 0x3c00}; /* 1.0, 1.0 */
    save(f.s, KDL_NPY_F32, 1, 2, 0, s);
    save(f.t, KDL_NPY_F16, 1, 2, 0, t);
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--grad-out", f.g, "--backend",
        "cpu");
    expect_ok_json(&r);
    cr_expect_eq(kdl_json_read_number(r.out, "rows"), 1);
    double q0 = 1.0 / (1.0 + exp(1.0)), want = 0.5 * log(0.5 / q0) + 0.5 * log(0.5 / (1.0 - q0));
    cr_expect(fabs(kdl_json_read_number(r.out, "loss") - want) < 1e-14);
    kdl_npy_array_t g;
    cr_assert_eq(kdl_npy_load(f.g, &g, NULL, 0), KDL_NPY_OK);
    cr_expect_eq(g.dtype, KDL_NPY_F64);
    cr_expect_eq(g.ndim, 1, "the gradient has the student's shape");
    cr_expect_eq(g.shape[0], 2);
    cr_expect(fabs(((double *)g.data)[0] - (q0 - 0.5)) < 1e-15);
    kdl_npy_free(&g);
    files_cleanup(&f);
}

Test(cli, loss_grad_out_equals_the_reference)
{
    enum { N = 5, V = 37 };
    files_t f;
    files_init(&f);
    kdl_rng_t rng = {12345};
    double s[N * V], t[N * V];
    kdl_fill_logits(&rng, s, N * V, 2.0);
    kdl_fill_logits(&rng, t, N * V, 2.0);
    float s32[N * V];
    uint16_t t16[N * V];
    kdl_to_dtype(s, s32, KDL_DTYPE_F32, N * V);
    kdl_to_dtype(t, t16, KDL_DTYPE_F16, N * V);
    save(f.s, KDL_NPY_F32, 2, N, V, s32);
    save(f.t, KDL_NPY_F16, 2, N, V, t16);
    int64_t labels[N] = {1, 2, -3, 4, 5};
    save(f.l, KDL_NPY_I64, 1, N, 0, labels);

    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--divergence", "akl", "--head-rule", "mass", "--mu", "0.3", "--temperature", "1.5", "--scale",
        "2.25", "--labels", f.l, "--ignore-index", "-3", "--student", f.s, "--teacher", f.t, "--grad-out", f.g,
        "--backend", "cpu");
    expect_ok_json(&r);

    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = KDL_DIV_AKL;
    d.head_rule = KDL_HEAD_MASS;
    d.mu = 0.3;
    d.temperature = 1.5;
    d.scale = 2.25;
    d.ignore_index = -3;
    double grad[N * V], loss = 0;
    int64_t valid = 0;
    kdl_loss_args_t a = kdl_test_loss_args(N, V, V, s32, KDL_DTYPE_F32, t16, KDL_DTYPE_F16, grad, KDL_DTYPE_F64, &loss);
    a.labels = labels;
    a.valid_rows = &valid;
    cr_assert_eq(kdl_ref_loss_forward_backward(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());

    cr_expect_eq(kdl_json_read_number(r.out, "loss"), loss, "%%.17g must round-trip the reference loss");
    cr_expect_eq(kdl_json_read_number(r.out, "valid_rows"), (double)valid);
    kdl_npy_array_t g;
    char msg[256];
    cr_assert_eq(kdl_npy_load(f.g, &g, msg, sizeof msg), KDL_NPY_OK, "%s", msg);
    cr_expect_eq(g.dtype, KDL_NPY_F64);
    cr_expect_eq(g.ndim, 2);
    cr_expect_eq(g.shape[0], N);
    cr_expect_eq(g.shape[1], V);
    cr_assert_eq(g.count, N * V);
    KDL_EXPECT_CLOSE("grad-out vs reference", (const double *)g.data, grad, N * V, kdl_tol_for(KDL_DTYPE_F64));
    for (int v = 0; v < V; v++) cr_expect_eq(((double *)g.data)[2 * V + v], 0.0, "ignored row has zero gradient");
    kdl_npy_free(&g);
    cr_expect_eq(leftovers(f.g), 1, "only the gradient file itself");
    files_cleanup(&f);
}

Test(cli, loss_empty_batch_gives_zero)
{
    files_t f;
    files_init(&f);
    save(f.s, KDL_NPY_F32, 2, 0, 4, NULL);
    save(f.t, KDL_NPY_F32, 2, 0, 4, NULL);
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--divergence", "tvd", "--student", f.s, "--teacher", f.t, "--backend", "cpu");
    expect_ok_json(&r);
    cr_expect_eq(kdl_json_read_number(r.out, "loss"), 0.0);
    cr_expect_eq(kdl_json_read_number(r.out, "valid_rows"), 0);
    KDL_CLI(&r, "loss", "--divergence", "tvd", "--student", f.s, "--teacher", f.t, "--reduction", "none", "--backend",
        "cpu");
    expect_ok_json(&r);
    cr_expect(strstr(r.out, "\"loss\": []") != NULL, "%s", r.out);
    files_cleanup(&f);
}

Test(cli, loss_help_exits_zero)
{
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--help");
    cr_expect_eq(r.code, 0);
    cr_expect(strstr(r.out, "usage: kdloss loss") != NULL);
    cr_expect(strstr(r.out, "--grad-out") != NULL && strstr(r.out, "null") != NULL);
    cr_expect_str_empty(r.err);
}

/* ------------------------------------------------------- loss: bad input */

Test(cli, loss_missing_file)
{
    files_t f;
    files_setup(&f, 1);
    kdl_cli_result_t r;
    char missing[512];
    tpath(missing, sizeof missing, "nope.npy");
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", missing, "--teacher", f.t, "--grad-out", f.g);
    expect_usage_error(&r, &f, "--student");
    files_cleanup(&f);
}

Test(cli, loss_truncated_file)
{
    files_t f;
    files_setup(&f, 2);
    cr_assert_eq(truncate(f.t, 128 + 20), 0); /* header + 2.5 of 4 doubles */
    LOSS_REFUSED(&f, "truncated", "--divergence", "fkl");
    files_cleanup(&f);
}

Test(cli, loss_non_npy_file)
{
    files_t f;
    files_setup(&f, 1);
    FILE *fp = fopen(f.s, "w");
    cr_assert_not_null(fp);
    fputs("student,logits\n0,1\n", fp);
    fclose(fp);
    LOSS_REFUSED(&f, "not a .npy file", "--divergence", "fkl");
    files_cleanup(&f);
}

Test(cli, loss_wrong_dtypes)
{
    files_t f;
    files_setup(&f, 1);
    int64_t ints[2] = {0, 1};
    save(f.s, KDL_NPY_I64, 2, 1, 2, ints); /* int64 logits */
    LOSS_REFUSED(&f, "float16, float32 or float64", "--divergence", "fkl");
    /* an int32 file: an unsupported .npy dtype */
    unsigned char buf[128];
    const char *dict = "{'descr': '<i4', 'fortran_order': False, 'shape': (1, 2), }\n";
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    buf[8] = (unsigned char)strlen(dict);
    buf[9] = 0;
    memcpy(buf + 10, dict, strlen(dict));
    memset(buf + 10 + strlen(dict), 0, 8);
    FILE *fp = fopen(f.s, "wb");
    cr_assert_not_null(fp);
    fwrite(buf, 1, 10 + strlen(dict) + 8, fp);
    fclose(fp);
    LOSS_REFUSED(&f, "<i4", "--divergence", "fkl");
    /* float labels */
    write_pq(&f, 1);
    double fl[1] = {1.0};
    save(f.l, KDL_NPY_F64, 1, 1, 0, fl);
    LOSS_REFUSED(&f, "int64", "--divergence", "fkl", "--labels", f.l);
    files_cleanup(&f);
}

Test(cli, loss_shape_mismatches)
{
    files_t f;
    files_setup(&f, 2);
    double t3[6] = {0};
    save(f.t, KDL_NPY_F64, 2, 2, 3, t3);
    LOSS_REFUSED(&f, "differ", "--divergence", "fkl");
    write_pq(&f, 2);
    int64_t labels[3] = {0, 0, 0};
    save(f.l, KDL_NPY_I64, 1, 3, 0, labels);
    LOSS_REFUSED(&f, "--labels", "--divergence", "fkl", "--labels", f.l);
    int64_t shape3[3] = {1, 2, 2};
    double d3[4] = {0};
    cr_assert_eq(kdl_npy_save(f.s, KDL_NPY_F64, 3, shape3, d3, NULL, 0), KDL_NPY_OK);
    cr_assert_eq(kdl_npy_save(f.t, KDL_NPY_F64, 3, shape3, d3, NULL, 0), KDL_NPY_OK);
    LOSS_REFUSED(&f, "3-D", "--divergence", "fkl");
    files_cleanup(&f);
}

Test(cli, loss_unknown_flag_and_bad_names)
{
    files_t f;
    files_setup(&f, 1);
    kdl_cli_result_t r;
    LOSS_REFUSED(&f, "--temprature", "--divergence", "fkl", "--temprature", "2");
    LOSS_REFUSED(&f, "--divergence", "--divergence", "kl");
    LOSS_REFUSED(&f, "--head-rule", "--divergence", "akl", "--head-rule", "median");
    LOSS_REFUSED(&f, "--reduction", "--divergence", "fkl", "--reduction", "avg");
    LOSS_REFUSED(&f, "--backend", "--divergence", "fkl", "--backend", "tpu");
    KDL_CLI(&r, "loss", "--student", f.s, "--teacher", f.t, "--grad-out", f.g);
    expect_usage_error(&r, &f, "--divergence is required");
    LOSS_REFUSED(&f, "stray", "--divergence", "fkl", "stray");
    LOSS_REFUSED(&f, "needs a value", "--divergence", "fkl", "--temperature");
    LOSS_REFUSED(&f, "--stats", "--divergence", "fkl", "--stats=yes");
    LOSS_REFUSED(&f, "twice", "--divergence", "fkl", "--divergence", "rkl");
    files_cleanup(&f);
}

Test(cli, loss_bad_numbers)
{
    files_t f;
    files_setup(&f, 1);
    const char *bad[][2] = {
        {"--temperature", "0"},     {"--temperature", "-1"},   {"--temperature", "nan"}, {"--temperature", "inf"},
        {"--temperature", "2x"},    {"--temperature", ""},     {"--temperature", "1e999"}, {"--beta", "1"},
        {"--beta", "0"},            {"--top-k", "0"},          {"--top-k", "1.5"},       {"--top-k", "99999999999999999999"},
        {"--mu", "1.5"},            {"--mu", "0"},             {"--alpha", "-0.1"},      {"--alpha", "1"},
        {"--scale", "nan"},         {"--scale", "inf"},        {"--ignore-index", "abc"}, {"--ignore-index", "1.0"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++)
        LOSS_REFUSED(&f, bad[k][0], "--divergence", "akl", bad[k][0], bad[k][1]);
    files_cleanup(&f);
}

Test(cli, loss_library_bad_parameter_exits_two)
{
    /* --top-k beyond the vocabulary: caught by the library's check */
    files_t f;
    files_setup(&f, 1);
    LOSS_REFUSED(&f, "KDL_STATUS_BAD_TOP_K", "--divergence", "akl", "--head-rule", "topk", "--top-k", "3", "--backend",
                 "cpu");
    files_cleanup(&f);
}

Test(cli, loss_unwritable_grad_out_leaves_nothing)
{
    files_t f;
    files_setup(&f, 1);
    tpath(f.g, sizeof f.g, "no_such_dir/grad.npy");
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--grad-out", f.g, "--backend", "cpu");
    cr_expect_eq(r.code, 2, "%s", r.err);
    cr_expect(!strncmp(r.err, "kdloss loss: cannot write", 25), "%s", r.err);
    cr_expect_str_empty(r.out);
    files_cleanup(&f);
}

Test(cli, loss_failed_run_keeps_an_existing_grad_file)
{
    files_t f;
    files_setup(&f, 1);
    FILE *fp = fopen(f.g, "w");
    cr_assert_not_null(fp);
    fputs("old", fp);
    fclose(fp);
    kdl_cli_result_t r;
    KDL_CLI(&r, "loss", "--divergence", "fkl", "--student", f.s, "--teacher", f.t, "--grad-out", f.g, "--beta", "1");
    cr_expect_eq(r.code, 2);
    char buf[16];
    kdl_slurp(f.g, buf, sizeof buf);
    cr_expect_str_eq(buf, "old");
    files_cleanup(&f);
}

Test(cli, loss_cuda_backend_without_device_is_a_usage_error)
{
    if (kdl_test_have_gpu()) cr_skip_test("a CUDA device is present: this checks the no-device message");
    files_t f;
    files_setup(&f, 1);
    float s[2] = {0, 1};
    save(f.s, KDL_NPY_F32, 2, 1, 2, s);
    save(f.t, KDL_NPY_F32, 2, 1, 2, s);
    LOSS_REFUSED(&f, "no CUDA device", "--divergence", "fkl", "--backend", "cuda");
    files_cleanup(&f);
}

/* -------------------------------------------------------------------- demo */

Test(cli, demo_runs_every_divergence_and_names_its_backend)
{
    kdl_cli_result_t r;
    KDL_CLI(&r, "demo");
    cr_expect_eq(r.code, 0, "exit %d: %s", r.code, r.err);
    cr_expect(!strncmp(r.out, "backend: cuda (", 15) || !strncmp(r.out, "backend: cpu (", 14), "%.200s", r.out);
    if (!kdl_test_have_gpu())
        cr_expect(!strncmp(r.out, "backend: cpu (float64 reference; no CUDA device found)\n", 55), "%.200s", r.out);
    const char *names[] = {"\nfkl ", "\nrkl ", "\nfkl_rkl ", "akl (reference", "akl (mass", "akl (topk",
                           "\njsd ", "\ntvd ", "\nskl ", "\nsrkl "};
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++)
        cr_expect(strstr(r.out, names[k]) != NULL, "missing '%s' in:\n%s", names[k], r.out);
    cr_expect(strstr(r.out, "nan") == NULL && strstr(r.out, "inf") == NULL, "%s", r.out);
}

Test(cli, demo_cpu_backend_and_bad_option)
{
    kdl_cli_result_t r;
    KDL_CLI(&r, "demo", "--backend", "cpu");
    cr_expect_eq(r.code, 0, "%s", r.err);
    cr_expect(!strncmp(r.out, "backend: cpu (", 14), "%.200s", r.out);
    KDL_CLI(&r, "demo", "--rows", "3");
    cr_expect_eq(r.code, 2);
    cr_expect(!strncmp(r.err, "kdloss demo: ", 13), "%s", r.err);
    KDL_CLI(&r, "demo", "--help");
    cr_expect_eq(r.code, 0);
    cr_expect(strstr(r.out, "usage: kdloss demo") != NULL);
}
