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

int kdl_cli_sparse_loss(int argc, char **argv);  /* host/cli_ext.c     */
int kdl_cli_fused_linear(int argc, char **argv); /* host/cli_ext.c     */
int kdl_cli_shard_check(int argc, char **argv);  /* host/cli_ext.c     */

#endif
