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

from fastclip.commands import add_command
from fastclip.commands._interrupted import report_interrupted
from fastclip.train.config import add_config_arguments, config_from_args
from fastclip.train.interrupt import TrainingInterrupted


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "train", "train a CLIP model", __doc__, run)
    add_config_arguments(parser)


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
