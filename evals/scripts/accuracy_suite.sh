#!/bin/bash
# Issue 19: DETOT against every matched-budget baseline at 300 problems, with ablations, on the bench model.
#   dev:    six DETOT configurations (chain of thought with and without the soft prompt, CISC-weighted votes,
#           program of thought, the CoT/PoT mix, chain of thought with no demos) on 40 development problems
#           (--offset 300: none of them is in the reported 300), then evals/scripts/choose_config.py picks one
#           (most accurate; ties: fewer tokens) into evals/results/accuracy/dev_SUITE/choice.json;
#   main:   the reported run, 300 problems (seed 0, nested draw): cot, sc, sc_adaptive,
#           cisc, pot and detot in the chosen configuration, with its ablations
#           (retrieval when it uses demos; softprompt when the soft prompt is on; strategy when it is not chain
#           of thought).
#   confirm: (MultiArith) the no-demo DETOT configuration, which the reported run's ablation found best after
#           the fact, against sc and cisc on the 260 problems neither the reported 300 nor the
#           development 40 use (--offset 340), into evals/results/accuracy/confirm_SUITE: a blind check.
# Everything on the llama.cpp engine, plain-text prompts, n = 5 (DETOT: at most 6 samples, greedy first),
# temperature 0.5, the M = 0 task embedding ("Measurement: the dynamic soft prompt"), GSM8K-train demos.
# Every stage resumes (--resume): rerun the same command after a stop. Hours on the 2-core CPU: run alone.
# Needs runs/gsm8k-train-index (detot index build --data ../shared/data/gsm8k/train.jsonl --out runs/gsm8k-train-index).
# Usage: bash evals/scripts/accuracy_suite.sh multiarith|gsm8k dev|main|confirm
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
export HF_HUB_OFFLINE=1
suite="${1:?pass multiarith or gsm8k}"
stage="${2:?pass dev or main}"
tokens=256
[ "$suite" = gsm8k ] && tokens=320  # GSM8K's chains are longer (the README's earlier GSM8K table used 320)
sp=evals/results/dynamic_prompt_m0/dynamic_task_embedding
root=evals/results/accuracy
common=(--suite "$suite" --data-dir ../shared/data --model "$(../shared/tools/bench-model.sh)"
        --index runs/gsm8k-train-index --temperature 0.5 --max-tokens "$tokens" --n 5 --seed 0
        --engine llamacpp --device cpu --threads 4 --resume)
dev() {  # dev NAME ARGS...: one development configuration
  local name="$1"; shift
  .venv/bin/detot eval "${common[@]}" --offset 300 --limit 40 --methods detot "$@" \
    --out "$root/dev_$suite/$name"
}
if [ "$stage" = dev ]; then
  dev cot --soft-prompt "$sp" --ablate softprompt
  dev cisc --soft-prompt "$sp" --weighting cisc
  dev pot --soft-prompt "$sp" --strategy pot
  dev mix --soft-prompt "$sp" --strategy mix
  dev zeroshot --soft-prompt "$sp" --k 0  # added after MultiArith's retrieval ablation (README)
  .venv/bin/python evals/scripts/choose_config.py "$root/dev_$suite"
elif [ "$stage" = main ]; then
  choice="$root/dev_$suite/choice.json"
  [ -f "$choice" ] || { echo "no $choice: run the dev stage first" >&2; exit 2; }
  read -r strategy weighting soft k < <(.venv/bin/python -c "import json,sys; c=json.load(open(sys.argv[1])); \
print(c['strategy'], c['weighting'], 'on' if c['soft_prompt'] else 'off', c.get('k', 3))" "$choice")
  parts=()
  [ "$k" != 0 ] && parts+=(retrieval)
  if [ "$soft" = on ]; then soft_arg="$sp"; parts+=(softprompt); else soft_arg=none; fi
  [ "$strategy" != cot ] && parts+=(strategy)
  ablate=()
  [ ${#parts[@]} -gt 0 ] && ablate=(--ablate "$(IFS=,; echo "${parts[*]}")")
  .venv/bin/detot eval "${common[@]}" --limit 300 \
    --methods cot,sc,sc_adaptive,cisc,pot,detot \
    --strategy "$strategy" --weighting "$weighting" --soft-prompt "$soft_arg" --k "$k" "${ablate[@]}" \
    --out "$root/$suite"
elif [ "$stage" = confirm ]; then
  .venv/bin/detot eval "${common[@]}" --offset 340 --limit 260 --methods sc,cisc,detot \
    --strategy cot --weighting uniform --soft-prompt "$sp" --k 0 --out "$root/confirm_$suite"
else
  echo "stage must be dev, main or confirm, got $stage" >&2; exit 2
fi
