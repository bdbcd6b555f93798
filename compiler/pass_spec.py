"""Parse pipeline specs such as ``"prune(ratio=0.3, round_to=8, ignore=[head*]),int8"``.

Grammar (whitespace is free)::

    pipeline := item ("," item)*
    item     := NAME | NAME "(" [option ("," option)*] ")"
    option   := NAME "=" value
    value    := number | true | false | none | 'quoted' | "quoted" | bare-word
              | "[" [value ("," value)*] "]" | "{" [NAME ":" value ("," ...)*] "}"

Lists and mappings nest at most `MAX_NESTING` levels deep, and a quote must be closed: a spec
that breaks either rule is a `PassConfigError`, never a crash or a silently truncated value.
Values are coerced to the option's declared type (int, float, bool, str, Literal choices,
lists, dicts, optionals); anything that does not fit raises `PassConfigError` naming the pass,
the option, the expected type and the valid options with their defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from typing import Any

from slimc import passes
from slimc.errors import PassConfigError
from slimc.pipeline import Pass

# A bare word holds no quote: a quote that is never closed must not be read as a word (it would
# lose its last character as if it were the closing quote).
_TOKEN = re.compile(r"\s*(?:(?P<str>'[^']*'|\"[^\"]*\")|(?P<punct>[()\[\]{},=:])|(?P<word>[^\s()\[\]{},=:'\"]+))")
MAX_NESTING = 16  # lists in lists in ...: no pass option needs more than 2


def _tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            rest = text[pos:].lstrip()
            if rest[:1] in ("'", '"'):
                raise PassConfigError(f"in pass spec: the quote {rest[0]} at '{_cut(rest)}' is never closed; "
                                      f"close it ({rest[0]}...{rest[0]}) or drop it.")
            raise PassConfigError(f"cannot parse pass spec at '{_cut(rest)}'.")
        tokens.append(match.group(match.lastgroup))
        pos = match.end()
    return tokens


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            want = f"'{expected}'" if expected else "more input"
            raise PassConfigError(f"in pass spec '{_cut(self.text, 200)}': expected {want}, got {tok or 'end of text'}.")
        self.i += 1
        return tok

    def pipeline(self) -> list[tuple[str, dict[str, Any]]]:
        items = [self.item()]
        while self.peek() == ",":
            self.take(",")
            items.append(self.item())
        if self.peek() is not None:
            raise PassConfigError(f"in pass spec '{_cut(self.text, 200)}': unexpected '{self.peek()}'.")
        return items

    def item(self) -> tuple[str, dict[str, Any]]:
        name, options = self.take(), {}
        if self.peek() == "(":
            self.take("(")
            while self.peek() != ")":
                key = self.take()
                self.take("=")
                if key in options:
                    raise PassConfigError(f"pass '{name}': option '{key}' given twice.")
                options[key] = self.value()
                if self.peek() != ")":
                    self.take(",")
            self.take(")")
        return name, options

    def value(self, depth: int = 0) -> Any:
        tok = self.take()
        if tok in ("[", "{") and depth >= MAX_NESTING:  # a recursive parser: deep nesting must not reach Python's stack limit
            raise PassConfigError(f"in pass spec: lists or mappings nested more than {MAX_NESTING} levels deep; "
                                  "no pass option takes more than a list of lists.")
        if tok == "[":
            items = []
            while self.peek() != "]":
                items.append(self.value(depth + 1))
                if self.peek() != "]":
                    self.take(",")
            self.take("]")
            return items
        if tok == "{":
            mapping = {}
            while self.peek() != "}":
                key = self.take()
                key = key[1:-1] if key[0] in "'\"" else key  # a quoted key (a glob such as 'layers.3.*') unquoted
                self.take(":")
                mapping[key] = self.value(depth + 1)
                if self.peek() != "}":
                    self.take(",")
            self.take("}")
            return mapping
        if tok.isdigit() and self.peek() == ":" and self.i + 1 < len(self.tokens) and self.tokens[self.i + 1].isdigit():
            self.take(":")  # an N:M ratio such as pattern=2:4 stays the string "2:4"
            return f"{tok}:{self.take()}"
        return _scalar(tok)


def _scalar(tok: str) -> Any:
    if tok[0] in "'\"":
        return tok[1:-1]
    lowered = tok.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(tok)
        except ValueError:
            pass
    return tok


def parse_pipeline(spec: str | list | tuple) -> list[Pass]:
    """Build pass instances from a spec string, or a list of strings / `Pass` / (name, options)."""
    return check_order(_build(spec))


def check_order(pipeline: list[Pass]) -> list[Pass]:
    """Refuse a pass after `fuse` that cannot handle its fused ONNX Runtime ops (it needs the unfused graph)."""
    fused_at = next((i for i, p in enumerate(pipeline) if p.name == "fuse"), None)
    if fused_at is not None:
        for later in pipeline[fused_at + 1:]:
            if not getattr(later, "runs_after_fuse", False):
                order = [p.name for p in pipeline[:fused_at]] + [later.name] + ["fuse"]
                raise PassConfigError(
                    f"pass '{later.name}' comes after 'fuse', but it works on the unfused graph (fuse replaces norms and "
                    f"rotary embeddings by ONNX Runtime fused ops it does not read). Put fuse last, e.g. "
                    f"--passes {','.join(order)}.")
    return pipeline


def _build(spec: str | list | tuple) -> list[Pass]:
    if isinstance(spec, str):
        if not spec.strip():
            raise PassConfigError(f"empty pass list. Available passes: {', '.join(passes.names())}.")
        return [build_pass(name, opts) for name, opts in _Parser(spec).pipeline()]
    built: list[Pass] = []
    for item in spec:
        if isinstance(item, Pass):
            built.append(item)
        elif isinstance(item, str):
            built.extend(_build(item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
            built.append(build_pass(item[0], item[1]))
        else:
            raise PassConfigError(f"cannot use {item!r} as a pass: give a name, a spec string or a Pass.")
    return built


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Resolving string annotations compiles each one: once per pass class is enough.
    return typing.get_type_hints(cls)


def build_pass(name: str, options: dict[str, Any]) -> Pass:
    """Instantiate pass ``name`` with ``options`` coerced to its declared option types."""
    cls = passes.get(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for key, raw in options.items():
        if key not in fields:
            raise PassConfigError(f"pass '{name}' has no option '{key}'. Valid options: {describe_options(cls)}.")
        try:
            kwargs[key] = coerce(raw, hints[key])
        except (TypeError, ValueError) as exc:
            raise PassConfigError(
                f"pass '{name}', option '{key}': {exc}. Valid options: {describe_options(cls)}."
            ) from None
    try:
        return cls(**kwargs)
    except PassConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise PassConfigError(f"pass '{name}': {exc}") from None


def coerce(value: Any, annotation: Any) -> Any:
    """Convert a parsed literal to ``annotation``; raise ValueError saying what was expected."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(" or ".join(errors))
    if origin is typing.Literal:
        if value is None and "none" in args:
            return "none"  # the parser reads a bare `none` as None; here it is one of the choices
        if value not in args:
            raise ValueError(f"expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, tuple) or annotation in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = args[0] if args else Any
        return [coerce(v, inner) for v in items] if origin is not tuple else tuple(coerce(v, inner) for v in items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping like {{key: value}}, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {coerce(k, kt): coerce(v, vt) for k, v in value.items()}
    return _coerce_scalar(value, annotation)


def _coerce_scalar(value: Any, annotation: Any) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # nan passes every range check (all comparisons are False)
                raise ValueError(f"expected a finite number, got {value!r}")
            return float(value)
        raise ValueError(f"expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (list, dict)):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    return value


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin is typing.Union or (origin is not None and type(None) in args):
        return " or ".join(type_name(a) for a in args if a is not type(None)) + " or none"
    if origin in (list, tuple):
        return f"[{type_name(args[0]) if args else 'any'}, ...]"
    if origin is dict:
        return "{" + (f"{type_name(args[0])}: {type_name(args[1])}" if args else "key: value") + "}"
    return getattr(annotation, "__name__", str(annotation))


def option_table(cls: type) -> list[tuple[str, str, Any]]:
    """(name, type, default) of every option of pass class ``cls``."""
    hints = _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        rows.append((f.name, type_name(hints[f.name]), default))
    return rows


def describe_options(cls: type) -> str:
    rows = option_table(cls)
    return ", ".join(f"{n}: {t} = {d!r}" for n, t, d in rows) if rows else "(this pass has no options)"
