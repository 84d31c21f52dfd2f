"""The configs ship in the package: ``--config NAME`` works from any folder, ``dmdx configs`` lists
them all with what each runs, and every header says what it runs, needs and writes and how to run it
(dmdx_lightning/configs_index.py)."""

from __future__ import annotations

import glob
import os
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from dmdx_lightning import configs_index
from dmdx_lightning.cli import main as dmdx
from dmdx_lightning.configs_index import (RENAMED, ShippedConfig, configs_dir, markdown, packaged_path, resolve_config,
                                          resolve_config_args, shipped)

from tests.helpers import HEAVY_PACKAGES, dmdx_in_fresh_interpreter

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = shipped()
#: config keys whose value is a file the run reads
FILE_KEYS = ("train_file", "val_file", "prompt_file")


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    """``dmdx`` is called in-process with its arguments: no pytest arguments in sys.argv (LightningCLI
    would warn that it got both)."""
    monkeypatch.setattr(sys, "argv", ["dmdx"])


def printed(capsys, *argv: str) -> dict:
    """``dmdx ARGV --print_config`` through the real entry point, as parsed YAML."""
    with pytest.raises(SystemExit) as exit:
        dmdx([*argv, "--print_config"])
    out = capsys.readouterr()
    assert exit.value.code in (0, None), out.err
    return yaml.safe_load(out.out)


def files_read(tree, key: str = "") -> dict[str, str]:
    """Every ``*_file`` value of a parsed config, by its key."""
    found = {}
    if isinstance(tree, dict):
        for name, value in tree.items():
            if name in FILE_KEYS and isinstance(value, str):
                found[f"{key}.{name}".lstrip(".")] = value
            else:
                found.update(files_read(value, f"{key}.{name}"))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found.update(files_read(value, f"{key}[{i}]"))
    return found


def configs_of(command: str) -> list[str]:
    """The shipped names a header's command passes to ``--config``."""
    return [configs_index._shipped_form(value) for value in configs_index._CONFIG_ARG.findall(command)]


def verb_of(config: ShippedConfig) -> str:
    """The verb the header's commands run the config with (``fit`` unless they say ``predict`` or ``evaluate``)."""
    for verb in ("predict", "evaluate"):
        if any(c.startswith(f"dmdx {verb}") and config.name in configs_of(c) for c in config.commands):
            return verb
    return "fit"


def base_of(config: ShippedConfig) -> list[str]:
    """The ``--config`` arguments that come before an overlay (none for a standalone config)."""
    if not config.overlay_on:
        return []
    base = config.overlay_on[0]
    return ["--config", base if (configs_dir() / base).is_file() else "quickstart/adm.yaml"]  # slurm: <experiment>


