"""Pure scoring functions shared by the finetune and evaluate stages and the benchmarks.

Why one module: the gate promotes a candidate from these numbers, so the fine-tune Job, the
evaluate stage and the published benchmark must all compute them the same way. Everything here
is a pure function of plain data (call-record responses, tool schemas, confidences) with the
standard library only, so it is unit-tested on hand-made cases and imported without torch.

Definitions (the reference is always the LLM's logged answer):

- **label**: for tool calls, the name of the response's first tool call, or ``None`` when the
  LLM answered without a tool (a call the SLM must hand back); for classification, the
  normalised answer text.
- **exact match**: same tool calls (names and JSON-equal arguments, in order) and the same
  normalised text.
- **JSON validity**: every tool call's arguments decode to a JSON object (for text answers:
  the text decodes as JSON; ``None`` when the answer is neither). JSON as RFC 8259 defines
  it: Python's ``NaN`` and ``Infinity`` are not.
- **tool-call AST match**: the Berkeley Function Calling Leaderboard's rules. The reference
  call becomes BFCL's "possible answer" (its value for each argument; ``""`` for optional
  parameters it left out, plus the schema default), and the prediction is checked by
  ``bfcl_eval``'s own ``ast_checker`` when that package is importable, or by
  :func:`ast_match_builtin`, a faithful small port of the same rules (string values compared
  case- and punctuation-insensitively, except where BFCL reads the answer as a variable and
  compares it as it is, ints accepted for floats, no unexpected or missing parameters,
  optional ones may be omitted). Parallel calls match in any order, one
  predicted call for each reference call, as BFCL's parallel checker has it.
- **selective prediction**: a candidate answers (accepts) a call when its label is not
  ``None`` and its confidence is at least the threshold; otherwise the call is deferred to the
  LLM. Precision is the share of accepted calls whose label equals the reference label; an
  accepted call whose reference is ``None`` (no tool fits) counts as wrong.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

_WS_RE = re.compile(r"\s+")
# BFCL's standardize_string: drop spaces and ",./-_*^", lower-case, single -> double quotes.
_BFCL_STRIP_RE = re.compile(r"[ \,\.\/\-\_\*\^]")


# ------------------------------------------------------------------------- responses


def text_of(content: Any) -> str:
    """The text of an OpenAI message ``content`` (a string or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def normalize_text(text: str) -> str:
    """Whitespace-collapsed, stripped, case-folded text: how answers are compared."""
    return _WS_RE.sub(" ", text).strip().casefold()


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def strict_loads(text: str) -> Any:
    """``json.loads`` without Python's extensions ``NaN``, ``Infinity`` and ``-Infinity``.

    RFC 8259 has none of them and strict parsers (JavaScript's ``JSON.parse``, Go's
    ``encoding/json``) refuse them: an answer holding one is not valid JSON to the agent
    that receives it, so it must not score as valid here.
    """
    return json.loads(text, parse_constant=_not_json)


def parse_arguments(arguments: Any) -> tuple[bool, Any]:
    """(valid, value) of a tool call's ``arguments``: a JSON object string, or a dict."""
    if isinstance(arguments, dict):
        return True, arguments
    if isinstance(arguments, str):
        try:
            value = strict_loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):  # not JSON, or nested too deep to decode
            return False, arguments
        return isinstance(value, dict), value
    return False, arguments


