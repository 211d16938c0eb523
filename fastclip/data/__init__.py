"""Datasets and image transforms."""

from fastclip.data.transforms import CLIP_MEAN, CLIP_STD, CLIPPreprocess, load_image

__all__ = ["CLIP_MEAN", "CLIP_STD", "CLIPPreprocess", "load_image"]
