"""The scoring rules the gate relies on, on hand-made cases whose answers are known."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from collections.abc import Callable
from typing import Any

import pytest

from slm_trainer import metrics as m

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["C", "F"], "default": "C"},
                "days": {"type": "integer", "default": 1},
                "lat": {"type": "number", "format": "float"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "filters": {
                    "type": "object",
                    "properties": {"wind": {"type": "boolean"}, "rain": {"type": "boolean"}},
                },
            },
        },
    },
}
ALARM_TOOL = {
    "type": "function",
    "function": {"name": "set_alarm", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER_TOOL, ALARM_TOOL]


def call(name: str, args: Any, as_string: bool = True) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "x",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args) if as_string else args},
            }
        ],
    }


REF = call("get_weather", {"city": "New York, NY", "lat": 40.7, "filters": {"wind": True}})


# ------------------------------------------------------------------ labels and exact match


def test_labels_of_responses() -> None:
    assert m.tool_label(REF) == "get_weather"
    assert m.label_of({"role": "assistant", "content": "I can't do that."}, "tool-call") is None
    assert m.label_of({"content": "  Billing "}, "classification") == "billing"
    assert m.label_of({"defer": True}, "tool-call") is None
    assert m.is_deferral({"defer": True}) and not m.is_deferral(REF)


def test_exact_match_compares_parsed_arguments_not_their_spelling() -> None:
    same = call("get_weather", {"filters": {"wind": True}, "lat": 40.7, "city": "New York, NY"})
    assert m.exact_match(same, REF)
    as_dict = call("get_weather", json.loads(REF["tool_calls"][0]["function"]["arguments"]), False)
    assert m.exact_match(as_dict, REF)
    assert not m.exact_match(call("get_weather", {"city": "Boston"}), REF)
    assert m.exact_match({"content": "Billing  issue"}, {"content": "billing issue"})
    assert not m.exact_match({"defer": True}, {"defer": True})
    # JSON true is not 1 (Python's True == 1 would say it is); 1 and 1.0 are one JSON number
    assert not m.exact_match(call("set_alarm", {"on": 1}), call("set_alarm", {"on": True}))
    assert m.exact_match(call("set_alarm", {"at": 7.0}), call("set_alarm", {"at": 7}))


OPTIONAL_MODEL_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        # pydantic's Optional[Model]: no top-level "type", the object is an anyOf branch
        "parameters": {
            "type": "object",
            "properties": {
                "filter": {"anyOf": [{"type": "object"}, {"type": "null"}]},
                "rows": {"type": "array", "items": {"oneOf": [{"type": "object"}]}},
                "free": {},  # untyped: BFCL's checker would read it as a string
                "either": {"anyOf": [{"type": "object"}, {"type": "array"}]},
            },
        },
    },
}


@pytest.mark.parametrize("use_bfcl", [True, False])
@pytest.mark.parametrize(
    "tools", [[OPTIONAL_MODEL_TOOL], []], ids=["anyOf-schema", "tool-not-listed"]
)
def test_object_arguments_match_without_a_typed_schema(tools: Any, use_bfcl: bool) -> None:
    """An object (or list of objects) argument is compared as one, not as a string, where the
    schema gives no type or the tool is not in the request: an identical answer matches."""
    extra = {"free": {"k": [1, 2]}, "either": ["x", "y"]}
    ref = call("search", {"filter": {"city": "Paris", "n": 2}, "rows": [{"a": 1}], **extra})
    same = call("search", {"rows": [{"a": 1}], "filter": {"n": 2, "city": "Paris"}, **extra})
    other = call("search", {"filter": {"city": "Rome", "n": 2}, "rows": [{"a": 1}], **extra})
    other_row = call("search", {"filter": {"city": "Paris", "n": 2}, "rows": [{"a": 2}], **extra})
    other_free = call(
        "search", {"filter": {"city": "Paris", "n": 2}, "rows": [{"a": 1}], "free": {"k": [1]}}
    )
    assert not m.ast_match(other_free, ref, tools, use_bfcl=use_bfcl).match
    assert m.ast_match(same, ref, tools, use_bfcl=use_bfcl).match
    assert not m.ast_match(other, ref, tools, use_bfcl=use_bfcl).match
    assert not m.ast_match(other_row, ref, tools, use_bfcl=use_bfcl).match


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (REF, True),
        (call("get_weather", "{not json"), False),
        (call("get_weather", "[1, 2]"), False),  # arguments must be an object
        ({"content": '{"a": 1}'}, True),
        ({"content": "plain text"}, False),
        ({"content": ""}, None),
        (call("get_weather", "[" * 5000, as_string=False), False),  # too deep to decode
        ({"content": "[" * 5000}, False),
    ],
)
def test_json_validity(response: dict[str, Any], expected: bool | None) -> None:
    assert m.json_valid(response) is expected


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_valid_json(constant: str) -> None:
    """Python's json reads NaN and Infinity, which RFC 8259 has not and strict parsers (an
    agent's JSON.parse, Go's encoding/json) refuse: such arguments counted as valid JSON."""
    arguments = f'{{"city": "Oslo", "days": {constant}}}'
    assert m.json_valid(call("get_weather", arguments, as_string=False)) is False
    assert m.parse_arguments(arguments) == (False, arguments)
    assert m.json_valid({"content": constant}) is False
    assert m.json_valid({"content": f"[{constant}]"}) is False


def test_arguments_nested_too_deep_score_as_wrong_not_crash() -> None:
    """A logged or generated call whose arguments are too deep to decode is simply wrong."""
    deep = call("get_weather", "[" * 5000, as_string=False)
    assert m.tool_calls(deep) == [("get_weather", "[" * 5000)]
    assert m.label_of(deep, "tool-call") == "get_weather"
    assert not m.exact_match(deep, REF)
    assert not m.ast_match(deep, REF, [WEATHER_TOOL]).match


@pytest.mark.parametrize("use_bfcl", [True, False])
def test_reference_arguments_that_are_a_list_of_objects_score_as_wrong_not_crash(
    use_bfcl: bool,
) -> None:
    """A logged call to a tool the request does not declare, whose arguments are a JSON list
    of objects, raised TypeError (unhashable dict): evaluate crashed, and the gateway counted
    the shadow copy as an error. Arguments must be an object, so it scores as wrong, as a
    list of strings always did, even against the same list."""
    ref = call("lookup", [{"k": True}])
    for pred in (call("lookup", [[True]]), ref, call("lookup", ["k"])):
        assert not m.ast_match(pred, ref, TOOLS, use_bfcl=use_bfcl).match
        assert not m.answer_correct("tool-call-ast", pred, ref, TOOLS, "tool-call", use_bfcl)
    strings = call("lookup", ["k"])  # the shape that never raised: scored the same way
    assert not m.ast_match(strings, strings, TOOLS, use_bfcl=use_bfcl).match


# ------------------------------------------------------------------ AST match

AST_CASES = [
    ("identical", REF, True),
    (
        "strings compare without case, spaces or punctuation",
        call("get_weather", {"city": "new york ny", "lat": 40.7, "filters": {"wind": True}}),
        True,
    ),
    (
        "an int is accepted for a float",
        call(
            "get_weather",
            {"city": "New York, NY", "lat": 40.7, "filters": {"wind": True}, "days": 1},
        ),
        True,
    ),
    (
        "optional parameter sent with its default",
        call(
            "get_weather",
            {"city": "New York, NY", "lat": 40.7, "filters": {"wind": True}, "unit": "C"},
        ),
        True,
    ),
    (
        "optional parameter with another value",
        call(
            "get_weather",
            {"city": "New York, NY", "lat": 40.7, "filters": {"wind": True}, "unit": "F"},
        ),
        False,
    ),
    (
        "a parameter the reference sent is missing",
        call("get_weather", {"city": "New York, NY", "filters": {"wind": True}}),
        False,
    ),
    (
        "required parameter missing",
        call("get_weather", {"lat": 40.7, "filters": {"wind": True}}),
        False,
    ),
    (
        "unknown parameter",
        call(
            "get_weather",
            {"city": "New York, NY", "lat": 40.7, "filters": {"wind": True}, "zip": "10001"},
        ),
        False,
    ),
    (
        "wrong type",
        call("get_weather", {"city": "New York, NY", "lat": "40.7", "filters": {"wind": True}}),
        False,
    ),
    (
        "nested dict value differs",
        call("get_weather", {"city": "New York, NY", "lat": 40.7, "filters": {"wind": False}}),
        False,
    ),
    ("another function", call("set_alarm", {}), False),
    ("a deferral", {"defer": True}, False),
    ("no call at all", {"content": "It is sunny."}, False),
]


@pytest.mark.parametrize("use_bfcl", [True, False], ids=["bfcl", "builtin"])
@pytest.mark.parametrize(("case", "pred", "expected"), AST_CASES, ids=[c[0] for c in AST_CASES])
def test_ast_match(case: str, pred: dict[str, Any], expected: bool, use_bfcl: bool) -> None:
    if use_bfcl and m.load_bfcl_checker() is None:
        pytest.skip("bfcl-eval is not installed")
    result = m.ast_match(pred, REF, TOOLS, use_bfcl=use_bfcl)
    assert result.match is expected, result


PROMO_TOOL = {
    "type": "function",
    "function": {
        "name": "book",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {
                "city": {"type": "string"},
                "promo_code": {"type": "string"},
                "channel": {"enum": ["", "web", "app"]},  # no type: the built-in checker's
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        },
    },
}


@pytest.mark.parametrize("use_bfcl", [True, False], ids=["bfcl", "builtin"])
def test_an_empty_string_argument_matches_the_same_empty_string(use_bfcl: bool) -> None:
    """BFCL writes "may be omitted" as ``""`` in a possible answer, and its string checker
    accepts ``""`` for it; the built-in port dropped every accepted ``""``, so an answer
    identical to the reference, passing an empty string, was scored wrong."""
    ref = call("book", {"city": "Paris", "promo_code": "", "channel": "", "note": ""})
    assert m.ast_match(ref, ref, [PROMO_TOOL], use_bfcl=use_bfcl).match
    assert m.ast_match(call("book", {"city": "Paris"}), ref, [PROMO_TOOL], use_bfcl=use_bfcl).match
    for wrong in ({"channel": "web"}, {"promo_code": "X1"}, {"note": "late"}):
        pred = call("book", {"city": "Paris", **wrong})
        assert not m.ast_match(pred, ref, [PROMO_TOOL], use_bfcl=use_bfcl).match, wrong


NULL_DEFAULT_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "default": None}},
        },
    },
}
# pydantic's ``unit: str | None = None``: no "type", so only the built-in checker reads it.
PYDANTIC_NULL_DEFAULT_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {
                "city": {"type": "string"},
                "unit": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            },
        },
    },
}


@pytest.mark.parametrize("use_bfcl", [True, False], ids=["bfcl", "builtin"])
@pytest.mark.parametrize("tool", [NULL_DEFAULT_TOOL, PYDANTIC_NULL_DEFAULT_TOOL])
def test_a_string_that_standardises_to_empty_is_not_an_omitted_parameter(
    tool: dict[str, Any], use_bfcl: bool
) -> None:
    """A parameter the reference left out whose default is not a string (``null``) is
    accepted as ``["", None]``: BFCL reads the answer as a variable (its type is not the
    parameter's) and compares values as they are, so ``"-"`` or ``" "`` is not ``""``. The
    built-in port standardised them to ``""`` and agreed where BFCL, the gate, did not."""
    if use_bfcl and m.load_bfcl_checker() is None:
        pytest.skip("bfcl-eval is not installed")
    ref = call("get_weather", {"city": "Paris"})
    for same in ({}, {"unit": None}):
        pred = call("get_weather", {"city": "Paris", **same})
        assert m.ast_match(pred, ref, [tool], use_bfcl=use_bfcl).match, same
    for unit in ("-", " ", "C"):
        pred = call("get_weather", {"city": "Paris", "unit": unit})
        assert not m.ast_match(pred, ref, [tool], use_bfcl=use_bfcl).match, unit


def _grid_tool(kind: str, required: bool, default: Any) -> dict[str, Any]:
    a: dict[str, Any] = {"type": kind}
    if default is not ...:
        a["default"] = default
    return {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"a": a, "b": {"type": "string"}},
                "required": (["a"] if required else []) + ["b"],
            },
        },
    }


_NO_ARG = object()


def test_the_builtin_checker_agrees_with_bfcl_on_defaults_and_empty_looking_strings() -> None:
    """On every combination of a parameter's type, requiredness and default (none, "",
    "x", 0, [], null), a reference value (omitted, empty-looking or typed) and a predicted
    one, the built-in port gives BFCL's verdict wherever BFCL's checker is the one used.
    Left out are the references BFCL cannot compare to themselves (an object where the
    schema says string, or a string of spaces where it says a number): the port matches an
    answer identical to the reference on purpose there (see test_any_answer_matches_itself)."""
    if m.load_bfcl_checker() is None:
        pytest.skip("bfcl-eval is not installed")
    values: list[Any] = ["", " ", "-", "x", 5, [], [""], {"k": ""}, {}, None]
    differ = []
    for kind in ("string", "integer", "array", "object", "number", "boolean"):
        for required in (True, False):
            for default in (..., "", "x", 0, [], None):
                tool = _grid_tool(kind, required, default)
                for ref_value in [_NO_ARG, *values]:
                    ref_args = {"b": "q"} if ref_value is _NO_ARG else {"b": "q", "a": ref_value}
                    ref = call("f", ref_args)
                    if required and ref_value is _NO_ARG:
                        continue
                    if not m.ast_match(ref, ref, [tool], use_bfcl=True).match:
                        continue  # BFCL refuses the reference's own answer: the port does not
                    for pred_value in [_NO_ARG, *values]:
                        pred_args = dict(ref_args, a=pred_value)
                        if pred_value is _NO_ARG:
                            del pred_args["a"]
                        pred = call("f", pred_args)
                        bfcl = m.ast_match(pred, ref, [tool], use_bfcl=True)
                        builtin = m.ast_match(pred, ref, [tool], use_bfcl=False)
                        if bfcl.checker == "bfcl" and bfcl.match != builtin.match:
                            differ.append((kind, required, default, ref_args, pred_args))
    assert not differ, differ[:10]


_FUZZ_SCHEMAS: list[tuple[dict[str, Any], Callable[[random.Random], Any]]] = [
    ({"type": "string"}, lambda r: r.choice(["", "Paris", "New York, NY", "a-b_c", " "])),
    ({"type": "integer"}, lambda r: r.randint(-3, 3)),
    ({"type": "number"}, lambda r: r.choice([0, 2, 1.5, -0.25])),
    ({"type": "boolean"}, lambda r: r.random() < 0.5),
    (
        {"type": "array", "items": {"type": "string"}},
        lambda r: [r.choice(["", "x", "Y z"]) for _ in range(r.randint(0, 3))],
    ),
    (
        {"type": "object", "properties": {"k": {"type": "string"}, "n": {"type": "integer"}}},
        lambda r: {"k": r.choice(["", "v"]), "n": r.randint(0, 2)},
    ),
    ({"enum": ["", "web", "app"]}, lambda r: r.choice(["", "web", "app"])),
    ({"anyOf": [{"type": "string"}, {"type": "null"}]}, lambda r: r.choice(["", "late"])),
    ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, lambda r: r.choice(["", 4, "4"])),
    ({}, lambda r: r.choice(["", "free text"])),
]


@pytest.mark.parametrize("use_bfcl", [True, False], ids=["bfcl", "builtin"])
@pytest.mark.parametrize("seed", range(40))
def test_any_answer_matches_itself(seed: int, use_bfcl: bool) -> None:
    """Whatever the schema and the arguments (empty strings included), the reference's own
    call is a match: the gateway compares identical SLM and LLM answers this way."""
    rng = random.Random(seed)
    props: dict[str, Any] = {}
    args: dict[str, Any] = {}
    for i in range(rng.randint(1, 6)):
        schema, value = rng.choice(_FUZZ_SCHEMAS)
        props[f"p{i}"] = dict(schema)
        if rng.random() < 0.3:
            props[f"p{i}"]["default"] = value(rng)
        if rng.random() < 0.8:
            args[f"p{i}"] = value(rng)
    required = [p for p in args if rng.random() < 0.5]
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": props, "required": required},
        },
    }
    ref = call("f", args)
    assert m.ast_match(ref, ref, [tool], use_bfcl=use_bfcl).match, (props, args)


def test_bfcl_checker_is_used_without_leaving_its_stub_behind() -> None:
    if m.load_bfcl_checker() is None:
        pytest.skip("bfcl-eval is not installed")
    assert m.ast_match(REF, REF, TOOLS).checker == "bfcl"
    assert "bfcl_eval.constants.model_config" not in sys.modules or hasattr(
        sys.modules["bfcl_eval.constants.model_config"], "MODEL_CONFIG_MAPPING"
    )


def test_ast_lists_compare_in_order() -> None:
    ref = call("get_weather", {"city": "Oslo", "tags": ["a", "b"]})
    assert m.ast_match(call("get_weather", {"city": "Oslo", "tags": ["A", "b"]}), ref, TOOLS).match
    assert not m.ast_match(
        call("get_weather", {"city": "Oslo", "tags": ["b", "a"]}), ref, TOOLS
    ).match


def calls(*made: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """An answer making ``made`` (name, arguments) tool calls in parallel, in that order."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a) in enumerate(made)
        ],
    }


