/*
 * kdloss_ot.h - batched log-domain Sinkhorn optimal transport and the SinKD
 * loss: descriptors, argument structs, GPU and float64 reference entry
 * points.  Maths: DESIGN section 2; user guide: docs/sinkhorn.md.
 *
 * Two calls, each in a GPU form (kdloss.h's handle, device pointers, a
 * caller workspace, asynchronous on the handle's stream) and a reference form
 * (host pointers, float64 arithmetic, no CUDA needed):
 *
 *   kdl_sinkhorn / kdl_ref_sinkhorn  B entropic OT problems, each n_b x m_b,
 *                                    cost given or built from points
 *   kdl_sinkd    / kdl_ref_sinkd     SinKD: per group of n rows, Sinkhorn
 *                                    between student and teacher softmaxes
 *
 * Sinkhorn iteration (log domain, potentials f [n], g [m], log-weights
 * la = log a, lb = log b):
 *     f_i  = -eps LSE_j(lb_j + (g_j - C_ij)/eps)
 *     g_j  = -eps LSE_i(la_i + (f_i - C_ij)/eps)
 *     P_ij = exp(la_i + lb_j + (f_i + g_j - C_ij)/eps)
 * One iteration is an f update then a g update (so the columns of P always
 * sum to b exactly; the stopping test measures the rows:
 * err = sum_i |sum_j P_ij - a_i|).
 *
 * Like every kdloss call: arguments are checked before anything is written
 * or launched; a bad argument returns its specific status and leaves every
 * output untouched.
 */
#ifndef KDLOSS_OT_H
#define KDLOSS_OT_H

#include <stddef.h>
#include <stdint.h>

#include "kdloss/kdloss_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The handle of kdloss.h (the same typedef, repeated so this header stands
 * alone). */
typedef struct kdl_context *kdl_handle_t;

/* -------------------------------------------------------------------- enums */
/* Ground cost between points (Sinkhorn from points, SinKD over the vocabulary). */
typedef enum kdl_ot_metric {
    KDL_OT_METRIC_SQEUCLIDEAN = 0, /* |x - y|^2 = |x|^2 + |y|^2 - 2 x.y (GEMM on the GPU) */
    KDL_OT_METRIC_L1 = 1,          /* sum_k |x_k - y_k|                                   */
    KDL_OT_METRIC_COUNT_ = 2
} kdl_ot_metric_t;

/* Which number a problem reports. */
typedef enum kdl_ot_value {
    KDL_OT_VALUE_TRANSPORT = 0, /* <P, C>: Sinkhorn distance (Cuturi, SinKD)               */
    KDL_OT_VALUE_DUAL = 1,      /* <a, f> + <b, g>: entropic OT (GeomLoss, OTT); dV/dC = P */
    KDL_OT_VALUE_COUNT_ = 2
} kdl_ot_value_t;

/* Names used by the CLI: "sqeuclidean", "l1"; "transport", "dual".
 * The parse functions return -1 for an unknown name. */
const char *kdl_ot_metric_name(kdl_ot_metric_t m);
int kdl_ot_metric_from_name(const char *name);
const char *kdl_ot_value_name(kdl_ot_value_t v);
int kdl_ot_value_from_name(const char *name);

/* --------------------------------------------------------- Sinkhorn: what */
/* Always start from kdl_sinkhorn_desc_init(). */
typedef struct kdl_sinkhorn_desc {
    size_t struct_size;         /* = sizeof(kdl_sinkhorn_desc_t), set by init            */
    double epsilon;             /* entropic regularisation eps > 0, finite; default 0.1  */
    int64_t max_iter;           /* >= 1, default 1000; bounds all iterations, annealing
                                   stages included                                      */
    double tol;                 /* >= 0, default 1e-6: stop when err <= tol.  0 = run
                                   exactly max_iter iterations (no checks)               */
    int64_t check_every;        /* >= 1, default 10: err is measured every check_every
                                   iterations of the final (eps) stage                  */
    int eps_scaling;            /* 0 (default) off; 1: anneal eps geometrically from the
                                   cost's diameter max C - min C down to epsilon        */
    double eps_scaling_factor;  /* in (0,1), default 0.8: eps_{s+1} = factor * eps_s     */
    int64_t eps_stage_iter;     /* >= 1, default 1: iterations per annealing stage       */
    kdl_ot_value_t value;       /* default KDL_OT_VALUE_TRANSPORT                        */
    int debias;                 /* 0 (default); 1: Sinkhorn divergence
                                   S = V(a,b) - V(a,a)/2 - V(b,b)/2                      */
    kdl_ot_metric_t metric;     /* cost from points; default KDL_OT_METRIC_SQEUCLIDEAN   */
} kdl_sinkhorn_desc_t;

void kdl_sinkhorn_desc_init(kdl_sinkhorn_desc_t *desc);

