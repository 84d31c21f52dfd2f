"""torch.compile per block on CPU: ADM iterations with the teacher's blocks eager vs compiled
(:func:`dmdx_lightning.compile.compile_blocks`), side by side in one run.

    python benchmarks/compile.py                      # digits + narrow SD3, inductor (~6 min on 2 cores)
    python benchmarks/compile.py --tiny --backend aot_eager --rounds 1 --warmup 2 --iterations 1   # smoke

Arms: the quickstart's ADM on the built-in digits teacher (``configs/quickstart/adm.yaml``: full
mode, 4 residual blocks per network, batch 32) and the shipped SD3 ADM config
(``configs/sd3/adm_4step.yaml``: lora mode, gradient checkpointing, CFG 7) on SD3-Medium's block
structure at narrow width (benchmarks/topology.py's random folder: 24 joint blocks, width 64, LoRA
rank 4; ``--tiny``: its smallest widths). Each arm builds the module twice from the same seed and
compiles the blocks of one; the two alternate in rounds (eager, compiled, eager, ...) so a load on
the shared machine hits both alike. A round is one Lightning fit of ``--warmup`` iterations then
``--iterations`` timed ones; reported: CPU milliseconds per timed iteration (the process's CPU time
on one torch thread, as topology.py; wall time beside it), median over rounds; the compile time,
the first round's warm-up wall time compiled minus eager (inductor's on-disk cache is a fresh
folder, so it is a cold compile); the graphs dynamo compiled, and the frames it gave up on and ran
eagerly (0: no block state hit the recompile limit); and the compiles that fell in a timed window
(0: the warm-up saw every block state).

Writes ``compile.md`` and ``compile.json`` to ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, markdown_table, random_batches, set_threads, write_json  # noqa: E402

ARMS = {
    "digits": {"config": "quickstart/adm.yaml", "batch_size": 32, "tiny_batch_size": 4,
               "network": "the digits teacher: 4 residual blocks per network, 3 networks (full mode)"},
    "sd3": {"config": "sd3/adm_4step.yaml", "batch_size": 2, "tiny_batch_size": 1,
            "network": "SD3-Medium's 24 joint blocks at width 64 (topology.py's narrow folder), lora mode with "
                       "gradient checkpointing"},
}


def build_arm(arm: str, scratch: Path, tiny: bool):
    """The arm's module as ``dmdx fit`` builds it (seed 0)."""
    from dmdx_lightning.configs_index import resolve_config
    from dmdx_lightning.export import build_module

    if arm == "digits":
        torch.manual_seed(0)
        return build_module(resolve_config(ARMS[arm]["config"]))
    import topology

    folders = {"sd3": scratch / "sd3"}
    if not folders["sd3"].exists():
        folders = topology.build_folders(["sd3"], scratch, tiny)
    return topology.build(topology.arm_config("sd3", "adm", "lora", folders, tiny), scratch)


def batches(module, arm: str, n: int, batch_size: int) -> list[dict]:
    if arm == "sd3":
        return random_batches(module, n, batch_size)
    from dmdx_lightning.teachers.digits import DIGIT_PROMPTS

    return [{"prompt": [DIGIT_PROMPTS[(i * batch_size + j) % 10] for j in range(batch_size)],
             "index": torch.arange(i * batch_size, (i + 1) * batch_size)} for i in range(n)]


