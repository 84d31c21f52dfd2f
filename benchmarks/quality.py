"""Quality benchmark: the paper's ablation arms on the digits teacher, then on the exact mixture.

    python benchmarks/quality.py            # full run: digits (8 arms x 3 seeds, ~15 min) + mixture (~10 min)
    python benchmarks/quality.py --quick    # smoke run: tiny budget, 1 seed, few samples
    python benchmarks/quality.py --testbed mixture   # only the Gaussian-mixture testbed

Both testbeds are configs run by :mod:`study` (``benchmarks/study.py``), the same ``dmdx fit`` a user
types, one subprocess per (arm, seed), ``--jobs`` at a time; this file only schedules and reports.

Digits (``benchmarks/arms/digits.yaml``): every one-step student arm starts from the teacher's
weights and gets the same number of generator updates (``--budget``, default 300, batch 32); an
arm that chains two stages (DMD with ADP, DMDX) spends half of its budget in ADP (the ``adp_half``
stage) and half in the second stage. The ADP / A1 / DMD2 arms read the teacher's ODE pairs, made
once by ``dmdx predict --config configs/quickstart/ode_pairs.yaml`` into the work folder. Each run
is scored at its end by :class:`~dmdx_lightning.evaluation.digits.DigitsSummary` on fixed noise
seeds (identical for every arm and seed):

- FD: Frechet distance on the frozen digits classifier's features against the 1797 real digits;
- precision / recall: k-NN (k=3) improved precision and recall (Kynkaanniemi et al. 2019) on the
  same features (1800 samples against 1797 real digits);
- class accuracy / coverage: share classified as the prompted digit / digits hit at least once;
- diversity: per digit prompt, ``--diversity-k`` samples from as many seeds, mean pairwise
  LPIPS-style distance on the digits classifier's feature maps (the unweighted "baseline" LPIPS
  of Zhang et al. 2018 with the classifier as backbone; pixel LPIPS networks cannot read 8x8
  images);
- NFE (network evaluations per sample; CFG counts 2 per step) and seconds per sample.

The mixture testbed (``--testbed mixture`` or ``all``) runs :data:`MIXTURE_ARMS` of
``benchmarks/arms/mixture.yaml`` through ``benchmarks/mixture_study.py``, each at the generator
learning rate its sweep chose (``benchmarks/results/screen_mixture.json``), 3 seeds, into
``quality_mixture.md`` / ``.json``.

An arm that fails reports its error (and the arms that start from it say so) instead of failing
the benchmark. Writes ``quality.md`` (mean and std per arm), ``quality.json`` and ``quality_samples.png``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study as runner  # noqa: E402
from _common import RESULTS, machine, markdown_table, write_json  # noqa: E402

ROOT = runner.ROOT
ARMS_FILE = ROOT / "benchmarks/arms/digits.yaml"
PAIRS_CONFIG = ROOT / "configs/quickstart/ode_pairs.yaml"
#: the arms of a plain run, in table order (``adp_half`` is the stage the chained arms start from)
DEFAULT_ARMS = ("teacher", "dmd", "dmd2", "adm", "a1_mse", "adp", "dmd_adp", "dmdx")
METRICS = ("fd", "precision", "recall", "class_accuracy", "class_coverage", "diversity", "nfe",
           "seconds_per_sample", "dmd_alignment")


def summary_callback(args: argparse.Namespace) -> runner.SummaryCallback:
    """:class:`~dmdx_lightning.evaluation.digits.DigitsSummary` of each run, with a sample grid."""
    def callback(directory: Path, arm: str) -> dict:
        return {"class_path": "dmdx_lightning.evaluation.digits.DigitsSummary",
                "init_args": {"path": str(directory / "summary.json"), "arm": arm,
                              "samples_per_digit": args.samples_per_digit, "diversity_k": args.diversity_k,
                              "grid": str(directory / "samples.png"), "score_teacher": False}}

    return callback


def make_pairs(args: argparse.Namespace) -> None:
    """The teacher's ODE pairs (ADP / A1 arms; DMD2's real images), once: ``dmdx predict`` with the
    quickstart's config into the work folder (a rerun skips finished shards)."""
    pairs = Path(args.work) / "pairs"
    cmd = [sys.executable, "-m", "dmdx_lightning.cli", "predict", "--config", str(PAIRS_CONFIG),
           "--data.init_args.output_dir", str(pairs), "--data.init_args.num_pairs", str(args.pairs),
           "--data.init_args.shard_size", str(min(256, args.pairs)), "--trainer.default_root_dir", str(pairs)]
    pairs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(pairs / "log.txt", "w") as log:
        if subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"ODE pairs failed; see {pairs / 'log.txt'}")


