/*
 * host/cli_demo.c - `kdloss demo`: every divergence (AKL with each head
 * rule) on an embedded synthetic teacher/student pair, printed as a table.
 *
 * Data, generated in code from a fixed seed (the same on every machine):
 * DEMO_ROWS rows over a DEMO_VOCAB-token vocabulary.  Each teacher row is a
 * Zipf law over a random permutation of the vocabulary (logit of the token of
 * rank r = -s log r, s in [1, 1.4) per row) plus small noise; the student is
 * a flatter, noisier copy (0.85 * teacher + noise), as a smaller model's
 * logits would be.  Logits are float32, as an LM head writes them.
 *
 * Backend: cuda when a device is present and the GPU path succeeds on the
 * first case; then every case also runs on the float64 reference and the
 * table shows the relative differences.  Otherwise (no device, or the GPU
 * path is not available) the float64 reference alone, and the first line of
 * the output says why.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_util.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ref.h"

#define CMD "demo"
#define DEMO_ROWS 8
#define DEMO_VOCAB 32000
#define DEMO_TOP_K 32
#define DEMO_SEED 0x6b646c6f73730001ull

static const char usage_text[] =
    "usage: kdloss demo [--backend auto|cpu|cuda]\n"
    "\n"
    "Every divergence (fkl rkl fkl_rkl akl jsd tvd skl srkl; akl with each head\n"
    "rule) on an embedded synthetic example: 8 rows of float32 logits over a\n"
    "32000-token Zipf-shaped vocabulary, mean reduction, temperature 1.  Prints\n"
    "the loss, the gradient's L2 norm and the time of each.  The first line says\n"
    "which backend ran: cuda when a device is present and the GPU path works (then\n"
    "every case is also checked against the float64 CPU reference and the maximum\n"
    "relative differences are printed), else the float64 CPU reference.\n"
    "--backend cpu forces the reference; --backend cuda without a device is a usage\n"
    "error (exit 2).\n";

typedef struct demo_case {
    const char *label;
    kdl_divergence_t div;
    kdl_head_rule_t rule;
} demo_case_t;

static const demo_case_t demo_cases[] = {
    {"fkl", KDL_DIV_FKL, KDL_HEAD_REFERENCE},
    {"rkl", KDL_DIV_RKL, KDL_HEAD_REFERENCE},
    {"fkl_rkl", KDL_DIV_FKL_RKL, KDL_HEAD_REFERENCE},
    {"akl (reference, mu 0.5)", KDL_DIV_AKL, KDL_HEAD_REFERENCE},
    {"akl (mass, mu 0.5)", KDL_DIV_AKL, KDL_HEAD_MASS},
    {"akl (topk, K 32)", KDL_DIV_AKL, KDL_HEAD_TOPK},
    {"jsd (beta 0.5)", KDL_DIV_JSD, KDL_HEAD_REFERENCE},
    {"tvd", KDL_DIV_TVD, KDL_HEAD_REFERENCE},
    {"skl (alpha 0.1)", KDL_DIV_SKL, KDL_HEAD_REFERENCE},
    {"srkl (alpha 0.1)", KDL_DIV_SRKL, KDL_HEAD_REFERENCE},
};
#define DEMO_NCASES (sizeof demo_cases / sizeof demo_cases[0])

/* ------------------------------------------------------------------- data */

static uint64_t demo_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double demo_uniform(uint64_t *s) { return (double)(demo_next(s) >> 11) * 0x1.0p-53; }

