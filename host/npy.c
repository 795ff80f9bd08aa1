/*
 * host/npy.c - .npy reader and writer (see npy.h for the supported subset).
 *
 * Reader order: open, stat (a regular file, its size), magic, version,
 * header length (checked against the file size and KDL_NPY_MAX_HEADER before
 * the header is allocated), header dict parsed as a small subset of Python
 * literal syntax, dtype, fortran_order, shape (element and byte counts
 * overflow-checked), data size checked against the bytes left in the file,
 * then one allocation and one read.
 */
#define _POSIX_C_SOURCE 200809L

#include "npy.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "internal.h"

static const char npy_magic[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};

/* ---------------------------------------------------------------- helpers */

/* printf into msg, with any newline turned into a space (one-line messages). */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static kdl_npy_status_t npy_fail(kdl_npy_status_t st, char *msg, size_t msg_len, const char *fmt, ...)
{
    if (!msg || msg_len == 0) return st;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, msg_len, fmt, ap);
    va_end(ap);
    for (char *c = msg; *c; c++)
        if (*c == '\n' || *c == '\r') *c = ' ';
    return st;
}

static int host_is_little_endian(void)
{
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* Reverses the bytes of each of n elements of size elem, in place. */
static void byteswap_elements(void *data, int64_t n, size_t elem)
{
    unsigned char *p = (unsigned char *)data;
    for (int64_t i = 0; i < n; i++, p += elem)
        for (size_t a = 0, b = elem - 1; a < b; a++, b--) {
            unsigned char t = p[a];
            p[a] = p[b];
            p[b] = t;
        }
}

const char *kdl_npy_status_name(kdl_npy_status_t st)
{
    static const char *const names[KDL_NPY_STATUS_COUNT_] = {
        "KDL_NPY_OK",         "KDL_NPY_ERR_OPEN",   "KDL_NPY_ERR_NOT_FILE", "KDL_NPY_ERR_IO",
        "KDL_NPY_ERR_EMPTY",  "KDL_NPY_ERR_NOT_NPY", "KDL_NPY_ERR_VERSION", "KDL_NPY_ERR_TRUNCATED",
        "KDL_NPY_ERR_HEADER", "KDL_NPY_ERR_DTYPE",  "KDL_NPY_ERR_FORTRAN",  "KDL_NPY_ERR_SHAPE",
        "KDL_NPY_ERR_OVERFLOW", "KDL_NPY_ERR_SIZE", "KDL_NPY_ERR_ALLOC",    "KDL_NPY_ERR_ARG"};
    return (unsigned)st < KDL_NPY_STATUS_COUNT_ ? names[st] : "KDL_NPY_ERR_UNKNOWN";
}

size_t kdl_npy_dtype_size(kdl_npy_dtype_t t)
{
    switch (t) {
    case KDL_NPY_F16: return 2;
    case KDL_NPY_F32: return 4;
    case KDL_NPY_F64: return 8;
    case KDL_NPY_I64: return 8;
    case KDL_NPY_DTYPE_COUNT_: break;
    }
    return 0;
}

const char *kdl_npy_dtype_descr(kdl_npy_dtype_t t)
{
    static const char *const d[KDL_NPY_DTYPE_COUNT_] = {"<f2", "<f4", "<f8", "<i8"};
    return (unsigned)t < KDL_NPY_DTYPE_COUNT_ ? d[t] : "?";
}

const char *kdl_npy_dtype_name(kdl_npy_dtype_t t)
{
    static const char *const d[KDL_NPY_DTYPE_COUNT_] = {"float16", "float32", "float64", "int64"};
    return (unsigned)t < KDL_NPY_DTYPE_COUNT_ ? d[t] : "unknown";
}

int kdl_npy_to_kdl_dtype(kdl_npy_dtype_t t, kdl_dtype_t *out)
{
    switch (t) {
    case KDL_NPY_F16: *out = KDL_DTYPE_F16; return 0;
    case KDL_NPY_F32: *out = KDL_DTYPE_F32; return 0;
    case KDL_NPY_F64: *out = KDL_DTYPE_F64; return 0;
    default: return -1;
    }
}

void kdl_npy_free(kdl_npy_array_t *a)
{
    if (!a) return;
    free(a->data);
    memset(a, 0, sizeof *a);
}

double kdl_npy_get_double(const kdl_npy_array_t *a, int64_t i)
{
    if (!a || !a->data || i < 0 || i >= a->count) return NAN;
    switch (a->dtype) {
    case KDL_NPY_F16: return (double)kdl_half_to_float(((const uint16_t *)a->data)[i]);
    case KDL_NPY_F32: return (double)((const float *)a->data)[i];
    case KDL_NPY_F64: return ((const double *)a->data)[i];
    case KDL_NPY_I64: return (double)((const int64_t *)a->data)[i];
    case KDL_NPY_DTYPE_COUNT_: break;
    }
    return NAN;
}

void kdl_npy_shape_string(const kdl_npy_array_t *a, char *buf, size_t len)
{
    if (!buf || len == 0) return;
    size_t off = 0;
    buf[0] = '\0';
    for (int k = -1; a && k <= a->ndim && off < len; k++) {
        int n = k < 0 ? snprintf(buf, len, "[")
                : k == a->ndim ? snprintf(buf + off, len - off, "]")
                : snprintf(buf + off, len - off, k ? ", %lld" : "%lld", (long long)a->shape[k]);
        off += n > 0 ? (size_t)n : 0;
    }
}

/* Element count of a shape: 0 on success, -1 on overflow of int64. */
static int shape_count(int ndim, const int64_t *shape, int64_t *count)
{
    int64_t n = 1;
    for (int k = 0; k < ndim; k++)
        if (shape[k] == 0) {
            *count = 0;
            return 0;
        }
    for (int k = 0; k < ndim; k++) {
        if (n > INT64_MAX / shape[k]) return -1;
        n *= shape[k];
    }
    *count = n;
    return 0;
}

/* ------------------------------------------------------ header dict parser */
/* The header is a Python dict literal.  Accepted subset: keys and strings in
 * single or double quotes without escapes, True/False, tuples of
 * non-negative integers (an optional Python 2 'L' suffix), a trailing comma
 * in the dict and in tuples, whitespace anywhere between tokens. */

typedef struct npy_cursor {
    const char *p, *end;
    char *msg;
    size_t msg_len;
} npy_cursor_t;

typedef struct npy_header {
    char descr[64];
    int fortran;
    int ndim;
    int64_t shape[KDL_NPY_MAX_DIMS];
    int have_descr, have_fortran, have_shape;
} npy_header_t;

static void skip_ws(npy_cursor_t *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static int peek(npy_cursor_t *c) { return c->p < c->end ? (unsigned char)*c->p : -1; }

/* Consumes ch after optional whitespace; returns 1 if it was there. */
static int accept(npy_cursor_t *c, char ch)
{
    skip_ws(c);
    if (peek(c) == (unsigned char)ch) {
        c->p++;
        return 1;
    }
    return 0;
}

/* A quoted string into buf (NUL-terminated, at most cap - 1 chars). */
static kdl_npy_status_t parse_string(npy_cursor_t *c, char *buf, size_t cap, const char *what)
{
    skip_ws(c);
    int q = peek(c);
    if (q != '\'' && q != '"')
        return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len, "malformed header: expected a quoted %s", what);
    c->p++;
    size_t n = 0;
    while (c->p < c->end && *c->p != q) {
        if (*c->p == '\\' || n + 1 >= cap)
            return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len, "malformed header: unexpected %s", what);
        buf[n++] = *c->p++;
    }
    if (c->p >= c->end)
        return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len, "malformed header: unterminated %s", what);
    c->p++;
    buf[n] = '\0';
    return KDL_NPY_OK;
}

