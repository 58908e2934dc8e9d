"""The ``curate`` stage (S2 of the conversion loop): turn a raw call log into train/eval sets.

Why a stage of its own: what a small model learns is bounded by what it is shown. A call log
holds broken lines, PII and secrets, and the same call repeated thousands of times (agents
retry and loop). Training on that leaks data into weights and over-fits the few calls that
repeat most. This stage, in order:

1. parses each JSON line into a :class:`slm_contract.CallRecord`; a malformed line is counted
   by reason and skipped, never fatal, and the first few are kept with their line numbers;
   only the LLM's answers go on: the gateway also captures the calls the served SLM answered,
   and those are counted (``not_llm_answer``), never trained or evaluated on; so are the
   calls the gateway never sends to an SLM (``llm_only_tools``): a custom (free-form) tool
   offered or called, a strict function offered, or a record the gateway marked
   ``llm_only`` (``n`` > 1, ``logprobs``, a non-text ``response_format``, ``tool_choice:
   "none"``: fields the record does not hold); with ``not_before``, so are the calls
   captured before it (``before_not_before``), and those with no capture time: a gateway
   older than the ``llm_only`` mark logged such calls unmarked, and nothing else in the
   record tells them apart, so a cutoff at the upgrade is the only way to leave them out
   (it serves as well after an agent's prompts or tools changed);
2. scrubs PII and secrets (:mod:`slm_trainer.redact`; on by default);
3. drops exact duplicates (same normalised messages, tools and response; tool-call ids and
   whitespace don't count) and near duplicates (MinHash LSH over the word 3-grams of the
   conversation before the answer: user turns, earlier tool calls with their arguments and tool
   results, not the system prompt; Jaccard >= ``near_dup_threshold``) among calls with the same
   system and developer turns (a time or request id stamped on them aside) and the same tools
   offered, that the LLM answered with the same tool calls or JSON (any text answer counts as
   the same), or that use the very same words in the very same request (one request answered
   two ways: one label is noise). A near duplicate with another structured answer (a templated
   request that differs in an order number, in the request and the tool call's arguments alike)
   is an example of its own: it teaches filling that slot, and an eval split of such calls
   tests exactly that. Of identical calls the earliest captured is kept (timestamp, then
   request id); near duplicates are compared in the order of their content hash. So the same
   calls give the same output, byte for byte, whatever order the log holds them in: gateway
   replicas write shards in an order that depends on timing, and a model must not change
   because of that; with ``max_examples`` the examples are the first ``max_examples`` in
   content-hash order once near duplicates are out. Curate holds a sample of the distinct calls
   with the smallest hash, a quarter above ``max_examples`` (:class:`_Sample`), since a log
   only grows and curate holds each call it keeps (about 9 KB); where near duplicates leave
   fewer, the log is read again for the next calls;
4. splits train/eval, stratified by label (the first tool call's name, a short classification
   answer, or one stratum for free text): ``eval_fraction`` of all examples, spread over the
   strata in proportion to their size (:func:`eval_counts`), so a stratum with few examples
   may have none in eval. Within a stratum the eval examples are those with the smallest
   seeded hash of their content, so the split does not depend on the log's order. It is not
   stable as the log grows: new examples of smaller hash take eval places, and the
   proportional spread moves places between small strata, so between retrainings some
   examples move from eval to train (about one in eight of the first eval set after three
   appends of a tenth each, in a log of a few hundred calls). Each run's split is still
   disjoint; a candidate's score is only comparable with scores on the same eval set.

Outputs in ``output_dir``: ``train.jsonl`` and ``eval.jsonl`` (call records, in the order of
their content hash, which also mixes a log's runs of one tool before training reads it) and
``curate_report.json`` (every count, and the folder's ``*.jsonl`` entries that are not
files, never read). Heavy imports (Presidio, datasketch) happen inside the
functions that need them, so ``slm-trainer curate --help`` stays instant.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import math
import os
import re
import stat
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urlsplit

from slm_contract import (
    DEFAULT_MAX_EXAMPLES,
    CallRecord,
    ContractError,
    TrainerResult,
    holds_custom_call,
    llm_only_request,
    redact_uri,
    redact_uris,
)
from slm_trainer import metrics
from slm_trainer.triton_model import chatformat

#: The contract's name for this stage in TrainerResult.
CONTRACT_STAGE = "prepare"

#: The only backend whose answers are trained on. The gateway also captures the calls the
#: served SLM answered (``slm``): trained on, a candidate would learn its predecessor's
#: mistakes, and an eval set of them would score candidates against the SLM, not the LLM.
TRAINED_BACKEND = "llm"
#: How the report counts calls the LLM answered that the gateway never sends to an SLM (a
#: custom tool offered or called, a strict function offered, a record marked ``llm_only``;
#: see :func:`llm_only_tools`).
LLM_ONLY_TOOLS = "llm_only_tools"
#: How the report counts the calls captured before ``not_before`` (or with no capture time).
BEFORE_NOT_BEFORE = "before_not_before"

#: RFC 3339's date-time, as the CRD's ``format: date-time`` admits it (a zone is required):
#: every spec.dataset.notBefore the apiserver stores is one curate reads.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)

#: What an error sample says of a record refused after parsing; never its content, which
#: may hold what redaction would have removed.
TOO_LONG_ERROR = "a string is over the redactor's limit (MAX_TEXT_CHARS); not analysed"
TOO_DEEP_ERROR = "nested too deep to be hashed or written back"
INVALID_UNICODE_ERROR = "a lone surrogate that cannot be written as UTF-8"

Progress = Callable[[dict[str, Any]], None]
StratifyBy = Literal["auto", "tool", "content", "none"]

_WORD_RE = re.compile(r"<[A-Z_]+_\d+>|\w+", re.UNICODE)
_WS_RE = re.compile(r"\s+")


@dataclass
class Args:
    """Curate a call log into train.jsonl, eval.jsonl and curate_report.json."""

    # str first: the command line builds the first type of the union, and Path would fold
    # "s3://bucket/calls" into "s3:/bucket/calls" before the stage could see it was a URI.
    input: str | Path = field(
        metadata={
            "help": "call-log JSONL file, or a directory whose *.jsonl shards are read; either "
            "may be an fsspec URI (s3://bucket/calls/ns/task/, gs://..., file://...)"
        }
    )
    output_dir: Path = field(metadata={"help": "where train.jsonl, eval.jsonl and the report go"})
    task: str = field(
        default="",
        metadata={
            "help": "keep only the records whose task is this (the data-prep Job passes the "
            "AgentTask's name); the others are counted as other_task, with the most common "
            "task names (default: all)"
        },
    )
    scrub_pii: bool = field(default=True, metadata={"help": "redact PII and secrets"})
    near_dup_threshold: float = field(
        default=0.9,
        metadata={
            "help": "Jaccard similarity of conversations (user turns, earlier tool calls and "
            "results) above which a record with the same system prompt and tools, answered "
            "with the same tool calls or JSON (or any text), is a near duplicate; 1.0 turns "
            "it off"
        },
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "share of the examples held out for eval, spread over the strata"},
    )
    stratify_by: StratifyBy = field(
        default="auto",
        metadata={"help": "auto: tool name, else short answer; tool; content; none"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the split and of MinHash"})
    min_examples: int = field(
        default=10, metadata={"help": "fail when fewer examples remain after curation"}
    )
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations"})
    max_examples: int = field(
        default=DEFAULT_MAX_EXAMPLES,
        metadata={
            "help": "keep at most this many examples: the first in content-hash order once "
            "near duplicates are out, a uniform sample whatever the log's order; memory then "
            f"stays bounded as the log grows (default {DEFAULT_MAX_EXAMPLES}; 0: keep every call)"
        },
    )
    max_error_samples: int = field(
        default=5, metadata={"help": "malformed lines quoted in the report"}
    )
    not_before: str = field(
        default="",
        metadata={
            "help": "leave out the calls captured before this RFC 3339 date-time (such as "
            "2026-03-01T00:00:00Z), and those with no capture time; counted as "
            "before_not_before (default: none left out)"
        },
    )

    def __post_init__(self) -> None:
        self.input = as_location(self.input)
        self.output_dir = Path(self.output_dir)
        parse_not_before(self.not_before)  # refused here, not when the log is read
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ValueError("near_dup_threshold must be in (0, 1]")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        if self.min_examples < 1:
            raise ValueError("min_examples must be >= 1")
        if self.num_perm < 16:
            raise ValueError("num_perm must be >= 16")
        if self.max_examples < 0:
            raise ValueError("max_examples must be >= 0 (0: no bound)")
        if not 0 <= self.seed < 2**32:  # MinHash's range; refused here, not mid-run
            raise ValueError("seed must be in [0, 2**32)")
        if self.stratify_by not in ("auto", "tool", "content", "none"):
            raise ValueError("stratify_by must be auto, tool, content or none")

    @property
    def cutoff(self) -> float | None:
        """``not_before`` in epoch seconds, as call records hold their capture time."""
        return parse_not_before(self.not_before)


def parse_not_before(text: str) -> float | None:
    """An RFC 3339 date-time in epoch seconds; None for "" (no cutoff).

    Why a zone is required: without one the cutoff would move with the clock zone of the
    pod that reads it. A ValueError names the flag, for a command line that exits 2.
    """
    if not text:
        return None
    if _RFC3339.fullmatch(text):
        try:
            return datetime.fromisoformat(text.upper()).timestamp()
        except ValueError:
            pass  # a day or an hour that does not exist: 2026-02-30, 25:00
    raise ValueError(
        f"not_before must be an RFC 3339 date-time with a zone, such as "
        f"2026-03-01T00:00:00Z; got {text!r}"
    )


def before_cutoff(record: CallRecord, cutoff: float | None) -> bool:
    """Whether ``record`` was captured before ``cutoff`` (None: no cutoff). A record with no
    capture time (0) counts as before: nothing shows it came from the gateway it is meant
    to leave out the calls of."""
    return cutoff is not None and (not record.timestamp or record.timestamp < cutoff)


@dataclass
class ParseStats:
    """What reading the log found; ``errors`` holds the first few malformed lines."""

    lines: int = 0
    blank: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    other_task: int = 0
    #: How many of ``other_task`` each task name holds, so that a task waiting for data says
    #: whose calls its log holds (:func:`other_tasks_note`); at most
    #: :data:`OTHER_TASK_NAMES_HELD` names, so that a log with a name per call stays bounded.
    other_tasks: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: File and line number of the last line read: where a record that a later step
    #: refuses (too long to redact, too deep to write) came from.
    source: str = ""
    lineno: int = 0
    #: The input folder's ``*.jsonl`` entries that are not files, never read
    #: (:func:`list_input`): for a stage that reads through :func:`read_records`-style
    #: helpers and reports them beside the malformed lines.
    not_files: list[dict[str, str]] = field(default_factory=list)

    def left_to(self, task: str) -> None:
        """Count a record of another ``task``, left out."""
        self.other_task += 1
        if task in self.other_tasks or len(self.other_tasks) < OTHER_TASK_NAMES_HELD:
            self.other_tasks[task] += 1

    def skip(self, reason: str, error: str, max_error_samples: int = 5) -> None:
        """Count the current line as malformed for ``reason``; keep it among the first few.

        ``error`` says what is wrong, never what the line holds: it reaches the report, and
        the line may hold what redaction would have removed.
        """
        self.malformed[reason] += 1
        if len(self.errors) < max_error_samples:
            self.errors.append(
                {"file": self.source, "line": self.lineno, "reason": reason, "error": error[:200]}
            )

    def skipped_note(self, what: str = "line", where: bool = False) -> str:
        """``"; 3 malformed lines skipped (2 invalid_json, 1 too_deep)"``, or "" when none
        were: the tail a stage's result message gives its reader.

        ``where`` adds the file and line of the first one (``; first: train.jsonl line 15``),
        so that a hand-edited split can be fixed without reading the pod's log. Only the
        reason is quoted, never the line: the message reaches the operator's conditions.
        """
        total = sum(self.malformed.values())
        if not total:
            return ""
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.malformed.items()))
        if where and self.errors:
            first = self.errors[0]
            reasons += f"; first: {first['file']} line {first['line']}"
        return f"; {total} malformed {what}{'s' if total > 1 else ''} skipped ({reasons})"


#: The most task names :class:`ParseStats` counts the calls of other tasks by.
OTHER_TASK_NAMES_HELD = 1000
#: A longer task name is cut to this in a message: three of them fit in what the operator
#: quotes of it (plan.CURATE_SAID_MAX).
_TASK_NAME_SHOWN = 40


def most_common_tasks(counts: Mapping[str, int], n: int = 3) -> list[tuple[str, int]]:
    """The ``n`` task names with the most calls, most first; a tie goes by name, so that the
    same log says the same whatever order its shards hold the calls in."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]


