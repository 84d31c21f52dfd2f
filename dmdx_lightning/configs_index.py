"""The shipped configs: where they are, what each runs, and ``--config NAME`` for any of them.

``dmdx configs`` lists them (one line each, grouped by folder); ``dmdx configs NAME`` prints one
config's header and path; ``dmdx configs --markdown`` writes the same list as the page
``docs/configs.md``. Light on purpose (no torch, no Lightning, no YAML parser): it is a verb that
needs no Trainer, and :func:`dmdx_lightning.cli.main` calls :func:`resolve_config_args` before the
Trainer verbs import anything.

**Shipping.** The configs stay where every README command, test and page names them, the
checkout's top-level ``configs/``; ``dmdx_lightning/configs`` is a symlink to it (git stores the
link), and ``pyproject.toml`` declares ``configs/**/*.yaml``, ``configs/prompts/*.txt`` and
``configs/slurm/*.sbatch`` as package data. setuptools copies package data through the link, so a
wheel and an sdist hold real files under ``dmdx_lightning/configs/`` (checked with
``pip install`` into a fresh venv). One folder, nothing copied to keep in sync and no build step of
our own. The alternative, moving ``configs/`` into the package and leaving the symlink the other
way round, ships the same files but would move every tracked config while other work refers to
the current paths. A checkout whose file system has no symlinks (git then writes the link as a
small text file) falls back to ``<checkout>/configs`` (:func:`configs_dir`).

**Names.** ``--config X`` reads the file ``X`` when it exists, as before. Otherwise ``X`` is the
name of a shipped config: ``sd3/adm_4step.yaml``, ``quickstart/adm.yaml``, also in the checkout's form
``configs/sd3/adm_4step.yaml`` (so README commands work from any folder), ``.yaml`` optional. A local
file wins, so a copied and edited config is never shadowed; an unknown name is a
:class:`~dmdx_lightning.errors.SetupError` naming the closest shipped names (did you mean).

**Files a config reads.** A shipped config names the prompt files it reads as
``${dmdx.configs:prompts/eval.txt}``: the omegaconf resolver ``dmdx.configs`` (registered by
:class:`~dmdx_lightning.training_cli.DMDXCLI`, function :func:`packaged_path`) gives the shipped
file, so the config reads the same prompts from any folder. A plain relative path would be read
from the current folder, which after ``pip install`` holds no ``configs/``.

**Headers.** Every config starts with a comment: a first line (or sentence) that says what it runs,
with its stage and steps, then ``Needs:`` (inputs, GPUs, memory: measured numbers with their
source, else "not measured"), ``Writes:`` and ``Run:`` (the commands). The listing shows the first
sentence; a config whose ``Run:`` command adds it after another ``--config`` is an overlay on that
one, and the listing says so (``tests/test_packaged_configs.py`` checks both).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from itertools import groupby
from pathlib import Path
from typing import Sequence

from dmdx_lightning.errors import SetupError

#: the folder groups of the listing, in order, with what they hold (a folder not named here is
#: listed after these, under its own name)
GROUPS: dict[str, str] = {
    "sd3": "SD3-Medium and SD3.5-Large: ODE pairs, ADP, ADM (the paper's 4-step rows), DMD / DMD2 baselines, our best ADM",
    "sdxl": "SDXL: one-step DMDX (pairs -> ADP -> ADM), 4-step ADM, DMD / DMD2 baselines, our best ADM",
    "sd15": "Stable Diffusion 1.5: DMD2's two-stage one-step recipe (DMD, then DMD + GAN), one-step DMDX (pairs -> ADP -> ADM)",
    "flux": "FLUX.1-dev (guidance embedding) / FLUX.1-schnell: ODE pairs, ADP, 4-step ADM and DMD2 on dev, 2-step ADM on schnell",
    "cogvideox": "CogVideoX-2b / 5b text-to-video: ODE pairs, ADM (the paper's 8 steps), DMD / DMD2 baselines, our best ADM",
    "wan": "Wan 2.1 T2V 1.3B / 14B text-to-video: ODE pairs, ADP, 4-step ADM (LoRA; 14B too), DMD2 baseline",
    "quickstart": "the built-in digits teacher: the DMDX chain pairs -> ADP -> ADM (CPU, minutes)",
    "digits": "the digits teacher: baselines, ablation A1, training the packaged teacher and classifier",
    "mixture": "the exact Gaussian-mixture testbed (CPU)",
    "trainer": "trainer settings: overlays added after any config with a second --config",
}
#: names the large-teacher configs had before they were grouped by teacher (0.1.0): ``--config``
#: still takes them (``configs/adm_sd3.yaml`` or ``adm_sd3.yaml``), from any folder
RENAMED: dict[str, str] = {
    "ode_pairs_sd3.yaml": "sd3/ode_pairs.yaml",
    "adp_sd3.yaml": "sd3/adp_4step.yaml",
    "adm_sd3.yaml": "sd3/adm_4step.yaml",
    "adm_best_sd3_4step.yaml": "sd3/adm_best_4step.yaml",
    "dmd_sd3_4step.yaml": "sd3/dmd_4step.yaml",
    "dmd2_sd3_4step.yaml": "sd3/dmd2_4step.yaml",
    "adm_sd35_large.yaml": "sd3/adm_sd35_large_4step.yaml",
    "ode_pairs_sdxl.yaml": "sdxl/ode_pairs.yaml",
    "adp_sdxl.yaml": "sdxl/adp_1step.yaml",
    "adm_sdxl.yaml": "sdxl/dmdx_1step.yaml",
    "adm_sdxl_4step.yaml": "sdxl/adm_4step.yaml",
    "adm_best_sdxl_4step.yaml": "sdxl/adm_best_4step.yaml",
    "dmd_sdxl_1step.yaml": "sdxl/dmd_1step.yaml",
    "dmd_sdxl_4step.yaml": "sdxl/dmd_4step.yaml",
    "dmd2_sdxl.yaml": "sdxl/dmd2_1step_full.yaml",
    "dmd2_sdxl_4step.yaml": "sdxl/dmd2_4step.yaml",
    "ode_pairs_cogvideox_2b.yaml": "cogvideox/ode_pairs_2b.yaml",
    "adm_cogvideox_2b.yaml": "cogvideox/adm_2b_8step.yaml",
    "adm_cogvideox_5b.yaml": "cogvideox/adm_5b_8step.yaml",
    "adm_best_cogvideox_2b_8step.yaml": "cogvideox/adm_best_2b_8step.yaml",
    "dmd_cogvideox_2b_8step.yaml": "cogvideox/dmd_2b_8step.yaml",
    "dmd2_cogvideox_2b_8step.yaml": "cogvideox/dmd2_2b_8step.yaml",
}
#: the labelled parts every header has
HEADER_LABELS = ("Needs:", "Writes:", "Run:")
_CONFIG_ARG = re.compile(r"(?:--config|-c)(?:=|\s+)(\S+)")


def configs_dir() -> Path:
    """The folder of the shipped configs: ``dmdx_lightning/configs`` (the wheel's copy, or in a
    checkout the symlink to ``configs/``), else the checkout's ``configs/``."""
    packaged = Path(__file__).resolve().parent / "configs"
    return (packaged if packaged.is_dir() else packaged.parent.parent / "configs").resolve()


