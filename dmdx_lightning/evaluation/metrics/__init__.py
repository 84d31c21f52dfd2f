"""Metric components of ``dmdx evaluate`` and of the validation callbacks.

Each metric is a :class:`Metric`: built from a YAML entry (by its short name in :data:`METRICS`
or by ``class_path``), it loads its networks on first use and scores a
:class:`~dmdx_lightning.evaluation.samples.SampleSet` into a :class:`MetricResult`.

| name | class | package / status |
|---|---|---|
| ``fid`` | :class:`FID` | torchmetrics + torch-fidelity Inception |
| ``kid`` | :class:`KID` | torchmetrics + torch-fidelity Inception |
| ``precision_recall`` | :class:`PrecisionRecall` | ours (k-NN, Kynkaanniemi et al. 2019) |
| ``clip_score`` | :class:`CLIPScore` | torchmetrics + transformers |
| ``pick_score`` | :class:`PickScore` | transformers (official formula) |
| ``hpsv2`` | :class:`HPSv2` | open_clip_torch (hpsv2 does not install) |
| ``image_reward`` | :class:`ImageReward` | gap (image-reward 1.5 cannot run here) |
| ``mps`` | :class:`MPS` | gap (no package; pickled model) |
| ``lpips_diversity`` | :class:`LPIPSDiversity` | lpips |
| ``video_clip_score`` | :class:`VideoCLIPScore` | torchmetrics + transformers, per frame |
| ``subject_consistency`` | :class:`SubjectConsistency` | VBench's definition, transformers DINO |
| ``background_consistency`` | :class:`BackgroundConsistency` | VBench's definition, transformers CLIP |
| ``dynamic_degree`` | :class:`DynamicDegree` | VBench's definition, torchvision RAFT |
| ``aesthetic_quality`` | :class:`AestheticQuality` | VBench's definition, LAION linear head |
| ``motion_smoothness`` | :class:`MotionSmoothness` | gap (AMT is no package) |
| ``imaging_quality`` | :class:`ImagingQuality` | gap (MUSIQ via pyiqa not added) |
| ``digits`` | :class:`DigitsMetric` | the digits teacher's metrics |
| ``mixture`` | :class:`MixtureMetric` | the mixture teacher's exact metrics (latents) |

A gap's class raises :class:`MetricUnavailable` (a ``NotImplementedError``) when built, with the
reason and what to use instead.
"""

from __future__ import annotations

from dmdx_lightning.evaluation.metrics.base import Metric, MetricResult, MetricUnavailable
from dmdx_lightning.evaluation.metrics.diversity import LPIPSDiversity
from dmdx_lightning.evaluation.metrics.fid import FID, KID, InceptionFeatures, PrecisionRecall
from dmdx_lightning.evaluation.metrics.text_image import MPS, CLIPScore, HPSv2, ImageReward, PickScore, VideoCLIPScore
from dmdx_lightning.evaluation.metrics.toy import DigitsMetric, MixtureMetric
from dmdx_lightning.evaluation.metrics.video import (AestheticQuality, BackgroundConsistency, DynamicDegree,
                                                     ImagingQuality, MotionSmoothness, SubjectConsistency)

#: short name -> class; every class's ``name`` attribute is its key
METRICS: dict[str, type[Metric]] = {cls.name: cls for cls in (
    FID, KID, PrecisionRecall, CLIPScore, PickScore, HPSv2, ImageReward, MPS, LPIPSDiversity, VideoCLIPScore,
    SubjectConsistency, BackgroundConsistency, DynamicDegree, AestheticQuality, MotionSmoothness, ImagingQuality,
    DigitsMetric, MixtureMetric)}


def build_metric(name: str, **kwargs) -> Metric:
    """``METRICS[name](**kwargs)``, with the known names in the error for an unknown one."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))} "
                       "(or give a class_path to a Metric subclass)")
    return METRICS[name](**kwargs)


__all__ = ["METRICS", "build_metric", "Metric", "MetricResult", "MetricUnavailable", "FID", "KID",
           "PrecisionRecall", "InceptionFeatures", "CLIPScore", "PickScore", "HPSv2", "ImageReward", "MPS",
           "LPIPSDiversity", "VideoCLIPScore", "SubjectConsistency", "BackgroundConsistency", "DynamicDegree",
           "AestheticQuality", "MotionSmoothness", "ImagingQuality", "DigitsMetric", "MixtureMetric"]
