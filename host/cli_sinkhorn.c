/*
 * host/cli_sinkhorn.c - `kdloss sinkhorn` (batched entropic OT of costs or
 * point clouds read from .npy files) and `kdloss sinkd` (the SinKD loss of
 * student/teacher logits), one JSON object on stdout each.  Flags: DESIGN
 * section 4 and the --help texts below; conventions (errors, atomic output
 * files, JSON numbers) from host/cli_util.h.
 *
 * Steps of each: parse and check every flag, load and check the inputs,
 * pick the backend (cuda, or the float64 reference; auto falls back to the
 * reference), compute, write the optional output file atomically, print the
 * JSON.  A failed run prints one line on stderr and writes no file.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_util.h"
#include "internal.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ref.h"

/* ================================================================ shared */
static int check_float(const char *cmd, const char *flag, const char *path, const kdl_npy_array_t *a)
{
    kdl_dtype_t dt;
    if (kdl_npy_to_kdl_dtype(a->dtype, &dt) != 0) {
        kdl_cli_error(cmd, "%s %s: must be float16, float32 or float64, got %s", flag, path,
                      kdl_npy_dtype_name(a->dtype));
        return 2;
    }
    return 0;
}

static int load_float(const char *cmd, const char *flag, const char *path, kdl_npy_array_t *a)
{
    int rc = kdl_cli_load_npy(cmd, flag, path, a);
    if (!rc) rc = check_float(cmd, flag, path, a);
    if (rc) kdl_npy_free(a);
    return rc;
}

/* Converted copies of a float array (malloc'd; NULL when a holds nothing). */
static double *as_f64(const kdl_npy_array_t *a)
{
    if (!a->data) return NULL;
    double *p = (double *)malloc((size_t)(a->count ? a->count : 1) * sizeof(double));
    if (p)
        for (int64_t k = 0; k < a->count; k++) p[k] = kdl_npy_get_double(a, k);
    return p;
}

static float *as_f32(const kdl_npy_array_t *a)
{
    if (!a->data) return NULL;
    float *p = (float *)malloc((size_t)(a->count ? a->count : 1) * sizeof(float));
    if (p)
        for (int64_t k = 0; k < a->count; k++) p[k] = (float)kdl_npy_get_double(a, k);
    return p;
}

static int is_f64(const kdl_npy_array_t *a) { return a->data && a->dtype == KDL_NPY_F64; }

static int shape_error(const char *cmd, const char *flag, const char *path, const kdl_npy_array_t *a,
                       const char *want)
{
    char s[96];
    kdl_npy_shape_string(a, s, sizeof s);
    kdl_cli_error(cmd, "%s %s: shape %s, expected %s", flag, path, s, want);
    return 2;
}

/* A library failure as an exit code: bad parameters and non-finite input
 * data are bad input (2), the rest a failure while computing (1). */
static int status_exit(const char *cmd, kdl_status_t st)
{
    int rc = kdl_cli_status_error(cmd, st);
    return st == KDL_STATUS_NONFINITE_INPUT ? 2 : rc;
}

/* ============================================================== sinkhorn */
#define CMD_S "sinkhorn"

static const char sinkhorn_usage[] =
    "usage: kdloss sinkhorn (--cost C.npy | --x X.npy --y Y.npy [--metric M]) --epsilon E [options]\n"
    "\n"
    "Batched log-domain Sinkhorn: entropic optimal transport between weights a\n"
    "(rows) and b (columns) for each problem, printed as one JSON object.\n"
    "\n"
    "inputs (.npy float16, float32 or float64, C order)\n"
    "  --cost FILE        cost [n, m] (one problem) or [B, n, m] (a batch)\n"
    "  --x FILE, --y FILE points [n, d] and [m, d], or [B, n, d] and [B, m, d]\n"
    "  --metric M         cost between points: sqeuclidean (default) or l1\n"
    "  --log-a FILE       log-weights of the rows, [n] or [B, n]; default uniform\n"
    "  --log-b FILE       log-weights of the columns, [m] or [B, m]; default uniform\n"
    "                     (-inf is a zero weight; each a and b should sum to 1)\n"
    "  --cost-xx FILE     with --cost --debias: cost among the rows' support,\n"
    "  --cost-yy FILE     [n, n] / [B, n, n], and among the columns', [m, m] / [B, m, m]\n"
    "solver\n"
    "  --epsilon E        required, > 0: entropic regularisation\n"
    "  --max-iter K       >= 1, default 1000 (annealing stages included)\n"
    "  --tol T            >= 0, default 1e-6: stop when sum_i |sum_j P_ij - a_i| <= T;\n"
    "                     0 runs exactly --max-iter iterations\n"
    "  --check-every K    >= 1, default 10: iterations between stopping tests\n"
    "  --eps-scaling      anneal eps geometrically from the cost's diameter\n"
    "  --eps-factor F     annealing factor, in (0, 1), default 0.8\n"
    "  --value V          transport (default: <P, C>) or dual (<a, f> + <b, g>)\n"
    "  --debias           Sinkhorn divergence V(a,b) - V(a,a)/2 - V(b,b)/2 (with\n"
    "                     --cost it needs --cost-xx and --cost-yy)\n"
    "outputs\n"
    "  --plan-out FILE    the plan P, the shape of the cost ([n, m] or [B, n, m]):\n"
    "                     float64 with the cpu backend, float32 with cuda; written\n"
    "                     atomically (a failed run leaves no file)\n"
    "  --backend B        auto (default), cpu or cuda.  auto runs cuda when a device\n"
    "                     is present and no input is float64, else the float64 CPU\n"
    "                     reference; cuda without a device or with float64 inputs\n"
    "                     is a usage error\n"
    "\n"
    "JSON keys: backend, problems (B), n, m, value_kind, debias, epsilon, and the\n"
    "arrays over problems value, iterations, marginal_error.  Numbers have 17\n"
    "significant digits; NaN is null.\n"
    "\n"
    "Exit status: 0 success; 2 bad usage or bad input (including a non-finite cost,\n"
    "point or log-weight), one line on stderr; 1 a failure while computing or\n"
    "writing.\n";

