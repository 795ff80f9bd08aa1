/*
 * tests/test_shard_ref.c - the vocabulary-parallel reference (kdloss_ext.h
 * part 2) against the unsharded reference: V split into 1, 2, 4 and 8
 * shards (even and uneven), the all-reduces done in-process; loss and
 * gradient must agree to 1e-12 relative, and the AKL head must be exactly
 * the same tokens (checked against the test's own sort), ties across shard
 * boundaries included.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ext_internal.h"
#include "internal.h"
#include "kdl_ext_fixtures.h"
#include "kdl_test.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"

#define MAXN 6
#define MAXV 96
#define MAXR 8


typedef struct result {
    double loss[MAXN];
    double grad[MAXN * MAXV];
    unsigned char mask[MAXN * MAXV];
    int64_t head_size[MAXN];
    int64_t info, valid;
    int steps;
} result_t;

static void random_rows(uint64_t seed, double *x, int64_t n, double sigma)
{
    kdl_rng_t g = {seed};
    kdl_fill_logits(&g, x, n, sigma);
}

/* Runs the protocol over R shards with slice widths w[0..R) on typed
 * [N, V] matrices (views: ld = V), reducing in-process. */
static void run_sharded(const kdl_loss_desc_t *d, const void *S, kdl_dtype_t sdt, const void *T, kdl_dtype_t tdt,
                        const int64_t *labels, int64_t N, int64_t V, int R, const int64_t *w, result_t *out)
{
    memset(out, 0, sizeof *out);
    kdl_shard_args_t a[MAXR];
    void *state[MAXR];
    double *ex[MAXR];
    double loss[MAXR][MAXN];
    int64_t info[MAXR], valid[MAXR];
    size_t sb = 0, ec = 0;
    int nsteps = 0;
    int64_t off = 0;
    for (int r = 0; r < R; r++) {
        kdl_shard_args_init(&a[r]);
        a[r].rows = N;
        a[r].vocab = V;
        a[r].vocab_offset = off;
        a[r].vocab_local = w[r];
        a[r].shard_rank = r;
        a[r].num_shards = R;
        a[r].student = (const char *)S + off * (int64_t)kdl_dtype_size(sdt);
        a[r].ld_student = V;
        a[r].student_dtype = sdt;
        a[r].teacher = (const char *)T + off * (int64_t)kdl_dtype_size(tdt);
        a[r].ld_teacher = V;
        a[r].teacher_dtype = tdt;
        a[r].labels = labels;
        a[r].grad = out->grad + off;
        a[r].ld_grad = V;
        a[r].grad_dtype = KDL_DTYPE_F64;
        a[r].out_dtype = KDL_DTYPE_F64;
        a[r].loss = loss[r];
        a[r].info = &info[r];
        a[r].valid_rows = &valid[r];
        a[r].stat_head_size = r == 0 ? out->head_size : NULL;
        a[r].head_mask = NULL;
        cr_assert_eq(kdl_shard_sizes(d, &a[r], &sb, &ec, &nsteps), KDL_STATUS_SUCCESS);
        state[r] = calloc(1, sb);
        ex[r] = (double *)calloc(ec ? ec : 1, sizeof(double));
        a[r].state = state[r];
        a[r].exchange = ex[r];
        off += w[r];
    }
    cr_assert_eq(off, V, "slices must cover the vocabulary");
    unsigned char *masks[MAXR];
    for (int r = 0; r < R; r++) {
        masks[r] = (unsigned char *)calloc((size_t)(N * w[r]) + 1, 1);
        a[r].head_mask = d->divergence == KDL_DIV_AKL ? masks[r] : NULL;
    }
    double *tmp = (double *)calloc(ec ? ec : 1, sizeof(double));
    for (int step = 0; step < nsteps; step++) {
        kdl_shard_op_t op0 = KDL_SHARD_OP_DONE;
        int64_t cnt0 = 0;
        for (int r = 0; r < R; r++) {
            kdl_shard_op_t op;
            int64_t cnt;
            kdl_status_t st = kdl_ref_shard_step(d, &a[r], step, &op, &cnt);
            cr_assert_eq(st, KDL_STATUS_SUCCESS, "step %d shard %d: %s", step, r, kdl_get_last_error());
            if (r == 0) {
                op0 = op;
                cnt0 = cnt;
            }
            cr_assert(op == op0 && cnt == cnt0, "shards disagree on step %d", step);
            cr_assert((size_t)cnt <= ec, "count beyond the exchange buffer");
        }
        if (step == nsteps - 1) cr_assert_eq(op0, KDL_SHARD_OP_DONE);
        if (op0 == KDL_SHARD_OP_DONE) {
            cr_assert_eq(step, nsteps - 1, "DONE before the last step");
            break;
        }
        for (int64_t j = 0; j < cnt0; j++) {
            double acc = ex[0][j];
            for (int r = 1; r < R; r++) acc = op0 == KDL_SHARD_OP_MAX ? fmax(acc, ex[r][j]) : acc + ex[r][j];
            tmp[j] = acc;
        }
        for (int r = 0; r < R; r++) memcpy(ex[r], tmp, (size_t)cnt0 * sizeof(double));
    }
    out->steps = nsteps;
    int64_t nl = d->reduction == KDL_REDUCTION_NONE ? N : 1;
    for (int r = 0; r < R; r++) {
        for (int64_t i = 0; i < nl; i++) {
            int same = (isnan(loss[r][i]) && isnan(loss[0][i])) || loss[r][i] == loss[0][i];
            cr_expect(same, "shard %d reports a different loss", r);
        }
        cr_expect(info[r] == info[0] && valid[r] == valid[0]);
    }
    memcpy(out->loss, loss[0], (size_t)nl * sizeof(double));
    out->info = info[0];
    out->valid = valid[0];
    off = 0;
    for (int r = 0; r < R; r++) {
        for (int64_t i = 0; i < N; i++)
            for (int64_t v = 0; v < w[r]; v++) out->mask[i * V + off + v] = masks[r][i * w[r] + v];
        off += w[r];
        free(masks[r]);
        free(state[r]);
        free(ex[r]);
    }
    free(tmp);
}

