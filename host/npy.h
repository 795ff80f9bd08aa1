/*
 * host/npy.h - reading and writing NumPy .npy files (library-internal, used
 * by the `kdloss` command and the tests).
 *
 * Format (numpy.lib.format): the magic "\x93NUMPY", a version byte pair
 * (1.0, 2.0 or 3.0), the header length (little-endian uint16 for 1.0, uint32
 * for 2.0 and 3.0), a Python dict literal
 *     {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
 * padded with spaces and ended by '\n', then the raw data in C order.
 *
 * Supported: dtypes float16, float32, float64 and int64, little-endian.  The
 * descr may be '<f2' '<f4' '<f8' '<i8', or the same with '=' or '|' (both
 * read as little-endian: numpy writes '<' on every little-endian machine, and
 * kdloss supports no big-endian host file convention).  Big-endian ('>', '!'),
 * other kinds and sizes ('<i4', '<c8', '|b1', structured dtypes) are
 * KDL_NPY_ERR_DTYPE.  fortran_order True is KDL_NPY_ERR_FORTRAN.  Any rank
 * from 0 to KDL_NPY_MAX_DIMS; callers check the rank they need.
 *
 * The reader checks everything against the file size before it allocates:
 * a header length or a shape that the file cannot hold is an error, not an
 * allocation.  Errors come with a one-line message (no path in it: the
 * caller knows which file it opened).
 */
#ifndef KDLOSS_HOST_NPY_H
#define KDLOSS_HOST_NPY_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kdloss/kdloss_types.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KDL_NPY_MAX_DIMS 32
/* Largest header the reader accepts (numpy itself refuses more than 10000
 * bytes unless told otherwise). */
#define KDL_NPY_MAX_HEADER ((size_t)1 << 20)

typedef enum kdl_npy_dtype {
    KDL_NPY_F16 = 0, /* '<f2' */
    KDL_NPY_F32 = 1, /* '<f4' */
    KDL_NPY_F64 = 2, /* '<f8' */
    KDL_NPY_I64 = 3, /* '<i8' */
    KDL_NPY_DTYPE_COUNT_ = 4
} kdl_npy_dtype_t;

typedef enum kdl_npy_status {
    KDL_NPY_OK = 0,
    KDL_NPY_ERR_OPEN,      /* the file cannot be opened (message: strerror)     */
    KDL_NPY_ERR_NOT_FILE,  /* not a regular file (directory, pipe, device)     */
    KDL_NPY_ERR_IO,        /* a read or write failed                           */
    KDL_NPY_ERR_EMPTY,     /* the file has no bytes                            */
    KDL_NPY_ERR_NOT_NPY,   /* no "\x93NUMPY" magic                             */
    KDL_NPY_ERR_VERSION,   /* version other than 1.0, 2.0, 3.0                 */
    KDL_NPY_ERR_TRUNCATED, /* the file ends inside the preamble, header or data */
    KDL_NPY_ERR_HEADER,    /* the header dict is malformed                     */
    KDL_NPY_ERR_DTYPE,     /* a dtype kdloss does not read                     */
    KDL_NPY_ERR_FORTRAN,   /* fortran_order is True                            */
    KDL_NPY_ERR_SHAPE,     /* negative dimension, too many dimensions          */
    KDL_NPY_ERR_OVERFLOW,  /* element or byte count overflows int64 / size_t   */
    KDL_NPY_ERR_SIZE,      /* bytes after the data: the shape does not match   */
    KDL_NPY_ERR_ALLOC,     /* out of memory                                    */
    KDL_NPY_ERR_ARG,       /* bad argument to a function of this header        */
    KDL_NPY_STATUS_COUNT_
} kdl_npy_status_t;

/* An array read from (or to be written to) a .npy file. */
typedef struct kdl_npy_array {
    kdl_npy_dtype_t dtype;
    int ndim;                         /* 0 .. KDL_NPY_MAX_DIMS             */
    int64_t shape[KDL_NPY_MAX_DIMS];  /* dims [0, ndim); the rest are 0    */
    int64_t count;                    /* elements: product of shape (1 for rank 0) */
    void *data;                       /* count elements, host byte order, C order;
                                       * malloc'd by kdl_npy_load, never NULL on success */
    int version;                      /* major version of the file read (1, 2, 3) */
} kdl_npy_array_t;

/* "KDL_NPY_ERR_DTYPE" etc.; never NULL. */
const char *kdl_npy_status_name(kdl_npy_status_t st);

/* Bytes per element (2, 4, 8, 8); 0 for an unknown dtype. */
size_t kdl_npy_dtype_size(kdl_npy_dtype_t t);

/* The descr the writer uses: "<f2", "<f4", "<f8", "<i8"; "?" if unknown. */
const char *kdl_npy_dtype_descr(kdl_npy_dtype_t t);

/* "float16", "float32", "float64", "int64"; "unknown" otherwise. */
const char *kdl_npy_dtype_name(kdl_npy_dtype_t t);

/* The kdloss logit dtype of a float npy dtype (F16, F32, F64): returns 0 and
 * sets *out; returns -1 for int64. */
int kdl_npy_to_kdl_dtype(kdl_npy_dtype_t t, kdl_dtype_t *out);

/* Reads the file at path into *out (zeroed first; on failure *out holds no
 * allocation).  On failure writes a one-line reason into msg (msg may be NULL,
 * msg_len 0).  *out must be released with kdl_npy_free. */
kdl_npy_status_t kdl_npy_load(const char *path, kdl_npy_array_t *out, char *msg, size_t msg_len);

/* Frees a's data and zeroes it; NULL and zeroed arrays are accepted. */
void kdl_npy_free(kdl_npy_array_t *a);

/* Writes a .npy file to an open stream: descr of dtype, fortran_order False,
 * the given shape (ndim in [0, KDL_NPY_MAX_DIMS], dims >= 0), then
 * product(shape) elements of data (host byte order, written little-endian).
 * version 0 picks 1.0, or 2.0 when the header does not fit 1.0's 16-bit
 * length; 1, 2 or 3 force that version (1 fails with KDL_NPY_ERR_ARG when the
 * header is too long).  Header padded so the data starts at a multiple of 64
 * bytes, as numpy does.  Does not close or flush f beyond what fwrite does;
 * check the stream's error state when you close it. */
kdl_npy_status_t kdl_npy_write_stream(FILE *f, kdl_npy_dtype_t dtype, int ndim, const int64_t *shape,
                                      const void *data, int version, char *msg, size_t msg_len);

/* kdl_npy_write_stream to a new file at path (version 0), closed and checked.
 * Not atomic: on failure a partial file may remain (the CLI uses
 * kdl_cli_save_npy instead). */
kdl_npy_status_t kdl_npy_save(const char *path, kdl_npy_dtype_t dtype, int ndim, const int64_t *shape,
                              const void *data, char *msg, size_t msg_len);

/* The shape as "[3, 4]" ("[]" for rank 0) into buf (truncated to len). */
void kdl_npy_shape_string(const kdl_npy_array_t *a, char *buf, size_t len);

/* Element i of a float or int array, as double (exact for f16, f32, f64;
 * int64 rounds beyond 2^53).  NaN for an out-of-range i. */
double kdl_npy_get_double(const kdl_npy_array_t *a, int64_t i);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_HOST_NPY_H */
