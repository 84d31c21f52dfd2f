"""Generic callbacks and discriminators import no teacher family (the Teacher contract, README)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dmdx_lightning"
GENERIC = ["callbacks/metrics.py", "callbacks/samples.py", "callbacks/summary.py", "discriminators/pixel.py",
           "discriminators/latent.py", "discriminators/heads.py", "export.py", "methods", "data"]
FAMILIES = ("dmdx_lightning.teachers.digits", "dmdx_lightning.teachers.sd3", "dmdx_lightning.teachers.sdxl",
            "dmdx_lightning.teachers.mixture")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("where", GENERIC)
def test_generic_code_imports_no_teacher_family(where):
    target = PACKAGE / where
    for path in ([target] if target.is_file() else sorted(target.rglob("*.py"))):
        families = {m for m in imported_modules(path) if m.startswith(FAMILIES)}
        assert not families, f"{path.relative_to(PACKAGE)} imports {sorted(families)}"
