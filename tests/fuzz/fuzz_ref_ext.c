/*
 * tests/fuzz/fuzz_ref_ext.c - libFuzzer target: the float64 references of the
 * extensions (kdloss_ext.h): the sparse teacher (kdl_ref_sparse_loss), the
 * vocabulary-parallel protocol (kdl_shard_sizes, kdl_ref_shard_step, all
 * shards run in this process with the all-reduces done here) and the fused
 * linear + loss (kdl_ref_fused_linear_loss), each against the dense
 * reference kdl_ref_loss_forward_backward on the same rows.
 *
 * Build: cmake -DKDL_FUZZ=ON with CC=clang (tests/fuzz/CMakeLists.txt);
 * run:   scripts/fuzz.sh fuzz_ref_ext, or build-fuzz/tests/fuzz/fuzz_ref_ext DIR.
 *
 * Input layout (bytes past the end read as 0):
 *   [0] byte % 3: 0 sparse, 1 shard, 2 fused linear
 *   the descriptor: divergence (byte % 9: 8 unknown), reduction (byte % 4)
 *   and head rule ((byte >> 2) % 4), temperature, scale, alpha, beta, mu
 *   (fz_param: edge, non-finite and raw values), top_k (byte % 14 - 1),
 *   ignore_index (one of -100, 0, 1, INT64_MIN); then per call:
 * sparse: mode (byte % 3: 2 unknown), N (byte % 5), V (1 + byte % 10),
 *   k (byte % (V + 2)), student / teacher / grad / out dtype (byte % 5),
 *   strides (2 bits each), flags (1 grad, 2 labels, 4 info, 8 valid_rows,
 *   16 bad_index_rows, 32 NULL loss, 64 raw data, 128 dense form: k = V, the
 *   indices a permutation and the log-probs the teacher's log-softmax at tau
 *   in f64), labels, indices (byte < 200: byte % V; else -1, V, INT64_MIN,
 *   INT64_MAX), log-probs, student logits.
 * shard: K shards (1 + byte % 4), V = K + byte % 9, the widths (1 each, plus
 *   one column per byte to shard byte % K), N (byte % 5), student / teacher
 *   dtype (byte % 4), grad dtype (f64, f32 or the student's), out dtype,
 *   stride extras, flags (1 grad, 2 labels, 4 info, 8 valid_rows,
 *   16 stat_head_size, 32 head_mask, 64 raw data, 128 out f32), a mutation
 *   byte (< 96: one bad argument, list at `shard_mutations`, on shard
 *   byte % K), labels, student and teacher logits [N, V].
 * fused: N (byte % 4), d (1 + byte % 4), V (1 + byte % 8), hidden / weight /
 *   teacher / grad dtype (byte % 5), out dtype, strides, flags (1 dH, 2 dW,
 *   4 labels, 8 info, 16 valid_rows, 32 raw data, 64 chunk_rows from the next
 *   byte - 1, 128 the teacher as a linear layer), labels, H, W, then the
 *   teacher logits, or (flag 128) d_t (1 + byte % 4), the teacher layer's
 *   dtype (byte % 5), its strides and flags (one byte: 1, 2 ld extras,
 *   4 a bias b_t, 8 a sparse teacher instead, 16 bad_index_rows), H_t, W_t,
 *   b_t; or (flags 128 and 8) the sparse teacher: that dtype for the
 *   log-probs, the ld extras for indices and log-probs, k (byte % (V + 2)),
 *   mode (byte % 3), indices (as the sparse call's), log-probs.
 *
 * Oracle (abort on violation; the problem is printed):
 *   - a known status; on failure a last-error detail and every output byte
 *     untouched (sentinels), shard state and exchange included; a
 *     descriptor status (BAD_TEMPERATURE, BAD_SCALE, BAD_ALPHA, BAD_BETA,
 *     BAD_MU) names a field that is indeed out of range;
 *   - sparse: SUCCESS implies a descriptor in range, the mode defines the
 *     divergence, k in [1, min(V, 1024)]; info, valid_rows, bad_index_rows
 *     equal an independent row classification (kdloss_ext.h part 1);
 *     ignored rows loss 0, invalid rows NaN, valid rows not NaN; no NaN in
 *     a gradient row whose loss is finite; zero gradient rows off the valid
 *     ones; reduced loss never NaN (0 without valid rows); in the dense form
 *     (k = V) both modes equal the dense reference, loss and gradient;
 *   - shard: every shard gets the same sizes and the same (op, count) at
 *     every step; each bad argument gets its specific status (kdl_shard_sizes
 *     too) with nothing written; the finished loss (identical on every shard),
 *     gradient, counters and AKL head sizes equal the dense reference on the
 *     whole rows (AKL: unless two distinct teacher logits of a row have
 *     probabilities within 1e-12, or a cumulative head mass lies within 1e-9
 *     of mu, where the protocol's logit order or rounding may legitimately
 *     pick another head; TVD gradients unless p and q of a token agree
 *     within 1e-9, where the sign of q - p is a coin toss of rounding);
 *   - fused: loss, dH = dL W and dW = dL^T H equal the dense reference on
 *     the logits H W^T formed here (NaN where the reference's NaN is);
 *   - every divergence is >= 0: row and reduced losses have the sign of
 *     scale up to rounding (sparse TAIL_BUCKET only where the given mass is
 *     <= 1 and k < V: otherwise the cells are not distributions).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ext_internal.h"
#include "fuzz_util.h"
#include "internal.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"
#include "fuzz_check.h"

static const kdl_loss_desc_t *cur_d;
static const char *cur_what = "";
static int64_t cur_N, cur_V;
static const void *cur_S, *cur_T;
static kdl_dtype_t cur_sdt, cur_tdt;
static int64_t cur_lds, cur_ldt;

static void dump_problem(void)
{
    const kdl_loss_desc_t *d = cur_d;
    if (!d) return;
    fprintf(stderr, "  %s: %s %s rule %d tau %.17g scale %.17g alpha %.17g beta %.17g mu %.17g top_k %lld\n", cur_what,
            kdl_divergence_name(d->divergence), kdl_reduction_name(d->reduction), (int)d->head_rule, d->temperature,
            d->scale, d->alpha, d->beta, d->mu, (long long)d->top_k);
    for (int64_t i = 0; i < cur_N && cur_S && cur_T && kdl_dtype_size(cur_sdt) && kdl_dtype_size(cur_tdt); i++) {
        fprintf(stderr, "  row %lld s:", (long long)i);
        for (int64_t v = 0; v < cur_V; v++) fprintf(stderr, " %.9g", kdl_load_as_double(cur_S, cur_sdt, i * cur_lds + v));
        fprintf(stderr, "\n         t:");
        for (int64_t v = 0; v < cur_V && cur_ldt >= 0; v++)
            fprintf(stderr, " %.9g", kdl_load_as_double(cur_T, cur_tdt, i * cur_ldt + v));
        fprintf(stderr, "\n");
    }
}

#define CHECK(cond, ...) FZ_CHECK("fuzz_ref_ext", dump_problem(), cond, __VA_ARGS__)

/* ------------------------------------------------------------ decoding */

/* out[r][k] (row stride ld_out, r < rows, k < D) against
 * sum_j g[r*g_r + j*g_j] * X[j*ld_x + k] over j < J, in float64, to 1e-12
 * of the sum of the terms' magnitudes. */
static void check_product(const char *what, const double *out, int64_t ld_out, int64_t rows, int64_t D, int64_t J,
                          const double *g, int64_t g_r, int64_t g_j, const void *X, kdl_dtype_t xdt, int64_t ld_x)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < D; k++) {
            double acc = 0, sc = 0;
            for (int64_t j = 0; j < J; j++) {
                double t = g[r * g_r + j * g_j] * kdl_load_as_double(X, xdt, j * ld_x + k);
                acc += t;
                sc += fabs(t);
            }
            double x = out[r * ld_out + k];
            CHECK(fz_close(x, acc, 1e-12, 1e-12 * sc + 1e-300), "%s [%lld][%lld]: %.17g, expected %.17g", what,
                  (long long)r, (long long)k, x, acc);
        }
}

