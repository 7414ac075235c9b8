#!/bin/bash
# Issue 38's lever for the eval-level goal: more problems in flight. DETOT answers in rounds of 2 samples, so with
# 4 problems in flight at most 8 sequences decode together where `sc` (6 samples per problem) fills the engine's
# 16. The same problems and settings as serve_multiarith.sh (whose static and continuous runs must exist), through
# the continuous scheduler with THREADS problems in flight: DETOT with and without demos first, then `sc` at the
# same THREADS (so that the comparison is at equal concurrency too), each into its own folder; then
# serve_throughput.py over all runs, with the committed rows as the accuracy reference.
# CACHE (default 8, the engine's) is how many prompts the prefix cache keeps (`--prefix-cache`): with more problems
# in flight than cached prompts, a problem's later rounds can find its prompt evicted. A CACHE other than 8 writes to
# folders ending in -cacheCACHE.
# Usage: bash evals/scripts/serve_inflight.sh [LIMIT] [THREADS] [CACHE]   (100 and 8: about 50 minutes on 2 cores;
# alone; resumable)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
limit=${1:-100}
threads=${2:-8}
cache=${3:-8}
suffix=$([ "$cache" = 8 ] || echo "-cache$cache")
root=evals/results/serve_multiarith$([ "$limit" = 20 ] || echo "_$limit")
index=$([ "$limit" = 20 ] && echo runs/gsm8k-train-500 || echo runs/gsm8k-train-index)
for what in detot sc; do
  case $what in
    detot) methods=(--methods detot --ablate retrieval); out=$root/continuous-$threads$suffix ;;
    sc) methods=(--methods sc); out=$root/continuous-$threads$suffix-sc ;;
  esac
  .venv/bin/detot eval --suite multiarith --data-dir ../shared/data --model "$(../shared/tools/bench-model.sh)" \
    --index $index --soft-prompt evals/results/dynamic_prompt_m0/dynamic_task_embedding \
    --temperature 0.5 --max-tokens 256 --n 5 --seed 0 --limit "$limit" --engine llamacpp --threads "$threads" \
    "${methods[@]}" --scheduler continuous --prefix-cache "$cache" --resume --out "$out"
done
.venv/bin/python evals/scripts/serve_throughput.py "$root/static" "$root/continuous" "$root/continuous-$threads$suffix" \
  "$root/continuous-$threads$suffix-sc" --reference evals/results/accuracy/multiarith --json "$root/throughput.json"
