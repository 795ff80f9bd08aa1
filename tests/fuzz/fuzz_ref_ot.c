/*
 * tests/fuzz/fuzz_ref_ot.c - libFuzzer target: the float64 Sinkhorn and SinKD
 * references (kdl_ref_sinkhorn, kdl_ref_sinkd) on small problems decoded
 * from the input: sizes (ragged, empty, negative), every descriptor field
 * (edge and non-finite values included), dtypes, optional inputs and outputs,
 * one deliberate bad argument, and the data (table-coded NaN / +-inf / huge /
 * tiny / ordinary values, or raw bits).
 *
 * Build: cmake -DKDL_FUZZ=ON with CC=clang (tests/fuzz/CMakeLists.txt);
 * run:   scripts/fuzz.sh fuzz_ref_ot, or build-fuzz/tests/fuzz/fuzz_ref_ot DIR.
 *
 * Input layout (bytes past the end read as 0):
 *   [0] bit 0: 0 Sinkhorn, 1 SinKD
 * Sinkhorn:
 *   [1] f1: 1 ragged, 2 points, 4 log_a, 8 log_b, 16 f_init, 32 g_init,
 *           64 debias, 128 self_yy_given
 *   [2] f2 (outputs): 1 iterations, 2 marginal_error, 4 f, 8 g, 16 plan,
 *           32 grad_x, 64 info, 128 self_yy buffer
 *   [3] f3: 1 eps_scaling, (>>1)&3 % 3 value (2: unknown), (>>3)&3 % 3
 *           metric (2: unknown), (>>5)&3 dtype (0 f64, 1 f32, 2 f16,
 *           3: next byte % 6, 4 and 5 unknown)
 *   [4] f4: 1 normalise log_a, 2 normalise log_b, 4 raw data bits
 *   batch (byte % 4; >= 250: negative), n, m (1 + byte % 5; 255: 0,
 *   254: -2), dim (1 + byte % 3; 255: 0), ragged sizes (one byte each, as n),
 *   epsilon, tol, eps_scaling_factor (fz_param), max_iter (1 + byte % 24;
 *   250..252: 0, -1, INT64_MIN), check_every (1 + byte % 6; 255: 0,
 *   254: -7), eps_stage_iter (1 + byte % 3; 255: 0), a mutation byte (< 40:
 *   one bad argument, list at `mutate_sinkhorn`), then the data: cost or
 *   x, y; log_a; log_b; f_init; g_init; cost_xx; cost_yy; self_yy.
 * SinKD:
 *   [1] flags: 1 grad, 2 group_loss, 4 plan, 8 iterations, 16 marginal_error,
 *       32 info, 64 NULL loss, 128 raw data bits
 *   [2..5] student, teacher, grad, out dtype (byte % 5; 4 unknown)
 *   N (byte % 7), V (1 + byte % 10), group_size (byte % 8 - 1), strides
 *   (2 bits each), metric (byte % 3), temperature, epsilon, tol, scale
 *   (fz_param), max_iter, check_every (as above), then the logits.
 *
 * Oracle (abort on violation; the decoded problem is printed):
 *   - the status is a known value; on failure a last-error detail is set and
 *     every output byte is untouched (sentinels), self_yy included;
 *   - a parameter status (BAD_EPSILON, BAD_TOLERANCE, BAD_ITERATIONS,
 *     BAD_SCHEDULE, BAD_TEMPERATURE, BAD_SCALE, BAD_GROUP, BAD_ENUM) names a
 *     parameter that is indeed out of range;
 *   - SUCCESS implies the parameters were in range (an independent check)
 *     and, for Sinkhorn, finite data (an independent scan); the status
 *     NONFINITE_INPUT implies that the scan finds a non-finite value;
 *     a deliberately bad argument never succeeds;
 *   - Sinkhorn SUCCESS: 1 <= iterations <= max_iter (= max_iter when tol = 0),
 *     a problem that stopped early has marginal_error <= tol; info 0;
 *     self_yy written only as an output of debias; with data of magnitude
 *     <= 1e100, eps times the log-weights <= 1e100 and every weight
 *     exp(log-weight) <= e^200 (f32: 1e15, 1e15, e^30; so the true
 *     potentials, weights and values lie well inside the output dtype's
 *     range): value, marginal_error, f, g, plan and grad_x never NaN, plan
 *     entries >= 0; TRANSPORT of non-negative costs >= 0; in the
 *     well-conditioned domain (potential scale / eps <= 1e6, eps >= 1e-280)
 *     the plan's
 *     columns sum to b, its row error equals marginal_error, and value
 *     equals <P, C> (TRANSPORT) or <a, f> + <b, g> (DUAL) recomputed here;
 *   - SinKD SUCCESS: info and the group classification equal an independent
 *     one; invalid groups: group_loss NaN, zero gradient rows; valid groups:
 *     group_loss not NaN and of the sign of scale, plan entries in
 *     [0, 1/n], loss = mean of the valid group losses (0 with none); no NaN
 *     in a valid group's gradient while |scale| <= 1e100; in the
 *     well-conditioned domain (eps >= 1e-5) the plan's columns sum to 1/n.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "internal.h"
#include "kdloss/kdloss_ref.h"
#include "fuzz_check.h"

/* ------------------------------------------------------------------ report */
static const kdl_sinkhorn_desc_t *cur_hd;
static const kdl_sinkhorn_args_t *cur_ha;
static const kdl_sinkd_desc_t *cur_kd;
static const kdl_sinkd_args_t *cur_ka;
static int cur_mutation = -1;

static void dump_vals(const char *name, const void *p, kdl_dtype_t t, int64_t count)
{
    if (!p || !kdl_dtype_size(t)) return;
    fprintf(stderr, "  %s:", name);
    for (int64_t k = 0; k < count && k < 64; k++) fprintf(stderr, " %.9g", kdl_load_as_double(p, t, k));
    fprintf(stderr, "\n");
}

