/*
 * tests/test_npy.c - the .npy reader and writer (host/npy.c): round trips of
 * every dtype, versions 1.0/2.0/3.0 (hand-written headers), the header
 * dialects numpy and older Pythons produce, and every malformed file giving
 * its specific status and a one-line message, never a crash or a huge
 * allocation.
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "kdl_test.h"
#include "npy.h"

/* ---------------------------------------------------------------- helpers */

/* A per-process (Criterion runs each test in its own process) temp path. */
static void tpath(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/npy_%ld_%s", KDL_TEST_TMPDIR, (long)getpid(), name);
}

static void write_bytes(const char *path, const void *bytes, size_t n)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "cannot create %s", path);
    if (n) cr_assert_eq(fwrite(bytes, 1, n, f), n);
    cr_assert_eq(fclose(f), 0);
}

/* A .npy image with a hand-written header: magic, version major.0, the
 * header length in 2 (v1) or 4 (v2, v3) bytes, the dict text as given (no
 * padding added), then n data bytes.  Returns the image length. */
static size_t make_npy(unsigned char *buf, int major, const char *dict, const void *data, size_t n)
{
    size_t hl = strlen(dict), off = 0;
    memcpy(buf, "\x93NUMPY", 6);
    buf[6] = (unsigned char)major;
    buf[7] = 0;
    off = 8;
    size_t nlen = major == 1 ? 2 : 4;
    for (size_t k = 0; k < nlen; k++) buf[off++] = (unsigned char)(hl >> (8 * k));
    memcpy(buf + off, dict, hl);
    off += hl;
    if (n) memcpy(buf + off, data, n);
    return off + n;
}

/* Loads bytes written to a file; checks a failure's contract (status,
 * one-line non-empty message, nothing allocated) when want != KDL_NPY_OK. */
static kdl_npy_status_t load_bytes(const void *bytes, size_t n, kdl_npy_array_t *out, kdl_npy_status_t want,
                                   const char *what)
{
    char path[512], msg[256];
    tpath(path, sizeof path, "case.npy");
    write_bytes(path, bytes, n);
    kdl_npy_status_t st = kdl_npy_load(path, out, msg, sizeof msg);
    unlink(path);
    cr_expect_eq(st, want, "%s: got %s (%s), want %s", what, kdl_npy_status_name(st), msg, kdl_npy_status_name(want));
    if (st != KDL_NPY_OK) {
        cr_expect(msg[0] != '\0', "%s: empty message", what);
        cr_expect(strchr(msg, '\n') == NULL, "%s: message is not one line: %s", what, msg);
        cr_expect_null(out->data, "%s: data left allocated on failure", what);
        cr_expect_eq(out->count, 0);
    }
    return st;
}

static void expect_header_error(const char *dict, kdl_npy_status_t want)
{
    unsigned char buf[1024];
    double data[4] = {0};
    size_t n = make_npy(buf, 1, dict, data, sizeof data);
    kdl_npy_array_t a;
    load_bytes(buf, n, &a, want, dict);
    kdl_npy_free(&a);
}

/* Writes with kdl_npy_save, reads back, checks dtype, shape and bytes. */
static void round_trip(kdl_npy_dtype_t t, int ndim, const int64_t *shape, const void *data)
{
    char path[512], msg[256];
    tpath(path, sizeof path, "rt.npy");
    cr_assert_eq(kdl_npy_save(path, t, ndim, shape, data, msg, sizeof msg), KDL_NPY_OK, "%s", msg);
    kdl_npy_array_t a;
    cr_assert_eq(kdl_npy_load(path, &a, msg, sizeof msg), KDL_NPY_OK, "%s", msg);
    unlink(path);
    cr_expect_eq(a.dtype, t);
    cr_expect_eq(a.ndim, ndim);
    cr_expect_eq(a.version, 1);
    int64_t count = 1;
    for (int k = 0; k < ndim; k++) {
        cr_expect_eq(a.shape[k], shape[k]);
        count *= shape[k];
    }
    cr_expect_eq(a.count, count);
    cr_assert_not_null(a.data);
    if (count) cr_expect(memcmp(a.data, data, (size_t)count * kdl_npy_dtype_size(t)) == 0, "data differs");
    kdl_npy_free(&a);
}

/* ------------------------------------------------------------ round trips */

