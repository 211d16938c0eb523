"""Evaluation beyond zero-shot, as in the CLIP paper: linear probes, few-shot curves, retrieval, prediction views.

    from fastclip.evaluate import image_folder_features, linear_probe, few_shot, plot_few_shot

    train = image_folder_features(model, "digits/train", preprocess, cache_dir="features/")
    test = image_folder_features(model, "digits/test", preprocess, cache_dir="features/")
    probe = linear_probe(train.features, train.targets, test.features, test.targets)
    curve = few_shot(train.features, train.targets, test.features, test.targets, fallback_C=probe.C)
    plot_few_shot(curve, "few_shot.png", linear_probe_top1=probe.top1)

`fastclip eval` runs all of it from the command line (see `fastclip.commands.eval_command`).
"""

from fastclip.evaluate.features import (
    ImageFeatures,
    extract_image_features,
    extract_text_features,
    image_folder_features,
    image_tower_fingerprint,
    text_tower_fingerprint,
)
from fastclip.evaluate.few_shot_curves import FewShotResult, few_shot, plot_few_shot, sample_k_shot
from fastclip.evaluate.linear_probing import (
    PAPER_C_GRID,
    LinearClassifier,
    LinearProbeConfig,
    LinearProbeResult,
    fit_logistic_regression,
    linear_probe,
    mean_per_class_accuracy,
    stratified_split,
    top1_accuracy,
)
from fastclip.evaluate.predictions import Prediction, format_prediction, pick_gallery, save_gallery, top_predictions
from fastclip.evaluate.retrieval import CaptionSet, RetrievalResult, read_caption_csv, recall_at_k, retrieval_from_csv

__all__ = [
    "PAPER_C_GRID",
    "CaptionSet",
    "FewShotResult",
    "ImageFeatures",
    "LinearClassifier",
    "LinearProbeConfig",
    "LinearProbeResult",
    "Prediction",
    "RetrievalResult",
    "extract_image_features",
    "extract_text_features",
    "few_shot",
    "fit_logistic_regression",
    "format_prediction",
    "image_folder_features",
    "image_tower_fingerprint",
    "linear_probe",
    "mean_per_class_accuracy",
    "pick_gallery",
    "plot_few_shot",
    "read_caption_csv",
    "recall_at_k",
    "retrieval_from_csv",
    "sample_k_shot",
    "save_gallery",
    "stratified_split",
    "text_tower_fingerprint",
    "top1_accuracy",
    "top_predictions",
]
