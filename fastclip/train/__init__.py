"""Training: `train(TrainConfig(...))`, the loop behind `fastclip train` and `fastclip demo`."""

from fastclip.train.config import TrainConfig
from fastclip.train.interrupt import TrainingInterrupted
from fastclip.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train"]
