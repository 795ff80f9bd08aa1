/*
 * host/cli_util.h - helpers shared by the `kdloss` subcommands (compiled into
 * the command only, not the library).
 *
 * Conventions every subcommand follows (host/cli.h):
 *   - errors: exactly one line on stderr, "kdloss CMD: reason", then exit 2
 *     for bad usage or bad input, 1 for a failure while computing or writing;
 *   - output: one JSON object on stdout, written only once everything is
 *     computed (numbers with %.17g; NaN as null, +-inf as "inf" / "-inf");
 *   - output files: written atomically (temporary file, then rename), so a
 *     failed run leaves no output file and never a partial one.
 *
 * Functions that return an int "exit code" return 0 on success and have
 * already printed the one-line error otherwise.
 */
#ifndef KDLOSS_HOST_CLI_UTIL_H
#define KDLOSS_HOST_CLI_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kdloss/kdloss.h"
#include "npy.h"

/* ------------------------------------------------------------------ errors */

/* Prints "kdloss CMD: MESSAGE\n" on stderr; newlines inside MESSAGE become
 * spaces so the error is always one line. */
void kdl_cli_error(const char *cmd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Reports a library status: "kdloss CMD: <kdl_status_string> (<last error>)".
 * Returns the exit code: 2 for bad-parameter statuses (1000..1999), 1 for the
 * others (not supported, device, runtime, data). */
int kdl_cli_status_error(const char *cmd, kdl_status_t st);

/* Writing to a closed pipe must give an error, not kill the process:
 * ignores SIGPIPE.  Call once at the start of a subcommand. */
void kdl_cli_ignore_sigpipe(void);

/* Flushes stdout; on a write error reports it and returns 1, else 0. */
int kdl_cli_finish_stdout(const char *cmd);

/* ----------------------------------------------------------------- options */

/* One option of a subcommand.  The parser fills `value`: NULL when absent,
 * the text after "--name VALUE" or "--name=VALUE" for a valued option, ""
 * for a present switch. */
typedef struct kdl_cli_opt {
    const char *name;   /* with dashes: "--temperature"                   */
    int takes_value;    /* 1: needs a value; 0: a switch                   */
    const char *value;  /* out                                             */
} kdl_cli_opt_t;

/* Parses argv[1 .. argc) (argv[0] is the subcommand) against opts[0 .. n).
 * "--help" or "-h" anywhere sets *help to 1 and returns 0 at once.
 * Errors (one line printed, returns 2): an unknown option, a positional
 * argument, a missing value (end of argv, or a next word starting with
 * "--"; write --name=--odd for such a value), a value given to a switch, an
 * option given twice. */
int kdl_cli_parse_options(const char *cmd, int argc, char **argv, kdl_cli_opt_t *opts, size_t n,
                          int *help);

/* Parses a finite double in an interval: lo and hi may be -INFINITY /
 * INFINITY; lo_closed / hi_closed say whether the ends are included.  The
 * whole text must be a number ("1e-3", "0.5"); "nan", "inf", "", "1x" and
 * values outside the interval are errors naming flag.  Returns 0 or 2. */
int kdl_cli_parse_double(const char *cmd, const char *flag, const char *text, double lo, int lo_closed,
                         double hi, int hi_closed, double *out);

/* Parses a decimal int64 in [lo, hi] (whole text, no overflow).  0 or 2. */
int kdl_cli_parse_int64(const char *cmd, const char *flag, const char *text, int64_t lo, int64_t hi,
                        int64_t *out);

/* Parses a name with from_name (one of the kdl_*_from_name functions, -1
 * for unknown); the error lists `choices` ("fkl|rkl|...").  0 or 2. */
int kdl_cli_parse_choice(const char *cmd, const char *flag, const char *text, int (*from_name)(const char *),
                         const char *choices, int *out);

/* An output-file option given as "--flag=" (an empty name): "FLAG needs a
 * file name", 2.  0 when path is NULL (not given) or a name. */
int kdl_cli_check_out_path(const char *cmd, const char *flag, const char *path);

/* The loss options shared by `kdloss loss` and the subcommands of
 * host/cli_ext.c, in this order at the start of a subcommand's option
 * array (KDL_CLI_LOSS_OPTS), its own options after them from
 * KDL_CLI_LOSS_OPT_COUNT on. */
enum {
    KDL_CLI_L_DIVERGENCE, KDL_CLI_L_LABELS, KDL_CLI_L_IGNORE_INDEX, KDL_CLI_L_TEMPERATURE, KDL_CLI_L_ALPHA,
    KDL_CLI_L_BETA, KDL_CLI_L_HEAD_RULE, KDL_CLI_L_MU, KDL_CLI_L_TOP_K, KDL_CLI_L_REDUCTION, KDL_CLI_L_SCALE,
    KDL_CLI_L_BACKEND, KDL_CLI_LOSS_OPT_COUNT
};

#define KDL_CLI_LOSS_OPTS                                                                                      \
    {"--divergence", 1, NULL}, {"--labels", 1, NULL}, {"--ignore-index", 1, NULL}, {"--temperature", 1, NULL}, \
        {"--alpha", 1, NULL}, {"--beta", 1, NULL}, {"--head-rule", 1, NULL}, {"--mu", 1, NULL},                \
        {"--top-k", 1, NULL}, {"--reduction", 1, NULL}, {"--scale", 1, NULL}, {"--backend", 1, NULL}

/* Reads the given loss options of o (laid out as KDL_CLI_LOSS_OPTS) into d
 * (initialised by the caller) and *backend (kdl_cli_backend_t; AUTO when
 * --backend is absent), in a fixed order: --divergence, --head-rule,
 * --reduction, --backend, --temperature, --alpha, --beta, --mu, --scale,
 * --top-k, --ignore-index; the first bad value is the error.  --labels is
 * the caller's.  Returns 0 or 2. */
int kdl_cli_parse_loss_opts(const char *cmd, const kdl_cli_opt_t *o, kdl_loss_desc_t *d, int *backend);

/* -------------------------------------------------------------- .npy files */

/* kdl_npy_load with the error reported as "kdloss CMD: FLAG PATH: reason".
 * Returns 0 or 2.  On failure *out holds nothing to free. */
int kdl_cli_load_npy(const char *cmd, const char *flag, const char *path, kdl_npy_array_t *out);

/* The .npy dtype of a gradient written in dtype t: float64, float16, else
 * float32. */
kdl_npy_dtype_t kdl_cli_npy_grad_dtype(kdl_dtype_t t);

/* Writes a version-1.0 .npy file (see kdl_npy_write_stream) atomically:
 * a temporary "PATH.tmp.XXXXXX" in the same directory is written, flushed,
 * synced and closed, then renamed over path (permissions as a plain fopen
 * would give).  On any failure the temporary is removed and path is
 * untouched.  Returns 0; 2 when the file cannot be created or renamed (no
 * such directory, a directory as the path, a name too long, permission); 1
 * when a write fails (disk full, file size limit). */
int kdl_cli_save_npy(const char *cmd, const char *path, kdl_npy_dtype_t dtype, int ndim, const int64_t *shape,
                     const void *data);

/* Several output files of one run, all or none: every temporary is written
 * and synced before the first rename, and a target that is a directory is
 * an error before anything is written; if a rename still fails (a race),
 * the files this run already renamed into place are removed.  So a failed
 * run leaves no output file (while writing the first output of two, as
 * with one).  The paths must differ.  Returns as kdl_cli_save_npy. */
#define KDL_CLI_MAX_OUTPUTS 4
typedef struct kdl_cli_npy_out {
    const char *path;
    kdl_npy_dtype_t dtype;
    int ndim;
    const int64_t *shape;
    const void *data;
} kdl_cli_npy_out_t;
int kdl_cli_save_npy_all(const char *cmd, const kdl_cli_npy_out_t *outs, int n);

/* kdl_cli_save_npy_all in two steps, so that a run whose JSON cannot be
 * written to stdout leaves no output file either (and an existing file at
 * an output path as it was): kdl_cli_stage_npy_all writes every temporary
 * (on failure: nothing left, *p empty, the exit code); then, after the
 * JSON, kdl_cli_commit(cmd, p, rc) renames them into place when rc is 0
 * and removes them otherwise, and returns rc or a rename's exit code (a
 * rename fails only in a race, as above).  A kdl_cli_pending_t that was
 * zeroed or staged may always be committed; commit empties it. */
typedef struct kdl_cli_pending {
    int n;
    const char *path[KDL_CLI_MAX_OUTPUTS];
    char *tmp[KDL_CLI_MAX_OUTPUTS];
} kdl_cli_pending_t;
int kdl_cli_stage_npy_all(const char *cmd, const kdl_cli_npy_out_t *outs, int n, kdl_cli_pending_t *p);
int kdl_cli_commit(const char *cmd, kdl_cli_pending_t *p, int rc);

/* -------------------------------------------------------------------- JSON */

#define KDL_JSON_MAX_DEPTH 16

/* A streaming JSON writer on one line: values separated by ", ", keys as
 * "key": value.  Pass key NULL for the top-level value and inside arrays.
 * Numbers: %.17g (round-trips), NaN -> null, +inf -> "inf", -inf -> "-inf".
 * Nesting deeper than KDL_JSON_MAX_DEPTH is ignored (never happens in kdloss). */
typedef struct kdl_json {
    FILE *f;
    int depth;
    unsigned char has_items[KDL_JSON_MAX_DEPTH];
} kdl_json_t;

void kdl_json_init(kdl_json_t *j, FILE *f);
void kdl_json_object_begin(kdl_json_t *j, const char *key);
void kdl_json_object_end(kdl_json_t *j);
void kdl_json_array_begin(kdl_json_t *j, const char *key);
void kdl_json_array_end(kdl_json_t *j);
void kdl_json_number(kdl_json_t *j, const char *key, double v);
void kdl_json_int(kdl_json_t *j, const char *key, int64_t v);
void kdl_json_bool(kdl_json_t *j, const char *key, int v);
void kdl_json_string(kdl_json_t *j, const char *key, const char *s); /* escaped; NULL -> null */
void kdl_json_number_array(kdl_json_t *j, const char *key, const double *v, int64_t n);
void kdl_json_int_array(kdl_json_t *j, const char *key, const int64_t *v, int64_t n);
/* Ends the line (after the top-level value). */
void kdl_json_finish(kdl_json_t *j);

/* A loss under key: the array of rows values for KDL_REDUCTION_NONE, else
 * the number loss[0]. */
void kdl_json_loss(kdl_json_t *j, const char *key, kdl_reduction_t reduction, const double *loss, int64_t rows);

/* Closes the top-level object, ends the line and flushes stdout (the
 * object is on stdout); returns kdl_cli_finish_stdout's exit code. */
int kdl_json_end_stdout(kdl_json_t *j, const char *cmd);

/* --------------------------------------------------------------- backends */

typedef enum kdl_cli_backend {
    KDL_CLI_BACKEND_AUTO = 0, /* cuda when a device works, else cpu */
    KDL_CLI_BACKEND_CPU = 1,
    KDL_CLI_BACKEND_CUDA = 2
} kdl_cli_backend_t;

/* "auto" | "cpu" | "cuda" -> kdl_cli_backend_t; -1 for other names (a
 * from_name function for kdl_cli_parse_choice). */
int kdl_cli_backend_from_name(const char *name);

/* Which backend runs for --backend `backend` (kdl_cli_backend_t): *cuda = 1
 * for cuda (asked for; or auto with a device and no float64 input), 0 for
 * the cpu reference.  Asking for cuda without a device ("no CUDA device (use
 * --backend cpu)") or with float64 inputs (f64_error) is a usage error:
 * returns 2.  Else 0. */
int kdl_cli_pick_backend(const char *cmd, int backend, int any_f64, const char *f64_error, int *cuda);

/* The f64_error of `kdloss loss`, sinkhorn and sinkd. */
#define KDL_CLI_F64_NEEDS_CPU "float64 inputs need --backend cpu (the GPU path reads float16/float32)"


/* Seconds on a monotonic clock. */
double kdl_cli_now(void);

/* Name of the current CUDA device ("NVIDIA H100 80GB HBM3") into buf;
 * returns 0, or -1 without a device (buf then holds "none"). */
int kdl_cli_gpu_name(char *buf, size_t len);

/* Device allocations of one run, freed together.  Without CUDA every
 * function returns KDL_STATUS_NO_DEVICE. */
#define KDL_CLI_GPU_POOL_MAX 32
typedef struct kdl_cli_gpu_pool {
    void *ptr[KDL_CLI_GPU_POOL_MAX];
    int n;
} kdl_cli_gpu_pool_t;

/* cudaMalloc of bytes (at least 1) recorded in pool; *out = device pointer. */
kdl_status_t kdl_cli_gpu_alloc(kdl_cli_gpu_pool_t *pool, size_t bytes, void **out);
/* Allocates bytes on the device and copies src there (src may be NULL:
 * then *out is NULL and nothing is allocated). */
kdl_status_t kdl_cli_gpu_upload(kdl_cli_gpu_pool_t *pool, const void *src, size_t bytes, void **out);
kdl_status_t kdl_cli_gpu_download(void *dst, const void *dev_src, size_t bytes);
void kdl_cli_gpu_pool_free(kdl_cli_gpu_pool_t *pool);

/* kdl_loss_forward_backward with HOST pointers in args, as the reference
 * takes them: checks the arguments, uploads the inputs, allocates device
 * outputs for every non-NULL output pointer and a workspace, runs on the
 * handle's stream, waits, and copies every output back into the host
 * pointers.  *kernel_ms (may be NULL) gets the time of the call plus the
 * wait, without the copies.  Bad arguments are reported before anything is
 * allocated or written; after a device failure the host outputs may hold
 * partial results. */
kdl_status_t kdl_cli_gpu_loss_host(kdl_handle_t h, const kdl_loss_desc_t *desc, const kdl_loss_args_t *host_args,
                                   double *kernel_ms);

#endif /* KDLOSS_HOST_CLI_UTIL_H */
