/*
 * kernels/loss.cu - the fused distillation loss on the GPU: launch planning
 * and the two small kernels around the fused row kernel
 * (kernels/loss_row.cuh).  Per call, on the handle's stream:
 *
 *   1. loss_prep_kernel     1 CTA: rows not ignored -> workspace header;
 *                           zeroes the invalid-row counter.
 *   2. loss_row_kernel      per row (one CTA or one cluster): loss,
 *                           statistics, gradient; reads each logit from
 *                           device memory once on the staged paths.
 *   3. loss_row_kernel      (MEAN with a gradient only) the redo launch:
 *                           a no-op when no row was invalid; otherwise it
 *                           recomputes the valid rows and rewrites their
 *                           gradient with scale/valid (the first launch
 *                           used scale/counted: a row cannot know other
 *                           rows' validity), rounded once.
 *   4. loss_finalize_kernel SUM/MEAN over the per-row losses in fixed order
 *                           (double, CUB block reduce: bitwise identical run
 *                           to run); info, valid_rows.
 *
 * Reads:  student, teacher [N, ld] (f32/f16/bf16, any pair), labels [N].
 * Writes: grad [N, ld_grad] (student dtype or f32), loss ([N] for NONE,
 *         [1] otherwise), statistics [N], info, valid_rows, and the
 *         workspace (256-byte header + one float per row).
 *
 * Paths (docs/kernels.md): SMEM (row staged in one CTA's shared memory),
 * CLUSTER (row split over a cluster, slices staged, DSMEM reductions),
 * STREAM (nothing staged, passes re-read the row from L2; with or without
 * a cluster).  Chosen from the row's bytes, the handle's
 * smem_per_block_optin, cluster_launch and cc_major, and the row count.
 */
#include <float.h>
#include <math.h>

#include "gpu_internal.h"
#include "launch.h"
#include "launch_ex.cuh"
#include "loss_row.cuh"

namespace kdl {

/* Rows counted (label != ignore_index) into hdr[0]; hdr[1] = 0. */
__global__ void __launch_bounds__(kBlock) loss_prep_kernel(const int64_t *labels, int64_t ignore_index,
                                                           int64_t rows, unsigned long long *hdr)
{
    using BR = cub::BlockReduce<unsigned long long, kBlock>;
    __shared__ typename BR::TempStorage tmp;
    unsigned long long cnt = 0;
    if (labels) {
        for (int64_t i = threadIdx.x; i < rows; i += kBlock) cnt += __ldg(labels + i) != ignore_index;
    } else if (threadIdx.x == 0) {
        cnt = (unsigned long long)rows;
    }
    const unsigned long long total = BR(tmp).Sum(cnt);
    if (threadIdx.x == 0) {
        hdr[0] = total;
        hdr[1] = 0;
    }
}

struct FinalParams {
    const float *row_loss;
    const unsigned long long *hdr;
    int64_t rows;
    int reduction;
    double scale;
    int out_dt;
    void *loss;
    int64_t *info, *valid_rows;
};

/* Reduction in fixed order (one CTA), info and valid_rows. */
__global__ void __launch_bounds__(kBlock) loss_finalize_kernel(const FinalParams F)
{
    using BR = cub::BlockReduce<double, kBlock>;
    __shared__ typename BR::TempStorage tmp;
    const unsigned long long counted = F.hdr[0], invalid = F.hdr[1];
    const unsigned long long valid = counted - invalid;
    if (F.reduction != KDL_REDUCTION_NONE) {
        double acc = 0.0;
        for (int64_t i = threadIdx.x; i < F.rows; i += kBlock) acc += (double)F.row_loss[i];
        const double total = BR(tmp).Sum(acc);
        if (threadIdx.x == 0) {
            double l = scaled_loss(F.scale, total);
            if (F.reduction == KDL_REDUCTION_MEAN) l = valid ? l / (double)valid : 0.0;
            store_out(F.loss, F.out_dt, 0, l);
        }
    }
    if (threadIdx.x == 0) {
        if (F.info) *F.info = (int64_t)invalid;
        if (F.valid_rows) *F.valid_rows = (int64_t)valid;
    }
}

static RowKernelFn row_kernel_for(int sdt, int tdt)
{
    switch (sdt) {
    case KDL_DTYPE_F32: return row_kernel_f32(tdt);
    case KDL_DTYPE_F16: return row_kernel_f16(tdt);
    default: return row_kernel_bf16(tdt);
    }
}

} // namespace kdl

/* ====================================================================== host */

