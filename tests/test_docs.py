"""README.md and docs/ say only what exists, and every command they show parses.

Over README.md and every docs/**/*.md page:

1. Links. Every relative link (``[text](path)``, ``![alt](path)``, ``[ref]: path``, HTML ``href`` /
   ``src``) resolves to a file or folder inside the repository; an anchor (``path#anchor`` or
   ``#anchor``) into a Markdown file names one of its headings (GitHub's or mkdocs' slug) or an
   explicit ``{#id}``. Links with a scheme (``https:``, ``mailto:``) are not followed (no network).
2. Paths. Every ``configs/...`` or ``benchmarks/...`` path the text mentions, in code or prose,
   exists. Brace lists expand (``configs/digits/{dmd,a1}.yaml`` names two files). A path that does
   not exist and holds a placeholder is skipped: ``<x>``, ``*``, ``$VAR``, ``...`` or an
   upper-case name (``benchmarks/results/NAME.md``). docs/reports/history.md is a log of past
   states, so the files it mentions may since have moved: only its links are checked.
3. Commands. Every ``dmdx ...`` command in a ```bash / ```sh / ```shell block (``&&`` / ``;``
   chains split, ``# comments`` and ``$`` prompts dropped, ``\\`` continuations joined; a command
   with a placeholder as above is skipped) parses:

   - ``dmdx fit | validate | predict ...``: ``DMDXCLI(args=[...] + ["--print_config"])`` in-process
     must exit with status 0, with ``--trainer.default_root_dir`` pointed into tmp_path when the
     command does not set it; then the preflight checks that ``dmdx`` runs before training
     (``dmdx_lightning.preflight.check_config``, which ``--print_config`` skips) run on the printed
     config. **Rule for chained stages:** a refusal is accepted only when it is a ``ConfigError``
     about one missing input that an earlier stage writes: its value is a path that does not exist
     and lies under ``runs/`` or beside this command's own output root (e.g. ADP's ODE-pair folder,
     DMDX's ``init_from`` of the ADP checkpoint, ``--ckpt_path`` of a run not made yet). Any other
     refusal fails the test. A teacher's Hub id counts as available (no network here; offline,
     ``dmdx`` refuses an id missing from the cache). A command with ``--help`` / ``-h`` must print
     its help page.
   - ``dmdx export | sample | configs ...`` (argparse verbs): the verb's own parser parses the
     arguments (every flag exists, required ones are given, choices are valid); the verb is not run.

Examples meant to fail belong in a ```console or ```text block, which is not run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import os
import re
import shlex
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LOGS = {DOCS / "reports" / "history.md"}  # records of past states: links checked, paths not


def pages() -> list[Path]:
    found = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)
    return [p for p in found if p.is_file()]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------------ Markdown parts
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")


@dataclass
class Block:
    language: str
    lines: list[tuple[int, str]]  # (1-based line number, text)


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[Block]]:
    """The prose lines (outside fenced code) and the fenced code blocks of a Markdown text."""
    prose, blocks, current, fence = [], [], None, None
    for number, line in enumerate(text.split("\n"), start=1):
        match = FENCE.match(line.strip() if current is None else line.lstrip())
        if current is None and match:
            fence = match["fence"]
            current = Block(match["info"].strip().split(" ")[0].lower() if match["info"].strip() else "", [])
        elif current is not None and match and match["fence"].startswith(fence[0]) \
                and len(match["fence"]) >= len(fence) and not match["info"].strip():
            blocks.append(current)
            current = None
        elif current is not None:
            current.lines.append((number, line))
        else:
            prose.append((number, line))
    if current is not None:
        blocks.append(current)
    return prose, blocks


INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(?P<target>\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML = re.compile(r"\b(?:href|src)=\"(?P<target>[^\"]+)\"")


def links(path: Path) -> list[tuple[int, str]]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    found = []
    for number, line in prose:
        bare = INLINE_CODE.sub("", line)  # `[a](b)` in code is no link; [`name`](path) still is
        for pattern in (LINK, REFERENCE, HTML):
            found += [(number, m["target"]) for m in pattern.finditer(bare)]
    return found


def github_slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def mkdocs_slug(heading: str) -> str:  # markdown's toc.slugify, which mkdocs uses
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            heading = match[1]
            explicit = re.search(r"\{\s*#([\w\-]+)[^}]*\}\s*$", heading)
            if explicit:
                names.add(explicit[1])
                heading = heading[:explicit.start()]
            plain = re.sub(r"`([^`]*)`", r"\1", heading)
            plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", plain)
            plain = plain.replace("*", "")  # emphasis (underscores stay: they are part of names)
            for slug in {github_slug(plain), mkdocs_slug(plain)}:
                n = counts.get(slug, 0)
                counts[slug] = n + 1
                names.add(slug if n == 0 else f"{slug}-{n}")
                names.add(slug)
        names.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
        names.update(re.findall(r"\{\s*#([\w\-]+)[^}]*\}", line))
    return names


# ------------------------------------------------------------------------------------ 1. links
def test_there_are_pages_to_check():
    assert (ROOT / "README.md").is_file()
    assert len(pages()) > 1, "docs/ holds no Markdown page"


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_every_relative_link_resolves(page):
    problems = []
    for number, target in links(page):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # https:, mailto: ...: not followed (no network)
        path_part, _, anchor = target.partition("#")
        path_part = path_part.split("?")[0]
        where = f"{rel(page)}:{number}: {target}"
        if path_part:
            resolved = Path(os.path.normpath(page.parent / path_part))
            if not resolved.is_relative_to(ROOT):
                problems.append(f"{where}: points outside the repository")
                continue
            if not resolved.exists():
                problems.append(f"{where}: no such file")
                continue
        else:
            resolved = page
        if anchor and resolved.suffix == ".md" and resolved.is_file() and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with anchor #{anchor} in {rel(resolved)}")
    assert not problems, "broken links:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------ 2. paths
PATH = re.compile(r"(?<![\w.\-/])(?:configs|benchmarks)/(?:\{[^{}\s]*\}|[^\s`'\"()\[\]{}|,;:])*")
PLACEHOLDER = re.compile(r"[<>*$]|\.\.\.|(?:^|/)[A-Z][A-Z0-9_]+(?:\.\w+)?(?:/|$)")


def expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if match is None:
        return [path]
    head, tail = path[:match.start()], path[match.end():]
    return list(itertools.chain.from_iterable(expand_braces(head + choice + tail)
                                              for choice in match[1].split(",")))


def mentioned_paths(page: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(page.read_text(encoding="utf-8").split("\n"), start=1):
        for match in PATH.finditer(line):
            text = match.group(0).rstrip(".")
            found += [(number, p) for p in expand_braces(text)]
    return found


@pytest.mark.parametrize("page", [p for p in pages() if p not in LOGS], ids=rel)
def test_every_configs_and_benchmarks_path_exists(page):
    missing = [f"{rel(page)}:{n}: {p}" for n, p in mentioned_paths(page)
               if not (ROOT / p).exists() and not PLACEHOLDER.search(p)]
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("page", sorted((DOCS / "api").glob("*.md")), ids=rel)
def test_every_api_reference_block_names_a_module(page):
    targets = re.findall(r"^:::\s+([\w.]+)", page.read_text(encoding="utf-8"), flags=re.M)
    missing = [t for t in targets
               if not (ROOT / (t.replace(".", "/") + ".py")).is_file()
               and not (ROOT / t.replace(".", "/") / "__init__.py").is_file()]
    assert not missing, f"{rel(page)} documents modules that do not exist: {missing}"


# ------------------------------------------------------------------------------------ 3. commands
SHELL = {"bash", "sh", "shell", "zsh"}
TRAINER_VERBS = ("fit", "validate", "predict")


def shell_commands(page: Path) -> list[tuple[int, list[str]]]:
    """``(line, argv after "dmdx")`` of every dmdx command in the page's shell blocks."""
    _, blocks = split_fences(page.read_text(encoding="utf-8"))
    commands = []
    for block in blocks:
        if block.language not in SHELL:
            continue
        joined: list[tuple[int, str]] = []
        for number, line in block.lines:
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
            else:
                joined.append((number, line.strip()))
        for number, line in joined:
            line = re.sub(r"^\$\s+", "", line)
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            segment: list[str] = []
            for token in tokens + [";"]:
                if token in ("&&", "||", ";", "|"):
                    while segment and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", segment[0]):
                        segment.pop(0)  # VAR=value prefix
                    if segment[:1] == ["dmdx"]:
                        commands.append((number, segment[1:]))
                    segment = []
                else:
                    segment.append(token)
    return commands


