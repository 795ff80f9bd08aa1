/*
 * tests/test_bad_args.c - every public entry point against every kind of bad
 * argument, table-driven (DESIGN section 3: a specific status before any
 * work, nothing written).
 *
 * Each case mutates a valid problem in one way and names the status it must
 * get.  Outputs are pre-filled with a sentinel byte and must come back
 * untouched; the last-error detail must be set.  The valid problem itself is
 * run first and must succeed, so a case fails only because of its mutation.
 *
 * Layout.  An entry point's cases are data: an X-macro list of rows
 * X(id, "name", STATUS, path, mutation), from which CASE_FN makes one small
 * mutator per row and CASE_ROW the table.  A family_t names what the shared
 * runners need of an entry point (its valid problem, its buffers with the
 * outputs in one sentinel-filled block, the reference call, the shared
 * validator, the GPU workspace query and call); run_ref_table,
 * run_gpu_table, check_without_handle and the GPU-only runners below drive
 * every family the same way, and each prints how many cases it ran.
 *
 * Covered (counts per table in docs/hardening.md):
 *   kdl_ref_loss_forward_backward, kdl_loss_validate (same table, f64, f32
 *   and bf16 inputs); kdl_loss_workspace_size, kdl_loss_forward_backward
 *   (the table with host buffers through the GPU entry points, and on a GPU
 *   with device buffers, plus a workspace one byte too small);
 *   kdl_ref_sparse_loss, kdl_sparse_validate, kdl_sparse_check_indices,
 *   kdl_sparse_workspace_size, kdl_sparse_loss;
 *   kdl_ref_sinkhorn, kdl_sinkhorn_validate (plus non-finite costs),
 *   kdl_sinkhorn_workspace_size, kdl_sinkhorn;
 *   kdl_ref_sinkd, kdl_sinkd_validate, kdl_sinkd_workspace_size, kdl_sinkd;
 *   kdl_ref_shard_step, kdl_shard_validate, kdl_shard_sizes, kdl_shard_step;
 *   kdl_ref_fused_linear_loss, kdl_fused_linear_validate,
 *   kdl_fused_linear_workspace_size, kdl_fused_linear_loss;
 *   kdl_create, kdl_destroy, kdl_set_stream, kdl_get_stream and every GPU
 *   entry point with a NULL handle (any build); the extension workspaces
 *   one byte too small or misaligned (GPU only);
 *   kdl_status_string for every status and unknown values.
 * Each table has a reference half (f64 data for the extensions; rows marked
 * GPU skipped) and a GPU half (f32 data; rows marked REF skipped) that runs
 * through the GPU entry points with host buffers: every invalid argument is
 * refused before any launch or use of the data.  The GPU half needs a
 * handle: a real one on a device, a dummy in a build without CUDA (the
 * stubs check, then return NO_DEVICE: the valid problem must give that);
 * a CUDA build without a device skips it visibly.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ext_internal.h" /* kdl_shard_validate, the shard step check both paths share */
#include "kdl_test.h"
#include "kdloss/kdloss.h"
#include "kdloss/kdloss_ext.h"
#include "kdloss/kdloss_ref.h"

#ifdef KDL_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#define SENTINEL 0xA5

static int all_sentinel(const void *p, size_t bytes)
{
    const unsigned char *c = (const unsigned char *)p;
    for (size_t i = 0; i < bytes; i++)
        if (c[i] != SENTINEL) return 0;
    return 1;
}

/* Misaligned bases: floats one to three bytes off, int64 arrays four. */
#define MIS(p, off) ((void *)((char *)(uintptr_t)(p) + (off)))

/* ================================================================ cases */

/* Where a row runs: both halves, the reference only, the GPU entry points only. */
enum { ON_BOTH = 0, ON_REF = 1, ON_GPU = 2 };

/* The shard step's own parameters, which a row may change too (the other
 * entry points have none): the step, and NULL op or count pointers. */
typedef struct call {
    int step, null_op, null_count;
} call_t;

static const call_t plain_call = {0, 0, 0};

static int is_plain(const call_t *c) { return c->step == 0 && !c->null_op && !c->null_count; }

typedef struct bad_case {
    const char *name;
    kdl_status_t want;
    void (*mutate)(void *desc, void *args, call_t *call);
    int path;
} bad_case_t;

/* A table: #define CASE_DESC_T and CASE_ARGS_T (the descriptor and argument
 * types), CASE_PREFIX (the mutators' prefix), then LIST(CASE_FN) and
 * {LIST(CASE_ROW)}.  A row's mutation sees d, a and call. */
#define CAT_(x, y) x##y
#define CAT(x, y) CAT_(x, y)
#define CASE_FN(id, name, st, path, ...)                                                                     \
    static void CAT(CASE_PREFIX, id)(void *dv_, void *av_, call_t *call)                                     \
    {                                                                                                        \
        CASE_DESC_T *d = (CASE_DESC_T *)dv_;                                                                 \
        CASE_ARGS_T *a = (CASE_ARGS_T *)av_;                                                                 \
        (void)d;                                                                                             \
        (void)a;                                                                                             \
        __VA_ARGS__;                                                                                         \
    }
#define CASE_ROW(id, name, st, path, ...) {name, KDL_STATUS_##st, CAT(CASE_PREFIX, id), ON_##path},

/* ============================================================= families */

typedef union any_desc {
    kdl_loss_desc_t loss;
    kdl_sinkhorn_desc_t ot;
    kdl_sinkd_desc_t kd;
} any_desc_t;

typedef union any_args {
    kdl_loss_args_t loss;
    kdl_sparse_args_t sp;
    kdl_sinkhorn_args_t ot;
    kdl_sinkd_args_t kd;
    kdl_fused_linear_args_t fl;
    kdl_shard_args_t sh;
} any_args_t;

/* One entry point (reference and GPU) and its table.  The buffers are one
 * struct whose member `out` holds every output; `setting` picks one of the
 * valid problems the table runs over (names NULL-terminated). */
typedef struct family {
    const char *name;
    const bad_case_t *cases;
    size_t ncases;
    const char *const *ref_settings, *const *gpu_settings;
    size_t bufs_bytes, out_off, out_bytes;
    /* the inputs of the valid problem (f64 for the reference, f32 on the GPU path) */
    void (*data)(void *b, int setting, int gpu);
    /* the valid problem over the buffers at b, which it only takes addresses in
     * (b may be a device copy) */
    void (*bind)(void *b, int setting, int gpu, void *d, void *a);
    kdl_status_t (*ref)(const void *d, const void *a, void *b, const call_t *call);
    kdl_status_t (*validate)(const void *d, const void *a, int allow_f64);
    kdl_status_t (*ws_size)(kdl_handle_t h, const void *d, const void *a, size_t *bytes); /* NULL: none */
    kdl_status_t (*run)(kdl_handle_t h, const void *d, const void *a, void *b, const call_t *call, void *ws,
                        size_t ws_bytes);
} family_t;

#define FAMILY_CASES(table) .cases = (table), .ncases = sizeof(table) / sizeof((table)[0])
#define FAMILY_BUFS(T) .bufs_bytes = sizeof(T), .out_off = offsetof(T, out), .out_bytes = sizeof(((T *)0)->out)
/* The family of prefix p: its table p##_cases, buffers p##_bufs_t and
 * functions p##_data, _bind, _ref, _validate, _run; ws_size NULL or
 * p##_ws_size. */
