/*
 * tests/support/kdl_ext_fixtures.c - fixtures of the extension tests; see
 * kdl_ext_fixtures.h.  Linked into every test executable.
 */
#include "kdl_ext_fixtures.h"

#include <criterion/criterion.h>
#include <math.h>

#include "kdloss/kdloss_ref.h"

/* ------------------------------------------------------------------- data */

void kdl_ext_fill_normal(kdl_rng_t *g, double *x, int64_t n, double mean, double sigma)
{
    for (int64_t j = 0; j < n; j++) x[j] = mean + sigma * kdl_rng_normal(g);
}

void kdl_ext_fill_normal_f32(kdl_rng_t *g, float *x, int64_t n, double mean, double sigma)
{
    for (int64_t j = 0; j < n; j++) x[j] = (float)(mean + sigma * kdl_rng_normal(g));
}

void kdl_ext_random_normal(uint64_t seed, double *x, int64_t n, double sigma)
{
    kdl_rng_t g = {seed};
    kdl_ext_fill_normal(&g, x, n, 0.0, sigma);
}

void kdl_ext_random_normal_f32(uint64_t seed, float *x, int64_t n, double mean, double sigma)
{
    kdl_rng_t g = {seed};
    kdl_ext_fill_normal_f32(&g, x, n, mean, sigma);
}

void kdl_ext_log_softmax(const double *x, int64_t n, double tau, double *out)
{
    double mx = -INFINITY;
    for (int64_t v = 0; v < n; v++) {
        out[v] = x[v] / tau;
        if (out[v] > mx) mx = out[v];
    }
    double s = 0;
    for (int64_t v = 0; v < n; v++) s += exp(out[v] - mx);
    double lse = mx + log(s);
    for (int64_t v = 0; v < n; v++) out[v] -= lse;
}

void kdl_ext_strided_support(int64_t N, int64_t V, int64_t k, int64_t stride, int64_t *I)
{
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < k; j++) I[i * k + j] = (stride * i + j) % V;
}

void kdl_ext_topk_logprobs(double *t, int64_t k, double mass)
{
    double mx = -INFINITY, z = 0;
    for (int64_t j = 0; j < k; j++) mx = fmax(mx, t[j]);
    for (int64_t j = 0; j < k; j++) z += exp(t[j] - mx);
    for (int64_t j = 0; j < k; j++) t[j] += -mx - log(z) + log(mass);
}

void kdl_ext_logits(int64_t N, int64_t D, int64_t V, const double *H, const double *W, const double *b, double *L)
{
    for (int64_t i = 0; i < N; i++)
        for (int64_t v = 0; v < V; v++) {
            double s = b ? b[v] : 0.0;
            for (int64_t k = 0; k < D; k++) s += H[i * D + k] * W[v * D + k];
            L[i * V + v] = s;
        }
}

/* -------------------------------------------------------- argument structs */

kdl_loss_args_t kdl_ext_dense_args(int64_t N, int64_t V, const void *S, kdl_dtype_t sdt, const void *T,
                                   kdl_dtype_t tdt, double *grad, double *loss)
{
    kdl_loss_args_t a;
    kdl_loss_args_init(&a);
    a.rows = N;
    a.vocab = V;
    a.student = S;
    a.teacher = T;
    a.ld_student = a.ld_teacher = a.ld_grad = V;
    a.student_dtype = sdt;
    a.teacher_dtype = tdt;
    a.grad = grad;
    a.grad_dtype = a.out_dtype = KDL_DTYPE_F64;
    a.loss = loss;
    return a;
}

kdl_sparse_args_t kdl_ext_sparse_args(kdl_sparse_mode_t mode, int64_t N, int64_t V, int64_t k, const void *S,
                                      const int64_t *I, const void *P, double *grad, double *loss)
{
    kdl_sparse_args_t a;
    kdl_sparse_args_init(&a);
    a.mode = mode;
    a.rows = N;
    a.vocab = V;
    a.k = k;
    a.student = S;
    a.teacher_indices = I;
    a.teacher_logprobs = P;
    a.ld_student = a.ld_grad = V;
    a.ld_indices = a.ld_logprobs = k;
    a.student_dtype = a.teacher_dtype = a.grad_dtype = a.out_dtype = KDL_DTYPE_F64;
    a.grad = grad;
    a.loss = loss;
    return a;
}