def tool_calls(response: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    """``[(name, parsed arguments)]`` of a response's tool calls, in order."""
    calls = (response or {}).get("tool_calls")
    out: list[tuple[str, Any]] = []
    if not isinstance(calls, list):
        return out
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        out.append((str(function.get("name") or ""), parse_arguments(function.get("arguments"))[1]))
    return out


def is_deferral(response: Mapping[str, Any] | None) -> bool:
    """A served model's explicit hand-back to the LLM (``{"defer": true}``)."""
    return bool((response or {}).get("defer"))


def tool_label(response: Mapping[str, Any] | None) -> str | None:
    """First tool call's function name, or None when the response calls no tool."""
    calls = tool_calls(response)
    return calls[0][0] if calls else None


def text_label(response: Mapping[str, Any] | None) -> str | None:
    """A classification answer: the normalised text, or None when there is none."""
    text = normalize_text(text_of((response or {}).get("content")))
    return text or None


def label_of(response: Mapping[str, Any] | None, task_type: str) -> str | None:
    """The closed-set label a selector learns for a response (see module docstring)."""
    if is_deferral(response):
        return None
    if task_type == "classification":
        return tool_label(response) or text_label(response)
    return tool_label(response)


# ------------------------------------------------------------------------- per-answer scores


def _strict(value: Any) -> Any:
    """``value`` with booleans tagged, so that JSON ``true`` is not equal to ``1`` (Python
    says it is); ``1`` and ``1.0`` stay equal, as JSON numbers are."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def exact_match(pred: Mapping[str, Any] | None, ref: Mapping[str, Any] | None) -> bool:
    """Same tool calls (names, JSON-equal arguments, order) and the same normalised text."""
    if is_deferral(pred):
        return False
    if _strict(tool_calls(pred)) != _strict(tool_calls(ref)):
        return False
    return normalize_text(text_of((pred or {}).get("content"))) == normalize_text(
        text_of((ref or {}).get("content"))
    )


def json_valid(response: Mapping[str, Any] | None) -> bool | None:
    """True when every tool call's arguments (or else the text) is valid JSON; None if empty."""
    raw = (response or {}).get("tool_calls")
    if isinstance(raw, list) and raw:
        for call in raw:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not parse_arguments(function.get("arguments"))[0]:
                return False
        return True
    text = text_of((response or {}).get("content")).strip()
    if not text:
        return None
    try:
        strict_loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def label_correct(pred_label: str | None, ref_label: str | None) -> bool:
    """Whether a selector's choice names the reference's label. ``None`` is its deferral,
    which answers nothing and so is never right, even where the LLM called no tool."""
    return pred_label is not None and pred_label == ref_label


def answer_label_correct(
    pred: Mapping[str, Any] | None, ref: Mapping[str, Any] | None, task_type: str
) -> bool:
    """Whether a served message has the reference's label: the label-accuracy verdict of an
    answer, not of a selector's choice (:func:`label_correct`).

    A message that calls no tool has the label None, and where the LLM called none either it
    said what the LLM said (a text answer on a tool-call task): right. Judged by
    :func:`label_correct`, a generator copying the LLM scored 0 on every such call. A
    deferral, or no message at all, answers nothing and is never right.
    """
    if pred is None or is_deferral(pred):
        return False
    return label_of(pred, task_type) == label_of(ref, task_type)


def answer_correct(
    metric: str,
    pred: Mapping[str, Any] | None,
    ref: Mapping[str, Any] | None,
    tools: Sequence[Mapping[str, Any]],
    task_type: str,
    use_bfcl: bool = True,
) -> bool:
    """Whether an answer, as served, is right under the gate's ``metric``: ``exact-match``,
    ``tool-call-ast`` on tool-call tasks, else (``label-accuracy``) its label."""
    if metric == "exact-match":
        return exact_match(pred, ref)
    if metric == "tool-call-ast" and task_type == "tool-call":
        return ast_match(pred, ref, tools, use_bfcl=use_bfcl).match
    return answer_label_correct(pred, ref, task_type)


# ------------------------------------------------------------------------- AST matching

_PY_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}