Test(npy, round_trip_float64_2d)
{
    double d[6] = {1.5, -2.25, 0.0, -0.0, 1e300, 5e-324};
    int64_t shape[2] = {2, 3};
    round_trip(KDL_NPY_F64, 2, shape, d);
}

Test(npy, round_trip_float32_3d_with_nan_and_inf)
{
    float d[2 * 3 * 4];
    for (int i = 0; i < 24; i++) d[i] = (float)i * 0.5f - 3.0f;
    d[5] = NAN;
    d[7] = INFINITY;
    d[8] = -INFINITY;
    int64_t shape[3] = {2, 3, 4};
    round_trip(KDL_NPY_F32, 3, shape, d);
}

Test(npy, round_trip_float16_bits_and_exact_values)
{
    /* 1, -2, smallest subnormal 2^-24, largest 65504, +inf, a NaN, -0 */
    uint16_t h[7] = {0x3c00, 0xc000, 0x0001, 0x7bff, 0x7c00, 0x7e00, 0x8000};
    int64_t shape[1] = {7};
    round_trip(KDL_NPY_F16, 1, shape, h);
    char path[512];
    tpath(path, sizeof path, "h.npy");
    cr_assert_eq(kdl_npy_save(path, KDL_NPY_F16, 1, shape, h, NULL, 0), KDL_NPY_OK);
    kdl_npy_array_t a;
    cr_assert_eq(kdl_npy_load(path, &a, NULL, 0), KDL_NPY_OK);
    unlink(path);
    cr_expect_eq(kdl_npy_get_double(&a, 0), 1.0);
    cr_expect_eq(kdl_npy_get_double(&a, 1), -2.0);
    cr_expect_eq(kdl_npy_get_double(&a, 2), ldexp(1.0, -24));
    cr_expect_eq(kdl_npy_get_double(&a, 3), 65504.0);
    cr_expect(isinf(kdl_npy_get_double(&a, 4)));
    cr_expect(isnan(kdl_npy_get_double(&a, 5)));
    cr_expect(signbit(kdl_npy_get_double(&a, 6)));
    cr_expect(isnan(kdl_npy_get_double(&a, 7)), "out of range index gives NaN");
    kdl_npy_free(&a);
}

Test(npy, round_trip_int64_extremes)
{
    int64_t d[4] = {INT64_MIN, -100, 0, INT64_MAX};
    int64_t shape[1] = {4};
    round_trip(KDL_NPY_I64, 1, shape, d);
}

Test(npy, round_trip_rank0_scalar)
{
    double d = 42.0;
    round_trip(KDL_NPY_F64, 0, NULL, &d);
}

Test(npy, round_trip_zero_size_array)
{
    int64_t shape[2] = {0, 5};
    round_trip(KDL_NPY_F32, 2, shape, NULL);
}

/* The bytes kdl_npy_save writes for a 2-D float32 array (at most cap). */
static size_t saved_f32_bytes(const char *name, const int64_t shape[2], const float *d, unsigned char *buf, size_t cap)
{
    char path[512];
    tpath(path, sizeof path, name);
    cr_assert_eq(kdl_npy_save(path, KDL_NPY_F32, 2, shape, d, NULL, 0), KDL_NPY_OK);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f);
    size_t n = fread(buf, 1, cap, f);
    fclose(f);
    unlink(path);
    return n;
}

Test(npy, writer_header_matches_numpy_layout)
{
    float d[6] = {0};
    int64_t shape[2] = {2, 3};
    unsigned char buf[256];
    size_t n = saved_f32_bytes("layout.npy", shape, d, buf, sizeof buf);
    cr_assert(memcmp(buf, "\x93NUMPY\x01\x00", 8) == 0);
    size_t hl = buf[8] | (size_t)buf[9] << 8;
    cr_expect_eq((10 + hl) % 64, 0, "data must start 64-byte aligned");
    cr_expect_eq(n, 10 + hl + sizeof d);
    const char *want = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    cr_expect(memcmp(buf + 10, want, strlen(want)) == 0, "header: %.*s", (int)hl, (const char *)buf + 10);
    cr_expect_eq(buf[10 + hl - 1], '\n');
}