#define DEFINE_FAMILY(var, label, p, ref_s, gpu_s, ws)                                                       \
    static const family_t var = {.name = (label), FAMILY_CASES(p##_cases), FAMILY_BUFS(p##_bufs_t),          \
                                 .ref_settings = (ref_s), .gpu_settings = (gpu_s), .data = p##_data,         \
                                 .bind = p##_bind, .ref = p##_ref, .validate = p##_validate, .ws_size = (ws), \
                                 .run = p##_run}
/* The adapters of an entry point with the usual signatures. */
#define FAMILY_CALLS(p, REF, VALIDATE, WS_SIZE, RUN)                                                         \
    static kdl_status_t p##_ref(const void *d, const void *a, void *b, const call_t *call)                   \
    {                                                                                                        \
        return REF(d, a);                                                                                    \
    }                                                                                                        \
    static kdl_status_t p##_validate(const void *d, const void *a, int allow_f64)                            \
    {                                                                                                        \
        return VALIDATE(d, a, allow_f64);                                                                    \
    }                                                                                                        \
    static kdl_status_t p##_ws_size(kdl_handle_t h, const void *d, const void *a, size_t *bytes)             \
    {                                                                                                        \
        return WS_SIZE(h, d, a, bytes);                                                                      \
    }                                                                                                        \
    static kdl_status_t p##_run(kdl_handle_t h, const void *d, const void *a, void *b, const call_t *call,   \
                                void *ws, size_t ws_bytes)                                                   \
    {                                                                                                        \
        return RUN(h, d, a, ws, ws_bytes);                                                                   \
    }

/* Typed views of the void pointers a family's functions get. */
#define BUFS_AS(T) T *b = (T *)bv
#define PROBLEM_AS(D, A)                                                                                     \
    D *d = (D *)dv;                                                                                          \
    A *a = (A *)av
/* The data of the valid problems: f64 on the reference, f32 on the GPU path. */
#define DATA_DTYPE(gpu) ((gpu) ? KDL_DTYPE_F32 : KDL_DTYPE_F64)

/* The one valid problem of most tables: f64 data on the reference, f32 on the GPU path. */
static const char *const ref_f64[] = {"f64", NULL}, *const gpu_f32[] = {"f32", NULL};

static void *bufs_new(const family_t *f)
{
    void *b = calloc(1, f->bufs_bytes);
    cr_assert_not_null(b);
    return b;
}

static void outs_fill(const family_t *f, void *b) { memset((char *)b + f->out_off, SENTINEL, f->out_bytes); }

static int outs_untouched(const family_t *f, const void *b)
{
    return all_sentinel((const char *)b + f->out_off, f->out_bytes);
}

/* The valid problem of a setting over host buffers, outputs sentinel-filled. */
static void valid_problem(const family_t *f, void *b, int setting, int gpu, any_desc_t *d, any_args_t *a)
{
    f->data(b, setting, gpu);
    f->bind(b, setting, gpu, d, a);
    outs_fill(f, b);
}

/* ------------------------------------------------------ the GPU handle */
/*
 * The tables also run through the GPU entry points, with host buffers: an
 * invalid argument is refused before any launch or any use of the data, so
 * nothing is read or written on any build.  The handle: a real one on a
 * device; in a build without CUDA a dummy (the stubs check the arguments
 * first, then return NO_DEVICE without touching it, so the valid problem
 * must give NO_DEVICE); a CUDA build without a device cannot create one and
 * skips visibly (the NULL-handle checks in
 * gpu_entry_points_without_a_handle run there).
 */
typedef struct gpu_ctx {
    kdl_handle_t h;
    int device;
    void *ws; /* a 16-byte aligned workspace (device memory on a device) */
    size_t ws_bytes;
} gpu_ctx_t;

#ifndef KDL_HAVE_CUDA
static _Alignas(16) unsigned char dummy_handle_storage[64];
#endif

static void gpu_ctx_open(gpu_ctx_t *g)
{
    memset(g, 0, sizeof *g);
    if (kdl_test_have_gpu()) {
#ifdef KDL_HAVE_CUDA
        cr_assert_eq(kdl_create(&g->h), KDL_STATUS_SUCCESS);
        g->device = 1;
        g->ws_bytes = 64u << 20;
        cr_assert_eq(cudaMalloc(&g->ws, g->ws_bytes), cudaSuccess);
        return;
#endif
    }
#ifndef KDL_HAVE_CUDA
    g->h = (kdl_handle_t)(void *)dummy_handle_storage;
    g->ws = dummy_handle_storage;
    g->ws_bytes = sizeof dummy_handle_storage;
#else
    cr_skip_test("no CUDA device: kdl_create gives no handle here, so the GPU entry points stop at the "
                 "handle (see gpu_entry_points_without_a_handle); a build without CUDA runs this table "
                 "through the stubs");
#endif
}

static void gpu_ctx_close(gpu_ctx_t *g)
{
#ifdef KDL_HAVE_CUDA
    if (g->device) {
        cr_expect_eq(cudaDeviceSynchronize(), cudaSuccess);
        cudaFree(g->ws);
        kdl_destroy(g->h);
    }
#endif
    memset(g, 0, sizeof *g);
}

/* What the valid problem gives through a GPU entry point: checked, then
 * NO_DEVICE on the stubs; on a device it is not run (host buffers), only
 * the shared validator is asked. */
#define GPU_VALID_EXPECT(g, call, what)                                                                      \
    do {                                                                                                     \
        if (!(g)->device) {                                                                                  \
            kdl_status_t st_ = (call);                                                                       \
            cr_expect_eq(st_, KDL_STATUS_NO_DEVICE, "%s, valid problem: got %s (%s)", (what),                \
                         kdl_status_string(st_), kdl_get_last_error());                                      \
        }                                                                                                    \
    } while (0)

/* ============================================================= runners */

/* The reference half: for every setting, the valid problem succeeds; each
 * row not marked GPU gets its status, a last-error detail, no output
 * written, and the validator (f64 allowed) agrees; then NULL descriptor,
 * arguments, both.  Returns the cases run. */
static int run_ref_table(const family_t *f)
{
    void *b = bufs_new(f);
    any_desc_t d;
    any_args_t a;
    int n = 0;
    for (int s = 0; f->ref_settings[s]; s++) {
        const char *sn = f->ref_settings[s];
        valid_problem(f, b, s, 0, &d, &a);
        cr_assert_eq(f->ref(&d, &a, b, &plain_call), KDL_STATUS_SUCCESS, "%s %s: the valid problem fails: %s",
                     f->name, sn, kdl_get_last_error());
        for (size_t c = 0; c < f->ncases; c++) {
            const bad_case_t *k = &f->cases[c];
            if (k->path == ON_GPU) continue;
            call_t call = plain_call;
            valid_problem(f, b, s, 0, &d, &a);
            k->mutate(&d, &a, &call);
            kdl_status_t st = f->ref(&d, &a, b, &call);
            cr_expect_eq(st, k->want, "%s %s [%s]: got %s (%s), want %s", f->name, sn, k->name,
                         kdl_status_string(st), kdl_get_last_error(), kdl_status_string(k->want));
            cr_expect(kdl_get_last_error()[0] != '\0', "%s [%s]: no last-error detail", f->name, k->name);
            cr_expect(outs_untouched(f, b), "%s %s [%s]: an output was written", f->name, sn, k->name);
            if (is_plain(&call))
                cr_expect_eq(f->validate(&d, &a, 1), k->want, "%s [%s]: the validator disagrees", f->name, k->name);
            n++;
        }
    }
    valid_problem(f, b, 0, 0, &d, &a);
    cr_expect_eq(f->ref(NULL, NULL, b, &plain_call), KDL_STATUS_NULL_POINTER, "%s: NULL desc and args", f->name);
    cr_expect_eq(f->ref(NULL, &a, b, &plain_call), KDL_STATUS_NULL_POINTER, "%s: NULL desc", f->name);
    cr_expect_eq(f->ref(&d, NULL, b, &plain_call), KDL_STATUS_NULL_POINTER, "%s: NULL args", f->name);
    cr_expect(outs_untouched(f, b), "%s: a NULL call wrote an output", f->name);
    free(b);
    cr_log_info("%s reference: %d cases", f->name, n);
    return n;
}

/* NULL bytes, descriptor or arguments through the GPU entry points of f,
 * with a handle: NULL_POINTER, *bytes untouched. */
static void check_null_calls(const family_t *f, const gpu_ctx_t *g, void *b, const any_desc_t *d,
                             const any_args_t *a)
{
    size_t bytes = 12345;
    if (f->ws_size) {
        cr_expect_eq(f->ws_size(g->h, d, a, NULL), KDL_STATUS_NULL_POINTER, "%s: NULL bytes", f->name);
        cr_expect_eq(f->ws_size(g->h, NULL, a, &bytes), KDL_STATUS_NULL_POINTER, "%s workspace: NULL desc", f->name);
        cr_expect_eq(f->ws_size(g->h, d, NULL, &bytes), KDL_STATUS_NULL_POINTER, "%s workspace: NULL args", f->name);
        cr_expect_eq(bytes, 12345, "%s: a NULL workspace query wrote *bytes", f->name);
    }
    cr_expect_eq(f->run(g->h, NULL, a, b, &plain_call, g->ws, g->ws_bytes), KDL_STATUS_NULL_POINTER,
                 "%s: NULL desc", f->name);
    cr_expect_eq(f->run(g->h, d, NULL, b, &plain_call, g->ws, g->ws_bytes), KDL_STATUS_NULL_POINTER,
                 "%s: NULL args", f->name);
    cr_expect_eq(kdl_get_stream(g->h, NULL), KDL_STATUS_NULL_POINTER);
}

/* One row through the GPU entry points of f: the workspace query (which
 * leaves *bytes alone) and the call give the row's status. */
static void expect_gpu_status(const family_t *f, const gpu_ctx_t *g, const bad_case_t *k, const char *sn,
                              const any_desc_t *d, const any_args_t *a, void *b, const call_t *call)
{
    kdl_status_t st;
    if (f->ws_size) {
        size_t bytes = 12345;
        st = f->ws_size(g->h, d, a, &bytes);
        cr_expect_eq(st, k->want, "%s workspace %s [%s]: got %s (%s)", f->name, sn, k->name, kdl_status_string(st),
                     kdl_get_last_error());
        cr_expect_eq(bytes, 12345, "%s workspace [%s] wrote *bytes", f->name, k->name);
    }
    st = f->run(g->h, d, a, b, call, g->ws, g->ws_bytes);
    cr_expect_eq(st, k->want, "%s %s [%s]: got %s (%s)", f->name, sn, k->name, kdl_status_string(st),
                 kdl_get_last_error());
}

/* The GPU half, host buffers: for every setting, the valid problem passes
 * the validator (and gives NO_DEVICE on the stubs); each row not marked REF
 * gets its status from the workspace query (which leaves *bytes alone) and
 * from the call, no output written, and the validator (no f64) agrees; then
 * NULL bytes, descriptor and arguments.  Returns the cases run. */
static int run_gpu_table(const family_t *f)
{
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    void *b = bufs_new(f);
    any_desc_t d;
    any_args_t a;
    size_t bytes = 12345;
    int n = 0;
    for (int s = 0; f->gpu_settings[s]; s++) {
        const char *sn = f->gpu_settings[s];
        valid_problem(f, b, s, 1, &d, &a);
        cr_assert_eq(f->validate(&d, &a, 0), KDL_STATUS_SUCCESS, "%s %s: %s", f->name, sn, kdl_get_last_error());
        if (f->ws_size) GPU_VALID_EXPECT(&g, f->ws_size(g.h, &d, &a, &bytes), f->name);
        GPU_VALID_EXPECT(&g, f->run(g.h, &d, &a, b, &plain_call, g.ws, g.ws_bytes), f->name);
        cr_expect(outs_untouched(f, b) && bytes == 12345, "%s %s, valid problem: something was written", f->name,
                  sn);
        for (size_t c = 0; c < f->ncases; c++) {
            const bad_case_t *k = &f->cases[c];
            if (k->path == ON_REF) continue;
            call_t call = plain_call;
            valid_problem(f, b, s, 1, &d, &a);
            k->mutate(&d, &a, &call);
            expect_gpu_status(f, &g, k, sn, &d, &a, b, &call);
            cr_expect(outs_untouched(f, b), "%s %s [%s]: an output was written", f->name, sn, k->name);
            if (is_plain(&call))
                cr_expect_eq(f->validate(&d, &a, 0), k->want, "%s [%s]: the validator disagrees", f->name, k->name);
            n++;
        }
    }
    valid_problem(f, b, 0, 1, &d, &a);
    check_null_calls(f, &g, b, &d, &a);
    cr_expect(outs_untouched(f, b), "%s: a NULL call wrote an output", f->name);
    free(b);
    gpu_ctx_close(&g);
    cr_log_info("%s GPU entry points: %d cases", f->name, n);
    return n;
}

/* Every GPU entry point of a family with a NULL handle (the only one a build
 * without a device can have: kdl_create gives NULL and NO_DEVICE):
 * NULL_POINTER, nothing written, *bytes untouched; any build.  Returns the
 * calls checked. */
static int check_without_handle(const family_t *f)
{
    void *b = bufs_new(f);
    any_desc_t d;
    any_args_t a;
    valid_problem(f, b, 0, 1, &d, &a);
    size_t bytes = 12345;
    int n = 0;
    kdl_status_t st;
    if (f->ws_size) {
        st = f->ws_size(NULL, &d, &a, &bytes);
        cr_expect_eq(st, KDL_STATUS_NULL_POINTER, "%s workspace, no handle: got %s", f->name, kdl_status_string(st));
        n++;
    }
    st = f->run(NULL, &d, &a, b, &plain_call, NULL, 0);
    cr_expect_eq(st, KDL_STATUS_NULL_POINTER, "%s, no handle: got %s", f->name, kdl_status_string(st));
    st = f->run(NULL, NULL, NULL, b, &plain_call, NULL, 0);
    cr_expect_eq(st, KDL_STATUS_NULL_POINTER, "%s, nothing given: got %s", f->name, kdl_status_string(st));
    n++;
    cr_expect(outs_untouched(f, b) && bytes == 12345, "%s, no handle: something was written", f->name);
    free(b);
    return n;
}

#ifdef KDL_HAVE_CUDA
/* A workspace one byte smaller than queried: WORKSPACE_TOO_SMALL; one 8
 * bytes off its 16-byte alignment: BAD_PARAM; nothing written (host
 * buffers: refused before any launch). */
static void check_workspace_too_small(const family_t *f, const gpu_ctx_t *g)
{
    void *b = bufs_new(f);
    any_desc_t d;
    any_args_t a;
    valid_problem(f, b, 0, 1, &d, &a);
    size_t need = 0;
    cr_assert_eq(f->ws_size(g->h, &d, &a, &need), KDL_STATUS_SUCCESS, "%s: %s", f->name, kdl_get_last_error());
    cr_assert(need + 16 <= g->ws_bytes);
    if (need > 0) {
        char *ws = (char *)g->ws;
        kdl_status_t st = f->run(g->h, &d, &a, b, &plain_call, ws, need - 1);
        cr_expect_eq(st, KDL_STATUS_WORKSPACE_TOO_SMALL, "%s: got %s", f->name, kdl_status_string(st));
        st = f->run(g->h, &d, &a, b, &plain_call, ws + 8, need);
        cr_expect_eq(st, KDL_STATUS_BAD_PARAM, "%s, workspace + 8: got %s", f->name, kdl_status_string(st));
    } else {
        cr_log_warn("%s needs no workspace: WORKSPACE_TOO_SMALL not reachable", f->name);
    }
    cr_expect_eq(cudaDeviceSynchronize(), cudaSuccess);
    cr_expect(outs_untouched(f, b), "%s: an output was written", f->name);
    free(b);
}

/* A device copy of the buffers b: inputs as they are, outputs sentinel. */
static void *dev_copy(const family_t *f, const void *b)
{
    void *dv = NULL;
    cr_assert_eq(cudaMalloc(&dv, f->bufs_bytes), cudaSuccess);
    cr_assert_eq(cudaMemcpy(dv, b, f->bufs_bytes, cudaMemcpyHostToDevice), cudaSuccess);
    return dv;
}

static int dev_untouched(const family_t *f, const void *dv)
{
    unsigned char *h = (unsigned char *)malloc(f->out_bytes);
    cr_assert_eq(cudaMemcpy(h, (const char *)dv + f->out_off, f->out_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    int ok = all_sentinel(h, f->out_bytes);
    free(h);
    return ok;
}

/* The GPU half with device buffers (a device is present): the valid problem
 * runs; each row not marked REF gets its status from the query and the
 * call, and no device output is written. */
static int run_device_table(const family_t *f)
{
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    void *b = bufs_new(f);
    any_desc_t d;
    any_args_t a;
    valid_problem(f, b, 0, 1, &d, &a);
    void *dv = dev_copy(f, b);
    f->bind(dv, 0, 1, &d, &a);
    size_t need = 0;
    cr_assert_eq(f->ws_size(g.h, &d, &a, &need), KDL_STATUS_SUCCESS, "%s: %s", f->name, kdl_get_last_error());
    cr_assert(need <= g.ws_bytes);
    cr_assert_eq(f->run(g.h, &d, &a, dv, &plain_call, g.ws, g.ws_bytes), KDL_STATUS_SUCCESS,
                 "%s: the valid problem fails: %s", f->name, kdl_get_last_error());
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    cudaFree(dv);
    int n = 0;
    for (size_t c = 0; c < f->ncases; c++) {
        const bad_case_t *k = &f->cases[c];
        if (k->path == ON_REF) continue;
        call_t call = plain_call;
        dv = dev_copy(f, b);
        f->bind(dv, 0, 1, &d, &a);
        k->mutate(&d, &a, &call);
        expect_gpu_status(f, &g, k, "device", &d, &a, dv, &call);
        cr_expect_eq(cudaDeviceSynchronize(), cudaSuccess, "%s", k->name);
        cr_expect(dev_untouched(f, dv), "%s [%s]: a device output was written", f->name, k->name);
        cudaFree(dv);
        n++;
    }
    dv = dev_copy(f, b);
    f->bind(dv, 0, 1, &d, &a);
    check_null_calls(f, &g, dv, &d, &a);
    cr_expect(dev_untouched(f, dv), "%s: a NULL call wrote a device output", f->name);
    cudaFree(dv);
    free(b);
    gpu_ctx_close(&g);
    cr_log_info("%s GPU entry points, device buffers: %d cases", f->name, n);
    return n;
}
#endif

/* ================================================================= loss */

enum { LN = 3, LV = 7, LLD = 9 };

#define CASE_DESC_T kdl_loss_desc_t
#define CASE_ARGS_T kdl_loss_args_t
#define CASE_PREFIX lm_
#define LOSS_CASES(X) \
    X(null_student, "student NULL", NULL_POINTER, BOTH, a->student = NULL) \
    X(null_teacher, "teacher NULL", NULL_POINTER, BOTH, a->teacher = NULL) \
    X(null_loss, "loss NULL (mean)", NULL_POINTER, BOTH, a->loss = NULL) \
    X(null_loss_none, "loss NULL (none, rows > 0)", NULL_POINTER, BOTH, d->reduction = KDL_REDUCTION_NONE; a->loss = NULL) \
    X(rows_neg, "rows -1", BAD_SIZE, BOTH, a->rows = -1) \
    X(rows_min, "rows INT64_MIN", BAD_SIZE, BOTH, a->rows = INT64_MIN) \
    X(vocab_zero, "vocab 0", BAD_SIZE, BOTH, a->vocab = 0) \
    X(vocab_neg, "vocab -5", BAD_SIZE, BOTH, a->vocab = -5) \
    X(ld_s_small, "ld_student V-1", BAD_STRIDE, BOTH, a->ld_student = a->vocab - 1) \
    X(ld_s_zero, "ld_student 0", BAD_STRIDE, BOTH, a->ld_student = 0) \
    X(ld_s_neg, "ld_student < 0", BAD_STRIDE, BOTH, a->ld_student = -LLD) \
    X(ld_t_small, "ld_teacher V-1", BAD_STRIDE, BOTH, a->ld_teacher = a->vocab - 1) \
    X(ld_g_small, "ld_grad 1", BAD_STRIDE, BOTH, a->ld_grad = 1) \
    X(tau_zero, "tau 0", BAD_TEMPERATURE, BOTH, d->temperature = 0) \
    X(tau_negzero, "tau -0", BAD_TEMPERATURE, BOTH, d->temperature = -0.0) \
    X(tau_neg, "tau -2", BAD_TEMPERATURE, BOTH, d->temperature = -2) \
    X(tau_nan, "tau NaN", BAD_TEMPERATURE, BOTH, d->temperature = NAN) \
    X(tau_inf, "tau inf", BAD_TEMPERATURE, BOTH, d->temperature = INFINITY) \
    X(tau_ninf, "tau -inf", BAD_TEMPERATURE, BOTH, d->temperature = -INFINITY) \
    X(scale_nan, "scale NaN", BAD_SCALE, BOTH, d->scale = NAN) \
    X(scale_inf, "scale inf", BAD_SCALE, BOTH, d->scale = INFINITY) \
    X(scale_ninf, "scale -inf", BAD_SCALE, BOTH, d->scale = -INFINITY) \
    X(alpha_one, "alpha 1", BAD_ALPHA, BOTH, d->alpha = 1) \
    X(alpha_neg, "alpha < 0", BAD_ALPHA, BOTH, d->alpha = -1e-300) \
    X(alpha_nan, "alpha NaN", BAD_ALPHA, BOTH, d->alpha = NAN) \
    X(alpha_inf, "alpha inf", BAD_ALPHA, BOTH, d->alpha = INFINITY) \
    X(beta_zero, "beta 0", BAD_BETA, BOTH, d->beta = 0) \
    X(beta_one, "beta 1", BAD_BETA, BOTH, d->beta = 1) \
    X(beta_nan, "beta NaN", BAD_BETA, BOTH, d->beta = NAN) \
    X(beta_ninf, "beta -inf", BAD_BETA, BOTH, d->beta = -INFINITY) \
    X(mu_zero, "mu 0", BAD_MU, BOTH, d->mu = 0) \
    X(mu_one, "mu 1", BAD_MU, BOTH, d->mu = 1) \
    X(mu_nan, "mu NaN", BAD_MU, BOTH, d->mu = NAN) \
    X(mu_inf, "mu inf", BAD_MU, BOTH, d->mu = INFINITY) \
    X(topk_zero, "top_k 0", BAD_TOP_K, BOTH, d->top_k = 0) \
    X(topk_neg, "top_k -1", BAD_TOP_K, BOTH, d->top_k = -1) \
    X(topk_big, "top_k V+1", BAD_TOP_K, BOTH, d->top_k = a->vocab + 1) \
    X(topk_max, "top_k INT64_MAX", BAD_TOP_K, BOTH, d->top_k = INT64_MAX) \
    X(div_count, "divergence COUNT_", BAD_ENUM, BOTH, d->divergence = KDL_DIV_COUNT_) \
    X(div_neg, "divergence -1", BAD_ENUM, BOTH, d->divergence = (kdl_divergence_t)-1) \
    X(rule_count, "head rule COUNT_", BAD_ENUM, BOTH, d->head_rule = KDL_HEAD_COUNT_) \
    X(red_count, "reduction COUNT_", BAD_ENUM, BOTH, d->reduction = KDL_REDUCTION_COUNT_) \
    X(red_neg, "reduction -7", BAD_ENUM, BOTH, d->reduction = (kdl_reduction_t)-7) \
    X(sdt_bad, "student dtype 4", BAD_ENUM, BOTH, a->student_dtype = (kdl_dtype_t)4) \
    X(tdt_bad, "teacher dtype 99", BAD_ENUM, BOTH, a->teacher_dtype = (kdl_dtype_t)99) \
    X(gdt_bad, "grad dtype -1", BAD_ENUM, BOTH, a->grad_dtype = (kdl_dtype_t)-1) \
    X(odt_bad, "out dtype 7", BAD_ENUM, BOTH, a->out_dtype = (kdl_dtype_t)7) \
    X(odt_f16, "out dtype f16", NOT_SUPPORTED, BOTH, a->out_dtype = KDL_DTYPE_F16) \
    X(odt_bf16, "out dtype bf16", NOT_SUPPORTED, BOTH, a->out_dtype = KDL_DTYPE_BF16) \
    /* grad dtype neither the student's nor f32 (nor f64 on the reference) */ \
    X(gdt_other, "grad dtype other", NOT_SUPPORTED, BOTH, \
      a->grad_dtype = a->student_dtype == KDL_DTYPE_BF16 ? KDL_DTYPE_F16 : KDL_DTYPE_BF16) \
    X(dsize_zero, "desc struct_size 0", BAD_STRUCT_SIZE, BOTH, d->struct_size = 0) \
    X(dsize_big, "desc struct_size +8", BAD_STRUCT_SIZE, BOTH, d->struct_size = sizeof *d + 8) \
    X(asize_zero, "args struct_size 0", BAD_STRUCT_SIZE, BOTH, a->struct_size = 0) \
    X(asize_small, "args struct_size -8", BAD_STRUCT_SIZE, BOTH, a->struct_size = sizeof *a - 8) \
    X(ovf_rows, "rows x ld overflows int64", SIZE_OVERFLOW, BOTH, a->rows = INT64_MAX / 4; a->ld_student = a->ld_teacher = a->ld_grad = 1 << 20) \
    X(ovf_ld, "ld_student INT64_MAX", SIZE_OVERFLOW, BOTH, a->ld_student = INT64_MAX) \
    X(ovf_ld_grad, "ld_grad INT64_MAX/2", SIZE_OVERFLOW, BOTH, a->ld_grad = INT64_MAX / 2) \
    /* (rows-1)*ld + V fits int64; the byte count (4- and 8-byte types) or the per-row */ \
    /* outputs (rows * 8 bytes) do not fit size_t */ \
    X(ovf_bytes, "bytes overflow size_t", SIZE_OVERFLOW, BOTH, \
      a->rows = INT64_MAX - 10; a->vocab = 1; a->ld_student = a->ld_teacher = a->ld_grad = 1; d->top_k = 1) \
    X(ovf_vocab, "vocab INT64_MAX", SIZE_OVERFLOW, BOTH, a->vocab = INT64_MAX; a->ld_student = a->ld_teacher = a->ld_grad = INT64_MAX) \
    X(mis_student, "student misaligned", MISALIGNED, BOTH, a->student = MIS(a->student, 1)) \
    X(mis_teacher, "teacher misaligned", MISALIGNED, BOTH, a->teacher = MIS(a->teacher, 1)) \
    X(mis_grad, "grad misaligned", MISALIGNED, BOTH, a->grad = MIS(a->grad, 1)) \
    X(mis_loss, "loss misaligned", MISALIGNED, BOTH, a->loss = MIS(a->loss, 1)) \
    X(mis_labels, "labels misaligned", MISALIGNED, BOTH, a->labels = MIS(a->labels, 4)) \
    X(mis_stat, "stat_w_tail misaligned", MISALIGNED, BOTH, a->stat_w_tail = MIS(a->stat_w_tail, 1)) \
    X(mis_hs, "stat_head_size misaligned", MISALIGNED, BOTH, a->stat_head_size = MIS(a->stat_head_size, 4)) \
    X(mis_info, "info misaligned", MISALIGNED, BOTH, a->info = MIS(a->info, 4)) \
    X(mis_valid, "valid_rows misaligned", MISALIGNED, BOTH, a->valid_rows = MIS(a->valid_rows, 1)) \
    X(f64_gpu, "f64 logits on the GPU", NOT_SUPPORTED, GPU, a->student_dtype = a->teacher_dtype = KDL_DTYPE_F64)
LOSS_CASES(CASE_FN)
static const bad_case_t loss_cases[] = {LOSS_CASES(CASE_ROW)};
#undef CASE_DESC_T
#undef CASE_ARGS_T
#undef CASE_PREFIX

typedef struct loss_bufs {
    struct {
        double loss[LN], grad[LN * LLD], stat[6][LN];
        int64_t hs[LN], info, valid;
    } out;
    double s[LN * LLD], t[LN * LLD]; /* room for any dtype */
    int64_t labels[LN];
} loss_bufs_t;

/* Input and output dtypes of the reference settings; the GPU path's is f32. */
static const char *const loss_ref_settings[] = {"f64", "f32", "bf16", NULL};
static const char *const loss_gpu_settings[] = {"f32", NULL};
static const kdl_dtype_t loss_dtypes[3][2] = {
    {KDL_DTYPE_F64, KDL_DTYPE_F64}, {KDL_DTYPE_F32, KDL_DTYPE_F32}, {KDL_DTYPE_BF16, KDL_DTYPE_F32}};
#define LOSS_DT(setting, gpu, k) loss_dtypes[(gpu) ? 1 : (setting)][k]

static void loss_data(void *bv, int setting, int gpu)
{
    BUFS_AS(loss_bufs_t);
    double x[LN * LLD], y[LN * LLD];
    kdl_rng_t r = {77};
    kdl_fill_logits(&r, x, LN * LLD, 2.0);
    kdl_fill_logits(&r, y, LN * LLD, 2.0);
    kdl_to_dtype(x, b->s, LOSS_DT(setting, gpu, 0), LN * LLD);
    kdl_to_dtype(y, b->t, LOSS_DT(setting, gpu, 0), LN * LLD);
    const int64_t labels[LN] = {1, -100, 4};
    memcpy(b->labels, labels, sizeof labels);
}

/* AKL (reads every descriptor field), reduction NONE, every optional
 * output, strides > V, labels. */
static void loss_bind(void *bv, int setting, int gpu, void *dv, void *av)
{
    BUFS_AS(loss_bufs_t);
    PROBLEM_AS(kdl_loss_desc_t, kdl_loss_args_t);
    kdl_loss_desc_init(d);
    d->divergence = KDL_DIV_AKL;
    d->reduction = KDL_REDUCTION_NONE;
    d->top_k = 2;
    kdl_loss_args_init(a);
    a->rows = LN, a->vocab = LV;
    a->ld_student = a->ld_teacher = a->ld_grad = LLD;
    a->student_dtype = a->teacher_dtype = LOSS_DT(setting, gpu, 0);
    a->grad_dtype = a->out_dtype = LOSS_DT(setting, gpu, 1);
    a->student = b->s, a->teacher = b->t, a->labels = b->labels;
    a->grad = b->out.grad, a->loss = b->out.loss, a->stat_head_size = b->out.hs;
    a->info = &b->out.info, a->valid_rows = &b->out.valid;
    void **stats[6] = {&a->stat_fkl, &a->stat_rkl, &a->stat_g_head, &a->stat_g_tail, &a->stat_w_head, &a->stat_w_tail};
    for (int k = 0; k < 6; k++) *stats[k] = b->out.stat[k];
}

FAMILY_CALLS(loss, kdl_ref_loss_forward_backward, kdl_loss_validate, kdl_loss_workspace_size, kdl_loss_forward_backward)

DEFINE_FAMILY(loss_family, "loss", loss, loss_ref_settings, loss_gpu_settings, loss_ws_size);

Test(bad_args, ref_loss_table) { run_ref_table(&loss_family); }

/* Rows 0 is an empty batch, not an error: SUCCESS, with NULL inputs allowed,
 * and nothing but the counters written. */
Test(bad_args, ref_loss_empty_batch_is_not_an_error)
{
    loss_bufs_t b;
    any_desc_t d;
    any_args_t a;
    valid_problem(&loss_family, &b, 1, 0, &d, &a);
    a.loss.rows = 0;
    a.loss.student = a.loss.teacher = NULL;
    a.loss.loss = NULL; /* allowed for NONE with no rows */
    cr_expect_eq(kdl_ref_loss_forward_backward(&d.loss, &a.loss), KDL_STATUS_SUCCESS, "%s", kdl_get_last_error());
    cr_expect(all_sentinel(b.out.grad, sizeof b.out.grad));
}

Test(bad_args, gpu_loss_entry_points_check_first) { run_gpu_table(&loss_family); }

/* The table on a GPU, with device buffers. */
Test(bad_args, gpu_loss_table)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    run_device_table(&loss_family);
#endif
}

/* A workspace one byte smaller than queried (and NULL with a non-zero
 * size): KDL_STATUS_WORKSPACE_TOO_SMALL, nothing written.  Looks for a
 * configuration that needs a workspace; says so when none does. */
Test(bad_args, gpu_workspace_too_small)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    loss_bufs_t b;
    any_desc_t d;
    any_args_t a;
    valid_problem(&loss_family, &b, 0, 1, &d, &a);
    int tested = 0;
    for (int div = 0; div < KDL_DIV_COUNT_; div++)
        for (int red = 0; red < KDL_REDUCTION_COUNT_; red++) {
            void *dv = dev_copy(&loss_family, &b);
            loss_bind(dv, 0, 1, &d, &a);
            d.loss.divergence = (kdl_divergence_t)div;
            d.loss.reduction = (kdl_reduction_t)red;
            size_t need = 0;
            cr_assert_eq(kdl_loss_workspace_size(g.h, &d.loss, &a.loss, &need), KDL_STATUS_SUCCESS);
            if (need > 0) {
                void *ws = NULL;
                cr_assert_eq(cudaMalloc(&ws, need), cudaSuccess);
                kdl_status_t st = kdl_loss_forward_backward(g.h, &d.loss, &a.loss, ws, need - 1);
                cr_expect_eq(st, KDL_STATUS_WORKSPACE_TOO_SMALL, "%s/%s: got %s", kdl_divergence_name(d.loss.divergence),
                             kdl_reduction_name(d.loss.reduction), kdl_status_string(st));
                st = kdl_loss_forward_backward(g.h, &d.loss, &a.loss, NULL, need);
                cr_expect(st == KDL_STATUS_WORKSPACE_TOO_SMALL || st == KDL_STATUS_NULL_POINTER,
                          "NULL workspace of %zu bytes: got %s", need, kdl_status_string(st));
                cr_expect_eq(cudaDeviceSynchronize(), cudaSuccess);
                cr_expect(dev_untouched(&loss_family, dv), "workspace too small: an output was written");
                cudaFree(ws);
                tested++;
            }
            cudaFree(dv);
        }
    if (!tested) cr_log_warn("no loss configuration needs a workspace: WORKSPACE_TOO_SMALL not reachable");
    gpu_ctx_close(&g);
#endif
}

/* ====================================================== handle, statuses */

Test(bad_args, handle_calls_without_a_handle)
{
    kdl_handle_t h = (kdl_handle_t)0x1;
    cr_expect_eq(kdl_create(NULL), KDL_STATUS_NULL_POINTER);
    if (!kdl_device_available()) {
        cr_expect_eq(kdl_create(&h), KDL_STATUS_NO_DEVICE);
        cr_expect_null(h, "kdl_create left a handle without a device");
    }
    cr_expect_eq(kdl_destroy(NULL), KDL_STATUS_SUCCESS);
    cr_expect_eq(kdl_set_stream(NULL, NULL), KDL_STATUS_NULL_POINTER);
    kdl_stream_t s = (kdl_stream_t)0x5;
    cr_expect_eq(kdl_get_stream(NULL, &s), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(s, (kdl_stream_t)0x5, "kdl_get_stream wrote without a handle");
    cr_log_info("loss entry points: %d calls refused a NULL handle", check_without_handle(&loss_family));
}

Test(bad_args, status_strings)
{
    for (int s = 0; s <= KDL_STATUS_COUNT_ + 1; s++) {
        const char *m = kdl_status_string((kdl_status_t)s);
        cr_assert_not_null(m);
        cr_expect(strncmp(m, "KDL_STATUS_", 11) == 0, "status %d: '%s'", s, m);
    }
    cr_expect_not_null(kdl_status_string((kdl_status_t)-1));
    cr_expect_not_null(kdl_get_last_error());
}

/* ======================================================= sparse teacher */

enum { SN = 2, SV = 9, SK = 3 };

#define CASE_DESC_T kdl_loss_desc_t
#define CASE_ARGS_T kdl_sparse_args_t
#define CASE_PREFIX sm_
#define SPARSE_CASES(X) \
    X(null_student, "student NULL", NULL_POINTER, BOTH, a->student = NULL) \
    X(null_idx, "indices NULL", NULL_POINTER, BOTH, a->teacher_indices = NULL) \
    X(null_lp, "logprobs NULL", NULL_POINTER, BOTH, a->teacher_logprobs = NULL) \
    X(null_loss, "loss NULL", NULL_POINTER, BOTH, a->loss = NULL) \
    X(rows_neg, "rows < 0", BAD_SIZE, BOTH, a->rows = -3) \
    X(vocab_zero, "vocab 0", BAD_SIZE, BOTH, a->vocab = 0) \
    X(vocab_neg, "vocab -1", BAD_SIZE, BOTH, a->vocab = -1) \
    X(k_zero, "k 0", BAD_TOP_K, BOTH, a->k = 0) \
    X(k_neg, "k -2", BAD_TOP_K, BOTH, a->k = -2) \
    X(k_big, "k > V", BAD_TOP_K, BOTH, a->k = SV + 1) \
    X(k_max, "k > 1024", BAD_TOP_K, BOTH, a->vocab = a->ld_student = a->ld_grad = 4096; \
      a->k = a->ld_indices = a->ld_logprobs = KDL_SPARSE_MAX_K + 1) \
    X(ld_s, "ld_student < V", BAD_STRIDE, BOTH, a->ld_student = SV - 1) \
    X(ld_i, "ld_indices < k", BAD_STRIDE, BOTH, a->ld_indices = SK - 1) \
    X(ld_l, "ld_logprobs 0", BAD_STRIDE, BOTH, a->ld_logprobs = 0) \
    X(ld_g, "ld_grad < V", BAD_STRIDE, BOTH, a->ld_grad = SV - 1) \
    X(mode, "mode COUNT_", BAD_ENUM, BOTH, a->mode = KDL_SPARSE_MODE_COUNT_) \
    X(rkl_renorm, "rkl renormalised", NOT_SUPPORTED, BOTH, a->mode = KDL_SPARSE_RENORMALISED; d->divergence = KDL_DIV_RKL) \
    /* tail bucket: AKL is not defined on the renormalised teacher */ \
    X(akl_topk, "akl top_k > k", BAD_TOP_K, BOTH, a->mode = KDL_SPARSE_TAIL_BUCKET; \
      d->divergence = KDL_DIV_AKL; d->head_rule = KDL_HEAD_TOPK; d->top_k = SK + 1) \
    X(tau, "tau NaN", BAD_TEMPERATURE, BOTH, d->temperature = NAN) \
    X(tau0, "tau 0", BAD_TEMPERATURE, BOTH, d->temperature = 0) \
    X(scale, "scale -inf", BAD_SCALE, BOTH, d->scale = -INFINITY) \
    X(alpha, "alpha NaN", BAD_ALPHA, BOTH, d->alpha = NAN) \
    X(beta, "beta 1", BAD_BETA, BOTH, d->beta = 1) \
    X(mu, "mu 0", BAD_MU, BOTH, d->mu = 0) \
    X(topk, "top_k 0", BAD_TOP_K, BOTH, d->top_k = 0) \
    X(div, "divergence COUNT_", BAD_ENUM, BOTH, d->divergence = KDL_DIV_COUNT_) \
    X(rule, "head rule -1", BAD_ENUM, BOTH, d->head_rule = (kdl_head_rule_t)-1) \
    X(red, "reduction COUNT_", BAD_ENUM, BOTH, d->reduction = KDL_REDUCTION_COUNT_) \
    X(sdt, "student dtype 5", BAD_ENUM, BOTH, a->student_dtype = (kdl_dtype_t)5) \
    X(tdt, "teacher dtype -2", BAD_ENUM, BOTH, a->teacher_dtype = (kdl_dtype_t)-2) \
    X(odt, "out dtype bf16", NOT_SUPPORTED, BOTH, a->out_dtype = KDL_DTYPE_BF16) \
    X(gdt, "grad dtype other", NOT_SUPPORTED, BOTH, a->grad_dtype = KDL_DTYPE_BF16) \
    X(s64, "student f64 on the GPU", NOT_SUPPORTED, GPU, a->student_dtype = KDL_DTYPE_F64) \
    X(t64, "teacher f64 on the GPU", NOT_SUPPORTED, GPU, a->teacher_dtype = KDL_DTYPE_F64) \
    X(size, "args struct_size", BAD_STRUCT_SIZE, BOTH, a->struct_size = 1) \
    X(dsize, "desc struct_size", BAD_STRUCT_SIZE, BOTH, d->struct_size = 1) \
    X(ovf, "ld_indices INT64_MAX", SIZE_OVERFLOW, BOTH, a->ld_indices = INT64_MAX) \
    X(ovf_rows, "rows x ld overflows", SIZE_OVERFLOW, BOTH, a->rows = INT64_MAX / 8; a->ld_student = a->ld_grad = 1 << 20) \
    X(mis_s, "student misaligned", MISALIGNED, BOTH, a->student = MIS(a->student, 1)) \
    X(mis_i, "teacher_indices misaligned", MISALIGNED, BOTH, a->teacher_indices = MIS(a->teacher_indices, 4)) \
    X(mis_l, "teacher_logprobs misaligned", MISALIGNED, BOTH, a->teacher_logprobs = MIS(a->teacher_logprobs, 1)) \
    X(mis_lab, "labels misaligned", MISALIGNED, BOTH, a->labels = MIS(a->labels, 4)) \
    X(mis_g, "grad misaligned", MISALIGNED, BOTH, a->grad = MIS(a->grad, 2)) \
    X(mis_loss, "loss misaligned", MISALIGNED, BOTH, a->loss = MIS(a->loss, 1)) \
    X(mis_info, "info misaligned", MISALIGNED, BOTH, a->info = MIS(a->info, 4)) \
    X(mis_valid, "valid_rows misaligned", MISALIGNED, BOTH, a->valid_rows = MIS(a->valid_rows, 1)) \
    X(mis_bad, "bad_index_rows misaligned", MISALIGNED, BOTH, a->bad_index_rows = MIS(a->bad_index_rows, 4))
SPARSE_CASES(CASE_FN)
static const bad_case_t sp_cases[] = {SPARSE_CASES(CASE_ROW)};
#undef CASE_DESC_T
#undef CASE_ARGS_T
#undef CASE_PREFIX

typedef struct sp_bufs {
    struct {
        double loss[SN], grad[SN * SV];
        int64_t info, valid, bad_idx;
    } out;
    double S[SN * SV], lp[SN * SK]; /* doubles: room for any dtype */
    int64_t idx[SN * SK], labels[SN];
} sp_bufs_t;

static const char *const sp_settings[] = {"renormalised", "tail bucket", NULL};

static void sp_data(void *bv, int tail, int gpu)
{
    BUFS_AS(sp_bufs_t);
    kdl_rng_t r = {5};
    kdl_fill_logits(&r, b->S, SN * SV, 1.0);
    for (int i = 0; i < SN * SK; i++) b->lp[i] = log(0.3);
    const int64_t idx[SN * SK] = {0, 4, 8, 1, 2, 3}, labels[SN] = {2, -100};
    memcpy(b->idx, idx, sizeof idx);
    memcpy(b->labels, labels, sizeof labels);
}

/* FKL, reduction NONE, every optional array given. */
static void sp_bind(void *bv, int tail, int gpu, void *dv, void *av)
{
    BUFS_AS(sp_bufs_t);
    PROBLEM_AS(kdl_loss_desc_t, kdl_sparse_args_t);
    kdl_loss_desc_init(d);
    d->divergence = KDL_DIV_FKL;
    d->reduction = KDL_REDUCTION_NONE;
    kdl_sparse_args_init(a);
    a->mode = tail ? KDL_SPARSE_TAIL_BUCKET : KDL_SPARSE_RENORMALISED;
    a->rows = SN, a->vocab = SV, a->k = SK;
    a->ld_student = a->ld_grad = SV;
    a->ld_indices = a->ld_logprobs = SK;
    a->student_dtype = a->teacher_dtype = a->grad_dtype = a->out_dtype = DATA_DTYPE(gpu);
    a->student = b->S, a->teacher_indices = b->idx, a->teacher_logprobs = b->lp, a->labels = b->labels;
    a->grad = b->out.grad, a->loss = b->out.loss;
    a->info = &b->out.info, a->valid_rows = &b->out.valid, a->bad_index_rows = &b->out.bad_idx;
}

FAMILY_CALLS(sp, kdl_ref_sparse_loss, kdl_sparse_validate, kdl_sparse_workspace_size, kdl_sparse_loss)

DEFINE_FAMILY(sparse_family, "sparse", sp, sp_settings, sp_settings, sp_ws_size);

Test(bad_args, ref_sparse_table)
{
    run_ref_table(&sparse_family);

    /* the index checker */
    int64_t dup[SK] = {1, 1, 2}, out[SK] = {0, 9, 2}, neg[SK] = {0, -1, 2}, ok[SK] = {8, 0, 3};
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, ok, SK), KDL_STATUS_SUCCESS);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, dup, SK), KDL_STATUS_BAD_PARAM);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, out, SK), KDL_STATUS_BAD_PARAM);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, neg, SK), KDL_STATUS_BAD_PARAM);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, NULL, SK), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_sparse_check_indices(-1, SV, SK, ok, SK), KDL_STATUS_BAD_SIZE);
    cr_expect_eq(kdl_sparse_check_indices(1, 0, SK, ok, SK), KDL_STATUS_BAD_SIZE);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, 0, ok, SK), KDL_STATUS_BAD_TOP_K);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SV + 1, ok, SV + 1), KDL_STATUS_BAD_TOP_K);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, ok, SK - 1), KDL_STATUS_BAD_STRIDE);
    cr_expect_eq(kdl_sparse_check_indices(1, SV, SK, (const int64_t *)MIS(ok, 4), SK), KDL_STATUS_MISALIGNED);
    cr_expect_eq(kdl_sparse_check_indices(0, SV, SK, NULL, SK), KDL_STATUS_SUCCESS);
}

