/*
 * tests/fuzz/fuzz_util.h - pieces shared by fuzz_ref_ot.c and fuzz_ref_ext.c:
 * the byte reader, parameter and data decoders with edge values, sentinel
 * output buffers and the set of known statuses.  (fuzz_ref_loss.c keeps its
 * own copies: its corpus depends on its exact decoding.)
 *
 * Everything here is static: each target includes it once.
 */
#ifndef KDL_FUZZ_UTIL_H
#define KDL_FUZZ_UTIL_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdloss/kdloss_types.h"

#define FZ_SENTINEL 0xA5

typedef struct fz_src {
    const uint8_t *p;
    size_t n;
} fz_src_t;

/* Next byte; 0 past the end. */
static uint8_t fz_u8(fz_src_t *s)
{
    if (!s->n) return 0;
    s->n--;
    return *s->p++;
}

static void fz_take(fz_src_t *s, void *dst, size_t k)
{
    unsigned char *d = (unsigned char *)dst;
    for (size_t i = 0; i < k; i++) d[i] = fz_u8(s);
}

/* A descriptor parameter: ordinary and edge values from a table, a grid of
 * ordinary values, or any 8-byte double. */
static double fz_param(fz_src_t *s)
{
    static const double table[] = {1.0,   0.5,     2.0,       0.1,         0.9,      0.0,      -0.0,     -1.0,
                                   1e-300, 1e300,  4.9e-324,  DBL_MAX,     0x1p-53,  0x1p-1074, 1 - 0x1p-53,
                                   NAN,   INFINITY, -INFINITY, 1e-7,       100.0,    0.999999, 1e-30,    1e30,
                                   0.25,  1e-3,    1e-12,     1e-6,        1e-200,   -1e-300};
    const uint8_t b = fz_u8(s);
    const size_t nt = sizeof table / sizeof table[0];
    if (b < nt) return table[b];
    if (b < 250) return (double)(b - nt) / 64.0;
    double x;
    fz_take(s, &x, sizeof x);
    return x;
}

/* A data value, table-coded: specials, huge and tiny magnitudes, and a grid
 * of ordinary values (-8.5 .. 7.4 in steps of 1/16). */
static double fz_coded(uint8_t b)
{
    static const double table[] = {-INFINITY, INFINITY, NAN,     0.0,     -0.0,   1e30,     -1e30,
                                   88.8,      -88.8,    709.0,   -745.0,  65504.0, 1e-40,   3.4e38,
                                   -3.4e38,   1e300,    -1e300,  1e-310,  700.0,  -700.0,   DBL_MAX,
                                   -DBL_MAX,  1e10,     -1e10};
    const size_t nt = sizeof table / sizeof table[0];
    if (b < nt) return table[b];
    return ((double)b - 137.0) / 16.0;
}

static int fz_known_status(kdl_status_t st)
{
    return st == KDL_STATUS_SUCCESS || (st >= 1000 && st <= 1019) || (st >= 2000 && st <= 2002) ||
           (st >= 3000 && st <= 3005) || st == 4000;
}

/* A sentinel-filled output buffer. */
typedef struct fz_obuf {
    void *p;
    size_t bytes;
} fz_obuf_t;

static void *fz_obuf_make(fz_obuf_t *o, size_t bytes)
{
    o->bytes = bytes;
    o->p = malloc(bytes ? bytes : 1);
    if (!o->p) abort();
    memset(o->p, FZ_SENTINEL, bytes ? bytes : 1);
    return o->p;
}

static int fz_obuf_untouched(const fz_obuf_t *o)
{
    const unsigned char *c = (const unsigned char *)o->p;
    for (size_t i = 0; i < o->bytes; i++)
        if (c[i] != FZ_SENTINEL) return 0;
    return 1;
}

static void fz_obuf_free(fz_obuf_t *o)
{
    free(o->p);
    o->p = NULL;
    o->bytes = 0;
}

/* A dtype byte: mostly the four real ones, sometimes an unknown value. */
static kdl_dtype_t fz_dtype(uint8_t b) { return (kdl_dtype_t)(b % 5); }

static size_t fz_esize(kdl_dtype_t t)
{
    switch (t) {
    case KDL_DTYPE_F16:
    case KDL_DTYPE_BF16: return 2;
    case KDL_DTYPE_F32: return 4;
    case KDL_DTYPE_F64: return 8;
    }
    return 1; /* unknown dtype: buffers still allocated, the call must refuse */
}

/* |a - b| <= atol + rtol max(|a|, |b|); equal infinities and two NaNs agree. */
static int fz_close(double a, double b, double rtol, double atol)
{
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    if (isinf(a) || isinf(b)) return a == b;
    double m = fabs(a) > fabs(b) ? fabs(a) : fabs(b);
    return fabs(a - b) <= atol + rtol * m;
}

/* KDL_FUZZ_SHOW=1: one line per call with its status (to see what a corpus
 * reaches: build-fuzz/tests/fuzz/fuzz_ref_ot -runs=0 DIR). */
static void fz_show(const char *what, kdl_status_t st)
{
    static int on = -1;
    if (on < 0) {
        const char *e = getenv("KDL_FUZZ_SHOW");
        on = e && e[0] == '1';
    }
    if (on) fprintf(stderr, "fuzz: %s -> %s\n", what, kdl_status_string(st));
}

#endif /* KDL_FUZZ_UTIL_H */