static kdl_npy_status_t parse_bool(npy_cursor_t *c, int *out)
{
    skip_ws(c);
    size_t left = (size_t)(c->end - c->p);
    if (left >= 4 && !memcmp(c->p, "True", 4)) {
        c->p += 4;
        *out = 1;
    } else if (left >= 5 && !memcmp(c->p, "False", 5)) {
        c->p += 5;
        *out = 0;
    } else {
        return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len,
                        "malformed header: fortran_order must be True or False");
    }
    return KDL_NPY_OK;
}

/* One dimension: a decimal integer, optionally negative (then an error),
 * optionally followed by 'L'. */
static kdl_npy_status_t parse_dim(npy_cursor_t *c, int64_t *out)
{
    skip_ws(c);
    int neg = peek(c) == '-';
    if (neg) c->p++;
    if (peek(c) < '0' || peek(c) > '9')
        return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len, "malformed header: shape must be a tuple of integers");
    int64_t v = 0;
    int overflow = 0;
    while (peek(c) >= '0' && peek(c) <= '9') {
        int d = *c->p++ - '0';
        if (v > (INT64_MAX - d) / 10) overflow = 1;
        else v = v * 10 + d;
    }
    if (peek(c) == 'L') c->p++;
    if (neg && (v != 0 || overflow))
        return npy_fail(KDL_NPY_ERR_SHAPE, c->msg, c->msg_len, "negative dimension in shape");
    if (overflow)
        return npy_fail(KDL_NPY_ERR_OVERFLOW, c->msg, c->msg_len, "a dimension of the shape overflows int64");
    *out = v;
    return KDL_NPY_OK;
}

