"""Long-run health: resident memory and time per iteration over thousands of `dmdx fit` iterations.

    python benchmarks/long_run.py                        # both arms, 2000 iterations each
    python benchmarks/long_run.py --arms digits --iterations 30 --every 10 --objects-every 10 --out OUT   # smoke
    python benchmarks/long_run.py --reanalyse benchmarks/results/long_run.json   # fit the recorded samples again

A leak that costs a few KiB per iteration is invisible in a 600-iteration quickstart and fatal in
a week-long run; so are per-iteration costs that grow (a list that is appended to, a hook that is
registered again, a logger that keeps every value). Each arm here is one ``dmdx fit`` in its own
process (so its resident memory is the run's alone), with a recorder callback
(:class:`HealthRecorder`, added to the config's callbacks) that samples every ``--every``
iterations: the process's RSS (psutil), ``sys.getallocatedblocks()`` (pymalloc's live blocks: the
Python-level allocations, at no cost), wall and CPU seconds per iteration over the window since
the last sample, and the load average of the machine; every ``--objects-every`` iterations, after a
``gc.collect()``, the live ``torch.Tensor`` objects and a census of every gc-tracked object by type
(slow: one pass over the heap, not inside any timed window).

Arms:

- ``digits``: ``configs/quickstart/adm.yaml`` (the quickstart's ADM, batch 32) as shipped, apart
  from ``max_steps`` and the checkpoint interval (every 500 iterations, ``save_last``: what a long
  run keeps); TensorBoard logging every 30 iterations and the sample grid every 200 as shipped.
  Left out: ``DigitsSummary``, which runs once after the last iteration (its evaluation measures
  nothing about the run's health and costs minutes).
- ``sd3``: ``configs/sd3/adm_4step.yaml`` (LoRA rank 64, gradient checkpointing, 4-step student,
  CFG 7) on a random tiny SD3 folder (``save_random_sd3`` with its defaults: 2 joint blocks,
  2 heads x 8, 16 px images) with the overrides the config tests use (tests/test_configs.py
  ``SD3_TINY`` + ``TINY_HEADS``), on CPU at precision 32-true, batch 2, one device with the
  shipped DDP strategy (one process). Left out: the CLIP-score and LPIPS-diversity callbacks and
  validation (they load hub models); checkpoints and the sample grid every 500 iterations and
  TensorBoard logging every 30, as shipped.

Analysis: a least-squares line through the samples of the second half of the run (after the
warm-up), per arm, for RSS (slope in MiB per 1000 iterations), CPU and wall seconds per iteration;
the noise is the standard deviation of the residuals. A quantity "grows" when its slope is at
least 3 standard errors above zero *and* material (RSS: at least 1 MiB per 1000 iterations; time:
at least 5 % of the mean per 1000 iterations), "drifts below the floor" when only the first holds,
otherwise "no growth beyond noise". CPU time is the work per iteration; wall time also carries the
other processes on a shared machine, so it is judged from a fit with the 1-minute load average as
a second regressor (the plain fit is reported beside it). Each report diffs the first census in
the fitted half against the last one (the object types whose count grew: where a leak would show).
``--reanalyse JSON`` fits a report's recorded samples again without running anything.

Writes ``long_run.md``, ``long_run.json`` and ``long_run.png`` (RSS and seconds per iteration vs
iteration, both arms; drawn with Pillow) to ``--out`` (default benchmarks/results), after each arm,
so an interrupted run keeps the arms that finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from _common import RESULTS, machine, markdown_table, set_threads, write_json  # noqa: E402

_TEACHER = "--model.init_args.teacher.init_args."
#: arm -> shipped config, what runs, and the overrides / callbacks of the long run ("{folder}": the
#: random SD3 folder); the recorder is appended to each arm's callbacks
ARMS = {
    "digits": {
        "config": "configs/quickstart/adm.yaml",
        "what": "the quickstart's ADM on the built-in digits teacher (one-step student, full mode, batch 32)",
        "args": [],
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True, "every_n_train_steps": 500}},
            {"class_path": "dmdx_lightning.callbacks.samples.SampleGrid",
             "init_args": {"samples_per_prompt": 8, "every_n_steps": 200}},
        ],
        "changes": "max_steps; checkpoint every 500 iterations (shipped: 200); no DigitsSummary (runs once at the end)",
    },
    "sd3": {
        "config": "configs/sd3/adm_4step.yaml",
        "what": "the shipped SD3 ADM (LoRA rank 64, gradient checkpointing, 4-step student, CFG 7) on a random "
                "tiny SD3 folder (2 joint blocks, 2 heads x 8, 16 px), CPU, 32-true, batch 2",
        # tests/test_configs.py SD3_TINY + TINY_HEADS
        "args": [_TEACHER + "pretrained_model_name_or_path", "{folder}", _TEACHER + "resolution", "16",
                 _TEACHER + "max_sequence_length", "16", _TEACHER + "torch_dtype", "float32",
                 "--model.init_args.discriminator.init_args.layers", "[0, 1]",
                 "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
                 "--trainer.limit_val_batches", "0", "--data.init_args.batch_size", "2"],
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True, "every_n_train_steps": 500}},
            {"class_path": "dmdx_lightning.callbacks.samples.SampleGrid",
             "init_args": {"samples_per_prompt": 2, "every_n_steps": 500}},
        ],
        "changes": "tiny random folder (SD3_TINY + TINY_HEADS); cpu, 1 device, 32-true, batch 2; max_steps; "
                   "no CLIP-score / LPIPS-diversity callbacks and no validation (hub models)",
    },
}
#: "grows" needs a slope this many standard errors above zero ...
T_GROWS = 3.0
#: ... and at least this much per 1000 iterations (RSS in MiB; times as a fraction of their mean)
RSS_FLOOR_MIB = 1.0
TIME_FLOOR = 0.05
#: the quantities the arm's verdict reads: RSS, CPU time and wall time at constant load
JUDGED = ("rss_mib", "cpu_s_per_it", "s_per_it_at_load")
RULE = {"fit": "second half of the run", "t_grows": T_GROWS, "rss_floor_mib_per_1000": RSS_FLOOR_MIB,
        "time_floor_fraction_per_1000": TIME_FLOOR, "judged": list(JUDGED)}
MIB = 2 ** 20
#: ``dmdx`` in a child process (the entry point, found whichever Python runs this)
DMDX = "import sys; sys.argv[0] = 'dmdx'; from dmdx_lightning.cli import main; main()"


def rss_bytes() -> int:
    """This process's resident set size (psutil; /proc/self/status's VmRSS without it)."""
    try:
        import psutil
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
    return psutil.Process().memory_info().rss


def census() -> tuple[int, Counter]:
    """After a full collection: the live ``torch.Tensor`` objects and every gc-tracked object by type."""
    gc.collect()
    objects = gc.get_objects()
    with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = sum(1 for o in objects if isinstance(o, torch.Tensor))
    types = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
    del objects
    return tensors, types


class HealthRecorder(pl.Callback):
    """Appends one JSON line to ``path`` every ``every`` iterations (and one before the first):
    iteration, RSS, pymalloc blocks, wall / CPU seconds per iteration over the window, load average;
    every ``objects_every`` iterations also the live tensors and the object census by type (types
    with at least ``min_count`` objects). Sets ``threads`` torch threads at setup and records how
    many there were before.

    Args:
        path: the JSON-lines file (appended to; the benchmark reads it).
        every: iterations between samples.
        objects_every: iterations between object censuses (a multiple of ``every``; 0: never).
        threads: torch intra-op threads for the run (see benchmarks/_common.set_threads).
        min_count: the census keeps types with at least this many objects.
    """

    def __init__(self, path: str, every: int = 100, objects_every: int = 500, threads: int = 1,
                 min_count: int = 20) -> None:
        self.path, self.every, self.objects_every = Path(path), every, objects_every
        self.threads, self.min_count = threads, min_count
        self.iteration = 0

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def setup(self, trainer, pl_module, stage) -> None:
        before = torch.get_num_threads()
        after = set_threads(self.threads)
        self._write({"kind": "header", "torch_threads_default": before, "torch_threads": torch.get_num_threads(),
                     "threads_set": after, "pid": os.getpid(), "max_steps": trainer.max_steps})

    def _sample(self, trainer, census_now: bool) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        n = self.iteration - self.last_iteration
        record = {"kind": "sample", "iteration": self.iteration, "global_step": trainer.global_step,
                  "rss_mib": rss_bytes() / MIB, "allocated_blocks": sys.getallocatedblocks(),
                  "s_per_it": (now - self.last_wall) / n if n else None,
                  "cpu_s_per_it": (cpu - self.last_cpu) / n if n else None,
                  "loadavg_1min": os.getloadavg()[0]}
        if census_now:
            start = time.perf_counter()
            tensors, types = census()
            record.update(tensors=tensors, objects=sum(types.values()),
                          types={k: v for k, v in types.most_common() if v >= self.min_count},
                          census_s=time.perf_counter() - start)
        self._write(record)
        # the next window starts after the census: it times iterations only
        self.last_wall, self.last_cpu, self.last_iteration = time.perf_counter(), time.process_time(), self.iteration

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_wall, self.last_cpu, self.last_iteration = time.perf_counter(), time.process_time(), 0
        self._sample(trainer, census_now=bool(self.objects_every))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.iteration += 1
        if self.iteration % self.every == 0:
            self._sample(trainer, census_now=bool(self.objects_every) and self.iteration % self.objects_every == 0)


# ---------------------------------------------------------------------------------------- analysis

def line_fit(xs: list[float], ys: list[float], covariate: list[float] | None = None) -> dict:
    """Least squares ``y = a + b x`` (``+ c z`` with a covariate ``z``): the slope ``b``, its standard
    error, the residual standard deviation, the mean of ``y`` (and ``c``, ``covariate_coef``)."""
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    columns = [np.ones_like(x), x - x.mean()]
    if covariate is not None:
        z = np.asarray(covariate, float)
        columns.append(z - z.mean())
    design = np.stack(columns, 1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - design @ coef
    dof = len(y) - design.shape[1]
    resid_std = float(np.sqrt(residuals @ residuals / dof)) if dof > 0 else 0.0
    se = float(np.sqrt(resid_std ** 2 * np.linalg.pinv(design.T @ design)[1, 1])) if dof > 0 else float("inf")
    fit = {"n": len(y), "slope": float(coef[1]), "slope_se": se, "resid_std": resid_std, "mean": float(y.mean())}
    if covariate is not None:
        fit["covariate_coef"] = float(coef[2])
    return fit


def judge(fit: dict, floor: float) -> str:
    """``grows``: slope >= T_GROWS standard errors and >= ``floor`` per 1000 iterations; ``drifts
    below the floor``: beyond the noise but under the floor; else ``no growth beyond noise``."""
    beyond = fit["slope"] > 0 and (fit["slope_se"] == 0 or fit["slope"] >= T_GROWS * fit["slope_se"])
    if not beyond:
        return "no growth beyond noise"
    return "grows" if 1000 * fit["slope"] >= floor else "drifts below the floor"


def analyse(samples: list[dict]) -> dict:
    """Fits over the second half of the run (iterations >= half the last one, at least the last three
    samples; the iteration-0 sample before training is never in it); the census diff.

    Wall time is fitted twice: alone (``s_per_it``, reported) and with the machine's 1-minute load
    average as a second regressor (``s_per_it_at_load``, judged): on a shared machine the other
    processes' load moves wall time along whatever the run does. CPU time (``cpu_s_per_it``) is the
    work per iteration."""
    last = samples[-1]["iteration"]
    timed = [s for s in samples if s["iteration"] > 0]
    half = [s for s in timed if s["iteration"] >= last / 2]
    if len(half) < 3:  # a short run: its last three samples
        half = timed[-3:]
    xs = [s["iteration"] for s in half]
    out = {"fit_from": xs[0] if xs else None, "fit_to": last}
    if len(half) < 3:
        out["verdict"] = "too few samples to fit"
        return out
    load = [s["loadavg_1min"] for s in half]
    out["load_1min"] = {"min": min(load), "max": max(load)}
    fits = {"rss_mib": (line_fit(xs, [s["rss_mib"] for s in half]), lambda f: RSS_FLOOR_MIB),
            "s_per_it": (line_fit(xs, [s["s_per_it"] for s in half]), lambda f: TIME_FLOOR * f["mean"]),
            "s_per_it_at_load": (line_fit(xs, [s["s_per_it"] for s in half], covariate=load),
                                 lambda f: TIME_FLOOR * f["mean"]),
            "cpu_s_per_it": (line_fit(xs, [s["cpu_s_per_it"] for s in half]), lambda f: TIME_FLOOR * f["mean"]),
            "allocated_blocks": (line_fit(xs, [s["allocated_blocks"] for s in half]), lambda f: 0.01 * f["mean"])}
    for key, (fit, floor_of) in fits.items():
        fit["per_1000"] = 1000 * fit["slope"]
        fit["per_1000_se"] = 1000 * fit["slope_se"]
        fit["floor_per_1000"] = floor_of(fit)
        fit["verdict"] = judge(fit, fit["floor_per_1000"])
        out[key] = fit
    grows = [k for k in JUDGED if out[k]["verdict"] == "grows"]
    drifts = [k for k in JUDGED if out[k]["verdict"] == "drifts below the floor"]
    if grows:
        out["verdict"] = "grows: " + ", ".join(grows)
    elif drifts:
        out["verdict"] = "no material growth (beyond noise but below the floor: " + ", ".join(drifts) + ")"
    else:
        out["verdict"] = "no growth beyond noise"
    rises = [(b["iteration"], b["rss_mib"] - a["rss_mib"]) for a, b in zip(samples[1:], samples[2:])]
    out["rss_rises"] = [{"to": it, "mib": mib} for it, mib in sorted(rises, key=lambda r: -r[1])[:3] if mib > 0]
    censuses = [s for s in samples if "types" in s]
    if censuses:
        first = next((s for s in censuses if s["iteration"] >= out["fit_from"]), censuses[0])
        end = censuses[-1]
        out["tensors"] = {"first": first["tensors"], "first_at": first["iteration"],
                          "last": end["tensors"], "last_at": end["iteration"]}
        out["objects"] = {"first": first["objects"], "first_at": first["iteration"], "last": end["objects"],
                          "last_at": end["iteration"]}
        names = set(first["types"]) | set(end["types"])
        diff = {k: end["types"].get(k, 0) - first["types"].get(k, 0) for k in names}
        out["types_grown"] = dict(sorted(((k, v) for k, v in diff.items() if v > 0), key=lambda kv: -kv[1])[:15])
    return out


# ------------------------------------------------------------------------------------------- runs

def arm_command(arm: str, iterations: int, work: Path, folder: Path | None, record: Path,
                every: int, objects_every: int, threads: int) -> tuple[list[str], str]:
    """The ``dmdx fit`` arguments of an arm (and the command as a user would type it, with
    placeholders for the scratch paths); writes the callbacks overlay into ``work``."""
    import yaml

    spec = ARMS[arm]
    recorder = {"class_path": "long_run.HealthRecorder",
                "init_args": {"path": str(record), "every": every, "objects_every": objects_every, "threads": threads}}
    overlay = work / f"{arm}_callbacks.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [*spec["callbacks"], recorder]}}, sort_keys=False))
    args = [a.replace("{folder}", str(folder)) for a in spec["args"]]
    argv = ["fit", "--config", str(ROOT / spec["config"]), "--config", str(overlay), *args,
            "--trainer.max_steps", str(iterations), "--trainer.default_root_dir", str(work / arm)]
    shown = ["dmdx", "fit", "--config", spec["config"], "--config", f"WORK/{arm}_callbacks.yaml",
             *[a.replace("{folder}", "WORK/sd3_tiny") for a in spec["args"]],
             "--trainer.max_steps", str(iterations), "--trainer.default_root_dir", f"WORK/{arm}"]
    return argv, " ".join(f"'{a}'" if " " in a else a for a in shown)


def run_arm(arm: str, iterations: int, work: Path, args) -> dict:
    folder = None
    if arm == "sd3":
        from dmdx_lightning.teachers.sd3_random import save_random_sd3

        folder = work / "sd3_tiny"
        if not folder.exists():
            save_random_sd3(folder)
    record = work / f"{arm}_samples.jsonl"
    record.unlink(missing_ok=True)
    argv, shown = arm_command(arm, iterations, work, folder, record, args.every, args.objects_every, args.threads)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1")
    log = work / f"{arm}.log"
    print(f"[long_run] {arm}: {iterations} iterations, log {log}", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call([sys.executable, "-c", DMDX, *argv],
                             cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    header = next((r for r in lines if r["kind"] == "header"), {})
    samples = [r for r in lines if r["kind"] == "sample"]
    result = {"config": ARMS[arm]["config"], "what": ARMS[arm]["what"], "changes": ARMS[arm]["changes"],
              "iterations": iterations, "command": shown, "returncode": rc, "wall_s": wall,
              "torch_threads_default": header.get("torch_threads_default"),
              "torch_threads": header.get("torch_threads"), "samples": samples}
    if rc != 0:
        result["log_tail"] = log.read_text()[-3000:].replace(str(work), "WORK").replace(str(ROOT), ".")
    if samples:
        result["analysis"] = analyse(samples)
    print(f"[long_run] {arm}: rc {rc}, {wall:.0f} s, {result.get('analysis', {}).get('verdict')}", flush=True)
    return result


# ---------------------------------------------------------------------------------------- reports

def _fmt_fit(fit: dict, unit: str, digits: int) -> str:
    return (f"{fit['per_1000']:+.{digits}f} ± {fit['per_1000_se']:.{digits}f} {unit} per 1000 iterations "
            f"(residual std {fit['resid_std']:.{digits}f} {unit}, mean {fit['mean']:.{digits}f} {unit}; floor "
            f"{fit['floor_per_1000']:.{digits}f}): **{fit['verdict']}**")


def _short(fit: dict, digits: int) -> str:
    return f"{fit['per_1000']:+.{digits}f} ± {fit['per_1000_se']:.{digits}f} (noise {fit['resid_std']:.{digits}f})"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Long-run health: RSS and time per iteration over long `dmdx fit` runs (CPU)", "",
             f"Command: `{report['command']}`", ""]
    if report.get("analysis_command"):
        lines += [f"Analysis re-run on the recorded samples: `{report['analysis_command']}`", ""]
    lines += [f"Machine: {m['cpu_count']} CPU cores ({m['platform']}), shared with other jobs (wall times are "
              f"noisy: the 1-minute load average is in every sample), Python {m['python']}, torch {m['torch']} on "
              f"{m['torch_threads']} thread(s), {m['date_utc']} UTC. Each arm is one `dmdx fit` process; a recorder "
              f"callback (`HealthRecorder` in benchmarks/long_run.py) samples every {report['every']} iterations "
              "(RSS by psutil, pymalloc blocks, wall and CPU seconds per iteration over the window since the last "
              f"sample) and every {report['objects_every']} iterations counts the live tensors and every gc-tracked "
              "object by type after a `gc.collect()` (outside the timed windows).", "",
              "Verdict rule: a least-squares line through the second half of each run (after the warm-up); the "
              f"noise is the residual standard deviation. A quantity **grows** when its slope is at least {T_GROWS:g} "
              f"standard errors above 0 and at least {RSS_FLOOR_MIB:g} MiB (RSS) or {100 * TIME_FLOOR:g} % of its "
              "mean (time) per 1000 iterations; **drifts below the floor** when beyond the noise but under that "
              "floor; otherwise **no growth beyond noise**. Judged: RSS, CPU s/it (the work per iteration) and wall "
              "s/it fitted with the 1-minute load average as a second regressor (other processes on the shared "
              "machine move wall time; the plain wall fit is reported beside it). Checkpoints (every 500 "
              "iterations) and sample grids fall inside some windows: a periodic part of the residuals.", ""]
    rows = []
    for arm, r in report["arms"].items():
        a = r.get("analysis", {})
        if "rss_mib" in a:
            rows.append((arm, r["iterations"], f"{a['fit_from']}-{a['fit_to']}", _short(a["rss_mib"], 2),
                         _short(a["cpu_s_per_it"], 4), _short(a["s_per_it_at_load"], 4), _short(a["s_per_it"], 4),
                         f"**{a['verdict']}**"))
    if rows:
        lines += [markdown_table(["arm", "iterations", "fitted", "RSS MiB / 1000 it", "CPU s/it per 1000 it",
                                  "wall s/it per 1000 it at constant load", "wall s/it per 1000 it (plain)",
                                  "verdict"], rows), ""]
    if report.get("plot"):
        lines += [f"![RSS and seconds per iteration vs iteration]({report['plot']})", ""]
    for arm, r in report["arms"].items():
        a = r.get("analysis", {})
        lines += [f"## {arm}: `{r['config']}`", "",
                  f"{r['what']}. Changed from the shipped config: {r['changes']}.", "",
                  f"Command (WORK: a scratch folder; its callbacks YAML is the shipped config's checkpoint and "
                  f"sample-grid callbacks as above plus `long_run.HealthRecorder`, importable with "
                  f"`PYTHONPATH=benchmarks`): `{r['command']}`", "",
                  f"{r['iterations']} iterations in {r['wall_s'] / 60:.1f} min (exit status {r['returncode']}); "
                  f"torch threads {r['torch_threads_default']} by default, {r['torch_threads']} set.", ""]
        if r.get("note"):
            lines += [r["note"], ""]
        if "rss_mib" in a:
            w = a["s_per_it_at_load"]
            lines += [f"**Verdict: {a['verdict']}** (fit over iterations {a['fit_from']}-{a['fit_to']}, "
                      f"{a['rss_mib']['n']} samples; 1-minute load {a['load_1min']['min']:.1f}-"
                      f"{a['load_1min']['max']:.1f}).", "",
                      f"- RSS: {_fmt_fit(a['rss_mib'], 'MiB', 2)}",
                      f"- CPU s / iteration: {_fmt_fit(a['cpu_s_per_it'], 's', 4)}",
                      f"- wall s / iteration at constant load: {_fmt_fit(w, 's', 4)}; "
                      f"{w['covariate_coef']:+.4f} s per unit of load",
                      f"- wall s / iteration, plain fit (not judged): {_fmt_fit(a['s_per_it'], 's', 4)}",
                      f"- pymalloc blocks: {a['allocated_blocks']['per_1000']:+.0f} ± "
                      f"{a['allocated_blocks']['per_1000_se']:.0f} per 1000 iterations (mean "
                      f"{a['allocated_blocks']['mean']:.0f}): {a['allocated_blocks']['verdict']}"]
            if a.get("rss_rises"):
                lines.append("- largest RSS rises between samples after the first window: " + ", ".join(
                    f"+{r['mib']:.2f} MiB up to iteration {r['to']}" for r in a["rss_rises"]))
            if "tensors" in a:
                t, o = a["tensors"], a["objects"]
                grown = ", ".join(f"`{k}` +{v}" for k, v in a.get("types_grown", {}).items()) or "none"
                lines.append(f"- live tensors: {t['first']} at iteration {t['first_at']}, {t['last']} at "
                             f"{t['last_at']}; gc-tracked objects {o['first']} -> {o['last']}; types whose count "
                             f"grew between those censuses: {grown}")
            lines.append("")
        elif a:
            lines += [f"Verdict: {a['verdict']}", ""]
        rows = [(s["iteration"], f"{s['rss_mib']:.1f}", s["allocated_blocks"],
                 "" if s["s_per_it"] is None else f"{s['s_per_it']:.4f}",
                 "" if s["cpu_s_per_it"] is None else f"{s['cpu_s_per_it']:.4f}",
                 f"{s['loadavg_1min']:.2f}", s.get("tensors", "")) for s in r["samples"]]
        lines += [markdown_table(["iteration", "RSS MiB", "pymalloc blocks", "wall s/it", "CPU s/it", "load 1 min",
                                  "live tensors"], rows), ""]
        if r.get("log_tail"):
            lines += ["Log tail:", "", "```", r["log_tail"][-1500:], "```", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    """RSS (top) and wall / CPU seconds per iteration (bottom) vs iteration, one column per arm
    (Pillow: matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    arms = [(a, r["samples"]) for a, r in report["arms"].items() if len(r["samples"]) > 1]
    if not arms:
        return False
    W, H, left, top, gap = 420, 200, 64, 26, 40
    img = Image.new("RGB", (len(arms) * (W + left + 20) + 10, 2 * (H + top + gap) + 10), "white")
    draw = ImageDraw.Draw(img)

    def panel(x0, y0, title, series, fmt):
        xs_all = [x for _, pts, _ in series for x, _ in pts]
        ys_all = [y for _, pts, _ in series for _, y in pts]
        if not xs_all:
            return
        xmin, xmax = 0, max(xs_all) or 1
        ylo, yhi = min(ys_all), max(ys_all)
        pad = (yhi - ylo) * 0.1 or abs(yhi) * 0.05 or 1.0
        ylo, yhi = ylo - pad, yhi + pad
        draw.text((x0, y0 - 20), title, fill="black")
        draw.rectangle([x0, y0, x0 + W, y0 + H], outline="grey")
        for frac in (0, 0.5, 1):
            y = y0 + H - frac * H
            draw.text((x0 - left + 2, y - 6), fmt(ylo + frac * (yhi - ylo)), fill="black")
            draw.line([x0 - 3, y, x0, y], fill="grey")
        for frac in (0, 0.5, 1):
            x = x0 + frac * W
            draw.text((x - 10, y0 + H + 4), f"{xmin + frac * (xmax - xmin):.0f}", fill="black")
        for k, (name, pts, colour) in enumerate(series):
            coords = [(x0 + (x - xmin) / (xmax - xmin) * W, y0 + H - (y - ylo) / (yhi - ylo) * H) for x, y in pts]
            if len(coords) > 1:
                draw.line(coords, fill=colour, width=2)
            for cx, cy in coords:
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
            draw.text((x0 + W - 110, y0 + 4 + 12 * k), name, fill=colour)

    for i, (arm, samples) in enumerate(arms):
        x0 = 10 + left + i * (W + left + 20)
        timed = [s for s in samples if s["s_per_it"] is not None]
        panel(x0, top, f"{arm}: RSS (MiB) vs iteration",
              [("RSS", [(s["iteration"], s["rss_mib"]) for s in samples], (40, 90, 200))], lambda v: f"{v:.0f}")
        panel(x0, top + H + top + gap, f"{arm}: seconds per iteration vs iteration",
              [("wall", [(s["iteration"], s["s_per_it"]) for s in timed], (200, 70, 50)),
               ("CPU", [(s["iteration"], s["cpu_s_per_it"]) for s in timed], (40, 150, 70))], lambda v: f"{v:.3f}")
    img.save(path)
    return True


def write_results(report: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report["plot"] = f"{name}.png" if plot(report, out / f"{name}.png") else None
    write_json(out / f"{name}.json", report)
    (out / f"{name}.md").write_text(markdown(report))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="digits,sd3", help="comma-separated: " + ",".join(ARMS))
    parser.add_argument("--iterations", type=int, default=2000, help="iterations per arm")
    parser.add_argument("--sd3-iterations", type=int, default=None,
                        help="iterations of the sd3 arm (default: --iterations)")
    parser.add_argument("--every", type=int, default=100, help="iterations between samples")
    parser.add_argument("--objects-every", type=int, default=500,
                        help="iterations between tensor counts and object censuses (a multiple of --every; 0: never)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    parser.add_argument("--note", action="append", default=[], metavar="ARM=TEXT",
                        help="a sentence for an arm's section of the report (e.g. why its iterations were reduced)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="long_run", help="file stem of the results")
    parser.add_argument("--reanalyse", type=Path, default=None, metavar="JSON",
                        help="run nothing: fit a report's recorded samples again and rewrite its results in --out")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = ("python benchmarks/long_run.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    notes = dict(n.split("=", 1) for n in args.note)
    if args.reanalyse:
        report = json.loads(args.reanalyse.read_text())
        for arm, result in report["arms"].items():
            if result["samples"]:
                result["analysis"] = analyse(result["samples"])
            if arm in notes:
                result["note"] = notes[arm]
        report["rule"] = RULE
        report["analysis_command"] = command
        write_results(report, args.out, args.name)
        return report
    threads = set_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
    report = {"command": command, "machine": machine(threads), "every": args.every,
              "objects_every": args.objects_every,
              "rule": RULE,
              "arms": {}}
    with tempfile.TemporaryDirectory(prefix="dmdx_long_run_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for arm in arms:
            n = args.sd3_iterations if arm == "sd3" and args.sd3_iterations else args.iterations
            result = run_arm(arm, n, work, args)
            if arm in notes:
                result["note"] = notes[arm]
            report["arms"][arm] = result
            write_results(report, args.out, args.name)  # after each arm: a stopped run keeps the finished ones
    return report


if __name__ == "__main__":
    main()
