"""Exponential moving average of the generator's trainable parameters only.

Lightning's ``EMAWeightAveraging`` averages the whole LightningModule (teacher, fake score and
heads included), which would cost a full extra model copy for SD3-sized runs; this keeps shadows
of the student's parameters (its LoRA adapters in lora mode) as buffers, so they travel in
checkpoints and resume exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn


class GeneratorEMA(nn.Module):
    """``shadow <- decay * shadow + (1 - decay) * param`` after each generator update.

    Args:
        params: the generator's trainable parameters (order defines the buffer names).
        decay: EMA decay per generator update.
    """

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self._params = list(params)
        for i, p in enumerate(self._params):
            self.register_buffer(f"shadow_{i}", p.detach().clone().float())

    def shadows(self) -> list[torch.Tensor]:
        return [getattr(self, f"shadow_{i}") for i in range(len(self._params))]

    @staticmethod
    def stored_shadows(state_dict: dict[str, torch.Tensor], prefix: str, count: int) -> list[torch.Tensor] | None:
        """The ``count`` shadows a checkpoint's ``state_dict`` holds for an EMA saved under
        ``prefix`` (e.g. ``"ema."``), in parameter order; ``None`` when it holds none (no EMA)."""
        shadows = [state_dict.get(f"{prefix}shadow_{i}") for i in range(count)]
        return shadows if all(s is not None for s in shadows) else None

    @torch.no_grad()
    def restart(self) -> None:
        """Start the averages again from the generator's current weights (e.g. after loading them)."""
        for shadow, p in zip(self.shadows(), self._params):
            shadow.copy_(p.detach().float())

    @torch.no_grad()
    def update(self) -> None:
        for shadow, p in zip(self.shadows(), self._params):
            shadow.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def swapped(self):
        """Temporarily load the averaged weights into the generator (sampling, export)."""
        backup = [p.detach().clone() for p in self._params]
        with torch.no_grad():
            for shadow, p in zip(self.shadows(), self._params):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self._params):
                    p.copy_(b)
