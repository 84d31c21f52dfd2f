"""Quality benchmark: the paper's ablation arms on the digits teacher, then on the exact mixture.

    python benchmarks/quality.py            # full run: digits (8 arms x 3 seeds, ~12 min) + mixture (~10 min)
    python benchmarks/quality.py --quick    # smoke run: tiny budget, 1 seed, few samples
    python benchmarks/quality.py --testbed mixture   # only the Gaussian-mixture testbed

The mixture testbed (``--testbed mixture`` or ``all``) runs :data:`MIXTURE_ARMS` of
``benchmarks/arms/mixture.yaml`` through ``benchmarks/mixture_study.py`` (configs, the same
``dmdx fit`` path a user runs), each at the generator learning rate its sweep chose
(``benchmarks/results/screen_mixture.json``), 3 seeds, into ``quality_mixture.md`` / ``.json``.
The digits part below builds its arms in Python (the older design; the mixture's arms are configs).

(arm, seed) tasks run in ``--jobs`` worker processes (default 2: one per core, one torch thread
each); a task that starts from another arm's checkpoint waits for it.

Every student arm gets the same number of generator updates (``--budget``, default 300, batch
32, AdamW lr 1e-4, betas (0, 0.99)); an arm that chains two stages (DMD with ADP, DMDX) spends
half of its budget in ADP (the ``adp`` arm's own checkpoint at that point, so the stages are the
same runs) and half in the second stage. All students are one-step and start from the teacher's
weights. Per arm and seed the student is scored on fixed noise seeds (shared by all arms):

- FD: Frechet distance on the frozen digits classifier's features against the 1797 real digits;
- precision / recall: k-NN (k=3) improved precision and recall (Kynkaanniemi et al. 2019) on the
  same features (1800 samples against 1797 real digits);
- class accuracy / coverage: share classified as the prompted digit / digits hit at least once;
- diversity: per digit prompt, ``--diversity-k`` samples from as many seeds, mean pairwise
  LPIPS-style distance on the digits classifier's feature maps (the unweighted "baseline" LPIPS
  of Zhang et al. 2018 with the classifier as backbone; pixel LPIPS networks cannot read 8x8
  images);
- NFE (network evaluations per sample; CFG counts 2 per step) and seconds per sample.

The arm list (:data:`ARMS`) is data: an arm names its method, options and the arm it starts
from. An arm that fails reports its error (and the arms that start from it say so) instead of
failing the benchmark.
Writes ``quality.md`` (mean and std per arm), ``quality.json`` and ``quality_samples.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable
from unittest.mock import patch

import lightning.pytorch as pl
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Stopwatch, machine, markdown_table, mean_std, set_threads, write_json  # noqa: E402

from dmdx_lightning.evaluation.digits import digits_diversity, digits_metrics  # noqa: E402
from dmdx_lightning.callbacks.samples import fixed_noise  # noqa: E402
from dmdx_lightning.data.prompts import read_prompts  # noqa: E402
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS, NUM_CLASSES, DigitsTeacher, load_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT_FILE = ROOT / "configs/prompts/digits.txt"
# the ADP arms are the quickstart's ADP run, with the benchmark's budget and seed
ADP_CONFIG = ROOT / "configs/quickstart/adp.yaml"
PAIRS_CONFIG = ROOT / "configs/quickstart/ode_pairs.yaml"
#: ADP-config overrides of the MSE-only ablation A1 (rectified-flow regression, no discriminators)
A1_OVERRIDES = ["--model.init_args.mse_weight", "1.0", "--model.init_args.lambda1", "0.0",
                "--model.init_args.lambda2", "0.0"]  # ADPModule's A1 setting (see its docstring)


@dataclass(frozen=True)
class Arm:
    """One row of the benchmark.

    Args:
        name: short key (JSON, table).
        title: what the row is, in words.
        method: ``teacher`` (no training), ``adm`` (ADMModule; ``options`` are its init options)
            or ``adp`` (ADPModule from :data:`ADP_CONFIG`; ``options`` are CLI overrides).
        options: see ``method``.
        init_from: ``(arm, share)``: start from ``arm``'s checkpoint after ``share`` of the budget
            and spend the rest here.
        default: part of a plain run (``False``: only when named in ``--arms``).
    """

    name: str
    title: str
    method: str
    options: Any = field(default_factory=dict)
    init_from: tuple[str, float] | None = None
    default: bool = True


ARMS: tuple[Arm, ...] = (
    Arm("teacher", "teacher, 16 Euler steps, CFG 2", "teacher"),
    Arm("dmd", "DMD without ADP", "adm", {"loss": "dmd"}),
    Arm("dmd2", "DMD2 without ADP (TTUR 1)", "adm", {"loss": "dmd2"}),
    Arm("adm", "ADM without ADP (dt = 1/64, generator lr 1e-5)", "adm", {"loss": "adm", "generator_lr": 1e-5}),
    Arm("a1_mse", "MSE-only pre-training (ablation A1)", "adp", A1_OVERRIDES),
    Arm("adp", "ADP only", "adp", []),
    Arm("dmd_adp", "DMD with ADP (1/2 ADP + 1/2 DMD)", "adm", {"loss": "dmd"}, ("adp", 0.5)),
    Arm("dmdx", "DMDX = ADP + ADM (1/2 + 1/2, ADM generator lr 1e-5)", "adm",
        {"loss": "adm", "generator_lr": 1e-5}, ("adp", 0.5)),
    # exploratory, by name only: at dt = 1/64 the real and fake one-step moves differ by
    # (dt / t)(x0_real - x0_fake), too little for the discriminator to separate (PAPER.md)
    Arm("adm_equal_lr", "ADM without ADP, generator lr = 1e-4 (exploratory)", "adm", {"loss": "adm"}, default=False),
    Arm("dmdx_equal_lr", "DMDX, ADM generator lr = 1e-4 (exploratory)", "adm", {"loss": "adm"}, ("adp", 0.5),
        default=False),
    Arm("adm_dt4", "ADM without ADP, dt = 1/4 (exploratory)", "adm", {"loss": "adm", "dt": 0.25}, default=False),
    Arm("adm_dt4_slow", "ADM without ADP, dt = 1/4, generator lr 1e-5 (exploratory)", "adm",
        {"loss": "adm", "dt": 0.25, "generator_lr": 1e-5}, default=False),
    Arm("adm_dt1_slow", "ADM without ADP, dt = 1 (x0 predictions), generator lr 1e-5 (exploratory)", "adm",
        {"loss": "adm", "dt": 1.0, "generator_lr": 1e-5}, default=False),
    Arm("adm_paired", "ADM without ADP, paired discriminator (adm_pairing: paired) (exploratory)", "adm",
        {"loss": "adm", "adm_pairing": "paired"}, default=False),
    Arm("adm_paired_slow", "ADM without ADP, paired discriminator, generator lr 1e-5 (exploratory)", "adm",
        {"loss": "adm", "adm_pairing": "paired", "generator_lr": 1e-5}, default=False),
    Arm("adm_paired_dt1_slow", "ADM without ADP, paired, dt = 1, generator lr 1e-5 (exploratory)", "adm",
        {"loss": "adm", "adm_pairing": "paired", "dt": 1.0, "generator_lr": 1e-5}, default=False),
    Arm("adm_paired_3e6", "ADM without ADP, paired, generator lr 3e-6 (exploratory)", "adm",
        {"loss": "adm", "adm_pairing": "paired", "generator_lr": 3e-6}, default=False),
    Arm("adm_ttur5_slow", "ADM without ADP, update ratio 5, generator lr 1e-5 (exploratory)", "adm",
        {"loss": "adm", "update_ratio": 5, "generator_lr": 1e-5}, default=False),
    Arm("dmdx_dt4", "DMDX with dt = 1/4 (exploratory)", "adm", {"loss": "adm", "dt": 0.25}, ("adp", 0.5),
        default=False),
)

METRICS = ("fd", "precision", "recall", "class_accuracy", "class_coverage", "diversity", "nfe",
           "seconds_per_sample")


# ----------------------------------------------------------------------------------- data
class PairData(torch.utils.data.Dataset):
    """Prompts with teacher ODE samples: ``x0`` stands in for real images where a method needs
    them (DMD2's GAN); the other ADM-family losses read only ``prompt``."""

    def __init__(self, prompts: list[str], x0: torch.Tensor) -> None:
        self.prompts, self.x0 = prompts, x0

    @classmethod
    @torch.no_grad()
    def from_teacher(cls, teacher: DigitsTeacher, count: int, seed: int = 12345) -> "PairData":
        prompts = read_prompts(PROMPT_FILE)
        prompts = [prompts[i % len(prompts)] for i in range(count)]
        noise = fixed_noise(teacher.latent_shape(count), [seed + i for i in range(count)])
        return cls(prompts, teacher.sample_ode(noise, teacher.encode_prompts(prompts), teacher.sample_steps,
                                               teacher.cfg_scale))

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "index": i, "x0": self.x0[i]}


