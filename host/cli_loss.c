/*
 * host/cli_loss.c - `kdloss loss`: the distillation loss (and its gradient)
 * of student/teacher logits read from .npy files, as one JSON object on
 * stdout.  Flags: DESIGN section 4; decisions (1-D inputs, NaN/inf in JSON,
 * backend choice, exit codes) in the --help text below.
 *
 * Steps: parse and validate every flag, load and check the inputs, pick the
 * backend (cuda or the float64 reference; auto falls back to the reference),
 * compute, write --grad-out atomically, then print the JSON.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_util.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ref.h"

#define CMD "loss"

static const char usage_text[] =
    "usage: kdloss loss --divergence NAME --student S.npy --teacher T.npy [options]\n"
    "\n"
    "Distillation loss of the student logits S against the teacher logits T, and\n"
    "its gradient with respect to S, printed as one JSON object on stdout.\n"
    "\n"
    "inputs\n"
    "  --student FILE       student logits: .npy float16, float32 or float64, [N, V],\n"
    "                       or [V] for a single row (N = 1); C order, little-endian\n"
    "  --teacher FILE       teacher logits, same shape (the dtype may differ)\n"
    "  --labels FILE        optional .npy int64 [N]: a row whose label equals the\n"
    "                       ignore index is ignored (loss 0, zero gradient, uncounted)\n"
    "  --ignore-index I     integer, default -100\n"
    "loss\n"
    "  --divergence NAME    required: fkl rkl fkl_rkl akl jsd tvd skl srkl\n"
    "  --temperature T      finite, > 0; default 1\n"
    "  --alpha A            skl/srkl skew, in [0, 1); default 0.1\n"
    "  --beta B             jsd weight, in (0, 1); default 0.5\n"
    "  --head-rule RULE     akl head: reference (default), mass or topk\n"
    "  --mu M               akl head mass, in (0, 1); default 0.5\n"
    "  --top-k K            akl head size for topk, in [1, V] (checked whatever\n"
    "                       the rule); default 1\n"
    "  --reduction R        none, sum or mean (default; over valid rows, 0 if none)\n"
    "  --scale X            finite; multiplies loss and gradient; default 1\n"
    "outputs\n"
    "  --stats              add per-row statistics (key \"stats\")\n"
    "  --grad-out FILE      write d loss / d student to FILE (.npy, the student's\n"
    "                       shape): float64 with the cpu backend, the student's\n"
    "                       dtype with cuda.  Written atomically: a failed run\n"
    "                       leaves no file.\n"
    "  --backend B          auto (default), cpu or cuda.  auto runs cuda when a CUDA\n"
    "                       device is present, the inputs are float16/float32 and the\n"
    "                       GPU path succeeds, else the float64 CPU reference.  cuda\n"
    "                       without a device, or with float64 inputs, is a usage\n"
    "                       error (exit 2).\n"
    "\n"
    "JSON keys: divergence, reduction, backend (\"cpu\" or \"cuda\": the one that ran),\n"
    "rows, vocab, loss (a number; for --reduction none an array of N), valid_rows,\n"
    "invalid_rows, and with --stats \"stats\": {fkl, rkl, g_head, g_tail, head_size,\n"
    "w_head, w_tail}, arrays of N.  Numbers have 17 significant digits (they\n"
    "round-trip); NaN (e.g. the loss of an invalid row) is printed as null, +inf and\n"
    "-inf as the strings \"inf\" and \"-inf\".\n"
    "\n"
    "Exit status: 0 success; 2 bad usage or input (one line on stderr), including\n"
    "library bad-parameter statuses and a --grad-out path that cannot be created;\n"
    "1 a failure while computing or writing (one line on stderr).\n";

enum { O_STUDENT = KDL_CLI_LOSS_OPT_COUNT, O_TEACHER, O_STATS, O_GRAD_OUT, O_COUNT };

typedef struct loss_cfg {
    kdl_loss_desc_t desc;
    const char *student, *teacher, *labels, *grad_out;
    int stats;
    int backend; /* kdl_cli_backend_t */
} loss_cfg_t;

typedef struct loss_inputs {
    kdl_npy_array_t s, t, l;
    kdl_dtype_t s_dtype, t_dtype;
    int64_t rows, vocab;
    int one_d; /* the logits were [V]: one row */
} loss_inputs_t;

