"""How `fastclip train` and `fastclip demo` report a run stopped by Ctrl-C or SIGTERM: one line naming the
checkpoint and the command that resumes it, and the shell's exit status for an interrupted process."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from fastclip.train.interrupt import TrainingInterrupted

INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)
# Flags the resume command drops from the original command line (a flag that takes a value: True).
_NOT_RESUMED = {"--resume": True, "--overwrite": False}


def launcher() -> list[str]:
    """How this process was started, as a user would type it again."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: its own options are not visible here, except the per-node process count
        local = os.environ.get("LOCAL_WORLD_SIZE", str(world))
        single_node = local == str(world)
        return [
            "torchrun",
            *(["--standalone"] if single_node else ["<rendezvous options>"]),
            "--nproc-per-node",
            local,
            "-m",
            "fastclip",
        ]
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
        print(
            f"fastclip {command}: interrupted after step {stop.step}; checkpoint saved to {stop.checkpoint}; "
            f"resume with: {resume_command(argv, overwrite)}",
            file=sys.stderr,
        )
    return INTERRUPTED