Test(npy, writer_rank1_shape_has_trailing_comma)
{
    char path[512];
    tpath(path, sizeof path, "r1.npy");
    int64_t d[3] = {1, 2, 3}, shape[1] = {3};
    cr_assert_eq(kdl_npy_save(path, KDL_NPY_I64, 1, shape, d, NULL, 0), KDL_NPY_OK);
    char buf[128] = {0};
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f);
    cr_assert(fread(buf, 1, 127, f) > 10);
    fclose(f);
    unlink(path);
    cr_expect(strstr(buf + 10, "'descr': '<i8'") != NULL);
    cr_expect(strstr(buf + 10, "'shape': (3,)") != NULL);
}

Test(npy, writer_forced_versions_2_and_3_read_back)
{
    for (int v = 2; v <= 3; v++) {
        char path[512], msg[256];
        tpath(path, sizeof path, "v.npy");
        double d[3] = {1, 2, 3};
        int64_t shape[1] = {3};
        FILE *f = fopen(path, "wb");
        cr_assert_not_null(f);
        cr_assert_eq(kdl_npy_write_stream(f, KDL_NPY_F64, 1, shape, d, v, msg, sizeof msg), KDL_NPY_OK, "%s", msg);
        cr_assert_eq(fclose(f), 0);
        kdl_npy_array_t a;
        cr_assert_eq(kdl_npy_load(path, &a, msg, sizeof msg), KDL_NPY_OK, "v%d: %s", v, msg);
        unlink(path);
        cr_expect_eq(a.version, v);
        cr_expect_eq(a.count, 3);
        cr_expect_eq(((double *)a.data)[2], 3.0);
        kdl_npy_free(&a);
    }
}

Test(npy, reads_handwritten_v1_v2_v3_headers)
{
    const float data[6] = {1, 2, 3, 4, 5, 6};
    const char *dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }          \n";
    for (int v = 1; v <= 3; v++) {
        unsigned char buf[512];
        size_t n = make_npy(buf, v, dict, data, sizeof data);
        kdl_npy_array_t a;
        if (load_bytes(buf, n, &a, KDL_NPY_OK, "handwritten") == KDL_NPY_OK) {
            cr_expect_eq(a.version, v);
            cr_expect_eq(a.ndim, 2);
            cr_expect_eq(a.shape[0], 2);
            cr_expect_eq(a.shape[1], 3);
            cr_expect_eq(((float *)a.data)[5], 6.0f);
        }
        kdl_npy_free(&a);
    }
}

Test(npy, reads_header_dialects)
{
    /* key order, double quotes, no trailing comma, Python 2 'L' suffixes,
     * whitespace, '=' and '|' byte orders */
    const char *dicts[] = {
        "{'shape': (2,), 'fortran_order': False, 'descr': '<f8'}\n",
        "{\"descr\": \"<f8\", \"fortran_order\": False, \"shape\": (2,)}",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (2L,), }\n",
        "  {  'descr' :'<f8' ,'fortran_order':False,'shape':( 2 , ) , }   \n",
        "{'descr': '=f8', 'fortran_order': False, 'shape': (2,), }\n",
        "{'descr': '|f8', 'fortran_order': False, 'shape': (2,), }\n",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }\n",
    };
    const double data[2] = {0.5, -7.0};
    for (size_t k = 0; k < sizeof dicts / sizeof dicts[0]; k++) {
        unsigned char buf[512];
        size_t n = make_npy(buf, 1, dicts[k], data, sizeof data);
        kdl_npy_array_t a;
        if (load_bytes(buf, n, &a, KDL_NPY_OK, dicts[k]) == KDL_NPY_OK) {
            cr_expect_eq(a.dtype, KDL_NPY_F64, "%s", dicts[k]);
            cr_expect_eq(a.count, 2, "%s", dicts[k]);
            cr_expect_eq(((double *)a.data)[1], -7.0, "%s", dicts[k]);
        }
        kdl_npy_free(&a);
    }
}

