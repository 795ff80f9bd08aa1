/* The float64 reference with row offsets past 2^31 elements (and byte
 * offsets past 2^32): a few rows whose leading dimension is 2^31 + 13, in
 * buffers reserved with mmap(MAP_NORESERVE) so that only the pages of the
 * rows themselves (and of the sentinels beside them) take memory.  Every
 * output is compared BITWISE with the same call on compact copies of the
 * same rows (ld = V): the reference does the same float64 arithmetic on the
 * same values, so any wrapped or truncated offset (reading another row, or
 * zeros of an untouched page) shows.  Sentinels right after each gradient
 * row and right before the next must stay untouched.  The GPU counterpart
 * is gpu_hardening/rows_past_2_pow_31_elements (tests/test_gpu_hardening.c).
 * Entry points: the dense loss (f32, bf16, f64 inputs; FKL, AKL with the
 * mass rule, JSD, TVD; reduction none with every statistic, and mean; an
 * ignored row), the sparse-teacher loss (student, indices, log-probs and
 * gradient all far apart; both modes), the fused linear + loss (H and dH
 * rows far apart). */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS, MAP_NORESERVE */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "kdl_test.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"

#define BIG_LD (((int64_t)1 << 31) + 13)
#define NROWS 3
#define VOC 1000
#define SENTINEL 0x5a

typedef struct {
    void *p;
    size_t bytes;
} big_t;

/* NROWS rows BIG_LD elements apart (plus a row's worth of slack), reserved,
 * not committed; skips the test (visibly) where the system refuses. */
