/*
 * host/ref_shard.c - float64 CPU reference of the vocabulary-parallel loss
 * (kdloss_ext.h part 2): the step protocol, the argument check and the size
 * query that the GPU path shares.
 *
 * Shard r holds columns [off_r, off_r + V_r) of the student and teacher
 * logits.  Per row (DESIGN section 1):
 *
 *   step 0  (MAX)  local max of s, of t, and a bad-data flag (NaN or +inf);
 *   step 1  (SUM)  classify (ignored / invalid / valid, now the same on every
 *                  shard), z_s = sum exp((s - m_s)/tau) and z_t likewise,
 *                  with the global maxima m_s, m_t;
 *                  AKL: plus the digit-0 histogram of the teacher keys;
 *   AKL digits (SUM) the histogram (count, mass) of the next 8-bit digit of
 *                  the teacher key among the tokens whose higher digits equal
 *                  the boundary prefix found so far (a radix select);
 *   AKL tie (SUM)  per shard, the number of its tokens whose key is the
 *                  boundary key, so each shard knows how many tied tokens
 *                  lie in lower-ranked shards (ties go by lower global index);
 *   partial (SUM)  the slice's sums: loss and G = sum qg (AKL: FKL, RKL, their
 *                  G, and the head/tail gaps, combined with the weights after
 *                  the reduce: the weights multiply linearly);
 *   finish         loss (every shard the same) and dz = qg - q G on the slice.
 *
 * lq = (s - m_s)/tau - log z_s, lp = (t - m_t)/tau - log z_t: the dense
 * reference's formula (the max subtracted before dividing by tau), the sums
 * merely grouped by shard, so the result equals the unsharded reference to
 * rounding for every tau.  (It used s/tau - max(s/tau): for a tiny tau s/tau
 * overflows to inf, and inf - inf made valid rows NaN where the dense
 * reference has the arg-max limit; docs/hardening.md F9.)  So in the
 * reference's state m_s, m_t are the maxima of the raw logits and lse_s,
 * lse_t the logarithms log z_s, log z_t of the shifted sums; the exchange
 * of step 0 carries max s and max t.  The AKL key orders by the raw teacher logit (kdl_ext_order_key),
 * the dense reference by the rounded probability: the two differ only for
 * distinct logits whose probabilities round to the same double.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ext_internal.h"
#include "internal.h"
#include "kdloss/kdloss_ref.h"

void kdl_shard_args_init(kdl_shard_args_t *a)
{
    if (!a) return;
    memset(a, 0, sizeof *a);
    a->struct_size = sizeof *a;
    a->num_shards = 1;
    a->student_dtype = KDL_DTYPE_F32;
    a->teacher_dtype = KDL_DTYPE_F32;
    a->grad_dtype = KDL_DTYPE_F32;
    a->out_dtype = KDL_DTYPE_F32;
}

/*
 * The shard's place in the partition of [0, vocab), as far as one shard can
 * tell: num_shards in [1, vocab] (BAD_SIZE), shard_rank in [0, num_shards)
 * (BAD_PARAM), the slice non-empty and inside [0, vocab) (BAD_SIZE), and the
 * rank consistent with the slice (BAD_PARAM): slices are contiguous, ordered
 * by rank and non-empty, so rank r has at least r columns before its slice
 * and at least num_shards - 1 - r after it, rank 0 starts at column 0 and the
 * last rank ends at vocab.  A rank that does not match its slice would make
 * the AKL tie step count the tied tokens of the wrong shards (ties go to the
 * lowest global index) and leave columns without a shard.
 */
