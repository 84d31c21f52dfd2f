"""The library messages ``dmdx`` does not print: ones a user of these configs cannot act on.

Each entry is the narrowest match that works (message pattern, plus category and emitting module
where Python's filters allow it) and says why the message is wrong or empty for our runs; any
other warning from the same libraries still shows. :func:`install` is called by
:func:`dmdx_lightning.cli.main` before any verb runs, so ``dmdx fit|validate|predict|export|...``
all get it; code that builds a ``Trainer`` from Python keeps the libraries' defaults. Nothing here
imports torch, Lightning or diffusers (the light verbs stay light). README lists the same table.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import NamedTuple


class Silenced(NamedTuple):
    message: str  #: regex matched at the start of the message
    source: str  #: the emitting module (a warning) or logger (a log record)
    why: str  #: why a user of dmdx cannot act on it
    category: type[Warning] | None = None  #: warnings only; ``None`` for a log record


SILENCED_WARNINGS: tuple[Silenced, ...] = (
    Silenced(r"Found \d+ module\(s\) in eval mode at the start of training", r"lightning\.pytorch\.loops\.fit_loop",
             "the frozen teacher parts (real score, encoders, VAE, discriminator backbones) stay in eval mode "
             "on purpose (no dropout, no norm statistics); methods/base.py filters it too, for Python users",
             UserWarning),
    Silenced(r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree",
             "Lightning 2.6 calls a torch API that torch 2.10+ deprecates; fixed by a Lightning release, "
             "nothing in the run", FutureWarning),
    Silenced(r"Total length of `list` across ranks is zero", r"lightning\.pytorch\.utilities\.data",
             "PromptDataModule returns an empty validation list when no validation prompts are configured, "
             "Lightning's way to skip validation; a user who wants validation sets val_file / val_fraction",
             UserWarning),
    Silenced(r"You defined a `validation_step` but have no `val_dataloader`",
             r"lightning\.pytorch\.trainer\.configuration_validator",
             "the methods define validation_step for the metric callbacks; a data module without validation "
             "prompts (ODEPairDataModule) simply trains, which is the normal case", UserWarning),
    Silenced(r"Your `IterableDataset` has `__len__` defined", r"lightning\.pytorch\.utilities\.data",
             "the ODE-pair writer's dataset (dmdx predict) deals shards to ranks itself and runs without "
             "loader workers, so its length is exact", UserWarning),
    Silenced(r"Couldn't infer the batch indices fetched from your dataloader",
             r"lightning\.pytorch\.loops\.prediction_loop",
             "ODEPairWriter reads each pair's index from the batch, not Lightning's batch_indices", UserWarning),
    Silenced(r"Already found a `peft_config` attribute in the model", r"peft\.tuners\.tuners_utils",
             "lora mode puts the student and fake-score adapters on one frozen base on purpose", UserWarning),
    Silenced(r"There are modules in \w+ that should be kept in float32: \[\]\.", "diffusers.models.modeling_utils",
             "diffusers warns on every cast with a dtype, also when (as the empty list says) no module has to "
             "stay in float32"),
    Silenced("\N{ELECTRIC LIGHT BULB} Tip: ", "lightning.pytorch.utilities.rank_zero",
             "Lightning's advertisement for its cloud products (litlogger, litmodels), shown on every run"),
)

#: Lightning logs its rank-zero infos through one of these two loggers (whichever imported last)
_LOGGER_ALIASES = {"lightning.pytorch.utilities.rank_zero": ("lightning.fabric.utilities.rank_zero",)}


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


_installed = False


def install() -> None:
    """Silence :data:`SILENCED_WARNINGS` (once per process; later calls do nothing).

    ``DMDX_DEBUG=1`` (which also keeps tracebacks whole, see :mod:`dmdx_lightning.cli`) shows them all.
    """
    global _installed
    if _installed or os.environ.get("DMDX_DEBUG"):
        return
    _installed = True
    by_logger: dict[str, list[str]] = {}
    for s in SILENCED_WARNINGS:
        if s.category is not None:
            warnings.filterwarnings("ignore", message=s.message, category=s.category, module=s.source)
        else:
            by_logger.setdefault(s.source, []).append(s.message)
    for name, patterns in by_logger.items():
        for logger in (name, *_LOGGER_ALIASES.get(name, ())):
            logging.getLogger(logger).addFilter(_DropMessages(patterns))

