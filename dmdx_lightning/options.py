"""Help for the Trainer verbs that a user can read: ``dmdx fit --help`` and the options of a method.

LightningCLI's own help lists the Trainer's ~150 flags and, in subclass mode, not one option of
the model (jsonargparse shows those only for ``--model.help <full.class.path>``, one class at a
time, without the classes nested in it). This module writes the help from the classes
themselves (signatures and the ``Args:`` sections of their docstrings, the same sources
jsonargparse reads), walking the tree a config builds:

- ``dmdx fit --help``: a short page (how to run, the methods and data modules, where to look next);
- ``dmdx fit --model ADMModule --help``: every option of the method with its default, and of the
  option groups and classes nested in it (``variants``; a teacher or discriminator where one is named);
- ``dmdx fit --config X.yaml --help``: every option of that config's model, teacher, discriminators
  and data, with its default and the config's value where the config sets it;
- ``dmdx fit --help trainer``: LightningCLI's full help (every Trainer flag).

Class names may be short (``ADMModule``) wherever a class is named: :func:`resolve_class`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

#: the packages whose classes a config may name by their short name
PACKAGES = ("methods", "teachers", "data", "discriminators", "callbacks", "evaluation")
WIDTH = 100
#: where the walk up a class's bases stops (a user's own classes are described like ours)
FRAMEWORK_PACKAGES = ("lightning", "pytorch_lightning", "torch", "builtins", "abc")


# ---------------------------------------------------------------------------------------- classes
@lru_cache(maxsize=None)
def known_classes() -> dict[str, type]:
    """Short name -> class, for every public class defined in :data:`PACKAGES`."""
    found: dict[str, type] = {}
    for package in PACKAGES:
        pkg = importlib.import_module(f"dmdx_lightning.{package}")
        for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{pkg.__name__}."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and obj.__module__ == module.__name__ and not name.startswith("_"):
                    found.setdefault(name, obj)
    return found


def resolve_class(name: str) -> type:
    """A class from a dotted path or a short name of :func:`known_classes`; a clear error else."""
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"class {name!r} cannot be imported ({e})") from None
    classes = known_classes()
    if name in classes:
        return classes[name]
    import difflib

    close = difflib.get_close_matches(name, classes, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(f"no class named {name!r} in dmdx_lightning{hint} (or give its full dotted path)")


def short_name(class_path: str) -> str:
    """``ADMModule`` for ``dmdx_lightning.methods.adm.ADMModule`` when the short name resolves to it."""
    name = class_path.rpartition(".")[2]
    return name if known_classes().get(name) is not None and \
        f"{known_classes()[name].__module__}.{name}" == class_path else class_path


# ---------------------------------------------------------------------------------------- options
@dataclasses.dataclass
class Option:
    name: str
    annotation: Any
    default: Any
    doc: str


def options_of(cls: type) -> list[Option]:
    """The constructor options of ``cls``, its own first, then those it passes on through
    ``**kwargs`` to its bases in this package, each with its docstring text."""
    if dataclasses.is_dataclass(cls):
        docs = _arg_docs(cls)
        return [Option(f.name, f.type, f.default, docs.get(f.name, "")) for f in dataclasses.fields(cls)]
    seen: dict[str, Option] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass.__module__.split(".")[0] in FRAMEWORK_PACKAGES:
            break  # Lightning's / torch's own constructors: not options of a method or teacher
        docs = _arg_docs(klass)
        signature = inspect.signature(klass.__init__)
        hints = _hints(klass.__init__)
        for p in list(signature.parameters.values())[1:]:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in seen:
                continue
            seen[p.name] = Option(p.name, hints.get(p.name, p.annotation), p.default, docs.get(p.name, ""))
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return list(seen.values())


def _hints(function) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # a forward reference that does not resolve: show the annotation as written
        return {}


def _arg_docs(cls: type) -> dict[str, str]:
    """Argument name -> description from the ``Args:`` sections of the class and its ``__init__``
    (``a, b: text`` documents both)."""
    import docstring_parser

    docs: dict[str, str] = {}
    for text in (cls.__doc__, getattr(vars(cls).get("__init__"), "__doc__", None)):
        if not text:
            continue
        for param in docstring_parser.parse(text).params:
            for name in param.arg_name.replace("*", "").split(","):
                docs.setdefault(name.strip(), _plain(param.description or ""))
    return docs


def _plain(text: str) -> str:
    """A docstring's text as a terminal shows it: one paragraph, ``code`` as `code`, roles as names."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", text)
    return " ".join(text.replace("``", "`").split())