def loader(data: PairData, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    def collate(items):
        return {"prompt": [x["prompt"] for x in items], "index": torch.tensor([x["index"] for x in items]),
                "x0": torch.stack([x["x0"] for x in items])}

    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                                       collate_fn=collate, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- training
class StopAfter(pl.Callback):
    """Stop after ``iterations`` module iterations; save checkpoints at the given iterations."""

    def __init__(self, iterations: int, milestones: dict[int, Path]) -> None:
        self.iterations, self.milestones = iterations, milestones

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        it = int(module.iteration)
        if it in self.milestones:
            trainer.save_checkpoint(self.milestones[it])
        if it >= self.iterations:
            trainer.should_stop = True


def iterations_for(module, generator_updates: int) -> int:
    """The budget counts generator updates: run up to the iteration of the next one after
    ``generator_updates`` (the module's ``players_for_step`` decides who steps when)."""
    iteration = updates = 0
    while True:
        if "generator" in module.players_for_step(iteration):
            if updates == generator_updates:
                return iteration
            updates += 1
        iteration += 1


def build_adm(options: dict, init_from: str | None, lr: float):
    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.methods.adm import ADMModule

    options = dict(options)
    loss = options["loss"]
    opt = partial(torch.optim.AdamW, lr=lr, betas=(0.0, 0.99), weight_decay=0.0)
    # ADM's generator steps 10x slower than its fake score / discriminator (the quickstart's
    # setting): at equal rates the discriminator cannot keep up and FD rises (CHANGELOG)
    generator_opt = partial(opt, lr=options.pop("generator_lr", lr))
    # the quickstart's discriminator: heads on a middle and the last residual block
    disc = None if loss == "dmd" else LatentDiscriminator(
        layers=[1, 3], head_channels=64, backbone_role="fake" if loss == "dmd2" else "real")
    settings = dict(dt=1.0 / 64, real_cfg_scale=2.0, update_ratio=1, student_steps=1) | options
    return ADMModule(DigitsTeacher(mode="full"), disc, generator_optimizer=generator_opt, fake_score_optimizer=opt,
                     discriminator_optimizer=opt, init_from=init_from, **settings), None


def make_adp_pairs(args) -> None:
    """The ADP arms' teacher ODE pairs, once per run: ``dmdx predict --config
    configs/quickstart/ode_pairs.yaml`` into the work folder (finished shards are skipped)."""
    from dmdx_lightning.cli import main as dmdx

    for config in (ADP_CONFIG, PAIRS_CONFIG):
        if not config.is_file():
            raise FileNotFoundError(f"{config.relative_to(ROOT)} missing")
    pairs = Path(args.work) / "pairs"
    with patch.object(sys, "argv", sys.argv[:1]):  # the CLI reads these args only, not the benchmark's
        dmdx(["predict", "--config", str(PAIRS_CONFIG), "--data.init_args.output_dir", str(pairs),
              "--data.init_args.num_pairs", str(args.adp_pairs),
              "--data.init_args.shard_size", str(min(256, args.adp_pairs)),
              "--trainer.default_root_dir", str(pairs)])


def build_adp(overrides: list[str], seed: int, args):
    """ADPModule and its data module, as ``dmdx fit --config configs/quickstart/adp.yaml`` builds
    them, on the pairs of :func:`make_adp_pairs`."""
    from dmdx_lightning.cli import DMDXCLI

    pairs = Path(args.work) / "pairs"
    with patch.object(sys, "argv", sys.argv[:1]):
        cli = DMDXCLI(args=["--config", str(ADP_CONFIG), "--seed_everything", str(seed), "--trainer.logger", "false",
                            "--trainer.default_root_dir", str(Path(args.work) / "adp"),
                            "--data.init_args.path", str(pairs), "--data.init_args.batch_size", str(args.batch_size),
                            *overrides], run=False)
    return cli.model, cli.datamodule


def train(arm: Arm, seed: int, iterations: int, milestones: dict[int, Path], init_from: str | None,
          data: PairData, args) -> tuple[Any, float]:
    pl.seed_everything(seed, verbose=False)
    if arm.method == "adp":
        module, datamodule = build_adp(list(arm.options), seed, args)
    else:
        module, datamodule = build_adm(arm.options, init_from, args.lr)
    iterations = iterations_for(module, iterations)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=10_000, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[StopAfter(iterations, milestones)])
    with Stopwatch() as sw:
        if datamodule is not None:
            trainer.fit(module, datamodule=datamodule)
        else:
            trainer.fit(module, loader(data, args.batch_size, seed))
    if int(module.iteration) < iterations:
        raise RuntimeError(f"training stopped after {int(module.iteration)} of {iterations} iterations")
    return module.eval(), sw.seconds


