/*
 * tests/support/kdl_cli_run.h - running the built `kdloss` command from a
 * test and reading its JSON output.
 *
 *   - kdl_run_cli() / KDL_CLI(): fork/exec KDL_CLI_PATH with stdout and
 *     stderr captured through files in KDL_TEST_TMPDIR, and the exit status;
 *   - kdl_run_cli_closed_stdout(): the same with stdout a closed pipe;
 *   - kdl_expect_cli_error(): a failed run's contract (status, one line on
 *     stderr, nothing on stdout); kdl_file_exists(), kdl_no_temporaries()
 *     for "a failed run leaves no output file and no temporary";
 *   - kdl_tmp_path(): a per-process file name in KDL_TEST_TMPDIR, and
 *     kdl_slurp() to read a small file back;
 *   - kdl_json_valid() / kdl_json_valid_object(): a strict RFC 8259
 *     recursive-descent validator (no NaN, no trailing commas, no leading
 *     zeros, control characters escaped, no value inside more than
 *     KDL_JSON_MAX_DEPTH arrays or objects);
 *   - kdl_json_find() / kdl_json_read_*(): values of keys in kdloss's
 *     output, written as `"key": value` with unique keys, NaN as null and
 *     infinities as "inf" / "-inf".
 *
 * The reading helpers fail the current Criterion test (cr_assert) when a
 * key is missing or a value is not what was asked for.  They are named
 * apart from the library's JSON writer (kdl_json_number & co., linked into
 * every test through kdloss_static).
 */
#ifndef KDL_CLI_RUN_H
#define KDL_CLI_RUN_H

#include <stddef.h>
#include <stdint.h>

#include "npy.h"

/* ------------------------------------------------------- running the CLI */

/* What one run of the command left: sizes fit the largest output of any
 * suite (--reduction none over many rows, --stats); longer output is
 * truncated, always NUL-terminated. */
typedef struct kdl_cli_result {
    int code;          /* exit status; 128 + signal number when killed */
    char out[1 << 16]; /* stdout */
    char err[1 << 12]; /* stderr */
} kdl_cli_result_t;

/* Most arguments (without argv[0]) kdl_run_cli() takes. */
#define KDL_CLI_MAX_ARGS 62

/* Writes "KDL_TEST_TMPDIR/<prefix>_<pid>_<name>" into buf (len bytes):
 * distinct per test process, since Criterion runs each test in its own. */
void kdl_tmp_path(char *buf, size_t len, const char *prefix, const char *name);

/* kdl_tmp_path(path, len, prefix, name), then kdl_npy_save of the array
 * there (fails the test when it cannot be written). */
void kdl_tmp_npy(char *path, size_t len, const char *prefix, const char *name, kdl_npy_dtype_t t, int ndim,
                 const int64_t *shape, const void *data);

/* Reads the file at path into buf (cap bytes, at most cap - 1 of the file,
 * NUL-terminated); "" when it cannot be opened. */
void kdl_slurp(const char *path, char *buf, size_t cap);

/* Runs KDL_CLI_PATH with args (NULL-terminated, without argv[0]; at most
 * KDL_CLI_MAX_ARGS), waits for it, and fills *r.  Fails the test when the
 * arguments do not fit or fork/waitpid fail.  The child exits 126 when it
 * cannot redirect its output and 127 when exec fails. */
void kdl_run_cli(kdl_cli_result_t *r, const char *const *args);

/* KDL_CLI(&r, "loss", "--student", path, ...): kdl_run_cli with the
 * arguments listed inline. */
#define KDL_CLI(r, ...) kdl_run_cli((r), (const char *const[]){__VA_ARGS__, NULL})

/* kdl_run_cli with the command's stdout a pipe whose reading end is closed
 * before the command starts: every write to stdout fails (EPIPE; the
 * command ignores SIGPIPE).  r->out is empty. */
void kdl_run_cli_closed_stdout(kdl_cli_result_t *r, const char *const *args);

/* The error contract of a failed run (cr_expect, `what` in the messages):
 * exit status `code`, exactly one line on stderr starting "kdloss CMD: "
 * ("kdloss: " for cmd NULL) and holding `needle` (unless NULL), nothing on
 * stdout. */
void kdl_expect_cli_error(const kdl_cli_result_t *r, int code, const char *cmd, const char *needle,
                          const char *what);

/* 1 when something exists at path (stat succeeds). */
int kdl_file_exists(const char *path);

/* 1 when path's directory holds no "<basename of path>.tmp*" (what an
 * atomic write leaves while it runs). */
int kdl_no_temporaries(const char *path);

/* ----------------------------------------------------------------- JSON */

#define KDL_JSON_MAX_DEPTH 32

/* 1 when s is exactly one JSON value, with only whitespace around it. */
int kdl_json_valid(const char *s);

/* 1 when s is exactly one JSON object, with only whitespace around it. */
int kdl_json_valid_object(const char *s);

/* The text of the value of "key" (the first `"key": ` in json), or NULL
 * when there is none. */
const char *kdl_json_find(const char *json, const char *key);

/* The number at p: null -> NaN, "inf" / "-inf" -> +/-infinity; fails the
 * test when p is NULL or not a number. */
double kdl_json_read_number_at(const char *p);

/* The number value of key; fails the test when the key is missing. */
double kdl_json_read_number(const char *json, const char *key);

/* Reads the array of numbers that is the value of key into v (at most cap
 * elements, read as kdl_json_read_number_at does) and returns its length;
 * fails the test when the key is missing, the value is not an array, or it
 * holds more than cap elements. */
int64_t kdl_json_read_array(const char *json, const char *key, double *v, int64_t cap);

#endif
