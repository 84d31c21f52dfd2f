"""Discriminator heads on frozen backbone feature maps (the paper, "Reported discriminator heads").

A 2D head: ``num_down x [Conv 4x4 stride 2 -> GroupNorm -> SiLU]``, ``Conv 3x3 -> GroupNorm ->
SiLU``, global average pool, then a projection-discriminator output
``logit = w . h + <h, embed(t, prompt)>`` so the head is conditioned on timestep and prompt.

A vector head (``(B, C)`` features, e.g. analytic ones) is an MLP with the same projection output.

A 3D head (video, ``(B, C, F, H, W)`` maps) is the same with Conv3d blocks and pooling over time
(the paper reports only "Conv3d 3x3x3 blocks with pooling over time"; the layout is ours): each
stage is ``Conv3d (3, 4, 4) stride (1, 2, 2) -> GroupNorm -> SiLU -> AvgPool over time (2)``, the
last block ``Conv3d 3x3x3 -> GroupNorm -> SiLU``, then the average over frames and positions.
:func:`head_for` picks the head from the map's rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm(32) as reported, falling back to the largest group count that divides channels
    return nn.GroupNorm(math.gcd(32, channels), channels)


def sinusoidal(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class _ProjectionHead(nn.Module):
    """What every head shares: a conv ``body``, global average pooling over all positions, and a
    projection-discriminator logit ``w . h + <h, embed(t, prompt)> / sqrt(dim)``."""

    t_dim = 128

    def __init__(self, body: list[nn.Module], channels: int, cond_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)
        self.out = nn.Linear(channels, 1)
        self.embed = nn.Sequential(nn.Linear(self.t_dim + cond_dim, channels), nn.SiLU(),
                                   nn.Linear(channels, channels))

    def forward(self, feature: Tensor, t: Tensor, pooled: Tensor) -> Tensor:
        h = self.body(feature.float())
        if h.ndim > 2:
            h = h.mean(dim=tuple(range(2, h.ndim)))  # every position: (H, W) or (F, H, W)
        c = self.embed(torch.cat([sinusoidal(t, self.t_dim), pooled.float()], dim=-1))
        return self.out(h).squeeze(-1) + (h * c).sum(-1) / math.sqrt(h.shape[-1])


class Head2D(_ProjectionHead):
    """One 2D head on a ``(B, C, H, W)`` map.

    Args:
        in_channels: channels of the backbone map.
        cond_dim: size of the pooled prompt vector.
        spatial: ``min(H, W)`` of the map; stride-2 stages stop once the map is 2x2 or smaller,
            so the same head fits 8x8 digit maps and 64x64 SD3 token grids.
        channels: hidden width; num_down: stride-2 stages for large maps (3 as reported).
    """

    def __init__(self, in_channels: int, cond_dim: int, spatial: int, channels: int = 256,
                 num_down: int = 3) -> None:
        layers: list[nn.Module] = []
        c, size = in_channels, spatial
        for _ in range(num_down):
            if size <= 2:
                break
            layers += [nn.Conv2d(c, channels, 4, stride=2, padding=1), _norm(channels), nn.SiLU()]
            c, size = channels, size // 2
        layers += [nn.Conv2d(c, channels, 3, padding=1), _norm(channels), nn.SiLU()]
        super().__init__(layers, channels, cond_dim)


class Head3D(_ProjectionHead):
    """One 3D head on a ``(B, C, F, H, W)`` video map (module docstring).

    Args:
        in_channels, cond_dim, channels, num_down: as :class:`Head2D`.
        spatial: ``min(H, W)`` of the map; stride-2 stages stop once it is 2x2 or smaller.
        frames: ``F`` of the map; the time pooling of a stage is skipped once one frame is left,
            so the 13 latent frames of CogVideoX and the 3 of a tiny test model both fit.
    """

    def __init__(self, in_channels: int, cond_dim: int, spatial: int, frames: int, channels: int = 256,
                 num_down: int = 3) -> None:
        layers: list[nn.Module] = []
        c, size = in_channels, spatial
        for _ in range(num_down):
            if size <= 2:
                break
            layers += [nn.Conv3d(c, channels, (3, 4, 4), stride=(1, 2, 2), padding=1), _norm(channels), nn.SiLU()]
            if frames > 1:
                layers.append(nn.AvgPool3d((2, 1, 1), ceil_mode=True))
                frames = (frames + 1) // 2
            c, size = channels, size // 2
        layers += [nn.Conv3d(c, channels, 3, padding=1), _norm(channels), nn.SiLU()]
        super().__init__(layers, channels, cond_dim)

    def forward(self, feature: Tensor, t: Tensor, pooled: Tensor) -> Tensor:
        if feature.ndim != 5:
            raise ValueError(f"Head3D reads (B, C, F, H, W) maps, got shape {tuple(feature.shape)}")
        return super().forward(feature, t, pooled)


class HeadVector(_ProjectionHead):
    """A head on a ``(B, C)`` feature vector (no positions to convolve or pool): ``Linear -> SiLU ->
    Linear -> SiLU``, then the same projection logit. For analytic features such as the mixture
    teacher's mode responsibilities, where each channel has its own meaning.

    Args:
        in_channels, cond_dim, channels: as :class:`Head2D`.
    """

    def __init__(self, in_channels: int, cond_dim: int, channels: int = 256) -> None:
        super().__init__([nn.Linear(in_channels, channels), nn.SiLU(), nn.Linear(channels, channels), nn.SiLU()],
                         channels, cond_dim)


def head_for(feature: Tensor, cond_dim: int, channels: int = 256, num_down: int = 3) -> nn.Module:
    """The head for a probed feature map: :class:`HeadVector` for ``(B, C)``, :class:`Head2D` for
    ``(B, C, H, W)``, :class:`Head3D` for ``(B, C, F, H, W)``."""
    if feature.ndim == 2:
        return HeadVector(feature.shape[1], cond_dim, channels)
    if feature.ndim == 4:
        return Head2D(feature.shape[1], cond_dim, min(feature.shape[2:]), channels, num_down)
    if feature.ndim == 5:
        return Head3D(feature.shape[1], cond_dim, min(feature.shape[3:]), feature.shape[2], channels, num_down)
    raise ValueError(f"feature maps must be (B, C), (B, C, H, W) or (B, C, F, H, W), got shape {tuple(feature.shape)}")
