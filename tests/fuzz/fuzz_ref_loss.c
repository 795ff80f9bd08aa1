/*
 * tests/fuzz/fuzz_ref_loss.c - libFuzzer target: kdl_ref_loss_forward_backward
 * on arbitrary small problems (descriptor, sizes, strides, dtypes, optional
 * outputs, labels, logits with NaN/inf/subnormals/huge values).
 *
 * Build: cmake -DKDL_FUZZ=ON with CC=clang (tests/fuzz/CMakeLists.txt);
 * run:   scripts/fuzz.sh, or build-fuzz/tests/fuzz/fuzz_ref_loss CORPUS_DIR.
 *
 * Input layout (bytes past the end read as 0):
 *   [0] divergence (byte % 10: 8, 9 are unknown enums)
 *   [1] reduction (byte % 4), head rule ((byte >> 2) % 4)
 *   [2] student dtype, [3] teacher dtype, [4] grad dtype, [5] out dtype
 *       (each byte % 5: 4 is an unknown dtype)
 *   [6] N = byte % 9     [7] V = 1 + byte % 48
 *   [8] extra stride of student, teacher, grad (2 bits each)
 *   [9] flags: 1 grad, 2 labels, 4 stats, 8 info, 16 valid_rows,
 *       32 NULL loss, 64 NULL student/teacher, 128 logits table-coded
 *   then temperature, scale, alpha, beta, mu (pick_param: one byte, maybe
 *   8 more), top_k byte, ignore_index byte, labels (N bytes if flagged),
 *   then the student and teacher matrices (raw bits of their dtype, or one
 *   table-coded byte per element).
 *
 * Oracle (abort on violation):
 *   - the status is a known value; a failure leaves a last-error detail and
 *     every output byte untouched (outputs are pre-filled with a sentinel);
 *   - SUCCESS implies the descriptor was in range (an independent check);
 *   - SUCCESS: info / valid_rows equal the rows this file classifies as
 *     invalid / valid (DESIGN section 1); ignored rows have loss 0 and a zero
 *     gradient; invalid rows have loss NaN (reduction NONE) and a zero
 *     gradient; a valid row's loss is never NaN; where a loss is finite its
 *     gradient holds no NaN (README: only an infinite loss may give inf/NaN
 *     gradient entries); a reduced loss (SUM, MEAN) is never NaN, and 0 when
 *     no row is valid; valid rows have non-NaN statistics and a head size in
 *     [1, V].
 * Stride padding of the gradient (columns V..ld_grad) must stay untouched.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kdloss/kdloss_ref.h"
#include "fuzz_check.h"

#define SENTINEL 0xA5

typedef struct src {
    const uint8_t *p;
    size_t n;
} src_t;

static uint8_t u8(src_t *s)
{
    if (!s->n) return 0;
    s->n--;
    return *s->p++;
}

static void take(src_t *s, void *dst, size_t k)
{
    unsigned char *d = (unsigned char *)dst;
    for (size_t i = 0; i < k; i++) d[i] = u8(s);
}

/* A descriptor parameter: ordinary and edge values from a table, a grid of
 * ordinary values, or any 8-byte double. */
static double pick_param(src_t *s)
{
    static const double table[] = {1.0,     0.5,     2.0,          0.1,       0.9,      0.0,
                                   -0.0,    -1.0,    1e-300,       1e300,     4.9e-324, DBL_MAX,
                                   0x1p-53, 0x1p-1074, 1 - 0x1p-53, NAN,      INFINITY, -INFINITY,
                                   1e-7,    100.0,   0.999999,     1e-30,     1e30,     0.25};
    const uint8_t b = u8(s);
    const size_t nt = sizeof table / sizeof table[0];
    if (b < nt) return table[b];
    if (b < 250) return (double)(b - nt) / 64.0;
    double x;
    take(s, &x, sizeof x);
    return x;
}

