/*
 * tests/test_radix_model.c - the AKL head boundary of the GPU kernel, on the
 * CPU: kernels/radix_select.h (the same key, candidate test, bin choice and
 * tie resolution the kernel runs) against a plain sort of the teacher order,
 * for all three head rules, on random, bf16/f16-tied, -inf, one-hot and
 * uniform rows.  Also: the kernel's tie ordinals (slices per cluster rank,
 * chunks per thread and iteration) are index order, and the head size agrees
 * with the float64 reference away from the mu boundary.  Runs without a GPU.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/radix_select.h"
#include "internal.h"
#include "kdl_test.h"
#include "kdloss/kdloss_ref.h"

/* One teacher row as the kernel sees it. */
typedef struct model_row {
    int64_t n;
    float *logit;   /* the dtype's value, as float                   */
    uint32_t *key;  /* kdl_rs_key, masked for the dtype              */
    uint64_t *mass; /* fixed-point p, from float p as on the GPU     */
    int dtype;      /* 0 f32, 1 f16, 2 bf16                          */
} model_row_t;

static uint64_t mass_fx_host(float p) { return (uint64_t)nearbyint((double)p * KDL_RS_FX_SCALE); }

/* Rounds x[] to the dtype and fills keys and masses (tau = 1: p in float
 * as the kernel computes it, exp2((v - max) log2(e) - LSE2)). */
static void make_row(model_row_t *r, const double *x, int64_t n, int dtype)
{
    r->n = n;
    r->dtype = dtype;
    r->logit = malloc((size_t)n * sizeof(float));
    r->key = malloc((size_t)n * sizeof(uint32_t));
    r->mass = malloc((size_t)n * sizeof(uint64_t));
    cr_assert(r->logit && r->key && r->mass);
    const float k2 = 1.4426950408889634f;
    double mx = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        float v = (float)x[j];
        if (dtype == 1) v = kdl_half_to_float(kdl_float_to_half(v));
        if (dtype == 2) v = kdl_bf16_to_float(kdl_float_to_bf16(v));
        r->logit[j] = v;
        if (v > mx) mx = v;
    }
    const float vmax = (float)mx;
    double sum = 0;
    for (int64_t j = 0; j < n; j++) sum += exp2((double)((r->logit[j] - vmax) * k2));
    const float lse2 = (float)log2(sum);
    for (int64_t j = 0; j < n; j++) {
        float p = exp2f(fmaf(r->logit[j] - vmax, k2, -lse2));
        r->key[j] = kdl_rs_key(r->logit[j], kdl_rs_key_mask(dtype));
        r->mass[j] = mass_fx_host(p);
    }
}

static void free_row(model_row_t *r)
{
    free(r->logit);
    free(r->key);
    free(r->mass);
}

static const uint32_t *g_keys; /* qsort context */
static int cmp_order(const void *a, const void *b)
{
    int64_t i = *(const int64_t *)a, j = *(const int64_t *)b;
    if (g_keys[i] != g_keys[j]) return g_keys[i] > g_keys[j] ? -1 : 1;
    return (i > j) - (i < j);
}

/* The oracle: sort by (key desc, index asc), apply the rule to integer
 * cumulative masses; in_head[j] = 1 for the head's tokens. */
static int64_t sort_head(const model_row_t *r, int rule, uint64_t K, uint64_t mu_fx, unsigned char *in_head)
{
    cr_assert(r->n > 0);
    int64_t *ord = malloc((size_t)r->n * sizeof(int64_t));
    cr_assert(ord);
    for (int64_t j = 0; j < r->n; j++) ord[j] = j;
    g_keys = r->key;
    qsort(ord, (size_t)r->n, sizeof *ord, cmp_order);
    int64_t h = 0;
    if (rule == KDL_RS_TOPK) {
        h = (int64_t)K;
    } else {
        uint64_t c = 0;
        for (int64_t k = 0; k < r->n; k++) {
            uint64_t prev = c;
            c += r->mass[ord[k]];
            if (rule == KDL_RS_REFERENCE ? c <= mu_fx : prev < mu_fx)
                h = k + 1;
            else
                break;
        }
        if (h < 1) h = 1;
    }
    for (int64_t j = 0; j < r->n; j++) in_head[j] = 0;
    for (int64_t k = 0; k < h; k++) in_head[ord[k]] = 1;
    free(ord);
    return h;
}

