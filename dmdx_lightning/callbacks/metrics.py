"""Validation metrics. Methods never import scoring networks: callbacks own them.

Digits teacher: Frechet distance on the frozen classifier's features against the real digits
(torchmetrics' FID machinery with a custom feature extractor), class accuracy and coverage.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from dmdx_lightning.teachers.digits import NUM_CLASSES, DigitsClassifier, load_digits_data


class _ClassifierFeatures(nn.Module):
    """torchmetrics hands custom extractors images in ``[0, 1]``; the classifier wants ``[-1, 1]``."""

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images * 2.0 - 1.0)


@torch.no_grad()
def digits_metrics(samples: Tensor, labels: Tensor, classifier: DigitsClassifier) -> dict[str, float]:
    """``fd`` (vs. all real digits), ``class_accuracy`` (share classified as the prompted digit),
    ``class_coverage`` (share of digits whose prompt produced at least one correct sample)."""
    samples = samples.detach().float().cpu().clamp(-1, 1)
    classifier = classifier.cpu()
    fd = FrechetInceptionDistance(feature=_ClassifierFeatures(classifier), normalize=True,
                                  input_img_size=(1, 8, 8))
    real, _ = load_digits_data("all")
    fd.update((real + 1) / 2, real=True)
    fd.update((samples + 1) / 2, real=False)
    correct = classifier(samples).argmax(-1) == labels.cpu()
    covered = sum(bool(correct[labels.cpu() == c].any()) for c in range(NUM_CLASSES))
    return {"fd": float(fd.compute()), "class_accuracy": float(correct.float().mean()),
            "class_coverage": covered / NUM_CLASSES}