/* A logit, table-coded: special values and a grid of ordinary ones. */
static double coded_logit(uint8_t b)
{
    static const double table[] = {-INFINITY, INFINITY, NAN,    0.0,     -0.0,    1e30,  -1e30,
                                   88.8,      -88.8,    709.0,  -745.0,  65504.0, 1e-40, 3.4e38,
                                   -3.4e38,   1e300,    -1e300, 1e-310,  700.0,   -700.0};
    const size_t nt = sizeof table / sizeof table[0];
    if (b < nt) return table[b];
    return ((double)b - 137.0) / 8.0;
}

static int known_status(kdl_status_t st)
{
    return st == KDL_STATUS_SUCCESS || (st >= 1000 && st <= 1018) || (st >= 2000 && st <= 2002) ||
           (st >= 3000 && st <= 3005) || st == 4000;
}

/* The problem being checked, printed when a check fails. */
static const kdl_loss_desc_t *cur_d;
static const kdl_loss_args_t *cur_a;
static const void *cur_s, *cur_t;

static void dump_problem(void)
{
    const kdl_loss_desc_t *d = cur_d;
    const kdl_loss_args_t *a = cur_a;
    if (!d || !a) return;
    fprintf(stderr, "  %s %s rule %d tau %.17g scale %.17g alpha %.17g beta %.17g mu %.17g top_k %lld\n",
            kdl_divergence_name(d->divergence), kdl_reduction_name(d->reduction), (int)d->head_rule, d->temperature,
            d->scale, d->alpha, d->beta, d->mu, (long long)d->top_k);
    fprintf(stderr, "  N %lld V %lld ld %lld/%lld/%lld dtypes s %s t %s g %s out %s grad %s labels %s\n",
            (long long)a->rows, (long long)a->vocab, (long long)a->ld_student, (long long)a->ld_teacher,
            (long long)a->ld_grad, kdl_dtype_name(a->student_dtype), kdl_dtype_name(a->teacher_dtype),
            kdl_dtype_name(a->grad_dtype), kdl_dtype_name(a->out_dtype), a->grad ? "yes" : "no",
            a->labels ? "yes" : "no");
    for (int64_t i = 0; i < a->rows; i++) {
        fprintf(stderr, "  row %lld%s s:", (long long)i,
                a->labels && a->labels[i] == d->ignore_index ? " (ignored)" : "");
        for (int64_t v = 0; v < a->vocab; v++)
            fprintf(stderr, " %.9g", kdl_load_as_double(cur_s, a->student_dtype, i * a->ld_student + v));
        fprintf(stderr, "\n           t:");
        for (int64_t v = 0; v < a->vocab; v++)
            fprintf(stderr, " %.9g", kdl_load_as_double(cur_t, a->teacher_dtype, i * a->ld_teacher + v));
        fprintf(stderr, "\n");
    }
}

#define CHECK(cond, ...) FZ_CHECK("fuzz_ref_loss", dump_problem(), cond, __VA_ARGS__)

/* An output buffer with a sentinel fill and a copy to compare against. */
typedef struct obuf {
    void *p;
    size_t bytes;
} obuf_t;

static void *obuf_make(obuf_t *o, size_t bytes)
{
    o->bytes = bytes;
    o->p = malloc(bytes ? bytes : 1);
    if (!o->p) abort();
    memset(o->p, SENTINEL, bytes ? bytes : 1);
    return o->p;
}

static int obuf_untouched(const obuf_t *o)
{
    const unsigned char *c = (const unsigned char *)o->p;
    for (size_t i = 0; i < o->bytes; i++)
        if (c[i] != SENTINEL) return 0;
    return 1;
}

enum { ROW_VALID = 0, ROW_IGNORED = 1, ROW_INVALID = 2 };

static int strict_mode(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("KDL_FUZZ_STRICT");
        v = e && e[0] == '1';
    }
    return v;
}

/* Inputs that hit a reported, not yet fixed, NaN issue of the reference
 * (docs/hardening.md, "Findings"); NULL when none applies. */
