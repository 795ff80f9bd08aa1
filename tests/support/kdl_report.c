/*
 * tests/support/kdl_report.c - makes skipped tests visible whatever
 * Criterion's verbosity: each skip is printed with its reason, and every
 * suite ends with a count of its skipped tests.  Linked into every test
 * executable (kdl_test_support is an object library).
 */
#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <stdio.h>

ReportHook(POST_TEST)(struct criterion_test_stats *stats)
{
    if (stats->test_status == CR_STATUS_SKIPPED)
        fprintf(stderr, "[SKIP] %s::%s (%s)\n", stats->test->category, stats->test->name,
                stats->message ? stats->message : "skipped");
}

ReportHook(POST_ALL)(struct criterion_global_stats *stats)
{
    if (stats->tests_skipped)
        fprintf(stderr, "[====] kdloss: %zu of %zu tests skipped (GPU tests without a CUDA device)\n",
                stats->tests_skipped, stats->nb_tests);
}
