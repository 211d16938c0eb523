"""The `fastclip` command line: `fastclip <command> --help` documents each command."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from fastclip.checkpoint.files import CheckpointError
from fastclip.commands import demo, eval_command, info, train, zero_shot
from fastclip.commands._interrupted import INTERRUPTED

COMMANDS = (demo, train, zero_shot, eval_command, info)
# Errors a user can fix from the command line: shown as one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line on stderr (exit 2), as every other user
    error is, instead of the usage block followed by the error. `--help` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="fastclip", description="fastclip: fast, memory-lean CLIP for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)  # sub-parsers are OneLineParsers too
    for command in COMMANDS:
        command.add_parser(commands)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: `train` and `demo` print how to resume
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"fastclip {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where nothing is saved (train and demo catch their own and say more)
        print(f"fastclip {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