def other_tasks_note(count: int, task: str, counts: Mapping[str, int]) -> str:
    """``'180 calls of other tasks left out (--task travel; most common: "support" 120,
    "billing" 60)'``, or "" when none were.

    Why the names: a dataset.uri may be a log that holds several agents' calls, and the
    data-prep Job keeps the calls whose task is the AgentTask's name; a log exported from
    elsewhere (or an AgentTask named otherwise than the gateway's route) holds none of
    them, and "0 examples" alone read as calls still to come. Each name is quoted and cut
    short: the message reaches the task's conditions.
    """
    if not count:
        return ""

    def shown(name: str) -> str:
        cut = name if len(name) <= _TASK_NAME_SHOWN else name[: _TASK_NAME_SHOWN - 3] + "..."
        return json.dumps(cut, ensure_ascii=False)

    names = ", ".join(f"{shown(name)} {n}" for name, n in most_common_tasks(counts))
    return (
        f"{count} call{'' if count == 1 else 's'} of other tasks left out (--task {task}"
        + (f"; most common: {names}" if names else "")
        + ")"
    )


# ------------------------------------------------------------------------------ parsing


#: Read-ahead of an object-store shard. fsspec's own line iteration reads a whole block
#: (5-50 MB) per line and seeks back, so shards are read through a buffer of this size instead.
_REMOTE_READ_BUFFER = 1 << 20

#: What to do about a denied read: the pods' identity is the task's ServiceAccount.
_ACCESS_HINT = (
    "give the trainer's ServiceAccount (spec.training.serviceAccountName) read access to it"
)
#: The same for a file or folder on a claim: the trainer pods run as uid 1000, fsGroup 1000.
_LOCAL_ACCESS_HINT = "give the trainer pods' user (uid 1000, fsGroup 1000) read access to it"


