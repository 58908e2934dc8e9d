"""LoRA fine-tuning throughput and memory: our trainer vs ``transformers.Trainer`` + peft.

What is compared: the same tiny causal LM (a Llama built from a config, with the real
all-MiniLM-L6-v2 vocabulary), the same LoRA settings (r, alpha, dropout, all linear layers),
the same examples (the Berkeley Function Calling Leaderboard's ``simple_python`` and
``live_multiple`` calls rendered with the model's chat template, loss on the answer only), the
same batch size, learning rate, schedule, epochs and seed, and the same number of CPU threads.

- **ours**: :func:`slm_trainer.generative.train_generative` (length-grouped batches packed
  into rows with per-example position ids, logits only where an answer token is predicted);
- **baseline**: a plain ``transformers.Trainer`` on the peft model, its default random
  sampler and ``DataCollatorForSeq2Seq`` (pads to the longest of the batch, labels -100 on
  the prompt), saving and logging off.

Each side runs in its own subprocess so that peak RSS (``ru_maxrss``) is its own; both peaks
(RSS, and GPU memory) are read as the training loop ends, since ours then goes on to save,
reload the merged model and score it, which the baseline does not (the JSON keeps ours'
whole-stage peak RSS as ``stage_peak_rss_mb``). samples/s is training examples over the wall
time of the training loop only (no model loading, no saving, no evaluation). Printed as one
side-by-side table. On a CUDA GPU both sides train in the same precision (the base in bf16,
or fp16 on GPUs without native bf16, under autocast) and the table adds each side's peak GPU
memory (``torch.cuda.max_memory_allocated``).

Usage::

    python bench/finetune_throughput.py [--examples 256] [--threads 1] [--hidden-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "trainer"), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def prepare(work: Path, n: int, hidden: int, layers: int) -> dict[str, Any]:
    """The shared model and data: call records in ``work/data``, the model in ``work/model``."""
    from slm_contract import CallRecord
    from slm_trainer import generative

    records: list[CallRecord] = []
    source = "synthetic"
    try:
        import bfcl_data

        for category in ("simple_python", "live_multiple"):
            for rec in bfcl_data.records([category]):
                records.append(rec)
                if len(records) >= n * (1 if category == "live_multiple" else 0.5):
                    break
        source = "bfcl simple_python + live_multiple"
    except Exception as exc:  # bfcl-eval not installed: still a fair comparison
        print(f"bfcl data unavailable ({exc}); using synthetic records", file=sys.stderr)
    while len(records) < n:
        i = len(records)
        records.append(
            CallRecord(
                task="bench",
                backend="llm",
                messages=[
                    {"role": "user", "content": f"weather in city number {i}?" * (1 + i % 7)}
                ],
                tools=[{"type": "function", "function": {"name": "get_weather"}}],
                response={"role": "assistant", "content": f"It is sunny in city {i}."},
            )
        )
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(r.to_json() + "\n" for r in records[:n]))
    (data / "eval.jsonl").write_text("")
    generative.build_tiny_causal_lm(work / "model", hidden_size=hidden, num_layers=layers)
    return {"source": source, "examples": n}


def stage_args(work: Path, cfg: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(
        candidate="bench",
        model=str(work / "model"),
        data=str(work / "data"),
        output=str(work / f"out-{cfg['side']}"),
        artifact_uri="",
        task_type="tool-call",
        method="lora",
        lora_r=cfg["lora_r"],
        lora_alpha=cfg["lora_r"] * 2,
        lora_dropout=0.05,
        epochs=cfg["epochs"],
        learning_rate=2e-4,
        max_seq_length=cfg["max_seq_length"],
        metric="exact-match",
        checkpoint_dir="",
        batch_size=cfg["batch_size"],
        seed=0,
    )


def run_ours(work: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    from slm_trainer import generative

    trained: dict[str, Any] = {}
    loaded: dict[str, float] = {}

    def emit(event: dict[str, Any]) -> None:
        if event.get("event") == "model":
            loaded["rss"] = _current_rss_mb()
        if event.get("event") == "trained":
            trained.update(event)
            # the peaks as the training loop ends, where the baseline's are read too: after
            # it the stage saves, reloads the merged model to score it and exports, which the
            # baseline does not do
            trained["peaks"] = _peaks()

    args = stage_args(work, cfg)
    result = generative.train_generative(args, emit)
    if not result.ok:
        raise SystemExit(result.message)
    losses = json.loads((Path(args.output) / "trainer_state.json").read_text())["losses"]
    return {
        "samples_per_second": trained["samples_per_second"],
        "mean_loss": sum(losses) / len(losses),
        "examples": result.train_examples,
        "rss_after_load_mb": loaded.get("rss"),
        **trained["peaks"],
        # the whole stage, saving and the served model's reload included: for the record
        "stage_peak_rss_mb": round(_rss_mb(), 1),
    }


def run_baseline(work: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from slm_trainer import generative

    args = stage_args(work, cfg)
    generative.set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tools_in_template = generative.prepare_tokenizer(tokenizer)
    # loaded as ours is (straight onto the GPU); "cuda:0", the device Trainer itself uses, so
    # that it does not take a model placed on "cuda" for one split across devices
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    amp = generative.compute_dtype(device)  # the precision ours trains in
    model = AutoModelForCausalLM.from_pretrained(
        args.model, **generative.from_pretrained_kwargs("lora", device, amp)
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    rss_after_load = _current_rss_mb()
    rows = []
    for rec in generative.load_records(Path(args.data) / "train.jsonl"):
        ex, _, _ = generative.encode(tokenizer, rec, tools_in_template)
        if len(ex) > ex.n_prompt and len(ex) <= args.max_seq_length:  # same filter as ours
            ids = list(ex.input_ids)
            labels = [-100] * ex.n_prompt + ids[ex.n_prompt :]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})

    class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return rows[i]

    training_args = TrainingArguments(
        output_dir=str(work / "out-baseline"),
        per_device_train_batch_size=args.batch_size,
        # Batches of calls of similar length, as a competent user sets it: with the default
        # random batches each padded to its longest call, the baseline ran about 2x the
        # tokens ours does (session 27's review), and the ratio measured the padding.
        train_sampling_strategy="group_by_length",
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.05,  # a float below 1 is a ratio in transformers 5
        max_grad_norm=1.0,
        weight_decay=0.0,
        seed=0,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        bf16=amp == torch.bfloat16,
        fp16=amp == torch.float16,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Rows(),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    t0 = time.monotonic()
    out = trainer.train()
    seconds = time.monotonic() - t0
    return {
        "samples_per_second": round(len(rows) * args.epochs / seconds, 3),
        "mean_loss": out.training_loss,  # Trainer's mean over all steps
        "examples": len(rows),
        "rss_after_load_mb": rss_after_load,
        **_peaks(),
    }


def _peaks() -> dict[str, Any]:
    """Peak RSS, and on a GPU peak allocated memory and the GPU's name, so far in this process."""
    import torch

    figures: dict[str, Any] = {"peak_rss_mb": round(_rss_mb(), 1)}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        figures["device"] = torch.cuda.get_device_name()
    return figures


