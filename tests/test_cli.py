"""The `dmdx` command as a user first meets it: its help lists only verbs that work, with no noise."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DMDX = str(Path(sys.executable).with_name("dmdx"))


def dmdx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DMDX, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_lists_the_verbs_that_work():
    out = dmdx("--help")
    assert out.returncode == 0, out.stderr
    verbs = [line.split()[0] for line in out.stdout.split("verbs:")[1].splitlines() if line.startswith("  ")]
    assert verbs[:4] == ["fit", "validate", "predict", "export"]  # no `test`: the modules have no test_step
    assert "Export a trained student" in out.stdout


@pytest.mark.parametrize("verb", ["fit", "validate", "predict"])
def test_verb_help_has_no_single_optimizer_options_and_no_warning(verb):
    out = dmdx(verb, "--help")
    assert out.returncode == 0, out.stderr
    assert "--model CLASS" in out.stdout and f"dmdx {verb} --help trainer" in out.stdout
    assert "args parameter is intended" not in out.stderr, out.stderr
    out = dmdx(verb, "--help", "trainer")  # LightningCLI's whole parser
    assert out.returncode == 0, out.stderr
    # each player's optimizer is a model option; a top-level one would replace them all
    assert "--optimizer" not in out.stdout and "--lr_scheduler" not in out.stdout
    assert "--model CONFIG" in out.stdout
    assert "args parameter is intended" not in out.stderr, out.stderr


def test_test_verb_is_refused_and_export_still_dispatches():
    out = dmdx("test", "--help")
    assert out.returncode != 0 and "invalid choice: 'test'" in out.stderr
    out = dmdx("export", "--help")
    assert out.returncode == 0 and "--ckpt_path" in out.stdout and "--format" in out.stdout


def test_missing_model_is_one_short_paragraph_naming_the_key(tmp_path):
    """SD3 weights missing offline: one paragraph (key, value, fix), not tracebacks (issue 13 item 3)."""
    r = dmdx("fit", "--config", "configs/sd3/adm_4step.yaml", "--trainer.default_root_dir", str(tmp_path / "run"))
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert len(out.splitlines()) < 30, out
    assert "Traceback" not in out
    assert "model.init_args.teacher.init_args.pretrained_model_name_or_path" in out and "hf download" in out


def test_config_error_keeps_bugs_in_full():
    from dmdx_lightning.cli import config_error

    assert config_error(ValueError("shapes (2, 3) and (4,) do not match")) is None  # a bug: full traceback
    try:
        try:
            raise FileNotFoundError("weights x.safetensors missing (config key model.init_args.teacher.init_args.weights)")
        except FileNotFoundError as inner:
            raise ValueError("Does not validate against any of the Union subtypes\nErrors:\n  - boom") from inner
    except ValueError as outer:
        assert config_error(outer).startswith("weights x.safetensors missing")
