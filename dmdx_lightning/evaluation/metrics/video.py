"""VBench dimensions (Huang et al. 2024) computed offline on injectable models.

Why not the ``vbench`` package: every release pins an old stack (0.1.1-0.1.4: ``torch<2``; 0.1.5:
``transformers==4.33.2``), so it does not install next to this project's torch 2.14 and
transformers 5; and it fetches its models (DINO, CLIP, RAFT, AMT, MUSIQ, the LAION head) from the
network at run time. Each dimension below restates VBench's definition (its
``vbench/<dimension>.py``) on a model given by path, so a cluster without a network can score it:

| dimension | VBench's model -> ours | status |
|---|---|---|
| subject_consistency | DINO ViT-B/16 -> transformers ``ViTModel`` | implemented |
| background_consistency | CLIP ViT-B/32 -> transformers ``CLIPModel`` | implemented |
| dynamic_degree | RAFT (things) -> torchvision ``raft_large`` | implemented |
| aesthetic_quality | CLIP ViT-L/14 + LAION linear head -> the same | implemented |
| motion_smoothness | AMT-S frame interpolation | gap (no package) |
| imaging_quality | MUSIQ (pyiqa) | gap (see class) |

What differs from VBench, and why: VBench reads video files and, for dynamic degree, subsamples
them to about 8 fps; here the frames are the ones the SampleSet holds (every generated frame). The
total VBench score (the paper's 78.58 / 82.07) needs all 16 dimensions and is not computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdx_lightning.evaluation.metrics.base import (Metric, MetricResult, MetricUnavailable, package_info,
                                                    require_file, to_uint8)
from dmdx_lightning.evaluation.metrics.functional import frame_consistency
from dmdx_lightning.evaluation.samples import SampleSet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _video_result(name: str, per_video: list[float], samples: SampleSet, info: dict,
                  weights: list[float] | None = None) -> MetricResult:
    """Weighted mean over videos (default weight 1), and per prompt the same over its videos."""
    weights = weights or [1.0] * len(per_video)
    per_prompt: dict[int, list[tuple[float, float]]] = {}
    for s, v, w in zip(samples.samples, per_video, weights):
        per_prompt.setdefault(s.prompt_index, []).append((v, w))

    def mean(pairs: list[tuple[float, float]]) -> float:
        return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)

    return MetricResult({name: mean(list(zip(per_video, weights)))},
                        per_prompt={i: {name: mean(p)} for i, p in per_prompt.items()}, info=info)


class _VideoMetric(Metric):
    modality = "video"
    batch_size: int

    def video_score(self, frames: Tensor, device: torch.device) -> float:
        """One video ``(F, 3, H, W)`` in ``[0, 1]`` -> its value."""
        raise NotImplementedError

    def info(self) -> dict:
        raise NotImplementedError

    #: VBench's consistency dimensions average over every frame term of every video
    #: (``sim / cnt``): a video weighs its ``F - 1`` terms; the same as the mean over videos when
    #: every video has as many frames, as a generated set does
    frame_weighted = False

    @torch.no_grad()
    def score(self, samples: SampleSet, device: torch.device) -> MetricResult:
        self.check_modality(samples)
        self.load()
        per_video, weights = [], []
        for s in samples.samples:
            frames = samples.load(s)
            frames = (frames if frames.ndim == 4 else frames[None]).to(device)  # an image: a one-frame video
            per_video.append(self.video_score(frames, device))
            weights.append(float(len(frames) - 1) if self.frame_weighted else 1.0)
        return _video_result(self.name, per_video, samples, self.info(), weights)


class _ConsistencyMetric(_VideoMetric):
    """VBench's consistency formula (:func:`~dmdx_lightning.evaluation.metrics.functional.frame_consistency`)
    on per-frame features (:meth:`features`), weighted by frame terms."""

    frame_weighted = True

    def features(self, frames: Tensor, device: torch.device) -> Tensor:
        raise NotImplementedError

    def video_score(self, frames: Tensor, device: torch.device) -> float:
        return float(frame_consistency(self.features(frames, device)).mean())


def clip_image_features(model, processor, frames: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """CLIP image embeddings of frames in ``[0, 1]``, through the model's own processor (resize and
    centre crop as CLIP was trained), ``batch_size`` frames per forward."""
    out = []
    for chunk in to_uint8(frames).cpu().split(batch_size):
        inputs = processor(images=list(chunk), return_tensors="pt")
        out.append(model.get_image_features(inputs["pixel_values"].to(device)))
    return torch.cat(out)


class SubjectConsistency(_ConsistencyMetric):
    """VBench subject consistency: DINO class-token features of each frame; per frame ``i >= 1``
    the mean of ``max(0, cos)`` to frame ``i - 1`` and to frame 0
    (:func:`~dmdx_lightning.evaluation.metrics.functional.frame_consistency`); a video's value is
    the mean over its frames, the set's the mean over all frame terms of all videos (VBench's
    ``sim / cnt``).

    Preprocessing as VBench's ``dino_transform(224)``: shorter side resized to 224, ImageNet
    normalisation, no crop (the ViT interpolates its position embeddings).

    Args:
        model_name_or_path: hub id (``facebook/dino-vitb16``, VBench's DINO ViT-B/16) or a local
            folder with a transformers ``ViTModel`` (``save_pretrained``).
        image_size: the shorter side frames are resized to.
        batch_size: frames per forward.

    Values: ``subject_consistency`` in ``[0, 1]``.
    """

    name = "subject_consistency"

    def __init__(self, model_name_or_path: str = "facebook/dino-vitb16", image_size: int = 224,
                 batch_size: int = 32) -> None:
        self.model_name_or_path, self.image_size, self.batch_size = model_name_or_path, image_size, batch_size
        self.model = None

    def load(self) -> None:
        if self.model is None:
            from transformers import ViTModel

            try:
                model = ViTModel.from_pretrained(self.model_name_or_path, add_pooling_layer=False)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(f"SubjectConsistency could not load model_name_or_path="
                                        f"{self.model_name_or_path!r}: {e}\nGive a hub id (facebook/dino-vitb16) or a "
                                        "local folder with a transformers ViTModel (save_pretrained).") from e
            self.model = model.eval().requires_grad_(False)

    def features(self, frames: Tensor, device: torch.device) -> Tensor:
        model = self.model.to(device)
        scale = self.image_size / min(frames.shape[-2:])
        x = F.interpolate(frames, scale_factor=scale, mode="bilinear", align_corners=False)
        x = (x - x.new_tensor(IMAGENET_MEAN)[:, None, None]) / x.new_tensor(IMAGENET_STD)[:, None, None]
        out = [model(pixel_values=chunk, interpolate_pos_encoding=True).last_hidden_state[:, 0]
               for chunk in x.split(self.batch_size)]
        return torch.cat(out)

    def info(self) -> dict:
        return {"package": package_info("transformers"), "model": self.model_name_or_path,
                "definition": "VBench subject_consistency (DINO CLS features)"}


class BackgroundConsistency(_ConsistencyMetric):
    """VBench background consistency: :class:`SubjectConsistency`'s formula on CLIP image
    embeddings (VBench: CLIP ViT-B/32, resize 224 + centre crop, the processor's job here).

    Args:
        model_name_or_path: hub id (``openai/clip-vit-base-patch32``) or local ``CLIPModel`` folder.
        batch_size: frames per forward.

    Values: ``background_consistency`` in ``[0, 1]``.
    """

    name = "background_consistency"

    def __init__(self, model_name_or_path: str = "openai/clip-vit-base-patch32", batch_size: int = 32) -> None:
        self.model_name_or_path, self.batch_size = model_name_or_path, batch_size
        self.model = self.processor = None

    def load(self) -> None:
        if self.model is None:
            from dmdx_lightning.evaluation.metrics.networks import load_clip

            self.model, self.processor = load_clip(self.model_name_or_path, owner=type(self).__name__)

    def features(self, frames: Tensor, device: torch.device) -> Tensor:
        return clip_image_features(self.model.to(device), self.processor, frames, self.batch_size, device)

    def info(self) -> dict:
        return {"package": package_info("transformers"), "model": self.model_name_or_path,
                "definition": "VBench background_consistency (CLIP image features)"}


def flow_magnitude_score(flow: Tensor) -> float:
    """VBench dynamic degree's per-pair score: the mean of the largest 5% of optical-flow
    magnitudes (``flow`` ``(2, H, W)``)."""
    rad = flow.double().norm(dim=0).flatten()
    top = max(int(rad.numel() * 0.05), 1)
    return float(rad.topk(top).values.mean())


def is_dynamic(pair_scores: list[float], height: int, width: int) -> bool:
    """VBench's ``check_move``: at least ``round(4 * frames / 16)`` frame pairs whose flow score
    exceeds ``6 * min(H, W) / 256`` (thresholds scaled from 256-pixel video)."""
    threshold = 6.0 * min(height, width) / 256.0
    needed = round(4 * (len(pair_scores) + 1) / 16.0)
    return sum(s > threshold for s in pair_scores) >= needed


class DynamicDegree(_VideoMetric):
    """VBench dynamic degree: the share of videos that move, judged by RAFT optical flow between
    consecutive frames (:func:`flow_magnitude_score`, :func:`is_dynamic`).

    RAFT from torchvision (``raft_large``: its ``C_T_V1`` weights are the port of the original
    ``raft-things.pth`` VBench uses; ``raft_small`` for a cheaper check), 20 flow updates as in
    VBench. Frames are padded (replicate) to a multiple of 8, as RAFT's ``InputPadder`` does.

    Args:
        weights: torchvision RAFT state-dict file (``raft_large_C_T_V1-22a6c225.pth``); ``None``:
            torchvision's download into ``$TORCH_HOME/hub/checkpoints``.
        architecture: ``raft_large`` or ``raft_small``.
        num_flow_updates: RAFT iterations.
        min_size: frames whose shorter side is smaller are upsampled to it first (torchvision's RAFT
            needs at least 128 pixels; the motion threshold scales with the size RAFT sees).
        batch_size: frame pairs per forward.

    Values: ``dynamic_degree`` in ``[0, 1]``; per prompt the share of its videos that move.
    """

    name = "dynamic_degree"

    def __init__(self, weights: str | None = None, architecture: str = "raft_large", num_flow_updates: int = 20,
                 min_size: int = 128, batch_size: int = 8) -> None:
        if architecture not in ("raft_large", "raft_small"):
            raise ValueError(f"DynamicDegree: architecture must be 'raft_large' or 'raft_small', got {architecture!r}")
        self.weights, self.architecture = weights, architecture
        self.num_flow_updates, self.min_size, self.batch_size = num_flow_updates, min_size, batch_size
        self.model = None

    def load(self) -> None:
        if self.model is not None:
            return
        from torchvision.models import optical_flow

        build = getattr(optical_flow, self.architecture)
        if self.weights is None:
            enum = optical_flow.Raft_Large_Weights if self.architecture == "raft_large" else optical_flow.Raft_Small_Weights
            try:
                model = build(weights=enum.C_T_V1 if self.architecture == "raft_large" else enum.C_T_V2)
            except Exception as e:  # torchvision's download error offline
                raise RuntimeError(f"DynamicDegree could not download the {self.architecture} weights ({e}). "
                                   "Offline: pass weights=<torchvision RAFT state-dict file>.") from e
        else:
            path = require_file(self.weights, "DynamicDegree", "weights",
                                "Give torchvision's RAFT weight file (e.g. raft_large_C_T_V1-22a6c225.pth).")
            model = build(weights=None)
            try:
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except RuntimeError as e:
                raise ValueError(f"DynamicDegree: weights={str(path)!r} is not a {self.architecture} state dict: {e}") from e
        self.model = model.eval().requires_grad_(False)

    def frames_for_raft(self, frames: Tensor) -> Tensor:
        """``[0, 1]`` frames -> RAFT's input: ``[-1, 1]``, the shorter side at least ``min_size``
        (torchvision's RAFT needs 128 pixels: its correlation pyramid divides by 64)."""
        x = frames * 2 - 1
        if min(x.shape[-2:]) < self.min_size:
            x = F.interpolate(x, scale_factor=self.min_size / min(x.shape[-2:]), mode="bilinear", align_corners=False)
        return x

    def pair_scores(self, frames: Tensor, device: torch.device) -> list[float]:
        """:func:`flow_magnitude_score` of each consecutive frame pair (on :meth:`frames_for_raft`)."""
        self.load()
        model = self.model.to(device)
        x = self.frames_for_raft(frames)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 8, 0, -h % 8), mode="replicate")  # RAFT's InputPadder: a multiple of 8
        scores = []
        for start in range(0, len(x) - 1, self.batch_size):
            a, b = x[start:start + self.batch_size], x[start + 1:start + 1 + self.batch_size]
            flow = model(a[:len(b)], b, num_flow_updates=self.num_flow_updates)[-1][..., :h, :w]
            scores.extend(flow_magnitude_score(f) for f in flow)
        return scores

    def video_score(self, frames: Tensor, device: torch.device) -> float:
        # the threshold scales with the size RAFT saw (flow is in its pixels)
        return float(is_dynamic(self.pair_scores(frames, device), *self.frames_for_raft(frames[:1]).shape[-2:]))

    def info(self) -> dict:
        return {"package": package_info("torchvision"), "model": self.weights or f"torchvision {self.architecture}",
                "num_flow_updates": self.num_flow_updates, "definition": "VBench dynamic_degree"}


class AestheticQuality(_VideoMetric):
    """LAION aesthetic predictor as VBench's aesthetic quality: a linear head on unit-length CLIP
    ViT-L/14 image embeddings, divided by 10, mean over frames (images: one frame).

    Args:
        head: the LAION head's state dict file (``sa_0_4_vit_l_14_linear.pth`` from
            LAION-AI/aesthetic-predictor: ``weight`` ``(1, D)``, ``bias`` ``(1,)``).
        model_name_or_path: the CLIP model (``openai/clip-vit-large-patch14``) or a local folder.
        batch_size: frames per forward.

    Values: ``aesthetic_quality`` (VBench's scale: the LAION score / 10).
    """

    name = "aesthetic_quality"
    modality = "any"

    def __init__(self, head: str, model_name_or_path: str = "openai/clip-vit-large-patch14", batch_size: int = 32) -> None:
        self.head_path, self.model_name_or_path, self.batch_size = head, model_name_or_path, batch_size
        self.model = self.processor = self.head = None

    def load(self) -> None:
        if self.model is not None:
            return
        from dmdx_lightning.evaluation.metrics.networks import load_clip

        path = require_file(self.head_path, "AestheticQuality", "head", "Download sa_0_4_vit_l_14_linear.pth "
                            "(LAION-AI/aesthetic-predictor) and give its path.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.rsplit(".", 1)[-1]: v for k, v in state.items()}  # "0.weight" / "linear.weight" -> "weight"
        if set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
            raise ValueError(f"AestheticQuality: head={str(path)!r} is not one linear layer's state dict "
                             f"(weight (1, D), bias (1,)); it has {sorted(state)}")
        head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        self.model, self.processor = load_clip(self.model_name_or_path, owner="AestheticQuality")
        self.head = head.eval().requires_grad_(False)

    def video_score(self, frames: Tensor, device: torch.device) -> float:
        emb = clip_image_features(self.model.to(device), self.processor, frames, self.batch_size, device)
        return float((self.head.to(device)(F.normalize(emb.float(), dim=-1)).squeeze(-1) / 10).mean())

    def info(self) -> dict:
        return {"package": package_info("transformers"), "model": self.model_name_or_path,
                "head": str(self.head_path), "definition": "VBench aesthetic_quality (LAION linear head / 10)"}


class MotionSmoothness(Metric):
    """VBench motion smoothness: a documented gap; building it raises :class:`MetricUnavailable`.

    VBench drops every odd frame, re-creates it with the AMT-S frame-interpolation network and
    scores the reconstruction error. AMT is no pip package (its code lives in VBench's
    ``third_party/amt``, which does not install here, see the module docstring), and its
    checkpoint holds the network's weights only; scoring without AMT's exact architecture would
    give numbers that compare with nothing. Use VBench in a separate environment on the videos
    ``dmdx evaluate`` writes.
    """

    name = "motion_smoothness"
    modality = "video"

    def __init__(self, *args, **kwargs) -> None:
        raise MetricUnavailable(self.__doc__.split("\n\n", 1)[1].strip())


class ImagingQuality(Metric):
    """VBench imaging quality: a documented gap; building it raises :class:`MetricUnavailable`.

    VBench scores each frame with MUSIQ (Ke et al. 2021, trained on SPAQ) through ``pyiqa``.
    pyiqa 0.1.16 installs with our constraints but brings 34 further packages (OpenCV twice,
    numba/llvmlite, bitsandbytes, matplotlib, scikit-image, facexlib, ruff, pre-commit, ...) for
    this one network, and fetches MUSIQ's weights from the network by default; we chose not to add
    it to the ``eval`` extra, and a MUSIQ of our own could not be checked against pyiqa's numbers.
    Use VBench or pyiqa in a separate environment on the videos ``dmdx evaluate`` writes.
    """

    name = "imaging_quality"
    modality = "video"

    def __init__(self, *args, **kwargs) -> None:
        raise MetricUnavailable(self.__doc__.split("\n\n", 1)[1].strip())
