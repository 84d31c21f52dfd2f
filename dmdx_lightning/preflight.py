"""Checks a parsed config before anything is built: no weight loads, no step, no file written.

LightningCLI builds the classes of a config in one go, the teacher (with its weights) first, and a
bad value of the method then fails after minutes of loading, or at the first step, or at the first
sample grid after training. :func:`check_config` runs on the parsed config instead
(``DMDXCLI.before_instantiate_classes``):

1. every class the config names runs its own ``check_options`` (a classmethod taking the class's
   options as parsed, defaults filled, and the config key they sit under), for each class of its MRO
   that defines one: a method, its teacher, its discriminators, the data module. The same checks
   run in ``__init__``, so a module built in Python is refused the same way;
2. combinations across classes: the batch keys a method needs (``batch_keys``) against those the
   data module serves (``provides``);
3. files: ``init_from``, ``--ckpt_path``, and that ``trainer.default_root_dir`` can be written.

Each refusal is a :class:`~dmdx_lightning.errors.ConfigError` (key, value, problem, fix) or a
:class:`~dmdx_lightning.errors.SetupError`, which ``dmdx`` prints as one paragraph with exit status 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from dmdx_lightning.errors import ConfigError, SetupError, import_class
from dmdx_lightning.sharded_checkpoint import is_checkpoint

#: ``--ckpt_path`` values Lightning resolves itself
CKPT_ALIASES = ("last", "best", "hpc", "registry")


def check_config(config: dict[str, Any], verb: str) -> None:
    """Refuse ``config`` (one verb's parsed config as a plain dict) if it cannot run."""
    for key, cls, options in class_nodes(config):
        run_checks(cls, options, f"{key}.init_args")
    if verb in ("fit", "validate"):
        check_batch_keys(config)
        init_from = (config.get("model") or {}).get("init_args", {}).get("init_from")
        if init_from and not is_checkpoint(init_from):
            raise ConfigError("model.init_args.init_from", init_from, "no such checkpoint",
                              "Run the stage that writes it first (e.g. `dmdx fit --config configs/quickstart/adp.yaml`) "
                              "or fix the path.")
    ckpt = config.get("ckpt_path")
    if ckpt and ckpt not in CKPT_ALIASES and not is_checkpoint(ckpt):
        raise ConfigError("ckpt_path", ckpt, "no such checkpoint", "Give a .ckpt file (or, under FSDP2, a .ckpt "
                          "folder) written by `dmdx fit`, or `last`.")
    check_writable((config.get("trainer") or {}).get("default_root_dir") or os.getcwd())


def class_nodes(tree: Any, key: str = "") -> Iterator[tuple[str, type, dict]]:
    """``(key, class, options)`` for every ``class_path`` / ``init_args`` node of a config tree."""
    if isinstance(tree, dict):
        if isinstance(tree.get("class_path"), str):
            cls = _import(tree["class_path"], key)
            options = tree.get("init_args") or {}
            yield key, cls, options
            yield from class_nodes(options, f"{key}.init_args")
            return
        for name, value in tree.items():
            yield from class_nodes(value, f"{key}.{name}" if key else name)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from class_nodes(value, f"{key}[{i}]")


def run_checks(cls: type, options: dict, key: str) -> None:
    """Each class of ``cls``'s MRO that defines ``check_options`` checks its own options, bases first."""
    for klass in reversed(cls.__mro__):
        check = vars(klass).get("check_options")
        if check is None:
            continue
        try:
            check.__func__(cls, options, key)
        except ConfigError:
            raise
        except (OSError, ValueError, RuntimeError) as e:  # a check's own message (file, line, fix)
            raise SetupError(str(e)) from e


def check_batch_keys(config: dict) -> None:
    model, data = config.get("model") or {}, config.get("data") or {}
    if not (isinstance(model, dict) and isinstance(data, dict) and model.get("class_path") and data.get("class_path")):
        return
    method, loader = _import(model["class_path"], "model"), _import(data["class_path"], "data")
    needs = method.batch_keys(model.get("init_args") or {}) if hasattr(method, "batch_keys") else {}
    provides = getattr(loader, "provides", None)
    missing = {k: why for k, why in needs.items() if provides is not None and k not in provides}
    if missing:
        reasons = "; ".join(missing.values())
        raise ConfigError("data.class_path", loader.__name__, f"serves batches with {', '.join(provides)}, but the "
                          f"method needs {', '.join(missing)} ({reasons})",
                          "Train on ODE pairs: data: ODEPairDataModule with the folder `dmdx predict` wrote "
                          "(configs/quickstart/adp.yaml shows one).")


def check_writable(root: str | os.PathLike) -> None:
    """``trainer.default_root_dir`` (created by the run) must be creatable and writable; nothing is
    created here."""
    path = Path(root).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError("trainer.default_root_dir", str(root), f"{existing} is a file, not a folder",
                          "Choose a folder for the run's outputs (e.g. runs/my_run).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("trainer.default_root_dir", str(root), f"{existing} is not writable",
                          "Choose a folder you can write (e.g. runs/my_run).")


def _import(class_path: str, key: str) -> type:
    return import_class(class_path, f"{key}.class_path",
                        "Give a class of dmdx_lightning by its short name (e.g. ADMModule) or a full dotted path.")