static void run_dense(const kdl_loss_desc_t *d, const void *S, kdl_dtype_t sdt, const void *T, kdl_dtype_t tdt,
                      const int64_t *labels, int64_t N, int64_t V, result_t *out)
{
    memset(out, 0, sizeof *out);
    kdl_loss_args_t a = kdl_ext_dense_args(N, V, S, sdt, T, tdt, out->grad, out->loss);
    a.labels = labels;
    a.stat_head_size = out->head_size;
    a.info = &out->info;
    a.valid_rows = &out->valid;
    cr_assert_eq(kdl_ref_loss_forward_backward(d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
}

/* The AKL head of one f64 row by the test's own full sort: teacher logit
 * descending, ties by lower index, cumulative probabilities. */
static void expected_head(const kdl_loss_desc_t *d, const double *t, int64_t V, unsigned char *mask)
{
    int64_t ord[MAXV];
    double p[MAXV], mx = -INFINITY, s = 0;
    for (int64_t v = 0; v < V; v++) mx = fmax(mx, t[v] / d->temperature);
    for (int64_t v = 0; v < V; v++) s += exp(t[v] / d->temperature - mx);
    for (int64_t v = 0; v < V; v++) {
        ord[v] = v;
        p[v] = exp(t[v] / d->temperature - mx) / s;
    }
    for (int64_t a = 0; a < V; a++)
        for (int64_t b = a + 1; b < V; b++)
            if (t[ord[b]] > t[ord[a]] || (t[ord[b]] == t[ord[a]] && ord[b] < ord[a])) {
                int64_t x = ord[a];
                ord[a] = ord[b];
                ord[b] = x;
            }
    int64_t h = 0;
    if (d->head_rule == KDL_HEAD_TOPK)
        h = d->top_k;
    else {
        double c = 0;
        for (int64_t k = 0; k < V; k++) {
            double prev = c;
            c += p[ord[k]];
            if (d->head_rule == KDL_HEAD_REFERENCE ? c <= d->mu : prev < d->mu)
                h = k + 1;
            else
                break;
        }
        if (h < 1) h = 1;
    }
    memset(mask, 0, (size_t)V);
    for (int64_t k = 0; k < h; k++) mask[ord[k]] = 1;
}

/* Splits: 1 shard, 2 even, 4 uneven, 8 uneven (V >= 8). */
static int splits(int which, int64_t V, int64_t *w)
{
    switch (which) {
    case 0: w[0] = V; return 1;
    case 1: w[0] = V / 2; w[1] = V - V / 2; return 2;
    case 2: w[0] = 1; w[1] = V / 3; w[2] = V / 4; w[3] = V - 1 - V / 3 - V / 4; return 4;
    default: {
        int64_t used = 0;
        for (int r = 0; r < 7; r++) {
            w[r] = 1 + (r * 5) % 9;
            used += w[r];
        }
        w[7] = V - used;
        return 8;
    }
    }
}

static void compare(const char *what, const kdl_loss_desc_t *d, const result_t *sh, const result_t *de, int64_t N,
                    int64_t V)
{
    /* 1e-12 relative: to each value for the loss; for the gradient to the
     * largest gradient entry (an entry that is a difference of two nearly
     * equal terms, qg - q G, has only absolute accuracy) */
    kdl_tol_t tol = {1e-12, 1e-15};
    KDL_EXPECT_CLOSE(what, sh->loss, de->loss, d->reduction == KDL_REDUCTION_NONE ? (size_t)N : 1, tol);
    double gmax = 0;
    for (int64_t j = 0; j < N * V; j++)
        if (isfinite(de->grad[j])) gmax = fmax(gmax, fabs(de->grad[j]));
    kdl_tol_t gtol = {1e-12, 1e-12 * gmax};
    KDL_EXPECT_CLOSE(what, sh->grad, de->grad, (size_t)(N * V), gtol);
    cr_expect(sh->info == de->info && sh->valid == de->valid, "%s: counters %lld/%lld vs %lld/%lld", what,
              (long long)sh->info, (long long)sh->valid, (long long)de->info, (long long)de->valid);
}

/* Runs the protocol over R shards of widths w and the dense reference on the
 * same rows, and compares them (compare above). */
static void shard_vs_dense(const char *what, const kdl_loss_desc_t *d, const void *S, kdl_dtype_t sdt, const void *T,
                           kdl_dtype_t tdt, const int64_t *labels, int64_t N, int64_t V, int R, const int64_t *w,
                           result_t *sh, result_t *de)
{
    run_sharded(d, S, sdt, T, tdt, labels, N, V, R, w, sh);
    run_dense(d, S, sdt, T, tdt, labels, N, V, de);
    compare(what, d, sh, de, N, V);
}

Test(equality, every_divergence_every_split)
{
    enum { N = 4, V = 61 };
    double S[N * V], T[N * V];
    const kdl_reduction_t reds[] = {KDL_REDUCTION_MEAN, KDL_REDUCTION_NONE, KDL_REDUCTION_SUM};
    for (size_t k = 0; k < KDL_NDIVS; k++)
        for (int sp = 0; sp < 4; sp++) {
            random_rows(10 + k * 7 + (uint64_t)sp, S, N * V, 2.0);
            random_rows(500 + k * 7 + (uint64_t)sp, T, N * V, 2.0);
            kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], reds[sp % 3]);
            d.temperature = sp == 2 ? 2.0 : 1.0;
            d.scale = 1.5;
            int64_t w[MAXR];
            int R = splits(sp, V, w);
            char what[64];
            snprintf(what, sizeof what, "%s over %d shards", kdl_divergence_name(kdl_all_divs[k]), R);
            result_t sh, de;
            shard_vs_dense(what, &d, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, NULL, N, V, R, w, &sh, &de);
        }
}

