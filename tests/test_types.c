/* tests/test_types.c - status strings, name tables, defaults, 16-bit
 * conversions against closed forms. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "internal.h"
#include "kdl_test.h"
#include "kdloss/kdloss.h"

Test(types, version_matches_header) { cr_expect_eq(kdl_get_version(), KDL_VERSION); }

Test(types, every_status_has_its_own_string)
{
    const kdl_status_t all[] = {KDL_STATUS_SUCCESS,          KDL_STATUS_BAD_PARAM,
                                KDL_STATUS_NULL_POINTER,     KDL_STATUS_BAD_SIZE,
                                KDL_STATUS_BAD_STRIDE,       KDL_STATUS_BAD_TEMPERATURE,
                                KDL_STATUS_BAD_ALPHA,        KDL_STATUS_BAD_BETA,
                                KDL_STATUS_BAD_MU,           KDL_STATUS_BAD_TOP_K,
                                KDL_STATUS_BAD_SCALE,        KDL_STATUS_BAD_ENUM,
                                KDL_STATUS_SIZE_OVERFLOW,    KDL_STATUS_WORKSPACE_TOO_SMALL,
                                KDL_STATUS_BAD_STRUCT_SIZE,  KDL_STATUS_BAD_EPSILON,
                                KDL_STATUS_BAD_ITERATIONS,   KDL_STATUS_BAD_TOLERANCE,
                                KDL_STATUS_BAD_GROUP,        KDL_STATUS_BAD_SCHEDULE,
                                KDL_STATUS_MISALIGNED,
                                KDL_STATUS_NOT_SUPPORTED,    KDL_STATUS_NOT_IMPLEMENTED,
                                KDL_STATUS_ARCH_MISMATCH,    KDL_STATUS_NO_DEVICE,
                                KDL_STATUS_CUDA_ERROR,       KDL_STATUS_CUBLAS_ERROR,
                                KDL_STATUS_ALLOC_FAILED,     KDL_STATUS_INTERNAL_ERROR,
                                KDL_STATUS_WRONG_DEVICE,
                                KDL_STATUS_NONFINITE_INPUT};
    size_t n = sizeof all / sizeof all[0];
    for (size_t i = 0; i < n; i++) {
        const char *s = kdl_status_string(all[i]);
        cr_assert_not_null(s);
        cr_expect(strncmp(s, "KDL_STATUS_", 11) == 0, "%s", s);
        cr_expect(strstr(s, "UNKNOWN") == NULL, "status %d has no string", (int)all[i]);
        for (size_t j = 0; j < i; j++) cr_expect(strcmp(s, kdl_status_string(all[j])) != 0);
    }
    cr_expect(strstr(kdl_status_string((kdl_status_t)12345), "UNKNOWN") != NULL);
}

Test(types, names_round_trip)
{
    for (int d = 0; d < KDL_DIV_COUNT_; d++)
        cr_expect_eq(kdl_divergence_from_name(kdl_divergence_name((kdl_divergence_t)d)), d);
    for (int r = 0; r < KDL_HEAD_COUNT_; r++)
        cr_expect_eq(kdl_head_rule_from_name(kdl_head_rule_name((kdl_head_rule_t)r)), r);
    for (int r = 0; r < KDL_REDUCTION_COUNT_; r++)
        cr_expect_eq(kdl_reduction_from_name(kdl_reduction_name((kdl_reduction_t)r)), r);
    cr_expect_eq(kdl_divergence_from_name("kl"), -1);
    cr_expect_eq(kdl_divergence_from_name(NULL), -1);
}

Test(types, defaults_are_the_documented_ones)
{
    kdl_loss_desc_t d;
    kdl_loss_desc_init(&d);
    cr_expect_eq(d.struct_size, sizeof d);
    cr_expect_eq(d.divergence, KDL_DIV_FKL);
    cr_expect_eq(d.temperature, 1.0);
    cr_expect_eq(d.alpha, 0.1);
    cr_expect_eq(d.beta, 0.5);
    cr_expect_eq(d.mu, 0.5);
    cr_expect_eq(d.head_rule, KDL_HEAD_REFERENCE);
    cr_expect_eq(d.reduction, KDL_REDUCTION_MEAN);
    cr_expect_eq(d.scale, 1.0);
    cr_expect_eq(d.ignore_index, -100);
}

Test(types, half_conversion_closed_forms)
{
    cr_expect_eq(kdl_half_to_float(0x3c00), 1.0f);
    cr_expect_eq(kdl_half_to_float(0xc000), -2.0f);
    cr_expect_eq(kdl_half_to_float(0x7bff), 65504.0f);
    cr_expect_eq(kdl_half_to_float(0x0001), ldexpf(1.0f, -24)); /* smallest subnormal */
    cr_expect_eq(kdl_half_to_float(0x0400), ldexpf(1.0f, -14)); /* smallest normal */
    cr_expect(isinf(kdl_half_to_float(0xfc00)) && kdl_half_to_float(0xfc00) < 0);
    cr_expect(isnan(kdl_half_to_float(0x7e00)));
    /* every finite half survives the round trip */
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = kdl_half_to_float((uint16_t)h);
        if (isnan(f)) continue;
        cr_assert_eq(kdl_float_to_half(f), (uint16_t)h, "half 0x%04x", h);
    }
    cr_expect_eq(kdl_float_to_half(65520.0f), 0x7c00);           /* ties to even: inf */
    cr_expect_eq(kdl_float_to_half(1.0f + ldexpf(1.0f, -11)), 0x3c00); /* tie -> even */
}

Test(types, bf16_conversion_closed_forms)
{
    cr_expect_eq(kdl_bf16_to_float(0x3f80), 1.0f);
    cr_expect_eq(kdl_float_to_bf16(1.0f), 0x3f80);
    cr_expect_eq(kdl_float_to_bf16(1.0f + ldexpf(1.0f, -8)), 0x3f80); /* tie -> even */
    cr_expect_eq(kdl_float_to_bf16(1.0f + 3 * ldexpf(1.0f, -8)), 0x3f82);
    cr_expect(isnan(kdl_bf16_to_float(kdl_float_to_bf16(NAN))));
    cr_expect(isinf(kdl_bf16_to_float(kdl_float_to_bf16(-INFINITY))));
}

Test(types, gpu_entry_points_need_a_device_or_a_handle)
{
    kdl_handle_t h = (kdl_handle_t)0x1;
    kdl_status_t st = kdl_create(&h);
    if (!kdl_device_available()) {
        cr_expect_eq(st, KDL_STATUS_NO_DEVICE);
        cr_expect_null(h);
    } else {
        cr_expect_eq(st, KDL_STATUS_SUCCESS);
        kdl_destroy(h);
    }
    cr_expect_eq(kdl_create(NULL), KDL_STATUS_NULL_POINTER);
    cr_expect_eq(kdl_loss_forward_backward(NULL, NULL, NULL, NULL, 0), KDL_STATUS_NULL_POINTER);
}
