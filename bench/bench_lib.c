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

/* --------------------------------------------------------------- the ops */
static const char *const op_names[KDLB_N_OPS] = {"loss",         "sinkhorn",        "sparse",
                                                 "fused_linear", "sinkhorn_ragged", "sinkd"};

const char *kdlb_op_name(kdlb_op_t op)
{
    for (int i = 0; i < KDLB_N_OPS; i++)
        if ((unsigned)op == 1u << i) return op_names[i];
    return NULL;
}

struct ops_ctx {
    unsigned bits;
};

static int op_item(const char *item, void *vctx, char *err, size_t errlen)
{
    struct ops_ctx *c = (struct ops_ctx *)vctx;
    if (!strcmp(item, "all")) {
        c->bits |= KDLB_OP_ALL;
        return 0;
    }
    for (int i = 0; i < KDLB_N_OPS; i++)
        if (!strcmp(item, op_names[i])) {
            if (c->bits & (1u << i)) {
                seterr(err, errlen, "--ops: duplicate '%s'", item);
                return -1;
            }
            c->bits |= 1u << i;
            return 0;
        }
    seterr(err, errlen,
           "--ops: unknown name '%s' (loss, sinkhorn, sparse, fused_linear, sinkhorn_ragged, sinkd, "
           "all)",
           item);
    return -1;
}

unsigned kdlb_parse_ops(const char *s, char *err, size_t errlen)
{
    struct ops_ctx c = {0};
    if (for_each_item("--ops", s, op_item, &c, err, errlen)) return 0;
    return c.bits;
}

struct k_ctx {
    int64_t *out;
    int max, n;
};

static int k_item(const char *item, void *vctx, char *err, size_t errlen)
{
    struct k_ctx *c = (struct k_ctx *)vctx;
    int64_t k;
    if (parse_i64(item, 1, 1024, &k)) {
        seterr(err, errlen, "--sparse-k: bad k '%s' (an integer in [1, 1024])", item);
        return -1;
    }
    for (int i = 0; i < c->n; i++)
        if (c->out[i] == k) {
            seterr(err, errlen, "--sparse-k: duplicate '%s'", item);
            return -1;
        }
    if (c->n >= c->max) {
        seterr(err, errlen, "--sparse-k: more than %d values", c->max);
        return -1;
    }
    c->out[c->n++] = k;
    return 0;
}

int kdlb_parse_k_list(const char *s, int64_t *out, int max, char *err, size_t errlen)
{
    struct k_ctx c = {out, max, 0};
    if (for_each_item("--sparse-k", s, k_item, &c, err, errlen)) return -1;
    return c.n;
}

/* Splits "a:b[:c]" into want integers in [lo, hi]; -1 on any other form. */
static int split_ints(const char *item, int want, int64_t lo, int64_t hi, int64_t *v)
{
    char buf[64];
    if (strlen(item) >= sizeof buf) return -1;
    strcpy(buf, item);
    char *p = buf;
    for (int k = 0; k < want; k++) {
        char *colon = strchr(p, ':');
        if ((k < want - 1) != (colon != NULL)) return -1;
        if (colon) *colon = '\0';
        if (parse_i64(p, lo, hi, &v[k])) return -1;
        p = colon ? colon + 1 : p;
    }
    return 0;
}

struct fused_ctx {
    kdlb_fused_shape_t *out;
    int max, n;
};

static int fused_item(const char *item, void *vctx, char *err, size_t errlen)
{
    struct fused_ctx *c = (struct fused_ctx *)vctx;
    int64_t v[3];
    /* H, W, logits-sized buffers: each side below 2^31, products checked by
     * the byte model (which returns 0 on overflow) */
    if (split_ints(item, 3, 1, INT64_C(1) << 31, v) || v[0] > (INT64_C(1) << 58) / v[2] ||
        v[1] > (INT64_C(1) << 58) / v[2]) {
        seterr(err, errlen, "--fused-shapes: bad shape '%s' (expected N:d:V, integers >= 1)", item);
        return -1;
    }
    for (int i = 0; i < c->n; i++)
        if (c->out[i].rows == v[0] && c->out[i].hidden == v[1] && c->out[i].vocab == v[2]) {
            seterr(err, errlen, "--fused-shapes: duplicate shape '%s'", item);
            return -1;
        }
    if (c->n >= c->max) {
        seterr(err, errlen, "--fused-shapes: more than %d shapes", c->max);
        return -1;
    }
    c->out[c->n].rows = v[0];
    c->out[c->n].hidden = v[1];
    c->out[c->n].vocab = v[2];
    c->n++;
    return 0;
}