/* -------------------------------------------------------- Sinkhorn: where */
/*
 * Problems are packed back to back, no padding.  With sizes_n == NULL every
 * problem is n x m; otherwise problem b is sizes_n[b] x sizes_m[b] (host
 * arrays, both or neither, even for the GPU call).  Offsets of problem b:
 *     rows  R_b = sum_{k<b} n_k      cols  S_b = sum_{k<b} m_k
 *     cost  sum_{k<b} n_k m_k        (row-major n_b x m_b block)
 *     x     R_b * dim                y     S_b * dim
 *     log_a, f, grad rows: R_b       log_b, g: S_b
 *     cost_xx  sum_{k<b} n_k^2       cost_yy  sum_{k<b} m_k^2
 * Every float array has the type `dtype`: F32 (GPU and reference) or F64
 * (reference only).  Optional arrays are NULL when absent or not wanted.
 * Always start from kdl_sinkhorn_args_init().
 */
typedef struct kdl_sinkhorn_args {
    size_t struct_size;         /* = sizeof(kdl_sinkhorn_args_t), set by init            */
    int64_t batch;              /* B >= 0 (0: nothing is computed or launched)           */
    int64_t n, m;               /* problem size when uniform, each >= 1                  */
    const int64_t *sizes_n;     /* optional host [B]: ragged batch, each >= 1            */
    const int64_t *sizes_m;     /* optional host [B]                                     */
    kdl_dtype_t dtype;          /* default F32                                           */

    /* Input: exactly one of cost, or the points x and y (metric of the desc). */
    const void *cost;           /* [sum n_b m_b]                                         */
    const void *x;              /* [sum n_b, dim] row-major                              */
    const void *y;              /* [sum m_b, dim]                                        */
    int64_t dim;                /* d >= 1 with points                                    */

    const void *log_a;          /* optional [sum n_b] log-weights (default -log n_b);
                                   -inf is a zero weight.  Each a should sum to 1 and b
                                   too: the solver does not renormalise                  */
    const void *log_b;          /* optional [sum m_b] (default -log m_b)                 */
    const void *f_init;         /* optional warm start [sum n_b]; used only without
                                   g_init (g starts as one g update from f_init)         */
    const void *g_init;         /* optional warm start [sum m_b] (default 0)             */

    /* Debias with a given cost: the self costs (with points they are built
     * from x and y, and these must be NULL). */
    const void *cost_xx;        /* [sum n_b^2]: cost between the x-side support points  */
    const void *cost_yy;        /* [sum m_b^2]; not needed when self_yy_given            */
    void *self_yy;              /* optional [B]: V(b,b) (same value kind).  Output when
                                   self_yy_given == 0, input when 1 (the teacher's
                                   self-term, cached across calls).  Unused without
                                   debias                                              */
    int self_yy_given;          /* 0 (default) or 1                                      */

    /* Outputs. */
    void *value;                /* required [B]: value (or divergence) per problem       */
    int64_t *iterations;        /* optional [B]: iterations of the (a,b) problem         */
    void *marginal_error;       /* optional [B]: final sum_i |sum_j P_ij - a_i|          */
    void *f;                    /* optional [sum n_b]: final potentials of (a,b)         */
    void *g;                    /* optional [sum m_b]                                    */
    void *plan;                 /* optional [sum n_b m_b]: P of (a,b)                    */
    void *grad_x;               /* optional [sum n_b, dim]: d value / d x, plan held
                                   fixed (exact for DUAL); needs points                  */
    int64_t *info;              /* optional [1], GPU only (reference: must be NULL or is
                                   set to 0): number of problems whose input was not
                                   finite (their value and error are NaN)               */
} kdl_sinkhorn_args_t;

void kdl_sinkhorn_args_init(kdl_sinkhorn_args_t *args);

/* Argument check shared by the GPU path and the reference (allow_f64 = 1 for
 * the reference).  Returns the first problem's specific status, writes
 * nothing.  Does not read the data (the reference scans it separately). */
kdl_status_t kdl_sinkhorn_validate(const kdl_sinkhorn_desc_t *desc, const kdl_sinkhorn_args_t *args,
                                   int allow_f64);

/* ------------------------------------------------------------ SinKD: what */
/* Always start from kdl_sinkd_desc_init(). */
typedef struct kdl_sinkd_desc {
    size_t struct_size;         /* = sizeof(kdl_sinkd_desc_t), set by init               */
    int64_t group_size;         /* rows per group n >= 1; 0 (default): one group of all
                                   N rows (SinKD's batch-wise transport)                 */
    double temperature;         /* tau > 0, default 2                                    */
    double epsilon;             /* eps > 0, default 0.1                                  */
    int64_t max_iter;           /* >= 1, default 20                                      */
    double tol;                 /* >= 0, default 0: exactly max_iter iterations, as SinKD */
    int64_t check_every;        /* >= 1, default 10                                      */
    kdl_ot_metric_t metric;     /* over the vocabulary; default KDL_OT_METRIC_L1         */
    double scale;               /* finite, default 1: multiplies loss and gradient       */
} kdl_sinkd_desc_t;

void kdl_sinkd_desc_init(kdl_sinkd_desc_t *desc);