static kdl_status_t check_partition(const kdl_shard_args_t *a)
{
    if (a->num_shards < 1 || a->num_shards > a->vocab)
        return kdl_fail(KDL_STATUS_BAD_SIZE, "num_shards = %d not in [1, vocab = %lld]", (int)a->num_shards,
                        (long long)a->vocab);
    if (a->shard_rank < 0 || a->shard_rank >= a->num_shards)
        return kdl_fail(KDL_STATUS_BAD_PARAM, "shard_rank = %d not in [0, %d)", (int)a->shard_rank,
                        (int)a->num_shards);
    if (a->vocab_local < 1 || a->vocab_offset < 0 || a->vocab_local > a->vocab - a->vocab_offset)
        return kdl_fail(KDL_STATUS_BAD_SIZE, "slice [%lld, %lld + %lld) not inside [0, %lld)",
                        (long long)a->vocab_offset, (long long)a->vocab_offset, (long long)a->vocab_local,
                        (long long)a->vocab);
    const int64_t after = a->vocab - a->vocab_offset - a->vocab_local;
    const int64_t r = a->shard_rank, last = (int64_t)a->num_shards - 1;
    if (r == 0 && a->vocab_offset != 0)
        return kdl_fail(KDL_STATUS_BAD_PARAM, "shard_rank 0 must hold column 0 (vocab_offset = %lld)",
                        (long long)a->vocab_offset);
    if (r == last && after != 0)
        return kdl_fail(KDL_STATUS_BAD_PARAM, "the last shard (rank %lld) must end at vocab = %lld (slice ends at %lld)",
                        (long long)r, (long long)a->vocab, (long long)(a->vocab_offset + a->vocab_local));
    if (a->vocab_offset < r || after < last - r)
        return kdl_fail(KDL_STATUS_BAD_PARAM,
                        "shard_rank %lld of %d cannot hold slice [%lld, %lld): ranks 0..%lld need a column each "
                        "before it and ranks %lld..%lld one each after it",
                        (long long)r, (int)a->num_shards, (long long)a->vocab_offset,
                        (long long)(a->vocab_offset + a->vocab_local), (long long)(r - 1), (long long)(r + 1),
                        (long long)last);
    return KDL_STATUS_SUCCESS;
}

kdl_status_t kdl_shard_validate(const kdl_loss_desc_t *d, const kdl_shard_args_t *a, int allow_f64)
{
    kdl_clear_error();
    KDL_CHECK_STRUCT_PAIR(d, a);
    if (a->vocab < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "vocab = %lld < 1", (long long)a->vocab);
    kdl_status_t st = kdl_ext_validate_desc(d, a->vocab, a->out_dtype);
    if (st != KDL_STATUS_SUCCESS) return st;
    st = kdl_ext_check_dtypes(a->student_dtype, a->teacher_dtype, a->grad != NULL, a->grad_dtype, allow_f64);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (a->rows < 0) return kdl_fail(KDL_STATUS_BAD_SIZE, "rows = %lld < 0", (long long)a->rows);
    st = check_partition(a);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (a->ld_student < a->vocab_local || a->ld_teacher < a->vocab_local ||
        (a->grad && a->ld_grad < a->vocab_local))
        return kdl_fail(KDL_STATUS_BAD_STRIDE, "a row stride is smaller than vocab_local = %lld",
                        (long long)a->vocab_local);
    if (a->rows > 0 && !a->student) return kdl_fail(KDL_STATUS_NULL_POINTER, "student is NULL");
    if (a->rows > 0 && !a->teacher) return kdl_fail(KDL_STATUS_NULL_POINTER, "teacher is NULL");
    if (!a->state) return kdl_fail(KDL_STATUS_NULL_POINTER, "state is NULL");
    if (a->rows > 0 && !a->exchange) return kdl_fail(KDL_STATUS_NULL_POINTER, "exchange is NULL");
    if (!a->loss && !(d->reduction == KDL_REDUCTION_NONE && a->rows == 0))
        return kdl_fail(KDL_STATUS_NULL_POINTER, "loss is NULL");
    const kdl_array_ref_t arrays[] = {{a->student, kdl_dtype_size(a->student_dtype), "student"},
                                      {a->teacher, kdl_dtype_size(a->teacher_dtype), "teacher"},
                                      {a->labels, 8, "labels"},
                                      {a->grad, kdl_dtype_size(a->grad_dtype), "grad"},
                                      {a->loss, kdl_dtype_size(a->out_dtype), "loss"},
                                      {a->info, 8, "info"},
                                      {a->valid_rows, 8, "valid_rows"},
                                      {a->stat_head_size, 8, "stat_head_size"},
                                      {a->state, _Alignof(kdl_shard_row_t), "state"},
                                      {a->exchange, sizeof(double), "exchange"}};
    st = kdl_check_alignment(arrays, sizeof arrays / sizeof arrays[0]);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (!kdl_ext_span_ok(a->rows, a->vocab_local, a->ld_student, kdl_dtype_size(a->student_dtype)) ||
        !kdl_ext_span_ok(a->rows, a->vocab_local, a->ld_teacher, kdl_dtype_size(a->teacher_dtype)) ||
        (a->grad && !kdl_ext_span_ok(a->rows, a->vocab_local, a->ld_grad, kdl_dtype_size(a->grad_dtype))) ||
        !kdl_ext_span_ok(a->rows, a->vocab_local, a->vocab_local, 1) ||
        (uint64_t)a->rows > (uint64_t)(SIZE_MAX - sizeof(kdl_shard_header_t)) / sizeof(kdl_shard_row_t) ||
        (uint64_t)a->rows > (uint64_t)SIZE_MAX / sizeof(double) / (2 + 2 * KDL_SHARD_BINS + (uint64_t)a->num_shards))
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "rows x stride overflows");
    return KDL_STATUS_SUCCESS;
}