static void dump_problem(void)
{
    if (cur_hd && cur_ha) {
        const kdl_sinkhorn_desc_t *d = cur_hd;
        const kdl_sinkhorn_args_t *a = cur_ha;
        fprintf(stderr,
                "  sinkhorn eps %.17g tol %.17g max_iter %lld check %lld scaling %d factor %.17g stage %lld value %d "
                "debias %d metric %d mutation %d\n",
                d->epsilon, d->tol, (long long)d->max_iter, (long long)d->check_every, d->eps_scaling,
                d->eps_scaling_factor, (long long)d->eps_stage_iter, (int)d->value, d->debias, (int)d->metric,
                cur_mutation);
        fprintf(stderr, "  B %lld n %lld m %lld ragged %d dim %lld dtype %d\n", (long long)a->batch,
                (long long)a->n, (long long)a->m, a->sizes_n != NULL, (long long)a->dim, (int)a->dtype);
        int64_t rows = 0, cols = 0, nm = 0;
        for (int64_t b = 0; b < a->batch && b < 8; b++) {
            int64_t n = a->sizes_n ? a->sizes_n[b] : a->n, m = a->sizes_m ? a->sizes_m[b] : a->m;
            if (n < 1 || m < 1) return;
            fprintf(stderr, "  problem %lld: %lld x %lld\n", (long long)b, (long long)n, (long long)m);
            rows += n, cols += m, nm += n * m;
        }
        dump_vals("cost", a->cost, a->dtype, nm);
        dump_vals("x", a->x, a->dtype, rows * a->dim);
        dump_vals("y", a->y, a->dtype, cols * a->dim);
        dump_vals("log_a", a->log_a, a->dtype, rows);
        dump_vals("log_b", a->log_b, a->dtype, cols);
        dump_vals("f_init", a->f_init, a->dtype, rows);
        dump_vals("g_init", a->g_init, a->dtype, cols);
        dump_vals("value", a->value, a->dtype, a->batch);
        dump_vals("marginal_error", a->marginal_error, a->dtype, a->batch);
        dump_vals("f", a->f, a->dtype, rows);
        dump_vals("g", a->g, a->dtype, cols);
        dump_vals("plan", a->plan, a->dtype, nm);
    }
    if (cur_kd && cur_ka) {
        const kdl_sinkd_desc_t *d = cur_kd;
        const kdl_sinkd_args_t *a = cur_ka;
        fprintf(stderr,
                "  sinkd tau %.17g eps %.17g tol %.17g max_iter %lld check %lld group %lld metric %d scale %.17g\n",
                d->temperature, d->epsilon, d->tol, (long long)d->max_iter, (long long)d->check_every,
                (long long)d->group_size, (int)d->metric, d->scale);
        fprintf(stderr, "  N %lld V %lld ld %lld/%lld/%lld dtypes %d %d %d %d\n", (long long)a->rows,
                (long long)a->vocab, (long long)a->ld_student, (long long)a->ld_teacher, (long long)a->ld_grad,
                (int)a->student_dtype, (int)a->teacher_dtype, (int)a->grad_dtype, (int)a->out_dtype);
        for (int64_t i = 0; i < a->rows && a->student && a->teacher; i++) {
            fprintf(stderr, "  row %lld s:", (long long)i);
            for (int64_t v = 0; v < a->vocab; v++)
                fprintf(stderr, " %.9g", kdl_load_as_double(a->student, a->student_dtype, i * a->ld_student + v));
            fprintf(stderr, "\n         t:");
            for (int64_t v = 0; v < a->vocab; v++)
                fprintf(stderr, " %.9g", kdl_load_as_double(a->teacher, a->teacher_dtype, i * a->ld_teacher + v));
            fprintf(stderr, "\n");
        }
    }
}

#define CHECK(cond, ...) FZ_CHECK("fuzz_ref_ot", dump_problem(), cond, __VA_ARGS__)

/* ------------------------------------------------------------- decoding */
static int64_t size_byte(uint8_t b)
{
    if (b == 255) return 0;
    if (b == 254) return -2;
    return 1 + b % 5;
}

static int64_t iter_byte(uint8_t b)
{
    if (b == 250) return 0;
    if (b == 251) return -1;
    if (b == 252) return INT64_MIN;
    return 1 + b % 24;
}

static int64_t check_byte(uint8_t b)
{
    if (b == 255) return 0;
    if (b == 254) return -7;
    return 1 + b % 6;
}

/* count values of dtype t into buf (elements off .. off+count), table-coded
 * or raw bits. */
static void fill(fz_src_t *s, void *buf, kdl_dtype_t t, int64_t off, int64_t count, int raw)
{
    const size_t e = fz_esize(t);
    if (raw || !kdl_dtype_size(t)) {
        fz_take(s, (unsigned char *)buf + (size_t)off * e, (size_t)count * e);
        return;
    }
    for (int64_t k = 0; k < count; k++) kdl_store_from_double(buf, t, off + k, fz_coded(fz_u8(s)));
}

/* Log-weights that sum to one: the log-softmax of count table-coded values
 * (-inf entries are zero weights; all -inf stays all -inf). */
static void fill_logw(fz_src_t *s, void *buf, kdl_dtype_t t, int64_t off, int64_t count)
{
    double v[8], mx = -INFINITY, sum = 0;
    for (int64_t k = 0; k < count; k++) {
        v[k] = fz_coded(fz_u8(s));
        if (isnan(v[k]) || v[k] == INFINITY || fabs(v[k]) > 1e3) v[k] = fmod(fabs(v[k]), 7.0);
        if (isnan(v[k])) v[k] = 0;
        if (v[k] > mx) mx = v[k];
    }
    for (int64_t k = 0; k < count; k++) sum += exp(v[k] - mx);
    for (int64_t k = 0; k < count; k++) kdl_store_from_double(buf, t, off + k, v[k] - mx - log(sum));
}

