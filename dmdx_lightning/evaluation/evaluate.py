"""The paper's evaluation protocol, side by side with the teacher: ``dmdx evaluate --config configs/eval/X.yaml``.

One YAML file (``configs/eval/``) names the models (students from a checkpoint, a run folder or a
``dmdx export`` folder, and the teacher with its own sampler, steps and CFG), a prompt set, the
samples per prompt, the seed and the metrics. The command generates every model's samples into a
folder, then scores them and writes one table:

``<output>/<label>/images/``
    one PNG per image (``<prompt #>_<slug>_seed<S>.png``); a video is one lossless PNG strip of
    its frames, top to bottom (what the metrics read), and a GIF beside it (to look at).
``<output>/<label>/records.rank<r>.jsonl``
    one line per sample, appended only once its file is in place (flushed at once, synced to disk
    once per chunk): prompt index, prompt, seed, file, the file's sha256, sampling seconds, NFE.
    Written by rank ``r``, which holds ``.lock.rank<r>`` meanwhile (:func:`writer_lock`).
``<output>/<label>/records.jsonl``
    every rank's records merged in canonical order (prompt, then seed): what scoring reads.
``<output>/<label>/model.json``
    the source, the sampler's settings and the generation settings; a later run into the same
    folder with other settings stops instead of mixing samples.
``<output>/results.md``, ``results.json``, ``per_prompt.json``, ``contact_sheet.png``, ``tensorboard/<label>/``
    one row per model (NFE, seconds per sample, every metric), the per-prompt values, the
    teacher's and the students' samples of the same prompts and seeds side by side, and each
    metric as the TensorBoard scalar ``eval/<metric>`` of run ``<label>``.

**Seeds.** Sample ``j`` of prompt ``i`` starts from the noise of seed ``seed + i * N + j`` (``N``
samples per prompt; :func:`~dmdx_lightning.rng.fixed_noise`), for every model: the teacher and
each student start from the same noise, and no two samples of a set share it. The unit of work is
a chunk of ``batch_size`` samples drawn in one forward: one prompt's seeds, or, when a prompt has
fewer samples than ``batch_size`` (COCO: one image per caption), consecutive prompts' samples
together; a multi-step sampler's fresh noise is seeded by the chunk's first seed. So a sample is a
function of the model, its prompt and seed and the chunking (``batch_size``, ``samples_per_prompt``)
alone: the same on 1 or 8 ranks, and the same when generated again after a kill.

**Resume.** Every file is written atomically (:mod:`dmdx_lightning.atomic`) and its record is
appended after it, so a killed run leaves complete files and at most a torn last record line. The
next run keeps the records whose file exists with the recorded sha256 and generates the rest (a
chunk with any sample missing is generated again whole, which rewrites the same bytes).

**Ranks.** Under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``)
rank ``r`` of ``W`` generates chunks ``r, r + W, ...`` on ``cuda:LOCAL_RANK`` and writes its own
record file; after a barrier (a gloo process group of our own when none is initialised) rank 0
merges and scores. ``--stage generate`` / ``--stage score`` split the two, e.g. for jobs without
a rendezvous (each with ``RANK`` / ``WORLD_SIZE`` set), then one ``--stage score`` job.

A user's mistake (a missing source, prompt file, metric model or reference; a config key of the
wrong type) ends the command with one message naming the key and the path, exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from dmdx_lightning.atomic import atomic_path, write_json_atomic, write_text_atomic
from dmdx_lightning.checksums import sha256_file
from dmdx_lightning.errors import ConfigError, SetupError, import_class

DESCRIPTION = ("Evaluate students side by side with their teacher: generate every model's samples of a prompt set "
               "(resumable, sharded over ranks), score them, and write results.md / results.json, per-prompt "
               "values, a contact sheet and TensorBoard scalars.")
EXAMPLES = """examples:
  dmdx evaluate --config configs/eval/digits.yaml                       # after `make quickstart`, CPU, offline
  dmdx evaluate --config configs/eval/sd3_coco_10k.yaml                 # the paper's SD3 table (GPUs)
  torchrun --nproc_per_node 8 -m dmdx_lightning.cli evaluate --config configs/eval/sd3_coco_10k.yaml
  dmdx evaluate --config eval/sd3_coco_10k.yaml --max_prompts 100 --output runs/eval/coco_100   # a quick look
