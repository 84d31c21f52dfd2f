"""Distribution metrics against reference images: FID, KID and k-NN precision / recall.

Package choice: torchmetrics 1.9 (already a dependency; its ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` keep running feature sums, sync over DDP ranks, and accept any feature
network) with torch-fidelity 0.4 for the Inception network (torchmetrics' own choice: the
TF-Inception port every published FID uses). clean-fid would add its own resizing and its own
download step without a way to pass a feature network; torch-fidelity alone has no running state
and reads images from disk only. So: torchmetrics for the statistics, torch-fidelity's Inception
(loaded from a local weights file when given) as the default features.

The feature network is injectable (``feature_extractor``): any ``nn.Module`` mapping images
``(B, 3, H, W)`` in ``[0, 1]`` to features ``(B, D)`` (the digits classifier, DINOv2, a tiny
random network in tests). With none, torch-fidelity's Inception v3 (2048-d pool features) from
``inception_weights`` (the file ``pt_inception-2015-12-05-6726825d.pth``) or, without it, from
torch-fidelity's download into ``$TORCH_HOME/hub/checkpoints``.

Reference (``reference``): a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``,
searched recursively, sorted) or, for FID only, a ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid /
clean-fid statistics, or :meth:`FID.save_reference`) computed with the SAME feature network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dmdx_lightning.evaluation.metrics.base import (Metric, MetricResult, package_info, require_file,
                                                    require_package)
from dmdx_lightning.evaluation.metrics.functional import knn_precision_recall
from dmdx_lightning.evaluation.samples import SampleSet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception v3 (via torchmetrics' ``NoTrainInceptionV3``) reading ``[0, 1]``
    images: it wants ``uint8``, torchmetrics only converts for its built-in network."""

    def __init__(self, weights: str | None = None, feature: int = 2048) -> None:
        super().__init__()
        if weights is not None:
            require_file(weights, "FID / KID", "inception_weights", "Give torch-fidelity's Inception file "
                         "pt_inception-2015-12-05-6726825d.pth, or leave it unset to download it.")
        require_package("torch_fidelity", "FID / KID Inception features", "torch-fidelity")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                      feature_extractor_weights_path=weights)
        self.num_features = feature

    def forward(self, images: Tensor) -> Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8))