static void *alloc_in(int64_t count, kdl_dtype_t t)
{
    size_t bytes = (size_t)(count > 0 ? count : 1) * fz_esize(t);
    void *p = malloc(bytes);
    if (!p) abort();
    memset(p, 0, bytes);
    return p;
}

/* A log-weight vector of `total` entries: per problem a normalised one
 * (sizes[b], or `uniform` for every problem when sizes is NULL; a size
 * below 1 counts as 1) when `normalised`, else `total` raw or decoded values.
 * The order in which it reads the input is the corpus's encoding: keep it. */
static void *log_weights(fz_src_t *s, kdl_dtype_t dt, int64_t total, int normalised, int64_t B, const int64_t *sizes,
                         int64_t uniform, int raw)
{
    void *w = alloc_in(total, dt);
    if (!normalised) {
        fill(s, w, dt, 0, total, raw);
        return w;
    }
    int64_t off = 0;
    for (int64_t b = 0; b < (B > 0 ? B : 0); b++) {
        int64_t n = sizes ? sizes[b] : uniform;
        n = n > 0 ? n : 1;
        fill_logw(s, w, dt, off, n);
        off += n;
    }
    return w;
}

/* --------------------------------------------------------------- Sinkhorn */
enum { H_VALUE, H_ITERS, H_ERR, H_F, H_G, H_PLAN, H_GRAD, H_INFO, H_SELF, H_COUNT };

static double maxabs(const void *p, kdl_dtype_t t, int64_t off, int64_t count, int skip_ninf)
{
    double m = 0;
    for (int64_t k = 0; k < count; k++) {
        double x = kdl_load_as_double(p, t, off + k);
        if (skip_ninf && x == -INFINITY) continue;
        if (!(fabs(x) <= m)) m = fabs(x); /* NaN propagates */
    }
    return m;
}

static double maxpos(const void *p, kdl_dtype_t t, int64_t count)
{
    double m = -INFINITY;
    for (int64_t k = 0; k < count; k++) m = fmax(m, kdl_load_as_double(p, t, k));
    return m;
}

static int all_finite(const void *p, kdl_dtype_t t, int64_t off, int64_t count)
{
    for (int64_t k = 0; k < count; k++)
        if (!isfinite(kdl_load_as_double(p, t, off + k))) return 0;
    return 1;
}

static int logw_ok(const void *p, kdl_dtype_t t, int64_t off, int64_t count)
{
    int any = 0;
    for (int64_t k = 0; k < count; k++) {
        double x = kdl_load_as_double(p, t, off + k);
        if (isnan(x) || x == INFINITY) return 0;
        any |= x > -INFINITY;
    }
    return any;
}

static double pcost(kdl_ot_metric_t metric, const void *x, const void *y, kdl_dtype_t t, int64_t xi, int64_t yj,
                    int64_t dim)
{
    double c = 0;
    for (int64_t k = 0; k < dim; k++) {
        double u = kdl_load_as_double(x, t, xi * dim + k) - kdl_load_as_double(y, t, yj * dim + k);
        c += metric == KDL_OT_METRIC_L1 ? fabs(u) : u * u;
    }
    return c;
}

