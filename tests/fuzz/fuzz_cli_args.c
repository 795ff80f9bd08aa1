/*
 * tests/fuzz/fuzz_cli_args.c - libFuzzer target: the subcommands of the
 * `kdloss` command (host/cli_*.c, host/cli_util.c, bench/bench_lib.c) on
 * arbitrary argument vectors.
 *
 * The input is split at '\n' into at most 48 words.  When the first word
 * names a subcommand (loss sinkhorn sinkd sparse-loss shard-check
 * fused-linear bench demo) it selects it and argv = the words; otherwise
 * argv = {"loss", words} (the format of the first corpus, loss only).  The
 * subcommand's entry (kdl_cli_loss, kdl_cli_sinkhorn, ...) runs whole: the
 * option parser, the number and name parsers, then the .npy loads and the
 * computation when the arguments get that far.  Every '/' in a word becomes
 * '_', and the process works in a private directory
 * ($TMPDIR, else /dev/shm, else /tmp)/kdl_fuzz_cli.XXXXXX/work, so a word can
 * name only files there.  That directory holds small fixtures (make_fixtures
 * below; the seeds name them): logits s.npy t.npy (f32 [2,5]), h.npy (f16
 * [5]), d.npy (f64 [2,5]), n.npy (f32 [2,5] with NaN, +inf, -inf rows),
 * x.npy (f32 [3,5]), labels l.npy (i64 [2]); costs c.npy (f32 [3,4]),
 * cb.npy (f64 [2,3,4]), cxx.npy / cyy.npy (f32 [3,3] / [4,4]); points px.npy
 * / py.npy (f32 [3,2] / [4,2]), pbx.npy / pby.npy (f16 [2,3,2] / f32
 * [2,4,2]); log-weights la.npy (f64 [3], one -inf), lb.npy (f32 [4]);
 * sparse teacher i.npy (i64 [2,3]), j.npy (i64 [2,3], a repeated and an
 * out-of-range index), g.npy (f32 [2,3] log-probs); hidden states hs.npy
 * (f32 [2,3]) and weights wt.npy (f32 [5,3]), a bias bv.npy (f32 [5]); empty z.npy (f32 [0,5]) and
 * zc.npy (f32 [0,3,4]), a scalar sc.npy (f64 []); e.npy (0 bytes), b.npy
 * (not .npy), dir (a directory).
 * The number parsers (kdl_cli_parse_double, kdl_cli_parse_int64) are also
 * called directly on every word.
 *
 * Bounded work: a --max-iter value above MAX_ITER_CAP becomes MAX_ITER_CAP
 * (a legal but long computation is not a finding), and `demo`, whose
 * computation takes a while, runs in full once per backend value per
 * process (kdl_cli_demo_parse tells a valid invocation; bad options and
 * --help always run).  `bench` without a device stops after its options.
 *
 * Oracle (abort on violation):
 *   - the entry returns 0, 1 or 2 (and does not exit, crash or hang);
 *   - 0: nothing on stderr, something on stdout (one line, a JSON object,
 *     for the JSON subcommands unless --help was asked for);
 *   - 1 or 2: exactly one line on stderr, starting "kdloss <sub>: ", and
 *     nothing on stdout;
 *   - no file other than the fixtures and the outputs of a successful run
 *     (--grad-out, --plan-out, --grad-hidden-out, --grad-weight-out,
 *     --json-out) is left (a failed run writes no output file, not even a
 *     temporary), and no fixture changes unless it was named as an output
 *     of a successful run;
 *   - a number the parsers accept is finite and inside the given interval.
 * stdout and stderr are captured per run into files, and the sanitizers
 * report to the original stderr.  KDL_FUZZ_SHOW=1 prints each run (argv,
 * exit code, stdout, stderr) there, to see what a replayed input does.
 */
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sanitizer/common_interface_defs.h>

#include "cli.h"
#include "cli_util.h"
#include "npy.h"

#define MAX_WORDS 48
#define MAX_ITER_CAP 1000

/* The subcommands, as host/cli_main.c dispatches them, with the flags that
 * name an output file and whether stdout is one JSON object. */
typedef struct subcommand {
    const char *name;
    int (*run)(int, char **);
    const char *outputs[3];
    int json;
} subcommand_t;