static void read_desc(fz_src_t *s, kdl_loss_desc_t *d)
{
    kdl_loss_desc_init(d);
    d->divergence = (kdl_divergence_t)(fz_u8(s) % 9);
    uint8_t b = fz_u8(s);
    d->reduction = (kdl_reduction_t)(b % 4);
    d->head_rule = (kdl_head_rule_t)((b >> 2) % 4);
    d->temperature = fz_param(s);
    d->scale = fz_param(s);
    d->alpha = fz_param(s);
    d->beta = fz_param(s);
    d->mu = fz_param(s);
    d->top_k = (int64_t)(fz_u8(s) % 14) - 1;
    static const int64_t ign[] = {-100, 0, 1, INT64_MIN};
    d->ignore_index = ign[fz_u8(s) % 4];
}

/* The dense descriptor is in range (independently of kdl_loss_validate). */
static int desc_in_range(const kdl_loss_desc_t *d, int64_t V)
{
    return d->temperature > 0 && isfinite(d->temperature) && isfinite(d->scale) && d->alpha >= 0 && d->alpha < 1 &&
           d->beta > 0 && d->beta < 1 && d->mu > 0 && d->mu < 1 && d->top_k >= 1 && d->top_k <= V &&
           (unsigned)d->divergence < KDL_DIV_COUNT_ && (unsigned)d->reduction < KDL_REDUCTION_COUNT_ &&
           (unsigned)d->head_rule < KDL_HEAD_COUNT_;
}

static void fill(fz_src_t *s, void *buf, kdl_dtype_t t, int64_t count, int raw)
{
    if (raw || !kdl_dtype_size(t)) {
        fz_take(s, buf, (size_t)count * fz_esize(t));
        return;
    }
    for (int64_t k = 0; k < count; k++) kdl_store_from_double(buf, t, k, fz_coded(fz_u8(s)));
}

static void *zalloc(size_t bytes)
{
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) abort();
    return p;
}

static int64_t *read_labels(fz_src_t *s, int on, int64_t N, const kdl_loss_desc_t *d)
{
    if (!on) return NULL;
    int64_t *l = (int64_t *)zalloc((size_t)(N ? N : 1) * 8);
    for (int64_t i = 0; i < N; i++) {
        uint8_t b = fz_u8(s);
        l[i] = (b % 4 == 0) ? d->ignore_index : (int64_t)b - 128;
    }
    return l;
}

/* Top-k indices [N, ld] (k per row): a byte < 200 gives an index in
 * [0, V), else one of -1, V, 0, INT64_MIN, INT64_MAX (bad or repeated). */
static void read_indices(fz_src_t *s, int64_t *idx, int64_t N, int64_t k, int64_t ld, int64_t V)
{
    static const int64_t bad[] = {-1, 0, INT64_MIN, INT64_MAX};
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < k; j++) {
            const uint8_t b = fz_u8(s);
            int64_t v = b < 200 ? b % V : bad[b % 4];
            if (b >= 200 && b % 4 == 1) v = V;
            idx[i * ld + j] = v;
        }
}

/* The dense reference in float64: loss [N] (NONE) or [1], gradient [N, V]. */
static kdl_status_t dense(const kdl_loss_desc_t *d, int64_t N, int64_t V, const void *S, kdl_dtype_t sdt,
                          int64_t lds, const void *T, kdl_dtype_t tdt, int64_t ldt, const int64_t *labels,
                          double *loss, double *grad, int64_t *info, int64_t *valid, int64_t *hs)
{
    kdl_loss_args_t a;
    kdl_loss_args_init(&a);
    a.rows = N;
    a.vocab = V;
    a.student = S;
    a.student_dtype = sdt;
    a.ld_student = lds;
    a.teacher = T;
    a.teacher_dtype = tdt;
    a.ld_teacher = ldt;
    a.labels = labels;
    a.grad = grad;
    a.ld_grad = V;
    a.grad_dtype = KDL_DTYPE_F64;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = loss;
    a.info = info;
    a.valid_rows = valid;
    a.stat_head_size = hs;
    return kdl_ref_loss_forward_backward(d, &a);
}

static double maxabs_d(const double *x, int64_t n)
{
    double m = 0;
    for (int64_t k = 0; k < n; k++)
        if (isfinite(x[k]) && fabs(x[k]) > m) m = fabs(x[k]);
    return m;
}

/* Gradients agree: entry-wise to rtol, plus an absolute slack relative to
 * the largest entry (an entry qg - q G can be a difference of nearly equal
 * terms); non-finite entries must be the same. */
static int grad_close(double a, double b, double scale)
{
    return fz_close(a, b, 1e-9, 1e-9 * scale + 1e-300);
}

/* The rounding noise of a gradient entry (scale dz)/tau: dz = qg - q G is
 * formed from terms of size up to 1 + |log q| + |log p|, and log q, log p
 * are differences of logits over tau; so its absolute accuracy is about
 * 1e-16 |scale|/tau (1 + logit range/tau).  Returns that times 1e3. */
static double grad_noise(const kdl_loss_desc_t *d, const void *S, kdl_dtype_t sdt, int64_t ns, const void *T,
                         kdl_dtype_t tdt, int64_t nt)
{
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t k = 0; k < ns; k++) {
        double x = kdl_load_as_double(S, sdt, k);
        if (isfinite(x)) lo = fmin(lo, x), hi = fmax(hi, x);
    }
    for (int64_t k = 0; k < nt; k++) {
        double x = kdl_load_as_double(T, tdt, k);
        if (isfinite(x)) lo = fmin(lo, x), hi = fmax(hi, x);
    }
    if (d->scale == 0) return 0; /* scale 0: exact zeros (kdl_scaled_*) */
    double range = hi > lo ? (hi - lo) / d->temperature : 0;
    double r = fabs(d->scale) / d->temperature * (1e-13 * (1 + range)); /* the small factor last: no underflow */
    return isnan(r) ? INFINITY : r; /* 0 x inf from underflow: no bound known */
}

/* TVD's gradient is sign(q - p)/2-based: where p_v and q_v agree to
 * rounding (here within 1e-9), two correct evaluations can take different
 * signs, and every entry of the row's gradient moves with G.  1 when a row
 * has such a token, so the TVD gradient is not compared there. */
static int tvd_kink(const kdl_loss_desc_t *d, int64_t N, int64_t V, const void *S, kdl_dtype_t sdt, int64_t lds,
                    const void *T, kdl_dtype_t tdt, int64_t ldt)
{
    if (d->divergence != KDL_DIV_TVD) return 0;
    for (int64_t i = 0; i < N; i++) {
        double p[12], q[12], ms = -INFINITY, mt = -INFINITY, zs = 0, zt = 0;
        for (int64_t v = 0; v < V; v++) {
            q[v] = kdl_load_as_double(S, sdt, i * lds + v);
            p[v] = kdl_load_as_double(T, tdt, i * ldt + v);
            ms = fmax(ms, q[v]);
            mt = fmax(mt, p[v]);
        }
        if (!isfinite(ms) || !isfinite(mt)) continue;
        for (int64_t v = 0; v < V; v++) zs += exp((q[v] - ms) / d->temperature), zt += exp((p[v] - mt) / d->temperature);
        for (int64_t v = 0; v < V; v++) {
            double a = exp((q[v] - ms) / d->temperature) / zs, b = exp((p[v] - mt) / d->temperature) / zt;
            if (fabs(a - b) <= 1e-9 * (a + b)) return 1;
        }
    }
    return 0;
}

/* A descriptor status names a descriptor field that is out of range. */
static void check_desc_status(kdl_status_t st, const kdl_loss_desc_t *d);

/* Every divergence here is >= 0 (a sum of element terms that is >= 0 in
 * exact arithmetic), so a loss has the sign of scale up to its rounding
 * noise.  NaN (invalid rows) is not judged here. */
static int sign_ok(double loss, double scale, double noise)
{
    if (isnan(loss)) return 1;
    if (isinf(loss) && noise >= FLT_MAX) return 1; /* noise beyond an f32 output's range */
    return scale >= 0 ? loss >= -noise : loss <= noise;
}

