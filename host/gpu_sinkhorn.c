/*
 * host/gpu_sinkhorn.c - host wrapper of the batched Sinkhorn and SinKD
 * kernels (kernels/sinkhorn.cu): argument check, workspace layout (the same
 * planner sizes it for *_workspace_size and carves it for the call), the
 * device tables (problems, row / column / cost tiles) built on the host and
 * uploaded with one cudaMemcpyAsync, the cost from points (cuBLAS SGEMM
 * for squared Euclidean, strict FP32: the handle's cuBLAS runs in
 * CUBLAS_DEFAULT_MATH, no TF32), the solver, the epilogues.
 *
 * No allocation on the device, no host synchronisation.  The upload reads
 * a host buffer that is freed on return: cudaMemcpyAsync from pageable
 * memory has consumed its source when it returns; while the stream is being
 * captured into a CUDA graph, kdl_otk_upload carries the bytes in kernel
 * parameters instead (recorded by value; docs/sinkhorn-review.md, third
 * review).
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_internal.h"
#include "ot_internal.h"
#include "sinkhorn.cuh"

/* ------------------------------------------------------ workspace carving */
typedef struct carve {
    char *base;   /* NULL while sizing */
    size_t off;
    int overflow;
} carve_t;

static void *take(carve_t *c, uint64_t count, size_t elem)
{
    const size_t align = 256;
    if (c->overflow) return NULL;
    if (count > (uint64_t)SIZE_MAX / (elem ? elem : 1) / 2) {
        c->overflow = 1;
        return NULL;
    }
    size_t bytes = (size_t)count * elem;
    size_t start = (c->off + align - 1) / align * align;
    if (start < c->off || start > SIZE_MAX - bytes) {
        c->overflow = 1;
        return NULL;
    }
    c->off = start + bytes;
    return c->base ? c->base + start : NULL;
}

/* Offset of a host-table pointer inside the uploaded block. */
#define TBL_TAKE(hostp, ptr_dev, type, count)                                                    \
    do {                                                                                        \
        size_t a_ = (tb_off + 15) / 16 * 16;                                                    \
        (hostp) = (type *)(tb_host ? tb_host + a_ : NULL);                                      \
        (ptr_dev) = (type *)(tb_dev ? tb_dev + a_ : NULL);                                      \
        tb_off = a_ + (size_t)(count) * sizeof(type);                                           \
    } while (0)

/* --------------------------------------------------- the solver's layout */
/* One solver problem as the host sees it. */
typedef struct hprob {
    int64_t n, m;
    const float *C;        /* given cost, or NULL (built into the packed buffer) */
    const float *la, *lb;
    const float *X, *Y;    /* for building (points) and the x-gradient          */
    const float *nx, *ny;  /* norms (SQEUCLIDEAN)                               */
    float *plan, *f_out, *grad;
    int warm_f, sym;
} hprob_t;

/* Everything the solver needs in the workspace. */
typedef struct core {
    int64_t nprob, nrt, nct, ncost_tiles, packed_total, rows_total, cols_total;
    int dsplit;           /* L1 d-split (1: none)                    */
    int build;            /* costs built from points                 */
    int metric;
    int64_t dim;
    /* device */
    kdl_otk_prob_t *probs;
    kdl_otk_state_t *state;
    kdl_otk_tile_t *rtiles, *ctiles, *cost_tiles;
    kdl_otk_job_t *jobs;
    float *packed, *partial, *F0, *F1, *G, *RE, *RV;
    int64_t *itp;         /* the device-side loop's iteration counter */
    /* host staging of the tables */
    char *tb_host;
    char *tb_dev;
    size_t tb_bytes;
} core_t;

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

static int choose_dsplit(int sm_count, int64_t tiles, int64_t d)
{
    if (tiles <= 0) return 1;
    int64_t want = cdiv(2 * (int64_t)(sm_count > 0 ? sm_count : 132), tiles);
    int64_t lim = cdiv(d, 256);
    if (want > lim) want = lim;
    if (want > 256) want = 256;
    return want < 1 ? 1 : (int)want;
}

/* Sizes the tables and buffers of nprob problems (sizes from hp), carves
 * them from c, and (when c->base and hp pointers are real) fills the host
 * tables.  Returns 0 on size overflow. */