static const subcommand_t subcommands[] = {
    {"loss", kdl_cli_loss, {"--grad-out"}, 1},
    {"sinkhorn", kdl_cli_sinkhorn, {"--plan-out"}, 1},
    {"sinkd", kdl_cli_sinkd, {"--grad-out"}, 1},
    {"sparse-loss", kdl_cli_sparse_loss, {"--grad-out"}, 1},
    {"shard-check", kdl_cli_shard_check, {"--grad-out"}, 1},
    {"fused-linear", kdl_cli_fused_linear, {"--grad-hidden-out", "--grad-weight-out", "--grad-bias-out"}, 1},
    {"bench", kdl_cli_bench, {"--json-out"}, 0},
    {"demo", kdl_cli_demo, {NULL}, 0},
};
#define N_SUBCOMMANDS (sizeof subcommands / sizeof subcommands[0])

static char base_dir[512], work_dir[600], err_path[600], out_path[600];
static int saved_stderr = -1, err_fd = -1, out_fd = -1, home_fd = -1;

/* The run works in work_dir; libFuzzer's own paths (corpus, artifacts) stay
 * relative to the directory it was started in. */
static void enter_work(void)
{
    if (chdir(work_dir) != 0) abort();
}
static void leave_work(void)
{
    if (fchdir(home_fd) != 0) abort();
}

/* ---------------------------------------------------------------- fixtures */
typedef struct fixture {
    const char *name;
    unsigned char *bytes;
    size_t size;
} fixture_t;

static fixture_t fixtures[40];
static int n_fixtures;

static void fail(const char *fmt, const char *a, const char *b)
{
    char line[1024];
    int n = snprintf(line, sizeof line, "fuzz_cli_args: ");
    n += snprintf(line + n, sizeof line - (size_t)n, fmt, a ? a : "", b ? b : "");
    n += snprintf(line + n, sizeof line - (size_t)n, "\n");
    if (write(saved_stderr >= 0 ? saved_stderr : 2, line, (size_t)n) < 0) { /* nothing to do */
    }
    abort();
}

static unsigned char *slurp(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 256, n = 0;
    unsigned char *buf = (unsigned char *)malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            unsigned char *nb = (unsigned char *)realloc(buf, cap *= 2);
            if (!nb) free(buf);
            buf = nb;
        }
    }
    fclose(f);
    *size = n;
    return buf;
}

static void add_fixture(const char *name, kdl_npy_dtype_t t, int ndim, const int64_t *shape, const void *data)
{
    char msg[256];
    if (data) {
        if (kdl_npy_save(name, t, ndim, shape, data, msg, sizeof msg) != KDL_NPY_OK) fail("fixture %s: %s", name, msg);
    }
    fixture_t *f = &fixtures[n_fixtures++];
    f->name = name;
    f->bytes = slurp(name, &f->size);
    if (!f->bytes) fail("fixture %s unreadable%s", name, NULL);
}

static void add_raw_fixture(const char *name, const char *bytes, size_t n)
{
    FILE *f = fopen(name, "wb");
    if (!f || fwrite(bytes, 1, n, f) != n || fclose(f) != 0) fail("fixture %s%s", name, NULL);
    add_fixture(name, KDL_NPY_F32, 0, NULL, NULL);
}

static void restore_fixture(const fixture_t *f)
{
    FILE *o = fopen(f->name, "wb");
    if (!o || fwrite(f->bytes, 1, f->size, o) != f->size || fclose(o) != 0) fail("cannot restore %s%s", f->name, NULL);
}

static const fixture_t *find_fixture(const char *name)
{
    for (int k = 0; k < n_fixtures; k++)
        if (!strcmp(fixtures[k].name, name)) return &fixtures[k];
    return NULL;
}