class Clock(pl.Callback):
    """Wall and CPU time and dynamo's compiled-frame count at the start of each iteration and at the end."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.frames: list[int] = []

    def _tick(self) -> None:
        from torch._dynamo.utils import counters

        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.frames.append(counters["frames"]["total"])

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._tick()

    def on_train_end(self, trainer, module) -> None:
        self._tick()


def time_round(module, data: list[dict], warmup: int) -> dict:
    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=len(data), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    pl.seed_everything(0, verbose=False)  # both variants draw the same times and sampling depths
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None, shuffle=False))
    n = len(data) - warmup
    return {"ms": 1000 * (clock.cpu[-1] - clock.cpu[warmup]) / n,
            "wall_ms": 1000 * (clock.wall[-1] - clock.wall[warmup]) / n,
            "warmup_s": clock.wall[warmup] - clock.wall[0],
            "compiles_timed": clock.frames[-1] - clock.frames[warmup]}


def run(args) -> dict:
    threads = set_threads(args.threads)
    from torch._dynamo.utils import counters

    from dmdx_lightning import quiet
    from dmdx_lightning.compile import compile_blocks

    quiet.install()
    report = {"machine": machine(threads), "load_average": os.getloadavg(), "backend": args.backend,
              "rounds": args.rounds, "warmup": args.warmup, "iterations": args.iterations, "tiny": args.tiny,
              "rows": []}
    # inductor's on-disk cache in a fresh folder: a cold compile, as on a new machine
    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}):
        scratch = Path(tmp)
        for arm in args.arms:
            batch_size = ARMS[arm]["tiny_batch_size" if args.tiny else "batch_size"]
            modules = {"eager": build_arm(arm, scratch, args.tiny), "compiled": build_arm(arm, scratch, args.tiny)}
            counters.clear()
            blocks = compile_blocks(modules["compiled"].teacher, backend=args.backend)
            data = batches(modules["eager"], arm, args.warmup + args.iterations, batch_size)
            samples = {variant: [] for variant in modules}
            for _ in range(args.rounds):
                for variant, module in modules.items():  # alternating: a load on the machine hits both alike
                    samples[variant].append(time_round(module, data, args.warmup))
            row = {"arm": arm, "config": ARMS[arm]["config"], "network": ARMS[arm]["network"],
                   "batch_size": batch_size, "blocks": blocks, "graphs": counters["stats"]["unique_graphs"],
                   "not_compiled": counters["frames"]["total"] - counters["frames"]["ok"],
                   "compile_s": samples["compiled"][0]["warmup_s"] - samples["eager"][0]["warmup_s"]}
            for variant, rounds in samples.items():
                row[variant] = {"ms": statistics.median(s["ms"] for s in rounds),
                                "ms_all": [round(s["ms"], 1) for s in rounds],
                                "wall_ms": statistics.median(s["wall_ms"] for s in rounds),
                                "warmup_s": [round(s["warmup_s"], 2) for s in rounds],
                                "compiles_timed": sum(s["compiles_timed"] for s in rounds)}
            row["compiled_over_eager"] = row["compiled"]["ms"] / row["eager"]["ms"]
            report["rows"].append(row)
            print(f"{arm:7s} eager {row['eager']['ms']:8.1f} ms  compiled {row['compiled']['ms']:8.1f} ms  "
                  f"ratio {row['compiled_over_eager']:.2f}  compile {row['compile_s']:.1f} s  "
                  f"graphs {row['graphs']}  not compiled {row['not_compiled']}  "
                  f"compiles timed {row['compiled']['compiles_timed']}", flush=True)
            del modules
    return report


def markdown(report: dict, command: str) -> str:
    m = report["machine"]
    rows = [(r["arm"], f"`configs/{r['config']}`", r["batch_size"], r["blocks"], f"{r['eager']['ms']:.0f}",
             f"{r['compiled']['ms']:.0f}", f"**{r['compiled_over_eager']:.2f}**",
             f"{r['eager']['wall_ms']:.0f} / {r['compiled']['wall_ms']:.0f}", f"{r['compile_s']:.0f}", r["graphs"],
             r["not_compiled"], r["compiled"]["compiles_timed"]) for r in report["rows"]]
    arms = "\n".join(f"- **{r['arm']}**: {r['network']}." for r in report["rows"])
    return "\n".join([
        "# torch.compile per block vs eager: ADM iterations (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m['cpu_count']} CPU cores ({m['platform']}), Python {m['python']}, torch {m['torch']} on "
        f"{m['torch_threads']} thread(s), {m['date_utc']} UTC; float32; backend `{report['backend']}`; "
        f"{report['rounds']} alternating rounds of {report['iterations']} timed iterations after "
        f"{report['warmup']} warm-up ones; median over rounds. Load average at the start (other processes on "
        f"the shared machine): {report['load_average'][0]:.1f}.",
        "",
        "**These are CPU numbers: they do not predict the ratio on a GPU.** Here inductor generates C++ "
        "for narrow networks on one core; on a GPU it generates Triton kernels for real widths, where what "
        "compiling saves (kernel launches, memory traffic of unfused elementwise ops, with CUDA graphs in "
        "`mode: reduce-overhead`) and what compiling costs (Triton code generation, autotuning) are "
        "different quantities. Measure on the GPU before turning it on.",
        "",
        arms,
        "",
        markdown_table(["arm", "config", "batch", "blocks compiled", "eager CPU ms/it", "compiled CPU ms/it",
                        "compiled / eager", "wall ms/it eager / compiled", "compile s", "graphs", "not compiled",
                        "compiles while timed"], rows),
        "",
        "The CPU times are the measure: wall times count the waits for the cores that other processes on "
        "the shared machine held, which differ from round to round. "
        "`compile s`: the first round's warm-up wall time compiled minus eager (a cold inductor cache; wall "
        "time, so other processes on the machine lengthen it, unlike the CPU times). "
        "`graphs`: the graphs dynamo compiled for the blocks. Blocks of one class share a code object, so "
        "the count is the block states an iteration runs in (role, grad mode, which inputs and parameters "
        "require grad, batch size), not blocks x states; past dynamo's default limit of 8 a state would run "
        "eagerly, which is why `compile_blocks` raises the limit. `not compiled`: frames dynamo gave up on "
        "and ran eagerly (the limit, or an error). `compiles while timed`: 0 means the "
        "warm-up saw every state and the timed iterations ran compiled code only.",
        "",
    ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=4,
                        help="iterations before the timed ones (the compiled arm's first round compiles in them)")
    parser.add_argument("--iterations", type=int, default=4, help="timed iterations per round")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the process's CPU time is the work done, whatever else runs)")
    parser.add_argument("--tiny", action="store_true", help="SD3 at its smallest widths, small batches (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="compile", help="file stem of the results")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = ("python benchmarks/compile.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    report = run(args)
    report["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", report)
    (args.out / f"{args.name}.md").write_text(markdown(report, command))
    return report


if __name__ == "__main__":
    main()