static big_t big_alloc(size_t esize) {
    big_t b = {NULL, ((size_t)(NROWS - 1) * (size_t)BIG_LD + 2 * VOC) * esize};
    b.p = mmap(NULL, b.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (b.p == MAP_FAILED) {
        b.p = NULL;
        cr_skip("mmap(MAP_NORESERVE) of %zu bytes refused here: past-2^31 reference test skipped", b.bytes);
    }
    return b;
}

static void big_free(big_t *b) {
    if (b->p) munmap(b->p, b->bytes);
    b->p = NULL;
}

static char *row_at(const big_t *b, int64_t i, size_t esize) {
    return (char *)b->p + (size_t)i * (size_t)BIG_LD * esize;
}

/* Row i of compact [NROWS, width] values (any dtype) into the big buffer. */
static void scatter(big_t *b, const void *compact, int64_t width, size_t esize) {
    for (int64_t i = 0; i < NROWS; ++i)
        memcpy(row_at(b, i, esize), (const char *)compact + (size_t)(i * width) * esize, (size_t)width * esize);
}

/* Sentinel bytes just after each row's width entries and just before rows
 * 1..: set, or check (1 when all are untouched). */
static int sentinels(big_t *b, int64_t width, size_t esize, int set) {
    int ok = 1;
    for (int64_t i = 0; i < NROWS; ++i) {
        unsigned char *after = (unsigned char *)row_at(b, i, esize) + (size_t)width * esize;
        unsigned char *before = (unsigned char *)row_at(b, i, esize) - esize;
        for (size_t k = 0; k < esize; ++k) {
            if (set) {
                after[k] = SENTINEL;
                if (i > 0) before[k] = SENTINEL;
            } else {
                ok &= after[k] == SENTINEL;
                if (i > 0) ok &= before[k] == SENTINEL;
            }
        }
    }
    return ok;
}

/* The big buffer's rows equal the compact rows, byte for byte. */
static int rows_equal(const big_t *b, const void *compact, int64_t width, size_t esize) {
    for (int64_t i = 0; i < NROWS; ++i)
        if (memcmp(row_at(b, i, esize), (const char *)compact + (size_t)(i * width) * esize, (size_t)width * esize))
            return 0;
    return 1;
}

static void random_rows(uint64_t seed, kdl_dtype_t dt, void *out, int64_t n, double sigma) {
    double *x = malloc((size_t)n * sizeof *x);
    cr_assert_not_null(x);
    kdl_random_rows(seed, x, n, sigma);
    kdl_to_dtype(x, out, dt, n);
    free(x);
}

/* ------------------------------------------------------------ dense loss */
static void dense_case(kdl_dtype_t sdt, kdl_dtype_t tdt, kdl_divergence_t div, kdl_reduction_t red) {
    const size_t ss = kdl_dtype_size(sdt), ts = kdl_dtype_size(tdt), gs = sizeof(double);
    void *S = malloc(NROWS * VOC * ss), *T = malloc(NROWS * VOC * ts);
    double G[NROWS * VOC], loss[NROWS], gloss[NROWS], st[7][NROWS], gst[7][NROWS];
    int64_t heads[NROWS], gheads[NROWS], info = -1, ginfo = -2;
    const int64_t labels[NROWS] = {3, -100, 7};
    cr_assert(S && T);
    random_rows(11 + (uint64_t)div, sdt, S, NROWS * VOC, 3.0);
    random_rows(29 + (uint64_t)div, tdt, T, NROWS * VOC, 3.0);

    big_t bs = big_alloc(ss), bt = big_alloc(ts), bg = big_alloc(gs);
    scatter(&bs, S, VOC, ss);
    scatter(&bt, T, VOC, ts);
    sentinels(&bg, VOC, gs, 1);

    kdl_loss_desc_t d = kdl_test_desc(div, red);
    if (div == KDL_DIV_AKL) d.head_rule = KDL_HEAD_MASS;
    for (int big = 0; big < 2; ++big) {
        kdl_loss_args_t a = big ? kdl_test_loss_args(NROWS, VOC, BIG_LD, bs.p, sdt, bt.p, tdt, bg.p,
                                                     KDL_DTYPE_F64, gloss)
                                : kdl_test_loss_args(NROWS, VOC, VOC, S, sdt, T, tdt, G, KDL_DTYPE_F64, loss);
        double (*s)[NROWS] = big ? gst : st;
        a.labels = labels;
        a.info = big ? &ginfo : &info;
        if (red == KDL_REDUCTION_NONE) {
            a.stat_fkl = s[0], a.stat_rkl = s[1], a.stat_g_head = s[2], a.stat_g_tail = s[3];
            a.stat_w_head = s[4], a.stat_w_tail = s[5], a.stat_head_size = big ? gheads : heads;
        }
        kdl_status_t stt = kdl_ref_loss_forward_backward(&d, &a);
        cr_assert_eq(stt, KDL_STATUS_SUCCESS, "%s ld %s: %s", kdl_divergence_name(div), big ? "2^31+13" : "V",
                     kdl_status_string(stt));
    }
    const size_t nl = red == KDL_REDUCTION_NONE ? NROWS : 1;
    cr_expect(memcmp(loss, gloss, nl * sizeof(double)) == 0, "%s: loss differs at ld 2^31+13",
              kdl_divergence_name(div));
    cr_expect(rows_equal(&bg, G, VOC, gs), "%s: gradient rows differ at ld 2^31+13", kdl_divergence_name(div));
    cr_expect(sentinels(&bg, VOC, gs, 0), "%s: a gradient write outside its row", kdl_divergence_name(div));
    cr_expect_eq(info, ginfo);
    if (red == KDL_REDUCTION_NONE) {
        cr_expect(memcmp(st, gst, 6 * NROWS * sizeof(double)) == 0, "%s: statistics differ",
                  kdl_divergence_name(div));
        cr_expect(memcmp(heads, gheads, sizeof heads) == 0, "%s: head sizes differ", kdl_divergence_name(div));
    }
    big_free(&bs);
    big_free(&bt);
    big_free(&bg);
    free(S);
    free(T);
}

Test(ref_large_strides, dense_loss_rows_past_2_pow_31) {
    const kdl_divergence_t divs[] = {KDL_DIV_FKL, KDL_DIV_AKL, KDL_DIV_JSD, KDL_DIV_TVD};
    const kdl_dtype_t dts[][2] = {{KDL_DTYPE_F32, KDL_DTYPE_F32},
                                  {KDL_DTYPE_BF16, KDL_DTYPE_BF16},
                                  {KDL_DTYPE_F64, KDL_DTYPE_F32}};
    for (size_t t = 0; t < 3; ++t)
        for (size_t k = 0; k < 4; ++k) {
            dense_case(dts[t][0], dts[t][1], divs[k], KDL_REDUCTION_NONE);
            dense_case(dts[t][0], dts[t][1], divs[k], KDL_REDUCTION_MEAN);
        }
}

/* ---------------------------------------------------------- sparse teacher */
#define KS 37

static void sparse_case(kdl_sparse_mode_t mode, kdl_divergence_t div) {
    float S[NROWS * VOC], LP[NROWS * KS];
    int64_t I[NROWS * KS];
    double G[NROWS * VOC], loss[NROWS], gloss[NROWS];
    random_rows(5, KDL_DTYPE_F32, S, NROWS * VOC, 3.0);
    kdl_rng_t r = {77};
    for (int64_t i = 0; i < NROWS; ++i) {
        double sum = 0, w[KS];
        for (int j = 0; j < KS; ++j) {
            I[i * KS + j] = (i * 131 + j * 27) % VOC; /* distinct: 27 and VOC are coprime, KS < VOC */
            w[j] = kdl_rng_uniform(&r) + 0.01;
            sum += w[j];
        }
        for (int j = 0; j < KS; ++j) LP[i * KS + j] = (float)log(0.9 * w[j] / sum);
    }
    big_t bs = big_alloc(sizeof(float)), bi = big_alloc(sizeof(int64_t)), bl = big_alloc(sizeof(float)),
          bg = big_alloc(sizeof(double));
    scatter(&bs, S, VOC, sizeof(float));
    scatter(&bi, I, KS, sizeof(int64_t));
    scatter(&bl, LP, KS, sizeof(float));
    sentinels(&bg, VOC, sizeof(double), 1);

    kdl_loss_desc_t d = kdl_test_desc(div, KDL_REDUCTION_NONE);
    d.temperature = 1.5;
    for (int big = 0; big < 2; ++big) {
        kdl_sparse_args_t a;
        kdl_sparse_args_init(&a);
        a.rows = NROWS, a.vocab = VOC, a.k = KS, a.mode = mode;
        a.student = big ? bs.p : (void *)S, a.ld_student = big ? BIG_LD : VOC, a.student_dtype = KDL_DTYPE_F32;
        a.teacher_indices = big ? bi.p : (void *)I, a.ld_indices = big ? BIG_LD : KS;
        a.teacher_logprobs = big ? bl.p : (void *)LP, a.ld_logprobs = big ? BIG_LD : KS;
        a.teacher_dtype = KDL_DTYPE_F32;
        a.grad = big ? bg.p : (void *)G, a.ld_grad = big ? BIG_LD : VOC, a.grad_dtype = KDL_DTYPE_F64;
        a.out_dtype = KDL_DTYPE_F64, a.loss = big ? gloss : loss;
        kdl_status_t st = kdl_ref_sparse_loss(&d, &a);
        cr_assert_eq(st, KDL_STATUS_SUCCESS, "sparse %s ld %s: %s", kdl_divergence_name(div),
                     big ? "2^31+13" : "compact", kdl_status_string(st));
    }
    for (int i = 0; i < NROWS; ++i) cr_expect(isfinite(loss[i]), "sparse row %d: loss %g", i, loss[i]);
    cr_expect(memcmp(loss, gloss, sizeof loss) == 0, "sparse %s: loss differs", kdl_divergence_name(div));
    cr_expect(rows_equal(&bg, G, VOC, sizeof(double)), "sparse %s: gradient differs", kdl_divergence_name(div));
    cr_expect(sentinels(&bg, VOC, sizeof(double), 0), "sparse %s: write outside a row", kdl_divergence_name(div));
    big_free(&bs);
    big_free(&bi);
    big_free(&bl);
    big_free(&bg);
}

Test(ref_large_strides, sparse_teacher_rows_past_2_pow_31) {
    sparse_case(KDL_SPARSE_RENORMALISED, KDL_DIV_FKL);
    sparse_case(KDL_SPARSE_RENORMALISED, KDL_DIV_JSD);
    sparse_case(KDL_SPARSE_TAIL_BUCKET, KDL_DIV_RKL);
    sparse_case(KDL_SPARSE_TAIL_BUCKET, KDL_DIV_AKL);
}

/* ------------------------------------------------------------ fused linear */
#define HID 8

Test(ref_large_strides, fused_linear_hidden_rows_past_2_pow_31) {
    float H[NROWS * HID], W[VOC * HID], T[NROWS * VOC];
    double dH[NROWS * HID], dW[VOC * HID], gdW[VOC * HID], loss, gloss;
    random_rows(3, KDL_DTYPE_F32, H, NROWS * HID, 1.0);
    random_rows(4, KDL_DTYPE_F32, W, VOC * HID, 0.5);
    random_rows(6, KDL_DTYPE_F32, T, NROWS * VOC, 3.0);
    big_t bh = big_alloc(sizeof(float)), bt = big_alloc(sizeof(float)), bgh = big_alloc(sizeof(double));
    scatter(&bh, H, HID, sizeof(float));
    scatter(&bt, T, VOC, sizeof(float));
    sentinels(&bgh, HID, sizeof(double), 1);
    kdl_loss_desc_t d = kdl_test_desc(KDL_DIV_AKL, KDL_REDUCTION_SUM);
    for (int big = 0; big < 2; ++big) {
        kdl_fused_linear_args_t a;
        kdl_fused_linear_args_init(&a);
        a.rows = NROWS, a.hidden = HID, a.vocab = VOC;
        a.hidden_states = big ? bh.p : (void *)H, a.ld_hidden = big ? BIG_LD : HID;
        a.hidden_dtype = KDL_DTYPE_F32;
        a.weight = W, a.ld_weight = HID, a.weight_dtype = KDL_DTYPE_F32;
        a.teacher = big ? bt.p : (void *)T, a.ld_teacher = big ? BIG_LD : VOC, a.teacher_dtype = KDL_DTYPE_F32;
        a.grad_hidden = big ? bgh.p : (void *)dH, a.ld_grad_hidden = big ? BIG_LD : HID;
        a.grad_weight = big ? gdW : dW, a.ld_grad_weight = HID;
        a.grad_dtype = KDL_DTYPE_F64, a.out_dtype = KDL_DTYPE_F64, a.loss = big ? &gloss : &loss;
        kdl_status_t st = kdl_ref_fused_linear_loss(&d, &a);
        cr_assert_eq(st, KDL_STATUS_SUCCESS, "fused ld %s: %s", big ? "2^31+13" : "compact", kdl_status_string(st));
    }
    cr_expect(isfinite(loss) && loss > 0, "fused loss %g", loss);
    cr_expect(memcmp(&loss, &gloss, sizeof loss) == 0, "fused: loss differs");
    cr_expect(rows_equal(&bgh, dH, HID, sizeof(double)), "fused: dH differs");
    cr_expect(memcmp(dW, gdW, sizeof dW) == 0, "fused: dW differs");
    cr_expect(sentinels(&bgh, HID, sizeof(double), 0), "fused: a dH write outside its row");
    big_free(&bh);
    big_free(&bt);
    big_free(&bgh);
}