"""
RECORDS = "records.jsonl"
MODEL_INFO = "model.json"
RESULTS_JSON, RESULTS_MD, PER_PROMPT = "results.json", "results.md", "per_prompt.json"
CONTACT_SHEET = "contact_sheet.png"
TENSORBOARD = "tensorboard"
IMAGES = "images"
STAGES = ("all", "generate", "score")
#: what the config file may hold at its top level (anything else is a misspelt key)
TOP_KEYS = ("output", "prompts", "samples_per_prompt", "seed", "batch_size", "models", "metrics", "contact_sheet",
            "fps", "device")
_LABEL = re.compile(r"[A-Za-z0-9][\w.-]*")


# ---------------------------------------------------------------------------------------- the config
@dataclass
class ModelSpec:
    """One model of the table: a student (``source``: a checkpoint, a run folder or a ``dmdx export``
    folder) or, with ``teacher: true``, the teacher of ``source``'s config (or of ``config``) with its
    own ODE sampler at ``steps`` and guidance ``cfg`` (default: the config's ``sample_steps`` and
    ``cfg_scale``). ``label`` names its folder, its row and its TensorBoard run. ``teacher_args``:
    teacher options replacing the config's for a checkpoint, run folder or ``teacher: true`` (e.g.
    ``{resolution: 512}`` for SD3 / SDXL, ``{height: 480, width: 720, num_frames: 49}`` for
    CogVideoX); an exported folder samples as it was exported."""

    label: str
    source: str
    teacher: bool = False
    config: str | None = None
    steps: int | None = None
    cfg: float | None = None
    ema: bool = True
    dtype: str | None = None
    teacher_args: dict | None = None


@dataclass
class PromptSpec:
    """The prompt set: ``source`` is a .txt / .jsonl / .csv / .tsv / .parquet file, a ``datasets``
    ``save_to_disk`` folder, a Hub dataset id (from the local cache when offline), or COCO's caption
    annotations (``captions_val2014.json``: one caption per image, the first by annotation id, images
    in id order). ``max_prompts``: keep that many (after a shuffle seeded by ``shuffle_seed``, when set)."""

    source: str
    field: str = "prompt"
    split: str = "train"
    max_prompts: int | None = None
    shuffle_seed: int | None = None


@dataclass
class EvalConfig:
    """An evaluation config (the YAML file's top-level keys; see ``configs/eval/digits.yaml``).

    Attributes:
        output: the folder everything is written to.
        prompts: the prompt set (:class:`PromptSpec`; a string is its ``source``).
        models: the models of the table, in its row order (:class:`ModelSpec`; a string is a source).
        metrics: ``{name: ..., init_args: {...}}`` (a key of ``METRICS``) or ``{class_path: ...,
            init_args: {...}}`` (any ``Metric`` subclass) per metric.
        samples_per_prompt: samples of each prompt per model (``N``).
        seed: sample ``j`` of prompt ``i`` starts from the noise of seed ``seed + i * N + j``.
        batch_size: samples drawn in one forward (default ``N``): one prompt's, or several prompts'
            when ``N`` is smaller; part of what fixes a multi-step student's samples (its fresh
            noise is seeded per chunk).
        contact_sheet: ``prompts`` (rows), ``seeds`` (columns per model), ``size`` (cell pixels).
        fps: frames per second of the GIFs written for videos.
        device: torch device (default ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU).
    """

    output: str
    prompts: PromptSpec
    models: list[ModelSpec]
    metrics: list[dict] = field(default_factory=list)
    samples_per_prompt: int = 1
    seed: int = 0
    batch_size: int | None = None
    #: the contact sheet: its first ``prompts`` prompts, the first ``seeds`` samples of each per model,
    #: cells ``size`` pixels on their short side
    contact_sheet: dict = field(default_factory=lambda: {"prompts": 8, "seeds": 2, "size": 128})
    fps: int = 8
    device: str | None = None

    @property
    def chunk(self) -> int:
        return self.batch_size or self.samples_per_prompt


def _packaged(value):
    """Every ``${dmdx.configs:prompts/x.txt}`` in a parsed config -> the shipped file, as the training
    configs' resolver (:func:`~dmdx_lightning.configs_index.packaged_path`) gives it."""
    from dmdx_lightning.configs_index import packaged_path

    if isinstance(value, str):
        return re.sub(r"\$\{dmdx\.configs:([^}]*)\}", lambda m: packaged_path(m.group(1)), value)
    if isinstance(value, dict):
        return {k: _packaged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_packaged(v) for v in value]
    return value


def read_config_files(paths: Sequence[str]) -> tuple[dict, list[str]]:
    """The merged YAML of ``--config`` files (a later file's top-level keys replace an earlier's) and
    the files read. A name that is no file here is a shipped config (``eval/digits.yaml``)."""
    import yaml

    from dmdx_lightning.configs_index import resolve_config
    from dmdx_lightning.errors import check_config_files

    merged: dict = {}
    files = []
    for value in paths:
        path = resolve_config(value)
        check_config_files(["--config", path])  # a YAML error names the file, line and column
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise SetupError(f"--config {value}: expected a mapping of keys ({', '.join(TOP_KEYS)}), got "
                             f"{type(data).__name__}")
        merged.update(data)
        files.append(path)
    return merged, files