enum {
    S_COST, S_X, S_Y, S_METRIC, S_LOG_A, S_LOG_B, S_COST_XX, S_COST_YY, S_EPSILON, S_MAX_ITER, S_TOL,
    S_CHECK_EVERY, S_EPS_SCALING, S_EPS_FACTOR, S_VALUE, S_DEBIAS, S_PLAN_OUT, S_BACKEND, S_COUNT
};

typedef struct sk_in {
    kdl_npy_array_t cost, x, y, la, lb, cxx, cyy;
    int batched; /* 3-D inputs */
    int64_t B, n, m, d;
} sk_in_t;

typedef struct sk_out {
    double *value, *err, *plan; /* plan: [B n m] f64 (cpu) or f32 (cuda, as float *) */
    float *plan32;
    int64_t *iters;
    const char *backend;
} sk_out_t;

static void sk_in_free(sk_in_t *in)
{
    kdl_npy_array_t *all[] = {&in->cost, &in->x, &in->y, &in->la, &in->lb, &in->cxx, &in->cyy};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) kdl_npy_free(all[k]);
}

static int sk_parse(int argc, char **argv, kdl_cli_opt_t *o, kdl_sinkhorn_desc_t *d, int *backend, int *help)
{
    kdl_sinkhorn_desc_init(d);
    *backend = KDL_CLI_BACKEND_AUTO;
    int rc = kdl_cli_parse_options(CMD_S, argc, argv, o, S_COUNT, help);
    if (rc || *help) return rc;
    const int points = o[S_X].value || o[S_Y].value;
    if (o[S_COST].value && points) {
        kdl_cli_error(CMD_S, "give either --cost or --x/--y, not both");
        return 2;
    }
    if (!o[S_COST].value && !points) {
        kdl_cli_error(CMD_S, "--cost (or --x and --y) is required (see kdloss sinkhorn --help)");
        return 2;
    }
    if (points && (!o[S_X].value || !o[S_Y].value)) {
        kdl_cli_error(CMD_S, "--x and --y go together");
        return 2;
    }
    if (!points && o[S_METRIC].value) {
        kdl_cli_error(CMD_S, "--metric applies to --x/--y, not to --cost");
        return 2;
    }
    if (points && (o[S_COST_XX].value || o[S_COST_YY].value)) {
        kdl_cli_error(CMD_S, "--cost-xx/--cost-yy go with --cost (with points they are built from --x/--y)");
        return 2;
    }
    if (!o[S_EPSILON].value) {
        kdl_cli_error(CMD_S, "--epsilon is required");
        return 2;
    }
    rc = kdl_cli_check_out_path(CMD_S, "--plan-out", o[S_PLAN_OUT].value);
    int v = 0;
    if (!rc) rc = kdl_cli_parse_double(CMD_S, "--epsilon", o[S_EPSILON].value, 0, 0, INFINITY, 0, &d->epsilon);
    if (!rc && o[S_MAX_ITER].value) rc = kdl_cli_parse_int64(CMD_S, "--max-iter", o[S_MAX_ITER].value, 1, INT64_MAX, &d->max_iter);
    if (!rc && o[S_TOL].value) rc = kdl_cli_parse_double(CMD_S, "--tol", o[S_TOL].value, 0, 1, INFINITY, 0, &d->tol);
    if (!rc && o[S_CHECK_EVERY].value)
        rc = kdl_cli_parse_int64(CMD_S, "--check-every", o[S_CHECK_EVERY].value, 1, INT64_MAX, &d->check_every);
    if (!rc && o[S_EPS_FACTOR].value)
        rc = kdl_cli_parse_double(CMD_S, "--eps-factor", o[S_EPS_FACTOR].value, 0, 0, 1, 0, &d->eps_scaling_factor);
    if (!rc && o[S_METRIC].value) {
        rc = kdl_cli_parse_choice(CMD_S, "--metric", o[S_METRIC].value, kdl_ot_metric_from_name, "sqeuclidean|l1", &v);
        d->metric = (kdl_ot_metric_t)v;
    }
    if (!rc && o[S_VALUE].value) {
        rc = kdl_cli_parse_choice(CMD_S, "--value", o[S_VALUE].value, kdl_ot_value_from_name, "transport|dual", &v);
        d->value = (kdl_ot_value_t)v;
    }
    if (!rc && o[S_BACKEND].value)
        rc = kdl_cli_parse_choice(CMD_S, "--backend", o[S_BACKEND].value, kdl_cli_backend_from_name, "auto|cpu|cuda",
                                  backend);
    d->eps_scaling = o[S_EPS_SCALING].value != NULL;
    d->debias = o[S_DEBIAS].value != NULL;
    if (!rc && d->debias && o[S_COST].value && (!o[S_COST_XX].value || !o[S_COST_YY].value)) {
        kdl_cli_error(CMD_S, "--debias with --cost needs --cost-xx and --cost-yy");
        rc = 2;
    }
    return rc;
}

