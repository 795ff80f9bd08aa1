/*
 * bench/bench_lib.c - see bench_lib.h.  Plain C11, no CUDA: the matrix and
 * option parsing, the byte model, the arithmetic, percentiles, the JSON
 * writer and the table.  tests/test_bench.c includes this file directly.
 */
#include "bench_lib.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- helpers */
static void seterr(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Whole-string decimal integer in [lo, hi]. */
static int parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    if (!s || !*s || isspace((unsigned char)*s)) return -1;
    errno = 0;
    char *end = NULL;
    long long v = strtoll(s, &end, 10);
    if (errno || !end || *end || v < lo || v > hi) return -1;
    *out = (int64_t)v;
    return 0;
}

static int parse_f64(const char *s, double *out)
{
    if (!s || !*s || isspace((unsigned char)*s)) return -1;
    errno = 0;
    char *end = NULL;
    double v = strtod(s, &end);
    if (errno || !end || *end || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

/* Splits a comma-separated list; calls item() per item (copied, NUL
 * terminated).  Empty items are errors. */
typedef int (*item_fn)(const char *item, void *ctx, char *err, size_t errlen);
static int for_each_item(const char *what, const char *s, item_fn fn, void *ctx, char *err,
                         size_t errlen)
{
    if (!s || !*s) {
        seterr(err, errlen, "%s: empty list", what);
        return -1;
    }
    const char *p = s;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        char item[64];
        if (n == 0) {
            seterr(err, errlen, "%s: empty item in '%s'", what, s);
            return -1;
        }
        if (n >= sizeof item) {
            seterr(err, errlen, "%s: item too long in '%s'", what, s);
            return -1;
        }
        memcpy(item, p, n);
        item[n] = '\0';
        if (fn(item, ctx, err, errlen) != 0) return -1;
        if (!comma) break;
        p = comma + 1;
    }
    return 0;
}

/* --------------------------------------------------------------- shapes */
struct shapes_ctx {
    kdlb_shape_t *out;
    int max, n;
};

static int shape_item(const char *item, void *vctx, char *err, size_t errlen)
{
    struct shapes_ctx *c = (struct shapes_ctx *)vctx;
    const char *colon = strchr(item, ':');
    char a[32], b[32];
    int64_t rows, vocab;
    if (!colon || strchr(colon + 1, ':') || (size_t)(colon - item) >= sizeof a ||
        strlen(colon + 1) >= sizeof b) {
        seterr(err, errlen, "--shapes: bad shape '%s' (expected N:V)", item);
        return -1;
    }
    memcpy(a, item, (size_t)(colon - item));
    a[colon - item] = '\0';
    strcpy(b, colon + 1);
    /* N * V * 16 bytes must stay far below 2^63. */
    if (parse_i64(a, 1, INT64_C(1) << 31, &rows) || parse_i64(b, 1, INT64_C(1) << 31, &vocab) ||
        rows > (INT64_C(1) << 58) / vocab) {
        seterr(err, errlen, "--shapes: bad shape '%s' (N and V integers >= 1, N*V < 2^58)", item);
        return -1;
    }
    for (int i = 0; i < c->n; i++)
        if (c->out[i].rows == rows && c->out[i].vocab == vocab) {
            seterr(err, errlen, "--shapes: duplicate shape '%s'", item);
            return -1;
        }
    if (c->n >= c->max) {
        seterr(err, errlen, "--shapes: more than %d shapes", c->max);
        return -1;
    }
    c->out[c->n].rows = rows;
    c->out[c->n].vocab = vocab;
    c->n++;
    return 0;
}

int kdlb_parse_shapes(const char *s, kdlb_shape_t *out, int max, char *err, size_t errlen)
{
    struct shapes_ctx c = {out, max, 0};
    if (for_each_item("--shapes", s, shape_item, &c, err, errlen)) return -1;
    return c.n;
}

/* --------------------------------------------------------------- dtypes */
struct enum_ctx {
    const char *what;
    int *out;
    int max, n;
    int (*from_name)(const char *);
    int count; /* for "all" */
};

static int dtype_from_name(const char *s)
{
    if (!strcmp(s, "f32")) return KDL_DTYPE_F32;
    if (!strcmp(s, "f16")) return KDL_DTYPE_F16;
    if (!strcmp(s, "bf16")) return KDL_DTYPE_BF16;
    return -1; /* f64 is the reference's only: the GPU does not take it */
}

static int push_enum(struct enum_ctx *c, int v, const char *item, char *err, size_t errlen)
{
    for (int i = 0; i < c->n; i++)
        if (c->out[i] == v) {
            seterr(err, errlen, "%s: duplicate '%s'", c->what, item);
            return -1;
        }
    if (c->n >= c->max) {
        seterr(err, errlen, "%s: too many items", c->what);
        return -1;
    }
    c->out[c->n++] = v;
    return 0;
}

static int enum_item(const char *item, void *vctx, char *err, size_t errlen)
{
    struct enum_ctx *c = (struct enum_ctx *)vctx;
    if (!strcmp(item, "all") && c->count > 0) {
        for (int v = 0; v < c->count; v++) {
            int vv = v;
            if (c->from_name == dtype_from_name) /* all = bf16, f16, f32 */
                vv = v == 0 ? KDL_DTYPE_BF16 : v == 1 ? KDL_DTYPE_F16 : KDL_DTYPE_F32;
            if (push_enum(c, vv, item, err, errlen)) return -1;
        }
        return 0;
    }
    int v = c->from_name(item);
    if (v < 0) {
        seterr(err, errlen, "%s: unknown name '%s'", c->what, item);
        return -1;
    }
    return push_enum(c, v, item, err, errlen);
}

int kdlb_parse_dtypes(const char *s, kdl_dtype_t *out, int max, char *err, size_t errlen)
{
    int tmp[8];
    struct enum_ctx c = {"--dtypes", tmp, max < 8 ? max : 8, 0, dtype_from_name, 3};
    if (for_each_item("--dtypes", s, enum_item, &c, err, errlen)) return -1;
    for (int i = 0; i < c.n; i++) out[i] = (kdl_dtype_t)tmp[i];
    return c.n;
}

int kdlb_parse_divergences(const char *s, kdl_divergence_t *out, int max, char *err,
                           size_t errlen)
{
    int tmp[KDL_DIV_COUNT_];
    struct enum_ctx c = {"--divergences", tmp, max < KDL_DIV_COUNT_ ? max : KDL_DIV_COUNT_, 0,
                         kdl_divergence_from_name, KDL_DIV_COUNT_};
    if (for_each_item("--divergences", s, enum_item, &c, err, errlen)) return -1;
    for (int i = 0; i < c.n; i++) out[i] = (kdl_divergence_t)tmp[i];
    return c.n;
}

int kdlb_parse_head_rules(const char *s, kdl_head_rule_t *out, int max, char *err, size_t errlen)
{
    int tmp[KDL_HEAD_COUNT_];
    struct enum_ctx c = {"--head-rules", tmp, max < KDL_HEAD_COUNT_ ? max : KDL_HEAD_COUNT_, 0,
                         kdl_head_rule_from_name, KDL_HEAD_COUNT_};
    if (for_each_item("--head-rules", s, enum_item, &c, err, errlen)) return -1;
    for (int i = 0; i < c.n; i++) out[i] = (kdl_head_rule_t)tmp[i];
    return c.n;
}

int kdlb_parse_sinkhorn(const char *s, kdlb_sinkhorn_shape_t *out, char *err, size_t errlen)
{
    if (s && !strcmp(s, "none")) {
        out->batch = out->n = out->m = 0;
        return 0;
    }
    char buf[64];
    int64_t v[3];
    if (!s || strlen(s) >= sizeof buf) goto bad;
    strcpy(buf, s);
    char *p = buf;
    for (int k = 0; k < 3; k++) {
        char *colon = strchr(p, ':');
        if ((k < 2) != (colon != NULL)) goto bad;
        if (colon) *colon = '\0';
        if (parse_i64(p, 1, INT64_C(1) << 20, &v[k])) goto bad;
        p = colon ? colon + 1 : p;
    }
    out->batch = v[0];
    out->n = v[1];
    out->m = v[2];
    return 0;
bad:
    seterr(err, errlen, "--sinkhorn: bad value '%s' (expected B:n:m or none)", s ? s : "");
    return -1;
}

/* -------------------------------------------------------------- options */
void kdlb_options_default(kdlb_options_t *o)
{
    memset(o, 0, sizeof *o);
    static const kdlb_shape_t shapes[] = {{4096, 32000}, {8192, 128256}, {8192, 151936}};
    o->n_shapes = 3;
    memcpy(o->shapes, shapes, sizeof shapes);
    o->dtypes[0] = KDL_DTYPE_BF16;
    o->dtypes[1] = KDL_DTYPE_F32;
    o->n_dtypes = 2;
    for (int d = 0; d < KDL_DIV_COUNT_; d++) o->divergences[d] = (kdl_divergence_t)d;
    o->n_divergences = KDL_DIV_COUNT_;
    for (int r = 0; r < KDL_HEAD_COUNT_; r++) o->head_rules[r] = (kdl_head_rule_t)r;
    o->n_head_rules = KDL_HEAD_COUNT_;
    o->repeats = 20;
    o->warmup = 5;
    o->mu = 0.5;
    o->top_k = 64;
    o->check = 1;
    o->sinkhorn.batch = 64;
    o->sinkhorn.n = 1024;
    o->sinkhorn.m = 1024;
    o->sinkhorn_iters = 100;
    o->quick = 0;
    o->json_out = NULL;
    o->commit = "unknown";
}

enum {
    GIVEN_SHAPES = 1 << 0,
    GIVEN_DTYPES = 1 << 1,
    GIVEN_HEAD_RULES = 1 << 2,
    GIVEN_REPEATS = 1 << 3,
    GIVEN_WARMUP = 1 << 4,
    GIVEN_SINKHORN = 1 << 5
};

void kdlb_usage(FILE *f)
{
    fprintf(f,
            "usage: kdloss bench [options]\n"
            "Times kdloss forward+backward (grad in the student dtype, reduction mean) on\n"
            "this GPU: CUDA events, L2 flushed before every timed run, median of the\n"
            "repeats; GB/s from the byte model read S + read T + write dS, and the\n"
            "fraction of the device-to-device copy bandwidth measured in the same run.\n"
            "\n"
            "  --shapes N:V,...        default 4096:32000,8192:128256,8192:151936\n"
            "  --dtypes LIST           bf16,f16,f32 or all; default bf16,f32\n"
            "  --divergences LIST      fkl,rkl,fkl_rkl,akl,jsd,tvd,skl,srkl or all; default all\n"
            "  --head-rules LIST       AKL head rules reference,mass,topk or all; default all\n"
            "  --mu X                  AKL head mass, default 0.5\n"
            "  --top-k K               AKL topk head size, default 64 (clamped to V)\n"
            "  --repeats N             timed runs per configuration, default 20\n"
            "  --warmup N              untimed runs first, default 5\n"
            "  --sinkhorn B:n:m|none   batched Sinkhorn row, default 64:1024:1024\n"
            "  --sinkhorn-iters K      iterations per timed Sinkhorn run, default 100\n"
            "  --no-check              skip the comparison with the float64 CPU reference\n"
            "  --json-out FILE|DIR/    write the JSON results (DIR/: file named\n"
            "                          <date>-<device>-<commit>.json inside DIR)\n"
            "  --commit HASH           commit recorded in the JSON, default unknown\n"
            "  --quick                 4096:32000, bf16, head rule reference, 5 repeats,\n"
            "                          2 warm-ups, no Sinkhorn (explicit options win)\n"
            "  --help                  this text\n"
            "\n"
            "Progress on stderr, the table on stdout.  Exit codes: 0 done (rows whose\n"
            "kernel is not implemented are reported as such), 1 a CUDA failure stopped\n"
            "the run or the JSON could not be written, 2 bad options or no CUDA device\n"
            "(\"kdloss bench: no CUDA device found\").\n");
}

static int opt_value(int argc, char **argv, int *i, const char *name, const char **value,
                     char *err, size_t errlen)
{
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (a[n] == '=') {
        *value = a + n + 1;
        return 0;
    }
    if (*i + 1 >= argc) {
        seterr(err, errlen, "%s needs a value", name);
        return -1;
    }
    *value = argv[++*i];
    return 0;
}

/* a is "--name" or "--name=..." */
static int is_opt(const char *a, const char *name)
{
    size_t n = strlen(name);
    return !strncmp(a, name, n) && (a[n] == '\0' || a[n] == '=');
}

int kdlb_parse_options(int argc, char **argv, kdlb_options_t *o, char *err, size_t errlen)
{
    kdlb_options_default(o);
    unsigned given = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = NULL;
        int64_t iv;
        double dv;
        int n;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return 1;
        if (!strcmp(a, "--quick")) {
            o->quick = 1;
        } else if (!strcmp(a, "--no-check")) {
            o->check = 0;
        } else if (is_opt(a, "--shapes")) {
            if (opt_value(argc, argv, &i, "--shapes", &v, err, errlen)) return -1;
            if ((n = kdlb_parse_shapes(v, o->shapes, KDLB_MAX_SHAPES, err, errlen)) < 0) return -1;
            o->n_shapes = n;
            given |= GIVEN_SHAPES;
        } else if (is_opt(a, "--dtypes")) {
            if (opt_value(argc, argv, &i, "--dtypes", &v, err, errlen)) return -1;
            if ((n = kdlb_parse_dtypes(v, o->dtypes, 3, err, errlen)) < 0) return -1;
            o->n_dtypes = n;
            given |= GIVEN_DTYPES;
        } else if (is_opt(a, "--divergences")) {
            if (opt_value(argc, argv, &i, "--divergences", &v, err, errlen)) return -1;
            if ((n = kdlb_parse_divergences(v, o->divergences, KDL_DIV_COUNT_, err, errlen)) < 0)
                return -1;
            o->n_divergences = n;
        } else if (is_opt(a, "--head-rules")) {
            if (opt_value(argc, argv, &i, "--head-rules", &v, err, errlen)) return -1;
            if ((n = kdlb_parse_head_rules(v, o->head_rules, KDL_HEAD_COUNT_, err, errlen)) < 0)
                return -1;
            o->n_head_rules = n;
            given |= GIVEN_HEAD_RULES;
        } else if (is_opt(a, "--repeats")) {
            if (opt_value(argc, argv, &i, "--repeats", &v, err, errlen)) return -1;
            if (parse_i64(v, 1, 100000, &iv)) {
                seterr(err, errlen, "--repeats: expected an integer in [1, 100000], got '%s'", v);
                return -1;
            }
            o->repeats = (int)iv;
            given |= GIVEN_REPEATS;
        } else if (is_opt(a, "--warmup")) {
            if (opt_value(argc, argv, &i, "--warmup", &v, err, errlen)) return -1;
            if (parse_i64(v, 0, 100000, &iv)) {
                seterr(err, errlen, "--warmup: expected an integer in [0, 100000], got '%s'", v);
                return -1;
            }
            o->warmup = (int)iv;
            given |= GIVEN_WARMUP;
        } else if (is_opt(a, "--mu")) {
            if (opt_value(argc, argv, &i, "--mu", &v, err, errlen)) return -1;
            if (parse_f64(v, &dv) || !(dv > 0.0 && dv < 1.0)) {
                seterr(err, errlen, "--mu: expected a number in (0, 1), got '%s'", v);
                return -1;
            }
            o->mu = dv;
        } else if (is_opt(a, "--top-k")) {
            if (opt_value(argc, argv, &i, "--top-k", &v, err, errlen)) return -1;
            if (parse_i64(v, 1, INT64_C(1) << 31, &iv)) {
                seterr(err, errlen, "--top-k: expected an integer >= 1, got '%s'", v);
                return -1;
            }
            o->top_k = iv;
        } else if (is_opt(a, "--sinkhorn-iters")) {
            if (opt_value(argc, argv, &i, "--sinkhorn-iters", &v, err, errlen)) return -1;
            if (parse_i64(v, 1, 100000, &iv)) {
                seterr(err, errlen, "--sinkhorn-iters: expected an integer in [1, 100000], got '%s'",
                       v);
                return -1;
            }
            o->sinkhorn_iters = (int)iv;
        } else if (is_opt(a, "--sinkhorn")) {
            if (opt_value(argc, argv, &i, "--sinkhorn", &v, err, errlen)) return -1;
            if (kdlb_parse_sinkhorn(v, &o->sinkhorn, err, errlen)) return -1;
            given |= GIVEN_SINKHORN;
        } else if (is_opt(a, "--json-out")) {
            if (opt_value(argc, argv, &i, "--json-out", &v, err, errlen)) return -1;
            if (!*v) {
                seterr(err, errlen, "--json-out: empty path");
                return -1;
            }
            o->json_out = v;
        } else if (is_opt(a, "--commit")) {
            if (opt_value(argc, argv, &i, "--commit", &v, err, errlen)) return -1;
            if (!*v || strlen(v) > 64) {
                seterr(err, errlen, "--commit: expected 1 to 64 characters");
                return -1;
            }
            for (const char *p = v; *p; p++)
                if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_' && *p != '.') {
                    seterr(err, errlen, "--commit: only letters, digits, '-', '_' and '.'");
                    return -1;
                }
            o->commit = v;
        } else {
            seterr(err, errlen, "unknown option '%s' (try kdloss bench --help)", a);
            return -1;
        }
    }
    if (o->quick) {
        if (!(given & GIVEN_SHAPES)) {
            o->shapes[0].rows = 4096;
            o->shapes[0].vocab = 32000;
            o->n_shapes = 1;
        }
        if (!(given & GIVEN_DTYPES)) {
            o->dtypes[0] = KDL_DTYPE_BF16;
            o->n_dtypes = 1;
        }
        if (!(given & GIVEN_HEAD_RULES)) {
            o->head_rules[0] = KDL_HEAD_REFERENCE;
            o->n_head_rules = 1;
        }
        if (!(given & GIVEN_REPEATS)) o->repeats = 5;
        if (!(given & GIVEN_WARMUP)) o->warmup = 2;
        if (!(given & GIVEN_SINKHORN)) o->sinkhorn.batch = o->sinkhorn.n = o->sinkhorn.m = 0;
    }
    return 0;
}

