/*
 * bench/bench_gpu_stub.c - the timing half of `kdloss bench` in a build
 * without CUDA (KDL_ENABLE_CUDA=OFF): there is never a device.
 */
#include <stdio.h>

#include "bench_gpu.h"

int kdlb_gpu_probe(kdlb_meta_t *meta, char *err, size_t errlen)
{
    (void)meta;
    snprintf(err, errlen, "no CUDA device found");
    return -1;
}

int kdlb_gpu_run(const kdlb_options_t *o, kdlb_meta_t *meta, kdlb_row_t *rows, size_t *n_rows,
                 kdlb_progress_fn progress, void *ctx, char *err, size_t errlen)
{
    (void)o, (void)meta, (void)rows, (void)progress, (void)ctx;
    *n_rows = 0;
    snprintf(err, errlen, "kdloss was built without CUDA");
    return -1;
}
