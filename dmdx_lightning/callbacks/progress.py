"""The training progress bar in iterations, with each player's latest loss.

    iteration 120/600 |██▏  | [00:41<02:44, 2.92it/s, generator=-0.021, fake_score=0.087, discriminator=1.97]

``dmdx`` adds it to every run whose config names no progress bar (:func:`add_progress_bar`), so
configs need nothing; ``--trainer.enable_progress_bar false`` turns it off as usual.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class IterationProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, but its training bar counts iterations (``trainer.global_step``, the unit
    of ``trainer.max_steps``) over the whole run instead of batches per epoch, and shows each
    player's latest ``train/<player>/loss``. A resumed run's bar starts at the resumed iteration
    (its rate and ETA count only this run's iterations). Validation and predict bars are Lightning's.

    Args: as :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
    """

    TRAIN_FORMAT = "iteration {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.bar_format = self.TRAIN_FORMAT
        return bar

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=_total_iterations(trainer))
        self.train_progress_bar.initial = self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Each player's latest loss (in the method's player order), then anything logged with
        ``prog_bar=True``; no ``v_num``."""
        metrics = trainer.callback_metrics
        # modules without players (the digits teacher's own training) show only their prog_bar values
        players = getattr(pl_module, "players", {})
        losses = {name: float(metrics[f"train/{name}/loss"]) for name in players if f"train/{name}/loss" in metrics}
        return {**losses, **trainer.progress_bar_metrics}


def _total_iterations(trainer: pl.Trainer) -> int | None:
    """``max_steps`` when set, else the epochs' batches when finite; ``None``: an open-ended bar."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
        return int(batches) * trainer.max_epochs
    return None


def add_progress_bar(trainer: Any) -> None:
    """Add :class:`IterationProgressBar` to a parsed ``trainer`` config that enables the progress bar
    and names none (Lightning would add its per-epoch bar); drop it from one that disables the bar
    (e.g. a saved ``config.yaml`` run again with ``--trainer.enable_progress_bar false``).

    It goes first in the list, so that in a saved ``config.yaml`` the last callback is still the
    config's own (``--trainer.callbacks.ARG`` sets an argument of the last one).
    """
    name = f"{IterationProgressBar.__module__}.{IterationProgressBar.__name__}"
    callbacks = list(trainer.callbacks or [])
    if trainer.enable_progress_bar is False:
        trainer.callbacks = [c for c in callbacks if _class_path(c) != name]
        return
    if not any(_is_class(c, ProgressBar) for c in callbacks):
        from jsonargparse import Namespace

        callbacks.insert(0, Namespace(class_path=name, init_args=Namespace(refresh_rate=1, process_position=0,
                                                                            leave=False)))
    trainer.callbacks = callbacks


def _class_path(callback: Any) -> str | None:
    return callback.get("class_path") if hasattr(callback, "get") else None


def _is_class(callback: Any, base: type) -> bool:
    """Whether a callback (a config entry, or an object passed from Python) is a ``base``."""
    path = _class_path(callback)
    if path is None:
        return isinstance(callback, base)
    module, _, name = path.rpartition(".")  # fully qualified once parsed
    return issubclass(getattr(importlib.import_module(module), name), base)