/* ---------------------------------------------------------------- matrix */
static int per_dtype_count(const kdlb_options_t *o)
{
    int n = 0;
    for (int d = 0; d < o->n_divergences; d++)
        n += o->divergences[d] == KDL_DIV_AKL ? o->n_head_rules : 1;
    return n;
}

int kdlb_case_count(const kdlb_options_t *o)
{
    return o->n_shapes * o->n_dtypes * per_dtype_count(o);
}

int kdlb_case_at(const kdlb_options_t *o, int index, kdlb_case_t *c)
{
    int per = per_dtype_count(o);
    if (index < 0 || per == 0 || index >= kdlb_case_count(o)) return -1;
    memset(c, 0, sizeof *c);
    c->shape_index = index / (per * o->n_dtypes);
    c->dtype_index = (index / per) % o->n_dtypes;
    c->shape = o->shapes[c->shape_index];
    c->dtype = o->dtypes[c->dtype_index];
    int k = index % per;
    for (int d = 0; d < o->n_divergences; d++) {
        int span = o->divergences[d] == KDL_DIV_AKL ? o->n_head_rules : 1;
        if (k < span) {
            c->divergence = o->divergences[d];
            c->has_head_rule = c->divergence == KDL_DIV_AKL;
            c->head_rule = c->has_head_rule ? o->head_rules[k] : KDL_HEAD_REFERENCE;
            return 0;
        }
        k -= span;
    }
    return -1; /* not reached */
}

