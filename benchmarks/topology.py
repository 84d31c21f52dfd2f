"""Per-module cost without a GPU: the shipped configs' iterations on each teacher family's real
block structure at narrow widths, LoRA vs full.

    python benchmarks/topology.py                       # every family x method x mode (~15 min on 2 cores)
    python benchmarks/topology.py --families sdxl --methods dmd2 --rounds 1 --tiny   # smoke

Why this exists: at real size on a GPU, what an iteration costs beyond its matrix work is
per-module Python (role switches, adapter bookkeeping, hooks), and that cost depends on how many
modules the network has and how often they are walked, not on their widths. A model with the
real topology (SDXL: 3 levels, 2 resnets per level, 1/2/10 transformer layers per level; SD3-Medium:
24 joint blocks; CogVideoX-2b: 30 blocks; SAM ViT-B's 12 blocks for ADP's pixel discriminator)
and the real LoRA target modules, at narrow widths, shows that cost on a CPU in minutes.
The LoRA rank is scaled with the widths (rank / width near the configs' 64 / real width), so the
adapters' own arithmetic is in the same proportion as at real size.

Each arm is a shipped config (``configs/<family>/...``) with only the teacher's weights swapped
for a random narrow folder (float32, CPU precision 32) and the LoRA rank scaled; its module is
built as ``dmdx fit`` builds it and trained by Lightning on random latents of the right shape.
Arms alternate in rounds (full, lora, full, lora ...) so that a load on the machine hits both
modes alike; a round times whole TTUR cycles (DMD2: 5 iterations, one with a generator update)
after a warm-up cycle (at least ``--iterations``). Reported: CPU milliseconds per iteration (the
process's CPU time on one torch thread: what the work costs, unlike wall time not inflated by
other processes on a shared machine; wall time is in the JSON), median over rounds, the LoRA/full
ratio, and role switches per iteration (adapter changes of the shared network, counted by the
teacher: a count, not a time).

Writes ``topology.md`` and ``topology.json`` to ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, markdown_table, random_batches, set_threads, write_json  # noqa: E402

#: family -> how to build its narrow-topology folder, its rank, and its shipped configs per method
FAMILIES = {
    "sdxl": {
        "real": "SDXL base UNet: widths 320/640/1280, 2 resnets per level, 1/2/10 transformer layers, "
                "LoRA rank 64 on to_q/k/v/out",
        "narrow": "widths 32/64/128, the same blocks and layers, heads 1/2/4 (head dim 32), LoRA rank 8",
        "build": ("dmdx_lightning.teachers.sdxl_random", "save_random_sdxl",
                  dict(latent_size=16, block_out_channels=(32, 64, 128), layers_per_block=2,
                       transformer_layers_per_block=(1, 2, 10), attention_head_dim=(1, 2, 4), clip_dim=32,
                       vae_block_out_channels=(8, 8, 8, 8))),
        "tiny": dict(latent_size=8, block_out_channels=(8, 16, 32), layers_per_block=2,
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(1, 2, 4), clip_dim=16,
                     vae_block_out_channels=(8, 8, 8, 8)),
        "rank": 8,
        "configs": {"adm": "sdxl/adm_4step.yaml", "dmd2": "sdxl/dmd2_4step.yaml", "adp": "sdxl/adp_1step.yaml"},
    },
    "sd3": {
        "real": "SD3-Medium: 24 joint blocks, width 1536 (24 heads x 64), LoRA rank 64 on 8 attention projections",
        "narrow": "24 joint blocks, width 64 (2 heads x 32), LoRA rank 4",
        "build": ("dmdx_lightning.teachers.sd3_random", "save_random_sd3",
                  dict(num_layers=24, num_heads=2, head_dim=32, latent_size=16, latent_channels=16,
                       clip_dim=16, joint_dim=64)),
        "tiny": dict(num_layers=24, num_heads=2, head_dim=8, latent_size=8, latent_channels=16, clip_dim=16,
                     joint_dim=32),
        "rank": 4,
        "configs": {"adm": "sd3/adm_4step.yaml", "dmd2": "sd3/dmd2_4step.yaml", "adp": "sd3/adp_4step.yaml"},
    },
    "cogvideox": {
        "real": "CogVideoX-2b: 30 blocks, width 1920 (30 heads x 64), LoRA rank 64 on to_q/k/v/out",
        "narrow": "30 blocks, width 64 (2 heads x 32), 9 frames at 32 px, LoRA rank 4",
        "build": ("dmdx_lightning.teachers.cogvideox_random", "save_random_cogvideox",
                  dict(num_layers=30, num_heads=2, head_dim=32, latent_size=8, num_frames=9, text_dim=32,
                       rotary=False)),
        "tiny": dict(num_layers=30, num_heads=2, head_dim=16, latent_size=4, num_frames=5, text_dim=16,
                     rotary=False),
        "rank": 4,
        "configs": {"adm": "cogvideox/adm_2b_8step.yaml", "dmd2": "cogvideox/dmd2_2b_8step.yaml"},
    },
}
METHODS = ("adm", "dmd2", "adp")
MODES = ("full", "lora")
#: SAM ViT-B's block structure (12 blocks, global attention in 2, 5, 8, 11) at width 64
SAM_NARROW = dict(hidden_size=64, output_channels=32, num_hidden_layers=12, num_attention_heads=2, image_size=64,
                  patch_size=16, window_size=2, global_attn_indexes=[2, 5, 8, 11], mlp_dim=128)
SAM_TINY = dict(hidden_size=32, output_channels=16, num_hidden_layers=12, num_attention_heads=2, image_size=32,
                patch_size=8, window_size=2, global_attn_indexes=[2, 5, 8, 11], mlp_dim=64)


def sizes(family: str, tiny: bool) -> dict:
    """The random folder's builder arguments (narrow, or ``--tiny``)."""
    return FAMILIES[family]["tiny"] if tiny else FAMILIES[family]["build"][2]