Test(akl_head, each_rule_same_tokens_every_split)
{
    enum { N = 5, V = 64 };
    double S[N * V], T[N * V];
    for (int rule = 0; rule < KDL_HEAD_COUNT_; rule++)
        for (int sp = 0; sp < 4; sp++) {
            random_rows(900 + rule * 11 + (uint64_t)sp, S, N * V, 1.5);
            random_rows(950 + rule * 11 + (uint64_t)sp, T, N * V, 1.5);
            kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
            d.head_rule = (kdl_head_rule_t)rule;
            d.mu = 0.45;
            d.top_k = 9;
            int64_t w[MAXR];
            int R = splits(sp, V, w);
            char what[64];
            snprintf(what, sizeof what, "akl %s over %d shards", kdl_head_rule_name(d.head_rule), R);
            result_t sh, de;
            shard_vs_dense(what, &d, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, NULL, N, V, R, w, &sh, &de);
            cr_expect_eq(sh.steps, 12, "f64 teacher: 8 digit rounds + 4");
            for (int64_t i = 0; i < N; i++) {
                unsigned char want[MAXV];
                expected_head(&d, T + i * V, V, want);
                cr_expect(memcmp(want, sh.mask + i * V, V) == 0, "%s row %lld: head tokens differ", what,
                          (long long)i);
                cr_expect_eq(sh.head_size[i], de.head_size[i], "%s row %lld head size %lld vs dense %lld", what,
                             (long long)i, (long long)sh.head_size[i], (long long)de.head_size[i]);
            }
        }
}

/* A tie group of equal teacher logits spanning every shard boundary, with
 * the head boundary inside the group: the head takes the tied tokens of
 * lowest global index, whichever shard holds them. */
Test(akl_head, ties_across_shard_boundaries)
{
    enum { N = 3, V = 32 };
    double S[N * V], T[N * V];
    random_rows(77, S, N * V, 1.0);
    for (int i = 0; i < N; i++)
        for (int v = 0; v < V; v++) T[i * V + v] = -3.0 - 0.01 * v; /* distinct, low */
    /* row 0: one top token, then 8 ties at 2.0 on tokens 3, 5, 6, 9, 11, 14, 17, 21 */
    const int tie0[8] = {3, 5, 6, 9, 11, 14, 17, 21};
    T[0 * V + 20] = 4.0;
    for (int j = 0; j < 8; j++) T[0 * V + tie0[j]] = 2.0;
    /* row 1: all 32 tokens tied (uniform teacher) */
    for (int v = 0; v < V; v++) T[1 * V + v] = 0.5;
    /* row 2: 21 tokens tied at 0, 11 at -inf (masked) */
    for (int v = 0; v < V; v++) T[2 * V + v] = (v % 3 == 1) ? -INFINITY : 0.0;
    const kdl_head_rule_t rules[] = {KDL_HEAD_TOPK, KDL_HEAD_TOPK, KDL_HEAD_REFERENCE, KDL_HEAD_MASS,
                                     KDL_HEAD_REFERENCE};
    const int64_t topks[] = {4, 7, 1, 1, 1};
    const double mus[] = {0.5, 0.5, 0.25, 0.25, 0.5};
    for (size_t c = 0; c < sizeof rules / sizeof rules[0]; c++)
        for (int sp = 1; sp < 4; sp++) {
            kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_NONE);
            d.head_rule = rules[c];
            d.top_k = topks[c];
            d.mu = mus[c];
            int64_t w[MAXR];
            int R = splits(sp, V, w);
            char what[80];
            snprintf(what, sizeof what, "ties: %s K %lld mu %g, %d shards", kdl_head_rule_name(d.head_rule),
                     (long long)d.top_k, d.mu, R);
            result_t sh, de;
            shard_vs_dense(what, &d, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, NULL, N, V, R, w, &sh, &de);
            for (int64_t i = 0; i < N; i++) {
                unsigned char want[MAXV];
                expected_head(&d, T + i * V, V, want);
                cr_expect(memcmp(want, sh.mask + i * V, V) == 0, "%s row %lld: head tokens differ", what,
                          (long long)i);
                cr_expect_eq(sh.head_size[i], de.head_size[i], "%s row %lld", what, (long long)i);
            }
        }
    /* spot check by hand: row 0, TOPK 4 = token 20 and the ties 3, 5, 6 */
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_NONE);
    d.head_rule = KDL_HEAD_TOPK;
    d.top_k = 4;
    int64_t w[MAXR];
    int R = splits(3, V, w);
    result_t sh;
    run_sharded(&d, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, NULL, N, V, R, w, &sh);
    for (int v = 0; v < V; v++)
        cr_expect_eq(sh.mask[v], (v == 20 || v == 3 || v == 5 || v == 6), "token %d", v);
    /* row 1, uniform over 32, REFERENCE mu = .25: c_8 = .25 <= .25 -> tokens 0..7 */
    d.head_rule = KDL_HEAD_REFERENCE;
    d.mu = 0.25;
    run_sharded(&d, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, NULL, N, V, R, w, &sh);
    cr_expect_eq(sh.head_size[1], 8);
    for (int v = 0; v < V; v++) cr_expect_eq(sh.mask[V + v], v < 8, "uniform row token %d", v);
}

