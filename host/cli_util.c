/*
 * host/cli_util.c - helpers shared by the `kdloss` subcommands: one-line
 * errors, option parsing with full number validation, .npy input and atomic
 * output, a small JSON writer, and the device plumbing that lets a
 * subcommand call the GPU path with host buffers.  See cli_util.h.
 */
#define _POSIX_C_SOURCE 200809L

#include "cli_util.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#ifdef KDL_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

/* ------------------------------------------------------------------ errors */

void kdl_cli_error(const char *cmd, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    for (char *c = line; *c; c++)
        if (*c == '\n' || *c == '\r') *c = ' ';
    fprintf(stderr, "kdloss %s: %s\n", cmd, line);
    fflush(stderr);
}

int kdl_cli_status_error(const char *cmd, kdl_status_t st)
{
    const char *detail = kdl_get_last_error();
    if (detail && detail[0])
        kdl_cli_error(cmd, "%s (%s)", kdl_status_string(st), detail);
    else
        kdl_cli_error(cmd, "%s", kdl_status_string(st));
    return (st >= 1000 && st < 2000) ? 2 : 1;
}

void kdl_cli_ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }

int kdl_cli_finish_stdout(const char *cmd)
{
    if (fflush(stdout) != 0 || ferror(stdout)) {
        kdl_cli_error(cmd, "cannot write the output: %s", strerror(errno));
        return 1;
    }
    return 0;
}

/* ----------------------------------------------------------------- options */

static kdl_cli_opt_t *find_opt(kdl_cli_opt_t *opts, size_t n, const char *name, size_t len)
{
    for (size_t k = 0; k < n; k++)
        if (strlen(opts[k].name) == len && !strncmp(opts[k].name, name, len)) return &opts[k];
    return NULL;
}

/* Takes the value of option o at argv[*i] (eq: the text after '=', or NULL). */
static int take_value(const char *cmd, int argc, char **argv, int *i, kdl_cli_opt_t *o, const char *eq)
{
    if (!o->takes_value) {
        if (eq) {
            kdl_cli_error(cmd, "%s takes no value", o->name);
            return 2;
        }
        o->value = "";
        return 0;
    }
    if (eq) {
        o->value = eq;
        return 0;
    }
    if (*i + 1 >= argc || !strncmp(argv[*i + 1], "--", 2)) {
        kdl_cli_error(cmd, "%s needs a value", o->name);
        return 2;
    }
    o->value = argv[++*i];
    return 0;
}

int kdl_cli_parse_options(const char *cmd, int argc, char **argv, kdl_cli_opt_t *opts, size_t n, int *help)
{
    *help = 0;
    for (size_t k = 0; k < n; k++) opts[k].value = NULL;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            *help = 1;
            return 0;
        }
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            kdl_cli_error(cmd, "unexpected argument '%s' (see kdloss %s --help)", arg, cmd);
            return 2;
        }
        const char *eq = strchr(arg, '=');
        size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
        kdl_cli_opt_t *o = find_opt(opts, n, arg, len);
        if (!o) {
            kdl_cli_error(cmd, "unknown option '%.*s' (see kdloss %s --help)", (int)len, arg, cmd);
            return 2;
        }
        if (o->value) {
            kdl_cli_error(cmd, "option %s given twice", o->name);
            return 2;
        }
        int rc = take_value(cmd, argc, argv, &i, o, eq ? eq + 1 : NULL);
        if (rc) return rc;
    }
    return 0;
}

static void format_interval(char *buf, size_t len, double lo, int lo_closed, double hi, int hi_closed)
{
    snprintf(buf, len, "%c%g, %g%c", lo_closed ? '[' : '(', lo, hi, hi_closed ? ']' : ')');
}

int kdl_cli_parse_double(const char *cmd, const char *flag, const char *text, double lo, int lo_closed,
                         double hi, int hi_closed, double *out)
{
    char *end = NULL;
    errno = 0;
    double v = (text && text[0] && !isspace((unsigned char)text[0])) ? strtod(text, &end) : 0.0;
    if (!end || end == text || *end != '\0') {
        kdl_cli_error(cmd, "%s: '%s' is not a number", flag, text ? text : "");
        return 2;
    }
    int in = isfinite(v) && (lo_closed ? v >= lo : v > lo) && (hi_closed ? v <= hi : v < hi);
    if (!in) {
        char iv[96];
        format_interval(iv, sizeof iv, lo, lo_closed, hi, hi_closed);
        kdl_cli_error(cmd, "%s must be a finite number in %s, got '%s'", flag, iv, text);
        return 2;
    }
    *out = v;
    return 0;
}

