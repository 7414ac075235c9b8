#!/bin/bash
# Issue 38: the same MultiArith problems through llama.cpp's static and continuous schedulers, same machine state.
# 20 problems (seed 0, the first 20 of the reported 300), `sc`, `detot` (3 demos) and `detot-retrieval` (no
# demos), the bench model, the M = 0 task embedding, GSM8K-train demos (runs/gsm8k-train-500), 4 in flight.
# Throughput per method comes from the records' finish times: `python evals/scripts/serve_throughput.py`.
# Usage: bash evals/scripts/serve_multiarith.sh   (about 20 minutes on 2 cores; run alone)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
[ -d runs/gsm8k-train-500 ] || .venv/bin/detot index build --data ../shared/data/gsm8k/train.jsonl --limit 500 \
  --out runs/gsm8k-train-500
for scheduler in static continuous; do
  .venv/bin/detot eval --suite multiarith --data-dir ../shared/data --model "$(../shared/tools/bench-model.sh)" \
    --index runs/gsm8k-train-500 --soft-prompt evals/results/dynamic_prompt_m0/dynamic_task_embedding \
    --temperature 0.5 --max-tokens 256 --n 5 --seed 0 --limit 20 --engine llamacpp --threads 4 \
    --methods sc,detot --ablate retrieval --scheduler "$scheduler" --resume \
    --out "evals/results/serve_multiarith/$scheduler"
done
.venv/bin/python evals/scripts/serve_throughput.py evals/results/serve_multiarith/static \
  evals/results/serve_multiarith/continuous --json evals/results/serve_multiarith/throughput.json