def worker(side: str, work: Path, cfg: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(cfg["threads"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    figures = (run_ours if side == "ours" else run_baseline)(work, {**cfg, "side": side})
    print("RESULT " + json.dumps(figures), flush=True)


def run_side(side: str, work: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", side, "--work", str(work), "--cfg", json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def table(ours: dict[str, Any], base: dict[str, Any]) -> str:
    def row(name: str, a: float, b: float, fmt: str, better: str) -> str:
        ratio = a / b if b else float("nan")
        return f"| {name:<26} | {a:{fmt}} | {b:{fmt}} | {ratio:6.2f}x ({better}) |"

    lines = [
        "| metric                     | slm-trainer | Trainer+peft | ours / baseline           |",
        "|----------------------------|-------------|--------------|---------------------------|",
        row(
            "samples/s",
            ours["samples_per_second"],
            base["samples_per_second"],
            "11.2f",
            "higher is better",
        ),
        row("peak RSS (MiB)", ours["peak_rss_mb"], base["peak_rss_mb"], "11.1f", "lower is better"),
        row(
            "peak RSS - loaded (MiB)",
            ours["peak_rss_mb"] - ours["rss_after_load_mb"],
            base["peak_rss_mb"] - base["rss_after_load_mb"],
            "11.1f",
            "lower is better",
        ),
        row("mean train loss", ours["mean_loss"], base["mean_loss"], "11.4f", "same data"),
    ]
    if "peak_gpu_mb" in ours and "peak_gpu_mb" in base:
        lines.insert(
            3,
            row(
                "peak GPU memory (MiB)",
                ours["peak_gpu_mb"],
                base["peak_gpu_mb"],
                "11.1f",
                "lower is better",
            ),
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, both sides")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--worker", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--cfg", default="{}", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.worker:
        worker(ns.worker, ns.work, json.loads(ns.cfg))
        return 0

    cfg = {
        "epochs": ns.epochs,
        "batch_size": ns.batch_size,
        "lora_r": ns.lora_r,
        "max_seq_length": ns.max_seq_length,
        "threads": ns.threads,
    }
    with tempfile.TemporaryDirectory(prefix="slm-bench-") as tmp:
        work = ns.work or Path(tmp)
        info = prepare(work, ns.examples, ns.hidden_size, ns.layers)
        base = run_side("baseline", work, cfg)
        ours = run_side("ours", work, cfg)
    print(
        f"LoRA fine-tuning, {ours['examples']} examples ({info['source']}), Llama from a config "
        f"(hidden {ns.hidden_size}, {ns.layers} layers, MiniLM vocabulary), batch "
        f"{ns.batch_size}, r={ns.lora_r}, {ns.epochs} epoch(s), {ns.threads} CPU thread(s)"
        + (f", on {ours['device']}" if "device" in ours else "")
    )
    print(table(ours, base))
    if ns.json_out:
        ns.json_out.write_text(json.dumps({"ours": ours, "baseline": base, **info, **cfg}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
