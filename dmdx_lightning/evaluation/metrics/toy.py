"""Metrics of the built-in toy teachers, as components: digits (8x8 images) and the Gaussian
mixture (exact mode statistics on latents).

They wrap the functions the toy teachers' callbacks and summaries already use
(:func:`dmdx_lightning.evaluation.digits.digits_metrics` / ``digits_diversity``,
:func:`dmdx_lightning.teachers.mixture.mixture_metrics`), imported on use: the metrics package
must not pull a teacher family in for every metric.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from dmdx_lightning.evaluation.metrics.base import Metric, MetricResult, package_info
from dmdx_lightning.evaluation.samples import SampleSet


class DigitsMetric(Metric):
    """The digits teacher's scores: ``fd``, ``precision``, ``recall``, ``class_accuracy``,
    ``class_coverage`` (:func:`~dmdx_lightning.evaluation.digits.digits_metrics`, against
    scikit-learn's 1797 real digits) and ``diversity``
    (:func:`~dmdx_lightning.evaluation.digits.digits_diversity`, when every prompt has at least 2
    samples).

    Samples: 8x8 images; ``SampleSet.from_tensors`` repeats the gray channel to RGB, so the
    classifier reads channel 0 (the three are equal) mapped back to ``[-1, 1]``. Each prompt names
    its digit ("zero" ... "nine" or a numeral, the teacher's ``prompt_to_label``).

    Args:
        classifier: weights of the evaluation classifier (default: the packaged one).
        k: neighbourhood size of precision / recall.
        diversity: also compute ``diversity`` (needs several samples per prompt).
    """

    name = "digits"
    modality = "image"

    def __init__(self, classifier: str | None = None, k: int = 3, diversity: bool = True) -> None:
        self.classifier_path, self.k, self.diversity_enabled = classifier, k, diversity
        self.classifier = None

    def load(self) -> None:
        if self.classifier is None:
            from dmdx_lightning.teachers.digits import load_classifier

            self.classifier = load_classifier(self.classifier_path)

    @staticmethod
    def digits(samples: SampleSet, group=None) -> tuple[Tensor, Tensor]:
        """``(pixels (N, 1, 8, 8) in [-1, 1], labels (N,))`` of ``group`` (default: every sample)."""
        from dmdx_lightning.teachers.digits import NULL_CLASS, prompt_to_label

        group = samples.samples if group is None else group
        pixels = torch.stack([samples.load(s) for s in group])
        if pixels.ndim != 4 or pixels.shape[-2:] != (8, 8):
            raise ValueError(f"DigitsMetric scores 8x8 digit images, got pixels of shape {tuple(pixels.shape)}")
        labels = torch.tensor([prompt_to_label(s.prompt) for s in group])
        if (labels == NULL_CLASS).any():
            bad = sorted({s.prompt for s, lab in zip(group, labels) if lab == NULL_CLASS})
            raise ValueError(f"DigitsMetric: prompts {bad} name no digit")
        return pixels[:, :1] * 2 - 1, labels

    def quality(self, samples: SampleSet) -> dict[str, float]:
        """``fd``, ``precision``, ``recall``, ``class_accuracy``, ``class_coverage`` of all samples."""
        from dmdx_lightning.evaluation.digits import digits_metrics

        self.load()
        pixels, labels = self.digits(samples)
        return digits_metrics(pixels, labels, self.classifier, self.k)

    def diversity(self, samples: SampleSet) -> float:
        """Mean over prompts of the within-prompt distance on the classifier's maps (every prompt
        needs at least 2 samples)."""
        from dmdx_lightning.evaluation.digits import digits_diversity

        self.load()
        groups = list(samples.by_prompt().values())
        if min(len(g) for g in groups) < 2:
            raise ValueError("DigitsMetric diversity needs at least 2 samples per prompt (pairs)")
        # one prompt at a time: digits_diversity's mean over prompts, for any number of samples per prompt
        return sum(digits_diversity(self.digits(samples, g)[0][None], self.classifier) for g in groups) / len(groups)

    @torch.no_grad()
    def score(self, samples: SampleSet, device: torch.device) -> MetricResult:
        # the digits are cheap: scored on the CPU, where the classifier and the real digits live
        self.check_modality(samples)
        values = self.quality(samples)
        if self.diversity_enabled and min(len(g) for g in samples.by_prompt().values()) >= 2:
            values["diversity"] = self.diversity(samples)
        return MetricResult(values, info={"package": package_info("torchmetrics", "scikit-learn"),
                                          "model": self.classifier_path or "packaged digits classifier"})


class MixtureMetric(Metric):
    """The Gaussian-mixture teacher's exact scores
    (:func:`~dmdx_lightning.teachers.mixture.mixture_metrics`): ``precision``, ``modes_covered``,
    ``modes_total``, ``coverage``, ``tv``, ``min_weight_covered`` and their ``_2r`` variants.

    The mixture's samples are latents ``(16, 8, 8)`` drawn around 64 random mode means in
    ``N(0, 1)`` units; they have no pixel form (the teacher's ``decode`` keeps channel 0 only,
    clamped), and a :class:`SampleSet` holds ``[0, 1]`` RGB pixels, so :meth:`score` refuses a
    SampleSet and :meth:`score_latents` takes the raw samples and their prompts.

    Args: the mixture's parameters, as :class:`~dmdx_lightning.teachers.mixture.MixtureTeacher`
    takes them (they rebuild the same mixture), and ``radius_sigmas`` (the typical-set radius).
    """

    name = "mixture"
    modality = "any"

    def __init__(self, shape: Sequence[int] = (16, 8, 8), num_classes: int = 4, modes_per_class: int = 16,
                 std: float = 0.1, weight_ratio: float = 10.0, mixture_seed: int = 0, radius_sigmas: float = 3.0) -> None:
        self.mixture_args = dict(shape=tuple(shape), num_classes=num_classes, modes_per_class=modes_per_class,
                                 std=std, weight_ratio=weight_ratio, seed=mixture_seed)
        self.radius_sigmas = radius_sigmas
        self.mixture = None

    def load(self) -> None:
        if self.mixture is None:
            from dmdx_lightning.teachers.mixture import GaussianMixture

            a = self.mixture_args
            self.mixture = GaussianMixture(a["shape"], a["num_classes"], a["modes_per_class"], a["std"],
                                           a["weight_ratio"], a["seed"])

    @torch.no_grad()
    def score_latents(self, latents: Tensor, prompts: Sequence[str]) -> MetricResult:
        """Score raw mixture samples ``(N, *shape)`` whose prompts name their class
        (``"mixture class 3"``); ``mode_mass`` (per class, per mode) goes to ``info``."""
        from dmdx_lightning.teachers.mixture import mixture_metrics, prompt_to_class

        self.load()
        if tuple(latents.shape[1:]) != tuple(self.mixture.shape):
            raise ValueError(f"MixtureMetric: latents of shape {tuple(latents.shape[1:])}, the mixture's is "
                             f"{tuple(self.mixture.shape)} (shape= must match the teacher's)")
        labels = torch.tensor([prompt_to_class(p, self.mixture.num_classes) for p in prompts])
        if (labels >= self.mixture.num_classes).any():
            raise ValueError("MixtureMetric: every prompt must name a class (the empty prompt is unconditional)")
        out = mixture_metrics(latents.float().cpu(), labels, self.mixture.cpu(), self.radius_sigmas)
        mode_mass = out.pop("mode_mass")
        return MetricResult({k: float(v) for k, v in out.items()},
                            info={"mode_mass": mode_mass, "mixture": self.mixture_args,
                                  "radius_sigmas": self.radius_sigmas})

    def score(self, samples: SampleSet, device: torch.device) -> MetricResult:
        raise TypeError("MixtureMetric scores the mixture's latents, which have no pixel form: a SampleSet "
                        "holds [0, 1] RGB pixels. Call MixtureMetric.score_latents(latents, prompts) instead.")
