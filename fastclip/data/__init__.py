"""Datasets and image transforms."""

from fastclip.data.image_folder import IMAGE_EXTENSIONS, ImageFolder
from fastclip.data.transforms import CLIP_MEAN, CLIP_STD, CLIPPreprocess, load_image

__all__ = ["CLIP_MEAN", "CLIP_STD", "CLIPPreprocess", "IMAGE_EXTENSIONS", "ImageFolder", "load_image"]
