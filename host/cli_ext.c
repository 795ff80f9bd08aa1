/*
 * host/cli_ext.c - the subcommands of the extensions (kdloss_ext.h):
 *
 *   kdloss sparse-loss   loss against a top-k sparse teacher (indices + log-probs)
 *   kdloss fused-linear  loss from hidden states and output weights, dH and dW
 *   kdloss shard-check   the vocabulary-parallel protocol over K shards run
 *                        in-process, compared with the unsharded loss
 *
 * Conventions of every subcommand (host/cli.h, host/cli_util.h): flags
 * checked before any file is read, one JSON object on stdout, errors as one
 * line on stderr with exit 2 (bad usage or input) or 1 (a failure while
 * computing or writing), output files written atomically and only by a run
 * that succeeds.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_util.h"
#include "ext_internal.h"
#include "internal.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"

#ifdef KDL_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

/* ------------------------------------------------- shared loss options */

static const char loss_usage[] =
    "loss options (as kdloss loss)\n"
    "  --divergence NAME    fkl (default) rkl fkl_rkl akl jsd tvd skl srkl\n"
    "  --labels FILE        optional .npy int64 [N]; rows whose label is the ignore\n"
    "                       index are ignored.  --ignore-index I (default -100)\n"
    "  --temperature T      > 0, default 1     --scale X  finite, default 1\n"
    "  --alpha A            skl/srkl, [0, 1), default 0.1\n"
    "  --beta B             jsd, (0, 1), default 0.5\n"
    "  --head-rule RULE     akl: reference (default), mass, topk\n"
    "  --mu M               akl head mass, (0, 1), default 0.5\n"
    "  --top-k K            akl topk head size, default 1\n"
    "  --reduction R        none, sum, mean (default)\n"
    "  --backend B          auto (default: cuda when a device is present and the\n"
    "                       inputs are not float64, else cpu), cpu, cuda\n"
    "\n"
    "Errors: one line on stderr, exit 2 for bad usage or input, 1 for a failure\n"
    "while computing or writing; a failed run writes no file.  JSON numbers have\n"
    "17 significant digits; NaN is null, +-inf the strings \"inf\" / \"-inf\".\n";

/* The front of every subcommand here: options, --help (its usage, then the
 * shared loss options), the required options, the descriptor and backend
 * from the shared loss options.  Returns -1 to go on, else the exit code. */
static int subcommand_front(const char *cmd, const char *usage, int argc, char **argv, kdl_cli_opt_t *o, int n,
                            const int *required, size_t nreq, kdl_loss_desc_t *d, int *backend)
{
    int help = 0;
    kdl_cli_ignore_sigpipe();
    int rc = kdl_cli_parse_options(cmd, argc, argv, o, n, &help);
    if (rc) return rc;
    if (help) {
        fputs(usage, stdout);
        fputs(loss_usage, stdout);
        return kdl_cli_finish_stdout(cmd);
    }
    for (size_t k = 0; k < nreq; k++)
        if (!o[required[k]].value) {
            kdl_cli_error(cmd, "%s is required (see kdloss %s --help)", o[required[k]].name, cmd);
            return 2;
        }
    kdl_loss_desc_init(d);
    rc = kdl_cli_parse_loss_opts(cmd, o, d, backend);
    return rc ? rc : -1;
}

/* ----------------------------------------------------- shared pieces */

/* Loads flag's file as a float matrix: 2-D, or 1-D (one row) when
 * one_row_ok; float16, float32 or float64. */
static int load_float_matrix(const char *cmd, const char *flag, const char *path, int one_row_ok, kdl_npy_array_t *a,
                             int64_t *rows, int64_t *cols, kdl_dtype_t *dt)
{
    int rc = kdl_cli_load_npy(cmd, flag, path, a);
    if (rc) return rc;
    if (kdl_npy_to_kdl_dtype(a->dtype, dt) != 0) {
        kdl_cli_error(cmd, "%s %s: must be float16, float32 or float64, got %s", flag, path,
                      kdl_npy_dtype_name(a->dtype));
        return 2;
    }
    if (!(a->ndim == 2 || (one_row_ok && a->ndim == 1))) {
        kdl_cli_error(cmd, "%s %s: must be 2-D%s, got %d-D", flag, path, one_row_ok ? " (or 1-D for one row)" : "",
                      a->ndim);
        return 2;
    }
    *rows = a->ndim == 1 ? 1 : a->shape[0];
    *cols = a->shape[a->ndim - 1];
    if (*cols < 1) {
        kdl_cli_error(cmd, "%s %s: the last dimension is empty", flag, path);
        return 2;
    }
    if ((uint64_t)a->count > SIZE_MAX / sizeof(double)) {
        kdl_cli_error(cmd, "%s %s: too large", flag, path);
        return 2;
    }
    return 0;
}

/* --labels when given (path not NULL): int64 [rows] into l, *labels its
 * data; *labels NULL without it. */
static int load_labels(const char *cmd, const char *path, int64_t rows, kdl_npy_array_t *l, const int64_t **labels)
{
    *labels = NULL;
    if (!path) return 0;
    int rc = kdl_cli_load_npy(cmd, "--labels", path, l);
    if (!rc && (l->dtype != KDL_NPY_I64 || l->ndim != 1 || l->shape[0] != rows)) {
        kdl_cli_error(cmd, "--labels %s: labels must be int64 [%lld] (one per row)", path, (long long)rows);
        rc = 2;
    }
    if (!rc) *labels = (const int64_t *)l->data;
    return rc;
}

/* Doubles of the loss output: N (at least 1) for KDL_REDUCTION_NONE, else 1. */
static size_t loss_count(const kdl_loss_desc_t *d, int64_t N)
{
    return d->reduction == KDL_REDUCTION_NONE && N > 1 ? (size_t)N : 1;
}

/* A zeroed buffer of n (at least 1) 8-byte elements (double or int64) for
 * *p, when want. */
typedef struct buf8 {
    void **p;
    size_t n;
    int want;
} buf8_t;

/* Allocates every wanted buffer of b[0 .. n): 0, or "out of memory" and 1
 * (what was allocated is the caller's to free). */
static int alloc_bufs(const char *cmd, const buf8_t *b, size_t n)
{
    int ok = 1;
    for (size_t k = 0; k < n; k++)
        if (b[k].want && !(*b[k].p = calloc(b[k].n ? b[k].n : 1, 8))) ok = 0;
    if (ok) return 0;
    kdl_cli_error(cmd, "out of memory");
    return 1;
}

static void free_list(void *const *p, size_t n)
{
    for (size_t k = 0; k < n; k++) free(p[k]);
}

static void npy_free_list(kdl_npy_array_t *const *a, size_t n)
{
    for (size_t k = 0; k < n; k++) kdl_npy_free(a[k]);
}

#define FREE_ALL(...) free_list((void *const[]){__VA_ARGS__}, sizeof((void *const[]){__VA_ARGS__}) / sizeof(void *))
#define NPY_FREE_ALL(...)                                                                                     \
    npy_free_list((kdl_npy_array_t *const[]){__VA_ARGS__},                                                    \
                  sizeof((kdl_npy_array_t *const[]){__VA_ARGS__}) / sizeof(kdl_npy_array_t *))

/* The gradient [N, V] into path as t; 1-D [V] when the student was (ndim 1). */
/* A gradient file [N, V] (or [V]), staged: renamed into place by
 * kdl_cli_commit only once the JSON is out, so a run that cannot write its
 * JSON leaves no output file. */
static int stage_rows(const char *cmd, const char *path, kdl_npy_dtype_t t, int ndim, int64_t N, int64_t V,
                      const void *data, kdl_cli_pending_t *p)
{
    const int64_t shape[2] = {N, V};
    const kdl_cli_npy_out_t g = {path, t, ndim, ndim == 1 ? shape + 1 : shape, data};
    return kdl_cli_stage_npy_all(cmd, &g, 1, p);
}

/* Opens the JSON object on stdout: mode (when not NULL), divergence,
 * reduction, backend, rows. */
static void json_head(kdl_json_t *j, const char *mode, const kdl_loss_desc_t *d, const char *ran, int64_t rows)
{
    kdl_json_init(j, stdout);
    kdl_json_object_begin(j, NULL);
    if (mode) kdl_json_string(j, "mode", mode);
    kdl_json_string(j, "divergence", kdl_divergence_name(d->divergence));
    kdl_json_string(j, "reduction", kdl_reduction_name(d->reduction));
    kdl_json_string(j, "backend", ran);
    kdl_json_int(j, "rows", rows);
}

static void json_loss_counts(kdl_json_t *j, const kdl_loss_desc_t *d, const double *loss, int64_t rows,
                             int64_t valid, int64_t invalid)
{
    kdl_json_loss(j, "loss", d->reduction, loss, rows);
    kdl_json_int(j, "valid_rows", valid);
    kdl_json_int(j, "invalid_rows", invalid);
}

/* The outputs every call here reports, in host memory: the float64 loss
 * and the counts of invalid and valid rows. */
#define SET_LOSS_OUTPUTS(a, loss_, invalid_, valid_)                                                        \
    do {                                                                                                   \
        (a)->out_dtype = KDL_DTYPE_F64;                                                                    \
        (a)->loss = (loss_);                                                                               \
        (a)->info = (invalid_);                                                                            \
        (a)->valid_rows = (valid_);                                                                        \
    } while (0)

static const char f64_needs_cpu[] = "float64 inputs need --backend cpu";