Test(dtypes, f32_bf16_and_f16_teachers)
{
    enum { N = 3, V = 50 };
    double S[N * V], T[N * V];
    random_rows(1200, S, N * V, 2.0);
    random_rows(1201, T, N * V, 2.0);
    T[7] = T[31]; /* an exact tie in row 0 */
    const kdl_dtype_t dts[] = {KDL_DTYPE_F32, KDL_DTYPE_BF16, KDL_DTYPE_F16};
    const int steps[] = {8, 6, 6};
    for (int k = 0; k < 3; k++) {
        uint16_t tb16[N * V], sb16[N * V];
        float tf[N * V], sf[N * V];
        void *tv = dts[k] == KDL_DTYPE_F32 ? (void *)tf : (void *)tb16;
        void *sv = dts[k] == KDL_DTYPE_F32 ? (void *)sf : (void *)sb16;
        kdl_to_dtype(T, tv, dts[k], N * V);
        kdl_to_dtype(S, sv, dts[k], N * V);
        for (int rule = 0; rule < KDL_HEAD_COUNT_; rule++) {
            kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_MEAN);
            d.head_rule = (kdl_head_rule_t)rule;
            d.top_k = 5;
            d.mu = 0.55;
            int64_t w[MAXR];
            int R = splits(2, V, w);
            char what[64];
            snprintf(what, sizeof what, "%s teacher, rule %d", kdl_dtype_name(dts[k]), rule);
            result_t sh, de;
            shard_vs_dense(what, &d, sv, dts[k], tv, dts[k], NULL, N, V, R, w, &sh, &de);
            cr_expect_eq(sh.steps, steps[k], "%s", what);
            double Tr[N * V];
            kdl_from_dtype(tv, Tr, dts[k], N * V);
            for (int64_t i = 0; i < N; i++) {
                unsigned char want[MAXV];
                expected_head(&d, Tr + i * V, V, want);
                cr_expect(memcmp(want, sh.mask + i * V, V) == 0, "%s row %lld: head differs", what, (long long)i);
            }
        }
    }
}

Test(rows, invalid_in_one_shard_ignored_and_masked)
{
    enum { N = 5, V = 40 };
    double S[N * V], T[N * V];
    random_rows(1300, S, N * V, 1.0);
    random_rows(1301, T, N * V, 1.0);
    S[1 * V + 37] = NAN;       /* bad data in the last shard only   */
    T[2 * V + 0] = INFINITY;   /* in the first shard                */
    for (int v = 0; v < V; v++) /* teacher fully masked: invalid     */
        T[3 * V + v] = -INFINITY;
    for (int v = 0; v < 30; v++) S[4 * V + v] = -INFINITY; /* shards 0..2 fully masked, still valid */
    const int64_t labels[N] = {5, 5, -100, 5, 5};
    for (size_t k = 0; k < KDL_NDIVS; k++)
        for (int red = 0; red < KDL_REDUCTION_COUNT_; red++) {
            kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], (kdl_reduction_t)red);
            int64_t w[MAXR];
            int R = splits(2, V, w);
            char what[64];
            snprintf(what, sizeof what, "%s red %d", kdl_divergence_name(kdl_all_divs[k]), red);
            result_t sh, de;
            shard_vs_dense(what, &d, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, labels, N, V, R, w, &sh, &de);
            cr_expect_eq(sh.info, 2);
            cr_expect_eq(sh.valid, 2);
        }
}

/* scale = 0 switches the term off even where it is infinite (a masked
 * student token under teacher mass: FKL, SKL, AKL are +inf), as the dense
 * reference: loss 0 and a zero gradient, not 0 * inf = NaN. */
