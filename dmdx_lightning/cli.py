"""The ``dmdx`` command: LightningCLI in subclass mode (``dmdx fit --config configs/adm_sd3.yaml``).

Any LightningModule / LightningDataModule subclass can be named by ``class_path`` in a config,
so a new teacher or method needs a YAML file, not a change here.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from dmdx_lightning.callbacks.preemption import RequeueOnSignal


class DMDXCLI(LightningCLI):
    """LightningCLI with model and data in subclass mode and configs that may omit ``data``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("datamodule_class", None)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        # always on; does nothing outside SLURM (see RequeueOnSignal for why it replaces Lightning's handler)
        kwargs.setdefault("trainer_defaults", {"callbacks": [RequeueOnSignal()]})
        super().__init__(pl.LightningModule, *args, **kwargs)


def main(args: list[str] | None = None) -> None:
    args = list(args if args is not None else sys.argv[1:])
    if args[:1] == ["export"]:  # `dmdx export ...`: student -> diffusers (not a Trainer subcommand)
        from dmdx_lightning.export import main as export_main

        export_main(args[1:])
        return
    DMDXCLI(args=args)


if __name__ == "__main__":
    main()