class CallLogUnreadable(Exception):
    """The call log's location cannot be read at all: no filesystem for its URI's protocol,
    access denied, or a bucket that does not exist.

    Distinct from "no call log yet" (an empty prefix, which the operator waits on) because
    waiting would never end: the stages turn it into a failed result with this message, which
    the operator shows in the task's DataReady condition.
    """


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` is an fsspec URI (``s3://``, ``gs://``, ``file://``, ``memory://``)."""
    return isinstance(location, str) and "://" in location


def as_location(location: str | Path) -> str | Path:
    """A URI stays a string (``Path`` would turn ``s3://b/k`` into ``s3:/b/k``, a local path
    that never exists); anything else is a local ``Path``."""
    return location if is_uri(location) else Path(location)


@dataclass(frozen=True)
class RemoteShard:
    """One call-log shard read through fsspec: the filesystem that listed it and its path.

    Duck-compatible with ``Path`` where :func:`read_lines` and the report use it (``name``,
    ``open("rb")``, ``str``), so local and remote shards go through the same parser.
    """

    fs: Any
    path: str

    @property
    def name(self) -> str:
        """The file's name: the last segment of its path, without an http(s) URL's query or
        fragment (a signature, a SAS token), as the report quotes it next to the redacted
        URI. Only a path that is a URL is cut there: an object key may hold a ``?``."""
        path = urlsplit(self.path).path if "://" in self.path else self.path
        return path.rstrip("/").rsplit("/", 1)[-1]

    def open(self, mode: str = "rb") -> BinaryIO:
        if mode != "rb":
            raise ValueError("call-log shards are only read, as bytes")
        return io.BufferedReader(self.fs.open(self.path, "rb"), _REMOTE_READ_BUFFER)

    @property
    def uri(self) -> str:
        """The shard's full URI, credentials included: never for a message."""
        return str(self.fs.unstrip_protocol(self.path))

    def __str__(self) -> str:
        # For messages and the report only: without user info or query (a signature, a SAS
        # token), which an http(s) or webdav shard's full URL would carry.
        return redact_uri(self.uri)


Shard = Path | RemoteShard


def _filesystem(uri: str) -> tuple[Any, str]:
    """fsspec's filesystem and path for ``uri``; :class:`CallLogUnreadable` with what to
    install or fix when the protocol cannot be served by this image."""
    protocol = uri.split("://", 1)[0]
    shown = redact_uri(uri)  # the URI may carry credentials: never in a message
    try:
        import fsspec
    except ImportError as exc:
        raise CallLogUnreadable(
            f"cannot read the call log at {shown}: fsspec is not installed "
            "(pip install 'slm-fleet-operator[trainer]')"
        ) from exc
    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except ImportError as exc:  # a known protocol whose driver (s3fs, gcsfs...) is missing
        raise CallLogUnreadable(
            f"cannot read the call log at {shown}: no filesystem for {protocol}:// is "
            f"installed in the trainer image ({redact_uris(str(exc), uri)})"
        ) from exc
    except ValueError as exc:  # "Protocol not known: ..."
        raise CallLogUnreadable(
            f"cannot read the call log at {shown}: fsspec has no filesystem for the protocol "
            f"{protocol}:// ({redact_uris(str(exc), uri)})"
        ) from exc
    return fs, str(root)


def remote_shards(uri: str) -> list[RemoteShard]:
    """The shards under an fsspec URI, as :func:`input_files` finds them locally: the object
    itself, or the ``*.jsonl`` directly under the prefix (not ``.jsonl.part``, which capture
    has not finished) in name order; [] when there is nothing there yet.

    A missing bucket or denied access raises :class:`CallLogUnreadable`; other errors (a
    network timeout) propagate, so the stage crashes and its Job retries it.
    """
    fs, root = _filesystem(uri)
    try:
        # info, not isdir/isfile: those answer False for a denied listing on some filesystems
        # (fsspec's defaults swallow every OSError), which would read as "nothing yet".
        try:
            info = fs.info(root)
        except FileNotFoundError:
            info = None
        if info is None:
            # Nothing at the prefix: the normal state before the first captured call, unless
            # the bucket itself is missing (a typo in dataset.uri), which waiting never fixes.
            split_path = getattr(fs, "split_path", None)  # object stores (s3fs, gcsfs)
            if split_path is not None:
                bucket = split_path(root)[0]
                if bucket and not fs.exists(bucket):
                    # The bucket as split from the URI: user info would come with it.
                    raise CallLogUnreadable(
                        f"cannot read the call log at {redact_uri(uri)}: bucket "
                        f"{redact_uris(repr(bucket), uri)} does not exist or is not visible to "
                        "the pod's credentials"
                    )
            return []
        if info.get("type") != "directory":
            return [RemoteShard(fs, root)]
        found = sorted(
            str(entry["name"])
            for entry in fs.ls(root, detail=True)
            if entry.get("type") == "file" and str(entry["name"]).endswith(".jsonl")
        )
        return [RemoteShard(fs, name) for name in found]
    except PermissionError as exc:
        raise CallLogUnreadable(
            f"cannot read the call log at {redact_uri(uri)}: access denied "
            f"({redact_uris(str(exc), uri)}); {_ACCESS_HINT}"
        ) from exc


def not_a_file(entry: Path) -> str:
    """What a listed ``*.jsonl`` entry is when it is no regular file (``"dangling link"``,
    ``"fifo"``, ``"directory"``...), or "" when it is one (a link to one is one).

    ``stat`` only, never ``open``: a FIFO opened for reading blocks until something writes
    to it, and the stage would hang until its Job's deadline.
    """
    try:
        mode = entry.stat().st_mode
    except FileNotFoundError:
        return "dangling link" if entry.is_symlink() else ""  # "": removed since listed
    except OSError:  # a link loop, a denied stat
        return "dangling link" if entry.is_symlink() else "unreadable"
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "not a regular file"


def list_input(path: str | Path) -> tuple[list[Shard], list[dict[str, str]]]:
    """The shards to read (see :func:`input_files`), and the local folder's ``*.jsonl``
    entries that are not files (``{"name", "kind"}``, in name order), which are not read.

    Why these are listed: a dangling link, a FIFO or a folder named like a shard was left
    out without a word, and curate trained on fewer records than the log holds with nothing
    to say so; now the report lists them and the result message counts them.
    """
    if isinstance(path, str):
        if is_uri(path):
            return list(remote_shards(path)), []
        path = Path(path)
    if path.is_dir():
        try:
            # glob() reads an unlistable folder as an empty one: "no call log yet", which
            # the operator waits on for good. Listed first, a denial says so, as a remote one.
            entries = list(path.iterdir())
        except PermissionError as exc:
            raise CallLogUnreadable(
                f"cannot list the call log folder {printable_name(str(path))}: permission "
                f"denied; {_LOCAL_ACCESS_HINT}"
            ) from exc
        shards = sorted(p for p in entries if p.name.endswith(".jsonl"))
        kinds = [(p, not_a_file(p)) for p in shards]
        skipped = [{"name": printable_name(p.name), "kind": k} for p, k in kinds if k]
        # exists(): not a file that was removed since the listing (no shard, nothing to say)
        return [p for p, k in kinds if not k and p.exists()], skipped
    return [path], []


#: How many of the subfolders holding a call log :func:`nested_call_logs` looks for: one more
#: than the result message names, so that it can say there are more.
NESTED_NAMED = 3


def nested_call_logs(path: str | Path, limit: int = NESTED_NAMED + 1) -> list[str]:
    """The first ``limit`` subfolders of ``path``, one or two levels down, that hold a
    ``*.jsonl`` file, as ``"agents/weather/"`` relative to it, depth first in name order; []
    when there are none, or ``path`` is no folder.

    Why: the gateway captures each task's calls to ``<target>/<namespace>/<task>/``, and
    curate reads the shards directly in the folder it is given. Given the capture root (or a
    namespace's folder), it found none and said "no call log yet", which the operator waits
    on for good while the subfolders hold every call; :func:`run` fails with these names
    instead. Best effort: a subfolder that cannot be listed is passed over.
    """
    found: list[str] = []

    def walk(entries: Callable[[Any], Iterable[tuple[Any, str, bool]]], top: Any) -> None:
        """Depth first from ``top``; ``entries(folder)`` yields (handle, name, is_folder)."""
        pending: list[tuple[Any, str, int]] = [(top, "", 0)]
        while pending and len(found) < limit:
            folder, rel, depth = pending.pop()
            try:
                listed = sorted(entries(folder), key=lambda e: e[1])
            except OSError:
                continue
            if depth and any(not is_dir and name.endswith(".jsonl") for _, name, is_dir in listed):
                found.append(rel)
            if depth < 2:
                subs = [(h, f"{rel}{name}/", depth + 1) for h, name, is_dir in listed if is_dir]
                pending.extend(reversed(subs))

    if is_uri(path):
        fs, root = _filesystem(str(path))

        def remote(folder: str) -> Iterable[tuple[Any, str, bool]]:
            for e in fs.ls(folder, detail=True):
                name = str(e["name"]).rstrip("/")
                kind = e.get("type")
                if kind in ("directory", "file") and name != folder.rstrip("/"):
                    yield name, name.rsplit("/", 1)[-1], kind == "directory"

        walk(remote, root)
    elif Path(path).is_dir():

        def local(folder: Path) -> Iterable[tuple[Any, str, bool]]:
            return [(p, p.name, p.is_dir()) for p in folder.iterdir()]

        walk(local, Path(path))
    return [printable_name(rel) for rel in found]


def skipped_note(skipped: Sequence[Mapping[str, str]], named: int = 3) -> str:
    """``"2 *.jsonl entries skipped, not files (a.jsonl: fifo, b.jsonl: directory)"``, the
    first ``named`` of them by name, or "" when none: for the result message, which the
    contract caps (the report lists them all)."""
    if not skipped:
        return ""
    n = len(skipped)
    shown = ", ".join(f"{e['name']}: {e['kind']}" for e in skipped[:named])
    more = f" and {n - named} more" if n > named else ""
    return f"{n} *.jsonl {'entry' if n == 1 else 'entries'} skipped, not files ({shown}{more})"


def input_files(path: str | Path) -> list[Shard]:
    """The shards to read: the file itself, or a directory's ``*.jsonl`` that are files (or
    links to files), in name order; an fsspec URI is listed the same way through its
    filesystem (:func:`remote_shards`). What else is named ``*.jsonl`` is never opened
    (:func:`list_input` names it)."""
    return list_input(path)[0]


def malformed_reason(exc: ContractError) -> str:
    """A stable, countable reason for a record the contract rejected.

    The contract raises one exception type whose message names the field first; the reason
    is ``invalid_<field>`` for those, so new fields need no change here.
    """
    msg = str(exc)
    if msg.startswith("not JSON"):
        return "invalid_json"
    if "must be a JSON object" in msg:
        return "not_an_object"
    if msg.startswith("unsupported call record schema"):
        return "unsupported_schema"
    if msg.startswith("invalid Unicode"):
        return "invalid_unicode"
    first = msg.split(" ", 1)[0]
    known = {f.name for f in fields(CallRecord)}
    return f"invalid_{first}" if first in known else "invalid_record"


def has_answer(response: dict[str, Any]) -> bool:
    """A response teaches something only with text or at least one tool call.

    Judged by the very turn the chat format trains (:func:`chatformat.target_text`), not by
    a rule of its own: a blank text part is trained as an empty answer, as blank content is,
    while a bare string part or a non-string text is trained as its text; a second rule had
    dropped such answers as empty, or kept empty ones.
    """
    return bool(chatformat.target_text(response))


def parse_lines(
    lines: Iterable[tuple[str, int, bytes]],
    stats: ParseStats,
    task: str = "",
    max_error_samples: int = 5,
    require_answer: bool = True,
) -> Iterator[CallRecord]:
    """Valid records from ``(source, line number, raw bytes)``; everything else goes to stats.

    Shared by every stage that reads call records (curate, discover, evaluate), so that one
    odd line is skipped and counted by the same reason everywhere instead of crashing one of
    them. ``require_answer`` False keeps records whose response is empty (discover clusters
    calls, evaluate scores them; only training needs an answer to learn).
    """
    for source, lineno, raw in lines:
        stats.lines += 1
        stats.source, stats.lineno = source, lineno
        if not raw.strip():
            stats.blank += 1
            continue
        reason, error = "", ""
        try:
            # "utf-8-sig" on a shard's first line: an editor's byte-order mark is not JSON, and
            # the shard's first record would be lost as malformed
            record = CallRecord.from_json(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError as exc:
            reason, error = "invalid_utf8", str(exc)
        except ContractError as exc:
            reason, error = malformed_reason(exc), str(exc)
        except (ValueError, RecursionError) as exc:  # e.g. JSON nested too deep to decode
            reason, error = "invalid_json", f"{type(exc).__name__}: {exc}"
        else:
            if task and record.task != task:
                stats.left_to(record.task)
                continue
            if require_answer and not has_answer(record.response):
                reason, error = "empty_response", "response has no content and no tool_calls"
            else:
                yield record
                continue
        stats.skip(reason, error, max_error_samples)


def printable_name(name: str) -> str:
    """``name`` as text that any UTF-8 writer accepts: a byte that is not UTF-8 becomes ``\\xff``.

    Why: a file name on Linux is bytes, and Python hands an undecodable byte to us as a lone
    surrogate (``os.fsdecode``'s surrogateescape). Such a name is fine for ``open`` but not for
    ``json.dumps(ensure_ascii=False)`` written as UTF-8 nor for stdout: curate used to crash
    writing its report after train.jsonl and eval.jsonl were already written. Every name that
    goes into a report, an error sample or a message passes through here.
    """
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no file system byte stands for
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def read_lines(files: Sequence[Shard]) -> Iterator[tuple[str, int, bytes]]:
    """``(file name, line number, raw bytes)`` of every line: bytes, so that invalid UTF-8 is
    a countable reason in :func:`parse_lines` rather than a decode error or a silent ``\ufffd``.
    The name is :func:`printable_name`'s, as the error samples of the report quote it.

    A shard that may be listed but not read (a policy without ``s3:GetObject``, a local file
    of another user) raises :class:`CallLogUnreadable`, as a denied listing does.
    """
    for path in files:
        name = printable_name(path.name)
        try:
            with path.open("rb") as fh:
                for lineno, raw in enumerate(fh, start=1):
                    yield name, lineno, raw
        except PermissionError as exc:
            if isinstance(path, Path):
                # A file the trainer's user may not read stays so: a crash (exit 1) only
                # made the Job retry into it. The operator shows this in DataReady.
                raise CallLogUnreadable(
                    f"cannot read the call log file {printable_name(str(path))}: permission "
                    f"denied; {_LOCAL_ACCESS_HINT}"
                ) from exc
            raise CallLogUnreadable(
                f"cannot read the call log shard {path}: access denied "
                f"({redact_uris(str(exc), path.uri)}); {_ACCESS_HINT}"
            ) from exc


def read_split(path: Path, stats: ParseStats, max_error_samples: int = 5) -> list[CallRecord]:
    """The call records of a curated split (``train.jsonl``, ``eval.jsonl``), for finetune.

    Why through :func:`parse_lines`: a split is curate's output, but it may have been edited
    by hand, truncated by a full volume or copied from elsewhere, and one bad line used to
    crash the whole finetune Job (exit 1, retried to no avail) without naming file or line.
    Now such a line is skipped and counted in ``stats``, as evaluate and curate do. Records
    with an empty response are kept (``require_answer=False``), so every valid line gives
    the record it gave before; a missing file gives no records.
    """
    if not path.is_file():
        return []
    lines = read_lines([path])
    return list(parse_lines(lines, stats, "", max_error_samples, require_answer=False))


# ------------------------------------------------------------------------------ keys


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _function_of(call: Any) -> dict[str, Any]:
    """The ``function`` object of a tool call, or {} when the call is not shaped like one."""
    function = call.get("function") if isinstance(call, dict) else None
    return function if isinstance(function, dict) else {}


def _canonical_args(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to decode
            return _WS_RE.sub(" ", arguments).strip()
    return arguments


def _normal_message(message: dict[str, Any]) -> dict[str, Any]:
    """Only what the model sees and must produce: no ids, no whitespace differences."""
    out: dict[str, Any] = {
        "role": message.get("role", ""),
        "content": _WS_RE.sub(" ", _text_of(message.get("content"))).strip(),
    }
    if message.get("name"):
        out["name"] = message["name"]
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [
            [_function_of(c).get("name"), _canonical_args(_function_of(c).get("arguments"))]
            for c in calls
        ]
    return out


def exact_key(record: CallRecord) -> str:
    """Hash of normalised messages, tools and response: equal for calls that teach the same."""
    return _call_hash(record, _normal_message)


def redaction_key(record: CallRecord) -> str:
    """Hash of what the redactor reads, exactly as read: equal for captures that redact alike.

    Not :func:`exact_key`: that one ignores whitespace and the redactor does not (a phone
    number split over lines is not found), so two captures equal by it may redact to two
    different calls. Ids of tool calls are left out: the redactor never reads them, and an
    agent's retry gets new ones, so a repeat still costs a hash rather than a redaction.
    """
    return _call_hash(record, _without_ids)


def _call_hash(record: CallRecord, message: Callable[[dict[str, Any]], Any]) -> str:
    """sha256 of a call's messages and response (each through ``message``) and its tools."""
    doc = [[message(m) for m in record.messages], record.tools, message(record.response)]
    blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` without the ids its framework chose (``tool_call_id``, tool calls' ``id``)."""
    out = {k: v for k, v in message.items() if k not in ("id", "tool_call_id")}
    calls = out.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [
            {k: v for k, v in c.items() if k != "id"} if isinstance(c, dict) else c for c in calls
        ]
    return out


def writable(record: CallRecord) -> bool:
    """False for a record that decoded but is nested too deep to be written back out.

    JSON decodes deeper than ``dataclasses.asdict`` and the encoder can walk back, so such a
    record would crash the stage that writes (or hashes) it; readers count it as ``too_deep``.
    """
    try:
        record.to_json()
    except RecursionError:
        return False
    return True


#: Roles whose turns are not part of the near-duplicate text: a system prompt is shared by
#: every call of an agent, and its many words would make unrelated calls look alike.
_NOT_CONVERSATION = frozenset({"system", "developer"})


#: Tokens an agent framework stamps on every call, retries included: a time of day, a UUID, a
#: hex request id, an epoch. In the near-duplicate text they read as one placeholder.
_VOLATILE_RE = re.compile(
    r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?"
    r"|\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"
    r"|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b"
    r"|\b\d{10,}\b",
    re.IGNORECASE,
)


def dedupe_text(record: CallRecord) -> str:
    """The conversation that determines the answer, as text for near-duplicate detection.

    Every turn but the system prompt, in order: user turns, the assistant's earlier text and
    tool calls (name and canonical arguments) and the tool results. A multi-step agent call
    repeats the user's request at every step, so the user turns alone would make each later
    step (same request, one more tool call and result) a near duplicate of the first and
    drop it. A call with a single user turn gives exactly that turn's text, but for the
    stamps an agent framework puts on every call (:data:`_VOLATILE_RE`): on a short request
    the one changed token of a retry put it far below the similarity threshold, and its
    copies landed on both sides of the split, each eval example with its twin in train.
    Bare dates and short numbers stay: they are the request.
    """
    parts: list[str] = []
    for message in record.messages:
        if message.get("role") in _NOT_CONVERSATION:
            continue
        normal = _normal_message(message)
        if normal["content"]:
            parts.append(normal["content"])
        for name, arguments in normal.get("tool_calls", []):
            args = (
                arguments
                if isinstance(arguments, str)
                else json.dumps(arguments, sort_keys=True, ensure_ascii=False)
            )
            parts.append(f"{name or ''} {args}".strip())
    return _VOLATILE_RE.sub("<id>", "\n".join(parts))


def conversation_shape(record: CallRecord) -> str:
    """The step of the agent loop a call is at: its turns' roles and the tools called so far.

    Near duplicates are only looked for among calls of the same shape. A later step repeats
    the user's request and adds a tool call and a short result, which a long request outweighs
    in any text similarity; its answer (the next tool) still differs from the first step's.
    """
    shape = []
    for message in record.messages:
        role = message.get("role")
        if role in _NOT_CONVERSATION:
            continue
        calls = message.get("tool_calls")
        calls = calls if isinstance(calls, list) else []
        names = [str(_function_of(c).get("name") or "?") for c in calls]
        shape.append(f"{role}:{','.join(names)}" if names else str(role))
    return "|".join(shape)


def _blake(doc: Any) -> str:
    """A short, stable digest of a JSON-able ``doc``: the near-duplicate index holds a few
    of them for every call kept, so not the texts themselves."""
    blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _instructions(record: CallRecord, *, mask_stamps: bool = True) -> list[str]:
    """The system and developer turns, whitespace normalised; with ``mask_stamps`` the stamps
    an agent framework puts on every call read as one placeholder (:data:`_VOLATILE_RE`, as
    in :func:`dedupe_text`).

    Why the stamps: a system prompt often carries the current time or a request id, and the
    instructions decide which calls may be near duplicates (:func:`near_group`): every call,
    retries included, was in a group of its own, none was dropped, and the eval split held
    the twins of train examples. :func:`exact_key` keeps them: only near duplicates ignore
    them, as they ignore a stamp in the user turn. :func:`request_digest` keeps them too: a
    stamp can be what the answer is computed from.
    """
    contents = [
        _normal_message(m)["content"] for m in record.messages if m.get("role") in _NOT_CONVERSATION
    ]
    return [_VOLATILE_RE.sub("<id>", c) for c in contents] if mask_stamps else contents


def near_group(record: CallRecord) -> str:
    """Which calls may be near duplicates of each other: those at the same step of the agent
    loop (:func:`conversation_shape`) with the same system and developer turns (stamps
    masked) and the same tools offered (by name, in any order).

    Why: the near-duplicate text leaves the instructions out (an agent's long system prompt
    would make all its calls look alike), but they are part of the request. A template that
    puts the ticket in the system prompt and asks a fixed question in the user turn made every
    call "the very same words", and 59 of 60 were dropped; two agent steps that send the same
    user text with their own tools lost one of each pair. A digest, as the index holds one
    for every call kept.
    """
    names = sorted(metrics.tool_name(t) for t in record.tools)
    return _blake([conversation_shape(record), _instructions(record), names])


def request_digest(record: CallRecord) -> str:
    """A digest of the instructions, stamps and all, and the tools offered, schemas included
    (in any order): with :func:`near_group` equal, the rest of the request a "same words"
    duplicate must also share. Tools of the same names may be described apart (an enum of
    today's items), and then the same words may well be answered otherwise.

    Why the stamps count here: a time or a tenant id in the system prompt can be what the
    answer is computed from (a reminder two hours from now, that tenant's invoices). Masked,
    20 such calls read as one request answered 20 ways, noise, and all but one were dropped.
    Retries of one call still meet, by their equal answer (:func:`answer_signature`).
    """
    tools = sorted(json.dumps(t, sort_keys=True, ensure_ascii=False) for t in record.tools)
    return _blake([_instructions(record, mask_stamps=False), tools])


#: What :meth:`_NearDuplicateFilter.is_duplicate` compares of a call, after its key: the
#: conversation's text, :func:`near_group`, :func:`answer_signature`, :func:`request_digest`.
NearKey = tuple[str, str, str, str]


def near_key(record: CallRecord) -> NearKey:
    """Everything the near-duplicate filter needs of ``record``, computed once."""
    return dedupe_text(record), near_group(record), answer_signature(record), request_digest(record)


def answer_signature(record: CallRecord) -> str:
    """A digest of the LLM's structured answer, normalised (no ids, no whitespace): tool
    calls, or content that is a JSON object or array. Two near-duplicate requests are one
    example only when it is equal. Empty for text (prose, a label): near-identical requests
    answered in words are one example whatever the words, as a model learns nothing from two
    phrasings of one answer, and two labels of one request are noise. A digest, since the
    near-duplicate index holds one for every call kept."""
    answer = _normal_message(record.response)
    calls = answer.get("tool_calls")
    if calls:
        # the calls alone: a lead-in line ("Let me check.") beside them is no other answer
        structured: Any = [[name, {} if args in ("", None) else args] for name, args in calls]
    else:
        content = str(answer.get("content") or "").strip()
        if not content.startswith(("{", "[")):
            return ""
        try:
            structured = json.loads(content)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to decode
            return ""
    try:
        blob = json.dumps(structured, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, RecursionError):
        return ""
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def shingles(text: str, n: int = 3) -> set[str]:
    """Lower-cased word n-grams (the words themselves when the text is shorter than n)."""
    words = [w.lower() for w in _WORD_RE.findall(text)]
    if len(words) < n:
        return set(words)
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def stratum(record: CallRecord, by: StratifyBy) -> str:
    """The label a record is stratified by (see module docstring)."""
    if by == "none":
        return "all"
    response = record.response
    calls = response.get("tool_calls")
    if by in ("auto", "tool") and isinstance(calls, list) and calls:
        return f"tool:{_function_of(calls[0]).get('name') or '?'}"
    if by in ("auto", "content"):
        content = _WS_RE.sub(" ", _text_of(response.get("content"))).strip()
        # A classification answer is a short label; long free text gets one shared stratum.
        if by == "content" or (content and len(content) <= 64 and len(content.split()) <= 6):
            return f"label:{content}"
    return "text"


def split_rank(seed: int, key: str) -> str:
    """Seeded order of a record within its stratum; smallest ranks go to eval."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def assign_split(
    strata: Sequence[str], keys: Sequence[str], eval_fraction: float, seed: int
) -> list[bool]:
    """For each record, True when it goes to eval. Pure and order-independent.

    Strata with a single member are pooled into one ``rare`` stratum first so that a set of
    unique short answers still yields an eval split. The eval set holds ``eval_fraction`` of
    all records (halves round up; at least one when ``eval_fraction`` > 0 and there are two
    records), spread over the strata by :func:`eval_counts`; within a stratum, the records
    of smallest seeded hash (:func:`split_rank`) go to eval.
    """
    sizes = Counter(strata)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        groups["rare" if sizes[s] < 2 else s].append(i)
    is_eval = [False] * len(strata)
    quotas = eval_counts({s: len(m) for s, m in groups.items()}, eval_fraction)
    for s, members in groups.items():
        ranked = sorted(members, key=lambda i: split_rank(seed, keys[i]))
        for i in ranked[: quotas[s]]:
            is_eval[i] = True
    return is_eval


def eval_counts(sizes: dict[str, int], eval_fraction: float) -> dict[str, int]:
    """How many eval examples each stratum of ``sizes`` gives: ``eval_fraction`` of the total
    (halves round up), each stratum its whole share, then one more to the strata with the
    largest remainders (the larger stratum first on a tie) until the total is reached; never
    a stratum's every member, so each of its examples is also trained on.

    Why not a share of each stratum rounded up to one: with many small strata (60 tools of 2
    calls each) half the examples were held out at an eval fraction of 0.05, and a model
    trained on half of what it could. A stratum too small for a whole share may now have no
    eval example; the common strata always get theirs.
    """
    counts = dict.fromkeys(sizes, 0)
    eligible = {s: n for s, n in sizes.items() if n >= 2}
    total = sum(eligible.values())
    if eval_fraction <= 0 or not total:
        return counts
    target = max(1, math.floor(total * eval_fraction + 0.5))
    for s, n in eligible.items():
        counts[s] = min(n - 1, math.floor(n * eval_fraction))
    by_remainder = sorted(
        eligible, key=lambda s: (-(eligible[s] * eval_fraction - counts[s]), -eligible[s], s)
    )
    left = target - sum(counts.values())
    for s in by_remainder:
        if left <= 0:
            break
        if counts[s] < eligible[s] - 1:
            counts[s] += 1
            left -= 1
    return counts


# ------------------------------------------------------------------------------ the stage


def _gram_hashes(grams: Iterable[str]) -> array[int]:
    """Sorted 64-bit hashes of a text's shingles: its set for an exact Jaccard, at 8 bytes a
    shingle (stable across processes, unlike ``hash``)."""
    return array(
        "Q",
        sorted(
            {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest()) for g in grams}
        ),
    )


def _jaccard(members: set[int], other: array[int]) -> float:
    """Exact Jaccard similarity of a shingle set and another's sorted hashes."""
    common = len(members.intersection(other))  # walks ``other`` in C
    union = len(members) + len(other) - common
    return common / union if union else 1.0


#: Within this of the threshold, the MinHash estimate (about 0.026 off at 128 permutations
#: near 0.9, so 2.3 standard deviations) is checked on the exact Jaccard; further off, it
#: decides alone. Wider bands sent most pairs of a cluster of similar calls (Jaccard 0.8
#: against a 0.9 threshold) to the exact check: 10 to 20 times slower for ~1 % fewer misses.
_EXACT_BAND = 0.06
#: The LSH index is built this much below the threshold, so that it surfaces the pairs just
#: above it (built at the threshold, it missed many of them).
_LSH_MARGIN = 0.06
_LSH_WEIGHTS = (0.1, 0.9)  # (false positives, false negatives): recall comes first


class _NearDuplicateFilter:
    """MinHash LSH index of kept conversations. Candidates must be at the same step of the
    agent loop (``group``) and are verified on their exact Jaccard similarity.

    Why exact: with 128 permutations the MinHash estimate is off by about 0.024 (one standard
    deviation), so pairs just above the threshold were kept about a third of the time, and
    half of those landed on both sides of the train/eval split. The index is built for a
    lower threshold, so that it still surfaces those pairs, and only a candidate whose
    estimate is within :data:`_EXACT_BAND` of the threshold pays for the exact check.
    """

    def __init__(self, threshold: float, num_perm: int, seed: int) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        # The scheme is pinned so that a datasketch upgrade cannot change which records count
        # as near duplicates.
        self._template = MinHash(num_perm=num_perm, seed=seed, scheme="affine32")
        self._lsh = MinHashLSH(
            threshold=max(0.1, threshold - _LSH_MARGIN), num_perm=num_perm, weights=_LSH_WEIGHTS
        )
        self._kept: dict[str, tuple[str, str, str, Any, array[int]]] = {}
        self.threshold = threshold

    def is_duplicate(
        self, key: str, text: str, group: str = "", answer: str = "", request: str = ""
    ) -> bool:
        """True if ``text`` is a near duplicate of a call already kept in the same ``group``
        (:func:`near_group`) with the same ``answer`` (:func:`answer_signature`), or with the
        very same words and the same ``request`` (:func:`request_digest`): the same request
        answered two ways, where one label is noise. Otherwise keep it.

        Why the answer: compared on the request alone, calls of one long template that
        differ in an order number, in the request and in the tool call's arguments alike,
        were all one call: 199 of 200 dropped, and the task never reached minExamples.
        """
        grams = shingles(text)
        if not grams:
            return False
        mh = self._minhash(
            num_perm=len(self._template.hashvalues),
            seed=self._template.seed,
            permutations=self._template.permutations,
            scheme="affine32",
        )
        mh.update_batch([g.encode() for g in grams])
        hashes = _gram_hashes(grams)
        members: set[int] | None = None
        for other in self._lsh.query(mh):
            other_group, other_answer, other_request, other_mh, other_hashes = self._kept[other]
            if other_group != group:
                continue
            estimate = mh.jaccard(other_mh)
            if estimate < self.threshold - _EXACT_BAND:
                continue
            if estimate < self.threshold + _EXACT_BAND:
                if members is None:
                    members = set(hashes)
                if _jaccard(members, other_hashes) < self.threshold:
                    continue
            if other_answer == answer or (other_hashes == hashes and other_request == request):
                return True
        self._lsh.insert(key, mh)
        self._kept[key] = (group, answer, request, mh, hashes)
        return False


def distinct_count(
    records: Iterable[CallRecord],
    near_dup_threshold: float = 0.9,
    num_perm: int = 128,
    seed: int = 0,
) -> int:
    """How many of ``records`` curate keeps with these settings: the LLM's answers, exact and
    near duplicates out, compared in the order of their content hash as :func:`run` compares
    them. Without redaction, which mostly merges calls (one template, two users) but can,
    rarely, tell two apart (a value redacted in one call's answer and not in the other's):
    the count can be a few off curate's, lower as a rule. Discover proposes it as a task's
    minExamples, so the SLM's answers, which curate leaves out, must not count."""
    texts: dict[str, NearKey] = {}
    for record in records:
        if record.backend != TRAINED_BACKEND or llm_only_tools(record):  # curate leaves them out
            continue
        key = exact_key(record)
        if key not in texts:
            texts[key] = near_key(record)
    if near_dup_threshold >= 1.0:
        return len(texts)
    near = _NearDuplicateFilter(near_dup_threshold, num_perm, seed)
    return sum(not near.is_duplicate(key, *texts[key]) for key in sorted(texts))


def _emit(progress: Progress | None, **event: Any) -> None:
    if progress is not None:
        progress({"event": "progress", "stage": "curate", **event})


def run(args: Args, progress: Progress | None = None) -> TrainerResult:
    """Run the stage; every outcome, including a missing input, is a TrainerResult."""
    started = time.monotonic()
    try:
        files, skipped = list_input(args.input)
        nested = [] if files else nested_call_logs(args.input)
        if nested:
            # No example count: a failure, not "wait for data" (waiting would never end).
            named = ", ".join(nested[:NESTED_NAMED])
            more = " and more" if len(nested) > NESTED_NAMED else ""
            return TrainerResult(
                stage=CONTRACT_STAGE,
                ok=False,
                message=f"no call log directly at {printable_name(redact_uri(str(args.input)))}"
                f", but its subfolders hold some ({named}{more}); curate reads the *.jsonl of "
                "one folder, and the gateway captures each task's calls to a folder of its "
                "own: point dataset.uri at one task's folder (calls/<namespace>/<task>/)",
            )
        missing = [printable_name(str(p)) for p in files if isinstance(p, Path) and not p.is_file()]
        if not files or missing:
            # Zero examples rather than an error: a task's log directory appears with its
            # first captured call, so the operator waits and curates again (DataReady
            # WaitingForData).
            note = skipped_note(skipped)
            return TrainerResult(
                stage=CONTRACT_STAGE,
                ok=False,
                examples=0,
                message=f"no call log at {printable_name(redact_uri(str(args.input)))} yet "
                "(0 examples)"
                + (f" ({', '.join(missing)})" if missing else "")
                + (f"; {note}" if note else ""),
            )
        return _curate(args, files, started, progress, skipped)
    except CallLogUnreadable as exc:
        # No example count: the operator reads a count below minExamples as "wait for data",
        # and an unreadable location must fail visibly instead of waiting for ever.
        return TrainerResult(stage=CONTRACT_STAGE, ok=False, message=str(exc))


@dataclass
class _Entry:
    """One distinct call as curate will write it, with what deciding among equals needs."""

    key: str  # content hash after redaction: the order of the outputs
    rank: tuple[float, str]  # (timestamp, request id): the earliest capture wins
    digest: str  # hash of the record as read: breaks a tie between equal ranks
    stratum: str
    line: str
    redactions: dict[str, int]
    near: NearKey  # what the near-duplicate filter compares; empty without it

    def later_than(self, rank: tuple[float, str], digest: str) -> bool:
        """Whether a capture ranked ``rank`` with ``digest`` should replace this one: it is
        earlier, or as early with a smaller digest."""
        if rank != self.rank:
            return rank < self.rank
        return digest < self.digest


def _digest(record: CallRecord) -> str:
    """Hash of every field of ``record`` as read. Not ``to_json``: its deep copy (asdict)
    costs ten times the encoding, and curate digests every distinct call."""
    doc = {f.name: getattr(record, f.name) for f in fields(record)}
    blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _entry(
    record: CallRecord,
    rank: tuple[float, str],
    raw_key: str,
    redactor: Any,
    stratify_by: StratifyBy,
    near: bool,
    digest: str = "",
) -> _Entry:
    """Redact ``record`` and serialise it; raises what serialising a hostile record raises.
    ``digest`` is the record's :func:`_digest` where the caller already computed it."""
    digest = digest or _digest(record)
    counts: dict[str, int] = {}
    key = raw_key
    if redactor is not None:
        record, counts = redactor.redact_record(record)
        key = exact_key(record)
    return _Entry(
        key=key,
        rank=rank,
        digest=digest,
        stratum=stratum(record, stratify_by),
        line=record.to_json(),
        redactions=counts,
        near=near_key(record) if near else ("", "", "", ""),
    )


class _Sample:
    """Which distinct calls curate holds under ``max_examples``: those with the smallest
    content hash (``_Entry.key``), decided as the log is read; ``limit`` is
    :func:`_sample_size`, a margin above ``max_examples``.

    Why: curate holds every distinct call it keeps (about 9 KB each with near-duplicate
    detection), and a task's log only grows: retraining on growth re-reads all of it. Past
    the bound, a call with a larger hash than every held one is set aside once redacted, and
    a smaller one pushes out the largest. A key among the ``limit`` smallest of the whole log
    is never pushed out once read, so every capture of it is seen and the earliest is kept:
    the sample, like the rest of curate, does not depend on the log's order. Near duplicates
    are compared in hash order, so within the sample they are decided as without the bound.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._heap: list[tuple[int, str]] = []  # max-heap of held keys; stale ones are skipped
        #: Distinct calls set aside; a key here never comes back, since the largest held
        #: key only goes down once the sample is full. Each is larger than every held key.
        self.beyond: set[str] = set()

    def _largest(self, held: dict[str, _Entry]) -> str:
        while self._heap[0][1] not in held:  # replaced or pushed out since it was pushed
            heapq.heappop(self._heap)
        return self._heap[0][1]

    def excludes(self, key: str, held: dict[str, _Entry]) -> bool:
        """Whether the call with content hash ``key`` is outside the sample for good."""
        if key in self.beyond:
            return True
        if not self.limit or key in held or len(held) < self.limit:
            return False
        return key > self._largest(held)

    def added(self, key: str, held: dict[str, _Entry]) -> None:
        """``key`` was just added to ``held``: push out the largest while over the bound."""
        if not self.limit:
            return
        heapq.heappush(self._heap, (-int(key, 16), key))
        while len(held) > self.limit:
            out = self._largest(held)
            del held[out]
            self.beyond.add(out)


#: How many distinct calls a sample holds, as a multiple of ``max_examples``: near duplicates
#: are only found among held calls, and each one leaves a place that the margin fills. Where
#: they are more than the margin, the log is read again for the next calls in hash order
#: (:func:`_fetch`), so memory stays within this factor of ``max_examples``.
_SAMPLE_MARGIN = 1.25


def _sample_size(max_examples: int) -> int:
    """The distinct calls held at a time under ``max_examples`` (0: no bound)."""
    return math.ceil(max_examples * _SAMPLE_MARGIN)


@dataclass
class _Read:
    """What the first reading of the log found: every count of the report but the near
    duplicates, and the held calls (all of them without ``max_examples``)."""

    unique: dict[str, _Entry] = field(default_factory=dict)
    #: Raw key of every distinct capture read -> its content hash after redaction, so that
    #: a later reading finds a call's captures without redacting the others again.
    entry_of: dict[str, str] = field(default_factory=dict)
    #: What was scrubbed from each distinct call, kept or not, by raw key.
    redacted: dict[str, dict[str, int]] = field(default_factory=dict)
    exact_dupes: int = 0
    not_llm: Counter[str] = field(default_factory=Counter)
    beyond: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Redaction:
    """The redactor (None when PII is not scrubbed) and what it raises for a string it will
    not analyse (over MAX_TEXT_CHARS); the empty tuple catches nothing."""

    redactor: Any = None
    too_long: tuple[type[Exception], ...] = ()

    @classmethod
    def of(cls, scrub_pii: bool) -> _Redaction:
        if not scrub_pii:
            return cls()
        from slm_trainer.redact import TextTooLong, default_redactor

        return cls(default_redactor(), (TextTooLong,))

    def call_key(self, record: CallRecord) -> str:
        """Identical calls share this key before redaction. With redaction it is
        :func:`redaction_key`, not :func:`exact_key`: the redactor sees whitespace, so two
        captures of one call may redact apart, and a capture must be redacted as itself for
        the output not to depend on which of them came first."""
        return exact_key(record) if self.redactor is None else redaction_key(record)


def llm_only_tools(record: CallRecord) -> bool:
    """Whether the gateway never sends a call like this one to an SLM
    (:func:`slm_contract.llm_only_request`: a custom, free-form tool offered or called earlier,
    or a strict function offered; or the gateway marked the record ``llm_only`` for a field
    the record does not hold, such as ``tool_choice: "none"``), or the LLM answered it with a
    custom call. The SLM is never asked such calls, so training or gating on them teaches and
    scores the wrong thing (a text answer ``tool_choice: "none"`` forced taught the SLM to
    answer in text where it would choose a tool); and a chat format knows function calls
    only (it read a custom call as one with no name, which the SLM would have learnt to
    make)."""
    return (
        record.llm_only
        or llm_only_request(record.tools, record.messages)
        or holds_custom_call(record.response)
    )


def _llm_answers(
    args: Args, files: Sequence[Shard], stats: ParseStats, left_out: Counter[str]
) -> Iterator[CallRecord]:
    """The task's valid records, captured from ``not_before`` on, that the LLM answered with
    function tools at most; the others are counted in ``left_out``, as
    ``before_not_before``, by backend or as ``llm_only_tools`` (the report says how many,
    never silently)."""
    cutoff = args.cutoff
    for record in parse_lines(read_lines(files), stats, args.task, args.max_error_samples):
        if before_cutoff(record, cutoff):
            left_out[BEFORE_NOT_BEFORE] += 1
        elif record.backend != TRAINED_BACKEND:
            left_out[record.backend] += 1
        elif llm_only_tools(record):
            left_out[LLM_ONLY_TOOLS] += 1
        else:
            yield record


def _replaces(held: _Entry, record: CallRecord, rank: tuple[float, str]) -> str:
    """The digest of ``record`` when it is an earlier capture than ``held`` and so takes its
    place; "" when ``held`` stays. A later capture costs no digest (a serialisation)."""
    if rank > held.rank:
        return ""
    digest = _digest(record)
    return digest if held.later_than(rank, digest) else ""


def _first_read(
    args: Args,
    files: Sequence[Shard],
    stats: ParseStats,
    redaction: _Redaction,
    progress: Progress | None,
) -> _Read:
    """Read the whole log once: count every record and hold the earliest capture of each
    distinct call in the sample (every one without ``max_examples``)."""
    found = _Read()
    # Identical calls (by content, before and after redaction) share one entry: the earliest
    # capture. Raw keys map to the entry, so a repeat costs a hash, not a redaction.
    entry_of, unique = found.entry_of, found.unique
    sample = _Sample(_sample_size(args.max_examples))
    found.beyond = sample.beyond
    near_wanted = args.near_dup_threshold < 1.0
    for n, record in enumerate(_llm_answers(args, files, stats, found.not_llm), start=1):
        if n % 1000 == 0:
            _emit(progress, phase="dedup", records=n, kept=len(unique))
        try:
            # Identical calls are the bulk of a log: drop them before paying for redaction.
            raw_key = redaction.call_key(record)
            rank = (record.timestamp, record.request_id)
            known = entry_of.get(raw_key, "")
            held = unique.get(known)
            digest = ""
            if held is not None:
                found.exact_dupes += 1
                digest = _replaces(held, record, rank)
                if not digest:
                    continue
            elif known and sample.excludes(known, unique):
                found.exact_dupes += 1  # a repeat of a call set aside by max_examples
                continue
            entry = _entry(
                record, rank, raw_key, redaction.redactor, args.stratify_by, near_wanted, digest
            )
        except RecursionError:
            # JSON decodes deeper than dataclasses.asdict and the encoder can walk back: such
            # a record could not be written out, so it is malformed rather than fatal.
            stats.skip("too_deep", TOO_DEEP_ERROR, args.max_error_samples)
            continue
        except UnicodeEncodeError:  # the contract refuses lone surrogates; never fatal anyway
            stats.skip("invalid_unicode", INVALID_UNICODE_ERROR, args.max_error_samples)
            continue
        except redaction.too_long:
            # A string the redactor will not analyse cannot be written redacted, nor may it
            # be written unredacted: the record is dropped and counted, the stage goes on.
            stats.skip("too_long", TOO_LONG_ERROR, args.max_error_samples)
            continue
        entry_of[raw_key] = entry.key
        if entry.redactions:
            found.redacted[raw_key] = entry.redactions
        # An earlier capture with the same raw key redacts alike, so it takes the place of
        # ``held`` under the same key below; no other call's entry is ever dropped for it.
        if sample.excludes(entry.key, unique):
            if entry.key in sample.beyond:
                found.exact_dupes += 1  # equal, once redacted, to a call already set aside
            else:
                sample.beyond.add(entry.key)
            continue
        other = unique.get(entry.key)
        if other is not None and other is not held:
            # equal once the PII is gone, e.g. one template, two users
            found.exact_dupes += 1
        if other is None or other.later_than(entry.rank, entry.digest):
            unique[entry.key] = entry
            if other is None:
                sample.added(entry.key, unique)
    return found


def _fetch(
    args: Args,
    files: Sequence[Shard],
    wanted: set[str],
    entry_of: dict[str, str],
    redaction: _Redaction,
) -> dict[str, _Entry]:
    """Read the log again for the distinct calls ``wanted`` (content hashes the first reading
    set aside), each as its earliest capture, as :func:`_first_read` would have held it.
    Counts were all taken by the first reading: nothing is counted here."""
    unique: dict[str, _Entry] = {}
    near_wanted = args.near_dup_threshold < 1.0
    refused: tuple[type[Exception], ...] = (RecursionError, UnicodeEncodeError)
    refused += redaction.too_long
    for record in _llm_answers(args, files, ParseStats(), Counter()):
        try:
            raw_key = redaction.call_key(record)
            key = entry_of.get(raw_key, "")
            if key not in wanted:
                continue
            rank = (record.timestamp, record.request_id)
            held = unique.get(key)
            digest = ""
            if held is not None:
                digest = _replaces(held, record, rank)
                if not digest:
                    continue
            entry = _entry(
                record, rank, raw_key, redaction.redactor, args.stratify_by, near_wanted, digest
            )
        except refused:
            continue  # counted as malformed by the first reading
        if entry.key == key:  # as the first reading redacted it: it always is
            unique[key] = entry
    return unique


def _filter_near(
    unique: dict[str, _Entry],
    near: _NearDuplicateFilter | None,
    kept: list[tuple[str, str, str]],
    limit: int,
) -> int:
    """Move ``unique``'s calls, in the order of their content hash, to ``kept`` (stratum, key,
    line) until it holds ``limit`` (0: no bound), near duplicates out. Returns how many near
    duplicates were found; the calls not looked at are dropped.
    """
    dupes = 0
    for key in sorted(unique):
        if limit and len(kept) >= limit:
            break
        entry = unique.pop(key)  # the texts go as soon as they are filtered
        if near is not None and near.is_duplicate(key, *entry.near):
            dupes += 1
        else:
            kept.append((entry.stratum, key, entry.line))
    unique.clear()
    return dupes


def _curate(
    args: Args,
    files: Sequence[Shard],
    started: float,
    progress: Progress | None,
    skipped: Sequence[Mapping[str, str]] = (),
) -> TrainerResult:
    """The stage proper, over shards known to exist; ``skipped`` names the entries of the
    input folder that looked like shards but are not files (:func:`list_input`)."""
    stats = ParseStats()
    redaction = _Redaction.of(args.scrub_pii)
    found = _first_read(args, files, stats, redaction, progress)
    distinct = len(found.unique) + len(found.beyond)

    near = (
        _NearDuplicateFilter(args.near_dup_threshold, args.num_perm, args.seed)
        if args.near_dup_threshold < 1.0
        else None
    )
    kept: list[tuple[str, str, str]] = []
    near_dupes = _filter_near(found.unique, near, kept, args.max_examples)
    # Near duplicates left fewer than max_examples although the log holds more distinct
    # calls: the next ones in hash order are read, a sample at a time, until it is reached.
    # With minExamples equal to maxExamples the task would otherwise wait for data for ever.
    left = found.beyond
    while args.max_examples and len(kept) < args.max_examples and left:
        # what is still missing, with the margin: kept and fetched stay within the bound
        wanted = set(heapq.nsmallest(_sample_size(args.max_examples - len(kept)), left))
        left -= wanted
        _emit(progress, phase="resample", kept=len(kept), reading=len(wanted))
        more = _fetch(args, files, wanted, found.entry_of, redaction)
        near_dupes += _filter_near(more, near, kept, args.max_examples)
    # every distinct call is kept, a near duplicate, or was never looked at
    beyond = distinct - near_dupes - len(kept)
    redactions: Counter[str] = Counter()
    for counts in found.redacted.values():
        redactions.update(counts)

    strata = [s for s, _, _ in kept]
    is_eval = assign_split(strata, [k for _, k, _ in kept], args.eval_fraction, args.seed)
    train = [line for (_, _, line), e in zip(kept, is_eval, strict=True) if not e]
    evals = [line for (_, _, line), e in zip(kept, is_eval, strict=True) if e]
    _emit(progress, phase="split", train=len(train), eval=len(evals))

    per_stratum: dict[str, Counter[str]] = defaultdict(Counter)
    for s, e in zip(strata, is_eval, strict=True):
        per_stratum[s]["eval" if e else "train"] += 1

    llm_only = found.not_llm.pop(LLM_ONLY_TOOLS, 0)
    early = found.not_llm.pop(BEFORE_NOT_BEFORE, 0)
    not_llm = sum(found.not_llm.values())
    report = {
        "input": printable_name(redact_uri(str(args.input))),
        "files": [printable_name(str(p)) for p in files],
        # *.jsonl entries of the input folder never read: a dangling link, a FIFO, a folder
        "skipped_entries": [dict(e) for e in skipped],
        "settings": {
            "task": args.task,
            "scrub_pii": args.scrub_pii,
            "near_dup_threshold": args.near_dup_threshold,
            "eval_fraction": args.eval_fraction,
            "stratify_by": args.stratify_by,
            "seed": args.seed,
            "min_examples": args.min_examples,
            "num_perm": args.num_perm,
            "max_examples": args.max_examples,
            "not_before": args.not_before,
        },
        "lines": stats.lines,
        "blank": stats.blank,
        # read == malformed_total + other_task + before_not_before + not_llm_answer
        #         + llm_only_tools + exact_duplicates + near_duplicates + beyond_max_examples
        #         + examples
        "read": stats.lines - stats.blank,
        "other_task": stats.other_task,
        # the task names of those calls with the most of them (at most 3), most first
        "other_task_most_common": dict(most_common_tasks(stats.other_tasks)),
        # captured before not_before, or with no capture time: never trained or evaluated on
        "before_not_before": early,
        # answered by the served SLM (or another backend), never trained or evaluated on
        "not_llm_answer": not_llm,
        "not_llm_answer_by_backend": dict(sorted(found.not_llm.items())),
        # answered by the LLM, but with a custom tool offered or called, a strict function
        # offered, an image, audio or file part, or a record marked llm_only: no SLM is asked
        # those
        "llm_only_tools": llm_only,
        "malformed": dict(sorted(stats.malformed.items())),
        "malformed_total": sum(stats.malformed.values()),
        "error_samples": stats.errors,
        "redactions": dict(sorted(redactions.items())),
        "records_redacted": len(found.redacted),
        "exact_duplicates": found.exact_dupes,
        "near_duplicates": near_dupes,
        # distinct calls left out by max_examples (each with a larger content hash than
        # every call kept), near duplicates of the calls kept not counted among them
        "beyond_max_examples": beyond,
        "examples": len(kept),
        "train": len(train),
        "eval": len(evals),
        "strata": {
            s: {"train": c["train"], "eval": c["eval"]} for s, c in sorted(per_stratum.items())
        },
        "seconds": round(time.monotonic() - started, 3),
    }
    _write_outputs(args.output_dir, train, evals, report)

    too_few = len(kept) < args.min_examples
    # Said first when the task waits for data: whose calls the log holds is then the news,
    # and the operator quotes only the start of a long message.
    others = other_tasks_note(stats.other_task, args.task, stats.other_tasks)
    summary = (
        f"{len(kept)} examples ({len(train)} train / {len(evals)} eval, {len(per_stratum)} strata) "
        f"from {report['read']} records: {report['malformed_total']} malformed, "
        + (f"{others}, " if others and not too_few else "")
        + (f"{early} captured before not_before {args.not_before}, " if early else "")
        + (
            f"{not_llm} not answered by the LLM "
            f"({', '.join(f'{n} {b}' for b, n in sorted(found.not_llm.items()))}), "
            if not_llm
            else ""
        )
        + (
            f"{llm_only} with custom tools, strict functions, non-text content or marked "
            "llm_only (the LLM's alone), "
            if llm_only
            else ""
        )
        + f"{found.exact_dupes} exact and {near_dupes} near duplicates dropped, "
        f"{sum(redactions.values())} redactions"
        + (
            f", {beyond} distinct calls beyond max_examples {args.max_examples} left out"
            if beyond
            else ""
        )
        + (f", {skipped_note(skipped)}" if skipped else "")
    )
    if too_few:
        return TrainerResult(
            stage=CONTRACT_STAGE,
            ok=False,
            examples=len(kept),
            train_examples=len(train),
            eval_examples=len(evals),
            message=f"too few examples after curation: {len(kept)} < min_examples "
            f"{args.min_examples}; " + (f"{others}; " if others else "") + summary,
        )
    return TrainerResult(
        stage=CONTRACT_STAGE,
        ok=True,
        examples=len(kept),
        train_examples=len(train),
        eval_examples=len(evals),
        message=f"curated {summary}",
    )


def _write_outputs(
    out_dir: Path,
    train: Sequence[str],
    evals: Sequence[str],
    report: dict[str, Any],
) -> None:
    """Write each file to a temporary name and rename it, so readers never see half a file."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(name: str, text_lines: Iterable[str]) -> None:
        tmp = out_dir / f".{name}.tmp"
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                for line in text_lines:
                    fh.write(line)
            os.replace(tmp, out_dir / name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write leaves no half file behind
            raise

    write("train.jsonl", (line + "\n" for line in train))
    write("eval.jsonl", (line + "\n" for line in evals))
    write("curate_report.json", [json.dumps(report, indent=2, ensure_ascii=False) + "\n"])
