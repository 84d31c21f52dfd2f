"""The study runner shared by the quality benchmark and the mixture study: arms are configs.

An arm (a YAML file of arms, e.g. ``benchmarks/arms/digits.yaml``) is a list of configs passed to
``dmdx fit`` in order (base + overlays) plus extra ``--key value`` overrides: the very command a
user types. The runner adds only a per-run overlay (seed, generator learning rate, output folder,
the :class:`~dmdx_lightning.callbacks.budget.GeneratorBudget` of generator updates and the
testbed's summary callback, which scores the student at the end of fit), runs one subprocess per
(arm, lr, seed), ``jobs`` at a time, and collects the summary rows. A run whose arm, budget and
configs are unchanged since it finished is reused, so a long study resumes where it stopped.

Arm keys: ``title``; ``configs``; ``args`` (``{name}`` is replaced by the study's ``variables``,
e.g. ``{work}``); ``init_from: <arm>`` (start from that arm's final student, same seed); ``lr``
(a fixed learning rate: not swept); ``updates`` (its own budget: a number, or ``half`` of the
study's); ``teacher: true`` (a row the benchmark scores itself, no training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from threading import RLock
from typing import Callable, Iterable

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_std  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARM_KEYS = {"title", "configs", "args", "init_from", "teacher", "lr", "updates"}


def load_arms(path: Path) -> dict[str, dict]:
    """The arms of ``path``, checked: known keys only, ``init_from`` names an arm of the file."""
    arms = yaml.safe_load(Path(path).read_text())
    for name, arm in arms.items():
        unknown = set(arm) - ARM_KEYS
        if unknown:
            raise ValueError(f"{path}: arm {name!r} has unknown keys {sorted(unknown)}")
        if arm.get("init_from") and arm["init_from"] not in arms:
            raise ValueError(f"{path}: arm {name!r} starts from unknown arm {arm['init_from']!r}")
    return arms


def run_dir(root: Path, arm: str, lr: float, seed: int) -> Path:
    return root / arm / f"lr{lr:g}" / f"seed{seed}"


#: the testbed's summary callback for one run: ``(run directory, arm) -> {class_path, init_args}``;
#: it must write ``<run directory>/summary.json`` with a row named after the arm
SummaryCallback = Callable[[Path, str], dict]


def overlay(directory: Path, lr: float, seed: int, updates: int, summary: dict, init_from: Path | None) -> dict:
    """The per-run config the study adds on top of the arm's own configs."""
    model: dict = {"generator_optimizer": {"init_args": {"lr": lr}}}
    if init_from is not None:
        model["init_from"] = str(init_from)
    return {
        "seed_everything": seed,
        "model": {"init_args": model},
        "trainer": {
            "max_steps": -1, "max_epochs": 10_000, "enable_progress_bar": False, "log_every_n_steps": 25,
            "default_root_dir": str(directory),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(directory), "name": "", "version": ""}},
            "callbacks": [  # a list in a later --config replaces the arm's callbacks whole
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(directory / "checkpoints"), "save_last": True}},
                {"class_path": "dmdx_lightning.callbacks.budget.GeneratorBudget", "init_args": {"updates": updates}},
                summary,
            ],
        },
    }