/* '(' [dim (',' dim)* [',']] ')'; a one-element tuple needs its comma. */
static kdl_npy_status_t parse_shape(npy_cursor_t *c, npy_header_t *h)
{
    if (!accept(c, '('))
        return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len, "malformed header: shape must be a tuple");
    h->ndim = 0;
    int trailing_comma = 0;
    while (!accept(c, ')')) {
        if (h->ndim >= KDL_NPY_MAX_DIMS)
            return npy_fail(KDL_NPY_ERR_SHAPE, c->msg, c->msg_len, "more than %d dimensions",
                            KDL_NPY_MAX_DIMS);
        kdl_npy_status_t st = parse_dim(c, &h->shape[h->ndim]);
        if (st != KDL_NPY_OK) return st;
        h->ndim++;
        trailing_comma = accept(c, ',');
        skip_ws(c);
        if (!trailing_comma && peek(c) != ')')
            return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len, "malformed header: bad shape tuple");
    }
    if (h->ndim == 1 && !trailing_comma)
        return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len,
                        "malformed header: shape (n) is not a tuple (a 1-tuple is written (n,))");
    return KDL_NPY_OK;
}

static kdl_npy_status_t parse_entry(npy_cursor_t *c, npy_header_t *h)
{
    char key[32];
    kdl_npy_status_t st = parse_string(c, key, sizeof key, "key");
    if (st != KDL_NPY_OK) return st;
    if (!accept(c, ':'))
        return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len, "malformed header: expected ':' after '%s'", key);
    int *seen;
    if (!strcmp(key, "descr")) {
        seen = &h->have_descr;
        skip_ws(c);
        if (peek(c) == '[' || peek(c) == '{')
            return npy_fail(KDL_NPY_ERR_DTYPE, c->msg, c->msg_len, "structured dtypes are not supported");
        st = parse_string(c, h->descr, sizeof h->descr, "descr");
    } else if (!strcmp(key, "fortran_order")) {
        seen = &h->have_fortran;
        st = parse_bool(c, &h->fortran);
    } else if (!strcmp(key, "shape")) {
        seen = &h->have_shape;
        st = parse_shape(c, h);
    } else {
        return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len, "malformed header: unexpected key '%s'", key);
    }
    if (st != KDL_NPY_OK) return st;
    if (*seen) return npy_fail(KDL_NPY_ERR_HEADER, c->msg, c->msg_len, "malformed header: key '%s' twice", key);
    *seen = 1;
    return KDL_NPY_OK;
}

