"""Pure metric functions, tested against hand-computed values (moved here from
``dmdx_lightning.callbacks.metrics``, which re-exports them).

- :func:`knn_precision_recall`: improved precision and recall (Kynkaanniemi et al. 2019).
- :func:`feature_lpips`: LPIPS without learned weights on given feature maps.
- :func:`mean_pairwise_distance`: mean distance over all pairs of a set (diversity).
- :func:`frame_consistency`: VBench's subject / background consistency of one video's features.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
from torch import Tensor


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


def frame_consistency(features: Tensor) -> Tensor:
    """VBench's subject / background consistency terms of one video: ``features`` ``(F, D)``.

    For every frame ``i >= 1``: the mean of ``max(0, cos(f_i, f_{i-1}))`` and
    ``max(0, cos(f_i, f_0))`` (VBench ``subject_consistency.py`` / ``background_consistency.py``).
    Returns the ``F - 1`` terms; a video's score is their mean.
    """
    if len(features) < 2:
        raise ValueError(f"consistency needs at least 2 frames, got {len(features)}")
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    previous = (f[1:] * f[:-1]).sum(-1).clamp(min=0)
    first = (f[1:] * f[:1]).sum(-1).clamp(min=0)
    return (previous + first) / 2