@pytest.mark.parametrize("name", ["sd3/adm_4step.yaml", "quickstart/adm.yaml", "configs/sd3/adm_4step.yaml", "quickstart/adm"])
def test_a_shipped_name_prints_its_config_from_an_empty_folder(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = printed(capsys, "fit", "--config", name)
    files = files_read(cfg)
    assert files and "data.init_args.train_file" in files
    assert {key: path for key, path in files.items() if not Path(path).is_file()} == {}
    assert all(Path(path).is_relative_to(configs_dir()) for path in files.values())
    assert cfg["trainer"]["default_root_dir"].startswith("runs/")  # outputs: under the current folder


@pytest.mark.parametrize("config", SHIPPED, ids=lambda c: c.name)
def test_every_shipped_config_parses_from_an_empty_folder_and_finds_its_files(config, tmp_path, monkeypatch, capsys):
    """Every shipped config by its name alone, from a folder with no configs/: what it reads is found
    (a plain ``configs/prompts/x.txt`` would be read from the current folder: use
    ``${dmdx.configs:prompts/x.txt}``)."""
    monkeypatch.chdir(tmp_path)
    cfg = printed(capsys, verb_of(config), *base_of(config), "--config", config.name)
    missing = {key: path for key, path in files_read(cfg).items() if not Path(path).is_file()}
    assert missing == {}, f"{config.name} reads files that are not there from another folder: {missing}"


def test_no_shipped_config_names_a_checkout_path():
    """A value ``configs/...`` is read from the current folder; the shipped file is ``${dmdx.configs:...}``."""
    found = []
    for config in SHIPPED:
        for number, line in enumerate(config.path.read_text(encoding="utf-8").splitlines(), 1):
            value = line.split(" #")[0]
            if not line.lstrip().startswith("#") and ": configs/" in value:
                found.append(f"{config.name}:{number}: {line.strip()}")
    assert found == [], "use ${dmdx.configs:prompts/...} instead:\n" + "\n".join(found)


def test_an_unknown_name_gets_the_closest_shipped_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        dmdx(["fit", "--config", "quickstrt/adm.yaml"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--config quickstrt/adm.yaml: no such file" in err and "Did you mean quickstart/adm.yaml" in err
    assert "`dmdx configs` lists the shipped configs" in err
    with pytest.raises(SystemExit) as exit:  # also in `dmdx configs NAME`
        dmdx(["configs", "adm.yml"])
    assert exit.value.code == 2 and "quickstart/adm.yaml" in capsys.readouterr().err


def test_a_local_file_wins_over_the_shipped_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    local = yaml.safe_load((configs_dir() / "quickstart" / "adm.yaml").read_text())
    local["trainer"]["default_root_dir"] = "runs/mine"
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "quickstart" / "adm.yaml").write_text(yaml.safe_dump(local))
    assert printed(capsys, "fit", "--config", "quickstart/adm.yaml")["trainer"]["default_root_dir"] == "runs/mine"


def test_resolve_config_args_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped_adm = str(configs_dir() / "quickstart" / "adm.yaml")
    (tmp_path / "own.yaml").write_text("trainer: {}\n")
    assert resolve_config_args(["fit", "-c", "quickstart/adm.yaml", "--config=configs/quickstart/adm.yaml",
                                "--config", "own.yaml", "--trainer.max_steps", "3"]) == \
        ["fit", "-c", shipped_adm, f"--config={shipped_adm}", "--config", "own.yaml", "--trainer.max_steps", "3"]
    assert resolve_config_args(["fit", "--config"]) == ["fit", "--config"]  # the parser says what is missing
    with pytest.raises(ValueError, match="no shipped config"):
        resolve_config("../configs/quickstart/adm.yaml")  # only names inside the shipped folder
    with pytest.raises(ValueError, match="no shipped config"):
        resolve_config(str(tmp_path / "sd3/adm_4step.yaml"))  # an absolute path is a path


def test_packaged_path_is_relative_below_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert packaged_path("prompts/eval.txt") == str(configs_dir() / "prompts" / "eval.txt")
    monkeypatch.chdir(configs_dir().parent)
    assert packaged_path("prompts/eval.txt") == os.path.join(configs_dir().name, "prompts", "eval.txt")


@pytest.mark.parametrize("argv", [("configs",), ("configs", "--help"), ("configs", "quickstart/adm.yaml")],
                         ids=" ".join)
def test_dmdx_configs_imports_no_heavy_library(argv, tmp_path):
    code, modules, stdout = dmdx_in_fresh_interpreter(*argv, cwd=tmp_path)
    assert code in (0, None) and stdout.strip()
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY_PACKAGES)
    assert not heavy, f"`dmdx {' '.join(argv)}` imported {heavy[:8]}"


def test_dmdx_configs_lists_every_shipped_yaml_by_group(tmp_path):
    _, _, listing = dmdx_in_fresh_interpreter("configs", cwd=tmp_path)
    every = sorted(p.relative_to(configs_dir()).as_posix() for p in configs_dir().rglob("*.yaml"))
    assert len(every) == len(SHIPPED) > 30
    lines = listing.splitlines()
    for name in every:
        group, _, file = name.rpartition("/")
        heading = next(i for i, line in enumerate(lines) if line.startswith(f"{group}/" if group else "(top level)"))
        entries = lines[heading + 1:]
        entries = entries[:next((i for i, line in enumerate(entries) if not line.startswith("  ")), len(entries))]
        entry = next((line for line in entries if line.split()[0] == file), None)
        assert entry is not None, f"{name} is not listed under {group or 'the top level'}"
        config = ShippedConfig(name, configs_dir() / name)
        assert config.purpose in entry
        assert ("[overlay on " in entry) == (bool(config.overlay_on) and group != "trainer"), entry
    assert f"Folder: {configs_dir()}" in listing


def test_every_header_says_what_it_runs_needs_writes_and_how_to_run_it():
    problems = []
    for config in SHIPPED:
        if not config.purpose:
            problems.append(f"{config.name}: no first line saying what it runs")
        if config.missing_labels():
            problems.append(f"{config.name}: the header has no {', '.join(config.missing_labels())} part")
        if not any(config.name in configs_of(c) for c in config.commands):
            problems.append(f"{config.name}: no command under Run: names the config itself")
    assert problems == [], "\n".join(problems)


def test_overlays_are_found_from_the_headers_commands():
    from tests.test_configs import OVERLAY_BASES

    found = {c.name: c.overlay_on for c in SHIPPED if c.overlay_on and c.group != "trainer"}
    assert found == {name: (base,) for name, base in OVERLAY_BASES.items()}
    assert all(c.overlay_on for c in SHIPPED if c.group == "trainer")


def test_the_docs_page_is_the_generated_list():
    page = ROOT / "docs" / "configs.md"
    assert page.read_text(encoding="utf-8") == markdown(), \
        "docs/configs.md is out of date: run `dmdx configs --markdown > docs/configs.md`"


def test_package_data_holds_every_shipped_file():
    """pyproject.toml's package data covers every file of the configs folder (YAML, prompts, SLURM
    scripts), and in a checkout dmdx_lightning/configs is the link to configs/ that the wheel copies."""
    package = ROOT / "dmdx_lightning"
    if not (package / "configs").is_symlink():
        pytest.skip("not a checkout (an installed copy)")
    assert (package / "configs").resolve() == (ROOT / "configs").resolve()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dmdx_lightning"]
    covered = {Path(p).as_posix() for pattern in patterns
               for p in glob.glob(pattern, root_dir=package, recursive=True) if (package / p).is_file()}
    every = {f"configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*")
             if p.is_file()}
    assert every - covered == set()


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_names_from_before_the_grouping_still_resolve(old, new, tmp_path, monkeypatch):
    """`dmdx fit --config configs/adm_sd3.yaml` keeps working after the large-teacher configs moved
    into sd3/, sdxl/ and cogvideox/ (from the checkout and from any folder)."""
    target = str((configs_dir() / new).resolve())
    assert str(Path(resolve_config(f"configs/{old}")).resolve()) == target
    monkeypatch.chdir(tmp_path)
    assert str(Path(resolve_config(old)).resolve()) == target
    assert not (configs_dir() / old).exists()