/* The model's membership, with tie ordinals in the kernel's order: C slices
 * of chunks_per chunks (cluster ranks), chunk c of a slice owned by thread
 * c % B in iteration c / B; ordinal = ties in lower ranks + ties of earlier
 * (iteration, thread) chunks + earlier ties in the chunk. */
static void model_membership(const model_row_t *r, const kdl_rs_result *res, int C, int B, unsigned char *in_head)
{
    const int64_t nch = (r->n + 7) / 8;
    const int64_t per = (nch + C - 1) / C;
    uint64_t base = 0; /* ties in lower ranks */
    for (int rank = 0; rank < C; rank++) {
        int64_t lo = rank * per * 8;
        int64_t hi = lo + per * 8 < r->n ? lo + per * 8 : r->n;
        int64_t slice_nch = hi > lo ? (hi - lo + 7) / 8 : 0;
        uint64_t run = base;
        for (int64_t it = 0; it * B < slice_nch; it++) {
            /* block exclusive scan of per-thread tie counts */
            uint64_t excl = run;
            for (int t = 0; t < B; t++) {
                int64_t c = it * B + t;
                if (c >= slice_nch) break;
                uint64_t ord = excl;
                for (int k = 0; k < 8; k++) {
                    int64_t j = lo + c * 8 + k;
                    if (j >= hi) break;
                    in_head[j] = (unsigned char)kdl_rs_in_head(res, r->key[j], ord);
                    if (r->key[j] == res->key) ord++;
                }
                excl = ord;
            }
            run = excl;
        }
        base = run;
    }
}

static int g_checked;

static void check_row(const model_row_t *r, int rule, uint64_t K, uint64_t mu_fx, const char *what)
{
    unsigned char *want = malloc((size_t)r->n), *got = malloc((size_t)r->n);
    cr_assert(want && got);
    int64_t h = sort_head(r, rule, K, mu_fx, want);
    kdl_rs_result res;
    kdl_rs_select_model(r->key, r->mass, r->n, kdl_rs_rounds(r->dtype), rule, K, mu_fx, &res);
    cr_expect_eq(res.head_size, h, "%s rule %d K %llu mu_fx %llu: head %lld, sort says %lld", what, rule,
                 (unsigned long long)K, (unsigned long long)mu_fx, (long long)res.head_size, (long long)h);
    static const int shapes[][2] = {{1, 512}, {3, 512}, {2, 32}, {7, 64}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        model_membership(r, &res, shapes[s][0], shapes[s][1], got);
        int64_t bad = -1, count = 0;
        for (int64_t j = 0; j < r->n; j++) {
            count += got[j];
            if (got[j] != want[j] && bad < 0) bad = j;
        }
        cr_expect(bad < 0, "%s rule %d (C=%d, B=%d): token %lld in head %d, sort says %d", what, rule,
                  shapes[s][0], shapes[s][1], (long long)bad, bad >= 0 ? got[bad] : 0, bad >= 0 ? want[bad] : 0);
        cr_expect_eq(count, h, "%s rule %d: %lld members, head %lld", what, rule, (long long)count, (long long)h);
    }
    g_checked++;
    free(want);
    free(got);
}

/* Every rule, a spread of mu and K. */
static void check_all_rules(const model_row_t *r, const char *what)
{
    const double mus[] = {1e-9, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999999};
    for (size_t i = 0; i < sizeof mus / sizeof mus[0]; i++) {
        check_row(r, KDL_RS_REFERENCE, 1, kdl_rs_mu_fx(mus[i]), what);
        check_row(r, KDL_RS_MASS, 1, kdl_rs_mu_fx(mus[i]), what);
    }
    const int64_t ks[] = {1, 2, r->n / 3, r->n / 2, r->n - 1, r->n};
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++)
        if (ks[i] >= 1 && ks[i] <= r->n) check_row(r, KDL_RS_TOPK, (uint64_t)ks[i], 1, what);
}

static void random_logits(uint64_t seed, double *x, int64_t n, double sigma)
{
    kdl_rng_t g = {seed};
    kdl_fill_logits(&g, x, n, sigma);
}

