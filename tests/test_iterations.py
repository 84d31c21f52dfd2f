"""One step unit, the iteration, for every method: ``trainer.global_step``, ``max_steps``, checkpoint
cadence and names, logging cadence and x-axis, ``val_check_interval`` and the progress bar all count
iterations (one batch through ``training_step``), whatever the players and the update ratio; old
checkpoints (optimizer-step ``global_step``) resume in iterations."""

from __future__ import annotations

import csv
import warnings
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from dmdx_lightning.callbacks.progress import IterationProgressBar, add_progress_bar
from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.methods.base import STEP_UNIT
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS, DigitsTeacher
from tests.test_resume import full_state, make_adp, pair_data, prompt_data

OPT = partial(torch.optim.AdamW, lr=1e-3, betas=(0.0, 0.99))
ITERATIONS = 7


def make_adm(loss="adm", **kw):
    disc = None if loss == "dmd" else LatentDiscriminator(layers=[1, -1], head_channels=16,
                                                        backbone_role="fake" if loss == "dmd2" else "real")
    return ADMModule(DigitsTeacher(), disc, loss=loss, generator_optimizer=OPT, fake_score_optimizer=OPT,
                     discriminator_optimizer=OPT, **kw)


#: name -> (module factory, data factory, generator updates in ITERATIONS iterations)
METHODS = {
    "adm_ttur5": (partial(make_adm, "adm", update_ratio=5), prompt_data, 2),  # iterations 0 and 5
    "dmd": (partial(make_adm, "dmd"), prompt_data, ITERATIONS),
    "dmd2_ttur5": (partial(make_adm, "dmd2", update_ratio=5), pair_data, 2),
    "adp": (make_adp, pair_data, ITERATIONS),
}


class ValidationSteps(pl.Callback):
    def __init__(self) -> None:
        self.at: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.at.append(trainer.global_step)


def val_loader():
    items = [{"prompt": p, "index": i} for i, p in enumerate(DIGIT_PROMPTS[:2])]
    return torch.utils.data.DataLoader(items, batch_size=2, collate_fn=lambda b: {
        "prompt": [x["prompt"] for x in b], "index": torch.tensor([x["index"] for x in b])})


def logged_rows(logger: CSVLogger) -> dict[int, dict[str, str]]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return {int(row["step"]): {k: v for k, v in row.items() if v} for row in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_every_step_setting_counts_iterations(name, tmp_path):
    make, data, generator_updates = METHODS[name]
    pl.seed_everything(0)
    module = make()
    logger = CSVLogger(tmp_path, name="", version=0)
    validations = ValidationSteps()
    trainer = pl.Trainer(max_steps=ITERATIONS, accelerator="cpu", logger=logger, log_every_n_steps=3,
                         val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=1,
                         num_sanity_val_steps=0,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[validations, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                                                 save_top_k=-1, filename="{step}")])
    datamodule = data(tmp_path)
    datamodule.setup("fit")
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader(), val_dataloaders=val_loader())

    assert trainer.global_step == int(module.iteration) == ITERATIONS
    assert int(module.generator_updates) == generator_updates
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=3.ckpt", "step=6.ckpt"]
    ckpt = torch.load(tmp_path / "ckpt" / "step=6.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["dmdx"]["step_unit"] == STEP_UNIT == "iteration"
    assert int(ckpt["state_dict"]["iteration"]) == 6
    assert validations.at == [3, 6]
    # x = the iteration's index; Lightning writes every 3rd (2, 5), and the first one always
    rows = logged_rows(logger)
    trained = {step: row for step, row in rows.items() if "train/iteration" in row}
    assert sorted(trained) == [0, 2, 5]
    for step, row in trained.items():
        assert float(row["train/iteration"]) == step + 1
        done = sum("generator" in module.players_for_step(i) for i in range(step + 1))
        assert float(row["train/generator_updates"]) == done  # its own scalar, whatever the ratio
    assert "train/generator/loss" in trained[0] and "train/generator/loss" in trained[5]


def test_a_run_shorter_than_the_logging_cadence_logs_its_first_iteration(tmp_path):
    pl.seed_everything(0)
    logger = CSVLogger(tmp_path, name="", version=0)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=logger, log_every_n_steps=50,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(make_adm(), prompt_data(tmp_path))
    rows = logged_rows(logger)
    assert list(rows) == [0]
    assert {"train/generator/loss", "train/fake_score/loss", "train/discriminator/loss",
            "train/generator_updates"} <= set(rows[0])


def test_progress_bar_counts_iterations_and_shows_each_players_loss(tmp_path, capsys):
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[IterationProgressBar()])
    trainer.fit(make_adm(), prompt_data(tmp_path))
    shown = capsys.readouterr().out.replace("\r", "\n").splitlines()
    last = [line for line in shown if line.startswith("iteration 3/3")][-1]
    for player in ("generator", "fake_score", "discriminator"):
        assert f"{player}=" in last, last
    assert "it/s" in last and "Epoch" not in "".join(shown)


