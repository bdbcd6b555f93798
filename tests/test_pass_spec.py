"""The --passes parser: grammar, type coercion, and errors that list what is valid."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from slimc import passes
from slimc.errors import PassConfigError
from slimc.pass_spec import _Parser, coerce, option_table, parse_pipeline
from slimc.passes.cleanup import Cleanup


def test_grammar_handles_nested_values():
    items = _Parser("prune(ratio=0.3, round_to=8, ignore=[head*, 'lm head'], ratios_by_kind={attention: 0.2, mlp: 0.4}),int8").pipeline()
    assert items == [
        ("prune", {"ratio": 0.3, "round_to": 8, "ignore": ["head*", "lm head"], "ratios_by_kind": {"attention": 0.2, "mlp": 0.4}}),
        ("int8", {}),
    ]


def test_cleanup_from_string_and_spec_round_trip():
    (p,) = parse_pipeline("cleanup(cse=false, fold_size_limit=100)")
    assert isinstance(p, Cleanup) and p.cse is False and p.fold_size_limit == 100
    (again,) = parse_pipeline(p.spec())
    assert again.options() == p.options()


def test_list_forms():
    built = parse_pipeline(["cleanup", ("cleanup", {"cse": False}), Cleanup(fold_constants=False)])
    assert [p.cse for p in built] == [True, False, True]
    assert built[2].fold_constants is False


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cleanp", "unknown pass 'cleanp'. Available passes: cleanup"),
        ("cleanup(foo=1)", "has no option 'foo'. Valid options: fold_constants: bool = True"),
        ("cleanup(cse=3)", "option 'cse': expected true or false, got 3"),
        ("cleanup(fold_size_limit=1.5)", "expected an integer"),
        ("cleanup(fold_size_limit=-1)", "fold_size_limit must be >= 0"),
        ("cleanup(", "expected more input"),
        ("cleanup(cse=true, cse=false)", "given twice"),
        ("", "empty pass list"),
        ("cleanup)", "unexpected ')'"),
    ],
)
def test_bad_specs_raise_typed_errors(spec, message):
    with pytest.raises(PassConfigError, match=None) as info:
        parse_pipeline(spec)
    assert message in str(info.value)


def test_coerce_types():
    assert coerce(1, float) == 1.0 and isinstance(coerce(1, float), float)
    assert coerce("a", list[str]) == ["a"]
    assert coerce({"attention": 1}, dict[str, float]) == {"attention": 1.0}
    assert coerce("rtn", Literal["rtn", "gptq"]) == "rtn"
    assert coerce(None, int | None) is None
    with pytest.raises(ValueError, match="one of rtn, gptq"):
        coerce("x", Literal["rtn", "gptq"])
    with pytest.raises(ValueError):
        coerce(True, int)


def test_every_registered_pass_is_a_documented_dataclass():
    for name in passes.names():
        cls = passes.get(name)
        assert cls.name == name and cls.description
        assert dataclasses.is_dataclass(cls)
        assert all(default is not None or "none" in typ for _, typ, default in option_table(cls))


# ---------------------------------------------------------------- hostile specs (issue 16, item 7)


def test_deep_nesting_is_a_typed_error_not_a_recursion_error():
    for opener in ("[", "{a:"):
        with pytest.raises(PassConfigError, match="nested more than"):
            parse_pipeline("prune(ignore=" + opener * 1200 + ")")


def test_nesting_up_to_the_limit_still_parses():
    from slimc.pass_spec import MAX_NESTING

    (_, options), = _Parser("p(x=" + "[" * MAX_NESTING + "1" + "]" * MAX_NESTING + ")").pipeline()
    depth, value = 0, options["x"]
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    assert (depth, value) == (MAX_NESTING, 1)


@pytest.mark.parametrize("spec", ["prune(ignore='mm0x)", 'prune(ignore="mm0x)', "prune(ignore=[a, 'b])", "cleanup'"])
def test_an_unclosed_quote_is_refused_not_truncated(spec):
    with pytest.raises(PassConfigError, match="never closed"):
        parse_pipeline(spec)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_non_finite_numbers_are_refused_for_float_options(value):
    with pytest.raises(PassConfigError, match="option 'min_speedup': expected a finite number"):
        parse_pipeline(f"int8(min_speedup={value})")


def test_closed_quotes_keep_every_character():
    (_, options), = _Parser("prune(ignore=['mm0x', \"it's\"])").pipeline()
    assert options["ignore"] == ["mm0x", "it's"]


_ALPHABET = "()[]{},=:'\" \t.-_0123456789abcdefgijklmnoprstuxyz*"
_PIECES = ["prune", "cleanup", "int8", "int4", "fp16", "ratio", "round_to", "ignore", "mode", "true", "none",
           "nan", "inf", "-1", "1e999", "0.5", "2:4", "static", "dynamic", "(", ")", "[", "]", "{", "}", ",", "=", ":"]


def _spec_strings():
    from hypothesis import strategies as st

    chars = st.text(alphabet=_ALPHABET, max_size=60)
    pieces = st.lists(st.sampled_from(_PIECES) | chars, max_size=14).map("".join)
    return chars | pieces


def test_fuzzed_specs_only_ever_raise_pass_config_error():
    """Any string is either a pipeline or a PassConfigError: never another exception."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_spec_strings())
    def check(spec):
        try:
            built = parse_pipeline(spec)
        except PassConfigError:
            return
        assert built and all(p.name for p in built)

    check()
