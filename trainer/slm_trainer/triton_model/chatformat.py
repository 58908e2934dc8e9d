"""How a logged call becomes a prompt and an answer for a causal LM, and back.

Why one stdlib-only module: the trainer renders training examples with it and the Triton
Python backend renders live requests and parses generated text with it. If the two sides
formatted prompts even slightly differently, the served model would see inputs it was never
trained on. So the export stage copies this very file next to ``model.py`` in the model
repository, and both import the same functions. It needs only a tokenizer object with
``apply_chat_template`` (transformers), passed in by the caller.

The answer format is the model's chat template with the assistant's turn holding either the
plain ``content`` or, for tool calls, one compact JSON list ``[{"name": ..., "arguments":
{...}}]``. A JSON list is what small models learn most reliably, it parses back without a
model-specific tool-call grammar, and it covers parallel calls. Generated text is read back as
calls only when the request offered tools and only in exactly that format
(:func:`parse_answer`); any other text, JSON or not, is the answer's content.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections.abc import Sequence
from typing import Any

FORMAT = "slmfleet.dev/chat-format/v1"

#: Prepended to the system message when the chat template cannot render tools itself.
TOOLS_PREAMBLE = (
    "You can call these tools. To call tools, answer only with a JSON list of "
    '{"name": <tool name>, "arguments": <object>} items.\nTools: '
)


#: The tool the probe of :func:`template_supports_tools` offers: a name no template writes itself.
_PROBE_TOOL = "slmfleet_probe_tool_7c1e"


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: any of them may use the variable
        return "\n".join(str(t) for t in template.values())
    return str(template)


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders a ``tools`` argument (Qwen2.5, SmolLM3, Llama 3.1...).

    Asked by rendering: a probe request offers one uniquely named tool, and the template
    supports tools when that name is in the prompt. Mentioning ``tools`` is not enough:
    Phi-4-mini's template reads a per-message ``message['tools']`` and ignores the ``tools``
    variable, so tools passed to it never reached the prompt. A template that fails on the
    probe gets the system-message route too.
    """
    if "tools" not in _template_text(tokenizer):
        return False
    probe = [
        {
            "type": "function",
            "function": {
                "name": _PROBE_TOOL,
                "description": "probe",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    try:
        text = _apply(
            tokenizer,
            [{"role": "user", "content": "hello"}],
            {"tokenize": False, "add_generation_prompt": True, "tools": probe},
        )
    except Exception:
        return False
    return _PROBE_TOOL in text


def _text(content: Any) -> str:
    """OpenAI content may be null, a string, or a list of typed parts; templates want text.

    A part's null text, and content of any other kind (an object, a boolean), is no text:
    written as Python's repr ("None", "{'type': ...}"), it was trained as the answer.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for part in content:
        if isinstance(part, dict):
            text = part.get("text")
            parts.append("" if text is None else str(text))
        elif part is not None:
            parts.append(str(part))
    return "".join(parts)


def _arguments(raw: Any) -> Any:
    """OpenAI sends arguments as a JSON string; compare and serialise them as objects.

    Blank arguments are no arguments, ``{}``, as the gateway and the scorer read them (a
    legacy ``function_call`` without arguments is captured as ``""``): kept as the string,
    the model learnt to write ``"arguments": ""``, which serving refuses as a malformed call.
    """
    if isinstance(raw, str) and not raw.strip():
        return {}
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to decode
            return raw
    return {} if raw is None else raw


def calls_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{"name", "arguments"}]`` from an assistant message's OpenAI ``tool_calls``."""
    calls = []
    listed = message.get("tool_calls")
    for call in listed if isinstance(listed, list) else []:  # a number here crashed curate
        if not isinstance(call, dict):
            continue
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        calls.append(
            {"name": str(fn.get("name", "")), "arguments": _arguments(fn.get("arguments"))}
        )
    return calls


def target_text(response: dict[str, Any]) -> str:
    """The assistant turn the model learns to write for a logged LLM response."""
    calls = calls_of(response)
    if calls:
        return json.dumps(calls, ensure_ascii=False, separators=(", ", ": "))
    return _text(response.get("content")).strip()


#: Roles the chat templates know under another name: OpenAI's "developer" message is the
#: system prompt of newer APIs, a "function" message the result of a legacy function call.
#: The templates of small models render neither: Qwen's and Phi's dropped the text silently,
#: Gemma's refused the whole conversation.
_TEMPLATE_ROLE = {"developer": "system", "function": "tool"}


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with text content only, in the roles templates know; earlier assistant tool
    calls become their JSON text. Adjacent system messages (a system prompt and a developer
    message) become one: most templates read only the first message as the system prompt."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = str(m.get("role", "user"))
        role = _TEMPLATE_ROLE.get(role, role)
        if role == "assistant" and m.get("tool_calls"):
            content = target_text(m)
        else:
            content = _text(m.get("content"))
        if role == "system" and out and out[-1]["role"] == "system":
            joined = "\n\n".join(t for t in (out[-1]["content"], content) if t)
            out[-1] = {"role": "system", "content": joined}
            continue
        out.append({"role": role, "content": content})
    return out


def _tools_in_system(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict]:
    preamble = TOOLS_PREAMBLE + json.dumps(tools, ensure_ascii=False, separators=(",", ":"))
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": preamble + "\n\n" + messages[0]["content"]}
        return [first, *messages[1:]]
    return [{"role": "system", "content": preamble}, *messages]


def _without_tool_role(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates that reject or drop the ``tool`` role: tool results become user turns,
    and the results of parallel calls one turn (Gemma's template wants roles to alternate).

    A user message right after the results joins their turn too: as a turn of its own it
    made two user turns in a row, which Gemma's template refuses, so such a call was left
    out of training and always handed back to the LLM at serving.
    """
    out: list[dict[str, Any]] = []
    after_result = False  # the last turn in out holds tool results
    for m in messages:
        if after_result and m["role"] in ("tool", "user"):
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + m["content"]}
        elif m["role"] == "tool":
            out.append({"role": "user", "content": "Tool result: " + m["content"]})
        else:
            out.append(m)
        after_result = m["role"] == "tool" or (after_result and m["role"] == "user")
    return out


_ROLE_PROBE = "slmfleet_probe_text_5d2a"
_drops_role: dict[tuple[str, str, bool], bool] = {}


def template_drops_role(tokenizer: Any, role: str, with_tools: Any = None) -> bool:
    """Whether the chat template renders a ``role`` message without an error but leaves its
    text out of the prompt.

    Asked by rendering requests (a training example's prompt is its request's rendering,
    see :func:`split_example`), once per template and per whether tools are passed, which
    picks among named templates such as Command-R's ``default`` and ``tool_use``. Phi-3's
    template has no branch for ``tool`` and dropped those messages silently, so tool results
    never reached the prompt in training or serving. The system text is also asked for in a
    request that continues after a tool result: Mistral v0.3's family writes it only into a
    *last* user message, and a variant of it that renders tool messages itself would serve
    (and train) such calls without their instructions. The real ones raise on a tool message
    without its call id, so their tool results become user turns and the system text stays
    where the template puts it. A template that raises on a probe does not count as dropping
    there: :func:`render` tries its forms in order.
    """
    key = (_template_text(tokenizer), role, bool(with_tools))
    if key not in _drops_role:
        probed = {"role": role, "content": _ROLE_PROBE}
        user = {"role": "user", "content": "hello"}
        calling = {"role": "assistant", "content": "calling"}
        if role == "system":
            probes = [[probed, user], [probed, user, calling, {"role": "tool", "content": "21"}]]
        else:
            probes = [[user, calling, probed]]
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if with_tools:
            kwargs["tools"] = with_tools

        def dropped(messages: list[dict[str, Any]]) -> bool:
            try:
                return _ROLE_PROBE not in _apply(tokenizer, messages, kwargs)
            except Exception:
                return False

        _drops_role[key] = any(dropped(m) for m in probes)
    return _drops_role[key]


def _system_in_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates that reject the ``system`` role (Gemma, Mistral v0.1/v0.2): the system
    text opens the first user turn (a user turn of its own when there is none)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for i, m in enumerate(rest):
        if m["role"] == "user":
            merged = {"role": "user", "content": system + "\n\n" + m["content"]}
            return [*rest[:i], merged, *rest[i + 1 :]]
    return [{"role": "user", "content": system}, *rest]


#: The date written into prompts by templates that date them (``date_string``): the one
#: Llama 3.1/3.2's own template falls back to when it has no clock.
TEMPLATE_DATE = "26 Jul 2024"
#: The same day for templates that read the clock themselves (``strftime_now``: SmolLM3's).
TEMPLATE_NOW = dt.datetime(2024, 7, 26)
#: A ``strftime_now`` call with a literal format, as templates write it.
_STRFTIME_NOW = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")


@functools.lru_cache(maxsize=16)
def _clock_pinned(template: str) -> str:
    """``template`` with ``strftime_now`` answering :data:`TEMPLATE_NOW` instead of today.

    Why: a template such as SmolLM3's writes ``strftime_now("%d %B %Y")`` into every prompt
    whatever ``date_string`` says, so a model was trained on prompts of its training day and
    served prompts of each later day (the Llama problem ``date_string`` solves), and a
    fine-tune preempted before midnight could not resume after it (its checkpoint is bound to
    the tokenised prompts). transformers gives templates no way to set the clock (a callable
    passed in is replaced by a string), so a macro of the same name, defined first, shadows
    the global: it answers each format the template names, formatted in Python.
    """
    formats = sorted({m.group(2) for m in _STRFTIME_NOW.finditer(template)})
    answers = json.dumps({f: TEMPLATE_NOW.strftime(f) for f in formats})
    other = json.dumps(TEMPLATE_NOW.strftime("%Y-%m-%d"))
    macro = (
        "{%- macro strftime_now(format) -%}"
        f"{{{{- {answers}.get(format, {other}) -}}}}"
        "{%- endmacro -%}"
    )
    return macro + template


def _apply(tokenizer: Any, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
    """``apply_chat_template`` with thinking off where the template has the switch, and a
    fixed date.

    Qwen3-style templates write an empty ``<think>\\n\\n</think>\\n\\n`` block before the last
    assistant turn, but put it in the generation prompt only with ``enable_thinking=False``.
    Without it the training completion started with that block (plain text, not a special
    token, so decoding kept it) and no served answer parsed as a tool call. With it the prompt
    ends with the empty block, in training and in serving alike, and the answer is the
    completion.

    Llama 3.1/3.2-Instruct templates write today's date into every prompt unless given a
    ``date_string``: the model was trained and evaluated on prompts of the training day and
    served prompts of each later day, which it never saw. Training, evaluation and serving
    all render here, so one fixed date keeps their prompts identical.
    """
    kwargs = {**kwargs, "date_string": TEMPLATE_DATE}
    text = _template_text(tokenizer)
    if "enable_thinking" in text:
        kwargs["enable_thinking"] = False
    if "strftime_now" in text:
        template = tokenizer.get_chat_template(None, kwargs.get("tools"))
        kwargs["chat_template"] = _clock_pinned(template)
    return str(tokenizer.apply_chat_template(messages, **kwargs))


def render_each(
    tokenizer: Any,
    conversations: Sequence[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]],
    tools_in_template: bool,
) -> tuple[list[str], list[int]]:
    """The prompts of the ``(messages, tools)`` conversations the chat template renders, and
    their indices; the others are left out.

    Why one function: a conversation the template rejects in every form (two user turns in a
    row, for a template that wants them alternating) must be handed back to the LLM, both in
    evaluation, which counts it as a deferral, and at serving, where the Triton backend
    answers it with confidence 0. Written twice, the two rules could drift apart.
    """
    prompts: list[str] = []
    rendered: list[int] = []
    for i, (messages, tools) in enumerate(conversations):
        try:
            prompts.append(render(tokenizer, messages, tools, tools_in_template))
        except Exception:  # the template's own error type varies (jinja, ValueError...)
            continue
        rendered.append(i)
    return prompts, rendered


def render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tools_in_template: bool,
    answer: str | None = None,
) -> str:
    """The chat-template text of the request, ending where the assistant's answer starts.

    With ``answer`` the assistant turn is included: the text is the full training example.
    A template that rejects the conversation as is gets it again with tool results as user
    turns, then with the system text in the first user turn (Gemma-2 has no system role, and
    tools the template cannot render go into a system message). When every form fails, the
    error is the last form's: what still stands in the way once those are out of it.
    """
    msgs = _plain_messages(messages)
    kwargs: dict[str, Any] = {"tokenize": False}
    if tools and tools_in_template:
        kwargs["tools"] = tools
    elif tools:
        msgs = _tools_in_system(msgs, tools)
    if answer is None:
        kwargs["add_generation_prompt"] = True
    else:
        msgs = [*msgs, {"role": "assistant", "content": answer}]
    forms = [msgs]
    tools_kw = kwargs.get("tools")
    if any(m["role"] == "tool" for m in msgs):
        # a template that drops tool messages silently gets them as user turns only
        moved = _without_tool_role(msgs)
        forms = [moved] if template_drops_role(tokenizer, "tool", tools_kw) else [*forms, moved]
    if any(m["role"] == "system" for m in msgs):
        moved_forms = [_system_in_user(f) for f in forms]
        dropped = template_drops_role(tokenizer, "system", tools_kw)
        forms = moved_forms if dropped else [*forms, *moved_forms]
    for form in forms[:-1]:
        try:
            return _apply(tokenizer, form, kwargs)
        except Exception:
            continue
    return _apply(tokenizer, forms[-1], kwargs)


def split_example(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    response: dict[str, Any],
    tools_in_template: bool,
) -> tuple[str, str]:
    """(prompt text, completion text) of one logged call.

    The completion is what the template writes for the assistant turn, cut right after the
    end-of-sequence token so the model learns to stop there. Templates whose full rendering
    does not start with the generation prompt (rare) fall back to answer + EOS.
    """
    prompt = render(tokenizer, messages, tools, tools_in_template)
    answer = target_text(response)
    eos = getattr(tokenizer, "eos_token", None) or ""
    full = render(tokenizer, messages, tools, tools_in_template, answer=answer)
    if full.startswith(prompt) and answer in full[len(prompt) :]:
        completion = full[len(prompt) :]
        if eos and eos in completion:
            completion = completion[: completion.index(eos) + len(eos)]
        elif eos:
            completion = completion.rstrip() + eos
    else:
        completion = answer + eos
    return prompt, completion


#: Key set on a parsed answer that tried to call tools but broke the trained format; the
#: backend serves it with confidence 0 (the gateway falls back to the LLM).
MALFORMED = "malformed_tool_call"


def _trained_calls(value: Any) -> list[dict[str, Any]] | None:
    """The calls of ``value`` when it is exactly what :func:`target_text` writes, else None:
    a non-empty list of ``{"name": <non-empty string>, "arguments": <object>}``."""
    if not isinstance(value, list) or not value:
        return None
    for call in value:
        if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
            return None
        if not isinstance(call["name"], str) or not call["name"].strip():
            return None
        if not isinstance(call["arguments"], dict):
            return None
    return value


def _looks_like_calls(value: Any) -> bool:
    """A try at the call format that :func:`_trained_calls` refuses (arguments missing or
    not an object, extra keys, a bare object instead of the list)."""
    if isinstance(value, dict):
        return "name" in value and "arguments" in value
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(c, dict) and "name" in c for c in value)
    )


#: The start of a try at the call format: ``[`` then ``{`` or nothing (whitespace between),
#: or ``{`` (a bare call object).
_CALL_START = re.compile(r"\A(?:\[\s*(?:\{|\Z)|\{)")


def _starts_like_calls(text: str) -> bool:
    """Whether ``text`` starts as the trained call format does, parsed or not.

    Why: a call with a brace missing, or ended mid-way, does not parse, and was served as
    content with the model's own confidence: JSON-looking text instead of a call. Why not
    any ``[``: an answer in text may open with a citation (``[1]``), a markdown link or a
    checkbox, none of which is a call; ``[{`` and ``{`` are (on a tool-call task the trained
    text answers are the LLM's prose, which starts so rarely)."""
    return bool(_CALL_START.match(text))


#: A reasoning block at the start of generated text (Qwen3 and other thinking models).
_LEADING_THINK = re.compile(r"\A\s*<think>.*?</think>", re.DOTALL)


def parse_answer(text: str, tools_offered: bool) -> dict[str, Any]:
    """An OpenAI assistant message from generated text.

    Tool calls only when the request offered tools (``tools_offered``: the request had tools,
    or the task is a tool-call task) and the text is exactly the format the model was trained
    to write (:func:`target_text`): a JSON list of ``{"name", "arguments": {...}}``. Anything
    else is ``content``: without tools, a JSON answer such as ``{"name": "Alice Smith"}`` is
    the answer itself, not a call. With tools, text that tries the call format and breaks it
    (``"arguments": "Paris"`` or ``null``, a missing ``arguments``, a ``NaN`` or ``Infinity``
    among the arguments), or that starts as a call (:func:`_starts_like_calls`) and is no
    JSON (a brace missing, cut off mid-way, text after the list), is content marked
    :data:`MALFORMED`: not a call an agent could run, so it is never served (confidence 0).
    A leading ``<think>...</think>`` block (a thinking model's, empty or not) is not part of
    the answer: it is dropped first.
    """
    stripped = _LEADING_THINK.sub("", text, count=1).strip()
    calls: list[dict[str, Any]] | None = None
    malformed = False
    if tools_offered and stripped[:1] in ("[", "{"):
        parsed = True
        try:
            value = json.loads(stripped)
        except (ValueError, RecursionError):
            value, parsed = None, False
        calls = _trained_calls(value)
        if calls is not None and not _writable(calls):
            # "\ud83d" alone decodes to a lone surrogate that no UTF-8 writer can encode, and
            # NaN or Infinity (Python reads them, 1e999 too) are no JSON: such a call could
            # be neither logged, written to predictions nor sent back as JSON an agent parses.
            # The text itself is fine, so only a call is refused, plain JSON content is not.
            calls = None
        malformed = calls is None and (
            _looks_like_calls(value) or (not parsed and _starts_like_calls(stripped))
        )
    if calls is None:
        message: dict[str, Any] = {"role": "assistant", "content": stripped}
        if malformed:
            message[MALFORMED] = True
        return message
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {
                    "name": c["name"],
                    "arguments": json.dumps(c["arguments"], ensure_ascii=False),
                },
            }
            for i, c in enumerate(calls)
        ],
    }


def _writable(value: Any) -> bool:
    """Whether ``value`` is written as strict JSON in UTF-8 (no lone surrogate, no NaN or
    Infinity, which strict parsers such as JavaScript's ``JSON.parse`` refuse)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except ValueError:  # UnicodeEncodeError is one
        return False
    return True


def selector_answer(
    label: str | None, confidence: float, task_type: str, text: str | None = None
) -> dict[str, Any]:
    """The response served for a closed-label prediction: a deferral, a label, or a tool call.

    A selector chooses the tool, not its arguments: the call it serves has ``{}`` as
    arguments. A classification label is served as ``text``, the LLM's own spelling of it
    when known (labels are kept normalised). The evaluate stage scores a selector on this
    very answer (shared here so that the two cannot differ).
    """
    if label is None:
        return {"role": "assistant", "content": None, "defer": True, "confidence": confidence}
    if task_type == "classification":
        return {"role": "assistant", "content": label if text is None else text, "label": label}
    return {
        "role": "assistant",
        "content": None,
        "label": label,
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": label, "arguments": "{}"}}
        ],
    }


def _token_limit(body: dict[str, Any]) -> int | None:
    """The most tokens the request lets its answer have: the smaller of ``max_tokens`` and
    ``max_completion_tokens`` where both are set, None where neither is.

    Why both: the gateway sends the request's limit as ``max_tokens``, and an OpenAI body
    sent here directly may carry either field. A value that is no positive integer is
    refused rather than read as no limit: an answer longer than the caller allowed is the
    very thing the field is there to prevent."""
    limits = []
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"'{name}' must be an integer >= 1, got {value!r}")
        limits.append(value)
    return min(limits) if limits else None


def parse_request(
    raw: bytes | str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int | None]:
    """(messages, tools, token limit) of a serving request: an OpenAI chat-completions body
    as JSON.

    The limit (:func:`_token_limit`) is None when the request sets none, as an older gateway
    never does: the model's own ``max_new_tokens`` bounds the answer then. Any other field
    is ignored, so a newer gateway's additions do not fail an older model either.
    Raises ValueError with a message a client can act on.
    """
    try:
        body = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"request is not JSON: {exc}") from exc
    if isinstance(body, list):
        body = {"messages": body}
    if not isinstance(body, dict):
        raise ValueError("request must be a JSON object with 'messages' (and optional 'tools')")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ValueError("every message must be an object with a 'role'")
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("'tools' must be a list of objects")
    return messages, tools, _token_limit(body)
