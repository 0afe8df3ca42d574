"""The command-line front ends: one module per `dopsd` command (`add_arguments(parser)`, `main(args) -> int`);
the library modules they call hold no argument parsing."""
