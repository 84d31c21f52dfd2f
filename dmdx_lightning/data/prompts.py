"""Prompt sources, a deterministic train/val split, and the prompt DataModule.

Distillation here is data-free apart from prompts: the student is trained on text prompts
only, and the teacher supplies the targets. A prompt source is a ``.txt`` file (one prompt a
line), a ``.jsonl`` file (one JSON object a line), a ``.csv`` file (one row a prompt, with a
header), a ``.parquet`` file (one row a prompt), a Hugging Face ``datasets`` folder written by
``save_to_disk``, or a dataset name on the Hugging Face Hub (e.g. a JourneyDB prompt dump).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from dmdx_lightning.data.resumable import ResumableTrainData

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".csv", ".parquet")
# `name` or `owner/name` as the Hub spells dataset ids; anything else is only ever a local path
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# ----------------------------------------------------------------------------------------------
# Reading prompt files
# ----------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    # Spreadsheet tools often prepend a UTF-8 byte-order mark; it is not part of the first prompt.
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = data[:offset].count(b"\n") + 1
        raise ValueError(
            f"prompt file {path} is not UTF-8 text: byte 0x{data[offset]:02x} at byte offset "
            f"{offset} (line {line}); re-save the file with UTF-8 encoding"
        ) from None


def _lines(text: str) -> list[str]:
    # Split on "\n" only: str.splitlines also breaks on U+2028 and friends, which JSON allows
    # inside strings and which would shift line numbers away from the byte-offset count.
    return text.split("\n")


def _prompts_from_txt(text: str) -> list[str]:
    lines = (line.strip() for line in _lines(text))
    return [line for line in lines if line and not line.startswith("#")]


def _prompts_from_jsonl(text: str, path: Path, field: str) -> list[str]:
    prompts = []
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"prompt file {path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"prompt file {path}, line {lineno}: expected a JSON object with key {field!r}, "
                f"got {type(record).__name__}"
            )
        if field not in record:
            raise ValueError(
                f"prompt file {path}, line {lineno}: missing key {field!r} "
                f"(keys present: {sorted(record)}); choose the key with `field`"
            )
        prompts.append(_as_prompt(record[field], f"prompt file {path}, line {lineno}", field))
    return prompts


def _prompts_from_csv(text: str, path: Path, field: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    prompts = []
    try:
        if reader.fieldnames is None:
            return []
        if field not in reader.fieldnames:
            raise ValueError(
                f"prompt file {path}, line 1: missing column {field!r} in the header "
                f"(columns present: {reader.fieldnames}); choose the column with `field`"
            )
        for row in reader:
            # reader.line_num counts physical lines, so quoted multi-line prompts stay right.
            if row[field] is None:
                raise ValueError(
                    f"prompt file {path}, line {reader.line_num}: row is too short to have "
                    f"column {field!r}"
                )
            prompts.append(_as_prompt(row[field], f"prompt file {path}, line {reader.line_num}", field))
    except csv.Error as e:
        raise ValueError(
            f"prompt file {path}, line {reader.line_num}: malformed CSV ({e})"
        ) from None
    return prompts


def _as_prompt(value: Any, where: str, field: str) -> str:
    """One row's prompt, stripped; ``where`` names the file (or dataset) and the row."""
    if isinstance(value, bytes):  # Parquet / Arrow binary columns: text only if it is UTF-8
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{where}: {field!r} is not UTF-8 text (byte 0x{value[e.start]:02x} at offset "
                f"{e.start}); re-encode the column as UTF-8"
            ) from None
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: {field!r} must be a string, got {type(value).__name__} {value!r}"
        )
    prompt = value.strip()
    # A blank row in a table is a broken row (a wrong column, a failed export), not layout as a
    # blank line of a .txt file is; skipping it would quietly change which prompts are trained.
    if not prompt:
        raise ValueError(
            f"{where}: empty prompt in {field!r} (an empty prompt is the unconditional CFG "
            f"branch, never a training prompt); remove the row or fill it in"
        )
    return prompt


def _prompts_from_arrow(column, where: str, field: str) -> list[str]:
    """The prompts of one Arrow column (a Parquet file's or a ``datasets.Dataset``'s), in row order.

    Rows are counted from 0, as ``dataset[i]`` and ``pandas.DataFrame.iloc[i]`` count them.
    """
    import pyarrow as pa

    try:
        values = column.to_pylist()
    except UnicodeDecodeError:
        # a string column whose bytes are not UTF-8 (Arrow does not check on read): find the row
        values = column.cast(pa.large_binary()).to_pylist()
    return [_as_prompt(v, f"{where}, row {i}", field) for i, v in enumerate(values)]