static void run_sinkhorn(fz_src_t *s)
{
    kdl_sinkhorn_desc_t d;
    kdl_sinkhorn_args_t a;
    kdl_sinkhorn_desc_init(&d);
    kdl_sinkhorn_args_init(&a);
    const uint8_t f1 = fz_u8(s), f2 = fz_u8(s), f3 = fz_u8(s), f4 = fz_u8(s);
    d.eps_scaling = f3 & 1;
    d.value = (kdl_ot_value_t)(((f3 >> 1) & 3) % 3);
    d.metric = (kdl_ot_metric_t)(((f3 >> 3) & 3) % 3);
    static const kdl_dtype_t dts[3] = {KDL_DTYPE_F64, KDL_DTYPE_F32, KDL_DTYPE_F16};
    const int dsel = (f3 >> 5) & 3;
    a.dtype = dsel < 3 ? dts[dsel] : (kdl_dtype_t)(fz_u8(s) % 6);
    d.debias = (f1 >> 6) & 1;
    a.self_yy_given = (f1 >> 7) & 1;
    const uint8_t bb = fz_u8(s);
    const int64_t B = bb < 250 ? bb % 4 : -1 - (int64_t)(bb - 250);
    a.batch = B;
    a.n = size_byte(fz_u8(s));
    a.m = size_byte(fz_u8(s));
    const uint8_t db = fz_u8(s);
    const int points = (f1 & 2) != 0;
    if (points) a.dim = db == 255 ? 0 : 1 + db % 3;
    int64_t sn[3], sm[3];
    const int ragged = (f1 & 1) && B > 0;
    if (ragged) {
        for (int64_t b = 0; b < B; b++) {
            sn[b] = size_byte(fz_u8(s));
            sm[b] = size_byte(fz_u8(s));
        }
        a.sizes_n = sn;
        a.sizes_m = sm;
    }
    d.epsilon = fz_param(s);
    d.tol = fz_param(s);
    d.eps_scaling_factor = fz_param(s);
    d.max_iter = iter_byte(fz_u8(s));
    d.check_every = check_byte(fz_u8(s));
    const uint8_t sb = fz_u8(s);
    d.eps_stage_iter = sb == 255 ? 0 : 1 + sb % 3;
    const uint8_t mut = fz_u8(s);
    const int mutation = mut < 40 ? mut % 10 : -1;

    /* sizes as the problem would have them (clamped to 1 for the buffers) */
    int sizes_ok = B >= 0;
    int64_t rows = 0, cols = 0, nm = 0, nn = 0, mm = 0;
    for (int64_t b = 0; b < (B > 0 ? B : 0); b++) {
        int64_t n = ragged ? sn[b] : a.n, m = ragged ? sm[b] : a.m;
        if (n < 1 || m < 1) sizes_ok = 0;
        if (n < 1) n = 1;
        if (m < 1) m = 1;
        rows += n, cols += m, nm += n * m, nn += n * n, mm += m * m;
    }
    const int64_t dim = points ? (a.dim > 0 ? a.dim : 1) : 0;
    const kdl_dtype_t dt = a.dtype;
    const int raw = (f4 & 4) != 0;

    /* inputs */
    void *cost = NULL, *x = NULL, *y = NULL, *la = NULL, *lb = NULL, *fi = NULL, *gi = NULL, *cxx = NULL,
         *cyy = NULL;
    if (points) {
        x = alloc_in(rows * dim, dt);
        y = alloc_in(cols * dim, dt);
        fill(s, x, dt, 0, rows * dim, raw);
        fill(s, y, dt, 0, cols * dim, raw);
    } else {
        cost = alloc_in(nm, dt);
        fill(s, cost, dt, 0, nm, raw);
    }
    const int known_dt = kdl_dtype_size(dt) != 0;
    if (f1 & 4) la = log_weights(s, dt, rows, (f4 & 1) && known_dt, B, ragged ? sn : NULL, a.n, raw);
    if (f1 & 8) lb = log_weights(s, dt, cols, (f4 & 2) && known_dt, B, ragged ? sm : NULL, a.m, raw);
    if (f1 & 16) {
        fi = alloc_in(rows, dt);
        fill(s, fi, dt, 0, rows, raw);
    }
    if (f1 & 32) {
        gi = alloc_in(cols, dt);
        fill(s, gi, dt, 0, cols, raw);
    }
    if (d.debias && !points) {
        cxx = alloc_in(nn, dt);
        fill(s, cxx, dt, 0, nn, raw);
        cyy = alloc_in(mm, dt);
        fill(s, cyy, dt, 0, mm, raw);
    }
    a.cost = cost;
    a.x = x;
    a.y = y;
    a.log_a = la;
    a.log_b = lb;
    a.f_init = fi;
    a.g_init = gi;
    a.cost_xx = cxx;
    a.cost_yy = cyy;

    /* outputs (self_yy: input when given, else an output) */
    fz_obuf_t o[H_COUNT];
    memset(o, 0, sizeof o);
    const size_t e = fz_esize(dt);
    const int64_t Bp = B > 0 ? B : 0;
    void *value = fz_obuf_make(&o[H_VALUE], (size_t)Bp * e);
    a.value = value;
    int64_t *iters = (int64_t *)fz_obuf_make(&o[H_ITERS], (size_t)Bp * 8);
    if (f2 & 1) a.iterations = iters;
    void *err = fz_obuf_make(&o[H_ERR], (size_t)Bp * e);
    if (f2 & 2) a.marginal_error = err;
    void *fo = fz_obuf_make(&o[H_F], (size_t)rows * e);
    if (f2 & 4) a.f = fo;
    void *go = fz_obuf_make(&o[H_G], (size_t)cols * e);
    if (f2 & 8) a.g = go;
    void *plan = fz_obuf_make(&o[H_PLAN], (size_t)nm * e);
    if (f2 & 16) a.plan = plan;
    void *grad = fz_obuf_make(&o[H_GRAD], (size_t)rows * (dim > 0 ? dim : 1) * e);
    if (f2 & 32) a.grad_x = grad;
    int64_t *info = (int64_t *)fz_obuf_make(&o[H_INFO], 8);
    if (f2 & 64) a.info = info;
    void *self = fz_obuf_make(&o[H_SELF], (size_t)Bp * e);
    if (a.self_yy_given) {
        fill(s, self, dt, 0, Bp, raw);
        a.self_yy = self;
    } else if (f2 & 128) {
        a.self_yy = self;
    }
    unsigned char self_copy[3 * 8];
    memcpy(self_copy, self, (size_t)Bp * e);

    /* one deliberate bad argument */
    double dummy[2] = {0, 0};
    int must_fail = 0;
    switch (mutation) {
    case 0: /* cost and points both */
        if (!a.cost) a.cost = dummy;
        else a.x = a.y = dummy;
        a.dim = 1;
        must_fail = 1;
        break;
    case 1: a.value = NULL; must_fail = 1; break;
    case 2: a.sizes_n = sn; a.sizes_m = NULL; must_fail = 1; break;
    case 3: if (!points) { a.grad_x = grad; must_fail = 1; } break;
    case 4: if (points && d.debias) { a.cost_xx = dummy; must_fail = 1; } break;
    case 5: a.cost = a.x = a.y = NULL; must_fail = 1; break;
    case 6: if (points) { a.y = NULL; must_fail = 1; } break;
    case 7: a.self_yy_given = 1; a.self_yy = NULL; must_fail = d.debias != 0; break;
    case 8: a.value = (char *)value + 1; must_fail = e > 1; break;
    case 9: if (!points && d.debias) { a.cost_xx = NULL; must_fail = 1; } break;
    default: break;
    }
    /* an empty batch checks the enums, parameters, the size-array pair and
     * the alignment only */
    if (B == 0 && mutation != 2 && mutation != 8) must_fail = 0;

    cur_hd = &d;
    cur_ha = &a;
    cur_mutation = mutation;
    const kdl_status_t st = kdl_ref_sinkhorn(&d, &a);
    fz_show("sinkhorn", st);
    CHECK(fz_known_status(st), "status %d", (int)st);
    if (must_fail) CHECK(st != KDL_STATUS_SUCCESS, "mutation %d accepted", mutation);

    /* independent scan of the data, as kdloss_ot.h defines non-finite input */
    int data_ok = 1;
    double mag = 0, lw = 0; /* largest magnitude of the data; of the finite log-weights */
    if (sizes_ok && known_dt && (a.cost || a.x)) {
        int64_t r0 = 0, c0 = 0, nm0 = 0, nn0 = 0, mm0 = 0;
        const int need_yy = d.debias && !a.self_yy_given;
        for (int64_t b = 0; b < B; b++) {
            int64_t n = ragged ? sn[b] : a.n, m = ragged ? sm[b] : a.m;
            if (!points) data_ok &= all_finite(cost, dt, nm0, n * m);
            if (points) data_ok &= all_finite(x, dt, r0 * dim, n * dim) && all_finite(y, dt, c0 * dim, m * dim);
            if (la) data_ok &= logw_ok(la, dt, r0, n);
            if (lb) data_ok &= logw_ok(lb, dt, c0, m);
            if (gi) data_ok &= all_finite(gi, dt, c0, m);
            if (!gi && fi) data_ok &= all_finite(fi, dt, r0, n);
            if (d.debias && !points && cxx) data_ok &= all_finite(cxx, dt, nn0, n * n);
            if (need_yy && !points && cyy) data_ok &= all_finite(cyy, dt, mm0, m * m);
            if (d.debias && a.self_yy_given && a.self_yy) data_ok &= all_finite(self, dt, b, 1);
            r0 += n, c0 += m, nm0 += n * m, nn0 += n * n, mm0 += m * m;
        }
        mag = points ? fmax(maxabs(x, dt, 0, rows * dim, 0), maxabs(y, dt, 0, cols * dim, 0))
                     : maxabs(cost, dt, 0, nm, 0);
        lw = log((double)(rows + cols + 1));
        if (la) lw = fmax(lw, maxabs(la, dt, 0, rows, 1));
        if (lb) lw = fmax(lw, maxabs(lb, dt, 0, cols, 1));
        if (fi && !gi) mag = fmax(mag, maxabs(fi, dt, 0, rows, 0));
        if (gi) mag = fmax(mag, maxabs(gi, dt, 0, cols, 0));
        if (cxx) mag = fmax(mag, maxabs(cxx, dt, 0, nn, 0));
        if (cyy) mag = fmax(mag, maxabs(cyy, dt, 0, mm, 0));
        if (d.debias && a.self_yy_given) mag = fmax(mag, maxabs(self, dt, 0, B, 0));
    }

    if (st != KDL_STATUS_SUCCESS) {
        CHECK(kdl_get_last_error()[0] != '\0', "%s without detail", kdl_status_string(st));
        for (int k = 0; k < H_COUNT; k++)
            if (k != H_SELF || !a.self_yy_given)
                CHECK(fz_obuf_untouched(&o[k]), "output %d written on %s", k, kdl_status_string(st));
        CHECK(memcmp(self_copy, self, (size_t)Bp * e) == 0, "self_yy changed on failure");
        if (st == KDL_STATUS_NONFINITE_INPUT) CHECK(!data_ok, "NONFINITE_INPUT but the data is finite");
        /* a parameter status names a parameter that is out of range */
        if (st == KDL_STATUS_BAD_EPSILON) CHECK(!(d.epsilon > 0 && isfinite(d.epsilon)), "BAD_EPSILON for eps %g", d.epsilon);
        if (st == KDL_STATUS_BAD_TOLERANCE) CHECK(!(d.tol >= 0), "BAD_TOLERANCE for tol %g", d.tol);
        if (st == KDL_STATUS_BAD_ITERATIONS)
            CHECK(d.max_iter < 1 || d.check_every < 1 || (d.eps_scaling && d.eps_stage_iter < 1), "BAD_ITERATIONS");
        if (st == KDL_STATUS_BAD_SCHEDULE)
            CHECK(d.eps_scaling && !(d.eps_scaling_factor > 0 && d.eps_scaling_factor < 1), "BAD_SCHEDULE for %g",
                  d.eps_scaling_factor);
        if (st == KDL_STATUS_BAD_ENUM)
            CHECK((unsigned)d.value >= KDL_OT_VALUE_COUNT_ || (unsigned)d.metric >= KDL_OT_METRIC_COUNT_ ||
                      (unsigned)dt > KDL_DTYPE_F64,
                  "BAD_ENUM with known enums");
        goto done;
    }

    /* ---- SUCCESS: what was accepted */
    CHECK(d.epsilon > 0 && isfinite(d.epsilon), "epsilon %g accepted", d.epsilon);
    CHECK(d.max_iter >= 1 && d.check_every >= 1 && d.tol >= 0, "solver parameters accepted");
    CHECK(!d.eps_scaling || (d.eps_scaling_factor > 0 && d.eps_scaling_factor < 1 && d.eps_stage_iter >= 1),
          "schedule accepted");
    CHECK((unsigned)d.value < KDL_OT_VALUE_COUNT_ && (unsigned)d.metric < KDL_OT_METRIC_COUNT_, "enum accepted");
    CHECK(dt == KDL_DTYPE_F32 || dt == KDL_DTYPE_F64, "dtype %d accepted", (int)dt);
    CHECK(B >= 0, "batch %lld accepted", (long long)B);
    if (a.info) CHECK(*info == 0, "info %lld", (long long)*info);
    if (B == 0) {
        for (int k = 0; k < H_COUNT; k++)
            if (k != H_INFO && (k != H_SELF || !a.self_yy_given))
                CHECK(fz_obuf_untouched(&o[k]), "output %d written for an empty batch", k);
        goto done;
    }
    CHECK(sizes_ok, "a size < 1 accepted");
    CHECK(data_ok, "non-finite data accepted");
    if (a.self_yy_given)
        CHECK(memcmp(self_copy, self, (size_t)B * e) == 0, "given self_yy changed");
    else if (!d.debias)
        CHECK(fz_obuf_untouched(&o[H_SELF]), "self_yy written without debias");

    /* the potentials are of the size of the data plus eps times the
     * log-weights: with both far inside the double range, no NaN */
    /* every weight, potential and their products inside the output dtype's
     * range: f64 data and eps log-weights <= 1e100, weights <= e^200;
     * f32 1e15 and e^30 */
    const double lim = dt == KDL_DTYPE_F32 ? 1e15 : 1e100, wlim = dt == KDL_DTYPE_F32 ? 30 : 200;
    int big_weight = 0;
    if (la) big_weight |= maxpos(la, dt, rows) > wlim;
    if (lb) big_weight |= maxpos(lb, dt, cols) > wlim;
    const int moderate = mag <= lim && lw <= 1e100 && d.epsilon * lw <= lim && !big_weight;
    const double rel = dt == KDL_DTYPE_F32 ? 1e-5 : 1e-8;
    const double tiny = dt == KDL_DTYPE_F32 ? 1e-37 : 1e-300; /* below: subnormal outputs, few digits */
    int64_t r0 = 0, c0 = 0, nm0 = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = ragged ? sn[b] : a.n, m = ragged ? sm[b] : a.m;
        const double v = kdl_load_as_double(value, dt, b);
        if (a.iterations) {
            CHECK(iters[b] >= 1 && iters[b] <= d.max_iter, "problem %lld: %lld iterations", (long long)b,
                  (long long)iters[b]);
            if (d.tol == 0) CHECK(iters[b] == d.max_iter, "tol 0 but %lld iterations", (long long)iters[b]);
        }
        double er = a.marginal_error ? kdl_load_as_double(err, dt, b) : 0;
        if (a.iterations && a.marginal_error && iters[b] < d.max_iter)
            CHECK(er <= d.tol * (1 + 1e-6), "problem %lld stopped after %lld iterations with error %g > tol %g",
                  (long long)b, (long long)iters[b], er, d.tol);
        if (moderate) {
            CHECK(!isnan(v), "problem %lld: value NaN", (long long)b);
            if (a.marginal_error) CHECK(!isnan(er) && er >= 0, "problem %lld: marginal error %g", (long long)b, er);
            for (int64_t i = 0; a.f && i < n; i++)
                CHECK(!isnan(kdl_load_as_double(fo, dt, r0 + i)), "problem %lld: f[%lld] NaN", (long long)b,
                      (long long)i);
            for (int64_t j = 0; a.g && j < m; j++)
                CHECK(!isnan(kdl_load_as_double(go, dt, c0 + j)), "problem %lld: g[%lld] NaN", (long long)b,
                      (long long)j);
            for (int64_t k = 0; a.plan && k < n * m; k++) {
                double p = kdl_load_as_double(plan, dt, nm0 + k);
                CHECK(p >= 0, "problem %lld: plan[%lld] = %g", (long long)b, (long long)k, p);
            }
            for (int64_t k = 0; a.grad_x && k < n * dim; k++)
                CHECK(!isnan(kdl_load_as_double(grad, dt, r0 * dim + k)), "problem %lld: grad_x NaN", (long long)b);
        }
        /* TRANSPORT of non-negative costs (P >= 0) */
        if (d.value == KDL_OT_VALUE_TRANSPORT && !d.debias && !isnan(v)) {
            int nonneg = 1;
            for (int64_t k = 0; !points && k < n * m; k++) nonneg &= kdl_load_as_double(cost, dt, nm0 + k) >= 0;
            if (nonneg) CHECK(v >= 0, "problem %lld: TRANSPORT value %g of non-negative costs", (long long)b, v);
        }
        /* well-conditioned: the scale of the potentials over eps */
        double scale = mag * (points ? (d.metric == KDL_OT_METRIC_L1 ? 2.0 * dim : 4.0 * dim * (1 + mag)) : 2.0) +
                       d.epsilon * lw;
        /* eps a normal double with room (a subnormal eps has a few bits) */
        const int wellcond = moderate && scale / d.epsilon <= 1e6 && d.epsilon >= 1e-280;
        if (wellcond && a.plan) {
            double col_err = 0, row_err = 0, bsum = 0, asum = 0, vp = 0;
            for (int64_t j = 0; j < m; j++) {
                double bj = lb ? exp(kdl_load_as_double(lb, dt, c0 + j)) : 1.0 / (double)m, cs = 0;
                for (int64_t i = 0; i < n; i++) cs += kdl_load_as_double(plan, dt, nm0 + i * m + j);
                col_err += fabs(cs - bj);
                bsum += bj;
            }
            for (int64_t i = 0; i < n; i++) {
                double ai = la ? exp(kdl_load_as_double(la, dt, r0 + i)) : 1.0 / (double)n, rs = 0;
                for (int64_t j = 0; j < m; j++) {
                    double p = kdl_load_as_double(plan, dt, nm0 + i * m + j);
                    rs += p;
                    double c = points ? pcost(d.metric, x, y, dt, r0 + i, c0 + j, dim)
                                      : kdl_load_as_double(cost, dt, nm0 + i * m + j);
                    vp += p * c;
                }
                row_err += fabs(rs - ai);
                asum += ai;
            }
            CHECK(col_err <= rel * bsum * (double)n + tiny, "problem %lld: columns off b by %g (sum b %g)",
                  (long long)b, col_err, bsum);
            if (a.marginal_error)
                CHECK(fz_close(row_err, er, rel * (double)n, rel * (asum + bsum) + tiny),
                      "problem %lld: row error of the plan %g, marginal_error %g", (long long)b, row_err, er);
            if (d.value == KDL_OT_VALUE_TRANSPORT && !d.debias)
                CHECK(fz_close(v, vp, rel * (double)(n * m), rel * 1e-3 + tiny), "problem %lld: value %g, <P, C> %g",
                      (long long)b, v, vp);
        }
        if (wellcond && d.value == KDL_OT_VALUE_DUAL && !d.debias && a.f && a.g) {
            double vd = 0, scl = 0;
            for (int64_t i = 0; i < n; i++) {
                double ai = la ? exp(kdl_load_as_double(la, dt, r0 + i)) : 1.0 / (double)n;
                double fv = kdl_load_as_double(fo, dt, r0 + i);
                if (ai > 0) vd += ai * fv, scl += fabs(ai * fv);
            }
            for (int64_t j = 0; j < m; j++) {
                double bj = lb ? exp(kdl_load_as_double(lb, dt, c0 + j)) : 1.0 / (double)m;
                double gv = kdl_load_as_double(go, dt, c0 + j);
                if (bj > 0) vd += bj * gv, scl += fabs(bj * gv);
            }
            CHECK(fabs(v - vd) <= rel * scl + tiny, "problem %lld: DUAL value %g, <a, f> + <b, g> %g",
                  (long long)b, v, vd);
        }
        r0 += n, c0 += m, nm0 += n * m;
    }

