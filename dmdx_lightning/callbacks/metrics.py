"""Validation metrics. Methods never import scoring networks: callbacks own them.

The scoring itself lives in the metric components of :mod:`dmdx_lightning.evaluation.metrics`
(the same ones ``dmdx evaluate`` uses); a callback samples the student on fixed prompts and seeds,
wraps the pixels in :meth:`SampleSet.from_tensors <dmdx_lightning.evaluation.samples.SampleSet.from_tensors>`
and asks the component. The pure functions (:func:`knn_precision_recall`, :func:`feature_lpips`,
:func:`mean_pairwise_distance`) and the loaders (:func:`load_clip`, :class:`CLIPEmbedder`,
:func:`load_lpips`) moved there too and are re-exported here.

Callbacks, all computed at the end of a validation epoch on fixed prompts and seeds and logged
under ``val/...``:

- :class:`CLIPScoreCallback`: :class:`~dmdx_lightning.evaluation.metrics.CLIPScore` (torchmetrics'
  CLIP score) on student samples (any transformers version; hub id or local folder); video:
  averaged over every frame.
- :class:`LPIPSDiversityCallback`: :class:`~dmdx_lightning.evaluation.metrics.LPIPSDiversity`: per
  prompt, ``K`` samples from ``K`` seeds, mean pairwise LPIPS (the paper's Table 6 diversity);
  video: a pair's distance is the mean over its aligned frames.

Nothing here knows a teacher family: metrics of one family (the digits teacher's
``DigitsMetricsCallback``) live next to it, in :mod:`dmdx_lightning.evaluation`, built on
:class:`ValidationMetric`.

Why the validation loop (and not a step cadence of their own): Lightning then decides when
(``val_check_interval``, ``check_val_every_n_epoch``), ``dmdx validate --ckpt_path`` scores a
checkpoint with the same callbacks, and logged values reach loggers and ``ModelCheckpoint``
monitors. The distillation modules' ``validation_step`` does nothing; the data module must have
validation prompts (``PromptDataModule(val_fraction=...)`` or ``val_file``) for the loop to run.
A callback that is not configured costs nothing: scoring networks load lazily, on first use.
Under DDP every rank samples its share of the prompts (``prompts[rank::world_size]``) and a
torchmetrics ``MeanMetric`` of the per-sample (per-prompt) values averages over all ranks, so
every rank logs the global value.
"""

from __future__ import annotations

from typing import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dmdx_lightning.callbacks.samples import unit_range
from dmdx_lightning.evaluation.metrics.diversity import LPIPSDiversity
from dmdx_lightning.evaluation.metrics.functional import feature_lpips, knn_precision_recall, mean_pairwise_distance
from dmdx_lightning.evaluation.metrics.networks import CLIPEmbedder, load_clip, load_lpips
from dmdx_lightning.evaluation.metrics.text_image import CLIPScore
from dmdx_lightning.evaluation.samples import SampleSet
from dmdx_lightning.rng import fixed_noise

# the pure functions and loaders moved to dmdx_lightning.evaluation.metrics; this path keeps working
__all__ = ["ValidationMetric", "CLIPScoreCallback", "LPIPSDiversityCallback", "sample_images", "sample_set",
           "knn_precision_recall", "feature_lpips", "mean_pairwise_distance", "CLIPEmbedder", "load_clip",
           "load_lpips"]


# ============================================================================ callbacks
def sample_set(images: Tensor, prompts: Sequence[str], prompt_index: Sequence[int] | None = None,
               seeds: Sequence[int] | None = None) -> SampleSet:
    """Decoded samples in ``[-1, 1]`` (images ``(B, C, H, W)``, videos ``(B, C, F, H, W)`` as the
    teachers decode them) as a :class:`SampleSet` (``[0, 1]``, videos frame-major, gray -> RGB)."""
    pixels = unit_range(images)
    if pixels.ndim == 5:
        pixels = pixels.transpose(1, 2)
    return SampleSet.from_tensors(pixels, list(prompts), prompt_index, seeds)


