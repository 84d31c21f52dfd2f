"""The dtype names configs may use (``torch_dtype``, ``trainable_dtype``, ``storage_dtype``, ...)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(value: str | torch.dtype | None, key: str) -> torch.dtype | None:
    """``value`` as a ``torch.dtype`` (``None`` and dtypes pass through); an unknown name is an
    error naming the config ``key`` and the choices."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"{key} must be one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[value]