/* 1 when a is not [B, k] (batched) or [k]. */
static int sk_bad_vec(const sk_in_t *in, const kdl_npy_array_t *a, int64_t k)
{
    if (in->batched) return a->ndim != 2 || a->shape[0] != in->B || a->shape[1] != k;
    return a->ndim != 1 || a->shape[0] != k;
}

static int sk_load(const kdl_cli_opt_t *o, sk_in_t *in)
{
    memset(in, 0, sizeof *in);
    int rc = 0;
    if (o[S_COST].value) {
        rc = load_float(CMD_S, "--cost", o[S_COST].value, &in->cost);
        if (rc) return rc;
        const kdl_npy_array_t *c = &in->cost;
        if (c->ndim != 2 && c->ndim != 3) { /* the message reads the shape: free after it */
            rc = shape_error(CMD_S, "--cost", o[S_COST].value, c, "[n, m] or [B, n, m]");
            sk_in_free(in);
            return rc;
        }
        in->batched = c->ndim == 3;
        in->B = in->batched ? c->shape[0] : 1;
        in->n = c->shape[c->ndim - 2];
        in->m = c->shape[c->ndim - 1];
    } else {
        rc = load_float(CMD_S, "--x", o[S_X].value, &in->x);
        if (!rc) rc = load_float(CMD_S, "--y", o[S_Y].value, &in->y);
        if (rc) return sk_in_free(in), rc;
        const kdl_npy_array_t *x = &in->x, *y = &in->y;
        if (x->ndim != 2 && x->ndim != 3) {
            rc = shape_error(CMD_S, "--x", o[S_X].value, x, "[n, d] or [B, n, d]");
            sk_in_free(in);
            return rc;
        }
        in->batched = x->ndim == 3;
        in->B = in->batched ? x->shape[0] : 1;
        in->n = x->shape[x->ndim - 2];
        in->d = x->shape[x->ndim - 1];
        int ok = y->ndim == x->ndim && y->shape[y->ndim - 1] == in->d && (!in->batched || y->shape[0] == in->B);
        if (!ok) {
            char want[96];
            if (in->batched)
                snprintf(want, sizeof want, "[%lld, m, %lld] (as --x)", (long long)in->B, (long long)in->d);
            else
                snprintf(want, sizeof want, "[m, %lld] (as --x)", (long long)in->d);
            int r = shape_error(CMD_S, "--y", o[S_Y].value, y, want);
            sk_in_free(in);
            return r;
        }
        in->m = y->shape[y->ndim - 2];
        if (in->d < 1) {
            kdl_cli_error(CMD_S, "--x %s: points have no coordinates (d = 0)", o[S_X].value);
            sk_in_free(in);
            return 2;
        }
    }
    if (in->n < 1 || in->m < 1) {
        kdl_cli_error(CMD_S, "empty problem: n = %lld, m = %lld", (long long)in->n, (long long)in->m);
        sk_in_free(in);
        return 2;
    }
    struct {
        int opt;
        kdl_npy_array_t *a;
        int64_t k, k2; /* k2 > 0: a square matrix [k, k2] */
        const char *flag;
    } extra[] = {{S_LOG_A, &in->la, in->n, 0, "--log-a"},
                 {S_LOG_B, &in->lb, in->m, 0, "--log-b"},
                 {S_COST_XX, &in->cxx, in->n, in->n, "--cost-xx"},
                 {S_COST_YY, &in->cyy, in->m, in->m, "--cost-yy"}};
    for (size_t e = 0; e < sizeof extra / sizeof extra[0]; e++) {
        if (!o[extra[e].opt].value) continue;
        rc = load_float(CMD_S, extra[e].flag, o[extra[e].opt].value, extra[e].a);
        if (rc) return sk_in_free(in), rc;
        const kdl_npy_array_t *a = extra[e].a;
        int bad;
        char want[96];
        if (extra[e].k2) {
            if (in->batched) {
                snprintf(want, sizeof want, "[%lld, %lld, %lld]", (long long)in->B, (long long)extra[e].k,
                         (long long)extra[e].k2);
                bad = a->ndim != 3 || a->shape[0] != in->B || a->shape[1] != extra[e].k || a->shape[2] != extra[e].k2;
            } else {
                snprintf(want, sizeof want, "[%lld, %lld]", (long long)extra[e].k, (long long)extra[e].k2);
                bad = a->ndim != 2 || a->shape[0] != extra[e].k || a->shape[1] != extra[e].k2;
            }
        } else {
            if (in->batched)
                snprintf(want, sizeof want, "[%lld, %lld]", (long long)in->B, (long long)extra[e].k);
            else
                snprintf(want, sizeof want, "[%lld]", (long long)extra[e].k);
            bad = sk_bad_vec(in, a, extra[e].k);
        }
        if (bad) {
            int r = shape_error(CMD_S, extra[e].flag, o[extra[e].opt].value, a, want);
            sk_in_free(in);
            return r;
        }
    }
    return 0;
}