@pytest.mark.parametrize("use_bfcl", [True, False], ids=["bfcl", "builtin"])
def test_parallel_calls_match_in_any_order_as_bfcl_checks_them(use_bfcl: bool) -> None:
    """The same parallel calls in another order scored as wrong (paired by position), while
    BFCL's parallel checker, whose rules the module follows, has no order: they match. Each
    reference call still needs a call of its own, and exact match keeps the order."""
    if use_bfcl and m.load_bfcl_checker() is None:
        pytest.skip("bfcl-eval is not installed")
    paris, oslo = ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})
    alarm = ("set_alarm", {})
    ref = calls(paris, oslo, alarm)
    for swapped in (calls(oslo, paris, alarm), calls(alarm, oslo, paris)):
        assert m.ast_match(swapped, ref, TOOLS, use_bfcl=use_bfcl).match
        assert not m.exact_match(swapped, ref)
    twice = m.ast_match(calls(paris, paris, alarm), ref, TOOLS, use_bfcl=use_bfcl)
    assert not twice.match and twice.error == "no predicted call matches get_weather (call 1)"
    assert not m.ast_match(calls(oslo, paris), ref, TOOLS, use_bfcl=use_bfcl).match


def test_parallel_calls_pair_up_where_a_first_come_pick_would_not() -> None:
    """Prediction 0 fits both reference calls and prediction 1 only the first: pairing each
    reference with the first prediction that fits (BFCL's way) leaves reference 1 without
    one, though a pairing exists."""
    fits = {(0, 0), (0, 1), (1, 0)}
    assert m.unpaired_call(2, lambda i, j: (i, j) in fits) is None
    assert m.unpaired_call(2, lambda i, j: i == 0) == 1