/* ------------------------------------------------------------ byte model */
uint64_t kdlb_loss_bytes(int64_t rows, int64_t vocab, kdl_dtype_t student, kdl_dtype_t teacher,
                         kdl_dtype_t grad)
{
    size_t ss = kdl_dtype_size(student), st = kdl_dtype_size(teacher), sg = kdl_dtype_size(grad);
    if (rows < 0 || vocab < 0 || !ss || !st || !sg) return 0;
    uint64_t elems, bytes;
    if (__builtin_mul_overflow((uint64_t)rows, (uint64_t)vocab, &elems)) return 0;
    if (__builtin_mul_overflow(elems, (uint64_t)(ss + st + sg), &bytes)) return 0;
    return bytes;
}

uint64_t kdlb_sinkhorn_iter_bytes(int64_t batch, int64_t n, int64_t m)
{
    uint64_t a, b, c;
    if (batch < 0 || n < 0 || m < 0) return 0;
    if (__builtin_mul_overflow((uint64_t)batch, (uint64_t)n, &a)) return 0;
    if (__builtin_mul_overflow(a, (uint64_t)m, &b)) return 0;
    if (__builtin_mul_overflow(b, (uint64_t)(2 * sizeof(float)), &c)) return 0;
    return c;
}

/* --------------------------------------------------------------- numbers */
double kdlb_gb_per_s(uint64_t bytes, double ms)
{
    if (!(isfinite(ms) && ms > 0.0)) return NAN;
    return (double)bytes / (ms * 1e-3) / 1e9;
}