Test(npy, dtype_mapping_and_names)
{
    kdl_dtype_t t;
    cr_expect_eq(kdl_npy_to_kdl_dtype(KDL_NPY_F16, &t), 0);
    cr_expect_eq(t, KDL_DTYPE_F16);
    cr_expect_eq(kdl_npy_to_kdl_dtype(KDL_NPY_F32, &t), 0);
    cr_expect_eq(t, KDL_DTYPE_F32);
    cr_expect_eq(kdl_npy_to_kdl_dtype(KDL_NPY_F64, &t), 0);
    cr_expect_eq(t, KDL_DTYPE_F64);
    cr_expect_eq(kdl_npy_to_kdl_dtype(KDL_NPY_I64, &t), -1);
    cr_expect_str_eq(kdl_npy_dtype_descr(KDL_NPY_F16), "<f2");
    cr_expect_str_eq(kdl_npy_dtype_descr(KDL_NPY_I64), "<i8");
    cr_expect_str_eq(kdl_npy_dtype_name(KDL_NPY_F32), "float32");
    cr_expect_eq(kdl_npy_dtype_size(KDL_NPY_F16), 2);
    cr_expect_eq(kdl_npy_dtype_size((kdl_npy_dtype_t)99), 0);
    for (int s = 0; s < KDL_NPY_STATUS_COUNT_; s++)
        cr_expect(strncmp(kdl_npy_status_name((kdl_npy_status_t)s), "KDL_NPY_", 8) == 0);
    kdl_npy_array_t a = {0};
    a.ndim = 2;
    a.shape[0] = 3;
    a.shape[1] = 40;
    char buf[64];
    kdl_npy_shape_string(&a, buf, sizeof buf);
    cr_expect_str_eq(buf, "[3, 40]");
}

/* ------------------------------------------------------------ bad files */

Test(npy, missing_file_is_open_error)
{
    char path[512], msg[256];
    tpath(path, sizeof path, "does_not_exist.npy");
    kdl_npy_array_t a;
    cr_expect_eq(kdl_npy_load(path, &a, msg, sizeof msg), KDL_NPY_ERR_OPEN);
    cr_expect(strstr(msg, "cannot open") != NULL, "%s", msg);
    cr_expect_null(a.data);
}

Test(npy, directory_is_not_a_regular_file)
{
    char msg[256];
    kdl_npy_array_t a;
    cr_expect_eq(kdl_npy_load(KDL_TEST_TMPDIR, &a, msg, sizeof msg), KDL_NPY_ERR_NOT_FILE, "%s", msg);
}

/* A file of the bytes of a string literal (its NUL left out) that must
 * fail to load with the status want. */
typedef struct raw_case {
    const char *bytes;
    size_t n;
    kdl_npy_status_t want;
    const char *what;
} raw_case_t;
#define RAW(lit, want, what) {(lit), sizeof(lit) - 1, (want), (what)}

static void expect_raw_failures(const raw_case_t *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        kdl_npy_array_t a;
        load_bytes(cases[i].bytes, cases[i].n, &a, cases[i].want, cases[i].what);
    }
}
#define EXPECT_RAW_FAILURES(...)                                                                            \
    do {                                                                                                     \
        const raw_case_t cases_[] = {__VA_ARGS__};                                                           \
        expect_raw_failures(cases_, sizeof cases_ / sizeof cases_[0]);                                       \
    } while (0)

Test(npy, empty_file) { EXPECT_RAW_FAILURES(RAW("", KDL_NPY_ERR_EMPTY, "empty")); }

Test(npy, text_file_is_not_npy)
{
    EXPECT_RAW_FAILURES(RAW("this is not a numpy file\n", KDL_NPY_ERR_NOT_NPY, "text"),
                        RAW("P", KDL_NPY_ERR_NOT_NPY, "one byte"),
                        RAW("\x93NUMPZ\x01\x00", KDL_NPY_ERR_NOT_NPY, "bad magic"));
}

Test(npy, truncated_preamble)
{
    EXPECT_RAW_FAILURES(RAW("\x93NUM", KDL_NPY_ERR_TRUNCATED, "inside the magic"),
                        RAW("\x93NUMPY", KDL_NPY_ERR_TRUNCATED, "magic only"),
                        RAW("\x93NUMPY\x01\x00\x10", KDL_NPY_ERR_TRUNCATED, "inside the v1 length"),
                        RAW("\x93NUMPY\x02\x00\x10\x00", KDL_NPY_ERR_TRUNCATED, "inside the v2 length"));
}

Test(npy, unsupported_versions)
{
    EXPECT_RAW_FAILURES(RAW("\x93NUMPY\x04\x00\x10\x00", KDL_NPY_ERR_VERSION, "4.0"),
                        RAW("\x93NUMPY\x01\x01\x10\x00", KDL_NPY_ERR_VERSION, "1.1"),
                        RAW("\x93NUMPY\x00\x00\x10\x00", KDL_NPY_ERR_VERSION, "0.0"));
}