Test(radix_model, key_orders_logits)
{
    const float v[] = {-INFINITY, -3e38f, -2.5f, -1e-30f, -0.0f, 0.0f, 1e-30f, 1.0f, 2.0f, 3e38f};
    uint32_t m = kdl_rs_key_mask(0);
    for (size_t i = 0; i + 1 < sizeof v / sizeof v[0]; i++) {
        if (v[i] == v[i + 1])
            cr_expect_eq(kdl_rs_key(v[i], m), kdl_rs_key(v[i + 1], m), "-0 and +0 must tie");
        else
            cr_expect(kdl_rs_key(v[i], m) < kdl_rs_key(v[i + 1], m), "%g vs %g", v[i], v[i + 1]);
    }
    /* 16-bit dtypes: masked keys keep the order and settle in 2 or 3 rounds */
    for (int dt = 1; dt <= 2; dt++) {
        uint32_t mk = kdl_rs_key_mask(dt);
        int low = 32 - 8 * kdl_rs_rounds(dt);
        for (int s = -1; s <= 1; s += 2) {
            float a = dt == 2 ? kdl_bf16_to_float(kdl_float_to_bf16(s * 1.5f)) : kdl_half_to_float(kdl_float_to_half(s * 1.5f));
            cr_expect_eq(kdl_rs_key(a, mk) & ((1u << low) - 1u), 0u);
        }
        cr_expect(kdl_rs_key(-1.0f, mk) < kdl_rs_key(-0.5f, mk));
        cr_expect(kdl_rs_key(-0.5f, mk) < kdl_rs_key(0.0f, mk));
    }
}

Test(radix_model, random_rows_every_rule)
{
    const int64_t sizes[] = {1, 2, 3, 7, 8, 9, 64, 1000, 1271};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        int64_t n = sizes[si];
        double *x = malloc((size_t)n * sizeof(double));
        for (int dt = 0; dt < 3; dt++) {
            for (uint64_t seed = 1; seed <= 3; seed++) {
                random_logits(seed * 7919 + (uint64_t)n, x, n, 1.0 + (double)seed);
                model_row_t r;
                make_row(&r, x, n, dt);
                char what[64];
                snprintf(what, sizeof what, "random n=%lld dt=%d seed=%llu", (long long)n, dt, (unsigned long long)seed);
                check_all_rules(&r, what);
                free_row(&r);
            }
        }
        free(x);
    }
}

Test(radix_model, bf16_and_f16_ties)
{
    /* narrow logits rounded to 16 bits: long runs of equal keys, boundary
     * inside a tie group */
    const int64_t n = 4000;
    double *x = malloc((size_t)n * sizeof(double));
    kdl_rng_t g = {42};
    for (int dt = 1; dt <= 2; dt++) {
        for (int64_t j = 0; j < n; j++) x[j] = 0.05 * kdl_rng_normal(&g);
        model_row_t r;
        make_row(&r, x, n, dt);
        check_all_rules(&r, dt == 2 ? "bf16 ties" : "f16 ties");
        free_row(&r);
        /* few distinct values */
        for (int64_t j = 0; j < n; j++) x[j] = (double)(kdl_rng_next(&g) % 4);
        make_row(&r, x, n, dt);
        check_all_rules(&r, "four values");
        free_row(&r);
    }
    free(x);
}

Test(radix_model, uniform_row_is_one_tie_group)
{
    const int64_t sizes[] = {1, 5, 100, 1271};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        int64_t n = sizes[si];
        double *x = calloc((size_t)n, sizeof(double));
        for (int dt = 0; dt < 3; dt++) {
            model_row_t r;
            make_row(&r, x, n, dt);
            check_all_rules(&r, "uniform");
            free_row(&r);
        }
        free(x);
    }
}

Test(radix_model, minus_infinity_and_one_hot)
{
    const int64_t n = 777;
    double *x = malloc((size_t)n * sizeof(double));
    for (int dt = 0; dt < 3; dt++) {
        /* half the vocabulary masked */
        random_logits(5, x, n, 2.0);
        for (int64_t j = 0; j < n; j += 2) x[j] = -INFINITY;
        model_row_t r;
        make_row(&r, x, n, dt);
        check_all_rules(&r, "-inf half");
        free_row(&r);
        /* one finite logit, the rest -inf (p = one-hot) */
        for (int64_t j = 0; j < n; j++) x[j] = -INFINITY;
        x[n / 3] = 1.0;
        make_row(&r, x, n, dt);
        check_all_rules(&r, "one finite");
        free_row(&r);
        /* one-hot teacher by a huge margin; p of the rest underflows */
        for (int64_t j = 0; j < n; j++) x[j] = (double)(j % 5) - 2.0;
        x[n - 1] = 300.0;
        make_row(&r, x, n, dt);
        check_all_rules(&r, "one-hot");
        free_row(&r);
        /* signed zeros */
        for (int64_t j = 0; j < n; j++) x[j] = (j % 3 == 0) ? -0.0 : (j % 3 == 1 ? 0.0 : -1.0);
        make_row(&r, x, n, dt);
        check_all_rules(&r, "signed zeros");
        free_row(&r);
    }
    free(x);
}

