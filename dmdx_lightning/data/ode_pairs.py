"""ODE-pair shards: the on-disk format, the writer helpers and the two DataModules around them.

ADP (the paper, Stage 1) trains on pairs ``(x_T, x_0)``: start noise and the teacher's final latent
from its PF-ODE with CFG, plus the prompt. They are made once by ``dmdx predict`` (see
:mod:`dmdx_lightning.methods.ode_pairs`) and stored in a directory:

```
<dir>/index.json              the manifest: header + one entry per finished shard
<dir>/shard-00000.safetensors tensors x_T (N, *latent), x0 (N, *latent), index (N,) int64;
                              metadata "prompts": JSON list of the N prompts
<dir>/shard-00000.json        the shard's own entry (range, count, sha256), written after the shard
```

Pair ``i`` uses prompt ``prompts[i % len(prompts)]`` and noise seeded by ``seed + i`` alone, and
shard ``k`` holds pairs ``[k * shard_size, (k + 1) * shard_size)``, so a shard's bytes depend on
neither the world size nor on which rank made it. Every file is written under a temporary name
and renamed, so a killed run leaves only whole files; the per-shard entry is written after its
shard, so "entry present and checksum matches" means "finished" and a rerun skips it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dmdx_lightning.atomic import atomic_path, write_text_atomic
from dmdx_lightning.checksums import sha256_file
from dmdx_lightning.data.prompts import dedupe, read_prompts
from dmdx_lightning.dtypes import DTYPES
from dmdx_lightning.rng import fixed_noise
from dmdx_lightning.data.resumable import ResumableTrainData

FORMAT = "dmdx-ode-pairs/1"
MANIFEST = "index.json"
#: how the start noise of pair ``i`` is drawn (recorded verbatim in the manifest)
SEED_RULE = "x_T[i] = torch.randn(latent_shape, generator=torch.Generator('cpu').manual_seed(seed + i))"
#: header keys that must agree between a manifest on disk and a rerun that appends to it
HEADER_KEYS = ("format", "teacher_family", "teacher_id", "latent_shape", "dtype", "sampler",
               "num_steps", "cfg_scale", "seed_rule", "seed", "num_pairs", "shard_size", "prompts_sha256")


class PairDataError(RuntimeError):
    """A pair directory that cannot be trained on (missing, corrupted, or made for another teacher)."""


# ----------------------------------------------------------------------------------------------
# Format helpers (pure functions on paths and tensors)
# ----------------------------------------------------------------------------------------------


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_ranges(num_pairs: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` pair ranges of every shard; the last one may be shorter."""
    if num_pairs < 1 or shard_size < 1:
        raise ValueError(f"num_pairs and shard_size must be >= 1, got {num_pairs}, {shard_size}")
    return [(s, min(s + shard_size, num_pairs)) for s in range(0, num_pairs, shard_size)]


def pair_noise(shape: Sequence[int], indices: Sequence[int], seed: int) -> Tensor:
    """Start noise of pairs ``indices`` (:data:`SEED_RULE`): a function of the pair index alone."""
    return fixed_noise((len(indices), *shape), [seed + int(i) for i in indices])


