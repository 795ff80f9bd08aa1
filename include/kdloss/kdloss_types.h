/*
 * kdloss_types.h - types shared by the GPU API (kdloss.h) and the float64 CPU
 * reference (kdloss_ref.h): version, status codes, enums, the loss descriptor
 * and the loss argument struct.
 *
 * Plain C11; includes no CUDA header, so the reference and the CLI build
 * without the CUDA toolkit's headers.
 */
#ifndef KDLOSS_TYPES_H
#define KDLOSS_TYPES_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ version */
#define KDL_VERSION_MAJOR 0
#define KDL_VERSION_MINOR 1
#define KDL_VERSION_PATCH 0
/* MAJOR*10000 + MINOR*100 + PATCH, as cuBLAS's CUBLAS_VERSION. */
#define KDL_VERSION (KDL_VERSION_MAJOR * 10000 + KDL_VERSION_MINOR * 100 + KDL_VERSION_PATCH)

/* The version the library was built as (compare with KDL_VERSION). */
int kdl_get_version(void);

/* ------------------------------------------------------------------- status */
/* Explicit values, grouped by kind: 1000s bad parameter, 2000s not supported,
 * 3000s runtime / device, 4000s bad data.  Never renumber. */
typedef enum kdl_status {
    KDL_STATUS_SUCCESS = 0,

    KDL_STATUS_BAD_PARAM = 1000,          /* generic bad parameter            */
    KDL_STATUS_NULL_POINTER = 1001,       /* a required pointer is NULL       */
    KDL_STATUS_BAD_SIZE = 1002,           /* N < 0, V < 1, B < 0, n or m < 1  */
    KDL_STATUS_BAD_STRIDE = 1003,         /* ld < V                           */
    KDL_STATUS_BAD_TEMPERATURE = 1004,    /* tau <= 0 or not finite           */
    KDL_STATUS_BAD_ALPHA = 1005,          /* alpha not in [0,1)               */
    KDL_STATUS_BAD_BETA = 1006,           /* beta not in (0,1)                */
    KDL_STATUS_BAD_MU = 1007,             /* mu not in (0,1)                  */
    KDL_STATUS_BAD_TOP_K = 1008,          /* K not in [1, V]                  */
    KDL_STATUS_BAD_SCALE = 1009,          /* scale not finite                 */
    KDL_STATUS_BAD_ENUM = 1010,           /* divergence, dtype, rule, ...     */
    KDL_STATUS_SIZE_OVERFLOW = 1011,      /* a byte count overflows size_t    */
    KDL_STATUS_WORKSPACE_TOO_SMALL = 1012,
    KDL_STATUS_BAD_STRUCT_SIZE = 1013,    /* struct_size field not recognised */
    KDL_STATUS_BAD_EPSILON = 1014,        /* Sinkhorn eps <= 0 or not finite  */
    KDL_STATUS_BAD_ITERATIONS = 1015,     /* max_iter < 1, check_every < 1    */
    KDL_STATUS_BAD_TOLERANCE = 1016,      /* tol < 0 or NaN                   */
    KDL_STATUS_BAD_GROUP = 1017,          /* SinKD: N not a multiple of n     */
    KDL_STATUS_BAD_SCHEDULE = 1018,       /* eps-scaling factor not in (0,1)  */
    KDL_STATUS_MISALIGNED = 1019,         /* pointer not aligned to its element */

    KDL_STATUS_NOT_SUPPORTED = 2000,      /* valid, but not on this path      */
    KDL_STATUS_NOT_IMPLEMENTED = 2001,
    KDL_STATUS_ARCH_MISMATCH = 2002,      /* no kernel image for this device  */

    KDL_STATUS_NO_DEVICE = 3000,          /* no CUDA device present           */
    KDL_STATUS_CUDA_ERROR = 3001,
    KDL_STATUS_CUBLAS_ERROR = 3002,
    KDL_STATUS_ALLOC_FAILED = 3003,       /* host allocation (reference)      */
    KDL_STATUS_INTERNAL_ERROR = 3004,
    KDL_STATUS_WRONG_DEVICE = 3005,       /* current device is not the handle's */

    KDL_STATUS_NONFINITE_INPUT = 4000,    /* e.g. NaN in a Sinkhorn cost      */

    KDL_STATUS_COUNT_ = 4001              /* one past the largest value       */
} kdl_status_t;

/* "KDL_STATUS_BAD_STRIDE: row stride smaller than the vocabulary", never NULL. */
const char *kdl_status_string(kdl_status_t status);

/* Detail of the last failure on this thread (which argument, which value);
 * "" when none.  Valid until the next kdloss call on the same thread. */
const char *kdl_get_last_error(void);

/* -------------------------------------------------------------------- enums */
typedef enum kdl_dtype {
    KDL_DTYPE_F32 = 0,
    KDL_DTYPE_F16 = 1,
    KDL_DTYPE_BF16 = 2,
    KDL_DTYPE_F64 = 3 /* CPU reference only (GPU: KDL_STATUS_NOT_SUPPORTED) */
} kdl_dtype_t;

typedef enum kdl_divergence {
    KDL_DIV_FKL = 0,     /* KL(p||q)                                  */
    KDL_DIV_RKL = 1,     /* KL(q||p)                                  */
    KDL_DIV_FKL_RKL = 2, /* KL(p||q) + KL(q||p) (Jeffreys)            */
    KDL_DIV_AKL = 3,     /* w_h KL(p||q) + w_t KL(q||p)               */
    KDL_DIV_JSD = 4,     /* b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q */
    KDL_DIV_TVD = 5,     /* 1/2 sum |p - q|                           */
    KDL_DIV_SKL = 6,     /* KL(p||m), m = a p + (1-a) q               */
    KDL_DIV_SRKL = 7,    /* KL(q||m), m = a q + (1-a) p               */
    KDL_DIV_COUNT_ = 8
} kdl_divergence_t;

