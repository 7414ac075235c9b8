#!/usr/bin/env bash
# Does the code of today answer like the code that made a committed eval row? Issue 36's "behaviour unchanged".
# The committed MultiArith `cot` row (evals/results/accuracy/multiarith/cot.jsonl) was made at commit 5dbe468 with 4
# problems in flight; on llama.cpp a greedy reply depends on its batch-mates (docs/results/accuracy-300.md), so that
# row cannot be reproduced record for record by any re-run with 4 in flight. With one problem in flight a greedy
# decode has no batch-mates: this script runs the first 100 problems so, once with the row's own code (a git worktree
# at 5dbe468, run with this checkout's .venv) and once with today's code (both schedulers), and compares the records.
# Usage: bash evals/scripts/rerun_identity.sh   (each finished run is kept; a run folder that exists is resumed)
set -euo pipefail
old=${OLD_COMMIT:-5dbe468}
out=evals/results/rerun_identity
model=$(../shared/tools/bench-model.sh)
data=$(cd ../shared/data && pwd)
here=$(pwd)
args=(eval --suite multiarith --data-dir "$data" --model "$model" --engine llamacpp --limit 100 --seed 0 --n 5
      --temperature 0.5 --max-tokens 256 --threads 1)
mkdir -p "$out"
tree=$(mktemp -d)/old
git worktree add --detach "$tree" "$old" >/dev/null
trap 'git worktree remove --force "$tree"' EXIT
resume() { [ -f "$1/run.json" ] && echo --resume || true; }
# the row's own code (method `plain_cot` then); `detot` is its CLI entry point detot_agent.cli.app:main
(cd "$tree" && HF_HUB_OFFLINE=1 PYTHONPATH="$tree" "$here/.venv/bin/python" -c \
  'import sys; from detot_agent.cli.app import main; sys.argv[0] = "detot"; main()' \
  "${args[@]}" --methods plain_cot --out "$here/$out/old-$old" $(resume "$here/$out/old-$old"))
for scheduler in continuous static; do
  .venv/bin/detot "${args[@]}" --methods cot --scheduler "$scheduler" --out "$out/today-$scheduler" \
    $(resume "$out/today-$scheduler")
done
.venv/bin/python evals/scripts/rerun_compare.py "$out/old-$old/plain_cot.jsonl" "$out/today-continuous/cot.jsonl" \
  "$out/today-static/cot.jsonl" evals/results/accuracy/multiarith/cot.jsonl --json "$out/compare.json"