/* ----------------------------------------------------------- SinKD: where */
/*
 * loss = scale * (1/G_valid) sum_{valid groups g} <P_g, C_g>, with
 * C_g[i][j] = dist(p_s[g n + i], p_t[g n + j]), uniform marginals 1/n, and
 * P_g from max_iter log-domain iterations.  (SinKD's code normalises P to
 * mass n, not 1: its number is n times this one.)  A group with an invalid
 * row (a NaN or +inf logit, or all logits -inf, in student or teacher) is
 * left out of the mean, gets group_loss NaN and zero gradient rows, and is
 * counted in *info.  No valid group: loss 0, gradient 0.
 * Gradient: d loss / d C_g = P_g / G_valid (the plan held fixed), then
 * through the cost and the softmax of s / tau.
 * Always start from kdl_sinkd_args_init().
 */
typedef struct kdl_sinkd_args {
    size_t struct_size;         /* = sizeof(kdl_sinkd_args_t), set by init               */
    int64_t rows;               /* N >= 0, a multiple of the group size                  */
    int64_t vocab;              /* V >= 1                                                */

    const void *student;        /* [N, ld_student]                                       */
    int64_t ld_student;         /* >= V                                                  */
    kdl_dtype_t student_dtype;  /* F32, F16, BF16 (F64: reference)                       */
    const void *teacher;        /* [N, ld_teacher]                                       */
    int64_t ld_teacher;
    kdl_dtype_t teacher_dtype;

    void *grad;                 /* optional [N, ld_grad]: d loss / d student logits      */
    int64_t ld_grad;            /* >= V when grad is given                               */
    kdl_dtype_t grad_dtype;     /* student's dtype or F32 (F64: reference)               */

    kdl_dtype_t out_dtype;      /* F32 (default) or F64: loss, group_loss, plan, error   */
    void *loss;                 /* required [1]                                          */
    void *group_loss;           /* optional [G]: scale * <P_g, C_g> (NaN if invalid)     */
    void *plan;                 /* optional [G, n, n]                                    */
    int64_t *iterations;        /* optional [G]                                          */
    void *marginal_error;       /* optional [G]                                          */
    int64_t *info;              /* optional [1]: number of invalid groups                */
} kdl_sinkd_args_t;

void kdl_sinkd_args_init(kdl_sinkd_args_t *args);

/* Shared argument check (allow_f64 = 1 for the reference); writes nothing. */
kdl_status_t kdl_sinkd_validate(const kdl_sinkd_desc_t *desc, const kdl_sinkd_args_t *args,
                                int allow_f64);

/* ------------------------------------------------------------------ GPU API */
/* Workspace bytes kdl_sinkhorn needs for this problem (reads the host size
 * arrays, nothing on the device). */
kdl_status_t kdl_sinkhorn_workspace_size(kdl_handle_t handle, const kdl_sinkhorn_desc_t *desc,
                                         const kdl_sinkhorn_args_t *args, size_t *bytes);

/*
 * Batched Sinkhorn on the handle's stream; device pointers (except the host
 * size arrays).  Strict FP32 (cuBLAS default math, no TF32), deterministic.
 * A problem whose input is not finite (a NaN or inf cost or point, a NaN or
 * +inf log-weight, or all log-weights -inf) gets value and marginal_error
 * NaN, iterations 0, and is counted in *info; the others are unaffected and
 * the call returns SUCCESS (the check is on the device: no host sync).
 */
kdl_status_t kdl_sinkhorn(kdl_handle_t handle, const kdl_sinkhorn_desc_t *desc,
                          const kdl_sinkhorn_args_t *args, void *workspace, size_t workspace_bytes);

kdl_status_t kdl_sinkd_workspace_size(kdl_handle_t handle, const kdl_sinkd_desc_t *desc,
                                      const kdl_sinkd_args_t *args, size_t *bytes);

/* SinKD loss and (optionally) gradient; device pointers; asynchronous. */
kdl_status_t kdl_sinkd(kdl_handle_t handle, const kdl_sinkd_desc_t *desc, const kdl_sinkd_args_t *args,
                       void *workspace, size_t workspace_bytes);

/* -------------------------------------------------------------- reference */
/*
 * Float64 CPU reference of kdl_sinkhorn, host pointers.  Scans the inputs
 * first: any non-finite cost or point, a NaN or +inf log-weight, or all
 * log-weights of a side -inf returns KDL_STATUS_NONFINITE_INPUT and writes
 * nothing (the GPU call flags the problem instead; see above).  Allocates
 * host scratch (KDL_STATUS_ALLOC_FAILED).  info, if given, is set to 0.
 */
kdl_status_t kdl_ref_sinkhorn(const kdl_sinkhorn_desc_t *desc, const kdl_sinkhorn_args_t *args);

/* Float64 CPU reference of kdl_sinkd, host pointers. */
kdl_status_t kdl_ref_sinkd(const kdl_sinkd_desc_t *desc, const kdl_sinkd_args_t *args);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_OT_H */
