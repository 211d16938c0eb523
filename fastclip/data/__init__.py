"""Datasets, image transforms and the training data pipeline."""

from fastclip.data.augment import TrainTransform
from fastclip.data.image_folder import IMAGE_EXTENSIONS, ImageFolder
from fastclip.data.pairs import CaptionCsvDataset, PairBatch, collate_pairs, make_collate
from fastclip.data.sampler import ResumableSampler
from fastclip.data.shards import TarShardDataset, expand_shards
from fastclip.data.synthetic import SyntheticShapes
from fastclip.data.transforms import CLIP_MEAN, CLIP_STD, CLIPPreprocess, load_image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPPreprocess",
    "CaptionCsvDataset",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "PairBatch",
    "ResumableSampler",
    "SyntheticShapes",
    "TarShardDataset",
    "TrainTransform",
    "collate_pairs",
    "expand_shards",
    "load_image",
    "make_collate",
]