def test_a_reference_without_tool_call_matches_only_a_prediction_without_one() -> None:
    text = {"role": "assistant", "content": "No tool fits."}
    assert m.ast_match({"content": "Sorry."}, text, TOOLS).match
    assert not m.ast_match(REF, text, TOOLS).match


def test_possible_answer_follows_bfcl_conventions() -> None:
    function = m.gorilla_function(WEATHER_TOOL)
    assert function["parameters"]["properties"]["lat"]["type"] == "float"
    assert function["parameters"]["properties"]["filters"]["type"] == "dict"
    answer = m.possible_answer("get_weather", {"city": "Oslo", "filters": {"wind": True}}, function)
    assert answer["get_weather"]["city"] == ["Oslo"]
    assert answer["get_weather"]["filters"] == [{"wind": [True]}]
    assert answer["get_weather"]["unit"] == ["", "C"]
    assert answer["get_weather"]["tags"] == [""]


# ------------------------------------------------------------------ coverage / precision

# Five calls: three need a tool, two (None) must go back to the LLM.
PRED = ["a", "b", "c", "a", None]
CONF = [0.95, 0.90, 0.60, 0.80, 0.99]
REFS = ["a", "b", "x", None, None]


def test_selective_point_counts_an_accepted_irrelevant_call_as_wrong() -> None:
    p = m.selective_point(PRED, CONF, REFS, 0.7)
    assert (p.accepted, p.correct) == (3, 2)  # a, b right; the 4th call (ref None) wrong
    assert p.precision == pytest.approx(2 / 3)
    assert p.relevant_coverage == pytest.approx(2 / 3)
    assert p.irrelevant_deferral == pytest.approx(0.5)
    assert p.coverage == pytest.approx(3 / 5)


