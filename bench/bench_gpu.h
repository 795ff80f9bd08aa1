/*
 * bench/bench_gpu.h - the timing half of `kdloss bench` (bench/bench_gpu.cu;
 * bench/bench_gpu_stub.c in a build without CUDA).
 *
 * Method (/work/.library/device/METHOD.md, README.md in this folder):
 *   - inputs random on the device (normal logits with a few large outliers
 *     per row, never zeros), rotated among several sets when one set would
 *     fit in four times the L2;
 *   - each configuration is first compared with the float64 CPU reference on
 *     its first rows (unless --no-check);
 *   - warm-up runs, then repeats, each preceded by writing a buffer larger
 *     than L2 (max(4 x L2, 256 MiB), L2 size from the device properties) so
 *     no run starts with its inputs cached; CUDA events around each run;
 *     median and 20th/80th percentiles;
 *   - the device-to-device copy bandwidth measured in the same process with
 *     cudaMemcpyAsync of a buffer of max(16 x L2, 1 GiB), bytes read plus
 *     written.
 */
#ifndef KDLOSS_BENCH_GPU_H
#define KDLOSS_BENCH_GPU_H

#include <stddef.h>

#include "bench_lib.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 0 when a CUDA device is there (fills meta's device fields: name, compute
 * capability, SM count, L2 and memory sizes, driver and runtime versions);
 * -1 when none (err says why). */
int kdlb_gpu_probe(kdlb_meta_t *meta, char *err, size_t errlen);

/* Called before each configuration is timed (done configurations so far,
 * total, and the row about to be filled: impl, op, divergence, dtype,
 * shape and head rule are set). */
typedef void (*kdlb_progress_fn)(void *ctx, int done, int total, const kdlb_row_t *next);

/* Runs everything o asks for (o->ops): the copy bandwidth
 * (meta->copy_gb_per_s, copy_bytes, l2_flush_bytes), every loss
 * configuration in kdlb_case_at order, the uniform Sinkhorn row when
 * o->sinkhorn.batch > 0, then the sparse rows (shape, then k), the fused
 * linear rows (shape, then dtype of o->dtypes), the ragged Sinkhorn row and
 * the two SinKD rows (L1, squared L2).  rows must have room for kdlb_row_capacity(o) rows; *n_rows gets the
 * number filled.  A configuration whose entry point returns
 * KDL_STATUS_NOT_IMPLEMENTED (or, for the other ops, NOT_SUPPORTED) gets
 * status "not_implemented"; one that does not fit in device memory "oom";
 * one that disagrees with the reference "mismatch" (still timed).
 * Returns 0 when the run went through, -1 when a CUDA failure stopped it
 * (err set; the rows filled so far stay valid).
 * The timing code of the sparse, fused_linear, sinkhorn_ragged and sinkd
 * ops compiles (sm_90a) but has not run on a device yet. */
int kdlb_gpu_run(const kdlb_options_t *o, kdlb_meta_t *meta, kdlb_row_t *rows, size_t *n_rows,
                 kdlb_progress_fn progress, void *ctx, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_BENCH_GPU_H */