# ----------------------------------------------------------------------------------- scoring
def evaluate(sample: Callable, nfe: int, seed: int, args, classifier) -> tuple[dict, torch.Tensor]:
    """Score one model on the noise seeds of run ``seed`` (identical for every arm)."""
    teacher_shape = (1, 8, 8)
    n, k = args.samples_per_digit, args.diversity_k
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n)
    prompts = [DIGIT_PROMPTS[int(c)] for c in labels]
    base = 1_000_000 * (seed + 1)
    noise = fixed_noise((len(prompts), *teacher_shape), [base + i for i in range(len(prompts))])
    with torch.no_grad(), Stopwatch() as sw:
        x = sample(prompts, noise)
    values = digits_metrics(x, labels, classifier)
    div_prompts = [p for p in DIGIT_PROMPTS for _ in range(k)]
    div_noise = fixed_noise((len(div_prompts), *teacher_shape), [base + 500_000 + i for i in range(len(div_prompts))])
    with torch.no_grad():
        xd = sample(div_prompts, div_noise)
    values["diversity"] = digits_diversity(xd.view(NUM_CLASSES, k, *xd.shape[1:]), classifier)
    values.update(nfe=nfe, seconds_per_sample=sw.seconds / len(prompts))
    grid = xd.view(NUM_CLASSES, k, *xd.shape[1:])[:, : min(k, 6)].transpose(0, 1).reshape(-1, *xd.shape[1:])
    return values, grid


