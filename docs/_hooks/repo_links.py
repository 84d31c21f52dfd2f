"""mkdocs hook: relative links from docs/ to repository files outside docs/.

The pages link benchmark results and configs as the repository holds them
(``../../benchmarks/results/quality.md`` from ``docs/reports/adm_study.md``), so the links work on
the repository page as written. mkdocs knows only the files under ``docs/`` and warns on each such
link, which ``--strict`` turns into a failure. This hook:

- drops that warning when the link's target is an existing file of the repository outside
  ``docs/`` (a missing target still warns, so ``--strict`` still fails on it);
- copies every such linked file into ``site/`` at its repository-relative path. With
  ``use_directory_urls`` (the default) a page ``docs/a/b.md`` is served at ``/a/b/``, one folder
  deeper than its source, so ``../../benchmarks/x.md`` written from it resolves to
  ``/benchmarks/x.md`` on the built site, where the copy is.

``tests/test_docs.py`` checks the same links without mkdocs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

NOT_FOUND = re.compile(r"Doc file '(?P<src>[^']+)' contains a link '(?P<url>[^']+)', but the target")

_linked: set[Path] = set()


class _RepositoryLinks(logging.Filter):
    """Drops mkdocs' "not found among documentation files" warning for existing repository files."""

    def __init__(self, docs_dir: Path) -> None:
        super().__init__()
        self.docs_dir = Path(os.path.abspath(docs_dir))
        self.root = self.docs_dir.parent

    def filter(self, record: logging.LogRecord) -> bool:
        match = NOT_FOUND.search(record.getMessage())
        if match is None:
            return True
        target = self.repository_file(match["src"], match["url"])
        if target is None:
            return True
        _linked.add(target.relative_to(self.root))
        return False

    def repository_file(self, src: str, url: str) -> Path | None:
        path = unquote(urlsplit(url).path)
        target = Path(os.path.normpath((self.docs_dir / src).parent / path))
        inside_repository = self.root in target.parents
        inside_docs = self.docs_dir in target.parents
        return target if inside_repository and not inside_docs and target.is_file() else None


_filter: _RepositoryLinks | None = None


def on_config(config, **kwargs):
    global _filter
    logger = logging.getLogger("mkdocs.structure.pages")
    if _filter is not None:  # `mkdocs serve` calls this again on every rebuild
        logger.removeFilter(_filter)
    _filter = _RepositoryLinks(Path(config["docs_dir"]))
    logger.addFilter(_filter)
    _linked.clear()
    return config


def on_post_build(config, **kwargs) -> None:
    root = Path(os.path.abspath(config["docs_dir"])).parent
    site = Path(config["site_dir"])
    for relative in sorted(_linked):
        destination = site / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, destination)
