/* host/cli_sinkhorn.c - placeholder until the subcommands land. */
#include <stdio.h>
#include "cli.h"
int kdl_cli_sinkhorn(int argc, char **argv)
{
    fprintf(stderr, "kdloss sinkhorn: not built yet\n");
    return 2;
}
int kdl_cli_sinkd(int argc, char **argv)
{
    fprintf(stderr, "kdloss sinkd: not built yet\n");
    return 2;
}