def teacher_sampler(teacher: DigitsTeacher):
    def sample(prompts, noise):
        return teacher.decode(teacher.sample_ode(noise, teacher.encode_prompts(prompts), teacher.sample_steps,
                                                 teacher.cfg_scale))

    return sample, teacher.sample_steps * (2 if teacher.cfg_scale != 1.0 else 1)


def student_sampler(module, seed: int):
    def sample(prompts, noise):
        gen = torch.Generator().manual_seed(seed)
        return module.teacher.decode(module.sample(module.teacher.encode_prompts(prompts), noise, generator=gen))

    return sample, len(module.student_timesteps)


# ----------------------------------------------------------------------------------- the run
def milestone_path(args, arm: str, seed: int, iteration: int) -> Path:
    return Path(args.work) / "checkpoints" / f"{arm}_seed{seed}_it{iteration}.ckpt"


def run_task(arm_name: str, seed: int, args, milestones: dict[int, str]) -> dict:
    """Train (if a student) and score one arm for one seed. Runs in a worker process with
    ``--jobs`` > 1, so it takes and returns plain data only."""
    set_threads(args.threads)
    arm = {a.name: a for a in ARMS}[arm_name]
    if arm.method == "teacher":
        sample, nfe = teacher_sampler(DigitsTeacher(mode="full"))
        train_s = 0.0
    else:
        data = PairData(**torch.load(Path(args.work) / "teacher_pairs.pt", weights_only=True))
        init_from, own = None, args.budget
        if arm.init_from:
            src, share = arm.init_from
            first = max(1, round(share * args.budget))
            init_from, own = str(milestone_path(args, src, seed, first)), args.budget - first
        module, train_s = train(arm, seed, own, {i: Path(p) for i, p in milestones.items()}, init_from, data, args)
        sample, nfe = student_sampler(module, seed)
    values, grid = evaluate(sample, nfe, seed, args, load_classifier())
    values.update(seed=seed, train_seconds=train_s)
    print(f"[{arm_name}] seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()
                                                   if isinstance(v, float)), flush=True)
    return {"values": values, "grid": grid}