static void sk_args(const sk_in_t *in, kdl_sinkhorn_args_t *a)
{
    kdl_sinkhorn_args_init(a);
    a->batch = in->B;
    a->n = in->n;
    a->m = in->m;
    a->dim = in->d;
}

static void sk_out_free(sk_out_t *out)
{
    free(out->value);
    free(out->err);
    free(out->plan);
    free(out->plan32);
    free(out->iters);
    memset(out, 0, sizeof *out);
}

static kdl_status_t sk_run_cpu(const kdl_sinkhorn_desc_t *d, const sk_in_t *in, int want_plan, sk_out_t *out)
{
    kdl_sinkhorn_args_t a;
    sk_args(in, &a);
    a.dtype = KDL_DTYPE_F64;
    double *c = as_f64(&in->cost), *x = as_f64(&in->x), *y = as_f64(&in->y), *la = as_f64(&in->la),
           *lb = as_f64(&in->lb), *cxx = as_f64(&in->cxx), *cyy = as_f64(&in->cyy);
    kdl_status_t st = KDL_STATUS_SUCCESS;
    if ((in->cost.data && !c) || (in->x.data && !x) || (in->y.data && !y) || (in->la.data && !la) ||
        (in->lb.data && !lb) || (in->cxx.data && !cxx) || (in->cyy.data && !cyy))
        st = kdl_fail(KDL_STATUS_ALLOC_FAILED, "input copies");
    if (!st && want_plan && !(out->plan = (double *)malloc((size_t)(in->B * in->n * in->m) * sizeof(double) + 8)))
        st = kdl_fail(KDL_STATUS_ALLOC_FAILED, "plan");
    if (!st) {
        a.cost = c;
        a.x = x;
        a.y = y;
        a.log_a = la;
        a.log_b = lb;
        a.cost_xx = cxx;
        a.cost_yy = cyy;
        a.value = out->value;
        a.marginal_error = out->err;
        a.iterations = out->iters;
        a.plan = out->plan;
        st = kdl_ref_sinkhorn(d, &a);
    }
    free(c), free(x), free(y), free(la), free(lb), free(cxx), free(cyy);
    out->backend = "cpu";
    return st;
}

/* The GPU path: f32 copies uploaded, outputs downloaded.  *bad_problems
 * gets the device's count of problems with non-finite input. */
static kdl_status_t sk_run_cuda(const kdl_sinkhorn_desc_t *d, const sk_in_t *in, int want_plan, sk_out_t *out,
                                int64_t *bad_problems)
{
    kdl_handle_t h = NULL;
    kdl_status_t st = kdl_create(&h);
    if (st != KDL_STATUS_SUCCESS) return st;
    const kdl_npy_array_t *src[] = {&in->cost, &in->x, &in->y, &in->la, &in->lb, &in->cxx, &in->cyy};
    enum { NSRC = 7 };
    float *host[NSRC] = {0};
    void *dev[NSRC] = {0};
    kdl_cli_gpu_pool_t pool = {{0}, 0};
    const int64_t B = in->B;
    const size_t bf = (size_t)B * sizeof(float);
    float *v32 = (float *)malloc(bf + 4), *e32 = (float *)malloc(bf + 4);
    if (!v32 || !e32) st = kdl_fail(KDL_STATUS_ALLOC_FAILED, "host outputs");
    if (!st && want_plan && !(out->plan32 = (float *)malloc((size_t)(B * in->n * in->m) * sizeof(float) + 4)))
        st = kdl_fail(KDL_STATUS_ALLOC_FAILED, "plan");
    for (int k = 0; k < NSRC && !st; k++) {
        if (!src[k]->data) continue;
        host[k] = as_f32(src[k]);
        if (!host[k]) st = kdl_fail(KDL_STATUS_ALLOC_FAILED, "input copies");
        if (!st) st = kdl_cli_gpu_upload(&pool, host[k], (size_t)src[k]->count * sizeof(float), &dev[k]);
    }
    kdl_sinkhorn_args_t a;
    sk_args(in, &a);
    a.dtype = KDL_DTYPE_F32;
    a.cost = dev[0];
    a.x = dev[1];
    a.y = dev[2];
    a.log_a = dev[3];
    a.log_b = dev[4];
    a.cost_xx = dev[5];
    a.cost_yy = dev[6];
    void *dv = NULL, *de = NULL, *di = NULL, *dp = NULL, *dinfo = NULL, *ws = NULL;
    size_t ws_bytes = 0;
    if (!st) st = kdl_cli_gpu_alloc(&pool, bf, &dv);
    if (!st) st = kdl_cli_gpu_alloc(&pool, bf, &de);
    if (!st) st = kdl_cli_gpu_alloc(&pool, (size_t)B * 8, &di);
    if (!st) st = kdl_cli_gpu_alloc(&pool, 8, &dinfo);
    if (!st && want_plan) st = kdl_cli_gpu_alloc(&pool, (size_t)(B * in->n * in->m) * sizeof(float), &dp);
    a.value = dv;
    a.marginal_error = de;
    a.iterations = (int64_t *)di;
    a.info = (int64_t *)dinfo;
    a.plan = dp;
    if (!st) st = kdl_sinkhorn_workspace_size(h, d, &a, &ws_bytes);
    if (!st && ws_bytes) st = kdl_cli_gpu_alloc(&pool, ws_bytes, &ws);
    if (!st) st = kdl_sinkhorn(h, d, &a, ws, ws_bytes);
    if (!st) st = kdl_cli_gpu_download(v32, dv, bf);
    if (!st) st = kdl_cli_gpu_download(e32, de, bf);
    if (!st) st = kdl_cli_gpu_download(out->iters, di, (size_t)B * 8);
    if (!st) st = kdl_cli_gpu_download(bad_problems, dinfo, 8);
    if (!st && want_plan) st = kdl_cli_gpu_download(out->plan32, dp, (size_t)(B * in->n * in->m) * sizeof(float));
    if (!st)
        for (int64_t b = 0; b < B; b++) {
            out->value[b] = v32[b];
            out->err[b] = e32[b];
        }
    kdl_cli_gpu_pool_free(&pool);
    for (int k = 0; k < NSRC; k++) free(host[k]);
    free(v32);
    free(e32);
    kdl_destroy(h);
    out->backend = "cuda";
    return st;
}

