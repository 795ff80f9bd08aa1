/*
 * tests/support/kdl_ext_fixtures.h - fixtures of the extension tests
 * (test_sparse_ref, test_fused_linear_ref, test_gpu_ext, test_ext_cli):
 * seeded normal data, top-k teacher supports, the argument structs of the
 * dense, sparse and fused linear calls over contiguous rows, the float64
 * reference calls that must succeed, the logits H W^T + b, and (with CUDA)
 * the device copies of the GPU tests.
 */
#ifndef KDL_EXT_FIXTURES_H
#define KDL_EXT_FIXTURES_H

#include <stddef.h>
#include <stdint.h>

#include "kdl_test.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ext.h"

/* ------------------------------------------------------------------- data */

/* x[j] = mean + sigma * normal, n values drawn from g. */
void kdl_ext_fill_normal(kdl_rng_t *g, double *x, int64_t n, double mean, double sigma);
void kdl_ext_fill_normal_f32(kdl_rng_t *g, float *x, int64_t n, double mean, double sigma);

/* The same from a fresh generator seeded with seed. */
void kdl_ext_random_normal(uint64_t seed, double *x, int64_t n, double sigma);
void kdl_ext_random_normal_f32(uint64_t seed, float *x, int64_t n, double mean, double sigma);

/* out[v] = x[v] / tau - LSE(x / tau), v < n (max-shifted, as the dense
 * reference computes it). */
void kdl_ext_log_softmax(const double *x, int64_t n, double tau, double *out);

/* Row i's support {(stride i + j) mod V : j < k} into I [N, k]. */
void kdl_ext_strided_support(int64_t N, int64_t V, int64_t k, int64_t stride, int64_t *I);

/* k teacher logits t turned, in place, into the log-probabilities of a
 * top-k teacher holding `mass` of the probability: log(mass softmax(t)). */
void kdl_ext_topk_logprobs(double *t, int64_t k, double mass);

/* L [N, V] = H [N, D] W [V, D]^T (+ b [V] when b is not NULL), float64. */
void kdl_ext_logits(int64_t N, int64_t D, int64_t V, const double *H, const double *W, const double *b,
                    double *L);

/* -------------------------------------------------------- argument structs */

/* Dense loss over contiguous rows (every ld = V): student S of sdt,
 * teacher T of tdt, float64 gradient (may be NULL) and loss. */
kdl_loss_args_t kdl_ext_dense_args(int64_t N, int64_t V, const void *S, kdl_dtype_t sdt, const void *T,
                                   kdl_dtype_t tdt, double *grad, double *loss);

/* Sparse teacher over contiguous rows: S [N, V], indices I and log-probs P
 * [N, k], all float64, float64 gradient (may be NULL) and loss. */
kdl_sparse_args_t kdl_ext_sparse_args(kdl_sparse_mode_t mode, int64_t N, int64_t V, int64_t k, const void *S,
                                      const int64_t *I, const void *P, double *grad, double *loss);

/* Fused linear over contiguous rows: H [N, D] and W [V, D] of hw_dtype,
 * teacher T [N, V] of t_dtype, float64 dH, dW (may be NULL) and loss. */
kdl_fused_linear_args_t kdl_ext_fused_args(int64_t N, int64_t D, int64_t V, const void *H, const void *W,
                                           kdl_dtype_t hw_dtype, const void *T, kdl_dtype_t t_dtype, double *dH,
                                           double *dW, double *loss);

/* Shard r of R over contiguous [N, V] rows (every ld = V): the columns
 * [off, off + width) of S, T (of sdt) and grad (of gdt; may be NULL), the
 * float64 loss as given; no state or exchange yet. */
kdl_shard_args_t kdl_ext_shard_args(int64_t N, int64_t V, int R, int r, int64_t off, int64_t width, const void *S,
                                    const void *T, kdl_dtype_t sdt, void *grad, kdl_dtype_t gdt, void *loss);

/* ------------------------------------------------------- reference calls */

/* The float64 reference on a, which must succeed (the current test fails
 * otherwise, naming what and the library's detail). */
void kdl_ext_ref_dense(const kdl_loss_desc_t *d, const kdl_loss_args_t *a, const char *what);
void kdl_ext_ref_sparse(const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, const char *what);
void kdl_ext_ref_fused(const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a, const char *what);

/* The tolerance {rel, rel * max |ref| + 1e-12} over the finite entries of
 * ref [n]: float32 results against the float64 reference, relative to the
 * largest reference entry. */
kdl_tol_t kdl_ext_tol_rel_max(const double *ref, int64_t n, double rel);

/* ------------------------------------------------------ device memory */

#ifdef KDL_HAVE_CUDA
#include <cuda_runtime_api.h>

/* A CUDA runtime call that must succeed: the current test fails (assert)
 * naming the call and the error.  Needs <criterion/criterion.h>. */
#define KDL_CUDA_OK(call)                                                                      \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        cr_assert_eq(e_, cudaSuccess, "%s: %s", #call, cudaGetErrorString(e_));                \
    } while (0)

/* Device buffers for the GPU tests (free with cudaFree); a CUDA error
 * fails the current test.  kdl_dev_dup: a device copy of bytes of host src,
 * NULL when src is NULL (at least 1 byte is allocated).  kdl_dev_alloc:
 * bytes (at least 1) filled with 0xff, a NaN pattern that an output left
 * untouched keeps; NULL unless want.  kdl_dev_get: bytes from device src
 * into host dst; nothing when either is NULL or bytes is 0. */
void *kdl_dev_dup(const void *src, size_t bytes);
void *kdl_dev_alloc(size_t bytes, int want);
void kdl_dev_get(void *dst, const void *src, size_t bytes);
#endif

#endif
