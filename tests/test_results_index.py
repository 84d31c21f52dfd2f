"""benchmarks/results/README.md indexes every result file, and names no file that is gone.

A file counts as named when the index links to it (``[text](target)``); links are resolved from the
index's own folder, so ``../../docs/...`` links are checked too. Web links are not.
"""

import re
from pathlib import Path
from urllib.parse import unquote

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
INDEX = RESULTS / "README.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def linked_paths() -> set[Path]:
    paths = set()
    for target in LINK.findall(INDEX.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a web link or an anchor on this page
        paths.add((RESULTS / unquote(target.split("#")[0])).resolve())
    return paths


def result_files() -> set[Path]:
    return {p.resolve() for p in RESULTS.rglob("*") if p.is_file() and p != INDEX}


def test_every_result_file_is_in_the_index():
    missing = sorted(str(p.relative_to(RESULTS)) for p in result_files() - linked_paths())
    assert not missing, (
        f"{len(missing)} file(s) in benchmarks/results are not linked from its README.md index "
        f"(add a row, or the file to its result's row): {missing}"
    )


def test_every_file_the_index_names_exists():
    gone = sorted(str(p) for p in linked_paths() if not p.exists())
    assert not gone, f"benchmarks/results/README.md links to files that do not exist: {gone}"


def test_each_row_has_a_status():
    rows = [line for line in INDEX.read_text(encoding="utf-8").splitlines()
            if line.startswith("| [")]
    assert rows, "the index has no result rows"
    for row in rows:
        status = row.rstrip(" |").rsplit("|", 1)[-1].strip()
        assert status.startswith(("current", "superseded by", "partly superseded by")), row[:80]
