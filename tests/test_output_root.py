"""One output root: every shipped config writes all of a run under ``trainer.default_root_dir``, and
``--trainer.default_root_dir X`` moves all of it, paths derived from it by interpolation included;
a stage that reads an earlier stage's output finds it beside its own root."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import yaml

from dmdx_lightning.training_cli import DMDXCLI
from tests.test_configs import CONFIGS, OVERLAY_BASES, ROOT

#: init_args keys whose value is a path the run WRITES (a callback's, the logger's, the pairs writer's)
OUTPUT_KEYS = {"dirpath", "save_dir", "path", "output_dir", "grid"}
#: data modules whose ``path`` is an input (pairs to read), not an output
INPUT_DATA = {"dmdx_lightning.data.ode_pairs.ODEPairDataModule"}


def config_args(config: Path) -> list[str]:
    name = str(config.relative_to(ROOT / "configs"))
    base = ["--config", str(ROOT / "configs" / OVERLAY_BASES[name])] if name in OVERLAY_BASES else []
    return [*base, "--config", str(config)]


def printed_config(*args: str) -> dict:
    """What ``dmdx fit ... --print_config`` prints (parsed and resolved, nothing built)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        DMDXCLI(args=[*args, "--print_config"], run=False)
    return yaml.safe_load(out.getvalue())


def output_paths(cfg: dict) -> dict[str, str]:
    """Every output path a parsed config names, by its config key."""
    trainer = cfg["trainer"]
    found = {"trainer.default_root_dir": trainer["default_root_dir"]}
    for key, section in [("trainer.logger", trainer.get("logger")), ("data", cfg.get("data"))] + \
            [(f"trainer.callbacks[{i}]", c) for i, c in enumerate(trainer.get("callbacks") or [])]:
        if not isinstance(section, dict) or section.get("class_path") in INPUT_DATA:
            continue
        for name, value in (section.get("init_args") or {}).items():
            if name in OUTPUT_KEYS and isinstance(value, str):
                found[f"{key}.{name}"] = value
    return found