def _guarded(arm_name: str, seed: int, args, milestones) -> dict:
    try:
        return run_task(arm_name, seed, args, milestones)
    except Exception as e:  # report and go on with the other arms
        traceback.print_exc()
        return {"error": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def run(args) -> dict:
    threads = set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    selected = [a for a in ARMS if (a.name in args.arms if args.arms else a.default)]
    by_name = {a.name: a for a in ARMS}
    for a in selected:  # an arm that starts from another arm needs that arm too
        if a.init_from and by_name[a.init_from[0]] not in selected:
            selected.insert(selected.index(a), by_name[a.init_from[0]])
    start = time.perf_counter()
    results = {a.name: {"title": a.title, "status": "ok", "runs": []} for a in selected}
    runnable = list(selected)
    # shared inputs, made once: teacher samples for DMD2's real branch, ODE pairs for ADP
    if any(a.method == "adm" for a in runnable):
        data = PairData.from_teacher(DigitsTeacher(mode="full"), args.pairs)
        torch.save({"prompts": data.prompts, "x0": data.x0}, Path(args.work) / "teacher_pairs.pt")
    if any(a.method == "adp" for a in runnable):
        try:
            make_adp_pairs(args)
        except Exception as e:
            traceback.print_exc()
            for a in runnable:
                if a.method == "adp" or (a.init_from and by_name[a.init_from[0]].method == "adp"):
                    results[a.name]["status"] = f"failed: ODE pairs: {type(e).__name__}: {e}"
            runnable = [a for a in runnable if results[a.name]["status"] == "ok"]
    # checkpoints other arms start from: {(arm, seed): {iteration: path}}
    milestones: dict[tuple[str, int], dict[int, str]] = {}
    for a in runnable:
        if a.init_from:
            src, share = a.init_from
            for seed in range(args.seeds):
                it = max(1, round(share * args.budget))
                milestones.setdefault((src, seed), {})[it] = str(milestone_path(args, src, seed, it))
    outcomes = schedule(runnable, args, milestones)
    grids: dict[str, torch.Tensor] = {}
    for arm in runnable:
        for seed in range(args.seeds):
            outcome = outcomes[(arm.name, seed)]
            if "error" in outcome:
                results[arm.name]["status"] = outcome["error"]
                continue
            results[arm.name]["runs"].append(outcome["values"])
            grids.setdefault(arm.name, outcome["grid"])
        runs = results[arm.name]["runs"]
        if runs and results[arm.name]["status"] == "ok":
            results[arm.name]["mean"] = {m: mean_std(r[m] for r in runs)[0] for m in METRICS + ("train_seconds",)}
            results[arm.name]["std"] = {m: mean_std(r[m] for r in runs)[1] for m in METRICS + ("train_seconds",)}
    report = {
        "settings": {"budget_generator_updates": args.budget, "seeds": args.seeds, "batch_size": args.batch_size,
                     "lr": args.lr, "samples_per_digit": args.samples_per_digit, "diversity_k": args.diversity_k,
                     "teacher_pairs": args.pairs, "adp_pairs": args.adp_pairs, "jobs": args.jobs,
                     "quick": args.quick, "command": args.command},
        "machine": machine(threads), "wall_seconds": time.perf_counter() - start, "arms": results,
        "verdict": verdict(results),
    }
    write_json(out / "quality.json", report)
    (out / "quality.md").write_text(markdown(report))
    if grids:
        save_grids(grids, results, out / "quality_samples.png", args.diversity_k)
    print(markdown(report))
    return report


def schedule(arms: list[Arm], args, milestones) -> dict[tuple[str, int], dict]:
    """Run every (arm, seed) task, ``args.jobs`` at a time (worker processes when > 1); a task
    that starts from another arm waits for that arm's task of the same seed."""
    pending = [(a, seed) for seed in range(args.seeds) for a in arms]
    done: dict[tuple[str, int], dict] = {}
    pool = None
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"))
    running = {}
    try:
        while pending or running:
            for arm, seed in list(pending):
                source = (arm.init_from[0], seed) if arm.init_from else None
                if source and source not in done:
                    continue  # wait for the arm it starts from
                if source and "error" in done[source]:
                    done[(arm.name, seed)] = {"error": f"not run (needs arm {source[0]!r}, which failed)"}
                    pending.remove((arm, seed))
                    continue
                if pool is None:
                    pending.remove((arm, seed))
                    done[(arm.name, seed)] = _guarded(arm.name, seed, args, milestones.get((arm.name, seed), {}))
                elif len(running) < args.jobs:
                    pending.remove((arm, seed))
                    future = pool.submit(_guarded, arm.name, seed, args, milestones.get((arm.name, seed), {}))
                    running[future] = (arm.name, seed)
            if running:
                from concurrent.futures import FIRST_COMPLETED, wait

                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    done[running.pop(future)] = future.result()
    finally:
        if pool is not None:
            pool.shutdown()
    return done


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
           "diversity": ".4f", "nfe": ".0f", "seconds_per_sample": ".2e", "train_seconds": ".0f"}
    header = ["arm", "FD (lower better)", "precision", "recall", "class accuracy", "coverage", "diversity",
              "NFE", "s / sample", "train s", "runs"]
    rows = []
    for name, r in report["arms"].items():
        if r["status"] != "ok":
            rows.append([f"{name}: {r['title']}", r["status"], *[""] * (len(header) - 2)])
            continue
        cells = [f"{r['mean'][m]:{fmt[m]}} ± {r['std'][m]:{fmt[m]}}" if m not in ("nfe",) else f"{r['mean'][m]:.0f}"
                 for m in METRICS + ("train_seconds",)]
        rows.append([f"{name}: {r['title']}", *cells, len(r["runs"])])
    m = report["machine"]
    return "\n".join([
        "# Quality benchmark (digits teacher)",
        "",
        f"`{s['command']}` on {m['cpu_count']} CPU cores "
        f"({m['torch_threads']} torch threads), {m['date_utc']} UTC, {report['wall_seconds'] / 60:.1f} min in all.",
        f"Every student: one step, {s['budget_generator_updates']} generator updates, batch {s['batch_size']}, "
        f"AdamW lr {s['lr']:g}; {s['seeds']} seed(s) per arm; mean ± std over seeds.",
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
        f"sampling on this CPU, with up to {s.get('jobs', 1)} tasks running side by side; train s: wall time of "
        "the arm's own training stage.",
        "",
    ])