def _branches(schema: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The non-null ``anyOf``/``oneOf`` branches of a schema (pydantic's ``Optional[...]``)."""
    return [
        b
        for key in ("anyOf", "oneOf")
        for b in schema.get(key) or ()
        if isinstance(b, Mapping) and b.get("type") != "null"
    ]


def gorilla_type(schema: Mapping[str, Any]) -> str:
    """JSON-schema type of a parameter in BFCL's Gorilla vocabulary (object -> dict...).

    A schema without ``type`` takes its first non-null ``anyOf``/``oneOf`` branch's: that is
    how pydantic writes ``Optional[Model]``, and read as a string such a parameter's object
    value never matched, not even an identical one.
    """
    kind = schema.get("type")
    if kind is None:
        branches = _branches(schema)
        return gorilla_type(branches[0]) if branches else "string"
    if isinstance(kind, list):  # ["string", "null"]
        kind = next((k for k in kind if k != "null"), "string")
    return {"object": "dict", "number": "float", "bool": "boolean", "list": "array"}.get(
        str(kind), str(kind) if kind in _PY_TYPES else "any"
    )


def tool_name(tool: Mapping[str, Any]) -> str:
    """The name of an OpenAI tool (``{"type": "function", "function": {...}}``) or bare
    function description; "" when it has none."""
    function = tool.get("function", tool)
    return str(function.get("name", "")) if isinstance(function, Mapping) else ""


def _explicitly_typed(schema: Any) -> bool:
    """Whether every parameter schema in ``schema`` (nested ones too) declares its type."""
    if not isinstance(schema, Mapping):
        return schema is None
    props = schema.get("properties")
    subs = list(props.values()) if isinstance(props, Mapping) else []
    if isinstance(schema.get("items"), Mapping):
        subs.append(schema["items"])
    return all(isinstance(s, Mapping) and "type" in s and _explicitly_typed(s) for s in subs)


def _parameters_of(tool: Mapping[str, Any]) -> Any:
    """A tool's declared ``parameters`` as logged (any JSON value); None when it has none."""
    function = tool.get("function", tool)
    return function.get("parameters") if isinstance(function, Mapping) else None


def _parameters_known(tool: Mapping[str, Any]) -> bool:
    """Whether a tool declares its parameters as a schema (properties an object), or none."""
    params = _parameters_of(tool)
    if params is None:
        return True
    return isinstance(params, Mapping) and isinstance(params.get("properties") or {}, Mapping)


def gorilla_function(tool: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI tool schema as BFCL's function description (types mapped recursively).

    A schema not in JSON Schema's shape (``parameters`` not an object, ``properties`` not an
    object, ``required`` not a list of names) reads as a function with unknown parameters:
    logged tools are the agent's, curate keeps them as they are, and one such tool in a call
    crashed the scoring of every candidate on it.
    """
    raw = tool.get("function", tool)
    function = dict(raw) if isinstance(raw, Mapping) else {}
    declared = function.get("parameters")
    params = copy.deepcopy(dict(declared)) if isinstance(declared, Mapping) else {}

    def convert(schema: dict[str, Any]) -> dict[str, Any]:
        if "type" not in schema and (schema.get("anyOf") or schema.get("oneOf")):
            return schema  # the value picks its branch (_branch_for); BFCL is not asked
        schema["type"] = gorilla_type(schema)
        if isinstance(schema.get("properties"), dict):
            schema["properties"] = {
                k: convert(dict(v)) for k, v in schema["properties"].items() if isinstance(v, dict)
            }
        if schema["type"] == "array":
            items = schema.get("items")
            schema["items"] = convert(dict(items)) if isinstance(items, dict) else {"type": "any"}
        return schema

    params = convert(params) if params else {"type": "dict", "properties": {}}
    params["type"] = "dict"
    if not isinstance(params.get("properties"), dict):
        params["properties"] = {}
    required = params.get("required")
    params["required"] = (
        [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
    )
    return {
        "name": function.get("name", ""),
        "description": function.get("description", ""),
        "parameters": params,
    }


def _accepted(value: Any) -> Any:
    """A reference value in BFCL's possible-answer form.

    As in BFCL's data, a dict lists the accepted values of each of its keys (one level only:
    deeper values are compared as they are), and so does each dict of a list of dicts.
    """
    if isinstance(value, dict):
        return {k: [v] for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [{k: [v] for k, v in d.items()} for d in value]
    return value


def possible_answer(
    name: str, arguments: Mapping[str, Any], function: Mapping[str, Any]
) -> dict[str, Any]:
    """BFCL's ``{name: {param: [accepted values]}}`` for one logged reference call.

    The reference's own value is accepted; an optional parameter the reference left out may
    be omitted (``""``) or sent with its schema default; one the reference sent with the
    default value may be omitted too.
    """
    params = function.get("parameters", {})
    props: Mapping[str, Any] = params.get("properties") or {}
    required = set(params.get("required") or [])
    answer: dict[str, list[Any]] = {}
    for param, value in arguments.items():
        accepted = [_accepted(value)]
        default = (props.get(param) or {}).get("default", ...)
        if param not in required and default is not ... and default == value:
            accepted.append("")
        answer[param] = accepted
    for param, schema in props.items():
        if param in arguments or param in required:
            continue
        accepted = [""]
        if isinstance(schema, dict) and "default" in schema and schema["default"] != "":
            accepted.append(_accepted(schema["default"]))
        answer[param] = accepted
    return {name: answer}


def bfcl_standardize(text: str) -> str:
    return _BFCL_STRIP_RE.sub("", text).lower().replace("'", '"')


def _branch_for(schema: Mapping[str, Any], value: Any) -> Mapping[str, Any]:
    """The ``anyOf``/``oneOf`` branch of an untyped schema that fits ``value``'s JSON type
    (the schema itself when it has a type or no branches; the first branch if none fits)."""
    if "type" in schema:
        return schema
    fits = {
        dict: ("dict",),
        list: ("array", "tuple"),
        str: ("string", "any"),
        bool: ("boolean",),
        int: ("integer", "float"),
        float: ("float",),
    }.get(type(value), ())
    return next((b for b in _branches(schema) if gorilla_type(b) in fits), schema)


def _value_ok(value: Any, accepted: Sequence[Any], schema: Mapping[str, Any]) -> bool:
    """Whether one argument's ``value`` is among the ``accepted`` ones, by BFCL's rules.

    ``""`` in ``accepted`` means "may be omitted", and is also the reference's own value
    when it sent an empty string: BFCL's string checker accepts ``""`` for it (an answer
    identical to the reference was scored wrong when it was dropped there too).

    BFCL's ``is_variable`` rule decides how a value is compared: when the first accepted
    value that is not ``""`` has another type than the parameter's (a ``null`` default of a
    string parameter, a string where the schema says integer), the answer is a "variable"
    and is compared as it is, not standardised. Standardised, ``"-"`` or ``" "`` became
    ``""`` and matched an omitted parameter, so the gateway's live agreement agreed where
    the gate's BFCL checker did not. Objects, and lists of objects, are compared as such
    whatever the schema says (their accepted form is not the value itself: see
    :func:`_accepted`), so that an answer identical to the reference always matches.
    """
    schema = _branch_for(schema, value)
    kind = gorilla_type(schema)
    if kind == "float" and type(value) is int:
        value = float(value)
    if isinstance(value, tuple):
        value = list(value)
    candidates = [a for a in accepted if a != ""]
    # An object value is compared as one whatever the schema says (an untyped or "$ref"
    # parameter, or a tool the request did not list): never as a string.
    if isinstance(value, dict) and kind in ("dict", "string"):
        props = schema.get("properties") or {}
        return any(_dict_ok(value, a, props) for a in candidates if isinstance(a, dict))
    items = schema.get("items") or {}
    if (
        kind in ("array", "tuple", "string")
        and isinstance(value, list)
        and (
            gorilla_type(items) == "dict"
            or (kind == "string" and value and all(isinstance(v, dict) for v in value))
        )
    ):
        return any(
            isinstance(a, list)
            and len(a) == len(value)
            and all(
                isinstance(v, dict) and _dict_ok(v, ai, items.get("properties") or {})
                for v, ai in zip(value, a, strict=True)
            )
            for a in candidates
        )
    expected = _PY_TYPES.get(kind, str)
    ans_type = next((type(a) for a in candidates), None)
    if ans_type is not None and ans_type is not expected:  # BFCL's is_variable
        return type(value) in (expected, ans_type) and value in accepted
    if kind in ("array", "tuple", "string") and isinstance(value, list):
        # BFCL's list checker reads each accepted value as a list: an accepted "" is [].
        lists = [a for a in accepted if isinstance(a, list)]
        if "" in accepted and kind != "string":
            lists.append([])
        std = [bfcl_standardize(v) if isinstance(v, str) else v for v in value]
        return any(
            std == [bfcl_standardize(x) if isinstance(x, str) else x for x in a] for a in lists
        )
    if type(value) is not expected:
        return False
    if isinstance(value, str):
        return bfcl_standardize(value) in [
            bfcl_standardize(a) for a in accepted if isinstance(a, str)
        ]
    return value in candidates


def _dict_ok(value: Mapping[str, Any], accepted: Mapping[str, Any], props: Mapping) -> bool:
    for key, v in value.items():
        if key not in accepted:
            return False
        options = accepted[key] if isinstance(accepted[key], list) else [accepted[key]]
        std = bfcl_standardize(v) if isinstance(v, str) else v
        norm = [bfcl_standardize(o) if isinstance(o, str) else o for o in options]
        if std not in norm and not _value_ok(v, options, props.get(key) or {}):
            return False
    return all(
        key in value or "" in (opts if isinstance(opts, list) else [opts])
        for key, opts in accepted.items()
    )


def ast_match_builtin(
    pred_name: str,
    pred_args: Any,
    answer: Mapping[str, Mapping[str, list[Any]]],
    function: Mapping[str, Any],
) -> bool:
    """BFCL's simple-function rules for one call (see module docstring)."""
    ((ref_name, accepted),) = answer.items()
    if pred_name != ref_name or not isinstance(pred_args, dict):
        return False
    params = function.get("parameters", {})
    props = params.get("properties") or {}
    for param in params.get("required") or []:
        if param not in pred_args:
            return False
    for param, value in pred_args.items():
        if param not in props or param not in accepted:
            return False
        if not _value_ok(value, accepted[param], props[param]):
            return False
    return all(p in pred_args or "" in options for p, options in accepted.items())


