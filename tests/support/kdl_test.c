/* tests/support/kdl_test.c - see kdl_test.h. */
#include "kdl_test.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "kdloss/kdloss.h"

kdl_tol_t kdl_tol_for(kdl_dtype_t t)
{
    kdl_tol_t tol;
    switch (t) {
    case KDL_DTYPE_F64: tol.rtol = 1e-12; tol.atol = 1e-13; break;
    case KDL_DTYPE_F32: tol.rtol = 1e-5; tol.atol = 1e-6; break;
    default: tol.rtol = 1e-3; tol.atol = 1e-4; break;
    }
    return tol;
}

size_t kdl_compare(const char *what, const double *got, const double *ref, size_t n, kdl_tol_t tol,
                   char *msg, size_t msg_len)
{
    size_t bad = 0;
    size_t first[4];
    int off = 0;
    for (size_t i = 0; i < n; i++) {
        double g = got[i], r = ref[i];
        int ok;
        if (isnan(r) || isnan(g))
            ok = isnan(r) && isnan(g);
        else if (isinf(r) || isinf(g))
            ok = g == r;
        else
            ok = fabs(g - r) <= tol.atol + tol.rtol * fabs(r);
        if (!ok) {
            if (bad < 4) first[bad] = i;
            bad++;
        }
    }
    if (msg && msg_len) {
        msg[0] = '\0';
        if (bad) {
            off = snprintf(msg, msg_len, "%s: %zu of %zu mismatch (rtol %g, atol %g); first:", what, bad,
                           n, tol.rtol, tol.atol);
            for (size_t k = 0; k < bad && k < 4 && off > 0 && (size_t)off < msg_len; k++)
                off += snprintf(msg + off, msg_len - (size_t)off, " [%zu] got %.17g ref %.17g;", first[k],
                                got[first[k]], ref[first[k]]);
        }
    }
    return bad;
}

void kdl_central_diff(kdl_fd_value_t value, void *ctx, double *x, int64_t n, double h, double *fd)
{
    for (int64_t k = 0; k < n; k++) {
        double x0 = x[k];
        x[k] = x0 + h;
        double up = value(ctx, x);
        x[k] = x0 - h;
        double dn = value(ctx, x);
        x[k] = x0;
        fd[k] = (up - dn) / (2 * h);
    }
}

const kdl_divergence_t kdl_all_divs[KDL_DIV_COUNT_] = {KDL_DIV_FKL, KDL_DIV_RKL, KDL_DIV_FKL_RKL, KDL_DIV_AKL,
                                                       KDL_DIV_JSD, KDL_DIV_TVD, KDL_DIV_SKL,     KDL_DIV_SRKL};

kdl_loss_desc_t kdl_test_desc(kdl_divergence_t div, kdl_reduction_t red)
{
    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    d.divergence = div;
    d.reduction = red;
    return d;
}

kdl_sinkhorn_args_t kdl_test_ot_args(int64_t batch, int64_t n, int64_t m)
{
    kdl_sinkhorn_args_t a;
    kdl_sinkhorn_args_init(&a);
    a.batch = batch;
    a.n = n;
    a.m = m;
    a.dtype = KDL_DTYPE_F64;
    return a;
}

/* The row fields the loss and SinKD argument structs share (same names). */
#define FILL_ROWS(a, N, V, ld, S, sdt, T, tdt, grad, gdt)                                                   \
    do {                                                                                                     \
        (a).rows = (N);                                                                                      \
        (a).vocab = (V);                                                                                     \
        (a).ld_student = (a).ld_teacher = (a).ld_grad = (ld);                                                \
        (a).student = (S);                                                                                   \
        (a).student_dtype = (sdt);                                                                           \
        (a).teacher = (T);                                                                                   \
        (a).teacher_dtype = (tdt);                                                                           \
        (a).grad = (grad);                                                                                   \
        (a).grad_dtype = (gdt);                                                                              \
    } while (0)

kdl_loss_args_t kdl_test_loss_args(int64_t N, int64_t V, int64_t ld, const void *S, kdl_dtype_t sdt, const void *T,
                                   kdl_dtype_t tdt, void *grad, kdl_dtype_t gdt, void *loss)
{
    kdl_loss_args_t a;
    kdl_loss_args_init(&a);
    FILL_ROWS(a, N, V, ld, S, sdt, T, tdt, grad, gdt);
    a.out_dtype = gdt;
    a.loss = loss;
    return a;
}

kdl_sinkd_args_t kdl_test_sinkd_args(int64_t N, int64_t V, int64_t ld, const void *S, kdl_dtype_t sdt, const void *T,
                                     kdl_dtype_t tdt, void *grad, kdl_dtype_t gdt)
{
    kdl_sinkd_args_t a;
    kdl_sinkd_args_init(&a);
    FILL_ROWS(a, N, V, ld, S, sdt, T, tdt, grad, gdt);
    return a;
}

uint64_t kdl_rng_next(kdl_rng_t *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double kdl_rng_uniform(kdl_rng_t *r) { return (double)(kdl_rng_next(r) >> 11) * 0x1.0p-53; }

double kdl_rng_normal(kdl_rng_t *r)
{
    double u1 = kdl_rng_uniform(r), u2 = kdl_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

void kdl_fill_logits(kdl_rng_t *r, double *x, int64_t n, double sigma)
{
    for (int64_t i = 0; i < n; i++) x[i] = sigma * kdl_rng_normal(r);
    int64_t outliers = n < 8 ? 1 : 4;
    for (int64_t k = 0; k < outliers; k++) x[kdl_rng_next(r) % (uint64_t)n] += 4.0 * sigma + 3.0;
}

void kdl_random_rows(uint64_t seed, double *x, int64_t n, double sigma)
{
    kdl_rng_t g = {seed};
    kdl_fill_logits(&g, x, n, sigma);
}

void kdl_fill_uniform(kdl_rng_t *r, double *x, int64_t n, double lo, double hi)
{
    for (int64_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * kdl_rng_uniform(r);
}

void kdl_fill_logw(kdl_rng_t *r, double *lw, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++) {
        lw[i] = 0.5 + kdl_rng_uniform(r);
        s += lw[i];
    }
    for (int64_t i = 0; i < n; i++) lw[i] = log(lw[i] / s);
}

void kdl_to_dtype(const double *src, void *dst, kdl_dtype_t t, int64_t n)
{
    for (int64_t i = 0; i < n; i++) kdl_store_from_double(dst, t, i, src[i]);
}

void kdl_from_dtype(const void *src, double *dst, kdl_dtype_t t, int64_t n)
{
    for (int64_t i = 0; i < n; i++) dst[i] = kdl_load_as_double(src, t, i);
}

int kdl_test_have_gpu(void) { return kdl_device_available(); }