int kdl_cli_parse_int64(const char *cmd, const char *flag, const char *text, int64_t lo, int64_t hi,
                        int64_t *out)
{
    char *end = NULL;
    errno = 0;
    long long v = (text && text[0] && !isspace((unsigned char)text[0])) ? strtoll(text, &end, 10) : 0;
    if (!end || end == text || *end != '\0') {
        kdl_cli_error(cmd, "%s: '%s' is not an integer", flag, text ? text : "");
        return 2;
    }
    if (errno == ERANGE || v < lo || v > hi) {
        kdl_cli_error(cmd, "%s must be an integer in [%lld, %lld], got '%s'", flag, (long long)lo,
                      (long long)hi, text);
        return 2;
    }
    *out = (int64_t)v;
    return 0;
}

int kdl_cli_parse_choice(const char *cmd, const char *flag, const char *text, int (*from_name)(const char *),
                         const char *choices, int *out)
{
    int v = from_name(text);
    if (v < 0) {
        kdl_cli_error(cmd, "%s: unknown value '%s' (expected %s)", flag, text, choices);
        return 2;
    }
    *out = v;
    return 0;
}

int kdl_cli_check_out_path(const char *cmd, const char *flag, const char *path)
{
    if (!path || path[0]) return 0;
    kdl_cli_error(cmd, "%s needs a file name", flag);
    return 2;
}

int kdl_cli_parse_loss_opts(const char *cmd, const kdl_cli_opt_t *o, kdl_loss_desc_t *d, int *backend)
{
    int v = 0, rc = 0;
    if (o[KDL_CLI_L_DIVERGENCE].value) {
        rc = kdl_cli_parse_choice(cmd, "--divergence", o[KDL_CLI_L_DIVERGENCE].value, kdl_divergence_from_name,
                                  "fkl|rkl|fkl_rkl|akl|jsd|tvd|skl|srkl", &v);
        d->divergence = (kdl_divergence_t)v;
    }
    if (!rc && o[KDL_CLI_L_HEAD_RULE].value) {
        rc = kdl_cli_parse_choice(cmd, "--head-rule", o[KDL_CLI_L_HEAD_RULE].value, kdl_head_rule_from_name,
                                  "reference|mass|topk", &v);
        d->head_rule = (kdl_head_rule_t)v;
    }
    if (!rc && o[KDL_CLI_L_REDUCTION].value) {
        rc = kdl_cli_parse_choice(cmd, "--reduction", o[KDL_CLI_L_REDUCTION].value, kdl_reduction_from_name,
                                  "none|sum|mean", &v);
        d->reduction = (kdl_reduction_t)v;
    }
    *backend = KDL_CLI_BACKEND_AUTO;
    if (!rc && o[KDL_CLI_L_BACKEND].value)
        rc = kdl_cli_parse_choice(cmd, "--backend", o[KDL_CLI_L_BACKEND].value, kdl_cli_backend_from_name,
                                  "auto|cpu|cuda", backend);
    const struct {
        int opt;
        const char *flag;
        double lo;
        int lo_closed;
        double hi; /* open */
        double *out;
    } reals[] = {
        {KDL_CLI_L_TEMPERATURE, "--temperature", 0, 0, INFINITY, &d->temperature},
        {KDL_CLI_L_ALPHA, "--alpha", 0, 1, 1, &d->alpha},
        {KDL_CLI_L_BETA, "--beta", 0, 0, 1, &d->beta},
        {KDL_CLI_L_MU, "--mu", 0, 0, 1, &d->mu},
        {KDL_CLI_L_SCALE, "--scale", -INFINITY, 0, INFINITY, &d->scale},
    };
    for (size_t k = 0; !rc && k < sizeof reals / sizeof reals[0]; k++)
        if (o[reals[k].opt].value)
            rc = kdl_cli_parse_double(cmd, reals[k].flag, o[reals[k].opt].value, reals[k].lo, reals[k].lo_closed,
                                      reals[k].hi, 0, reals[k].out);
    if (!rc && o[KDL_CLI_L_TOP_K].value)
        rc = kdl_cli_parse_int64(cmd, "--top-k", o[KDL_CLI_L_TOP_K].value, 1, INT64_MAX, &d->top_k);
    if (!rc && o[KDL_CLI_L_IGNORE_INDEX].value)
        rc = kdl_cli_parse_int64(cmd, "--ignore-index", o[KDL_CLI_L_IGNORE_INDEX].value, INT64_MIN, INT64_MAX,
                                 &d->ignore_index);
    return rc;
}

