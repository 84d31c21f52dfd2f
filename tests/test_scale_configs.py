"""configs/trainer/*.yaml and configs/slurm/*.sbatch agree with each other and build a Trainer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dmdx_lightning.callbacks.preemption import RequeueOnSignal
from dmdx_lightning.checkpoint_io import AtomicCheckpointIO
from dmdx_lightning.training_cli import DMDXCLI

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


@pytest.fixture(scope="module")
def distillation_module():
    from dmdx_lightning.methods.base import DistillationModule
    from dmdx_lightning.teachers.digits import DigitsTeacher

    return DistillationModule(DigitsTeacher())


def _attach(module, **trainer_kwargs):
    import lightning.pytorch as pl

    # two CPU devices only build the strategy object; no process is started before fit
    module.trainer = pl.Trainer(accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    return module


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "ddp_find_unused_parameters_false", "plain_object"])
def test_ddp_without_unused_parameter_search_is_refused(distillation_module, strategy):
    from lightning.pytorch.strategies import DDPStrategy

    if strategy == "plain_object":
        strategy = DDPStrategy(find_unused_parameters=False)
    module = _attach(distillation_module, strategy=strategy)
    with pytest.raises(ValueError, match=r"trainer\.strategy.*ddp_find_unused_parameters_true"):
        module.setup("fit")
    module.setup("validate")  # no backward outside fit: plain DDP is fine there


@pytest.mark.parametrize("strategy", ["ddp_find_unused_parameters_true", "ddp_spawn_find_unused_parameters_true",
                                      "true_object"])
def test_ddp_finding_unused_parameters_is_accepted(distillation_module, strategy):
    from lightning.pytorch.strategies import DDPStrategy

    if strategy == "true_object":
        strategy = DDPStrategy(find_unused_parameters=True)
    _attach(distillation_module, strategy=strategy).setup("fit")


def _multi_device_training_configs():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        devices = (raw.get("trainer") or {}).get("devices")
        model = (raw.get("model") or {}).get("class_path", "")
        if devices not in (None, 1) and "methods.ode_pairs" not in model and "trainer" not in path.parts:
            yield path


@pytest.mark.parametrize("config", list(_multi_device_training_configs()), ids=lambda p: p.name)
def test_multi_device_configs_pick_a_strategy_that_trains(config, distillation_module):
    """``devices: auto`` on a multi-GPU node must not leave Lightning to pick plain ``ddp``."""
    strategy = yaml.safe_load(config.read_text())["trainer"].get("strategy")
    assert strategy is not None, f"{config.name}: set trainer.strategy (ddp_find_unused_parameters_true)"
    _attach(distillation_module, strategy=strategy).setup("fit")