def load_image(path: Path) -> Tensor:
    """An image file as float RGB ``(3, H, W)`` in ``[0, 1]``."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB")).float() / 255


def reference_images(folder: Path, batch_size: int):
    """Batches of a folder's images (recursively, sorted); a batch breaks where the size changes."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"reference={str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    batch: list[Tensor] = []
    for path in files:
        image = load_image(path)
        if batch and (len(batch) == batch_size or batch[0].shape != image.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    yield torch.stack(batch)


class _ReferenceMetric(Metric):
    """Shared: the feature network, the reference, the sample batches."""

    modality = "image"
    needs_reference = True

    def __init__(self, reference: str, feature_extractor: nn.Module | None, inception_weights: str | None,
                 batch_size: int) -> None:
        self.reference = reference
        self.feature_extractor, self.inception_weights = feature_extractor, inception_weights
        self.batch_size = batch_size
        self._features: nn.Module | None = None

    def _reference_path(self, allow_stats: bool) -> Path:
        path = Path(self.reference).expanduser()
        if path.is_dir() or (allow_stats and path.suffix == ".npz" and path.is_file()):
            return path
        kinds = "a folder of images or a .npz with mu and sigma" if allow_stats else "a folder of images"
        raise FileNotFoundError(f"{type(self).__name__}: reference={str(path)!r} is not {kinds}. Give the real "
                                f"images to compare with (e.g. COCO-2014 validation images) as {kinds}.")

    def features_net(self) -> nn.Module:
        if self._features is None:
            net = self.feature_extractor or InceptionFeatures(self.inception_weights)
            self._features = net.eval().requires_grad_(False)
        return self._features

    def sample_batches(self, samples: SampleSet):
        self.check_modality(samples)
        for pixels, _ in samples.batches(self.batch_size):
            yield pixels

    def _metric_on(self, samples: SampleSet, device: torch.device):
        """The loaded torchmetrics metric (reference features kept) with ``samples`` as its fake set."""
        self.load(device)
        metric = self._metric.to(device)
        metric.reset()
        for pixels in self.sample_batches(samples):
            metric.update(pixels.to(device), real=False)
        return metric

    def info(self) -> dict:
        net = "torch-fidelity inception-v3-compat" if self.feature_extractor is None else type(self.feature_extractor).__name__
        return {"package": package_info("torchmetrics", "torch-fidelity"), "reference": str(self.reference),
                "features": net, "model": self.inception_weights}


class FID(_ReferenceMetric):
    """Frechet Inception Distance (Heusel et al. 2017), torchmetrics ``FrechetInceptionDistance``.

    Args:
        reference: folder of real images, or ``.npz`` statistics (``mu``, ``sigma``; optional ``n``)
            made with the same feature network.
        feature_extractor: ``nn.Module`` images in ``[0, 1]`` -> ``(B, D)`` features (default:
            torch-fidelity's Inception v3, 2048-d).
        inception_weights: local file of that Inception (offline clusters).
        batch_size: images per forward.

    Values: ``fid`` (lower is better). Reference statistics are computed once per instance.
    """

    name = "fid"

    def __init__(self, reference: str, feature_extractor: nn.Module | None = None,
                 inception_weights: str | None = None, batch_size: int = 50) -> None:
        super().__init__(reference, feature_extractor, inception_weights, batch_size)
        self._metric = None

    def load(self, device: torch.device | None = None) -> None:
        """Build the metric and read the reference (its features on ``device``, default CPU)."""
        if self._metric is not None:
            return
        from torchmetrics.image.fid import FrechetInceptionDistance

        device = device or torch.device("cpu")
        path = self._reference_path(allow_stats=True)
        net = self.features_net()
        stats = np.load(path) if path.suffix == ".npz" else None
        batches = None if stats is not None else reference_images(path, self.batch_size)
        first = None if batches is None else next(batches)
        if not hasattr(net, "num_features"):
            # torchmetrics learns the feature size from one forward of a dummy image: give it one of the
            # reference's size, or (statistics file) the statistics' own size
            dim = len(stats["mu"]) if stats is not None and "mu" in stats.files else None
            net = _Sized(net, dim) if dim is not None else net
        # reset_real_features=False keeps the reference statistics across reset(): computed once
        # sync_on_compute=False: one process scores the merged samples (`dmdx evaluate` under torchrun:
        # rank 0, after the others have left), and torchmetrics would otherwise gather over the open group
        metric = FrechetInceptionDistance(feature=net, normalize=True, reset_real_features=False,
                                          input_img_size=tuple(first.shape[1:]) if first is not None else (3, 64, 64),
                                          sync_on_compute=False)
        metric = metric.to(device)
        if stats is not None:
            _set_reference_statistics(metric, path, stats)
        else:
            with torch.no_grad():
                metric.update(first.to(device), real=True)
                for images in batches:
                    metric.update(images.to(device), real=True)
        self._metric = metric

    @torch.no_grad()
    def score(self, samples: SampleSet, device: torch.device) -> MetricResult:
        return MetricResult({"fid": float(self._metric_on(samples, device).compute())}, info=self.info())

    def save_reference(self, path: str) -> None:
        """Write the reference statistics (``mu``, ``sigma``, ``n``) as ``.npz``, to pass as
        ``reference`` next time (skips reading the folder)."""
        self.load()
        m = self._metric
        n = int(m.real_features_num_samples)
        mu = m.real_features_sum / n
        sigma = (m.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
        np.savez(path, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), n=n)


class _Sized(nn.Module):
    """A feature network with a ``num_features`` attribute (torchmetrics then skips its size probe)."""

    def __init__(self, net: nn.Module, num_features: int) -> None:
        super().__init__()
        self.net, self.num_features = net, num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def _set_reference_statistics(metric, path: Path, stats) -> None:
    """Fill torchmetrics' running sums so that its ``compute`` recovers ``mu`` and ``sigma`` exactly."""
    missing = {"mu", "sigma"} - set(stats.files)
    if missing:
        raise ValueError(f"FID: reference={str(path)!r} lacks {sorted(missing)} (it has {stats.files}); "
                         "give a .npz with mu (D,) and sigma (D, D)")
    device = metric.real_features_sum.device
    mu = torch.from_numpy(stats["mu"]).double().to(device)
    sigma = torch.from_numpy(stats["sigma"]).double().to(device)
    if mu.shape != metric.real_features_sum.shape:
        raise ValueError(f"FID: reference={str(path)!r} has {mu.shape[0]}-d statistics, the feature network gives "
                         f"{metric.real_features_sum.shape[0]}-d features: were they made with another network?")
    n = int(stats["n"]) if "n" in stats.files else 2  # any n > 1 gives back the same mu and sigma
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, device=device).long()


