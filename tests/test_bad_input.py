"""Bad input fails early and clearly, and never costs the last good checkpoint.

One test per row of the README's "Failure modes" table (section "Running at scale").
"""

from __future__ import annotations

import json
import pickle
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

from dmdx_lightning.atomic import partial_name
from dmdx_lightning.checkpoint_io import AtomicCheckpointIO
from dmdx_lightning.training_cli import DMDXCLI
from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.methods.base import NonFiniteLossError
from dmdx_lightning.teachers.digits import DEFAULT_CLASSIFIER, DIGIT_PROMPTS, DigitsTeacher
from tests.conftest import prompt_loader
from tests.helpers import ROOT, dmdx_fit

OPT = partial(torch.optim.AdamW, lr=1e-3, betas=(0.0, 0.99))
TINY = "tests/configs/adm_tiny.yaml"
WEIGHTS_KEY = "model.init_args.teacher.init_args.weights"


def make_adm(**kw) -> ADMModule:
    teacher = DigitsTeacher(mode=kw.pop("mode", "full"))
    return ADMModule(teacher, LatentDiscriminator(layers=[1, -1], head_channels=16), generator_optimizer=OPT,
                     fake_score_optimizer=OPT, discriminator_optimizer=OPT, **kw)


def trainer(tmp_path, steps, **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, **kw)


