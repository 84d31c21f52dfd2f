"""The ``dmdx`` command (``dmdx fit --config configs/sd3/adm_4step.yaml``, ``dmdx export ...``, ``dmdx configs``).

This module imports nothing heavy: the verbs that need no Trainer (:data:`LIGHT_VERBS`) and
``dmdx --help`` answer without importing Lightning (which costs seconds); the Trainer verbs
(``fit``, ``validate``, ``predict``) are LightningCLI's, in :mod:`dmdx_lightning.training_cli`.
A ``--config NAME`` that is no file here names a shipped config (``dmdx fit --config sd3/adm_4step.yaml``
from any folder): :mod:`dmdx_lightning.configs_index` resolves it before anything else reads it.
"""

from __future__ import annotations

import importlib
import os
import sys

from dmdx_lightning import quiet
from dmdx_lightning.configs_index import resolve_config_args
from dmdx_lightning.errors import ConfigError, SetupError, check_config_files, explain_parse_error

DESCRIPTION = ("DMDX diffusion distillation: dmdx fit|validate|predict --config <yaml>, "
               "dmdx export|sample|evaluate|configs ...")

#: verbs served without a Trainer: name -> (module with ``main(argv)``, one line of help)
LIGHT_VERBS: dict[str, tuple[str, str]] = {
    "export": ("dmdx_lightning.export",
               "Export a trained student: a diffusers pipeline folder, LoRA weights, or a safetensors "
               "student (digits, mixture) (dmdx export --help)."),
    "sample": ("dmdx_lightning.sample",
               "Draw images / videos and a labelled grid from a checkpoint, an export or the teacher "
               "(dmdx sample --help)."),
    "evaluate": ("dmdx_lightning.evaluation.evaluate",
                 "Evaluate students beside their teacher on a prompt set: resumable, sharded over ranks; "
                 "a results table, per-prompt values and a contact sheet (dmdx evaluate --help)."),
    "configs": ("dmdx_lightning.configs_index",
                "List the shipped configs with what each runs; any listed NAME works as --config NAME "
                "from any folder (dmdx configs --help)."),
}
#: the Trainer verbs (LightningCLI's), with their help line
TRAINER_VERBS: dict[str, str] = {
    "fit": "Train a student: dmdx fit --config CONFIG.yaml (dmdx fit --model ADMModule --help lists its options).",
    "validate": "Run the validation metrics on a checkpoint: dmdx validate --config CONFIG.yaml --ckpt_path CKPT.",
    "predict": "Run a predict stage, e.g. write ODE pairs: dmdx predict --config configs/sd3/ode_pairs.yaml.",
}


def main(args: list[str] | None = None) -> None:
    argv = list(args if args is not None else sys.argv[1:])
    quiet.install()  # first: library messages no dmdx user can act on (the table in quiet.py)
    if argv[:1] and argv[0] in LIGHT_VERBS:
        importlib.import_module(LIGHT_VERBS[argv[0]][0]).main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help())
        return
    try:  # `--config sd3/adm_4step.yaml`: a shipped config, when no such file is here
        resolved = resolve_config_args(argv)
    except SetupError as e:
        fail(str(e), e)
    if resolved != argv:
        argv, args = resolved, _pass_on(resolved, args)
    if argv[0] in TRAINER_VERBS:
        from dmdx_lightning.options import help_request

        try:
            page = help_request(argv[0], argv[1:])
        except ValueError as e:
            fail(str(e), e)
        if page is not None:
            print(page)
            return
        if "trainer" in argv and any(a in ("-h", "--help") for a in argv):
            argv.remove("trainer")  # `dmdx fit --help trainer`: LightningCLI's own page
            args = _pass_on(argv, args)
    try:
        check_config_files(argv)  # a YAML error names the file and line (the parser would not)
        from jsonargparse import ArgumentError

        from dmdx_lightning.training_cli import DMDXCLI

        cli = DMDXCLI(args=args)  # None from the command line: it reads sys.argv (see _pass_on)
        _close_process_group()
        if _stopped_by_sigterm(cli):
            sys.exit(128 + 15)  # as a process killed by SIGTERM reports itself: the run did not finish
    except (ConfigError, SetupError) as e:  # preflight: key, value, problem and fix in one paragraph
        fail(str(e), e)
    except ArgumentError as e:  # the parser's: a misspelt key, a value of the wrong type
        fail(explain_parse_error(str(e), argv[0]), e)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = config_error(e)
        if reason is None:
            raise
        fail(reason, e)


def _pass_on(argv: list[str], args: list[str] | None) -> list[str] | None:
    """Hand LightningCLI the rewritten ``argv`` where it looks: ``sys.argv`` when run from the command
    line (``args`` None; passing args too would warn on every call), else as ``args``."""
    if args is None:
        sys.argv[1:] = argv
        return None
    return argv


def fail(reason: str, error: BaseException) -> None:
    """Print ``reason`` as dmdx's one-paragraph error and exit with status 2 (``DMDX_DEBUG=1``:
    raise ``error`` with its traceback instead)."""
    if os.environ.get("DMDX_DEBUG"):
        raise error
    print(f"dmdx: error: {reason}\n(set DMDX_DEBUG=1 for the full traceback)", file=sys.stderr)
    sys.exit(2)


def top_level_help() -> str:
    """``dmdx --help``: the verbs, one line each (no Lightning import)."""
    verbs = {**TRAINER_VERBS, **{name: text for name, (_, text) in LIGHT_VERBS.items()}}
    width = max(map(len, verbs))
    lines = [f"usage: dmdx VERB [options]   ({DESCRIPTION})", "", "verbs:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in verbs.items()]
    lines += ["", "`dmdx VERB --help` shows a verb's options."]
    return "\n".join(lines)


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


def _stopped_by_sigterm(cli) -> bool:
    """Whether the run stopped early on SIGTERM (it saved its state first: ``RequeueOnSignal``)."""
    import signal

    from dmdx_lightning.callbacks.preemption import RequeueOnSignal

    trainer = getattr(cli, "trainer", None)
    return any(isinstance(cb, RequeueOnSignal) and cb.stopped_by == signal.SIGTERM
               for cb in getattr(trainer, "callbacks", []))


def _close_process_group() -> None:
    """End a multi-process run's process group before the interpreter exits. Left open, its
    transport threads can outlive Python's teardown and abort the process after a successful run
    ("terminate called without an active exception", exit code -6; seen with FSDP2 on gloo)."""
    import sys

    torch = sys.modules.get("torch")  # only if the run imported it (light verbs do not)
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