Test(bad_args, gpu_sparse_table) { run_gpu_table(&sparse_family); }

/* ============================================================ Sinkhorn */

enum { OB = 2, ON = 3, OM = 4 };

/* Arrays the rows point at instead of the problem's own. */
static double ot_x[OB * ON * 2], ot_y[OB * OM * 2], ot_cxx[OB * ON * ON];
static const int64_t ot_sizes_bad[OB] = {3, 0}, ot_sizes_n[OB] = {3, 3}, ot_sizes_huge[OB] = {INT64_MAX / 2, 3};
static double ot_la[OB * ON + 1], ot_gx[OB * ON * 2 + 1], ot_syy[OB + 1];
static int64_t ot_sizes_pad[OB + 1] = {ON, ON, ON}, ot_sizes_m[OB] = {OM, OM};
static void om_points(kdl_sinkhorn_args_t *a)
{
    a->cost = NULL;
    a->x = ot_x;
    a->y = ot_y;
    a->dim = 2;
}

#define CASE_DESC_T kdl_sinkhorn_desc_t
#define CASE_ARGS_T kdl_sinkhorn_args_t
#define CASE_PREFIX om_
#define OT_CASES(X) \
    X(null_cost, "cost NULL", NULL_POINTER, BOTH, a->cost = NULL) \
    X(null_value, "value NULL", NULL_POINTER, BOTH, a->value = NULL) \
    X(cost_and_points, "cost and points", BAD_PARAM, BOTH, a->x = ot_x; a->y = ot_y; a->dim = 2) \
    X(x_only, "x without y", NULL_POINTER, BOTH, a->cost = NULL; a->x = ot_x; a->dim = 2) \
    X(dim0, "dim 0", BAD_SIZE, BOTH, a->cost = NULL; a->x = ot_x; a->y = ot_y; a->dim = 0) \
    X(grad_x_cost, "grad_x with a cost", BAD_PARAM, BOTH, a->grad_x = ot_x) \
    X(batch_neg, "batch -1", BAD_SIZE, BOTH, a->batch = -1) \
    X(n0, "n 0", BAD_SIZE, BOTH, a->n = 0) \
    X(m_neg, "m -4", BAD_SIZE, BOTH, a->m = -4) \
    X(sizes_one, "sizes_n without sizes_m", NULL_POINTER, BOTH, a->sizes_n = ot_sizes_n) \
    X(sizes_zero, "ragged size 0", BAD_SIZE, BOTH, a->sizes_n = ot_sizes_bad; a->sizes_m = ot_sizes_n) \
    X(sizes_huge, "ragged size > 2^31", SIZE_OVERFLOW, BOTH, a->sizes_n = ot_sizes_huge; a->sizes_m = ot_sizes_n) \
    X(n_huge, "n = 2^31", SIZE_OVERFLOW, BOTH, a->n = (int64_t)1 << 31; a->m = 2) \
    X(nm_overflow, "B n m overflows", SIZE_OVERFLOW, BOTH, a->batch = INT64_MAX / 4; a->n = a->m = INT32_MAX) \
    X(eps0, "eps 0", BAD_EPSILON, BOTH, d->epsilon = 0) \
    X(eps_nan, "eps NaN", BAD_EPSILON, BOTH, d->epsilon = NAN) \
    X(eps_inf, "eps inf", BAD_EPSILON, BOTH, d->epsilon = INFINITY) \
    X(iter0, "max_iter 0", BAD_ITERATIONS, BOTH, d->max_iter = 0) \
    X(check0, "check_every 0", BAD_ITERATIONS, BOTH, d->check_every = 0) \
    X(tol_neg, "tol < 0", BAD_TOLERANCE, BOTH, d->tol = -1e-9) \
    X(tol_nan, "tol NaN", BAD_TOLERANCE, BOTH, d->tol = NAN) \
    X(factor1, "eps factor 1", BAD_SCHEDULE, BOTH, d->eps_scaling = 1; d->eps_scaling_factor = 1.0) \
    X(factor_nan, "eps factor NaN", BAD_SCHEDULE, BOTH, d->eps_scaling = 1; d->eps_scaling_factor = NAN) \
    X(stage0, "eps stage iter 0", BAD_ITERATIONS, BOTH, d->eps_scaling = 1; d->eps_stage_iter = 0) \
    X(value_enum, "value enum", BAD_ENUM, BOTH, d->value = KDL_OT_VALUE_COUNT_) \
    X(metric_enum, "metric enum", BAD_ENUM, BOTH, d->metric = (kdl_ot_metric_t)-1) \
    X(dtype_enum, "dtype enum", BAD_ENUM, BOTH, a->dtype = (kdl_dtype_t)9) \
    X(dtype_f16, "dtype f16", NOT_SUPPORTED, BOTH, a->dtype = KDL_DTYPE_F16) \
    X(debias_no_cxx, "debias without cost_xx", NULL_POINTER, BOTH, d->debias = 1) \
    X(debias_no_cyy, "debias without cost_yy", NULL_POINTER, BOTH, d->debias = 1; a->cost_xx = ot_cxx) \
    X(self_no_ptr, "self_yy_given, self_yy NULL", NULL_POINTER, BOTH, d->debias = 1; a->cost_xx = ot_cxx; a->self_yy_given = 1) \
    X(dsize, "desc struct_size", BAD_STRUCT_SIZE, BOTH, d->struct_size = 0) \
    X(asize, "args struct_size", BAD_STRUCT_SIZE, BOTH, a->struct_size = sizeof *a + 1) \
    X(f64_gpu, "f64 on the GPU", NOT_SUPPORTED, GPU, a->dtype = KDL_DTYPE_F64) \
    X(mis_cost, "cost misaligned", MISALIGNED, BOTH, a->cost = MIS(a->cost, 1)) \
    X(mis_value, "value misaligned", MISALIGNED, BOTH, a->value = MIS(a->value, 1)) \
    X(mis_log_a, "log_a misaligned", MISALIGNED, BOTH, a->log_a = MIS(ot_la, 1)) \
    X(mis_f, "f misaligned", MISALIGNED, BOTH, a->f = MIS(a->f, 1)) \
    X(mis_g, "g misaligned", MISALIGNED, BOTH, a->g = MIS(a->g, 2)) \
    X(mis_plan, "plan misaligned", MISALIGNED, BOTH, a->plan = MIS(a->plan, 1)) \
    X(mis_iters, "iterations misaligned", MISALIGNED, BOTH, a->iterations = MIS(a->iterations, 4)) \
    X(mis_err, "marginal_error misaligned", MISALIGNED, BOTH, a->marginal_error = MIS(a->marginal_error, 1)) \
    X(mis_info, "info misaligned", MISALIGNED, BOTH, a->info = MIS(a->info, 4)) \
    /* info is written even for an empty batch */ \
    X(mis_info_empty, "info misaligned, batch 0", MISALIGNED, BOTH, a->batch = 0; a->info = MIS(a->info, 4)) \
    /* sizes_n is read by the validator itself */ \
    X(mis_sizes, "sizes_n misaligned", MISALIGNED, BOTH, a->sizes_n = MIS(ot_sizes_pad, 4); a->sizes_m = ot_sizes_m) \
    X(mis_x, "x misaligned", MISALIGNED, BOTH, om_points(a); a->x = MIS(ot_x, 1)) \
    X(mis_grad_x, "grad_x misaligned", MISALIGNED, BOTH, om_points(a); a->grad_x = MIS(ot_gx, 1)) \
    X(mis_cxx, "cost_xx misaligned", MISALIGNED, BOTH, \
      d->debias = 1; a->cost_xx = MIS(ot_cxx, 1); a->self_yy = ot_syy; a->self_yy_given = 1) \
    X(mis_syy, "self_yy misaligned", MISALIGNED, BOTH, \
      d->debias = 1; a->cost_xx = ot_cxx; a->self_yy = MIS(ot_syy, 1); a->self_yy_given = 1)
