#!/usr/bin/env bash
# detot fit on GSM8K (issue 39): train on GSM8K train, choose on a dev split of GSM8K test outside the
# reported 300 (same seed, --dev-offset 300), at the reported runs' budgets (temperature 0.5, 320 tokens, n 5).
# Resumable: run it again after a kill. Then: evals/scripts/fit_eval.sh.
set -euo pipefail
model=$(../shared/tools/bench-model.sh)
out=${1:-evals/results/fit/gsm8k}
.venv/bin/detot fit --train ../shared/data/gsm8k/train.jsonl --train-limit 48 \
  --dev ../shared/data/gsm8k/test.jsonl --dev-offset 300 --dev-limit 40 --seed 0 \
  --model "$model" --engine llamacpp --device cpu --temperature 0.5 --max-tokens 320 --n 5 \
  --prompts distilled,gold --soft-prompt none --samples 4 --keep 2 \
  --steps 40 --max-minutes 150 --race-every 10 --threads 4 --out "$out"