def under(path: str, root: Path) -> bool:
    return Path(os.path.normpath(path)).is_relative_to(root)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_output_path_of_every_config_follows_default_root_dir(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    root = tmp_path / "X"
    cfg = printed_config(*config_args(config), "--trainer.default_root_dir", str(root))
    paths = output_paths(cfg)
    assert {key: p for key, p in paths.items() if not under(p, root)} == {}
    assert "${" not in json.dumps(cfg)  # every interpolation resolved
    # nothing pinned: the same config at its own root names no path outside that root either
    own = printed_config(*config_args(config))
    own_root = Path(own["trainer"]["default_root_dir"])
    assert own_root.parts[0] == "runs"  # where README says, not tracked by git
    assert {key: p for key, p in output_paths(own).items() if not under(p, own_root)} == {}


STAGE_INPUTS = {  # config -> (key, the path it reads, relative to its root's parent)
    "quickstart/adp.yaml": ("data.init_args.path", "pairs"),
    "quickstart/dmdx.yaml": ("model.init_args.init_from", "adp/checkpoints/last.ckpt"),
    "mixture/dmdx.yaml": ("model.init_args.init_from", "adp/checkpoints/last.ckpt"),
    "sdxl/dmdx_1step.yaml": ("model.init_args.init_from", "adp_sdxl/checkpoints/last.ckpt"),
    "sd3/adp_4step.yaml": ("data.init_args.path", "sd3/pairs"),
    "sdxl/adp_1step.yaml": ("data.init_args.path", "sdxl/pairs"),
    "sdxl/dmd2_1step_full.yaml": ("data.init_args.path", "sdxl/pairs"),
    "sd3/dmd2_4step.yaml": ("data.init_args.path", "sd3/pairs"),
    "sdxl/dmd2_4step.yaml": ("data.init_args.path", "sdxl/pairs"),
    "sd15/adp_1step.yaml": ("data.init_args.path", "sd15/pairs"),
    "sd15/dmdx_1step.yaml": ("model.init_args.init_from", "adp_sd15/checkpoints/last.ckpt"),
    "sd15/dmd2_1step_full.yaml": ("data.init_args.path", "sd15/pairs"),
    "cogvideox/dmd2_2b_8step.yaml": ("data.init_args.path", "cogvideox_2b/pairs"),
    "wan/adp_1_3b_4step.yaml": ("data.init_args.path", "wan_1_3b/pairs"),
    "wan/dmd2_1_3b_4step.yaml": ("data.init_args.path", "wan_1_3b/pairs"),
    "flux/dmd2_dev_4step.yaml": ("data.init_args.path", "flux_dev/pairs"),
    "flux/adp_dev_4step.yaml": ("data.init_args.path", "flux_dev/pairs"),
}


@pytest.mark.parametrize("name", list(STAGE_INPUTS))
def test_a_stage_reads_the_earlier_stage_beside_its_own_root(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    key, relative = STAGE_INPUTS[name]
    cfg = printed_config(*config_args(ROOT / "configs" / name), "--trainer.default_root_dir", str(tmp_path / "stage"))
    value = cfg
    for part in key.split("."):
        value = value[part]
    assert os.path.normpath(value) == str(tmp_path / relative)


def test_callbacks_from_the_command_line(tmp_path, monkeypatch):
    """What the README says works: append with ``+=`` (then ``--trainer.callbacks.ARG`` sets the appended
    one's argument), set an argument of the LAST callback, or replace the list whole."""
    monkeypatch.chdir(ROOT)
    adm = ["--config", "configs/quickstart/adm.yaml"]
    names = lambda cfg: [c["class_path"].rsplit(".", 1)[1] for c in cfg["trainer"]["callbacks"]]  # noqa: E731

    cfg = printed_config(*adm, "--trainer.callbacks+=LearningRateMonitor", "--trainer.callbacks.logging_interval=step")
    assert names(cfg) == ["ModelCheckpoint", "SampleGrid", "DigitsSummary", "LearningRateMonitor"]
    assert cfg["trainer"]["callbacks"][-1]["init_args"]["logging_interval"] == "step"

    cfg = printed_config(*adm, "--trainer.callbacks.samples_per_digit=5")  # the last one: DigitsSummary
    assert cfg["trainer"]["callbacks"][2]["init_args"]["samples_per_digit"] == 5

    cfg = printed_config(*adm, "--trainer.callbacks=[{class_path: ModelCheckpoint,"
                               " init_args: {every_n_train_steps: 7}}]")
    assert names(cfg) == ["ModelCheckpoint"] and cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] == 7


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


@pytest.mark.slow
def test_the_quickstart_chain_runs_under_one_root(tmp_path, monkeypatch):
    """The quickstart's four stages, shortened (64 pairs, 2 iterations each, few summary samples), under
    a root of their own: each stage reads the earlier one beside it, every file lands under the root,
    and the table holds every arm."""
    from dmdx_lightning.quickstart import STAGES, run

    monkeypatch.chdir(ROOT)
    before = _files(ROOT / "runs" / "quickstart")
    short = {"pairs": ["--data.init_args.num_pairs", "64", "--data.init_args.shard_size", "32",
                       "--data.init_args.batch_size", "32"],
             "train": ["--trainer.max_steps", "2", "--data.init_args.batch_size", "8",
                       "--trainer.enable_progress_bar", "false", "--trainer.callbacks.samples_per_digit", "2"]}
    stages = [(title, folder, [*args, *short["pairs" if folder == "pairs" else "train"]])
              for title, folder, args in STAGES]
    root = tmp_path / "quickstart"
    summary = run(stages, root=root)

    assert list(summary) == ["teacher", "adp_1step", "adm_1step", "dmdx_1step"]
    assert summary["adm_1step"]["iterations"] == summary["adm_1step"]["generator_updates"] == 2
    written = _files(root)
    assert {"summary.json", "pairs/index.json", "adp/checkpoints/last.ckpt", "dmdx/summary.json",
            "adm/version_0/config.yaml"} <= written, sorted(written)
    for stage in ("adp", "adm", "dmdx"):
        assert f"{stage}/checkpoints/last.ckpt" in written and f"{stage}/version_0/config.yaml" in written
        saved = yaml.safe_load((root / stage / "version_0" / "config.yaml").read_text())
        assert all(under(p, root / stage) for p in output_paths(saved).values())  # the resolved paths
    dmdx_config = yaml.safe_load((root / "dmdx" / "version_0" / "config.yaml").read_text())
    assert os.path.normpath(dmdx_config["model"]["init_args"]["init_from"]) == str(root / "adp/checkpoints/last.ckpt")
    assert _files(ROOT / "runs" / "quickstart") == before  # nothing written at the configs' own roots
