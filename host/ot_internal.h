/*
 * host/ot_internal.h - helpers shared by the Sinkhorn/SinKD reference, the
 * GPU wrapper and the kernels (not installed): packed-size totals, the
 * eps-scaling schedule (one definition, host and device), the SinKD group
 * size, and the float64 single-problem solver the references share.
 */
#ifndef KDLOSS_HOST_OT_INTERNAL_H
#define KDLOSS_HOST_OT_INTERNAL_H

#include <math.h>
#include <stdint.h>

#include "kdloss/kdloss_ot.h"

#if defined(__CUDACC__)
#define KDL_OT_HD __host__ __device__
#else
#define KDL_OT_HD
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Totals over the batch of a Sinkhorn call. */
typedef struct kdl_ot_totals {
    int64_t rows, cols;  /* sum n_b, sum m_b        */
    int64_t nm, nn, mm;  /* sum n_b m_b, n_b^2, m_b^2 */
    int64_t max_n, max_m, max_nm;
} kdl_ot_totals_t;

#ifndef __CUDACC__
/* Sizes of every problem checked (>= 1, < 2^31) and summed without overflow;
 * BAD_SIZE / SIZE_OVERFLOW with a last-error detail otherwise. */
kdl_status_t kdl_ot_totals(const kdl_sinkhorn_args_t *a, kdl_ot_totals_t *t);

/* SinKD rows per group: group_size, or all rows when it is 0. */
int64_t kdl_sinkd_group(const kdl_sinkd_desc_t *d, const kdl_sinkd_args_t *a);
#endif

/*
 * eps-scaling schedule of one problem.  With scaling on and a finite
 * diameter D = max C - min C > eps, the annealing stages are
 *     eps_s = D * factor^(first + s),  s = 0 .. stages-1,
 * all > eps, each run for stage_iter iterations, then the final stage at
 * eps.  Without a cap, first = 0 and stages = the number of k >= 0 with
 * D factor^k > eps.  The annealing may use at most max_iter - 1 iterations
 * (the final stage keeps at least one): when the full schedule is longer,
 * the largest eps are dropped (first > 0).  D <= eps, D = 0 or D not finite:
 * no annealing.
 */
typedef struct kdl_ot_schedule {
    double diameter, factor, eps;
    int64_t stages, first, stage_iter;
} kdl_ot_schedule_t;

/* D factor^n, the eps of annealing stage n.  factor^n alone underflows to 0
 * for a large n (a diameter of 7e67 annealed down to eps = 1e-300 at factor
 * 0.5 needs n near 1220, and 0.5^1220 < 2^-1074) although the product is an
 * ordinary double (docs/hardening.md F10); in that case the product is
 * formed in log space. */
KDL_OT_HD static inline double kdl_ot_stage_eps(double diameter, double factor, int64_t n)
{
    double p = pow(factor, (double)n);
    if (p > 0 && p * diameter > 0) return diameter * p;
    return exp(log(diameter) + (double)n * log(factor));
}

KDL_OT_HD static inline kdl_ot_schedule_t kdl_ot_schedule_make(double diameter, double eps, int on,
                                                               double factor, int64_t stage_iter,
                                                               int64_t max_iter)
{
    kdl_ot_schedule_t s;
    s.diameter = diameter;
    s.factor = factor;
    s.eps = eps;
    s.stages = 0;
    s.first = 0;
    s.stage_iter = stage_iter > 0 ? stage_iter : 1;
    if (!on || !(diameter > eps) || !(diameter < INFINITY) || !(factor > 0 && factor < 1)) return s;
    /* full = the smallest k with D factor^k <= eps: log(eps/D)/log(factor)
     * rounded up, then corrected by at most a few steps for rounding */
    /* (log eps - log D), not log(eps / D): the quotient underflows to 0
     * (eps = 1e-300, D = 7e67) and the schedule became 10^15 stages long,
     * every kept stage at eps 0 (docs/hardening.md F10) */
    double sd = (log(eps) - log(diameter)) / log(factor); /* > 0 */
    int64_t full;
    if (!(sd < 1e15)) {
        full = (int64_t)1e15; /* far beyond any cap */
    } else {
        full = (int64_t)ceil(sd);
        if (full < 1) full = 1;
        for (int t = 0; t < 4 && full > 1 && kdl_ot_stage_eps(diameter, factor, full - 1) <= eps; t++) full--;
        for (int t = 0; t < 4 && kdl_ot_stage_eps(diameter, factor, full) > eps; t++) full++;
    }
    int64_t cap = (max_iter - 1) / s.stage_iter;
    if (cap < 0) cap = 0;
    s.stages = full < cap ? full : cap;
    s.first = full - s.stages;
    return s;
}

/* eps of iteration it (1-based). */
KDL_OT_HD static inline double kdl_ot_schedule_eps(const kdl_ot_schedule_t *s, int64_t it)
{
    int64_t k = (it - 1) / s->stage_iter;
    if (k < s->stages) {
        double e = kdl_ot_stage_eps(s->diameter, s->factor, s->first + k);
        return e > s->eps ? e : s->eps; /* a stage is never below the final eps (nor 0) */
    }
    return s->eps;
}

/* Iterations of the annealing stages (the final stage starts after them). */
KDL_OT_HD static inline int64_t kdl_ot_schedule_len(const kdl_ot_schedule_t *s)
{
    return s->stages * s->stage_iter;
}

/* 1 when the stopping test runs after iteration it. */
KDL_OT_HD static inline int kdl_ot_check_due(const kdl_ot_schedule_t *s, int64_t it, double tol,
                                             int64_t check_every)
{
    int64_t c = it - kdl_ot_schedule_len(s);
    return tol > 0 && c >= 1 && c % check_every == 0;
}

#ifndef __CUDACC__
/*
 * The float64 solver of one problem (references only).  C [n*m] row-major;
 * la [n], lb [m] log-weights (NULL: uniform); g_init / f_init optional warm
 * start.  Writes f [n], g [m], *iters, *err (final row-marginal L1 error) and
 * *value (TRANSPORT or DUAL as asked).  P is not stored; see
 * kdl_ref_ot_plan.  Returns ALLOC_FAILED or SUCCESS.
 */
typedef struct kdl_ref_ot_problem {
    int64_t n, m;
    const double *C, *la, *lb, *f_init, *g_init;
} kdl_ref_ot_problem_t;

typedef struct kdl_ref_ot_solver {
    double eps, tol, factor;
    int64_t max_iter, check_every, stage_iter;
    int eps_scaling;
    kdl_ot_value_t value;
} kdl_ref_ot_solver_t;

kdl_status_t kdl_ref_ot_solve(const kdl_ref_ot_solver_t *s, const kdl_ref_ot_problem_t *p, double *f,
                              double *g, int64_t *iters, double *err, double *value);

/* P_ij = exp(la_i + lb_j + (f_i + g_j - C_ij)/eps) into P [n*m]. */
void kdl_ref_ot_plan(const kdl_ref_ot_problem_t *p, double eps, const double *f, const double *g,
                     double *P);
#endif

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_HOST_OT_INTERNAL_H */
