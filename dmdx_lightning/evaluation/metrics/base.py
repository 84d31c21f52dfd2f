"""The metric component: one interface for ``dmdx evaluate`` and the validation callbacks.

A :class:`Metric` reads a :class:`~dmdx_lightning.evaluation.samples.SampleSet` and returns a
:class:`MetricResult`. It names its table columns (``values``), may add per-prompt values, and
records what it scored with (``info``: the package and its version, the model path), so a results
table says which networks made its numbers. Scoring networks load on the first :meth:`Metric.score`
(or :meth:`Metric.load`), never at construction: building a metric from a YAML file costs nothing,
and a missing model fails at the metric that needs it, with the argument's name and the path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from dmdx_lightning.evaluation.samples import SampleSet


@dataclass
class MetricResult:
    """What one metric says about one sample set.

    Attributes:
        values: table columns, e.g. ``{"clip_score": 31.2}``.
        per_prompt: prompt index -> that prompt's values (where the metric has them).
        info: how the numbers were made: ``package``, ``version``, ``model`` path, options.
    """

    values: dict[str, float]
    per_prompt: dict[int, dict[str, float]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


class Metric:
    """Base of every metric component.

    Subclasses set :attr:`name` (the column prefix; also the registry key in
    :data:`dmdx_lightning.evaluation.metrics.METRICS`) and :attr:`modality`, and implement
    :meth:`score`. Networks load in :meth:`load` (called by :meth:`score` on first use).
    """

    #: column prefix and registry name
    name: str = ""
    #: what it scores: ``"image"``, ``"video"`` or ``"any"``
    modality: str = "any"
    #: True when the metric compares against reference data (FID, KID, precision/recall)
    needs_reference: bool = False

    def load(self) -> None:
        """Load the scoring networks now (otherwise on the first :meth:`score`). Idempotent."""

    def score(self, samples: SampleSet, device: torch.device) -> MetricResult:
        raise NotImplementedError

    def check_modality(self, samples: SampleSet) -> None:
        """Fail loudly when the set is of a modality this metric does not score."""
        if self.modality != "any" and samples.modality != self.modality:
            raise ValueError(f"{type(self).__name__} ({self.name!r}) scores {self.modality} samples, "
                             f"got a {samples.modality} SampleSet")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class MetricUnavailable(NotImplementedError):
    """A metric the field uses that this package cannot compute (a documented gap).

    Raised when such a metric is built, with the reason and what to do instead, so an evaluation
    config that names it fails at once instead of after generating every sample.
    """


def package_info(*packages: str) -> dict[str, str]:
    """``{package: installed version}`` of the packages a metric computed with (for ``info``)."""
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def require_file(path: str | Path, metric: str, argument: str, what_to_do: str) -> Path:
    """``path`` as a :class:`Path` when it is an existing file, else a FileNotFoundError naming the
    metric, its argument and the path."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{metric}: {argument}={str(path)!r} is not a file. {what_to_do}")
    return path


def require_package(module: str, metric: str, install: str) -> None:
    """Import ``module`` or fail with the pip command that installs it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ModuleNotFoundError(f"{metric} needs the Python package {install!r} ({e}). "
                                  f"Install it with: pip install 'dmdx_lightning[eval]' (or pip install {install})") from e


def to_uint8(pixels: Tensor) -> Tensor:
    """``[0, 1]`` float pixels as ``uint8`` (what image processors and torchmetrics read)."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def frames_of(pixels: Tensor) -> Tensor:
    """Videos ``(B, F, 3, H, W)`` -> frames ``(B F, 3, H, W)`` (sample-major); images pass through."""
    return pixels.flatten(0, 1) if pixels.ndim == 5 else pixels