int kdlb_parse_fused_shapes(const char *s, kdlb_fused_shape_t *out, int max, char *err,
                            size_t errlen)
{
    struct fused_ctx c = {out, max, 0};
    if (for_each_item("--fused-shapes", s, fused_item, &c, err, errlen)) return -1;
    return c.n;
}

struct ragged_ctx {
    int64_t *n, *m;
    int max, count;
};

static int ragged_item(const char *item, void *vctx, char *err, size_t errlen)
{
    struct ragged_ctx *c = (struct ragged_ctx *)vctx;
    int64_t v[2];
    if (split_ints(item, 2, 1, 65536, v)) {
        if (split_ints(item, 1, 1, 65536, v)) {
            seterr(err, errlen, "--ragged-sizes: bad problem '%s' (n:m or n, sides in [1, 65536])",
                   item);
            return -1;
        }
        v[1] = v[0];
    }
    if (c->count >= c->max) {
        seterr(err, errlen, "--ragged-sizes: more than %d problems", c->max);
        return -1;
    }
    c->n[c->count] = v[0];
    c->m[c->count] = v[1];
    c->count++;
    return 0;
}

int kdlb_parse_ragged(const char *s, int64_t *n, int64_t *m, int max, char *err, size_t errlen)
{
    struct ragged_ctx c = {n, m, max, 0};
    if (for_each_item("--ragged-sizes", s, ragged_item, &c, err, errlen)) return -1;
    return c.count;
}

int kdlb_parse_sinkd(const char *s, kdlb_sinkd_shape_t *out, char *err, size_t errlen)
{
    int64_t v[3];
    if (s && !strcmp(s, "none")) {
        out->rows = out->vocab = out->group = 0;
        return 0;
    }
    if (!s || split_ints(s, 3, 1, INT64_C(1) << 31, v) || v[0] % v[2] != 0 ||
        v[0] > (INT64_C(1) << 58) / v[1]) {
        seterr(err, errlen, "--sinkd: bad value '%s' (expected N:V:G with G dividing N, or none)",
               s ? s : "");
        return -1;
    }
    out->rows = v[0];
    out->vocab = v[1];
    out->group = v[2];
    return 0;
}

/* Problem sides of the ragged Sinkhorn row: a fixed, deterministic mix from
 * 64 to 2048 (n and m differ; square, tall and wide problems), and the
 * quick list from 64 to 512. */
const int64_t kdlb_ragged_default_n[KDLB_RAGGED_DEFAULT_COUNT] = {
    64,  2048, 128, 1024, 256, 512,  96,  1536, 192, 768,  384, 640,
    80,  1792, 160, 896,  320, 448,  112, 1280, 224, 960,  576, 1152};
const int64_t kdlb_ragged_default_m[KDLB_RAGGED_DEFAULT_COUNT] = {
    64,  2048, 256, 512,  1024, 128,  96,  768,  384, 1536, 192, 640,
    2048, 64,  896, 160,  448,  320,  1280, 112, 960, 224,  1152, 576};
const int64_t kdlb_ragged_quick_n[KDLB_RAGGED_QUICK_COUNT] = {64, 512, 96, 384, 128, 256, 192, 320};
const int64_t kdlb_ragged_quick_m[KDLB_RAGGED_QUICK_COUNT] = {64, 128, 384, 96, 256, 512, 320, 192};

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
    o->ops = KDLB_OP_ALL;
    o->sparse_shapes[0].rows = 8192;
    o->sparse_shapes[0].vocab = 151936;
    o->n_sparse_shapes = 1;
    o->sparse_k[0] = 8;
    o->sparse_k[1] = 64;
    o->sparse_k[2] = 1024;
    o->n_sparse_k = 3;
    o->sparse_dtype = KDL_DTYPE_BF16;
    o->fused_shapes[0].rows = 4096;
    o->fused_shapes[0].hidden = 4096;
    o->fused_shapes[0].vocab = 151936;
    o->n_fused_shapes = 1;
    memcpy(o->ragged_n, kdlb_ragged_default_n, sizeof kdlb_ragged_default_n);
    memcpy(o->ragged_m, kdlb_ragged_default_m, sizeof kdlb_ragged_default_m);
    o->n_ragged = KDLB_RAGGED_DEFAULT_COUNT;
    o->sinkd.rows = 512;
    o->sinkd.vocab = 32000;
    o->sinkd.group = 64;
    o->sinkd_iters = 20;
    o->sinkd_dtype = KDL_DTYPE_BF16;
    o->json_out = NULL;
    o->commit = "unknown";
}