done:
    for (int k = 0; k < H_COUNT; k++) fz_obuf_free(&o[k]);
    free(cost), free(x), free(y), free(la), free(lb), free(fi), free(gi), free(cxx), free(cyy);
    cur_hd = NULL;
    cur_ha = NULL;
}

/* ------------------------------------------------------------------ SinKD */
enum { K_LOSS, K_GL, K_PLAN, K_ITERS, K_ERR, K_INFO, K_GRAD, K_COUNT };

static int row_ok(const void *p, kdl_dtype_t t, int64_t ld, int64_t i, int64_t V)
{
    int any = 0;
    for (int64_t v = 0; v < V; v++) {
        double z = kdl_load_as_double(p, t, i * ld + v);
        if (isnan(z) || z == INFINITY) return 0;
        any |= z > -INFINITY;
    }
    return any;
}

static void run_sinkd(fz_src_t *s)
{
    kdl_sinkd_desc_t d;
    kdl_sinkd_args_t a;
    kdl_sinkd_desc_init(&d);
    kdl_sinkd_args_init(&a);
    const uint8_t fl = fz_u8(s);
    a.student_dtype = fz_dtype(fz_u8(s));
    a.teacher_dtype = fz_dtype(fz_u8(s));
    a.grad_dtype = fz_dtype(fz_u8(s));
    a.out_dtype = fz_dtype(fz_u8(s));
    const int64_t N = fz_u8(s) % 7, V = 1 + fz_u8(s) % 10;
    a.rows = N;
    a.vocab = V;
    d.group_size = (int64_t)(fz_u8(s) % 8) - 1;
    const uint8_t ld = fz_u8(s);
    a.ld_student = V + (ld & 3);
    a.ld_teacher = V + ((ld >> 2) & 3);
    a.ld_grad = V + ((ld >> 4) & 3);
    d.metric = (kdl_ot_metric_t)(fz_u8(s) % 3);
    d.temperature = fz_param(s);
    d.epsilon = fz_param(s);
    d.tol = fz_param(s);
    d.scale = fz_param(s);
    d.max_iter = iter_byte(fz_u8(s));
    d.check_every = check_byte(fz_u8(s));

    const int raw = (fl & 128) != 0;
    const size_t es = fz_esize(a.student_dtype), et = fz_esize(a.teacher_dtype);
    const int64_t ns = N ? (N - 1) * a.ld_student + V : 0, nt = N ? (N - 1) * a.ld_teacher + V : 0;
    unsigned char *S = (unsigned char *)malloc((size_t)ns * es + 1), *T = (unsigned char *)malloc((size_t)nt * et + 1);
    if (!S || !T) abort();
    fill(s, S, a.student_dtype, 0, ns, raw);
    fill(s, T, a.teacher_dtype, 0, nt, raw);
    a.student = S;
    a.teacher = T;

    const int64_t n = d.group_size > 0 ? d.group_size : N;
    const int64_t G = (n > 0 && N % n == 0) ? N / n : 0;
    fz_obuf_t o[K_COUNT];
    memset(o, 0, sizeof o);
    const size_t eo = fz_esize(a.out_dtype), eg = fz_esize(a.grad_dtype);
    void *loss = fz_obuf_make(&o[K_LOSS], eo);
    if (!(fl & 64)) a.loss = loss;
    void *gl = fz_obuf_make(&o[K_GL], (size_t)(G ? G : 1) * eo);
    if (fl & 2) a.group_loss = gl;
    void *plan = fz_obuf_make(&o[K_PLAN], (size_t)(G * n * n) * eo);
    if (fl & 4) a.plan = plan;
    int64_t *iters = (int64_t *)fz_obuf_make(&o[K_ITERS], (size_t)G * 8);
    if (fl & 8) a.iterations = iters;
    void *err = fz_obuf_make(&o[K_ERR], (size_t)G * eo);
    if (fl & 16) a.marginal_error = err;
    int64_t *info = (int64_t *)fz_obuf_make(&o[K_INFO], 8);
    if (fl & 32) a.info = info;
    void *grad = fz_obuf_make(&o[K_GRAD], (size_t)(N * a.ld_grad) * eg);
    if (fl & 1) a.grad = grad;

    cur_kd = &d;
    cur_ka = &a;
    const kdl_status_t st = kdl_ref_sinkd(&d, &a);
    fz_show("sinkd", st);
    CHECK(fz_known_status(st), "status %d", (int)st);
    if (st != KDL_STATUS_SUCCESS) {
        CHECK(kdl_get_last_error()[0] != '\0', "%s without detail", kdl_status_string(st));
        for (int k = 0; k < K_COUNT; k++) CHECK(fz_obuf_untouched(&o[k]), "output %d written on %s", k, kdl_status_string(st));
        if (st == KDL_STATUS_BAD_TEMPERATURE)
            CHECK(!(d.temperature > 0 && isfinite(d.temperature)), "BAD_TEMPERATURE for tau %g", d.temperature);
        if (st == KDL_STATUS_BAD_EPSILON) CHECK(!(d.epsilon > 0 && isfinite(d.epsilon)), "BAD_EPSILON for eps %g", d.epsilon);
        if (st == KDL_STATUS_BAD_TOLERANCE) CHECK(!(d.tol >= 0), "BAD_TOLERANCE for tol %g", d.tol);
        if (st == KDL_STATUS_BAD_SCALE) CHECK(!isfinite(d.scale), "BAD_SCALE for scale %g", d.scale);
        if (st == KDL_STATUS_BAD_ITERATIONS) CHECK(d.max_iter < 1 || d.check_every < 1, "BAD_ITERATIONS");
        if (st == KDL_STATUS_BAD_GROUP)
            CHECK(d.group_size < 0 || (d.group_size > 0 && N % d.group_size != 0), "BAD_GROUP for %lld rows, group %lld",
                  (long long)N, (long long)d.group_size);
        goto done;
    }
    CHECK(d.temperature > 0 && isfinite(d.temperature), "tau %g accepted", d.temperature);
    CHECK(d.epsilon > 0 && isfinite(d.epsilon), "eps %g accepted", d.epsilon);
    CHECK(isfinite(d.scale), "scale %g accepted", d.scale);
    CHECK(d.max_iter >= 1 && d.check_every >= 1 && d.tol >= 0, "solver parameters accepted");
    CHECK((unsigned)d.metric < KDL_OT_METRIC_COUNT_, "metric accepted");
    CHECK(d.group_size >= 0 && (N == 0 || G > 0), "group %lld accepted for N %lld", (long long)d.group_size,
          (long long)N);
    CHECK(kdl_dtype_size(a.student_dtype) && kdl_dtype_size(a.teacher_dtype) &&
              (a.out_dtype == KDL_DTYPE_F32 || a.out_dtype == KDL_DTYPE_F64),
          "dtype accepted");
    CHECK(a.loss != NULL, "NULL loss accepted");
    {
        const double L = kdl_load_as_double(loss, a.out_dtype, 0);
        int64_t n_valid = 0;
        double sum = 0;
        for (int64_t g = 0; g < G; g++) {
            int ok = 1;
            for (int64_t i = 0; i < n; i++)
                ok &= row_ok(S, a.student_dtype, a.ld_student, g * n + i, V) &&
                      row_ok(T, a.teacher_dtype, a.ld_teacher, g * n + i, V);
            n_valid += ok;
            if (a.group_loss) {
                double x = kdl_load_as_double(gl, a.out_dtype, g);
                if (!ok) CHECK(isnan(x), "group %lld invalid, group_loss %g", (long long)g, x);
                if (ok) {
                    CHECK(!isnan(x), "group %lld valid, group_loss NaN", (long long)g);
                    CHECK(d.scale >= 0 ? x >= 0 : x <= 0, "group %lld: loss %g, scale %g", (long long)g, x, d.scale);
                    sum += x;
                }
            }
            if (a.plan && ok) {
                double col_err = 0;
                for (int64_t j = 0; j < n; j++) {
                    double cs = 0;
                    for (int64_t i = 0; i < n; i++) {
                        double p = kdl_load_as_double(plan, a.out_dtype, g * n * n + i * n + j);
                        CHECK(p >= 0 && p <= (1.0 / (double)n) * (1 + 1e-6), "group %lld: plan entry %g",
                              (long long)g, p);
                        cs += p;
                    }
                    col_err += fabs(cs - 1.0 / (double)n);
                }
                if (d.epsilon >= 1e-5)
                    CHECK(col_err <= 1e-5, "group %lld: columns off 1/n by %g", (long long)g, col_err);
            }
            if (a.iterations) {
                if (ok) CHECK(iters[g] >= 1 && iters[g] <= d.max_iter, "group %lld: %lld iterations", (long long)g, (long long)iters[g]);
                else CHECK(iters[g] == 0, "group %lld invalid, %lld iterations", (long long)g, (long long)iters[g]);
            }
            if (a.grad)
                for (int64_t i = 0; i < n; i++)
                    for (int64_t v = 0; v < V; v++) {
                        double x = kdl_load_as_double(grad, a.grad_dtype, (g * n + i) * a.ld_grad + v);
                        if (!ok) CHECK(x == 0, "group %lld invalid, gradient %g", (long long)g, x);
                        else if (fabs(d.scale) <= 1e100)
                            CHECK(!isnan(x), "group %lld row %lld: gradient[%lld] NaN", (long long)g, (long long)i,
                                  (long long)v);
                    }
        }
        if (a.info) CHECK(*info == G - n_valid, "info %lld, expected %lld", (long long)*info, (long long)(G - n_valid));
        CHECK(!isnan(L), "loss NaN");
        if (n_valid == 0) CHECK(L == 0, "no valid group, loss %g", L);
        if (a.group_loss && n_valid > 0 && a.out_dtype == KDL_DTYPE_F64)
            CHECK(fz_close(L, sum / (double)n_valid, 1e-12, 0), "loss %g, mean of group losses %g", L,
                  sum / (double)n_valid);
    }
done:
    for (int k = 0; k < K_COUNT; k++) fz_obuf_free(&o[k]);
    free(S);
    free(T);
    cur_kd = NULL;
    cur_ka = NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_src_t s = {data, size};
    const uint8_t which = fz_u8(&s);
    if (which & 1)
        run_sinkd(&s);
    else
        run_sinkhorn(&s);
    return 0;
}