def _prompts_from_parquet(path: Path, field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"prompt file {path} is not a readable Parquet file ({e})") from None
    names = parquet.schema_arrow.names
    if field not in names:
        raise ValueError(
            f"prompt file {path}: missing column {field!r} (columns present: {names}); "
            f"choose the column with `field`"
        )
    column = parquet.read(columns=[field]).column(field)
    return _prompts_from_arrow(column, f"prompt file {path}", field)


def _is_saved_dataset(path: Path) -> bool:
    # what datasets' save_to_disk writes: a Dataset, or a DatasetDict of one folder per split
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _prompts_from_dataset(dataset, where: str, field: str, split: str) -> list[str]:
    """The prompts of a ``datasets.Dataset`` or, by ``split``, of a ``DatasetDict``."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(
                f"{where} has no split {split!r} (splits: {sorted(dataset)}); choose one with `split`"
            )
        dataset, where = dataset[split], f"{where}, split {split!r}"
    if field not in dataset.column_names:
        raise ValueError(
            f"{where}: missing column {field!r} (columns present: {dataset.column_names}); "
            f"choose the column with `field`"
        )
    # Arrow, not dataset[field]: the latter builds Python objects row by row (~1 s per 100k rows);
    # the arrow format still applies any row selection (indices) the dataset carries
    column = dataset.select_columns([field]).with_format("arrow")[:].column(field)
    return _prompts_from_arrow(column, where, field)


def _prompts_from_hub(name: str, field: str, split: str, key: str | None) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, gated, no such split: all end the same way
        offline = datasets.config.HF_HUB_OFFLINE
        why = ("offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set), so only a dataset already in "
               "the Hugging Face cache loads" if offline else "the Hub could not provide it")
        origin, option = (f" ({key})", key) if key else ("", "it")
        raise FileNotFoundError(
            f"prompt source {name!r}{origin} is not a local file or folder (resolved to "
            f"{Path(name).resolve()}) and loading it as a Hugging Face dataset failed: {why} "
            f"({type(e).__name__}: {e}). Fix: point {option} at a prompt file or at a folder written "
            f"by `datasets.load_dataset({name!r}, split={split!r}).save_to_disk(folder)` on a "
            f"machine with network access, or load it once online so that it is cached"
        ) from None
    return _prompts_from_dataset(dataset, f"dataset {name!r}, split {split!r}", field, split)


def read_prompts(
    path: str | Path, field: str = "prompt", split: str = "train", key: str | None = None
) -> list[str]:
    """Read the prompts of a file, a ``save_to_disk`` folder or a Hub dataset, in row order.

    - ``.txt``: one prompt a line; blank lines and lines starting with ``#`` are skipped.
    - ``.jsonl``: one JSON object a line (blank lines skipped); the prompt is ``object[field]``.
    - ``.csv``: a header row, then one prompt a row in column ``field``.
    - ``.parquet``: one prompt a row in column ``field``.
    - a folder written by ``datasets``' ``save_to_disk``: column ``field`` of the ``Dataset``,
      or of split ``split`` of a ``DatasetDict``.
    - anything else that does not exist locally and reads as ``name`` or ``owner/name``: the
      Hugging Face Hub dataset of that id, split ``split`` (``datasets.load_dataset``; offline,
      only from the local cache).

    Prompts are stripped of surrounding whitespace. A row of a table format (every format but
    ``.txt``) whose prompt is empty, not a string, or not UTF-8 is an error: an empty prompt is
    the unconditional CFG branch, never a training prompt. Duplicates are kept; see :func:`dedupe`.

    Args:
        path: the prompt file, ``save_to_disk`` folder or Hub dataset id.
        field: the JSON key (``.jsonl``) or column (every other table format) holding the prompt.
        split: the split of a Hub dataset or a saved ``DatasetDict`` (unused for files).
        key: the config option ``path`` came from, named in not-found errors (e.g.
            ``data.init_args.train_file``).

    Raises:
        FileNotFoundError: ``path`` does not exist (and is no loadable Hub dataset), or is a
            directory that ``save_to_disk`` did not write.
        ValueError: unsupported extension, bytes that are not UTF-8, malformed JSON/CSV/Parquet,
            a missing key, column or split, a bad row, or a source without any prompt. Every
            message names the file or dataset (and the line or row, where there is one).
    """
    name, path = str(path), Path(path)  # the name as written: Path("./x") would read as a Hub id "x"
    supported = "/".join(SUPPORTED_SUFFIXES)
    origin = f" ({key})" if key else ""
    if path.is_dir():
        if not _is_saved_dataset(path):
            raise FileNotFoundError(
                f"prompt file {path}{origin} is a directory but not a `datasets` save_to_disk "
                f"folder (no dataset_info.json or dataset_dict.json in {path.resolve()}); pass a "
                f"{supported} file or such a folder"
            )
        import datasets

        prompts = _prompts_from_dataset(datasets.load_from_disk(str(path)), f"dataset folder {path}",
                                        field, split)
    elif not path.is_file():
        if _HUB_NAME.fullmatch(name) and path.suffix.lower() not in SUPPORTED_SUFFIXES:
            prompts = _prompts_from_hub(name, field, split, key)
        else:
            raise FileNotFoundError(
                f"prompt file {path}{origin} not found (no such file; resolved to "
                f"{path.resolve()}); pass an existing {supported} file (e.g. "
                f"configs/prompts/digits.txt), a `datasets` save_to_disk folder or a Hub dataset id"
            )
    else:
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"prompt file {path} has unsupported extension {path.suffix!r}; "
                f"supported: {', '.join(SUPPORTED_SUFFIXES)} (or a `datasets` save_to_disk folder)"
            )
        if suffix == ".parquet":
            prompts = _prompts_from_parquet(path, field)
        else:
            text = _read_text(path)
            if suffix == ".txt":
                prompts = _prompts_from_txt(text)
            elif suffix == ".jsonl":
                prompts = _prompts_from_jsonl(text, path, field)
            else:
                prompts = _prompts_from_csv(text, path, field)
    if not prompts:
        raise ValueError(f"prompt file {path} contains no prompts")
    return prompts


# ----------------------------------------------------------------------------------------------
# Pure list operations
# ----------------------------------------------------------------------------------------------


def dedupe(prompts: Sequence[str]) -> list[str]:
    """Strip whitespace and drop repeated prompts, keeping each one's first position."""
    # dict keeps insertion order, so this is order-preserving.
    return list(dict.fromkeys(p.strip() for p in prompts))