Test(npy, header_longer_than_the_file)
{
    unsigned char buf[128];
    size_t n = make_npy(buf, 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", NULL, 0);
    buf[8] = 0xff; /* announce 0x??ff bytes */
    kdl_npy_array_t a;
    load_bytes(buf, n, &a, KDL_NPY_ERR_TRUNCATED, "v1 header length past the end");
}

Test(npy, huge_v2_header_length_is_rejected_before_allocation)
{
    unsigned char buf[16] = {0x93, 'N', 'U', 'M', 'P', 'Y', 2, 0, 0xff, 0xff, 0xff, 0xff, '{', '}', '\n', ' '};
    kdl_npy_array_t a;
    load_bytes(buf, sizeof buf, &a, KDL_NPY_ERR_HEADER, "4 GiB header");
}

Test(npy, truncated_data)
{
    unsigned char buf[512];
    double d[5] = {1, 2, 3, 4, 5};
    size_t n = make_npy(buf, 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }\n", d, sizeof d);
    kdl_npy_array_t a;
    load_bytes(buf, n, &a, KDL_NPY_ERR_TRUNCATED, "5 of 6 elements");
    load_bytes(buf, n - 3, &a, KDL_NPY_ERR_TRUNCATED, "mid-element");
}

Test(npy, extra_data_does_not_match_the_shape)
{
    unsigned char buf[512];
    double d[7] = {0};
    size_t n = make_npy(buf, 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }\n", d, sizeof d);
    kdl_npy_array_t a;
    load_bytes(buf, n, &a, KDL_NPY_ERR_SIZE, "7 elements for (2, 3)");
}

Test(npy, huge_shape_within_int64_is_truncated_not_allocated)
{
    /* 2^40 doubles (8 TiB) announced, 32 bytes present: must fail on the
     * size check, never try the allocation */
    expect_header_error("{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,), }\n",
                        KDL_NPY_ERR_TRUNCATED);
    expect_header_error("{'descr': '<f2', 'fortran_order': False, 'shape': (4611686018427387903,), }\n",
                        KDL_NPY_ERR_TRUNCATED);
}

Test(npy, shapes_overflowing_size_are_rejected)
{
    expect_header_error("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
                        KDL_NPY_ERR_OVERFLOW);
    expect_header_error("{'descr': '<f8', 'fortran_order': False, 'shape': (2305843009213693952,), }",
                        KDL_NPY_ERR_OVERFLOW);
    expect_header_error("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
                        KDL_NPY_ERR_OVERFLOW);
    expect_header_error("{'descr': '<f4', 'fortran_order': False, 'shape': (3037000500, 3037000500, 3), }",
                        KDL_NPY_ERR_OVERFLOW);
}

Test(npy, bad_shapes)
{
    expect_header_error("{'descr': '<f8', 'fortran_order': False, 'shape': (-1, 4), }", KDL_NPY_ERR_SHAPE);
    char dict[512];
    int off = snprintf(dict, sizeof dict, "{'descr': '<f8', 'fortran_order': False, 'shape': (");
    for (int k = 0; k < KDL_NPY_MAX_DIMS + 1; k++) off += snprintf(dict + off, sizeof dict - (size_t)off, "1, ");
    snprintf(dict + off, sizeof dict - (size_t)off, "), }");
    expect_header_error(dict, KDL_NPY_ERR_SHAPE);
}

Test(npy, unsupported_dtypes)
{
    const char *descrs[] = {"'>f4'", "'>f8'", "'!f8'", "'<i4'", "'<c8'", "'|b1'", "'|u1'", "'<U8'",
                            "'<f16'", "'f8'", "'<M8[ns]'", "[('a', '<f4')]"};
    for (size_t k = 0; k < sizeof descrs / sizeof descrs[0]; k++) {
        char dict[256];
        snprintf(dict, sizeof dict, "{'descr': %s, 'fortran_order': False, 'shape': (4,), }\n", descrs[k]);
        expect_header_error(dict, KDL_NPY_ERR_DTYPE);
    }
}

Test(npy, fortran_order_true_is_rejected)
{
    expect_header_error("{'descr': '<f8', 'fortran_order': True, 'shape': (2, 2), }\n", KDL_NPY_ERR_FORTRAN);
}

Test(npy, malformed_header_dicts)
{
    const char *dicts[] = {
        "",
        "[1, 2]",
        "{'descr': '<f8', 'fortran_order': False}",                                /* no shape      */
        "{'descr': '<f8', 'shape': (4,)}",                                         /* no order      */
        "{'fortran_order': False, 'shape': (4,)}",                                 /* no descr      */
        "{'descr': '<f8', 'fortran_order': False, 'shape': (4,), 'x': 1}",         /* unknown key   */
        "{'descr': '<f8', 'descr': '<f8', 'fortran_order': False, 'shape': (4,)}", /* duplicate key */
        "{'descr': '<f8, 'fortran_order': False, 'shape': (4,)}",                  /* bad quotes    */
        "{'descr': '<f8', 'fortran_order': False, 'shape': (4)}",                  /* not a tuple   */
        "{'descr': '<f8', 'fortran_order': False, 'shape': [4]}",                  /* a list        */
        "{'descr': '<f8', 'fortran_order': False, 'shape': (4.0,)}",               /* float dim     */
        "{'descr': '<f8', 'fortran_order': False, 'shape': (2 2)}",                /* no comma      */
        "{'descr': '<f8', 'fortran_order': False, 'shape': (4,)",                  /* unclosed      */
        "{'descr': '<f8', 'fortran_order': false, 'shape': (4,)}",                 /* not Python    */
        "{'descr': '<f8', 'fortran_order': False, 'shape': (4,)} x",               /* trailing text */
        "{'descr': '<f8' 'fortran_order': False, 'shape': (4,)}",                  /* missing comma */
        "{descr: '<f8', 'fortran_order': False, 'shape': (4,)}",                   /* bare key      */
        "{'descr': 8, 'fortran_order': False, 'shape': (4,)}",                     /* descr not str */
        "{'descr': '<f\\8', 'fortran_order': False, 'shape': (4,)}",               /* escape        */
    };
    for (size_t k = 0; k < sizeof dicts / sizeof dicts[0]; k++) expect_header_error(dicts[k], KDL_NPY_ERR_HEADER);
}

Test(npy, nul_byte_in_header)
{
    unsigned char buf[256];
    const char *dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }  \n";
    double d = 1;
    size_t n = make_npy(buf, 1, dict, &d, sizeof d);
    buf[10 + 58] = '\0'; /* one of the padding spaces */
    kdl_npy_array_t a;
    load_bytes(buf, n, &a, KDL_NPY_ERR_HEADER, "NUL in the padding");
}

