"""Sub-commands of the `fastclip` command line; each module has `add_parser` and a `run(args)`."""