static int core_layout(core_t *k, carve_t *c, const hprob_t *hp, int64_t nprob, int build, int metric,
                       int64_t dim, int sm_count, int fill)
{
    memset(k, 0, sizeof *k);
    k->nprob = nprob;
    k->build = build;
    k->metric = metric;
    k->dim = dim;
    for (int64_t p = 0; p < nprob; p++) {
        k->nrt += cdiv(hp[p].n, KDL_OTK_ROWS_PER_TILE);
        k->nct += cdiv(hp[p].m, KDL_OTK_COLS_PER_TILE);
        k->rows_total += hp[p].n;
        k->cols_total += hp[p].m;
        if (build) {
            k->ncost_tiles += cdiv(hp[p].n, KDL_OTK_COST_TILE) * cdiv(hp[p].m, KDL_OTK_COST_TILE);
            k->packed_total += hp[p].n * hp[p].m;
        }
    }
    if (k->nrt > INT32_MAX || k->nct > INT32_MAX || k->ncost_tiles > INT32_MAX || nprob > INT32_MAX) return 0;
    k->dsplit = (build && metric == KDL_OT_METRIC_L1) ? choose_dsplit(sm_count, k->ncost_tiles, dim) : 1;

    /* the table block (uploaded at once) */
    size_t tb_off = 0;
    char *tb_host = NULL, *tb_dev = NULL;
    kdl_otk_prob_t *h_probs;
    kdl_otk_tile_t *h_rt, *h_ct, *h_cost;
    kdl_otk_job_t *h_jobs;
    TBL_TAKE(h_probs, k->probs, kdl_otk_prob_t, nprob);
    TBL_TAKE(h_rt, k->rtiles, kdl_otk_tile_t, k->nrt);
    TBL_TAKE(h_ct, k->ctiles, kdl_otk_tile_t, k->nct);
    TBL_TAKE(h_jobs, k->jobs, kdl_otk_job_t, build ? nprob : 0);
    TBL_TAKE(h_cost, k->cost_tiles, kdl_otk_tile_t, k->ncost_tiles);
    k->tb_bytes = tb_off;
    char *tb = (char *)take(c, tb_off, 1);
    k->state = (kdl_otk_state_t *)take(c, (uint64_t)nprob, sizeof(kdl_otk_state_t));
    k->itp = (int64_t *)take(c, 1, sizeof(int64_t));
    k->F0 = (float *)take(c, (uint64_t)k->rows_total, sizeof(float));
    k->F1 = (float *)take(c, (uint64_t)k->rows_total, sizeof(float));
    k->G = (float *)take(c, (uint64_t)k->cols_total, sizeof(float));
    k->RE = (float *)take(c, (uint64_t)k->rows_total, sizeof(float));
    k->RV = (float *)take(c, (uint64_t)k->rows_total, sizeof(float));
    if (build) k->packed = (float *)take(c, (uint64_t)k->packed_total, sizeof(float));
    if (build && k->dsplit > 1)
        k->partial = (float *)take(c, (uint64_t)k->packed_total * (uint64_t)k->dsplit, sizeof(float));
    if (c->overflow) return 0;
    if (!fill) return 1;

    /* fill the host copy; device pointers of the block start at tb */
    k->tb_dev = tb;
    k->tb_host = (char *)malloc(tb_off ? tb_off : 1);
    if (!k->tb_host) return -1;
    memset(k->tb_host, 0, tb_off);
    /* recompute the sub-pointers against the real block */
    tb_off = 0;
    tb_host = k->tb_host;
    tb_dev = tb;
    TBL_TAKE(h_probs, k->probs, kdl_otk_prob_t, nprob);
    TBL_TAKE(h_rt, k->rtiles, kdl_otk_tile_t, k->nrt);
    TBL_TAKE(h_ct, k->ctiles, kdl_otk_tile_t, k->nct);
    TBL_TAKE(h_jobs, k->jobs, kdl_otk_job_t, build ? nprob : 0);
    TBL_TAKE(h_cost, k->cost_tiles, kdl_otk_tile_t, k->ncost_tiles);

    int64_t r0 = 0, c0 = 0, coff = 0, nrt = 0, nct = 0, ncost = 0;
    for (int64_t p = 0; p < nprob; p++) {
        const hprob_t *q = &hp[p];
        kdl_otk_prob_t *P = &h_probs[p];
        P->C = build ? k->packed + coff : q->C;
        P->la = q->la;
        P->lb = q->lb;
        P->f[0] = k->F0 + r0;
        P->f[1] = k->F1 + r0;
        P->g = k->G + c0;
        P->rowerr = k->RE + r0;
        P->rowval = k->RV + r0;
        P->plan = q->plan;
        P->f_out = q->f_out;
        P->X = q->X;
        P->Y = q->Y;
        P->grad = q->grad;
        P->n = (int32_t)q->n;
        P->m = (int32_t)q->m;
        P->warm_f = q->warm_f;
        P->sym = q->sym;
        for (int64_t r = 0; r < q->n; r += KDL_OTK_ROWS_PER_TILE) {
            h_rt[nrt].prob = (int32_t)p;
            h_rt[nrt].r0 = (int32_t)r;
            h_rt[nrt++].c0 = 0;
        }
        for (int64_t j = 0; j < q->m; j += KDL_OTK_COLS_PER_TILE) {
            h_ct[nct].prob = (int32_t)p;
            h_ct[nct].r0 = 0;
            h_ct[nct++].c0 = (int32_t)j;
        }
        if (build) {
            kdl_otk_job_t *J = &h_jobs[p];
            J->X = q->X;
            J->Y = q->Y;
            J->nx = q->nx;
            J->ny = q->ny;
            J->C = k->packed + coff;
            J->coff = coff;
            J->n = (int32_t)q->n;
            J->m = (int32_t)q->m;
            for (int64_t r = 0; r < q->n; r += KDL_OTK_COST_TILE)
                for (int64_t j = 0; j < q->m; j += KDL_OTK_COST_TILE) {
                    h_cost[ncost].prob = (int32_t)p;
                    h_cost[ncost].r0 = (int32_t)r;
                    h_cost[ncost++].c0 = (int32_t)j;
                }
            coff += q->n * q->m;
        }
        r0 += q->n;
        c0 += q->m;
    }
    return 1;
}

