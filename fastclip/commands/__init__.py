"""Sub-commands of the `fastclip` command line; each module has `add_parser` and a `run(args)`."""

import argparse

import torch


def device_argument(text: str) -> str:
    """argparse `type=` for --device: a torch device string ("cpu", "cuda", "cuda:1"), checked up front."""
    try:
        torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from error
    return text
