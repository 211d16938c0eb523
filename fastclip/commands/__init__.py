"""Sub-commands of the `fastclip` command line; each module has `add_parser` and a `run(args)`."""

import argparse


def device_argument(text: str) -> str:
    """argparse `type=` for --device: a torch device string ("cpu", "cuda", "cuda:1") valid on this machine."""
    from fastclip.model.factory import resolve_device

    try:
        resolve_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text
