"""Sub-commands of the `fastclip` command line; each module has `add_parser` and a `run(args)`.

Modules whose names start with "_" are not sub-commands: they hold what several sub-commands share, so
that no sub-command imports another.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def device_argument(text: str) -> str:
    """argparse `type=` for --device: a torch device string ("cpu", "cuda", "cuda:1") valid on this machine."""
    from fastclip.model.factory import resolve_device

    try:
        resolve_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


def add_command(
    commands: argparse._SubParsersAction,
    name: str,
    help: str,
    description: str | None,
    run: Callable[[argparse.Namespace], int],
    *,
    keep_layout: bool = True,
) -> argparse.ArgumentParser:
    """The parser of sub-command `name`, which calls `run(args)`. `keep_layout` shows the description (the
    module docstring, with its example command lines) as written rather than re-wrapped."""
    formatter = argparse.RawDescriptionHelpFormatter if keep_layout else argparse.HelpFormatter
    parser = commands.add_parser(name, help=help, description=description, formatter_class=formatter)
    parser.set_defaults(run=run)
    return parser
