"""Within-prompt diversity: mean pairwise LPIPS over each prompt's samples (the paper's Table 6
protocol: PartiPrompts, several seeds per prompt), lpips 0.1.4 (Zhang et al. 2018)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dmdx_lightning.evaluation.metrics.base import Metric, MetricResult, frames_of, package_info
from dmdx_lightning.evaluation.metrics.functional import mean_pairwise_distance
from dmdx_lightning.evaluation.samples import SampleSet


class LPIPSDiversity(Metric):
    """Mean pairwise LPIPS within each prompt's samples, averaged over prompts.

    Every prompt needs at least 2 samples (``K`` seeds give ``K (K - 1) / 2`` pairs). Video: a
    pair's distance is the mean over its aligned frames (frame ``f`` against frame ``f``).

    Args:
        net: LPIPS backbone, ``alex`` (the usual choice), ``vgg`` or ``squeeze``.
        backbone_weights: torchvision weight file of that backbone, for offline clusters (default:
            torchvision's usual place, ``$TORCH_HOME/hub/checkpoints``, downloaded when missing).
        pnet_rand: random backbone weights (tests only: the numbers mean nothing).
        min_size: images whose shorter side is smaller are upsampled to it first (AlexNet's strided
            layers need about 32 pixels or more).
        batch_size: pairs per forward.

    Values: ``lpips_diversity``; per prompt the same over that prompt's pairs.
    """

    name = "lpips_diversity"
    modality = "any"

    def __init__(self, net: str = "alex", backbone_weights: str | None = None, pnet_rand: bool = False,
                 min_size: int = 64, batch_size: int = 8) -> None:
        if net not in ("alex", "vgg", "squeeze"):
            raise ValueError(f"LPIPSDiversity: net must be 'alex', 'vgg' or 'squeeze', got {net!r}")
        self.net, self.backbone_weights, self.pnet_rand = net, backbone_weights, pnet_rand
        self.min_size, self.batch_size = min_size, batch_size
        self.model = None

    def load(self) -> None:
        if self.model is None:
            from dmdx_lightning.evaluation.metrics.networks import load_lpips

            self.model = load_lpips(self.net, self.backbone_weights, self.pnet_rand)

    def distance(self, device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
        """LPIPS of pairs of ``[-1, 1]`` images ``(n, 3, H, W)`` or videos ``(n, F, 3, H, W)``: ``(n,)``."""
        self.load()
        model = self.model.to(device)

        def distance(x: Tensor, y: Tensor) -> Tensor:
            n = x.shape[0]
            x, y = frames_of(x), frames_of(y)  # video: frame f of one sample against frame f of the other
            if min(x.shape[-2:]) < self.min_size:
                scale = self.min_size / min(x.shape[-2:])
                x, y = (F.interpolate(v, scale_factor=scale, mode="bilinear", align_corners=False) for v in (x, y))
            return model(x, y).reshape(n, -1).mean(dim=1)  # one distance per pair, averaged over frames

        return distance

    def per_prompt(self, samples: SampleSet, device: torch.device) -> dict[int, float]:
        """Prompt index -> mean pairwise LPIPS of its samples."""
        groups = samples.by_prompt()
        short = {i: len(g) for i, g in groups.items() if len(g) < 2}
        if short:
            raise ValueError(f"LPIPSDiversity needs at least 2 samples per prompt (pairs); prompts {sorted(short)} "
                             f"have {sorted(set(short.values()))}: generate several seeds per prompt")
        distance = self.distance(device)
        out = {}
        for index, group in groups.items():
            pixels = torch.stack([samples.load(s) for s in group]).to(device) * 2 - 1  # LPIPS reads [-1, 1]
            out[index] = mean_pairwise_distance(pixels, distance, self.batch_size)
        return out

    @torch.no_grad()
    def score(self, samples: SampleSet, device: torch.device) -> MetricResult:
        self.check_modality(samples)
        values = self.per_prompt(samples, device)
        return MetricResult({"lpips_diversity": sum(values.values()) / len(values)},
                            per_prompt={i: {"lpips_diversity": v} for i, v in values.items()},
                            info={"package": package_info("lpips", "torchvision"), "net": self.net,
                                  "model": self.backbone_weights or ("random" if self.pnet_rand else "torchvision")})
