"""Callbacks and launch helpers the multi-process and SLURM tests load by ``class_path``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing

ROOT = Path(__file__).resolve().parent.parent


def state_fingerprint(module: pl.LightningModule) -> dict[str, str]:
    """sha256 of each player's trainable state (bitwise: the raw bytes of every tensor; FSDP2's shards
    gathered, so every rank must call this)."""
    from torch.distributed.tensor import DTensor

    groups: dict[str, hashlib._Hash] = {}
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        group = name.split(".")[0] if not name.startswith("teacher.roles.") else ".".join(name.split(".")[:3])
        groups.setdefault(group, hashlib.sha256()).update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return {k: v.hexdigest() for k, v in groups.items()}


class RankReport(pl.Callback):
    """Each rank writes ``<dir>/rank<global_rank>.json`` at fit end: its state fingerprint, the
    global step, the checkpoint it resumed from, the prompts it trained on and SLURM's restart count.

    Args:
        dir: output folder.
        sleep: seconds to sleep after each batch (gives a test time to signal a running job).
    """

    def __init__(self, dir: str, sleep: float = 0.0) -> None:
        self.dir, self.sleep = Path(dir), sleep
        self.indices: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.indices.append(batch["index"].tolist())
        if trainer.is_global_zero:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "progress").write_text(str(trainer.global_step))
        time.sleep(self.sleep)

    def on_fit_end(self, trainer, pl_module):
        self.dir.mkdir(parents=True, exist_ok=True)
        report = {"global_step": trainer.global_step, "world_size": trainer.world_size,
                  "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None,
                  "fingerprint": state_fingerprint(pl_module), "indices": self.indices,
                  "torch_rng": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
                  "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        name = f"rank{trainer.global_rank}"
        if os.environ.get("SLURM_RESTART_COUNT"):
            name += f"_restart{os.environ['SLURM_RESTART_COUNT']}"
        (self.dir / f"{name}.json").write_text(json.dumps(report, indent=1))


class TrainedState(pl.Callback):
    """Each rank writes ``<dir>/rank<global_rank>.pt`` at fit end: every player's loss at every
    iteration on that rank, the global step, and the full trainable state (FSDP2 shards gathered:
    every rank joins each gather), so runs under different strategies can be compared.

    Args:
        dir: output folder.
    """

    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)
        self.losses: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("/loss")})

    def on_fit_end(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        keep = pl_module.checkpoint_keys()
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                 for k, v in pl_module.state_dict().items() if k in keep}
        self.dir.mkdir(parents=True, exist_ok=True)
        torch.save({"losses": self.losses, "global_step": trainer.global_step, "world_size": trainer.world_size,
                    "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None, "state": state},
                   self.dir / f"rank{trainer.global_rank}.pt")


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy on CPU (tests only).

    Lightning refuses ``FSDPStrategy`` on CPU (an exact-type check) and wraps with
    ``device_id=None``, which torch's FSDP rejects without an accelerator; this lifts only those two.
    """

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def dmdx_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in [k for k in env if k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))]:
        del env[key]
    return env


def dmdx_fit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``dmdx fit`` in a fresh process (as a user would), capturing its output.

    The run gets its own process group, killed whole on timeout: Lightning starts ranks > 0 as
    children of rank 0, and a hung rank left behind would hold the machine's cores (and a port).
    """
    cmd = [sys.executable, "-m", "dmdx_lightning.cli", "fit", *args]
    with subprocess.Popen(cmd, cwd=ROOT, env=dmdx_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def with_variants(kw: dict) -> dict:
    """ADMModule keyword arguments with the ADM study's variants (``ADMVariants`` fields) moved into
    its ``variants`` group, so a test can name them as flat keywords."""
    from dataclasses import fields

    from dmdx_lightning.methods.adm_variants import ADMVariants

    names = {f.name for f in fields(ADMVariants)}
    variants = {k: kw.pop(k) for k in list(kw) if k in names}
    return {**kw, "variants": ADMVariants(**variants)} if variants else kw


#: packages a light `dmdx` verb must not import (they cost seconds)
HEAVY_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning", "torch", "diffusers", "transformers", "peft")

_PROBE = """
import json, sys
from dmdx_lightning.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def dmdx_in_fresh_interpreter(*argv: str, cwd: Path = ROOT) -> tuple[int, set[str], str]:
    """(exit code, modules imported, stdout) of ``dmdx ARGV`` run in a fresh interpreter in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, capture_output=True, text=True,
                         timeout=120, env=env)
    report = json.loads(out.stderr.strip().splitlines()[-1])
    return report["code"], set(report["modules"]), out.stdout


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class CallbackProbe(pl.Callback):
    """What the callbacks of a run did on this rank, for tests/test_callbacks_distributed.py: every file
    written through ``torchvision.utils.save_image`` or ``write_json_atomic`` (sample grids, the summary
    and its grid), the ``val/`` scalars after each validation (sanity check included), this rank's
    training diagnostics at each iteration (``TrainingDiagnostics.TRACKED``), whether each progress bar
    is disabled, the global step; written to ``<dir>/rank<global_rank>.json`` at teardown, after every
    callback's ``on_fit_end``.

    Args:
        dir: output folder.
    """

    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)
        self.writes: list[str] = []
        self.validations: list[dict] = []
        self.diagnostics: list[dict] = []

    def setup(self, trainer, pl_module, stage):
        import torchvision

        import dmdx_lightning.evaluation.digits as digits

        def recorded(fn, path_arg: int):
            if getattr(fn, "probed", False):
                return fn

            def write(*args, **kwargs):
                self.writes.append(str(args[path_arg]))
                return fn(*args, **kwargs)
            write.probed = True
            return write

        torchvision.utils.save_image = recorded(torchvision.utils.save_image, 1)  # (tensor, fp)
        digits.write_json_atomic = recorded(digits.write_json_atomic, 0)  # (path, data)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from dmdx_lightning.callbacks.summary import TrainingDiagnostics

        metrics = trainer.callback_metrics
        self.diagnostics.append({name: float(metrics[key]) for name, key in TrainingDiagnostics.TRACKED.items()
                                 if key in metrics})

    def on_validation_end(self, trainer, pl_module):
        self.validations.append({"step": trainer.global_step, "sanity": trainer.sanity_checking,
                                 "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()
                                             if k.startswith("val/")}})

    def teardown(self, trainer, pl_module, stage):
        from lightning.pytorch.callbacks import ProgressBar

        self.dir.mkdir(parents=True, exist_ok=True)
        report = {"global_step": trainer.global_step, "world_size": trainer.world_size, "writes": self.writes,
                  "validations": self.validations, "diagnostics": self.diagnostics,
                  "progress_bars": {type(c).__name__: c.is_disabled for c in trainer.callbacks
                                    if isinstance(c, ProgressBar)}}
        (self.dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=1))
