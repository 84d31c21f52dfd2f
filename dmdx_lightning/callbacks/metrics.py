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
Under DDP every rank samples its share of the prompts (``prompts[rank::world_size]``; CLIP score
shares whole batches of the list, ``batch_size`` prompts each, so that every batch is sampled as one
process samples it) and a torchmetrics ``MeanMetric`` of the per-sample (per-prompt) values
averages over all ranks, so every rank logs the global value, the one-process value. Under FSDP /
FSDP2 every forward is a collective: a rank with a shorter share also samples a repeat of its
first item (not scored), so that every rank runs as many forwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dmdx_lightning.callbacks.samples import check_prompt_list, unit_range
from dmdx_lightning.errors import ConfigError
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


#: LPIPS backbone -> the torchvision ImageNet weight file lpips loads for it (torchvision's cache name)
LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                   "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def reaches_validation(trainer, stage: str, on_sanity_check: bool = False) -> bool:
    """Whether this ``fit`` / ``validate`` runs the validation loop at all (so a metric callback
    will load its network), judged at setup: the loop has data (a data module whose
    ``val_dataloader`` gives some), is not switched off (``limit_val_batches: 0``), and a fit
    reaches its first check (an integer ``val_check_interval`` within ``max_steps``, or the sanity
    check for a metric that runs there). Unsure -> ``True``."""
    if stage not in ("fit", "validate"):
        return False
    if trainer.limit_val_batches == 0:
        return False
    try:  # where the trainer takes its validation loaders from (Lightning's own bookkeeping)
        loop = trainer.fit_loop.epoch_loop.val_loop if stage == "fit" else trainer.validate_loop
        source = loop._data_source
        if not source.is_defined():
            return False
        loaders = source.dataloader() if source.is_module() else source.instance
    except (AttributeError, TypeError):
        return True
    if isinstance(loaders, (list, tuple)) and not loaders:  # e.g. PromptDataModule without val prompts
        return False
    if stage == "validate" or (on_sanity_check and trainer.num_sanity_val_steps != 0):
        return True
    interval = trainer.val_check_interval
    return not (isinstance(interval, int) and 0 <= trainer.max_steps < interval)


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

    The noise of item ``i`` depends on ``seeds[i]`` only, but a multi-step student's re-noising
    noise comes from one generator per batch (seeded with its first seed): the same samples need
    the same batches, whatever the rank layout.
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