/* One run on the chosen backend: on_cuda (a status) when use_cuda, then,
 * unless it succeeded or --backend cuda was asked for (its failure is the
 * error), on_cpu (an exit code; it reports its own errors).  *ran names the
 * backend whose result stands.  Returns the exit code. */
typedef kdl_status_t (*ext_cuda_fn)(void *ctx);
typedef int (*ext_cpu_fn)(const char *cmd, void *ctx);

static int run_backend(const char *cmd, int backend, int use_cuda, ext_cuda_fn on_cuda, ext_cpu_fn on_cpu, void *ctx,
                       const char **ran)
{
    if (use_cuda && on_cuda) {
        kdl_status_t st = on_cuda(ctx);
        *ran = "cuda";
        if (st == KDL_STATUS_SUCCESS) return 0;
        if (backend == KDL_CLI_BACKEND_CUDA) return kdl_cli_status_error(cmd, st);
    }
    *ran = "cpu";
    return on_cpu(cmd, ctx);
}

/* The reference's status as an exit code. */
static int cpu_status(const char *cmd, kdl_status_t st)
{
    return st == KDL_STATUS_SUCCESS ? 0 : kdl_cli_status_error(cmd, st);
}

#ifdef KDL_HAVE_CUDA
#define ON_CUDA(fn) (fn)

static kdl_status_t sync_and_check(kdl_handle_t h)
{
    kdl_stream_t s = NULL;
    kdl_get_stream(h, &s);
    cudaError_t e = cudaStreamSynchronize((cudaStream_t)s);
    if (e != cudaSuccess) return kdl_fail(KDL_STATUS_CUDA_ERROR, "cudaStreamSynchronize: %s", cudaGetErrorString(e));
    return KDL_STATUS_SUCCESS;
}

/* The start of a call on the device: the argument check's status st, then
 * a handle (*h, to kdl_destroy when this returns success). */
static kdl_status_t gpu_begin(kdl_status_t st, kdl_handle_t *h)
{
    return st ? st : kdl_create(h);
}

/* Device buffers for the loss (nl doubles) and the two row counters every
 * call reports. */
static kdl_status_t gpu_alloc_counts(kdl_cli_gpu_pool_t *pool, size_t nl, void **loss, void **info, void **valid)
{
    kdl_status_t st = kdl_cli_gpu_alloc(pool, nl * 8, loss);
    if (!st) st = kdl_cli_gpu_alloc(pool, 8, info);
    if (!st) st = kdl_cli_gpu_alloc(pool, 8, valid);
    return st;
}

/* ... and their copies back into host memory. */
static kdl_status_t gpu_get_counts(void *loss, const void *dloss, size_t nl, int64_t *info, const void *dinfo,
                                   int64_t *valid, const void *dvalid)
{
    kdl_status_t st = kdl_cli_gpu_download(loss, dloss, nl * 8);
    if (!st) st = kdl_cli_gpu_download(info, dinfo, 8);
    if (!st) st = kdl_cli_gpu_download(valid, dvalid, 8);
    return st;
}
#else
#define ON_CUDA(fn) NULL
#endif

/* ====================================================== sparse-loss */

#define SCMD "sparse-loss"

static const char sparse_usage[] =
    "usage: kdloss sparse-loss --student S.npy --teacher-indices I.npy\n"
    "                          --teacher-logprobs P.npy --mode renormalised|tail [options]\n"
    "\n"
    "Distillation loss against a sparse (top-k) teacher: student logits S [N, V]\n"
    "(or [V]), teacher indices I int64 [N, k] (or [k]) and log-probabilities P\n"
    "float [N, k] at the distillation temperature.  Modes (docs/extensions.md):\n"
    "  renormalised  teacher renormalised on its support, student full-vocabulary;\n"
    "                fkl jsd tvd skl srkl\n"
    "  tail          k support cells plus a bucket with the remaining mass; every\n"
    "                divergence (akl: head within the support)\n"
    "An index outside [0, V) or repeated within a row is a usage error here (exit 2,\n"
    "the row and position named); the library itself counts such a row invalid.\n"
    "\n"
    "  --grad-out FILE      d loss / d student, the student's shape (float64 with\n"
    "                       cpu, the student's dtype with cuda)\n"
    "\n"
    "JSON keys: mode, divergence, reduction, backend, rows, vocab, k, loss,\n"
    "valid_rows, invalid_rows.\n\n";

enum { S_STUDENT = KDL_CLI_LOSS_OPT_COUNT, S_INDICES, S_LOGPROBS, S_MODE, S_GRAD_OUT, S_COUNT };

/* One sparse-loss run: the host arguments, and what each backend needs. */
typedef struct sparse_ctx {
    const kdl_loss_desc_t *d;
    kdl_sparse_args_t a;
    kdl_dtype_t sdt, gdt; /* the student's dtype; the gradient's as written */
    size_t s_bytes, i_bytes, p_bytes;
} sparse_ctx_t;

#ifdef KDL_HAVE_CUDA
/* The GPU path with the gradient in the student's dtype. */
static kdl_status_t sparse_cuda(void *p)
{
    sparse_ctx_t *c = (sparse_ctx_t *)p;
    const kdl_sparse_args_t *ha = &c->a;
    c->a.grad_dtype = c->gdt = c->sdt;
    kdl_handle_t h = NULL;
    kdl_status_t st = gpu_begin(kdl_sparse_validate(c->d, ha, 0), &h);
    if (st) return st;
    kdl_cli_gpu_pool_t pool = {{0}, 0};
    kdl_sparse_args_t da = *ha;
    size_t nl = c->d->reduction == KDL_REDUCTION_NONE ? (size_t)ha->rows : 1;
    size_t g_bytes = ha->grad ? (size_t)ha->rows * (size_t)ha->vocab * kdl_dtype_size(ha->grad_dtype) : 0;
    void *ws = NULL;
    size_t wsb = 0;
    st = kdl_cli_gpu_upload(&pool, ha->student, c->s_bytes, (void **)&da.student);
    if (!st) st = kdl_cli_gpu_upload(&pool, ha->teacher_indices, c->i_bytes, (void **)&da.teacher_indices);
    if (!st) st = kdl_cli_gpu_upload(&pool, ha->teacher_logprobs, c->p_bytes, (void **)&da.teacher_logprobs);
    if (!st && ha->labels) st = kdl_cli_gpu_upload(&pool, ha->labels, (size_t)ha->rows * 8, (void **)&da.labels);
    if (!st && ha->grad) st = kdl_cli_gpu_alloc(&pool, g_bytes, &da.grad);
    if (!st) st = gpu_alloc_counts(&pool, nl, &da.loss, (void **)&da.info, (void **)&da.valid_rows);
    if (!st) st = kdl_cli_gpu_alloc(&pool, 8, (void **)&da.bad_index_rows);
    if (!st) st = kdl_sparse_workspace_size(h, c->d, &da, &wsb);
    if (!st && wsb) st = kdl_cli_gpu_alloc(&pool, wsb, &ws);
    if (!st) st = kdl_sparse_loss(h, c->d, &da, ws, wsb);
    if (!st) st = sync_and_check(h);
    if (!st && ha->grad) st = kdl_cli_gpu_download(ha->grad, da.grad, g_bytes);
    if (!st) st = gpu_get_counts(ha->loss, da.loss, nl, ha->info, da.info, ha->valid_rows, da.valid_rows);
    kdl_cli_gpu_pool_free(&pool);
    kdl_destroy(h);
    return st;
}
#endif

/* The float64 reference with a float64 gradient. */
static int sparse_cpu(const char *cmd, void *p)
{
    sparse_ctx_t *c = (sparse_ctx_t *)p;
    c->a.grad_dtype = c->gdt = KDL_DTYPE_F64;
    return cpu_status(cmd, kdl_ref_sparse_loss(c->d, &c->a));
}

/* --mode: one of the sparse modes, defining the desc's divergence (exit 2
 * otherwise, with the one-line error). */
static int parse_sparse_mode(const char *cmd, const char *value, const kdl_loss_desc_t *d, int *mode)
{
    int rc = kdl_cli_parse_choice(cmd, "--mode", value, kdl_sparse_mode_from_name, "renormalised|tail", mode);
    if (!rc && !kdl_sparse_supports((kdl_sparse_mode_t)*mode, d->divergence)) {
        kdl_cli_error(cmd, "--divergence %s is not defined in --mode %s (use --mode tail)",
                      kdl_divergence_name(d->divergence), kdl_sparse_mode_name((kdl_sparse_mode_t)*mode));
        rc = 2;
    }
    return rc;
}

/* The sparse teacher of N rows over V tokens: --teacher-indices (int64 [N, k],
 * or [k] for one row) into I, --teacher-logprobs (float, the same shape)
 * into P of dtype *pdt; k <= min(V, 1024) and every index in [0, V) and
 * distinct within its row, else a usage error (exit 2).  rows_of: what
 * gives N in the messages ("student", "hidden"). */