def test_coverage_curve_has_one_point_per_confidence_and_closes_at_zero() -> None:
    curve = m.coverage_curve(PRED, CONF, REFS)
    assert [p.threshold for p in curve[:-1]] == [0.6, 0.8, 0.9, 0.95]
    assert [p.accepted for p in curve] == [4, 3, 2, 1, 0]
    assert [p.correct for p in curve] == [2, 2, 2, 1, 0]
    assert curve[-1].precision == 1.0 and curve[-1].threshold > 0.95


def test_pick_threshold_keeps_the_most_coverage_that_meets_the_target() -> None:
    curve = m.coverage_curve(PRED, CONF, REFS)
    best = m.pick_threshold(curve, 0.99)
    assert best is not None and best.threshold == 0.9 and best.accepted == 2
    assert m.pick_threshold(curve, 0.6).threshold == 0.8  # type: ignore[union-attr]
    assert m.pick_threshold(m.coverage_curve(["a"], [0.9], ["b"]), 0.5) is None


@pytest.mark.parametrize("seed", range(6))
def test_the_curve_is_the_selective_point_at_every_level_of_a_random_task(seed: int) -> None:
    """The curve is computed in one sweep; each of its points must be what scoring every
    call at that threshold gives: ties, deferrals, calls needing no tool, and (odd seeds)
    verdicts that are not label equality included."""
    rng = random.Random(seed)
    n = rng.randint(1, 400)
    labels = [rng.choice(["a", "b", "c", None]) for _ in range(n)]
    refs = [rng.choice(["a", "b", None]) for _ in range(n)]
    conf = [
        rng.choice([0.5, 0.75, 0.9, 1.0]) if rng.random() < 0.3 else rng.random() for _ in range(n)
    ]
    verdicts = [rng.random() < 0.7 for _ in range(n)] if seed % 2 else None
    curve = m.coverage_curve(labels, conf, refs, verdicts)
    levels = sorted({c for lab, c in zip(labels, conf, strict=True) if lab is not None})
    assert [p.threshold for p in curve[:-1]] == levels
    for p in curve:
        assert p == m.selective_point(labels, conf, refs, p.threshold, verdicts)
    assert curve[-1].accepted == 0 and curve[-1].threshold > max(conf)