OT_CASES(CASE_FN)
static const bad_case_t ot_cases[] = {OT_CASES(CASE_ROW)};
#undef CASE_DESC_T
#undef CASE_ARGS_T
#undef CASE_PREFIX

typedef struct ot_bufs {
    struct {
        double value[OB], err[OB], f[OB * ON], g[OB * OM], plan[OB * ON * OM];
        int64_t iters[OB], info;
    } out;
    double C[OB * ON * OM];
} ot_bufs_t;

static void ot_data(void *bv, int setting, int gpu)
{
    BUFS_AS(ot_bufs_t);
    for (int i = 0; i < OB * ON * OM; i++) b->C[i] = (double)((i * 7) % 5) / 4.0;
}

/* A given cost, every optional output. */
static void ot_bind(void *bv, int setting, int gpu, void *dv, void *av)
{
    BUFS_AS(ot_bufs_t);
    PROBLEM_AS(kdl_sinkhorn_desc_t, kdl_sinkhorn_args_t);
    kdl_sinkhorn_desc_init(d);
    kdl_sinkhorn_args_init(a);
    a->batch = OB, a->n = ON, a->m = OM;
    a->dtype = DATA_DTYPE(gpu);
    a->cost = b->C;
    a->value = b->out.value, a->iterations = b->out.iters, a->marginal_error = b->out.err;
    a->f = b->out.f, a->g = b->out.g, a->plan = b->out.plan, a->info = &b->out.info;
}

