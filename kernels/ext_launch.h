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

/* Fused linear: the loss kernel of one chunk, in place on the float32 logits
 * chunk L [c, V] (row stride V), rows [row0, row0 + c) of the call; writes
 * per-row losses into row_loss [c] and adds the chunk's sum, valid and
 * invalid counts into acc (double[4]: loss sum, valid, invalid, 1/valid). */
kdl_status_t kdl_ext_fused_chunk_launch(const kdl_loss_desc_t *desc, const kdl_fused_linear_args_t *args,
                                        float *logits, int64_t row0, int64_t c, double *row_loss, double *acc,
                                        cudaStream_t stream);
/* After every chunk: loss output, counters, and (MEAN) dH, dW scaled by 1/valid. */
kdl_status_t kdl_ext_fused_finish_launch(const kdl_loss_desc_t *desc, const kdl_fused_linear_args_t *args,
                                         double *acc, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_KERNELS_EXT_LAUNCH_H */