static kdl_npy_status_t parse_header(const char *text, size_t len, npy_header_t *h, char *msg, size_t msg_len)
{
    npy_cursor_t c = {text, text + len, msg, msg_len};
    memset(h, 0, sizeof *h);
    if (!accept(&c, '{'))
        return npy_fail(KDL_NPY_ERR_HEADER, msg, msg_len, "malformed header: not a dict");
    while (!accept(&c, '}')) {
        kdl_npy_status_t st = parse_entry(&c, h);
        if (st != KDL_NPY_OK) return st;
        if (!accept(&c, ',')) {
            if (!accept(&c, '}'))
                return npy_fail(KDL_NPY_ERR_HEADER, msg, msg_len, "malformed header: expected ',' or '}'");
            break;
        }
    }
    skip_ws(&c);
    if (c.p != c.end)
        return npy_fail(KDL_NPY_ERR_HEADER, msg, msg_len, "malformed header: text after the dict");
    if (!h->have_descr || !h->have_fortran || !h->have_shape)
        return npy_fail(KDL_NPY_ERR_HEADER, msg, msg_len, "malformed header: missing key '%s'",
                        !h->have_descr ? "descr" : !h->have_fortran ? "fortran_order" : "shape");
    return KDL_NPY_OK;
}

/* '<f2' '<f4' '<f8' '<i8', or with '=' or '|' for the byte order. */
static kdl_npy_status_t dtype_from_descr(const char *d, kdl_npy_dtype_t *out, char *msg, size_t msg_len)
{
    static const char *const body[KDL_NPY_DTYPE_COUNT_] = {"f2", "f4", "f8", "i8"};
    if (d[0] == '>' || d[0] == '!')
        return npy_fail(KDL_NPY_ERR_DTYPE, msg, msg_len,
                        "unsupported dtype '%s': big-endian data (use '<' little-endian)", d);
    if (d[0] == '<' || d[0] == '=' || d[0] == '|')
        for (int t = 0; t < KDL_NPY_DTYPE_COUNT_; t++)
            if (!strcmp(d + 1, body[t])) {
                *out = (kdl_npy_dtype_t)t;
                return KDL_NPY_OK;
            }
    return npy_fail(KDL_NPY_ERR_DTYPE, msg, msg_len,
                    "unsupported dtype '%s' (supported: <f2 <f4 <f8 <i8)", d);
}

/* ------------------------------------------------------------------ reader */

typedef struct npy_file {
    FILE *f;
    int64_t size;  /* bytes in the file */
    int64_t taken; /* bytes consumed so far */
} npy_file_t;

/* Reads exactly n bytes; TRUNCATED at end of file, IO on a read error. */
static kdl_npy_status_t read_exact(npy_file_t *nf, void *buf, size_t n, const char *what, char *msg,
                                   size_t msg_len)
{
    size_t got = fread(buf, 1, n, nf->f);
    nf->taken += (int64_t)got;
    if (got == n) return KDL_NPY_OK;
    if (ferror(nf->f)) return npy_fail(KDL_NPY_ERR_IO, msg, msg_len, "read error in the %s: %s", what, strerror(errno));
    return npy_fail(KDL_NPY_ERR_TRUNCATED, msg, msg_len, "file truncated in the %s", what);
}

static kdl_npy_status_t open_regular(const char *path, npy_file_t *nf, char *msg, size_t msg_len)
{
    nf->f = fopen(path, "rb");
    if (!nf->f) return npy_fail(KDL_NPY_ERR_OPEN, msg, msg_len, "cannot open: %s", strerror(errno));
    struct stat sb;
    if (fstat(fileno(nf->f), &sb) != 0)
        return npy_fail(KDL_NPY_ERR_IO, msg, msg_len, "cannot stat: %s", strerror(errno));
    if (!S_ISREG(sb.st_mode)) return npy_fail(KDL_NPY_ERR_NOT_FILE, msg, msg_len, "not a regular file");
    nf->size = (int64_t)sb.st_size;
    if (nf->size == 0) return npy_fail(KDL_NPY_ERR_EMPTY, msg, msg_len, "empty file (not a .npy file)");
    return KDL_NPY_OK;
}

