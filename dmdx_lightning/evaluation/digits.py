"""Evaluation of the built-in digits teacher: everything that knows its frozen classifier.

The classifier stands in for Inception (evaluation features) and for SAM (pixel discriminator
backbone) on 8x8 digits; generic callbacks and discriminators never import it.

- :func:`digits_metrics`: Frechet distance on the classifier's features against the real digits
  (torchmetrics' FID machinery with a custom feature extractor), k-NN precision and recall
  (Kynkaanniemi et al. 2019) on the same features, class accuracy and coverage;
  :func:`digits_diversity`: within-prompt distance on the classifier's maps.
- :class:`DigitsMetricsCallback`: both, in the validation loop (``val/...``).
- :class:`DigitsSummary`: the quickstart's end-of-fit report (``runs/quickstart/summary.json``).
- :class:`DigitsClassifierBackbone`: the classifier as ADP's pixel-discriminator backbone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from dmdx_lightning.callbacks.metrics import (ValidationMetric, feature_lpips, knn_precision_recall,
                                              mean_pairwise_distance, sample_images)
from dmdx_lightning.callbacks.samples import fixed_noise
from dmdx_lightning.callbacks.summary import arm_name, format_table, write_json_atomic
from dmdx_lightning.discriminators.pixel import PixelBackbone
from dmdx_lightning.teachers.digits import (DIGIT_PROMPTS, NUM_CLASSES, DigitsClassifier, load_classifier,
                                            load_digits_data)


# ============================================================================ pure functions
class _ClassifierFeatures(nn.Module):
    """torchmetrics hands custom extractors images in ``[0, 1]``; the classifier wants ``[-1, 1]``."""

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images * 2.0 - 1.0)


def classifier_lpips(classifier: DigitsClassifier) -> Callable[[Tensor, Tensor], Tensor]:
    """:func:`feature_lpips` on the digits classifier's three stages (8x8, 4x4, 2x2 maps)."""
    return lambda x, y: feature_lpips(classifier.hidden_states(x), classifier.hidden_states(y))


@torch.no_grad()
def digits_metrics(samples: Tensor, labels: Tensor, classifier: DigitsClassifier, k: int = 3) -> dict[str, float]:
    """Scores of digit samples in ``[-1, 1]`` against scikit-learn's 1797 real digits.

    ``fd`` (Frechet distance on classifier features, lower is better), ``precision`` / ``recall``
    (:func:`knn_precision_recall` on the same features), ``class_accuracy`` (share classified as
    the prompted digit), ``class_coverage`` (share of digits whose prompt produced at least one
    correct sample).
    """
    samples = samples.detach().float().cpu().clamp(-1, 1)
    labels = labels.cpu()
    classifier = classifier.cpu()
    fd = FrechetInceptionDistance(feature=_ClassifierFeatures(classifier), normalize=True,
                                  input_img_size=(1, 8, 8))
    real, _ = load_digits_data("all")
    fd.update((real + 1) / 2, real=True)
    fd.update((samples + 1) / 2, real=False)
    precision, recall = knn_precision_recall(classifier.features(real), classifier.features(samples), k)
    correct = classifier(samples).argmax(-1) == labels
    covered = sum(bool(correct[labels == c].any()) for c in range(NUM_CLASSES))
    return {"fd": float(fd.compute()), "precision": precision, "recall": recall,
            "class_accuracy": float(correct.float().mean()), "class_coverage": covered / NUM_CLASSES}


@torch.no_grad()
def digits_diversity(samples: Tensor, classifier: DigitsClassifier) -> float:
    """Within-prompt diversity: ``samples`` is ``(P, K, 1, 8, 8)`` (``K`` seeds per prompt); the
    mean over prompts of the mean pairwise :func:`classifier_lpips`."""
    classifier = classifier.cpu()
    distance = classifier_lpips(classifier)
    return sum(mean_pairwise_distance(s.float().cpu().clamp(-1, 1), distance) for s in samples) / len(samples)