static void check_desc_status(kdl_status_t st, const kdl_loss_desc_t *d)
{
    if (st == KDL_STATUS_BAD_TEMPERATURE)
        CHECK(!(d->temperature > 0 && isfinite(d->temperature)), "BAD_TEMPERATURE for tau %g", d->temperature);
    if (st == KDL_STATUS_BAD_SCALE) CHECK(!isfinite(d->scale), "BAD_SCALE for scale %g", d->scale);
    if (st == KDL_STATUS_BAD_ALPHA) CHECK(!(d->alpha >= 0 && d->alpha < 1), "BAD_ALPHA for alpha %g", d->alpha);
    if (st == KDL_STATUS_BAD_BETA) CHECK(!(d->beta > 0 && d->beta < 1), "BAD_BETA for beta %g", d->beta);
    if (st == KDL_STATUS_BAD_MU) CHECK(!(d->mu > 0 && d->mu < 1), "BAD_MU for mu %g", d->mu);
}

/* ---------------------------------------------------------------- sparse */
enum { P_LOSS, P_GRAD, P_INFO, P_VALID, P_BAD, P_COUNT };

static void run_sparse(fz_src_t *s, kdl_loss_desc_t *d)
{
    kdl_sparse_args_t a;
    kdl_sparse_args_init(&a);
    a.mode = (kdl_sparse_mode_t)(fz_u8(s) % 3);
    const int64_t N = fz_u8(s) % 5, V = 1 + fz_u8(s) % 10;
    int64_t k = fz_u8(s) % (V + 2);
    a.student_dtype = fz_dtype(fz_u8(s));
    a.teacher_dtype = fz_dtype(fz_u8(s));
    a.grad_dtype = fz_dtype(fz_u8(s));
    a.out_dtype = fz_dtype(fz_u8(s));
    const uint8_t ld = fz_u8(s), fl = fz_u8(s);
    const int dense_form = (fl & 128) != 0;
    if (dense_form) {
        k = V;
        a.teacher_dtype = KDL_DTYPE_F64;
    }
    a.rows = N;
    a.vocab = V;
    a.k = k;
    const int64_t kk = k > 0 ? k : 1;
    a.ld_student = V + (ld & 3);
    a.ld_indices = kk + ((ld >> 2) & 3);
    a.ld_logprobs = kk + ((ld >> 4) & 3);
    a.ld_grad = V + ((ld >> 6) & 3);
    a.labels = read_labels(s, fl & 2, N, d);
    const int raw = (fl & 64) != 0;

    const size_t es = fz_esize(a.student_dtype), et = fz_esize(a.teacher_dtype);
    const int64_t ns = N ? (N - 1) * a.ld_student + V : 0;
    const int64_t ni = N ? (N - 1) * a.ld_indices + kk : 0, nl = N ? (N - 1) * a.ld_logprobs + kk : 0;
    int64_t *idx = (int64_t *)zalloc((size_t)ni * 8);
    void *lp = zalloc((size_t)nl * et);
    void *S = zalloc((size_t)ns * es);
    double *T = (double *)zalloc((size_t)(N * V) * 8); /* dense form: the teacher logits */
    if (dense_form) {
        for (int64_t i = 0; i < N; i++) {
            /* a permutation: rotate by a byte */
            int64_t r = fz_u8(s) % V;
            for (int64_t j = 0; j < V; j++) idx[i * a.ld_indices + j] = (j + r) % V;
        }
        for (int64_t x = 0; x < N * V; x++) T[x] = fz_coded(fz_u8(s));
    } else {
        read_indices(s, idx, N, k, a.ld_indices, V);
        fill(s, lp, a.teacher_dtype, nl, raw);
    }
    fill(s, S, a.student_dtype, ns, raw);
    const double tau = d->temperature;
    if (dense_form && tau > 0 && isfinite(tau)) {
        /* log-softmax of the teacher logits at tau, at the support order */
        for (int64_t i = 0; i < N; i++) {
            double mx = -INFINITY, sum = 0;
            for (int64_t v = 0; v < V; v++)
                if (T[i * V + v] > mx) mx = T[i * V + v];
            for (int64_t v = 0; v < V; v++) sum += exp((T[i * V + v] - mx) / tau);
            for (int64_t j = 0; j < V; j++) {
                int64_t v = idx[i * a.ld_indices + j];
                ((double *)lp)[i * a.ld_logprobs + j] = (T[i * V + v] - mx) / tau - log(sum);
            }
        }
    }
    a.student = S;
    a.teacher_indices = idx;
    a.teacher_logprobs = lp;

    fz_obuf_t o[P_COUNT];
    memset(o, 0, sizeof o);
    const size_t eo = fz_esize(a.out_dtype), eg = fz_esize(a.grad_dtype);
    const size_t nloss = d->reduction == KDL_REDUCTION_NONE ? (size_t)N : 1;
    void *loss = fz_obuf_make(&o[P_LOSS], nloss * eo);
    if (!(fl & 32)) a.loss = loss;
    void *grad = fz_obuf_make(&o[P_GRAD], (size_t)(N * a.ld_grad) * eg);
    if (fl & 1) a.grad = grad;
    int64_t *info = (int64_t *)fz_obuf_make(&o[P_INFO], 8), *valid = (int64_t *)fz_obuf_make(&o[P_VALID], 8),
            *badr = (int64_t *)fz_obuf_make(&o[P_BAD], 8);
    if (fl & 4) a.info = info;
    if (fl & 8) a.valid_rows = valid;
    if (fl & 16) a.bad_index_rows = badr;

    cur_d = d;
    cur_what = "sparse";
    cur_N = N, cur_V = V, cur_S = S, cur_sdt = a.student_dtype, cur_lds = a.ld_student;
    cur_T = lp, cur_tdt = a.teacher_dtype, cur_ldt = a.ld_logprobs;
    if (k < V) cur_ldt = -1;
    const kdl_status_t st = kdl_ref_sparse_loss(d, &a);
    fz_show("sparse", st);
    CHECK(fz_known_status(st), "status %d", (int)st);
    if (st != KDL_STATUS_SUCCESS) {
        CHECK(kdl_get_last_error()[0] != '\0', "%s without detail", kdl_status_string(st));
        for (int q = 0; q < P_COUNT; q++) CHECK(fz_obuf_untouched(&o[q]), "output %d written on %s", q, kdl_status_string(st));
        check_desc_status(st, d);
        goto done;
    }
    CHECK(desc_in_range(d, V), "descriptor out of range accepted");
    CHECK((unsigned)a.mode < KDL_SPARSE_MODE_COUNT_ && kdl_sparse_supports(a.mode, d->divergence),
          "mode %d with %s accepted", (int)a.mode, kdl_divergence_name(d->divergence));
    CHECK(k >= 1 && k <= V && k <= KDL_SPARSE_MAX_K, "k %lld accepted", (long long)k);
    CHECK(!(d->divergence == KDL_DIV_AKL && d->head_rule == KDL_HEAD_TOPK && d->top_k > k), "AKL top_k > k accepted");
    CHECK(kdl_dtype_size(a.student_dtype) && kdl_dtype_size(a.teacher_dtype) &&
              (a.out_dtype == KDL_DTYPE_F32 || a.out_dtype == KDL_DTYPE_F64),
          "dtype accepted");
    CHECK(a.loss || (d->reduction == KDL_REDUCTION_NONE && N == 0), "NULL loss accepted");
    {
        int state[4], mass_le1[4];
        int64_t n_valid = 0, n_invalid = 0, n_bad = 0;
        /* rounding noise of a row loss: the terms are of the size of the
         * logits' range over tau and of the log-probs */
        const double noise = tau > 0 && isfinite(tau)
                                 ? 1e3 * grad_noise(d, S, a.student_dtype, ns, lp, a.teacher_dtype, nl) * tau * V
                                 : 0;
        for (int64_t i = 0; i < N; i++) {
            if (a.labels && a.labels[i] == d->ignore_index) {
                state[i] = 1;
                continue;
            }
            int bad = 0, any = 0, badidx = 0;
            for (int64_t v = 0; v < V; v++) {
                double x = kdl_load_as_double(S, a.student_dtype, i * a.ld_student + v);
                bad |= isnan(x) || x == INFINITY;
                any |= x > -INFINITY;
            }
            bad |= !any;
            double mx = -INFINITY, sum = 0;
            for (int64_t j = 0; j < k; j++) {
                int64_t v = idx[i * a.ld_indices + j];
                if (v < 0 || v >= V) badidx = 1;
                for (int64_t j2 = 0; j2 < j; j2++) badidx |= idx[i * a.ld_indices + j2] == v;
                double l = kdl_load_as_double(lp, a.teacher_dtype, i * a.ld_logprobs + j);
                bad |= isnan(l) || l > 0;
                if (l > mx) mx = l;
            }
            if (!bad) {
                for (int64_t j = 0; j < k; j++) sum += exp(kdl_load_as_double(lp, a.teacher_dtype, i * a.ld_logprobs + j) - mx);
                double lse = mx == -INFINITY ? -INFINITY : mx + log(sum);
                if (a.mode == KDL_SPARSE_RENORMALISED && lse == -INFINITY) bad = 1;
                if (a.mode == KDL_SPARSE_TAIL_BUCKET && lse > log1p(KDL_SPARSE_MASS_TOL)) bad = 1;
                /* k = V: nothing off the support holds a residual mass */
                if (a.mode == KDL_SPARSE_TAIL_BUCKET && k == V && lse < log1p(-KDL_SPARSE_MASS_TOL)) bad = 1;
            }
            mass_le1[i] = !bad && (mx == -INFINITY || mx + log(sum) <= 0);
            state[i] = (bad || badidx) ? 2 : 0;
            n_valid += state[i] == 0;
            n_invalid += state[i] == 2;
            n_bad += badidx;
        }
        if (a.info) CHECK(*info == n_invalid, "info %lld, expected %lld", (long long)*info, (long long)n_invalid);
        if (a.valid_rows) CHECK(*valid == n_valid, "valid_rows %lld, expected %lld", (long long)*valid, (long long)n_valid);
        if (a.bad_index_rows) CHECK(*badr == n_bad, "bad_index_rows %lld, expected %lld", (long long)*badr, (long long)n_bad);
        double red = 0;
        if (a.loss && d->reduction != KDL_REDUCTION_NONE) {
            red = kdl_load_as_double(loss, a.out_dtype, 0);
            CHECK(!isnan(red), "reduced loss NaN");
            if (n_valid == 0) CHECK(red == 0, "no valid row, loss %g", red);
        }
        for (int64_t i = 0; i < N; i++) {
            double li = red;
            if (a.loss && d->reduction == KDL_REDUCTION_NONE) {
                li = kdl_load_as_double(loss, a.out_dtype, i);
                if (state[i] == 1) CHECK(li == 0, "row %lld ignored, loss %g", (long long)i, li);
                if (state[i] == 2) CHECK(isnan(li), "row %lld invalid, loss %g", (long long)i, li);
                if (state[i] == 0) CHECK(!isnan(li), "row %lld valid, loss NaN", (long long)i);
                /* TAIL_BUCKET cells are distributions only for a given mass <= 1
                 * and k < V (k = V: the bucket is 0 by definition; a mass below
                 * 1 - tol makes the row invalid, but one within the tolerance is
                 * still missing from the cells and FKL can go negative by ~tol) */
                if (state[i] == 0 && (a.mode == KDL_SPARSE_RENORMALISED || (mass_le1[i] && k < V)))
                    CHECK(sign_ok(li, d->scale, noise), "row %lld: loss %g, scale %g", (long long)i, li, d->scale);
            }
            for (int64_t v = 0; a.grad && v < V; v++) {
                double g = kdl_load_as_double(grad, a.grad_dtype, i * a.ld_grad + v);
                if (state[i] != 0) CHECK(g == 0, "row %lld (state %d): gradient %g", (long long)i, state[i], g);
                else if (a.loss && isfinite(li)) CHECK(!isnan(g), "row %lld: loss %g, gradient NaN", (long long)i, li);
            }
        }
        /* k = V with the teacher's full log-softmax: the dense loss */
        if (dense_form && N > 0 && a.loss) {
            double dl[4], dg[4 * 12];
            int64_t dinfo = 0, dvalid = 0;
            kdl_status_t ds = dense(d, N, V, S, a.student_dtype, a.ld_student, T, KDL_DTYPE_F64, V, a.labels, dl,
                                    dg, &dinfo, &dvalid, NULL);
            int akl_ambiguous = 0;
            if (d->divergence == KDL_DIV_AKL) /* orders by log-prob here, by rounded probability there */
                for (int64_t i = 0; i < N; i++)
                    for (int64_t u = 0; u < V; u++)
                        for (int64_t w = 0; w < u; w++) {
                            double x = ((double *)lp)[i * a.ld_logprobs + u], y = ((double *)lp)[i * a.ld_logprobs + w];
                            if (x != y && (fabs(exp(x) - exp(y)) <= 1e-12 * fmax(exp(x), exp(y)) || fabs(x - y) < 1e-9))
                                akl_ambiguous = 1;
                        }
            cur_T = T, cur_tdt = KDL_DTYPE_F64, cur_ldt = V;
            CHECK(ds == KDL_STATUS_SUCCESS, "dense reference refused: %s", kdl_status_string(ds));
            if (!akl_ambiguous && a.out_dtype == KDL_DTYPE_F64) {
                const double ln = grad_noise(d, S, a.student_dtype, ns, T, KDL_DTYPE_F64, N * V) * tau * (double)N;
                for (int64_t i = 0; i < (int64_t)nloss; i++) {
                    double x = kdl_load_as_double(loss, a.out_dtype, i);
                    CHECK(fz_close(x, dl[i], 1e-9, 1e-12) || fabs(x - dl[i]) <= ln, "loss[%lld] %.17g, dense %.17g",
                          (long long)i, x, dl[i]);
                }
                double gs = maxabs_d(dg, N * V), gn = grad_noise(d, S, a.student_dtype, ns, T, KDL_DTYPE_F64, N * V);
                const int kink = tvd_kink(d, N, V, S, a.student_dtype, a.ld_student, T, KDL_DTYPE_F64, V);
                for (int64_t i = 0; !kink && a.grad && a.grad_dtype == KDL_DTYPE_F64 && i < N; i++)
                    for (int64_t v = 0; v < V; v++) {
                        double x = ((double *)grad)[i * a.ld_grad + v];
                        CHECK(grad_close(x, dg[i * V + v], gs) || fabs(x - dg[i * V + v]) <= gn, "grad[%lld][%lld] %.17g, dense %.17g", (long long)i,
                              (long long)v, x, dg[i * V + v]);
                    }
            }
            if (a.info) CHECK(*info == dinfo, "info %lld, dense %lld", (long long)*info, (long long)dinfo);
        }
    }
done:
    for (int q = 0; q < P_COUNT; q++) fz_obuf_free(&o[q]);
    free(idx), free(lp), free(S), free(T), free((void *)a.labels);
    cur_d = NULL;
}

