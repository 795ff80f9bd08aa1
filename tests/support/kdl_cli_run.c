/* tests/support/kdl_cli_run.c - see kdl_cli_run.h. */
#define _POSIX_C_SOURCE 200809L
#include "kdl_cli_run.h"

#include <criterion/criterion.h>
#include <ctype.h>
#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ------------------------------------------------------- running the CLI */

void kdl_tmp_path(char *buf, size_t len, const char *prefix, const char *name)
{
    snprintf(buf, len, "%s/%s_%ld_%s", KDL_TEST_TMPDIR, prefix, (long)getpid(), name);
}

void kdl_tmp_npy(char *path, size_t len, const char *prefix, const char *name, kdl_npy_dtype_t t, int ndim,
                 const int64_t *shape, const void *data)
{
    char msg[256];
    kdl_tmp_path(path, len, prefix, name);
    cr_assert_eq(kdl_npy_save(path, t, ndim, shape, data, msg, sizeof msg), KDL_NPY_OK, "%s: %s", path, msg);
}

void kdl_slurp(const char *path, char *buf, size_t cap)
{
    buf[0] = '\0';
    FILE *f = fopen(path, "rb");
    if (!f) return;
    size_t n = fread(buf, 1, cap - 1, f);
    buf[n] = '\0';
    fclose(f);
}

/* kdl_run_cli; closed_stdout: stdout is the writing end of a pipe whose
 * reading end is closed. */
static void run_cli(kdl_cli_result_t *r, const char *const *args, int closed_stdout)
{
    char outp[512], errp[512];
    kdl_tmp_path(outp, sizeof outp, "kdlcli", "stdout.txt");
    kdl_tmp_path(errp, sizeof errp, "kdlcli", "stderr.txt");
    const char *argv[KDL_CLI_MAX_ARGS + 2] = {KDL_CLI_PATH};
    int n = 1;
    while (args[n - 1]) {
        cr_assert(n <= KDL_CLI_MAX_ARGS, "more than %d arguments", KDL_CLI_MAX_ARGS);
        argv[n] = args[n - 1];
        n++;
    }
    argv[n] = NULL;
    int pipefd[2] = {-1, -1};
    if (closed_stdout) {
        cr_assert(pipe(pipefd) == 0, "pipe failed");
        close(pipefd[0]);
    }
    fflush(NULL);
    pid_t pid = fork();
    cr_assert(pid >= 0, "fork failed");
    if (pid == 0) {
        int fo = closed_stdout ? pipefd[1] : open(outp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fe = open(errp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo < 0 || fe < 0 || dup2(fo, 1) < 0 || dup2(fe, 2) < 0) _exit(126);
        execv(KDL_CLI_PATH, (char *const *)argv);
        _exit(127);
    }
    if (closed_stdout) close(pipefd[1]);
    int status = 0;
    cr_assert(waitpid(pid, &status, 0) == pid);
    r->code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    kdl_slurp(outp, r->out, sizeof r->out);
    kdl_slurp(errp, r->err, sizeof r->err);
    unlink(outp);
    unlink(errp);
}

void kdl_run_cli(kdl_cli_result_t *r, const char *const *args) { run_cli(r, args, 0); }

void kdl_run_cli_closed_stdout(kdl_cli_result_t *r, const char *const *args) { run_cli(r, args, 1); }

void kdl_expect_cli_error(const kdl_cli_result_t *r, int code, const char *cmd, const char *needle, const char *what)
{
    char prefix[64];
    snprintf(prefix, sizeof prefix, cmd ? "kdloss %s: " : "kdloss: ", cmd);
    cr_expect_eq(r->code, code, "%s: exit %d, expected %d (stderr '%s')", what, r->code, code, r->err);
    cr_expect(!strncmp(r->err, prefix, strlen(prefix)), "%s: stderr '%s' does not start with '%s'", what, r->err,
              prefix);
    const char *nl = strchr(r->err, '\n');
    cr_expect(nl && nl[1] == '\0', "%s: stderr is not one line: '%s'", what, r->err);
    cr_expect(!needle || strstr(r->err, needle), "%s: stderr '%s' does not say '%s'", what, r->err, needle);
    cr_expect_eq(r->out[0], '\0', "%s: stdout '%s'", what, r->out);
}

int kdl_file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

int kdl_no_temporaries(const char *path)
{
    char dir[1024];
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - path) : 1, slash ? path : ".");
    DIR *d = opendir(dir);
    if (!d) return 1;
    struct dirent *e;
    int ok = 1;
    size_t bl = strlen(base);
    while ((e = readdir(d)))
        if (!strncmp(e->d_name, base, bl) && !strncmp(e->d_name + bl, ".tmp", 4)) ok = 0;
    closedir(d);
    return ok;
}