Test(rows, scale_zero_with_infinite_terms)
{
    enum { N = 3, V = 40 };
    double S[N * V], T[N * V];
    random_rows(1400, S, N * V, 1.0);
    random_rows(1401, T, N * V, 1.0);
    for (int v = 0; v < 25; v++) S[1 * V + v] = -INFINITY;
    for (size_t k = 0; k < KDL_NDIVS; k++)
        for (int red = 0; red < KDL_REDUCTION_COUNT_; red++) {
            kdl_loss_desc_t d = kdl_test_desc(kdl_all_divs[k], (kdl_reduction_t)red);
            d.scale = 0.0;
            int64_t w[MAXR];
            int R = splits(3, V, w);
            char what[64];
            snprintf(what, sizeof what, "%s red %d scale 0", kdl_divergence_name(kdl_all_divs[k]), red);
            result_t sh, de;
            shard_vs_dense(what, &d, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, NULL, N, V, R, w, &sh, &de);
            for (int64_t j = 0; j < N * V; j++)
                if (sh.grad[j] != 0.0) {
                    cr_expect(0, "%s: grad[%lld] = %g, not 0", what, (long long)j, sh.grad[j]);
                    break;
                }
        }
}

Test(rows, empty_batch_and_all_ignored)
{
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_MEAN);
    int64_t w[2] = {3, 4};
    result_t sh;
    double S[7] = {0}, T[7] = {0};
    run_sharded(&d, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, NULL, 0, 7, 2, w, &sh);
    cr_expect(sh.loss[0] == 0.0 && sh.valid == 0);
    const int64_t lab[1] = {-100};
    run_sharded(&d, S, KDL_DTYPE_F64, T, KDL_DTYPE_F64, lab, 1, 7, 2, w, &sh);
    cr_expect(sh.loss[0] == 0.0 && sh.valid == 0 && sh.info == 0);
    for (int v = 0; v < 7; v++) cr_expect(sh.grad[v] == 0.0);
}

Test(api, sizes_and_op_sequence)
{
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_JSD, KDL_REDUCTION_MEAN);
    kdl_shard_args_t a;
    kdl_shard_args_init(&a);
    a.rows = 10;
    a.vocab = 2000;
    a.vocab_local = 10; /* rank 0's slice [0, 10) */
    a.num_shards = 4;
    a.teacher_dtype = KDL_DTYPE_BF16;
    size_t sb, ec;
    int ns;
    cr_assert_eq(kdl_shard_sizes(&d, &a, &sb, &ec, &ns), KDL_STATUS_SUCCESS);
    cr_expect_eq(ns, 4);
    cr_expect_eq(ec, 10 * 8);
    d.divergence = KDL_DIV_AKL;
    cr_assert_eq(kdl_shard_sizes(&d, &a, &sb, &ec, &ns), KDL_STATUS_SUCCESS);
    cr_expect_eq(ns, 6);
    cr_expect_eq(ec, 10 * (2 + 2 * KDL_SHARD_BINS));
    a.num_shards = 1000;
    cr_assert_eq(kdl_shard_sizes(&d, &a, &sb, &ec, &ns), KDL_STATUS_SUCCESS);
    cr_expect_eq(ec, 10 * 1000, "the tie round needs num_shards fields");
}