static const char *known_issue(const kdl_loss_desc_t *d, const kdl_loss_args_t *a, const void *S, const void *T)
{
    return NULL;
}
enum { O_LOSS, O_GRAD, O_FKL, O_RKL, O_GH, O_GT, O_WH, O_WT, O_HS, O_INFO, O_VALID, O_COUNT };

static size_t esize(kdl_dtype_t t)
{
    size_t e = kdl_dtype_size(t);
    return e ? e : 1; /* unknown dtype: buffers still allocated, the call must refuse */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    src_t s = {data, size};
    kdl_loss_desc_t d;
    kdl_loss_args_t a;
    kdl_loss_desc_init(&d);
    kdl_loss_args_init(&a);

    d.divergence = (kdl_divergence_t)(u8(&s) % 10);
    uint8_t b = u8(&s);
    d.reduction = (kdl_reduction_t)(b % 4);
    d.head_rule = (kdl_head_rule_t)((b >> 2) % 4);
    a.student_dtype = (kdl_dtype_t)(u8(&s) % 5);
    a.teacher_dtype = (kdl_dtype_t)(u8(&s) % 5);
    a.grad_dtype = (kdl_dtype_t)(u8(&s) % 5);
    a.out_dtype = (kdl_dtype_t)(u8(&s) % 5);
    const int64_t N = u8(&s) % 9, V = 1 + u8(&s) % 48;
    b = u8(&s);
    a.rows = N;
    a.vocab = V;
    a.ld_student = V + (b & 3);
    a.ld_teacher = V + ((b >> 2) & 3);
    a.ld_grad = V + ((b >> 4) & 3);
    const uint8_t flags = u8(&s);
    d.temperature = pick_param(&s);
    d.scale = pick_param(&s);
    d.alpha = pick_param(&s);
    d.beta = pick_param(&s);
    d.mu = pick_param(&s);
    d.top_k = (int64_t)(u8(&s) % (V + 3)) - 1; /* -1 .. V+1 */
    static const int64_t ignore_values[] = {-100, 0, 1, INT64_MIN, INT64_MAX};
    d.ignore_index = ignore_values[u8(&s) % 5];

    int64_t *labels = NULL;
    if (flags & 2) {
        labels = (int64_t *)malloc((size_t)(N ? N : 1) * sizeof *labels);
        if (!labels) abort();
        for (int64_t i = 0; i < N; i++) {
            uint8_t l = u8(&s);
            labels[i] = (l % 4 == 0) ? d.ignore_index : (int64_t)l - 128;
        }
        a.labels = labels;
    }

    /* Inputs: exactly (N-1)*ld + V elements, so ASan sees any read past a row. */
    const size_t es = esize(a.student_dtype), et = esize(a.teacher_dtype);
    const size_t ns = N ? (size_t)((N - 1) * a.ld_student + V) : 0;
    const size_t nt = N ? (size_t)((N - 1) * a.ld_teacher + V) : 0;
    unsigned char *S = (unsigned char *)malloc(ns * es + 1), *T = (unsigned char *)malloc(nt * et + 1);
    if (!S || !T) abort();
    const int coded = (flags & 128) != 0;
    struct {
        unsigned char *buf;
        size_t n, e;
        kdl_dtype_t t;
    } in[2] = {{S, ns, es, a.student_dtype}, {T, nt, et, a.teacher_dtype}};
    for (int k = 0; k < 2; k++) {
        if (coded && kdl_dtype_size(in[k].t)) {
            for (size_t i = 0; i < in[k].n; i++) kdl_store_from_double(in[k].buf, in[k].t, (int64_t)i, coded_logit(u8(&s)));
        } else {
            take(&s, in[k].buf, in[k].n * in[k].e);
        }
    }
    a.student = (flags & 64) ? NULL : S;
    a.teacher = (flags & 64) ? NULL : T;

    /* Outputs, each pre-filled with the sentinel. */
    obuf_t o[O_COUNT];
    memset(o, 0, sizeof o);
    const size_t eo = esize(a.out_dtype), eg = esize(a.grad_dtype);
    const size_t nloss = d.reduction == KDL_REDUCTION_NONE ? (size_t)N : 1;
    const size_t ngrad = N ? (size_t)(N * a.ld_grad) : 0; /* includes the padding of the last row */
    void *loss = obuf_make(&o[O_LOSS], nloss * eo);
    a.loss = (flags & 32) ? NULL : loss;
    void *grad = obuf_make(&o[O_GRAD], ngrad * eg);
    if (flags & 1) a.grad = grad;
    void **stats[] = {&a.stat_fkl, &a.stat_rkl, &a.stat_g_head, &a.stat_g_tail, &a.stat_w_head, &a.stat_w_tail};
    for (int k = 0; k < 6; k++) {
        void *p = obuf_make(&o[O_FKL + k], (size_t)N * eo);
        if (flags & 4) *stats[k] = p;
    }
    int64_t *hs = (int64_t *)obuf_make(&o[O_HS], (size_t)N * sizeof(int64_t));
    if (flags & 4) a.stat_head_size = hs;
    int64_t *info = (int64_t *)obuf_make(&o[O_INFO], sizeof(int64_t));
    if (flags & 8) a.info = info;
    int64_t *valid = (int64_t *)obuf_make(&o[O_VALID], sizeof(int64_t));
    if (flags & 16) a.valid_rows = valid;

    const kdl_status_t st = kdl_ref_loss_forward_backward(&d, &a);
    cur_d = &d;
    cur_a = &a;
    cur_s = S;
    cur_t = T;
    CHECK(known_status(st), "status %d", (int)st);

    if (st != KDL_STATUS_SUCCESS) {
        CHECK(kdl_get_last_error()[0] != '\0', "%s without detail", kdl_status_string(st));
        for (int k = 0; k < O_COUNT; k++) CHECK(obuf_untouched(&o[k]), "output %d written on %s", k, kdl_status_string(st));
    } else {
        /* Independent range check of what was accepted. */
        CHECK(d.temperature > 0 && isfinite(d.temperature), "tau %g accepted", d.temperature);
        CHECK(isfinite(d.scale), "scale %g accepted", d.scale);
        CHECK(d.alpha >= 0 && d.alpha < 1, "alpha %g accepted", d.alpha);
        CHECK(d.beta > 0 && d.beta < 1, "beta %g accepted", d.beta);
        CHECK(d.mu > 0 && d.mu < 1, "mu %g accepted", d.mu);
        CHECK(d.top_k >= 1 && d.top_k <= V, "top_k %lld accepted", (long long)d.top_k);
        CHECK((unsigned)d.divergence < KDL_DIV_COUNT_ && (unsigned)d.reduction < KDL_REDUCTION_COUNT_ &&
                  (unsigned)d.head_rule < KDL_HEAD_COUNT_,
              "enum accepted");
        CHECK(a.out_dtype == KDL_DTYPE_F32 || a.out_dtype == KDL_DTYPE_F64, "out dtype %d accepted", (int)a.out_dtype);
        CHECK(kdl_dtype_size(a.student_dtype) && kdl_dtype_size(a.teacher_dtype), "dtype accepted");
        CHECK(N == 0 || (a.student && a.teacher), "NULL input accepted");

        /* Rows as DESIGN section 1 classifies them. */
        int64_t n_valid = 0, n_invalid = 0;
        int state[9];
        for (int64_t i = 0; i < N; i++) {
            if (labels && labels[i] == d.ignore_index) {
                state[i] = ROW_IGNORED;
                continue;
            }
            int bad = 0, s_fin = 0, t_fin = 0;
            for (int64_t v = 0; v < V; v++) {
                double x = kdl_load_as_double(S, a.student_dtype, i * a.ld_student + v);
                double y = kdl_load_as_double(T, a.teacher_dtype, i * a.ld_teacher + v);
                bad |= isnan(x) || isnan(y) || x == INFINITY || y == INFINITY;
                s_fin |= x != -INFINITY;
                t_fin |= y != -INFINITY;
            }
            state[i] = (bad || !s_fin || !t_fin) ? ROW_INVALID : ROW_VALID;
            n_valid += state[i] == ROW_VALID;
            n_invalid += state[i] == ROW_INVALID;
        }
        if (a.info) CHECK(*info == n_invalid, "info %lld, expected %lld", (long long)*info, (long long)n_invalid);
        if (a.valid_rows) CHECK(*valid == n_valid, "valid_rows %lld, expected %lld", (long long)*valid, (long long)n_valid);

        /* Known issues (reported; docs/hardening.md): skipped unless
         * KDL_FUZZ_STRICT=1 is set in the environment. */
        const char *known = known_issue(&d, &a, S, T);
        const int gate = known && !strict_mode();
#define CHECK_NAN(cond, ...) \
    do {                     \
        if (!gate) CHECK(cond, __VA_ARGS__); \
    } while (0)
        double reduced = 0;
        if (a.loss && d.reduction != KDL_REDUCTION_NONE) {
            reduced = kdl_load_as_double(loss, a.out_dtype, 0);
            CHECK_NAN(!isnan(reduced), "reduced loss NaN (%lld valid rows)", (long long)n_valid);
            if (n_valid == 0) CHECK(reduced == 0, "no valid rows, loss %g", reduced);
        }
        for (int64_t i = 0; i < N; i++) {
            double li = reduced;
            if (a.loss && d.reduction == KDL_REDUCTION_NONE) {
                li = kdl_load_as_double(loss, a.out_dtype, i);
                if (state[i] == ROW_IGNORED) CHECK(li == 0, "row %lld ignored, loss %g", (long long)i, li);
                if (state[i] == ROW_INVALID) CHECK(isnan(li), "row %lld invalid, loss %g", (long long)i, li);
                if (state[i] == ROW_VALID) CHECK_NAN(!isnan(li), "row %lld valid, loss NaN", (long long)i);
            }
            if (!a.grad) continue;
            for (int64_t v = 0; v < V; v++) {
                double g = kdl_load_as_double(grad, a.grad_dtype, i * a.ld_grad + v);
                if (state[i] != ROW_VALID)
                    CHECK(g == 0, "row %lld (state %d) grad[%lld] = %g", (long long)i, state[i], (long long)v, g);
                else if (a.loss && isfinite(li))
                    CHECK_NAN(!isnan(g), "row %lld loss %g finite, grad[%lld] NaN", (long long)i, li, (long long)v);
            }
            /* stride padding untouched */
            const unsigned char *gb = (const unsigned char *)grad;
            for (int64_t v = V; v < a.ld_grad; v++)
                for (size_t k = 0; k < eg; k++)
                    CHECK(gb[(size_t)(i * a.ld_grad + v) * eg + k] == SENTINEL, "grad padding written");
        }
        if (a.stat_fkl)
            for (int64_t i = 0; i < N; i++) {
                double f = kdl_load_as_double(a.stat_fkl, a.out_dtype, i);
                double r = kdl_load_as_double(a.stat_rkl, a.out_dtype, i);
                if (state[i] == ROW_VALID) CHECK_NAN(!isnan(f) && !isnan(r), "row %lld stats fkl %g rkl %g", (long long)i, f, r);
                if (state[i] == ROW_INVALID) CHECK(isnan(f) && isnan(r), "row %lld invalid, stats %g %g", (long long)i, f, r);
                if (state[i] == ROW_IGNORED) CHECK(f == 0 && r == 0, "row %lld ignored, stats %g %g", (long long)i, f, r);
                if (state[i] == ROW_VALID)
                    CHECK(hs[i] >= 1 && hs[i] <= V, "row %lld head size %lld", (long long)i, (long long)hs[i]);
            }
    }

    for (int k = 0; k < O_COUNT; k++) free(o[k].p);
    free(S);
    free(T);
    free(labels);
    cur_d = NULL;
    cur_a = NULL;
    return 0;
}