def save_grids(grids: dict[str, torch.Tensor], results: dict, path: Path, k: int) -> None:
    """One panel per arm (rows: seeds, columns: digits 0-9), titled, in one PNG."""
    from PIL import Image, ImageDraw

    panels = []
    for name, grid in grids.items():
        img = torchvision.utils.make_grid(((grid.float().clamp(-1, 1) + 1) / 2), nrow=NUM_CLASSES, padding=1)
        img = torch.nn.functional.interpolate(img[None], scale_factor=4, mode="nearest")[0]
        pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
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


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: budget 3, 1 seed, few samples")
    p.add_argument("--testbed", choices=("all", "digits", "mixture"), default="all",
                   help="digits teacher, exact Gaussian mixture, or both (default)")
    p.add_argument("--budget", type=int, help="generator updates per student arm (default 300; quick 3)")
    p.add_argument("--seeds", type=int, help="seeds per arm (default 3; quick 1)")
    p.add_argument("--arms", type=lambda s: s.split(","), help=f"comma list of arms (default: "
                   f"{','.join(a.name for a in ARMS if a.default)}; by name only: "
                   f"{','.join(a.name for a in ARMS if not a.default)})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--samples-per-digit", type=int, help="default 180 (1800 samples); quick 20")
    p.add_argument("--diversity-k", type=int, help="seeds per prompt for diversity (default 10; quick 3)")
    p.add_argument("--pairs", type=int, help="teacher samples for DMD2's real branch (default 2048; quick 64)")
    p.add_argument("--adp-pairs", type=int, help="teacher ODE pairs for the ADP arms (default 1280; quick 64)")
    p.add_argument("--jobs", type=int, default=2, help="(arm, seed) tasks run in parallel worker processes "
                   "(default 2, one per core; 1 = in this process)")
    p.add_argument("--threads", type=int, help="torch threads per task (default 1)")
    p.add_argument("--out", default=str(RESULTS), help="output folder (default benchmarks/results)")
    p.add_argument("--work", help="checkpoints and pairs (default runs/benchmarks/quality)")
    args = p.parse_args(argv)
    # the command as typed, without the output folders (machine-specific), for the report's header
    shown = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--out", "--work"):
        while flag in shown:
            i = shown.index(flag)
            del shown[i:i + 2]
    args.command = " ".join(["python benchmarks/quality.py", *shown])
    quick = {"budget": 3, "seeds": 1, "samples_per_digit": 20, "diversity_k": 3, "pairs": 64, "adp_pairs": 64}
    full = {"budget": 300, "seeds": 3, "samples_per_digit": 180, "diversity_k": 10, "pairs": 2048,
            "adp_pairs": 1280}
    args.work = args.work or str(ROOT / "runs/benchmarks/quality")
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.arms or ()) - {a.name for a in ARMS}
    if unknown:
        p.error(f"unknown arms {sorted(unknown)}; choose from {[a.name for a in ARMS]}")
    return args


#: the mixture arms of the default run: teacher-initialised and A1-initialised DMD / ADM and the
#: ADM variants the study measured best (README, "The Gaussian-mixture testbed")
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