def build_folders(families: list[str], scratch: Path, tiny: bool) -> dict[str, Path]:
    import importlib

    from transformers import SamVisionConfig, SamVisionModel

    folders = {}
    for family in families:
        module, name, _ = FAMILIES[family]["build"]
        folders[family] = getattr(importlib.import_module(module), name)(scratch / family, **sizes(family, tiny))
    torch.manual_seed(0)
    SamVisionModel(SamVisionConfig(**(SAM_TINY if tiny else SAM_NARROW))).save_pretrained(scratch / "sam")
    folders["sam"] = scratch / "sam"
    return folders


def arm_config(family: str, method: str, mode: str, folders: dict[str, Path], tiny: bool = False) -> dict:
    """The shipped config's model section with the teacher swapped for the narrow random folder."""
    from dmdx_lightning.configs_index import resolve_config

    spec = FAMILIES[family]
    raw = yaml.safe_load(Path(resolve_config(spec["configs"][method])).read_text())
    model = copy.deepcopy(raw["model"])
    args = model["init_args"]
    args.pop("init_from", None)
    teacher = args["teacher"]["init_args"]
    teacher.update(pretrained_model_name_or_path=str(folders[family]), torch_dtype="float32",
                   mode=mode, lora_rank=spec["rank"], lora_alpha=float(spec["rank"]))
    size = sizes(family, tiny)["latent_size"]
    if family == "sdxl":
        teacher["resolution"] = None  # the UNet's sample_size x 8
    elif family == "sd3":
        teacher["resolution"] = 2 * size  # the random VAE downsamples by 2
    else:  # the folder's video size and text length; tiling is for real-size decodes
        teacher.update(num_frames=sizes(family, tiny)["num_frames"], height=4 * size, width=4 * size, vae_tiling=False,
                       max_sequence_length=8)
    teacher.pop("variant", None)
    teacher.pop("trainable_dtype", None)
    if family == "sd3":
        teacher["drop_t5"] = False  # the narrow folder's T5 is small; the configs' choice does not change the denoiser
    pixel = args.get("pixel_discriminator")
    if pixel is not None:
        pixel["init_args"]["backbone"]["init_args"].update(pretrained=str(folders["sam"]), dtype="float32")
    return {"model": model}


def build(config: dict, scratch: Path):
    from dmdx_lightning.export import build_module

    path = scratch / "arm.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    return build_module(path)


