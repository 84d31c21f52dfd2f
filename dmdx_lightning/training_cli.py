"""The Trainer verbs of ``dmdx`` (``fit``, ``validate``, ``predict``): LightningCLI in subclass mode.

Any LightningModule / LightningDataModule subclass can be named by ``class_path`` in a config,
so a new teacher or method needs a YAML file, not a change here. :mod:`dmdx_lightning.cli` imports
this module only when a Trainer verb runs (importing Lightning costs seconds).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from dmdx_lightning.callbacks.collectives import CollectiveFailureReport
from dmdx_lightning.callbacks.preemption import RequeueOnSignal
from dmdx_lightning.callbacks.progress import add_progress_bar
from dmdx_lightning.callbacks.setup_checks import SetupChecks
from dmdx_lightning.cli import DESCRIPTION, LIGHT_VERBS
from dmdx_lightning.configs_index import packaged_path
from dmdx_lightning.options import known_classes
from dmdx_lightning.preflight import check_config

# a config or command line may name any class of the package by its short name (ADMModule,
# DigitsTeacher): jsonargparse resolves short names among the subclasses already imported
known_classes()


class DMDXCLI(LightningCLI):
    """LightningCLI with model and data in subclass mode and configs that may omit ``data``.

    Verbs: ``fit``, ``validate``, ``predict`` (Lightning's); the verbs that need no Trainer
    (:data:`~dmdx_lightning.cli.LIGHT_VERBS`, e.g. ``export``) are dispatched by
    :func:`dmdx_lightning.cli.main` before this parser exists and are listed here only for ``--help``.

    A run's outputs follow ``trainer.default_root_dir`` (see :func:`place_run_outputs`), so that
    ``--trainer.default_root_dir DIR`` alone moves a whole run.
    """

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # every value and combination is checked as soon as the config is parsed: before the seed
        # is set, any class is built (the teacher's weights load then) or any file is written
        verb = self.config.get("subcommand")
        check_config((self.config[verb] if verb else self.config).as_dict(), verb)

    def before_instantiate_classes(self) -> None:
        place_run_outputs(self.config[self.subcommand] if self.subcommand else self.config)

    def instantiate_classes(self) -> None:
        """Build the classes; under FSDP2 a full-mode teacher makes its trainable copies on the meta
        device (:func:`~dmdx_lightning.teachers.base.meta_role_copies`): each rank loads the weights
        once and gives storage to its own shards only, never to three whole networks."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        strategy = config.get("trainer", {}).get("strategy")
        class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
        if class_path is None or not _is_fsdp2(class_path):
            return super().instantiate_classes()
        from dmdx_lightning.teachers.base import meta_role_copies

        with meta_role_copies():
            super().instantiate_classes()

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("datamodule_class", None)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # omegaconf+: a config may derive a path from another value (``${trainer.default_root_dir}/summary.json``),
        # resolved over the whole merged config, so a later --config or the command line moves it too
        kwargs.setdefault("parser_kwargs", {"default_env": False, "description": DESCRIPTION,
                                            "parser_mode": "omegaconf+",
                                            # a parse error is raised, and cli.main explains it in one paragraph
                                            "exit_on_error": False})
        # ... with the interpolation paths of a config file taken from where it is loaded (under the
        # subcommand: `${trainer.x}` in `dmdx fit --config` means fit.trainer.x)
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        # ``${dmdx.parent:${trainer.default_root_dir}}/adp``: an earlier stage's folder beside this run's
        # root, as a plain path (``root/../adp`` would not resolve before the root exists)
        OmegaConf.register_resolver("dmdx.parent", parent_folder, replace=True)
        # ``${dmdx.configs:prompts/eval.txt}``: a file shipped with the configs (the prompt files they
        # read), found from any folder (dmdx_lightning.configs_index explains the shipping)
        OmegaConf.register_resolver("dmdx.configs", packaged_path, replace=True)
        # the modules build one optimizer per player from their own *_optimizer arguments; a
        # top-level --optimizer / --lr_scheduler would replace configure_optimizers with a single one
        kwargs.setdefault("auto_configure_optimizers", False)
        # always on; does nothing outside SLURM (see RequeueOnSignal for why it replaces Lightning's handler)
        # and on a failed collective, say which rank died and how to resume (CollectiveFailureReport)
        # and what can fail late is checked at setup, before the first step (SetupChecks)
        kwargs.setdefault("trainer_defaults", {"callbacks": [RequeueOnSignal(), CollectiveFailureReport(),
                                                             SetupChecks()]})
        super().__init__(pl.LightningModule, *args, **kwargs)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "fit" and kwargs.get("ckpt_path") is None:
            kwargs["ckpt_path"] = restart_checkpoint(self.trainer)
        return kwargs

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no `test`: the distillation modules have no test set (no test_step); `dmdx validate`
        # runs the metric callbacks on a checkpoint
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "test"}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # the light verbs never reach this parser (see cli.main); list them in --help
            # jsonargparse keeps the one subcommands action of a parser here (add_subcommands runs once)
            for verb, (_, text) in LIGHT_VERBS.items():
                self.parser._subcommands_action.add_subcommand(verb, ArgumentParser(description=text), help=text)