static kdl_status_t cublas_status(cublasStatus_t s, const char *what)
{
    if (s == CUBLAS_STATUS_SUCCESS) return KDL_STATUS_SUCCESS;
    return kdl_fail(KDL_STATUS_CUBLAS_ERROR, "%s: cuBLAS status %d", what, (int)s);
}

/* The handle's cuBLAS, on its stream, with alpha / beta read from the host
 * (the GEMMs of this file pass them by host pointer). */
static kdl_status_t gemm_cublas(kdl_handle_t h, cublasHandle_t *cb)
{
    kdl_status_t st = kdl_get_cublas(h, cb);
    if (st != KDL_STATUS_SUCCESS) return st;
    return cublas_status(cublasSetPointerMode(*cb, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
}

/* C_p = -2 X_p Y_p^T for problems [p0, p0 + count), all of size n x m with
 * row strides; uniform: one strided-batched call. */
static kdl_status_t gemm_batch(cublasHandle_t cb, const core_t *k, const hprob_t *hp, int64_t p0, int64_t count,
                               int uniform, int64_t coff0)
{
    const float alpha = -2.0f, beta = 0.0f;
    const int d = (int)k->dim;
    if (count <= 0) return KDL_STATUS_SUCCESS;
    if (uniform) {
        const int n = (int)hp[p0].n, m = (int)hp[p0].m;
        /* row-major C [n,m] = X [n,d] Y [m,d]^T  <=>  column-major C^T = Y^T' X */
        long long sX = (count > 1) ? (long long)(hp[p0 + 1].X - hp[p0].X) : (long long)n * d;
        long long sY = (count > 1) ? (long long)(hp[p0 + 1].Y - hp[p0].Y) : (long long)m * d;
        return cublas_status(cublasSgemmStridedBatched(cb, CUBLAS_OP_T, CUBLAS_OP_N, m, n, d, &alpha, hp[p0].Y, d,
                                                       sY, hp[p0].X, d, sX, &beta, k->packed + coff0, m,
                                                       (long long)n * m, (int)count),
                             "cublasSgemmStridedBatched");
    }
    int64_t coff = coff0;
    for (int64_t p = p0; p < p0 + count; p++) {
        const int n = (int)hp[p].n, m = (int)hp[p].m;
        kdl_status_t st = cublas_status(cublasSgemm(cb, CUBLAS_OP_T, CUBLAS_OP_N, m, n, d, &alpha, hp[p].Y, d,
                                                    hp[p].X, d, &beta, k->packed + coff, m),
                                        "cublasSgemm");
        if (st != KDL_STATUS_SUCCESS) return st;
        coff += hp[p].n * hp[p].m;
    }
    return KDL_STATUS_SUCCESS;
}

/* Uploads the tables, builds the costs (when from points), runs the solver.
 * groups: problem index ranges of equal-size runs for the batched GEMM
 * ([start, count) pairs, uniform flag each). */
typedef struct gemm_run {
    int64_t p0, count;
    int uniform;
} gemm_run_t;

static kdl_status_t core_run(kdl_handle_t h, core_t *k, const hprob_t *hp, const gemm_run_t *runs, int nruns,
                             const kdl_otk_params_t *prm, int any_warm_f)
{
    cudaStream_t s = h->stream;
    KDL_CUDA_CHECK(kdl_otk_upload(k->tb_dev, k->tb_host, k->tb_bytes, s));
    if (k->build) {
        if (k->metric == KDL_OT_METRIC_SQEUCLIDEAN) {
            cublasHandle_t cb;
            kdl_status_t st = gemm_cublas(h, &cb);
            if (st != KDL_STATUS_SUCCESS) return st;
            int64_t coff = 0;
            for (int r = 0; r < nruns; r++) {
                st = gemm_batch(cb, k, hp, runs[r].p0, runs[r].count, runs[r].uniform, coff);
                if (st != KDL_STATUS_SUCCESS) return st;
                for (int64_t p = runs[r].p0; p < runs[r].p0 + runs[r].count; p++) coff += hp[p].n * hp[p].m;
            }
            KDL_CUDA_CHECK(kdl_otk_sq_fixup(k->jobs, k->cost_tiles, k->ncost_tiles, s));
        } else {
            KDL_CUDA_CHECK(kdl_otk_l1(k->jobs, k->cost_tiles, k->ncost_tiles, k->dim, k->dsplit, k->partial,
                                      k->packed_total, NULL, s));
            if (k->dsplit > 1) KDL_CUDA_CHECK(kdl_otk_l1_reduce(k->partial, k->dsplit, k->packed_total, k->packed, s));
        }
    }
    kdl_otk_solve_t S;
    memset(&S, 0, sizeof S);
    S.probs = k->probs;
    S.state = k->state;
    S.rtiles = k->rtiles;
    S.ctiles = k->ctiles;
    S.nprob = k->nprob;
    S.nrtiles = k->nrt;
    S.nctiles = k->nct;
    S.any_warm_f = any_warm_f;
    S.prm = *prm;
    S.iter_dev = k->itp;
    /* KDL_SINKHORN_GRAPH=0: enqueue every iteration from the host (the
     * fallback path), for comparisons and tests */
    const char *ge = getenv("KDL_SINKHORN_GRAPH");
    S.use_graph = !(ge && strcmp(ge, "0") == 0);
    S.stream = s;
    KDL_CUDA_CHECK(kdl_otk_run_solver(&S));
    return KDL_STATUS_SUCCESS;
}

static kdl_status_t check_workspace(void *ws, size_t have, size_t need)
{
    if (have < need)
        return kdl_fail(KDL_STATUS_WORKSPACE_TOO_SMALL, "workspace is %zu bytes, %zu needed", have, need);
    if (need > 0 && !ws) return kdl_fail(KDL_STATUS_NULL_POINTER, "workspace is NULL");
    if (((uintptr_t)ws & 15u) != 0) return kdl_fail(KDL_STATUS_BAD_PARAM, "workspace is not 16-byte aligned");
    return KDL_STATUS_SUCCESS;
}

/* =============================================================== Sinkhorn */
typedef struct sk_plan {
    core_t core;
    hprob_t *hp;       /* host [nprob]                      */
    gemm_run_t runs[3];
    int nruns;
    float *NX, *NY;    /* norms                              */
    int64_t *g_off;    /* device [B]                         */
    int64_t *g_off_h;  /* host [B]                           */
    int debias, yy_solved, points;
    size_t bytes;
} sk_plan_t;

static void sk_free(sk_plan_t *P)
{
    free(P->hp);
    free(P->g_off_h);
    free(P->core.tb_host);
    P->hp = NULL;
    P->g_off_h = NULL;
    P->core.tb_host = NULL;
}

/* Plans the call: sizes when base == NULL, fills the host tables otherwise. */
static kdl_status_t sk_plan(kdl_handle_t h, const kdl_sinkhorn_desc_t *d, const kdl_sinkhorn_args_t *a, char *base,
                            sk_plan_t *P)
{
    memset(P, 0, sizeof *P);
    kdl_ot_totals_t T;
    kdl_status_t st = kdl_ot_totals(a, &T);
    if (st != KDL_STATUS_SUCCESS) return st;
    const int64_t B = a->batch;
    P->points = a->x != NULL;
    P->debias = d->debias != 0;
    P->yy_solved = P->debias && !a->self_yy_given;
    /* the kernels take eps (and log2(e)/eps) in FP32: a denormal or
     * out-of-range eps would turn into 0 or inf there and NaN everything */
    if (!(d->epsilon >= FLT_MIN && d->epsilon <= FLT_MAX))
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "epsilon = %g is outside the GPU path's FP32 range", d->epsilon);
    if (P->points && (a->dim > INT32_MAX || (a->grad_x && cdiv(a->dim, 128) > 65535)))
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "dim = %lld is beyond the GPU path's limit", (long long)a->dim);
    const int64_t nprob = B * (1 + P->debias + P->yy_solved);
    if (nprob > INT32_MAX) return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "too many problems");
    const int64_t dim = P->points ? a->dim : 0;

    P->hp = (hprob_t *)calloc((size_t)nprob, sizeof(hprob_t));
    P->g_off_h = (int64_t *)calloc((size_t)B, sizeof(int64_t));
    if (!P->hp || !P->g_off_h) {
        sk_free(P);
        return kdl_fail(KDL_STATUS_ALLOC_FAILED, "host tables");
    }
    carve_t c = {base, 0, 0};
    /* buffers the problem table points into are carved first */
    if (P->points && d->metric == KDL_OT_METRIC_SQEUCLIDEAN) {
        P->NX = (float *)take(&c, (uint64_t)T.rows, sizeof(float));
        P->NY = (float *)take(&c, (uint64_t)T.cols, sizeof(float));
    }
    P->g_off = (int64_t *)take(&c, (uint64_t)B, sizeof(int64_t));

    const float *cost = (const float *)a->cost, *cxx = (const float *)a->cost_xx, *cyy = (const float *)a->cost_yy;
    const float *x = (const float *)a->x, *y = (const float *)a->y;
    const float *la = (const float *)a->log_a, *lb = (const float *)a->log_b;
    float *plan = (float *)a->plan, *fo = (float *)a->f, *gx = (float *)a->grad_x;
    int64_t R = 0, S = 0, NM = 0, NN = 0, MM = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = a->sizes_n ? a->sizes_n[b] : a->n, m = a->sizes_m ? a->sizes_m[b] : a->m;
        hprob_t *q = &P->hp[b];
        q->n = n;
        q->m = m;
        q->C = cost ? cost + NM : NULL;
        q->la = la ? la + R : NULL;
        q->lb = lb ? lb + S : NULL;
        q->X = x ? x + R * dim : NULL;
        q->Y = y ? y + S * dim : NULL;
        q->nx = P->NX ? P->NX + R : NULL;
        q->ny = P->NY ? P->NY + S : NULL;
        q->plan = plan ? plan + NM : NULL;
        q->f_out = fo ? fo + R : NULL;
        q->grad = gx ? gx + R * dim : NULL;
        q->warm_f = a->f_init && !a->g_init;
        P->g_off_h[b] = S;
        if (P->debias) {
            hprob_t *qx = &P->hp[B + b];
            qx->n = qx->m = n;
            qx->C = cxx ? cxx + NN : NULL;
            qx->la = qx->lb = q->la;
            qx->X = qx->Y = q->X;
            qx->nx = qx->ny = q->nx;
            qx->grad = q->grad;
            qx->sym = 1;
            if (P->yy_solved) {
                hprob_t *qy = &P->hp[2 * B + b];
                qy->n = qy->m = m;
                qy->C = cyy ? cyy + MM : NULL;
                qy->la = qy->lb = q->lb;
                qy->X = qy->Y = q->Y;
                qy->nx = qy->ny = q->ny;
            }
        }
        R += n;
        S += m;
        NM += n * m;
        NN += n * n;
        MM += m * m;
    }
    const int uniform = a->sizes_n == NULL;
    P->nruns = 0;
    P->runs[P->nruns++] = (gemm_run_t){0, B, uniform};
    if (P->debias) P->runs[P->nruns++] = (gemm_run_t){B, B, uniform};
    if (P->yy_solved) P->runs[P->nruns++] = (gemm_run_t){2 * B, B, uniform};

    int r = core_layout(&P->core, &c, P->hp, nprob, P->points, d->metric, dim, h->sm_count, base != NULL);
    if (r == 0) {
        sk_free(P);
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "workspace size overflows");
    }
    if (r < 0) {
        sk_free(P);
        return kdl_fail(KDL_STATUS_ALLOC_FAILED, "host tables");
    }
    P->bytes = c.off;
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_sinkhorn_workspace_size(kdl_handle_t h, const kdl_sinkhorn_desc_t *d,
                                         const kdl_sinkhorn_args_t *a, size_t *bytes)
{
    if (!h || !bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or bytes is NULL");
    kdl_status_t st = kdl_sinkhorn_validate(d, a, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (a->batch == 0) {
        *bytes = 0;
        return KDL_STATUS_SUCCESS;
    }
    sk_plan_t P;
    st = sk_plan(h, d, a, NULL, &P);
    if (st != KDL_STATUS_SUCCESS) return st;
    *bytes = P.bytes;
    sk_free(&P);
    return KDL_STATUS_SUCCESS;
}

static kdl_otk_params_t params_of(double eps, double tol, int64_t max_iter, int64_t check_every, int scaling,
                                  double factor, int64_t stage_iter)
{
    kdl_otk_params_t p;
    memset(&p, 0, sizeof p);
    p.eps = eps;
    p.tol = tol;
    /* INT64_MAX (an "until convergence" with tol > 0) would overflow the
     * final pass's iteration max_iter + 1 (kdl_otk_run_solver) and the
     * device loop's counter: one iteration less changes nothing the
     * schedule or the caller can see (docs/sinkhorn-review.md R7) */
    p.max_iter = max_iter < INT64_MAX ? max_iter : INT64_MAX - 1;
    p.check_every = check_every;
    p.eps_scaling = scaling != 0;
    p.factor = factor;
    p.stage_iter = stage_iter > 0 ? stage_iter : 1;
    return p;
}

kdl_status_t kdl_sinkhorn(kdl_handle_t h, const kdl_sinkhorn_desc_t *d, const kdl_sinkhorn_args_t *a,
                          void *workspace, size_t workspace_bytes)
{
    kdl_status_t st = kdl_handle_check(h); /* NULL handle, another current device */
    if (st != KDL_STATUS_SUCCESS) return st;
    st = kdl_sinkhorn_validate(d, a, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    cudaStream_t s = h->stream;
    if (a->batch == 0) {
        if (a->info) KDL_CUDA_CHECK(cudaMemsetAsync(a->info, 0, sizeof(int64_t), s));
        return KDL_STATUS_SUCCESS;
    }
    sk_plan_t P;
    st = sk_plan(h, d, a, NULL, &P); /* size first: nothing written on a short workspace */
    if (st != KDL_STATUS_SUCCESS) return st;
    const size_t need = P.bytes;
    sk_free(&P);
    st = check_workspace(workspace, workspace_bytes, need);
    if (st != KDL_STATUS_SUCCESS) return st;
    st = sk_plan(h, d, a, (char *)workspace, &P);
    if (st != KDL_STATUS_SUCCESS) return st;

    const int64_t B = a->batch;
    kdl_ot_totals_t T;
    (void)kdl_ot_totals(a, &T);
    core_t *k = &P.core;
#define SK_TRY(call)                                                                           \
    do {                                                                                       \
        st = (call);                                                                           \
        if (st != KDL_STATUS_SUCCESS) goto done;                                               \
    } while (0)
    if (a->info) SK_TRY(kdl_cuda_status(cudaMemsetAsync(a->info, 0, sizeof(int64_t), s), "cudaMemsetAsync", __FILE__, __LINE__));
    SK_TRY(kdl_cuda_status(kdl_otk_upload(P.g_off, P.g_off_h, (size_t)B * sizeof(int64_t), s), "kdl_otk_upload",
                           __FILE__, __LINE__));
    /* starting potentials: g = 0, or the warm g; f_init into f[1] */
    SK_TRY(kdl_cuda_status(cudaMemsetAsync(k->G, 0, (size_t)k->cols_total * sizeof(float), s), "cudaMemsetAsync",
                           __FILE__, __LINE__));
    if (a->g_init)
        SK_TRY(kdl_cuda_status(cudaMemcpyAsync(k->G, a->g_init, (size_t)T.cols * sizeof(float),
                                               cudaMemcpyDeviceToDevice, s),
                               "cudaMemcpyAsync", __FILE__, __LINE__));
    else if (a->f_init)
        SK_TRY(kdl_cuda_status(cudaMemcpyAsync(k->F1, a->f_init, (size_t)T.rows * sizeof(float),
                                               cudaMemcpyDeviceToDevice, s),
                               "cudaMemcpyAsync", __FILE__, __LINE__));
    if (P.NX) {
        SK_TRY(kdl_cuda_status(kdl_otk_sqnorms((const float *)a->x, T.rows, a->dim, P.NX, s), "kdl_otk_sqnorms",
                               __FILE__, __LINE__));
        SK_TRY(kdl_cuda_status(kdl_otk_sqnorms((const float *)a->y, T.cols, a->dim, P.NY, s), "kdl_otk_sqnorms",
                               __FILE__, __LINE__));
    }
    {
        kdl_otk_params_t prm = params_of(d->epsilon, d->tol, d->max_iter, d->check_every, d->eps_scaling,
                                         d->eps_scaling_factor, d->eps_stage_iter);
        SK_TRY(core_run(h, k, P.hp, P.runs, P.nruns, &prm, a->f_init && !a->g_init));
    }
    if (a->grad_x) {
        int64_t t_cross = 0, t_xx = 0;
        for (int64_t b = 0; b < B; b++) {
            t_cross += cdiv(P.hp[b].n, KDL_OTK_ROWS_PER_TILE);
            if (P.debias) t_xx += cdiv(P.hp[b].n, KDL_OTK_ROWS_PER_TILE);
        }
        SK_TRY(kdl_cuda_status(kdl_otk_grad_x(k->probs, k->state, k->rtiles, 0, t_cross, a->dim, d->metric, d->epsilon, s),
                               "kdl_otk_grad_x", __FILE__, __LINE__));
        if (P.debias)
            SK_TRY(kdl_cuda_status(kdl_otk_grad_x(k->probs, k->state, k->rtiles, t_cross, t_xx, a->dim, d->metric,
                                                  d->epsilon, s),
                                   "kdl_otk_grad_x", __FILE__, __LINE__));
    }
    {
        kdl_otk_combine_t L;
        memset(&L, 0, sizeof L);
        L.probs = k->probs;
        L.state = k->state;
        L.batch = B;
        L.debias = P.debias;
        L.yy_solved = P.yy_solved;
        L.dual = d->value == KDL_OT_VALUE_DUAL;
        L.self_yy_in = a->self_yy_given ? (const float *)a->self_yy : NULL;
        L.self_yy_out = (!a->self_yy_given && P.debias) ? (float *)a->self_yy : NULL;
        L.value = (float *)a->value;
        L.iterations = a->iterations;
        L.marginal_error = (float *)a->marginal_error;
        L.g_out = (float *)a->g;
        L.g_off = P.g_off;
        L.info = (unsigned long long *)a->info;
        L.stream = s;
        SK_TRY(kdl_cuda_status(kdl_otk_sinkhorn_combine(&L), "kdl_otk_sinkhorn_combine", __FILE__, __LINE__));
    }
done:
    sk_free(&P);
    return st;
#undef SK_TRY
}

/* ================================================================== SinKD */
typedef struct sd_plan {
    core_t core;
    hprob_t *hp;
    gemm_run_t runs[1];
    float *ps, *pt, *NX, *NY, *Pbuf, *coef;
    float *rsum, *dot; /* gradient: [N] each                              */
    float *H;          /* gradient, squared L2: P T, [N, Vc]             */
    float *D;          /* gradient, L1: D_ij, [G n n]                    */
    int32_t *bad, *gvalid;
    int64_t N, V, n, G, Vc;
    size_t bytes;
} sd_plan_t;

/* Vocabulary columns per GEMM chunk of the squared-L2 gradient: the P T
 * buffer holds at most 2^25 floats (128 MiB), at least 256 columns (or V).
 * KDL_SINKD_CHUNK (columns) overrides it, for tests of the chunk loop. */
static int64_t sd_chunk(int64_t N, int64_t V)
{
    int64_t c = ((int64_t)1 << 25) / (N > 0 ? N : 1);
    if (c < 256) c = 256;
    const char *e = getenv("KDL_SINKD_CHUNK");
    if (e) {
        long long v = strtoll(e, NULL, 10);
        if (v >= 1) c = (int64_t)v;
    }
    return c < V ? c : V;
}

static void sd_free(sd_plan_t *P)
{
    free(P->hp);
    free(P->core.tb_host);
    P->hp = NULL;
    P->core.tb_host = NULL;
}

static kdl_status_t sd_plan(kdl_handle_t h, const kdl_sinkd_desc_t *d, const kdl_sinkd_args_t *a, char *base,
                            sd_plan_t *P)
{
    memset(P, 0, sizeof *P);
    P->N = a->rows;
    P->V = a->vocab;
    P->n = kdl_sinkd_group(d, a);
    P->G = P->N / P->n;
    if (P->V > INT32_MAX || P->N > INT32_MAX)
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "rows or vocab beyond the GPU path's 2^31 - 1");
    if (!(d->epsilon >= FLT_MIN && d->epsilon <= FLT_MAX) || !(d->temperature >= FLT_MIN && d->temperature <= FLT_MAX))
        return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "epsilon or temperature outside the GPU path's FP32 range");
    carve_t c = {base, 0, 0};
    P->ps = (float *)take(&c, (uint64_t)(P->N * P->V), sizeof(float));
    P->pt = (float *)take(&c, (uint64_t)(P->N * P->V), sizeof(float));
    P->bad = (int32_t *)take(&c, (uint64_t)(2 * P->N), sizeof(int32_t));
    if (d->metric == KDL_OT_METRIC_SQEUCLIDEAN) {
        P->NX = (float *)take(&c, (uint64_t)P->N, sizeof(float));
        P->NY = (float *)take(&c, (uint64_t)P->N, sizeof(float));
    }
    const int need_P = a->grad || a->plan;
    if (need_P) P->Pbuf = (float *)take(&c, (uint64_t)(P->G * P->n * P->n), sizeof(float));
    P->coef = (float *)take(&c, 1, sizeof(float));
    P->gvalid = (int32_t *)take(&c, (uint64_t)P->G, sizeof(int32_t));
    if (a->grad) {
        P->rsum = (float *)take(&c, (uint64_t)P->N, sizeof(float));
        P->dot = (float *)take(&c, (uint64_t)P->N, sizeof(float));
        if (d->metric == KDL_OT_METRIC_SQEUCLIDEAN) {
            P->Vc = sd_chunk(P->N, P->V);
            P->H = (float *)take(&c, (uint64_t)P->N * (uint64_t)P->Vc, sizeof(float));
        } else {
            P->D = (float *)take(&c, (uint64_t)(P->G * P->n * P->n), sizeof(float));
        }
    }

    P->hp = (hprob_t *)calloc((size_t)P->G, sizeof(hprob_t));
    if (!P->hp) return kdl_fail(KDL_STATUS_ALLOC_FAILED, "host tables");
    for (int64_t g = 0; g < P->G; g++) {
        hprob_t *q = &P->hp[g];
        q->n = q->m = P->n;
        q->X = P->ps ? P->ps + g * P->n * P->V : NULL;
        q->Y = P->pt ? P->pt + g * P->n * P->V : NULL;
        q->nx = P->NX ? P->NX + g * P->n : NULL;
        q->ny = P->NY ? P->NY + g * P->n : NULL;
        q->plan = P->Pbuf ? P->Pbuf + g * P->n * P->n : NULL;
    }
    P->runs[0] = (gemm_run_t){0, P->G, 1};
    int r = core_layout(&P->core, &c, P->hp, P->G, 1, d->metric, P->V, h->sm_count, base != NULL);
    if (r == 0) {
        sd_free(P);
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "workspace size overflows");
    }
    if (r < 0) {
        sd_free(P);
        return kdl_fail(KDL_STATUS_ALLOC_FAILED, "host tables");
    }
    P->bytes = c.off;
    return KDL_STATUS_SUCCESS;
}