FAMILY_CALLS(ot, kdl_ref_sinkhorn, kdl_sinkhorn_validate, kdl_sinkhorn_workspace_size, kdl_sinkhorn)

DEFINE_FAMILY(ot_family, "sinkhorn", ot, ref_f64, gpu_f32, ot_ws_size);

Test(bad_args, ref_sinkhorn_table)
{
    run_ref_table(&ot_family);

    /* Non-finite data: the reference refuses before writing (the GPU flags
     * the problem instead). */
    const double bad[] = {NAN, INFINITY, -INFINITY};
    ot_bufs_t b;
    any_desc_t d;
    any_args_t a;
    for (int k = 0; k < 3; k++) {
        valid_problem(&ot_family, &b, 0, 0, &d, &a);
        b.C[OB * ON * OM - 1] = bad[k];
        cr_expect_eq(kdl_ref_sinkhorn(&d.ot, &a.ot), KDL_STATUS_NONFINITE_INPUT, "cost %g", bad[k]);
        cr_expect(outs_untouched(&ot_family, &b), "cost %g: an output was written", bad[k]);
    }
}

Test(bad_args, gpu_sinkhorn_table) { run_gpu_table(&ot_family); }

/* ================================================================ SinKD */

enum { KN = 4, KV = 6 };

#define CASE_DESC_T kdl_sinkd_desc_t
#define CASE_ARGS_T kdl_sinkd_args_t
#define CASE_PREFIX km_
#define KD_CASES(X) \
    X(null_s, "student NULL", NULL_POINTER, BOTH, a->student = NULL) \
    X(null_t, "teacher NULL", NULL_POINTER, BOTH, a->teacher = NULL) \
    X(null_loss, "loss NULL", NULL_POINTER, BOTH, a->loss = NULL) \
    X(rows_neg, "rows < 0", BAD_SIZE, BOTH, a->rows = -2) \
    X(vocab0, "vocab 0", BAD_SIZE, BOTH, a->vocab = 0) \
    X(vocab_neg, "vocab -3", BAD_SIZE, BOTH, a->vocab = -3) \
    X(ld_s, "ld_student < V", BAD_STRIDE, BOTH, a->ld_student = KV - 1) \
    X(ld_t, "ld_teacher < V", BAD_STRIDE, BOTH, a->ld_teacher = 1) \
    X(ld_g, "ld_grad 0", BAD_STRIDE, BOTH, a->ld_grad = 0) \
    X(group, "rows not a multiple of the group", BAD_GROUP, BOTH, d->group_size = 3) \
    X(group_neg, "group_size < 0", BAD_GROUP, BOTH, d->group_size = -1) \
    X(tau, "tau 0", BAD_TEMPERATURE, BOTH, d->temperature = 0) \
    X(tau_inf, "tau inf", BAD_TEMPERATURE, BOTH, d->temperature = INFINITY) \
    X(tau_nan, "tau NaN", BAD_TEMPERATURE, BOTH, d->temperature = NAN) \
    X(eps, "eps < 0", BAD_EPSILON, BOTH, d->epsilon = -0.1) \
    X(eps_nan, "eps NaN", BAD_EPSILON, BOTH, d->epsilon = NAN) \
    X(iter, "max_iter < 1", BAD_ITERATIONS, BOTH, d->max_iter = -5) \
    X(check, "check_every 0", BAD_ITERATIONS, BOTH, d->check_every = 0) \
    X(tol, "tol NaN", BAD_TOLERANCE, BOTH, d->tol = NAN) \
    X(tol_neg, "tol < 0", BAD_TOLERANCE, BOTH, d->tol = -1) \
    X(scale, "scale NaN", BAD_SCALE, BOTH, d->scale = NAN) \
    X(scale_inf, "scale -inf", BAD_SCALE, BOTH, d->scale = -INFINITY) \
    X(metric, "metric enum", BAD_ENUM, BOTH, d->metric = KDL_OT_METRIC_COUNT_) \
    X(sdt, "student dtype 4", BAD_ENUM, BOTH, a->student_dtype = (kdl_dtype_t)4) \
    X(tdt, "teacher dtype -1", BAD_ENUM, BOTH, a->teacher_dtype = (kdl_dtype_t)-1) \
    X(odt, "out dtype f16", NOT_SUPPORTED, BOTH, a->out_dtype = KDL_DTYPE_F16) \
    X(gdt, "grad dtype other", NOT_SUPPORTED, BOTH, a->grad_dtype = KDL_DTYPE_BF16) \
    X(s64, "student f64 on the GPU", NOT_SUPPORTED, GPU, a->student_dtype = KDL_DTYPE_F64) \
    X(dsize, "desc struct_size", BAD_STRUCT_SIZE, BOTH, d->struct_size = 3) \
    X(asize, "args struct_size", BAD_STRUCT_SIZE, BOTH, a->struct_size = 0) \
    X(ovf, "ld_student INT64_MAX", SIZE_OVERFLOW, BOTH, a->ld_student = INT64_MAX) \
    X(group_huge, "group of 2^32 rows", SIZE_OVERFLOW, BOTH, a->rows = (int64_t)1 << 32; d->group_size = 0) \
    X(mis_s, "student misaligned", MISALIGNED, BOTH, a->student = MIS(a->student, 1)) \
    X(mis_t, "teacher misaligned", MISALIGNED, BOTH, a->teacher = MIS(a->teacher, 2)) \
    X(mis_g, "grad misaligned", MISALIGNED, BOTH, a->grad = MIS(a->grad, 1)) \
    X(mis_loss, "loss misaligned", MISALIGNED, BOTH, a->loss = MIS(a->loss, 1)) \
    X(mis_gl, "group_loss misaligned", MISALIGNED, BOTH, a->group_loss = MIS(a->group_loss, 1)) \
    X(mis_plan, "plan misaligned", MISALIGNED, BOTH, a->plan = MIS(a->plan, 1)) \
    X(mis_iters, "iterations misaligned", MISALIGNED, BOTH, a->iterations = MIS(a->iterations, 4)) \
    X(mis_err, "marginal_error misaligned", MISALIGNED, BOTH, a->marginal_error = MIS(a->marginal_error, 1)) \
    X(mis_info, "info misaligned", MISALIGNED, BOTH, a->info = MIS(a->info, 4)) \
    /* the empty batch writes loss and info */ \
    X(mis_info_empty, "info misaligned, rows 0", MISALIGNED, BOTH, a->rows = 0; a->info = MIS(a->info, 4))