def data():
    return prompt_loader(list(DIGIT_PROMPTS) * 2)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    """A real checkpoint of one ADM iteration on the digits teacher (full mode)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    t = trainer(tmp, 1)
    t.fit(make_adm(), data())
    t.save_checkpoint(tmp / "digits.ckpt")
    return tmp / "digits.ckpt"


# -------------------------------------------------------------------------------- model paths
@pytest.mark.parametrize("kind", ["missing", "not_safetensors", "wrong_network"])
def test_bad_teacher_weights_name_the_config_key(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = {"missing": tmp_path / "nope.safetensors", "not_safetensors": tmp_path / "garbage.safetensors",
            "wrong_network": DEFAULT_CLASSIFIER}[kind]
    if kind == "not_safetensors":
        path.write_bytes(b"\x00" * 100)
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        DMDXCLI(args=["--config", TINY, f"--{WEIGHTS_KEY}", str(path), "--trainer.default_root_dir", str(tmp_path)],
                run=False)
    message = str(err.value)
    assert WEIGHTS_KEY in message and str(path) in message
    assert "Leave the key out" in message  # the fix
    assert {"missing": "configs/digits/teacher.yaml", "not_safetensors": "truncated or corrupted",
            "wrong_network": "DigitsClassifier"}[kind] in message


# -------------------------------------------------------------------------------- checkpoints of another teacher
def _other_family(src: Path, dst: Path, family: str = "sd3") -> Path:
    ckpt = torch.load(src, weights_only=True)
    ckpt["dmdx"]["teacher_family"] = family
    torch.save(ckpt, dst)
    return dst


def test_resume_from_another_teacher_family_is_refused(digits_ckpt, tmp_path):
    bad = _other_family(digits_ckpt, tmp_path / "sd3.ckpt")
    with pytest.raises(ValueError, match="teacher family 'sd3'.*this run uses 'digits'"):
        trainer(tmp_path, 6).fit(make_adm(), data(), ckpt_path=str(bad))


def test_init_from_another_teacher_family_is_refused(digits_ckpt, tmp_path):
    bad = _other_family(digits_ckpt, tmp_path / "sd3.ckpt")
    with pytest.raises(ValueError, match=f"{bad}.*teacher family 'sd3'"):
        make_adm(init_from=str(bad)).setup("fit")  # init_from resolves at setup


def test_checkpoint_of_another_teacher_mode_is_refused(digits_ckpt, tmp_path):
    # a real checkpoint of the same family in another mode (full vs LoRA adapters)
    with pytest.raises(ValueError, match=r"\(full mode\).*\(lora mode\)"):
        make_adm(mode="lora", init_from=str(digits_ckpt)).setup("fit")
    with pytest.raises(ValueError, match=r"\(full mode\).*\(lora mode\)"):
        trainer(tmp_path, 6).fit(make_adm(mode="lora"), data(), ckpt_path=str(digits_ckpt))


def test_init_from_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from checkpoint .*missing.ckpt does not exist"):
        make_adm(init_from=str(tmp_path / "missing.ckpt")).setup("fit")


# -------------------------------------------------------------------------------- prompt files
@pytest.mark.slow
@pytest.mark.parametrize("content,expected", [(b"# only a comment\n\n", "contains no prompts"),
                                              (b"a handwritten digit one\n\xff\xfe seven\n", "is not UTF-8")],
                         ids=["empty", "not_utf8"])
def test_bad_prompt_file_stops_dmdx_fit(content, expected, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    result = dmdx_fit("--config", TINY, "--data.init_args.train_file", str(path),
                      "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode != 0
    assert f"prompt file {path}" in result.stderr and expected in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))


# -------------------------------------------------------------------------------- non-finite losses
def test_nonfinite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    module = make_adm(max_nonfinite_steps=2)
    nan = {"loss": torch.tensor(float("nan"), requires_grad=True)}
    for player in module.players.values():  # from iteration 2 on every loss is NaN
        player.step = lambda b, c, ctx, step=player.step: dict(nan) if int(module.iteration) >= 2 else step(b, c, ctx)
    good = {}

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            good.setdefault(trainer.global_step, {k: v.clone() for k, v in pl_module.state_dict().items()})

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    t = trainer(tmp_path, 10, callbacks=[ckpt, Snapshot()], enable_checkpointing=True,
                plugins=[AtomicCheckpointIO()])
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite losses or gradients of the generator "
                                                 ".*last saved checkpoint is intact"):
        t.fit(module, data())
    # iterations 0 and 1 stepped; iteration 2's three NaN losses were skipped, not applied (it still
    # counts: its batch was used), and the generator's second in a row, in iteration 3, stopped the run
    assert t.global_step == 3
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and int(last["state_dict"]["nonfinite_streak"]) == 1
    for key, value in last["state_dict"].items():
        assert torch.equal(value, good[3][key]), key
        assert torch.isfinite(value.float()).all(), key
    # the skipped steps changed no weight (only the iteration and streak counters moved on)
    params = dict(module.named_parameters())
    assert all(torch.equal(params[k], good[2][k]) for k in last["state_dict"] if k in params)
    assert not list((tmp_path / "ckpt").glob(".partial-*"))


# -------------------------------------------------------------------------------- crash while saving
class ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("simulated crash while writing the checkpoint")


def test_crash_while_saving_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, target)
    big = {"state_dict": {"w": torch.zeros(1 << 20)}, "step": 2, "boom": ExplodesWhenPickled()}
    with pytest.raises(RuntimeError, match="simulated crash"):
        io.save_checkpoint(big, target)
    # the previous file and its checksum (dmdx_lightning.checksums), still checked when it is loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checksums.json", "last.ckpt"]
    assert "last.ckpt" in json.loads((tmp_path / ".checksums.json").read_text())
    assert io.load_checkpoint(target)["step"] == 1


def test_a_partial_file_left_by_a_killed_writer_is_never_resumed_from(tmp_path):
    # SIGKILL gives no chance to clean up: the half-written file stays, under a name that
    # neither SLURM auto-resume (newest *hpc_ckpt_<n>*) nor ModelCheckpoint's last.ckpt can match
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"complete")
    for target in ("hpc_ckpt_2.ckpt", "last.ckpt"):
        partial_name(tmp_path / target).write_bytes(b"half")
    max_version = getattr(_CheckpointConnector, "_CheckpointConnector__max_ckpt_version_in_folder")
    assert max_version(tmp_path, "hpc_ckpt_") == 1
    t = trainer(tmp_path, 1, callbacks=[ModelCheckpoint(dirpath=tmp_path)], enable_checkpointing=True)
    assert t.checkpoint_callback._find_last_checkpoints(t) == set()


# -------------------------------------------------------------------------------- no pickles
class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (Path.touch, (Path(self.flag),))

    def __init__(self, flag: Path) -> None:
        self.flag = str(flag)


def test_checkpoints_with_pickled_objects_are_never_unpickled(digits_ckpt, tmp_path):
    flag = tmp_path / "code_ran"
    ckpt = torch.load(digits_ckpt, weights_only=True)
    ckpt["payload"] = RunsCodeWhenUnpickled(flag)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    with pytest.raises(pickle.UnpicklingError):  # Lightning 2.6's own resume path (torch default)
        trainer(tmp_path, 6).fit(make_adm(), data(), ckpt_path=str(evil))
    with pytest.raises(pickle.UnpicklingError):
        trainer(tmp_path, 6, plugins=[AtomicCheckpointIO()]).fit(make_adm(), data(), ckpt_path=str(evil))
    with pytest.raises(pickle.UnpicklingError):
        make_adm(init_from=str(evil)).setup("fit")
    with pytest.raises(ValueError, match="never unpickles"):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not flag.exists()
