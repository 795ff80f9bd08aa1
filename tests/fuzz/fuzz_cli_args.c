/*
 * tests/fuzz/fuzz_cli_args.c - libFuzzer target: the `kdloss loss`
 * subcommand (host/cli_loss.c, host/cli_util.c) on arbitrary argument
 * vectors.
 *
 * The input is split at '\n' into at most 48 words: argv = {"loss", words}.
 * parse_cfg() of cli_loss.c is static, so the whole entry kdl_cli_loss runs:
 * the option parser, the number and name parsers, then the .npy loads and
 * the computation when the arguments get that far.  Every '/' in a word
 * becomes '_', and the process works in a private directory
 * ($TMPDIR, else /dev/shm, else /tmp)/kdl_fuzz_cli.XXXXXX/work, so a word can
 * name only files there.  That directory holds small fixtures, which the
 * seeds name: s.npy t.npy (f32 [2,5]), h.npy (f16 [5]), d.npy (f64 [2,5]),
 * n.npy (f32 [2,5] with NaN, +inf, -inf rows), l.npy (i64 [2]),
 * x.npy (f32 [3,5]), e.npy (0 bytes), b.npy (not .npy), dir (a directory).
 * The number parsers (kdl_cli_parse_double, kdl_cli_parse_int64) are also
 * called directly on every word.
 *
 * Oracle (abort on violation):
 *   - kdl_cli_loss returns 0, 1 or 2 (and does not exit, crash or hang);
 *   - 0: nothing on stderr; with --grad-out NAME the file NAME exists;
 *   - 1 or 2: exactly one line on stderr, starting "kdloss loss: ";
 *   - no file other than the fixtures and a successful --grad-out is left
 *     (a failed run writes no output file, not even a temporary), and no
 *     fixture changes unless it was the --grad-out of a successful run;
 *   - a number the parsers accept is finite and inside the given interval.
 * stdout goes to /dev/null; stderr is captured per run into a file, and the
 * sanitizers report to the original stderr.
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
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

static char base_dir[512], work_dir[600], err_path[600];
static int saved_stderr = -1, err_fd = -1, home_fd = -1;

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

static fixture_t fixtures[16];
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
    float st[10] = {1, 2, 3, 4, 5, -1, 0, 0.5f, 2, 1};
    float tt[10] = {0.5f, 2, 1, 4, 3, 0, 0, 1, -2, 1};
    float xt[15] = {0};
    double dt[10] = {1, 2, 3, 4, 5, 5, 4, 3, 2, 1};
    uint16_t ht[5] = {0x3c00, 0x4000, 0x0000, 0xbc00, 0x3800};
    float nt[10] = {NAN, 1, 2, 3, 4, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t lt[2] = {-100, 3};
    const int64_t s25[2] = {2, 5}, s35[2] = {3, 5}, s5[1] = {5}, s2[1] = {2};
    add_fixture("s.npy", KDL_NPY_F32, 2, s25, st);
    add_fixture("t.npy", KDL_NPY_F32, 2, s25, tt);
    add_fixture("h.npy", KDL_NPY_F16, 1, s5, ht);
    add_fixture("d.npy", KDL_NPY_F64, 2, s25, dt);
    add_fixture("n.npy", KDL_NPY_F32, 2, s25, nt);
    add_fixture("l.npy", KDL_NPY_I64, 1, s2, lt);
    add_fixture("x.npy", KDL_NPY_F32, 2, s35, xt);
    add_raw_fixture("e.npy", "", 0);
    add_raw_fixture("b.npy", "\x93NUMPY\x01\x00\xff\xff{'descr'", 17);
    if (mkdir("dir", 0700) != 0) fail("mkdir dir%s%s", NULL, NULL);
}

/* Every entry of the work directory is a fixture, "dir", or (after a
 * successful run) the --grad-out file, which is removed again. */