KD_CASES(CASE_FN)
static const bad_case_t kd_cases[] = {KD_CASES(CASE_ROW)};
#undef CASE_DESC_T
#undef CASE_ARGS_T
#undef CASE_PREFIX

typedef struct kd_bufs {
    struct {
        double loss, grad[KN * KV], gl[2], plan[2 * 2 * 2], err[2];
        int64_t iters[2], info;
    } out;
    double S[KN * KV], T[KN * KV];
} kd_bufs_t;

static void kd_data(void *bv, int setting, int gpu)
{
    BUFS_AS(kd_bufs_t);
    kdl_rng_t r = {31};
    kdl_fill_logits(&r, b->S, KN * KV, 1.0);
    kdl_fill_logits(&r, b->T, KN * KV, 1.0);
}

/* Two groups of two rows, every optional output. */
static void kd_bind(void *bv, int setting, int gpu, void *dv, void *av)
{
    BUFS_AS(kd_bufs_t);
    PROBLEM_AS(kdl_sinkd_desc_t, kdl_sinkd_args_t);
    kdl_sinkd_desc_init(d);
    d->group_size = 2;
    kdl_sinkd_args_init(a);
    a->rows = KN, a->vocab = KV;
    a->ld_student = a->ld_teacher = a->ld_grad = KV;
    a->student_dtype = a->teacher_dtype = a->grad_dtype = a->out_dtype = DATA_DTYPE(gpu);
    a->student = b->S, a->teacher = b->T;
    a->grad = b->out.grad, a->loss = &b->out.loss, a->group_loss = b->out.gl, a->plan = b->out.plan;
    a->iterations = b->out.iters, a->marginal_error = b->out.err, a->info = &b->out.info;
}

FAMILY_CALLS(kd, kdl_ref_sinkd, kdl_sinkd_validate, kdl_sinkd_workspace_size, kdl_sinkd)

DEFINE_FAMILY(kd_family, "sinkd", kd, ref_f64, gpu_f32, kd_ws_size);

Test(bad_args, ref_sinkd_table) { run_ref_table(&kd_family); }

Test(bad_args, gpu_sinkd_table) { run_gpu_table(&kd_family); }

/* ======================================================= fused linear */

enum { FN = 3, FD = 4, FV = 5 };

#define CASE_DESC_T kdl_loss_desc_t
#define CASE_ARGS_T kdl_fused_linear_args_t
#define CASE_PREFIX fm_
#define FL_CASES(X) \
    X(null_h, "hidden_states NULL", NULL_POINTER, BOTH, a->hidden_states = NULL) \
    X(null_w, "weight NULL", NULL_POINTER, BOTH, a->weight = NULL) \
    X(null_t, "teacher NULL", NULL_POINTER, BOTH, a->teacher = NULL) \
    X(null_loss, "loss NULL", NULL_POINTER, BOTH, a->loss = NULL) \
    X(rows, "rows < 0", BAD_SIZE, BOTH, a->rows = -1) \
    X(hidden, "hidden 0", BAD_SIZE, BOTH, a->hidden = 0) \
    X(hidden_neg, "hidden -4", BAD_SIZE, BOTH, a->hidden = -4) \
    X(vocab, "vocab < 0", BAD_SIZE, BOTH, a->vocab = -1) \
    X(vocab0, "vocab 0", BAD_SIZE, BOTH, a->vocab = 0) \
    X(chunk, "chunk_rows < 0", BAD_SIZE, BOTH, a->chunk_rows = -1) \
    X(ld_h, "ld_hidden < d", BAD_STRIDE, BOTH, a->ld_hidden = FD - 1) \
    X(ld_w, "ld_weight 0", BAD_STRIDE, BOTH, a->ld_weight = 0) \
    X(ld_t, "ld_teacher < V", BAD_STRIDE, BOTH, a->ld_teacher = FV - 1) \
    X(ld_gh, "ld_grad_hidden < d", BAD_STRIDE, BOTH, a->ld_grad_hidden = 1) \
    X(ld_gw, "ld_grad_weight < d", BAD_STRIDE, BOTH, a->ld_grad_weight = FD - 1) \
    X(gdt, "grad dtype f16", NOT_SUPPORTED, BOTH, a->grad_dtype = KDL_DTYPE_F16) \
    X(hdt, "hidden dtype 6", BAD_ENUM, BOTH, a->hidden_dtype = (kdl_dtype_t)6) \
    X(wdt, "weight dtype -1", BAD_ENUM, BOTH, a->weight_dtype = (kdl_dtype_t)-1) \
    X(tdt, "teacher dtype 4", BAD_ENUM, BOTH, a->teacher_dtype = (kdl_dtype_t)4) \
    X(tau, "tau < 0", BAD_TEMPERATURE, BOTH, d->temperature = -1) \
    X(tau_nan, "tau NaN", BAD_TEMPERATURE, BOTH, d->temperature = NAN) \
    X(scale, "scale inf", BAD_SCALE, BOTH, d->scale = INFINITY) \
    X(alpha, "alpha 1", BAD_ALPHA, BOTH, d->alpha = 1) \
    X(beta, "beta 0", BAD_BETA, BOTH, d->beta = 0) \
    X(mu, "mu 2", BAD_MU, BOTH, d->mu = 2) \
    X(topk, "top_k > V", BAD_TOP_K, BOTH, d->top_k = FV + 1) \
    X(div, "divergence -1", BAD_ENUM, BOTH, d->divergence = (kdl_divergence_t)-1) \
    X(red, "reduction COUNT_", BAD_ENUM, BOTH, d->reduction = KDL_REDUCTION_COUNT_) \
    X(odt, "out dtype bf16", NOT_SUPPORTED, BOTH, a->out_dtype = KDL_DTYPE_BF16) \
    X(h64, "hidden f64 on the GPU", NOT_SUPPORTED, GPU, a->hidden_dtype = KDL_DTYPE_F64) \
    X(w16, "weight f16 on the GPU", NOT_SUPPORTED, GPU, a->weight_dtype = KDL_DTYPE_F16) \
    X(t64, "teacher f64 on the GPU", NOT_SUPPORTED, GPU, a->teacher_dtype = KDL_DTYPE_F64) \
    X(g64, "grad f64 on the GPU", NOT_SUPPORTED, GPU, a->grad_dtype = KDL_DTYPE_F64) \
    X(hw_mixed, "hidden bf16, weight f32 on the GPU", NOT_SUPPORTED, GPU, a->hidden_dtype = KDL_DTYPE_BF16) \
    X(gout_sum, "grad_output with SUM", BAD_PARAM, BOTH, \
      a->grad_output = a->hidden_states; d->reduction = KDL_REDUCTION_SUM) \
    X(gout_mean, "grad_output with MEAN", BAD_PARAM, BOTH, \
      a->grad_output = a->hidden_states; d->reduction = KDL_REDUCTION_MEAN) \
    X(gout_dt, "grad_output dtype 5", BAD_ENUM, BOTH, \
      a->grad_output = a->hidden_states; a->grad_output_dtype = (kdl_dtype_t)5) \
    X(size, "args struct_size", BAD_STRUCT_SIZE, BOTH, a->struct_size = 2) \
    X(dsize, "desc struct_size", BAD_STRUCT_SIZE, BOTH, d->struct_size = 2) \
    X(ovf, "ld_weight INT64_MAX", SIZE_OVERFLOW, BOTH, a->ld_weight = INT64_MAX) \
    /* every input fits, the reference's materialised [N, V] float64 logits do not */ \
    X(ovf_logits, "N x V logits overflow", SIZE_OVERFLOW, BOTH, \
      a->rows = (int64_t)1 << 40; a->vocab = (int64_t)1 << 30; a->ld_teacher = a->vocab; \
      a->hidden = a->ld_hidden = a->ld_weight = a->ld_grad_hidden = a->ld_grad_weight = 1; d->top_k = 1) \
    X(mis_h, "hidden_states misaligned", MISALIGNED, BOTH, a->hidden_states = MIS(a->hidden_states, 1)) \
    X(mis_w, "weight misaligned", MISALIGNED, BOTH, a->weight = MIS(a->weight, 2)) \
    X(mis_t, "teacher misaligned", MISALIGNED, BOTH, a->teacher = MIS(a->teacher, 1)) \
    X(mis_lab, "labels misaligned", MISALIGNED, BOTH, a->labels = MIS(a->labels, 4)) \
    X(mis_gh, "grad_hidden misaligned", MISALIGNED, BOTH, a->grad_hidden = MIS(a->grad_hidden, 1)) \
    X(mis_gw, "grad_weight misaligned", MISALIGNED, BOTH, a->grad_weight = MIS(a->grad_weight, 3)) \
    X(mis_loss, "loss misaligned", MISALIGNED, BOTH, a->loss = MIS(a->loss, 1)) \
    X(mis_info, "info misaligned", MISALIGNED, BOTH, a->info = MIS(a->info, 4)) \
    X(mis_valid, "valid_rows misaligned", MISALIGNED, BOTH, a->valid_rows = MIS(a->valid_rows, 4)) \
    X(mis_gout, "grad_output misaligned", MISALIGNED, BOTH, a->grad_output = MIS(a->hidden_states, 1)) \
    X(mis_bias, "bias misaligned", MISALIGNED, BOTH, a->bias = MIS(a->weight, 1)) \
    X(mis_gb, "grad_bias misaligned", MISALIGNED, BOTH, a->grad_bias = MIS(a->grad_weight, 2)) \
    /* version 3: the teacher as a linear layer (H_t = H, W_t = W of the data dtype, d_t = d) */ \
    X(tl_both, "teacher and teacher_hidden", BAD_PARAM, BOTH, FL_TLIN(a)) \
    X(tl_w_only, "teacher_weight without teacher_hidden", BAD_PARAM, BOTH, \
      FL_TLIN(a); a->teacher = NULL; a->teacher_hidden = NULL) \
    X(tl_w_logits, "teacher_weight with teacher logits", BAD_PARAM, BOTH, a->teacher_weight = a->weight) \
    X(tl_b_logits, "teacher_bias with teacher logits", BAD_PARAM, BOTH, a->teacher_bias = a->weight) \
    X(tl_null_w, "teacher_weight NULL", NULL_POINTER, BOTH, FL_TLIN(a); a->teacher = NULL; a->teacher_weight = NULL) \
    X(tl_dt, "teacher_hidden_size 0", BAD_SIZE, BOTH, FL_TLIN(a); a->teacher = NULL; a->teacher_hidden_size = 0) \
    X(tl_ld_h, "ld_teacher_hidden < d_t", BAD_STRIDE, BOTH, \
      FL_TLIN(a); a->teacher = NULL; a->ld_teacher_hidden = FD - 1) \
    X(tl_ld_w, "ld_teacher_weight < d_t", BAD_STRIDE, BOTH, \
      FL_TLIN(a); a->teacher = NULL; a->ld_teacher_weight = 0) \
    X(tl_dtype, "teacher_linear_dtype 5", BAD_ENUM, BOTH, \
      FL_TLIN(a); a->teacher = NULL; a->teacher_linear_dtype = (kdl_dtype_t)5) \
    X(tl_f64, "teacher layer f64 on the GPU", NOT_SUPPORTED, GPU, \
      FL_TLIN(a); a->teacher = NULL; a->teacher_linear_dtype = KDL_DTYPE_F64) \
    X(tl_mis_h, "teacher_hidden misaligned", MISALIGNED, BOTH, \
      FL_TLIN(a); a->teacher = NULL; a->teacher_hidden = MIS(a->hidden_states, 1)) \
    X(tl_mis_w, "teacher_weight misaligned", MISALIGNED, BOTH, \
      FL_TLIN(a); a->teacher = NULL; a->teacher_weight = MIS(a->weight, 2)) \
    X(tl_mis_b, "teacher_bias misaligned", MISALIGNED, BOTH, \
      FL_TLIN(a); a->teacher = NULL; a->teacher_bias = MIS(a->weight, 3)) \
    X(tl_ovf, "ld_teacher_weight INT64_MAX", SIZE_OVERFLOW, BOTH, \
      FL_TLIN(a); a->teacher = NULL; a->ld_teacher_weight = INT64_MAX) \
    /* version 4: the sparse teacher (FL_SPARSE; rows clear `teacher`) */ \
    X(sp_both, "teacher and teacher_indices", BAD_PARAM, BOTH, FL_SPARSE(a)) \
    X(sp_k_logits, "k with teacher logits", BAD_PARAM, BOTH, a->k = 1) \
    X(sp_tlin, "teacher_hidden and teacher_indices", BAD_PARAM, BOTH, FL_SPARSE(a); a->teacher = NULL; FL_TLIN(a)) \
    X(sp_null_i, "teacher_indices NULL", NULL_POINTER, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; a->teacher_indices = NULL) \
    X(sp_null_p, "teacher_logprobs NULL", NULL_POINTER, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; a->teacher_logprobs = NULL) \
    X(sp_k0, "k 0", BAD_TOP_K, BOTH, FL_SPARSE(a); a->teacher = NULL; a->k = 0) \
    X(sp_k_v, "k > V", BAD_TOP_K, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; a->k = FV + 1; a->ld_teacher_indices = a->ld_teacher_logprobs = FV + 1) \
    X(sp_ld_i, "ld_teacher_indices < k", BAD_STRIDE, BOTH, FL_SPARSE(a); a->teacher = NULL; a->ld_teacher_indices = 0) \
    X(sp_ld_p, "ld_teacher_logprobs < k", BAD_STRIDE, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; a->ld_teacher_logprobs = 0) \
    X(sp_mode, "sparse_mode 2", BAD_ENUM, BOTH, FL_SPARSE(a); a->teacher = NULL; a->sparse_mode = (kdl_sparse_mode_t)2) \
    X(sp_pdt, "teacher_logprobs_dtype 6", BAD_ENUM, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; a->teacher_logprobs_dtype = (kdl_dtype_t)6) \
    X(sp_div, "rkl in renormalised mode", NOT_SUPPORTED, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; d->divergence = KDL_DIV_RKL) \
    X(sp_akl, "akl head top_k > k", BAD_TOP_K, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; a->sparse_mode = KDL_SPARSE_TAIL_BUCKET; d->divergence = KDL_DIV_AKL; \
      d->head_rule = KDL_HEAD_TOPK; d->top_k = 2) \
    X(sp_p64, "log-probs f64 on the GPU", NOT_SUPPORTED, GPU, \
      FL_SPARSE(a); a->teacher = NULL; a->teacher_logprobs_dtype = KDL_DTYPE_F64) \
    X(sp_mis_i, "teacher_indices misaligned", MISALIGNED, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; a->teacher_indices = (const int64_t *)MIS(a->teacher_indices, 4)) \
    X(sp_mis_p, "teacher_logprobs misaligned", MISALIGNED, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; a->teacher_logprobs = MIS(a->teacher_logprobs, 2)) \
    X(sp_mis_b, "bad_index_rows misaligned", MISALIGNED, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; a->bad_index_rows = (int64_t *)MIS(a->info, 4)) \
    X(sp_ovf, "ld_teacher_indices INT64_MAX", SIZE_OVERFLOW, BOTH, \
      FL_SPARSE(a); a->teacher = NULL; a->ld_teacher_indices = INT64_MAX)