#define KDL_LAUNCH_CHECK(call)                                                                   \
    do {                                                                                         \
        kdl_status_t kdl_st_ = kdl_cuda_status((call), #call, __FILE__, __LINE__);               \
        if (kdl_st_ != KDL_STATUS_SUCCESS) return kdl_st_;                                       \
    } while (0)

static const size_t kWsHeader = 256;

extern "C" size_t kdl_loss_ws_bytes(int64_t rows)
{
    if (rows <= 0) return 0;
    size_t per_row = ((size_t)rows * sizeof(float) + 255u) & ~(size_t)255u;
    return kWsHeader + per_row;
}

extern "C" size_t kdl_loss_ws_bytes_for(int64_t rows, kdl_reduction_t reduction)
{
    if (rows <= 0) return 0;
    /* NONE: the prep kernel's header only; row_loss is written and read for
     * SUM and MEAN alone (write_row, loss_finalize_kernel) */
    return reduction == KDL_REDUCTION_NONE ? kWsHeader : kdl_loss_ws_bytes(rows);
}

static int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

static bool aligned16(const void *p, int64_t ld, size_t esz)
{
    return ((uintptr_t)p % 16u) == 0 && ((uint64_t)ld * esz) % 16u == 0;
}

/* Bytes spanned by rows x vocab elements of size esz at row stride ld. */
static size_t span_bytes(int64_t rows, int64_t ld, int64_t vocab, size_t esz)
{
    return rows > 0 ? ((size_t)(rows - 1) * (size_t)ld + (size_t)vocab) * esz : 0;
}

static bool ranges_overlap(const void *p, size_t pn, const void *q, size_t qn)
{
    const uintptr_t a = (uintptr_t)p, b = (uintptr_t)q;
    return pn > 0 && qn > 0 && a < b + qn && b < a + pn;
}

/* In place.  Every thread reads chunk c of its CTA's slice (student and
 * teacher, passes 1 to 4) before it writes chunk c of the gradient (pass 4,
 * half a chunk at a time, each half read before it is written), and no
 * other thread or CTA reads that chunk.  So a gradient that IS the student
 * (or the teacher) buffer, element for element (same base, row stride and
 * element size), is safe for NONE and SUM; the fused linear path relies on
 * it.  Any other overlap (an offset, another stride, an f32 gradient over
 * 16-bit logits) lets one thread or CTA overwrite logits that another has
 * not read yet: silently wrong results, so it is refused.  MEAN refuses any
 * overlap: its redo launch reads the logits again after the first launch
 * wrote gradients. */
extern "C" int kdl_loss_grad_alias_ok(const void *g, int64_t ldg, size_t gsz, const void *x, int64_t ldx, size_t xsz,
                                      int64_t rows, int64_t vocab, int mean)
{
    if (!ranges_overlap(g, span_bytes(rows, ldg, vocab, gsz), x, span_bytes(rows, ldx, vocab, xsz))) return 1;
    return !mean && g == x && ldg == ldx && gsz == xsz;
}

/* Launch configuration of the row kernel: `clusters` clusters of C CTAs
 * (the cluster attribute when C > 1).  attr must outlive cfg. */
static cudaLaunchConfig_t row_config(int64_t clusters, int64_t C, size_t dyn, cudaStream_t stream,
                                     cudaLaunchAttribute *attr)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)(clusters * C));
    cfg.blockDim = dim3(kdl::kBlock);
    cfg.dynamicSmemBytes = dyn;
    cfg.stream = stream;
    attr->id = cudaLaunchAttributeClusterDimension;
    attr->val.clusterDim.x = (unsigned)C;
    attr->val.clusterDim.y = 1;
    attr->val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = C > 1 ? 1 : 0;
    return cfg;
}

/* Row-kernel launch: nr clusters of C CTAs; cluster k takes rows r0 + k,
 * r0 + k + nr, ... below end. */
static cudaError_t launch_rows(kdl::RowKernelFn fn, kdl::LossParams &P, int64_t r0, int64_t end, int64_t nr,
                               int64_t C, size_t dyn, cudaStream_t stream)
{
    P.row0 = r0;
    P.row_end = end;
    P.row_step = nr;
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = row_config(nr, C, dyn, stream, &attr);
    const cudaError_t e = cudaLaunchKernelEx(&cfg, fn, P);
    if (e != cudaSuccess) (void)cudaGetLastError(); /* reported by the status, as kdl::launch_ex */
    return e;
}

/* The memo entry of row kernel idx, or NULL (no memo).  The memo is the
 * handle's and holds for its device, which kdl_handle_check made sure is
 * current before this call. */
