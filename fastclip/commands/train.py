"""`fastclip train`: train a CLIP model (see `fastclip train --help`; options also from --config FILE).

    fastclip train --dataset synthetic --steps 2000 --output-dir runs/shapes
    fastclip train --config run.yaml --resume latest
    fastclip train --dataset synthetic --loss siglip --steps 2000 --output-dir runs/siglip
    fastclip train --dataset synthetic --use-labels --steps 2000 --output-dir runs/labels
    fastclip train --dataset csv --train-data pairs.csv --use-labels --csv-label-key label
    torchrun --standalone --nproc-per-node 8 -m fastclip train --model ViT-B-16 --dataset shards \\
        --train-data "data/{00000..01023}.tar" --batch-size 256 --precision bf16

The output folder must be empty: continue the run in it with --resume latest, or start over with
--overwrite, which deletes only the files fastclip writes there. Ctrl-C (or SIGTERM) finishes the current
step, saves a checkpoint and prints the command that resumes it (exit status 130).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from fastclip.train.config import add_config_arguments, config_from_args
from fastclip.train.interrupt import TrainingInterrupted

INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)
# Flags the resume command drops from the original command line (a flag that takes a value: True).
_NOT_RESUMED = {"--resume": True, "--overwrite": False}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a CLIP model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fastclip.train.loop import summary, train

    config = config_from_args(args)
    try:
        result = train(config)
    except TrainingInterrupted as stop:
        return report_interrupted(stop, "train", getattr(args, "argv", []), config.overwrite)
    if result.model_path is not None:  # rank 0
        print(json.dumps(summary(result), indent=2))
    return 0


def launcher() -> list[str]:
    """How this process was started, as a user would type it again."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: its own options are not visible here, except the per-node process count
        local = os.environ.get("LOCAL_WORLD_SIZE", str(world))
        single_node = local == str(world)
        return ["torchrun", *(["--standalone"] if single_node else ["<rendezvous options>"]), "--nproc-per-node", local,
                "-m", "fastclip"]
    if Path(sys.argv[0]).name == "fastclip":  # the console script
        return ["fastclip"]
    return [sys.executable, "-m", "fastclip"]


def resume_command(argv: list[str], overwrite: bool = False) -> str:
    """The command line `argv` (a sub-command and its flags) again, continuing from the latest checkpoint."""
    kept, skip_value = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip_value:
            skip_value = False
        elif name in _NOT_RESUMED:
            skip_value = _NOT_RESUMED[name] and "=" not in arg
        else:
            kept.append(arg)
    # overwrite set in a --config file would contradict --resume: the flag overrides the file
    from_file = overwrite and any(arg.split("=", 1)[0] == "--config" for arg in argv)
    extra = ["--no-overwrite"] if from_file else []
    return shlex.join([*launcher(), *kept, *extra, "--resume", "latest"])


def report_interrupted(stop: TrainingInterrupted, command: str, argv: list[str], overwrite: bool = False) -> int:
    """The one line of a run stopped by a signal (rank 0; the others say nothing), and its exit status."""
    if stop.checkpoint is not None:
        print(f"fastclip {command}: interrupted after step {stop.step}; checkpoint saved to {stop.checkpoint}; "
              f"resume with: {resume_command(argv, overwrite)}", file=sys.stderr)
    return INTERRUPTED