/* The teacher as a linear layer beside the teacher logits (rows clear
 * `teacher` where they test something else): H_t, W_t are H, W. */
#define FL_TLIN(a)                                                                                      \
    ((a)->teacher_hidden = (a)->hidden_states, (a)->teacher_weight = (a)->weight,                      \
     (a)->teacher_hidden_size = (a)->ld_teacher_hidden = (a)->ld_teacher_weight = FD,                   \
     (a)->teacher_linear_dtype = (a)->hidden_dtype)
/* The sparse teacher beside the teacher logits: k = 1, the labels as
 * [N, 1] indices, the teacher logits as [N, 1] log-probs (ld V). */
#define FL_SPARSE(a)                                                                                    \
    ((a)->teacher_indices = (a)->labels, (a)->ld_teacher_indices = 1, (a)->teacher_logprobs = (a)->teacher, \
     (a)->ld_teacher_logprobs = FV, (a)->teacher_logprobs_dtype = (a)->teacher_dtype, (a)->k = 1)
FL_CASES(CASE_FN)
static const bad_case_t fl_cases[] = {FL_CASES(CASE_ROW)};
#undef CASE_DESC_T
#undef CASE_ARGS_T
#undef CASE_PREFIX

typedef struct fl_bufs {
    struct {
        double loss[FN], dH[FN * FD], dW[FV * FD];
        int64_t info, valid;
    } out;
    double H[FN * FD], W[FV * FD], T[FN * FV];
    int64_t labels[FN];
} fl_bufs_t;

static void fl_data(void *bv, int setting, int gpu)
{
    BUFS_AS(fl_bufs_t);
    kdl_rng_t r = {8};
    kdl_fill_logits(&r, b->H, FN * FD, 1.0);
    kdl_fill_logits(&r, b->W, FV * FD, 1.0);
    kdl_fill_logits(&r, b->T, FN * FV, 1.0);
    const int64_t labels[FN] = {0, -100, 3};
    memcpy(b->labels, labels, sizeof labels);
}

/* JSD, reduction NONE, both gradients, labels. */
static void fl_bind(void *bv, int setting, int gpu, void *dv, void *av)
{
    BUFS_AS(fl_bufs_t);
    PROBLEM_AS(kdl_loss_desc_t, kdl_fused_linear_args_t);
    kdl_loss_desc_init(d);
    d->divergence = KDL_DIV_JSD;
    d->reduction = KDL_REDUCTION_NONE;
    kdl_fused_linear_args_init(a);
    a->rows = FN, a->hidden = FD, a->vocab = FV;
    a->ld_hidden = a->ld_weight = a->ld_grad_hidden = a->ld_grad_weight = FD;
    a->ld_teacher = FV;
    a->hidden_dtype = a->weight_dtype = a->teacher_dtype = a->grad_dtype = a->out_dtype = DATA_DTYPE(gpu);
    a->hidden_states = b->H, a->weight = b->W, a->teacher = b->T, a->labels = b->labels;
    a->grad_hidden = b->out.dH, a->grad_weight = b->out.dW, a->loss = b->out.loss;
    a->info = &b->out.info, a->valid_rows = &b->out.valid;
}

FAMILY_CALLS(fl, kdl_ref_fused_linear_loss, kdl_fused_linear_validate, kdl_fused_linear_workspace_size,
             kdl_fused_linear_loss)

DEFINE_FAMILY(fl_family, "fused linear", fl, ref_f64, gpu_f32, fl_ws_size);

Test(bad_args, ref_fused_linear_table) { run_ref_table(&fl_family); }

Test(bad_args, gpu_fused_linear_table) { run_gpu_table(&fl_family); }

/* ================================================== vocabulary shards */

enum { HN = 3, HV = 8, HLD = 10 };