static kdl_loss_kmemo_t *memo_entry(kdl_loss_cache *cache, int idx)
{
    return cache && idx >= 0 && idx < 9 ? &cache->k[idx] : nullptr;
}

/* Can a cluster of C CTAs of this kernel and smem be resident at all?
 * Answers are memoised in km (when given); a failed query is not. */
static bool cluster_fits(kdl::RowKernelFn fn, int C, size_t dyn, cudaStream_t stream, kdl_loss_kmemo_t *km)
{
    if (km)
        for (int i = 0; i < KDL_LOSS_FIT_MEMO; ++i)
            if (km->fit[i].C == C && km->fit[i].dyn == dyn) return km->fit[i].fits != 0;
    if (C > 8 && !(km && km->nonportable)) {
        if (cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
            (void)cudaGetLastError();
            return false;
        }
        if (km) km->nonportable = 1;
    }
    cudaLaunchAttribute attr; /* C > 1 here: a cluster launch */
    const cudaLaunchConfig_t cfg = row_config(1, C, dyn, stream, &attr);
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, fn, &cfg) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    if (km) {
        const int slot = km->next_fit;
        km->next_fit = (slot + 1) % KDL_LOSS_FIT_MEMO;
        km->fit[slot].C = C;
        km->fit[slot].dyn = dyn;
        km->fit[slot].fits = n >= 1;
    }
    return n >= 1;
}

