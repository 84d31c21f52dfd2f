"""The ADM study on the exact Gaussian-mixture teacher: arms x generator learning rates x seeds.

    python benchmarks/mixture_study.py --arms dmd,adm,dmdx --lrs 1e-4,3e-5 --seeds 0,1,2
    python benchmarks/mixture_study.py --quick            # smoke run (tests)

Every arm is configs (``benchmarks/arms/mixture.yaml``: a list of YAML files and overrides), run
by the same ``dmdx fit`` command a user types, one subprocess per (arm, lr, seed), ``--jobs`` at a
time. The study adds only a per-run overlay (seed, generator learning rate, output folder, the
``GeneratorBudget`` of ``--updates`` generator updates, the ``MixtureSummary`` that scores the
student at its start and end). A run whose summary already exists is not run again, so a long
study resumes where it stopped. Writes ``benchmarks/results/<name>.md`` and ``.json``
(``<name>`` contains ``mixture``) and ``<name>_modes.png`` (per-mode mass, teacher vs arms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study as runner  # noqa: E402
from _common import RESULTS, machine, markdown_table, write_json  # noqa: E402

ROOT = runner.ROOT
ARMS_FILE = ROOT / "benchmarks/arms/mixture.yaml"
METRICS = ("coverage", "modes_covered", "precision", "tv", "min_weight_covered", "modes_covered_2r", "tv_2r",
           "logit_gap", "dmd_alignment")


def load_arms(path: Path = ARMS_FILE) -> dict[str, dict]:
    return runner.load_arms(path)


def summary_callback(samples: int) -> runner.SummaryCallback:
    """:class:`~dmdx_lightning.callbacks.mixture.MixtureSummary` of each run (start and end of fit)."""
    def callback(directory: Path, arm: str) -> dict:
        return {"class_path": "dmdx_lightning.callbacks.mixture.MixtureSummary",
                "init_args": {"path": str(directory / "summary.json"), "arm": arm, "samples_per_class": samples,
                              "score_teacher": False}}  # scored once by the study (teacher_row)

    return callback


def make_study(args: argparse.Namespace) -> runner.Study:
    return runner.Study(load_arms(Path(args.arms_file)), Path(args.root), summary_callback(args.samples),
                        args.updates, args.base_lr, args.jobs, announce=METRICS, scoring={"samples": args.samples})


def teacher_spec(config: Path = ROOT / "configs/mixture/adm.yaml") -> dict:
    """The mixture teacher's init args in a config (the study's reference mixture by default)."""
    return yaml.safe_load(Path(config).read_text())["model"]["init_args"]["teacher"]["init_args"]


class OneStepStudent(torch.nn.Module):
    """What ``evaluate_mixture`` reads of a distillation module, for a teacher outside a run: its
    ``teacher``, ``device`` and the one-step student sampler."""

    student_timesteps = [1.0]

    def __init__(self, teacher) -> None:
        super().__init__()
        self.teacher, self.device = teacher, torch.device("cpu")

    def sample(self, cond, noise, generator=None):
        return self.teacher.sample_student(noise, cond, self.student_timesteps, generator)


def teacher_row(samples: int, root: Path) -> dict:
    """The teacher's own ODE sampler on the study's noise, scored once (cached under ``root``)."""
    cache = root / "teacher.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from dmdx_lightning.callbacks.mixture import evaluate_mixture
    from dmdx_lightning.teachers.mixture import MixtureTeacher

    torch.set_num_threads(1)
    row = evaluate_mixture(OneStepStudent(MixtureTeacher(**teacher_spec())), samples, teacher=True)
    root.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row))
    return row


def rescore(root: Path, samples: int) -> None:
    """Score every finished one-step run under ``root`` again with today's metrics (its saved
    ``config.yaml`` and final student), rewriting its summary row in place."""
    from dmdx_lightning.callbacks.mixture import evaluate_mixture
    from dmdx_lightning.callbacks.summary import update_summary
    from dmdx_lightning.teachers.mixture import MixtureTeacher

    torch.set_num_threads(1)
    prefix = "teacher.roles.student."
    for summary in sorted(root.glob("*/lr*/seed*/summary.json")):
        directory, arm = summary.parent, summary.parent.parent.parent.name
        config, ckpt = directory / "config.yaml", directory / "checkpoints/last.ckpt"
        if not (config.is_file() and ckpt.is_file()):
            continue
        teacher = MixtureTeacher(**teacher_spec(config))
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        teacher.roles["student"].load_state_dict(
            {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
        row = json.loads(summary.read_text())[arm]
        new = evaluate_mixture(OneStepStudent(teacher), samples)
        update_summary(summary, arm, {**row, **new})
        print(f"rescored {directory.relative_to(root)}: modes {new['modes_covered']}, "
              f"within 2r {new['modes_covered_2r']}, TV {new['tv']:.3f}", flush=True)


def aggregate(study: runner.Study, tasks: list[tuple], samples: int) -> dict:
    report: dict = {"arms": runner.collect(study, tasks, METRICS, extra_rows=("init",)),
                    "teacher": teacher_row(samples, study.root)}
    for arm, by_lr in report["arms"].items():
        scored = {lr: e for lr, e in by_lr.items() if "final" in e}
        if scored:  # best learning rate: lowest mean TV (it counts dropped modes, wrong weights and blur)
            report["arms"][arm]["best_lr"] = min(scored, key=lambda lr: scored[lr]["final"]["tv"][0])
    return report


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def markdown(report: dict, study: runner.Study, args: argparse.Namespace, command: str, seconds: float) -> str:
    lines = [f"# Mixture study: {args.name}", "",
             f"`{command}` on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{seconds / 60:.1f} min for this invocation (finished runs with unchanged configs are reused; each "
             "run's own log is `<root>/<arm>/lr<lr>/seed<seed>/log.txt`). Every arm: one-step student unless its name "
             f"says `4step`, {args.updates} generator updates unless the arm sets its own "
             f"(chained arms: that many per stage), batch 32, AdamW betas (0, 0.99); fake score and "
             f"discriminators at lr 1e-4; the generator lr as listed. {args.samples} samples per class on fixed "
             "noise; mean ± std over seeds.", ""]
    t = report.get("teacher")
    if t:
        lines += [f"Teacher (exact ODE, {t['nfe']} NFE): modes {t['modes_covered']}/{t['modes_total']}, "
                  f"precision {t['precision']:.3f}, TV {t['tv']:.3f} (TV of a finite sample of the exact "
                  "mixture is not 0: it is the noise floor).", ""]
    rows = []
    for arm, by_lr in report["arms"].items():
        for lr, e in by_lr.items():
            if lr == "best_lr":
                continue
            best = " (best)" if by_lr.get("best_lr") == lr else ""
            if "final" not in e:
                rows.append([arm, lr, "failed: " + "; ".join(e["errors"])[:120], *[""] * 9])
                continue
            f, i = e["final"], e.get("init")
            start = f"{i['modes_covered'][0]:.1f} / {i['precision'][0]:.2f} / {i['tv'][0]:.2f}" if i else ""
            rows.append([arm + best, lr, fmt(f["modes_covered"], 1), fmt(f["precision"]), fmt(f["tv"]),
                         fmt(f["min_weight_covered"], 2), fmt(f["modes_covered_2r"], 1), fmt(f["tv_2r"]),
                         *("" if f[k][0] != f[k][0] else fmt(f[k]) for k in ("logit_gap", "dmd_alignment")),
                         start, len(e["runs"])])
    lines.append(markdown_table(["arm", "generator lr", "modes covered (of 64)", "precision", "TV",
                                 "lightest third covered", "modes within 2r", "TV within 2r", "D logit gap",
                                 "ADM-DMD cosine", "start: modes / precision / TV", "seeds"], rows))
    lines += ["", "Arms: " + "; ".join(f"`{a}`: {study.arms[a]['title']}" for a in report["arms"]), "",
              "Metrics (exact, `dmdx_lightning.teachers.mixture.mixture_metrics`): a sample is precise within "
              "`std (sqrt(d) + 3)` of its nearest mode mean of the prompted class; a mode is covered when its "
              "share of precise samples is at least 1/4 of its true weight; TV between the student's mode "
              "weights (plus an 'off every mode' bin) and the true ones, averaged over classes. The `2r` columns "
              "count a sample within twice that radius (near a mode, off its typical set). D logit gap: ADM's "
              "E[D(real move)] - E[D(fake move)] over the last 50 iterations; ADM-DMD cosine: between the directions "
              "ADM and DMD move each student sample (`train/generator/dmd_alignment`), same window. Best lr: "
              "lowest mean TV."]
    return "\n".join(lines) + "\n"


def mode_picture(report: dict, path: Path) -> None:
    """Per-mode mass of class 0 (modes sorted by true weight): true weights, then each arm's best run."""
    from PIL import Image, ImageDraw

    from dmdx_lightning.teachers.mixture import GaussianMixture

    spec = teacher_spec()
    mixture = GaussianMixture(spec["shape"], spec["num_classes"], spec["modes_per_class"], spec["std"],
                              spec["weight_ratio"], spec["mixture_seed"])
    weights = mixture.log_weights[0].exp()
    order = torch.argsort(weights, descending=True).tolist()
    rows = [("true weights", weights.tolist())]
    if report.get("teacher"):
        rows.append(("teacher ODE", report["teacher"]["mode_mass"][0]))
    for arm, by_lr in report["arms"].items():
        lr = by_lr.get("best_lr")
        if lr and by_lr[lr]["runs"]:
            rows.append((f"{arm} (lr {lr})", by_lr[lr]["runs"][0]["final"]["mode_mass"][0]))
    bar, gap, height, label_w = 14, 4, 60, 150
    M = len(order)
    img = Image.new("RGB", (label_w + M * (bar + gap) + 10, len(rows) * (height + 12) + 10), "white")
    draw = ImageDraw.Draw(img)
    top = max(weights.max().item() * 1.5, 1e-6)
    for r, (name, mass) in enumerate(rows):
        y0 = 5 + r * (height + 12)
        draw.text((5, y0 + height // 2 - 5), name, fill="black")
        for j, k in enumerate(order):
            x0 = label_w + j * (bar + gap)
            h = int(min(mass[k] / top, 1.0) * height)
            colour = (60, 120, 200) if mass[k] >= weights[k].item() / 4 else (220, 80, 60)
            draw.rectangle([x0, y0 + height - h, x0 + bar, y0 + height], fill=colour)
            tick = y0 + height - int(weights[k].item() / top * height)
            draw.line([x0 - 1, tick, x0 + bar + 1, tick], fill="black")
        draw.line([label_w, y0 + height, label_w + M * (bar + gap), y0 + height], fill="grey")
    img.save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default="mse,adp,dmd,dmd2,adm,dmd_adp,dmdx")
    p.add_argument("--lrs", default="1e-4,3e-5", help="generator learning rates swept for every arm")
    p.add_argument("--best-lr-from", help="a report JSON of an lr sweep: run each arm at its best lr there only "
                   "(instead of --lrs)")
    p.add_argument("--base-lr", type=float, default=1e-4, help="generator lr of a stage other arms start from")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--updates", type=int, default=400, help="generator updates per arm (per stage)")
    p.add_argument("--samples", type=int, default=1000, help="evaluation samples per class")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--name", default="quality_mixture", help="results file stem (must contain 'mixture')")
    p.add_argument("--root", default=str(ROOT / "runs/mixture_study"))
    p.add_argument("--arms-file", default=str(ARMS_FILE))
    p.add_argument("--quick", action="store_true", help="smoke run: 2 arms, 1 seed, 5 updates, few samples")
    p.add_argument("--rescore", action="store_true", help="score the finished runs under --root again with "
                   "today's metrics (then report as usual)")
    args = p.parse_args(argv)
    if args.quick:
        args.arms, args.lrs, args.seeds, args.updates, args.samples = "dmd,adm", "1e-4", "0", 5, 50
        args.root = str(Path(args.root).with_name(Path(args.root).name + "_quick"))
    if "mixture" not in args.name:
        raise SystemExit(f"--name {args.name!r} must contain 'mixture' (results files are found by it)")
    command = "python benchmarks/mixture_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.replace(f"{ROOT}/", "")  # a report names no machine's folders (quality.py passes absolute ones)
    study = make_study(args)
    if args.rescore:
        rescore(Path(args.root), args.samples)
    arms = [a for a in args.arms.split(",") if a and not study.arms[a].get("teacher")]
    start = time.time()
    tasks = runner.plan(study, arms, [float(x) for x in args.lrs.split(",")], [int(s) for s in args.seeds.split(",")],
                        args.best_lr_from)
    report = aggregate(study, tasks, args.samples)
    study.shutdown()
    seconds = time.time() - start
    report.update(command=command, machine=machine(1), updates=args.updates, seconds=seconds,
                  titles={a: study.arms[a]["title"] for a in arms})
    out = RESULTS if not args.quick else Path(args.root)
    write_json(out / f"{args.name}.json", report)
    (out / f"{args.name}.md").write_text(markdown(report, study, args, command, seconds))
    mode_picture(report, out / f"{args.name}_modes.png")
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