static int load_sparse_teacher(const char *cmd, const char *ipath, const char *ppath, const char *rows_of, int64_t N,
                               int64_t V, kdl_npy_array_t *I, kdl_npy_array_t *P, int64_t *k, kdl_dtype_t *pdt)
{
    int64_t Ni = 0, Np = 0, kp = 0;
    int rc = kdl_cli_load_npy(cmd, "--teacher-indices", ipath, I);
    if (!rc && (I->dtype != KDL_NPY_I64 || (I->ndim != 2 && I->ndim != 1) || I->shape[I->ndim - 1] < 1)) {
        kdl_cli_error(cmd, "--teacher-indices %s: must be int64 [N, k] (or [k])", ipath);
        rc = 2;
    }
    if (!rc) {
        Ni = I->ndim == 1 ? 1 : I->shape[0];
        *k = I->shape[I->ndim - 1];
    }
    if (!rc) rc = load_float_matrix(cmd, "--teacher-logprobs", ppath, 1, P, &Np, &kp, pdt);
    if (!rc && (Ni != N || Np != N || kp != *k)) {
        kdl_cli_error(cmd, "shapes disagree: %s has %lld rows, indices [%lld, %lld], log-probs [%lld, %lld]", rows_of,
                      (long long)N, (long long)Ni, (long long)*k, (long long)Np, (long long)kp);
        rc = 2;
    }
    if (!rc && (*k > V || *k > KDL_SPARSE_MAX_K)) {
        kdl_cli_error(cmd, "k = %lld must be at most min(V = %lld, %d)", (long long)*k, (long long)V, KDL_SPARSE_MAX_K);
        rc = 2;
    }
    if (!rc && kdl_sparse_check_indices(N, V, *k, (const int64_t *)I->data, *k) != KDL_STATUS_SUCCESS) {
        kdl_cli_error(cmd, "--teacher-indices %s: %s", ipath, kdl_get_last_error());
        rc = 2;
    }
    return rc;
}

int kdl_cli_sparse_loss(int argc, char **argv)
{
    kdl_cli_pending_t pending = {0}; /* output files, renamed into place after the JSON */
    kdl_cli_ignore_sigpipe();
    kdl_cli_opt_t o[S_COUNT] = {KDL_CLI_LOSS_OPTS, {"--student", 1, NULL}, {"--teacher-indices", 1, NULL},
                                {"--teacher-logprobs", 1, NULL}, {"--mode", 1, NULL}, {"--grad-out", 1, NULL}};
    int backend = 0, mode = 0;
    kdl_loss_desc_t d;
    int rc = subcommand_front(SCMD, sparse_usage, argc, argv, o, S_COUNT,
                              (const int[]){S_STUDENT, S_INDICES, S_LOGPROBS, S_MODE}, 4, &d, &backend);
    if (rc >= 0) return rc;
    rc = parse_sparse_mode(SCMD, o[S_MODE].value, &d, &mode);
    const char *grad_out = o[S_GRAD_OUT].value;
    if (!rc) rc = kdl_cli_check_out_path(SCMD, "--grad-out", grad_out);
    if (rc) return rc;

    kdl_npy_array_t S = {0}, I = {0}, P = {0}, L = {0};
    int64_t N = 0, V = 0, k = 0;
    kdl_dtype_t pdt = KDL_DTYPE_F32;
    const int64_t *labels = NULL;
    double *loss = NULL;
    void *grad = NULL;
    sparse_ctx_t c = {.d = &d, .sdt = KDL_DTYPE_F32, .gdt = KDL_DTYPE_F64};
    rc = load_float_matrix(SCMD, "--student", o[S_STUDENT].value, 1, &S, &N, &V, &c.sdt);
    if (!rc)
        rc = load_sparse_teacher(SCMD, o[S_INDICES].value, o[S_LOGPROBS].value, "student", N, V, &I, &P, &k, &pdt);
    if (!rc) rc = load_labels(SCMD, o[KDL_CLI_L_LABELS].value, N, &L, &labels);
    int use_cuda = 0;
    if (!rc)
        rc = kdl_cli_pick_backend(SCMD, backend, c.sdt == KDL_DTYPE_F64 || pdt == KDL_DTYPE_F64, f64_needs_cpu,
                                  &use_cuda);
    if (!rc)
        rc = alloc_bufs(SCMD, (const buf8_t[]){{(void **)&loss, loss_count(&d, N), 1}, {&grad, (size_t)(N * V), !!grad_out}},
                        2);
    int64_t invalid = 0, valid = 0, bad = 0;
    const char *ran = "cpu";
    if (!rc) {
        kdl_sparse_args_t *a = &c.a;
        kdl_sparse_args_init(a);
        a->mode = (kdl_sparse_mode_t)mode;
        a->rows = N;
        a->vocab = V;
        a->k = k;
        a->student = S.data;
        a->student_dtype = c.sdt;
        a->teacher_indices = (const int64_t *)I.data;
        a->teacher_logprobs = P.data;
        a->teacher_dtype = pdt;
        a->ld_student = a->ld_grad = V;
        a->ld_indices = a->ld_logprobs = k;
        a->labels = labels;
        a->grad = grad;
        SET_LOSS_OUTPUTS(a, loss, &invalid, &valid);
        a->bad_index_rows = &bad;
        c.s_bytes = (size_t)S.count * kdl_dtype_size(c.sdt);
        c.i_bytes = (size_t)I.count * 8;
        c.p_bytes = (size_t)P.count * kdl_dtype_size(pdt);
        rc = run_backend(SCMD, backend, use_cuda, ON_CUDA(sparse_cuda), sparse_cpu, &c, &ran);
    }
    if (!rc && grad_out) {
        kdl_npy_dtype_t nt = kdl_cli_npy_grad_dtype(c.gdt);
        rc = stage_rows(SCMD, grad_out, nt, S.ndim, N, V, grad, &pending);
    }
    if (!rc) {
        kdl_json_t j;
        json_head(&j, kdl_sparse_mode_name((kdl_sparse_mode_t)mode), &d, ran, N);
        kdl_json_int(&j, "vocab", V);
        kdl_json_int(&j, "k", k);
        json_loss_counts(&j, &d, loss, N, valid, invalid);
        rc = kdl_json_end_stdout(&j, SCMD);
    }
    rc = kdl_cli_commit(SCMD, &pending, rc);
    FREE_ALL(loss, grad);
    NPY_FREE_ALL(&S, &I, &P, &L);
    return rc;
}

/* ===================================================== fused-linear */

#define FCMD "fused-linear"

static const char fused_usage[] =
    "usage: kdloss fused-linear --hidden H.npy --weight W.npy --teacher T.npy [options]\n"
    "       kdloss fused-linear --hidden H.npy --weight W.npy --teacher-hidden Ht.npy\n"
    "                           --teacher-weight Wt.npy [--teacher-bias Bt.npy] [options]\n"
    "       kdloss fused-linear --hidden H.npy --weight W.npy --teacher-indices I.npy\n"
    "                           --teacher-logprobs P.npy --mode renormalised|tail [options]\n"
    "\n"
    "Distillation loss of the student logits H W^T (never materialised on the GPU\n"
    "path: chunks of rows) against the teacher logits, and its gradients with\n"
    "respect to H and W.  H float [N, d], W float [V, d].  One teacher source:\n"
    "  --teacher T.npy         the teacher logits, float [N, V]\n"
    "  --teacher-hidden Ht.npy the teacher as a linear layer: logits Ht Wt^T (+ Bt),\n"
    "  --teacher-weight Wt.npy formed chunk by chunk as the student's (frozen: no\n"
    "  --teacher-bias Bt.npy   gradient); Ht float [N, d_t], Wt float [V, d_t],\n"
    "                          Bt float [V] (optional); d_t may differ from d\n"
    "  --teacher-indices I.npy a sparse (top-k) teacher, as sparse-loss takes it:\n"
    "  --teacher-logprobs P.npy indices int64 [N, k], log-probabilities float\n"
    "  --mode renormalised|tail [N, k] at the temperature; a bad index is a usage\n"
    "                          error (exit 2)\n"
    "\n"
    "  --chunk-rows C          rows per chunk (GPU); default max(1, N/8), N/24 for\n"
    "                          16-bit H and W, N/16 and N/40 with --teacher-hidden;\n"
    "                          <= 4096 (kdl_fused_linear_args_t.chunk_rows)\n"
    "  --grad-hidden-out FILE  dH [N, d] (.npy; float64 with cpu, float32 with cuda)\n"
    "  --grad-weight-out FILE  dW [V, d]\n"
    "  --bias B.npy            float [V]: student logits H W^T + b\n"
    "  --grad-bias-out FILE    db [V] (column sums of d loss / d logits)\n"
    "  --grad-output G.npy     float [N], --reduction none only: the upstream\n"
    "                          gradient of each row's loss (scales dL's rows)\n"
    "\n"
    "JSON keys: divergence, reduction, backend, rows, hidden, vocab, chunk_rows,\n"
    "loss, valid_rows, invalid_rows, teacher (\"logits\", \"linear\" or \"sparse\";\n"
    "with \"linear\" also teacher_hidden, d_t; with \"sparse\" also mode, k and\n"
    "bad_index_rows), and the GPU memory model:\n"
    "workspace_bytes (extra device bytes of the chunked call) and logits_bytes\n"
    "(N x V x 4, the float32 logits a non-fused call would materialise; twice\n"
    "that with the teacher as a linear layer: its logits too), both of the cuda\n"
    "call whichever backend ran.  The cuda backend takes float16 H and W as they\n"
    "are (and a float16 bias; a bias of another dtype makes it use float32 copies\n"
    "of H, W and bias), H and W of different dtypes as float32 copies; likewise\n"
    "float16 Ht, Wt (and Bt) as they are, else float32 copies of the three; its\n"
    "dH, dW, db are float32.  With --backend cpu, Ht, Wt, Bt of different dtypes\n"
    "are read as exact float64 copies.  The cuda backend takes log-probabilities\n"
    "of float32, float16 or bfloat16 as they are.\n\n";

enum {
    F_HIDDEN = KDL_CLI_LOSS_OPT_COUNT, F_WEIGHT, F_TEACHER, F_CHUNK, F_GH_OUT, F_GW_OUT, F_BIAS, F_GB_OUT, F_GOUT,
    F_THIDDEN, F_TWEIGHT, F_TBIAS, F_TINDICES, F_TLOGPROBS, F_MODE, F_COUNT
};