def prompts_sha256(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest()


def write_shard(directory: str | Path, k: int, x_T: Tensor, x0: Tensor, index: Tensor,
                prompts: Sequence[str]) -> dict[str, Any]:
    """Write shard ``k`` atomically, then its entry; returns the entry (range, count, sha256)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not (x_T.shape == x0.shape and x0.shape[0] == index.shape[0] == len(prompts)):
        raise ValueError(f"shard {k}: x_T {tuple(x_T.shape)}, x0 {tuple(x0.shape)}, index "
                         f"{tuple(index.shape)} and {len(prompts)} prompts disagree")
    order = torch.argsort(index)  # rows in pair order, whatever order the batches arrived in
    index = index[order]
    if not torch.equal(index, torch.arange(int(index[0]), int(index[0]) + len(index))):
        raise ValueError(f"shard {k}: pair indices are not one contiguous range: {index.tolist()[:8]}...")
    path = directory / shard_name(k)
    tensors = {"x_T": x_T[order].contiguous().cpu(), "x0": x0[order].contiguous().cpu(),
               "index": index.contiguous().cpu()}
    # serialised in memory, then written by Python: a full disk is then an OSError that names the shard
    # (safetensors' own file writer reports it as a SafetensorError without the path)
    data = safetensors_bytes(tensors, metadata={"prompts": json.dumps([prompts[i] for i in order.tolist()])})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    entry = {"file": path.name, "start": int(index[0]), "stop": int(index[-1]) + 1, "count": len(index),
             "sha256": sha256_file(path)}
    write_text_atomic(path.with_suffix(".json"), json.dumps(entry, indent=1) + "\n")
    return entry


def finished_shards(directory: str | Path, ranges: Sequence[tuple[int, int]]) -> dict[int, dict]:
    """Shards whose file and entry both exist, with the expected range and a matching checksum.

    Anything else (missing, half-written, corrupted, from another layout) is not finished and
    will be rebuilt.
    """
    directory = Path(directory)
    done = {}
    for k, (start, stop) in enumerate(ranges):
        path, entry_path = directory / shard_name(k), directory / shard_name(k).replace(".safetensors", ".json")
        if not (path.is_file() and entry_path.is_file()):
            continue
        try:
            entry = json.loads(entry_path.read_text())
        except json.JSONDecodeError:
            continue
        if (entry.get("start"), entry.get("stop")) == (start, stop) and entry.get("sha256") == sha256_file(path):
            done[k] = entry
    return done


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise PairDataError(f"ODE-pair manifest {path} not found: make the pairs first with "
                            f"`dmdx predict --config configs/quickstart/ode_pairs.yaml` (or your pairs config)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PairDataError(f"ODE-pair manifest {path} is not valid JSON ({e})") from None


def write_manifest(directory: str | Path, header: dict[str, Any], shards: dict[int, dict]) -> dict[str, Any]:
    num_shards = len(shard_ranges(header["num_pairs"], header["shard_size"]))
    manifest = {**header, "num_shards": num_shards, "complete": len(shards) == num_shards,
                "shards": [shards[k] for k in sorted(shards)]}
    write_text_atomic(Path(directory) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def check_header(existing: dict[str, Any], header: dict[str, Any], where: str | Path) -> None:
    """Refuse to add shards to a directory made with other settings (the pairs would be mixed)."""
    diff = {k: (existing.get(k), header.get(k)) for k in HEADER_KEYS if existing.get(k) != header.get(k)}
    if diff:
        pretty = ", ".join(f"{k}: {a!r} on disk vs {b!r} now" for k, (a, b) in diff.items())
        raise PairDataError(f"{where} was made with other settings ({pretty}); choose another "
                            "output directory or delete this one")


def verify_pairs(directory: str | Path, *, teacher=None, checksums: bool = True) -> dict[str, Any]:
    """Check a pair directory before training; returns the manifest.

    Raises :class:`PairDataError` naming the offending file when the manifest is missing or
    incomplete, a shard is missing, its checksum (hence any flipped or truncated byte) fails,
    or the manifest's teacher family / latent shape differ from ``teacher``'s.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = directory / MANIFEST
    if manifest.get("format") != FORMAT:
        raise PairDataError(f"{where} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not manifest.get("complete"):
        raise PairDataError(f"{where} lists {len(manifest['shards'])} of {manifest['num_shards']} shards: "
                            "the pair generation did not finish; rerun the same `dmdx predict` to complete it")
    if teacher is not None:
        shape = list(teacher.latent_shape(1)[1:])
        if manifest["teacher_family"] != teacher.family:
            raise PairDataError(f"{where} holds pairs of teacher family {manifest['teacher_family']!r}, but "
                                f"this run's teacher is {teacher.family!r}")
        if manifest["latent_shape"] != shape:
            raise PairDataError(f"{where} holds latents of shape {manifest['latent_shape']}, but this run's "
                                f"teacher makes {shape}")
        ident = teacher.identity()
        if manifest.get("teacher_id") != ident:
            rank_zero_warn(f"{where} was made by teacher {manifest.get('teacher_id')!r}; this run uses {ident!r} "
                           "(same family and latent shape, so training goes on)")
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.is_file():
            raise PairDataError(f"ODE-pair shard {path} is missing (listed in {where}); rerun the pair "
                                "generation to rebuild it")
        if checksums:
            found = sha256_file(path)
            if found != entry["sha256"]:
                raise PairDataError(
                    f"ODE-pair shard {path} fails its checksum (sha256 {found[:12]}... but {where} records "
                    f"{entry['sha256'][:12]}...): the file is corrupted or truncated. Delete it and rerun the "
                    "pair generation, which rebuilds only the missing shards")
    return manifest


# ----------------------------------------------------------------------------------------------
# Generation side: which pairs each rank makes
# ----------------------------------------------------------------------------------------------


class _PendingPairs(IterableDataset):
    """Batches ``{"prompt", "index", "shard"}`` of the pending shards this rank owns.

    An iterable dataset, so Lightning adds no ``DistributedSampler``: shards are dealt to ranks
    as ``k % world_size == rank`` here, and every shard is chunked into batches the same way
    whatever the world size (hence identical numerics with 1 or N processes).
    """

    def __init__(self, prompts: Sequence[str], ranges, shards: Sequence[int], batch_size: int) -> None:
        self.prompts, self.ranges, self.shards, self.batch_size = list(prompts), ranges, list(shards), batch_size

    def __len__(self) -> int:
        return sum(math.ceil((self.ranges[k][1] - self.ranges[k][0]) / self.batch_size) for k in self.shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for k in self.shards:
            start, stop = self.ranges[k]
            for s in range(start, stop, self.batch_size):
                idx = list(range(s, min(s + self.batch_size, stop)))
                yield {"prompt": [self.prompts[i % len(self.prompts)] for i in idx],
                       "index": torch.tensor(idx, dtype=torch.long), "shard": k}


class ODEPairPromptsDataModule(pl.LightningDataModule):
    """What ``dmdx predict`` makes: ``num_pairs`` pairs over a prompt file, in shards of a directory.

    Pair ``i`` is prompt ``prompts[i % len(prompts)]`` (prompts de-duplicated, in file order), so
    a 20-prompt file with ``num_pairs: 1280`` gives 64 pairs per prompt with different seeds.
    Finished shards in ``output_dir`` (entry present, checksum matching) are skipped, so a killed
    run resumes where it stopped. The :class:`~dmdx_lightning.methods.ode_pairs.ODEPairWriter`
    callback writes the shards into ``output_dir``.

    Args:
        prompt_file: ``.txt`` / ``.jsonl`` / ``.csv`` prompt file.
        output_dir: the pair directory (created if missing).
        num_pairs: total number of pairs.
        shard_size: pairs per shard (the last shard may be shorter).
        batch_size: pairs per teacher batch (a shard is made in ``ceil(shard_size / batch_size)``
            batches; it need not divide ``shard_size``).
        field: JSON key / CSV column of the prompt.
    """

    def __init__(self, prompt_file: str, output_dir: str, num_pairs: int, shard_size: int = 256,
                 batch_size: int = 64, field: str = "prompt") -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.prompt_file, self.output_dir = prompt_file, output_dir
        self.num_pairs, self.shard_size, self.batch_size, self.field = num_pairs, shard_size, batch_size, field
        self.ranges = shard_ranges(num_pairs, shard_size)
        self.prompts: list[str] | None = None
        self.done: dict[int, dict] = {}

    def setup(self, stage: str | None = None) -> None:
        self.prompts = dedupe(read_prompts(self.prompt_file, self.field))
        self.done = finished_shards(self.output_dir, self.ranges)

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        return [k for k in range(len(self.ranges)) if k % world_size == rank and k not in self.done]

    def predict_dataloader(self) -> DataLoader:
        if self.prompts is None:
            raise RuntimeError("ODEPairPromptsDataModule.setup() must run before asking for a dataloader")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        dataset = _PendingPairs(self.prompts, self.ranges, self.pending_shards(rank, world), self.batch_size)
        return DataLoader(dataset, batch_size=None)


# ----------------------------------------------------------------------------------------------
# Training side: reading the pairs
# ----------------------------------------------------------------------------------------------


class ODEPairDataset(Dataset):
    """Pairs as items ``{"prompt", "index", "x0", "x_T"}``, read lazily from the shards.

    Files are opened on first use in each process (DataLoader workers included) and memory-mapped
    by safetensors: no pickle, and only the rows asked for are read.

    Args:
        directory: the pair directory.
        manifest: its verified manifest (see :func:`verify_pairs`).
    """

    def __init__(self, directory: str | Path, manifest: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.entries = manifest["shards"]
        self.dtype = DTYPES[manifest["dtype"]]
        self.starts = [e["start"] for e in self.entries]
        self.length = sum(e["count"] for e in self.entries)
        self._handles: dict[int, Any] = {}
        self._prompts: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return self.length

    def _open(self, k: int):
        if k not in self._handles:
            f = safe_open(str(self.directory / self.entries[k]["file"]), framework="pt")
            self._handles[k] = f
            self._prompts[k] = json.loads(f.metadata()["prompts"])
        return self._handles[k], self._prompts[k]

    def __getstate__(self):  # open handles do not cross process boundaries (DataLoader workers)
        return {**self.__dict__, "_handles": {}, "_prompts": {}}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(f"pair {i} out of range for {self.length} pairs")
        k = bisect.bisect_right(self.starts, i) - 1
        row = i - self.starts[k]
        f, prompts = self._open(k)
        return {"prompt": prompts[row], "index": i,
                "x0": f.get_slice("x0")[row:row + 1][0].float(),
                "x_T": f.get_slice("x_T")[row:row + 1][0].float()}


def collate_pairs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"prompt": [it["prompt"] for it in items],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "x0": torch.stack([it["x0"] for it in items]), "x_T": torch.stack([it["x_T"] for it in items])}


class ODEPairDataModule(ResumableTrainData, pl.LightningDataModule):
    """ODE pairs for ADP (or DMD2's real latents): batches ``{"prompt", "index", "x0", "x_T"}``.

    ``setup`` checks the directory before any training step: the manifest must be complete, every
    shard present with its recorded sha256, and, when the trainer holds a module with a
    ``teacher``, the manifest's teacher family and latent shape must match it. Each failure is a
    :class:`PairDataError` naming the file.

    DDP: the loader splits each epoch across ranks itself, with a
    :class:`~dmdx_lightning.data.resumable.ResumableDistributedSampler` (so Lightning leaves it
    alone), and resumes mid-epoch exactly (:mod:`dmdx_lightning.data.resumable`).

    Args:
        path: the pair directory written by ``dmdx predict`` (holds ``index.json``).
        batch_size: pairs per batch and per process.
        num_workers: DataLoader worker processes.
        shuffle: shuffle the pairs every epoch.
        verify_checksums: hash every shard in ``setup`` (turn off only for very large sets that
            were verified before).
    """

    #: the batch keys this data module serves (a method that needs more is refused at setup)
    provides = ("prompt", "index", "x0", "x_T")

    @classmethod
    def check_options(cls, options, key: str = "data.init_args") -> None:
        """The pair folder must hold a manifest (the pairs are made by ``dmdx predict``) before a run
        that trains on it builds anything."""
        read_manifest(options.get("path"))

    def __init__(self, path: str, batch_size: int = 32, num_workers: int = 0, shuffle: bool = True,
                 verify_checksums: bool = True) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size, self.num_workers = path, batch_size, num_workers
        self.shuffle, self.verify_checksums = shuffle, verify_checksums
        self.manifest: dict[str, Any] | None = None
        self.dataset: ODEPairDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        teacher = module.teacher if module is not None else None  # every distillation module has one
        self.manifest = verify_pairs(self.path, teacher=teacher, checksums=self.verify_checksums)
        self.dataset = ODEPairDataset(self.path, self.manifest)

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            raise RuntimeError("ODEPairDataModule.setup() must run before asking for a dataloader")
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(self.dataset) // world < self.batch_size:
            raise ValueError(f"{self.path} holds {len(self.dataset)} pairs, fewer than batch_size="
                             f"{self.batch_size} per rank ({world} ranks)")
        # rank split and exact mid-epoch resume, as for prompts (data/resumable.py)
        return self.resumable_train_loader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle,
                                           num_workers=self.num_workers, collate_fn=collate_pairs)