Test(api, bad_arguments)
{
    enum { N = 2, V = 10 };
    double S[N * V] = {0}, T[N * V] = {0}, loss[N], ex[N * 8];
    char state[4096];
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    kdl_shard_op_t op;
    int64_t cnt;
#define EXPECT_STATUS(want, step, mutate)                                                           \
    do {                                                                                            \
        kdl_loss_desc_t dd = d;                                                                     \
        kdl_shard_args_t a;                                                                         \
        kdl_shard_args_init(&a);                                                                    \
        a.rows = N;                                                                                 \
        a.vocab = V;                                                                                \
        a.vocab_offset = 4;                                                                         \
        a.vocab_local = 6;                                                                          \
        a.shard_rank = 1;                                                                           \
        a.num_shards = 2;                                                                           \
        a.student = S;                                                                              \
        a.teacher = T;                                                                              \
        a.ld_student = a.ld_teacher = V;                                                            \
        a.student_dtype = a.teacher_dtype = a.out_dtype = KDL_DTYPE_F64;                            \
        a.loss = loss;                                                                              \
        a.state = state;                                                                            \
        a.exchange = ex;                                                                            \
        mutate;                                                                                     \
        kdl_status_t st = kdl_ref_shard_step(&dd, &a, step, &op, &cnt);                             \
        cr_expect_eq(st, want, "%s: %s (%s)", #mutate, kdl_status_string(st), kdl_get_last_error()); \
    } while (0)
    EXPECT_STATUS(KDL_STATUS_SUCCESS, 0, (void)0);
    EXPECT_STATUS(KDL_STATUS_BAD_PARAM, 4, (void)0);
    EXPECT_STATUS(KDL_STATUS_BAD_PARAM, -1, (void)0);
    EXPECT_STATUS(KDL_STATUS_BAD_PARAM, 0, a.shard_rank = 2);
    EXPECT_STATUS(KDL_STATUS_BAD_SIZE, 0, a.num_shards = 0);
    EXPECT_STATUS(KDL_STATUS_BAD_SIZE, 0, a.vocab_local = 7);
    EXPECT_STATUS(KDL_STATUS_BAD_SIZE, 0, a.vocab_local = 0);
    EXPECT_STATUS(KDL_STATUS_BAD_SIZE, 0, a.vocab_offset = -1);
    EXPECT_STATUS(KDL_STATUS_BAD_STRIDE, 0, a.ld_student = 5);
    EXPECT_STATUS(KDL_STATUS_NULL_POINTER, 0, a.state = NULL);
    EXPECT_STATUS(KDL_STATUS_NULL_POINTER, 0, a.exchange = NULL);
    EXPECT_STATUS(KDL_STATUS_NULL_POINTER, 0, a.teacher = NULL);
    EXPECT_STATUS(KDL_STATUS_BAD_TEMPERATURE, 0, dd.temperature = -1);
    EXPECT_STATUS(KDL_STATUS_BAD_TOP_K, 0, dd.top_k = V + 1);
    EXPECT_STATUS(KDL_STATUS_BAD_STRUCT_SIZE, 0, a.struct_size = 1);
#undef EXPECT_STATUS
}

/* The shard's rank and slice: kdl_shard_sizes checks them as the steps do
 * (it did not look at them at all), and every validator (reference steps,
 * kdl_shard_validate for the reference and for the GPU path) refuses a rank
 * that cannot hold its slice in an ordered partition of [0, vocab).  Each
 * case names its status; nothing is written. */
typedef void (*slice_mut_t)(kdl_shard_args_t *);
static void sm_none(kdl_shard_args_t *a) { (void)a; }
static void sm_rank_neg(kdl_shard_args_t *a) { a->shard_rank = -1; }
static void sm_rank_big(kdl_shard_args_t *a) { a->shard_rank = a->num_shards; }
static void sm_rank_huge(kdl_shard_args_t *a) { a->shard_rank = INT32_MAX; }
static void sm_vocab0(kdl_shard_args_t *a) { a->vocab = 0; }
static void sm_shards_big(kdl_shard_args_t *a) { a->num_shards = (int32_t)a->vocab + 1; }
static void sm_local0(kdl_shard_args_t *a) { a->vocab_local = 0; }
static void sm_local_neg(kdl_shard_args_t *a) { a->vocab_local = -3; }
static void sm_offset_neg(kdl_shard_args_t *a) { a->vocab_offset = -1; }
static void sm_past_end(kdl_shard_args_t *a) { a->vocab_offset = a->vocab - a->vocab_local + 1; }
static void sm_local_huge(kdl_shard_args_t *a) { a->vocab_local = INT64_MAX; }
static void sm_rank0_offset(kdl_shard_args_t *a) { a->shard_rank = 0; }          /* slice starts at 4 */
static void sm_last_short(kdl_shard_args_t *a) { a->shard_rank = 2; a->num_shards = 3; a->vocab_local = 5; }
static void sm_last_gap(kdl_shard_args_t *a) { a->vocab_local = 5; }            /* rank 1 of 2 ends at 9 of 10 */
static void sm_before(kdl_shard_args_t *a) { a->shard_rank = 5; a->num_shards = 8; } /* 5 ranks before column 4 */
static void sm_after(kdl_shard_args_t *a) { a->num_shards = 3; a->vocab_local = 6; } /* rank 1 of 3: no column left */
static const struct {
    const char *name;
    kdl_status_t want;
    slice_mut_t mutate;
} slice_cases[] = {
    {"valid: rank 1 of 2, [4, 10)", KDL_STATUS_SUCCESS, sm_none},
    {"shard_rank -1", KDL_STATUS_BAD_PARAM, sm_rank_neg},
    {"shard_rank = num_shards", KDL_STATUS_BAD_PARAM, sm_rank_big},
    {"shard_rank INT32_MAX", KDL_STATUS_BAD_PARAM, sm_rank_huge},
    {"vocab 0", KDL_STATUS_BAD_SIZE, sm_vocab0},
    {"num_shards > vocab", KDL_STATUS_BAD_SIZE, sm_shards_big},
    {"vocab_local 0", KDL_STATUS_BAD_SIZE, sm_local0},
    {"vocab_local -3", KDL_STATUS_BAD_SIZE, sm_local_neg},
    {"vocab_offset -1", KDL_STATUS_BAD_SIZE, sm_offset_neg},
    {"slice past vocab", KDL_STATUS_BAD_SIZE, sm_past_end},
    {"vocab_local INT64_MAX", KDL_STATUS_BAD_SIZE, sm_local_huge},
    {"rank 0 not at column 0", KDL_STATUS_BAD_PARAM, sm_rank0_offset},
    {"last rank short of vocab", KDL_STATUS_BAD_PARAM, sm_last_short},
    {"last of 2 ends before vocab", KDL_STATUS_BAD_PARAM, sm_last_gap},
    {"rank 5 with 4 columns before its slice", KDL_STATUS_BAD_PARAM, sm_before},
    {"rank 1 of 3 with no column after its slice", KDL_STATUS_BAD_PARAM, sm_after},
};

Test(api, rank_and_slice_checked_everywhere)
{
    enum { N = 2, V = 10 };
    double S[N * V] = {0}, T[N * V] = {0}, loss[N], ex[N * 8];
    double state[512];
    const double SENT = -4242.0;
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_NONE);
    for (size_t c = 0; c < sizeof slice_cases / sizeof slice_cases[0]; c++) {
        kdl_shard_args_t a;
        kdl_shard_args_init(&a);
        a.rows = N;
        a.vocab = V;
        a.vocab_offset = 4;
        a.vocab_local = 6;
        a.shard_rank = 1;
        a.num_shards = 2;
        a.student = S;
        a.teacher = T;
        a.ld_student = a.ld_teacher = V;
        a.student_dtype = a.teacher_dtype = a.out_dtype = KDL_DTYPE_F64;
        a.loss = loss;
        a.state = state;
        a.exchange = ex;
        slice_cases[c].mutate(&a);
        const kdl_status_t want = slice_cases[c].want;
        const char *name = slice_cases[c].name;

        size_t sb = 777, ec = 777;
        int ns = 777;
        kdl_status_t st = kdl_shard_sizes(&d, &a, &sb, &ec, &ns);
        cr_expect_eq(st, want, "sizes, %s: %s (%s)", name, kdl_status_string(st), kdl_get_last_error());
        if (want != KDL_STATUS_SUCCESS) {
            cr_expect(sb == 777 && ec == 777 && ns == 777, "sizes, %s: an output written", name);
            cr_expect(kdl_get_last_error()[0] != '\0', "sizes, %s: no detail", name);
        } else {
            cr_expect(sb <= sizeof state && ec <= N * 8 && ns == 4, "sizes of the valid problem");
        }
        for (int allow_f64 = 0; allow_f64 < 2; allow_f64++) {
            kdl_shard_args_t g = a; /* the GPU path takes f32 data */
            if (!allow_f64) g.student_dtype = g.teacher_dtype = g.out_dtype = KDL_DTYPE_F32;
            st = kdl_shard_validate(&d, &g, allow_f64);
            cr_expect_eq(st, want, "validate (%s), %s: %s (%s)", allow_f64 ? "reference" : "GPU", name,
                         kdl_status_string(st), kdl_get_last_error());
        }
        for (size_t k = 0; k < sizeof state / sizeof state[0]; k++) state[k] = SENT;
        for (int k = 0; k < N * 8; k++) ex[k] = SENT;
        loss[0] = loss[1] = SENT;
        kdl_shard_op_t op = (kdl_shard_op_t)77;
        int64_t cnt = 777;
        st = kdl_ref_shard_step(&d, &a, 0, &op, &cnt);
        cr_expect_eq(st, want, "step 0, %s: %s (%s)", name, kdl_status_string(st), kdl_get_last_error());
        if (want != KDL_STATUS_SUCCESS) {
            int untouched = op == (kdl_shard_op_t)77 && cnt == 777 && loss[0] == SENT && loss[1] == SENT;
            for (size_t k = 0; k < sizeof state / sizeof state[0]; k++) untouched &= state[k] == SENT;
            for (int k = 0; k < N * 8; k++) untouched &= ex[k] == SENT;
            cr_expect(untouched, "step 0, %s: something written", name);
        }
    }
}

