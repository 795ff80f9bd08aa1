/*
 * host/cli_main.c - `kdloss SUBCOMMAND ...`: dispatch and top-level help.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "cli_util.h"
#include "kdloss/kdloss_types.h"

static const struct {
    const char *name;
    int (*run)(int, char **);
    const char *help;
} subcommands[] = {
    {"loss", kdl_cli_loss, "distillation loss (+ gradient) of student/teacher logits in .npy files"},
    {"sinkhorn", kdl_cli_sinkhorn, "batched log-domain Sinkhorn optimal transport"},
    {"sinkd", kdl_cli_sinkd, "SinKD batch-wise Sinkhorn distillation loss"},
    {"bench", kdl_cli_bench, "time the fused kernels on this GPU"},
    {"demo", kdl_cli_demo, "every divergence on an embedded 32k-vocabulary example"},
    {"sparse-loss", kdl_cli_sparse_loss, "loss against a sparse top-k teacher (indices + log-probs)"},
    {"fused-linear", kdl_cli_fused_linear, "loss from hidden states and output weights: dH, dW"},
    {"shard-check", kdl_cli_shard_check, "vocabulary-parallel protocol over K in-process shards vs unsharded"},
};

/* Flushes what --help / --version printed; a write error (a full disk, a
 * closed pipe) is one line on stderr and exit 1, as in the subcommands. */
static int finish_stdout(void)
{
    if (fflush(stdout) == 0 && !ferror(stdout)) return 0;
    fprintf(stderr, "kdloss: cannot write the output: %s\n", strerror(errno));
    return 1;
}

static int usage(void)
{
    printf("usage: kdloss SUBCOMMAND [options]   (kdloss SUBCOMMAND --help)\n\n");
    for (size_t i = 0; i < sizeof subcommands / sizeof subcommands[0]; i++)
        printf("  %-13s %s\n", subcommands[i].name, subcommands[i].help);
    return finish_stdout();
}

int main(int argc, char **argv)
{
    kdl_cli_ignore_sigpipe();
    if (argc < 2) { /* an error is one line on stderr, as in every subcommand */
        fprintf(stderr, "kdloss: no subcommand given (try kdloss --help)\n");
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) return usage();
    if (!strcmp(argv[1], "--version")) {
        printf("kdloss %d.%d.%d\n", KDL_VERSION_MAJOR, KDL_VERSION_MINOR, KDL_VERSION_PATCH);
        return finish_stdout();
    }
    for (size_t i = 0; i < sizeof subcommands / sizeof subcommands[0]; i++)
        if (!strcmp(argv[1], subcommands[i].name)) return subcommands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "kdloss: unknown subcommand '%s' (try kdloss --help)\n", argv[1]);
    return 2;
}
