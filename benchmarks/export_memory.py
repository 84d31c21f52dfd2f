"""Peak host memory of `dmdx export` against the size of what it writes.

    python benchmarks/export_memory.py                          # writes benchmarks/results/export_memory.{md,json}
    python benchmarks/export_memory.py --baseline-rev 2cb50e2   # also the export of that git revision
    python benchmarks/export_memory.py --quick                  # smoke run (tiny teacher, lora)

For each random SD3 folder (``tiny``: the tests' 2-layer teacher; ``small``: 4 joint blocks of
6 x 64 heads, so the weights, not the interpreter, dominate the increment) and each mode
(``lora``, ``full``): two ADM iterations are trained and checkpointed, then
``dmdx export --format pipeline`` runs in a fresh process per measurement. That process reads
its RSS after importing torch, diffusers, transformers and dmdx_lightning (``import_rss``), runs
the export, and reports its peak RSS (``VmHWM``). ``export_bytes`` are the bytes of the exported
pipeline's weight files (``*.safetensors``); ``ratio = (peak - import_rss) / export_bytes``: 1.0
would mean the export held nothing beyond the pipeline it wrote. The peak includes pages of the
memory-mapped checkpoint that were read (the student's tensors).

``--baseline-rev REV`` measures the export of another revision of the package the same way
(``git archive REV dmdx_lightning`` into a temporary folder first), e.g. the revision before the
export loaded only the student.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, machine, markdown_table, write_json  # noqa: E402

SIZES = {
    "tiny": {},  # save_random_sd3's defaults = tests/conftest.py's tiny SD3
    "small": {"num_layers": 4, "num_heads": 6, "head_dim": 64, "joint_dim": 64, "clip_dim": 32},
}
MODES = ("lora", "full")

#: runs in the measured process: imports first (their RSS is the floor), then the export
PROBE = r"""
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import torch, diffusers, transformers, peft, lightning.pytorch, jsonargparse
import dmdx_lightning.cli, dmdx_lightning.export, dmdx_lightning.methods.adm, dmdx_lightning.teachers.sd3
import dmdx_lightning.discriminators.latent
import diffusers.pipelines.stable_diffusion_3
floor = status("VmRSS")
dmdx_lightning.cli.main(["export", *sys.argv[1:]])
import os
package = os.path.dirname(dmdx_lightning.__file__)
print("EXPORT_MEMORY " + json.dumps({"import_rss": floor, "peak_rss": status("VmHWM"), "package": package}))
"""


def run_config(folder: Path, mode: str) -> dict:
    adamw = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4, "betas": [0.0, 0.99]}}
    return {"model": {"class_path": "dmdx_lightning.methods.adm.ADMModule", "init_args": {
        "teacher": {"class_path": "dmdx_lightning.teachers.sd3.SD3Teacher", "init_args": {
            "pretrained_model_name_or_path": str(folder), "mode": mode, "resolution": 16,
            "max_sequence_length": 16, "lora_rank": 4}},
        "discriminator": {"class_path": "dmdx_lightning.discriminators.latent.LatentDiscriminator",
                          "init_args": {"layers": [0, -1], "head_channels": 16}},
        "student_steps": 4, "real_cfg_scale": 3.0,
        "generator_optimizer": adamw, "fake_score_optimizer": adamw, "discriminator_optimizer": adamw}}}


def train_checkpoint(folder: Path, mode: str, run: Path) -> Path:
    """Two ADM iterations, saved as `dmdx fit` would (config.yaml beside checkpoints/)."""
    import lightning.pytorch as pl
    import torch
    import yaml

    from dmdx_lightning.export import build_module

    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(run_config(folder, mode)))
    torch.manual_seed(0)
    module = build_module(run / "config.yaml")
    prompts = ["a photo of a cat", "a red bus"]
    loader = torch.utils.data.DataLoader([{"prompt": p} for p in prompts], batch_size=2,
                                         collate_fn=lambda b: {"prompt": [x["prompt"] for x in b]})
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=run)
    trainer.fit(module, loader)
    ckpt = run / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def measure(ckpt: Path, out: Path, package_root: Path) -> dict:
    """One export in a fresh process; its memory, what it wrote and the command."""
    args = ["--ckpt_path", str(ckpt), "--output", str(out), "--format", "pipeline"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(package_root))
    # cwd outside any checkout: `python -c` puts the cwd first on sys.path, ahead of PYTHONPATH
    result = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True,
                            timeout=1800, cwd=out.parent)
    if result.returncode != 0:
        raise RuntimeError(f"export failed ({package_root}):\n{result.stderr[-3000:]}")
    line = next(l for l in result.stdout.splitlines() if l.startswith("EXPORT_MEMORY "))
    memory = json.loads(line.removeprefix("EXPORT_MEMORY "))
    package = memory.pop("package")  # which code ran (a machine path: checked, not recorded)
    if package != str(package_root / "dmdx_lightning"):
        raise RuntimeError(f"measured the package in {package}, not the one in {package_root}")
    export_bytes = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    return {**memory, "export_bytes": export_bytes, "checkpoint_bytes": ckpt.stat().st_size,
            "increment": memory["peak_rss"] - memory["import_rss"],
            "ratio": (memory["peak_rss"] - memory["import_rss"]) / export_bytes,
            "command": "dmdx export " + " ".join(a if a.startswith("--") else Path(a).name for a in args)}


def baseline_package(rev: str, into: Path) -> Path:
    """``dmdx_lightning`` of git revision ``rev``, unpacked under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "dmdx_lightning"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def report(result: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    rows = []
    for size, modes in result["runs"].items():
        for mode, versions in modes.items():
            for version, m in versions.items():
                rows.append([size, mode, version, mib(m["export_bytes"]), mib(m["checkpoint_bytes"]),
                             mib(m["import_rss"]), mib(m["peak_rss"]), mib(m["increment"]), f"{m['ratio']:.2f}"])
    lines = ["# `dmdx export`: peak host memory against the exported pipeline", "",
             f"Command: `{result['command']}` (CPU; one fresh process per export). Each export: "
             "`dmdx export --ckpt_path <run>/checkpoints/last.ckpt --output <dir> --format pipeline` of a "
             "2-iteration ADM run on a random SD3 folder.", "",
             "`export` = weight files written (MiB); `import` = RSS after importing torch, diffusers, "
             "transformers and dmdx_lightning; `peak` = the process's VmHWM; `ratio` = (peak - import) / export "
             "(1.0: nothing held beyond the pipeline written).", "",
             markdown_table(["teacher", "mode", "code", "export MiB", "checkpoint MiB", "import MiB", "peak MiB",
                             "peak - import MiB", "ratio"], rows), "",
             "Sizes: " + "; ".join(f"`{k}` = save_random_sd3({', '.join(f'{a}={b}' for a, b in v.items()) or 'defaults'})"
                                   for k, v in SIZES.items() if k in result["runs"]) + ".", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--baseline-rev", default=None, help="also measure this git revision's export")
    parser.add_argument("--out", default=str(RESULTS), help="folder of export_memory.{md,json}")
    parser.add_argument("--quick", action="store_true", help="smoke run: the tiny teacher in lora mode")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.modes = "tiny", "lora"
    from dmdx_lightning.teachers.sd3_random import save_random_sd3

    command = "python benchmarks/export_memory.py" + (f" --baseline-rev {args.baseline_rev}" if args.baseline_rev else "")
    if args.sizes != "tiny,small" or args.modes != ",".join(MODES):
        command += f" --sizes {args.sizes} --modes {args.modes}"
    result = {"command": command, "machine": machine(1), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        versions = {"this": ROOT}
        if args.baseline_rev:
            versions[args.baseline_rev] = baseline_package(args.baseline_rev, tmp / "baseline")
        for size in args.sizes.split(","):
            folder = save_random_sd3(tmp / f"sd3_{size}", **SIZES[size])
            for mode in args.modes.split(","):
                ckpt = train_checkpoint(folder, mode, tmp / f"run_{size}_{mode}")
                result["runs"].setdefault(size, {})[mode] = {
                    version: measure(ckpt, tmp / f"export_{size}_{mode}_{i}", root)
                    for i, (version, root) in enumerate(versions.items())}
                print(size, mode, {v: round(m["ratio"], 2) for v, m in result["runs"][size][mode].items()}, flush=True)
    out = Path(args.out)
    write_json(out / "export_memory.json", result)
    (out / "export_memory.md").write_text(report(result))
    return result


if __name__ == "__main__":
    main()