/* The plan file, staged: renamed into place only once the JSON is out. */
static int sk_stage_plan(const char *path, const sk_in_t *in, const sk_out_t *out, kdl_cli_pending_t *p)
{
    int64_t shape[3] = {in->B, in->n, in->m};
    const kdl_cli_npy_out_t o = {path, out->plan32 ? KDL_NPY_F32 : KDL_NPY_F64, in->batched ? 3 : 2,
                                 in->batched ? shape : shape + 1,
                                 out->plan32 ? (const void *)out->plan32 : (const void *)out->plan};
    return kdl_cli_stage_npy_all(CMD_S, &o, 1, p);
}

int kdl_cli_sinkhorn(int argc, char **argv)
{
    kdl_cli_opt_t o[S_COUNT] = {{"--cost", 1, NULL},       {"--x", 1, NULL},           {"--y", 1, NULL},
                                {"--metric", 1, NULL},     {"--log-a", 1, NULL},       {"--log-b", 1, NULL},
                                {"--cost-xx", 1, NULL},    {"--cost-yy", 1, NULL},     {"--epsilon", 1, NULL},
                                {"--max-iter", 1, NULL},   {"--tol", 1, NULL},         {"--check-every", 1, NULL},
                                {"--eps-scaling", 0, NULL}, {"--eps-factor", 1, NULL}, {"--value", 1, NULL},
                                {"--debias", 0, NULL},     {"--plan-out", 1, NULL},    {"--backend", 1, NULL}};
    kdl_sinkhorn_desc_t d;
    int backend = 0, help = 0, cuda = 0;
    kdl_cli_ignore_sigpipe();
    int rc = sk_parse(argc, argv, o, &d, &backend, &help);
    if (rc) return rc;
    if (help) {
        fputs(sinkhorn_usage, stdout);
        return kdl_cli_finish_stdout(CMD_S);
    }
    sk_in_t in;
    rc = sk_load(o, &in);
    if (rc) return rc;
    const int any_f64 = is_f64(&in.cost) || is_f64(&in.x) || is_f64(&in.y) || is_f64(&in.la) || is_f64(&in.lb) ||
                        is_f64(&in.cxx) || is_f64(&in.cyy);
    rc = kdl_cli_pick_backend(CMD_S, backend, any_f64, KDL_CLI_F64_NEEDS_CPU, &cuda);
    sk_out_t out;
    memset(&out, 0, sizeof out);
    const size_t nb = (size_t)(in.B > 0 ? in.B : 1);
    if (!rc && (!(out.value = (double *)calloc(nb, sizeof(double))) || !(out.err = (double *)calloc(nb, sizeof(double))) ||
                !(out.iters = (int64_t *)calloc(nb, sizeof(int64_t))))) {
        kdl_cli_error(CMD_S, "out of memory");
        rc = 1;
    }
    const int want_plan = o[S_PLAN_OUT].value != NULL;
    if (!rc && cuda) {
        int64_t bad = 0;
        kdl_status_t st = sk_run_cuda(&d, &in, want_plan, &out, &bad);
        if (st == KDL_STATUS_SUCCESS && bad > 0) {
            kdl_cli_error(CMD_S, "%lld problem(s) have a non-finite cost, point or log-weight", (long long)bad);
            rc = 2;
        } else if (st != KDL_STATUS_SUCCESS) {
            if (backend == KDL_CLI_BACKEND_CUDA || (st >= 1000 && st < 2000)) {
                rc = status_exit(CMD_S, st);
            } else { /* auto: fall back to the reference */
                free(out.plan32);
                out.plan32 = NULL;
                cuda = 0;
            }
        }
    }
    if (!rc && !cuda) {
        kdl_status_t st = sk_run_cpu(&d, &in, want_plan, &out);
        if (st != KDL_STATUS_SUCCESS) rc = status_exit(CMD_S, st);
    }
    kdl_cli_pending_t plan_file = {0};
    if (!rc && want_plan) rc = sk_stage_plan(o[S_PLAN_OUT].value, &in, &out, &plan_file);
    if (!rc) {
        kdl_json_t j;
        kdl_json_init(&j, stdout);
        kdl_json_object_begin(&j, NULL);
        kdl_json_string(&j, "backend", out.backend);
        kdl_json_int(&j, "problems", in.B);
        kdl_json_int(&j, "n", in.n);
        kdl_json_int(&j, "m", in.m);
        kdl_json_string(&j, "value_kind", kdl_ot_value_name(d.value));
        kdl_json_bool(&j, "debias", d.debias);
        kdl_json_number(&j, "epsilon", d.epsilon);
        kdl_json_number_array(&j, "value", out.value, in.B);
        kdl_json_int_array(&j, "iterations", out.iters, in.B);
        kdl_json_number_array(&j, "marginal_error", out.err, in.B);
        rc = kdl_json_end_stdout(&j, CMD_S);
    }
    rc = kdl_cli_commit(CMD_S, &plan_file, rc);
    sk_out_free(&out);
    sk_in_free(&in);
    return rc;
}