static void make_fixtures(void)
{
    const double ninf = -INFINITY;
    float st[10] = {1, 2, 3, 4, 5, -1, 0, 0.5f, 2, 1};
    float tt[10] = {0.5f, 2, 1, 4, 3, 0, 0, 1, -2, 1};
    float xt[15] = {0};
    double dt[10] = {1, 2, 3, 4, 5, 5, 4, 3, 2, 1};
    uint16_t ht[5] = {0x3c00, 0x4000, 0x0000, 0xbc00, 0x3800};
    float nt[10] = {NAN, 1, 2, 3, 4, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t lt[2] = {-100, 3};
    float ct[12] = {0, 1, 2, 3, 1, 0, 1, 2, 2, 1, 0, 1};
    double cbt[24];
    for (int k = 0; k < 24; k++) cbt[k] = (double)((k * 7) % 5) * 0.5;
    float cxx[9] = {0, 1, 4, 1, 0, 1, 4, 1, 0};
    float cyy[16] = {0, 1, 2, 3, 1, 0, 1, 2, 2, 1, 0, 1, 3, 2, 1, 0};
    float pxt[6] = {0, 0, 1, 0, 0, 1};
    float pyt[8] = {0.5f, 0.5f, 1, 1, -1, 0, 0, -2};
    uint16_t pbx[12] = {0x0000, 0x3c00, 0x3c00, 0x0000, 0x4000, 0x4000, 0xbc00, 0x0000, 0x3800, 0x3800, 0x0000, 0x4200};
    float pby[16] = {0, 0, 1, 1, 2, 2, 3, 3, -1, 0, 0, -1, 1, 0, 0, 1};
    double lat[3] = {-0.6931471805599453, -0.6931471805599453, ninf};
    float lbt[4] = {-1.3862944f, -1.3862944f, -1.3862944f, -1.3862944f};
    int64_t it[6] = {0, 3, 4, 2, 1, 0};
    int64_t jt[6] = {0, 0, 4, 2, 1, 5};
    float gt[6] = {-0.5f, -1.5f, -2.5f, -0.2f, -2, -3};
    float hst[6] = {1, -0.5f, 0.25f, 0, 2, -1};
    float wtt[15] = {0.1f, 0.2f, 0.3f, -0.1f, 0, 0.5f, 1, 1, 1, -1, 0.5f, 0, 0.3f, -0.2f, 0.1f};
    float bvt[5] = {0.5f, -1, 0, 2, -0.25f};
    const int64_t s25[2] = {2, 5}, s35[2] = {3, 5}, s5[1] = {5}, s2[1] = {2}, s34[2] = {3, 4}, s234[3] = {2, 3, 4},
                  s33[2] = {3, 3}, s44[2] = {4, 4}, s32[2] = {3, 2}, s42[2] = {4, 2}, s232[3] = {2, 3, 2},
                  s242[3] = {2, 4, 2}, s3[1] = {3}, s4[1] = {4}, s23[2] = {2, 3}, s53[2] = {5, 3};
    add_fixture("s.npy", KDL_NPY_F32, 2, s25, st);
    add_fixture("t.npy", KDL_NPY_F32, 2, s25, tt);
    add_fixture("h.npy", KDL_NPY_F16, 1, s5, ht);
    add_fixture("d.npy", KDL_NPY_F64, 2, s25, dt);
    add_fixture("n.npy", KDL_NPY_F32, 2, s25, nt);
    add_fixture("l.npy", KDL_NPY_I64, 1, s2, lt);
    add_fixture("x.npy", KDL_NPY_F32, 2, s35, xt);
    add_fixture("c.npy", KDL_NPY_F32, 2, s34, ct);
    add_fixture("cb.npy", KDL_NPY_F64, 3, s234, cbt);
    add_fixture("cxx.npy", KDL_NPY_F32, 2, s33, cxx);
    add_fixture("cyy.npy", KDL_NPY_F32, 2, s44, cyy);
    add_fixture("px.npy", KDL_NPY_F32, 2, s32, pxt);
    add_fixture("py.npy", KDL_NPY_F32, 2, s42, pyt);
    add_fixture("pbx.npy", KDL_NPY_F16, 3, s232, pbx);
    add_fixture("pby.npy", KDL_NPY_F32, 3, s242, pby);
    add_fixture("la.npy", KDL_NPY_F64, 1, s3, lat);
    add_fixture("lb.npy", KDL_NPY_F32, 1, s4, lbt);
    add_fixture("i.npy", KDL_NPY_I64, 2, s23, it);
    add_fixture("j.npy", KDL_NPY_I64, 2, s23, jt);
    add_fixture("g.npy", KDL_NPY_F32, 2, s23, gt);
    add_fixture("hs.npy", KDL_NPY_F32, 2, s23, hst);
    add_fixture("wt.npy", KDL_NPY_F32, 2, s53, wtt);
    add_fixture("bv.npy", KDL_NPY_F32, 1, s5, bvt);
    const int64_t s05[2] = {0, 5}, s034[3] = {0, 3, 4};
    const double one = 1.0;
    add_fixture("z.npy", KDL_NPY_F32, 2, s05, xt);
    add_fixture("zc.npy", KDL_NPY_F32, 3, s034, xt);
    add_fixture("sc.npy", KDL_NPY_F64, 0, NULL, &one);
    add_raw_fixture("e.npy", "", 0);
    add_raw_fixture("b.npy", "\x93NUMPY\x01\x00\xff\xff{'descr'", 17);
    if (mkdir("dir", 0700) != 0) fail("mkdir dir%s%s", NULL, NULL);
}

/* The output files a run may write: the values of the subcommand's output
 * flags ("--flag NAME" or "--flag=NAME"; every candidate, a superset of
 * what the parser takes). */
static int output_names(const subcommand_t *sub, int argc, char **argv, const char **names, int cap)
{
    int n = 0;
    for (int k = 1; k < argc; k++)
        for (int o = 0; o < 3 && sub->outputs[o]; o++) {
            const char *f = sub->outputs[o];
            size_t len = strlen(f);
            const char *name = NULL;
            if (!strcmp(argv[k], f) && k + 1 < argc) name = argv[k + 1];
            if (!strncmp(argv[k], f, len) && argv[k][len] == '=') name = argv[k] + len + 1;
            if (name && n < cap) names[n++] = name;
        }
    return n;
}

static int is_output(const char *name, const char **outs, int n_outs)
{
    for (int k = 0; k < n_outs; k++)
        if (!strcmp(outs[k], name)) return 1;
    return 0;
}

/* Every entry of the work directory is a fixture, "dir", or (after a
 * successful run) one of its outputs, which is removed again. */
static void check_directory(int rc, const char **outs, int n_outs)
{
    DIR *d = opendir(".");
    if (!d) fail("opendir%s%s", NULL, NULL);
    struct dirent *e;
    char extra[256] = "";
    while ((e = readdir(d)) != NULL) {
        const char *n = e->d_name;
        if (!strcmp(n, ".") || !strcmp(n, "..") || !strcmp(n, "dir")) continue;
        const fixture_t *f = find_fixture(n);
        int is_out = rc == 0 && is_output(n, outs, n_outs);
        if (f) {
            size_t size = 0;
            unsigned char *now = slurp(n, &size);
            int same = now && size == f->size && memcmp(now, f->bytes, size) == 0;
            free(now);
            if (!same) {
                if (!is_out) fail("fixture %s changed by a run that %s", n, rc ? "failed" : "did not write it");
                restore_fixture(f);
            }
        } else if (is_out) {
            unlink(n);
        } else if (!extra[0]) {
            snprintf(extra, sizeof extra, "%s", n);
        }
    }
    closedir(d);
    if (extra[0]) {
        unlink(extra);
        fail("file '%s' left behind by a run %s", extra, rc ? "that failed" : "(not one of its outputs)");
    }
    struct stat sb;
    if (stat("dir", &sb) != 0 || !S_ISDIR(sb.st_mode)) fail("'dir' is gone%s%s", NULL, NULL);
}

/* ------------------------------------------------------------------ setup */
static void cleanup(void)
{
    if (chdir(work_dir) != 0) return;
    for (int k = 0; k < n_fixtures; k++) unlink(fixtures[k].name);
    rmdir("dir");
    if (chdir(base_dir) != 0) return;
    rmdir(work_dir);
    unlink(err_path);
    unlink(out_path);
    rmdir(base_dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *base = getenv("TMPDIR");
    struct stat sb;
    if (!base || !*base) base = (stat("/dev/shm", &sb) == 0 && S_ISDIR(sb.st_mode)) ? "/dev/shm" : "/tmp";
    snprintf(base_dir, sizeof base_dir, "%s/kdl_fuzz_cli.XXXXXX", base);
    if (!mkdtemp(base_dir)) fail("mkdtemp under %s%s", base, NULL);
    snprintf(work_dir, sizeof work_dir, "%s/work", base_dir);
    snprintf(err_path, sizeof err_path, "%s/stderr.txt", base_dir);
    snprintf(out_path, sizeof out_path, "%s/stdout.txt", base_dir);
    home_fd = open(".", O_RDONLY | O_DIRECTORY);
    if (home_fd < 0 || mkdir(work_dir, 0700) != 0 || chdir(work_dir) != 0) fail("cannot enter %s%s", work_dir, NULL);
    make_fixtures();
    leave_work();
    atexit(cleanup);
    saved_stderr = dup(2);
    err_fd = open(err_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    out_fd = open(out_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (saved_stderr < 0 || err_fd < 0 || out_fd < 0) fail("stdout/stderr capture%s%s", NULL, NULL);
    __sanitizer_set_report_fd((void *)(intptr_t)saved_stderr);
    return 0;
}

/* stdout and stderr go to empty files from here to capture_end (fd 1 and 2
 * become dups of out_fd and err_fd: one shared offset each).  Whatever fd 1
 * was (libFuzzer's -close_fd_mask changes it after LLVMFuzzerInitialize) is
 * put back by capture_end. */
static int stdout_before = -1;
static void capture_begin(void)
{
    fflush(stdout);
    fflush(stderr);
    clearerr(stdout);
    if (ftruncate(out_fd, 0) != 0 || lseek(out_fd, 0, SEEK_SET) != 0 || (stdout_before = dup(1)) < 0 ||
        dup2(out_fd, 1) < 0)
        fail("stdout capture%s%s", NULL, NULL);
    if (ftruncate(err_fd, 0) != 0 || lseek(err_fd, 0, SEEK_SET) != 0 || dup2(err_fd, 2) < 0) fail("capture%s%s", NULL, NULL);
}

/* Reads what was written to fd since capture_begin into buf (NUL-terminated);
 * *len gets the full length (also when longer than buf). */
static const char *captured(int fd, char *buf, size_t cap, size_t *len)
{
    off_t n = lseek(fd, 0, SEEK_CUR);
    size_t want = n > 0 ? (size_t)n : 0;
    if (want > cap - 1) want = cap - 1;
    ssize_t got = pread(fd, buf, want, 0);
    *len = got > 0 ? (size_t)got : 0;
    buf[*len] = '\0';
    if (n > 0 && (size_t)n > *len) *len = (size_t)n;
    return buf;
}

/* Restores stderr; returns what was written to it (static); *out / *out_len
 * get stdout's. */
static const char *capture_end(size_t *len, const char **out, size_t *out_len)
{
    static char err_buf[8192], out_buf[8192];
    fflush(stdout);
    fflush(stderr);
    dup2(saved_stderr, 2);
    dup2(stdout_before, 1);
    close(stdout_before);
    stdout_before = -1;
    size_t ol;
    const char *o = captured(out_fd, out_buf, sizeof out_buf, &ol);
    if (out) *out = o;
    if (out_len) *out_len = ol;
    return captured(err_fd, err_buf, sizeof err_buf, len);
}

/* ------------------------------------------------------------------- run */
static void check_parsers(char **words, int n)
{
    for (int k = 0; k < n; k++) {
        double x = 0;
        if (kdl_cli_parse_double("loss", "--x", words[k], 0, 0, 1, 0, &x) == 0 && !(x > 0 && x < 1))
            fail("parse_double accepted '%s' outside (0,1)%s", words[k], NULL);
        if (kdl_cli_parse_double("loss", "--x", words[k], -INFINITY, 0, INFINITY, 0, &x) == 0 && !isfinite(x))
            fail("parse_double accepted non-finite '%s'%s", words[k], NULL);
        int64_t i = 0;
        if (kdl_cli_parse_int64("loss", "--k", words[k], 1, 100, &i) == 0 && (i < 1 || i > 100))
            fail("parse_int64 accepted '%s' outside [1,100]%s", words[k], NULL);
        (void)kdl_cli_parse_int64("loss", "--k", words[k], INT64_MIN, INT64_MAX, &i);
    }
}

/* A --max-iter value above MAX_ITER_CAP (as the parser reads it: a whole
 * decimal int64) is replaced by MAX_ITER_CAP. */
static void cap_max_iter(int argc, char **argv)
{
    static char cap_word[] = "--max-iter=1000", *cap_value = cap_word + 11;
    for (int k = 1; k < argc; k++) {
        const char *v = NULL;
        int eq = !strncmp(argv[k], "--max-iter=", 11);
        if (eq) v = argv[k] + 11;
        else if (!strcmp(argv[k], "--max-iter") && k + 1 < argc) v = argv[k + 1];
        if (!v || !v[0] || isspace((unsigned char)v[0])) continue;
        char *end = NULL;
        errno = 0;
        long long x = strtoll(v, &end, 10);
        if (*end != '\0' || errno == ERANGE || x <= MAX_ITER_CAP) continue;
        if (eq)
            argv[k] = cap_word;
        else
            argv[k + 1] = cap_value;
    }
}

/* KDL_FUZZ_SHOW=1 (replaying an input): the run on the original stderr. */
static void show_run(int argc, char **argv, int rc, const char *out, const char *err)
{
    FILE *f = fdopen(dup(saved_stderr), "w");
    if (!f) return;
    fputs("kdloss", f);
    for (int k = 0; k < argc; k++) fprintf(f, " '%s'", argv[k]);
    fprintf(f, "\n  exit %d\n  stdout: %s%s  stderr: %s%s", rc, out, out[0] ? "" : "\n", err, err[0] ? "" : "\n");
    fclose(f);
}

/* demo: 1 when this valid invocation's backend already ran in this process
 * (the result would be the same; skip it). */
static int demo_seen(int argc, char **argv)
{
    static int seen[3];
    int backend = 0, help = 0;
    capture_begin();
    int rc = kdl_cli_demo_parse(argc, argv, &backend, &help);
    size_t len;
    (void)capture_end(&len, NULL, NULL);
    if (rc || help || backend < 0 || backend > 2) return 0;
    if (seen[backend]) return 1;
    seen[backend] = 1;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = (char *)malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    for (size_t k = 0; k < size; k++)
        if (text[k] == '/') text[k] = '_';

    char *words[MAX_WORDS + 1];
    int n_words = 0;
    char *p = text;
    while (size > 0 && n_words < MAX_WORDS) {
        words[n_words++] = p;
        char *nl = memchr(p, '\n', (size_t)(text + size - p));
        if (!nl) break;
        *nl = '\0';
        p = nl + 1;
    }

    /* The first word picks the subcommand; otherwise loss gets every word. */
    const subcommand_t *sub = &subcommands[0];
    int first = 0;
    for (size_t k = 0; n_words > 0 && k < N_SUBCOMMANDS; k++)
        if (!strcmp(words[0], subcommands[k].name)) {
            sub = &subcommands[k];
            first = 1;
        }
    char *argv[MAX_WORDS + 2];
    int argc = 0;
    argv[argc++] = (char *)sub->name;
    for (int k = first; k < n_words; k++) argv[argc++] = words[k];
    argv[argc] = NULL;
    cap_max_iter(argc, argv);

    const char *outs[MAX_WORDS];
    int n_outs = output_names(sub, argc, argv, outs, MAX_WORDS);
    int help = 0;
    for (int k = 1; k < argc; k++) help |= !strcmp(argv[k], "--help") || !strcmp(argv[k], "-h");

    size_t len, out_len;
    const char *out;
    capture_begin();
    check_parsers(argv + 1, argc - 1);
    (void)capture_end(&len, NULL, NULL);

    char *copy[MAX_WORDS + 2]; /* the command may not keep pointers into a shorter-lived argv */
    memcpy(copy, argv, sizeof copy);
    if (sub->run == kdl_cli_demo && demo_seen(argc, copy)) {
        free(text);
        return 0;
    }
    memcpy(copy, argv, sizeof copy);
    enter_work();
    capture_begin();
    int rc = sub->run(argc, copy);
    const char *err = capture_end(&len, &out, &out_len);

    if (getenv("KDL_FUZZ_SHOW")) show_run(argc, argv, rc, out, err);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "kdloss %s: ", sub->name);
    if (rc != 0 && rc != 1 && rc != 2) fail("exit code not 0, 1 or 2 (%s)%s", sub->name, NULL);
    if (rc == 0 && len != 0) fail("success with stderr output: %s%s", err, NULL);
    if (rc == 0 && out_len == 0) fail("success with nothing on stdout (%s)%s", sub->name, NULL);
    if (rc == 0 && sub->json && !help) {
        const char *nl = strchr(out, '\n');
        if (out[0] != '{' || !nl || (size_t)(nl - out) + 1 != out_len || nl[-1] != '}')
            fail("stdout is not one line holding a JSON object: %s%s", out, NULL);
    }
    if (rc != 0) {
        if (strncmp(err, prefix, strlen(prefix)) != 0) fail("error does not start '%s': %s", prefix, err);
        const char *nl = strchr(err, '\n');
        if (!nl || (size_t)(nl - err) + 1 != len) fail("error is not exactly one line: %s%s", err, NULL);
        if (out_len != 0) fail("a failed run wrote to stdout: %s%s", out, NULL);
    }
    check_directory(rc, outs, n_outs);
    leave_work();
    free(text);
    return 0;
}