/* Magic, version and header length; leaves the stream at the header. */
static kdl_npy_status_t read_preamble(npy_file_t *nf, int *version, size_t *hlen, char *msg, size_t msg_len)
{
    unsigned char pre[12];
    size_t head = nf->size < 6 ? (size_t)nf->size : 6;
    kdl_npy_status_t st = read_exact(nf, pre, head, "magic", msg, msg_len);
    if (st != KDL_NPY_OK) return st;
    if (memcmp(pre, npy_magic, head) != 0)
        return npy_fail(KDL_NPY_ERR_NOT_NPY, msg, msg_len, "not a .npy file (no \\x93NUMPY magic)");
    if (head < 6) return npy_fail(KDL_NPY_ERR_TRUNCATED, msg, msg_len, "file truncated in the magic");
    st = read_exact(nf, pre + 6, 2, "version", msg, msg_len);
    if (st != KDL_NPY_OK) return st;
    if (pre[6] < 1 || pre[6] > 3 || pre[7] != 0)
        return npy_fail(KDL_NPY_ERR_VERSION, msg, msg_len, "unsupported .npy version %u.%u (supported: 1.0 2.0 3.0)",
                        pre[6], pre[7]);
    *version = pre[6];
    size_t nlen = *version == 1 ? 2 : 4;
    st = read_exact(nf, pre + 8, nlen, "header length", msg, msg_len);
    if (st != KDL_NPY_OK) return st;
    *hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
    if (nlen == 4) *hlen |= (size_t)pre[10] << 16 | (size_t)pre[11] << 24;
    return KDL_NPY_OK;
}

/* Reads and parses the header of hlen bytes (checked against the file). */
static kdl_npy_status_t read_header(npy_file_t *nf, size_t hlen, npy_header_t *h, char *msg, size_t msg_len)
{
    if (hlen > KDL_NPY_MAX_HEADER)
        return npy_fail(KDL_NPY_ERR_HEADER, msg, msg_len, "header length %zu exceeds the limit of %zu bytes", hlen,
                        KDL_NPY_MAX_HEADER);
    if ((int64_t)hlen > nf->size - nf->taken)
        return npy_fail(KDL_NPY_ERR_TRUNCATED, msg, msg_len, "file truncated in the header (%zu bytes announced, %lld left)",
                        hlen, (long long)(nf->size - nf->taken));
    char *text = (char *)malloc(hlen + 1);
    if (!text) return npy_fail(KDL_NPY_ERR_ALLOC, msg, msg_len, "out of memory for the header");
    kdl_npy_status_t st = read_exact(nf, text, hlen, "header", msg, msg_len);
    if (st == KDL_NPY_OK && memchr(text, '\0', hlen))
        st = npy_fail(KDL_NPY_ERR_HEADER, msg, msg_len, "malformed header: NUL byte");
    if (st == KDL_NPY_OK) st = parse_header(text, hlen, h, msg, msg_len);
    free(text);
    return st;
}

/* dtype, order and shape of a parsed header into out; checks the data size
 * against the bytes left in the file. */
static kdl_npy_status_t check_layout(const npy_file_t *nf, const npy_header_t *h, kdl_npy_array_t *out,
                                     size_t *bytes, char *msg, size_t msg_len)
{
    kdl_npy_status_t st = dtype_from_descr(h->descr, &out->dtype, msg, msg_len);
    if (st != KDL_NPY_OK) return st;
    if (h->fortran)
        return npy_fail(KDL_NPY_ERR_FORTRAN, msg, msg_len, "fortran_order True is not supported (save a C-order array)");
    out->ndim = h->ndim;
    memcpy(out->shape, h->shape, sizeof out->shape);
    size_t elem = kdl_npy_dtype_size(out->dtype);
    if (shape_count(h->ndim, h->shape, &out->count) != 0 || (uint64_t)out->count > SIZE_MAX / elem ||
        (uint64_t)out->count > (uint64_t)INT64_MAX / elem)
        return npy_fail(KDL_NPY_ERR_OVERFLOW, msg, msg_len, "shape too large: its byte count overflows");
    *bytes = (size_t)out->count * elem;
    int64_t left = nf->size - nf->taken;
    if ((int64_t)*bytes > left)
        return npy_fail(KDL_NPY_ERR_TRUNCATED, msg, msg_len,
                        "file truncated: the shape needs %zu data bytes, the file has %lld", *bytes,
                        (long long)left);
    if ((int64_t)*bytes < left)
        return npy_fail(KDL_NPY_ERR_SIZE, msg, msg_len,
                        "data size does not match the shape: %lld data bytes, the shape needs %zu",
                        (long long)left, *bytes);
    return KDL_NPY_OK;
}

