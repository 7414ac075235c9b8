#!/bin/bash
# Issue 17: a prequential GSM8K stream (300 problems, seed 0), static DETOT against DETOT with the loop, gold
# feedback after each answer; every re-optimization also replays a 16-problem canary set drawn from GSM8K train
# (its accuracy, serving state vs candidate, is in each decision). At most one re-optimization per 50 answers: each
# replays 16 held-out and 16 canary problems under both states (about 20 minutes here), so the default 20 would
# spend more CPU judging than answering. Needs runs/gsm8k-train-index (detot index build --data ../shared/data/gsm8k/train.jsonl
# --out runs/gsm8k-train-index). Resumable: pass --resume. About 2 hours a method on the 2-core CPU alone (about 20 s a question for static DETOT with 4 in flight).
cd "$(dirname "$0")/../.."  # the repository root
export HF_HUB_OFFLINE=1
.venv/bin/detot eval --suite gsm8k --data-dir ../shared/data --methods detot_plain_static,detot_plain --limit 300 --seed 0 \
  --model "$(../shared/tools/bench-model.sh)" --index runs/gsm8k-train-index \
  --soft-prompt evals/results/dynamic_prompt_m0/dynamic_task_embedding --temperature 0.5 --max-tokens 256 \
  --engine llamacpp --device cpu --threads 4 --feedback gold --reopt-seconds 2400 \
  --canary-file ../shared/data/gsm8k/train.jsonl --canary-size 16 --reopt-cooldown 50 \
  --out evals/results/prequential_gsm8k "$@"