def packaged_path(relative: str = "") -> str:
    """The config resolver ``dmdx.configs``: ``${dmdx.configs:prompts/eval.txt}`` is the shipped
    file ``prompts/eval.txt`` of :func:`configs_dir`.

    Relative to the current folder when it lies below it (in a checkout: ``configs/prompts/eval.txt``,
    the value the configs held before), else absolute. Whether the file exists is the reader's to say
    (preflight names the key and the path).
    """
    path = (configs_dir() / relative).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class ShippedConfig:
    """One shipped YAML: its ``--config`` name and what its header says."""

    name: str  #: as ``--config`` takes it: ``sd3/adm_4step.yaml``, ``quickstart/adm.yaml``
    path: Path

    @property
    def group(self) -> str:
        return self.name.rpartition("/")[0]

    @cached_property
    def header(self) -> list[str]:
        """The leading comment block, one entry per line, without the ``#`` and one space."""
        lines = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            lines.append(line[1:].removeprefix(" ").rstrip())
        return lines

    @property
    def purpose(self) -> str:
        """What it runs: the first sentence of the header's first paragraph (which ends at a blank,
        indented or labelled line)."""
        text = []
        for line in self.header:
            if not line.strip() or line.startswith((" ", *HEADER_LABELS)):
                break
            text.append(line.strip())
        sentence = " ".join(text)
        end = re.search(r"\.(\s|$)", sentence)
        return sentence[:end.start()] if end else sentence

    @property
    def commands(self) -> list[str]:
        """The commands the header shows (``dmdx ...`` lines, trailing comments dropped)."""
        found = []
        for line in self.header:
            text = line.strip()
            if text.startswith(("dmdx ", "srun ", "sbatch ")):
                found.append(text.split("  #")[0].strip())
        return found

    @property
    def overlay_on(self) -> tuple[str, ...]:
        """The configs this one is added after (``--config BASE --config THIS``) in its commands:
        non-empty for an overlay, which holds only what differs from its base."""
        bases: list[str] = []
        for command in self.commands:
            names = [_shipped_form(value) for value in _CONFIG_ARG.findall(command)]
            if self.name in names[1:] and names[0] not in bases:
                bases.append(names[0])
        return tuple(bases)

    def missing_labels(self) -> list[str]:
        """The labelled parts (:data:`HEADER_LABELS`) this header lacks."""
        return [label for label in HEADER_LABELS if not any(line.startswith(label) for line in self.header)]