def test_custom_verdicts_override_label_equality() -> None:
    p = m.selective_point(["a", "a"], [0.9, 0.9], ["a", "a"], 0.5, correct=[True, False])
    assert p.correct == 1


def test_curve_as_dicts_thins_but_keeps_both_ends() -> None:
    curve = m.coverage_curve(
        [f"l{i}" for i in range(500)], [i / 500 for i in range(500)], ["l0"] * 500
    )
    thin = m.curve_as_dicts(curve, max_points=50)
    assert len(thin) == 50
    assert thin[0]["threshold"] == 0.0 and thin[-1]["accepted"] == 0


# ------------------------------------------------------------------ calibration


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels() -> None:
    rng = random.Random(7)
    rows, targets = [], []
    for _ in range(3000):
        logits = [rng.gauss(0, 3) for _ in range(4)]
        probs = m.softmax(logits, 2.5)
        targets.append(rng.choices(range(4), probs)[0])
        rows.append(logits)
    assert m.fit_temperature(rows, targets) == pytest.approx(2.5, rel=0.12)
    assert m.fit_temperature([], []) == 1.0


def test_temperature_above_one_softens_overconfidence() -> None:
    assert max(m.softmax([4.0, 0.0], 2.0)) < max(m.softmax([4.0, 0.0]))
    assert sum(m.softmax([1.0, 2.0, 3.0])) == pytest.approx(1.0)