/* float64 copy of a float array (exact). */
static double *to_f64(const kdl_npy_array_t *a, kdl_dtype_t dt)
{
    double *f = (double *)malloc((size_t)(a->count > 0 ? a->count : 1) * sizeof(double));
    if (f)
        for (int64_t i = 0; i < a->count; i++) f[i] = kdl_load_as_double(a->data, dt, i);
    return f;
}

/* One fused-linear run: the host arguments (H, W, T, bias as loaded; or
 * the teacher's Ht, Wt, Bt), the loaded arrays for the copies either backend
 * may need, and the copies. */
typedef struct fused_ctx {
    const kdl_loss_desc_t *d;
    kdl_fused_linear_args_t a;
    const kdl_npy_array_t *H, *W, *B, *T, *TH, *TW, *TB, *I, *P;
    kdl_dtype_t hdt, wdt, bdt, gdt; /* gdt: the gradients' dtype as written */
    kdl_dtype_t thdt, twdt, tbdt;   /* of Ht, Wt, Bt as loaded */
    int has_bias, tlin, has_tbias;  /* --bias, --teacher-hidden, --teacher-bias given */
    int sparse;                     /* --teacher-indices given */
    float *h32, *w32, *b32, *th32, *tw32, *tb32;
    double *w64, *b64, *th64, *tw64, *tb64;
} fused_ctx_t;

/* The dtype a linear layer's X, W (and bias b, read in W's dtype) take on
 * the GPU path: the loaded one when X and W share a 16-bit dtype and b, when
 * given, has it too (passed through: no copy, no rounding); else float32
 * (float32 data as loaded, 16-bit data as exact float32 copies).  float64
 * never reaches the GPU path (kdl_cli_pick_backend). */
static kdl_dtype_t gpu_layer_dtype(kdl_dtype_t xdt, kdl_dtype_t wdt, int has_b, kdl_dtype_t bdt)
{
    const int sixteen = (xdt == KDL_DTYPE_F16 || xdt == KDL_DTYPE_BF16) && wdt == xdt;
    return sixteen && (!has_b || bdt == xdt) ? xdt : KDL_DTYPE_F32;
}

/* The student's H, W, b and the teacher layer's Ht, Wt, Bt on the GPU path. */
static kdl_dtype_t fused_gpu_dtype(const fused_ctx_t *c)
{
    return gpu_layer_dtype(c->hdt, c->wdt, c->has_bias, c->bdt);
}
static kdl_dtype_t fused_gpu_tdtype(const fused_ctx_t *c)
{
    return gpu_layer_dtype(c->thdt, c->twdt, c->has_tbias, c->tbdt);
}

#ifdef KDL_HAVE_CUDA
/* a's data as float32 into *data: a itself when it is float32, else a
 * float32 copy into *copy (the caller frees it). */
static kdl_status_t as_f32(const kdl_npy_array_t *a, kdl_dtype_t dt, float **copy, const void **data)
{
    if (dt == KDL_DTYPE_F32) {
        *data = a->data;
        return KDL_STATUS_SUCCESS;
    }
    float *f = (float *)malloc((size_t)(a->count > 0 ? a->count : 1) * sizeof(float));
    if (!f) return kdl_fail(KDL_STATUS_ALLOC_FAILED, "float32 copies");
    for (int64_t i = 0; i < a->count; i++) f[i] = (float)kdl_load_as_double(a->data, dt, i);
    *copy = f;
    *data = f;
    return KDL_STATUS_SUCCESS;
}

/* t_bytes: of the teacher logits (unused with the teacher as a linear layer
 * or sparse). */
static kdl_status_t fused_on_device(const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *ha, size_t t_bytes)
{
    kdl_handle_t h = NULL;
    kdl_status_t st = gpu_begin(kdl_fused_linear_validate(d, ha, 0), &h);
    if (st) return st;
    kdl_cli_gpu_pool_t pool = {{0}, 0};
    kdl_fused_linear_args_t da = *ha;
    size_t nl = d->reduction == KDL_REDUCTION_NONE ? (size_t)ha->rows : 1;
    const size_t nh = (size_t)ha->rows * (size_t)ha->hidden, nw = (size_t)ha->vocab * (size_t)ha->hidden;
    const size_t isz = kdl_dtype_size(ha->hidden_dtype), gsz = kdl_dtype_size(ha->grad_dtype);
    const size_t bb = (size_t)ha->vocab * isz, gbb = (size_t)ha->vocab * gsz;
    void *ws = NULL;
    size_t wsb = 0;
    st = kdl_cli_gpu_upload(&pool, ha->hidden_states, nh * isz, (void **)&da.hidden_states);
    if (!st) st = kdl_cli_gpu_upload(&pool, ha->weight, nw * isz, (void **)&da.weight);
    if (!st && ha->teacher) st = kdl_cli_gpu_upload(&pool, ha->teacher, t_bytes, (void **)&da.teacher);
    if (ha->teacher_hidden) {
        const size_t tsz = kdl_dtype_size(ha->teacher_linear_dtype), dt = (size_t)ha->teacher_hidden_size;
        if (!st)
            st = kdl_cli_gpu_upload(&pool, ha->teacher_hidden, (size_t)ha->rows * dt * tsz,
                                    (void **)&da.teacher_hidden);
        if (!st)
            st = kdl_cli_gpu_upload(&pool, ha->teacher_weight, (size_t)ha->vocab * dt * tsz,
                                    (void **)&da.teacher_weight);
        if (!st && ha->teacher_bias)
            st = kdl_cli_gpu_upload(&pool, ha->teacher_bias, (size_t)ha->vocab * tsz, (void **)&da.teacher_bias);
    }
    if (ha->teacher_indices) {
        const size_t nk = (size_t)ha->rows * (size_t)ha->k;
        if (!st) st = kdl_cli_gpu_upload(&pool, ha->teacher_indices, nk * 8, (void **)&da.teacher_indices);
        if (!st)
            st = kdl_cli_gpu_upload(&pool, ha->teacher_logprobs, nk * kdl_dtype_size(ha->teacher_logprobs_dtype),
                                    (void **)&da.teacher_logprobs);
        if (!st) st = kdl_cli_gpu_alloc(&pool, 8, (void **)&da.bad_index_rows);
    }
    if (!st && ha->labels) st = kdl_cli_gpu_upload(&pool, ha->labels, (size_t)ha->rows * 8, (void **)&da.labels);
    if (!st && ha->grad_hidden) st = kdl_cli_gpu_alloc(&pool, nh * gsz, &da.grad_hidden);
    if (!st && ha->grad_weight) st = kdl_cli_gpu_alloc(&pool, nw * gsz, &da.grad_weight);
    if (!st && ha->bias) st = kdl_cli_gpu_upload(&pool, ha->bias, bb, (void **)&da.bias);
    if (!st && ha->grad_bias) st = kdl_cli_gpu_alloc(&pool, gbb, &da.grad_bias);
    if (!st && ha->grad_output)
        st = kdl_cli_gpu_upload(&pool, ha->grad_output, (size_t)ha->rows * kdl_dtype_size(ha->grad_output_dtype),
                                (void **)&da.grad_output);
    if (!st) st = gpu_alloc_counts(&pool, nl, &da.loss, (void **)&da.info, (void **)&da.valid_rows);
    if (!st) st = kdl_fused_linear_workspace_size(h, d, &da, &wsb);
    if (!st && wsb) st = kdl_cli_gpu_alloc(&pool, wsb, &ws);
    if (!st) st = kdl_fused_linear_loss(h, d, &da, ws, wsb);
    if (!st) st = sync_and_check(h);
    if (!st && ha->grad_hidden) st = kdl_cli_gpu_download(ha->grad_hidden, da.grad_hidden, nh * gsz);
    if (!st && ha->grad_weight) st = kdl_cli_gpu_download(ha->grad_weight, da.grad_weight, nw * gsz);
    if (!st && ha->grad_bias) st = kdl_cli_gpu_download(ha->grad_bias, da.grad_bias, gbb);
    if (!st) st = gpu_get_counts(ha->loss, da.loss, nl, ha->info, da.info, ha->valid_rows, da.valid_rows);
    if (!st && ha->bad_index_rows) st = kdl_cli_gpu_download(ha->bad_index_rows, da.bad_index_rows, 8);
    kdl_cli_gpu_pool_free(&pool);
    kdl_destroy(h);
    return st;
}

/* The GPU path: H, W and the bias in fused_gpu_dtype, Ht, Wt, Bt in
 * fused_gpu_tdtype (16-bit ones passed through as loaded), float32 gradients
 * (into the 8-byte buffers: the files are written as float32). */
static kdl_status_t fused_cuda(void *p)
{
    fused_ctx_t *c = (fused_ctx_t *)p;
    kdl_status_t st = KDL_STATUS_SUCCESS;
    kdl_fused_linear_args_t g = c->a;
    g.hidden_dtype = g.weight_dtype = fused_gpu_dtype(c);
    g.grad_dtype = c->gdt = KDL_DTYPE_F32;
    if (g.hidden_dtype == KDL_DTYPE_F32) {
        st = as_f32(c->H, c->hdt, &c->h32, &g.hidden_states);
        if (!st) st = as_f32(c->W, c->wdt, &c->w32, &g.weight);
        if (!st && g.bias) st = as_f32(c->B, c->bdt, &c->b32, &g.bias);
    }
    if (c->tlin) {
        g.teacher_linear_dtype = fused_gpu_tdtype(c);
        if (g.teacher_linear_dtype == KDL_DTYPE_F32) {
            if (!st) st = as_f32(c->TH, c->thdt, &c->th32, &g.teacher_hidden);
            if (!st) st = as_f32(c->TW, c->twdt, &c->tw32, &g.teacher_weight);
            if (!st && g.teacher_bias) st = as_f32(c->TB, c->tbdt, &c->tb32, &g.teacher_bias);
        }
    }
    if (!st)
        st = fused_on_device(c->d, &g,
                             c->tlin || c->sparse ? 0 : (size_t)c->T->count * kdl_dtype_size(c->a.teacher_dtype));
    return st;
}
#endif