class KID(_ReferenceMetric):
    """Kernel Inception Distance (Binkowski et al. 2018), torchmetrics ``KernelInceptionDistance``:
    the unbiased polynomial-kernel MMD over ``subsets`` random subsets.

    Args:
        reference: folder of real images (statistics files cannot give KID: it needs the features).
        feature_extractor, inception_weights, batch_size: as in :class:`FID`.
        subsets: random subsets.
        subset_size: samples per subset (clipped to the smaller set's size).
        seed: seeds the subset draws, so a score repeats exactly.

    Values: ``kid`` (the mean over subsets) and ``kid_std``.
    """

    name = "kid"

    def __init__(self, reference: str, feature_extractor: nn.Module | None = None,
                 inception_weights: str | None = None, batch_size: int = 50, subsets: int = 100,
                 subset_size: int = 1000, seed: int = 0) -> None:
        super().__init__(reference, feature_extractor, inception_weights, batch_size)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self._metric = None

    def load(self, device: torch.device | None = None) -> None:
        """Build the metric and read the reference (its features on ``device``, default CPU)."""
        if self._metric is not None:
            return
        import warnings

        from torchmetrics.image.kid import KernelInceptionDistance

        path = self._reference_path(allow_stats=False)
        with warnings.catch_warnings():  # "will save all extracted features": that is what KID is
            warnings.simplefilter("ignore", UserWarning)
            metric = KernelInceptionDistance(feature=self.features_net(), subsets=self.subsets,
                                             subset_size=self.subset_size, normalize=True, reset_real_features=False,
                                             sync_on_compute=False)  # one process scores (see FID.load)
        metric = metric.to(device or torch.device("cpu"))
        with torch.no_grad():
            for images in reference_images(path, self.batch_size):
                metric.update(images.to(metric.device), real=True)
        self._metric = metric

    @torch.no_grad()
    def score(self, samples: SampleSet, device: torch.device) -> MetricResult:
        metric = self._metric_on(samples, device)
        n_real = sum(len(f) for f in metric.real_features)
        metric.subset_size = min(self.subset_size, n_real, len(samples))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            mean, std = metric.compute()
        return MetricResult({"kid": float(mean), "kid_std": float(std)},
                            info={**self.info(), "subsets": self.subsets, "subset_size": metric.subset_size})


class PrecisionRecall(_ReferenceMetric):
    """Improved precision and recall (Kynkaanniemi et al. 2019) on the same features as FID.

    No maintained package computes it on injectable features (torch-fidelity's ``prc`` reads its
    own VGG16 features only), so this is
    :func:`~dmdx_lightning.evaluation.metrics.functional.knn_precision_recall`.

    Args:
        reference: folder of real images.
        feature_extractor, inception_weights, batch_size: as in :class:`FID`.
        k: neighbourhood size (the paper: 3).

    Values: ``precision`` (fidelity) and ``recall`` (coverage).
    """

    name = "precision_recall"

    def __init__(self, reference: str, feature_extractor: nn.Module | None = None,
                 inception_weights: str | None = None, batch_size: int = 50, k: int = 3) -> None:
        super().__init__(reference, feature_extractor, inception_weights, batch_size)
        self.k = k
        self._real: Tensor | None = None

    def load(self, device: torch.device | None = None) -> None:
        """Read the reference's features (computed on ``device``, default CPU; kept on the CPU)."""
        if self._real is None:
            path = self._reference_path(allow_stats=False)
            device = device or torch.device("cpu")
            net = self.features_net().to(device)
            with torch.no_grad():
                self._real = torch.cat([net(images.to(device)).cpu()
                                        for images in reference_images(path, self.batch_size)])

    @torch.no_grad()
    def score(self, samples: SampleSet, device: torch.device) -> MetricResult:
        self.load(device)
        net = self.features_net().to(device)
        fake = torch.cat([net(pixels.to(device)).cpu() for pixels in self.sample_batches(samples)])
        precision, recall = knn_precision_recall(self._real, fake, self.k)
        return MetricResult({"precision": precision, "recall": recall}, info={**self.info(), "k": self.k})
