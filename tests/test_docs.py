"""The docs follow the code: every pass, target and backend has a page, every pass option has help
text, and each pass page's options table is what tools/gen_docs.py generates from the class today.

The MkDocs build itself (broken links, pages missing from the navigation) is checked by
``mkdocs build --strict`` in .ci/run; here only what needs no docs extra installed.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Literal, Optional

import pytest

from slimc import passes
from slimc.backends.targets import TARGETS
from slimc.pipeline import Pass
from slimc.tools import gen_docs

ROOT = Path(__file__).resolve().parents[1]


def test_docs_are_complete_and_fresh():
    problems = gen_docs.check(ROOT)
    assert not problems, "docs out of date:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", passes.names())
def test_every_pass_page_lists_every_option(name):
    page = (ROOT / "docs" / "passes" / f"{name}.md").read_text(encoding="utf-8")
    table = page[page.index(gen_docs.BEGIN): page.index(gen_docs.END)]
    for field in dataclasses.fields(passes.get(name)):
        assert f"| `{field.name}` |" in table, f"docs/passes/{name}.md does not list option {field.name}"


def test_every_target_and_backend_has_a_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = [f"passes/{n}.md" for n in passes.names()] + [f"targets/{n}.md" for n in TARGETS]
    pages += [f"backends/{n}.md" for n in gen_docs.BACKENDS]
    missing = [p for p in pages if p not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def _copy_docs(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "docs" / "passes", tmp_path / "docs" / "passes")
    for kind in ("targets", "backends"):
        shutil.copytree(ROOT / "docs" / kind, tmp_path / "docs" / kind)
    return tmp_path


def test_a_field_added_without_regenerating_makes_the_table_stale(tmp_path, monkeypatch):
    root = _copy_docs(tmp_path)
    cleanup = passes.get("cleanup")

    @dataclasses.dataclass
    class Grown(cleanup):
        """Cleanup with one more option.

        Options:
            fold_constants: as cleanup.
            cse: as cleanup.
            dedupe_initializers: as cleanup.
            fold_size_limit: as cleanup.
            keep_names: a new option nobody documented in the page yet.
        """

        keep_names: bool = False

    real = gen_docs.pass_classes
    monkeypatch.setattr(gen_docs, "pass_classes", lambda: {**real(), "cleanup": Grown})
    problems = gen_docs.check(root)
    assert any("cleanup.md: the options table is stale" in p for p in problems), problems
    gen_docs.generate(root)  # regenerating fixes it
    assert not [p for p in gen_docs.check(root) if "cleanup" in p]
    assert "| `keep_names` | bool | `false` |" in (root / "docs" / "passes" / "cleanup.md").read_text(encoding="utf-8")


def test_a_registered_pass_without_a_page_or_help_is_reported(tmp_path, monkeypatch):
    root = _copy_docs(tmp_path)

    @dataclasses.dataclass
    class NewPass(Pass):
        """A pass someone registered without docs."""

        strength: float = 0.5

        name = "newpass"

    real = gen_docs.pass_classes
    monkeypatch.setattr(gen_docs, "pass_classes", lambda: {**real(), "newpass": NewPass})
    problems = gen_docs.check(root)
    assert any("pass 'newpass' has no page" in p for p in problems), problems
    assert any("option 'strength' has no help text" in p for p in problems), problems


def test_a_target_without_a_page_is_reported(tmp_path, monkeypatch):
    root = _copy_docs(tmp_path)
    (root / "docs" / "targets" / "ncnn.md").unlink()
    assert "target 'ncnn' has no page: write docs/targets/ncnn.md" in gen_docs.check(root)


def test_help_for_an_option_that_does_not_exist_is_reported(tmp_path, monkeypatch):
    root = _copy_docs(tmp_path)
    cleanup = passes.get("cleanup")

    @dataclasses.dataclass
    class Renamed(cleanup):
        """Cleanup with a renamed option.

        Options:
            fold_constants: a.
            cse: b.
            dedupe_initializers: c.
            fold_size_limit: d.
            fold_limit: an old name left behind.
        """

    monkeypatch.setattr(gen_docs, "pass_classes", lambda: {"cleanup": Renamed})
    assert any("documents 'fold_limit', which is not an option" in p for p in gen_docs.check(root))


def test_option_help_parses_continuation_lines_and_stops_at_the_next_section():
    class Doc:
        """Summary.

        Options:
            alpha: first line
                continued here.
            beta: one line.

        Notes:
            not an option: text.
        """

    assert gen_docs.option_help(Doc) == {"alpha": "first line continued here.", "beta": "one line."}


def test_the_table_shows_types_defaults_and_allowed_values():
    @dataclasses.dataclass
    class Opts(Pass):
        """Two options.

        Options:
            mode: how | which.
            limit: a bound.
        """

        mode: Literal["auto", "fast"] = "auto"
        limit: Optional[float] = None

        name = "opts"

    table = gen_docs.options_table(Opts)
    assert "| `mode` | str | `auto` | `auto`, `fast` | how \\| which. |" in table
    assert "| `limit` | float or none | `none` | — | a bound. |" in table


def test_pass_pages_link_only_to_existing_pages():
    """A cheap subset of mkdocs --strict that runs without the docs extra: relative .md links resolve."""
    broken = []
    for page in (ROOT / "docs").rglob("*.md"):
        for link in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not link.startswith("http") and not (page.parent / link).resolve().is_file():
                broken.append(f"{page.relative_to(ROOT)} -> {link}")
    assert not broken, broken


def test_slimc_passes_prints_the_same_help_as_the_docs(capsys):
    from slimc.tools.cli import main

    assert main(["passes"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the help is wrapped over lines
    for name in passes.names():
        for option, text in gen_docs.option_help(passes.get(name)).items():
            assert " ".join(text.split()) in out, f"slimc passes does not show the help of {name}.{option}"
