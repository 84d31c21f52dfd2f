"""Latent-space discriminator: the frozen real score's features + trainable heads (ADM step 4).

The backbone is the teacher's own network in the ``"real"`` role (never a copy): features of
the chosen blocks are read through forward hooks at ``(x, t, prompt)`` and each feeds a
:class:`~dmdx_lightning.discriminators.heads.Head2D` (image maps) or
:class:`~dmdx_lightning.discriminators.heads.Head3D` (video maps), chosen from the map's rank. DMD2's GAN head reads the fake score's
features instead (``backbone_role="fake"``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dmdx_lightning.discriminators.heads import head_for
from dmdx_lightning.teachers.base import Conditioning, Teacher


class LatentDiscriminator(nn.Module):
    """Heads on teacher-backbone feature maps; the logit is the mean over heads.

    Args:
        layers: indices into the teacher's ``feature_blocks`` (negative counts from the end).
        head_channels: hidden width of every head.
        num_down: stride-2 stages of a head on large maps.
        backbone_role: ``"real"`` (ADM, ADP) or ``"fake"`` (DMD2's head on the fake score).
        transition: score a MOVE ``x_t -> x`` instead of its end ``x`` (ADM issue, hypothesis 5):
            the heads read ``features(x, s) - features(x_t, t)``, so what the backbone says about
            the shared start ``x_t`` cancels and the verdict is about the move alone. ADM passes the
            start; other callers must not use it.
    """

    def __init__(self, layers: Sequence[int] = (-1,), head_channels: int = 256, num_down: int = 3,
                 backbone_role: str = "real", transition: bool = False) -> None:
        super().__init__()
        if backbone_role not in ("real", "fake"):
            raise ValueError(f"backbone_role must be 'real' or 'fake', got {backbone_role!r}")
        self.layers = list(layers)
        self.head_channels = head_channels
        self.num_down = num_down
        self.backbone_role = backbone_role
        self.transition = transition
        self.heads = nn.ModuleList()

    @torch.no_grad()
    def build(self, teacher: Teacher) -> "LatentDiscriminator":
        """Create one head per layer, sized by probing the teacher's feature maps once (on the real
        score, whose maps are shaped as the fake score's: under FSDP2 the fake score's copy has no
        storage yet when the method is built)."""
        x = torch.zeros(teacher.latent_shape(1), device=teacher.denoiser_device)
        t = torch.full((1,), 0.5, device=x.device)
        cond = teacher.encode_prompts([""])
        maps = teacher.feature_maps("real", x, t, cond, self.layers)
        self.heads = nn.ModuleList(head_for(m, cond.pooled.shape[-1], self.head_channels, self.num_down)
                                   for m in maps)
        return self

    def forward(self, teacher: Teacher, x: Tensor, t: Tensor, cond: Conditioning, start: Tensor | None = None,
                t_start: Tensor | None = None) -> Tensor:
        """Logits of ``x`` at time ``t``; a ``transition`` discriminator also needs the move's ``start``
        (and its time ``t_start``), which any other discriminator ignores."""
        if not len(self.heads):
            raise RuntimeError("LatentDiscriminator.build(teacher) must run before the first forward")
        maps = teacher.feature_maps(self.backbone_role, x, t, cond, self.layers)
        if self.transition:
            if start is None or t_start is None:
                raise ValueError("a transition discriminator scores a move: pass its start and t_start "
                                 "(only ADM does; set discriminator.init_args.transition: false elsewhere)")
            # one pass for the start, also when x holds several moves from it (``pair``)
            base = teacher.feature_maps(self.backbone_role, start, t_start, cond[:len(start)], self.layers)
            repeats = x.shape[0] // start.shape[0]
            maps = [m - b.repeat(repeats, *[1] * (b.ndim - 1)) for m, b in zip(maps, base)]
        logits = [head(m, t, cond.pooled) for head, m in zip(self.heads, maps)]
        return torch.stack(logits).mean(0)

    def pair(self, teacher: Teacher, x_real: Tensor, t_real: Tensor, x_fake: Tensor, t_fake: Tensor,
             cond: Conditioning, start: Tensor | None = None, t_start: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(D(x_real, t_real), D(x_fake, t_fake))`` for one prompt batch, in ONE backbone pass.

        The halves are concatenated along the batch and split after the heads: the backbone and
        the heads act on each sample alone, so the logits are those of two separate calls (up to
        floating-point summation order), at half the passes. A transition discriminator's shared
        start is passed once.
        """
        logits = self(teacher, torch.cat([x_real, x_fake]), torch.cat([t_real, t_fake]), Conditioning.cat([cond, cond]),
                      start, t_start)
        logits_real, logits_fake = logits.chunk(2)
        return logits_real, logits_fake