/* ----------------------------------------------------------------- shard */
#define KMAX 4
typedef struct shard_bufs {
    void *state;
    double *exchange;
    fz_obuf_t loss, info, valid, hs, mask;
    size_t state_bytes, ex_count;
} shard_bufs_t;

/* Bad arguments: the mutation, where it applies, its status. */
enum {
    M_RANK_NEG, M_RANK_BIG, M_LOCAL0, M_OFFSET_NEG, M_SLICE_OUT, M_SHARDS_BIG, M_RANK0_OFFSET, M_LAST_SHORT,
    M_SIZES_RANK, M_SIZES_LOCAL0, M_SIZES_SHARDS_BIG, M_TDTYPE, M_RANK_ORDER, M_COUNT
};
static const struct {
    const char *name;
    kdl_status_t want;
} shard_mutations[M_COUNT] = {
    {"shard_rank -1", KDL_STATUS_BAD_PARAM},
    {"shard_rank = num_shards", KDL_STATUS_BAD_PARAM},
    {"vocab_local 0", KDL_STATUS_BAD_SIZE},
    {"vocab_offset -1", KDL_STATUS_BAD_SIZE},
    {"slice past vocab", KDL_STATUS_BAD_SIZE},
    {"num_shards > vocab", KDL_STATUS_BAD_SIZE},
    {"rank 0 with a slice not at column 0", KDL_STATUS_BAD_PARAM},
    {"last rank's slice short of vocab", KDL_STATUS_BAD_PARAM},
    {"sizes: shard_rank = num_shards", KDL_STATUS_BAD_PARAM},
    {"sizes: vocab_local 0", KDL_STATUS_BAD_SIZE},
    {"sizes: num_shards > vocab", KDL_STATUS_BAD_SIZE},
    {"teacher dtype 4", KDL_STATUS_BAD_ENUM},
    {"rank r with fewer than r columns before its slice", KDL_STATUS_BAD_PARAM},
};