def all_commands() -> list:
    seen, params = set(), []
    for page in pages():
        for number, argv in shell_commands(page):
            key = tuple(argv)
            if key in seen:
                continue
            seen.add(key)
            marks = [pytest.mark.slow] if argv[:1] and argv[0] in TRAINER_VERBS else []
            params.append(pytest.param(argv, id=f"{rel(page)}:{number}", marks=marks))
    return params


def has_placeholder(argv: list[str]) -> bool:
    return any(re.search(r"[<>*$]|\.\.\.", a) or re.fullmatch(r"[A-Z][A-Z0-9_]*", a) for a in argv)


def earlier_stage_output(path: str, root: Path) -> bool:
    """``path`` does not exist and is where an earlier stage writes: under ``runs/`` or beside ``root``."""
    path = path.strip("`'\".,:;()")
    if "/" not in path:
        return False
    candidate = Path(path)
    absolute = candidate if candidate.is_absolute() else ROOT / candidate
    if absolute.exists():
        return False
    under_runs = not candidate.is_absolute() and candidate.parts[:1] == ("runs",)
    return under_runs or Path(os.path.normpath(absolute)).is_relative_to(root.parent)


def earlier_stage_input(error: Exception, root: Path) -> bool:
    """The refusal is about one missing input that an earlier stage writes (see the module docstring):
    a ``ConfigError`` whose value is such a path, or a ``SetupError`` whose message names one."""
    from dmdx_lightning.errors import ConfigError

    if isinstance(error, ConfigError):
        return isinstance(error.value, str) and earlier_stage_output(error.value, root)
    return any(earlier_stage_output(word, root) for word in str(error).split())