/* d loss / d S after the epilogue (docs/sinkhorn.md, SinKD on the GPU). */
static kdl_status_t sd_grad(kdl_handle_t h, const kdl_sinkd_desc_t *d, const kdl_sinkd_args_t *a, sd_plan_t *P)
{
    cudaStream_t s = h->stream;
    const core_t *k = &P->core;
    kdl_otk_sinkd_grad_t L;
    memset(&L, 0, sizeof L);
    L.ps = P->ps;
    L.pt = P->pt;
    L.P = P->Pbuf;
    L.gvalid = P->gvalid;
    L.coef = P->coef;
    L.rsum = P->rsum;
    L.dot = P->dot;
    L.N = P->N;
    L.V = P->V;
    L.n = P->n;
    L.metric = d->metric;
    L.tau = d->temperature;
    L.grad = a->grad;
    L.ld_grad = a->ld_grad;
    L.grad_dtype = (int)a->grad_dtype;
    L.stream = s;
    if (d->metric == KDL_OT_METRIC_L1) {
        /* D over the cost tiles (the cost's partial buffer is free again) */
        KDL_CUDA_CHECK(kdl_otk_l1(k->jobs, k->cost_tiles, k->ncost_tiles, P->V, k->dsplit, k->partial,
                                  k->packed_total, P->D, s));
        if (k->dsplit > 1) KDL_CUDA_CHECK(kdl_otk_l1_reduce(k->partial, k->dsplit, k->packed_total, P->D, s));
        L.CD = P->D;
        KDL_CUDA_CHECK(kdl_otk_sinkd_rowprep(&L));
        KDL_CUDA_CHECK(kdl_otk_sinkd_grad_l1(&L));
        return KDL_STATUS_SUCCESS;
    }
    L.CD = k->packed;
    L.nx = P->NX;
    L.ny = P->NY;
    KDL_CUDA_CHECK(kdl_otk_sinkd_rowprep(&L));
    cublasHandle_t cb;
    kdl_status_t st = gemm_cublas(h, &cb);
    if (st != KDL_STATUS_SUCCESS) return st;
    const float one = 1.0f, zero = 0.0f;
    const int n = (int)P->n;
    for (int64_t v0 = 0; v0 < P->V; v0 += P->Vc) {
        const int64_t vc = P->V - v0 < P->Vc ? P->V - v0 : P->Vc;
        /* row-major H_g [n, vc] (row stride Vc) = P_g [n, n] T_g[:, v0:v0+vc]
         * <=> column-major H_g^T = T_g^T P_g^T */
        st = cublas_status(cublasSgemmStridedBatched(cb, CUBLAS_OP_N, CUBLAS_OP_N, (int)vc, n, n, &one, P->pt + v0,
                                                     (int)P->V, (long long)P->n * P->V, P->Pbuf, n,
                                                     (long long)P->n * P->n, &zero, P->H, (int)P->Vc,
                                                     (long long)P->n * P->Vc, (int)P->G),
                           "cublasSgemmStridedBatched");
        if (st != KDL_STATUS_SUCCESS) return st;
        KDL_CUDA_CHECK(kdl_otk_sinkd_grad_sq(&L, P->H, v0, vc, P->Vc));
    }
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_sinkd_workspace_size(kdl_handle_t h, const kdl_sinkd_desc_t *d, const kdl_sinkd_args_t *a,
                                      size_t *bytes)
{
    if (!h || !bytes) return kdl_fail(KDL_STATUS_NULL_POINTER, "handle or bytes is NULL");
    kdl_status_t st = kdl_sinkd_validate(d, a, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (a->rows == 0) {
        *bytes = 0;
        return KDL_STATUS_SUCCESS;
    }
    sd_plan_t P;
    st = sd_plan(h, d, a, NULL, &P);
    if (st != KDL_STATUS_SUCCESS) return st;
    *bytes = P.bytes;
    sd_free(&P);
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_sinkd(kdl_handle_t h, const kdl_sinkd_desc_t *d, const kdl_sinkd_args_t *a, void *workspace,
                       size_t workspace_bytes)
{
    kdl_status_t st = kdl_handle_check(h); /* NULL handle, another current device */
    if (st != KDL_STATUS_SUCCESS) return st;
    st = kdl_sinkd_validate(d, a, 0);
    if (st != KDL_STATUS_SUCCESS) return st;
    cudaStream_t s = h->stream;
    const size_t osz = a->out_dtype == KDL_DTYPE_F64 ? 8 : 4;
    if (a->rows == 0) { /* loss 0 (all-zero bytes in f32 and f64), info 0 */
        KDL_CUDA_CHECK(cudaMemsetAsync(a->loss, 0, osz, s));
        if (a->info) KDL_CUDA_CHECK(cudaMemsetAsync(a->info, 0, sizeof(int64_t), s));
        return KDL_STATUS_SUCCESS;
    }
    sd_plan_t P;
    st = sd_plan(h, d, a, NULL, &P);
    if (st != KDL_STATUS_SUCCESS) return st;
    const size_t need = P.bytes;
    sd_free(&P);
    st = check_workspace(workspace, workspace_bytes, need);
    if (st != KDL_STATUS_SUCCESS) return st;
    st = sd_plan(h, d, a, (char *)workspace, &P);
    if (st != KDL_STATUS_SUCCESS) return st;
    core_t *k = &P.core;
#define SD_TRY(call)                                                                           \
    do {                                                                                       \
        st = (call);                                                                           \
        if (st != KDL_STATUS_SUCCESS) goto done;                                               \
    } while (0)
#define SD_CUDA(call) SD_TRY(kdl_cuda_status((call), #call, __FILE__, __LINE__))
    SD_CUDA(kdl_otk_softmax_rows(a->student, (int)a->student_dtype, a->ld_student, P.N, P.V, d->temperature, P.ps,
                                 P.bad, s));
    SD_CUDA(kdl_otk_softmax_rows(a->teacher, (int)a->teacher_dtype, a->ld_teacher, P.N, P.V, d->temperature, P.pt,
                                 P.bad + P.N, s));
    if (P.NX) {
        SD_CUDA(kdl_otk_sqnorms(P.ps, P.N, P.V, P.NX, s));
        SD_CUDA(kdl_otk_sqnorms(P.pt, P.N, P.V, P.NY, s));
    }
    SD_CUDA(cudaMemsetAsync(k->G, 0, (size_t)k->cols_total * sizeof(float), s));
    {
        kdl_otk_params_t prm = params_of(d->epsilon, d->tol, d->max_iter, d->check_every, 0, 0.5, 1);
        SD_TRY(core_run(h, k, P.hp, P.runs, 1, &prm, 0));
    }
    {
        kdl_otk_sinkd_epi_t L;
        memset(&L, 0, sizeof L);
        L.probs = k->probs;
        L.state = k->state;
        L.groups = P.G;
        L.n = P.n;
        L.N = P.N;
        L.V = P.V;
        L.bad_s = P.bad;
        L.bad_t = P.bad + P.N;
        L.P = P.Pbuf;
        L.scale = d->scale;
        L.out_f64 = a->out_dtype == KDL_DTYPE_F64;
        L.loss = a->loss;
        L.group_loss = a->group_loss;
        L.plan = a->plan;
        L.marginal_error = a->marginal_error;
        L.iterations = a->iterations;
        L.info = (unsigned long long *)a->info;
        L.coef = P.coef;
        L.gvalid = P.gvalid;
        L.stream = s;
        SD_CUDA(kdl_otk_sinkd_epilogue(&L));
    }
    if (a->grad) SD_TRY(sd_grad(h, d, a, &P));
done:
    sd_free(&P);
    return st;
#undef SD_TRY
#undef SD_CUDA
}