def _padded_share(trainer, items: list, share: list) -> list[tuple]:
    """``(item, counts)`` for this rank's ``share`` of ``items`` (``counts``: True); under FSDP / FSDP2,
    where every forward is a collective all ranks must join, padded with ``(items[0], False)`` up to
    the longest share (``ceil(len(items) / world_size)``): sampled, not scored. Without the padding a
    rank with fewer prompts left the others waiting in a forward it never ran."""
    from dmdx_lightning.methods.distributed import shards_parameters

    out = [(item, True) for item in share]
    if shards_parameters(getattr(trainer, "strategy", None)):
        out += [(items[0], False)] * max(0, -(-len(items) // trainer.world_size) - len(share))
    return out


class ValidationMetric(pl.Callback):
    """Base of every validation-metric callback. Shared plumbing: a fixed prompt list, rank sharding, running at validation epoch end.

    Checked before anything runs: the options, at parse time (:meth:`check_options`: the prompts
    exist and are not empty, the counts are sane); the scoring network, at setup
    (:meth:`check_setup`, which :class:`~dmdx_lightning.callbacks.setup_checks.SetupChecks` calls on
    every rank) when this run will reach the validation loop: a network that cannot load would
    otherwise stop the run at its first validation, after training.
    """

    @property
    def config_key(self) -> str:
        """Where this callback's options sit in a config, for checks made at setup: the class name
        stands for its index in ``trainer.callbacks``, no longer known there."""
        return f"trainer.callbacks[{type(self).__name__}].init_args"

    @classmethod
    def check_options(cls, options, key: str = "trainer.callbacks[0].init_args") -> None:
        """Prompts (a list or a file: exactly one, not empty, read now) and counts; a subclass
        without prompt options (its own fixed prompts) skips the prompt checks."""
        if "prompts" in options or "prompt_file" in options:
            prompts, prompt_file = options.get("prompts"), options.get("prompt_file")
            if (prompts is None) == (prompt_file is None):
                raise ConfigError(f"{key}.prompts / prompt_file", (prompts, prompt_file), "give exactly one",
                                  "e.g. prompt_file: ${dmdx.configs:prompts/eval.txt} (the shipped configs' choice).")
            if prompt_file is not None:
                from dmdx_lightning.data.prompts import read_prompts

                read_prompts(prompt_file, key=f"{key}.prompt_file")  # its message names file, line and fix
            else:
                check_prompt_list(prompts, f"{key}.prompts", "Give the prompts to score, or a prompt_file.")
        for name, least in (("max_prompts", 1), ("batch_size", 1)):
            value = options.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ConfigError(f"{key}.{name}", value, f"must be an integer >= {least}",
                                  "Leave max_prompts out to use every prompt; batch_size 8 is the default.")

    def check_setup(self, trainer, module, stage: str) -> None:
        """Refuse, at setup, a scoring network this run will load but cannot (:meth:`check_network`);
        only when the run reaches the validation loop at all (:func:`reaches_validation`), since the
        network loads on first use. Called by :class:`~dmdx_lightning.callbacks.setup_checks.SetupChecks`."""
        if reaches_validation(trainer, stage, self.run_on_sanity_check):
            self.check_network()

    def check_network(self) -> None:
        """Raise a :class:`~dmdx_lightning.errors.ConfigError` when the scoring network cannot load
        here (offline and not cached, a missing weights file); default: nothing to load."""

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

    @classmethod
    def check_options(cls, options, key: str = "trainer.callbacks[0].init_args") -> None:
        """A local ``model_name_or_path`` must be a ``save_pretrained`` folder (a Hub id is checked at
        setup, offline, when validation will run: :meth:`check_network`)."""
        from dmdx_lightning.preflight import check_model_source

        source = options.get("model_name_or_path") or "openai/clip-vit-large-patch14"
        check_model_source(f"{key}.model_name_or_path", source, revision=options.get("revision"),
                           what="CLIPModel and its processor")

    def check_network(self) -> None:
        from dmdx_lightning.preflight import check_model_source

        check_model_source(f"{self.config_key}.model_name_or_path", self.model_name_or_path, revision=self.revision,
                           what="CLIPModel and its processor", offline=True)

    def __init__(self, model_name_or_path: str = "openai/clip-vit-large-patch14", revision: str | None = None,
                 prompts: list[str] | None = None, prompt_file: str | None = None, max_prompts: int | None = None,
                 seed: int = 0, batch_size: int = 8, run_on_sanity_check: bool = False) -> None:
        super().__init__(prompts, prompt_file, max_prompts, seed, batch_size, run_on_sanity_check)
        self.model_name_or_path, self.revision = model_name_or_path, revision
        self.metric = CLIPScore(model_name_or_path, revision, batch_size=batch_size)

    def compute(self, trainer, module) -> dict[str, float]:
        from torchmetrics import MeanMetric

        mean = MeanMetric().to(module.device)
        indexed = list(enumerate(self.prompts))
        # whole batches to each rank: sharding single prompts regrouped them into other batches than
        # one process samples, and a multi-step student's re-noising (one generator per batch) then
        # gave other samples, so the value depended on the world size
        batches = [indexed[start:start + self.batch_size] for start in range(0, len(indexed), self.batch_size)]
        for chunk, counts in _padded_share(trainer, batches, self._shard(trainer, batches)):
            prompts, seeds = [p for _, p in chunk], [self.seed + i for i, _ in chunk]
            images = sample_images(module, prompts, seeds, self.batch_size)
            if not counts:
                continue  # FSDP padding: sampled only to join the other ranks' forwards
            samples = sample_set(images, prompts, [i for i, _ in chunk], seeds)
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

    @classmethod
    def check_options(cls, options, key: str = "trainer.callbacks[0].init_args") -> None:
        """``samples_per_prompt`` (pairs need 2), ``net`` and a ``backbone_weights`` file that exists."""
        k = options.get("samples_per_prompt", 4)
        if not isinstance(k, int) or k < 2:
            raise ConfigError(f"{key}.samples_per_prompt", k, "diversity compares pairs: at least 2 samples per prompt",
                              "The paper's protocol (Table 6) and the shipped configs use 4.")
        net = options.get("net", "alex")
        if net not in LPIPS_BACKBONES:
            raise ConfigError(f"{key}.net", net, f"choose one of {' | '.join(LPIPS_BACKBONES)}",
                              "alex is the usual LPIPS backbone.")
        weights = options.get("backbone_weights")
        if weights is not None and not Path(weights).expanduser().is_file():
            raise ConfigError(f"{key}.backbone_weights", weights, "no such file",
                              f"Give torchvision's ImageNet {net} weight file ({LPIPS_BACKBONES[net]}), or leave it "
                              "out to use torchvision's cache ($TORCH_HOME/hub/checkpoints).")

    def check_network(self) -> None:
        """Offline, torchvision cannot download the backbone at the first validation: its weight
        file must be in torchvision's cache already, or given as ``backbone_weights``."""
        from dmdx_lightning.preflight import hub_offline

        if self.backbone_weights is not None:
            if not Path(self.backbone_weights).expanduser().is_file():
                raise ConfigError(f"{self.config_key}.backbone_weights", self.backbone_weights, "no such file",
                                  f"Give torchvision's ImageNet {self.net} weight file ({LPIPS_BACKBONES[self.net]}).")
            return
        if self.pnet_rand or not hub_offline():
            return  # random weights (tests), or torchvision downloads the file on first use
        cached = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[self.net]
        if not cached.is_file():
            raise ConfigError(f"{self.config_key}.backbone_weights", None,
                              f"LPIPS needs torchvision's ImageNet {self.net} weights, which are not in its cache "
                              f"({cached}), and this machine is offline (HF_HUB_OFFLINE=1)",
                              f"Download {LPIPS_BACKBONES[self.net]} where there is network (torchvision fetches it "
                              "from download.pytorch.org on first use) and put it there, or set backbone_weights "
                              "to that file.")

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
        indexed = list(enumerate(self.prompts))
        for (index, prompt), counts in _padded_share(trainer, indexed, self._shard(trainer, indexed)):
            seeds = [self.seed + k * index + j for j in range(k)]
            images = sample_images(module, [prompt] * k, seeds, self.batch_size)
            if not counts:
                continue  # FSDP padding: sampled only to join the other ranks' forwards
            samples = sample_set(images, [prompt] * k, [index] * k, seeds)
            with torch.no_grad():
                value = self.metric.per_prompt(samples, module.device)[index]
            mean.update(torch.tensor(value, device=module.device))
        return {"lpips_diversity": float(mean.compute())}  # weighted mean over all ranks' prompts