def test_dmdx_adds_the_progress_bar_unless_the_bar_is_off():
    from jsonargparse import Namespace

    bar = f"{IterationProgressBar.__module__}.IterationProgressBar"
    checkpoint = Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace())
    on = Namespace(enable_progress_bar=None, callbacks=[checkpoint])
    add_progress_bar(on)
    assert [c.class_path for c in on.callbacks] == [bar, checkpoint.class_path]  # the config's last stays last
    add_progress_bar(on)  # a saved config.yaml run again: still one bar
    assert [c.class_path for c in on.callbacks].count(bar) == 1
    off = Namespace(enable_progress_bar=False, callbacks=on.callbacks)
    add_progress_bar(off)
    assert [c.class_path for c in off.callbacks] == [checkpoint.class_path]
    tqdm = "lightning.pytorch.callbacks.TQDMProgressBar"
    own = Namespace(enable_progress_bar=True, callbacks=[Namespace(class_path=tqdm, init_args=Namespace())])
    add_progress_bar(own)  # a config's own bar is kept, and alone
    assert [c.class_path for c in own.callbacks] == [tqdm]


# ------------------------------------------------------------------ checkpoints of the old unit
def fit_adm(tmp_path, iterations, ckpt_path=None, save=False):
    pl.seed_everything(0)
    module = make_adm(update_ratio=2, ema_decay=0.9)
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                 filename="{step}")] if save else []
    trainer = pl.Trainer(max_steps=iterations, accelerator="cpu", logger=False, enable_checkpointing=save,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, prompt_data(tmp_path), ckpt_path=ckpt_path)
    return module, trainer


def as_old_checkpoint(ckpt: dict, module) -> dict:
    """``ckpt`` as dmdx_lightning wrote it before the step unit: ``global_step`` (and Lightning's
    step count) in optimizer steps, no ``step_unit``, no ``generator_updates`` buffer."""
    iterations = int(ckpt["state_dict"]["iteration"])
    steps = sum(len(module.players_for_step(i)) for i in range(iterations))
    del ckpt["dmdx"]["step_unit"], ckpt["state_dict"]["generator_updates"]
    ckpt["global_step"] = steps
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.manual_optimization.optim_step_progress"]
    for tracker in progress.values():
        tracker["ready"] = tracker["completed"] = steps
    return ckpt


@pytest.mark.slow
def test_a_checkpoint_in_optimizer_steps_resumes_in_iterations(tmp_path):
    """Written after 3 iterations (8 optimizer steps at update ratio 2), resumed to 5 iterations:
    bitwise the run that never stopped, with a warning that says what changed."""
    ref, ref_trainer = fit_adm(tmp_path / "ref", 5, save=True)
    old = as_old_checkpoint(torch.load(tmp_path / "ref" / "ckpt" / "step=3.ckpt", weights_only=True), ref)
    assert old["global_step"] == 8
    torch.save(old, tmp_path / "old.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, trainer = fit_adm(tmp_path / "resumed", 5, ckpt_path=str(tmp_path / "old.ckpt"))
    said = [str(w.message) for w in caught if "counted optimizer steps" in str(w.message)]
    assert said and "(8); it is resumed at iteration 3" in said[0]
    assert trainer.global_step == int(module.iteration) == 5
    assert int(module.generator_updates) == int(ref.generator_updates) == 3
    ref_state, state = full_state(ref, ref_trainer), full_state(module, trainer)
    assert not [k for k in state if not torch.equal(state[k], ref_state[k])]


def test_a_checkpoint_of_an_unknown_step_unit_is_refused(tmp_path):
    _, trainer = fit_adm(tmp_path, 1, save=True)
    ckpt = torch.load(tmp_path / "ckpt" / "step=1.ckpt", weights_only=True)
    ckpt["dmdx"]["step_unit"] = "fortnight"
    torch.save(ckpt, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match="counts trainer.global_step in 'fortnight'"):
        fit_adm(tmp_path / "again", 2, ckpt_path=str(tmp_path / "odd.ckpt"))