#define CASE_DESC_T kdl_loss_desc_t
#define CASE_ARGS_T kdl_shard_args_t
#define CASE_PREFIX hm_
#define SH_CASES(X) \
    X(null_s, "student NULL", NULL_POINTER, BOTH, a->student = NULL) \
    X(null_t, "teacher NULL", NULL_POINTER, BOTH, a->teacher = NULL) \
    X(null_loss, "loss NULL", NULL_POINTER, BOTH, a->loss = NULL) \
    X(null_state, "state NULL", NULL_POINTER, BOTH, a->state = NULL) \
    X(null_exchange, "exchange NULL", NULL_POINTER, BOTH, a->exchange = NULL) \
    X(null_op, "op NULL", NULL_POINTER, BOTH, call->null_op = 1) \
    X(null_count, "count NULL", NULL_POINTER, BOTH, call->null_count = 1) \
    X(step_neg, "step -1", BAD_PARAM, BOTH, call->step = -1) \
    /* AKL with an f64 teacher: 8 digit steps + 4 */ \
    X(step_big, "step = num_steps", BAD_PARAM, BOTH, call->step = 12) \
    X(rows, "rows -1", BAD_SIZE, BOTH, a->rows = -1) \
    X(vocab0, "vocab 0", BAD_SIZE, BOTH, a->vocab = 0) \
    X(vocab_neg, "vocab -8", BAD_SIZE, BOTH, a->vocab = -8) \
    X(shards0, "num_shards 0", BAD_SIZE, BOTH, a->num_shards = 0) \
    X(shards_big, "num_shards > vocab", BAD_SIZE, BOTH, a->num_shards = HV + 1) \
    X(rank_neg, "shard_rank -1", BAD_PARAM, BOTH, a->shard_rank = -1) \
    X(rank_big, "shard_rank = num_shards", BAD_PARAM, BOTH, a->shard_rank = a->num_shards) \
    X(local0, "vocab_local 0", BAD_SIZE, BOTH, a->vocab_local = 0) \
    X(offset_neg, "vocab_offset -1", BAD_SIZE, BOTH, a->vocab_offset = -1) \
    X(slice_out, "slice past vocab", BAD_SIZE, BOTH, a->vocab_offset = 1) \
    X(ld_s, "ld_student < vocab_local", BAD_STRIDE, BOTH, a->ld_student = HV - 1) \
    X(ld_t, "ld_teacher 0", BAD_STRIDE, BOTH, a->ld_teacher = 0) \
    X(ld_g, "ld_grad < 0", BAD_STRIDE, BOTH, a->ld_grad = -HLD) \
    X(tau, "tau 0", BAD_TEMPERATURE, BOTH, d->temperature = 0) \
    X(tau_inf, "tau inf", BAD_TEMPERATURE, BOTH, d->temperature = INFINITY) \
    X(scale, "scale NaN", BAD_SCALE, BOTH, d->scale = NAN) \
    X(alpha, "alpha < 0", BAD_ALPHA, BOTH, d->alpha = -0.5) \
    X(beta, "beta NaN", BAD_BETA, BOTH, d->beta = NAN) \
    X(mu, "mu 1", BAD_MU, BOTH, d->mu = 1) \
    X(topk0, "top_k 0", BAD_TOP_K, BOTH, d->top_k = 0) \
    X(topk_big, "top_k > vocab", BAD_TOP_K, BOTH, d->top_k = HV + 1) \
    X(div, "divergence COUNT_", BAD_ENUM, BOTH, d->divergence = KDL_DIV_COUNT_) \
    X(rule, "head rule COUNT_", BAD_ENUM, BOTH, d->head_rule = KDL_HEAD_COUNT_) \
    X(red, "reduction -1", BAD_ENUM, BOTH, d->reduction = (kdl_reduction_t)-1) \
    X(sdt, "student dtype 4", BAD_ENUM, BOTH, a->student_dtype = (kdl_dtype_t)4) \
    X(tdt, "teacher dtype 9", BAD_ENUM, BOTH, a->teacher_dtype = (kdl_dtype_t)9) \
    X(odt, "out dtype f16", NOT_SUPPORTED, BOTH, a->out_dtype = KDL_DTYPE_F16) \
    X(gdt, "grad dtype other", NOT_SUPPORTED, BOTH, a->grad_dtype = KDL_DTYPE_BF16) \
    X(s64, "student f64 on the GPU", NOT_SUPPORTED, GPU, a->student_dtype = KDL_DTYPE_F64) \
    X(dsize, "desc struct_size", BAD_STRUCT_SIZE, BOTH, d->struct_size = 0) \
    X(asize, "args struct_size", BAD_STRUCT_SIZE, BOTH, a->struct_size = sizeof *a - 4) \
    X(ovf_ld, "ld_student INT64_MAX", SIZE_OVERFLOW, BOTH, a->ld_student = INT64_MAX) \
    X(ovf_rows, "rows x ld overflows", SIZE_OVERFLOW, BOTH, a->rows = INT64_MAX / 2; a->ld_student = a->ld_teacher = a->ld_grad = 1 << 20) \
    X(mis_s, "student misaligned", MISALIGNED, BOTH, a->student = MIS(a->student, 1)) \
    X(mis_t, "teacher misaligned", MISALIGNED, BOTH, a->teacher = MIS(a->teacher, 1)) \
    X(mis_lab, "labels misaligned", MISALIGNED, BOTH, a->labels = MIS(a->labels, 4)) \
    X(mis_g, "grad misaligned", MISALIGNED, BOTH, a->grad = MIS(a->grad, 1)) \
    X(mis_loss, "loss misaligned", MISALIGNED, BOTH, a->loss = MIS(a->loss, 1)) \
    X(mis_info, "info misaligned", MISALIGNED, BOTH, a->info = MIS(a->info, 4)) \
    X(mis_valid, "valid_rows misaligned", MISALIGNED, BOTH, a->valid_rows = MIS(a->valid_rows, 4)) \
    X(mis_hs, "stat_head_size misaligned", MISALIGNED, BOTH, a->stat_head_size = MIS(a->stat_head_size, 4)) \
    X(mis_state, "state misaligned", MISALIGNED, BOTH, a->state = MIS(a->state, 4)) \
    X(mis_exchange, "exchange misaligned", MISALIGNED, BOTH, a->exchange = MIS(a->exchange, 4))
SH_CASES(CASE_FN)
static const bad_case_t sh_cases[] = {SH_CASES(CASE_ROW)};
#undef CASE_PREFIX
/* kdl_shard_sizes reads desc->divergence, rows, num_shards and the teacher
 * dtype only. */
#define CASE_PREFIX hs_
#define SHS_CASES(X) \
    X(dsize, "desc struct_size", BAD_STRUCT_SIZE, BOTH, d->struct_size = 1) \
    X(asize, "args struct_size", BAD_STRUCT_SIZE, BOTH, a->struct_size = 0) \
    X(div, "divergence -3", BAD_ENUM, BOTH, d->divergence = (kdl_divergence_t)-3) \
    X(tdt, "teacher dtype 4", BAD_ENUM, BOTH, a->teacher_dtype = (kdl_dtype_t)4) \
    X(rows, "rows -1", BAD_SIZE, BOTH, a->rows = -1) \
    X(shards, "num_shards 0", BAD_SIZE, BOTH, a->num_shards = 0) \
    X(shards_neg, "num_shards INT32_MIN", BAD_SIZE, BOTH, a->num_shards = INT32_MIN) \
    X(ovf, "rows INT64_MAX", SIZE_OVERFLOW, BOTH, a->rows = INT64_MAX) \
    /* AKL: the tie step needs num_shards doubles per row */ \
    X(ovf_shards, "rows x num_shards overflows", SIZE_OVERFLOW, BOTH, a->rows = INT64_MAX / 1024; a->num_shards = INT32_MAX)
SHS_CASES(CASE_FN)
static const bad_case_t shs_cases[] = {SHS_CASES(CASE_ROW)};
#undef CASE_DESC_T
#undef CASE_ARGS_T
#undef CASE_PREFIX

/* Buffers of one shard; state and exchange with room for what
 * kdl_shard_sizes asks (checked in ref_shard_table) and the misaligned
 * cases. */
typedef struct sh_bufs {
    struct {
        double grad[HN * HLD], loss[HN];
        int64_t info, valid, hs[HN];
        unsigned char mask[HN * HV];
        _Alignas(16) unsigned char state[1024];
        double exchange[2048];
        kdl_shard_op_t op;
        int64_t count;
    } out;
    double S[HN * HLD], T[HN * HLD];
    int64_t labels[HN];
} sh_bufs_t;

static void sh_data(void *bv, int setting, int gpu)
{
    BUFS_AS(sh_bufs_t);
    kdl_rng_t r = {19};
    kdl_fill_logits(&r, b->S, HN * HLD, 1.0);
    kdl_fill_logits(&r, b->T, HN * HLD, 1.0);
    const int64_t labels[HN] = {1, -100, 7};
    memcpy(b->labels, labels, sizeof labels);
}

/* One shard holding the whole vocabulary (the protocol runs to the end
 * without a peer), AKL with HEAD_TOPK (every step, every descriptor field),
 * reduction NONE, every optional output. */
static void sh_bind(void *bv, int setting, int gpu, void *dv, void *av)
{
    BUFS_AS(sh_bufs_t);
    PROBLEM_AS(kdl_loss_desc_t, kdl_shard_args_t);
    kdl_loss_desc_init(d);
    d->divergence = KDL_DIV_AKL;
    d->head_rule = KDL_HEAD_TOPK;
    d->top_k = 3;
    d->reduction = KDL_REDUCTION_NONE;
    kdl_shard_args_init(a);
    a->rows = HN, a->vocab = a->vocab_local = HV, a->vocab_offset = 0;
    a->shard_rank = 0, a->num_shards = 1;
    a->ld_student = a->ld_teacher = a->ld_grad = HLD;
    a->student_dtype = a->teacher_dtype = a->grad_dtype = a->out_dtype = DATA_DTYPE(gpu);
    a->student = b->S, a->teacher = b->T, a->labels = b->labels;
    a->grad = b->out.grad, a->loss = b->out.loss, a->info = &b->out.info, a->valid_rows = &b->out.valid;
    a->stat_head_size = b->out.hs, a->head_mask = b->out.mask;
    a->state = b->out.state, a->exchange = b->out.exchange;
}

static kdl_status_t sh_ref(const void *d, const void *a, void *bv, const call_t *call)
{
    BUFS_AS(sh_bufs_t);
    return kdl_ref_shard_step(d, a, call->step, call->null_op ? NULL : &b->out.op,
                              call->null_count ? NULL : &b->out.count);
}

static kdl_status_t sh_validate(const void *d, const void *a, int allow_f64) { return kdl_shard_validate(d, a, allow_f64); }

static kdl_status_t sh_run(kdl_handle_t h, const void *d, const void *a, void *bv, const call_t *call, void *ws,
                           size_t ws_bytes)
{
    BUFS_AS(sh_bufs_t);
    return kdl_shard_step(h, d, a, call->step, call->null_op ? NULL : &b->out.op,
                          call->null_count ? NULL : &b->out.count);
}

DEFINE_FAMILY(sh_family, "shard", sh, ref_f64, gpu_f32, NULL);

/* The reference's valid problem: 12 steps, state and exchange fit the buffers. */
static void sh_check_sizes(sh_bufs_t *b, any_desc_t *d, any_args_t *a)
{
    valid_problem(&sh_family, b, 0, 0, d, a);
    size_t state_bytes = 0, exchange_count = 0;
    int steps = 0;
    cr_assert_eq(kdl_shard_sizes(&d->loss, &a->sh, &state_bytes, &exchange_count, &steps), KDL_STATUS_SUCCESS);
    cr_assert_eq(steps, 12, "AKL with an f64 teacher: 8 digit steps + 4");
    cr_assert(state_bytes + 8 <= sizeof b->out.state && exchange_count + 1 <= sizeof b->out.exchange / sizeof(double),
              "state %zu bytes, exchange %zu doubles: the buffers are too small", state_bytes, exchange_count);
}

Test(bad_args, ref_shard_table)
{
    sh_bufs_t b;
    any_desc_t d;
    any_args_t a;
    sh_check_sizes(&b, &d, &a);
    for (int step = 0; step < 12; step++) {
        cr_assert_eq(kdl_ref_shard_step(&d.loss, &a.sh, step, &b.out.op, &b.out.count), KDL_STATUS_SUCCESS,
                     "valid problem, step %d: %s", step, kdl_get_last_error());
        cr_assert_eq(b.out.op == KDL_SHARD_OP_DONE, step == 11, "step %d: op %d", step, (int)b.out.op);
    }
    run_ref_table(&sh_family);
}

/* kdl_shard_sizes: each bad argument gets its status and no output is written. */
Test(bad_args, shard_sizes_table)
{
    sh_bufs_t b;
    any_desc_t d;
    any_args_t a;
    sh_check_sizes(&b, &d, &a);
    for (size_t c = 0; c < sizeof shs_cases / sizeof shs_cases[0]; c++) {
        const bad_case_t *k = &shs_cases[c];
        call_t call = plain_call;
        valid_problem(&sh_family, &b, 0, 0, &d, &a);
        k->mutate(&d, &a, &call);
        size_t sb = 777, ec = 777;
        int ns = 777;
        kdl_status_t st = kdl_shard_sizes(&d.loss, &a.sh, &sb, &ec, &ns);
        cr_expect_eq(st, k->want, "%s: got %s (%s)", k->name, kdl_status_string(st), kdl_get_last_error());
        cr_expect(kdl_get_last_error()[0] != '\0', "%s: no detail", k->name);
        cr_expect(sb == 777 && ec == 777 && ns == 777, "%s: an output was written", k->name);
    }
    valid_problem(&sh_family, &b, 0, 0, &d, &a);
    cr_expect_eq(kdl_shard_sizes(NULL, &a.sh, NULL, NULL, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_shard_sizes(&d.loss, NULL, NULL, NULL, NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_shard_sizes(&d.loss, &a.sh, NULL, NULL, NULL), KDL_STATUS_SUCCESS, "every output may be NULL");
    cr_log_info("shard sizes: %zu cases", sizeof shs_cases / sizeof shs_cases[0]);
}

Test(bad_args, gpu_shard_table)
{
    run_gpu_table(&sh_family);
    /* f32 teacher: AKL has 4 digit steps, so 8 steps in all */
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    sh_bufs_t b;
    any_desc_t d;
    any_args_t a;
    valid_problem(&sh_family, &b, 0, 1, &d, &a);
    cr_expect_eq(kdl_shard_step(g.h, &d.loss, &a.sh, 8, &b.out.op, &b.out.count), KDL_STATUS_BAD_PARAM);
    cr_expect(outs_untouched(&sh_family, &b));
    gpu_ctx_close(&g);
}

/* ========================================= every family, GPU entry points */

static const family_t *const ext_families[] = {&sparse_family, &ot_family, &kd_family, &fl_family, &sh_family};
#define N_EXT_FAMILIES (sizeof ext_families / sizeof ext_families[0])

/* Every extension GPU entry point with a NULL handle (the loss's are in
 * handle_calls_without_a_handle); any build. */
Test(bad_args, gpu_entry_points_without_a_handle)
{
    int n = 0;
    for (size_t i = 0; i < N_EXT_FAMILIES; i++) n += check_without_handle(ext_families[i]);
    cr_log_info("%d GPU entry points refused a NULL handle", n);
}

/* A workspace one byte smaller than queried: WORKSPACE_TOO_SMALL; a
 * misaligned one: BAD_PARAM; nothing written or launched (GPU-only: the
 * size query needs a handle). */
Test(bad_args, gpu_ext_workspace_too_small)
{
    KDL_SKIP_WITHOUT_GPU();
#ifdef KDL_HAVE_CUDA
    gpu_ctx_t g;
    gpu_ctx_open(&g);
    for (size_t i = 0; i < N_EXT_FAMILIES; i++)
        if (ext_families[i]->ws_size) check_workspace_too_small(ext_families[i], &g);
    gpu_ctx_close(&g);
#endif
}