static int ambiguous_akl(const kdl_loss_desc_t *d, int64_t N, int64_t V, const void *T, kdl_dtype_t tdt, int64_t ldt)
{
    const double tau = d->temperature;
    for (int64_t i = 0; i < N; i++) {
        double lp[12], mx = -INFINITY, sum = 0;
        for (int64_t v = 0; v < V; v++) {
            lp[v] = kdl_load_as_double(T, tdt, i * ldt + v);
            if (lp[v] > mx) mx = lp[v];
        }
        if (!(mx > -INFINITY) || !isfinite(mx)) continue; /* invalid row: no head */
        for (int64_t v = 0; v < V; v++) sum += exp((lp[v] - mx) / tau);
        for (int64_t v = 0; v < V; v++) lp[v] = (lp[v] - mx) / tau - log(sum);
        /* two distinct logits whose probabilities (nearly) coincide */
        for (int64_t u = 0; u < V; u++)
            for (int64_t w = 0; w < u; w++) {
                double x = kdl_load_as_double(T, tdt, i * ldt + u), y = kdl_load_as_double(T, tdt, i * ldt + w);
                if (x == y) continue;
                double pu = exp(lp[u]), pw = exp(lp[w]);
                if (fabs(pu - pw) <= 1e-12 * fmax(pu, pw) || (pu < 1e-290 && pw < 1e-290)) return 1;
            }
        /* a cumulative mass (descending p) within 1e-9 of mu */
        if (d->head_rule != KDL_HEAD_TOPK) {
            double p[12];
            for (int64_t v = 0; v < V; v++) p[v] = exp(lp[v]);
            for (int64_t a = 1; a < V; a++)
                for (int64_t b = a; b > 0 && p[b] > p[b - 1]; b--) {
                    double t = p[b];
                    p[b] = p[b - 1];
                    p[b - 1] = t;
                }
            double c = 0;
            for (int64_t v = 0; v < V; v++) {
                c += p[v];
                if (fabs(c - d->mu) <= 1e-9) return 1;
            }
        }
    }
    return 0;
}

/* Row i is valid (DESIGN section 1): not ignored, no NaN or +inf logit and
 * a finite one, in student and teacher. */
static int row_valid(const int64_t *labels, const kdl_loss_desc_t *d, const void *S, kdl_dtype_t sdt, int64_t lds,
                     const void *T, kdl_dtype_t tdt, int64_t ldt, int64_t i, int64_t V)
{
    if (labels && labels[i] == d->ignore_index) return 0;
    int sf = 0, tf = 0;
    for (int64_t v = 0; v < V; v++) {
        double x = kdl_load_as_double(S, sdt, i * lds + v), y = kdl_load_as_double(T, tdt, i * ldt + v);
        if (isnan(x) || isnan(y) || x == INFINITY || y == INFINITY) return 0;
        sf |= x > -INFINITY;
        tf |= y > -INFINITY;
    }
    return sf && tf;
}