typedef enum kdl_head_rule {
    KDL_HEAD_REFERENCE = 0, /* c_k <= mu, plus the top-1 token always  */
    KDL_HEAD_MASS = 1,      /* shortest prefix reaching mu: c_(k-1) < mu */
    KDL_HEAD_TOPK = 2,      /* the first K tokens                       */
    KDL_HEAD_COUNT_ = 3
} kdl_head_rule_t;

typedef enum kdl_reduction {
    KDL_REDUCTION_NONE = 0, /* per-token vector [N]                        */
    KDL_REDUCTION_SUM = 1,  /* sum over valid rows                         */
    KDL_REDUCTION_MEAN = 2, /* sum over valid rows / number of valid rows  */
    KDL_REDUCTION_COUNT_ = 3
} kdl_reduction_t;

/* --------------------------------------------------------- loss descriptor */
/* What to compute.  Always start from kdl_loss_desc_init(). */
typedef struct kdl_loss_desc {
    size_t struct_size;          /* = sizeof(kdl_loss_desc_t), set by init */
    kdl_divergence_t divergence; /* default KDL_DIV_FKL                    */
    double temperature;          /* tau > 0, default 1                     */
    double alpha;                /* SKL/SRKL skew, [0,1), default 0.1      */
    double beta;                 /* JSD weight, (0,1), default 0.5         */
    kdl_head_rule_t head_rule;   /* AKL head rule, default REFERENCE       */
    double mu;                   /* AKL head mass, (0,1), default 0.5      */
    int64_t top_k;               /* AKL HEAD_TOPK size, [1,V], default 1   */
    kdl_reduction_t reduction;   /* default KDL_REDUCTION_MEAN             */
    double scale;                /* multiplies loss and gradient, default 1 */
    int64_t ignore_index;        /* label value of ignored rows, default -100 */
} kdl_loss_desc_t;

void kdl_loss_desc_init(kdl_loss_desc_t *desc);

/* ----------------------------------------------------------- loss arguments */
/* Where the data is.  GPU entry points take device pointers, the reference
 * host pointers; the struct is the same.  Optional outputs are NULL when not
 * wanted.  Always start from kdl_loss_args_init(). */
typedef struct kdl_loss_args {
    size_t struct_size;          /* = sizeof(kdl_loss_args_t), set by init */
    int64_t rows;                /* N >= 0 (0: nothing is launched)        */
    int64_t vocab;               /* V >= 1                                 */

    const void *student;         /* [N, ld_student], required if N > 0     */
    int64_t ld_student;          /* row stride in elements, >= V           */
    kdl_dtype_t student_dtype;

    const void *teacher;         /* [N, ld_teacher], required if N > 0     */
    int64_t ld_teacher;
    kdl_dtype_t teacher_dtype;

    const int64_t *labels;       /* optional [N]; label == ignore_index ignores the row */

    void *grad;                  /* optional [N, ld_grad]: d loss / d student logits */
    int64_t ld_grad;             /* >= V when grad is given                */
    kdl_dtype_t grad_dtype;      /* student's dtype or F32 (F64: reference) */

    /* Float outputs (loss and the float statistics) are of out_dtype:
     * F32 (default) or F64. */
    kdl_dtype_t out_dtype;
    void *loss;                  /* required: [1] (SUM, MEAN) or [N] (NONE) */

    /* Optional per-token statistics, each [N] (NaN on invalid rows, 0 on
     * ignored rows).  Head statistics use the descriptor's head rule,
     * whatever the divergence. */
    void *stat_fkl;              /* KL(p||q)                                */
    void *stat_rkl;              /* KL(q||p)                                */
    void *stat_g_head;           /* sum over the head of |p - q|            */
    void *stat_g_tail;           /* sum over the tail of |p - q|            */
    void *stat_w_head;           /* AKL weight of KL(p||q)                  */
    void *stat_w_tail;           /* AKL weight of KL(q||p)                  */
    int64_t *stat_head_size;     /* number of tokens in the head            */

    int64_t *info;               /* optional [1]: number of invalid rows (as cuSOLVER's devInfo) */
    int64_t *valid_rows;         /* optional [1]: rows counted in the reduction */
} kdl_loss_args_t;

void kdl_loss_args_init(kdl_loss_args_t *args);

/* Argument check shared by the GPU path and the reference: returns the
 * specific status of the first problem found (and sets the last-error
 * detail), KDL_STATUS_SUCCESS otherwise.  Writes nothing else.
 * allow_f64 is 1 for the reference, 0 for the GPU path. */
kdl_status_t kdl_loss_validate(const kdl_loss_desc_t *desc, const kdl_loss_args_t *args,
                               int allow_f64);

/* Names used by the CLI and the Python binding: "fkl", "rkl", "fkl_rkl",
 * "akl", "jsd", "tvd", "skl", "srkl"; "reference", "mass", "topk";
 * "none", "sum", "mean"; "f32", "f16", "bf16", "f64".
 * The parse functions return -1 for an unknown name. */
const char *kdl_divergence_name(kdl_divergence_t d);
int kdl_divergence_from_name(const char *name);
const char *kdl_head_rule_name(kdl_head_rule_t r);
int kdl_head_rule_from_name(const char *name);
const char *kdl_reduction_name(kdl_reduction_t r);
int kdl_reduction_from_name(const char *name);
const char *kdl_dtype_name(kdl_dtype_t t);
size_t kdl_dtype_size(kdl_dtype_t t); /* 0 for an unknown dtype */

#ifdef __cplusplus
}
#endif
#endif /* KDLOSS_TYPES_H */