def reads_pairs(arms: dict[str, dict], arm: str) -> bool:
    """Whether ``arm`` or a stage it starts from reads the ODE pairs (``{work}/pairs`` in its args)."""
    spec = arms[arm]
    return any("{work}" in str(a) for a in spec.get("args", [])) or \
        bool(spec.get("init_from") and reads_pairs(arms, spec["init_from"]))


def teacher_row(args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    """The teacher's own sampler (16 Euler steps, CFG 2), scored like the students."""
    from dmdx_lightning.evaluation.digits import evaluate_digits, teacher_sampler
    from dmdx_lightning.teachers.digits import DigitsTeacher

    torch.set_num_threads(1)
    teacher = DigitsTeacher(mode="full", sample_steps=16, cfg_scale=2.0)
    sample, nfe = teacher_sampler(teacher)
    return evaluate_digits(teacher, sample, nfe, args.samples_per_digit, args.diversity_k)


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = runner.load_arms(ARMS_FILE)
    selected = list(dict.fromkeys(args.arms or DEFAULT_ARMS))
    start = time.perf_counter()
    results = {a: {"title": arms[a]["title"], "status": "ok", "runs": []} for a in selected}
    grids: dict[str, torch.Tensor] = {}
    if "teacher" in selected:
        values, grids["teacher"] = teacher_row(args)
        results["teacher"]["runs"] = [dict(values, seed=0, seconds=0.0)]
    students = [a for a in selected if not arms[a].get("teacher")]
    needs_pairs = [a for a in students if reads_pairs(arms, a)]
    if needs_pairs:
        try:
            make_pairs(args)
        except Exception as e:
            for a in needs_pairs:
                results[a]["status"] = f"failed: ODE pairs: {e}"
            students = [a for a in students if a not in needs_pairs]
    study = runner.Study(arms, Path(args.work) / "runs", summary_callback(args), args.budget, jobs=args.jobs,
                         announce=("fd", "recall", "diversity"), variables={"work": str(Path(args.work))},
                         scoring={"samples_per_digit": args.samples_per_digit, "diversity_k": args.diversity_k})
    tasks = runner.plan(study, students, [1e-4], list(range(args.seeds)))
    collected = runner.collect(study, tasks, METRICS)
    study.shutdown()
    for arm, by_lr in collected.items():
        (entry,) = by_lr.values()  # every digits arm has its own lr
        results[arm]["runs"] = [dict(r["final"], seed=r["seed"], seconds=r["seconds"] or 0.0) for r in entry["runs"]]
        if entry["errors"]:
            results[arm]["status"] = "failed: " + entry["errors"][0]
        elif entry["runs"]:
            grid = runner.run_dir(study.root, arm, study.lr_of(arm, 1e-4), entry["runs"][0]["seed"]) / "samples.png"
            grids[arm] = grid
    for r in results.values():
        if r["runs"] and r["status"] == "ok":
            stats = {m: runner.mean_std_present([run.get(m) for run in r["runs"]]) for m in METRICS + ("seconds",)}
            r["mean"], r["std"] = {m: v[0] for m, v in stats.items()}, {m: v[1] for m, v in stats.items()}
    report = {
        "settings": {"budget_generator_updates": args.budget, "seeds": args.seeds,
                     "samples_per_digit": args.samples_per_digit, "diversity_k": args.diversity_k,
                     "ode_pairs": args.pairs, "jobs": args.jobs, "quick": args.quick, "command": args.command},
        "machine": machine(1), "wall_seconds": time.perf_counter() - start, "arms": results,
        "verdict": verdict(results),
    }
    write_json(out / "quality.json", report)
    (out / "quality.md").write_text(markdown(report))
    if grids:
        save_grids(grids, results, out / "quality_samples.png")
    print(markdown(report))
    return report


def verdict(results: dict[str, dict]) -> str:
    """Did DMDX beat DMD and DMD2 on recall and diversity at equal or better FD? In words."""
    dmdx = results.get("dmdx", {})
    if dmdx.get("status") != "ok":
        return f"No verdict: DMDX {dmdx.get('status', 'not selected')}."
    lines = []
    for name in ("dmd", "dmd2"):
        other = results.get(name, {})
        if other.get("status") != "ok":
            lines.append(f"{name.upper()}: {other.get('status', 'not selected')}.")
            continue
        a, b = dmdx["mean"], other["mean"]
        fd_ok = a["fd"] <= b["fd"]
        wins = [m for m in ("recall", "diversity") if a[m] > b[m]]
        beat = fd_ok and len(wins) == 2
        lines.append(
            f"DMDX {'beat' if beat else 'did not beat'} {name.upper()}: FD {a['fd']:.2f} vs {b['fd']:.2f} "
            f"({'equal or better' if fd_ok else 'worse'}), recall {a['recall']:.3f} vs {b['recall']:.3f}, "
            f"diversity {a['diversity']:.4f} vs {b['diversity']:.4f} (means over seeds).")
    return " ".join(lines)


def markdown(report: dict) -> str:
    s = report["settings"]
    fmt = {"fd": ".2f", "precision": ".3f", "recall": ".3f", "class_accuracy": ".3f", "class_coverage": ".2f",
           "diversity": ".4f", "nfe": ".0f", "seconds_per_sample": ".2e", "dmd_alignment": ".3f", "seconds": ".0f"}
    header = ["arm", "FD (lower better)", "precision", "recall", "class accuracy", "coverage", "diversity",
              "NFE", "s / sample", "ADM-DMD cosine", "run s", "runs"]

    def cell(r: dict, m: str) -> str:
        if r["mean"][m] != r["mean"][m]:
            return ""  # not reported (ADM's diagnostic: ADM arms only)
        return f"{r['mean'][m]:.0f}" if m == "nfe" else f"{r['mean'][m]:{fmt[m]}} ± {r['std'][m]:{fmt[m]}}"

    rows = []
    for name, r in report["arms"].items():
        if r["status"] != "ok":
            rows.append([f"{name}: {r['title']}", r["status"], *[""] * (len(header) - 2)])
            continue
        rows.append([f"{name}: {r['title']}", *(cell(r, m) for m in METRICS + ("seconds",)), len(r["runs"])])
    m = report["machine"]
    return "\n".join([
        "# Quality benchmark (digits teacher)",
        "",
        f"`{s['command']}` on {m['cpu_count']} CPU cores "
        f"({m['torch_threads']} torch threads), {m['date_utc']} UTC, {report['wall_seconds'] / 60:.1f} min in all.",
        "Every student: from the teacher's weights, one step unless its arm says `4step`, "
        f"{s['budget_generator_updates']} generator updates "
        "(chained arms: half in ADP, half in the second stage), batch 32, the arm's configs "
        f"(`benchmarks/arms/digits.yaml`); {s['seeds']} seed(s) per arm; mean ± std over seeds.",
        *(["", "**Smoke run (`--quick`): a few updates and few samples; these numbers say nothing about "
            "the methods. Run `python benchmarks/quality.py` for the benchmark.**"] if s["quick"] else []),
        "",
        markdown_table(header, rows),
        "",
        f"**Verdict.** {report['verdict']}",
        "",
        "Metrics: FD on the frozen digits classifier's features vs the 1797 real digits; precision / recall: "
        "k-NN (k=3, Kynkaanniemi et al. 2019) on the same features; class accuracy / coverage from the "
        f"classifier ({s['samples_per_digit']} samples per digit); diversity: mean pairwise LPIPS-style "
        f"distance on the classifier's feature maps (unweighted LPIPS, classifier backbone) over "
        f"{s['diversity_k']} seeds per digit prompt; NFE counts CFG as 2 per step; s / sample: batched "
        f"sampling on this CPU, with up to {s.get('jobs', 1)} runs side by side; run s: wall time of the arm's "
        "own `dmdx fit` process (start-up, training and scoring; 0 for the teacher); ADM-DMD cosine: "
        "between the directions ADM and DMD move each student sample (`train/generator/dmd_alignment`, "
        "ADM arms only), the mean over the last 50 iterations.",
        "",
    ])


def save_grids(grids: dict[str, torch.Tensor | Path], results: dict, path: Path) -> None:
    """One titled panel per arm (rows: seeds, columns: digits 0-9; a run's own ``samples.png``
    or the teacher's samples), in one PNG."""
    from PIL import Image, ImageDraw

    from dmdx_lightning.evaluation.digits import save_digit_grid

    panels = []
    for name, grid in grids.items():
        if isinstance(grid, torch.Tensor):
            save_digit_grid(grid, path.with_name(f".{name}_grid.png"))
            grid = path.with_name(f".{name}_grid.png")
        pil = Image.open(grid).convert("RGB")
        if grid.name.startswith("."):
            grid.unlink()
        canvas = Image.new("RGB", (max(pil.width, 300), pil.height + 16), "white")
        canvas.paste(pil, (0, 16))
        ImageDraw.Draw(canvas).text((2, 2), results[name]["title"], fill="black")
        panels.append(canvas)
    cols = 2
    w = max(p.width for p in panels) + 8
    h = max(p.height for p in panels) + 8
    sheet = Image.new("RGB", (cols * w, -(-len(panels) // cols) * h), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % cols) * w, (i // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: budget 3, 1 seed, few samples")
    p.add_argument("--testbed", choices=("all", "digits", "mixture"), default="all",
                   help="digits teacher, exact Gaussian mixture, or both (default)")
    p.add_argument("--budget", type=int, help="generator updates per student arm (default 300; quick 3)")
    p.add_argument("--seeds", type=int, help="seeds per arm (default 3; quick 1)")
    p.add_argument("--arms", type=lambda s: s.split(","), help=f"comma list of digits arms (default: "
                   f"{','.join(DEFAULT_ARMS)}; any arm of benchmarks/arms/digits.yaml)")
    p.add_argument("--samples-per-digit", type=int, help="default 180 (1800 samples); quick 20")
    p.add_argument("--diversity-k", type=int, help="seeds per prompt for diversity (default 10; quick 3)")
    p.add_argument("--pairs", type=int, help="teacher ODE pairs for the ADP / A1 / DMD2 arms (default 1280; quick 64)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (default 2, one per core)")
    p.add_argument("--out", default=str(RESULTS), help="output folder (default benchmarks/results)")
    p.add_argument("--work", help="pairs and runs (default runs/benchmarks/quality)")
    args = p.parse_args(argv)
    # the command as typed, without the output folders (machine-specific), for the report's header
    shown = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--out", "--work"):
        while flag in shown:
            i = shown.index(flag)
            del shown[i:i + 2]
    args.command = " ".join(["python benchmarks/quality.py", *shown])
    quick = {"budget": 3, "seeds": 1, "samples_per_digit": 20, "diversity_k": 3, "pairs": 64}
    full = {"budget": 300, "seeds": 3, "samples_per_digit": 180, "diversity_k": 10, "pairs": 1280}
    args.work = str(Path(args.work or ROOT / "runs/benchmarks/quality").resolve())
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    known = runner.load_arms(ARMS_FILE)
    unknown = set(args.arms or ()) - set(known)
    if unknown:
        p.error(f"unknown arms {sorted(unknown)}; choose from {sorted(known)}")
    for arm in list(args.arms or ()):  # an arm that starts from another arm needs that arm too
        source = known[arm].get("init_from")
        if source and source not in args.arms:
            args.arms.insert(args.arms.index(arm), source)
    return args


#: the mixture arms of the default run: teacher-initialised and A1-initialised DMD / ADM and the
#: ADM variants the study measured best (docs/reports/adm_study.md)
MIXTURE_ARMS = ("dmd", "adm", "dmd_a1", "adm_a1", "adm_a1_low_reg", "dmd_a1_low_reg")


def run_mixture(args) -> None:
    import mixture_study

    if args.quick:
        mixture_study.main(["--quick", "--root", str(Path(args.work) / "mixture")])
        return
    mixture_study.main(["--arms", ",".join(MIXTURE_ARMS), "--seeds", "0,1,2", "--samples", "500",
                        "--best-lr-from", str(RESULTS / "screen_mixture.json"), "--name", "quality_mixture",
                        "--root", str(ROOT / "runs/mixture_study")])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args) if args.testbed in ("all", "digits") else {}
    if args.testbed in ("all", "mixture"):
        run_mixture(args)
    return report


if __name__ == "__main__":
    main()
