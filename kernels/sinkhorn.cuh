/*
 * kernels/sinkhorn.cuh - the interface between the Sinkhorn / SinKD host
 * wrapper (host/gpu_sinkhorn.c, C) and the kernels (kernels/sinkhorn.cu):
 * the device-side tables the wrapper builds and uploads, and the launchers.
 * C-compatible (the wrapper is C11); CUDA runtime API types only.
 *
 * Vocabulary.  A "solver problem" is one entropic OT problem the batched
 * solver iterates: for kdl_sinkhorn the B problems (a, b), then with debias
 * the B problems (a, a), then (unless the teacher term is cached) the B
 * problems (b, b); for kdl_sinkd the G groups.  Work is spread by tables:
 *   row tiles   (problem, first row): 8 rows, one warp each (f update,
 *               plan / value pass, x-gradient)
 *   col tiles   (problem, first column): 32 columns x 8 row slices
 *               (g update)
 *   cost tiles  (job, first row, first column): 16 x 16 cost entries
 *               (L1 cost, squared-Euclidean norm fix-up)
 * All reductions run in a fixed order: results are bitwise reproducible
 * run to run on one GPU (no floating-point atomics).
 */
#ifndef KDLOSS_KERNELS_SINKHORN_CUH
#define KDLOSS_KERNELS_SINKHORN_CUH

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "ot_internal.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KDL_OTK_ROWS_PER_TILE 8   /* f update: 8 warps, one row each          */
#define KDL_OTK_COLS_PER_TILE 32  /* g update: 32 columns x 8 row slices      */
#define KDL_OTK_COST_TILE 16      /* cost: 16 x 16 entries, 256 threads        */

/* One solver problem (device table entry). */
typedef struct kdl_otk_prob {
    const float *C;      /* [n*m] row-major cost                                */
    const float *la;     /* [n] log-weights, NULL: uniform -log n               */
    const float *lb;     /* [m], NULL: uniform -log m                           */
    float *f[2];         /* [n] each: potentials, double-buffered by iteration  */
    float *g;            /* [m]                                                 */
    float *rowerr;       /* [n] scratch: |row sum - a_i| terms                  */
    float *rowval;       /* [n] scratch: row sums of P_ij C_ij                  */
    float *plan;         /* optional [n*m]: P (float)                           */
    float *f_out;        /* optional [n]: final f for the caller                */
    const float *X;      /* points [n, d] (x-gradient), or NULL                 */
    const float *Y;      /* points [m, d]                                       */
    float *grad;         /* x-gradient rows [n, d] (caller's grad_x), or NULL   */
    int32_t n, m;
    int32_t warm_f;      /* 1: g starts with one g update from f[1]             */
    int32_t sym;         /* 1: self problem (a, a): x-gradient uses P + P^T     */
} kdl_otk_prob_t;

/* Per-problem solver state (device). */
typedef struct kdl_otk_state {
    kdl_ot_schedule_t sched; /* eps-scaling schedule (diameter from the cost)  */
    int64_t iters;           /* iterations used                                */
    float err;               /* final row-marginal L1 error                    */
    int32_t done;            /* 0 iterating, 1 finished, 2 non-finite input    */
    int32_t fbuf;            /* f[fbuf] holds the final f                      */
} kdl_otk_state_t;

typedef struct kdl_otk_tile {
    int32_t prob;  /* problem (or cost job) index */
    int32_t r0;    /* first row                    */
    int32_t c0;    /* first column (cost tiles)    */
} kdl_otk_tile_t;

/* Solver parameters (the same for every problem of a call). */
typedef struct kdl_otk_params {
    double eps, tol, factor;
    int64_t max_iter, check_every, stage_iter;
    int32_t eps_scaling;
} kdl_otk_params_t;

/* One cost matrix to build from points: C = dist(X_i, Y_j). */
typedef struct kdl_otk_job {
    const float *X;   /* [n, d] */
    const float *Y;   /* [m, d] */
    const float *nx;  /* [n] squared norms of X rows (SQEUCLIDEAN)   */
    const float *ny;  /* [m]                                         */
    float *C;         /* [n*m]                                        */
    int64_t coff;     /* offset of C in the packed cost buffer        */
    int32_t n, m;
} kdl_otk_job_t;