/* Rows that are not ours: a single shard that does not hold the whole
 * vocabulary is refused (it would compute the loss over part of it). */
Test(api, one_shard_must_hold_the_whole_vocabulary)
{
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_FKL, KDL_REDUCTION_SUM);
    kdl_shard_args_t a;
    kdl_shard_args_init(&a);
    a.rows = 1;
    a.vocab = 8;
    a.vocab_local = 5;
    size_t sb;
    cr_expect_eq(kdl_shard_sizes(&d, &a, &sb, NULL, NULL), KDL_STATUS_BAD_PARAM);
    a.vocab_local = 8;
    cr_expect_eq(kdl_shard_sizes(&d, &a, &sb, NULL, NULL), KDL_STATUS_SUCCESS);
}

/* tau = 1e-30 (docs/hardening.md F9): the shard reference formed s/tau and
 * then subtracted max(s/tau); with f64 logits of 1e280 s/tau is inf and
 * inf - inf made valid rows NaN, where the dense reference computes
 * (s - max s)/tau and gets the tau -> 0 limit (the arg-max indicator, ties
 * shared).  Now the shards shift by the raw maxima first, as the dense
 * reference does: the same loss, gradient and counters for every divergence,
 * reduction and split, and, with f32 and bf16 logits of ordinary size, the
 * same as well.  (Before the fix every f64 case here failed.) */
