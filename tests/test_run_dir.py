"""``--trainer.default_root_dir`` moves a whole run: checkpoints, logs, samples and config.yaml."""

import os
from pathlib import Path

import pytest
import torch
import yaml

from dmdx_lightning.configs_index import RENAMED
from dmdx_lightning.training_cli import DMDXCLI
from dmdx_lightning.export import find_run_config
from tests.test_configs import SD3_TINY, TINY_HEADS

ROOT = Path(__file__).resolve().parent.parent
SD3_TRAINING = ["sd3/adm_4step.yaml", "sd3/adm_sd35_large_4step.yaml", "sd3/adp_4step.yaml",
                "sd3/dmd_4step.yaml", "sd3/dmd2_4step.yaml", "sd3/adm_best_4step.yaml"]
SDXL_TRAINING = ["sdxl/adp_1step.yaml", "sdxl/dmdx_1step.yaml", "sdxl/adm_4step.yaml", "sdxl/dmd2_1step_full.yaml",
                 "sdxl/dmd_1step.yaml", "sdxl/dmd_4step.yaml", "sdxl/dmd2_4step.yaml", "sdxl/adm_best_4step.yaml"]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", SD3_TRAINING + SDXL_TRAINING)
def test_sd3_configs_pin_no_output_path_but_their_root(name):
    """A pinned logger save_dir or checkpoint dirpath would stay put when default_root_dir moves."""
    trainer = yaml.safe_load((ROOT / "configs" / name).read_text())["trainer"]
    # where README says: the run folder keeps the config's name from before the grouping by teacher
    old = {new: old for old, new in RENAMED.items()}.get(name, name)
    assert trainer["default_root_dir"] == f"runs/{old.removesuffix('.yaml')}"
    assert "logger" not in trainer
    for callback in trainer.get("callbacks", []):
        assert "dirpath" not in (callback.get("init_args") or {}), callback


@pytest.mark.slow
def test_default_root_dir_moves_every_output_of_adm_sd3(tiny_sd3_dir, tmp_path, monkeypatch):
    """The shipped sd3/adm_4step.yaml on the tiny SD3 teacher, one iteration, run from another folder:
    every file it writes lies under the given default_root_dir."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    # the config's relative prompt paths resolve from here; anything else written relative to the
    # cwd (a pinned runs/... path) would land in this folder and fail the test
    (cwd / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(cwd)
    repo_runs = ROOT / "runs" / "adm_sd3"
    before = _files(repo_runs) if repo_runs.exists() else None
    run = tmp_path / "run"
    tiny = [a.replace("{tiny_sd3}", str(tiny_sd3_dir)) for a in SD3_TINY]
    args = ["fit", "--config", "configs/sd3/adm_4step.yaml", *tiny, *TINY_HEADS,
            "--trainer.default_root_dir", str(run),
            # CPU, one process, fp32; 1 iteration; no validation, whose metric
            # callbacks would fetch CLIP / LPIPS networks
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true", "--trainer.max_steps", "1", "--trainer.num_sanity_val_steps", "0",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    cli = DMDXCLI(args=args)

    written = _files(run)
    assert "checkpoints/last.ckpt" in written, sorted(written)
    for expected in ("version_0/config.yaml", "version_0/hparams.yaml",
                     "version_0/samples/student_step0000001.png", "version_0/samples/teacher_step0000001.png"):
        assert expected in written, sorted(written)
    assert any(f.startswith("version_0/events.out.tfevents") for f in written), sorted(written)
    assert cli.trainer.log_dir == str(run / "version_0")
    # the saved config records where this run's outputs went
    saved = yaml.safe_load((run / "version_0" / "config.yaml").read_text())["trainer"]
    assert saved["logger"]["init_args"]["save_dir"] == str(run)
    assert str(run / "checkpoints") in [c["init_args"].get("dirpath") for c in saved["callbacks"]]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 1
    assert find_run_config(run / "checkpoints" / "last.ckpt") == run / "version_0" / "config.yaml"  # dmdx export

    assert _files(cwd) == set() and os.listdir(cwd) == ["configs"]  # nothing relative to the cwd
    after = _files(repo_runs) if repo_runs.exists() else None
    assert after == before  # and nothing in the repository's runs/adm_sd3