static void run_shard(fz_src_t *s, kdl_loss_desc_t *d)
{
    const int64_t K = 1 + fz_u8(s) % KMAX;
    const int64_t V = K + fz_u8(s) % 9;
    int64_t w[KMAX];
    for (int64_t r = 0; r < K; r++) w[r] = 1;
    for (int64_t x = K; x < V; x++) w[fz_u8(s) % K]++;
    const int64_t N = fz_u8(s) % 5;
    const kdl_dtype_t sdt = (kdl_dtype_t)(fz_u8(s) % 4), tdt = (kdl_dtype_t)(fz_u8(s) % 4);
    const uint8_t gb = fz_u8(s);
    const kdl_dtype_t gdt = gb % 3 == 0 ? KDL_DTYPE_F64 : gb % 3 == 1 ? KDL_DTYPE_F32 : sdt;
    const uint8_t ld = fz_u8(s), fl = fz_u8(s);
    const kdl_dtype_t odt = (fl & 128) ? KDL_DTYPE_F32 : KDL_DTYPE_F64;
    const uint8_t mb = fz_u8(s), mr = fz_u8(s);
    const int mutation = mb < 96 ? mb % M_COUNT : -1;
    const int64_t mshard = mr % K;
    const int64_t lds = V + (ld & 3), ldt = V + ((ld >> 2) & 3), ldg = V + ((ld >> 4) & 3);
    int64_t *labels = read_labels(s, fl & 2, N, d);
    const int raw = (fl & 64) != 0;
    const int64_t ns = N ? (N - 1) * lds + V : 0, nt = N ? (N - 1) * ldt + V : 0;
    void *S = zalloc((size_t)ns * fz_esize(sdt)), *T = zalloc((size_t)nt * fz_esize(tdt));
    fill(s, S, sdt, ns, raw);
    fill(s, T, tdt, nt, raw);
    fz_obuf_t gbuf;
    void *grad = fz_obuf_make(&gbuf, (size_t)(N * ldg) * fz_esize(gdt));

    cur_d = d;
    cur_what = "shard";
    cur_N = N, cur_V = V, cur_S = S, cur_sdt = sdt, cur_lds = lds, cur_T = T, cur_tdt = tdt, cur_ldt = ldt;

    kdl_shard_args_t a[KMAX];
    shard_bufs_t b[KMAX];
    memset(b, 0, sizeof b);
    const size_t nloss = d->reduction == KDL_REDUCTION_NONE ? (size_t)N : 1;
    int64_t off = 0;
    for (int64_t r = 0; r < K; r++) {
        kdl_shard_args_t *x = &a[r];
        kdl_shard_args_init(x);
        x->rows = N;
        x->vocab = V;
        x->vocab_offset = off;
        x->vocab_local = w[r];
        x->shard_rank = (int32_t)r;
        x->num_shards = (int32_t)K;
        x->student = (const char *)S + off * (int64_t)fz_esize(sdt);
        x->ld_student = lds;
        x->student_dtype = sdt;
        x->teacher = (const char *)T + off * (int64_t)fz_esize(tdt);
        x->ld_teacher = ldt;
        x->teacher_dtype = tdt;
        x->labels = labels;
        if (fl & 1) {
            x->grad = (char *)grad + off * (int64_t)fz_esize(gdt);
            x->ld_grad = ldg;
            x->grad_dtype = gdt;
        }
        x->out_dtype = odt;
        x->loss = fz_obuf_make(&b[r].loss, nloss * fz_esize(odt));
        int64_t *p = (int64_t *)fz_obuf_make(&b[r].info, 8);
        if (fl & 4) x->info = p;
        p = (int64_t *)fz_obuf_make(&b[r].valid, 8);
        if (fl & 8) x->valid_rows = p;
        p = (int64_t *)fz_obuf_make(&b[r].hs, (size_t)N * 8);
        if (fl & 16) x->stat_head_size = p;
        unsigned char *m = (unsigned char *)fz_obuf_make(&b[r].mask, (size_t)(N * w[r]));
        if (fl & 32) x->head_mask = m;
        off += w[r];
    }

    /* sizes: the same for every shard */
    int nsteps = 0;
    kdl_status_t st = KDL_STATUS_SUCCESS;
    for (int64_t r = 0; r < K; r++) {
        size_t sb = 0, ec = 0;
        int n = 0;
        kdl_status_t q = kdl_shard_sizes(d, &a[r], &sb, &ec, &n);
        CHECK(fz_known_status(q), "sizes status %d", (int)q);
        if (r == 0) st = q, nsteps = n;
        CHECK(q == st, "shard %lld: sizes %s, shard 0 %s", (long long)r, kdl_status_string(q), kdl_status_string(st));
        if (q != KDL_STATUS_SUCCESS) continue;
        CHECK(n == nsteps && n >= 4 && n <= 16, "shard %lld: %d steps, shard 0 %d", (long long)r, n, nsteps);
        b[r].state_bytes = sb;
        b[r].ex_count = ec;
        b[r].state = zalloc(sb);
        b[r].exchange = (double *)zalloc((ec ? ec : 1) * sizeof(double));
        memset(b[r].state, FZ_SENTINEL, sb);
        memset(b[r].exchange, FZ_SENTINEL, (ec ? ec : 1) * sizeof(double));
        a[r].state = b[r].state;
        a[r].exchange = b[r].exchange;
    }
    if (st != KDL_STATUS_SUCCESS) {
        fz_show("shard sizes", st);
        CHECK(kdl_get_last_error()[0] != '\0', "sizes: %s without detail", kdl_status_string(st));
        CHECK((unsigned)d->divergence >= KDL_DIV_COUNT_, "sizes refused a valid problem: %s", kdl_status_string(st));
        goto done;
    }

    /* one bad argument: its status, nothing written */
    if (mutation >= 0) {
        kdl_shard_args_t x = a[mshard];
        const int baseline = kdl_shard_validate(d, &x, 1) == KDL_STATUS_SUCCESS;
        int applies = 1, on_sizes = 0;
        switch (mutation) {
        case M_RANK_NEG: x.shard_rank = -1; break;
        case M_RANK_BIG: x.shard_rank = (int32_t)K; break;
        case M_LOCAL0: x.vocab_local = 0; break;
        case M_OFFSET_NEG: x.vocab_offset = -1; break;
        case M_SLICE_OUT: x.vocab_offset = V - x.vocab_local + 1; break;
        case M_SHARDS_BIG: x.num_shards = (int32_t)V + 1; x.shard_rank = 0; x.vocab_offset = 0; break;
        case M_RANK0_OFFSET: applies = x.vocab_offset > 0; x.shard_rank = 0; break;
        case M_LAST_SHORT: applies = K > 1 && x.vocab_local > 1 && x.shard_rank == K - 1; x.vocab_local--; break;
        case M_SIZES_RANK: x.shard_rank = (int32_t)K; on_sizes = 1; break;
        case M_SIZES_LOCAL0: x.vocab_local = 0; on_sizes = 1; break;
        case M_SIZES_SHARDS_BIG: x.num_shards = (int32_t)V + 1; on_sizes = 1; break;
        case M_TDTYPE: x.teacher_dtype = (kdl_dtype_t)4; break;
        case M_RANK_ORDER: /* a rank above its slice's first column */
            applies = x.vocab_offset + 1 < K;
            x.shard_rank = (int32_t)(x.vocab_offset + 1);
            break;
        }
        if (applies && on_sizes) {
            size_t sb = 777, ec = 777;
            int n = 777;
            kdl_status_t q = kdl_shard_sizes(d, &x, &sb, &ec, &n);
            fz_show(shard_mutations[mutation].name, q);
            if ((unsigned)d->divergence < KDL_DIV_COUNT_)
                CHECK(q == shard_mutations[mutation].want, "sizes with %s: %s (%s)", shard_mutations[mutation].name,
                      kdl_status_string(q), kdl_get_last_error());
            CHECK(sb == 777 && ec == 777 && n == 777, "sizes with %s wrote an output", shard_mutations[mutation].name);
        } else if (applies) {
            kdl_shard_op_t op = (kdl_shard_op_t)77;
            int64_t cnt = 777;
            kdl_status_t q = kdl_ref_shard_step(d, &x, 0, &op, &cnt);
            fz_show(shard_mutations[mutation].name, q);
            CHECK(q != KDL_STATUS_SUCCESS, "%s accepted", shard_mutations[mutation].name);
            if (baseline)
                CHECK(q == shard_mutations[mutation].want, "%s: %s (%s), expected %s", shard_mutations[mutation].name,
                      kdl_status_string(q), kdl_get_last_error(), kdl_status_string(shard_mutations[mutation].want));
            CHECK(op == (kdl_shard_op_t)77 && cnt == 777, "%s: op or count written", shard_mutations[mutation].name);
            CHECK(fz_obuf_untouched(&b[mshard].loss) && fz_obuf_untouched(&gbuf) && fz_obuf_untouched(&b[mshard].info) &&
                      fz_obuf_untouched(&b[mshard].valid) && fz_obuf_untouched(&b[mshard].hs) &&
                      fz_obuf_untouched(&b[mshard].mask),
                  "%s: an output written", shard_mutations[mutation].name);
            for (size_t q2 = 0; q2 < b[mshard].state_bytes; q2++)
                CHECK(((unsigned char *)b[mshard].state)[q2] == FZ_SENTINEL, "%s: state written",
                      shard_mutations[mutation].name);
        }
        goto done;
    }

    /* the protocol */
    for (int step = 0; step < nsteps; step++) {
        kdl_shard_op_t op0 = KDL_SHARD_OP_DONE;
        int64_t cnt0 = 0;
        for (int64_t r = 0; r < K; r++) {
            kdl_shard_op_t op = (kdl_shard_op_t)77;
            int64_t cnt = -1;
            kdl_status_t q = kdl_ref_shard_step(d, &a[r], step, &op, &cnt);
            CHECK(fz_known_status(q), "step %d status %d", step, (int)q);
            if (q != KDL_STATUS_SUCCESS) {
                fz_show("shard protocol", q);
                CHECK(step == 0 && r == 0, "step %d shard %lld failed (%s) after shard 0 step 0 passed", step,
                      (long long)r, kdl_status_string(q));
                CHECK(kdl_get_last_error()[0] != '\0', "%s without detail", kdl_status_string(q));
                CHECK(!desc_in_range(d, V), "step 0 refused a valid problem: %s (%s)",
                      kdl_status_string(q), kdl_get_last_error());
                check_desc_status(q, d);
                CHECK(fz_obuf_untouched(&b[0].loss) && fz_obuf_untouched(&gbuf), "output written on failure");
                for (size_t q2 = 0; q2 < b[0].state_bytes; q2++)
                    CHECK(((unsigned char *)b[0].state)[q2] == FZ_SENTINEL, "state written on failure");
                goto done;
            }
            if (r == 0) op0 = op, cnt0 = cnt;
            CHECK(op == op0 && cnt == cnt0, "step %d: shard %lld op %d count %lld, shard 0 op %d count %lld", step,
                  (long long)r, (int)op, (long long)cnt, (int)op0, (long long)cnt0);
            CHECK(cnt >= 0 && (size_t)cnt <= b[r].ex_count, "step %d: count %lld > exchange %zu", step, (long long)cnt,
                  b[r].ex_count);
        }
        CHECK((op0 == KDL_SHARD_OP_DONE) == (step == nsteps - 1), "step %d of %d: op %d", step, nsteps, (int)op0);
        for (int64_t c = 0; c < cnt0; c++) { /* the all-reduce, in rank order */
            double acc = b[0].exchange[c];
            for (int64_t r = 1; r < K; r++)
                acc = op0 == KDL_SHARD_OP_MAX ? (b[r].exchange[c] > acc ? b[r].exchange[c] : acc) : acc + b[r].exchange[c];
            for (int64_t r = 0; r < K; r++) b[r].exchange[c] = acc;
        }
    }
    CHECK(desc_in_range(d, V), "descriptor out of range accepted");
    fz_show("shard protocol", KDL_STATUS_SUCCESS);

    /* against the dense reference on the whole rows */
    {
        double dl[4], dg[4 * 12];
        int64_t dinfo = -1, dvalid = -1, dhs[4];
        kdl_status_t ds = dense(d, N, V, S, sdt, lds, T, tdt, ldt, labels, dl, dg, &dinfo, &dvalid, dhs);
        CHECK(ds == KDL_STATUS_SUCCESS, "dense reference refused: %s", kdl_status_string(ds));
        for (int64_t r = 1; r < K; r++)
            CHECK(memcmp(b[r].loss.p, b[0].loss.p, b[0].loss.bytes) == 0, "shard %lld's loss differs", (long long)r);
        const int cmp = d->divergence != KDL_DIV_AKL || !ambiguous_akl(d, N, V, T, tdt, ldt);
        if (fl & 4) CHECK(*(int64_t *)b[0].info.p == dinfo, "info %lld, dense %lld", (long long)*(int64_t *)b[0].info.p,
                          (long long)dinfo);
        if (fl & 8) CHECK(*(int64_t *)b[0].valid.p == dvalid, "valid %lld, dense %lld",
                          (long long)*(int64_t *)b[0].valid.p, (long long)dvalid);
        if (!cmp) goto done;
        const double gn = grad_noise(d, S, sdt, ns, T, tdt, nt);
        const double lrt = odt == KDL_DTYPE_F32 ? 1e-6 : 1e-9;
        /* a loss near 0 (p close to q) is a sum of cancelling terms, and the
         * shards' normaliser differs from the dense one in the last bit: an
         * absolute slack of the size of those terms */
        const double ln = gn * d->temperature * (double)(N > 0 ? N : 1);
        for (size_t i = 0; i < nloss; i++) {
            double x = kdl_load_as_double(b[0].loss.p, odt, (int64_t)i), y = dl[i];
            if (odt == KDL_DTYPE_F32) y = (double)(float)y;
            CHECK(fz_close(x, y, lrt, 1e-12) || fabs(x - dl[i]) <= ln, "loss[%zu] %.17g, dense %.17g", i, x, y);
            CHECK(sign_ok(x, d->scale, 1e3 * ln), "loss[%zu] %g, scale %g", i, x, d->scale);
        }
        if ((fl & 1) && !tvd_kink(d, N, V, S, sdt, lds, T, tdt, ldt)) {
            const double gs = maxabs_d(dg, N * V);
            const double grt = gdt == KDL_DTYPE_F64 ? 1e-9 : gdt == KDL_DTYPE_F32 ? 1e-6 : 1e-2;
            for (int64_t i = 0; i < N; i++)
                for (int64_t v = 0; v < V; v++) {
                    double x = kdl_load_as_double(grad, gdt, i * ldg + v), y = dg[i * V + v], y_raw = y;
                    if (gdt != KDL_DTYPE_F64) { /* the dense value rounded to the gradient's dtype */
                        double tmp;
                        kdl_store_from_double(&tmp, gdt, 0, y);
                        y = kdl_load_as_double(&tmp, gdt, 0);
                    }
                    /* f16 flushes below its smallest subnormal, 2^-24 */
                    const double floor16 = gdt == KDL_DTYPE_F16 ? 0x1p-24 : 0;
                    /* noise beyond the gradient dtype's range rounds to +-inf */
                    const double dmax = gdt == KDL_DTYPE_F64 ? DBL_MAX : gdt == KDL_DTYPE_F16 ? 65504.0 : FLT_MAX;
                    CHECK(fz_close(x, y, grt, grt * gs + floor16 + 1e-300) || fabs(x - y_raw) <= gn ||
                              (isinf(x) && gn >= dmax),
                          "grad[%lld][%lld] %.17g, dense %.17g", (long long)i, (long long)v, x, y);
                }
        }
        if ((fl & 16) && d->divergence == KDL_DIV_AKL)
            for (int64_t i = 0; i < N; i++) {
                int64_t h = ((int64_t *)b[0].hs.p)[i];
                int64_t want = row_valid(labels, d, S, sdt, lds, T, tdt, ldt, i, V) ? dhs[i] : 0;
                CHECK(h == want, "row %lld: head size %lld, dense %lld", (long long)i, (long long)h, (long long)want);
            }
    }
done:
    for (int64_t r = 0; r < K; r++) {
        fz_obuf_free(&b[r].loss), fz_obuf_free(&b[r].info), fz_obuf_free(&b[r].valid), fz_obuf_free(&b[r].hs);
        fz_obuf_free(&b[r].mask);
        free(b[r].state), free(b[r].exchange);
    }
    fz_obuf_free(&gbuf);
    free(S), free(T), free(labels);
    cur_d = NULL;
}