/* ------------------------------------------------------ JSON validation */
/* Each returns the end of what it accepted at p, or NULL. */

static const char *js_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

static const char *js_string(const char *p)
{
    if (*p != '"') return NULL;
    for (p++; *p && *p != '"'; p++) {
        if ((unsigned char)*p < 0x20) return NULL;
        if (*p == '\\') {
            p++;
            if (*p == 'u') {
                for (int k = 1; k <= 4; k++)
                    if (!isxdigit((unsigned char)p[k])) return NULL;
                p += 4;
            } else if (!*p || !strchr("\"\\/bfnrt", *p)) {
                return NULL;
            }
        }
    }
    return *p == '"' ? p + 1 : NULL;
}

static const char *js_number(const char *p)
{
    if (*p == '-') p++;
    if (*p == '0') p++;
    else if (*p >= '1' && *p <= '9') while (isdigit((unsigned char)*p)) p++;
    else return NULL;
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p)) return NULL;
        while (isdigit((unsigned char)*p)) p++;
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-') p++;
        if (!isdigit((unsigned char)*p)) return NULL;
        while (isdigit((unsigned char)*p)) p++;
    }
    return p;
}

/* One value at p (leading whitespace skipped), inside depth containers. */
static const char *js_value(const char *p, int depth)
{
    if (depth > KDL_JSON_MAX_DEPTH) return NULL;
    p = js_ws(p);
    if (*p == '{' || *p == '[') {
        const char close = *p == '{' ? '}' : ']';
        const int keyed = *p == '{';
        p = js_ws(p + 1);
        if (*p == close) return p + 1;
        for (;;) {
            if (keyed) {
                if (!(p = js_string(p))) return NULL;
                p = js_ws(p);
                if (*p++ != ':') return NULL;
            }
            if (!(p = js_value(p, depth + 1))) return NULL;
            p = js_ws(p);
            if (*p == close) return p + 1;
            if (*p++ != ',') return NULL;
            p = js_ws(p);
        }
    }
    if (*p == '"') return js_string(p);
    if (!strncmp(p, "true", 4)) return p + 4;
    if (!strncmp(p, "false", 5)) return p + 5;
    if (!strncmp(p, "null", 4)) return p + 4;
    return js_number(p);
}

int kdl_json_valid(const char *s)
{
    const char *e = js_value(s, 0);
    return e && *js_ws(e) == '\0';
}

int kdl_json_valid_object(const char *s)
{
    return *js_ws(s) == '{' && kdl_json_valid(s);
}

/* ------------------------------------------------------- reading values */

const char *kdl_json_find(const char *json, const char *key)
{
    char pat[128];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(json, pat);
    return p ? p + strlen(pat) : NULL;
}

double kdl_json_read_number_at(const char *p)
{
    cr_assert_not_null(p);
    if (!strncmp(p, "null", 4)) return NAN;
    if (!strncmp(p, "\"inf\"", 5)) return INFINITY;
    if (!strncmp(p, "\"-inf\"", 6)) return -INFINITY;
    char *end;
    double v = strtod(p, &end);
    cr_assert(end != p, "not a number: %.30s", p);
    return v;
}

double kdl_json_read_number(const char *json, const char *key)
{
    const char *p = kdl_json_find(json, key);
    cr_assert_not_null(p, "key \"%s\" missing in %s", key, json);
    return kdl_json_read_number_at(p);
}

int64_t kdl_json_read_array(const char *json, const char *key, double *v, int64_t cap)
{
    const char *p = kdl_json_find(json, key);
    cr_assert_not_null(p, "key \"%s\" missing in %s", key, json);
    cr_assert_eq(*p, '[', "\"%s\" is not an array: %.30s", key, p);
    int64_t n = 0;
    p = js_ws(p + 1);
    while (*p != ']') {
        cr_assert(n < cap, "\"%s\" has more than %lld elements", key, (long long)cap);
        v[n++] = kdl_json_read_number_at(p);
        p = js_value(p, 0);
        cr_assert_not_null(p, "\"%s\": bad element in %s", key, json);
        p = js_ws(p);
        if (*p == ',') p = js_ws(p + 1);
    }
    return n;
}