class Clock(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []
        self.cpu: list[float] = []
        self.switches: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.switches.append(getattr(module.teacher, "role_switches", 0))


def time_arm(module, batch_size: int, iterations: int) -> dict:
    """Milliseconds per iteration and role switches per iteration over whole TTUR cycles (at least
    ``iterations`` iterations) after one warm-up cycle."""
    cycle = getattr(module, "update_ratio", 1)
    iterations = cycle * (-(-iterations // cycle) + 1)
    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=iterations + 1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    data = random_batches(module, iterations + 1, batch_size)
    pl.seed_everything(0, verbose=False)  # both modes draw the same times and sampling depths
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    trainer.fit(module, loader)
    window = slice(cycle, iterations + 1)
    starts, cpu, switches = clock.starts[window], clock.cpu[window], clock.switches[window]
    n = len(starts) - 1
    return {"ms": 1000 * (cpu[-1] - cpu[0]) / n, "wall_ms": 1000 * (starts[-1] - starts[0]) / n,
            "switches": (switches[-1] - switches[0]) / n, "iterations": n}


def run(args) -> dict:
    threads = set_threads(args.threads)
    from dmdx_lightning import quiet

    quiet.install()
    report = {"machine": machine(threads), "torch": torch.__version__, "batch_size": args.batch_size,
              "rounds": args.rounds, "iterations": args.iterations, "tiny": args.tiny, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        folders = build_folders(args.families, scratch, args.tiny)
        for family in args.families:
            for method in args.methods:
                if method not in FAMILIES[family]["configs"]:
                    continue
                row = {"family": family, "method": method, "config": FAMILIES[family]["configs"][method]}
                modules = {mode: build(arm_config(family, method, mode, folders, args.tiny), scratch) for mode in MODES}
                samples = {mode: [] for mode in MODES}
                for _ in range(args.rounds):
                    for mode in MODES:  # alternating: a load on the machine hits both modes alike
                        samples[mode].append(time_arm(modules[mode], args.batch_size, args.iterations))
                for mode in MODES:
                    row[mode] = {"ms": statistics.median(s["ms"] for s in samples[mode]),
                                 "ms_all": [round(s["ms"], 1) for s in samples[mode]],
                                 "wall_ms": statistics.median(s["wall_ms"] for s in samples[mode]),
                                 "switches": samples[mode][-1]["switches"],
                                 "iterations": samples[mode][-1]["iterations"]}
                row["lora_over_full"] = row["lora"]["ms"] / row["full"]["ms"]
                report["rows"].append(row)
                print(f"{family:10s} {method:5s} full {row['full']['ms']:8.1f} ms  lora {row['lora']['ms']:8.1f} ms  "
                      f"ratio {row['lora_over_full']:.2f}  switches/it {row['lora']['switches']:.1f}", flush=True)
                del modules
    return report


def _machine(m: dict) -> str:
    return (f"{m['cpu_count']} CPU cores ({m['platform']}), Python {m['python']}, torch {m['torch']} on "
            f"{m['torch_threads']} thread(s), {m['date_utc']} UTC")


def markdown(report: dict, command: str) -> str:
    rows = [(r["family"], r["method"], f"`configs/{r['config']}`", f"{r['full']['ms']:.0f}", f"{r['lora']['ms']:.0f}",
             f"**{r['lora_over_full']:.2f}**", f"{r['lora']['switches']:.1f}") for r in report["rows"]]
    topo = "\n".join(f"- **{f}**: real {s['real']}; here {s['narrow']}." for f, s in FAMILIES.items())
    return "\n".join([
        "# LoRA vs full on the real topologies at narrow widths (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_machine(report['machine'])}; batch {report['batch_size']}; float32; "
        f"{report['rounds']} alternating rounds of >= {report['iterations']} iterations (whole TTUR cycles) after a "
        "warm-up cycle; median over rounds.",
        "",
        topo,
        "",
        "Each arm is the shipped config with only the teacher's weights replaced (random, narrow) and the LoRA "
        "rank scaled with the widths. Role switches: adapter changes of the shared network per iteration "
        "(lora mode; full mode has none).",
        "",
        markdown_table(["family", "method", "config", "full CPU ms/it", "lora CPU ms/it", "lora / full",
                        "switches / it"], rows),
        "",
        "CogVideoX ships no ADP config (the paper distils video with ADM alone). DMD2 switches 13 times per "
        "5-iteration TTUR cycle (5 in the generator's iteration, 2 in each fake-score-only one: the student's "
        "sampling, then the fake score). What LoRA mode still costs over full mode is the adapters' own work, "
        "two small matmuls and a sum per adapted projection; full mode computes weight gradients for every "
        "layer of the role that steps. The same benchmark on the code before issue 30's changes: "
        "[topology_before.md](topology_before.md) (SDXL: ADM 1.57, DMD2 1.35).",
        "",
    ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=5,
                        help="iterations timed per round, rounded up to whole TTUR cycles (after a warm-up cycle)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the process's CPU time is the work done, whatever else runs)")
    parser.add_argument("--tiny", action="store_true",
                        help="the same depths at the smallest widths (a smoke run of the same code)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="topology", help="file stem of the results")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = "python benchmarks/topology.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(args)
    report["command"] = command.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", report)
    (args.out / f"{args.name}.md").write_text(markdown(report, command.strip()))
    return report


if __name__ == "__main__":
    main()
