/* host/cli_demo.c - placeholder until the subcommand lands. */
#include <stdio.h>
#include "cli.h"
int kdl_cli_demo(int argc, char **argv)
{
    fprintf(stderr, "kdloss demo: not built yet\n");
    return 2;
}
