"""Evaluation of the built-in digits teacher: everything that knows its frozen classifier.

The classifier stands in for Inception (evaluation features) and for SAM (pixel discriminator
backbone) on 8x8 digits; generic callbacks and discriminators never import it.

- :func:`digits_metrics`: Frechet distance on the classifier's features against the real digits
  (torchmetrics' FID machinery with a custom feature extractor), k-NN precision and recall
  (Kynkaanniemi et al. 2019) on the same features, class accuracy and coverage;
  :func:`digits_diversity`: within-prompt distance on the classifier's maps.
- :class:`DigitsMetricsCallback`: both, in the validation loop (``val/...``), through the metric
  component :class:`~dmdx_lightning.evaluation.metrics.DigitsMetric` (what ``dmdx evaluate`` uses).
- :func:`evaluate_digits`: the one scoring path (fixed seeds) of :class:`DigitsSummary`, the
  quickstart's end-of-fit report (``runs/quickstart/summary.json``), and the quality benchmark.
- :class:`DigitsClassifierBackbone`: the classifier as ADP's pixel-discriminator backbone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from dmdx_lightning.callbacks.metrics import ValidationMetric, sample_images, sample_set
from dmdx_lightning.evaluation.metrics.functional import feature_lpips, knn_precision_recall, mean_pairwise_distance
from dmdx_lightning.evaluation.metrics.toy import DigitsMetric
from dmdx_lightning.callbacks.samples import unit_range
from dmdx_lightning.rng import fixed_noise
from dmdx_lightning.atomic import write_json_atomic
from dmdx_lightning.callbacks.summary import TrainingDiagnostics, arm_name, format_table
from dmdx_lightning.discriminators.pixel import PixelBackbone
from dmdx_lightning.methods.distributed import outside_training_step, summary_ranks
from dmdx_lightning.teachers.base import Conditioning
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
    # these samples alone (sync_on_compute=False): in a multi-process run torchmetrics would otherwise
    # gather and sum every rank's feature statistics at compute, a collective that deadlocked (or
    # crashed) the summary scoring on rank 0 alone and counted the digits metrics' samples once per rank
    fd = FrechetInceptionDistance(feature=_ClassifierFeatures(classifier), normalize=True,
                                  input_img_size=(1, 8, 8), sync_on_compute=False)
    real, _ = load_digits_data("all")
    fd.update(unit_range(real), real=True)
    fd.update(unit_range(samples), real=False)
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
        self.metric = DigitsMetric(classifier, k)  # the scoring: loads the classifier once, on first use

    @property
    def classifier(self) -> DigitsClassifier | None:
        return self.metric.classifier

    def _shard(self, trainer, items):
        return list(items)

    def compute(self, trainer, module) -> dict[str, float]:
        if module.teacher.family != "digits":
            raise TypeError(f"DigitsMetricsCallback scores the digits teacher only, this run's teacher is "
                            f"{type(module.teacher).__name__}; use CLIPScoreCallback / LPIPSDiversityCallback")
        metric = self.metric
        n = self.samples_per_digit
        prompts = [p for p in self.prompts for _ in range(n)]
        seeds = [self.seed + i for i in range(len(prompts))]
        values = metric.quality(sample_set(sample_images(module, prompts, seeds, self.batch_size), prompts, seeds=seeds))
        if self.diversity_samples:
            k = self.diversity_samples
            prompts = [p for p in self.prompts for _ in range(k)]
            seeds = [self.seed + len(seeds) + i for i in range(len(prompts))]
            images = sample_images(module, prompts, seeds, self.batch_size)
            values["diversity"] = metric.diversity(sample_set(images, prompts, seeds=seeds))
        return values


def _timed(fn, n: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) / n


@torch.no_grad()
def evaluate_digits(teacher, sample: Callable[[Conditioning, Tensor], Tensor], nfe: int, samples_per_digit: int = 50,
                    diversity_k: int = 0, classifier: DigitsClassifier | None = None) -> tuple[dict, Tensor | None]:
    """Score a digits sampler on fixed seeds: the one evaluation path of the quickstart's summary
    and the quality benchmark.

    Args:
        teacher: the digits teacher (prompt encoding, latent shape).
        sample: ``(cond, noise) -> samples in [-1, 1]`` (:func:`student_sampler` / :func:`teacher_sampler`).
        nfe: network evaluations per sample, reported as is.
        samples_per_digit: samples per prompt for :func:`digits_metrics` (noise seeds ``0..``).
        diversity_k: seeds per prompt for :func:`digits_diversity` (the seeds after those; 0 skips it).
        classifier: the evaluation classifier (default: the packaged one).

    Returns ``({nfe, fd, precision, recall, class_accuracy, class_coverage, seconds_per_sample[, diversity]},
    the diversity samples as (diversity_k, 10, 1, 8, 8) or None)``.
    """
    classifier = classifier or load_classifier()
    prompts = [p for p in DIGIT_PROMPTS for _ in range(samples_per_digit)]
    cond = teacher.encode_prompts(prompts)
    device = next(teacher.parameters()).device
    noise = fixed_noise(teacher.latent_shape(len(prompts)), list(range(len(prompts)))).to(device)
    x, seconds_per_sample = _timed(lambda: sample(cond, noise), len(prompts))
    values = {"nfe": nfe, **digits_metrics(x, cond.labels, classifier), "seconds_per_sample": seconds_per_sample}
    if not diversity_k:
        return values, None
    prompts = [p for p in DIGIT_PROMPTS for _ in range(diversity_k)]
    seeds = [len(noise) + i for i in range(len(prompts))]
    x = sample(teacher.encode_prompts(prompts), fixed_noise(teacher.latent_shape(len(prompts)), seeds).to(device))
    per_prompt = x.view(NUM_CLASSES, diversity_k, *x.shape[1:])
    values["diversity"] = digits_diversity(per_prompt, classifier)
    return values, per_prompt.transpose(0, 1)


def student_sampler(module) -> tuple[Callable[[Conditioning, Tensor], Tensor], int]:
    """A distillation module's few-step sampler (its EMA when it has one) and its NFE."""
    def sample(cond: Conditioning, noise: Tensor) -> Tensor:
        gen = torch.Generator(module.device).manual_seed(0)
        return module.sample(cond, noise, generator=gen)

    return sample, len(module.student_timesteps)