class Study:
    """Runs (arm, lr, seed) tasks as ``dmdx fit`` subprocesses, ``jobs`` at a time.

    Args:
        arms: the arms (:func:`load_arms`).
        root: run folders ``<root>/<arm>/lr<lr>/seed<seed>`` (``log.txt``, ``summary.json``, checkpoints).
        summary: the testbed's summary callback (:data:`SummaryCallback`).
        updates: generator updates per run (an arm's own ``updates`` wins).
        base_lr: generator lr of a stage other arms start from (an arm's own ``lr`` wins).
        jobs: runs side by side.
        announce: metric names printed when a run finishes.
        scoring: what else makes a finished run reusable (e.g. the evaluation sample count): a
            run scored differently runs again.
        variables: values of the ``{name}`` placeholders in arms' ``args``.
    """

    def __init__(self, arms: dict[str, dict], root: Path, summary: SummaryCallback, updates: int,
                 base_lr: float = 1e-4, jobs: int = 2, announce: Iterable[str] = (), scoring: dict | None = None,
                 variables: dict[str, str] | None = None) -> None:
        self.arms, self.root, self.summary, self.scoring = arms, Path(root), summary, scoring or {}
        self.variables = variables or {}
        self.updates, self.base_lr, self.announce = updates, base_lr, tuple(announce)
        self.futures: dict[tuple, Future] = {}
        self.lock = RLock()  # submit() recurses into the stage an arm starts from
        self.pool = ThreadPoolExecutor(jobs)

    def lr_of(self, arm: str, lr: float) -> float:
        """An arm with its own ``lr`` (a fixed pre-training stage) is not swept."""
        return float(self.arms[arm].get("lr", lr))

    def updates_of(self, arm: str) -> int:
        updates = self.arms[arm].get("updates", self.updates)
        return max(1, round(self.updates / 2)) if updates == "half" else int(updates)

    def submit(self, arm: str, lr: float, seed: int) -> Future:
        lr = self.lr_of(arm, lr)
        key = (arm, lr, seed)
        with self.lock:
            if key not in self.futures:
                spec = self.arms[arm]
                dep = None
                if spec.get("init_from"):  # the stage it starts from runs at its own (or the base) lr
                    dep = self.submit(spec["init_from"], self.base_lr, seed)
                self.futures[key] = self.pool.submit(self._run, arm, lr, seed, dep)
            return self.futures[key]

    def result(self, arm: str, lr: float, seed: int) -> dict:
        """The summary of a submitted run (raises its error if it failed)."""
        return self.futures[(arm, self.lr_of(arm, lr), seed)].result()

    def shutdown(self) -> None:
        self.pool.shutdown()

    def _run(self, arm: str, lr: float, seed: int, dep: Future | None) -> dict:
        spec, directory = self.arms[arm], run_dir(self.root, arm, lr, seed)
        summary, stamp = directory / "summary.json", directory / "arm.json"
        callback = self.summary(directory, arm)
        # what this run is: a finished run is reused only if its arm, budget, scoring and configs are unchanged
        identity = {"spec": spec, "updates": self.updates_of(arm), **self.scoring,
                    **({"variables": self.variables} if self.variables else {}),
                    "configs": {c: (ROOT / c).read_text() for c in spec.get("configs", [])}}
        if summary.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == identity \
                and arm in json.loads(summary.read_text()):
            return json.loads(summary.read_text())
        init_from = None
        if dep is not None:
            dep.result()  # raises if the stage it starts from failed
            dep_lr = self.lr_of(spec["init_from"], self.base_lr)
            init_from = run_dir(self.root, spec["init_from"], dep_lr, seed) / "checkpoints/last.ckpt"
        directory.mkdir(parents=True, exist_ok=True)
        summary.unlink(missing_ok=True)  # a stale row must not pass for this run's result
        extra = directory / "study_overlay.yaml"
        extra.write_text(yaml.safe_dump(overlay(directory, lr, seed, self.updates_of(arm), callback, init_from)))
        cmd = [sys.executable, "-m", "dmdx_lightning.cli", "fit"]
        for config in spec["configs"]:
            cmd += ["--config", str(ROOT / config)]
        cmd += ["--config", str(extra), *[str(a).format(**self.variables) for a in spec.get("args", [])]]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        start = time.time()
        with open(directory / "log.txt", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        stamp.write_text(json.dumps(identity))
        if rc != 0 or not summary.is_file():
            raise RuntimeError(f"{arm} lr {lr:g} seed {seed} failed (exit {rc}); see {directory / 'log.txt'}")
        result = json.loads(summary.read_text())
        result["seconds"] = time.time() - start
        shown = {k: round(result[arm][k], 3) for k in self.announce if isinstance(result[arm].get(k), (int, float))}
        print(f"[{time.strftime('%H:%M:%S')}] {arm} lr {lr:g} seed {seed}: {shown} ({result['seconds']:.0f} s)",
              flush=True)
        return result


def plan(study: Study, arms: list[str], lrs: list[float], seeds: list[int],
         best_lr_from: str | None = None) -> list[tuple[str, float, int]]:
    """Submit every (arm, lr, seed) task; with ``best_lr_from`` (a report JSON of an lr sweep) each
    arm runs only at the lr that sweep chose."""
    if best_lr_from:
        swept = json.loads(Path(best_lr_from).read_text())["arms"]
        missing = [a for a in arms if not swept.get(a, {}).get("best_lr")]
        if missing:
            raise SystemExit(f"{best_lr_from} has no best lr for arms {missing}: sweep them first")
        per_arm = {a: [float(swept[a]["best_lr"])] for a in arms}
    else:
        per_arm = {a: lrs for a in arms}
    tasks = list(dict.fromkeys((arm, study.lr_of(arm, lr), seed) for seed in seeds for arm in arms
                               for lr in per_arm[arm]))
    for task in tasks:
        study.submit(*task)
    return tasks


def collect(study: Study, tasks: list[tuple[str, float, int]], metrics: Iterable[str],
            extra_rows: Iterable[str] = ()) -> dict[str, dict[str, dict]]:
    """``{arm: {lr: {"runs": [...], "errors": [...], "final": {metric: (mean, std)}, <row>: ...}}}``.

    A run's ``final`` is its arm's summary row; ``extra_rows`` are other rows of the same summary
    (e.g. ``init``: the row ``<arm>@init`` of the student before training). An arm that fails
    reports its error instead of failing the study.
    """
    metrics = tuple(metrics)
    arms: dict[str, dict[str, dict]] = {}
    for arm, lr, seed in tasks:
        entry = arms.setdefault(arm, {}).setdefault(f"{lr:g}", {"runs": [], "errors": []})
        try:
            result = study.result(arm, lr, seed)
        except Exception as e:
            entry["errors"].append(str(e))
            continue
        run = {"seed": seed, "final": result[arm], "seconds": result.get("seconds")}
        run.update({row: result.get(f"{arm}@{row}") for row in extra_rows})
        entry["runs"].append(run)
    for by_lr in arms.values():
        for entry in by_lr.values():
            for which in ("final", *extra_rows):
                rows = [r[which] for r in entry["runs"] if r.get(which)]
                if rows:
                    entry[which] = {k: mean_std_present([row.get(k) for row in rows]) for k in metrics}
    return arms


def mean_std_present(values: list) -> tuple[float, float]:
    """Mean and std over the runs that report a value (e.g. the logit gap exists for ADM only)."""
    values = [v for v in values if isinstance(v, (int, float)) and v == v]
    return mean_std(values) if values else (float("nan"), float("nan"))