extern "C" kdl_status_t kdl_loss_launch(const kdl_loss_launch_t *L, kdl_loss_plan_t *plan_out)
{
    using namespace kdl;
    const kdl_loss_desc_t *d = L->desc;
    const kdl_loss_args_t *a = L->args;
    const int64_t N = a->rows, V = a->vocab;
    const int sdt = (int)a->student_dtype, tdt = (int)a->teacher_dtype;
    const size_t ssz = kdl_dtype_size(a->student_dtype), tsz = kdl_dtype_size(a->teacher_dtype);
    const int64_t nch_total = ceil_div64(V, kChunk);
    const size_t per_chunk = (size_t)kChunk * (ssz + tsz);

    /* A gradient may share memory with the logits only as the student (or
     * teacher) itself, and not for MEAN (kdl_loss_grad_alias_ok). */
    if (a->grad) {
        const size_t gsz = kdl_dtype_size(a->grad_dtype);
        const int mean = d->reduction == KDL_REDUCTION_MEAN;
        if (!kdl_loss_grad_alias_ok(a->grad, a->ld_grad, gsz, a->student, a->ld_student, ssz, N, V, mean) ||
            !kdl_loss_grad_alias_ok(a->grad, a->ld_grad, gsz, a->teacher, a->ld_teacher, tsz, N, V, mean))
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED,
                            mean ? "reduction MEAN: grad overlaps the student or teacher logits (in place is not "
                                   "supported)"
                                 : "grad overlaps the student or teacher logits other than as the same buffer "
                                   "(same base, row stride and dtype)");
    }

    /* ---------------------------------------------------------- plan */
    const RowKernelFn fn = row_kernel_for(sdt, tdt);
    /* kernel attributes: from the memo, else asked (and memoised) */
    kdl_loss_kmemo_t *km = memo_entry(L->cache, sdt * 3 + tdt);
    kdl_loss_kmemo_t local;
    memset(&local, 0, sizeof local);
    kdl_loss_kmemo_t &ka = km ? *km : local;
    if (!ka.have_attr) {
        cudaFuncAttributes fa;
        KDL_LAUNCH_CHECK(cudaFuncGetAttributes(&fa, fn));
        ka.static_smem = fa.sharedSizeBytes;
        ka.code_arch = fa.ptxVersion > 0 ? fa.ptxVersion : fa.binaryVersion;
        ka.have_attr = 1;
    }
    const size_t static_smem = ka.static_smem;
    size_t budget = L->smem_per_block_optin > static_smem ? L->smem_per_block_optin - static_smem : 0;
    budget &= ~(size_t)15;
    const int64_t chunks_fit = (int64_t)(budget / per_chunk); /* chunks one CTA can stage */
    /* Clusters need the device and the kernel's code to be sm_90 or newer:
     * a kernel JIT-compiled from older PTX has the single-CTA fallbacks of
     * row_barrier / peer_ptr (and traps on a cluster launch). */
    const int code_arch = ka.code_arch;
    const bool cluster_ok = L->cluster_launch && L->cc_major >= 9 && code_arch >= 90;
    const int64_t rows_nz = N > 0 ? N : 1;

    /* more CTAs per row when there are too few rows to fill the device */
    auto spread = [&](int64_t cmin, int64_t per_cta) -> int64_t {
        if (!cluster_ok) return cmin;
        int64_t want = (int64_t)L->sm_count / rows_nz;
        want = want < 8 ? want : 8;
        int64_t by_size = ceil_div64(V, per_cta);
        want = want < by_size ? want : by_size;
        return want > cmin ? want : cmin;
    };

    kdl_loss_path_t path = L->force_path;
    const int64_t cmin = chunks_fit > 0 ? ceil_div64(nch_total, chunks_fit) : (int64_t)1 << 40;
    int64_t C = 1;
    if (path == KDL_LOSS_PATH_SMEM) {
        if (cmin > 1)
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "KDL_LOSS_PATH=smem: a row of %lld needs %zu bytes, %zu fit",
                            (long long)V, (size_t)nch_total * per_chunk, budget);
    } else if (path == KDL_LOSS_PATH_CLUSTER) {
        if (!cluster_ok) return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "KDL_LOSS_PATH=cluster: no cluster launch");
        C = L->force_cluster > 0 ? L->force_cluster : (cmin > 2 ? cmin : 2);
        if (C < cmin || C > 16)
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "KDL_LOSS_PATH=cluster: cluster of %lld (needs %lld..16)",
                            (long long)C, (long long)cmin);
    } else if (path == KDL_LOSS_PATH_STREAM) {
        C = L->force_cluster > 0 ? L->force_cluster : 1;
        if ((C > 1 && !cluster_ok) || C > 16)
            return kdl_fail(KDL_STATUS_NOT_SUPPORTED, "KDL_LOSS_PATH=stream: cluster of %lld not possible",
                            (long long)C);
    } else if (cmin == 1) {
        C = spread(1, 8192);
        path = C > 1 ? KDL_LOSS_PATH_CLUSTER : KDL_LOSS_PATH_SMEM;
    } else if (cluster_ok && cmin <= 16) {
        path = KDL_LOSS_PATH_CLUSTER;
        C = spread(cmin, 8192);
    } else {
        path = KDL_LOSS_PATH_STREAM;
        C = spread(1, 16384);
    }

    /* One value for the dynamic-smem cap, whatever this call needs, so that
     * concurrent calls on other threads never lower it under each other. */
    if (budget > 48 * 1024 && ka.smem_cap != budget) {
        KDL_LAUNCH_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)budget));
        ka.smem_cap = budget;
    }
    if (C > 1) {
        const bool st = path != KDL_LOSS_PATH_STREAM;
        const size_t need = st ? (size_t)ceil_div64(nch_total, C) * per_chunk : 0;
        if (!cluster_fits(fn, (int)C, need, L->stream, km)) {
            if (L->force_path != KDL_LOSS_PATH_AUTO)
                return kdl_fail(KDL_STATUS_NOT_SUPPORTED,
                                "a cluster of %lld CTAs with %zu bytes each cannot be resident", (long long)C, need);
            /* automatic: no cluster; the whole row staged if it fits, else streamed */
            C = 1;
            path = cmin == 1 ? KDL_LOSS_PATH_SMEM : KDL_LOSS_PATH_STREAM;
        }
    }
    const bool staged = path != KDL_LOSS_PATH_STREAM;
    const int64_t chunks_per = ceil_div64(nch_total, C);
    const size_t dyn = staged ? (size_t)chunks_per * per_chunk : 0;

    /* ---------------------------------------------------- parameters */
    unsigned char *ws = (unsigned char *)L->workspace;
    unsigned long long *hdr = (unsigned long long *)ws;
    float *row_loss = (float *)(ws + kWsHeader);

    LossParams P;
    memset(&P, 0, sizeof P);
    P.s = a->student;
    P.t = a->teacher;
    P.lds = a->ld_student;
    P.ldt = a->ld_teacher;
    P.labels = a->labels;
    P.ignore_index = d->ignore_index;
    P.grad = a->grad;
    P.ldg = a->ld_grad;
    P.grad_dt = a->grad ? (int)a->grad_dtype : 0;
    P.vec_g = a->grad ? aligned16(a->grad, a->ld_grad, kdl_dtype_size(a->grad_dtype)) : 0;
    P.out_dt = (int)a->out_dtype;
    P.loss = a->loss;
    P.st_fkl = a->stat_fkl;
    P.st_rkl = a->stat_rkl;
    P.st_gh = a->stat_g_head;
    P.st_gt = a->stat_g_tail;
    P.st_wh = a->stat_w_head;
    P.st_wt = a->stat_w_tail;
    P.st_hs = a->stat_head_size;
    P.row_loss = row_loss;
    P.hdr = hdr;
    P.div = (int)d->divergence;
    P.rule = (int)d->head_rule;
    P.reduction = (int)d->reduction;
    /* clamped: a tau below ~3e-39 acts as that tau (float range); the
     * differences (v - max) they multiply are 0 at the max, so never 0 * inf */
    P.inv_tau = (float)fmin(1.0 / d->temperature, (double)FLT_MAX);
    P.k2 = (float)fmin(1.4426950408889634 / d->temperature, (double)FLT_MAX);
    P.coef = (float)(d->divergence == KDL_DIV_JSD ? d->beta : d->alpha);
    {
        /* the float element parameters, exactly as kdl_elem_params_make_f builds them */
        const kdl_elem_params_f ep = kdl_elem_params_make_f(P.div, P.coef, 0.5f, 0.5f);
        P.log_c = ep.log_c;
        P.log_1mc = ep.log_1mc;
    }
    P.scale = d->scale;
    P.tau = d->temperature;
    P.K = (unsigned long long)d->top_k;
    P.mu_fx = kdl_rs_mu_fx(d->mu);
    P.V = (int)V;
    P.chunks_per = (int)chunks_per;
    P.cluster = (int)C;
    P.vec_s = aligned16(a->student, a->ld_student, ssz);
    P.vec_t = aligned16(a->teacher, a->ld_teacher, tsz);
    P.staged = staged;
    P.need_head = d->divergence == KDL_DIV_AKL || a->stat_g_head || a->stat_g_tail || a->stat_w_head ||
                  a->stat_w_tail || a->stat_head_size;
    P.need_kl = d->divergence == KDL_DIV_AKL || a->stat_fkl || a->stat_rkl;
    P.key_mask = kdl_rs_key_mask(tdt);
    P.rounds = kdl_rs_rounds(tdt);

    /* --------------------------------------------------------- launch */
    int launches = 0;
    /* Launched with cudaLaunchKernelEx (kdl::launch_ex, one CTA), which
     * returns this launch's own status: cudaGetLastError() after a <<<>>>
     * launch would also report an unrelated earlier error left on the
     * thread (a caller's failed cudaMalloc, say) and fail the call after the
     * prep kernel was already enqueued (review R4-8). */
    const int64_t *labels = a->labels;
    const int64_t ignore = d->ignore_index;
    KDL_LAUNCH_CHECK(kdl::launch_ex(loss_prep_kernel, 1, kBlock, 0, L->stream, labels, ignore, N, hdr));
    launches++;

    const int64_t max_rows = (int64_t)0x7fffffff / C; /* gridDim.x limit */
    for (int64_t r0 = 0; r0 < N; r0 += max_rows) {
        const int64_t nr = N - r0 < max_rows ? N - r0 : max_rows;
        KDL_LAUNCH_CHECK(launch_rows(fn, P, r0, r0 + nr, nr, C, dyn, L->stream));
        launches++;
    }

    /* MEAN with a gradient: the redo launch (same plan, so the same bits up
     * to the gradient scale), a few clusters per SM looping over the rows.
     * Its CTAs leave at once unless some counted row was invalid, which
     * only the device knows by now (no host synchronisation). */
    if (a->grad && d->reduction == KDL_REDUCTION_MEAN) {
        int64_t ncl = 2 * (int64_t)(L->sm_count > 0 ? L->sm_count : 1) / C;
        if (ncl < 1) ncl = 1;
        if (ncl > N) ncl = N;
        P.redo = 1;
        KDL_LAUNCH_CHECK(launch_rows(fn, P, 0, N, ncl, C, dyn, L->stream));
        launches++;
    }

    FinalParams F;
    memset(&F, 0, sizeof F);
    F.row_loss = row_loss;
    F.hdr = hdr;
    F.rows = N;
    F.reduction = (int)d->reduction;
    F.scale = d->scale;
    F.out_dt = (int)a->out_dtype;
    F.loss = a->loss;
    F.info = a->info;
    F.valid_rows = a->valid_rows;
    KDL_LAUNCH_CHECK(kdl::launch_ex(loss_finalize_kernel, 1, kBlock, 0, L->stream, F));
    launches++;

    if (plan_out) {
        plan_out->path = path;
        plan_out->cluster = (int)C;
        plan_out->threads = kBlock;
        plan_out->smem_dynamic = dyn;
        plan_out->smem_static = static_smem;
        plan_out->launches = launches;
    }
    return KDL_STATUS_SUCCESS;
}