/* The float64 reference with float64 gradients. */
static int fused_cpu(const char *cmd, void *p)
{
    fused_ctx_t *c = (fused_ctx_t *)p;
    if (c->a.bias && c->bdt != c->wdt) {
        /* the bias is read in weight_dtype: exact float64 copies of both when they differ */
        c->w64 = to_f64(c->W, c->wdt);
        c->b64 = to_f64(c->B, c->bdt);
        if (!c->w64 || !c->b64) {
            kdl_cli_error(cmd, "out of memory");
            return 1;
        }
        c->a.weight = c->w64;
        c->a.bias = c->b64;
        c->a.weight_dtype = KDL_DTYPE_F64;
    }
    if (c->tlin && (c->twdt != c->thdt || (c->has_tbias && c->tbdt != c->thdt))) {
        /* Ht, Wt, Bt are read in one dtype: exact float64 copies of the three when they differ */
        c->th64 = to_f64(c->TH, c->thdt);
        c->tw64 = to_f64(c->TW, c->twdt);
        if (c->has_tbias) c->tb64 = to_f64(c->TB, c->tbdt);
        if (!c->th64 || !c->tw64 || (c->has_tbias && !c->tb64)) {
            kdl_cli_error(cmd, "out of memory");
            return 1;
        }
        c->a.teacher_hidden = c->th64;
        c->a.teacher_weight = c->tw64;
        if (c->has_tbias) c->a.teacher_bias = c->tb64;
        c->a.teacher_linear_dtype = KDL_DTYPE_F64;
    }
    c->a.grad_dtype = c->gdt = KDL_DTYPE_F64;
    return cpu_status(cmd, kdl_ref_fused_linear_loss(c->d, &c->a));
}

/* A bias file: float, 1-D [V] (one per vocabulary entry). */
static int load_bias(const char *cmd, const char *flag, const char *path, int64_t V, kdl_npy_array_t *B,
                     kdl_dtype_t *dt)
{
    int64_t one = 0, Vb = 0;
    int rc = load_float_matrix(cmd, flag, path, 1, B, &one, &Vb, dt);
    if (!rc && (B->ndim != 1 || Vb != V)) {
        kdl_cli_error(cmd, "%s %s: must be 1-D [%lld] (one per vocabulary entry)", flag, path, (long long)V);
        rc = 2;
    }
    return rc;
}