def test_expected_calibration_error_and_latency_summary() -> None:
    assert m.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert m.expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)
    lat = m.latency_summary([float(x) for x in range(1, 101)])
    assert lat == {"mean": 50.5, "p50": 50.0, "p95": 95.0}
    assert m.latency_summary([]) == {"mean": 0.0, "p50": 0.0, "p95": 0.0}
    assert math.isfinite(m.nll([[0.0, 1.0]], [1], 1.0))


def test_a_threshold_with_margin_answers_the_same_calls() -> None:
    """Halfway down to the next lower answered confidence: the same calls are answered, and a
    served confidence a unit in the last place lower than evaluated still is."""
    import math

    labels = ["a", "b", None, "c"]
    conf = [0.9, 0.7, 0.8, 0.5]  # the deferred call's 0.8 does not count
    t = m.with_margin(0.7, labels, conf)
    assert t == pytest.approx(0.6)
    assert m.selective_point(labels, conf, labels, t) == dataclasses.replace(
        m.selective_point(labels, conf, labels, 0.7), threshold=t
    )
    assert m.with_margin(0.5, labels, conf) == 0.5  # nothing answered below it
    low = math.nextafter(0.7, 0.0)  # adjacent floats: no float between, keep the threshold
    assert m.with_margin(0.7, ["a", "b"], [0.7, low]) == 0.7


