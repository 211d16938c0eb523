"""The `fastclip` command line: `fastclip <command> --help` documents each command."""

from __future__ import annotations

import argparse
import sys

from fastclip.checkpoint.files import CheckpointError
from fastclip.commands import demo, evaluate, info, train, zero_shot

COMMANDS = (demo, train, zero_shot, evaluate, info)
# Errors a user can fix from the command line: shown as one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastclip", description="fastclip: fast, memory-lean CLIP for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"fastclip {args.command}: error: {error}", file=sys.stderr)
        return 2