def _type_text(annotation: Any) -> str:
    """``float``, ``one of adm | dmd | dmd2``, ``Teacher``, ``float | None``: a type as a user reads it."""
    if annotation is inspect.Parameter.empty:
        return ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + " | ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_text(a) for a in args)}]" if args else name
    if inspect.isclass(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _value_text(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    if dataclasses.is_dataclass(value):
        return "the group's defaults"
    if callable(value) and getattr(value, "__name__", "").startswith("_default"):
        return "AdamW (the module's default)"
    if isinstance(value, dict) and "class_path" in value:
        args = value.get("init_args") or {}
        inner = ", ".join(f"{k}: {v}" for k, v in args.items())
        return f"{short_name(value['class_path'])}({inner})"
    return repr(value) if isinstance(value, str) else str(value)


def _nested_class(annotation: Any) -> type | None:
    """The class an option's value is built from when it is a class of this package (a teacher, a
    discriminator), else ``None``."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if inspect.isclass(candidate) and candidate.__module__.startswith("dmdx_lightning"):
            return candidate
    return None


def describe(cls: type, prefix: str, config: dict | None = None, depth: int = 0) -> Iterator[str]:
    """Lines describing every option of ``cls`` as the command-line key ``--{prefix}.{name}``,
    nested classes and option groups indented under their option."""
    config = config or {}
    pad = "  " * (depth + 1)
    # option groups (e.g. ADM's study variants) after the options a user sets
    for option in sorted(options_of(cls), key=lambda o: dataclasses.is_dataclass(o.annotation)):
        key = f"{prefix}.{option.name}"
        given = config.get(option.name, inspect.Parameter.empty)
        head = f"{pad}--{key}"
        facts = [t for t in (_type_text(option.annotation),) if t]
        facts.append(f"default: {_value_text(option.default)}")
        if given is not inspect.Parameter.empty and not isinstance(given, dict):
            facts.append(f"config: {_value_text(given)}")
        yield f"{head}  ({'; '.join(facts)})"
        if option.doc:
            yield from textwrap.wrap(option.doc, WIDTH, initial_indent=pad + "    ", subsequent_indent=pad + "    ")
        group = option.annotation if dataclasses.is_dataclass(option.annotation) else None
        if group is not None:
            yield from describe(group, key, given if isinstance(given, dict) else {}, depth + 1)
            continue
        nested = _nested_class(option.annotation)
        if isinstance(given, dict) and "class_path" in given:
            chosen = resolve_class(given["class_path"])
            yield f"{pad}    {option.name} is {chosen.__name__} in this config; its options:"
            yield from describe(chosen, f"{key}.init_args", given.get("init_args") or {}, depth + 2)
        elif nested is not None and depth == 0:
            subclasses = sorted(n for n, c in known_classes().items() if issubclass(c, nested) and c is not nested)
            choices = subclasses or [nested.__name__]
            if choices:
                yield f"{pad}    one of: {', '.join(choices)} (add `--{key} CLASS` to see its options)"


# ---------------------------------------------------------------------------------------- pages
def short_help(verb: str) -> str:
    """``dmdx fit --help``: how to run, the methods and data modules, where the rest is."""
    from dmdx_lightning.cli import TRAINER_VERBS

    import lightning.pytorch as pl

    classes = known_classes()
    methods = {n: c for n, c in classes.items() if issubclass(c, pl.LightningModule) and
               c.__module__.startswith("dmdx_lightning.methods") and not inspect.isabstract(c) and
               n != "DistillationModule"}
    data = {n: c for n, c in classes.items() if issubclass(c, pl.LightningDataModule)}

    def listing(found: dict[str, type]) -> list[str]:
        width = max(map(len, found))
        return [f"  {n:<{width}}  {_first_line(c)}" for n, c in sorted(found.items())]

    return "\n".join([
        f"usage: dmdx {verb} --config CONFIG.yaml [--config OVERLAY.yaml ...] [--KEY VALUE ...]",
        "",
        TRAINER_VERBS[verb],
        "A config names the method (model), its teacher and the data; every key can be overridden on the",
        "command line (e.g. --model.init_args.dt 0.02 --trainer.max_steps 1000).",
        "",
        "options:",
        "  -c, --config CONFIG   a YAML config; repeat it for overlays (later files win)",
        "  --model CLASS         the method (short names work: ADMModule); --model.init_args.KEY VALUE sets an option",
        "  --data CLASS          the data module; --data.init_args.KEY VALUE sets an option",
        "  --trainer.KEY VALUE   a Lightning Trainer option: max_steps (iterations), default_root_dir (where",
        "                        the run writes everything), accelerator, devices, precision, ...",
        "  --ckpt_path CKPT      resume from a checkpoint (`last`: the newest of this run)",
        "  --print_config        print the resolved config and exit",
        "",
        "methods (--model):",
        *listing(methods),
        "",
        "data modules (--data):",
        *listing(data),
        "",
        "more:",
        f"  dmdx {verb} --model ADMModule --help      every option of a method, with its default",
        f"  dmdx {verb} --config CONFIG.yaml --help   every option of that config's method, teacher and data",
        f"  dmdx {verb} --help trainer                every Trainer flag (LightningCLI's full help)",
    ])


def _first_line(cls: type) -> str:
    return (inspect.getdoc(cls) or "").split("\n")[0].rstrip(".")


def class_help(verb: str, merged: dict, sources: list[str]) -> str:
    """Every option of the model and data that a merged config (files + command line) names."""
    sections = []
    for part in ("model", "data"):
        given = merged.get(part) or {}
        if isinstance(given, str):
            given = {"class_path": given}
        if not given.get("class_path"):
            continue
        cls = resolve_class(given["class_path"])
        source = f" (values from {', '.join(sources)})" if sources else ""
        sections.append(f"{part}: {cls.__module__}.{cls.__name__}{source}\n  {_first_line(cls)}\n")
        sections.append("\n".join(describe(cls, f"{part}.init_args", given.get("init_args") or {})) + "\n")
    if not sections:
        return short_help(verb)
    sections.append(f"Trainer options: dmdx {verb} --help trainer.")
    return "\n".join(sections)


def merge_configs(paths: list[str]) -> dict:
    """The ``model`` / ``data`` sections of ``paths`` merged in order (mappings merge, everything
    else is replaced), as the config files of one command are."""
    import yaml

    merged: dict = {}
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
        _merge(merged, yaml.safe_load(text) or {})
    return merged


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def help_request(verb: str, argv: list[str]) -> str | None:
    """The help page ``argv`` (after the verb) asks for, or ``None`` when it asks for none or for
    LightningCLI's own (``--help trainer``: the caller passes ``--help`` on).

    ``--config`` files and ``--model`` / ``--data`` / ``--model.init_args.KEY VALUE`` arguments build
    the tree to describe, so ``--model ADMModule --model.init_args.teacher DigitsTeacher --help``
    shows the teacher's options too.
    """
    if not any(a in ("-h", "--help") for a in argv) or "trainer" in argv:
        return None
    merged: dict = {}
    sources: list[str] = []
    it = iter(a for a in argv if a not in ("-h", "--help"))
    for arg in it:
        key, eq, value = arg.partition("=")
        if not key.startswith("-"):
            continue
        value = value if eq else next(it, "")
        if key in ("-c", "--config"):
            _merge(merged, merge_configs([value]))
            sources.append(value)
        elif key.startswith(("--model", "--data")):
            *parents, leaf = key[2:].split(".")
            node = merged
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = {"class_path": value} if leaf != "class_path" and _names_class(value) else value
    if not (merged.get("model") or merged.get("data")):
        return short_help(verb)
    return class_help(verb, merged, sources)


def _names_class(value: str) -> bool:
    """Whether a command-line value names a class (``DigitsTeacher``, ``pkg.module.Class``)."""
    return value in known_classes() or ("." in value and value.rpartition(".")[2][:1].isupper())