_BFCL_CHECKER: list[Any] = []


def load_bfcl_checker() -> Callable[..., dict[str, Any]] | None:
    """``bfcl_eval``'s ``simple_function_checker``, or None when the package is absent.

    The checker's module imports BFCL's model registry, which pulls every provider SDK
    (anthropic, openai...) just to decide whether a model rewrites ``.`` in names. The trainer
    installs bfcl-eval without those, so the registry module is stubbed for that one import
    (we never rewrite names) and the stub is removed again.
    """
    if _BFCL_CHECKER:
        return _BFCL_CHECKER[0]
    import importlib
    import sys
    import types

    checker = None
    name = "bfcl_eval.constants.model_config"
    try:
        module = importlib.import_module("bfcl_eval.eval_checker.ast_eval.ast_checker")
    except ImportError:
        stubbed = name not in sys.modules
        if stubbed:

            class _NoRewrite:
                underscore_to_dot = False

            stub = types.ModuleType(name)
            stub.MODEL_CONFIG_MAPPING = _Always(_NoRewrite())  # type: ignore[attr-defined]
            sys.modules[name] = stub
        try:
            sys.modules.pop("bfcl_eval.eval_checker.ast_eval.ast_checker", None)
            module = importlib.import_module("bfcl_eval.eval_checker.ast_eval.ast_checker")
        except ImportError:
            module = None
        finally:
            if stubbed:
                sys.modules.pop(name, None)
    if module is not None:
        from bfcl_eval.constants.enums import Language

        def checker(function: Any, output: Any, answer: Any) -> dict[str, Any]:
            result: dict[str, Any] = module.simple_function_checker(
                function, output, answer, Language.PYTHON, "slm-fleet"
            )
            return result

    _BFCL_CHECKER.append(checker)
    return checker


