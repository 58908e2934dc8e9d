#!/usr/bin/env bash
# The trainer's GPU path in one device run (issue 4): what CI, which has no GPU, cannot show.
#
#   env         torch, transformers, peft, bitsandbytes versions and the GPU's name
#   throughput  bench/finetune_throughput.py at a 0.2B-parameter shape (Llama, hidden 896,
#               24 layers, MiniLM's vocabulary, random weights: no model can be downloaded):
#               our LoRA trainer against transformers.Trainer + peft, both in bf16, with
#               samples/s, peak RSS and peak GPU memory side by side
#   qlora       `python -m slm_trainer finetune --method qlora` end to end on the same model
#               and data (4-bit NF4 base through bitsandbytes, bf16 compute, LoRA adapter):
#               the path every CPU test can only see refused
#   lora-gc     the same with --method lora --gradient-checkpointing
#
# Each step has its own time limit and log under $OUT; a failed step does not stop the next.
# On a GPU machine that cannot download anything, build .gpu/ here first
# (bash bench/gpu_carry.sh) and carry it. GPU_CHECK_SMALL=1 runs the same steps at a tiny
# size, with lora in place of qlora where there is no GPU: how this script is tested on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
CARRY=${GPU_CARRY:-$PWD/.gpu}  # what bench/gpu_carry.sh built, if anything
SITE=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
WORK=$(mktemp -d /tmp/gpu-check-work.XXXXXX)
trap 'rm -rf "$WORK" "$SITE"' EXIT
if compgen -G "$CARRY/whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$CARRY"/whl/*.whl || echo "== installing $CARRY/whl failed"
fi
export PYTHONPATH="$SITE:$CARRY/site:$PWD/trainer:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# Limits in seconds: the throughput step trains twice (baseline, then ours). Together they
# stay within one 10-minute device call.
if [[ "${GPU_CHECK_SMALL:-0}" == 1 ]]; then
  HIDDEN=64 LAYERS=2 EXAMPLES=32 BATCH=8 SEQ=256 LIMIT=300 LIMIT_THROUGHPUT=300
else
  HIDDEN=896 LAYERS=24 EXAMPLES=512 BATCH=16 SEQ=1024 LIMIT=120 LIMIT_THROUGHPUT=240
fi

step() {  # step NAME COMMAND...: run with a time limit, log to $OUT/NAME.log, print its tail
  local name=$1 start rc limit=$LIMIT
  shift
  [[ "$name" == throughput ]] && limit=$LIMIT_THROUGHPUT
  echo "== $name: $*"
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - start)) s"
  tail -n 20 "$OUT/$name.log"
}

has_gpu=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
step env "$PY" -c '
import torch, transformers, peft
try:
    import bitsandbytes
    bnb = bitsandbytes.__version__
except Exception as exc:
    bnb = f"unavailable ({exc.__class__.__name__})"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bnb}; {gpu}")
'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step throughput "$PY" bench/finetune_throughput.py --hidden-size "$HIDDEN" --layers "$LAYERS" \
  --examples "$EXAMPLES" --batch-size "$BATCH" --max-seq-length "$SEQ" --work "$WORK" \
  --json-out "$OUT/throughput.json"

# The same model and calls for the stage runs; a few of them as the eval split.
if [[ -f "$WORK/data/train.jsonl" ]]; then
  head -n 16 "$WORK/data/train.jsonl" >"$WORK/data/eval.jsonl"
fi
finetune() {  # finetune NAME METHOD EXTRA...
  local name=$1 method=$2
  shift 2
  step "$name" "$PY" -m slm_trainer finetune --candidate "$name" --model "$WORK/model" \
    --data "$WORK/data" --output "$WORK/out-$name" --method "$method" --epochs 1 \
    --batch-size "$BATCH" --max-seq-length "$SEQ" --metric tool-call-ast \
    --max-eval-examples 16 --max-new-tokens 64 --result-path "$OUT/$name-result.json" "$@"
}
if [[ "$has_gpu" == 1 ]]; then
  finetune qlora qlora
else
  echo "== qlora: no GPU here; the same stage with --method lora instead"
  finetune qlora lora
fi
finetune lora-gc lora --gradient-checkpointing
echo "== logs and results in $OUT:"
ls "$OUT"
