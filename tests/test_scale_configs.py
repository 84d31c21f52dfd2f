"""configs/trainer/*.yaml and configs/slurm/*.sbatch agree with each other and build a Trainer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dmdx_lightning.callbacks.preemption import RequeueOnSignal
from dmdx_lightning.checkpoint_io import AtomicCheckpointIO
from dmdx_lightning.cli import DMDXCLI

ROOT = Path(__file__).resolve().parent.parent


def sbatch_options(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", path.read_text(), re.M))


@pytest.mark.parametrize("trainer_config", ["slurm.yaml", "ddp_cpu.yaml"])
def test_trainer_config_builds_with_quickstart(trainer_config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = DMDXCLI(args=["--config", "configs/quickstart/adm.yaml", "--config", f"configs/trainer/{trainer_config}",
                        # this machine has no GPU and must not start processes here
                        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"], run=False)
    assert any(isinstance(cb, RequeueOnSignal) for cb in cli.trainer.callbacks)
    # the experiment's own callbacks survive the second --config
    assert any(type(cb).__name__ == "SampleGrid" for cb in cli.trainer.callbacks)
    assert type(cli.trainer.strategy).__name__ == "DDPStrategy"
    if trainer_config == "slurm.yaml":
        assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_sbatch_tasks_per_node_match_the_trainer():
    slurm = yaml.safe_load((ROOT / "configs/trainer/slurm.yaml").read_text())["trainer"]
    opts = sbatch_options(ROOT / "configs/slurm/dmdx.sbatch")
    assert int(opts["ntasks-per-node"]) == slurm["devices"] and int(opts["nodes"]) == slurm["num_nodes"]
    digits = ROOT / "configs/slurm/digits_cpu.sbatch"
    opts = sbatch_options(digits)
    srun = digits.read_text()
    devices = int(re.search(r"--trainer\.devices (\d+)", srun).group(1))
    nodes = int(re.search(r"--trainer\.num_nodes (\d+)", srun).group(1))
    assert int(opts["ntasks-per-node"]) == devices and int(opts["nodes"]) == nodes
    for path in (ROOT / "configs/slurm").glob("*.sbatch"):
        opts = sbatch_options(path)
        assert opts.get("signal") == "SIGUSR1@90" and "requeue" in opts, path.name
        assert "srun " in path.read_text(), path.name
