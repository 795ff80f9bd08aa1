/* host/cli_bench.c - placeholder until the subcommand lands. */
#include <stdio.h>
#include "cli.h"
int kdl_cli_bench(int argc, char **argv)
{
    fprintf(stderr, "kdloss bench: not built yet\n");
    return 2;
}
