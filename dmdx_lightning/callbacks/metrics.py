"""Validation metrics. Methods never import scoring networks: callbacks own them.

Pure functions (tested against hand-computed values): :func:`knn_precision_recall` (Kynkaanniemi
et al. 2019), :func:`feature_lpips`, :func:`mean_pairwise_distance`.

Callbacks, all computed at the end of a validation epoch on fixed prompts and seeds and logged
under ``val/...``:

- :class:`CLIPScoreCallback`: torchmetrics ``CLIPScore`` on student samples (any transformers
  version; hub id or local folder); video: averaged over every frame.
- :class:`LPIPSDiversityCallback`: per prompt, ``K`` samples from ``K`` seeds, mean pairwise LPIPS
  (the paper's Table 6 diversity); video: a pair's distance is the mean over its aligned frames.

Nothing here knows a teacher family: metrics of one family (the digits teacher's
``DigitsMetricsCallback``) live next to it, in :mod:`dmdx_lightning.evaluation`, built on
:class:`ValidationMetric`.

Why the validation loop (and not a step cadence of their own): Lightning then decides when
(``val_check_interval``, ``check_val_every_n_epoch``), ``dmdx validate --ckpt_path`` scores a
checkpoint with the same callbacks, and logged values reach loggers and ``ModelCheckpoint``
monitors. The distillation modules' ``validation_step`` does nothing; the data module must have
validation prompts (``PromptDataModule(val_fraction=...)`` or ``val_file``) for the loop to run.
A callback that is not configured costs nothing: scoring networks load lazily, on first use.
Under DDP every rank samples its share of the prompts (``prompts[rank::world_size]``) and
torchmetrics sums the metric states across ranks, so every rank logs the global value.
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dmdx_lightning.callbacks.samples import unit_range
from dmdx_lightning.rng import fixed_noise


# ============================================================================ pure functions
def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) on feature vectors.

    Each sample spans a ball reaching its ``k``-th nearest neighbour in its own set. Precision:
    share of ``fake`` inside at least one ``real`` ball (fidelity). Recall: share of ``real``
    inside at least one ``fake`` ball (coverage of the real distribution).
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"k-NN precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    real, fake = real.double(), fake.double()

    def radii(x: Tensor) -> Tensor:  # the k+1-th smallest distance skips the sample itself (0)
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    d = torch.cdist(fake, real)  # (F, R)
    precision = (d <= radii(real)[None, :]).any(dim=1).float().mean()
    recall = (d.T <= radii(fake)[None, :]).any(dim=1).float().mean()
    return float(precision), float(recall)


def feature_lpips(feats_x: Sequence[Tensor], feats_y: Sequence[Tensor]) -> Tensor:
    """LPIPS without learned weights (Zhang et al. 2018, the "baseline" variant) on given maps.

    Per layer: unit-normalise each position's channel vector, squared difference summed over
    channels, averaged over positions; summed over layers. Returns one distance per pair ``(B,)``.
    """
    total = 0.0
    for a, b in zip(feats_x, feats_y, strict=True):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total = total + (a - b).pow(2).sum(dim=1).flatten(1).mean(dim=1)
    return total


def mean_pairwise_distance(samples: Tensor, distance: Callable[[Tensor, Tensor], Tensor],
                           batch_size: int = 256) -> float:
    """Mean of ``distance(x_i, x_j)`` over all ``K (K - 1) / 2`` pairs ``i < j`` of ``samples``."""
    if len(samples) < 2:
        raise ValueError(f"diversity needs at least 2 samples per prompt, got {len(samples)}")
    pairs = torch.tensor(list(itertools.combinations(range(len(samples)), 2)), device=samples.device)
    total = 0.0
    for chunk in pairs.split(batch_size):
        total += float(distance(samples[chunk[:, 0]], samples[chunk[:, 1]]).sum())
    return total / len(pairs)


# ============================================================================ scoring networks
class CLIPEmbedder(nn.Module):
    """A CLIP model whose ``get_image_features`` / ``get_text_features`` return embedding tensors.

    transformers 5 returns a model output object from these methods (the projected embedding in
    ``pooler_output``) where transformers 4 returned the tensor; torchmetrics 1.9 expects the
    tensor. This adapter accepts both, so ``CLIPScore`` works with either version.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self):  # torchmetrics reads text_config.max_position_embeddings to truncate captions
        return self.model.config

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return _embedding(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return _embedding(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _embedding(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot find the CLIP embedding in {type(output).__name__}: expected a tensor or "
                    "an output with image_embeds / text_embeds / pooler_output")


def load_clip(model_name_or_path: str, revision: str | None = None) -> tuple[CLIPEmbedder, object]:
    """``(CLIPEmbedder, processor)`` from a hub id (e.g. ``openai/clip-vit-large-patch14``) or a
    local folder holding ``save_pretrained`` output of a ``CLIPModel`` and its processor."""
    from transformers import AutoProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(model_name_or_path, revision=revision)
        processor = AutoProcessor.from_pretrained(model_name_or_path, revision=revision)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"CLIPScoreCallback could not load model_name_or_path={model_name_or_path!r}: {e}\n"
            "Give a hub id (needs the network or a filled HF cache) or a local folder with a CLIPModel "
            "and its processor (model.save_pretrained(DIR); processor.save_pretrained(DIR)).") from e
    return CLIPEmbedder(model.eval().requires_grad_(False)), processor


def load_lpips(net: str = "alex", backbone_weights: str | None = None, pnet_rand: bool = False) -> nn.Module:
    """``lpips.LPIPS`` with its learned linear layers (they ship in the lpips wheel).

    The backbone (ImageNet AlexNet / VGG16 / SqueezeNet) comes from, in order of precedence:
    ``backbone_weights`` (a torchvision state-dict file, e.g. ``alexnet-owt-7be5be79.pth``, for
    offline clusters), random weights (``pnet_rand=True``, for tests only), or torchvision's usual
    place (``$TORCH_HOME/hub/checkpoints``, downloaded there when missing).
    """
    import lpips

    if net not in ("alex", "vgg", "squeeze"):
        raise ValueError(f"LPIPS net must be 'alex', 'vgg' or 'squeeze', got {net!r}")
    offline = pnet_rand or backbone_weights is not None
    try:
        model = lpips.LPIPS(net=net, pnet_rand=offline, verbose=False)
    except Exception as e:  # torchvision's download error when offline; keep the cause
        raise RuntimeError(
            f"LPIPS could not fetch the ImageNet {net} backbone ({e}). Offline: place torchvision's weight file "
            "in $TORCH_HOME/hub/checkpoints/ or pass backbone_weights=<that file>.") from e
    if backbone_weights is not None:
        _load_lpips_backbone(model.net, backbone_weights)
    return model.eval().requires_grad_(False)


def _load_lpips_backbone(pnet: nn.Module, path: str) -> None:
    """lpips splits torchvision's ``features[i]`` into ``slice<n>.<i>``; map the names back."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"LPIPS backbone_weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    wanted = {}
    for name in pnet.state_dict():
        key = "features." + name.split(".", 1)[1]  # slice2.3.weight -> features.3.weight
        if key not in state:
            raise KeyError(f"LPIPS backbone_weights {path} has no {key!r}: is it torchvision's "
                           f"state dict of the same network ({type(pnet).__name__})?")
        wanted[name] = state[key]
    pnet.load_state_dict(wanted)


# ============================================================================ callbacks
def _frames(images: Tensor) -> Tensor:
    """Video ``(B, C, F, H, W)`` -> its frames ``(B F, C, H, W)`` (sample-major); images pass through."""
    return images.transpose(1, 2).flatten(0, 1) if images.ndim == 5 else images


def _images_uint8(images: Tensor) -> Tensor:
    """``[-1, 1]`` images (video: every frame, sample-major; gray -> RGB) as ``uint8`` ``(N, 3, H, W)``."""
    images = _frames(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (unit_range(images) * 255).round().to(torch.uint8)


def _as_rgb(images: Tensor) -> Tensor:
    """``[-1, 1]`` images ``(B, 1 or 3, H, W)`` or videos ``(B, 1 or 3, F, H, W)`` as RGB, clamped."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, *images.shape[2:])
    return images.float().clamp(-1, 1)


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
    """torchmetrics ``CLIPScore`` of the student's samples against their prompts (``val/clip_score``).

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
        self.metric = None

    def _metric(self, device: torch.device):
        if self.metric is None:
            from torchmetrics.multimodal.clip_score import CLIPScore

            # a callable, not the string: torchmetrics' own loader demands "openai" in the path and
            # breaks on transformers 5 outputs
            self.metric = CLIPScore(model_name_or_path=partial(load_clip, self.model_name_or_path, self.revision))
        return self.metric.to(device)

    def compute(self, trainer, module) -> dict[str, float]:
        metric = self._metric(module.device)
        indexed = self._shard(trainer, list(enumerate(self.prompts)))
        for start in range(0, len(indexed), self.batch_size):
            chunk = indexed[start:start + self.batch_size]
            prompts = [p for _, p in chunk]
            images = sample_images(module, prompts, [self.seed + i for i, _ in chunk], self.batch_size)
            if images.ndim == 5:  # video: every frame against its prompt, so the score is the frame average
                prompts = [p for p in prompts for _ in range(images.shape[2])]
            metric.update(list(_images_uint8(images)), prompts)
        value = metric.compute()  # sums score and count over ranks
        metric.reset()
        return {"clip_score": float(value)}


class LPIPSDiversityCallback(ValidationMetric):
    """Within-prompt diversity (paper Table 6): for each prompt, ``samples_per_prompt`` samples
    from as many seeds, mean pairwise LPIPS; averaged over prompts (``val/lpips_diversity``).

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
        self.lpips = None

    def _distance(self, device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
        if self.lpips is None:
            self.lpips = load_lpips(self.net, self.backbone_weights, self.pnet_rand)
        model = self.lpips.to(device)

        def distance(x: Tensor, y: Tensor) -> Tensor:
            n = x.shape[0]
            x, y = _frames(x), _frames(y)  # video: frame f of one sample against frame f of the other
            if min(x.shape[-2:]) < self.min_size:
                scale = self.min_size / min(x.shape[-2:])
                x, y = (F.interpolate(v, scale_factor=scale, mode="bilinear", align_corners=False) for v in (x, y))
            return model(x, y).reshape(n, -1).mean(dim=1)  # one distance per pair, averaged over frames

        return distance

    def compute(self, trainer, module) -> dict[str, float]:
        from torchmetrics import MeanMetric

        distance = self._distance(module.device)
        mean = MeanMetric().to(module.device)
        k = self.samples_per_prompt
        for index, prompt in self._shard(trainer, list(enumerate(self.prompts))):
            seeds = [self.seed + k * index + j for j in range(k)]
            images = _as_rgb(sample_images(module, [prompt] * k, seeds, self.batch_size))
            mean.update(torch.tensor(mean_pairwise_distance(images, distance, self.batch_size), device=module.device))
        return {"lpips_diversity": float(mean.compute())}  # weighted mean over all ranks' prompts
