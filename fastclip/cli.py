"""The `fastclip` command line."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastclip", description="fastclip: fast, memory-lean CLIP for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="show versions and which backends are built and usable")
    info_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    if args.command == "info":
        from fastclip.info import format_info, info

        report = info()
        print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0
