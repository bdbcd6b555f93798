"""The repository's folders and the installed package agree, and no folder shadows a dependency.

The source folders are mapped to `slimc.*` import names in pyproject.toml. Two ways this went wrong:
a new sub-package missing from the mapping (the built wheel lacks it; the editable install hides
that), and a top-level folder named like another distribution's module (`kernels/` shadowed
Hugging Face's ``kernels``, which transformers 5.25 imports, for any process started in the
repository root, `python -m pytest` included).
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_every_source_package_is_in_the_wheel():
    config = _setuptools()
    folders = {Path(folder) for folder in config["package-dir"].values()}
    packaged = set(config["packages"])
    assert packaged == set(config["package-dir"]), "packages and package-dir name different packages"
    top = {Path(f).parts[0] for f in folders}
    missing = []
    for init in ROOT.glob("*/**/__init__.py"):
        folder = init.parent.relative_to(ROOT)
        if folder.parts[0] in top and folder not in folders:
            missing.append(str(folder))
    assert not missing, f"source packages missing from pyproject.toml's package-dir/packages: {missing}"


def test_no_top_level_folder_shadows_an_installed_module():
    installed = importlib.metadata.packages_distributions()
    shadowing = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name in installed]
    assert not shadowing, (f"top-level folders {shadowing} have the import name of installed distributions "
                           f"({[installed[n] for n in shadowing]}): rename them (pyproject maps folders to slimc.*)")