Test(npy, every_truncation_of_a_valid_file_fails_cleanly)
{
    float d[12];
    for (int i = 0; i < 12; i++) d[i] = (float)i;
    int64_t shape[2] = {3, 4};
    unsigned char buf[256];
    size_t n = saved_f32_bytes("full.npy", shape, d, buf, sizeof buf);
    cr_assert_eq(n, 128 + sizeof d);
    for (size_t len = 0; len < n; len++) {
        kdl_npy_array_t a;
        char what[64];
        snprintf(what, sizeof what, "first %zu bytes", len);
        kdl_npy_status_t want = len == 0 ? KDL_NPY_ERR_EMPTY : KDL_NPY_ERR_TRUNCATED;
        load_bytes(buf, len, &a, want, what);
    }
}

Test(npy, writer_rejects_bad_arguments)
{
    char msg[256];
    int64_t neg[1] = {-1}, ok[1] = {2};
    double d[2] = {0};
    FILE *f = tmpfile();
    cr_assert_not_null(f);
    cr_expect_eq(kdl_npy_write_stream(NULL, KDL_NPY_F64, 1, ok, d, 0, msg, sizeof msg), KDL_NPY_ERR_ARG);
    cr_expect_eq(kdl_npy_write_stream(f, KDL_NPY_F64, 1, neg, d, 0, msg, sizeof msg), KDL_NPY_ERR_ARG);
    cr_expect_eq(kdl_npy_write_stream(f, KDL_NPY_F64, 1, ok, NULL, 0, msg, sizeof msg), KDL_NPY_ERR_ARG);
    cr_expect_eq(kdl_npy_write_stream(f, KDL_NPY_F64, 1, ok, d, 4, msg, sizeof msg), KDL_NPY_ERR_ARG);
    cr_expect_eq(kdl_npy_write_stream(f, (kdl_npy_dtype_t)9, 1, ok, d, 0, msg, sizeof msg), KDL_NPY_ERR_ARG);
    cr_expect_eq(kdl_npy_write_stream(f, KDL_NPY_F64, KDL_NPY_MAX_DIMS + 1, ok, d, 0, msg, sizeof msg),
                 KDL_NPY_ERR_ARG);
    int64_t big[2] = {INT64_MAX, 2};
    cr_expect_eq(kdl_npy_write_stream(f, KDL_NPY_F64, 2, big, d, 0, msg, sizeof msg), KDL_NPY_ERR_OVERFLOW);
    fclose(f);
    char path[512];
    tpath(path, sizeof path, "no_such_dir/x.npy");
    cr_expect_eq(kdl_npy_save(path, KDL_NPY_F64, 1, ok, d, msg, sizeof msg), KDL_NPY_ERR_OPEN);
}

