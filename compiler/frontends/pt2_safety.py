"""What a `.pt2` archive may hold before slimc reads it: no pickles, no code, known ops only.

``torch.export.load`` runs code from the file in several places, each closed here:

- pickles: the sample inputs (``data/sample_inputs/*.pt``, read with ``torch.load`` that falls
  back to ``weights_only=False``), legacy ``.pt`` weights and constants, weights of tensor
  subclasses, and custom/opaque objects among the constants. slimc never reads the sample
  inputs and refuses an archive holding any other pickle;
- symbolic shapes (``expr_str``) go through ``sympy.sympify``, which is ``eval``: every
  expression must tokenize to sympy constructors, symbol names, numbers and operators;
- tree-spec contexts can import a module by name (enums, ``defaultdict`` factories): refused;
- ``guards_code`` is Python source compiled into a guard function: dropped unread;
- op targets are looked up by dotted name under ``torch``/``operator``/``math`` (``torch.os.system``
  resolves too): after deserialising, every call must be a registered torch op, a higher-order
  op, or a listed arithmetic/symbolic-shape function.
"""

from __future__ import annotations

import io
import json
import math
import operator
import re
import tokenize
from typing import Any

from slimc.errors import UnsafeModelError

_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Mul", "Add", "Pow", "Max", "Min", "Mod", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "true", "false", "oo", "zoo", "nan", "Infinity",
    "NegativeInfinity", "NegativeOne", "One", "Zero", "Half", "True", "False", "None", "sqrt",
}
_ASSUMPTIONS = {
    "algebraic", "antihermitian", "commutative", "complex", "composite", "even", "extended_negative",
    "extended_nonnegative", "extended_nonpositive", "extended_nonzero", "extended_positive", "extended_real",
    "finite", "hermitian", "imaginary", "infinite", "integer", "irrational", "negative", "noninteger",
    "nonnegative", "nonpositive", "nonzero", "odd", "polar", "positive", "prime", "rational", "real",
    "transcendental", "zero",
}
_OPS = {"(", ")", ",", "=", "+", "-", "*", "/", "//", "**", "%", "<", ">", "<=", ">=", "==", "!=", "&", "|", "~"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SAFE_OPERATOR = {
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "eq", "ne", "lt", "le",
    "gt", "ge", "and_", "or_", "xor", "not_", "invert", "abs", "lshift", "rshift", "matmul", "truth",
}
_SAFE_TORCH = {"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "_sym_sqrt"}


def refuse(path, why: str) -> UnsafeModelError:
    return UnsafeModelError(
        f"{path}: {why}. Loading it could run code from the file, so slimc refuses it. Re-create it from the "
        "model with torch.export.save(torch.export.export(model, args), 'model.pt2') (plain tensors only), or "
        "export it to ONNX and pass the .onnx."
    )


def check_program_json(path, raw: bytes) -> dict[str, Any]:
    """The parsed ``models/<name>.json``, after the checks on expressions and tree specs."""
    for marker in (b"__enum__", b"default_factory_module"):
        if marker in raw:
            raise refuse(path, f"its program names a Python object to import ({marker.decode()})")
    try:
        program = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(path, f"its program is not valid JSON ({type(exc).__name__})") from None
    for expr in _values_of(program, "expr_str"):
        check_expression(path, expr)
    return program


def _values_of(node: Any, key: str):
    stack = [node]
    while stack:  # iterative: a hostile file may nest deeper than the recursion limit
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k == key:
                    yield v
                else:
                    stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)


def _allowed_names() -> set[str]:
    try:
        from torch.utils._sympy import functions

        extra = set(functions.__all__)
    except (ImportError, AttributeError):
        extra = set()
    return _SYMPY_NAMES | _ASSUMPTIONS | extra


def check_expression(path, expr: Any) -> None:
    """A symbolic-shape expression may only construct sympy objects (it is passed to ``eval``)."""
    if not isinstance(expr, str) or len(expr) > 10_000:
        raise refuse(path, "a symbolic shape expression is not a short string")
    allowed = _allowed_names()
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        raise refuse(path, f"a symbolic shape expression does not parse: {expr[:80]!r}") from None
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER):
            continue
        ok = (tok.type == tokenize.NAME and tok.string in allowed) or (tok.type == tokenize.OP and tok.string in _OPS)
        if tok.type == tokenize.STRING:
            body = tok.string[1:-1] if tok.string[:1] in "'\"" and tok.string[-1:] == tok.string[:1] else ""
            ok = bool(_IDENTIFIER.fullmatch(body))
        if not ok:
            raise refuse(path, f"a symbolic shape expression holds {tok.string!r}, which is not sympy arithmetic: "
                               f"{expr[:80]!r}")


def check_targets(path, program) -> None:
    """Every node of every graph calls a torch op or a listed arithmetic function."""
    import torch

    allowed = {getattr(operator, n) for n in _SAFE_OPERATOR if hasattr(operator, n)}
    allowed |= {getattr(torch, n) for n in _SAFE_TORCH if hasattr(torch, n)}
    allowed |= {getattr(math, n) for n in dir(math) if not n.startswith("_") and callable(getattr(math, n))}
    kinds = (getattr(torch._ops, "OpOverload", None), getattr(torch._ops, "HigherOrderOperator", None))
    op_types = tuple(t for t in kinds if t is not None)
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            if node.op == "call_function" and (isinstance(target, op_types) or _hashable_in(target, allowed)):
                continue
            raise refuse(path, f"its graph calls {target!r} ({node.op}), which is not a PyTorch operator")


def _hashable_in(value: Any, allowed: set) -> bool:
    try:
        return value in allowed
    except TypeError:
        return False