def parse_config(raw: dict) -> EvalConfig:
    """Check every key of an evaluation config and build it; a wrong one is a :class:`ConfigError`
    naming it."""
    import difflib

    raw = _packaged(raw)
    for key in raw:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(key, TOP_KEYS, n=1)
            raise ConfigError(key, raw[key], "is not an evaluation config key",
                              f"Did you mean {close[0]}?" if close else f"The keys: {', '.join(TOP_KEYS)}.")
    for key in ("output", "prompts", "models"):
        if raw.get(key) in (None, "", []):
            raise ConfigError(key, raw.get(key), "is required", "See configs/eval/digits.yaml for a complete config.")
    prompts = raw["prompts"]
    if isinstance(prompts, str):
        prompts = {"source": prompts}
    prompts = _dataclass(PromptSpec, prompts, "prompts")
    if prompts.max_prompts is not None and prompts.max_prompts < 1:
        raise ConfigError("prompts.max_prompts", prompts.max_prompts, "must be >= 1 (or null: every prompt)")
    models = raw["models"]
    if not isinstance(models, list):
        raise ConfigError("models", models, "must be a list of models ({source: ..., label: ...})")
    specs = []
    for k, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"source": entry}
        if not isinstance(entry, dict) or "source" not in entry:
            raise ConfigError(f"models[{k}]", entry, "needs a source (a checkpoint, run folder, export folder or, "
                              "with teacher: true, a config)")
        entry = dict(entry)
        entry.setdefault("label", "teacher" if entry.get("teacher") else Path(str(entry["source"])).name or "model")
        spec = _dataclass(ModelSpec, entry, f"models[{k}]")
        if not _LABEL.fullmatch(spec.label) or spec.label == TENSORBOARD:
            raise ConfigError(f"models[{k}].label", spec.label, "must be a folder name: letters, digits, '_', '-', "
                              f"'.' (and not {TENSORBOARD!r})")
        if spec.label in {s.label for s in specs}:
            raise ConfigError(f"models[{k}].label", spec.label, "is already the label of another model",
                              "Give each model its own label.")
        if spec.steps is not None and spec.steps < 1:
            raise ConfigError(f"models[{k}].steps", spec.steps, "must be >= 1")
        if spec.teacher_args is not None and not isinstance(spec.teacher_args, dict):
            raise ConfigError(f"models[{k}].teacher_args", spec.teacher_args, "must be a mapping of teacher options",
                              "e.g. teacher_args: {resolution: 512}")
        specs.append(spec)
    metrics = raw.get("metrics") or []
    if not isinstance(metrics, list):
        raise ConfigError("metrics", metrics, "must be a list of {name: ..., init_args: {...}} or "
                          "{class_path: ..., init_args: {...}}")
    for k, entry in enumerate(metrics):
        if not isinstance(entry, dict) or ("name" in entry) == ("class_path" in entry):
            raise ConfigError(f"metrics[{k}]", entry, "needs exactly one of name (a registered metric) or class_path")
        unknown = set(entry) - {"name", "class_path", "init_args"}
        if unknown:
            raise ConfigError(f"metrics[{k}].{sorted(unknown)[0]}", entry[sorted(unknown)[0]],
                              "is not a metric key (name, class_path, init_args)")
    cfg = EvalConfig(output=str(raw["output"]), prompts=prompts, models=specs, metrics=metrics,
                     **{k: raw[k] for k in ("samples_per_prompt", "seed", "batch_size", "fps", "device") if k in raw})
    if "contact_sheet" in raw:
        cfg.contact_sheet = {**cfg.contact_sheet, **(raw["contact_sheet"] or {})}
    for key in ("samples_per_prompt", "batch_size", "fps"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(key, value, "must be an integer >= 1")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError("seed", cfg.seed, "must be an integer")
    return cfg


def _dataclass(cls, values: dict, key: str):
    import dataclasses

    if not isinstance(values, dict):
        raise ConfigError(key, values, f"must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in names:
            raise ConfigError(f"{key}.{name}", value, "is not a key here", f"The keys: {', '.join(names)}.")
    try:
        return cls(**values)
    except TypeError as e:  # a required key left out
        raise ConfigError(key, values, str(e).split(".__init__() ")[-1]) from None


# ---------------------------------------------------------------------------------------- prompts
def read_eval_prompts(spec: PromptSpec) -> list[str]:
    """The prompt set of ``spec``, in order (see :class:`PromptSpec`)."""
    source = Path(spec.source)
    if source.suffix.lower() == ".json" and source.is_file():
        prompts = _coco_captions(source)
    elif source.suffix.lower() == ".tsv" and source.is_file():
        prompts = _tsv_prompts(source, spec.field)
    else:
        from dmdx_lightning.data.prompts import read_prompts

        prompts = read_prompts(spec.source, field=spec.field, split=spec.split, key="prompts.source")
    if spec.shuffle_seed is not None:
        import random

        prompts = list(prompts)
        random.Random(spec.shuffle_seed).shuffle(prompts)
    if spec.max_prompts is not None:
        prompts = prompts[:spec.max_prompts]
    return prompts


def _coco_captions(path: Path) -> list[str]:
    """COCO caption annotations (``captions_val2014.json``): one caption per image, the one with the
    lowest annotation id, images in id order."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"prompts.source {path}: a .json prompt file must be COCO caption annotations (an object "
                         "with an 'annotations' list, e.g. captions_val2014.json); use .jsonl for one object a line")
    first: dict[int, tuple[int, str]] = {}
    for ann in data["annotations"]:
        image, ident, caption = ann["image_id"], ann["id"], " ".join(str(ann["caption"]).split())
        if caption and (image not in first or ident < first[image][0]):
            first[image] = (ident, caption)
    if not first:
        raise ValueError(f"prompts.source {path}: no captions in its 'annotations'")
    return [first[image][1] for image in sorted(first)]


def _tsv_prompts(path: Path, field: str) -> list[str]:
    """A tab-separated file with a header row (PartiPrompts' ``PartiPrompts.tsv``: column ``Prompt``)."""
    import csv

    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or field not in rows[0]:
        columns = ", ".join(rows[0]) if rows else "none"
        raise ValueError(f"prompts.source {path}: no column {field!r} (prompts.field); its columns: {columns}")
    prompts = [" ".join((row[field] or "").split()) for row in rows]
    empty = [i + 2 for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompts.source {path}: empty prompt on line {empty[0]}")
    return prompts


# ---------------------------------------------------------------------------------------- metrics
def build_metrics(entries: list[dict]) -> list[tuple[str, Any]]:
    """``(key, metric)`` for each ``metrics`` entry: a registered name (``METRICS``) or a class path,
    with its ``init_args``. Built before any sample is drawn, so a misspelt name stops at once."""
    built = []
    for k, entry in enumerate(entries):
        key = f"metrics[{k}]"
        init_args = entry.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise ConfigError(f"{key}.init_args", init_args, "must be a mapping of the metric's arguments")
        if "name" in entry:
            try:
                from dmdx_lightning.evaluation.metrics import METRICS
            except ImportError as e:
                raise ConfigError(f"{key}.name", entry["name"], f"the metric registry cannot be imported ({e})") from e
            cls = METRICS.get(entry["name"])
            if cls is None:
                raise ConfigError(f"{key}.name", entry["name"], "is no registered metric",
                                  f"The metrics: {', '.join(sorted(METRICS))}.")
        else:
            cls = import_class(entry["class_path"], f"{key}.class_path")
        try:
            metric = cls(**{name: _instantiate(value, f"{key}.init_args.{name}") for name, value in init_args.items()})
        except TypeError as e:
            raise ConfigError(f"{key}.init_args", init_args, f"{cls.__name__}: {e}") from None
        except (NotImplementedError, ValueError, OSError) as e:  # e.g. a metric this package cannot compute
            raise SetupError(f"{key} ({entry.get('name') or entry['class_path']}): {_reason(e)}") from e
        built.append((key, metric))
    names = [getattr(m, "name", type(m).__name__) for _, m in built]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError("metrics", twice[0], "is configured twice: each metric names one column",
                          "Keep one entry per metric (a metric's own options can name another column).")
    return built


def _instantiate(value, key: str):
    """An argument ``{class_path: ..., init_args: {...}}`` is built (e.g. FID's ``feature_extractor``)."""
    if isinstance(value, dict) and "class_path" in value:
        cls = import_class(value["class_path"], f"{key}.class_path")
        args = value.get("init_args") or {}
        try:
            return cls(**{k: _instantiate(v, f"{key}.init_args.{k}") for k, v in args.items()})
        except TypeError as e:
            raise ConfigError(f"{key}.init_args", args, f"{cls.__name__}: {e}") from None
    return value


def check_metrics(metrics: list[tuple[str, Any]], device) -> None:
    """Load every metric's networks before the first sample is drawn (``Metric.load``, which later
    scoring reuses): a missing model stops the run at once, not after hours of sampling. A metric
    against a reference (``needs_reference``: FID, KID, precision / recall) builds its feature
    network and has its reference checked for existence only: reading it (40k COCO images through
    Inception) waits for scoring, on the scoring device."""
    for key, metric in metrics:
        name = getattr(metric, "name", type(metric).__name__)
        try:
            if getattr(metric, "needs_reference", False):
                reference = Path(str(getattr(metric, "reference", "")))
                if not reference.exists():
                    raise FileNotFoundError(f"reference={str(reference)!r} does not exist: give the real images to "
                                            "compare with (a folder of images, or .npz statistics)")
                if callable(getattr(metric, "features_net", None)):
                    metric.features_net()
            elif callable(getattr(metric, "load", None)):
                metric.load()
        except (OSError, ValueError, KeyError) as e:
            raise SetupError(f"{key} ({name}): {_reason(e)}") from e


def _reason(error: BaseException) -> str:
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)


# ---------------------------------------------------------------------------------------- ranks
@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: a process group this run started (and ends)
    owned: bool = False

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_available() and dist.is_initialized():  # not: generate-only shards
            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def ranks(stage: str) -> Ranks:
    """This process's rank: torch.distributed's when initialised; else ``RANK`` / ``WORLD_SIZE``
    (torchrun's variables), joining a gloo group of our own at ``MASTER_ADDR`` for the barrier (the
    barrier alone crosses processes: no tensor does, so gloo serves GPU runs as well)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world:
        raise SetupError(f"RANK={rank} with WORLD_SIZE={world}: a rank must be in 0..WORLD_SIZE-1")
    if world == 1 or stage == "generate":
        return Ranks(rank, world, local)  # generate-only shards need no rendezvous
    if "MASTER_ADDR" not in os.environ:
        raise SetupError(f"WORLD_SIZE={world} without MASTER_ADDR: launch with torchrun, or run each shard with "
                         "--stage generate and then one --stage score")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return Ranks(rank, world, local, owned=True)


# ---------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class Chunk:
    """One unit of work, drawn in one forward: ``samples`` = ``(prompt_index, j, seed)`` each."""

    samples: tuple[tuple[int, int, int], ...]

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(s for _, _, s in self.samples)

    @property
    def prompt_indices(self) -> list[int]:
        return [i for i, _, _ in self.samples]


def plan(num_prompts: int, per_prompt: int, chunk: int, seed: int) -> list[Chunk]:
    """Every chunk in canonical order, sample ``j`` of prompt ``i`` with seed ``seed + i * per_prompt + j``:
    each prompt's samples in chunks of ``chunk`` when it has at least that many, else consecutive
    prompts' samples packed ``chunk`` at a time (one image per COCO caption still fills a batch)."""
    samples = [(i, j, seed + i * per_prompt + j) for i in range(num_prompts) for j in range(per_prompt)]
    if per_prompt < chunk:
        return [Chunk(tuple(samples[k:k + chunk])) for k in range(0, len(samples), chunk)]
    return [Chunk(tuple(samples[i * per_prompt + j0:i * per_prompt + min(per_prompt, j0 + chunk)]))
            for i in range(num_prompts) for j0 in range(0, per_prompt, chunk)]


def sample_stem(prompt_index: int, prompt: str, seed: int) -> str:
    from dmdx_lightning.sample import _slug

    return f"{prompt_index:05d}_{_slug(prompt, 32)}_seed{seed}"


def read_records(folder: Path, verify: Callable[[dict], bool] | None = None,
                 wanted: set[tuple[int, int]] | None = None) -> dict[tuple[int, int], dict]:
    """Every usable record of a model folder (all ``records*.jsonl``: rank shards of any world size and
    the merged file), keyed by ``(prompt_index, seed)`` (only the ``wanted`` keys, when given). A torn
    line (a kill mid-append) is skipped; with ``verify``, so is a record it rejects (its file missing
    or changed since), and a later record of the same sample can take its place."""
    found: dict[tuple[int, int], dict] = {}
    for path in sorted(folder.glob("records*.jsonl")):
        for line in path.read_text(encoding="utf-8").split("\n"):
            try:
                record = json.loads(line)
                key = (int(record["prompt_index"]), int(record["seed"]))
            except (ValueError, KeyError, TypeError):
                continue
            if key not in found and (wanted is None or key in wanted) and (verify is None or verify(record)):
                found[key] = record
    return found


def _whole_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            json.loads(line)
        except ValueError:
            continue
        lines.append(line)
    return lines


def file_is_intact(folder: Path) -> Callable[[dict], bool]:
    def check(record: dict) -> bool:
        path = folder / record.get("file", "")
        return path.is_file() and sha256_file(path) == record.get("sha256")

    return check


def check_sources(models: list[ModelSpec]) -> None:
    """Every model's source and config is there, before the first model draws a sample (a typo in
    the last model's path must not wait for the teacher's 10k samples). Cheap: files are found, not
    loaded; the messages are ``dmdx sample``'s."""
    from dmdx_lightning.export import EXPORT_INFO, read_export_info, resolve_checkpoint, run_config
    from dmdx_lightning.sample import _teacher_config

    for k, spec in enumerate(models):
        source = Path(spec.source)
        try:
            if spec.teacher:
                _teacher_config(source, spec.config)
                continue
            exported = source.is_dir() and (source / EXPORT_INFO).is_file()
            pipeline = source.is_dir() and (source / "model_index.json").is_file()
            if spec.teacher_args and (pipeline or exported):
                raise ValueError(f"teacher_args = {spec.teacher_args}: an exported model samples as it was exported "
                                 "(teacher_args apply to checkpoints, run folders and teacher: true)")
            if exported:
                pipeline = read_export_info(source).get("format") in ("pipeline", "lora")
            elif not pipeline:
                if source.suffix in (".yaml", ".yml"):
                    raise ValueError(f"{source} is a config: it holds no student weights (add teacher: true to "
                                     "sample its teacher)")
                run_config(resolve_checkpoint(source, what="SOURCE"), spec.config)
            if spec.cfg is not None and not pipeline:
                raise ValueError(f"cfg = {spec.cfg}: a distilled student samples without guidance (cfg applies to "
                                 "teacher: true and to diffusers pipeline folders)")
        except (OSError, ValueError) as e:
            raise SetupError(f"models[{k}] ({spec.label}): {e}") from e


def _open_model(spec: ModelSpec, device) -> tuple[Any, dict]:
    """``dmdx sample``'s sampler for ``spec`` (the same sources, the same noise)."""
    from dmdx_lightning.sample import open_source

    args = argparse.Namespace(source=spec.source, teacher=spec.teacher, config=spec.config, steps=spec.steps,
                              cfg=spec.cfg, use_ema=spec.ema, dtype=spec.dtype, device=str(device), progress=False,
                              teacher_args=spec.teacher_args)
    return open_source(args)


def nfe(sampler) -> int | None:
    """Network evaluations per sample: the student's steps; the teacher's ODE steps, twice with CFG
    (conditional and unconditional branch); a pipeline's inference steps, twice with guidance > 1
    (``None`` for a pipeline called with its own defaults)."""
    settings = sampler.settings
    if settings.get("sampler") == "student":
        return len(settings["student_timesteps"])
    if settings.get("sampler") == "teacher ODE":
        return settings["steps"] * (1 if settings["cfg_scale"] == 1 else 2)
    call = settings.get("call") or {}
    steps = len(call["sigmas"]) if call.get("sigmas") else call.get("num_inference_steps")
    if steps is None:
        return None
    return steps * (2 if float(call.get("guidance_scale", 1.0)) > 1 else 1)


def generation_settings(cfg: EvalConfig, spec: ModelSpec, prompts: list[str]) -> dict:
    """What fixes a model's samples: a folder generated with other settings is not resumed."""
    return {"model": asdict(spec), "samples_per_prompt": cfg.samples_per_prompt, "seed": cfg.seed,
            "batch_size": cfg.chunk, "num_prompts": len(prompts),
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}


def check_folder(folder: Path, settings: dict) -> None:
    path = folder / MODEL_INFO
    if path.is_file():
        try:
            recorded = json.loads(path.read_text()).get("settings")
        except json.JSONDecodeError:
            recorded = None
        if recorded is not None and recorded != settings:
            changed = sorted(k for k in settings if recorded.get(k) != settings[k])
            raise SetupError(f"{folder} holds samples generated with other settings ({', '.join(changed)} differ): "
                             "evaluate into another output folder, or delete that one to start over")


def write_sample(item, folder: Path, stem: str, fps: int) -> tuple[str, int | None]:
    """Write one ``[-1, 1]`` image ``(C, H, W)`` or video ``(C, F, H, W)``; returns its file (relative
    to ``folder``) and its frame count (``None`` for an image)."""
    from dmdx_lightning.sample import video_frames, write_gif, write_png

    if item.ndim == 3:
        name = f"{IMAGES}/{stem}.png"
        write_png(item, folder / name)
        return name, None
    frames = video_frames(item)  # (F, H, W, 3) uint8
    from PIL import Image

    name = f"{IMAGES}/{stem}.png"
    strip = frames.reshape(-1, frames.shape[2], 3).numpy()  # frames top to bottom: lossless, one file
    with atomic_path(folder / name) as tmp:
        Image.fromarray(strip).save(tmp, format="PNG")
    write_gif(frames, folder / f"{IMAGES}/{stem}.gif", fps)
    return name, int(frames.shape[0])


def generate(cfg: EvalConfig, spec: ModelSpec, prompts: list[str], where: Ranks, device, progress: bool,
             on_sample: Callable[[dict], None] | None = None) -> dict:
    """Generate this rank's chunks of ``spec`` that are not already on disk; returns ``model.json``."""
    folder = Path(cfg.output) / spec.label
    settings = generation_settings(cfg, spec, prompts)
    check_folder(folder, settings)
    with writer_lock(folder, where.rank):
        return _generate(cfg, spec, prompts, where, device, progress, on_sample, folder, settings)


@contextmanager
def writer_lock(folder: Path, rank: int) -> Iterator[None]:
    """Hold ``.lock.rank<r>`` while rank ``r`` writes ``folder``: a second run into the same output
    (launched twice, or a requeued job while the old one still runs) would rewrite the record file
    the first appends to, and lose its records. The lock dies with its process (``flock``), so a
    killed run never blocks its resume."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f".lock.rank{rank}").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SetupError(f"{folder} is being written by another `dmdx evaluate` (rank {rank}): wait for it to "
                             "end, or evaluate into another output folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate(cfg: EvalConfig, spec: ModelSpec, prompts: list[str], where: Ranks, device, progress: bool,
              on_sample: Callable[[dict], None] | None, folder: Path, settings: dict) -> dict:
    import torch
    from tqdm.auto import tqdm

    mine = plan(len(prompts), cfg.samples_per_prompt, cfg.chunk, cfg.seed)[where.rank::where.world]
    wanted = {(i, s) for c in mine for i, _, s in c.samples}
    done = read_records(folder, verify=file_is_intact(folder), wanted=wanted)
    todo = [c for c in mine if any((i, s) not in done for i, _, s in c.samples)]
    if not todo and (folder / MODEL_INFO).is_file():
        return json.loads((folder / MODEL_INFO).read_text())  # all there: the model need not even load

    sampler, source = _open_model(spec, device)
    info = {"label": spec.label, "kind": source["kind"], "source": source, "sampling": sampler.settings,
            "nfe": nfe(sampler), "settings": settings}
    if where.rank == 0:
        write_json_atomic(folder / MODEL_INFO, info)
    shard = folder / f"records.rank{where.rank}.jsonl"
    # the shard's whole lines only: a torn last line (a kill mid-append) would swallow the next record
    write_text_atomic(shard, "".join(line + "\n" for line in _whole_lines(shard)))
    if not todo:
        return info
    sampler.prepare(prompts)
    total = len(wanted)
    try:
        with tqdm(total=total, initial=total - sum(len(c.seeds) for c in todo), unit="sample",
                  desc=f"dmdx evaluate {spec.label}" + (f" [rank {where.rank}]" if where.world > 1 else ""),
                  disable=not progress or where.rank != 0) as bar, shard.open("a", encoding="utf-8") as log:
            for c in todo:
                start = time.perf_counter()
                x = sampler.draw(c.prompt_indices, list(c.seeds), c.seeds[0])
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / len(c.seeds)
                for (i, j, seed), item in zip(c.samples, x):
                    stem = sample_stem(i, prompts[i], seed)
                    name, frames = write_sample(item, folder, stem, cfg.fps)
                    record = {"prompt_index": i, "prompt": prompts[i], "seed": seed,
                              "j": j, "file": name, "sha256": sha256_file(folder / name), "seconds": seconds,
                              "nfe": info["nfe"]}
                    if frames is not None:
                        record["frames"] = frames
                    log.write(json.dumps(record) + "\n")  # after the file is in place: a record means a whole file
                    log.flush()  # in the OS's hands: a killed process loses no record
                    if on_sample is not None:
                        on_sample(record)
                os.fsync(log.fileno())  # on disk once per chunk (a node's crash loses at most the last chunk)
                bar.update(len(c.seeds))
    except OSError as e:  # an append names no file: say which (a full disk: the rerun goes on from here)
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(shard)) from e
    return info


def merge(cfg: EvalConfig, spec: ModelSpec, prompts: list[str]) -> list[dict]:
    """Every rank's records of ``spec`` -> ``records.jsonl`` in canonical order (idempotent); an error
    naming what is missing when a shard is incomplete."""
    folder = Path(cfg.output) / spec.label
    # every rank is done: a hidden partial file is a write a kill interrupted (its sample has no record)
    for partial in (folder / IMAGES).glob(".partial-*.tmp"):
        partial.unlink(missing_ok=True)
    found = read_records(folder, verify=file_is_intact(folder))
    order = [(i, s) for c in plan(len(prompts), cfg.samples_per_prompt, cfg.chunk, cfg.seed)
             for i, _, s in c.samples]
    missing = [k for k in order if k not in found]
    if missing:
        i, s = missing[0]
        raise SetupError(f"{folder}: {len(missing)} of {len(order)} samples are missing or damaged (first: prompt {i}, "
                         f"seed {s}); run the generation again (`--stage generate` or `all`) to complete them")
    merged = [found[k] for k in order]
    write_text_atomic(folder / RECORDS, "".join(json.dumps(r) + "\n" for r in merged))
    return merged


# ---------------------------------------------------------------------------------------- scoring
def score(cfg: EvalConfig, metrics: list[tuple[str, Any]], infos: dict[str, dict], device) -> dict:
    """Score every model's merged samples with every metric; write the results, per-prompt values,
    the contact sheet and the TensorBoard scalars. Returns what ``results.json`` holds."""
    from dmdx_lightning.evaluation.samples import SampleSet

    out = Path(cfg.output)
    rows, per_prompt = [], {}
    for spec in cfg.models:
        samples = SampleSet.from_records(out / spec.label)
        # the median chunk: the first chunk's warm-up (kernels, caches) is no sample's cost
        seconds = statistics.median(s.extra.get("seconds", 0.0) for s in samples.samples)
        row = {"label": spec.label, "kind": "teacher" if spec.teacher else infos[spec.label]["kind"],
               "source": spec.source, "nfe": infos[spec.label]["nfe"],
               "seconds_per_sample": seconds, "samples": len(samples),
               "sampling": infos[spec.label]["sampling"], "metrics": {}, "info": {}}
        prompt_rows: dict[int, dict] = {i: {"prompt": p} for i, p in samples.prompts().items()}
        for key, metric in metrics:
            name = getattr(metric, "name", type(metric).__name__)
            wants = getattr(metric, "modality", None)
            if wants not in (None, "any", samples.modality):
                raise ConfigError(f"{key}", name, f"scores {wants} samples; model {spec.label!r} made "
                                  f"{samples.modality} samples", "Remove the metric or the model.")
            try:
                result = metric.score(samples, device)
            except (OSError, KeyError, ValueError) as e:  # a model or reference not there, samples it cannot score
                raise SetupError(f"{key} ({name}) on {spec.label!r}: {_reason(e)}") from e
            row["metrics"].update({k: float(v) for k, v in result.values.items()})
            if result.info:
                row["info"][name] = result.info
            for i, values in (result.per_prompt or {}).items():
                prompt_rows.setdefault(int(i), {}).update({k: float(v) for k, v in values.items()})
        rows.append(row)
        per_prompt[spec.label] = {str(i): v for i, v in sorted(prompt_rows.items())}
    return _write_results(cfg, rows, per_prompt, [getattr(m, "name", type(m).__name__) for _, m in metrics])


def _write_results(cfg: EvalConfig, rows: list[dict], per_prompt: dict, metric_names: list[str]) -> dict:
    out = Path(cfg.output)
    columns = []
    for row in rows:
        columns += [c for c in row["metrics"] if c not in columns]
    write_json_atomic(out / PER_PROMPT, per_prompt)
    write_text_atomic(out / RESULTS_MD, results_markdown(cfg, rows, columns))
    _tensorboard(out, rows)
    contact_sheet(cfg)
    return {"rows": rows, "columns": columns, "metrics": metric_names}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def results_markdown(cfg: EvalConfig, rows: list[dict], columns: list[str]) -> str:
    n = cfg.samples_per_prompt
    lines = [f"Prompts: {cfg.prompts.source} ({rows[0]['samples'] // n if rows else 0} prompts, {n} sample(s) each, "
             f"seeds {cfg.seed} + prompt * {n} + j, batch {cfg.chunk}).", "",
             "| model | kind | NFE | s / sample | " + " | ".join(columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["label"], row["kind"], _fmt(row["nfe"]), _fmt(row["seconds_per_sample"])]
        cells += [_fmt(row["metrics"].get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _tensorboard(out: Path, rows: list[dict]) -> None:
    """One run per model (``tensorboard/<label>``), so TensorBoard draws every model's ``eval/<metric>`` together."""
    from torch.utils.tensorboard import SummaryWriter

    for row in rows:
        folder = out / TENSORBOARD / row["label"]
        for old in folder.glob("events.out.tfevents.*"):  # a re-score replaces the values, never adds a second set
            old.unlink()
        writer = SummaryWriter(str(folder))
        try:
            for name, value in row["metrics"].items():
                writer.add_scalar(f"eval/{name}", value, 0)
            writer.add_scalar("eval/nfe", row["nfe"] or 0, 0)
            writer.add_scalar("eval/seconds_per_sample", row["seconds_per_sample"], 0)
        finally:
            writer.close()


def contact_sheet(cfg: EvalConfig) -> None:
    """Rows: the first prompts; columns: each model's first seeds of that prompt (the same seeds for
    every model, so the teacher's and the students' samples of one noise stand side by side)."""
    from dmdx_lightning.evaluation.samples import SampleSet
    from dmdx_lightning.sample import labelled_grid

    import torch.nn.functional as F

    out = Path(cfg.output)
    rows_wanted, seeds_wanted = int(cfg.contact_sheet.get("prompts", 8)), int(cfg.contact_sheet.get("seeds", 2))
    size = int(cfg.contact_sheet.get("size", 128))

    def cell(x):
        """A cell ``size`` pixels on its short side: 8-px digits scaled up (nearest), 1024-px images down."""
        x = x if x.ndim == 3 else x[x.shape[0] // 2]  # a video's middle frame
        h, w = x.shape[-2:]
        shape = (round(h * size / min(h, w)), round(w * size / min(h, w)))
        mode = "nearest" if min(h, w) < size else "area"
        return F.interpolate(x[None], size=shape, mode=mode)[0] * 2 - 1

    sets = {spec.label: SampleSet.from_records(out / spec.label) for spec in cfg.models}
    first = next(iter(sets.values()))
    indices = sorted(first.prompts())[:rows_wanted]
    cells, labels = [], []
    for i in indices:
        row = []
        for label, samples in sets.items():
            row += [cell(samples.load(s)) for s in samples.by_prompt()[i][:seeds_wanted]]
        cells.append(row)
        labels.append(first.prompts()[i])
    # the model's label over its first column, then the sample's number within the prompt
    columns = [f"{label} #{s.extra.get('j', k)}" if k == 0 else f"#{s.extra.get('j', k)}"
               for label, samples in sets.items() for k, s in enumerate(samples.by_prompt()[indices[0]][:seeds_wanted])]
    grid = labelled_grid(cells, labels, columns)
    with atomic_path(out / CONTACT_SHEET) as tmp:
        grid.save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------- the command
def evaluate(cfg: EvalConfig, stage: str = "all", progress: bool = True, command: str = "dmdx evaluate",
             config_files: Sequence[str] = (), on_sample: Callable[[dict], None] | None = None) -> dict | None:
    """Run the protocol of ``cfg``: generate (this rank's shard), merge and score (rank 0). Returns
    what ``results.json`` holds on the rank that scored, else ``None``."""
    import torch

    import dmdx_lightning

    prompts = read_eval_prompts(cfg.prompts)  # a bad prompt file stops us before anything is built
    if stage != "score":
        check_sources(cfg.models)
    metrics = build_metrics(cfg.metrics) if stage != "generate" else []
    where = ranks(stage)
    try:
        if cfg.device:
            device = torch.device(cfg.device)
        else:
            device = torch.device(f"cuda:{where.local_rank}" if torch.cuda.is_available() else "cpu")
        if where.rank == 0:
            check_metrics(metrics, device)
        infos = {}
        if stage in ("all", "generate"):
            for spec in cfg.models:
                infos[spec.label] = generate(cfg, spec, prompts, where, device, progress, on_sample)
                torch.cuda.empty_cache()  # the next model gets the memory
        where.barrier()
        if stage == "generate" or where.rank != 0:
            return None
        for spec in cfg.models:
            merge(cfg, spec, prompts)
            path = Path(cfg.output) / spec.label / MODEL_INFO
            infos[spec.label] = json.loads(path.read_text())
        result = score(cfg, metrics, infos, device)
        result = {"command": command, "config_files": list(config_files), "output": cfg.output,
                  "prompts": asdict(cfg.prompts), "num_prompts": len(prompts),
                  "samples_per_prompt": cfg.samples_per_prompt, "seed": cfg.seed, "batch_size": cfg.chunk,
                  "seeds": "sample j of prompt i: seed + i * samples_per_prompt + j (the same for every model)",
                  "device": str(device), "world_size": where.world, **result,
                  "versions": {"dmdx_lightning": dmdx_lightning.__version__, "torch": torch.__version__},
                  "files": {"table": RESULTS_MD, "per_prompt": PER_PROMPT, "contact_sheet": CONTACT_SHEET,
                            "tensorboard": TENSORBOARD}}
        write_json_atomic(Path(cfg.output) / RESULTS_JSON, result)
        return result
    finally:
        where.close()  # ranks > 0 leave while rank 0 scores: scoring crosses no process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmdx evaluate", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", required=True, metavar="YAML",
                        help="an evaluation config (configs/eval/; a shipped name works from any folder); "
                             "several: a later file's top-level keys replace an earlier's")
    parser.add_argument("--output", default=None, help="output folder (overrides the config's `output`)")
    parser.add_argument("--prompts", default=None, metavar="SOURCE", help="the prompt set (overrides prompts.source)")
    parser.add_argument("--prompt_field", default=None, help="the prompt's key / column (overrides prompts.field)")
    parser.add_argument("--max_prompts", type=int, default=None, help="keep the first N prompts (prompts.max_prompts)")
    parser.add_argument("-n", "--samples_per_prompt", type=int, default=None, metavar="N",
                        help="samples per prompt (overrides samples_per_prompt)")
    parser.add_argument("--seed", type=int, default=None, help="the seed of the first sample (overrides seed)")
    parser.add_argument("--batch_size", type=int, default=None, help="samples of one prompt per forward")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    parser.add_argument("--stage", choices=STAGES, default="all",
                        help="all (default): generate, merge, score; generate: this rank's samples only; "
                             "score: merge the ranks' records and score (every sample must be there)")
    parser.add_argument("--print_config", action="store_true", help="print the merged config and exit")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def config_from_args(args) -> tuple[EvalConfig, list[str]]:
    raw, files = read_config_files(args.config)
    if args.output is not None:
        raw["output"] = args.output
    prompts = raw.get("prompts")
    prompts = dict({"source": prompts} if isinstance(prompts, str) else (prompts or {}))
    for flag, key in (("prompts", "source"), ("prompt_field", "field"), ("max_prompts", "max_prompts")):
        if getattr(args, flag) is not None:
            prompts[key] = getattr(args, flag)
    if prompts:
        raw["prompts"] = prompts
    for key in ("samples_per_prompt", "seed", "batch_size", "device"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    return parse_config(raw), files


def main(argv: Sequence[str] | None = None) -> None:
    from dmdx_lightning.export import user_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with user_errors("dmdx evaluate"):
        cfg, files = config_from_args(args)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(asdict(cfg), sort_keys=False), end="")
            sys.exit(0)  # as `dmdx fit --print_config` ends
        result = evaluate(cfg, args.stage, args.progress, command="dmdx evaluate " + shlex.join(argv),
                          config_files=files)
    if result is not None:
        print((Path(cfg.output) / RESULTS_MD).read_text(), end="")
        print(f"wrote {RESULTS_MD}, {RESULTS_JSON}, {PER_PROMPT}, {CONTACT_SHEET} and {TENSORBOARD}/ to {cfg.output}")
    elif args.stage == "generate":
        print(f"generated this rank's samples into {cfg.output}; score them with --stage score")
