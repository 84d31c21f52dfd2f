"""The ``dmdx`` command: LightningCLI in subclass mode (``dmdx fit --config configs/adm_sd3.yaml``).

Any LightningModule / LightningDataModule subclass can be named by ``class_path`` in a config,
so a new teacher or method needs a YAML file, not a change here.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from dmdx_lightning.callbacks.preemption import RequeueOnSignal

DESCRIPTION = "DMDX diffusion distillation: dmdx fit|validate|predict --config <yaml>, dmdx export ..."
EXPORT_HELP = "Export a trained student to diffusers: LoRA weights or a pipeline folder (dmdx export --help)."


class DMDXCLI(LightningCLI):
    """LightningCLI with model and data in subclass mode and configs that may omit ``data``.

    Verbs: ``fit``, ``validate``, ``predict`` (Lightning's) and ``export`` (``main`` dispatches it to
    :mod:`dmdx_lightning.export`; it is listed here only so that ``dmdx --help`` shows it).

    A run's outputs follow ``trainer.default_root_dir`` (see :func:`place_run_outputs`), so that
    ``--trainer.default_root_dir DIR`` alone moves a whole run.
    """

    def before_instantiate_classes(self) -> None:
        place_run_outputs(self.config[self.subcommand] if self.subcommand else self.config)

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("datamodule_class", None)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False, "description": DESCRIPTION})
        # the modules build one optimizer per player from their own *_optimizer arguments; a
        # top-level --optimizer / --lr_scheduler would replace configure_optimizers with a single one
        kwargs.setdefault("auto_configure_optimizers", False)
        # always on; does nothing outside SLURM (see RequeueOnSignal for why it replaces Lightning's handler)
        kwargs.setdefault("trainer_defaults", {"callbacks": [RequeueOnSignal()]})
        super().__init__(pl.LightningModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no `test`: the distillation modules have no test set (no test_step); `dmdx validate`
        # runs the metric callbacks on a checkpoint
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "test"}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # `dmdx export` never reaches this parser (see main); list it in --help
            # jsonargparse keeps the one subcommands action of a parser here (add_subcommands runs once)
            self.parser._subcommands_action.add_subcommand("export", ArgumentParser(description=EXPORT_HELP),
                                                           help=EXPORT_HELP)


def place_run_outputs(config: Namespace) -> None:
    """Put what a config leaves unplaced under ``trainer.default_root_dir`` (default: the cwd).

    - ``trainer.logger`` left at its default: TensorBoard logs to ``<root>/version_<n>/`` (events,
      the resolved ``config.yaml``, ``samples/``), as the quickstart's explicit loggers do;
      Lightning's own default adds a ``lightning_logs/`` level that ``dmdx export`` would not search.
      Under SLURM the version is the job id (Lightning's choice), so a requeued job keeps its folder.
    - a ``ModelCheckpoint`` without ``dirpath``: ``<root>/checkpoints/``, one fixed folder for
      ``--ckpt_path``, ``init_from`` and ``dmdx export`` (Lightning's default would be inside the
      version folder, which changes with every run).

    A config that pins a logger's ``save_dir`` or a ``dirpath`` keeps it (the quickstart chains its
    stages through such fixed paths). Edits ``config`` in place, so the saved ``config.yaml`` records
    the resolved paths.
    """
    trainer = config.trainer
    root = os.fspath(trainer.default_root_dir or os.getcwd())
    if trainer.logger is None or trainer.logger is True:
        trainer.logger = Namespace(class_path=f"{TensorBoardLogger.__module__}.{TensorBoardLogger.__name__}",
                                   init_args=Namespace(save_dir=root, name="", version=SLURMEnvironment.job_id()))
    for callback in trainer.callbacks or []:
        if not isinstance(callback, Namespace) or "class_path" not in callback:
            continue  # an already built object (passed from Python): nothing to place
        module, _, name = callback.class_path.rpartition(".")  # fully qualified once parsed
        is_checkpoint = issubclass(getattr(importlib.import_module(module), name), ModelCheckpoint)
        if is_checkpoint and callback.init_args.get("dirpath") is None:
            callback.init_args.dirpath = os.path.join(root, "checkpoints")


def main(args: list[str] | None = None) -> None:
    argv = list(args if args is not None else sys.argv[1:])
    if argv[:1] == ["export"]:  # `dmdx export ...`: student -> diffusers (not a Trainer subcommand)
        from dmdx_lightning.export import main as export_main

        export_main(argv[1:])
        return
    # from the command line LightningCLI reads sys.argv itself: passing args too would warn
    # ("args parameter is intended to run from within Python") on every call
    try:
        DMDXCLI(args=args)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = config_error(e)
        if reason is None or os.environ.get("DMDX_DEBUG"):
            raise
        print(f"dmdx: error: {reason}\n(set DMDX_DEBUG=1 for the full traceback)", file=sys.stderr)
        sys.exit(2)


#: words our own errors use when a config value is at fault (they name the key to change)
_CONFIG_KEY_MARKS = ("model.init_args.", "data.init_args.", "trainer.", "config key")


def config_error(error: BaseException) -> str | None:
    """The one paragraph a user needs when a config value is at fault, else ``None``.

    Building a model behind jsonargparse's union types buries our message (which names the config
    key, the value and the fix) under several tracebacks and a dump of the parsed namespace. This
    walks the exception chain and the "Errors:" list jsonargparse formats, and returns the first
    line of ours that names a config key; anything else is a bug to show in full.
    """
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:  # an error of ours, whole (its message may go on with the fix on a second line)
        text = str(e)
        if any(mark in text for mark in _CONFIG_KEY_MARKS) and "Does not validate against" not in text:
            return text.strip()
    for e in chain:  # else the line of jsonargparse's "Errors:" list that names a key
        for line in str(e).splitlines():
            line = line.strip().removeprefix("- ").strip()
            if any(mark in line for mark in _CONFIG_KEY_MARKS) and not line.startswith("Given value"):
                return line
    return None


if __name__ == "__main__":
    main()
