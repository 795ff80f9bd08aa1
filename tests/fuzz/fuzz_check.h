/*
 * tests/fuzz/fuzz_check.h - the oracle's assertion, shared by every fuzz
 * target: on failure it names the target and the condition, prints the
 * message, runs the target's dump of the current problem, and aborts (so
 * libFuzzer saves the input).
 *
 *   #define CHECK(cond, ...) FZ_CHECK("fuzz_x", dump_problem(), cond, __VA_ARGS__)
 */
#ifndef KDL_FUZZ_CHECK_H
#define KDL_FUZZ_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define FZ_CHECK(target, dump, cond, ...)                                \
    do {                                                                 \
        if (!(cond)) {                                                   \
            fprintf(stderr, "%s: check failed: %s: ", target, #cond);    \
            fprintf(stderr, __VA_ARGS__);                                \
            fprintf(stderr, "\n");                                       \
            dump;                                                        \
            abort();                                                     \
        }                                                                \
    } while (0)

#endif
