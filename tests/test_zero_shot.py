"""Zero-shot classifier construction, classification, accuracy and retrieval recall on constructed cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastclip.zero_shot import ENSEMBLE_TEMPLATES, accuracy, build_classifier, classify, retrieval_recall


class BagOfWordsModel(torch.nn.Module):
    """encode_text = normalised sum of word embeddings: a transparent stand-in for a text tower."""

    def __init__(self, vocabulary: list[str], dim: int = 16):
        super().__init__()
        self.index = {word: i + 1 for i, word in enumerate(vocabulary)}
        self.embedding = torch.nn.Embedding(len(vocabulary) + 1, dim, padding_idx=0)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        rows = [[self.index[w] for w in t.rstrip(".").split() if w in self.index] for t in texts]
        return torch.tensor([r + [0] * (8 - len(r)) for r in rows])

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.embedding(tokens).sum(1)
        return F.normalize(features, dim=-1) if normalize else features


CLASSES = ["cat", "dog", "car"]


def test_classifier_averages_template_embeddings_then_renormalises() -> None:
    words = sorted({w for t in ENSEMBLE_TEMPLATES for w in t.format("").rstrip(".").split()} | set(CLASSES))
    model = BagOfWordsModel(words)
    classifier = build_classifier(model, model.tokenize, CLASSES, ENSEMBLE_TEMPLATES, batch_size=5)
    assert classifier.shape == (16, 3)
    for c, name in enumerate(CLASSES):
        prompts = [t.format(name) for t in ENSEMBLE_TEMPLATES]
        expected = F.normalize(model.encode_text(model.tokenize(prompts)).mean(0), dim=0)
        torch.testing.assert_close(classifier[:, c], expected.detach())
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))


def test_images_near_a_class_embedding_get_that_class() -> None:
    model = BagOfWordsModel(["a", "photo", "of"] + CLASSES)
    classifier = build_classifier(model, model.tokenize, CLASSES)
    targets = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    images = classifier.T[targets] + 0.05 * torch.randn(len(targets), 16)
    probabilities = classify(images, classifier)
    assert probabilities.shape == (7, 3)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(7))
    assert torch.equal(probabilities.argmax(1), targets)
    assert accuracy(probabilities, targets, topk=(1, 2)) == {1: 1.0, 2: 1.0}


def test_accuracy_top_k() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    targets = torch.tensor([1, 1, 0, 2])
    assert accuracy(scores, targets, topk=(1, 2, 5)) == {1: 0.25, 2: 0.5, 5: 1.0}


def test_retrieval_recall_with_several_captions_per_image() -> None:
    e = torch.eye(4)
    # Captions 0, 1 describe image 0 (1 also resembles image 2), 2 -> image 1, 3 -> image 2 (but looks
    # more like image 3), 4 -> image 3.
    texts = torch.stack([e[0], e[0] + 0.5 * e[2], e[1], e[3] + 0.2 * e[2], e[3]])
    text_to_image = torch.tensor([0, 0, 1, 2, 3])
    recall = retrieval_recall(e, texts, text_to_image, ks=(1, 2))
    assert recall["image_to_text_R@1"] == 0.75  # image 2's best caption is caption 1, its own comes second
    assert recall["image_to_text_R@2"] == 1.0
    assert recall["text_to_image_R@1"] == pytest.approx(0.8)  # caption 3 retrieves image 3 first
    assert recall["text_to_image_R@2"] == 1.0


@pytest.mark.parametrize(
    "classnames, templates, message",
    [
        ([], ("a {}.",), "classnames must be a non-empty list"),
        ("cat", ("a {}.",), "classnames must be a non-empty list"),
        (["cat", "cat"], ("a {}.",), "classnames must be unique"),
        (["cat"], ("a photo.",), "templates must be a non-empty list of strings each containing"),
        (["cat"], (), "templates must be a non-empty list"),
    ],
)
def test_bad_classifier_arguments(classnames, templates, message: str) -> None:
    model = BagOfWordsModel(["cat"])
    with pytest.raises(ValueError, match=message):
        build_classifier(model, model.tokenize, classnames, templates)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same D"):
        classify(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="scores must be"):
        accuracy(torch.randn(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recall(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="indices into the 3 images"):
        retrieval_recall(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 3]))