static kdl_npy_status_t load_open(npy_file_t *nf, kdl_npy_array_t *out, char *msg, size_t msg_len)
{
    size_t hlen = 0, bytes = 0;
    npy_header_t h;
    kdl_npy_status_t st = read_preamble(nf, &out->version, &hlen, msg, msg_len);
    if (st == KDL_NPY_OK) st = read_header(nf, hlen, &h, msg, msg_len);
    if (st == KDL_NPY_OK) st = check_layout(nf, &h, out, &bytes, msg, msg_len);
    if (st != KDL_NPY_OK) return st;
    out->data = malloc(bytes ? bytes : 1);
    if (!out->data) return npy_fail(KDL_NPY_ERR_ALLOC, msg, msg_len, "out of memory for %zu data bytes", bytes);
    st = read_exact(nf, out->data, bytes, "data", msg, msg_len);
    if (st == KDL_NPY_OK && !host_is_little_endian())
        byteswap_elements(out->data, out->count, kdl_npy_dtype_size(out->dtype));
    return st;
}

kdl_npy_status_t kdl_npy_load(const char *path, kdl_npy_array_t *out, char *msg, size_t msg_len)
{
    if (msg && msg_len) msg[0] = '\0';
    if (!out) return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "output array is NULL");
    memset(out, 0, sizeof *out);
    if (!path) return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "path is NULL");
    npy_file_t nf = {NULL, 0, 0};
    kdl_npy_status_t st = open_regular(path, &nf, msg, msg_len);
    if (st == KDL_NPY_OK) st = load_open(&nf, out, msg, msg_len);
    if (nf.f) fclose(nf.f);
    if (st != KDL_NPY_OK) kdl_npy_free(out);
    return st;
}

/* ------------------------------------------------------------------ writer */

/* The dict text "{'descr': ..., }" of a shape into buf; its length, or 0 if
 * it does not fit. */
static size_t header_dict(char *buf, size_t cap, kdl_npy_dtype_t dtype, int ndim, const int64_t *shape)
{
    int n = snprintf(buf, cap, "{'descr': '%s', 'fortran_order': False, 'shape': (", kdl_npy_dtype_descr(dtype));
    size_t len = n > 0 ? (size_t)n : 0;
    for (int k = 0; k < ndim && len < cap; k++) {
        n = snprintf(buf + len, cap - len, k == 0 ? "%lld" : ", %lld", (long long)shape[k]);
        len += n > 0 ? (size_t)n : 0;
    }
    if (len < cap) {
        n = snprintf(buf + len, cap - len, ndim == 1 ? ",), }" : "), }");
        len += n > 0 ? (size_t)n : 0;
    }
    return len < cap ? len : 0;
}

static kdl_npy_status_t check_write_args(FILE *f, kdl_npy_dtype_t dtype, int ndim, const int64_t *shape,
                                         const void *data, int version, int64_t *count, char *msg,
                                         size_t msg_len)
{
    if (!f) return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "stream is NULL");
    if ((unsigned)dtype >= KDL_NPY_DTYPE_COUNT_) return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "unknown dtype");
    if (ndim < 0 || ndim > KDL_NPY_MAX_DIMS || (ndim > 0 && !shape))
        return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "bad rank %d", ndim);
    if (version < 0 || version > 3) return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "bad version %d", version);
    for (int k = 0; k < ndim; k++)
        if (shape[k] < 0) return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "negative dimension");
    size_t elem = kdl_npy_dtype_size(dtype);
    if (shape_count(ndim, shape, count) != 0 || (uint64_t)*count > SIZE_MAX / elem)
        return npy_fail(KDL_NPY_ERR_OVERFLOW, msg, msg_len, "shape too large");
    if (*count > 0 && !data) return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "data is NULL");
    return KDL_NPY_OK;
}