static int64_t exchange_fields(const kdl_loss_desc_t *d, const kdl_shard_args_t *a)
{
    int64_t f = KDL_SHARD_PARTIAL_FIELDS;
    if (d->divergence == KDL_DIV_AKL) {
        if (f < 2 + 2 * KDL_SHARD_BINS) f = 2 + 2 * KDL_SHARD_BINS;
        if (f < a->num_shards) f = a->num_shards;
    }
    return f;
}

kdl_status_t kdl_shard_sizes(const kdl_loss_desc_t *d, const kdl_shard_args_t *a, size_t *state_bytes,
                             size_t *exchange_count, int *num_steps)
{
    kdl_clear_error();
    if (!d || !a) return kdl_fail(KDL_STATUS_NULL_POINTER, "desc or args is NULL");
    if (a->struct_size != sizeof *a || d->struct_size != sizeof *d)
        return kdl_fail(KDL_STATUS_BAD_STRUCT_SIZE, "struct_size not recognised");
    if ((unsigned)d->divergence >= KDL_DIV_COUNT_)
        return kdl_fail(KDL_STATUS_BAD_ENUM, "divergence %d unknown", (int)d->divergence);
    if ((unsigned)a->teacher_dtype > KDL_DTYPE_F64) return kdl_fail(KDL_STATUS_BAD_ENUM, "unknown dtype");
    if (a->rows < 0) return kdl_fail(KDL_STATUS_BAD_SIZE, "rows = %lld < 0", (long long)a->rows);
    if (a->num_shards < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "num_shards = %d < 1", (int)a->num_shards);
    int64_t f = exchange_fields(d, a);
    if ((uint64_t)a->rows > (uint64_t)(SIZE_MAX - sizeof(kdl_shard_header_t)) / sizeof(kdl_shard_row_t) ||
        (uint64_t)a->rows > (uint64_t)SIZE_MAX / sizeof(double) / (uint64_t)f)
        return kdl_fail(KDL_STATUS_SIZE_OVERFLOW, "rows = %lld", (long long)a->rows);
    /* the shard's rank and slice, as every step checks them (so a caller
     * learns of a bad partition before allocating the state) */
    if (a->vocab < 1) return kdl_fail(KDL_STATUS_BAD_SIZE, "vocab = %lld < 1", (long long)a->vocab);
    kdl_status_t st = check_partition(a);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (state_bytes) *state_bytes = sizeof(kdl_shard_header_t) + (size_t)a->rows * sizeof(kdl_shard_row_t);
    if (exchange_count) *exchange_count = (size_t)a->rows * (size_t)f;
    if (num_steps) *num_steps = kdl_shard_num_steps(d->divergence == KDL_DIV_AKL, a->teacher_dtype);
    return KDL_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------- access */
static double S_at(const kdl_shard_args_t *a, int64_t i, int64_t v)
{
    return kdl_load_as_double(a->student, a->student_dtype, i * a->ld_student + v);
}
static double T_at(const kdl_shard_args_t *a, int64_t i, int64_t v)
{
    return kdl_load_as_double(a->teacher, a->teacher_dtype, i * a->ld_teacher + v);
}
static int key_width(kdl_dtype_t t) { return (int)kdl_dtype_size(t); }

static uint64_t raw_bits(const void *base, kdl_dtype_t t, int64_t i)
{
    switch (t) {
    case KDL_DTYPE_F32: {
        uint32_t b;
        memcpy(&b, (const float *)base + i, 4);
        return b;
    }
    case KDL_DTYPE_F16:
    case KDL_DTYPE_BF16: return ((const uint16_t *)base)[i];
    case KDL_DTYPE_F64: {
        uint64_t b;
        memcpy(&b, (const double *)base + i, 8);
        return b;
    }
    }
    return 0;
}

static double value_of_bits(uint64_t bits, kdl_dtype_t t)
{
    switch (t) {
    case KDL_DTYPE_F32: {
        uint32_t b = (uint32_t)bits;
        float f;
        memcpy(&f, &b, 4);
        return f;
    }
    case KDL_DTYPE_F16: return kdl_half_to_float((uint16_t)bits);
    case KDL_DTYPE_BF16: return kdl_bf16_to_float((uint16_t)bits);
    case KDL_DTYPE_F64: {
        double x;
        memcpy(&x, &bits, 8);
        return x;
    }
    }
    return NAN;
}

static uint64_t key_at(const kdl_shard_args_t *a, int64_t i, int64_t v)
{
    return kdl_ext_order_key(raw_bits(a->teacher, a->teacher_dtype, i * a->ld_teacher + v),
                             key_width(a->teacher_dtype));
}

/* ----------------------------------------------------------------- phases */
typedef struct ctx {
    const kdl_loss_desc_t *d;
    const kdl_shard_args_t *a;
    kdl_shard_header_t *hdr;
    kdl_shard_row_t *rows;
    int akl, D, width;
    int64_t F; /* exchange fields per row */
} ctx_t;

static void write_max(const ctx_t *c)
{
    const kdl_shard_args_t *a = c->a;
    for (int64_t i = 0; i < a->rows; i++) {
        double *ex = a->exchange + i * 3;
        double ms = -INFINITY, mt = -INFINITY, bad = 0;
        if (!(a->labels && a->labels[i] == c->d->ignore_index)) {
            for (int64_t v = 0; v < a->vocab_local; v++) {
                double s = S_at(a, i, v), t = T_at(a, i, v);
                if (isnan(s) || isnan(t) || s == INFINITY || t == INFINITY) {
                    bad = 1;
                    continue;
                }
                if (s > ms) ms = s;
                if (t > mt) mt = t;
            }
        }
        ex[0] = ms;
        ex[1] = mt;
        ex[2] = bad;
    }
}

static void absorb_max(const ctx_t *c)
{
    const kdl_shard_args_t *a = c->a;
    int64_t nv = 0, ni = 0;
    for (int64_t i = 0; i < a->rows; i++) {
        const double *ex = a->exchange + i * 3;
        kdl_shard_row_t *r = &c->rows[i];
        memset(r, 0, sizeof *r);
        r->m_s = ex[0];
        r->m_t = ex[1];
        if (a->labels && a->labels[i] == c->d->ignore_index)
            r->cls = KDL_EXT_ROW_IGNORED;
        else if (ex[2] != 0 || r->m_s == -INFINITY || r->m_t == -INFINITY)
            r->cls = KDL_EXT_ROW_INVALID;
        else
            r->cls = KDL_EXT_ROW_VALID;
        nv += r->cls == KDL_EXT_ROW_VALID;
        ni += r->cls == KDL_EXT_ROW_INVALID;
    }
    c->hdr->valid_rows = nv;
    c->hdr->invalid_rows = ni;
}

/* Does token v of row i lie under the current prefix (its digits above
 * `digit` equal r->prefix)? */
static int under_prefix(const ctx_t *c, uint64_t key, const kdl_shard_row_t *r, int digit)
{
    if (digit == 0) return 1;
    int shift = 8 * (c->width - digit);
    return (key >> shift) == r->prefix;
}

static int digit_of(const ctx_t *c, uint64_t key, int digit)
{
    return (int)((key >> (8 * (c->width - 1 - digit))) & 0xffu);
}

/* Histogram of `digit` among the row's tokens under the prefix, into
 * cnt[256], mass[256] (mass relative to m_t). */
static void histogram(const ctx_t *c, int64_t i, int digit, double *cnt, double *mass)
{
    const kdl_shard_args_t *a = c->a;
    const kdl_shard_row_t *r = &c->rows[i];
    for (int b = 0; b < KDL_SHARD_BINS; b++) cnt[b] = mass[b] = 0;
    if (r->cls != KDL_EXT_ROW_VALID || r->all_head) return;
    for (int64_t v = 0; v < a->vocab_local; v++) {
        uint64_t key = key_at(a, i, v);
        if (!under_prefix(c, key, r, digit)) continue;
        int b = digit_of(c, key, digit);
        cnt[b] += 1;
        mass[b] += exp((T_at(a, i, v) - r->m_t) / c->d->temperature);
    }
}

static void write_norm(const ctx_t *c)
{
    const kdl_shard_args_t *a = c->a;
    const double tau = c->d->temperature;
    int64_t F = c->akl ? 2 + 2 * KDL_SHARD_BINS : 2;
    for (int64_t i = 0; i < a->rows; i++) {
        double *ex = a->exchange + i * F;
        const kdl_shard_row_t *r = &c->rows[i];
        double zs = 0, zt = 0;
        if (r->cls == KDL_EXT_ROW_VALID)
            for (int64_t v = 0; v < a->vocab_local; v++) {
                zs += exp((S_at(a, i, v) - r->m_s) / tau);
                zt += exp((T_at(a, i, v) - r->m_t) / tau);
            }
        ex[0] = zs;
        ex[1] = zt;
        if (c->akl) histogram(c, i, 0, ex + 2, ex + 2 + KDL_SHARD_BINS);
    }
}

static void absorb_norm(const ctx_t *c, int64_t F)
{
    for (int64_t i = 0; i < c->a->rows; i++) {
        const double *ex = c->a->exchange + i * F;
        kdl_shard_row_t *r = &c->rows[i];
        r->z_s = ex[0];
        r->z_t = ex[1];
        r->lse_s = log(r->z_s); /* of the shifted sums: lq = (s - m_s)/tau - lse_s */
        r->lse_t = log(r->z_t);
    }
}

/* Absorbs the reduced histogram of `digit` (at ex + off per row, stride F). */
static void absorb_digit(const ctx_t *c, int digit, int64_t F, int64_t off)
{
    const kdl_loss_desc_t *d = c->d;
    for (int64_t i = 0; i < c->a->rows; i++) {
        kdl_shard_row_t *r = &c->rows[i];
        if (r->cls != KDL_EXT_ROW_VALID || r->all_head) continue;
        const double *cnt = c->a->exchange + i * F + off, *mass = cnt + KDL_SHARD_BINS;
        int b = kdl_shard_find_bin((int)d->head_rule, d->mu, d->top_k, cnt, mass, r->z_t, &r->count_before,
                                   &r->mass_before);
        if (b < 0) {
            r->all_head = 1;
            r->head_size = r->count_before;
            continue;
        }
        r->prefix = (r->prefix << 8) | (uint64_t)b;
        if (digit == c->D - 1) { /* the key is complete: resolve the tie */
            r->n_tie = (int64_t)cnt[b];
            double x = value_of_bits(kdl_ext_order_key_bits(r->prefix, c->width), c->a->teacher_dtype);
            double p = exp((x - r->m_t) / d->temperature - r->lse_t);
            r->j_take = kdl_shard_tie_take((int)d->head_rule, d->mu, d->top_k, r->count_before,
                                           r->mass_before / r->z_t, r->n_tie, p);
            r->head_size = r->count_before + r->j_take;
        }
    }
}

static void write_digit(const ctx_t *c, int digit)
{
    for (int64_t i = 0; i < c->a->rows; i++) {
        double *ex = c->a->exchange + i * 2 * KDL_SHARD_BINS;
        histogram(c, i, digit, ex, ex + KDL_SHARD_BINS);
    }
}

static void write_tie(const ctx_t *c)
{
    const kdl_shard_args_t *a = c->a;
    const int64_t R = a->num_shards;
    for (int64_t i = 0; i < a->rows; i++) {
        double *ex = a->exchange + i * R;
        const kdl_shard_row_t *r = &c->rows[i];
        for (int64_t s = 0; s < R; s++) ex[s] = 0;
        if (r->cls != KDL_EXT_ROW_VALID || r->all_head) continue;
        double n = 0;
        for (int64_t v = 0; v < a->vocab_local; v++) n += key_at(a, i, v) == r->prefix;
        ex[a->shard_rank] = n;
    }
}

static void absorb_tie(const ctx_t *c)
{
    const kdl_shard_args_t *a = c->a;
    for (int64_t i = 0; i < a->rows; i++) {
        const double *ex = a->exchange + i * a->num_shards;
        kdl_shard_row_t *r = &c->rows[i];
        r->tie_before = 0;
        for (int32_t s = 0; s < a->shard_rank; s++) r->tie_before += (int64_t)ex[s];
    }
}

/* Head membership of the slice's tokens of row i, into mask[vocab_local]. */
static void head_of_row(const ctx_t *c, int64_t i, unsigned char *mask)
{
    const kdl_shard_args_t *a = c->a;
    const kdl_shard_row_t *r = &c->rows[i];
    int64_t tie_rank = r->tie_before;
    for (int64_t v = 0; v < a->vocab_local; v++) {
        if (r->all_head) {
            mask[v] = 1;
            continue;
        }
        uint64_t key = key_at(a, i, v);
        if (key < r->prefix)
            mask[v] = 1;
        else if (key > r->prefix)
            mask[v] = 0;
        else
            mask[v] = tie_rank++ < r->j_take;
    }
}

static kdl_elem_params_d params_of(const kdl_loss_desc_t *d, double w_head, double w_tail)
{
    double coef = d->divergence == KDL_DIV_JSD ? d->beta : d->alpha;
    return kdl_elem_params_make_d((int)d->divergence, coef, w_head, w_tail);
}

static void write_partial(const ctx_t *c, unsigned char *mask)
{
    const kdl_shard_args_t *a = c->a;
    const kdl_loss_desc_t *d = c->d;
    const double tau = d->temperature;
    kdl_elem_params_d pr = params_of(d, 0.5, 0.5);
    for (int64_t i = 0; i < a->rows; i++) {
        double *ex = a->exchange + i * KDL_SHARD_PARTIAL_FIELDS;
        const kdl_shard_row_t *r = &c->rows[i];
        for (int f = 0; f < KDL_SHARD_PARTIAL_FIELDS; f++) ex[f] = 0;
        if (r->cls != KDL_EXT_ROW_VALID) continue;
        if (c->akl) head_of_row(c, i, mask);
        for (int64_t v = 0; v < a->vocab_local; v++) {
            double lq = (S_at(a, i, v) - r->m_s) / tau - r->lse_s;
            double lp = (T_at(a, i, v) - r->m_t) / tau - r->lse_t;
            if (c->akl) {
                kdl_elem_d f = kdl_elem_fkl_d(lp, lq), g = kdl_elem_rkl_d(lp, lq);
                ex[KDL_SHARD_P_FKL] += f.loss;
                ex[KDL_SHARD_P_RKL] += g.loss;
                ex[KDL_SHARD_P_GF] += f.qg;
                ex[KDL_SHARD_P_GR] += g.qg;
                double gap = fabs(exp(lp) - exp(lq));
                ex[mask[v] ? KDL_SHARD_P_GHEAD : KDL_SHARD_P_GTAIL] += gap;
            } else {
                kdl_elem_d e = kdl_elem_eval_d(&pr, lp, lq);
                ex[KDL_SHARD_P_LOSS] += e.loss;
                ex[KDL_SHARD_P_G] += e.qg;
            }
        }
    }
}

static void finish(const ctx_t *c, unsigned char *mask)
{
    const kdl_shard_args_t *a = c->a;
    const kdl_loss_desc_t *d = c->d;
    const double tau = d->temperature;
    const int64_t nv = c->hdr->valid_rows;
    /* as the dense reference: scale 0 switches a term off even where it is
     * infinite, and the gradient is (gscale dz) / tau (kdl_scaled_*) */
    double gscale = d->scale;
    if (d->reduction == KDL_REDUCTION_MEAN) gscale = nv ? gscale / (double)nv : 0.0;
    double total = 0;
    for (int64_t i = 0; i < a->rows; i++) {
        const double *ex = a->exchange + i * KDL_SHARD_PARTIAL_FIELDS;
        kdl_shard_row_t *r = &c->rows[i];
        double l = 0;
        if (r->cls == KDL_EXT_ROW_VALID) {
            r->w_head = r->w_tail = 0.5;
            if (c->akl) {
                kdl_akl_weights_d(ex[KDL_SHARD_P_GHEAD], ex[KDL_SHARD_P_GTAIL], &r->w_head, &r->w_tail);
                r->loss = (r->w_head > 0 ? r->w_head * ex[KDL_SHARD_P_FKL] : 0) +
                          (r->w_tail > 0 ? r->w_tail * ex[KDL_SHARD_P_RKL] : 0);
                r->G = r->w_head * ex[KDL_SHARD_P_GF] + (r->w_tail > 0 ? r->w_tail * ex[KDL_SHARD_P_GR] : 0);
            } else {
                r->loss = ex[KDL_SHARD_P_LOSS];
                r->G = ex[KDL_SHARD_P_G];
            }
            l = r->loss;
            total += l;
            if (a->grad) {
                kdl_elem_params_d pr = params_of(d, r->w_head, r->w_tail);
                for (int64_t v = 0; v < a->vocab_local; v++) {
                    double lq = (S_at(a, i, v) - r->m_s) / tau - r->lse_s;
                    double lp = (T_at(a, i, v) - r->m_t) / tau - r->lse_t;
                    kdl_elem_d e = kdl_elem_eval_d(&pr, lp, lq);
                    kdl_store_from_double(a->grad, a->grad_dtype, i * a->ld_grad + v,
                                          kdl_scaled_grad(gscale, kdl_elem_dz_d(e.qg, exp(lq), r->G), tau));
                }
            }
            if (c->akl && a->head_mask) head_of_row(c, i, a->head_mask + i * a->vocab_local);
        } else {
            if (a->grad)
                for (int64_t v = 0; v < a->vocab_local; v++)
                    kdl_store_from_double(a->grad, a->grad_dtype, i * a->ld_grad + v, 0.0);
            if (c->akl && a->head_mask) memset(a->head_mask + i * a->vocab_local, 0, (size_t)a->vocab_local);
            if (r->cls == KDL_EXT_ROW_INVALID) l = NAN;
        }
        if (d->reduction == KDL_REDUCTION_NONE)
            kdl_store_from_double(a->loss, a->out_dtype, i, kdl_scaled_loss(d->scale, l));
        if (c->akl && a->stat_head_size) a->stat_head_size[i] = r->cls == KDL_EXT_ROW_VALID ? r->head_size : 0;
    }
    if (d->reduction == KDL_REDUCTION_SUM)
        kdl_store_from_double(a->loss, a->out_dtype, 0, kdl_scaled_loss(d->scale, total));
    else if (d->reduction == KDL_REDUCTION_MEAN)
        kdl_store_from_double(a->loss, a->out_dtype, 0, nv ? kdl_scaled_loss(d->scale, total) / (double)nv : 0.0);
    if (a->info) *a->info = c->hdr->invalid_rows;
    if (a->valid_rows) *a->valid_rows = nv;
}

kdl_status_t kdl_ref_shard_step(const kdl_loss_desc_t *d, const kdl_shard_args_t *a, int step, kdl_shard_op_t *op,
                                int64_t *count)
{
    kdl_status_t st = kdl_shard_validate(d, a, 1);
    if (st != KDL_STATUS_SUCCESS) return st;
    if (!op || !count) return kdl_fail(KDL_STATUS_NULL_POINTER, "op or count is NULL");
    ctx_t c;
    c.d = d;
    c.a = a;
    c.hdr = (kdl_shard_header_t *)a->state;
    c.rows = (kdl_shard_row_t *)(c.hdr + 1);
    c.akl = d->divergence == KDL_DIV_AKL;
    c.D = kdl_shard_digits(c.akl, a->teacher_dtype);
    c.width = key_width(a->teacher_dtype);
    c.F = exchange_fields(d, a);
    int nsteps = kdl_shard_num_steps(c.akl, a->teacher_dtype);
    if (step < 0 || step >= nsteps)
        return kdl_fail(KDL_STATUS_BAD_PARAM, "step %d not in [0, %d)", step, nsteps);
    int digit;
    kdl_shard_phase_t ph = kdl_shard_phase_of(c.akl, a->teacher_dtype, step, &digit);
    const int64_t N = a->rows;
    unsigned char *mask = NULL;
    if (c.akl && (ph == KDL_SHARD_PH_PARTIAL)) {
        mask = (unsigned char *)malloc((size_t)a->vocab_local);
        if (!mask) return kdl_fail(KDL_STATUS_ALLOC_FAILED, "head mask scratch");
    }
    const int64_t norm_fields = c.akl ? 2 + 2 * KDL_SHARD_BINS : 2;
    switch (ph) {
    case KDL_SHARD_PH_MAX:
        write_max(&c);
        *op = KDL_SHARD_OP_MAX;
        *count = 3 * N;
        break;
    case KDL_SHARD_PH_NORM:
        absorb_max(&c);
        write_norm(&c);
        *op = KDL_SHARD_OP_SUM;
        *count = norm_fields * N;
        break;
    case KDL_SHARD_PH_DIGIT: /* digit >= 1: absorb digit - 1 */
        if (digit == 1) {
            absorb_norm(&c, norm_fields);
            absorb_digit(&c, 0, norm_fields, 2);
        } else {
            absorb_digit(&c, digit - 1, 2 * KDL_SHARD_BINS, 0);
        }
        write_digit(&c, digit);
        *op = KDL_SHARD_OP_SUM;
        *count = 2 * KDL_SHARD_BINS * N;
        break;
    case KDL_SHARD_PH_TIE:
        absorb_digit(&c, c.D - 1, 2 * KDL_SHARD_BINS, 0);
        write_tie(&c);
        *op = KDL_SHARD_OP_SUM;
        *count = (int64_t)a->num_shards * N;
        break;
    case KDL_SHARD_PH_PARTIAL:
        if (c.akl)
            absorb_tie(&c);
        else
            absorb_norm(&c, norm_fields);
        write_partial(&c, mask);
        *op = KDL_SHARD_OP_SUM;
        *count = KDL_SHARD_PARTIAL_FIELDS * N;
        break;
    case KDL_SHARD_PH_FINISH:
        finish(&c, NULL);
        *op = KDL_SHARD_OP_DONE;
        *count = 0;
        break;
    }
    free(mask);
    return KDL_STATUS_SUCCESS;
}