enum { ST_FKL, ST_RKL, ST_G_HEAD, ST_G_TAIL, ST_W_HEAD, ST_W_TAIL, ST_COUNT };

typedef struct loss_outputs {
    double *loss;           /* [rows] for reduction none, else [1] */
    double *stat[ST_COUNT]; /* [rows] each, with --stats           */
    int64_t *head_size;     /* [rows], with --stats                */
    void *grad;             /* [rows * vocab] of grad_dtype (room for f64) */
    kdl_dtype_t grad_dtype;
    int64_t invalid, valid;
    const char *backend;
} loss_outputs_t;

/* ------------------------------------------------------------------ flags */

/* Fills c from argv; returns an exit code (0: go on, unless *help). */
static int parse_cfg(int argc, char **argv, loss_cfg_t *c, int *help)
{
    kdl_cli_opt_t o[O_COUNT] = {KDL_CLI_LOSS_OPTS, {"--student", 1, NULL}, {"--teacher", 1, NULL},
                                {"--stats", 0, NULL}, {"--grad-out", 1, NULL}};
    memset(c, 0, sizeof *c);
    kdl_loss_desc_init(&c->desc);
    int rc = kdl_cli_parse_options(CMD, argc, argv, o, O_COUNT, help);
    if (rc || *help) return rc;
    const int required[] = {KDL_CLI_L_DIVERGENCE, O_STUDENT, O_TEACHER};
    for (size_t k = 0; k < sizeof required / sizeof required[0]; k++)
        if (!o[required[k]].value) {
            kdl_cli_error(CMD, "%s is required (see kdloss loss --help)", o[required[k]].name);
            return 2;
        }
    rc = kdl_cli_parse_loss_opts(CMD, o, &c->desc, &c->backend);
    c->student = o[O_STUDENT].value;
    c->teacher = o[O_TEACHER].value;
    c->labels = o[KDL_CLI_L_LABELS].value;
    c->grad_out = o[O_GRAD_OUT].value;
    c->stats = o[O_STATS].value != NULL;
    if (!rc) rc = kdl_cli_check_out_path(CMD, "--grad-out", c->grad_out);
    return rc;
}

/* ----------------------------------------------------------------- inputs */

static int check_logits(const char *flag, const char *path, const kdl_npy_array_t *a, kdl_dtype_t *dt)
{
    if (kdl_npy_to_kdl_dtype(a->dtype, dt) != 0) {
        kdl_cli_error(CMD, "%s %s: logits must be float16, float32 or float64, got %s", flag, path,
                      kdl_npy_dtype_name(a->dtype));
        return 2;
    }
    if (a->ndim != 1 && a->ndim != 2) {
        kdl_cli_error(CMD, "%s %s: logits must be 2-D [N, V] or 1-D [V], got %d-D", flag, path, a->ndim);
        return 2;
    }
    if (a->shape[a->ndim - 1] < 1) {
        kdl_cli_error(CMD, "%s %s: the vocabulary (last dimension) is empty", flag, path);
        return 2;
    }
    return 0;
}

static int check_shapes(const loss_cfg_t *c, loss_inputs_t *in)
{
    const kdl_npy_array_t *s = &in->s, *t = &in->t;
    if (s->ndim != t->ndim || memcmp(s->shape, t->shape, sizeof s->shape) != 0) {
        char ss[64], ts[64];
        kdl_npy_shape_string(s, ss, sizeof ss);
        kdl_npy_shape_string(t, ts, sizeof ts);
        kdl_cli_error(CMD, "student shape %s and teacher shape %s differ", ss, ts);
        return 2;
    }
    in->one_d = s->ndim == 1;
    in->rows = in->one_d ? 1 : s->shape[0];
    in->vocab = s->shape[s->ndim - 1];
    if ((uint64_t)s->count > SIZE_MAX / sizeof(double)) {
        kdl_cli_error(CMD, "inputs too large: %lld logits", (long long)s->count);
        return 2;
    }
    if (c->labels) {
        const kdl_npy_array_t *l = &in->l;
        if (l->dtype != KDL_NPY_I64 || l->ndim != 1 || l->shape[0] != in->rows) {
            char ls[64];
            kdl_npy_shape_string(l, ls, sizeof ls);
            kdl_cli_error(CMD, "--labels %s: labels must be int64 [%lld] (one per row), got %s %s", c->labels,
                          (long long)in->rows, kdl_npy_dtype_name(l->dtype), ls);
            return 2;
        }
    }
    return 0;
}