Test(tiny_tau, agrees_with_the_dense_reference)
{
    enum { N = 4, V = 9 };
    /* rows: distinct maxima, a tie at the top of the student, a tie at the
     * top of the teacher, masked tokens; magnitudes near 1e280 */
    const double S64[N * V] = {2e280, 1e280, 0,      -5e279, 3e279,     -1e280, 7,      1.5e280, -INFINITY,
                               1e280, 1e280, 0.5e280, 2,     -3,        4e279,  1e279,  0,       -1e280,
                               -2e280, 3e280, 1e279, 3e280,  -INFINITY, 5,      2.5e280, 1e280,  0,
                               4,     3,      2,      1,     0,         -1,     -2,     -3,      -4};
    const double T64[N * V] = {1e280, 2e280, 0,      2e280, -1e280,    5,      3e279,  0,       1e279,
                               3e280, 1e280, 2e280,  0,     -3e280,    1e279,  7,      2e280,   1e280,
                               1e280, 1e280, 1e280,  -INFINITY, 0,      2e279,  1e280,  -5,      1e279,
                               -4,    -3,     -2,     -1,    0,         1,      2,      3,       4};
    float S32[N * V], T32[N * V];
    uint16_t S16[N * V], T16[N * V];
    for (int k = 0; k < N * V; k++) { /* ordinary sizes: x / 1e272 */
        double s = isfinite(S64[k]) ? S64[k] / 1e272 : S64[k], t = isfinite(T64[k]) ? T64[k] / 1e272 : T64[k];
        S32[k] = (float)s;
        T32[k] = (float)t;
        S16[k] = kdl_float_to_bf16((float)s);
        T16[k] = kdl_float_to_bf16((float)t);
    }
    const int64_t labels[N] = {0, 1, -100, 3};
    struct {
        const void *S, *T;
        kdl_dtype_t dt;
        const char *name;
    } data[] = {{S64, T64, KDL_DTYPE_F64, "f64 1e280"}, {S32, T32, KDL_DTYPE_F32, "f32"},
                {S16, T16, KDL_DTYPE_BF16, "bf16"}};
    int64_t w[MAXR];
    for (size_t di = 0; di < sizeof data / sizeof data[0]; di++)
        for (int div = 0; div < KDL_DIV_COUNT_; div++)
            for (int red = 0; red < KDL_REDUCTION_COUNT_; red++)
                for (int sp = 0; sp < 3; sp++) {
                    kdl_loss_desc_t d = kdl_test_desc((kdl_divergence_t)div, (kdl_reduction_t)red);
                    d.temperature = 1e-30;
                    /* AKL: a head of one token.  At this tau every probability
                     * but the largest is 0, the dense reference orders those
                     * zeros by index and the protocol by logit (the documented
                     * difference), so a larger head may differ legitimately */
                    d.head_rule = KDL_HEAD_TOPK;
                    d.top_k = 1;
                    int R = sp == 0 ? 1 : sp == 1 ? 2 : 3;
                    if (R == 1) w[0] = V;
                    if (R == 2) w[0] = 4, w[1] = 5;
                    if (R == 3) w[0] = 1, w[1] = 5, w[2] = 3;
                    result_t sh, de;
                    run_sharded(&d, data[di].S, data[di].dt, data[di].T, data[di].dt, labels, N, V, R, w, &sh);
                    run_dense(&d, data[di].S, data[di].dt, data[di].T, data[di].dt, labels, N, V, &de);
                    char what[96];
                    snprintf(what, sizeof what, "%s %s %s, %d shards", data[di].name,
                             kdl_divergence_name(d.divergence), kdl_reduction_name(d.reduction), R);
                    const size_t nl = d.reduction == KDL_REDUCTION_NONE ? N : 1;
                    for (size_t i = 0; i < nl; i++) {
                        int same = (isnan(sh.loss[i]) && isnan(de.loss[i])) || sh.loss[i] == de.loss[i] ||
                                   fabs(sh.loss[i] - de.loss[i]) <= 1e-12 * fabs(de.loss[i]);
                        cr_expect(same, "%s: loss[%zu] %.17g, dense %.17g", what, i, sh.loss[i], de.loss[i]);
                        if (d.reduction != KDL_REDUCTION_NONE)
                            cr_expect(!isnan(sh.loss[i]), "%s: reduced loss NaN", what);
                    }
                    /* the gradient to 1e-12 of its largest entry, as in compare():
                     * an entry that is 0 in exact arithmetic is rounding noise
                     * of size 1e-16 / tau = 1e14 here, in both */
                    double gmax = 0;
                    for (int64_t j = 0; j < N * V; j++)
                        if (isfinite(de.grad[j])) gmax = fmax(gmax, fabs(de.grad[j]));
                    for (int64_t j = 0; j < N * V; j++) {
                        double x = sh.grad[j], y = de.grad[j];
                        int same = (isnan(x) && isnan(y)) || x == y || fabs(x - y) <= 1e-12 * (fabs(y) + gmax);
                        cr_expect(same, "%s: grad[%lld] %.17g, dense %.17g", what, (long long)j, x, y);
                    }
                    cr_expect(sh.info == de.info && sh.valid == de.valid, "%s: counters %lld/%lld, dense %lld/%lld",
                              what, (long long)sh.info, (long long)sh.valid, (long long)de.info, (long long)de.valid);
                    if (d.divergence == KDL_DIV_AKL)
                        for (int64_t i = 0; i < N; i++)
                            if (labels[i] != -100)
                                cr_expect_eq(sh.head_size[i], de.head_size[i], "%s: row %lld head size", what,
                                             (long long)i);
                }
}
