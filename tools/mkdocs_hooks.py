"""MkDocs hooks for the slimc site (mkdocs.yml: ``hooks:``).

`mkdocs build` runs as a console script, so Python puts the script's folder (the environment's
``bin/``) first on ``sys.path``. That folder also holds the ``slimc`` CLI script, and
mkdocstrings' static search finds that file before the package and fails with "slimc.api.compile
could not be found". Dropping the folder from the search path lets it find the installed package.
"""

from __future__ import annotations

import sys
from pathlib import Path


def on_startup(command: str, dirty: bool) -> None:  # noqa: ARG001 - MkDocs' hook signature
    scripts = Path(sys.argv[0]).resolve().parent
    sys.path[:] = [p for p in sys.path if not (p and Path(p).resolve() == scripts and (scripts / "slimc").exists())]
