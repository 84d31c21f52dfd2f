"""Text-image alignment and preference scores: CLIP score, PickScore, HPSv2; ImageReward and MPS
are documented gaps (:class:`~dmdx_lightning.evaluation.metrics.base.MetricUnavailable`).

Every score here is a cosine between a prompt's and an image's embedding in a CLIP-shaped model,
times a constant; they differ in the model and the constant:

| metric | model (what the argument reads) | value per image |
|---|---|---|
| CLIP score | transformers ``CLIPModel`` folder | ``100 * cos`` (torchmetrics' definition) |
| PickScore | transformers ``CLIPModel`` folder | ``model.logit_scale.exp() * cos`` |
| HPSv2 | open_clip ``ViT-H-14`` checkpoint | ``100 * cos`` (the hpsv2 package's, x100) |

Video samples are scored frame by frame, each frame against its prompt (the per-frame CLIP score
of video papers); a video's value is the mean over its frames.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from dmdx_lightning.evaluation.metrics.base import (Metric, MetricResult, MetricUnavailable, frames_of,
                                                    package_info, require_file, require_package, to_uint8)
from dmdx_lightning.evaluation.samples import SampleSet


def _frame_prompts(pixels: Tensor, prompts: list[str]) -> list[str]:
    """Each prompt once per frame of its video (images: unchanged)."""
    return [p for p in prompts for _ in range(pixels.shape[1])] if pixels.ndim == 5 else prompts


def _result(name: str, per_sample: Tensor, samples: SampleSet, info: dict, clamp: bool = False) -> MetricResult:
    """Mean over samples (video: each sample's mean over frames first) and per prompt."""
    per_prompt: dict[int, list[float]] = {}
    for s, v in zip(samples.samples, per_sample.tolist()):
        per_prompt.setdefault(s.prompt_index, []).append(v)
    floor = 0.0 if clamp else float("-inf")
    return MetricResult(values={name: max(float(per_sample.mean()), floor)},
                        per_prompt={i: {name: max(sum(v) / len(v), floor)} for i, v in per_prompt.items()},
                        info=info)


class _TextImageMetric(Metric):
    """Shared loop: ``scores`` of every frame against its prompt, in batches, then the means."""

    batch_size: int
    clamp = False

    def frame_scores(self, pixels: Tensor, prompts: list[str], device: torch.device) -> Tensor:
        """One value per image (``(N, 3, H, W)`` in ``[0, 1]``) against its prompt."""
        raise NotImplementedError

    def scores(self, samples: SampleSet, device: torch.device) -> Tensor:
        """One value per sample (video: the mean over its frames), in the set's order, unclamped."""
        self.check_modality(samples)
        self.load()
        out = []
        for pixels, batch in samples.batches(self.batch_size):
            per_frame = self.frame_scores(frames_of(pixels), _frame_prompts(pixels, [s.prompt for s in batch]), device)
            out.append(per_frame.view(len(batch), -1).mean(dim=1).cpu())
        return torch.cat(out).double()

    def info(self) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, samples: SampleSet, device: torch.device) -> MetricResult:
        return _result(self.name, self.scores(samples, device), samples, self.info(), self.clamp)


class CLIPScore(_TextImageMetric):
    """CLIP score (Hessel et al. 2021) as torchmetrics 1.9 defines it: ``max(100 * mean cos, 0)``.

    The per-image values come from torchmetrics' own update function (``_clip_score_update``: its
    processor call, caption truncation and ``100 * cos``); the mean and the clamp at 0 are
    torchmetrics' ``CLIPScore.compute``. The model loads through
    :func:`~dmdx_lightning.evaluation.metrics.networks.load_clip` because torchmetrics' own loader
    demands "openai" in the path and breaks on transformers 5 outputs.

    Args:
        model_name_or_path: hub id (the paper: ``openai/clip-vit-large-patch14``) or a local folder
            with ``save_pretrained`` output of a ``CLIPModel`` and its processor.
        revision: hub revision.
        batch_size: samples per forward.

    Values: ``clip_score``; per prompt the same over that prompt's samples.
    """

    name = "clip_score"
    modality = "any"
    clamp = True

    def __init__(self, model_name_or_path: str = "openai/clip-vit-large-patch14", revision: str | None = None,
                 batch_size: int = 32) -> None:
        self.model_name_or_path, self.revision, self.batch_size = model_name_or_path, revision, batch_size
        self.model = self.processor = None

    def load(self) -> None:
        if self.model is None:
            from dmdx_lightning.evaluation.metrics.networks import load_clip

            self.model, self.processor = load_clip(self.model_name_or_path, self.revision, owner=type(self).__name__)

    def frame_scores(self, pixels: Tensor, prompts: list[str], device: torch.device) -> Tensor:
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        self.load()
        score, _ = _clip_score_update(list(to_uint8(pixels).to(device)), prompts, self.model.to(device), self.processor)
        return score

    def info(self) -> dict:
        return {"package": package_info("torchmetrics", "transformers"), "model": self.model_name_or_path,
                "definition": "max(100 * mean cosine(image, text), 0)"}