/* ----------------------------------------------------------- fused linear */
enum { F_LOSS, F_DH, F_DW, F_INFO, F_VALID, F_BAD, F_COUNT };

static void run_fused(fz_src_t *s, kdl_loss_desc_t *d)
{
    kdl_fused_linear_args_t a;
    kdl_fused_linear_args_init(&a);
    const int64_t N = fz_u8(s) % 4, D = 1 + fz_u8(s) % 4, V = 1 + fz_u8(s) % 8;
    a.rows = N;
    a.hidden = D;
    a.vocab = V;
    a.hidden_dtype = fz_dtype(fz_u8(s));
    a.weight_dtype = fz_dtype(fz_u8(s));
    a.teacher_dtype = fz_dtype(fz_u8(s));
    a.grad_dtype = fz_dtype(fz_u8(s));
    const uint8_t ld = fz_u8(s), fl = fz_u8(s);
    a.out_dtype = (ld & 128) ? KDL_DTYPE_F32 : KDL_DTYPE_F64;
    a.ld_hidden = D + (ld & 1);
    a.ld_weight = D + ((ld >> 1) & 1);
    a.ld_teacher = V + ((ld >> 2) & 3);
    a.ld_grad_hidden = D + ((ld >> 4) & 1);
    a.ld_grad_weight = D + ((ld >> 5) & 1);
    if (fl & 64) a.chunk_rows = (int64_t)fz_u8(s) - 1;
    int64_t *labels = read_labels(s, fl & 4, N, d);
    a.labels = labels;
    const int raw = (fl & 32) != 0, layer = (fl & 128) != 0;
    const int64_t nh = N ? (N - 1) * a.ld_hidden + D : 0, nw = (V - 1) * a.ld_weight + D;
    int64_t nt = N ? (N - 1) * a.ld_teacher + V : 0;
    void *H = zalloc((size_t)nh * fz_esize(a.hidden_dtype)), *W = zalloc((size_t)nw * fz_esize(a.weight_dtype));
    fill(s, H, a.hidden_dtype, nh, raw);
    fill(s, W, a.weight_dtype, nw, raw);
    a.hidden_states = H;
    a.weight = W;
    /* the teacher: logits as given; or (layer) H_t W_t^T (+ b_t), formed here
     * in float64 as the oracle's teacher logits Tm [N, V]; or (sparse) top-k
     * log-probs, the oracle then the sparse reference on the same logits */
    void *T = NULL, *Ht = NULL, *Wt = NULL, *bt = NULL, *lp = NULL;
    int64_t *idx = NULL, nl = 0;
    double Tm[4 * 8] = {0};
    int tknown = 1, sparse = 0, want_bad = 0;
    if (layer) {
        const int64_t Dt = 1 + fz_u8(s) % 4;
        const kdl_dtype_t ldt = fz_dtype(fz_u8(s));
        const uint8_t tl = fz_u8(s);
        sparse = (tl & 8) != 0;
        want_bad = (tl & 16) != 0;
        tknown = kdl_dtype_size(ldt) != 0;
        a.teacher = NULL;
        if (sparse) {
            a.k = fz_u8(s) % (V + 2);
            a.sparse_mode = (kdl_sparse_mode_t)(fz_u8(s) % 3);
            a.teacher_logprobs_dtype = ldt;
            const int64_t kk = a.k > 0 ? a.k : 1;
            a.ld_teacher_indices = kk + (tl & 1);
            a.ld_teacher_logprobs = kk + ((tl >> 1) & 1);
            const int64_t ni = N ? (N - 1) * a.ld_teacher_indices + kk : 0;
            nl = N ? (N - 1) * a.ld_teacher_logprobs + kk : 0;
            idx = (int64_t *)zalloc((size_t)ni * 8);
            lp = zalloc((size_t)nl * fz_esize(ldt));
            read_indices(s, idx, N, a.k, a.ld_teacher_indices, V);
            fill(s, lp, ldt, nl, raw);
            a.teacher_indices = idx;
            a.teacher_logprobs = lp;
        } else {
            a.teacher_hidden_size = Dt;
            a.teacher_linear_dtype = ldt;
            a.ld_teacher_hidden = Dt + (tl & 1);
            a.ld_teacher_weight = Dt + ((tl >> 1) & 1);
            const int64_t nht = N ? (N - 1) * a.ld_teacher_hidden + Dt : 0, nwt = (V - 1) * a.ld_teacher_weight + Dt;
            Ht = zalloc((size_t)nht * fz_esize(ldt)), Wt = zalloc((size_t)nwt * fz_esize(ldt));
            fill(s, Ht, ldt, nht, raw);
            fill(s, Wt, ldt, nwt, raw);
            if (tl & 4) {
                bt = zalloc((size_t)V * fz_esize(ldt));
                fill(s, bt, ldt, V, raw);
            }
            a.teacher_hidden = Ht;
            a.teacher_weight = Wt;
            a.teacher_bias = bt;
            for (int64_t i = 0; tknown && i < N; i++)
                for (int64_t v = 0; v < V; v++) {
                    double acc = 0;
                    for (int64_t k = 0; k < Dt; k++)
                        acc += kdl_load_as_double(Ht, ldt, i * a.ld_teacher_hidden + k) *
                               kdl_load_as_double(Wt, ldt, v * a.ld_teacher_weight + k);
                    if (bt) acc += kdl_load_as_double(bt, ldt, v);
                    Tm[i * V + v] = acc;
                }
            nt = N * V;
        }
    } else {
        T = zalloc((size_t)nt * fz_esize(a.teacher_dtype));
        fill(s, T, a.teacher_dtype, nt, raw);
        a.teacher = T;
        tknown = kdl_dtype_size(a.teacher_dtype) != 0;
    }
    /* the teacher the oracle compares with (sparse: the log-probs, for the
     * noise bound only) */
    const void *To = sparse ? lp : layer ? (const void *)Tm : T;
    const kdl_dtype_t tdo = sparse ? a.teacher_logprobs_dtype : layer ? KDL_DTYPE_F64 : a.teacher_dtype;
    const int64_t ldto = layer ? V : a.ld_teacher;
    if (sparse) nt = nl;
    fz_obuf_t o[F_COUNT];
    memset(o, 0, sizeof o);
    const size_t eg = fz_esize(a.grad_dtype), eo = fz_esize(a.out_dtype);
    const size_t nloss = d->reduction == KDL_REDUCTION_NONE ? (size_t)N : 1;
    a.loss = fz_obuf_make(&o[F_LOSS], nloss * eo);
    void *dH = fz_obuf_make(&o[F_DH], (size_t)(N * a.ld_grad_hidden) * eg);
    void *dW = fz_obuf_make(&o[F_DW], (size_t)(V * a.ld_grad_weight) * eg);
    if (fl & 1) a.grad_hidden = dH;
    if (fl & 2) a.grad_weight = dW;
    int64_t *info = (int64_t *)fz_obuf_make(&o[F_INFO], 8), *valid = (int64_t *)fz_obuf_make(&o[F_VALID], 8);
    if (fl & 8) a.info = info;
    if (fl & 16) a.valid_rows = valid;
    int64_t *badr = (int64_t *)fz_obuf_make(&o[F_BAD], 8);
    if (want_bad) a.bad_index_rows = badr;

    /* the logits H W^T, in float64, for the dense reference */
    double L[4 * 8], dl[4], dg[4 * 8];
    const int known = kdl_dtype_size(a.hidden_dtype) && kdl_dtype_size(a.weight_dtype);
    for (int64_t i = 0; known && i < N; i++)
        for (int64_t v = 0; v < V; v++) {
            double acc = 0;
            for (int64_t k = 0; k < D; k++)
                acc += kdl_load_as_double(H, a.hidden_dtype, i * a.ld_hidden + k) *
                       kdl_load_as_double(W, a.weight_dtype, v * a.ld_weight + k);
            L[i * V + v] = acc;
        }
    cur_d = d;
    cur_what = "fused";
    cur_N = N, cur_V = V, cur_S = L, cur_sdt = KDL_DTYPE_F64, cur_lds = V;
    cur_T = sparse ? NULL : To, cur_tdt = tdo, cur_ldt = ldto;
    const kdl_status_t st = kdl_ref_fused_linear_loss(d, &a);
    fz_show("fused", st);
    CHECK(fz_known_status(st), "status %d", (int)st);
    if (st != KDL_STATUS_SUCCESS) {
        CHECK(kdl_get_last_error()[0] != '\0', "%s without detail", kdl_status_string(st));
        for (int q = 0; q < F_COUNT; q++) CHECK(fz_obuf_untouched(&o[q]), "output %d written on %s", q, kdl_status_string(st));
        check_desc_status(st, d);
        goto done;
    }
    CHECK(desc_in_range(d, V), "descriptor out of range accepted");
    CHECK(known && tknown, "dtype accepted");
    {
        int64_t dinfo = -1, dvalid = -1, dbad = -1;
        kdl_status_t ds;
        if (sparse) { /* the sparse reference on the fuzzer's logits H W^T */
            kdl_sparse_args_t sa;
            kdl_sparse_args_init(&sa);
            sa.mode = a.sparse_mode;
            sa.rows = N, sa.vocab = V, sa.k = a.k;
            sa.student = L, sa.ld_student = V, sa.student_dtype = KDL_DTYPE_F64;
            sa.teacher_indices = idx, sa.ld_indices = a.ld_teacher_indices;
            sa.teacher_logprobs = lp, sa.ld_logprobs = a.ld_teacher_logprobs, sa.teacher_dtype = tdo;
            sa.labels = labels;
            sa.grad = dg, sa.ld_grad = V, sa.grad_dtype = KDL_DTYPE_F64;
            sa.out_dtype = KDL_DTYPE_F64, sa.loss = dl;
            sa.info = &dinfo, sa.valid_rows = &dvalid, sa.bad_index_rows = &dbad;
            ds = kdl_ref_sparse_loss(d, &sa);
            if (a.bad_index_rows) CHECK(*badr == dbad, "bad_index_rows %lld, sparse %lld", (long long)*badr, (long long)dbad);
        } else {
            ds = dense(d, N, V, L, KDL_DTYPE_F64, V, To, tdo, ldto, labels, dl, dg, &dinfo, &dvalid, NULL);
            CHECK(fz_obuf_untouched(&o[F_BAD]), "bad_index_rows written without a sparse teacher");
        }
        CHECK(ds == KDL_STATUS_SUCCESS, "%s reference refused: %s", sparse ? "sparse" : "dense", kdl_status_string(ds));
        if (a.info) CHECK(*info == dinfo, "info %lld, dense %lld", (long long)*info, (long long)dinfo);
        if (a.valid_rows) CHECK(*valid == dvalid, "valid %lld, dense %lld", (long long)*valid, (long long)dvalid);
        const double lrt = a.out_dtype == KDL_DTYPE_F32 ? 1e-6 : 1e-12;
        for (size_t i = 0; i < nloss; i++) {
            double x = kdl_load_as_double(a.loss, a.out_dtype, (int64_t)i), y = dl[i];
            if (a.out_dtype == KDL_DTYPE_F32) y = (double)(float)y;
            CHECK(fz_close(x, y, lrt, 0), "loss[%zu] %.17g, dense %.17g", i, x, y);
            /* sparse: the sparse call's own sign rules are fuzzed in run_sparse;
             * here the loss equals the sparse reference */
            if (!sparse)
                CHECK(sign_ok(x, d->scale, 1e3 * grad_noise(d, L, KDL_DTYPE_F64, N * V, To, tdo, nt) *
                                           d->temperature * (double)(N * V + 1)),
                  "loss[%zu] %g, scale %g", i, x, d->scale);
        }
        if (a.grad_dtype != KDL_DTYPE_F64) goto done; /* rounding of 16-bit and f32 products: not compared */
        /* dH = dL W, dW = dL^T H; a non-finite operand poisons them as a GEMM would */
        if (a.grad_hidden) /* dH[i][k] = sum_v dL[i][v] W[v][k] */
            check_product("dH = dL W", (const double *)dH, a.ld_grad_hidden, N, D, V, dg, V, 1, W, a.weight_dtype,
                          a.ld_weight);
        if (a.grad_weight) /* dW[v][k] = sum_i dL[i][v] H[i][k] */
            check_product("dW = dL^T H", (const double *)dW, a.ld_grad_weight, V, D, N, dg, 1, V, H, a.hidden_dtype,
                          a.ld_hidden);
    }
done:
    for (int q = 0; q < F_COUNT; q++) fz_obuf_free(&o[q]);
    free(H), free(W), free(T), free(Ht), free(Wt), free(bt), free(idx), free(lp), free(labels);
    cur_d = NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_src_t s = {data, size};
    const uint8_t which = fz_u8(&s) % 3;
    kdl_loss_desc_t d;
    read_desc(&s, &d);
    if (which == 0)
        run_sparse(&s, &d);
    else if (which == 1)
        run_shard(&s, &d);
    else
        run_fused(&s, &d);
    return 0;
}