def restart_checkpoint(trainer: pl.Trainer) -> str | None:
    """The checkpoint a requeued SLURM job resumes from when no ``--ckpt_path`` is given: the newest
    of the preemption checkpoints (``<default_root_dir>/hpc_ckpt_<n>.ckpt``) and the checkpoint
    callbacks' ``last*.ckpt``; ``None`` on a first attempt (``SLURM_RESTART_COUNT`` unset or 0) or
    when there is none yet (the job starts afresh).

    Lightning by itself resumes a requeued job only from a preemption checkpoint, and from the
    highest-numbered one even when a later ``last.ckpt`` exists; a job requeued after a crash (a
    rank killed, a lost node: ``configs/slurm/*.sbatch`` requeue on a failed step) has only
    ``last.ckpt``.
    """
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts == 0:
        return None
    from pathlib import Path

    candidates = list(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            candidates += [p for p in Path(callback.dirpath).glob("last*.ckpt") if not p.name.startswith(".")]
    say = os.environ.get("SLURM_PROCID", "0") == "0"  # once per job, not per task
    if not candidates:
        if say:
            print(f"dmdx: SLURM restart {restarts}: no checkpoint in {trainer.default_root_dir} yet; starting afresh",
                  flush=True)
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    if say:
            print(f"dmdx: SLURM restart {restarts}: resuming from {newest} (the newest of {len(candidates)} "
              "checkpoint(s))", flush=True)
    return str(newest)


def parent_folder(path: str) -> str:
    """The folder that holds ``path`` (``.`` for a bare name): the config resolver ``dmdx.parent``."""
    return os.path.dirname(os.path.normpath(path)) or "."


def place_run_outputs(config: Namespace) -> None:
    """Put what a config leaves unplaced under ``trainer.default_root_dir`` (default: the cwd).

    - ``trainer.logger`` left at its default: TensorBoard logs to ``<root>/version_<n>/`` (events,
      the resolved ``config.yaml``, ``samples/``), for every shipped config (none names a logger);
      Lightning's own default adds a ``lightning_logs/`` level that ``dmdx export`` would not search.
      Under SLURM the version is the job id (Lightning's choice), so a requeued job keeps its folder.
    - a ``ModelCheckpoint`` without ``dirpath``: ``<root>/checkpoints/``, one fixed folder for
      ``--ckpt_path``, ``init_from`` and ``dmdx export`` (Lightning's default would be inside the
      version folder, which changes with every run).

    Every other output path of a shipped config is derived from the root by interpolation
    (``${trainer.default_root_dir}/summary.json``), so it moves with it too; a config that pins a
    logger's ``save_dir`` or a ``dirpath`` keeps it. Also adds the iteration progress bar
    (:func:`~dmdx_lightning.callbacks.progress.add_progress_bar`). Edits ``config`` in place, so the
    saved ``config.yaml`` records the resolved paths and callbacks.
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
    add_progress_bar(trainer)


def _is_fsdp2(class_path: str) -> bool:
    """Whether a config's ``trainer.strategy`` class is (a subclass of) FSDP2Strategy."""
    from dmdx_lightning.errors import import_class
    from dmdx_lightning.strategies import FSDP2Strategy

    cls = import_class(class_path, "trainer.strategy.class_path")
    return isinstance(cls, type) and issubclass(cls, FSDP2Strategy)