class VideoCLIPScore(CLIPScore):
    """Per-frame CLIP score of videos: every frame against its prompt, a video's mean over its frames,
    then the mean over videos (:class:`CLIPScore`'s definition; the registry's ``video_clip_score``).
    Args as in :class:`CLIPScore`. Values: ``video_clip_score``."""

    name = "video_clip_score"
    modality = "video"


class PickScore(_TextImageMetric):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image, text)``, the official
    definition (github.com/yuvalkirstain/PickScore, README "Inference"), on a transformers
    ``CLIPModel``. No maintained package computes it; the model is a plain ``CLIPModel``, so this
    loads it with transformers and applies the formula.

    The official model (``yuvalkirstain/PickScore_v1``) ships without a processor; its authors use
    the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (text truncated to 77 tokens).

    Args:
        model_name_or_path: hub id (``yuvalkirstain/PickScore_v1``) or local ``CLIPModel`` folder.
        processor_name_or_path: hub id or local folder of the processor (default: the model's
            folder when it has one, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        revision: hub revision of the model.
        batch_size: samples per forward.

    Values: ``pick_score`` (the paper's tables: about 22 for SDXL).
    """

    name = "pick_score"
    modality = "any"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(self, model_name_or_path: str = "yuvalkirstain/PickScore_v1", processor_name_or_path: str | None = None,
                 revision: str | None = None, batch_size: int = 32) -> None:
        self.model_name_or_path, self.processor_name_or_path = model_name_or_path, processor_name_or_path
        self.revision, self.batch_size = revision, batch_size
        self.model = self.processor = None

    def _processor_path(self) -> str:
        if self.processor_name_or_path is not None:
            return self.processor_name_or_path
        folder = Path(self.model_name_or_path)
        # transformers 5 writes processor_config.json, transformers 4 preprocessor_config.json
        has_own = any((folder / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
        return self.model_name_or_path if has_own else self.default_processor

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoProcessor, CLIPModel

        from dmdx_lightning.evaluation.metrics.networks import CLIPEmbedder

        def attempt(argument: str, path: str, load):
            try:
                return load(path)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(
                    f"PickScore could not load {argument}={path!r}: {e}\nGive a hub id (needs the network or a "
                    "filled HF cache) or a local folder (save_pretrained output).") from e

        model = attempt("model_name_or_path", self.model_name_or_path,
                        lambda p: CLIPModel.from_pretrained(p, revision=self.revision))
        self.processor = attempt("processor_name_or_path", self._processor_path(), AutoProcessor.from_pretrained)
        self.model = CLIPEmbedder(model.eval().requires_grad_(False))

    def frame_scores(self, pixels: Tensor, prompts: list[str], device: torch.device) -> Tensor:
        self.load()
        model = self.model.to(device)
        images = self.processor(images=list(to_uint8(pixels)), return_tensors="pt")
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_emb = model.get_image_features(images["pixel_values"].to(device))
        text_emb = model.get_text_features(text["input_ids"].to(device), text["attention_mask"].to(device))
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return model.model.logit_scale.exp() * (image_emb * text_emb).sum(-1)

    def info(self) -> dict:
        return {"package": package_info("transformers"), "model": self.model_name_or_path,
                "processor": self._processor_path(), "definition": "logit_scale.exp() * cosine(image, text)"}


class HPSv2(_TextImageMetric):
    """Human Preference Score v2 (Wu et al. 2023): ``100 * cos(image, text)`` of an open_clip
    ``ViT-H-14`` fine-tuned on HPD v2 (open_clip_torch 3.3).

    Why not the ``hpsv2`` package: every release (1.0.0-1.2.0) pins ``pytest==7.2.0`` and so does
    not install next to this project's test tools, and its loader downloads the base CLIP weights
    before loading the HPS checkpoint. The score is its ``hpsv2/img_score.py`` on the same model:
    open_clip's eval preprocessing, ``encode_image(normalize=True) . encode_text(normalize=True)``;
    that package reports the bare cosine (about 0.27), papers (and this value) report x100.

    Args:
        checkpoint: the HPS checkpoint file (``HPS_v2.1_compressed.pt``, Hub ``xswu/HPSv2``; a dict
            with ``state_dict`` or a bare state dict of the open_clip model).
        architecture: open_clip model name (``ViT-H-14``) or a model-config JSON file
            (``{"embed_dim": ..., "vision_cfg": ..., "text_cfg": ...}``, what open_clip's
            ``add_model_config`` reads; tests use a tiny one).
        batch_size: samples per forward.

    Values: ``hpsv2`` (the paper's tables: about 27-28).
    """

    name = "hpsv2"
    modality = "any"

    def __init__(self, checkpoint: str, architecture: str = "ViT-H-14", batch_size: int = 16) -> None:
        self.checkpoint, self.architecture, self.batch_size = checkpoint, architecture, batch_size
        self.model = self.preprocess = self.tokenizer = None

    def load(self) -> None:
        if self.model is not None:
            return
        require_package("open_clip", "HPSv2", "open_clip_torch")
        import open_clip

        path = require_file(self.checkpoint, "HPSv2", "checkpoint",
                            "Download HPS_v2.1_compressed.pt (Hub xswu/HPSv2) and give its path.")
        name = self.architecture
        if name.endswith(".json"):
            config = require_file(name, "HPSv2", "architecture", "Give an open_clip model name (ViT-H-14) "
                                  "or an open_clip model-config JSON file.")
            open_clip.add_model_config(config)
            name = config.stem
        model = open_clip.create_model(name, pretrained=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        # checkpoints saved from DistributedDataParallel carry a "module." prefix
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"HPSv2: checkpoint={str(path)!r} does not fit open_clip {name!r}: {e}") from e
        visual = model.visual
        self.preprocess = open_clip.image_transform(visual.image_size, is_train=False,
                                                    mean=getattr(visual, "image_mean", None),
                                                    std=getattr(visual, "image_std", None))
        self.tokenizer = open_clip.get_tokenizer(name)
        self.model = model.eval().requires_grad_(False)

    def frame_scores(self, pixels: Tensor, prompts: list[str], device: torch.device) -> Tensor:
        from torchvision.transforms.functional import to_pil_image

        self.load()
        model = self.model.to(device)
        # PIL, then open_clip's own eval transform: the preprocessing hpsv2 applies to image files
        images = torch.stack([self.preprocess(to_pil_image(x)) for x in to_uint8(pixels)]).to(device)
        image_emb = model.encode_image(images, normalize=True)
        text_emb = model.encode_text(self.tokenizer(prompts).to(device), normalize=True)
        return 100 * (image_emb * text_emb).sum(-1)

    def info(self) -> dict:
        return {"package": package_info("open_clip_torch"), "model": str(self.checkpoint),
                "architecture": self.architecture, "definition": "100 * cosine(image, text)"}


class ImageReward(Metric):
    """ImageReward (Xu et al. 2023): a documented gap; building it raises :class:`MetricUnavailable`.

    Tried: ``image-reward`` 1.5 (the authors' package, its newest release). It cannot run here:
    it pins ``timm==0.6.13`` (open_clip_torch 3.3, used for HPSv2, needs timm >= 1.0); its BLIP
    text encoder imports ``find_pruneable_heads_and_indices`` from transformers, removed in
    transformers 5; its BLIP tokenizer is hard-coded to the Hub id ``bert-base-uncased`` (no local
    path); and it imports OpenAI's ``clip`` module without declaring it (PyPI's ``openai-clip``). Re-implementing
    BLIP's med.py text encoder to load the checkpoint would be a second copy of a model we could not
    check against the authors' numbers, so we do not. Score ImageReward in a separate environment
    with ``pip install image-reward`` (transformers 4.x) on the images ``dmdx evaluate`` writes.
    """

    name = "image_reward"
    modality = "image"

    def __init__(self, *args, **kwargs) -> None:
        raise MetricUnavailable(self.__doc__.split("\n\n", 1)[1].strip())


class MPS(Metric):
    """MPS, Multi-dimensional Preference Score (Zhang et al. 2024): a documented gap; building it
    raises :class:`MetricUnavailable`.

    No PyPI package that we found: the authors' code (github.com/Kwai-Kolors/MPS) is a repository, and its
    checkpoint ``MPS_overall_checkpoint.pth`` is a pickled whole model (``torch.load`` of the
    object) whose classes live in that repository's ``trainer`` module: loading it means running
    that repository's code, and the condition-aware cross-attention head is not described
    precisely enough in the paper to rebuild it and load the weights by name. Score MPS with the
    authors' repository on the images ``dmdx evaluate`` writes.
    """

    name = "mps"
    modality = "image"

    def __init__(self, *args, **kwargs) -> None:
        raise MetricUnavailable(self.__doc__.split("\n\n", 1)[1].strip())
