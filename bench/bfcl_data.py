"""Turn the Berkeley Function Calling Leaderboard's data into the call logs our gateway writes.

Why: BFCL's questions are real agent tool-calling requests and its ground truth is what a
strong model answers, so they stand in for a logged LLM's traffic (S1 of the conversion loop)
without any network or API key. Each BFCL entry becomes one :class:`slm_contract.CallRecord`:

- request: the question's chat messages (all turns, in order) and its functions as OpenAI
  tool schemas (BFCL's Gorilla types mapped with the package's own ``GORILLA_TO_OPENAPI``
  table, as its OpenAI handler does, but keeping the original function names);
- response: the ground-truth calls as ``tool_calls`` (for each parameter the first accepted
  value; a parameter whose accepted values are only ``""`` is left out, as BFCL means
  "optional, may be omitted"). ``live_irrelevance`` entries, which have no right tool, get a
  plain-text answer and no tool call: the calls an SLM must hand back to the LLM.

``request_id`` is the BFCL id (``live_multiple_12-4-3``), so the category and BFCL's
function-set number survive curation and can label clusters and reports.

Usage::

    python bench/bfcl_data.py --out /tmp/bfcl/calls.jsonl \
        [--categories live_multiple,simple_python,live_irrelevance]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))

from slm_contract import CallRecord  # noqa: E402

DEFAULT_CATEGORIES = ("live_multiple", "simple_python", "live_irrelevance")
#: The task name written into every record: one agent, one call log.
TASK = "bfcl-tools"
#: What the "LLM" answers when no tool fits (BFCL irrelevance): plain text, no tool call.
IRRELEVANT_ANSWER = "None of the available tools can do this, so here is a direct answer."
BFCL_VERSION_PREFIX = "BFCL_v4_"

# BFCL's Gorilla type names -> JSON-schema types. The package ships the same table
# (bfcl_eval.constants.type_mappings.GORILLA_TO_OPENAPI); it is used when importable.
_FALLBACK_GORILLA_TO_OPENAPI = {
    "integer": "integer",
    "number": "number",
    "float": "number",
    "string": "string",
    "boolean": "boolean",
    "bool": "boolean",
    "array": "array",
    "list": "array",
    "dict": "object",
    "object": "object",
    "tuple": "array",
    "any": "string",
}


def bfcl_data_dir() -> Path:
    """The ``data/`` folder of the installed ``bfcl-eval`` package."""
    import bfcl_eval

    return Path(bfcl_eval.__file__).resolve().parent / "data"


def _type_map() -> dict[str, str]:
    try:
        from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
    except ImportError:
        return dict(_FALLBACK_GORILLA_TO_OPENAPI)
    return dict(GORILLA_TO_OPENAPI)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_category(category: str, data_dir: Path | None = None) -> list[dict[str, Any]]:
    """BFCL entries of one category, each with its ``ground_truth`` joined in when it has one."""
    base = data_dir or bfcl_data_dir()
    entries = _read_jsonl(base / f"{BFCL_VERSION_PREFIX}{category}.json")
    answers_path = base / "possible_answer" / f"{BFCL_VERSION_PREFIX}{category}.json"
    if answers_path.is_file():
        answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(answers_path)}
        for entry in entries:
            entry["ground_truth"] = answers.get(entry["id"])
    return entries


def json_schema(schema: dict[str, Any], type_map: dict[str, str]) -> dict[str, Any]:
    """A Gorilla parameter schema as JSON schema, recursively (properties and items)."""
    out = copy.deepcopy(schema)
    kind = out.get("type")
    if kind is None:
        out["type"] = "string"
    else:
        if kind == "float":
            out["format"] = "float"  # JSON schema has no float; BFCL's handler marks it so
        out["type"] = type_map.get(kind, "string")
    if isinstance(out.get("properties"), dict):
        out["properties"] = {
            k: json_schema(v, type_map) if isinstance(v, dict) else v
            for k, v in out["properties"].items()
        }
    if isinstance(out.get("items"), dict):
        out["items"] = json_schema(out["items"], type_map)
    return out


def to_openai_tool(function: dict[str, Any], type_map: dict[str, str]) -> dict[str, Any]:
    """One BFCL function as an OpenAI ``tools[]`` entry (names are kept as they are)."""
    params = function.get("parameters") or {"type": "dict", "properties": {}}
    parameters = json_schema(params, type_map)
    parameters["type"] = "object"
    return {
        "type": "function",
        "function": {
            "name": function["name"],
            "description": function.get("description", ""),
            "parameters": parameters,
        },
    }


def first_value(accepted: list[Any]) -> tuple[bool, Any]:
    """The value an LLM would have sent for one parameter: the first accepted, non-empty one."""
    for value in accepted:
        if value == "":
            continue
        if isinstance(value, dict):  # nested dicts list accepted values per key, too
            return True, {
                k: v
                for k, vs in value.items()
                for ok, v in [first_value(vs if isinstance(vs, list) else [vs])]
                if ok
            }
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return True, [first_value([v])[1] for v in value]
        return True, value
    return False, None


def tool_calls_from_ground_truth(ground_truth: Iterable[dict[str, Any]], rid: str) -> list[Any]:
    """BFCL's ``[{name: {param: [accepted values]}}]`` as OpenAI ``tool_calls``."""
    calls = []
    for n, call in enumerate(ground_truth):
        ((name, params),) = call.items()
        args = {}
        for param, accepted in params.items():
            ok, value = first_value(accepted)
            if ok:
                args[param] = value
        calls.append(
            {
                "id": f"call_{re.sub(r'[^A-Za-z0-9]', '_', rid)}_{n}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
    return calls


def messages_of(question: list[Any]) -> list[dict[str, Any]]:
    """BFCL's list of turns (each a list of messages) flattened into one chat history."""
    out: list[dict[str, Any]] = []
    for turn in question:
        for msg in turn if isinstance(turn, list) else [turn]:
            out.append({"role": msg["role"], "content": msg["content"]})
    return out


def record_for(entry: dict[str, Any], type_map: dict[str, str] | None = None) -> CallRecord:
    """One BFCL entry as the call record the gateway would have logged for it."""
    tmap = type_map or _type_map()
    tools = [to_openai_tool(f, tmap) for f in entry.get("function") or []]
    truth = entry.get("ground_truth")
    if truth:
        response: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": tool_calls_from_ground_truth(truth, entry["id"]),
        }
    else:
        response = {"role": "assistant", "content": IRRELEVANT_ANSWER}
    return CallRecord(
        task=TASK,
        messages=messages_of(entry["question"]),
        response=response,
        backend="llm",
        model="bfcl-ground-truth",
        tools=tools,
        request_id=entry["id"],
    )


def category_of(request_id: str) -> str:
    """``live_multiple_12-4-3`` -> ``live_multiple``; ``simple_python_7`` -> ``simple_python``."""
    head = request_id.split("-", 1)[0]
    return head.rsplit("_", 1)[0] if head.rsplit("_", 1)[-1].isdigit() else head


def function_set_of(request_id: str) -> str:
    """BFCL live ids carry the number of their function set: ``live_multiple_12-4-3`` -> ``4``."""
    parts = request_id.split("-")
    return f"{category_of(request_id)}/{parts[1]}" if len(parts) >= 3 else request_id


def records(
    categories: Iterable[str] = DEFAULT_CATEGORIES, data_dir: Path | None = None
) -> Iterator[CallRecord]:
    tmap = _type_map()
    for category in categories:
        for entry in load_category(category, data_dir):
            yield record_for(entry, tmap)


def write_call_log(
    path: Path, categories: Iterable[str] = DEFAULT_CATEGORIES, data_dir: Path | None = None
) -> int:
    """Write the categories' records as one JSONL call log; returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for record in records(categories, data_dir):
            fh.write(record.to_json() + "\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="call-log JSONL to write")
    parser.add_argument(
        "--categories",
        default=",".join(DEFAULT_CATEGORIES),
        help="comma-separated BFCL categories (default: %(default)s)",
    )
    ns = parser.parse_args(argv)
    n = write_call_log(ns.out, [c for c in ns.categories.split(",") if c])
    print(json.dumps({"records": n, "out": str(ns.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