class _Always(dict):  # type: ignore[type-arg]
    """A mapping that answers every key with the same value."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self._value = value

    def __getitem__(self, key: Any) -> Any:
        return self._value


@dataclass(frozen=True)
class AstResult:
    match: bool
    checker: str  # "bfcl" or "builtin"
    error: str = ""


def _call_match(
    pcall: tuple[str, Any],
    rcall: tuple[str, Any],
    functions: Mapping[str, Mapping[str, Any]],
    typed: set[str],
    checker: Callable[..., dict[str, Any]] | None,
) -> tuple[bool, str]:
    """(match, checker used) of one predicted call against one reference call."""
    (pname, pargs), (rname, rargs) = pcall, rcall
    bfcl = checker is not None and isinstance(pargs, dict) and rname in typed
    if pname != rname:  # both checkers refuse another function's call: no need to ask them
        return False, "bfcl" if bfcl else "builtin"
    # Arguments that are not an object (a JSON list, a string) name no parameters: iterated
    # as keys, a list of objects raised TypeError (unhashable dict) instead of a mismatch.
    ref_args = rargs if isinstance(rargs, dict) else {}
    function = functions.get(rname) or {
        "name": rname,
        "parameters": {"type": "dict", "properties": {k: {} for k in ref_args}, "required": []},
    }
    answer = possible_answer(rname, ref_args, function)
    # BFCL's checker trusts the declared types: a parameter without one (untyped, or an
    # anyOf/oneOf of several) would be checked as the type guessed for it, and an answer
    # identical to the reference failed. The built-in port compares such values as given.
    if bfcl and checker is not None:
        try:
            return bool(checker(function, {pname: pargs}, answer)["valid"]), "bfcl"
        except Exception:  # schemas BFCL's checker does not handle (e.g. items-less arrays)
            pass
    return ast_match_builtin(pname, pargs, answer, function), "builtin"


def unpaired_call(n: int, fits: Callable[[int, int], bool]) -> int | None:
    """The first of ``n`` reference calls left without a prediction when the ``n`` predicted
    calls are paired one to one with them (prediction ``i`` may take reference ``j`` when
    ``fits(i, j)``), in any order; None when every reference call gets one.

    A maximum bipartite matching (augmenting paths), trying each call's own position first:
    BFCL's ``parallel_function_checker_no_order`` pairs greedily, and this finds a pairing
    whenever that does (and also where a greedy first pick would take a call another needs).
    """
    owner: dict[int, int] = {}  # prediction -> the reference it is paired with

    def place(j: int, seen: set[int]) -> bool:
        for i in sorted(range(n), key=lambda i: i != j):
            if i in seen or not fits(i, j):
                continue
            seen.add(i)
            if i not in owner or place(owner[i], seen):
                owner[i] = j
                return True
        return False

    return next((j for j in range(n) if not place(j, set())), None)


def ast_match(
    pred: Mapping[str, Any] | None,
    ref: Mapping[str, Any] | None,
    tools: Sequence[Mapping[str, Any]],
    use_bfcl: bool = True,
) -> AstResult:
    """Tool-call AST match of a predicted response against the logged one.

    The prediction must make as many calls as the reference, and each reference call must
    be matched by a predicted call of its own, in any order: parallel calls are independent,
    and BFCL checks them without order (``parallel_function_checker_no_order``); the
    same calls in another order scored as wrong. ``exact-match`` keeps the order. A
    reference with no tool call (the LLM answered in text) is matched by any prediction
    without one (and not a deferral): BFCL scores relevance detection the same way, by
    whether a function was called. Gate on ``exact-match`` where the text itself must be
    the LLM's. BFCL's checker is used when available and the schema is one it understands;
    otherwise the built-in port.
    """
    if is_deferral(pred):
        return AstResult(False, "builtin", "deferred")
    pcalls, rcalls = tool_calls(pred), tool_calls(ref)
    if len(pcalls) != len(rcalls):
        return AstResult(False, "builtin", "wrong number of calls")
    if not rcalls:
        return AstResult(True, "builtin")
    # A tool whose parameters are not a schema at all has unknown, not no, parameters: it
    # is left out here, so that its calls are compared as given (the fallback in _call_match).
    functions = {f["name"]: f for f in (gorilla_function(t) for t in tools if _parameters_known(t))}
    typed = {tool_name(t) for t in tools if _explicitly_typed(_parameters_of(t))}
    checker = load_bfcl_checker() if use_bfcl else None
    verdicts: dict[tuple[int, int], bool] = {}
    used: set[str] = set()

    def fits(i: int, j: int) -> bool:
        if (i, j) not in verdicts:
            ok, how = _call_match(pcalls[i], rcalls[j], functions, typed, checker)
            verdicts[i, j] = ok
            used.add(how)
        return verdicts[i, j]

    missing = unpaired_call(len(rcalls), fits)
    how = "bfcl" if "bfcl" in used else "builtin"
    if missing is not None:
        return AstResult(
            False, how, f"no predicted call matches {rcalls[missing][0]} (call {missing})"
        )
    return AstResult(True, how)


# ------------------------------------------------------------------------- selective prediction


@dataclass(frozen=True)
class CurvePoint:
    """Outcome of answering every call whose confidence is at least ``threshold``."""

    threshold: float
    accepted: int
    correct: int
    coverage: float  # accepted / all calls
    precision: float  # correct / accepted (1.0 when nothing is accepted)
    relevant_coverage: float  # accepted calls with a reference label / calls with one
    irrelevant_deferral: float  # deferred / calls whose reference label is None


def _accepted_mask(labels: Sequence[str | None], conf: Sequence[float], th: float) -> list[bool]:
    return [lab is not None and c >= th for lab, c in zip(labels, conf, strict=True)]


def _point(
    threshold: float, counts: Sequence[int], n: int, n_relevant: int, n_irrelevant: int
) -> CurvePoint:
    """A curve point from the counts of accepted, correct, relevant and irrelevant calls."""
    accepted, correct, relevant, irrelevant = counts
    return CurvePoint(
        threshold=float(threshold),
        accepted=accepted,
        correct=correct,
        coverage=accepted / n if n else 0.0,
        precision=correct / accepted if accepted else 1.0,
        relevant_coverage=relevant / n_relevant if n_relevant else 0.0,
        irrelevant_deferral=1.0 - irrelevant / n_irrelevant if n_irrelevant else 1.0,
    )


def _count(counts: list[int], correct: bool, ref_label: str | None) -> None:
    """Add one accepted call to ``[accepted, correct, relevant, irrelevant]``."""
    counts[0] += 1
    counts[1] += correct
    counts[2 if ref_label is not None else 3] += 1


def _verdicts(
    pred_labels: Sequence[str | None],
    ref_labels: Sequence[str | None],
    correct: Sequence[bool] | None,
) -> list[bool]:
    if correct is not None:
        return [bool(ok) for ok in correct]
    return [label_correct(p, r) for p, r in zip(pred_labels, ref_labels, strict=True)]


def selective_point(
    pred_labels: Sequence[str | None],
    confidences: Sequence[float],
    ref_labels: Sequence[str | None],
    threshold: float,
    correct: Sequence[bool] | None = None,
) -> CurvePoint:
    """The selective-prediction figures at one threshold (see module docstring).

    ``correct`` overrides label equality as the per-call verdict (for example an AST match
    for a generative candidate); a prediction with a None label never answers.
    """
    accepted = _accepted_mask(pred_labels, confidences, threshold)
    verdicts = _verdicts(pred_labels, ref_labels, correct)
    counts = [0, 0, 0, 0]
    for a, ok, r in zip(accepted, verdicts, ref_labels, strict=True):
        if a:
            _count(counts, ok, r)
    n_relevant = sum(1 for r in ref_labels if r is not None)
    return _point(threshold, counts, len(ref_labels), n_relevant, len(ref_labels) - n_relevant)


def coverage_curve(
    pred_labels: Sequence[str | None],
    confidences: Sequence[float],
    ref_labels: Sequence[str | None],
    correct: Sequence[bool] | None = None,
) -> list[CurvePoint]:
    """One point per distinct confidence of an answering prediction, lowest threshold first.

    Every achievable accept set is a point: a threshold between two distinct confidences
    accepts the same calls as the higher one. A final point above every confidence (nothing
    accepted) closes the curve.

    One sweep from the highest confidence down, adding each level's calls to running counts:
    the same points as :func:`selective_point` at every level, in O(n log n). (Scoring each
    level anew took 7 s for 8,000 calls and grows with the square: about 18 minutes for
    the 100,000 out-of-fold calls a cross-fitted task of that size calibrates on;
    ``bench/coverage_curve.py``.)
    """
    if not (len(pred_labels) == len(confidences) == len(ref_labels)):
        raise ValueError("pred_labels, confidences and ref_labels must have equal lengths")
    verdicts = _verdicts(pred_labels, ref_labels, correct)
    at_level: dict[float, list[int]] = {}
    for p, c, r, ok in zip(pred_labels, confidences, ref_labels, verdicts, strict=True):
        if p is not None:
            _count(at_level.setdefault(float(c), [0, 0, 0, 0]), ok, r)
    n = len(ref_labels)
    n_relevant = sum(1 for r in ref_labels if r is not None)
    running = [0, 0, 0, 0]
    points: list[CurvePoint] = []
    for level in sorted(at_level, reverse=True):
        running = [a + b for a, b in zip(running, at_level[level], strict=True)]
        points.append(_point(level, running, n, n_relevant, n - n_relevant))
    points.reverse()
    top = math.nextafter(points[-1].threshold, math.inf) if points else 0.0
    points.append(_point(top, [0, 0, 0, 0], n, n_relevant, n - n_relevant))
    return points


def pick_threshold(
    curve: Sequence[CurvePoint], target_precision: float, min_accepted: int = 1
) -> CurvePoint | None:
    """The threshold that loses the least coverage while meeting ``target_precision``.

    Among points with precision >= target and at least ``min_accepted`` accepted calls, the
    one with the highest coverage (the lowest threshold on ties). None when no threshold
    meets the target: the candidate should answer nothing.
    """
    ok = [p for p in curve if p.accepted >= min_accepted and p.precision >= target_precision]
    if not ok:
        return None
    return max(ok, key=lambda p: (p.coverage, -p.threshold))


def gate_score(point: CurvePoint | Mapping[str, Any] | None) -> float:
    """The score the gate compares for a candidate that serves at a threshold: its precision
    on the calls it answers there, 0.0 when it answers none or no threshold reached the
    target (``point`` None).

    One definition for selectors and generative candidates alike, because the operator ranks
    and gates every candidate's ``score`` against the others' and the served model's: a
    generative candidate reporting accuracy over all calls (its threshold ignored) passed
    ``minScore`` while its threshold of 1.0 meant it would answer nothing. Deferred calls go
    to the LLM and cost nothing in quality; coverage is reported beside the score.
    """
    if point is None:
        return 0.0
    fields = asdict(point) if isinstance(point, CurvePoint) else point
    return float(fields["precision"]) if fields["accepted"] else 0.0


def with_margin(
    threshold: float, pred_labels: Sequence[str | None], confidences: Sequence[float]
) -> float:
    """``threshold`` moved halfway down to the next lower confidence of an answering
    prediction: it answers exactly the same calls, and a served confidence a unit in the last
    place below the one evaluated (another batch, another kernel) is still answered."""
    below = [
        float(c)
        for p, c in zip(pred_labels, confidences, strict=True)
        if p is not None and c < threshold
    ]
    if not below:
        return threshold
    middle = (threshold + max(below)) / 2
    # two adjacent floats have no float between them: the middle would round onto one
    return middle if max(below) < middle < threshold else threshold


def curve_as_dicts(curve: Iterable[CurvePoint], max_points: int = 200) -> list[dict[str, Any]]:
    """The curve thinned to at most ``max_points`` (keeping both ends) for reports."""
    pts = list(curve)
    if len(pts) > max_points:
        step = (len(pts) - 1) / (max_points - 1)
        pts = [pts[round(i * step)] for i in range(max_points)]
    return [
        {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(p).items()} for p in pts
    ]


# ------------------------------------------------------------------------- calibration


def softmax(logits: Sequence[float], temperature: float = 1.0) -> list[float]:
    if not logits:
        return []
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def nll(logit_rows: Sequence[Sequence[float]], targets: Sequence[int], temperature: float) -> float:
    """Mean negative log-likelihood of the targets at one temperature."""
    total = 0.0
    for row, y in zip(logit_rows, targets, strict=True):
        scaled = [x / temperature for x in row]
        top = max(scaled)
        lse = top + math.log(sum(math.exp(x - top) for x in scaled))
        total += lse - scaled[y]
    return total / max(1, len(targets))


def fit_temperature(
    logit_rows: Sequence[Sequence[float]],
    targets: Sequence[int],
    lo: float = 0.05,
    hi: float = 20.0,
    steps: int = 241,
) -> float:
    """Temperature scaling (Guo et al., 2017): the T minimising held-out NLL.

    A log-spaced grid followed by a golden-section refinement: deterministic, no optimiser
    state, and robust to the flat NLL of tiny calibration sets. 1.0 when there is no data.
    """
    if not targets:
        return 1.0
    grid = [lo * (hi / lo) ** (i / (steps - 1)) for i in range(steps)]
    losses = [nll(logit_rows, targets, t) for t in grid]
    best = min(range(steps), key=lambda i: (losses[i], abs(math.log(grid[i]))))
    a, b = grid[max(0, best - 1)], grid[min(steps - 1, best + 1)]
    gr = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        c, d = b - gr * (b - a), a + gr * (b - a)
        if nll(logit_rows, targets, c) <= nll(logit_rows, targets, d):
            b = d
        else:
            a = c
    return (a + b) / 2


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> float:
    """ECE: the bin-weighted gap between confidence and accuracy."""
    n = len(confidences)
    if not n:
        return 0.0
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if lo < c <= hi or (b == 0 and c == 0.0)]
        if idx:
            conf = sum(confidences[i] for i in idx) / len(idx)
            acc = sum(1 for i in idx if correct[i]) / len(idx)
            total += len(idx) / n * abs(conf - acc)
    return total


def choice_calibration_error(
    pred_labels: Sequence[str | None],
    confidences: Sequence[float],
    ref_labels: Sequence[str | None],
) -> float:
    """ECE of a selector's confidence in its choice, a label or *defer* (None): deferring a
    call whose reference is None is a right choice, not a confident mistake."""
    return expected_calibration_error(
        confidences, [p == r for p, r in zip(pred_labels, ref_labels, strict=True)]
    )


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """Mean, p50 and p95 in milliseconds (nearest-rank percentiles)."""
    if not latencies_ms:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0}
    xs = sorted(latencies_ms)

    def pct(q: float) -> float:
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]

    return {
        "mean": round(sum(xs) / len(xs), 3),
        "p50": round(pct(0.5), 3),
        "p95": round(pct(0.95), 3),
    }
