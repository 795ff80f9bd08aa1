/* host/cli_loss.c - placeholder until the subcommand lands. */
#include <stdio.h>
#include "cli.h"
int kdl_cli_loss(int argc, char **argv)
{
    fprintf(stderr, "kdloss loss: not built yet\n");
    return 2;
}