Test(npy, malformed_header_tokens)
{
    expect_header_error("{'descr': '<f8", KDL_NPY_ERR_HEADER);                                      /* unterminated */
    expect_header_error("{'descr' '<f8', 'fortran_order': False, 'shape': (4,), }", KDL_NPY_ERR_HEADER); /* no ':' */
    expect_header_error("{'descr': '<f8', 'fortran_order': False, 'shape': (a,), }", KDL_NPY_ERR_HEADER);
    expect_header_error("{'descr': '<f8', 'fortran_order': False, 'shape': (-,), }", KDL_NPY_ERR_HEADER);
}

Test(npy, get_double_of_int64_and_unknown_dtypes)
{
    int64_t v[3] = {-7, 0, (int64_t)1 << 53};
    kdl_npy_array_t a = {0};
    a.dtype = KDL_NPY_I64;
    a.ndim = 1;
    a.shape[0] = 3;
    a.count = 3;
    a.data = v;
    cr_expect_eq(kdl_npy_get_double(&a, 0), -7.0);
    cr_expect_eq(kdl_npy_get_double(&a, 2), 9007199254740992.0);
    cr_expect(isnan(kdl_npy_get_double(&a, 3)) && isnan(kdl_npy_get_double(&a, -1)));
    a.dtype = KDL_NPY_DTYPE_COUNT_;
    cr_expect(isnan(kdl_npy_get_double(&a, 0)), "an unknown dtype reads as NaN");
    cr_expect_eq(kdl_npy_dtype_size(KDL_NPY_DTYPE_COUNT_), 0);
    cr_expect(isnan(kdl_npy_get_double(NULL, 0)));
}

/* A stream that cannot be written: the error is KDL_NPY_ERR_IO with a
 * one-line "write error" message, from the header or from the data. */
static void expect_write_error(kdl_npy_status_t st, const char *msg, const char *what)
{
    cr_expect_eq(st, KDL_NPY_ERR_IO, "%s: %s (%s)", what, kdl_npy_status_name(st), msg);
    cr_expect(!strncmp(msg, "write error: ", 13) && !strchr(msg, '\n'), "%s: '%s'", what, msg);
}

Test(npy, writer_reports_write_errors)
{
    char msg[256], path[512];
    double d[100] = {0};
    int64_t shape[1] = {100};
    /* a read-only stream: the preamble fails */
    tpath(path, sizeof path, "ro.npy");
    write_bytes(path, "x", 1);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f);
    expect_write_error(kdl_npy_write_stream(f, KDL_NPY_F64, 1, shape, d, 0, msg, sizeof msg), msg, "read-only");
    fclose(f);
    unlink(path);
    /* room for the 128-byte header but not the 800 data bytes, unbuffered */
    char mem[200];
    f = fmemopen(mem, sizeof mem, "w");
    cr_assert_not_null(f);
    setvbuf(f, NULL, _IONBF, 0);
    expect_write_error(kdl_npy_write_stream(f, KDL_NPY_F64, 1, shape, d, 0, msg, sizeof msg), msg, "full");
    fclose(f);
    /* kdl_npy_save whose buffered bytes fail when the file is closed: a
     * 928-byte file under a 512-byte file size limit (SIGXFSZ ignored) */
    struct rlimit old, lim;
    cr_assert_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    lim = old;
    lim.rlim_cur = 512;
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    tpath(path, sizeof path, "limited.npy");
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
    kdl_npy_status_t st = kdl_npy_save(path, KDL_NPY_F64, 1, shape, d, msg, sizeof msg);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, prev);
    expect_write_error(st, msg, "file size limit");
    cr_expect(strstr(msg, strerror(EFBIG)), "%s", msg);
    unlink(path);
}