int kdl_cli_fused_linear(int argc, char **argv)
{
    kdl_cli_pending_t pending = {0}; /* output files, renamed into place after the JSON */
    kdl_cli_ignore_sigpipe();
    kdl_cli_opt_t o[F_COUNT] = {KDL_CLI_LOSS_OPTS,
                                {"--hidden", 1, NULL},          {"--weight", 1, NULL},
                                {"--teacher", 1, NULL},         {"--chunk-rows", 1, NULL},
                                {"--grad-hidden-out", 1, NULL}, {"--grad-weight-out", 1, NULL},
                                {"--bias", 1, NULL},            {"--grad-bias-out", 1, NULL},
                                {"--grad-output", 1, NULL},     {"--teacher-hidden", 1, NULL},
                                {"--teacher-weight", 1, NULL},  {"--teacher-bias", 1, NULL},
                                {"--teacher-indices", 1, NULL}, {"--teacher-logprobs", 1, NULL},
                                {"--mode", 1, NULL}};
    int backend = 0;
    kdl_loss_desc_t d;
    int rc = subcommand_front(FCMD, fused_usage, argc, argv, o, F_COUNT, (const int[]){F_HIDDEN, F_WEIGHT}, 2, &d,
                              &backend);
    if (rc >= 0) return rc;
    /* one teacher source: --teacher, or --teacher-hidden with --teacher-weight (and --teacher-bias), or
     * --teacher-indices with --teacher-logprobs and --mode */
    const int tlin = o[F_THIDDEN].value || o[F_TWEIGHT].value || o[F_TBIAS].value;
    const int sparse = o[F_TINDICES].value || o[F_TLOGPROBS].value || o[F_MODE].value;
    int mode = 0;
    rc = 0;
    if ((o[F_TEACHER].value != NULL) + tlin + sparse > 1) {
        kdl_cli_error(FCMD, "give one teacher: --teacher, --teacher-hidden with --teacher-weight, or "
                            "--teacher-indices with --teacher-logprobs and --mode (not two)");
        rc = 2;
    } else if (!o[F_TEACHER].value && !tlin && !sparse) {
        kdl_cli_error(FCMD, "a teacher is required: --teacher T.npy, --teacher-hidden Ht.npy with "
                            "--teacher-weight Wt.npy, or --teacher-indices I.npy with --teacher-logprobs P.npy "
                            "and --mode (see kdloss %s --help)", FCMD);
        rc = 2;
    } else if (sparse && (!o[F_TINDICES].value || !o[F_TLOGPROBS].value || !o[F_MODE].value)) {
        kdl_cli_error(FCMD, "the sparse teacher needs --teacher-indices, --teacher-logprobs and --mode (missing %s)",
                      !o[F_TINDICES].value    ? "--teacher-indices"
                      : !o[F_TLOGPROBS].value ? "--teacher-logprobs"
                                              : "--mode");
        rc = 2;
    } else if (sparse) {
        rc = parse_sparse_mode(FCMD, o[F_MODE].value, &d, &mode);
    } else if (tlin && (!o[F_THIDDEN].value || !o[F_TWEIGHT].value)) {
        const int th = o[F_THIDDEN].value != NULL, tw = o[F_TWEIGHT].value != NULL;
        kdl_cli_error(FCMD, "%s needs %s", th ? "--teacher-hidden" : tw ? "--teacher-weight" : "--teacher-bias",
                      th ? "--teacher-weight" : tw ? "--teacher-hidden" : "--teacher-hidden and --teacher-weight");
        rc = 2;
    }
    int64_t chunk = 0;
    if (!rc && o[F_CHUNK].value) rc = kdl_cli_parse_int64(FCMD, "--chunk-rows", o[F_CHUNK].value, 1, INT64_MAX, &chunk);
    const char *gh_out = o[F_GH_OUT].value, *gw_out = o[F_GW_OUT].value, *gb_out = o[F_GB_OUT].value;
    if (!rc) rc = kdl_cli_check_out_path(FCMD, "--grad-hidden-out", gh_out);
    if (!rc) rc = kdl_cli_check_out_path(FCMD, "--grad-weight-out", gw_out);
    if (!rc) rc = kdl_cli_check_out_path(FCMD, "--grad-bias-out", gb_out);
    if (!rc && ((gh_out && gw_out && !strcmp(gh_out, gw_out)) || (gh_out && gb_out && !strcmp(gh_out, gb_out)) ||
                (gw_out && gb_out && !strcmp(gw_out, gb_out)))) {
        kdl_cli_error(FCMD, "two of --grad-hidden-out, --grad-weight-out, --grad-bias-out name the same file");
        rc = 2;
    }
    if (rc) return rc;

    kdl_npy_array_t H = {0}, W = {0}, T = {0}, L = {0}, B = {0}, G = {0}, TH = {0}, TW = {0}, TB = {0}, I = {0},
                    P = {0};
    int64_t N = 0, D = 0, V = 0, Dw = 0, Nt = 0, Vt = 0, Dt = 0, Dtw = 0, k = 0;
    kdl_dtype_t tdt = KDL_DTYPE_F32, godt = KDL_DTYPE_F32, pdt = KDL_DTYPE_F32;
    const int64_t *labels = NULL;
    double *loss = NULL, *gh = NULL, *gw = NULL, *gb = NULL;
    fused_ctx_t c = {.d = &d, .H = &H, .W = &W, .B = &B, .T = &T, .TH = &TH, .TW = &TW, .TB = &TB, .I = &I, .P = &P,
                     .sparse = sparse,
                     .hdt = KDL_DTYPE_F32, .wdt = KDL_DTYPE_F32, .bdt = KDL_DTYPE_F32, .gdt = KDL_DTYPE_F64,
                     .thdt = KDL_DTYPE_F32, .twdt = KDL_DTYPE_F32, .tbdt = KDL_DTYPE_F32, .tlin = tlin,
                     .has_tbias = o[F_TBIAS].value != NULL};
    rc = load_float_matrix(FCMD, "--hidden", o[F_HIDDEN].value, 0, &H, &N, &D, &c.hdt);
    if (!rc) rc = load_float_matrix(FCMD, "--weight", o[F_WEIGHT].value, 0, &W, &V, &Dw, &c.wdt);
    if (!rc && sparse && Dw != D) {
        kdl_cli_error(FCMD, "shapes disagree: hidden [%lld, %lld], weight [%lld, %lld]", (long long)N, (long long)D,
                      (long long)V, (long long)Dw);
        rc = 2;
    }
    if (!rc && sparse)
        rc = load_sparse_teacher(FCMD, o[F_TINDICES].value, o[F_TLOGPROBS].value, "hidden", N, V, &I, &P, &k, &pdt);
    if (!rc && !tlin && !sparse) rc = load_float_matrix(FCMD, "--teacher", o[F_TEACHER].value, 0, &T, &Nt, &Vt, &tdt);
    if (!rc && !tlin && !sparse && (Dw != D || Nt != N || Vt != V)) {
        kdl_cli_error(FCMD, "shapes disagree: hidden [%lld, %lld], weight [%lld, %lld], teacher [%lld, %lld]",
                      (long long)N, (long long)D, (long long)V, (long long)Dw, (long long)Nt, (long long)Vt);
        rc = 2;
    }
    if (!rc && tlin) rc = load_float_matrix(FCMD, "--teacher-hidden", o[F_THIDDEN].value, 0, &TH, &Nt, &Dt, &c.thdt);
    if (!rc && tlin)
        rc = load_float_matrix(FCMD, "--teacher-weight", o[F_TWEIGHT].value, 0, &TW, &Vt, &Dtw, &c.twdt);
    if (!rc && tlin && (Dw != D || Nt != N || Vt != V || Dtw != Dt)) {
        kdl_cli_error(FCMD,
                      "shapes disagree: hidden [%lld, %lld], weight [%lld, %lld], teacher-hidden [%lld, %lld], "
                      "teacher-weight [%lld, %lld]",
                      (long long)N, (long long)D, (long long)V, (long long)Dw, (long long)Nt, (long long)Dt,
                      (long long)Vt, (long long)Dtw);
        rc = 2;
    }
    if (!rc && c.has_tbias) rc = load_bias(FCMD, "--teacher-bias", o[F_TBIAS].value, V, &TB, &c.tbdt);
    if (!rc) rc = load_labels(FCMD, o[KDL_CLI_L_LABELS].value, N, &L, &labels);
    if (!rc && o[F_BIAS].value) rc = load_bias(FCMD, "--bias", o[F_BIAS].value, V, &B, &c.bdt);
    if (!rc && o[F_GOUT].value) {
        int64_t one = 0, Ng = 0;
        rc = load_float_matrix(FCMD, "--grad-output", o[F_GOUT].value, 1, &G, &one, &Ng, &godt);
        if (!rc && (G.ndim != 1 || Ng != N)) {
            kdl_cli_error(FCMD, "--grad-output %s: must be 1-D [%lld] (one per row)", o[F_GOUT].value, (long long)N);
            rc = 2;
        }
        if (!rc && d.reduction != KDL_REDUCTION_NONE) {
            kdl_cli_error(FCMD, "--grad-output needs --reduction none (per-row losses)");
            rc = 2;
        }
    }
    int use_cuda = 0;
    if (!rc) {
        int any_f64 = c.hdt == KDL_DTYPE_F64 || c.wdt == KDL_DTYPE_F64 || (!tlin && !sparse && tdt == KDL_DTYPE_F64) ||
                      (sparse && pdt == KDL_DTYPE_F64) ||
                      (o[F_BIAS].value && c.bdt == KDL_DTYPE_F64) ||
                      (tlin && (c.thdt == KDL_DTYPE_F64 || c.twdt == KDL_DTYPE_F64 ||
                                (c.has_tbias && c.tbdt == KDL_DTYPE_F64)));
        rc = kdl_cli_pick_backend(FCMD, backend, any_f64, f64_needs_cpu, &use_cuda);
    }
    if (!rc)
        rc = alloc_bufs(FCMD,
                        (const buf8_t[]){{(void **)&loss, loss_count(&d, N), 1},
                                         {(void **)&gh, (size_t)(N * D), !!gh_out},
                                         {(void **)&gw, (size_t)(V * D), !!gw_out},
                                         {(void **)&gb, (size_t)V, !!gb_out}},
                        4);
    int64_t invalid = 0, valid = 0, bad = 0;
    const char *ran = "cpu";
    kdl_fused_linear_args_t *a = &c.a;
    kdl_fused_linear_args_init(a);
    if (!rc) {
        a->rows = N;
        a->hidden = D;
        a->vocab = V;
        a->hidden_states = H.data;
        a->hidden_dtype = c.hdt;
        a->weight = W.data;
        a->weight_dtype = c.wdt;
        if (tlin) {
            a->teacher_hidden = TH.data;
            a->teacher_hidden_size = a->ld_teacher_hidden = a->ld_teacher_weight = Dt;
            a->teacher_weight = TW.data;
            a->teacher_bias = c.has_tbias ? TB.data : NULL;
            a->teacher_linear_dtype = c.thdt;
        } else if (sparse) {
            a->teacher_indices = (const int64_t *)I.data;
            a->teacher_logprobs = P.data;
            a->ld_teacher_indices = a->ld_teacher_logprobs = a->k = k;
            a->teacher_logprobs_dtype = pdt;
            a->sparse_mode = (kdl_sparse_mode_t)mode;
            a->bad_index_rows = &bad;
        } else {
            a->teacher = T.data;
            a->teacher_dtype = tdt;
            a->ld_teacher = V;
        }
        a->ld_hidden = a->ld_weight = a->ld_grad_hidden = a->ld_grad_weight = D;
        a->labels = labels;
        a->grad_hidden = gh;
        a->grad_weight = gw;
        a->grad_bias = gb;
        a->chunk_rows = chunk;
        SET_LOSS_OUTPUTS(a, loss, &invalid, &valid);
        if (o[F_GOUT].value) {
            a->grad_output = G.data;
            a->grad_output_dtype = godt;
        }
        if (o[F_BIAS].value) a->bias = B.data;
        c.has_bias = o[F_BIAS].value != NULL;
        rc = run_backend(FCMD, backend, use_cuda, ON_CUDA(fused_cuda), fused_cpu, &c, &ran);
    }
    kdl_npy_dtype_t nt = c.gdt == KDL_DTYPE_F64 ? KDL_NPY_F64 : KDL_NPY_F32;
    if (!rc && (gh_out || gw_out || gb_out)) { /* every file or none */
        const int64_t gh_shape[2] = {N, D}, gw_shape[2] = {V, D}, gb_shape[1] = {V};
        kdl_cli_npy_out_t outs[3];
        int n_outs = 0;
        if (gh_out) outs[n_outs++] = (kdl_cli_npy_out_t){gh_out, nt, 2, gh_shape, gh};
        if (gw_out) outs[n_outs++] = (kdl_cli_npy_out_t){gw_out, nt, 2, gw_shape, gw};
        if (gb_out) outs[n_outs++] = (kdl_cli_npy_out_t){gb_out, nt, 1, gb_shape, gb};
        rc = kdl_cli_stage_npy_all(FCMD, outs, n_outs, &pending);
    }
    if (!rc) {
        kdl_json_t j;
        json_head(&j, sparse ? kdl_sparse_mode_name((kdl_sparse_mode_t)mode) : NULL, &d, ran, N);
        kdl_json_int(&j, "hidden", D);
        kdl_json_int(&j, "vocab", V);
        kdl_fused_linear_args_t wa = *a; /* the GPU path's call (whichever backend ran) */
        wa.hidden_dtype = wa.weight_dtype = fused_gpu_dtype(&c);
        wa.grad_dtype = KDL_DTYPE_F32;
        if (tlin) wa.teacher_linear_dtype = fused_gpu_tdtype(&c);
        kdl_json_int(&j, "chunk_rows", kdl_fused_linear_chunk_rows(&wa));
        json_loss_counts(&j, &d, loss, N, valid, invalid);
        kdl_json_string(&j, "teacher", tlin ? "linear" : sparse ? "sparse" : "logits");
        if (tlin) kdl_json_int(&j, "teacher_hidden", Dt);
        if (sparse) {
            kdl_json_int(&j, "k", k);
            kdl_json_int(&j, "bad_index_rows", bad);
        }
        kdl_json_int(&j, "workspace_bytes", (int64_t)kdl_ext_fused_workspace_bytes(&wa));
        kdl_json_int(&j, "logits_bytes", N * V * 4 * (tlin ? 2 : 1));
        rc = kdl_json_end_stdout(&j, FCMD);
    }
    rc = kdl_cli_commit(FCMD, &pending, rc);
    FREE_ALL(loss, gh, gw, gb, c.h32, c.w32, c.b32, c.w64, c.b64, c.th32, c.tw32, c.tb32, c.th64, c.tw64, c.tb64);
    NPY_FREE_ALL(&H, &B, &G, &W, &T, &L, &TH, &TW, &TB, &I, &P);
    return rc;
}

/* ====================================================== shard-check */

#define KCMD "shard-check"
#define MAX_SHARDS 4096

static const char shard_usage[] =
    "usage: kdloss shard-check --student S.npy --teacher T.npy --shards K [options]\n"
    "\n"
    "Runs the vocabulary-parallel protocol (kdl_*shard_step) over K shards in this\n"
    "process, doing the all-reduces itself, and compares the result with the\n"
    "unsharded float64 reference.  S, T float [N, V] (or [V]).\n"
    "\n"
    "  --shards K           1 <= K <= min(V, 4096)\n"
    "  --split W1,W2,...    slice widths (K of them, summing to V); default even\n"
    "                       (the first V mod K shards one column wider)\n"
    "  --grad-out FILE      the sharded gradient, [N, V] float64 (cpu) / float32\n"
    "\n"
    "cpu runs the reference steps; cuda runs the GPU steps for every shard on the\n"
    "one device, reducing on the host.  JSON keys: divergence, reduction, backend,\n"
    "rows, vocab, shards, split, steps (the reduce op of each step), loss (sharded),\n"
    "loss_unsharded, max_abs_diff_loss, max_abs_diff_grad, max_grad, valid_rows,\n"
    "invalid_rows, and for akl head_size_mismatches (rows whose head size differs\n"
    "from the unsharded reference's).\n\n";