def _unit_hash(prompt: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_prompts(
    prompts: Sequence[str], val_fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split prompts into ``(train, val)``, each keeping the input order.

    Each prompt's side is decided by its own hash ``sha256(f"{seed}:{prompt}")`` alone, so the
    split does not depend on file order, on the other prompts, or on how many processes read the
    file; duplicates of a prompt always land on the same side (no train/val leak). The val share
    is ``val_fraction`` in expectation, not exactly.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for p in prompts:
        (val if _unit_hash(p, seed) < val_fraction else train).append(p)
    return train, val


# ----------------------------------------------------------------------------------------------
# Dataset, collate and DataModule
# ----------------------------------------------------------------------------------------------


class PromptDataset(Dataset):
    """Prompts as items ``{"prompt": str, "index": int}``.

    ``index`` is the prompt's position in ``prompts`` (the de-duplicated list), so it names the
    prompt itself whatever the epoch, repeat or rank, and can seed per-prompt noise.

    Args:
        prompts: the prompt list (de-duplicated by the DataModule).
        repeat: how many times the list is seen per epoch; useful when a small prompt file
            (e.g. 20 digit prompts) must fill several batches per epoch.
    """

    def __init__(self, prompts: Sequence[str], repeat: int = 1) -> None:
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        self.prompts = list(prompts)
        self.repeat = repeat

    def __len__(self) -> int:
        return len(self.prompts) * self.repeat

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        j = (i % n) % len(self.prompts)
        return {"prompt": self.prompts[j], "index": j}


def collate_prompts(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items into ``{"prompt": list[str], "index": LongTensor (B,)}``."""
    return {
        "prompt": [item["prompt"] for item in items],
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


class PromptDataModule(ResumableTrainData, pl.LightningDataModule):
    """Prompts for distillation, read from a file or dataset and split into train and val.

    Batches are ``{"prompt": list[str], "index": LongTensor}``; ``index`` is the prompt's
    position in the de-duplicated train (or val) list.

    The train loader is a :class:`~dmdx_lightning.data.resumable.ResumableDataLoader`: its
    position in the epoch is saved in checkpoints, so ``--ckpt_path`` resumes mid-epoch with the
    same prompts in the same order. The epoch's order is a function of the global seed
    (``seed_everything``) and the epoch alone. Under DDP it splits every epoch across ranks
    itself (disjoint shares; Lightning leaves it in place because it is a
    ``DistributedSampler``), padding the epoch with a few repeated prompts when the dataset size
    is not divisible by the number of ranks.

    Args:
        train_file: prompts for training: a ``.txt``, ``.jsonl``, ``.csv`` or ``.parquet`` file,
            a folder written by ``datasets``' ``save_to_disk``, or a Hugging Face Hub dataset id
            (read offline from the local cache only; see :func:`read_prompts`).
        val_file: separate prompt source for validation (any kind ``train_file`` takes); if
            given, ``val_fraction`` must be 0.
        val_fraction: share of ``train_file``'s prompts held out for validation, chosen per
            prompt by a seeded hash (independent of file order and process count).
        field: JSON key (``.jsonl``) or column (``.csv``, ``.parquet``, datasets) holding the prompt.
        split: split of ``train_file`` when it is a Hub dataset or a saved ``DatasetDict``.
        val_split: split of ``val_file`` when it is a Hub dataset or a saved ``DatasetDict``
            (default: ``split``; set e.g. ``validation`` when both name the same dataset).
        batch_size: prompts per batch and per process.
        repeat: times the train list is seen per epoch; raise it when the file has fewer
            prompts than a batch.
        num_workers: DataLoader worker processes (0 reads in the main process; prompts are
            cheap, so 0 is usually enough).
        seed: seed of the train/val hash split.
        shuffle: shuffle the train prompts every epoch.
    """

    #: the batch keys this data module serves (a method that needs more is refused at setup)
    provides = ("prompt",)

    @classmethod
    def check_options(cls, options, key: str = "data.init_args") -> None:
        """Read the prompt sources a config names, before anything is built: a missing or
        unreadable file stops the run at setup with read_prompts' message (file, line, fix)."""
        for name in ("train_file", "val_file"):
            if options.get(name):
                read_prompts(options[name], options.get("field", "prompt"), options.get("split", "train"),
                             key=f"{key}.{name}")

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float = 0.0,
        field: str = "prompt",
        split: str = "train",
        val_split: str | None = None,
        batch_size: int = 8,
        repeat: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if val_file is not None and val_fraction > 0:
            raise ValueError(
                f"give either val_file ({val_file}) or val_fraction ({val_fraction}), not both"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.train_file = train_file
        self.val_file = val_file
        self.val_fraction = val_fraction
        self.field = field
        self.split = split
        self.val_split = split if val_split is None else val_split
        self.batch_size = batch_size
        self.repeat = repeat
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.train_prompts: list[str] | None = None
        self.val_prompts: list[str] | None = None
        self._train_loader = None

    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup once per stage; the files do not change in between.
        if self.train_prompts is not None:
            return
        train = dedupe(read_prompts(self.train_file, self.field, self.split,
                                    key="data.init_args.train_file"))
        if self.val_file is not None:
            val = dedupe(read_prompts(self.val_file, self.field, self.val_split,
                                      key="data.init_args.val_file"))
        elif self.val_fraction > 0:
            train, val = split_prompts(train, self.val_fraction, self.seed)
            if not train:
                raise ValueError(
                    f"val_fraction={self.val_fraction} left no train prompts out of "
                    f"{len(val)} in {self.train_file}; lower val_fraction"
                )
            if not val:
                rank_zero_warn(
                    f"val_fraction={self.val_fraction} selected no validation prompts out of "
                    f"{len(train)} in {self.train_file}; validation is skipped"
                )
        else:
            val = []
        self.train_prompts, self.val_prompts = train, val

    def _require_setup(self) -> None:
        if self.train_prompts is None:
            raise RuntimeError("PromptDataModule.setup() must run before asking for a dataloader")

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        dataset = PromptDataset(self.train_prompts, self.repeat)
        # Under DDP each rank gets ceil(len / world_size) items; with drop_last a rank holding
        # fewer than batch_size items would train on nothing.
        world = self.trainer.world_size if self.trainer is not None else 1
        per_rank = math.ceil(len(dataset) / world)
        if per_rank < self.batch_size:
            needed = math.ceil(self.batch_size * world / len(self.train_prompts))
            where = f" per rank ({world} ranks)" if world > 1 else ""
            raise ValueError(
                f"train set has {len(self.train_prompts)} prompts x repeat {self.repeat} = "
                f"{per_rank}{where}, fewer than batch_size={self.batch_size} (from "
                f"{self.train_file}); set repeat >= {needed} or lower batch_size"
            )
        return self.resumable_train_loader(dataset, batch_size=self.batch_size, shuffle=self.shuffle,
                                           num_workers=self.num_workers, collate_fn=collate_prompts)

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        if not self.val_prompts:
            return []  # Lightning skips validation on an empty list.
        return DataLoader(
            PromptDataset(self.val_prompts),
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_prompts,
        )