Test(radix_model, large_vocabulary)
{
    const int64_t n = 32000;
    double *x = malloc((size_t)n * sizeof(double));
    for (int dt = 0; dt < 3; dt++) {
        random_logits(99 + (uint64_t)dt, x, n, 3.0);
        model_row_t r;
        make_row(&r, x, n, dt);
        check_row(&r, KDL_RS_REFERENCE, 1, kdl_rs_mu_fx(0.5), "32000");
        check_row(&r, KDL_RS_MASS, 1, kdl_rs_mu_fx(0.5), "32000");
        check_row(&r, KDL_RS_TOPK, 1000, 1, "32000");
        free_row(&r);
    }
    free(x);
}

/* The head size the kernel would find agrees with the float64 reference,
 * unless a cumulative mass lies within 1e-5 of mu (float32 p then may put
 * the boundary elsewhere: the documented caveat). */
Test(radix_model, agrees_with_reference_away_from_the_boundary)
{
    const int64_t n = 500;
    double *x = malloc((size_t)n * sizeof(double));
    double *p = malloc((size_t)n * sizeof(double));
    int compared = 0;
    for (uint64_t seed = 1; seed <= 40; seed++) {
        random_logits(seed, x, n, 2.0);
        float *xf = malloc((size_t)n * sizeof(float));
        for (int64_t j = 0; j < n; j++) xf[j] = (float)x[j];
        for (int rule = 0; rule < 3; rule++) {
            kdl_loss_desc_t d;
            kdl_loss_desc_init(&d);
            d.divergence = KDL_DIV_AKL;
            d.head_rule = (kdl_head_rule_t)rule;
            d.mu = 0.2 + 0.015 * (double)seed;
            d.top_k = (int64_t)(seed * 11 % (uint64_t)n) + 1;
            d.reduction = KDL_REDUCTION_SUM;
            kdl_loss_args_t a;
            kdl_loss_args_init(&a);
            a.rows = 1;
            a.vocab = n;
            a.student = a.teacher = xf;
            a.ld_student = a.ld_teacher = n;
            double loss;
            int64_t hs = -1;
            a.out_dtype = KDL_DTYPE_F64;
            a.loss = &loss;
            a.stat_head_size = &hs;
            cr_assert_eq(kdl_ref_loss_forward_backward(&d, &a), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
            /* near-boundary check on the float64 order */
            double mx = -INFINITY, s = 0;
            for (int64_t j = 0; j < n; j++) mx = xf[j] > mx ? xf[j] : mx;
            for (int64_t j = 0; j < n; j++) s += exp((double)xf[j] - mx);
            for (int64_t j = 0; j < n; j++) p[j] = exp((double)xf[j] - mx) / s;
            model_row_t r;
            make_row(&r, x, n, 0);
            int64_t *ord = malloc((size_t)n * sizeof(int64_t));
            for (int64_t j = 0; j < n; j++) ord[j] = j;
            g_keys = r.key;
            qsort(ord, (size_t)n, sizeof *ord, cmp_order);
            double c = 0;
            int near = 0;
            for (int64_t k = 0; k < n; k++) {
                c += p[ord[k]];
                if (fabs(c - d.mu) < 1e-5) near = 1;
            }
            free(ord);
            kdl_rs_result res;
            kdl_rs_select_model(r.key, r.mass, n, 4, rule, (uint64_t)d.top_k, kdl_rs_mu_fx(d.mu), &res);
            if (!near) {
                cr_expect_eq(res.head_size, hs, "seed %llu rule %d mu %g: model %lld, reference %lld",
                             (unsigned long long)seed, rule, d.mu, (long long)res.head_size, (long long)hs);
                compared++;
            }
            free_row(&r);
        }
        free(xf);
    }
    cr_expect(compared > 60, "only %d rows compared", compared);
    free(x);
    free(p);
}
