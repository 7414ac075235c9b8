#!/usr/bin/env bash
# The fitted DETOT (evals/scripts/fit_gsm8k.sh) on the reported 300 problems of a suite, at the committed runs'
# settings, then compared with their baselines (cot, sc, cisc, pot) on the same problems.
# Usage: evals/scripts/fit_eval.sh gsm8k|multiarith   (resumable: run it again after a kill)
set -euo pipefail
suite=${1:?gsm8k or multiarith}
model=$(../shared/tools/bench-model.sh)
tokens=$([ "$suite" = gsm8k ] && echo 320 || echo 256)
out=evals/results/fit/$suite-300
resume=$([ -f "$out/run.json" ] && echo --resume || true)
.venv/bin/detot eval --suite "$suite" --data-dir ../shared/data --model "$model" --temperature 0.5 \
  --max-tokens "$tokens" --n 5 --seed 0 --engine llamacpp --device cpu --threads 4 --limit 300 \
  --methods detot --fit evals/results/fit/gsm8k --out "$out" $resume
.venv/bin/python evals/scripts/fit_compare.py "$out" "evals/results/accuracy/$suite" --json "$out/compare.json"
