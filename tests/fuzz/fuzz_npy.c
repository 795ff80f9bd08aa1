/*
 * tests/fuzz/fuzz_npy.c - libFuzzer target: the .npy reader (host/npy.c) on
 * arbitrary bytes.
 *
 * The reader has a path API only (kdl_npy_load; it insists on a regular
 * file, so fmemopen cannot stand in): each input is written to a file in a
 * private temporary directory (under $TMPDIR, else /dev/shm, else /tmp) and
 * loaded from there.
 *
 * Oracle (abort on violation):
 *   - the status is a known value; the message is one non-empty line;
 *   - on failure *out holds nothing (data NULL, count 0);
 *   - on success the array is consistent: dtype known, ndim in
 *     [0, KDL_NPY_MAX_DIMS], dims >= 0, count = product of the dims, data not
 *     NULL, and the data bytes are exactly the tail of the input;
 *   - a loaded array survives kdl_npy_save + kdl_npy_load unchanged (dtype,
 *     shape, bytes).
 */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "npy.h"
#include "fuzz_check.h"

static char dir_path[512], in_path[600], out_path[600];

static void cleanup(void)
{
    unlink(in_path);
    unlink(out_path);
    rmdir(dir_path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *base = getenv("TMPDIR");
    struct stat sb;
    if (!base || !*base) base = (stat("/dev/shm", &sb) == 0 && S_ISDIR(sb.st_mode)) ? "/dev/shm" : "/tmp";
    snprintf(dir_path, sizeof dir_path, "%s/kdl_fuzz_npy.XXXXXX", base);
    if (!mkdtemp(dir_path)) {
        perror("fuzz_npy: mkdtemp");
        abort();
    }
    snprintf(in_path, sizeof in_path, "%s/in.npy", dir_path);
    snprintf(out_path, sizeof out_path, "%s/out.npy", dir_path);
    atexit(cleanup);
    return 0;
}

#define CHECK(cond, ...) FZ_CHECK("fuzz_npy", (void)0, cond, __VA_ARGS__)

static void write_input(const uint8_t *data, size_t size)
{
    int fd = open(in_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        perror("fuzz_npy: open");
        abort();
    }
    size_t off = 0;
    while (off < size) {
        ssize_t w = write(fd, data + off, size - off);
        if (w <= 0) {
            perror("fuzz_npy: write");
            abort();
        }
        off += (size_t)w;
    }
    close(fd);
}

static void check_message(const char *msg)
{
    CHECK(msg[0] != '\0', "failure without a message");
    CHECK(strchr(msg, '\n') == NULL && strchr(msg, '\r') == NULL, "message is not one line: %s", msg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    write_input(data, size);
    kdl_npy_array_t a;
    memset(&a, 0x5a, sizeof a); /* the reader must zero it */
    char msg[256];
    kdl_npy_status_t st = kdl_npy_load(in_path, &a, msg, sizeof msg);
    CHECK((unsigned)st < KDL_NPY_STATUS_COUNT_, "status %d", (int)st);
    CHECK(strcmp(kdl_npy_status_name(st), "") != 0, "status name");
    if (st != KDL_NPY_OK) {
        check_message(msg);
        CHECK(a.data == NULL && a.count == 0, "failed load left data %p count %lld", a.data, (long long)a.count);
        kdl_npy_free(&a);
        return 0;
    }

    CHECK((unsigned)a.dtype < KDL_NPY_DTYPE_COUNT_, "dtype %d", (int)a.dtype);
    CHECK(a.ndim >= 0 && a.ndim <= KDL_NPY_MAX_DIMS, "ndim %d", a.ndim);
    CHECK(a.version >= 1 && a.version <= 3, "version %d", a.version);
    CHECK(a.data != NULL, "data NULL on success");
    int64_t count = 1;
    int zero = 0;
    for (int k = 0; k < a.ndim; k++) {
        CHECK(a.shape[k] >= 0, "dim %d = %lld", k, (long long)a.shape[k]);
        zero |= a.shape[k] == 0;
    }
    for (int k = 0; k < a.ndim && !zero; k++) {
        CHECK(count <= INT64_MAX / a.shape[k], "shape overflows int64 but was accepted");
        count *= a.shape[k];
    }
    if (zero) count = 0;
    CHECK(count == a.count, "count %lld, product of the shape %lld", (long long)a.count, (long long)count);
    const size_t elem = kdl_npy_dtype_size(a.dtype);
    const size_t bytes = (size_t)a.count * elem;
    CHECK(bytes <= size, "%zu data bytes from a %zu-byte file", bytes, size);
    CHECK(bytes == 0 || memcmp(a.data, data + size - bytes, bytes) == 0, "data differs from the file's tail");
    for (int64_t i = 0; i < a.count && i < 4; i++) (void)kdl_npy_get_double(&a, i);

    /* Round trip through the writer. */
    kdl_npy_status_t ws = kdl_npy_save(out_path, a.dtype, a.ndim, a.shape, a.data, msg, sizeof msg);
    CHECK(ws == KDL_NPY_OK, "cannot save a loaded array: %s: %s", kdl_npy_status_name(ws), msg);
    kdl_npy_array_t b;
    kdl_npy_status_t rs = kdl_npy_load(out_path, &b, msg, sizeof msg);
    CHECK(rs == KDL_NPY_OK, "cannot reload a saved array: %s: %s", kdl_npy_status_name(rs), msg);
    CHECK(b.dtype == a.dtype && b.ndim == a.ndim && b.count == a.count, "round trip changed the array");
    CHECK(memcmp(b.shape, a.shape, sizeof a.shape) == 0, "round trip changed the shape");
    CHECK(bytes == 0 || memcmp(a.data, b.data, bytes) == 0, "round trip changed the data");
    kdl_npy_free(&b);
    kdl_npy_free(&a);
    CHECK(a.data == NULL, "kdl_npy_free left data");
    return 0;
}