/* ================================================================= sinkd */
#define CMD_D "sinkd"

static const char sinkd_usage[] =
    "usage: kdloss sinkd --student S.npy --teacher T.npy [options]\n"
    "\n"
    "SinKD loss: rows in groups of n; per group, Sinkhorn transport between the\n"
    "student and teacher softmaxes (cost over the vocabulary, uniform weights\n"
    "1/n); the loss is the mean over groups of <P, C> (SinKD's own code scales P\n"
    "to mass n: its number is n times this one).  Gradient with the plan fixed.\n"
    "\n"
    "inputs\n"
    "  --student FILE      student logits: .npy float16, float32 or float64, [N, V]\n"
    "  --teacher FILE      teacher logits, same shape\n"
    "options\n"
    "  --group-size n      rows per group, N a multiple of it; default N (one group)\n"
    "  --temperature T     > 0, default 2\n"
    "  --epsilon E         > 0, default 0.1\n"
    "  --max-iter K        >= 1, default 20\n"
    "  --tol T             >= 0, default 0 (exactly --max-iter iterations)\n"
    "  --metric M          l1 (default) or sqeuclidean\n"
    "  --scale X           finite, multiplies loss and gradient; default 1\n"
    "  --grad-out FILE     d loss / d student, [N, V]: float64 with the cpu backend,\n"
    "                      the student's dtype with cuda; written atomically\n"
    "  --backend B         auto (default), cpu or cuda (as kdloss sinkhorn)\n"
    "\n"
    "JSON keys: backend, rows, vocab, groups, group_size, loss, invalid_groups,\n"
    "and the arrays over groups group_loss, iterations, marginal_error.  A group\n"
    "with an invalid row (NaN or +inf logit, or all -inf) is left out of the mean\n"
    "(its group_loss is null).\n"
    "\n"
    "Exit status: 0 success; 2 bad usage or input, one line on stderr; 1 a failure\n"
    "while computing or writing.\n";

enum { D_STUDENT, D_TEACHER, D_GROUP, D_TEMPERATURE, D_EPSILON, D_MAX_ITER, D_TOL, D_METRIC, D_SCALE, D_GRAD_OUT, D_BACKEND, D_COUNT };

typedef struct sd_out {
    double loss;
    double *gl, *err;
    int64_t *iters, info;
    void *grad;
    kdl_dtype_t grad_dtype;
    const char *backend;
} sd_out_t;

static int sd_parse(int argc, char **argv, kdl_cli_opt_t *o, kdl_sinkd_desc_t *d, int *backend, int *help)
{
    kdl_sinkd_desc_init(d);
    *backend = KDL_CLI_BACKEND_AUTO;
    int rc = kdl_cli_parse_options(CMD_D, argc, argv, o, D_COUNT, help);
    if (rc || *help) return rc;
    if (!o[D_STUDENT].value || !o[D_TEACHER].value) {
        kdl_cli_error(CMD_D, "%s is required (see kdloss sinkd --help)", o[D_STUDENT].value ? "--teacher" : "--student");
        return 2;
    }
    rc = kdl_cli_check_out_path(CMD_D, "--grad-out", o[D_GRAD_OUT].value);
    int v = 0;
    if (!rc && o[D_GROUP].value)
        rc = kdl_cli_parse_int64(CMD_D, "--group-size", o[D_GROUP].value, 1, INT64_MAX, &d->group_size);
    if (!rc && o[D_TEMPERATURE].value)
        rc = kdl_cli_parse_double(CMD_D, "--temperature", o[D_TEMPERATURE].value, 0, 0, INFINITY, 0, &d->temperature);
    if (!rc && o[D_EPSILON].value)
        rc = kdl_cli_parse_double(CMD_D, "--epsilon", o[D_EPSILON].value, 0, 0, INFINITY, 0, &d->epsilon);
    if (!rc && o[D_MAX_ITER].value) rc = kdl_cli_parse_int64(CMD_D, "--max-iter", o[D_MAX_ITER].value, 1, INT64_MAX, &d->max_iter);
    if (!rc && o[D_TOL].value) rc = kdl_cli_parse_double(CMD_D, "--tol", o[D_TOL].value, 0, 1, INFINITY, 0, &d->tol);
    if (!rc && o[D_SCALE].value)
        rc = kdl_cli_parse_double(CMD_D, "--scale", o[D_SCALE].value, -INFINITY, 0, INFINITY, 0, &d->scale);
    if (!rc && o[D_METRIC].value) {
        rc = kdl_cli_parse_choice(CMD_D, "--metric", o[D_METRIC].value, kdl_ot_metric_from_name, "l1|sqeuclidean", &v);
        d->metric = (kdl_ot_metric_t)v;
    }
    if (!rc && o[D_BACKEND].value)
        rc = kdl_cli_parse_choice(CMD_D, "--backend", o[D_BACKEND].value, kdl_cli_backend_from_name, "auto|cpu|cuda",
                                  backend);
    return rc;
}

