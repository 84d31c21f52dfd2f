"""The ``dmdx`` command: LightningCLI in subclass mode (``dmdx fit --config configs/adm_sd3.yaml``).

Any LightningModule / LightningDataModule subclass can be named by ``class_path`` in a config,
so a new teacher or method needs a YAML file, not a change here.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI

from dmdx_lightning.callbacks.preemption import RequeueOnSignal

DESCRIPTION = "DMDX diffusion distillation: dmdx fit|validate|predict --config <yaml>, dmdx export ..."
EXPORT_HELP = "Export a trained student to diffusers: LoRA weights or a pipeline folder (dmdx export --help)."


class DMDXCLI(LightningCLI):
    """LightningCLI with model and data in subclass mode and configs that may omit ``data``.

    Verbs: ``fit``, ``validate``, ``predict`` (Lightning's) and ``export`` (``main`` dispatches it to
    :mod:`dmdx_lightning.export`; it is listed here only so that ``dmdx --help`` shows it).
    """

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


def main(args: list[str] | None = None) -> None:
    argv = list(args if args is not None else sys.argv[1:])
    if argv[:1] == ["export"]:  # `dmdx export ...`: student -> diffusers (not a Trainer subcommand)
        from dmdx_lightning.export import main as export_main

        export_main(argv[1:])
        return
    # from the command line LightningCLI reads sys.argv itself: passing args too would warn
    # ("args parameter is intended to run from within Python") on every call
    DMDXCLI(args=args)


if __name__ == "__main__":
    main()
