#!/bin/bash
# Issue 38: the same MultiArith problems through llama.cpp's static and continuous schedulers, same machine state.
# 20 problems (seed 0, the first 20 of the reported 300), `sc`, `detot` (3 demos) and `detot-retrieval` (no
# demos), the bench model, the M = 0 task embedding, 4 in flight. Demos: the first 500 GSM8K train problems
# (runs/gsm8k-train-500) for the 20-problem run; the whole GSM8K train set (runs/gsm8k-train-index, as the
# committed MultiArith rows in evals/results/accuracy/multiarith/) for any other LIMIT, so that accuracy can be
# compared with those rows problem by problem.
# Throughput per method comes from the records' finish times: `python evals/scripts/serve_throughput.py`.
# Usage: bash evals/scripts/serve_multiarith.sh [LIMIT]   (LIMIT 20, the default: about 20 minutes on 2 cores;
# 100, issue 38's size, into serve_multiarith_100/: about 100 minutes; run alone; resumable)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
limit=${1:-20}
root=evals/results/serve_multiarith$([ "$limit" = 20 ] || echo "_$limit")
if [ "$limit" = 20 ]; then
  index=runs/gsm8k-train-500
  [ -d $index ] || .venv/bin/detot index build --data ../shared/data/gsm8k/train.jsonl --limit 500 --out $index
else
  index=runs/gsm8k-train-index
  [ -d $index ] || .venv/bin/detot index build --data ../shared/data/gsm8k/train.jsonl --out $index
fi
for scheduler in static continuous; do
  .venv/bin/detot eval --suite multiarith --data-dir ../shared/data --model "$(../shared/tools/bench-model.sh)" \
    --index $index --soft-prompt evals/results/dynamic_prompt_m0/dynamic_task_embedding \
    --temperature 0.5 --max-tokens 256 --n 5 --seed 0 --limit "$limit" --engine llamacpp --threads 4 \
    --methods sc,detot --ablate retrieval --scheduler "$scheduler" --resume \
    --out "$root/$scheduler"
done
.venv/bin/python evals/scripts/serve_throughput.py "$root/static" "$root/continuous" --json "$root/throughput.json"