enum { K_STUDENT = KDL_CLI_LOSS_OPT_COUNT, K_TEACHER, K_SHARDS, K_SPLIT, K_GRAD_OUT, K_COUNT };

static int parse_split(const char *text, int64_t K, int64_t V, int64_t *w)
{
    if (!text) {
        for (int64_t r = 0; r < K; r++) w[r] = V / K + (r < V % K);
        return 0;
    }
    const char *p = text;
    int64_t sum = 0;
    for (int64_t r = 0; r < K; r++) {
        char *end = NULL;
        errno = 0;
        long long x = (*p >= '0' && *p <= '9') ? strtoll(p, &end, 10) : 0; /* digits only: no sign, no space */
        if (!end || end == p || x < 1 || (r + 1 < K ? *end != ',' : *end != '\0')) {
            kdl_cli_error(KCMD, "--split %s: need %lld positive widths separated by commas", text, (long long)K);
            return 2;
        }
        if (errno == ERANGE || x > V - sum) { /* also keeps the sum from overflowing */
            kdl_cli_error(KCMD, "--split %s: widths sum to more than the vocabulary %lld", text, (long long)V);
            return 2;
        }
        w[r] = x;
        sum += x;
        p = end + 1;
    }
    if (sum != V) {
        kdl_cli_error(KCMD, "--split %s: widths sum to %lld, the vocabulary is %lld", text, (long long)sum, (long long)V);
        return 2;
    }
    return 0;
}

/* One in-process run of the protocol: shard r sees columns [off_r, off_r+w_r)
 * of the row-major [N, V] inputs (views with ld = V).  Host pointers for the
 * reference; device pointers (S, T, grad on the device) for cuda. */
typedef struct shard_run {
    const kdl_loss_desc_t *d;
    int64_t N, V, K;
    const int64_t *w;
    kdl_dtype_t sdt, tdt, gdt;
    const void *S, *T;
    const int64_t *labels;
    void *grad;      /* [N, V] of gdt */
    double *loss;    /* nl doubles (host) */
    int64_t *head_size;
    int64_t invalid, valid;
    int cuda;
    int ops[64];
    int nsteps;
} shard_run_t;

static kdl_status_t run_shards(shard_run_t *R)
{
    const int64_t K = R->K, N = R->N;
    kdl_shard_args_t a;
    kdl_shard_args_init(&a);
    a.rows = N;
    a.vocab = R->V;
    a.num_shards = (int32_t)K;
    a.student_dtype = R->sdt;
    a.teacher_dtype = R->tdt;
    a.grad_dtype = R->gdt;
    a.out_dtype = KDL_DTYPE_F64;
    a.ld_student = a.ld_teacher = a.ld_grad = R->V;
    a.vocab_local = R->w[0]; /* rank 0's slice: kdl_shard_sizes checks rank and slice too */
    size_t sb = 0, ec = 0;
    int ns = 0;
    kdl_status_t st = kdl_shard_sizes(R->d, &a, &sb, &ec, &ns);
    if (st) return st;
    if (ns > 64) return kdl_fail(KDL_STATUS_INTERNAL_ERROR, "too many steps");
    R->nsteps = ns;
    size_t nl = loss_count(R->d, N);
    void **state = (void **)calloc((size_t)K, sizeof(void *));
    double **ex = (double **)calloc((size_t)K, sizeof(double *));
    double *acc = (double *)calloc(ec ? ec : 1, sizeof(double));
    double *tmp = (double *)calloc(ec ? ec : 1, sizeof(double));
    double *lossbuf = (double *)calloc(nl, sizeof(double));
    if (!state || !ex || !acc || !tmp || !lossbuf) st = kdl_fail(KDL_STATUS_ALLOC_FAILED, "shard buffers");
#ifdef KDL_HAVE_CUDA
    kdl_cli_gpu_pool_t pool = {{0}, 0};
    kdl_handle_t h = NULL;
    void *dloss = NULL, *dinfo = NULL, *dvalid = NULL, *dhs = NULL;
    if (!st && R->cuda) {
        st = kdl_create(&h);
        if (!st) st = gpu_alloc_counts(&pool, nl, &dloss, &dinfo, &dvalid);
        if (!st && R->head_size) st = kdl_cli_gpu_alloc(&pool, (size_t)(N > 0 ? N : 1) * 8, &dhs);
    }
#endif
    for (int64_t r = 0; !st && r < K; r++) {
        if (R->cuda) {
#ifdef KDL_HAVE_CUDA
            st = kdl_cli_gpu_alloc(&pool, sb, &state[r]);
            if (!st) st = kdl_cli_gpu_alloc(&pool, (ec ? ec : 1) * sizeof(double), (void **)&ex[r]);
#endif
        } else {
            state[r] = calloc(1, sb);
            ex[r] = (double *)calloc(ec ? ec : 1, sizeof(double));
            if (!state[r] || !ex[r]) st = kdl_fail(KDL_STATUS_ALLOC_FAILED, "shard state");
        }
    }
    for (int step = 0; !st && step < ns; step++) {
        kdl_shard_op_t op = KDL_SHARD_OP_DONE;
        int64_t cnt = 0, off = 0;
        for (int64_t r = 0; !st && r < K; r++) {
            a.vocab_offset = off;
            a.vocab_local = R->w[r];
            a.shard_rank = (int32_t)r;
            a.student = (const char *)R->S + off * (int64_t)kdl_dtype_size(R->sdt);
            a.teacher = (const char *)R->T + off * (int64_t)kdl_dtype_size(R->tdt);
            a.grad = R->grad ? (char *)R->grad + off * (int64_t)kdl_dtype_size(R->gdt) : NULL;
            a.labels = R->labels;
            a.state = state[r];
            a.exchange = ex[r];
            a.loss = lossbuf;
            a.info = &R->invalid;
            a.valid_rows = &R->valid;
            a.stat_head_size = r == 0 ? R->head_size : NULL;
#ifdef KDL_HAVE_CUDA
            if (R->cuda) {
                a.loss = dloss;
                a.info = (int64_t *)dinfo;
                a.valid_rows = (int64_t *)dvalid;
                a.stat_head_size = r == 0 ? (int64_t *)dhs : NULL;
                st = kdl_shard_step(h, R->d, &a, step, &op, &cnt);
            } else
#endif
                st = kdl_ref_shard_step(R->d, &a, step, &op, &cnt);
            off += R->w[r];
        }
        if (st) break;
        R->ops[step] = (int)op;
        if (op == KDL_SHARD_OP_DONE) break;
        /* the all-reduce, done here */
        for (int64_t r = 0; !st && r < K; r++) {
            const double *src = ex[r];
#ifdef KDL_HAVE_CUDA
            if (R->cuda) {
                st = kdl_cli_gpu_download(tmp, ex[r], (size_t)cnt * sizeof(double));
                src = tmp;
            }
#endif
            for (int64_t j = 0; j < cnt; j++)
                acc[j] = r == 0 ? src[j] : op == KDL_SHARD_OP_MAX ? fmax(acc[j], src[j]) : acc[j] + src[j];
        }
        for (int64_t r = 0; !st && r < K; r++) {
#ifdef KDL_HAVE_CUDA
            if (R->cuda) {
                cudaError_t e = cudaMemcpy(ex[r], acc, (size_t)cnt * sizeof(double), cudaMemcpyHostToDevice);
                if (e != cudaSuccess) st = kdl_fail(KDL_STATUS_CUDA_ERROR, "cudaMemcpy: %s", cudaGetErrorString(e));
                continue;
            }
#endif
            memcpy(ex[r], acc, (size_t)cnt * sizeof(double));
        }
    }
#ifdef KDL_HAVE_CUDA
    if (!st && R->cuda) st = sync_and_check(h);
    if (!st && R->cuda) st = gpu_get_counts(R->loss, dloss, nl, &R->invalid, dinfo, &R->valid, dvalid);
    if (!st && R->cuda && R->head_size) st = kdl_cli_gpu_download(R->head_size, dhs, (size_t)N * 8);
    kdl_cli_gpu_pool_free(&pool);
    kdl_destroy(h);
#endif
    if (!st && !R->cuda) memcpy(R->loss, lossbuf, nl * sizeof(double));
    for (int64_t r = 0; !R->cuda && state && ex && r < K; r++) {
        free(state[r]);
        free(ex[r]);
    }
    FREE_ALL(state, ex, acc, tmp, lossbuf);
    return st;
}

/* One shard-check run: the protocol's host run, the input sizes for the
 * device copies, and the dtype the gradient file is written in. */
typedef struct shard_ctx {
    shard_run_t R;
    size_t s_bytes, t_bytes;
    kdl_npy_dtype_t gnt;
} shard_ctx_t;

#ifdef KDL_HAVE_CUDA
/* The GPU steps on device copies of S and T with a float32 gradient,
 * widened into the host gradient. */