static void sd_args(const kdl_npy_array_t *s, const kdl_npy_array_t *t, kdl_sinkd_args_t *a)
{
    kdl_sinkd_args_init(a);
    a->rows = s->shape[0];
    a->vocab = s->shape[1];
    a->ld_student = a->ld_teacher = a->ld_grad = a->vocab;
    kdl_npy_to_kdl_dtype(s->dtype, &a->student_dtype);
    kdl_npy_to_kdl_dtype(t->dtype, &a->teacher_dtype);
}

static kdl_status_t sd_run_cpu(const kdl_sinkd_desc_t *d, const kdl_npy_array_t *s, const kdl_npy_array_t *t,
                               sd_out_t *out)
{
    kdl_sinkd_args_t a;
    sd_args(s, t, &a);
    a.student = s->data;
    a.teacher = t->data;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = &out->loss;
    a.group_loss = out->gl;
    a.marginal_error = out->err;
    a.iterations = out->iters;
    a.info = &out->info;
    out->grad_dtype = KDL_DTYPE_F64;
    a.grad = out->grad;
    a.grad_dtype = KDL_DTYPE_F64;
    out->backend = "cpu";
    return kdl_ref_sinkd(d, &a);
}

static kdl_status_t sd_run_cuda(const kdl_sinkd_desc_t *d, const kdl_npy_array_t *s, const kdl_npy_array_t *t,
                                int64_t G, sd_out_t *out)
{
    kdl_handle_t h = NULL;
    kdl_status_t st = kdl_create(&h);
    if (st != KDL_STATUS_SUCCESS) return st;
    kdl_sinkd_args_t a;
    sd_args(s, t, &a);
    const size_t es = kdl_dtype_size(a.student_dtype), et = kdl_dtype_size(a.teacher_dtype);
    kdl_cli_gpu_pool_t pool = {{0}, 0};
    void *ds = NULL, *dt = NULL, *dl = NULL, *dg = NULL, *de = NULL, *di = NULL, *dinfo = NULL, *dgrad = NULL, *ws = NULL;
    size_t ws_bytes = 0;
    st = kdl_cli_gpu_upload(&pool, s->data, (size_t)s->count * es, &ds);
    if (!st) st = kdl_cli_gpu_upload(&pool, t->data, (size_t)t->count * et, &dt);
    if (!st) st = kdl_cli_gpu_alloc(&pool, 8, &dl);
    if (!st) st = kdl_cli_gpu_alloc(&pool, (size_t)G * 8, &dg);
    if (!st) st = kdl_cli_gpu_alloc(&pool, (size_t)G * 8, &de);
    if (!st) st = kdl_cli_gpu_alloc(&pool, (size_t)G * 8, &di);
    if (!st) st = kdl_cli_gpu_alloc(&pool, 8, &dinfo);
    out->grad_dtype = a.student_dtype;
    if (!st && out->grad) st = kdl_cli_gpu_alloc(&pool, (size_t)s->count * es, &dgrad);
    a.student = ds;
    a.teacher = dt;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = dl;
    a.group_loss = dg;
    a.marginal_error = de;
    a.iterations = (int64_t *)di;
    a.info = (int64_t *)dinfo;
    a.grad = dgrad;
    a.grad_dtype = a.student_dtype;
    if (!st) st = kdl_sinkd_workspace_size(h, d, &a, &ws_bytes);
    if (!st && ws_bytes) st = kdl_cli_gpu_alloc(&pool, ws_bytes, &ws);
    if (!st) st = kdl_sinkd(h, d, &a, ws, ws_bytes);
    if (!st) st = kdl_cli_gpu_download(&out->loss, dl, 8);
    if (!st) st = kdl_cli_gpu_download(out->gl, dg, (size_t)G * 8);
    if (!st) st = kdl_cli_gpu_download(out->err, de, (size_t)G * 8);
    if (!st) st = kdl_cli_gpu_download(out->iters, di, (size_t)G * 8);
    if (!st) st = kdl_cli_gpu_download(&out->info, dinfo, 8);
    if (!st && out->grad) st = kdl_cli_gpu_download(out->grad, dgrad, (size_t)s->count * es);
    kdl_cli_gpu_pool_free(&pool);
    kdl_destroy(h);
    out->backend = "cuda";
    return st;
}