/* Writes the data little-endian (swapping through a small buffer on a
 * big-endian host). */
static kdl_npy_status_t write_data(FILE *f, const void *data, int64_t count, size_t elem, char *msg,
                                   size_t msg_len)
{
    if (count == 0) return KDL_NPY_OK;
    if (host_is_little_endian()) {
        if (fwrite(data, elem, (size_t)count, f) != (size_t)count)
            return npy_fail(KDL_NPY_ERR_IO, msg, msg_len, "write error: %s", strerror(errno));
        return KDL_NPY_OK;
    }
    unsigned char buf[4096];
    const unsigned char *src = (const unsigned char *)data;
    int64_t per = (int64_t)(sizeof buf / elem);
    for (int64_t i = 0; i < count; i += per) {
        int64_t n = count - i < per ? count - i : per;
        memcpy(buf, src + (size_t)i * elem, (size_t)n * elem);
        byteswap_elements(buf, n, elem);
        if (fwrite(buf, elem, (size_t)n, f) != (size_t)n)
            return npy_fail(KDL_NPY_ERR_IO, msg, msg_len, "write error: %s", strerror(errno));
    }
    return KDL_NPY_OK;
}

kdl_npy_status_t kdl_npy_write_stream(FILE *f, kdl_npy_dtype_t dtype, int ndim, const int64_t *shape,
                                      const void *data, int version, char *msg, size_t msg_len)
{
    if (msg && msg_len) msg[0] = '\0';
    int64_t count = 0;
    kdl_npy_status_t st = check_write_args(f, dtype, ndim, shape, data, version, &count, msg, msg_len);
    if (st != KDL_NPY_OK) return st;
    char hdr[64 + 4096];
    size_t dict = header_dict(hdr, sizeof hdr - 64, dtype, ndim, shape);
    if (dict == 0) return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "header too long");
    /* pad with spaces so preamble + header is a multiple of 64, end with '\n' */
    size_t pre = (version == 0 || version == 1) ? 10 : 12;
    size_t total = (pre + dict + 1 + 63) / 64 * 64;
    if (version == 0 && total - pre > 65535) {
        version = 2;
        pre = 12;
        total = (pre + dict + 1 + 63) / 64 * 64;
    }
    if (version == 0) version = 1;
    size_t hlen = total - pre;
    if (version == 1 && hlen > 65535)
        return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "header too long for version 1.0");
    memset(hdr + dict, ' ', hlen - dict - 1);
    hdr[hlen - 1] = '\n';
    unsigned char preamble[12];
    memcpy(preamble, npy_magic, 6);
    preamble[6] = (unsigned char)version;
    preamble[7] = 0;
    for (size_t k = 0; k < pre - 8; k++) preamble[8 + k] = (unsigned char)(hlen >> (8 * k));
    if (fwrite(preamble, 1, pre, f) != pre || fwrite(hdr, 1, hlen, f) != hlen)
        return npy_fail(KDL_NPY_ERR_IO, msg, msg_len, "write error: %s", strerror(errno));
    return write_data(f, data, count, kdl_npy_dtype_size(dtype), msg, msg_len);
}

kdl_npy_status_t kdl_npy_save(const char *path, kdl_npy_dtype_t dtype, int ndim, const int64_t *shape,
                              const void *data, char *msg, size_t msg_len)
{
    if (msg && msg_len) msg[0] = '\0';
    if (!path) return npy_fail(KDL_NPY_ERR_ARG, msg, msg_len, "path is NULL");
    FILE *f = fopen(path, "wb");
    if (!f) return npy_fail(KDL_NPY_ERR_OPEN, msg, msg_len, "cannot create: %s", strerror(errno));
    kdl_npy_status_t st = kdl_npy_write_stream(f, dtype, ndim, shape, data, 0, msg, msg_len);
    if (fclose(f) != 0 && st == KDL_NPY_OK)
        st = npy_fail(KDL_NPY_ERR_IO, msg, msg_len, "write error: %s", strerror(errno));
    return st;
}