static void free_inputs(loss_inputs_t *in)
{
    kdl_npy_free(&in->s);
    kdl_npy_free(&in->t);
    kdl_npy_free(&in->l);
}

static int load_inputs(const loss_cfg_t *c, loss_inputs_t *in)
{
    memset(in, 0, sizeof *in);
    int rc = kdl_cli_load_npy(CMD, "--student", c->student, &in->s);
    if (!rc) rc = check_logits("--student", c->student, &in->s, &in->s_dtype);
    if (!rc) rc = kdl_cli_load_npy(CMD, "--teacher", c->teacher, &in->t);
    if (!rc) rc = check_logits("--teacher", c->teacher, &in->t, &in->t_dtype);
    if (!rc && c->labels) rc = kdl_cli_load_npy(CMD, "--labels", c->labels, &in->l);
    if (!rc) rc = check_shapes(c, in);
    if (rc) free_inputs(in);
    return rc;
}

/* ---------------------------------------------------------------- compute */

static void free_outputs(loss_outputs_t *out)
{
    free(out->loss);
    for (int k = 0; k < ST_COUNT; k++) free(out->stat[k]);
    free(out->head_size);
    free(out->grad);
    memset(out, 0, sizeof *out);
}

static int alloc_outputs(const loss_cfg_t *c, const loss_inputs_t *in, loss_outputs_t *out)
{
    memset(out, 0, sizeof *out);
    size_t n = in->rows > 0 ? (size_t)in->rows : 1;
    int ok = (out->loss = (double *)calloc(c->desc.reduction == KDL_REDUCTION_NONE ? n : 1, sizeof(double))) != NULL;
    for (int k = 0; ok && c->stats && k < ST_COUNT; k++) ok = (out->stat[k] = (double *)calloc(n, sizeof(double))) != NULL;
    if (ok && c->stats) ok = (out->head_size = (int64_t *)calloc(n, sizeof(int64_t))) != NULL;
    if (ok && c->grad_out) ok = (out->grad = calloc(in->s.count ? (size_t)in->s.count : 1, sizeof(double))) != NULL;
    if (!ok) {
        free_outputs(out);
        kdl_cli_error(CMD, "out of memory");
        return 1;
    }
    return 0;
}

static void fill_args(const loss_cfg_t *c, const loss_inputs_t *in, loss_outputs_t *out, kdl_loss_args_t *a)
{
    kdl_loss_args_init(a);
    a->rows = in->rows;
    a->vocab = in->vocab;
    a->student = in->s.data;
    a->ld_student = in->vocab;
    a->student_dtype = in->s_dtype;
    a->teacher = in->t.data;
    a->ld_teacher = in->vocab;
    a->teacher_dtype = in->t_dtype;
    a->labels = c->labels ? (const int64_t *)in->l.data : NULL;
    a->grad = out->grad;
    a->ld_grad = in->vocab;
    a->grad_dtype = out->grad_dtype;
    a->out_dtype = KDL_DTYPE_F64;
    a->loss = out->loss;
    a->stat_fkl = out->stat[ST_FKL];
    a->stat_rkl = out->stat[ST_RKL];
    a->stat_g_head = out->stat[ST_G_HEAD];
    a->stat_g_tail = out->stat[ST_G_TAIL];
    a->stat_w_head = out->stat[ST_W_HEAD];
    a->stat_w_tail = out->stat[ST_W_TAIL];
    a->stat_head_size = out->head_size;
    a->info = &out->invalid;
    a->valid_rows = &out->valid;
}

/* The GPU path with the gradient in the student's dtype. */
static kdl_status_t run_cuda(const loss_cfg_t *c, const loss_inputs_t *in, loss_outputs_t *out)
{
    kdl_handle_t h = NULL;
    kdl_status_t st = kdl_create(&h);
    if (st != KDL_STATUS_SUCCESS) return st;
    kdl_loss_args_t a;
    out->grad_dtype = in->s_dtype;
    fill_args(c, in, out, &a);
    st = kdl_cli_gpu_loss_host(h, &c->desc, &a, NULL);
    kdl_destroy(h);
    return st;
}