def _shipped_form(value: str) -> str:
    """``configs/x.yaml`` and ``./configs/x.yaml`` -> ``x.yaml``: the name ``--config`` takes."""
    value = value.replace("\\", "/").removeprefix("./")
    return value.removeprefix("configs/")


def shipped() -> list[ShippedConfig]:
    """Every shipped config, grouped as the listing shows them (:data:`GROUPS` order, then other
    folders; names sorted within a group)."""
    root = configs_dir()
    configs = [ShippedConfig(p.relative_to(root).as_posix(), p) for p in root.rglob("*.yaml")]
    order = list(GROUPS)
    return sorted(configs, key=lambda c: (order.index(c.group) if c.group in order else len(order), c.group, c.name))


def shipped_names() -> list[str]:
    return [c.name for c in shipped()]


def resolve_config(value: str) -> str:
    """The file ``--config value`` reads: ``value`` when it is a file, else the shipped config of
    that name (see the module's docstring). Raises :class:`~dmdx_lightning.errors.SetupError`
    with the closest shipped names when it is neither."""
    if os.path.isfile(value):
        return value
    if not os.path.isabs(value):
        name = _shipped_form(value)
        name = RENAMED.get(name, RENAMED.get(f"{name}.yaml", name))
        for candidate in (name, f"{name}.yaml"):
            path = shipped_file(candidate)
            if path is not None and path.suffix in (".yaml", ".yml"):
                return str(path)
    raise SetupError(f"--config {value}: no such file in {os.getcwd()}, and no shipped config of that name."
                     f"{did_you_mean(value)} `dmdx configs` lists the shipped configs.")


def shipped_file(value: str) -> Path | None:
    """The shipped file ``value`` names (``configs/prompts/x.txt``, ``prompts/x.txt``), or ``None``."""
    name = _shipped_form(value)
    if os.path.isabs(name) or ".." in Path(name).parts:  # names only: never a path out of the folder
        return None
    path = configs_dir() / name
    return path if path.is_file() else None


