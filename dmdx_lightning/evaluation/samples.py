"""What a metric scores: the samples of one model, with the prompt and seed of each.

A :class:`SampleSet` is the one interface between generation and scoring. ``dmdx evaluate`` builds
it from the folder it generated (:meth:`SampleSet.from_records`); the validation callbacks build it
from tensors in memory (:meth:`SampleSet.from_tensors`). Metrics read it in batches and never know
where the pixels came from, so a metric is written once for both.

Pixel convention: float in ``[0, 1]``, RGB; images ``(B, 3, H, W)``, videos ``(B, F, 3, H, W)``
(frame-major after the batch, as video files store them).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sample:
    """One generated image or video: the ``j``-th sample of prompt ``prompt_index``, from noise seed ``seed``."""

    prompt_index: int
    prompt: str
    seed: int
    #: where the pixels are (a file relative to the evaluation folder); ``None`` for in-memory sets
    file: str | None = None
    #: anything else a writer records (sampling seconds, NFE, checksums)
    extra: dict = field(default_factory=dict, compare=False, hash=False)


class SampleSet:
    """An ordered list of :class:`Sample` and a function that loads a sample's pixels.

    Args:
        samples: the samples, in a fixed order (metrics that pair samples rely on it).
        load: ``Sample -> Tensor`` in ``[0, 1]``: ``(3, H, W)`` for an image, ``(F, 3, H, W)`` for a video.
        modality: ``"image"`` or ``"video"``.
    """

    def __init__(self, samples: Sequence[Sample], load: Callable[[Sample], Tensor], modality: str = "image") -> None:
        if modality not in ("image", "video"):
            raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
        self.samples = list(samples)
        self._load = load
        self.modality = modality

    # ------------------------------------------------------------------ building
    @classmethod
    def from_tensors(cls, pixels: Tensor, prompts: Sequence[str], prompt_index: Sequence[int] | None = None,
                     seeds: Sequence[int] | None = None) -> "SampleSet":
        """In-memory samples: ``pixels`` ``(N, 3, H, W)`` images or ``(N, F, 3, H, W)`` videos in ``[0, 1]``
        (a gray channel is repeated to RGB); ``prompts[i]`` is sample ``i``'s prompt. Without
        ``prompt_index``, equal prompts share an index (first-seen order); without ``seeds``, 0..N-1."""
        n = len(pixels)
        if len(prompts) != n:
            raise ValueError(f"{n} samples but {len(prompts)} prompts")
        if pixels.ndim not in (4, 5):
            raise ValueError(f"pixels must be (N, 3, H, W) or (N, F, 3, H, W), got shape {tuple(pixels.shape)}")
        channel = 1 if pixels.ndim == 4 else 2
        if pixels.shape[channel] == 1:
            pixels = pixels.repeat_interleave(3, dim=channel)
        if prompt_index is None:
            first: dict[str, int] = {}
            prompt_index = [first.setdefault(p, len(first)) for p in prompts]
        seeds = list(range(n)) if seeds is None else list(seeds)
        samples = [Sample(int(i), p, int(s)) for i, p, s in zip(prompt_index, prompts, seeds)]
        by_id = {id(s): k for k, s in enumerate(samples)}
        pixels = pixels.detach().float().clamp(0, 1).cpu()
        return cls(samples, lambda s: pixels[by_id[id(s)]], "image" if pixels.ndim == 4 else "video")

    @classmethod
    def from_records(cls, folder: str | Path, records: str = "records.jsonl", verify: bool = False) -> "SampleSet":
        """The samples ``dmdx evaluate`` wrote to ``folder``: one JSON object a line in ``records``
        (``prompt_index``, ``prompt``, ``seed``, ``file`` relative to ``folder``, ``sha256``, and
        ``frames`` for a video), in the file's order; every other key lands in :attr:`Sample.extra`.

        An image is a PNG; a video is one PNG of its ``frames`` frames stacked top to bottom
        (lossless, one file per sample). With ``verify``, every file's sha256 is checked first.

        Raises:
            FileNotFoundError: no ``records`` file, or a file a record names is missing.
            ValueError: a line that is not a record, a checksum that does not match (``verify``),
                or images mixed with videos.
        """
        folder = Path(folder)
        path = folder / records
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: generate the samples first (`dmdx evaluate`)")
        samples = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                keys = (int(record["prompt_index"]), str(record["prompt"]), int(record["seed"]), str(record["file"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}, line {number}: not a sample record ({e})") from None
            extra = {k: v for k, v in record.items() if k not in ("prompt_index", "prompt", "seed", "file")}
            samples.append(Sample(*keys, extra=extra))
        if not samples:
            raise ValueError(f"{path} holds no records")
        videos = {"frames" in s.extra for s in samples}
        if len(videos) > 1:
            raise ValueError(f"{path} mixes images and videos")
        for s in samples:
            file = folder / s.file
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing (named by {path})")
            if verify and hashlib.sha256(file.read_bytes()).hexdigest() != s.extra.get("sha256"):
                raise ValueError(f"{file} does not match the sha256 {path} records for it")

        def load(sample: Sample) -> Tensor:
            import numpy as np
            from PIL import Image

            with Image.open(folder / sample.file) as image:
                pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
            pixels = pixels.permute(2, 0, 1).float() / 255  # (3, H, W)
            frames = sample.extra.get("frames")
            if frames is None:
                return pixels
            _, h, w = pixels.shape
            return pixels.reshape(3, frames, h // frames, w).permute(1, 0, 2, 3).contiguous()  # (F, 3, H, W)

        return cls(samples, load, "video" if videos == {True} else "image")

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.samples)

    def load(self, sample: Sample) -> Tensor:
        return self._load(sample)

    def batches(self, batch_size: int, samples: Sequence[Sample] | None = None) -> Iterator[tuple[Tensor, list[Sample]]]:
        """``(pixels, samples)`` in order, ``batch_size`` at a time (of ``samples``, default all)."""
        items = self.samples if samples is None else list(samples)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            yield torch.stack([self.load(s) for s in chunk]), chunk

    def by_prompt(self) -> dict[int, list[Sample]]:
        """Samples grouped by prompt index (in order), e.g. for per-prompt diversity."""
        groups: dict[int, list[Sample]] = defaultdict(list)
        for s in self.samples:
            groups[s.prompt_index].append(s)
        return dict(groups)

    def prompts(self) -> dict[int, str]:
        """Prompt index -> prompt."""
        return {s.prompt_index: s.prompt for s in self.samples}
