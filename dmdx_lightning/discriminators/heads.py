"""Discriminator heads on frozen backbone feature maps (PAPER.md, "Reported discriminator heads").

A 2D head: ``num_down x [Conv 4x4 stride 2 -> GroupNorm -> SiLU]``, ``Conv 3x3 -> GroupNorm ->
SiLU``, global average pool, then a projection-discriminator output
``logit = w . h + <h, embed(t, prompt)>`` so the head is conditioned on timestep and prompt.
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


class Head2D(nn.Module):
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
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, spatial
        for _ in range(num_down):
            if size <= 2:
                break
            layers += [nn.Conv2d(c, channels, 4, stride=2, padding=1), _norm(channels), nn.SiLU()]
            c, size = channels, size // 2
        layers += [nn.Conv2d(c, channels, 3, padding=1), _norm(channels), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(channels, 1)
        self.t_dim = 128
        self.embed = nn.Sequential(nn.Linear(self.t_dim + cond_dim, channels), nn.SiLU(),
                                   nn.Linear(channels, channels))

    def forward(self, feature: Tensor, t: Tensor, pooled: Tensor) -> Tensor:
        h = self.body(feature.float()).mean(dim=(2, 3))
        c = self.embed(torch.cat([sinusoidal(t, self.t_dim), pooled.float()], dim=-1))
        return self.out(h).squeeze(-1) + (h * c).sum(-1) / math.sqrt(h.shape[-1])
