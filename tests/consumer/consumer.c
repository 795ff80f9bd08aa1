/*
 * tests/consumer/consumer.c - a downstream program built against an installed
 * kdloss.  Calls the float64 CPU reference on two tokens over a two-word
 * vocabulary and checks the closed form:
 *
 *   q = softmax(s), p = softmax(t),  FKL = sum p log(p/q),  dFKL/ds = q - p,
 *   RKL = sum q log(q/p);  MEAN divides loss and gradient by the row count.
 *
 * Also touches the GPU API (kdl_device_available, kdl_create) so the link
 * pulls in the CUDA dependencies of a CUDA build.  Exit 0 on success.
 */
#include <math.h>
#include <stdio.h>

#include <kdloss/kdloss.h>
#include <kdloss/kdloss_ref.h>

static int failures = 0;

static void check_close(const char *what, double got, double want)
{
    double tol = 1e-12 + 1e-12 * fabs(want);
    if (!(fabs(got - want) <= tol)) {
        fprintf(stderr, "consumer: %s = %.17g, want %.17g\n", what, got, want);
        failures++;
    }
}

static void softmax2(const double *x, double *out)
{
    double m = x[0] > x[1] ? x[0] : x[1];
    double e0 = exp(x[0] - m), e1 = exp(x[1] - m);
    out[0] = e0 / (e0 + e1);
    out[1] = e1 / (e0 + e1);
}

int main(void)
{
    enum { N = 2, V = 2 };
    const double s[N * V] = {0.25, -1.0, 2.0, 0.5};
    const double t[N * V] = {1.0, 0.0, -0.5, 0.75};

    if (kdl_get_version() != KDL_VERSION) {
        fprintf(stderr, "consumer: library version %d, header %d\n", kdl_get_version(), KDL_VERSION);
        return 1;
    }

    /* closed form */
    double fkl[N], rkl[N], dfkl[N * V], fkl_mean = 0;
    for (int i = 0; i < N; i++) {
        double q[2], p[2];
        softmax2(s + i * V, q);
        softmax2(t + i * V, p);
        fkl[i] = p[0] * log(p[0] / q[0]) + p[1] * log(p[1] / q[1]);
        rkl[i] = q[0] * log(q[0] / p[0]) + q[1] * log(q[1] / p[1]);
        for (int v = 0; v < V; v++) dfkl[i * V + v] = (q[v] - p[v]) / N;
        fkl_mean += fkl[i] / N;
    }

    kdl_loss_desc_t desc;
    kdl_loss_desc_init(&desc);
    desc.divergence = KDL_DIV_FKL;
    desc.reduction = KDL_REDUCTION_MEAN;

    double loss = NAN, grad[N * V], stat_rkl[N];
    int64_t valid = -1, info = -1;
    kdl_loss_args_t args;
    kdl_loss_args_init(&args);
    args.rows = N;
    args.vocab = V;
    args.student = s;
    args.ld_student = V;
    args.student_dtype = KDL_DTYPE_F64;
    args.teacher = t;
    args.ld_teacher = V;
    args.teacher_dtype = KDL_DTYPE_F64;
    args.grad = grad;
    args.ld_grad = V;
    args.grad_dtype = KDL_DTYPE_F64;
    args.out_dtype = KDL_DTYPE_F64;
    args.loss = &loss;
    args.stat_rkl = stat_rkl;
    args.valid_rows = &valid;
    args.info = &info;

    kdl_status_t st = kdl_ref_loss_forward_backward(&desc, &args);
    if (st != KDL_STATUS_SUCCESS) {
        fprintf(stderr, "consumer: %s (%s)\n", kdl_status_string(st), kdl_get_last_error());
        return 1;
    }
    check_close("mean FKL", loss, fkl_mean);
    for (int j = 0; j < N * V; j++) check_close("dFKL/ds", grad[j], dfkl[j]);
    for (int i = 0; i < N; i++) check_close("stat rkl", stat_rkl[i], rkl[i]);
    if (valid != N || info != 0) {
        fprintf(stderr, "consumer: valid_rows %lld info %lld\n", (long long)valid, (long long)info);
        failures++;
    }

    /* A bad argument is refused with its specific status. */
    desc.temperature = 0;
    st = kdl_ref_loss_forward_backward(&desc, &args);
    if (st != KDL_STATUS_BAD_TEMPERATURE) {
        fprintf(stderr, "consumer: temperature 0 gave %s\n", kdl_status_string(st));
        failures++;
    }

    /* GPU API: links everywhere; without a device it says so. */
    kdl_handle_t h = NULL;
    if (kdl_device_available()) {
        if (kdl_create(&h) != KDL_STATUS_SUCCESS) failures++;
        kdl_destroy(h);
    } else if (kdl_create(&h) != KDL_STATUS_NO_DEVICE || h != NULL) {
        fprintf(stderr, "consumer: kdl_create without a device did not say NO_DEVICE\n");
        failures++;
    }

    if (failures) return 1;
    printf("consumer: kdloss %d ok (mean FKL %.6f)\n", kdl_get_version(), loss);
    return 0;
}