@torch.no_grad()
def sample_images(module, prompts: Sequence[str], seeds: Sequence[int], batch_size: int) -> Tensor:
    """Decoded student samples in ``[-1, 1]`` for ``prompts`` with start noise from ``seeds``.

    The noise of item ``i`` depends on ``seeds[i]`` only, and a multi-step student's re-noising
    generator on the first seed of its batch, so the result does not depend on the rank layout.
    """
    teacher = module.teacher
    out = []
    for start in range(0, len(prompts), batch_size):
        rows, row_seeds = list(prompts[start:start + batch_size]), list(seeds[start:start + batch_size])
        cond = teacher.encode_prompts(rows)
        noise = fixed_noise(teacher.latent_shape(len(rows)), row_seeds).to(module.device)
        generator = torch.Generator(module.device).manual_seed(row_seeds[0])
        out.append(teacher.decode(module.sample(cond, noise, generator=generator)))
    return torch.cat(out)


class ValidationMetric(pl.Callback):
    """Base of every validation-metric callback. Shared plumbing: a fixed prompt list, rank sharding, running at validation epoch end."""

    def __init__(self, prompts: list[str] | None, prompt_file: str | None, max_prompts: int | None,
                 seed: int, batch_size: int, run_on_sanity_check: bool) -> None:
        if (prompts is None) == (prompt_file is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of prompts or prompt_file")
        if prompt_file is not None:
            from dmdx_lightning.data.prompts import dedupe, read_prompts

            prompts = dedupe(read_prompts(prompt_file))
        if not prompts:
            raise ValueError(f"{type(self).__name__}: no prompts (prompt_file={prompt_file})")
        self.prompts = list(prompts)[:max_prompts]
        self.seed, self.batch_size = seed, batch_size
        self.run_on_sanity_check = run_on_sanity_check
        self._ran = False

    def _shard(self, trainer, items: Sequence) -> list:
        return list(items)[trainer.global_rank::trainer.world_size]

    def on_train_end(self, trainer, module) -> None:
        if not self._ran:
            rank_zero_warn(f"{type(self).__name__} never ran: it runs in the validation loop, which this fit did "
                           "not reach. Give the data module validation prompts (PromptDataModule val_fraction or "
                           "val_file) and check trainer.val_check_interval / check_val_every_n_epoch.")

    def on_validation_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking and not self.run_on_sanity_check:
            return
        self._ran = True
        values = self.compute(trainer, module)
        module.log_dict({f"val/{k}": float(v) for k, v in values.items()}, sync_dist=True,
                        batch_size=1)

    def compute(self, trainer, module) -> dict[str, float]:
        raise NotImplementedError


class CLIPScoreCallback(ValidationMetric):
    """CLIP score of the student's samples against their prompts (``val/clip_score``), computed by
    :class:`~dmdx_lightning.evaluation.metrics.CLIPScore` (torchmetrics' definition).

    One sample per prompt (seed ``seed + prompt index``). The CLIP model loads on first use through
    :class:`CLIPEmbedder`, so any transformers version works; a local folder works offline.

    Args:
        model_name_or_path: hub id (e.g. ``openai/clip-vit-large-patch14``, the paper's CLIP score)
            or a local folder with ``save_pretrained`` output of a ``CLIPModel`` and its processor.
        revision: hub revision of the model.
        prompts: the prompts (give this or ``prompt_file``).
        prompt_file: txt / jsonl / csv prompt file (see :mod:`dmdx_lightning.data.prompts`).
        max_prompts: use only the first ``max_prompts`` prompts.
        seed: first noise seed.
        batch_size: samples per student call.
        run_on_sanity_check: also score during Lightning's sanity check before training.
    """

    def __init__(self, model_name_or_path: str = "openai/clip-vit-large-patch14", revision: str | None = None,
                 prompts: list[str] | None = None, prompt_file: str | None = None, max_prompts: int | None = None,
                 seed: int = 0, batch_size: int = 8, run_on_sanity_check: bool = False) -> None:
        super().__init__(prompts, prompt_file, max_prompts, seed, batch_size, run_on_sanity_check)
        self.model_name_or_path, self.revision = model_name_or_path, revision
        self.metric = CLIPScore(model_name_or_path, revision, batch_size=batch_size)

    def compute(self, trainer, module) -> dict[str, float]:
        from torchmetrics import MeanMetric

        mean = MeanMetric().to(module.device)
        indexed = self._shard(trainer, list(enumerate(self.prompts)))
        for start in range(0, len(indexed), self.batch_size):
            chunk = indexed[start:start + self.batch_size]
            prompts, seeds = [p for _, p in chunk], [self.seed + i for i, _ in chunk]
            samples = sample_set(sample_images(module, prompts, seeds, self.batch_size), prompts,
                                 [i for i, _ in chunk], seeds)
            # per sample (video: its mean over frames), unclamped: the mean over all ranks' samples is
            # clamped at 0 once, as torchmetrics' CLIPScore.compute does
            mean.update(self.metric.scores(samples, module.device).to(module.device))
        return {"clip_score": max(float(mean.compute()), 0.0)}


class LPIPSDiversityCallback(ValidationMetric):
    """Within-prompt diversity (paper Table 6): for each prompt, ``samples_per_prompt`` samples
    from as many seeds, mean pairwise LPIPS; averaged over prompts (``val/lpips_diversity``),
    computed by :class:`~dmdx_lightning.evaluation.metrics.LPIPSDiversity`.

    Args:
        prompts: the prompts (give this or ``prompt_file``).
        prompt_file: txt / jsonl / csv prompt file.
        max_prompts: use only the first ``max_prompts`` prompts.
        samples_per_prompt: ``K`` seeds per prompt (``K (K - 1) / 2`` pairs); seeds are
            ``seed + K * prompt_index + j``.
        net: LPIPS backbone, ``alex`` (the usual choice), ``vgg`` or ``squeeze``.
        backbone_weights: torchvision weight file of that backbone, for offline clusters (default:
            torchvision's usual place, ``$TORCH_HOME/hub/checkpoints``).
        pnet_rand: random backbone weights (tests only: the numbers mean nothing).
        min_size: images smaller than this (shorter side) are upsampled to it first, because
            AlexNet's strided layers need about 32 pixels or more.
        seed, batch_size, run_on_sanity_check: as in :class:`CLIPScoreCallback`.
    """

    def __init__(self, prompts: list[str] | None = None, prompt_file: str | None = None,
                 max_prompts: int | None = None, samples_per_prompt: int = 4, net: str = "alex",
                 backbone_weights: str | None = None, pnet_rand: bool = False, min_size: int = 64,
                 seed: int = 0, batch_size: int = 8, run_on_sanity_check: bool = False) -> None:
        super().__init__(prompts, prompt_file, max_prompts, seed, batch_size, run_on_sanity_check)
        if samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be at least 2 (pairs), got {samples_per_prompt}")
        self.samples_per_prompt = samples_per_prompt
        self.net, self.backbone_weights, self.pnet_rand = net, backbone_weights, pnet_rand
        self.min_size = min_size
        self.metric = LPIPSDiversity(net, backbone_weights, pnet_rand, min_size, batch_size)

    @property
    def lpips(self):
        """The loaded ``lpips.LPIPS`` network (``None`` before the first validation)."""
        return self.metric.model

    def compute(self, trainer, module) -> dict[str, float]:
        from torchmetrics import MeanMetric

        self.metric.load()  # before sampling: a random backbone (pnet_rand) then draws the same on every rank
        mean = MeanMetric().to(module.device)
        k = self.samples_per_prompt
        for index, prompt in self._shard(trainer, list(enumerate(self.prompts))):
            seeds = [self.seed + k * index + j for j in range(k)]
            samples = sample_set(sample_images(module, [prompt] * k, seeds, self.batch_size), [prompt] * k,
                                 [index] * k, seeds)
            with torch.no_grad():
                value = self.metric.per_prompt(samples, module.device)[index]
            mean.update(torch.tensor(value, device=module.device))
        return {"lpips_diversity": float(mean.compute())}  # weighted mean over all ranks' prompts