/* -------------------------------------------------------------- .npy files */

kdl_npy_dtype_t kdl_cli_npy_grad_dtype(kdl_dtype_t t)
{
    return t == KDL_DTYPE_F64 ? KDL_NPY_F64 : t == KDL_DTYPE_F16 ? KDL_NPY_F16 : KDL_NPY_F32;
}

int kdl_cli_load_npy(const char *cmd, const char *flag, const char *path, kdl_npy_array_t *out)
{
    char msg[256];
    kdl_npy_status_t st = kdl_npy_load(path, out, msg, sizeof msg);
    if (st == KDL_NPY_OK) return 0;
    kdl_cli_error(cmd, "%s %s: %s", flag, path, msg);
    return st == KDL_NPY_ERR_ALLOC ? 1 : 2;
}

/* Removes the temporary and reports; returns rc. */
static int atomic_fail(const char *cmd, const char *path, const char *tmp, const char *what, int err, int rc)
{
    unlink(tmp);
    kdl_cli_error(cmd, "cannot write %s: %s: %s", path, what, strerror(err));
    return rc;
}

/* The first half of an atomic write: creates "PATH.tmp.XXXXXX", writes it
 * with write(f, ctx), flushes, syncs and closes it.  Returns 0 with *tmp_out
 * the temporary's name (malloc'd), or an exit code with nothing left. */
static int atomic_prepare(const char *cmd, const char *path, int (*write)(FILE *f, void *ctx), void *ctx,
                          char **tmp_out)
{
    *tmp_out = NULL;
    size_t n = strlen(path);
    char *tmp = (char *)malloc(n + 12);
    if (!tmp) {
        kdl_cli_error(cmd, "out of memory");
        return 1;
    }
    memcpy(tmp, path, n);
    memcpy(tmp + n, ".tmp.XXXXXX", 12);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        kdl_cli_error(cmd, "cannot write %s: %s", path, strerror(errno));
        free(tmp);
        return 2;
    }
    mode_t um = umask(0);
    umask(um);
    (void)fchmod(fd, 0666 & ~um); /* as fopen would create it */
    FILE *f = fdopen(fd, "wb");
    int rc;
    if (!f) {
        int err = errno;
        close(fd);
        rc = atomic_fail(cmd, path, tmp, "fdopen", err, 1);
    } else if ((rc = write(f, ctx)) != 0) {
        fclose(f);
        unlink(tmp);
    } else if (fflush(f) != 0 || fsync(fileno(f)) != 0) {
        int err = errno;
        fclose(f);
        rc = atomic_fail(cmd, path, tmp, "write", err, 1);
    } else if (fclose(f) != 0) {
        rc = atomic_fail(cmd, path, tmp, "close", errno, 1);
    }
    if (rc)
        free(tmp);
    else
        *tmp_out = tmp;
    return rc;
}

typedef struct npy_write_ctx {
    const char *cmd, *path;
    kdl_npy_dtype_t dtype;
    int ndim;
    const int64_t *shape;
    const void *data;
} npy_write_ctx_t;

static int write_npy_cb(FILE *f, void *p)
{
    const npy_write_ctx_t *c = (const npy_write_ctx_t *)p;
    char msg[256];
    if (kdl_npy_write_stream(f, c->dtype, c->ndim, c->shape, c->data, 0, msg, sizeof msg) == KDL_NPY_OK) return 0;
    kdl_cli_error(c->cmd, "cannot write %s: %s", c->path, msg);
    return 1;
}

