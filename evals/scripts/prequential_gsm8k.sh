#!/bin/bash
# Issue 17: a prequential GSM8K stream (300 problems, seed 0), static DETOT against DETOT with the loop, gold
# feedback after each answer. At most one re-optimization per 50 answers; each is judged by paired replay on 8
# held-out records plus an 8-problem canary set drawn from GSM8K train (its accuracy, serving state vs candidate, is
# in each decision), then the loop may also try switching to program of thought (--loop-policy strategy=pot),
# judged on the same gold items. Budget: one hour per re-optimization (it runs at nice +10 beside four problems in
# flight on two cores, so it gets little CPU). The first run (evals/results/prequential_gsm8k) replayed 16 + 16
# items with a 40-minute budget and no policy, and no judgement finished: pass those options to repeat it.
# Needs runs/gsm8k-train-index (detot index build --data ../shared/data/gsm8k/train.jsonl --out runs/gsm8k-train-index).
# Resumable: pass --resume. About 2-3 hours a method on the 2-core CPU alone (about 20 s a question for static
# DETOT with 4 in flight). "$@" comes last: a repeated option overrides these (a repeated --loop-policy adds one).
# Issue 40's re-run with the new loop (shadow judging, the always-valid test): pass
#   --judging shadow --shadow-share 1 --out evals/results/prequential_gsm8k_v3
# (every later problem is also answered by the candidate in the background: about twice the loop's cost).
# The v4 re-run (2026-12-07): the fit's choice as the loop's one policy, shadow-judged from the first trigger, its
# shadow answers as equals of the live ones (four at a time), static DETOT's records taken from v3:
#   LOOP_POLICY="k_exemplars=0,soft_prompt=off,weighting=cisc" bash evals/scripts/prequential_gsm8k.sh \
#     --methods detot_loop --judging shadow --shadow-share 1 --shadow workers=4 --shadow background=false \
#     --out evals/results/prequential_gsm8k_v4
# The v5 re-run (2026-12-07): the same policy at the fit's token budget (320; the stream's is 256, which cut most
# of the candidate's gain), every later problem shadowed (a problem that finds 8 shadow answers pending waits):
#   LOOP_POLICY="k_exemplars=0,soft_prompt=off,weighting=cisc,max_tokens=320" bash evals/scripts/prequential_gsm8k.sh \
#     --methods detot_loop --judging shadow --shadow-share 1 --shadow workers=4 --shadow background=false \
#     --shadow when_full=wait --out evals/results/prequential_gsm8k_v5
# (about 4 hours on the 2-core CPU: the candidate's answers cost about 3 times a served one; pass --resume after a stop)
# LOOP_POLICY (default strategy=pot) is the policy the loop may switch to.
cd "$(dirname "$0")/../.."  # the repository root
export HF_HUB_OFFLINE=1
.venv/bin/detot eval --suite gsm8k --data-dir ../shared/data --methods detot,detot_loop --limit 300 --seed 0 \
  --model "$(../shared/tools/bench-model.sh)" --index runs/gsm8k-train-index \
  --soft-prompt evals/results/dynamic_prompt_m0/dynamic_task_embedding --temperature 0.5 --max-tokens 256 \
  --engine llamacpp --device cpu --threads 4 --feedback gold --reopt-seconds 3600 \
  --canary-file ../shared/data/gsm8k/train.jsonl --canary-size 8 --replay-items 8 --reopt-cooldown 50 \
  --loop-policy "${LOOP_POLICY:-strategy=pot}" --out evals/results/prequential_gsm8k_v2 "$@"