def test_the_gate_score_is_the_precision_served_and_0_when_nothing_is() -> None:
    """One definition for every candidate kind: the operator ranks selectors and generative
    candidates on the same ``score``."""
    p = m.selective_point(PRED, CONF, REFS, 0.7)
    assert m.gate_score(p) == pytest.approx(2 / 3)
    assert m.gate_score(dataclasses.asdict(p)) == pytest.approx(2 / 3)
    nothing = m.selective_point(PRED, CONF, REFS, 1.0)
    assert nothing.precision == 1.0 and m.gate_score(nothing) == 0.0  # answers none
    assert m.gate_score(None) == 0.0  # no threshold reached the target


# A logged tool whose schema is not JSON Schema's shape: curate keeps it (tools are objects).
ODD_SCHEMAS: list[Any] = [
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": 5},
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": [{"x": 1}]},
    {"type": "object", "properties": ["city"], "required": ["city"]},
    5,
    ["city"],
    "a string",
]


@pytest.mark.parametrize("parameters", ODD_SCHEMAS)
def test_a_tool_with_an_odd_schema_is_scored_not_a_crash(parameters: Any) -> None:
    """``required: 5`` raised TypeError in the AST match, and with it the scoring of every
    candidate on that call. Such a tool's calls are compared as logged."""
    odd = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
    ref = call("get_weather", {"city": "Oslo"})
    function = m.gorilla_function(odd)
    assert isinstance(function["parameters"]["properties"], dict)
    assert all(isinstance(r, str) for r in function["parameters"]["required"])
    assert m.ast_match(ref, ref, [odd]).match
    assert not m.ast_match(call("get_weather", {"city": "Rome"}), ref, [odd]).match
    assert not m.ast_match(call("get_time", {"city": "Oslo"}), ref, [odd]).match
