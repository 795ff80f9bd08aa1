/*
 * kernels/ext_launch.h - C entry points of the extension kernels
 * (kernels/ext.cu), called by host/gpu_ext.c.  Not installed.
 *
 * The wrapper validates arguments and workspace; a launcher enqueues its
 * kernels on the stream and maps launch errors to statuses.  No allocation,
 * no host synchronisation.
 */
#ifndef KDLOSS_KERNELS_EXT_LAUNCH_H
#define KDLOSS_KERNELS_EXT_LAUNCH_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "kdloss/kdloss_ext.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Threads per row block of every extension kernel. */
#define KDL_EXT_THREADS 256

/* Sparse teacher: dynamic shared memory of the row kernel for (V, k) (akl:
 * 1 for AKL, which adds the sort keys).  The kernel also has static shared
 * memory, at most KDL_EXT_SPARSE_STATIC_SMEM bytes (checked at compile time):
 * the opt-in limit must hold the sum. */
#define KDL_EXT_SPARSE_STATIC_SMEM 1024
size_t kdl_ext_sparse_smem_bytes(int64_t vocab, int64_t k, int akl);
/* Workspace: per-row losses [N] (double) and row classes [N] (bytes), each
 * 256-byte aligned, + 256 bytes of accumulators. */
size_t kdl_ext_sparse_ws_bytes(int64_t rows);
kdl_status_t kdl_ext_sparse_launch(const kdl_loss_desc_t *desc, const kdl_sparse_args_t *args, void *workspace,
                                   size_t smem_optin, cudaStream_t stream);

/* Vocabulary-parallel: one step's kernels (phase from ext_internal.h). */
kdl_status_t kdl_ext_shard_launch(const kdl_loss_desc_t *desc, const kdl_shard_args_t *args, int phase, int digit,
                                  cudaStream_t stream);

/* Fused linear (host/gpu_ext.c runs the GEMMs and, per chunk, the dense loss
 * kernel through kdl_loss_launch; these are the kernels around them).
 * L is the float32 chunk [c, V] (row stride V) of the workspace. */
/* L[r, :] = bias (dtype bias_dtype), before the logits GEMM with beta = 1. */
kdl_status_t kdl_ext_fused_bias_fill(float *L, int64_t c, int64_t V, const void *bias, int bias_dtype,
                                     cudaStream_t stream);
/* out[r, :] = L[r, :] * g[row0 + r] (g NULL: * 1/acc[7]), in out_dtype
 * (out == L: in place, F32). */
kdl_status_t kdl_ext_fused_rowscale(float *L, int64_t c, int64_t V, const void *g, int g_dtype, int64_t row0, void *out,
                                    int out_dtype, const double *acc, cudaStream_t stream);
/* acc[7] = rows of the call not ignored (1 if none): 16-bit MEAN's dL scale. */
kdl_status_t kdl_ext_fused_count(const int64_t *labels, int64_t N, int64_t ignore_index, double *acc,
                                 cudaStream_t stream);
/* acc_bias[v] = (first ? 0 : acc_bias[v]) + sum_r dL[r, v] (float64). */
kdl_status_t kdl_ext_fused_colsum(const void *dL, int dL_dtype, int64_t c, int64_t V, double *acc_bias, int first,
                                  cudaStream_t stream);
/* acc (double[32], host/ext_internal.h's layout): adds the chunk's loss
 * (acc[4]) and counts (int64 at acc + 5: invalid, acc + 6: valid, acc + 8:
 * bad-index rows) into acc[0..2] and acc[9]. */
kdl_status_t kdl_ext_fused_chunk_acc(const kdl_loss_desc_t *desc, double *acc, cudaStream_t stream);
/* After every chunk: loss output, counters (bad_index_rows with a sparse
 * teacher), db from acc_bias, and (MEAN)
 * dH, dW, db scaled by 1/valid, or by acc[7]/valid when prescaled (dL was
 * scaled by 1/acc[7]: 16-bit MEAN). */
kdl_status_t kdl_ext_fused_finish_launch(const kdl_loss_desc_t *desc, const kdl_fused_linear_args_t *args,
                                         double *acc, const double *acc_bias, int prescaled, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_KERNELS_EXT_LAUNCH_H */
