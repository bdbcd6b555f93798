"""The `slimc` command line, the demo, and benchmark tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def comma_names(text: str, known, what: str, parser) -> list[str]:
    """``"a,b"`` -> ["a", "b"], each one of ``known``; otherwise ``parser.error`` with the valid names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


def write_json(result: Any, out: Path | None) -> None:
    """A benchmark's results as JSON (inf/nan as strings), its folder made; also after each step of a long run."""
    from slimc.receipt import json_safe

    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_safe(result), indent=2) + "\n")


def write_results(result: Any, table: str, out: Path | None, markdown: Path | None) -> None:
    """What every benchmark tool ends with: print the table, write the JSON (see `write_json`) and the table."""
    print(table)
    write_json(result, out)
    if markdown is not None:
        markdown.write_text(table)