int kdl_cli_save_npy(const char *cmd, const char *path, kdl_npy_dtype_t dtype, int ndim, const int64_t *shape,
                     const void *data)
{
    const kdl_cli_npy_out_t o = {path, dtype, ndim, shape, data};
    return kdl_cli_save_npy_all(cmd, &o, 1);
}

int kdl_cli_stage_npy_all(const char *cmd, const kdl_cli_npy_out_t *outs, int n, kdl_cli_pending_t *p)
{
    int rc = 0, k;
    memset(p, 0, sizeof *p);
    if (n < 0 || n > KDL_CLI_MAX_OUTPUTS) {
        kdl_cli_error(cmd, "internal error: %d output files", n);
        return 1;
    }
    /* No target may be a directory (the one way a rename into the
     * temporary's own folder fails): checked before anything is written. */
    for (k = 0; !rc && k < n; k++) {
        struct stat sb;
        if (stat(outs[k].path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
            kdl_cli_error(cmd, "cannot write %s: %s", outs[k].path, strerror(EISDIR));
            rc = 2;
        }
    }
    for (k = 0; !rc && k < n; k++) {
        npy_write_ctx_t c = {cmd, outs[k].path, outs[k].dtype, outs[k].ndim, outs[k].shape, outs[k].data};
        p->path[k] = outs[k].path;
        rc = atomic_prepare(cmd, outs[k].path, write_npy_cb, &c, &p->tmp[k]);
        p->n = k + 1;
    }
    return rc ? kdl_cli_commit(cmd, p, rc) : 0;
}

int kdl_cli_commit(const char *cmd, kdl_cli_pending_t *p, int rc)
{
    int k, renamed = 0;
    for (k = 0; !rc && k < p->n; k++) {
        if (rename(p->tmp[k], p->path[k]) != 0)
            rc = atomic_fail(cmd, p->path[k], p->tmp[k], "rename", errno, 2);
        else
            renamed++;
    }
    if (rc) { /* remove the temporaries, and what a failed rename (a race) left in place */
        for (k = 0; k < renamed; k++) unlink(p->path[k]);
        for (k = renamed; k < p->n; k++)
            if (p->tmp[k]) unlink(p->tmp[k]);
    }
    for (k = 0; k < p->n; k++) free(p->tmp[k]);
    memset(p, 0, sizeof *p);
    return rc;
}

int kdl_cli_save_npy_all(const char *cmd, const kdl_cli_npy_out_t *outs, int n)
{
    kdl_cli_pending_t p;
    int rc = kdl_cli_stage_npy_all(cmd, outs, n, &p);
    return rc ? rc : kdl_cli_commit(cmd, &p, 0);
}

/* -------------------------------------------------------------------- JSON */

void kdl_json_init(kdl_json_t *j, FILE *f)
{
    memset(j, 0, sizeof *j);
    j->f = f;
}

/* s as a JSON string: quotes, backslashes and control characters escaped,
 * other bytes (UTF-8) as they are. */
static void json_write_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\')
            fprintf(f, "\\%c", *c);
        else if (*c < 0x20)
            fprintf(f, "\\u%04x", *c);
        else
            fputc(*c, f);
    }
    fputc('"', f);
}

/* Separator and key before a value. */
static void json_prefix(kdl_json_t *j, const char *key)
{
    if (j->has_items[j->depth]) fputs(", ", j->f);
    j->has_items[j->depth] = 1;
    if (key) {
        json_write_string(j->f, key);
        fputs(": ", j->f);
    }
}

static void json_open(kdl_json_t *j, const char *key, char c)
{
    json_prefix(j, key);
    fputc(c, j->f);
    if (j->depth + 1 < KDL_JSON_MAX_DEPTH) j->depth++;
    j->has_items[j->depth] = 0;
}

static void json_close(kdl_json_t *j, char c)
{
    fputc(c, j->f);
    if (j->depth > 0) j->depth--;
}

void kdl_json_object_begin(kdl_json_t *j, const char *key) { json_open(j, key, '{'); }
void kdl_json_object_end(kdl_json_t *j) { json_close(j, '}'); }
void kdl_json_array_begin(kdl_json_t *j, const char *key) { json_open(j, key, '['); }
void kdl_json_array_end(kdl_json_t *j) { json_close(j, ']'); }