/* ------------------------------------------------------------- launchers */
/* All launchers enqueue on `stream` and return the first CUDA error. */

/* Host-to-device copy of the wrapper's tables (host memory the caller may
 * free on return): cudaMemcpyAsync, or, while `stream` is being captured
 * into a CUDA graph, kernels that carry the bytes in their parameters (a
 * captured copy reads the host address at each replay, after the buffer is
 * freed; parameters are recorded by value). */
cudaError_t kdl_otk_upload(void *dst, const void *src, size_t bytes, cudaStream_t stream);

/* Squared row norms: out[r] = sum_k X[r, k]^2 for rows [0, rows). */
cudaError_t kdl_otk_sqnorms(const float *X, int64_t rows, int64_t d, float *out, cudaStream_t stream);

/* C = max(0, nx_i + ny_j + C_ij) over every cost tile (C holds -2 x.y). */
cudaError_t kdl_otk_sq_fixup(const kdl_otk_job_t *jobs, const kdl_otk_tile_t *tiles, int64_t ntiles,
                             cudaStream_t stream);

/* L1 cost over the cost tiles, the d axis split in dsplit parts: with
 * dsplit == 1 writes C directly, otherwise partial[s * total + coff + i m + j]
 * then kdl_otk_l1_reduce sums the parts in order into packed[0, total).
 * dot_out != NULL: instead of the cost, D_ij = sum_k x_ik sign(x_ik - y_jk)
 * into dot_out + coff (or the partials), for SinKD's L1 gradient. */
cudaError_t kdl_otk_l1(const kdl_otk_job_t *jobs, const kdl_otk_tile_t *tiles, int64_t ntiles, int64_t d,
                       int dsplit, float *partial, int64_t total, float *dot_out, cudaStream_t stream);
cudaError_t kdl_otk_l1_reduce(const float *partial, int dsplit, int64_t total, float *packed,
                              cudaStream_t stream);

/* The solver: scan + schedule, warm start, iterations, plan / value pass.
 * g buffers must hold the start (0 or the warm g) on entry; problems with
 * warm_f get one g update from f[1] first.  check_each_iter: 1 when the
 * stopping test may be due at any iteration (eps-scaling with tol > 0). */
typedef struct kdl_otk_solve {
    const kdl_otk_prob_t *probs;   /* device [nprob]                 */
    kdl_otk_state_t *state;        /* device [nprob]                 */
    const kdl_otk_tile_t *rtiles;  /* device [nrtiles]               */
    const kdl_otk_tile_t *ctiles;  /* device [nctiles]               */
    int64_t nprob, nrtiles, nctiles;
    int any_warm_f;
    kdl_otk_params_t prm;
    int64_t *iter_dev;             /* device scratch [1]: the loop's counter */
    int use_graph;                 /* 1: with tol > 0, loop on the device    */
    cudaStream_t stream;
} kdl_otk_solve_t;
cudaError_t kdl_otk_run_solver(const kdl_otk_solve_t *S);

/* x-gradient through the cost, plan fixed, over row tiles [t0, t0 + nt):
 * sym == 0 problems write grad = sum_j P_ij dC(x_i, y_j); sym == 1 problems
 * add -1/2 sum_l (P_il + P_li) dC(x_i, x_l).  Non-finite problems: NaN. */
cudaError_t kdl_otk_grad_x(const kdl_otk_prob_t *probs, const kdl_otk_state_t *state,
                           const kdl_otk_tile_t *rtiles, int64_t t0, int64_t nt, int64_t d, int metric,
                           double eps, cudaStream_t stream);

/* Sinkhorn epilogue, one CTA per caller problem b: value (with the debias
 * combination), iterations, marginal_error, g and self_yy outputs, info. */