static double demo_normal(uint64_t *s)
{
    double u1 = demo_uniform(s), u2 = demo_uniform(s);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* One teacher/student row pair; perm is scratch of V entries. */
static void demo_row(uint64_t *rng, float *teacher, float *student, int64_t *perm, int64_t V)
{
    for (int64_t v = 0; v < V; v++) perm[v] = v;
    for (int64_t v = V - 1; v > 0; v--) { /* Fisher-Yates: token of each rank */
        int64_t k = (int64_t)(demo_next(rng) % (uint64_t)(v + 1));
        int64_t t = perm[v];
        perm[v] = perm[k];
        perm[k] = t;
    }
    double zipf_s = 1.0 + 0.4 * demo_uniform(rng);
    for (int64_t r = 0; r < V; r++)
        teacher[perm[r]] = (float)(-zipf_s * log((double)(r + 1)) + 0.25 * demo_normal(rng));
    for (int64_t v = 0; v < V; v++) student[v] = (float)(0.85 * teacher[v] + 0.6 * demo_normal(rng));
}

/* Fills teacher and student [DEMO_ROWS, DEMO_VOCAB]; -1 if out of memory. */
static int demo_data(float *teacher, float *student)
{
    int64_t *perm = (int64_t *)malloc(DEMO_VOCAB * sizeof(int64_t));
    if (!perm) return -1;
    uint64_t rng = DEMO_SEED;
    for (int64_t i = 0; i < DEMO_ROWS; i++)
        demo_row(&rng, teacher + i * DEMO_VOCAB, student + i * DEMO_VOCAB, perm, DEMO_VOCAB);
    free(perm);
    return 0;
}

/* ---------------------------------------------------------------- running */

typedef struct demo_run {
    double loss, grad_norm, ms;
    kdl_status_t status;
} demo_run_t;

typedef struct demo_ctx {
    const float *teacher, *student;
    double *grad64; /* [ROWS * VOCAB] for the reference */
    float *grad32;  /* [ROWS * VOCAB] for the GPU       */
    kdl_handle_t h; /* non-NULL when the GPU path is used */
} demo_ctx_t;

static void demo_desc(const demo_case_t *dc, kdl_loss_desc_t *d)
{
    kdl_loss_desc_init(d);
    d->divergence = dc->div;
    d->head_rule = dc->rule;
    d->top_k = DEMO_TOP_K;
    d->reduction = KDL_REDUCTION_MEAN;
}

static void demo_args(const demo_ctx_t *c, void *grad, kdl_dtype_t grad_dtype, double *loss, kdl_loss_args_t *a)
{
    kdl_loss_args_init(a);
    a->rows = DEMO_ROWS;
    a->vocab = DEMO_VOCAB;
    a->student = c->student;
    a->ld_student = DEMO_VOCAB;
    a->student_dtype = KDL_DTYPE_F32;
    a->teacher = c->teacher;
    a->ld_teacher = DEMO_VOCAB;
    a->teacher_dtype = KDL_DTYPE_F32;
    a->grad = grad;
    a->ld_grad = DEMO_VOCAB;
    a->grad_dtype = grad_dtype;
    a->out_dtype = KDL_DTYPE_F64;
    a->loss = loss;
}

/* Case dc on the GPU (gpu: c->h, float32 gradient into c->grad32) or on
 * the float64 reference (c->grad64): loss, time, and the gradient's L2 norm
 * when it succeeded. */
static demo_run_t run_case(const demo_ctx_t *c, const demo_case_t *dc, int gpu)
{
    demo_run_t r = {NAN, NAN, 0, KDL_STATUS_SUCCESS};
    kdl_loss_desc_t d;
    kdl_loss_args_t a;
    demo_desc(dc, &d);
    demo_args(c, gpu ? (void *)c->grad32 : (void *)c->grad64, gpu ? KDL_DTYPE_F32 : KDL_DTYPE_F64, &r.loss, &a);
    if (gpu) {
        r.status = kdl_cli_gpu_loss_host(c->h, &d, &a, &r.ms);
    } else {
        double t0 = kdl_cli_now();
        r.status = kdl_ref_loss_forward_backward(&d, &a);
        r.ms = 1e3 * (kdl_cli_now() - t0);
    }
    if (r.status != KDL_STATUS_SUCCESS) return r;
    double s = 0;
    for (int64_t i = 0; i < (int64_t)DEMO_ROWS * DEMO_VOCAB; i++) {
        double g = gpu ? (double)c->grad32[i] : c->grad64[i];
        s += g * g;
    }
    r.grad_norm = sqrt(s);
    return r;
}

/* max |gpu - cpu| / max |cpu| over the gradient (normwise, so tiny entries
 * do not dominate). */
static double grad_rel_diff(const demo_ctx_t *c)
{
    double dmax = 0, rmax = 0;
    for (int64_t i = 0; i < (int64_t)DEMO_ROWS * DEMO_VOCAB; i++) {
        double diff = fabs((double)c->grad32[i] - c->grad64[i]);
        if (!(diff <= dmax)) dmax = diff; /* NaN propagates */
        if (fabs(c->grad64[i]) > rmax) rmax = fabs(c->grad64[i]);
    }
    return rmax > 0 ? dmax / rmax : dmax;
}

static double rel_diff(double got, double ref)
{
    double den = fabs(ref) > 1e-300 ? fabs(ref) : 1.0;
    return fabs(got - ref) / den;
}

/* --------------------------------------------------------------- printing */

static int print_cpu_table(const demo_ctx_t *c)
{
    printf("%-24s %22s %14s %10s\n", "divergence", "loss", "|grad|_2", "cpu ms");
    for (size_t k = 0; k < DEMO_NCASES; k++) {
        demo_run_t r = run_case(c, &demo_cases[k], 0);
        if (r.status != KDL_STATUS_SUCCESS) return kdl_cli_status_error(CMD, r.status);
        printf("%-24s %22.15g %14.6e %10.2f\n", demo_cases[k].label, r.loss, r.grad_norm, r.ms);
    }
    return 0;
}

static int print_gpu_table(const demo_ctx_t *c)
{
    double worst_loss = 0, worst_grad = 0;
    printf("%-24s %20s %20s %10s %10s %9s %9s\n", "divergence", "loss (cuda)", "loss (cpu f64)", "loss rel",
           "grad rel", "cuda ms", "cpu ms");
    for (size_t k = 0; k < DEMO_NCASES; k++) {
        demo_run_t g = run_case(c, &demo_cases[k], 1);
        if (g.status != KDL_STATUS_SUCCESS) return kdl_cli_status_error(CMD, g.status);
        demo_run_t r = run_case(c, &demo_cases[k], 0);
        if (r.status != KDL_STATUS_SUCCESS) return kdl_cli_status_error(CMD, r.status);
        double dl = rel_diff(g.loss, r.loss), dg = grad_rel_diff(c);
        if (!(dl <= worst_loss)) worst_loss = dl;
        if (!(dg <= worst_grad)) worst_grad = dg;
        printf("%-24s %20.12g %20.12g %10.2e %10.2e %9.3f %9.2f\n", demo_cases[k].label, g.loss, r.loss, dl, dg,
               g.ms, r.ms);
    }
    printf("\nmax relative difference cuda vs cpu: loss %.3e, gradient %.3e (max|gpu-cpu| / max|cpu|)\n",
           worst_loss, worst_grad);
    return 0;
}

/* ---------------------------------------------------------------- backend */

/* Decides the backend: sets c->h when the GPU path works on the first case,
 * else writes the reason into why.  Returns an exit code (nonzero only when
 * --backend cuda cannot be honoured). */
static int pick_backend(demo_ctx_t *c, int backend, char *name, size_t name_len, char *why, size_t why_len)
{
    int cuda = 0;
    c->h = NULL;
    int rc = kdl_cli_pick_backend(CMD, backend, 0, NULL, &cuda);
    if (rc) return rc;
    if (!cuda) {
        snprintf(why, why_len, "float64 reference; %s",
                 backend == KDL_CLI_BACKEND_CPU ? "--backend cpu" : "no CUDA device found");
        return 0;
    }
    kdl_cli_gpu_name(name, name_len);
    kdl_status_t st = kdl_create(&c->h);
    if (st == KDL_STATUS_SUCCESS) {
        st = run_case(c, &demo_cases[0], 1).status;
        if (st != KDL_STATUS_SUCCESS) {
            kdl_destroy(c->h);
            c->h = NULL;
        }
    }
    if (st == KDL_STATUS_SUCCESS) return 0;
    if (backend == KDL_CLI_BACKEND_CUDA) return kdl_cli_status_error(CMD, st);
    const char *code = kdl_status_string(st), *colon = strchr(code, ':');
    snprintf(why, why_len, "float64 reference; the CUDA path on %s returned %.*s, fell back to the CPU", name,
             colon ? (int)(colon - code) : (int)strlen(code), code);
    return 0;
}

int kdl_cli_demo_parse(int argc, char **argv, int *backend, int *help)
{
    kdl_cli_opt_t o[] = {{"--backend", 1, NULL}};
    *backend = KDL_CLI_BACKEND_AUTO;
    int rc = kdl_cli_parse_options(CMD, argc, argv, o, 1, help);
    if (!rc && !*help && o[0].value)
        rc = kdl_cli_parse_choice(CMD, "--backend", o[0].value, kdl_cli_backend_from_name, "auto|cpu|cuda", backend);
    return rc;
}

int kdl_cli_demo(int argc, char **argv)
{
    int backend = 0, help = 0;
    kdl_cli_ignore_sigpipe();
    int rc = kdl_cli_demo_parse(argc, argv, &backend, &help);
    if (rc) return rc;
    if (help) {
        fputs(usage_text, stdout);
        return kdl_cli_finish_stdout(CMD);
    }
    const size_t n = (size_t)DEMO_ROWS * DEMO_VOCAB;
    float *teacher = (float *)malloc(n * sizeof(float)), *student = (float *)malloc(n * sizeof(float));
    demo_ctx_t c = {teacher, student, (double *)malloc(n * sizeof(double)), (float *)malloc(n * sizeof(float)), NULL};
    char name[256] = "none", why[512] = "";
    if (!teacher || !student || !c.grad64 || !c.grad32 || demo_data(teacher, student) != 0) {
        kdl_cli_error(CMD, "out of memory");
        rc = 1;
    }
    if (!rc) rc = pick_backend(&c, backend, name, sizeof name, why, sizeof why);
    if (!rc) {
        if (c.h)
            printf("backend: cuda (%s)\n", name);
        else
            printf("backend: cpu (%s)\n", why);
        printf("data: %d rows x %d-token Zipf vocabulary (float32 logits, seed %#llx), temperature 1, "
               "mean reduction; |grad|_2 of d loss / d student\n\n",
               DEMO_ROWS, DEMO_VOCAB, (unsigned long long)DEMO_SEED);
        rc = c.h ? print_gpu_table(&c) : print_cpu_table(&c);
    }
    if (c.h) kdl_destroy(c.h);
    free(teacher);
    free(student);
    free(c.grad64);
    free(c.grad32);
    if (!rc) rc = kdl_cli_finish_stdout(CMD);
    return rc;
}