void kdl_json_number(kdl_json_t *j, const char *key, double v)
{
    json_prefix(j, key);
    if (isnan(v))
        fputs("null", j->f);
    else if (isinf(v))
        fputs(v > 0 ? "\"inf\"" : "\"-inf\"", j->f);
    else
        fprintf(j->f, "%.17g", v);
}

void kdl_json_int(kdl_json_t *j, const char *key, int64_t v)
{
    json_prefix(j, key);
    fprintf(j->f, "%lld", (long long)v);
}

void kdl_json_bool(kdl_json_t *j, const char *key, int v)
{
    json_prefix(j, key);
    fputs(v ? "true" : "false", j->f);
}

void kdl_json_string(kdl_json_t *j, const char *key, const char *s)
{
    json_prefix(j, key);
    if (s)
        json_write_string(j->f, s);
    else
        fputs("null", j->f);
}

void kdl_json_number_array(kdl_json_t *j, const char *key, const double *v, int64_t n)
{
    kdl_json_array_begin(j, key);
    for (int64_t i = 0; i < n; i++) kdl_json_number(j, NULL, v[i]);
    kdl_json_array_end(j);
}

void kdl_json_int_array(kdl_json_t *j, const char *key, const int64_t *v, int64_t n)
{
    kdl_json_array_begin(j, key);
    for (int64_t i = 0; i < n; i++) kdl_json_int(j, NULL, v[i]);
    kdl_json_array_end(j);
}

void kdl_json_finish(kdl_json_t *j) { fputc('\n', j->f); }

void kdl_json_loss(kdl_json_t *j, const char *key, kdl_reduction_t reduction, const double *loss, int64_t rows)
{
    if (reduction == KDL_REDUCTION_NONE)
        kdl_json_number_array(j, key, loss, rows);
    else
        kdl_json_number(j, key, loss[0]);
}

int kdl_json_end_stdout(kdl_json_t *j, const char *cmd)
{
    kdl_json_object_end(j);
    kdl_json_finish(j);
    return kdl_cli_finish_stdout(cmd);
}

/* --------------------------------------------------------------- backends */

int kdl_cli_backend_from_name(const char *name)
{
    if (!name) return -1;
    if (!strcmp(name, "auto")) return KDL_CLI_BACKEND_AUTO;
    if (!strcmp(name, "cpu")) return KDL_CLI_BACKEND_CPU;
    if (!strcmp(name, "cuda")) return KDL_CLI_BACKEND_CUDA;
    return -1;
}

int kdl_cli_pick_backend(const char *cmd, int backend, int any_f64, const char *f64_error, int *cuda)
{
    const char *why = NULL;
    if (backend == KDL_CLI_BACKEND_CUDA)
        why = !kdl_device_available() ? "no CUDA device (use --backend cpu)" : any_f64 ? f64_error : NULL;
    *cuda = 0;
    if (why) {
        kdl_cli_error(cmd, "%s", why);
        return 2;
    }
    *cuda = backend == KDL_CLI_BACKEND_CUDA || (backend == KDL_CLI_BACKEND_AUTO && !any_f64 && kdl_device_available());
    return 0;
}

double kdl_cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#ifdef KDL_HAVE_CUDA

static kdl_status_t cuda_fail(cudaError_t err, const char *what)
{
    (void)cudaGetLastError();
    return kdl_fail(err == cudaErrorMemoryAllocation ? KDL_STATUS_ALLOC_FAILED : KDL_STATUS_CUDA_ERROR, "%s: %s",
                    what, cudaGetErrorString(err));
}

int kdl_cli_gpu_name(char *buf, size_t len)
{
    int dev = 0;
    struct cudaDeviceProp prop;
    if (!kdl_device_available() || cudaGetDevice(&dev) != cudaSuccess ||
        cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(buf, len, "none");
        return -1;
    }
    snprintf(buf, len, "%s", prop.name);
    return 0;
}