enum {
    GIVEN_SHAPES = 1 << 0,
    GIVEN_DTYPES = 1 << 1,
    GIVEN_HEAD_RULES = 1 << 2,
    GIVEN_REPEATS = 1 << 3,
    GIVEN_WARMUP = 1 << 4,
    GIVEN_SINKHORN = 1 << 5,
    GIVEN_SPARSE_SHAPES = 1 << 6,
    GIVEN_FUSED_SHAPES = 1 << 7,
    GIVEN_RAGGED = 1 << 8,
    GIVEN_SINKD = 1 << 9
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
            "  --ops LIST              loss,sinkhorn,sparse,fused_linear,sinkhorn_ragged,sinkd\n"
            "                          or all (default all)\n"
            "  --shapes N:V,...        default 4096:32000,8192:128256,8192:151936\n"
            "  --dtypes LIST           bf16,f16,f32 or all; default bf16,f32 (loss rows,\n"
            "                          and fused linear rows: H, W, T in the dtype, dH, dW\n"
            "                          in it too for bf16 / f16, f32 for f32)\n"
            "  --divergences LIST      fkl,rkl,fkl_rkl,akl,jsd,tvd,skl,srkl or all; default all\n"
            "  --head-rules LIST       AKL head rules reference,mass,topk or all; default all\n"
            "  --mu X                  AKL head mass, default 0.5\n"
            "  --top-k K               AKL topk head size, default 64 (clamped to V)\n"
            "  --repeats N             timed runs per configuration, default 20\n"
            "  --warmup N              untimed runs first, default 5\n"
            "  --sinkhorn B:n:m|none   batched Sinkhorn row, default 64:1024:1024\n"
            "  --sinkhorn-iters K      iterations per timed Sinkhorn run (uniform and\n"
            "                          ragged), default 100\n"
            "  --sparse-shapes N:V,... top-k teacher rows, default 8192:151936\n"
            "  --sparse-k K,...        support sizes (<= 1024), default 8,64,1024\n"
            "  --fused-shapes N:d:V,.. fused linear + loss, default 4096:4096:151936; two\n"
            "                          rows per shape and dtype: the teacher's logits T\n"
            "                          [N,V], then the teacher as a linear layer H_t [N,d],\n"
            "                          W_t [V,d] (its logits formed in the call too)\n"
            "  --ragged-sizes n:m,...  problems of the ragged Sinkhorn call, default 24\n"
            "                          fixed problems with sides 64 to 2048\n"
            "  --sinkd N:V:G|none      SinKD rows (L1, squared L2), default 512:32000:64\n"
            "  --no-check              skip the comparison with the float64 CPU reference\n"
            "  --json-out FILE|DIR/    write the JSON results (DIR/: file named\n"
            "                          <date>-<device>-<commit>.json inside DIR)\n"
            "  --commit HASH           commit recorded in the JSON, default unknown\n"
            "  --quick                 4096:32000, bf16, head rule reference, 5 repeats,\n"
            "                          2 warm-ups, no uniform Sinkhorn; one small shape of\n"
            "                          each other op: sparse 4096:32000, fused linear\n"
            "                          1024:1024:32000, 8 ragged problems (64 to 512),\n"
            "                          SinKD 256:8192:64 (explicit options win)\n"
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
        } else if (is_opt(a, "--ops")) {
            if (opt_value(argc, argv, &i, "--ops", &v, err, errlen)) return -1;
            if (!(o->ops = kdlb_parse_ops(v, err, errlen))) return -1;
        } else if (is_opt(a, "--sparse-shapes")) {
            if (opt_value(argc, argv, &i, "--sparse-shapes", &v, err, errlen)) return -1;
            if ((n = kdlb_parse_shapes(v, o->sparse_shapes, KDLB_MAX_SHAPES, err, errlen)) < 0) {
                if (!strncmp(err, "--shapes", 8)) { /* name the option given */
                    char tmp[256];
                    snprintf(tmp, sizeof tmp, "--sparse-shapes%s", err + 8);
                    seterr(err, errlen, "%s", tmp);
                }
                return -1;
            }
            o->n_sparse_shapes = n;
            given |= GIVEN_SPARSE_SHAPES;
        } else if (is_opt(a, "--sparse-k")) {
            if (opt_value(argc, argv, &i, "--sparse-k", &v, err, errlen)) return -1;
            if ((n = kdlb_parse_k_list(v, o->sparse_k, KDLB_MAX_SPARSE_K, err, errlen)) < 0)
                return -1;
            o->n_sparse_k = n;
        } else if (is_opt(a, "--fused-shapes")) {
            if (opt_value(argc, argv, &i, "--fused-shapes", &v, err, errlen)) return -1;
            if ((n = kdlb_parse_fused_shapes(v, o->fused_shapes, KDLB_MAX_SHAPES, err, errlen)) < 0)
                return -1;
            o->n_fused_shapes = n;
            given |= GIVEN_FUSED_SHAPES;
        } else if (is_opt(a, "--ragged-sizes")) {
            if (opt_value(argc, argv, &i, "--ragged-sizes", &v, err, errlen)) return -1;
            if ((n = kdlb_parse_ragged(v, o->ragged_n, o->ragged_m, KDLB_MAX_RAGGED, err, errlen)) <
                0)
                return -1;
            o->n_ragged = n;
            given |= GIVEN_RAGGED;
        } else if (is_opt(a, "--sinkd")) {
            if (opt_value(argc, argv, &i, "--sinkd", &v, err, errlen)) return -1;
            if (kdlb_parse_sinkd(v, &o->sinkd, err, errlen)) return -1;
            given |= GIVEN_SINKD;
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
        if (!(given & GIVEN_SPARSE_SHAPES)) {
            o->sparse_shapes[0].rows = 4096;
            o->sparse_shapes[0].vocab = 32000;
            o->n_sparse_shapes = 1;
        }
        if (!(given & GIVEN_FUSED_SHAPES)) {
            o->fused_shapes[0].rows = 1024;
            o->fused_shapes[0].hidden = 1024;
            o->fused_shapes[0].vocab = 32000;
            o->n_fused_shapes = 1;
        }
        if (!(given & GIVEN_RAGGED)) {
            memcpy(o->ragged_n, kdlb_ragged_quick_n, sizeof kdlb_ragged_quick_n);
            memcpy(o->ragged_m, kdlb_ragged_quick_m, sizeof kdlb_ragged_quick_m);
            o->n_ragged = KDLB_RAGGED_QUICK_COUNT;
        }
        if (!(given & GIVEN_SINKD)) {
            o->sinkd.rows = 256;
            o->sinkd.vocab = 8192;
            o->sinkd.group = 64;
        }
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

int kdlb_loss_case_count(const kdlb_options_t *o)
{
    return (o->ops & KDLB_OP_LOSS) ? kdlb_case_count(o) : 0;
}

int kdlb_op_row_count(const kdlb_options_t *o, kdlb_op_t op)
{
    if (!(o->ops & (unsigned)op)) return 0;
    int n = 0;
    switch (op) {
    case KDLB_OP_LOSS: return kdlb_case_count(o);
    case KDLB_OP_SINKHORN: return o->sinkhorn.batch > 0 ? 1 : 0;
    case KDLB_OP_SPARSE:
        for (int s = 0; s < o->n_sparse_shapes; s++)
            for (int k = 0; k < o->n_sparse_k; k++)
                n += o->sparse_k[k] <= o->sparse_shapes[s].vocab;
        return n;
    case KDLB_OP_FUSED_LINEAR: return o->n_fused_shapes * o->n_dtypes * 2;
    case KDLB_OP_SINKHORN_RAGGED: return o->n_ragged > 0 ? 1 : 0;
    case KDLB_OP_SINKD: return o->sinkd.rows > 0 ? 2 : 0;
    default: return 0;
    }
}

int kdlb_row_capacity(const kdlb_options_t *o)
{
    int n = 0;
    for (int i = 0; i < KDLB_N_OPS; i++) n += kdlb_op_row_count(o, (kdlb_op_t)(1u << i));
    return n;
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

static int mul3(uint64_t a, uint64_t b, uint64_t c, uint64_t *out)
{
    uint64_t t;
    return __builtin_mul_overflow(a, b, &t) || __builtin_mul_overflow(t, c, out);
}

uint64_t kdlb_sparse_bytes(int64_t rows, int64_t vocab, int64_t k, kdl_dtype_t student,
                           kdl_dtype_t logprobs, kdl_dtype_t grad)
{
    size_t ss = kdl_dtype_size(student), sl = kdl_dtype_size(logprobs), sg = kdl_dtype_size(grad);
    uint64_t dense, top, sum;
    if (rows < 0 || vocab < 0 || k < 0 || !ss || !sl || !sg) return 0;
    if (mul3((uint64_t)rows, (uint64_t)vocab, (uint64_t)(ss + sg), &dense)) return 0;
    if (mul3((uint64_t)rows, (uint64_t)k, (uint64_t)(sizeof(int64_t) + sl), &top)) return 0;
    if (__builtin_add_overflow(dense, top, &sum)) return 0;
    return sum;
}

uint64_t kdlb_fused_linear_bytes(int64_t rows, int64_t hidden, int64_t vocab, kdl_dtype_t hw,
                                 kdl_dtype_t teacher, kdl_dtype_t grad)
{
    size_t sh = kdl_dtype_size(hw), st = kdl_dtype_size(teacher), sg = kdl_dtype_size(grad);
    uint64_t rv, mats, t, sum;
    if (rows < 0 || hidden < 0 || vocab < 0 || !sh || !st || !sg) return 0;
    if (__builtin_add_overflow((uint64_t)rows, (uint64_t)vocab, &rv)) return 0;
    if (mul3(rv, (uint64_t)hidden, (uint64_t)(sh + sg), &mats)) return 0;
    if (mul3((uint64_t)rows, (uint64_t)vocab, (uint64_t)st, &t)) return 0;
    if (__builtin_add_overflow(mats, t, &sum)) return 0;
    return sum;
}

uint64_t kdlb_fused_linear_tl_bytes(int64_t rows, int64_t hidden, int64_t teacher_hidden, int64_t vocab,
                                    kdl_dtype_t hw, kdl_dtype_t teacher, kdl_dtype_t grad)
{
    size_t sh = kdl_dtype_size(hw), st = kdl_dtype_size(teacher), sg = kdl_dtype_size(grad);
    uint64_t rv, mats, t, sum;
    if (rows < 0 || hidden < 0 || teacher_hidden < 0 || vocab < 0 || !sh || !st || !sg) return 0;
    if (__builtin_add_overflow((uint64_t)rows, (uint64_t)vocab, &rv)) return 0;
    if (mul3(rv, (uint64_t)hidden, (uint64_t)(sh + sg), &mats)) return 0;
    if (mul3(rv, (uint64_t)teacher_hidden, (uint64_t)st, &t)) return 0;
    if (__builtin_add_overflow(mats, t, &sum)) return 0;
    return sum;
}

kdl_dtype_t kdlb_fused_grad_dtype(kdl_dtype_t hw)
{
    return hw == KDL_DTYPE_BF16 || hw == KDL_DTYPE_F16 ? hw : KDL_DTYPE_F32;
}

uint64_t kdlb_logits_bytes(int64_t rows, int64_t vocab, kdl_dtype_t dtype)
{
    size_t es = kdl_dtype_size(dtype);
    uint64_t b;
    if (rows < 0 || vocab < 0 || !es || mul3((uint64_t)rows, (uint64_t)vocab, (uint64_t)es, &b)) return 0;
    return b;
}

uint64_t kdlb_fused_logits_bytes(int64_t rows, int64_t vocab, kdl_dtype_t dtype, int teacher_linear)
{
    uint64_t b = kdlb_logits_bytes(rows, vocab, dtype);
    if (teacher_linear && __builtin_mul_overflow(b, 2u, &b)) return 0;
    return b;
}

uint64_t kdlb_logits_f32_bytes(int64_t rows, int64_t vocab)
{
    return kdlb_logits_bytes(rows, vocab, KDL_DTYPE_F32);
}

double kdlb_peak_over_logits(int64_t peak_extra_bytes, uint64_t logits_bytes)
{
    if (peak_extra_bytes < 0 || logits_bytes == 0) return NAN;
    return (double)peak_extra_bytes / (double)logits_bytes;
}

uint64_t kdlb_ragged_iter_bytes(const int64_t *n, const int64_t *m, int count)
{
    uint64_t sum = 0;
    if (count < 0 || (count > 0 && (!n || !m))) return 0;
    for (int b = 0; b < count; b++) {
        uint64_t one;
        if (n[b] < 0 || m[b] < 0) return 0;
        if (mul3((uint64_t)n[b], (uint64_t)m[b], 2 * sizeof(float), &one)) return 0;
        if (__builtin_add_overflow(sum, one, &sum)) return 0;
    }
    return sum;
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

static void jint(jbuf_t *j, const char *k, int64_t v)
{
    jkey(j, k, 0);
    jprintf(j, "%lld", (long long)v);
}

static void jarray(jbuf_t *j, const char *k, const int64_t *v, int64_t n)
{
    jkey(j, k, 0);
    if (!v) {
        jputs(j, "null");
        return;
    }
    jputs(j, "[");
    for (int64_t i = 0; i < n; i++) jprintf(j, "%s%lld", i ? ", " : "", (long long)v[i]);
    jputs(j, "]");
}

static int op_is(const kdlb_row_t *r, const char *name) { return r->op && !strcmp(r->op, name); }

int kdlb_json_row(const kdlb_row_t *r, char *buf, size_t len)
{
    jbuf_t j = {buf, len, 0};
    if (buf && len) buf[0] = '\0';
    jputs(&j, "{");
    jkey(&j, "impl", 1), jstr(&j, r->impl);
    jkey(&j, "op", 0), jstr(&j, r->op);
    if (op_is(r, "sinkhorn") || op_is(r, "sinkhorn_ragged")) {
        jkey(&j, "dtype", 0), jstr(&j, r->dtype);
        jint(&j, "batch", r->batch);
        jint(&j, "n", r->n);
        jint(&j, "m", r->m);
        jint(&j, "iterations", r->iterations);
        if (op_is(r, "sinkhorn_ragged")) {
            jarray(&j, "sizes_n", r->sizes_n, r->batch);
            jarray(&j, "sizes_m", r->sizes_m, r->batch);
        }
    } else if (op_is(r, "sparse")) {
        jkey(&j, "divergence", 0), jstr(&j, r->divergence);
        jkey(&j, "mode", 0), jstr(&j, r->mode);
        jkey(&j, "dtype", 0), jstr(&j, r->dtype);
        jint(&j, "rows", r->rows);
        jint(&j, "vocab", r->vocab);
        jint(&j, "k", r->k);
    } else if (op_is(r, "fused_linear")) {
        jkey(&j, "divergence", 0), jstr(&j, r->divergence);
        jkey(&j, "dtype", 0), jstr(&j, r->dtype);
        jkey(&j, "grad_dtype", 0), jstr(&j, r->grad_dtype);
        jint(&j, "rows", r->rows);
        jint(&j, "hidden", r->hidden);
        jint(&j, "vocab", r->vocab);
        jint(&j, "chunk_rows", r->chunk_rows);
        jkey(&j, "logits_bytes", 0), jprintf(&j, "%llu", (unsigned long long)r->logits_bytes);
        jkey(&j, "logits_dtype_bytes", 0), jprintf(&j, "%llu", (unsigned long long)r->logits_dtype_bytes);
        jkey(&j, "teacher", 0), jstr(&j, r->teacher_hidden > 0 ? "linear" : "logits");
        jkey(&j, "teacher_hidden", 0);
        if (r->teacher_hidden > 0)
            jprintf(&j, "%lld", (long long)r->teacher_hidden);
        else
            jputs(&j, "null");
    } else if (op_is(r, "sinkd")) {
        jkey(&j, "metric", 0), jstr(&j, r->metric);
        jkey(&j, "dtype", 0), jstr(&j, r->dtype);
        jint(&j, "rows", r->rows);
        jint(&j, "vocab", r->vocab);
        jint(&j, "group_size", r->group_size);
        jint(&j, "iterations", r->iterations);
    } else {
        jkey(&j, "divergence", 0), jstr(&j, r->divergence);
        jkey(&j, "dtype", 0), jstr(&j, r->dtype);
        jint(&j, "rows", r->rows);
        jint(&j, "vocab", r->vocab);
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
               "\"sinkhorn\": \"2*batch*n*m*4 per iteration (cost read twice)\", "
               "\"sparse\": \"rows*vocab*(size(student)+size(grad))+rows*k*(8+size(logprobs))\", "
               "\"fused_linear\": \"(rows+vocab)*hidden*(size(hw)+size(grad))+rows*vocab*size(teacher)\", "
               "\"fused_linear_teacher_linear\": "
               "\"(rows+vocab)*hidden*(size(hw)+size(grad))+(rows+vocab)*teacher_hidden*size(hw)\", "
               "\"sinkhorn_ragged\": \"sum_b 2*n_b*m_b*4 per iteration\", "
               "\"sinkd\": \"rows*vocab*(size(student)+size(teacher)+size(grad))\"},\n");
    if (o) {
        fprintf(f, "    \"params\": {\"temperature\": 1, \"alpha\": 0.1, \"beta\": 0.5, ");
        fprintf(f, "\"mu\": %.6g, \"top_k\": %lld, \"reduction\": \"mean\", \"scale\": 1, ", o->mu,
                (long long)o->top_k);
        fprintf(f, "\"grad_dtype\": \"student\", \"repeats\": %d, \"warmup\": %d, ", o->repeats,
                o->warmup);
        fprintf(f, "\"check\": %s, \"sinkhorn_iters\": %d, \"sinkhorn_epsilon\": 0.1, ",
                o->check ? "true" : "false", o->sinkhorn_iters);
        fprintf(f, "\"ops\": [");
        for (int i = 0, first = 1; i < KDLB_N_OPS; i++)
            if (o->ops & (1u << i)) {
                fprintf(f, "%s\"%s\"", first ? "" : ", ", op_names[i]);
                first = 0;
            }
        fprintf(f, "], \"sparse\": {\"mode\": \"renormalised\", \"divergence\": \"fkl\", "
                   "\"dtype\": \"%s\"}, ", kdl_dtype_name(o->sparse_dtype));
        fprintf(f, "\"fused_linear\": {\"divergence\": \"jsd\", \"beta\": 0.5, \"dtypes\": [");
        for (int i = 0; i < o->n_dtypes; i++)
            fprintf(f, "%s\"%s\"", i ? ", " : "", kdl_dtype_name(o->dtypes[i]));
        fprintf(f, "], \"grad_dtype\": \"f32 for f32 inputs, else the inputs' dtype\", "
                   "\"teachers\": [\"logits\", \"linear\"], \"teacher_hidden\": \"hidden\"}, ");
        fprintf(f, "\"sinkd\": {\"temperature\": 2, \"epsilon\": 0.1, \"iterations\": %d, "
                   "\"dtype\": \"%s\"}}\n", o->sinkd_iters, kdl_dtype_name(o->sinkd_dtype));
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
int kdlb_row_label(const kdlb_row_t *r, char *buf, size_t len)
{
    const char *dt = r->dtype ? r->dtype : "-";
    if (op_is(r, "sinkhorn"))
        return snprintf(buf, len, "sinkhorn %s %lldx%lldx%lld", dt, (long long)r->batch,
                        (long long)r->n, (long long)r->m);
    if (op_is(r, "sinkhorn_ragged")) {
        int64_t lo = 0, hi = 0;
        for (int64_t b = 0; r->sizes_n && r->sizes_m && b < r->batch; b++) {
            int64_t a = r->sizes_n[b] < r->sizes_m[b] ? r->sizes_n[b] : r->sizes_m[b];
            int64_t z = r->sizes_n[b] > r->sizes_m[b] ? r->sizes_n[b] : r->sizes_m[b];
            if (b == 0 || a < lo) lo = a;
            if (b == 0 || z > hi) hi = z;
        }
        return snprintf(buf, len, "sinkhorn_ragged %s %lld problems (%lld..%lld)", dt,
                        (long long)r->batch, (long long)lo, (long long)hi);
    }
    if (op_is(r, "sparse"))
        return snprintf(buf, len, "sparse %s k=%lld %s %lldx%lld", r->divergence ? r->divergence : "-",
                        (long long)r->k, dt, (long long)r->rows, (long long)r->vocab);
    if (op_is(r, "fused_linear"))
        return snprintf(buf, len, "fused_linear %s %s%s%s %lldx%lldx%lld%s%.0lld",
                        r->divergence ? r->divergence : "-", dt, r->grad_dtype ? " grad=" : "",
                        r->grad_dtype ? r->grad_dtype : "", (long long)r->rows, (long long)r->hidden,
                        (long long)r->vocab, r->teacher_hidden > 0 ? " teacher=linear:" : "",
                        (long long)(r->teacher_hidden > 0 ? r->teacher_hidden : 0));
    if (op_is(r, "sinkd"))
        return snprintf(buf, len, "sinkd %s %s %lldx%lld/%lld", r->metric ? r->metric : "-", dt,
                        (long long)r->rows, (long long)r->vocab, (long long)r->group_size);
    return snprintf(buf, len, "%s%s%s %s %lldx%lld", r->divergence ? r->divergence : "-",
                    r->head_rule ? "/" : "", r->head_rule ? r->head_rule : "", dt, (long long)r->rows,
                    (long long)r->vocab);
}

void kdlb_print_table(FILE *f, const kdlb_row_t *rows, size_t n_rows, double copy_gb_per_s)
{
    fprintf(f, "%-12s %-15s %-9s %-5s %-18s %10s %9s %7s  %s\n", "impl", "op", "head/k", "dtype",
            "shape", "ms", "GB/s", "%copy", "status");
    for (size_t i = 0; i < n_rows; i++) {
        const kdlb_row_t *r = &rows[i];
        char shape[48], ms[16], gb[16], frac[16], sub[24], mem[80] = "";
        const char *op = r->divergence ? r->divergence : "-";
        snprintf(sub, sizeof sub, "%s", r->head_rule ? r->head_rule : "-");
        if (op_is(r, "sinkhorn") || op_is(r, "sinkhorn_ragged")) {
            op = r->op;
            if (op_is(r, "sinkhorn"))
                snprintf(shape, sizeof shape, "%lldx%lldx%lld", (long long)r->batch,
                         (long long)r->n, (long long)r->m);
            else
                snprintf(shape, sizeof shape, "%lld problems", (long long)r->batch);
        } else if (op_is(r, "fused_linear")) {
            op = "fused_linear";
            snprintf(sub, sizeof sub, "%s%s", r->divergence ? r->divergence : "-", r->teacher_hidden > 0 ? "+HtWt" : "");
            snprintf(shape, sizeof shape, "%lldx%lldx%lld", (long long)r->rows, (long long)r->hidden,
                     (long long)r->vocab);
            double pd = kdlb_peak_over_logits(r->peak_extra_bytes, r->logits_dtype_bytes),
                   pf = kdlb_peak_over_logits(r->peak_extra_bytes, r->logits_bytes);
            if (isfinite(pd) && isfinite(pf))
                snprintf(mem, sizeof mem, " (peak/logits %s %.4f, f32 %.4f)", r->dtype ? r->dtype : "-", pd, pf);
        } else if (op_is(r, "sinkd")) {
            op = "sinkd";
            snprintf(sub, sizeof sub, "%s", r->metric ? r->metric : "-");
            snprintf(shape, sizeof shape, "%lldx%lld/%lld", (long long)r->rows, (long long)r->vocab,
                     (long long)r->group_size);
        } else {
            if (op_is(r, "sparse")) {
                op = "sparse";
                snprintf(sub, sizeof sub, "k=%lld", (long long)r->k);
            }
            snprintf(shape, sizeof shape, "%lldx%lld", (long long)r->rows, (long long)r->vocab);
        }
        if (isfinite(r->ms)) snprintf(ms, sizeof ms, "%.4f", r->ms);
        else snprintf(ms, sizeof ms, "-");
        if (isfinite(r->gb_per_s)) snprintf(gb, sizeof gb, "%.1f", r->gb_per_s);
        else snprintf(gb, sizeof gb, "-");
        if (isfinite(r->fraction_of_copy_bandwidth))
            snprintf(frac, sizeof frac, "%.1f", 100.0 * r->fraction_of_copy_bandwidth);
        else snprintf(frac, sizeof frac, "-");
        fprintf(f, "%-12s %-15s %-9s %-5s %-18s %10s %9s %7s  %s%s%s%s\n", r->impl ? r->impl : "-", op,
                sub, r->dtype ? r->dtype : "-", shape, ms, gb, frac, r->status ? r->status : "-", mem,
                r->note ? ": " : "", r->note ? r->note : "");
    }
    if (isfinite(copy_gb_per_s))
        fprintf(f, "device-to-device copy: %.1f GB/s (read + write); Sinkhorn ms are per iteration\n",
                copy_gb_per_s);
}