static kdl_status_t shard_cuda(void *p)
{
    shard_ctx_t *c = (shard_ctx_t *)p;
    shard_run_t *R = &c->R;
    kdl_cli_gpu_pool_t pool = {{0}, 0};
    shard_run_t D = *R;
    size_t gb = (size_t)R->N * (size_t)R->V * 4;
    c->gnt = KDL_NPY_F32;
    kdl_status_t st = kdl_cli_gpu_upload(&pool, R->S, c->s_bytes, (void **)&D.S);
    if (!st) st = kdl_cli_gpu_upload(&pool, R->T, c->t_bytes, (void **)&D.T);
    if (!st && R->labels) st = kdl_cli_gpu_upload(&pool, R->labels, (size_t)R->N * 8, (void **)&D.labels);
    if (!st) st = kdl_cli_gpu_alloc(&pool, gb, &D.grad);
    D.gdt = KDL_DTYPE_F32;
    D.cuda = 1;
    if (!st) st = run_shards(&D);
    float *g32 = (float *)malloc(gb ? gb : 1);
    if (!st && !g32) st = kdl_fail(KDL_STATUS_ALLOC_FAILED, "gradient copy");
    if (!st) st = kdl_cli_gpu_download(g32, D.grad, gb);
    if (!st)
        for (int64_t j = 0; j < R->N * R->V; j++) ((double *)R->grad)[j] = g32[j];
    free(g32);
    kdl_cli_gpu_pool_free(&pool);
    if (!st) {
        R->invalid = D.invalid;
        R->valid = D.valid;
        R->nsteps = D.nsteps;
        memcpy(R->ops, D.ops, sizeof R->ops);
    }
    return st;
}
#endif

/* The reference steps with a float64 gradient. */
static int shard_cpu(const char *cmd, void *p)
{
    shard_ctx_t *c = (shard_ctx_t *)p;
    c->gnt = KDL_NPY_F64;
    c->R.cuda = 0;
    return cpu_status(cmd, run_shards(&c->R));
}

/* The largest |got - want| of n pairs (NaN when one is NaN); pairs that are
 * both NaN are skipped when skip_nan. */
static double max_abs_diff(const double *got, const double *want, size_t n, int skip_nan)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        if (skip_nan && isnan(got[i]) && isnan(want[i])) continue;
        double e = fabs(got[i] - want[i]);
        m = (e > m || isnan(e)) ? e : m;
    }
    return m;
}

int kdl_cli_shard_check(int argc, char **argv)
{
    kdl_cli_pending_t pending = {0}; /* output files, renamed into place after the JSON */
    kdl_cli_ignore_sigpipe();
    kdl_cli_opt_t o[K_COUNT] = {KDL_CLI_LOSS_OPTS,   {"--student", 1, NULL}, {"--teacher", 1, NULL},
                                {"--shards", 1, NULL}, {"--split", 1, NULL},   {"--grad-out", 1, NULL}};
    int backend = 0;
    kdl_loss_desc_t d;
    int rc = subcommand_front(KCMD, shard_usage, argc, argv, o, K_COUNT, (const int[]){K_STUDENT, K_TEACHER, K_SHARDS},
                              3, &d, &backend);
    if (rc >= 0) return rc;
    int64_t K = 0;
    rc = kdl_cli_parse_int64(KCMD, "--shards", o[K_SHARDS].value, 1, MAX_SHARDS, &K);
    const char *grad_out = o[K_GRAD_OUT].value;
    if (!rc) rc = kdl_cli_check_out_path(KCMD, "--grad-out", grad_out);
    if (rc) return rc;

    kdl_npy_array_t S = {0}, T = {0}, L = {0};
    int64_t N = 0, V = 0, Nt = 0, Vt = 0;
    kdl_dtype_t sdt = KDL_DTYPE_F32, tdt = KDL_DTYPE_F32;
    const int64_t *labels = NULL;
    int64_t *w = NULL, *hs = NULL, *hs_ref = NULL;
    double *loss = NULL, *loss_ref = NULL, *grad = NULL, *grad_ref = NULL;
    rc = load_float_matrix(KCMD, "--student", o[K_STUDENT].value, 1, &S, &N, &V, &sdt);
    if (!rc) rc = load_float_matrix(KCMD, "--teacher", o[K_TEACHER].value, 1, &T, &Nt, &Vt, &tdt);
    if (!rc && (Nt != N || Vt != V || S.ndim != T.ndim)) {
        kdl_cli_error(KCMD, "student and teacher shapes differ");
        rc = 2;
    }
    if (!rc && K > V) {
        kdl_cli_error(KCMD, "--shards %lld exceeds the vocabulary %lld", (long long)K, (long long)V);
        rc = 2;
    }
    if (!rc) rc = load_labels(KCMD, o[KDL_CLI_L_LABELS].value, N, &L, &labels);
    const size_t nl = loss_count(&d, N), nv = (size_t)(N * V > 0 ? N * V : 1);
    if (!rc)
        rc = alloc_bufs(KCMD,
                        (const buf8_t[]){{(void **)&w, (size_t)K, 1},
                                         {(void **)&hs, (size_t)N, 1},
                                         {(void **)&hs_ref, (size_t)N, 1},
                                         {(void **)&loss, nl, 1},
                                         {(void **)&loss_ref, nl, 1},
                                         {(void **)&grad, nv, 1},
                                         {(void **)&grad_ref, nv, 1}},
                        7);
    if (!rc) rc = parse_split(o[K_SPLIT].value, K, V, w);
    /* the unsharded reference */
    int64_t invalid_ref = 0, valid_ref = 0;
    if (!rc) {
        kdl_loss_args_t la;
        kdl_loss_args_init(&la);
        la.rows = N;
        la.vocab = V;
        la.student = S.data;
        la.student_dtype = sdt;
        la.teacher = T.data;
        la.teacher_dtype = tdt;
        la.ld_student = la.ld_teacher = la.ld_grad = V;
        la.labels = labels;
        la.grad = grad_ref;
        la.grad_dtype = KDL_DTYPE_F64;
        la.stat_head_size = hs_ref;
        SET_LOSS_OUTPUTS(&la, loss_ref, &invalid_ref, &valid_ref);
        kdl_status_t st = kdl_ref_loss_forward_backward(&d, &la);
        if (st) rc = kdl_cli_status_error(KCMD, st);
    }
    int use_cuda = 0;
    if (!rc)
        rc = kdl_cli_pick_backend(KCMD, backend, sdt == KDL_DTYPE_F64 || tdt == KDL_DTYPE_F64, f64_needs_cpu,
                                  &use_cuda);
    shard_ctx_t c = {.gnt = KDL_NPY_F64};
    const shard_run_t *R = &c.R;
    const char *ran = "cpu";
    if (!rc) {
        c.R = (shard_run_t){.d = &d, .N = N, .V = V, .K = K, .w = w, .sdt = sdt, .tdt = tdt, .gdt = KDL_DTYPE_F64,
                            .S = S.data, .T = T.data, .labels = labels, .grad = grad, .loss = loss,
                            .head_size = d.divergence == KDL_DIV_AKL ? hs : NULL};
        c.s_bytes = (size_t)S.count * kdl_dtype_size(sdt);
        c.t_bytes = (size_t)T.count * kdl_dtype_size(tdt);
        rc = run_backend(KCMD, backend, use_cuda, ON_CUDA(shard_cuda), shard_cpu, &c, &ran);
    }
    if (!rc && grad_out) {
        if (c.gnt == KDL_NPY_F32) { /* the cuda gradient was float32: write it so */
            float *g32 = (float *)malloc(nv * sizeof(float));
            if (!g32) {
                kdl_cli_error(KCMD, "out of memory");
                rc = 1;
            } else {
                for (size_t j = 0; j < (size_t)(N * V); j++) g32[j] = (float)grad[j];
                rc = stage_rows(KCMD, grad_out, c.gnt, S.ndim, N, V, g32, &pending);
                free(g32);
            }
        } else {
            rc = stage_rows(KCMD, grad_out, c.gnt, S.ndim, N, V, grad, &pending);
        }
    }
    if (!rc) {
        double gmax = 0;
        for (int64_t j = 0; j < N * V; j++)
            if (fabs(grad_ref[j]) > gmax) gmax = fabs(grad_ref[j]);
        kdl_json_t j;
        json_head(&j, NULL, &d, ran, N);
        kdl_json_int(&j, "vocab", V);
        kdl_json_int(&j, "shards", K);
        kdl_json_int_array(&j, "split", w, K);
        kdl_json_array_begin(&j, "steps");
        for (int s = 0; s < R->nsteps; s++)
            kdl_json_string(&j, NULL, R->ops[s] == KDL_SHARD_OP_MAX ? "max" : R->ops[s] == KDL_SHARD_OP_SUM ? "sum" : "done");
        kdl_json_array_end(&j);
        kdl_json_loss(&j, "loss", d.reduction, loss, N);
        kdl_json_loss(&j, "loss_unsharded", d.reduction, loss_ref, N);
        kdl_json_number(&j, "max_abs_diff_loss", max_abs_diff(loss, loss_ref, nl, 1));
        kdl_json_number(&j, "max_abs_diff_grad", max_abs_diff(grad, grad_ref, (size_t)(N * V), 0));
        kdl_json_number(&j, "max_grad", gmax);
        kdl_json_int(&j, "valid_rows", R->valid);
        kdl_json_int(&j, "invalid_rows", R->invalid);
        if (d.divergence == KDL_DIV_AKL) {
            int64_t mism = 0;
            for (int64_t i = 0; i < N; i++) mism += hs[i] != hs_ref[i];
            kdl_json_int(&j, "head_size_mismatches", mism);
        }
        rc = kdl_json_end_stdout(&j, KCMD);
    }
    rc = kdl_cli_commit(KCMD, &pending, rc);
    FREE_ALL(w, hs, hs_ref, loss, loss_ref, grad, grad_ref);
    NPY_FREE_ALL(&S, &T, &L);
    return rc;
}
