"""`fastclip train`: train a CLIP model (see `fastclip train --help`; options also from --config FILE).

    fastclip train --dataset synthetic --steps 2000 --output-dir runs/shapes
    fastclip train --config run.yaml --resume latest
    fastclip train --dataset synthetic --loss siglip --steps 2000 --output-dir runs/siglip
    fastclip train --dataset synthetic --use-labels --steps 2000 --output-dir runs/labels
    fastclip train --dataset csv --train-data pairs.csv --use-labels --csv-label-key label
    torchrun --standalone --nproc-per-node 8 -m fastclip train --model ViT-B-16 --dataset shards \\
        --train-data "data/{00000..01023}.tar" --batch-size 256 --precision bf16
"""

from __future__ import annotations

import argparse
import json

from fastclip.train.config import add_config_arguments, config_from_args


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a CLIP model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fastclip.train.loop import summary, train

    result = train(config_from_args(args))
    if result.model_path is not None:  # rank 0
        print(json.dumps(summary(result), indent=2))
    return 0