static void check_directory(int rc, const char *grad_out)
{
    DIR *d = opendir(".");
    if (!d) fail("opendir%s%s", NULL, NULL);
    struct dirent *e;
    char extra[256] = "";
    while ((e = readdir(d)) != NULL) {
        const char *n = e->d_name;
        if (!strcmp(n, ".") || !strcmp(n, "..") || !strcmp(n, "dir")) continue;
        const fixture_t *f = find_fixture(n);
        int is_out = rc == 0 && grad_out && !strcmp(n, grad_out);
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
        fail("file '%s' left behind by a run %s", extra, rc ? "that failed" : "(not the --grad-out)");
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
    home_fd = open(".", O_RDONLY | O_DIRECTORY);
    if (home_fd < 0 || mkdir(work_dir, 0700) != 0 || chdir(work_dir) != 0) fail("cannot enter %s%s", work_dir, NULL);
    make_fixtures();
    leave_work();
    atexit(cleanup);
    saved_stderr = dup(2);
    err_fd = open(err_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (saved_stderr < 0 || err_fd < 0) fail("stderr capture%s%s", NULL, NULL);
    __sanitizer_set_report_fd((void *)(intptr_t)saved_stderr);
    if (!freopen("/dev/null", "w", stdout)) fail("stdout to /dev/null%s%s", NULL, NULL);
    return 0;
}

static void capture_begin(void)
{
    fflush(stderr);
    if (ftruncate(err_fd, 0) != 0 || lseek(err_fd, 0, SEEK_SET) != 0 || dup2(err_fd, 2) < 0) fail("capture%s%s", NULL, NULL);
}

/* Restores stderr; returns what was written (NUL-terminated, static). */
static const char *capture_end(size_t *len)
{
    static char buf[8192];
    fflush(stderr);
    dup2(saved_stderr, 2);
    off_t n = lseek(err_fd, 0, SEEK_CUR);
    size_t want = n > 0 ? (size_t)n : 0;
    if (want > sizeof buf - 1) want = sizeof buf - 1;
    ssize_t got = pread(err_fd, buf, want, 0);
    *len = got > 0 ? (size_t)got : 0;
    buf[*len] = '\0';
    if (n > 0 && (size_t)n > *len) *len = (size_t)n; /* longer than the buffer: still "more than a line" */
    return buf;
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = (char *)malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    for (size_t k = 0; k < size; k++)
        if (text[k] == '/') text[k] = '_';

    char *argv[MAX_WORDS + 2];
    int argc = 0;
    argv[argc++] = (char *)"loss";
    char *p = text;
    while (argc <= MAX_WORDS) {
        argv[argc++] = p;
        char *nl = memchr(p, '\n', (size_t)(text + size - p));
        if (!nl) break;
        *nl = '\0';
        p = nl + 1;
    }
    if (size == 0) argc = 1; /* no words at all */
    argv[argc] = NULL;

    /* The --grad-out name as the parser will see it ("--grad-out X" or "--grad-out=X"). */
    const char *grad_out = NULL;
    for (int k = 1; k < argc; k++) {
        if (!strcmp(argv[k], "--grad-out") && k + 1 < argc) grad_out = argv[k + 1];
        if (!strncmp(argv[k], "--grad-out=", 11)) grad_out = argv[k] + 11;
    }

    capture_begin();
    check_parsers(argv + 1, argc - 1);
    size_t len;
    (void)capture_end(&len);

    char *copy[MAX_WORDS + 2]; /* the command may not keep pointers into a shorter-lived argv */
    memcpy(copy, argv, sizeof copy);
    enter_work();
    capture_begin();
    int rc = kdl_cli_loss(argc, copy);
    fflush(stdout);
    const char *err = capture_end(&len);

    if (rc != 0 && rc != 1 && rc != 2) fail("exit code not 0, 1 or 2%s%s", NULL, NULL);
    if (rc == 0 && len != 0) fail("success with stderr output: %s%s", err, NULL);
    if (rc != 0) {
        if (strncmp(err, "kdloss loss: ", 13) != 0) fail("error does not start 'kdloss loss: ': %s%s", err, NULL);
        const char *nl = strchr(err, '\n');
        if (!nl || (size_t)(nl - err) + 1 != len) fail("error is not exactly one line: %s%s", err, NULL);
    }
    check_directory(rc, grad_out);
    leave_work();
    free(text);
    return 0;
}