# ============================================================================ callbacks and backbone
class DigitsMetricsCallback(ValidationMetric):
    """:func:`digits_metrics` and :func:`digits_diversity` of the student, for the digits teacher.

    Logs ``val/fd``, ``val/precision``, ``val/recall``, ``val/class_accuracy``,
    ``val/class_coverage`` and ``val/diversity`` (LPIPS-style distance on the classifier's maps,
    :func:`classifier_lpips`; pixel LPIPS networks cannot read 8x8 images). The digits are cheap,
    so every rank scores all samples (identical on every rank) instead of sharding.

    Args:
        samples_per_digit: samples per digit prompt for FD / precision / recall / accuracy
            (180 gives about as many samples as the 1797 real digits).
        diversity_samples: seeds per digit for diversity (0 skips it).
        k: neighbourhood size of precision / recall.
        classifier: weights of the evaluation classifier (default: the packaged one).
        seed, batch_size, run_on_sanity_check: as in :class:`CLIPScoreCallback`.
    """

    def __init__(self, samples_per_digit: int = 180, diversity_samples: int = 8, k: int = 3,
                 classifier: str | None = None, seed: int = 0, batch_size: int = 512,
                 run_on_sanity_check: bool = False) -> None:
        super().__init__(list(DIGIT_PROMPTS), None, None, seed, batch_size, run_on_sanity_check)
        self.samples_per_digit, self.diversity_samples, self.k = samples_per_digit, diversity_samples, k
        self.classifier_path = classifier
        self.classifier = None

    def _shard(self, trainer, items):
        return list(items)

    def compute(self, trainer, module) -> dict[str, float]:
        if module.teacher.family != "digits":
            raise TypeError(f"DigitsMetricsCallback scores the digits teacher only, this run's teacher is "
                            f"{type(module.teacher).__name__}; use CLIPScoreCallback / LPIPSDiversityCallback")
        if self.classifier is None:
            self.classifier = load_classifier(self.classifier_path)
        n = self.samples_per_digit
        prompts = [p for p in self.prompts for _ in range(n)]
        seeds = [self.seed + i for i in range(len(prompts))]
        images = sample_images(module, prompts, seeds, self.batch_size)
        labels = torch.arange(NUM_CLASSES).repeat_interleave(n)
        values = digits_metrics(images, labels, self.classifier, self.k)
        if self.diversity_samples:
            k = self.diversity_samples
            prompts = [p for p in self.prompts for _ in range(k)]
            seeds = [self.seed + len(seeds) + i for i in range(len(prompts))]
            images = sample_images(module, prompts, seeds, self.batch_size)
            values["diversity"] = digits_diversity(images.view(NUM_CLASSES, k, *images.shape[1:]), self.classifier)
        return values


def _timed(fn, n: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) / n


class DigitsSummary(pl.Callback):
    """After fit, score the student (and the teacher, if the file lacks it) on fixed seeds.

    Writes ``{arm: {nfe, class_accuracy, fd, class_coverage, seconds_per_sample}}`` into
    ``path``, keeping the other arms already there (so several runs fill one table).

    Args:
        path: the summary JSON file.
        arm: this run's row name (default: :func:`arm_name`, e.g. ``adm_1step``).
        samples_per_digit: samples per prompt (seeds ``0..n-1``).
        teacher_steps, teacher_cfg_scale: the teacher arm's sampler (default: the teacher's own).
    """

    def __init__(self, path: str = "runs/quickstart/summary.json", arm: str | None = None,
                 samples_per_digit: int = 50, teacher_steps: int | None = None,
                 teacher_cfg_scale: float | None = None) -> None:
        self.path, self.arm = Path(path), arm
        self.samples_per_digit = samples_per_digit
        self.teacher_steps, self.teacher_cfg_scale = teacher_steps, teacher_cfg_scale

    @rank_zero_only
    def on_fit_end(self, trainer, module) -> None:
        summary = json.loads(self.path.read_text()) if self.path.is_file() else {}
        teacher = module.teacher
        prompts = [p for p in DIGIT_PROMPTS for _ in range(self.samples_per_digit)]
        cond = teacher.encode_prompts(prompts)
        noise = fixed_noise(teacher.latent_shape(len(prompts)), list(range(len(prompts)))).to(module.device)
        classifier = load_classifier()
        module.eval()
        with torch.no_grad():
            if "teacher" not in summary:
                steps = self.teacher_steps or teacher.sample_steps
                cfg = self.teacher_cfg_scale or teacher.cfg_scale
                x, sps = _timed(lambda: teacher.sample_ode(noise, cond, steps, cfg), len(prompts))
                summary["teacher"] = {"nfe": steps * (2 if cfg != 1.0 else 1), "cfg_scale": cfg,
                                      **digits_metrics(x, cond.labels, classifier), "seconds_per_sample": sps}
            gen = torch.Generator(module.device).manual_seed(0)
            x, sps = _timed(lambda: module.sample(cond, noise, generator=gen), len(prompts))
            summary[self.arm or arm_name(module)] = {
                "nfe": len(module.student_timesteps), **digits_metrics(x, cond.labels, classifier),
                "seconds_per_sample": sps}
        write_json_atomic(self.path, summary)
        print(f"\n{self.path}:\n{format_table(summary)}\n")


class DigitsClassifierBackbone(PixelBackbone):
    """The frozen digits classifier (stands in for SAM on the built-in digits teacher).

    Args:
        weights: classifier safetensors (default: the packaged one).
    """

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        self.net = load_classifier(weights)
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        return x  # the classifier was trained on [-1, 1] digits

    def hidden_maps(self, inputs: Tensor) -> list[Tensor]:
        return self.net.hidden_states(inputs)