kdl_fused_linear_args_t kdl_ext_fused_args(int64_t N, int64_t D, int64_t V, const void *H, const void *W,
                                           kdl_dtype_t hw_dtype, const void *T, kdl_dtype_t t_dtype, double *dH,
                                           double *dW, double *loss)
{
    kdl_fused_linear_args_t a;
    kdl_fused_linear_args_init(&a);
    a.rows = N;
    a.hidden = D;
    a.vocab = V;
    a.hidden_states = H;
    a.weight = W;
    a.teacher = T;
    a.ld_hidden = a.ld_weight = a.ld_grad_hidden = a.ld_grad_weight = D;
    a.ld_teacher = V;
    a.hidden_dtype = a.weight_dtype = hw_dtype;
    a.teacher_dtype = t_dtype;
    a.grad_hidden = dH;
    a.grad_weight = dW;
    a.grad_dtype = a.out_dtype = KDL_DTYPE_F64;
    a.loss = loss;
    return a;
}

kdl_shard_args_t kdl_ext_shard_args(int64_t N, int64_t V, int R, int r, int64_t off, int64_t width, const void *S,
                                    const void *T, kdl_dtype_t sdt, void *grad, kdl_dtype_t gdt, void *loss)
{
    const int64_t so = off * (int64_t)kdl_dtype_size(sdt);
    kdl_shard_args_t a;
    kdl_shard_args_init(&a);
    a.rows = N;
    a.vocab = V;
    a.num_shards = R;
    a.shard_rank = r;
    a.vocab_offset = off;
    a.vocab_local = width;
    a.student = (const char *)S + so;
    a.teacher = (const char *)T + so;
    a.student_dtype = a.teacher_dtype = sdt;
    a.ld_student = a.ld_teacher = a.ld_grad = V;
    a.grad = grad ? (char *)grad + off * (int64_t)kdl_dtype_size(gdt) : NULL;
    a.grad_dtype = gdt;
    a.out_dtype = KDL_DTYPE_F64;
    a.loss = loss;
    return a;
}

/* ------------------------------------------------------- reference calls */

void kdl_ext_ref_dense(const kdl_loss_desc_t *d, const kdl_loss_args_t *a, const char *what)
{
    kdl_status_t st = kdl_ref_loss_forward_backward(d, a);
    cr_assert_eq(st, KDL_STATUS_SUCCESS, "%s: dense reference: %s (%s)", what, kdl_status_string(st),
                 kdl_get_last_error());
}

void kdl_ext_ref_sparse(const kdl_loss_desc_t *d, const kdl_sparse_args_t *a, const char *what)
{
    kdl_status_t st = kdl_ref_sparse_loss(d, a);
    cr_assert_eq(st, KDL_STATUS_SUCCESS, "%s: sparse reference: %s (%s)", what, kdl_status_string(st),
                 kdl_get_last_error());
}

void kdl_ext_ref_fused(const kdl_loss_desc_t *d, const kdl_fused_linear_args_t *a, const char *what)
{
    kdl_status_t st = kdl_ref_fused_linear_loss(d, a);
    cr_assert_eq(st, KDL_STATUS_SUCCESS, "%s: fused linear reference: %s (%s)", what, kdl_status_string(st),
                 kdl_get_last_error());
}

kdl_tol_t kdl_ext_tol_rel_max(const double *ref, int64_t n, double rel)
{
    double m = 0;
    for (int64_t k = 0; k < n; k++)
        if (isfinite(ref[k])) m = fmax(m, fabs(ref[k]));
    kdl_tol_t t = {rel, rel * m + 1e-12};
    return t;
}

/* ------------------------------------------------------ device memory */

#ifdef KDL_HAVE_CUDA
void *kdl_dev_dup(const void *src, size_t bytes)
{
    if (!src) return NULL;
    void *p = NULL;
    KDL_CUDA_OK(cudaMalloc(&p, bytes ? bytes : 1));
    if (bytes) KDL_CUDA_OK(cudaMemcpy(p, src, bytes, cudaMemcpyHostToDevice));
    return p;
}

void *kdl_dev_alloc(size_t bytes, int want)
{
    if (!want) return NULL;
    void *p = NULL;
    KDL_CUDA_OK(cudaMalloc(&p, bytes ? bytes : 1));
    KDL_CUDA_OK(cudaMemset(p, 0xff, bytes ? bytes : 1));
    return p;
}

void kdl_dev_get(void *dst, const void *src, size_t bytes)
{
    if (dst && src && bytes) KDL_CUDA_OK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
#endif
