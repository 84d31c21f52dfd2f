"""What is committed holds nothing of the machine it was written on (a run's resolved config, a
scratch path): such a path works on that machine only and leaks its layout."""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# documented defaults that are the same on every machine, each with where it is set
ALLOWED = {
    "/tmp/dmdx-slurm",  # scripts/local_slurm.sh: default $DMDX_SLURM_DIR of the local test cluster
}


def machine_path_pattern() -> re.Pattern:
    prefixes = {"/work", "/home", "/tmp", str(ROOT), tempfile.gettempdir()}
    if Path.home() != Path("/"):
        prefixes.add(str(Path.home()))
    # a prefix followed by a path segment, not preceded by a path or URL character (https://x.org/home/...)
    alternatives = "|".join(re.escape(p.rstrip("/")) for p in sorted(prefixes, key=len, reverse=True))
    return re.compile(rf"(?<![\w.~$/])(?:{alternatives})/[\w.-]+")


def tracked_text_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, names.split(b"\0")):
        path = ROOT / os.fsdecode(name)
        if not path.is_file():  # deleted in the working tree, not yet in a commit
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary: weights, images
            continue
        yield path.relative_to(ROOT), data.decode("utf-8", errors="replace")


def test_no_tracked_file_holds_an_absolute_path_of_this_machine():
    pattern = machine_path_pattern()
    found = []
    for path, text in tracked_text_files():
        for number, line in enumerate(text.splitlines(), 1):
            found += [f"{path}:{number}: {m.group(0)}" for m in pattern.finditer(line) if m.group(0) not in ALLOWED]
    assert not found, "machine-specific absolute paths in tracked files:\n" + "\n".join(found[:20])