def did_you_mean(value: str) -> str:
    """`` Did you mean A or B?`` among the shipped names (same file name in another folder first),
    or ``""``."""
    names = shipped_names()
    wanted = re.sub(r"\.ya?ml$", "", _shipped_form(value)) + ".yaml"
    base = wanted.rpartition("/")[2]
    same_file = [n for n in names if n.rpartition("/")[2] == base]
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.6)
    close += difflib.get_close_matches(base, [n.rpartition("/")[2] for n in names], n=3, cutoff=0.75)
    by_file = {n.rpartition("/")[2]: n for n in names}
    picks = list(dict.fromkeys(same_file + [by_file.get(n, n) for n in close]))[:3]
    if not picks:
        return ""
    return f" Did you mean {', '.join(picks[:-1]) + ' or ' if len(picks) > 1 else ''}{picks[-1]}?"


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--config X`` / ``-c X`` / ``--config=X`` resolved by :func:`resolve_config`
    (files given as paths are left as they are)."""
    out, it = [], iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag not in ("-c", "--config"):
            out.append(arg)
            continue
        if not eq:
            value = next(it, None)
            if value is None:  # `--config` last: the parser says what is missing
                out.append(arg)
                break
        resolved = resolve_config(value)
        out += [f"{flag}={resolved}"] if eq else [flag, resolved]
    return out


def index_text() -> str:
    """What ``dmdx configs`` prints: every shipped config with its purpose, grouped by folder."""
    configs = shipped()
    width = max(len(c.name.rpartition("/")[2]) for c in configs)
    lines = ["Shipped configs: dmdx fit|validate|predict --config NAME (from any folder; a file of that name",
             "in the current folder wins). `dmdx configs NAME` shows one's header: what it needs, writes, runs."]
    for group, members in groupby(configs, key=lambda c: c.group):
        lines += ["", f"{group + '/' if group else '(top level)'}  {GROUPS.get(group, '')}".rstrip()]
        for config in members:
            mark = _overlay_mark(config)
            lines.append(f"  {config.name.rpartition('/')[2]:<{width}}  {config.purpose}{' ' + mark if mark else ''}")
    lines += ["", f"Folder: {configs_dir()}"]
    return "\n".join(lines)


def _overlay_mark(config: ShippedConfig) -> str:
    """``[overlay on BASE]`` (none in trainer/, whose title says they all are, on any config)."""
    if config.group == "trainer" or not config.overlay_on:
        return ""
    return f"[overlay on {', '.join(config.overlay_on)}]"


def markdown() -> str:
    """The page ``docs/configs.md``: the listing as one table per folder, then every header in full."""
    configs = shipped()
    out = ["# Shipped configs", "",
           "<!-- Generated by `dmdx configs --markdown > docs/configs.md` (dmdx_lightning/configs_index.py);",
           "     tests/test_packaged_configs.py fails when it is out of date. -->", "",
           "Every config below ships inside the package. `--config NAME` takes the name as listed "
           "(`sd3/adm_4step.yaml`, `quickstart/adm.yaml`, or the checkout's form `configs/sd3/adm_4step.yaml`) "
           "and works from any folder after `pip install`; a file of that name in the current folder "
           "wins, so a copied and edited config is the one read. `dmdx configs` prints this list, "
           "`dmdx configs NAME` one config's header.", "",
           "An *overlay* holds only what differs from a base config and is added after it: "
           "`dmdx fit --config quickstart/adm.yaml --config digits/dmd.yaml`. The prompt files the "
           "configs read ship with them (`prompts/`); a config names them as "
           "`${dmdx.configs:prompts/eval.txt}`, the shipped file wherever the command runs.", ""]
    for group, members in groupby(configs, key=lambda c: c.group):
        out += [f"## `{group}/`" if group else "## Top level", ""]
        if GROUPS.get(group):
            out += [GROUPS[group][0].upper() + GROUPS[group][1:] + ".", ""]
        out += ["| config | what it runs | overlay |", "|---|---|---|"]
        for config in members:
            overlay = "yes" if group == "trainer" else ", ".join(f"on `{b}`" for b in config.overlay_on)
            out.append(f"| [`{config.name}`](#{_anchor(config.name)}) | {_cell(config.purpose)} | {overlay} |")
        out.append("")
    out += ["## Headers", "", "Each config's header as the file holds it.", ""]
    for config in configs:
        out += [f"### {config.name}", "", f"[`configs/{config.name}`](../configs/{config.name})", "",
                "```text", *config.header, "```", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _anchor(name: str) -> str:
    """The heading id mkdocs' toc extension gives ``### name``."""
    return re.sub(r"[^\w\- ]", "", name.lower()).strip().replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def describe(name: str) -> str:
    """What ``dmdx configs NAME`` prints: the config's path and header."""
    path = Path(resolve_config(name)).resolve()
    return "\n".join([str(path), "", *(f"# {line}".rstrip() for line in
                                       ShippedConfig(name, path).header)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dmdx configs",
        description="List the configs shipped with dmdx_lightning, grouped by folder, with what each runs. "
                    "Any listed NAME works as `dmdx fit --config NAME` from any folder.")
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="print this config's path and header (what it runs, needs, writes; the commands)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the list as the Markdown page docs/configs.md")
    args = parser.parse_args(argv)
    if args.name:
        try:
            print(describe(args.name))
        except SetupError as e:
            from dmdx_lightning.cli import fail

            fail(str(e), e)
        return
    sys.stdout.write(markdown() if args.markdown else index_text() + "\n")
