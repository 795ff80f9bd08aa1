/*
 * host/cli_bench.c - `kdloss bench`: times kdloss forward+backward over a
 * matrix of shapes, dtypes, divergences and AKL head rules on this GPU, and
 * the other ops (--ops: Sinkhorn uniform and ragged, sparse top-k teacher,
 * fused linear + loss, SinKD).
 *
 * Options and the method: bench/bench_lib.h (kdlb_usage), bench/bench_gpu.h
 * and bench/README.md.  A progress line on stderr while it runs, the table
 * on stdout, optionally the JSON results file.  Exit codes: 0 the run went
 * through (rows whose kernel is not implemented say so), 1 a CUDA failure
 * stopped it or the JSON could not be written (no file is left), 2 bad
 * options or no CUDA device (one line: "kdloss bench: no CUDA device
 * found"): no device is treated like an unusable request, nothing is run.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bench_gpu.h"
#include "bench_lib.h"
#include "cli.h"
#include "cli_util.h"
#include "kdloss/kdloss.h"

#define CMD "bench"

typedef struct progress_ctx {
    int tty;
    int width;
} progress_ctx_t;

static void progress(void *vctx, int done, int total, const kdlb_row_t *next)
{
    progress_ctx_t *p = (progress_ctx_t *)vctx;
    char line[160];
    if (!next) {
        if (p->tty && p->width) fprintf(stderr, "\r%*s\r", p->width, "");
        fflush(stderr);
        return;
    }
    char what[120];
    kdlb_row_label(next, what, sizeof what);
    snprintf(line, sizeof line, "kdloss bench [%d/%d] %s", done + 1, total, what);
    if (p->tty) {
        int n = (int)strlen(line);
        fprintf(stderr, "\r%-*s", p->width > n ? p->width : n, line);
        p->width = n;
    } else {
        fprintf(stderr, "%s\n", line);
    }
    fflush(stderr);
}

/* The JSON path: FILE as given, or DIR/<date>-<device>-<commit>.json when
 * the value ends with '/' or names a directory.  Checks that the folder
 * exists before anything is timed.  0 ok, -1 with err set. */
static int json_path(const char *arg, const char *ymd, const kdlb_meta_t *m, char *out, size_t len,
                     char *err, size_t errlen)
{
    struct stat st;
    size_t n = strlen(arg);
    int is_dir = arg[n - 1] == '/' || (stat(arg, &st) == 0 && S_ISDIR(st.st_mode));
    if (is_dir) {
        char name[256];
        kdlb_result_name(ymd, m->device_name, m->commit, name, sizeof name);
        if (snprintf(out, len, "%s%s%s", arg, arg[n - 1] == '/' ? "" : "/", name) >= (int)len) {
            snprintf(err, errlen, "--json-out: path too long");
            return -1;
        }
    } else if (snprintf(out, len, "%s", arg) >= (int)len) {
        snprintf(err, errlen, "--json-out: path too long");
        return -1;
    }
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", out);
    char *slash = strrchr(dir, '/');
    if (slash) {
        if (slash == dir) slash[1] = '\0';
        else *slash = '\0';
        if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
            snprintf(err, errlen, "--json-out: no such directory '%.400s'", dir);
            return -1;
        }
    }
    return 0;
}

int kdl_cli_bench(int argc, char **argv)
{
    kdlb_options_t o;
    char err[512];
    kdl_cli_ignore_sigpipe(); /* `kdloss bench | head` must not die of a signal */
    int r = kdlb_parse_options(argc, argv, &o, err, sizeof err);
    if (r < 0) {
        kdl_cli_error(CMD, "%s", err);
        return 2;
    }
    if (r == 1) {
        kdlb_usage(stdout);
        return kdl_cli_finish_stdout(CMD);
    }
    kdlb_meta_t meta;
    memset(&meta, 0, sizeof meta);
    if (!kdl_device_available() || kdlb_gpu_probe(&meta, err, sizeof err) != 0) {
        kdl_cli_error(CMD, "no CUDA device found");
        return 2;
    }
    char date[32], ymd[16];
    time_t now = time(NULL);
    struct tm tm_utc;
    gmtime_r(&now, &tm_utc);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &tm_utc);
    strftime(ymd, sizeof ymd, "%Y-%m-%d", &tm_utc);
    meta.date = date;
    meta.commit = o.commit;
    meta.options = &o;

    char path[4096] = "";
    if (o.json_out && json_path(o.json_out, ymd, &meta, path, sizeof path, err, sizeof err)) {
        kdl_cli_error(CMD, "%s", err);
        return 2;
    }

    size_t cap = (size_t)kdlb_row_capacity(&o) + 1, n_rows = 0;
    kdlb_row_t *rows = (kdlb_row_t *)calloc(cap, sizeof *rows);
    if (!rows) {
        kdl_cli_error(CMD, "out of memory");
        return 1;
    }
    progress_ctx_t pc = {isatty(fileno(stderr)), 0};
    int rc = kdlb_gpu_run(&o, &meta, rows, &n_rows, progress, &pc, err, sizeof err);
    progress(&pc, 0, 0, NULL);
    printf("kdloss bench on %s (sm_%d%d, %d SMs, L2 %llu MiB), commit %s\n", meta.device_name,
           meta.cc_major, meta.cc_minor, meta.sm_count,
           (unsigned long long)(meta.l2_bytes >> 20), meta.commit);
    kdlb_print_table(stdout, rows, n_rows, meta.copy_gb_per_s);
    int out_rc = kdl_cli_finish_stdout(CMD);
    if (rc != 0) {
        kdl_cli_error(CMD, "%s", err);
        free(rows);
        return 1;
    }
    if (o.json_out) {
        if (kdlb_json_write_file(path, &meta, rows, n_rows, err, sizeof err)) {
            kdl_cli_error(CMD, "%s", err);
            free(rows);
            return 1;
        }
        fprintf(stderr, "kdloss bench: wrote %s\n", path);
    }
    free(rows);
    return out_rc;
}