class _Parsed(Exception):
    pass


def check_argparse_verb(verb: str, argv: list[str]) -> None:
    """Parse ``argv`` with the verb's own argparse parser (built inside its ``main``) and stop there."""
    from dmdx_lightning.cli import LIGHT_VERBS

    module = importlib.import_module(LIGHT_VERBS[verb][0])
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)  # SystemExit(2) on an unknown flag or a missing argument
        raise _Parsed

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main(argv)
            except _Parsed:
                return
            except SystemExit as e:
                assert e.code in (0, None), f"dmdx {verb} {shlex.join(argv)}: exit {e.code}\n{err.getvalue()}"
                return


def check_trainer_verb(verb: str, argv: list[str], tmp_path: Path) -> None:
    from dmdx_lightning.configs_index import resolve_config_args

    argv = resolve_config_args(argv)  # `--config sd3/adm_4step.yaml`: a shipped config, as `dmdx` does
    shown = f"dmdx {verb} {shlex.join(argv)}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["dmdx"])  # LightningCLI warns when pytest's own arguments sit beside args=
        parse_trainer_command(verb, argv, shown, tmp_path)


def parse_trainer_command(verb: str, argv: list[str], shown: str, tmp_path: Path) -> None:
    import yaml

    from dmdx_lightning.errors import ConfigError, SetupError
    from dmdx_lightning.options import help_request
    from dmdx_lightning.preflight import check_config
    from dmdx_lightning.training_cli import DMDXCLI

    out = io.StringIO()
    if "-h" in argv or "--help" in argv:
        page = help_request(verb, argv)
        if page is not None:
            assert page.strip(), f"{shown}: empty help page"
            return
        args = [a for a in argv if a != "trainer"]  # `dmdx fit --help trainer`: LightningCLI's own page
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            DMDXCLI(args=[verb, *args])
        assert exit_.value.code in (0, None) and out.getvalue().strip(), f"{shown}: no help page"
        return
    root = tmp_path / "run"
    if not any(a.startswith("--trainer.default_root_dir") for a in argv):
        argv = [*argv, "--trainer.default_root_dir", str(root)]
    else:
        value = argv[argv.index("--trainer.default_root_dir") + 1] if "--trainer.default_root_dir" in argv \
            else next(a for a in argv if a.startswith("--trainer.default_root_dir=")).partition("=")[2]
        root = Path(value) if Path(value).is_absolute() else ROOT / value
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        DMDXCLI(args=[verb, *argv, "--print_config"])
    assert exit_.value.code in (0, None), f"{shown}: --print_config exit {exit_.value.code}"
    config = yaml.safe_load(out.getvalue())
    assert isinstance(config, dict) and "model" in config, f"{shown}: --print_config printed no config"
    try:
        with pytest.MonkeyPatch.context() as mp:
            # a Hub id counts as available: offline, `dmdx` refuses one that is not cached, and this
            # test has neither network nor weights
            mp.delenv("HF_HUB_OFFLINE", raising=False)
            check_config(config, verb)
    except (ConfigError, SetupError) as e:
        if not earlier_stage_input(e, root):
            pytest.fail(f"{shown}: refused at setup, not for an earlier stage's missing output:\n{e}")


@pytest.mark.parametrize("argv", all_commands())
def test_every_dmdx_command_shown_parses(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    if not argv:
        pytest.fail("a bare `dmdx`")
    if has_placeholder(argv):
        pytest.skip("a placeholder stands for a value the reader chooses")
    verb, rest = argv[0], argv[1:]
    if verb in ("-h", "--help"):
        from dmdx_lightning.cli import top_level_help

        assert top_level_help().strip()
    elif verb in TRAINER_VERBS:
        check_trainer_verb(verb, rest, tmp_path)
    else:
        from dmdx_lightning.cli import LIGHT_VERBS

        assert verb in LIGHT_VERBS, f"`dmdx {verb}`: no such verb (fit, validate, predict, {', '.join(LIGHT_VERBS)})"
        check_argparse_verb(verb, rest)
