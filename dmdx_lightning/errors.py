"""The one error a user meets for a bad config: the key, the value, what is wrong and the fix.

Light on purpose (no torch, no Lightning): :mod:`dmdx_lightning.cli` prints it as one paragraph
and exits with status 2 (``DMDX_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import re
from typing import Any


class ConfigError(ValueError):
    """A value or a combination of values a config asks for and that cannot work.

    Args:
        key: the config key at fault, as on the command line (``model.init_args.dt``).
        value: its value.
        problem: what is wrong with it.
        fix: what to do instead.
    """

    def __init__(self, key: str, value: Any, problem: str, fix: str = "") -> None:
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        super().__init__(f"{key} = {value!r}: {problem}." + (f" {fix}" if fix else ""))


class SetupError(ValueError):
    """A config that cannot run, found at setup by a check whose own message already names the file
    or key and the fix (e.g. a missing prompt file); printed as it is."""


def import_class(class_path: str, key: str, fix: str = "") -> Any:
    """The object a config's dotted ``class_path`` names; a :class:`ConfigError` on ``key`` when it
    cannot be imported (preflight and ``dmdx evaluate`` read class paths the same way)."""
    import importlib

    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(key, class_path, f"cannot be imported ({e})", fix) from None


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file of a command exists and is valid YAML; a syntax error names the file,
    the line and the column (the parser would say ``<unicode string>``)."""
    import yaml

    it = iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag not in ("-c", "--config"):
            continue
        path = value if eq else next(it, "")
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except OSError as e:
            raise SetupError(f"--config {path}: cannot read it ({e.strerror}). Check the path (`dmdx configs` lists "
                             "the shipped configs).") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            context = getattr(e, "context", None)
            raise SetupError(f"{path}{where}: not valid YAML ({context + ': ' if context else ''}{problem}). "
                             "Fix the file there.") from None


_TOKENS = re.compile(r"Parser key \"(?P<key>[\w.]+)\"|Problem with given class_path '(?P<cls>[\w.]+)'"
                     r"|Option '(?P<unknown>[\w.]+)' is not accepted"
                     r"|Expected a (?:<class '(?P<type>\w+)'>|typing\.Literal\[(?P<choices>[^\]]*)\])\. Got value: (?P<value>.*)"
                     r"|Subcommand '\w+' does not accept option '(?P<top>[\w.]+)'"
                     # argparse's own, for a key under a group with no class (trainer.max_stepz)
                     r"|unrecognized arguments: --(?P<unrecognized>[\w.]+)")


def explain_parse_error(message: str, verb: str = "fit") -> str:
    """One paragraph for jsonargparse's parse error ``message``: the full key at fault, the value,
    and for a misspelt key the closest options of the class it was given to (did you mean)."""
    path: list[str] = []
    cls = None
    for match in _TOKENS.finditer(message):
        if match.group("key"):
            path.extend(match.group("key").split("."))
        elif match.group("cls"):
            path.append("init_args")
            cls = match.group("cls")
        elif match.group("unknown"):
            return _unknown_key(path, cls, match.group("unknown"), verb)
        elif match.group("value") is not None:
            key, value = ".".join(path), match.group("value").strip()
            if match.group("choices"):
                choices = " | ".join(c.strip().strip("'") for c in match.group("choices").split(","))
                return f"{key} = {value!r}: choose one of {choices}."
            return (f"{key} = {value!r}: expected a {match.group('type')}. "
                    f"`dmdx {verb} --config ... --help` lists every option with its type.")
        elif match.group("top") or match.group("unrecognized"):
            *parents, unknown = (match.group("top") or match.group("unrecognized")).split(".")
            return _unknown_key(parents, None, unknown, verb)
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    return f"{first} (`dmdx {verb} --help` shows how to name options)"


def _unknown_key(path: list[str], class_path: str | None, unknown: str, verb: str) -> str:
    import difflib

    key = ".".join([*path, unknown])
    names, owner = _option_names(path, class_path)
    close = difflib.get_close_matches(unknown, names, n=2, cutoff=0.6)
    moved = [n for n in names if n.endswith(f".{unknown}")]
    if moved:
        hint = f" It moved: use {'.'.join([*path, moved[0]])}."
    elif close:
        hint = f" Did you mean {' or '.join('.'.join([*path, c]) for c in close)}?"
    else:
        hint = ""
    where = f"{owner} has no option {unknown!r}" if owner else f"no option {key!r}"
    if owner and path == ["model", "init_args"]:
        more = f" `dmdx {verb} --model {owner} --help` lists its options."
    elif owner:
        more = f" `dmdx {verb} --config CONFIG.yaml --help` lists its options."
    else:
        more = f" `dmdx {verb} --help` lists the options."
    return f"{key}: {where}.{hint}{more}"


def _option_names(path: list[str], class_path: str | None) -> tuple[list[str], str | None]:
    """The option names a key could have meant: a class's own (with ``group.field`` for its option
    groups), or the Trainer's and the top-level keys."""
    import dataclasses

    if class_path:
        from dmdx_lightning.options import options_of, resolve_class

        cls = resolve_class(class_path)
        names = []
        for option in options_of(cls):
            names.append(option.name)
            if dataclasses.is_dataclass(option.annotation):
                names += [f"{option.name}.{f.name}" for f in dataclasses.fields(option.annotation)]
        return names, cls.__name__
    if path[:1] == ["trainer"]:
        import inspect

        from lightning.pytorch import Trainer

        return list(inspect.signature(Trainer.__init__).parameters)[1:], "Trainer"
    return ["seed_everything", "trainer", "model", "data", "ckpt_path", "config"], None