typedef struct kdl_otk_combine {
    const kdl_otk_prob_t *probs;
    const kdl_otk_state_t *state;
    int64_t batch;          /* B                                              */
    int debias;             /* problems B..2B-1 are (a,a)                     */
    int yy_solved;          /* problems 2B..3B-1 are (b,b)                    */
    int dual;               /* value DUAL (else TRANSPORT)                    */
    const float *self_yy_in;/* cached V(b,b) [B], or NULL                     */
    float *self_yy_out;     /* [B] or NULL                                    */
    float *value;           /* [B]                                            */
    int64_t *iterations;    /* [B] or NULL                                    */
    float *marginal_error;  /* [B] or NULL                                    */
    float *g_out;           /* packed [sum m_b] or NULL                       */
    const int64_t *g_off;   /* device [B]: offsets of g_out per problem       */
    unsigned long long *info; /* [1] or NULL (zeroed by the caller)           */
    cudaStream_t stream;
} kdl_otk_combine_t;
cudaError_t kdl_otk_sinkhorn_combine(const kdl_otk_combine_t *L);

/* SinKD: p = softmax(x / tau) per row into probs [N, V] (f32, contiguous);
 * bad[r] = 1 for an invalid row (NaN / +inf logit, or all -inf), its p row
 * is then 0. */
cudaError_t kdl_otk_softmax_rows(const void *x, int dtype, int64_t ld, int64_t N, int64_t V, double tau,
                                 float *probs, int32_t *bad, cudaStream_t stream);

/* SinKD epilogue: group losses, loss, info, iterations, errors, plan (out
 * dtype f32 / f64), validity per group and the gradient coefficient. */
typedef struct kdl_otk_sinkd_epi {
    const kdl_otk_prob_t *probs;
    const kdl_otk_state_t *state;
    int64_t groups, n, N, V;
    const int32_t *bad_s, *bad_t; /* [N] row flags                         */
    const float *P;               /* [G*n*n] plans (float), or NULL         */
    double scale;
    int out_f64;
    void *loss, *group_loss, *plan, *marginal_error;
    int64_t *iterations;
    unsigned long long *info;
    float *coef;                  /* device scratch [1]: scale / valid groups */
    int32_t *gvalid;              /* device scratch [G]                     */
    cudaStream_t stream;
} kdl_otk_sinkd_epi_t;
cudaError_t kdl_otk_sinkd_epilogue(const kdl_otk_sinkd_epi_t *L);

/* SinKD gradient d loss / d S (plan fixed), after the epilogue (gvalid,
 * coef).  kdl_otk_sinkd_rowprep first (rsum, dot per row), then either
 * kdl_otk_sinkd_grad_sq per vocabulary chunk [v0, v0 + vc) with H = P T of
 * the chunk (row r at H + r ldh, a cuBLAS GEMM by the caller), or
 * kdl_otk_sinkd_grad_l1 once.  Grad dtype 0 f32, 1 f16, 2 bf16. */
typedef struct kdl_otk_sinkd_grad {
    const float *ps, *pt;         /* [N, V] softmaxes                       */
    const float *P;               /* [G*n*n] plans                          */
    const float *CD;              /* squared L2: the packed cost; L1: D     */
    const float *nx, *ny;         /* squared L2: row norms [N]; L1: NULL    */
    const int32_t *gvalid;
    const float *coef;
    float *rsum, *dot;            /* device scratch [N] each                */
    int64_t N, V, n;
    int metric;
    double tau;
    void *grad;
    int64_t ld_grad;
    int grad_dtype;
    cudaStream_t stream;
} kdl_otk_sinkd_grad_t;
cudaError_t kdl_otk_sinkd_rowprep(const kdl_otk_sinkd_grad_t *L);
cudaError_t kdl_otk_sinkd_grad_sq(const kdl_otk_sinkd_grad_t *L, const float *H, int64_t v0, int64_t vc,
                                  int64_t ldh);
cudaError_t kdl_otk_sinkd_grad_l1(const kdl_otk_sinkd_grad_t *L);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_KERNELS_SINKHORN_CUH */