static kdl_status_t run_cpu(const loss_cfg_t *c, const loss_inputs_t *in, loss_outputs_t *out)
{
    kdl_loss_args_t a;
    out->grad_dtype = KDL_DTYPE_F64;
    fill_args(c, in, out, &a);
    return kdl_ref_loss_forward_backward(&c->desc, &a);
}

/* Runs on the chosen backend; auto tries cuda first and falls back to the
 * reference on any GPU failure (the reference reports bad parameters itself). */
static int run_loss(const loss_cfg_t *c, const loss_inputs_t *in, loss_outputs_t *out)
{
    int f64 = in->s_dtype == KDL_DTYPE_F64 || in->t_dtype == KDL_DTYPE_F64, cuda = 0;
    int rc = kdl_cli_pick_backend(CMD, c->backend, f64, KDL_CLI_F64_NEEDS_CPU, &cuda);
    if (rc) return rc;
    if (cuda) {
        kdl_status_t st = run_cuda(c, in, out);
        out->backend = "cuda";
        if (st == KDL_STATUS_SUCCESS) return 0;
        if (c->backend == KDL_CLI_BACKEND_CUDA) return kdl_cli_status_error(CMD, st);
    }
    out->backend = "cpu";
    kdl_status_t st = run_cpu(c, in, out);
    return st == KDL_STATUS_SUCCESS ? 0 : kdl_cli_status_error(CMD, st);
}

/* ----------------------------------------------------------------- output */

/* The gradient file, staged: renamed into place only once the JSON is out. */
static int stage_grad(const loss_cfg_t *c, const loss_inputs_t *in, const loss_outputs_t *out,
                      kdl_cli_pending_t *p)
{
    const kdl_cli_npy_out_t g = {c->grad_out, kdl_cli_npy_grad_dtype(out->grad_dtype), in->s.ndim, in->s.shape,
                                 out->grad};
    return kdl_cli_stage_npy_all(CMD, &g, 1, p);
}

static void print_stats(kdl_json_t *j, int64_t n, const loss_outputs_t *out)
{
    static const char *const names[ST_COUNT] = {"fkl", "rkl", "g_head", "g_tail", "w_head", "w_tail"};
    kdl_json_object_begin(j, "stats");
    for (int k = 0; k < ST_COUNT; k++) {
        kdl_json_number_array(j, names[k], out->stat[k], n);
        if (k == ST_G_TAIL) kdl_json_int_array(j, "head_size", out->head_size, n);
    }
    kdl_json_object_end(j);
}

static int print_json(const loss_cfg_t *c, const loss_inputs_t *in, const loss_outputs_t *out)
{
    kdl_json_t j;
    kdl_json_init(&j, stdout);
    kdl_json_object_begin(&j, NULL);
    kdl_json_string(&j, "divergence", kdl_divergence_name(c->desc.divergence));
    kdl_json_string(&j, "reduction", kdl_reduction_name(c->desc.reduction));
    kdl_json_string(&j, "backend", out->backend);
    kdl_json_int(&j, "rows", in->rows);
    kdl_json_int(&j, "vocab", in->vocab);
    kdl_json_loss(&j, "loss", c->desc.reduction, out->loss, in->rows);
    kdl_json_int(&j, "valid_rows", out->valid);
    kdl_json_int(&j, "invalid_rows", out->invalid);
    if (c->stats) print_stats(&j, in->rows, out);
    return kdl_json_end_stdout(&j, CMD);
}

int kdl_cli_loss(int argc, char **argv)
{
    loss_cfg_t c;
    int help = 0;
    kdl_cli_ignore_sigpipe();
    int rc = parse_cfg(argc, argv, &c, &help);
    if (rc) return rc;
    if (help) {
        fputs(usage_text, stdout);
        return kdl_cli_finish_stdout(CMD);
    }
    loss_inputs_t in;
    loss_outputs_t out;
    kdl_cli_pending_t grad_file = {0};
    rc = load_inputs(&c, &in);
    if (rc) return rc;
    rc = alloc_outputs(&c, &in, &out);
    if (!rc) rc = run_loss(&c, &in, &out);
    if (!rc && c.grad_out) rc = stage_grad(&c, &in, &out, &grad_file);
    if (!rc) rc = print_json(&c, &in, &out);
    rc = kdl_cli_commit(CMD, &grad_file, rc);
    free_outputs(&out);
    free_inputs(&in);
    return rc;
}