def teacher_sampler(teacher, steps: int | None = None,
                    cfg_scale: float | None = None) -> tuple[Callable[[Conditioning, Tensor], Tensor], int]:
    """The teacher's own ODE sampler (default: its ``sample_steps`` and ``cfg_scale``) and its NFE."""
    steps = steps or teacher.sample_steps
    cfg = cfg_scale or teacher.cfg_scale
    return (lambda cond, noise: teacher.sample_ode(noise, cond, steps, cfg)), steps * (2 if cfg != 1.0 else 1)


def save_digit_grid(samples: Tensor, path: Path, scale: int = 4) -> None:
    """``(rows, cols, 1, 8, 8)`` digits in ``[-1, 1]`` as one PNG (``scale`` x nearest upsampling)."""
    import torchvision

    rows, cols = samples.shape[:2]
    grid = torchvision.utils.make_grid(unit_range(samples.reshape(rows * cols, *samples.shape[2:])), nrow=cols, padding=1)
    grid = F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, path)


class DigitsSummary(TrainingDiagnostics):
    """After fit, score the student (and the teacher, if the file lacks it) on fixed seeds
    (:func:`evaluate_digits`).

    Writes ``{arm: {nfe, fd, precision, recall, class_accuracy, class_coverage, seconds_per_sample}}``
    (plus ADM's ``logit_gap`` and ``dmd_alignment``, :class:`TrainingDiagnostics`)
    into ``path``, keeping the other arms already there (so several runs fill one table).
    In a multi-process run rank 0 scores and writes (once); under FSDP / FSDP2 every rank samples
    with it, since every forward is a collective.

    Args:
        path: the summary JSON file.
        arm: this run's row name (default: :func:`arm_name`, e.g. ``adm_1step``).
        samples_per_digit: samples per prompt (seeds ``0..n-1``).
        diversity_k: seeds per prompt for the within-prompt ``diversity`` (0 skips it).
        grid: a PNG of those diversity samples (rows: seeds, columns: digits); needs ``diversity_k``.
        score_teacher: add the teacher's row when the file lacks one.
        teacher_steps, teacher_cfg_scale: the teacher arm's sampler (default: the teacher's own).
    """

    def __init__(self, path: str = "runs/quickstart/summary.json", arm: str | None = None,
                 samples_per_digit: int = 50, diversity_k: int = 0, grid: str | None = None,
                 score_teacher: bool = True, teacher_steps: int | None = None,
                 teacher_cfg_scale: float | None = None) -> None:
        if grid and not diversity_k:
            raise ValueError("DigitsSummary: grid needs diversity_k > 0 (the grid shows the diversity samples)")
        self.path, self.arm, self.grid = Path(path), arm, Path(grid) if grid else None
        self.samples_per_digit, self.diversity_k, self.score_teacher = samples_per_digit, diversity_k, score_teacher
        self.teacher_steps, self.teacher_cfg_scale = teacher_steps, teacher_cfg_scale
        super().__init__()

    def on_fit_end(self, trainer, module) -> None:
        # rank 0 scores and writes (every rank samples with it under FSDP / FSDP2: summary_ranks);
        # rank 0's file decides whether the teacher is scored
        strategy = trainer.strategy
        samples, everyone = summary_ranks(trainer)
        if not samples:
            return
        summary = json.loads(self.path.read_text()) if trainer.is_global_zero and self.path.is_file() else {}
        score_teacher = self.score_teacher and "teacher" not in summary
        if everyone:
            score_teacher = bool(strategy.broadcast(score_teacher, src=0))
        classifier = load_classifier()
        module.eval()
        with outside_training_step(strategy):
            if score_teacher:
                sample, nfe = teacher_sampler(module.teacher, self.teacher_steps, self.teacher_cfg_scale)
                summary["teacher"], _ = evaluate_digits(module.teacher, sample, nfe, self.samples_per_digit,
                                                        classifier=classifier)
                summary["teacher"]["cfg_scale"] = self.teacher_cfg_scale or module.teacher.cfg_scale
            sample, nfe = student_sampler(module)
            row, grid = evaluate_digits(module.teacher, sample, nfe, self.samples_per_digit, self.diversity_k,
                                        classifier)
        if not trainer.is_global_zero:
            return
        summary[self.arm or arm_name(module)] = {**row, **self.diagnostics()}
        if self.grid is not None:
            save_digit_grid(grid.cpu(), self.grid)
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
