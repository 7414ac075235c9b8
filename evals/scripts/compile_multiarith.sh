#!/bin/bash
# Issue 18: does compiling a DETOT program with DSPy's optimizers help on the bench model? MultiArith, the README's
# seeded 100 (legacy draw) evaluated before and after, 50 other MultiArith problems to compile on, GSM8K-train
# exemplar index for DETOT's retrieval (build it first: detot index build --data ../shared/data/gsm8k/train.jsonl
# --out runs/gsm8k-train-index). Each optimizer takes hours on the 2-core CPU: run alone, one after the other.
# Rerunning it goes on from the stage its report reached (--resume); once bootstrap.json has the uncompiled program's
# scores, the other optimizers take them from it (--before) instead of scoring the same 100 problems again.
# Usage: bash evals/scripts/compile_multiarith.sh bootstrap|mipro|gepa
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
export HF_HUB_OFFLINE=1
opt="${1:?pass bootstrap, mipro or gepa}"
before=()
if [ "$opt" != bootstrap ] && [ -f evals/results/optimize/bootstrap.json ]; then
  before=(--before evals/results/optimize/bootstrap.json)
fi
.venv/bin/python -m programs.math_qa --optimize "$opt" --suite multiarith --data-dir ../shared/data \
  --index runs/gsm8k-train-index --model "$(../shared/tools/bench-model.sh)" --eval-size 100 --train-size 50 \
  --seed 0 --draw legacy --max-samples 6 --threads 2 --out "evals/results/optimize/$opt.json" \
  --resume "${before[@]}"
