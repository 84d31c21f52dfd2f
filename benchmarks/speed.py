"""Speed benchmark: sampling cost of student vs teacher, and the framework overhead of training.

    python benchmarks/speed.py            # digits teacher + tiny SD3 teacher, a few minutes on 2 cores
    python benchmarks/speed.py --quick    # smoke run: fewer repeats

(a) Sampling: seconds per sample of the one-step student and of the teacher's own sampler (its
    default steps, with CFG), measured in the same run on the same batch, and their ratio.
(b) Training: one ADM iteration (generator, fake score and discriminator, update ratio 1) run by
    Lightning (``Trainer.fit``: the period between consecutive batch starts) against the
    sum of its parts timed alone in a plain PyTorch loop: prompt encoding, the student sample,
    then for each player its forward (loss), backward and optimizer step. The ratio is the
    framework's overhead (Lightning's loop, optimizer toggling, logging, our bookkeeping).
(c) ADM vs DMD2: teacher-network passes per iteration (a forward pre-hook on each of the teacher's
    denoiser modules counts every call: a CFG prediction, batched, is one pass; a discriminator
    forward that stops early is one pass), per player, and the ADM / DMD2 iteration-time ratio
    (fastest sum of parts of the bare loop, iterations of the two alternating, both with a one-step
    student and update ratio 1; DMD2's real latents are fixed random tensors, which cost the same
    as ODE-pair latents).
    ``--baseline OLD/speed.json`` puts a run of another commit beside this one (before / after).

Teachers: the built-in digits teacher, and a tiny random SD3 pipeline (``SD3Teacher`` in LoRA
mode, as the paper's SD3-Medium run). A teacher that fails reports its error in its row. Writes
``speed.md`` and ``speed.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, markdown_table, set_threads, write_json  # noqa: E402

from dmdx_lightning.rng import fixed_noise  # noqa: E402



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------------- teachers
def digits_setup(args):
    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.teachers.digits import DIGIT_PROMPTS, DigitsTeacher

    teacher = DigitsTeacher(mode="full")
    disc = LatentDiscriminator(layers=[1, 3], head_channels=64)  # the quickstart's
    return teacher, disc, list(DIGIT_PROMPTS), 32, {}


def sd3_setup(args):
    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.teachers.sd3 import SD3Teacher
    from dmdx_lightning.teachers.sd3_random import save_random_sd3

    size = dict(num_layers=2, num_heads=2, head_dim=8, latent_size=8) if args.quick else \
        dict(num_layers=4, num_heads=4, head_dim=16, latent_size=16)
    folder = save_random_sd3(Path(tempfile.mkdtemp(prefix="dmdx_speed_sd3_")) / "sd3", **size)
    teacher = SD3Teacher(pretrained_model_name_or_path=str(folder), mode="lora", lora_rank=4,
                         resolution=2 * size["latent_size"], max_sequence_length=16, sample_steps=28, cfg_scale=7.0)
    disc = LatentDiscriminator(layers=[0, -1], head_channels=32, num_down=1)
    return teacher, disc, list(teacher.example_prompts), 4, size


TEACHERS = {"digits": digits_setup, "tiny_sd3": sd3_setup}


def make_module(teacher, disc, loss: str = "adm"):
    from functools import partial

    from dmdx_lightning.discriminators.latent import LatentDiscriminator
    from dmdx_lightning.methods.adm import ADMModule

    if loss == "dmd2":  # DMD2's GAN head reads the fake score's features
        disc = LatentDiscriminator(layers=disc.layers, head_channels=disc.head_channels, num_down=disc.num_down,
                                   backbone_role="fake")
    opt = partial(torch.optim.AdamW, lr=1e-5, betas=(0.0, 0.99), weight_decay=0.0)
    # one-step student: every iteration does the same work (no random backward-simulation depth)
    return ADMModule(teacher, disc, loss=loss, update_ratio=1, student_steps=1, generator_optimizer=opt,
                     fake_score_optimizer=opt, discriminator_optimizer=opt)


class PassCounter:
    """Counts forward calls of the teacher's denoiser modules (one per distinct module of the
    ``real`` / ``fake`` / ``student`` roles: three copies in full mode, one shared base in lora
    mode) with forward pre-hooks, while used as a context manager."""

    def __init__(self, teacher) -> None:
        self.modules = list({id(m): m for m in (teacher.network(r) for r in ("real", "fake", "student"))}.values())
        self.total = 0

    def _hook(self, module, args, kwargs=None):
        self.total += 1

    def __enter__(self) -> "PassCounter":
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------- (a) sampling
@torch.no_grad()
def sampling(module, prompts: list[str], batch: int, repeats: int) -> dict:
    teacher = module.teacher
    device = module.device
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    cond = teacher.encode_prompts(rows)
    noise = fixed_noise(teacher.latent_shape(batch), list(range(batch))).to(device)
    steps, cfg = teacher.sample_steps, teacher.cfg_scale

    def student():
        return teacher.decode(module.sample(cond, noise, generator=torch.Generator(device).manual_seed(0)))

    def teacher_run():
        return teacher.decode(teacher.sample_ode(noise, cond, steps, cfg))

    student()  # warm-up (the teacher's first repeat warms it up as well)
    # alternate the two and keep the fastest repeat: on a shared machine the minimum is the
    # least disturbed measurement
    s, t = [], []
    for _ in range(repeats):
        s.append(timed(student, device)[1])
        t.append(timed(teacher_run, device)[1])
    s_ps, t_ps = min(s) / batch, min(t) / batch
    return {"batch": batch, "student_nfe": len(module.student_timesteps), "teacher_nfe": steps * (2 if cfg != 1 else 1),
            "student_seconds_per_sample": s_ps, "teacher_seconds_per_sample": t_ps, "speedup": t_ps / s_ps}


# ----------------------------------------------------------------------------------- (b) training
class BatchClock(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        _sync(module.device)
        self.starts.append(time.perf_counter())


def lightning_iteration(module, loader, iterations: int, warmup: int) -> float:
    clock = BatchClock()
    trainer = pl.Trainer(accelerator="auto", devices=1, max_steps=warmup + iterations + 1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    trainer.fit(module, loader)
    return [b - a for a, b in zip(clock.starts, clock.starts[1:])][warmup:]


def bare_iteration(module, optimizers: dict, batch: dict, counter: PassCounter | None = None,
                   passes: dict | None = None) -> dict[str, float]:
    """One ADM iteration without Lightning; every part timed on its own (and, with ``counter``,
    the teacher-network passes of each part added up in ``passes``)."""
    device, parts = module.device, {}

    def part(name, fn):
        before = counter.total if counter is not None else 0
        out, seconds = timed(fn, device)
        parts[name] = parts.get(name, 0.0) + seconds
        if counter is not None and counter.total > before:
            passes[name] = passes.get(name, 0) + counter.total - before
        return out

    cond = part("encode prompts", lambda: module.teacher.encode_prompts(batch["prompt"]))
    players = module.players_for_step(int(module.iteration))
    ctx = part("student sample", lambda: module.prepare(batch, cond, players))
    for player in players:
        trainable = {id(p) for p in module.players[player].parameters()}
        for p in module.parameters():  # what Lightning's toggled_optimizer does, outside the clock
            p.requires_grad_(id(p) in trainable)
        losses = part(f"{player} forward", lambda: module.players[player].step(batch, cond, ctx))
        part(f"{player} backward", lambda: losses["loss"].backward())
        opt = optimizers[player]
        part(f"{player} optimizer step", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    for player in module.players.values():
        for p in player.parameters():
            p.requires_grad_(True)
    module.iteration += 1
    return parts


def overhead(setup: Callable, args) -> dict:
    teacher, disc, prompts, batch_size, size = setup(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    iterations, warmup = (min(3, args.iterations), 1) if args.quick else (args.iterations, 2)
    items = [{"prompt": prompts[i % len(prompts)], "index": i} for i in range(batch_size * (warmup + iterations + 4))]
    # DMD2's real latents (ODE pairs in training): fixed random tensors cost the same; ADM ignores them
    x0 = fixed_noise(teacher.latent_shape(len(items)), list(range(len(items))))

    def collate(b):
        index = torch.tensor([x["index"] for x in b])
        return {"prompt": [x["prompt"] for x in b], "index": index, "x0": x0[index]}

    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, drop_last=True, collate_fn=collate)
    # sampling and the bare loop on one module, Lightning on a fresh one (same weights, same shapes)
    pl.seed_everything(0, verbose=False)
    module = make_module(teacher, disc).to(device)
    result = {"sampling": sampling(module, prompts, batch_size * (1 if args.quick else 8), 2 if args.quick else 5),
              "model": size}
    optimizers = dict(zip(module.players, module.configure_optimizers()))

    def bare_block():
        return [bare_iteration(module, optimizers, b) for b, _ in zip(loader, range(warmup + iterations))][warmup:]

    # bare, Lightning, bare again: load changes on a shared machine hit both sides alike
    runs = bare_block()
    pl.seed_everything(0, verbose=False)
    periods = lightning_iteration(make_module(teacher, disc), loader, iterations, warmup)
    runs += bare_block()
    sums = [sum(r.values()) for r in runs]
    fastest = runs[sums.index(min(sums))]
    result["training"] = {
        "batch": batch_size, "iterations_timed": iterations,
        "parts_seconds": fastest,  # the parts of the fastest bare iteration
        "sum_of_parts_seconds": min(sums), "lightning_iteration_seconds": min(periods),
        "overhead_ratio": min(periods) / min(sums),
        "median_sum_of_parts_seconds": statistics.median(sums),
        "median_lightning_iteration_seconds": statistics.median(periods),
        "median_overhead_ratio": statistics.median(periods) / statistics.median(sums)}
    result["adm_vs_dmd2"] = adm_vs_dmd2(teacher, disc, loader, iterations, warmup, device)
    return result


def adm_vs_dmd2(teacher, disc, loader, iterations: int, warmup: int, device) -> dict:
    """(c): teacher-network passes and the fastest bare iteration of ADM and of DMD2, their
    iterations alternating so that load changes on a shared machine hit both alike."""
    pl.seed_everything(0, verbose=False)
    modules = {loss: make_module(teacher, disc, loss).to(device) for loss in ("adm", "dmd2")}
    optimizers = {loss: dict(zip(m.players, m.configure_optimizers())) for loss, m in modules.items()}
    sums = {loss: [] for loss in modules}
    per_iteration = {loss: [] for loss in modules}
    per_part = {loss: [] for loss in modules}
    with PassCounter(teacher) as counter:
        for i, (batch, _) in enumerate(zip(loader, range(warmup + iterations))):
            for loss, module in modules.items():
                passes: dict[str, int] = {}
                parts = bare_iteration(module, optimizers[loss], batch, counter, passes)
                if i >= warmup:
                    sums[loss].append(sum(parts.values()))
                    per_iteration[loss].append(sum(passes.values()))
                    per_part[loss].append(passes)
    out = {loss: {"min_iteration_seconds": min(sums[loss]), "median_iteration_seconds": statistics.median(sums[loss]),
                  "passes_per_iteration": per_iteration[loss],
                  "mean_passes_per_iteration": statistics.fmean(per_iteration[loss]),
                  "passes_by_part": per_part[loss][per_iteration[loss].index(min(per_iteration[loss]))]}
           for loss in modules}
    out["time_ratio"] = out["adm"]["min_iteration_seconds"] / out["dmd2"]["min_iteration_seconds"]
    out["median_time_ratio"] = out["adm"]["median_iteration_seconds"] / out["dmd2"]["median_iteration_seconds"]
    return out


# ----------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    command = "python benchmarks/speed.py" + (" --quick" if report["quick"] else "")
    if report.get("baseline"):
        command += f" --label '{report['label']}' --baseline BASELINE/speed.json"
    lines = ["# Speed benchmark", "",
             f"`{command}` on {report['machine']['cpu_count']} "
             f"CPU cores ({report['machine']['torch_threads']} torch threads), {report['device']}, "
             f"{report['machine']['date_utc']} UTC.", "", "## (a) Sampling, student vs teacher", ""]
    rows_a, rows_b = [], []
    for name, r in report["teachers"].items():
        if "error" in r:
            rows_a.append([name, r["error"], "", "", "", ""])
            rows_b.append([name, r["error"], "", "", ""])
            continue
        s, t = r["sampling"], r["training"]
        rows_a.append([name, f"{s['student_nfe']}", f"{s['student_seconds_per_sample']:.3e}", f"{s['teacher_nfe']}",
                       f"{s['teacher_seconds_per_sample']:.3e}", f"{s['speedup']:.1f}x"])
        rows_b.append([name, f"{t['lightning_iteration_seconds'] * 1e3:.1f}", f"{t['sum_of_parts_seconds'] * 1e3:.1f}",
                       f"{t['overhead_ratio']:.3f}",
                       "; ".join(f"{k} {v * 1e3:.1f}" for k, v in t["parts_seconds"].items())])
    lines += [markdown_table(["teacher", "student NFE", "student s / sample", "teacher NFE", "teacher s / sample",
                              "student speed-up"], rows_a), "",
              "## (b) Training: one ADM iteration, Lightning vs the sum of its parts timed alone", "",
              markdown_table(["teacher", "Lightning iteration (ms)", "sum of parts (ms)", "overhead ratio",
                              "parts of the fastest bare iteration (ms)"], rows_b), "",
              "Parts: prompt encoding, the student's sample, then per player (generator, fake score, "
              "discriminator) its forward (loss), backward and optimizer step, each timed alone in a plain "
              "PyTorch loop. The Lightning iteration is the period between batch starts in `Trainer.fit` "
              "(logging, optimizer toggling and the loop included). Both are the fastest of the timed "
              "iterations (medians in speed.json); the bare loop runs before and after Lightning.", ""]
    runs = [(report.get("label", "this run"), report)]
    if report.get("baseline"):
        runs.insert(0, (report["baseline"].get("label", "baseline"), report["baseline"]))
    rows_c = []
    for name in report["teachers"]:
        for label, r in runs:
            c = r["teachers"].get(name, {}).get("adm_vs_dmd2")
            if c is None:
                continue
            adm, dmd2 = c["adm"], c["dmd2"]
            rows_c.append([name, label, f"{adm['mean_passes_per_iteration']:.2f}",
                           ", ".join(f"{k} {v}" for k, v in adm["passes_by_part"].items()),
                           f"{dmd2['mean_passes_per_iteration']:.2f}", f"{adm['min_iteration_seconds'] * 1e3:.1f}",
                           f"{dmd2['min_iteration_seconds'] * 1e3:.1f}", f"{c['time_ratio']:.3f}",
                           f"{c['median_time_ratio']:.3f}"])
    lines += ["## (c) ADM vs DMD2: teacher-network passes and iteration time", "",
              markdown_table(["teacher", "code", "ADM passes / iteration (mean)", "ADM passes by part (fewest)",
                              "DMD2 passes / iteration", "ADM iteration (ms)", "DMD2 iteration (ms)",
                              "ADM / DMD2 time", "ADM / DMD2 time (medians)"], rows_c), "",
              "Passes: forward calls of the teacher's denoiser modules (a forward pre-hook on each), one "
              "per call whatever the batch (a CFG prediction, both branches batched, is one; a "
              "discriminator forward that stops after its last feature block is one). Iteration times: "
              "the fastest sum of parts of the bare loop (as in (b)), ADM and DMD2 iterations alternating, "
              "one-step student, update ratio 1."
              + (f" The rows of each teacher put the baseline run above this one: BASELINE/speed.json is "
                 f"this script run on other code (label '{report['baseline'].get('label')}', "
                 f"{report['baseline']['machine']['date_utc']} UTC), each row measured in its own run: trust the "
                 "pass counts (exact) and the ratios (ADM and DMD2 alternate, so load changes hit both) more "
                 "than the absolute times." if report.get("baseline") else ""), ""]
    return "\n".join(lines)


def run(args) -> dict:
    threads = set_threads(args.threads)
    report = {"quick": args.quick, "machine": machine(threads), "label": args.label,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", "teachers": {}}
    if args.baseline:
        report["baseline"] = json.loads(Path(args.baseline).read_text())
        report["baseline"].pop("baseline", None)
    for name, setup in TEACHERS.items():
        if args.teachers and name not in args.teachers:
            continue
        print(f"== {name}", flush=True)
        try:
            report["teachers"][name] = overhead(setup, args)
        except Exception as e:
            traceback.print_exc()
            report["teachers"][name] = {"error": f"failed: {type(e).__name__}: {e}"}
        print(report["teachers"][name], flush=True)
    out = Path(args.out)
    write_json(out / "speed.json", report)
    (out / "speed.md").write_text(markdown(report))
    print(markdown(report))
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 timed iterations, the smallest SD3")
    p.add_argument("--iterations", type=int, default=10, help="timed training iterations (after warm-up)")
    p.add_argument("--teachers", type=lambda s: s.split(","), help=f"comma list (default all: {','.join(TEACHERS)})")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--out", default=str(RESULTS), help="output folder (default benchmarks/results)")
    p.add_argument("--label", default="this run", help="name of this run's code in the tables (e.g. a commit)")
    p.add_argument("--baseline", help="speed.json of a run of other code, shown beside this one in (c)")
    args = p.parse_args(argv)
    unknown = set(args.teachers or ()) - set(TEACHERS)
    if unknown:
        p.error(f"unknown teachers {sorted(unknown)}; choose from {list(TEACHERS)}")
    return args


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
