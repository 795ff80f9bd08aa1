/*
 * host/cli.h - the `kdloss` command: one entry per subcommand.  Each returns
 * the process exit code: 0 success, 2 bad usage or bad input (one line on
 * stderr), 1 a failure while computing.  A failed run writes no output file.
 */
#ifndef KDLOSS_HOST_CLI_H
#define KDLOSS_HOST_CLI_H

int kdl_cli_loss(int argc, char **argv);     /* host/cli_loss.c     */
int kdl_cli_demo(int argc, char **argv);     /* host/cli_demo.c     */
int kdl_cli_sinkhorn(int argc, char **argv); /* host/cli_sinkhorn.c */
int kdl_cli_sinkd(int argc, char **argv);    /* host/cli_sinkhorn.c */
int kdl_cli_bench(int argc, char **argv);    /* host/cli_bench.c    */

/* The option parsing of `kdloss demo` alone (the demo itself computes for a
 * while): the exit code of bad options (error printed), else 0 with *help
 * and *backend (a kdl_cli_backend_t) set.  kdl_cli_demo starts with it; the
 * fuzz target tests/fuzz/fuzz_cli_args.c uses it to run each valid demo
 * invocation once. */
int kdl_cli_demo_parse(int argc, char **argv, int *backend, int *help);

int kdl_cli_sparse_loss(int argc, char **argv);  /* host/cli_ext.c     */
int kdl_cli_fused_linear(int argc, char **argv); /* host/cli_ext.c     */
int kdl_cli_shard_check(int argc, char **argv);  /* host/cli_ext.c     */

#endif
