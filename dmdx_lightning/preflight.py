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
3. files: ``init_from``, ``--ckpt_path``, and that the output folders can be written:
   ``trainer.default_root_dir``, a checkpoint callback's ``dirpath`` and a logger's ``save_dir``.

What only the built run can tell (the teacher's loaded components, the scoring networks a run will
load, free disk for a checkpoint) is checked at setup, on every rank, before the first step:
:class:`~dmdx_lightning.callbacks.setup_checks.SetupChecks`.

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
    check_guidance(config)
    ckpt = config.get("ckpt_path")
    if ckpt and ckpt not in CKPT_ALIASES and not is_checkpoint(ckpt):
        raise ConfigError("ckpt_path", ckpt, "no such checkpoint", "Give a .ckpt file (or, under FSDP2, a .ckpt "
                          "folder) written by `dmdx fit`, or `last`.")
    trainer = config.get("trainer") or {}
    check_writable(trainer.get("default_root_dir") or os.getcwd())
    check_output_folders(trainer, verb)


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


#: the method options that ask the teacher for guidance: the real score's scale (the distillation
#: methods) and the teacher sampler's (ODE pairs)
GUIDANCE_SCALES = ("real_cfg_scale", "cfg_scale")


def check_guidance(config: dict) -> None:
    """A guidance scale other than 1 for a teacher without guidance (``guidance: none``: FLUX.1-schnell)
    would otherwise stop the run at its first real-score prediction, after the weights loaded."""
    model = config.get("model") or {}
    args = model.get("init_args") if isinstance(model, dict) else None
    teacher = args.get("teacher") if isinstance(args, dict) else None
    if not (isinstance(teacher, dict) and isinstance(teacher.get("class_path"), str)):
        return
    cls = _import(teacher["class_path"], "model.init_args.teacher")
    resolve = getattr(cls, "guidance_from_options", None)
    if resolve is None or resolve(teacher.get("init_args") or {}) != "none":
        return
    for name in GUIDANCE_SCALES:
        value = args.get(name)
        if value is not None and float(value) != 1.0:
            raise ConfigError(f"model.init_args.{name}", value, f"the teacher ({cls.__name__}) has no guidance "
                              "(guidance: none, as FLUX.1-schnell, which was distilled to sample without it): its "
                              "real score is the network as it is", f"Set model.init_args.{name}: 1.")


def check_output_folders(trainer: dict, verb: str | None) -> None:
    """The folders a run writes besides its root, where a config pins them: a checkpoint callback's
    ``dirpath`` (``fit`` writes there; unset, it lies under the root, checked already) and a
    logger's ``save_dir``. Found by option name, so any checkpoint callback or logger class counts."""
    for key, _cls, options in class_nodes(trainer, "trainer"):
        for option, verbs in (("dirpath", ("fit", None)), ("save_dir", ("fit", "validate", None))):
            if options.get(option) and verb in verbs:
                check_writable(options[option], f"{key}.init_args.{option}",
                               "runs/my_run/checkpoints" if option == "dirpath" else "runs/my_run")


def check_writable(root: str | os.PathLike, key: str = "trainer.default_root_dir",
                   example: str = "runs/my_run") -> None:
    """The output folder ``root`` of ``key`` (created by the run) must be creatable and writable;
    nothing is created here."""
    path = Path(root).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(key, str(root), f"{existing} is a file, not a folder",
                          f"Choose a folder for the run's outputs (e.g. {example}).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, str(root), f"{existing} is not writable",
                          f"Choose a folder you can write (e.g. {example}).")


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off (``HF_HUB_OFFLINE``), read when asked (a test or a
    launcher may set it after ``huggingface_hub`` was imported). ``dmdx`` takes it as the machine's
    offline switch for every download a run would make later (torchvision's LPIPS backbones too)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def looks_like_path(source: str) -> bool:
    """A local path rather than a Hub id ``owner/name`` (which may not exist locally)."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def check_model_source(key: str, source: str, *, revision: str | None = None, marker: str = "config.json",
                       what: str = "model", offline: bool = False) -> None:
    """A model a config names by Hub id or local folder (``save_pretrained`` output with ``marker``).

    Refused: a path that does not exist or lacks ``marker``; with ``offline`` (callers pass it where
    the model will certainly be loaded, :func:`hub_offline` on), a Hub id whose ``marker`` is not in the
    local Hugging Face cache: loading it later would fail, after the run has trained.
    """
    source = str(source)
    local = Path(source).expanduser()
    if local.exists():
        if not (local / marker).is_file():
            raise ConfigError(key, source, f"{local} has no {marker}: not a save_pretrained folder of a {what}",
                              f"Give the folder `save_pretrained` wrote for the {what}, or a Hub id.")
        return
    if looks_like_path(source):
        raise ConfigError(key, source, "no such folder", f"Give a local folder with the {what} "
                          "(`save_pretrained` output) or a Hub id such as openai/clip-vit-large-patch14.")
    if offline and hub_offline() and not hub_cached(source, marker, revision):
        raise ConfigError(key, source, "is not in the local Hugging Face cache and the Hub is offline "
                          "(HF_HUB_OFFLINE=1)", f"Download it where there is network (`hf download {source}`) "
                          f"into the cache this machine reads (HF_HOME), or set {key} to a folder the {what}'s "
                          "`save_pretrained` wrote.")


def hub_cached(repo_id: str, filename: str, revision: str | None = None) -> bool:
    """Whether ``filename`` of the Hub repository ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except ValueError:  # not a valid repository id: loading it would fail as well
        return False


def _import(class_path: str, key: str) -> type:
    return import_class(class_path, f"{key}.class_path",
                        "Give a class of dmdx_lightning by its short name (e.g. ADMModule) or a full dotted path.")