int kdl_cli_sinkd(int argc, char **argv)
{
    kdl_cli_opt_t o[D_COUNT] = {{"--student", 1, NULL},  {"--teacher", 1, NULL}, {"--group-size", 1, NULL},
                                {"--temperature", 1, NULL}, {"--epsilon", 1, NULL}, {"--max-iter", 1, NULL},
                                {"--tol", 1, NULL},      {"--metric", 1, NULL},  {"--scale", 1, NULL},
                                {"--grad-out", 1, NULL}, {"--backend", 1, NULL}};
    kdl_sinkd_desc_t d;
    int backend = 0, help = 0, cuda = 0;
    kdl_cli_ignore_sigpipe();
    int rc = sd_parse(argc, argv, o, &d, &backend, &help);
    if (rc) return rc;
    if (help) {
        fputs(sinkd_usage, stdout);
        return kdl_cli_finish_stdout(CMD_D);
    }
    kdl_npy_array_t s, t;
    memset(&s, 0, sizeof s);
    memset(&t, 0, sizeof t);
    rc = load_float(CMD_D, "--student", o[D_STUDENT].value, &s);
    if (!rc) rc = load_float(CMD_D, "--teacher", o[D_TEACHER].value, &t);
    if (!rc && s.ndim != 2) rc = shape_error(CMD_D, "--student", o[D_STUDENT].value, &s, "[N, V]");
    if (!rc && (t.ndim != 2 || t.shape[0] != s.shape[0] || t.shape[1] != s.shape[1])) {
        char want[64];
        snprintf(want, sizeof want, "[%lld, %lld] (as --student)", (long long)s.shape[0], (long long)s.shape[1]);
        rc = shape_error(CMD_D, "--teacher", o[D_TEACHER].value, &t, want);
    }
    if (!rc && s.shape[1] < 1) {
        kdl_cli_error(CMD_D, "--student %s: the vocabulary (last dimension) is empty", o[D_STUDENT].value);
        rc = 2;
    }
    const int64_t N = rc ? 0 : s.shape[0];
    const int64_t n = d.group_size > 0 ? d.group_size : N;
    if (!rc && n > 0 && N % n != 0) {
        kdl_cli_error(CMD_D, "rows = %lld is not a multiple of --group-size %lld", (long long)N, (long long)n);
        rc = 2;
    }
    const int64_t G = n > 0 ? N / n : 0;
    if (!rc)
        rc = kdl_cli_pick_backend(CMD_D, backend, s.dtype == KDL_NPY_F64 || t.dtype == KDL_NPY_F64,
                                  KDL_CLI_F64_NEEDS_CPU, &cuda);
    sd_out_t out;
    memset(&out, 0, sizeof out);
    const size_t ng = (size_t)(G > 0 ? G : 1);
    if (!rc && (!(out.gl = (double *)calloc(ng, 8)) || !(out.err = (double *)calloc(ng, 8)) ||
                !(out.iters = (int64_t *)calloc(ng, 8)) ||
                (o[D_GRAD_OUT].value && !(out.grad = calloc((size_t)(s.count ? s.count : 1), 8))))) {
        kdl_cli_error(CMD_D, "out of memory");
        rc = 1;
    }
    if (!rc && cuda) {
        kdl_status_t st = sd_run_cuda(&d, &s, &t, G, &out);
        if (st != KDL_STATUS_SUCCESS) {
            if (backend == KDL_CLI_BACKEND_CUDA || (st >= 1000 && st < 2000))
                rc = status_exit(CMD_D, st);
            else
                cuda = 0; /* auto: fall back to the reference */
        }
    }
    if (!rc && !cuda) {
        kdl_status_t st = sd_run_cpu(&d, &s, &t, &out);
        if (st != KDL_STATUS_SUCCESS) rc = status_exit(CMD_D, st);
    }
    kdl_cli_pending_t grad_file = {0}; /* renamed into place only once the JSON is out */
    if (!rc && o[D_GRAD_OUT].value) {
        const kdl_cli_npy_out_t g = {o[D_GRAD_OUT].value, kdl_cli_npy_grad_dtype(out.grad_dtype), 2, s.shape,
                                     out.grad};
        rc = kdl_cli_stage_npy_all(CMD_D, &g, 1, &grad_file);
    }
    if (!rc) {
        kdl_json_t j;
        kdl_json_init(&j, stdout);
        kdl_json_object_begin(&j, NULL);
        kdl_json_string(&j, "backend", out.backend);
        kdl_json_int(&j, "rows", N);
        kdl_json_int(&j, "vocab", s.shape[1]);
        kdl_json_int(&j, "groups", G);
        kdl_json_int(&j, "group_size", n);
        kdl_json_number(&j, "loss", out.loss);
        kdl_json_int(&j, "invalid_groups", out.info);
        kdl_json_number_array(&j, "group_loss", out.gl, G);
        kdl_json_int_array(&j, "iterations", out.iters, G);
        kdl_json_number_array(&j, "marginal_error", out.err, G);
        rc = kdl_json_end_stdout(&j, CMD_D);
    }
    rc = kdl_cli_commit(CMD_D, &grad_file, rc);
    free(out.gl);
    free(out.err);
    free(out.iters);
    free(out.grad);
    kdl_npy_free(&s);
    kdl_npy_free(&t);
    return rc;
}