double kdlb_copy_gb_per_s(uint64_t buffer_bytes, double ms)
{
    if (buffer_bytes > UINT64_MAX / 2) return NAN;
    return kdlb_gb_per_s(2 * buffer_bytes, ms);
}

double kdlb_fraction_of_copy(double gb_per_s, double copy_gb_per_s)
{
    if (!isfinite(gb_per_s) || !isfinite(copy_gb_per_s) || !(copy_gb_per_s > 0.0)) return NAN;
    return gb_per_s / copy_gb_per_s;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double kdlb_percentile(const double *x, size_t n, double p)
{
    if (!x || n == 0 || !(p >= 0.0 && p <= 100.0)) return NAN;
    double *s = (double *)malloc(n * sizeof *s);
    if (!s) return NAN;
    memcpy(s, x, n * sizeof *s);
    qsort(s, n, sizeof *s, cmp_double);
    double pos = p / 100.0 * (double)(n - 1);
    size_t lo = (size_t)floor(pos);
    size_t hi = lo + 1 < n ? lo + 1 : lo;
    double frac = pos - (double)lo;
    double v = s[lo] + (s[hi] - s[lo]) * frac;
    free(s);
    return v;
}

double kdlb_median(const double *x, size_t n) { return kdlb_percentile(x, n, 50.0); }

void kdlb_summarize(const double *x, size_t n, kdlb_summary_t *s)
{
    s->n = n;
    s->median = kdlb_percentile(x, n, 50.0);
    s->p20 = kdlb_percentile(x, n, 20.0);
    s->p80 = kdlb_percentile(x, n, 80.0);
    s->min = kdlb_percentile(x, n, 0.0);
    s->max = kdlb_percentile(x, n, 100.0);
}

/* ------------------------------------------------------------------ rows */
void kdlb_row_init(kdlb_row_t *r)
{
    memset(r, 0, sizeof *r);
    r->impl = "kdloss";
    r->op = "loss";
    r->status = "error";
    r->ms = r->ms_p20 = r->ms_p80 = NAN;
    r->gb_per_s = r->fraction_of_copy_bandwidth = NAN;
    r->peak_extra_bytes = -1;
    r->check_rel_err = NAN;
}

void kdlb_row_set_times(kdlb_row_t *r, const double *ms, size_t n, double copy_gb_per_s)
{
    kdlb_summary_t s;
    kdlb_summarize(ms, n, &s);
    r->ms = s.median;
    r->ms_p20 = s.p20;
    r->ms_p80 = s.p80;
    r->repeats = (int)n;
    r->gb_per_s = kdlb_gb_per_s(r->bytes, r->ms);
    r->fraction_of_copy_bandwidth = kdlb_fraction_of_copy(r->gb_per_s, copy_gb_per_s);
}

/* ------------------------------------------------------------------ JSON */
typedef struct jbuf {
    char *buf;
    size_t len, pos; /* pos counts what would be written, as snprintf */
} jbuf_t;

static void jputs(jbuf_t *j, const char *s)
{
    size_t n = strlen(s);
    if (j->pos < j->len) {
        size_t room = j->len - j->pos - 1;
        size_t k = n < room ? n : room;
        memcpy(j->buf + j->pos, s, k);
        j->buf[j->pos + k] = '\0';
    }
    j->pos += n;
}

static void jprintf(jbuf_t *j, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void jprintf(jbuf_t *j, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    jputs(j, tmp);
}

static void jstr(jbuf_t *j, const char *s)
{
    if (!s) {
        jputs(j, "null");
        return;
    }
    jputs(j, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char e[8];
        switch (*p) {
        case '"': jputs(j, "\\\""); break;
        case '\\': jputs(j, "\\\\"); break;
        case '\n': jputs(j, "\\n"); break;
        case '\r': jputs(j, "\\r"); break;
        case '\t': jputs(j, "\\t"); break;
        default:
            if (*p < 0x20) {
                snprintf(e, sizeof e, "\\u%04x", *p);
                jputs(j, e);
            } else {
                e[0] = (char)*p;
                e[1] = '\0';
                jputs(j, e);
            }
        }
    }
    jputs(j, "\"");
}

static void jnum(jbuf_t *j, double v)
{
    if (!isfinite(v))
        jputs(j, "null");
    else
        jprintf(j, "%.6g", v);
}

static void jkey(jbuf_t *j, const char *k, int first)
{
    if (!first) jputs(j, ", ");
    jstr(j, k);
    jputs(j, ": ");
}

int kdlb_json_string(const char *s, char *buf, size_t len)
{
    jbuf_t j = {buf, len, 0};
    if (buf && len) buf[0] = '\0';
    jstr(&j, s);
    return (int)j.pos;
}

int kdlb_json_row(const kdlb_row_t *r, char *buf, size_t len)
{
    jbuf_t j = {buf, len, 0};
    if (buf && len) buf[0] = '\0';
    int sink = r->op && !strcmp(r->op, "sinkhorn");
    jputs(&j, "{");
    jkey(&j, "impl", 1), jstr(&j, r->impl);
    jkey(&j, "op", 0), jstr(&j, r->op);
    if (sink) {
        jkey(&j, "dtype", 0), jstr(&j, r->dtype);
        jkey(&j, "batch", 0), jprintf(&j, "%lld", (long long)r->batch);
        jkey(&j, "n", 0), jprintf(&j, "%lld", (long long)r->n);
        jkey(&j, "m", 0), jprintf(&j, "%lld", (long long)r->m);
        jkey(&j, "iterations", 0), jprintf(&j, "%lld", (long long)r->iterations);
    } else {
        jkey(&j, "divergence", 0), jstr(&j, r->divergence);
        jkey(&j, "dtype", 0), jstr(&j, r->dtype);
        jkey(&j, "rows", 0), jprintf(&j, "%lld", (long long)r->rows);
        jkey(&j, "vocab", 0), jprintf(&j, "%lld", (long long)r->vocab);
        jkey(&j, "head_rule", 0), jstr(&j, r->head_rule);
    }
    jkey(&j, "status", 0), jstr(&j, r->status);
    jkey(&j, "ms", 0), jnum(&j, r->ms);
    jkey(&j, "ms_p20", 0), jnum(&j, r->ms_p20);
    jkey(&j, "ms_p80", 0), jnum(&j, r->ms_p80);
    jkey(&j, "repeats", 0), jprintf(&j, "%d", r->repeats);
    jkey(&j, "bytes", 0), jprintf(&j, "%llu", (unsigned long long)r->bytes);
    jkey(&j, "gb_per_s", 0), jnum(&j, r->gb_per_s);
    jkey(&j, "fraction_of_copy_bandwidth", 0), jnum(&j, r->fraction_of_copy_bandwidth);
    jkey(&j, "peak_extra_bytes", 0);
    if (r->peak_extra_bytes < 0)
        jputs(&j, "null");
    else
        jprintf(&j, "%lld", (long long)r->peak_extra_bytes);
    jkey(&j, "check_rel_err", 0), jnum(&j, r->check_rel_err);
    jkey(&j, "note", 0), jstr(&j, r->note);
    jputs(&j, "}");
    return (int)j.pos;
}

static int write_meta(FILE *f, const kdlb_meta_t *m)
{
    char s[512];
    const kdlb_options_t *o = m->options;
    fprintf(f, "  \"meta\": {\n");
    kdlb_json_string(m->date, s, sizeof s);
    fprintf(f, "    \"date\": %s,\n", s);
    kdlb_json_string(m->commit, s, sizeof s);
    fprintf(f, "    \"commit\": %s,\n", s);
    fprintf(f, "    \"kdloss_version\": \"%d.%d.%d\",\n", KDL_VERSION_MAJOR, KDL_VERSION_MINOR,
            KDL_VERSION_PATCH);
    kdlb_json_string(m->device_name, s, sizeof s);
    fprintf(f, "    \"device\": {\"name\": %s, \"compute_capability\": \"%d.%d\", ", s, m->cc_major,
            m->cc_minor);
    fprintf(f, "\"sm_count\": %d, \"l2_bytes\": %llu, \"memory_bytes\": %llu, ", m->sm_count,
            (unsigned long long)m->l2_bytes, (unsigned long long)m->memory_bytes);
    fprintf(f, "\"driver_version\": %d, \"runtime_version\": %d},\n", m->driver_version,
            m->runtime_version);
    jbuf_t j = {s, sizeof s, 0};
    jnum(&j, m->copy_gb_per_s);
    fprintf(f, "    \"copy_gb_per_s\": %s,\n", s);
    fprintf(f, "    \"copy_bytes\": %llu,\n", (unsigned long long)m->copy_bytes);
    fprintf(f, "    \"l2_flush_bytes\": %llu,\n", (unsigned long long)m->l2_flush_bytes);
    fprintf(f, "    \"byte_model\": {\"loss\": \"rows*vocab*(size(student)+size(teacher)+size(grad))\", "
               "\"sinkhorn\": \"2*batch*n*m*4 per iteration (cost read twice)\"},\n");
    if (o) {
        fprintf(f, "    \"params\": {\"temperature\": 1, \"alpha\": 0.1, \"beta\": 0.5, ");
        fprintf(f, "\"mu\": %.6g, \"top_k\": %lld, \"reduction\": \"mean\", \"scale\": 1, ", o->mu,
                (long long)o->top_k);
        fprintf(f, "\"grad_dtype\": \"student\", \"repeats\": %d, \"warmup\": %d, ", o->repeats,
                o->warmup);
        fprintf(f, "\"check\": %s, \"sinkhorn_iters\": %d, \"sinkhorn_epsilon\": 0.1}\n",
                o->check ? "true" : "false", o->sinkhorn_iters);
    } else {
        fprintf(f, "    \"params\": null\n");
    }
    fprintf(f, "  },\n");
    return 0;
}

int kdlb_json_write(FILE *f, const kdlb_meta_t *m, const kdlb_row_t *rows, size_t n_rows)
{
    fprintf(f, "{\n  \"schema\": \"kdloss-bench/1\",\n");
    write_meta(f, m);
    fprintf(f, "  \"rows\": [\n");
    for (size_t i = 0; i < n_rows; i++) {
        char line[2048];
        int need = kdlb_json_row(&rows[i], line, sizeof line);
        if (need < 0 || (size_t)need >= sizeof line) return -1;
        fprintf(f, "    %s%s\n", line, i + 1 < n_rows ? "," : "");
    }
    fprintf(f, "  ]\n}\n");
    return ferror(f) ? -1 : 0;
}

int kdlb_json_write_file(const char *path, const kdlb_meta_t *m, const kdlb_row_t *rows,
                         size_t n_rows, char *err, size_t errlen)
{
    size_t n = strlen(path);
    char *tmp = (char *)malloc(n + 5);
    if (!tmp) {
        seterr(err, errlen, "out of memory");
        return -1;
    }
    memcpy(tmp, path, n);
    memcpy(tmp + n, ".tmp", 5);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        seterr(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    int bad = kdlb_json_write(f, m, rows, n_rows);
    if (fclose(f) != 0) bad = -1;
    if (bad || rename(tmp, path) != 0) {
        seterr(err, errlen, "cannot write %s: %s", path, bad ? "write error" : strerror(errno));
        remove(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    return 0;
}

/* ------------------------------------------------------------- file names */
void kdlb_slug(const char *in, char *out, size_t len)
{
    if (!out || !len) return;
    size_t k = 0;
    int dash = 0;
    for (const unsigned char *p = (const unsigned char *)(in ? in : ""); *p; p++) {
        if (isalnum(*p) && *p < 0x80) {
            if (dash && k > 0 && k + 1 < len) out[k++] = '-';
            dash = 0;
            if (k + 1 < len) out[k++] = (char)*p;
        } else {
            dash = 1;
        }
    }
    out[k] = '\0';
    if (k == 0) snprintf(out, len, "unknown");
}

int kdlb_result_name(const char *date_ymd, const char *device, const char *commit, char *out,
                     size_t len)
{
    char slug[128];
    kdlb_slug(device, slug, sizeof slug);
    return snprintf(out, len, "%s-%s-%s.json", date_ymd, slug, commit && *commit ? commit : "unknown");
}

/* ----------------------------------------------------------------- table */
void kdlb_print_table(FILE *f, const kdlb_row_t *rows, size_t n_rows, double copy_gb_per_s)
{
    fprintf(f, "%-12s %-9s %-9s %-5s %-18s %10s %9s %7s  %s\n", "impl", "op", "head", "dtype",
            "shape", "ms", "GB/s", "%copy", "status");
    for (size_t i = 0; i < n_rows; i++) {
        const kdlb_row_t *r = &rows[i];
        char shape[48], ms[16], gb[16], frac[16];
        int sink = r->op && !strcmp(r->op, "sinkhorn");
        if (sink)
            snprintf(shape, sizeof shape, "%lldx%lldx%lld", (long long)r->batch, (long long)r->n,
                     (long long)r->m);
        else
            snprintf(shape, sizeof shape, "%lldx%lld", (long long)r->rows, (long long)r->vocab);
        if (isfinite(r->ms)) snprintf(ms, sizeof ms, "%.4f", r->ms);
        else snprintf(ms, sizeof ms, "-");
        if (isfinite(r->gb_per_s)) snprintf(gb, sizeof gb, "%.1f", r->gb_per_s);
        else snprintf(gb, sizeof gb, "-");
        if (isfinite(r->fraction_of_copy_bandwidth))
            snprintf(frac, sizeof frac, "%.1f", 100.0 * r->fraction_of_copy_bandwidth);
        else snprintf(frac, sizeof frac, "-");
        fprintf(f, "%-12s %-9s %-9s %-5s %-18s %10s %9s %7s  %s%s%s\n", r->impl ? r->impl : "-",
                sink ? "sinkhorn" : (r->divergence ? r->divergence : "-"),
                r->head_rule ? r->head_rule : "-", r->dtype ? r->dtype : "-", shape, ms, gb, frac,
                r->status ? r->status : "-", r->note ? ": " : "", r->note ? r->note : "");
    }
    if (isfinite(copy_gb_per_s))
        fprintf(f, "device-to-device copy: %.1f GB/s (read + write); Sinkhorn ms are per iteration\n",
                copy_gb_per_s);
}