kdl_status_t kdl_cli_gpu_alloc(kdl_cli_gpu_pool_t *pool, size_t bytes, void **out)
{
    *out = NULL;
    if (pool->n >= KDL_CLI_GPU_POOL_MAX) return kdl_fail(KDL_STATUS_INTERNAL_ERROR, "device pool full");
    cudaError_t err = cudaMalloc(out, bytes ? bytes : 1);
    if (err != cudaSuccess) {
        *out = NULL;
        return cuda_fail(err, "cudaMalloc");
    }
    pool->ptr[pool->n++] = *out;
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_cli_gpu_upload(kdl_cli_gpu_pool_t *pool, const void *src, size_t bytes, void **out)
{
    *out = NULL;
    if (!src) return KDL_STATUS_SUCCESS;
    kdl_status_t st = kdl_cli_gpu_alloc(pool, bytes, out);
    if (st != KDL_STATUS_SUCCESS || bytes == 0) return st;
    cudaError_t err = cudaMemcpy(*out, src, bytes, cudaMemcpyHostToDevice);
    return err == cudaSuccess ? KDL_STATUS_SUCCESS : cuda_fail(err, "cudaMemcpy to device");
}

kdl_status_t kdl_cli_gpu_download(void *dst, const void *dev_src, size_t bytes)
{
    if (!dst || !dev_src || bytes == 0) return KDL_STATUS_SUCCESS;
    cudaError_t err = cudaMemcpy(dst, dev_src, bytes, cudaMemcpyDeviceToHost);
    return err == cudaSuccess ? KDL_STATUS_SUCCESS : cuda_fail(err, "cudaMemcpy to host");
}

void kdl_cli_gpu_pool_free(kdl_cli_gpu_pool_t *pool)
{
    for (int k = 0; k < pool->n; k++) cudaFree(pool->ptr[k]);
    pool->n = 0;
}

static kdl_status_t gpu_sync(kdl_handle_t h)
{
    kdl_stream_t s = NULL;
    kdl_status_t st = kdl_get_stream(h, &s);
    if (st != KDL_STATUS_SUCCESS) return st;
    cudaError_t err = cudaStreamSynchronize((cudaStream_t)s);
    return err == cudaSuccess ? KDL_STATUS_SUCCESS : cuda_fail(err, "cudaStreamSynchronize");
}

#else /* no CUDA in this build */

int kdl_cli_gpu_name(char *buf, size_t len)
{
    snprintf(buf, len, "none");
    return -1;
}
kdl_status_t kdl_cli_gpu_alloc(kdl_cli_gpu_pool_t *pool, size_t bytes, void **out)
{
    *out = NULL;
    return kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
kdl_status_t kdl_cli_gpu_upload(kdl_cli_gpu_pool_t *pool, const void *src, size_t bytes, void **out)
{
    *out = NULL;
    return src ? kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA") : KDL_STATUS_SUCCESS;
}
kdl_status_t kdl_cli_gpu_download(void *dst, const void *dev_src, size_t bytes)
{
    return kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}
void kdl_cli_gpu_pool_free(kdl_cli_gpu_pool_t *pool) { pool->n = 0; }
static kdl_status_t gpu_sync(kdl_handle_t h)
{
    return kdl_fail(KDL_STATUS_NO_DEVICE, "kdloss was built without CUDA");
}

#endif

/* Bytes of a [rows, ld] matrix's first (rows-1)*ld + vocab elements
 * (validated by kdl_loss_validate not to overflow). */
static size_t span_bytes(int64_t rows, int64_t vocab, int64_t ld, kdl_dtype_t t)
{
    if (rows == 0) return 0;
    return (size_t)((rows - 1) * ld + vocab) * kdl_dtype_size(t);
}

/* Device copies of the inputs and device buffers for the outputs of a. */
static kdl_status_t gpu_loss_buffers(kdl_cli_gpu_pool_t *pool, const kdl_loss_desc_t *d, const kdl_loss_args_t *a,
                                     kdl_loss_args_t *da)
{
    const int64_t N = a->rows, V = a->vocab;
    const size_t out = kdl_dtype_size(a->out_dtype), per_row = (size_t)N * out;
    const size_t loss_bytes = d->reduction == KDL_REDUCTION_NONE ? per_row : out;
    void **outs[] = {&da->loss, &da->stat_fkl, &da->stat_rkl, &da->stat_g_head, &da->stat_g_tail,
                     &da->stat_w_head, &da->stat_w_tail};
    kdl_status_t st = kdl_cli_gpu_upload(pool, a->student, span_bytes(N, V, a->ld_student, a->student_dtype),
                                         (void **)&da->student);
    if (!st) st = kdl_cli_gpu_upload(pool, a->teacher, span_bytes(N, V, a->ld_teacher, a->teacher_dtype),
                                     (void **)&da->teacher);
    if (!st) st = kdl_cli_gpu_upload(pool, a->labels, (size_t)N * 8, (void **)&da->labels);
    /* the grad is uploaded when rows have gaps, so the gaps keep the host's bytes */
    if (!st && a->grad && a->ld_grad > V)
        st = kdl_cli_gpu_upload(pool, a->grad, span_bytes(N, V, a->ld_grad, a->grad_dtype), &da->grad);
    else if (!st && a->grad)
        st = kdl_cli_gpu_alloc(pool, span_bytes(N, V, a->ld_grad, a->grad_dtype), &da->grad);
    for (size_t k = 0; k < sizeof outs / sizeof outs[0]; k++)
        if (!st && *outs[k]) st = kdl_cli_gpu_alloc(pool, k == 0 ? loss_bytes : per_row, outs[k]);
    if (!st && a->stat_head_size) st = kdl_cli_gpu_alloc(pool, (size_t)N * 8, (void **)&da->stat_head_size);
    if (!st && a->info) st = kdl_cli_gpu_alloc(pool, 8, (void **)&da->info);
    if (!st && a->valid_rows) st = kdl_cli_gpu_alloc(pool, 8, (void **)&da->valid_rows);
    return st;
}

static kdl_status_t gpu_loss_download(const kdl_loss_desc_t *d, const kdl_loss_args_t *a, const kdl_loss_args_t *da)
{
    const int64_t N = a->rows;
    const size_t out = kdl_dtype_size(a->out_dtype), per_row = (size_t)N * out;
    void *h[] = {a->loss, a->stat_fkl, a->stat_rkl, a->stat_g_head, a->stat_g_tail, a->stat_w_head, a->stat_w_tail};
    const void *dv[] = {da->loss, da->stat_fkl, da->stat_rkl, da->stat_g_head,
                        da->stat_g_tail, da->stat_w_head, da->stat_w_tail};
    kdl_status_t st = kdl_cli_gpu_download(a->grad, da->grad, span_bytes(N, a->vocab, a->ld_grad, a->grad_dtype));
    for (size_t k = 0; k < sizeof h / sizeof h[0]; k++)
        if (!st) st = kdl_cli_gpu_download(h[k], dv[k], k == 0 && d->reduction != KDL_REDUCTION_NONE ? out : per_row);
    if (!st) st = kdl_cli_gpu_download(a->stat_head_size, da->stat_head_size, (size_t)N * 8);
    if (!st) st = kdl_cli_gpu_download(a->info, da->info, 8);
    if (!st) st = kdl_cli_gpu_download(a->valid_rows, da->valid_rows, 8);
    return st;
}

kdl_status_t kdl_cli_gpu_loss_host(kdl_handle_t h, const kdl_loss_desc_t *desc, const kdl_loss_args_t *host_args,
                                   double *kernel_ms)
{
    if (!h) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle is NULL");
    kdl_status_t st = kdl_loss_validate(desc, host_args, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    kdl_cli_gpu_pool_t pool = {{0}, 0};
    kdl_loss_args_t da = *host_args;
    void *ws = NULL;
    size_t ws_bytes = 0;
    st = gpu_loss_buffers(&pool, desc, host_args, &da);
    if (!st) st = kdl_loss_workspace_size(h, desc, &da, &ws_bytes);
    if (!st && ws_bytes) st = kdl_cli_gpu_alloc(&pool, ws_bytes, &ws);
    double t0 = kdl_cli_now();
    if (!st) st = kdl_loss_forward_backward(h, desc, &da, ws, ws_bytes);
    if (!st) st = gpu_sync(h);
    if (kernel_ms) *kernel_ms = 1e3 * (kdl_cli_now() - t0);
    if (!st) st = gpu_loss_download(desc, host_args, &da);
    kdl_cli_gpu_pool_free(&pool);
    return st;
}
