#!/usr/bin/env bash
# The GPU checks in one run, under 8 minutes on one GPU (see gpu_check.py):
#   a. hf token-budget batches vs fixed batches of 8 on a length-skewed corpus: the same
#      store, tokens/s and padding share of each;
#   b. hf vs vllm at K = 50 (above vLLM's default max_logprobs), vLLM scored as two
#      --shard parts merged: the same stored top-K (ids equal except near-ties,
#      log-probabilities within 1e-3) and tokens/s;
#   c. the SCE kernel on CUDA against CPU (equal to 1e-6);
#   d. a few fuse steps in bf16 on CUDA against float32 on CPU (loss ratios, speed).
# Nothing is downloaded: the models and corpora are made locally. Needs this package
# installed with CUDA torch (and `pip install -e '.[vllm]'` for part b; without vLLM part b
# is reported as skipped). Usage, from the repository root:
#   benchmarks/gpu_check.sh [OUT_DIR]        # results in OUT_DIR/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${1:-${OUT:-gpu-check-out}}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# 7.5 minutes at most; the parts print as they finish, so a cut run still says something
timeout 450 "$PYTHON" benchmarks/gpu_check.py --work "${WORK:-/tmp/fusechat-gpu-check}" \
  --out "$OUT_DIR/gpu_check.json" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
