#!/usr/bin/env python
"""Why does `sc`'s greedy first sample differ from `cot`'s greedy answer on llama.cpp?

Both send the same prompt (the question and "Let's think step by step.") to the same engine at temperature 0:
`cot` as one request (`complete`, batched with whatever else is in flight), `sc` as the greedy
row of `sample(6, greedy=1)` (decoded beside its five sampled rows). In a run folder holding both, this
picks the problems whose two greedy replies differ in length, decodes each prompt again with nothing else
running, (a) as one request, twice, (b) as the greedy row of a six-row `sample`, and prints whether the
texts agree: (a) with itself says whether a lone decode is deterministic, (a) against (b) whether the
number of rows decoded beside it changes the greedy text.

    python evals/scripts/llamacpp_greedy_paths.py evals/results/accuracy/multiarith \
        --model "$(../shared/tools/bench-model.sh)" --problems 6 --out evals/results/llamacpp_greedy_paths.json

Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from detot_agent.detot.adapters import COT_CUE
from detot_agent.detot.sampling import round_seed, sample_engine
from detot_agent.engines.generation import text_seed
from detot_agent.engines.lm import build_engine
from detot_agent.evaluation.data import load_suite
from detot_agent.evaluation.runner import read_records
from detot_agent.io.persist import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run folder with cot.jsonl and sc.jsonl")
    ap.add_argument("--model", required=True)
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    run = json.loads((args.run_dir / "run.json").read_text())
    cot = {r["id"]: r for r in read_records(args.run_dir / "cot.jsonl")}
    sc = {r["id"]: r for r in read_records(args.run_dir / "sc.jsonl")}
    diverged = [i for i in run["ids"] if i in cot and i in sc
                and abs(cot[i]["tokens"] - sc[i]["sample_tokens"][0]) > 1][: args.problems]
    suite = load_suite(run["suite"], data_dir=str(Path(run["source"]).parent.parent))
    questions = {str(ex.id): ex.question for ex in suite.examples}
    engine = build_engine(args.model, engine="llamacpp")
    tokens = int(run["max_tokens"])
    rows: list[dict[str, Any]] = []
    for pid in diverged:
        q = questions[pid]
        messages = [{"role": "user", "content": f"{q}\n{COT_CUE}"}]
        common = {"soft_prompt": None, "stop": (), "max_tokens": tokens}
        lone = [sample_engine(engine, engine.name, messages, 1, seed=text_seed(q), temperature=0.0, greedy=1,
                              **common)[0] for _ in range(2)]
        six = sample_engine(engine, engine.name, messages, 6, seed=round_seed(text_seed(q), 0, greedy_first=True),
                            temperature=float(run["temperature"]), greedy=1, **common)[0]
        row = {"id": pid, "lone_twice_same": lone[0].text == lone[1].text, "lone_vs_six_same": lone[0].text == six.text,
               "lone_tokens": lone[0].output_tokens, "six_tokens": six.output_tokens,
               "recorded_plain_cot_tokens": cot[pid]["tokens"], "recorded_plain_sc_tokens": sc[pid]["sample_tokens"][0],
               "first_difference_at_char": next((k for k, (a, b) in enumerate(zip(lone[0].text, six.text, strict=False))
                                                 if a != b), None)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    engine.close()
    summary = {"problems": len(rows), "lone_deterministic": sum(r["lone_twice_same"] for r in rows),
               "lone_equals_six_row": sum(r["lone_vs_six_same"] for r in rows), "rows": rows,
               "model": Path(args.model).name, "run_dir": str(args.run_dir)}
    atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    print(f"{summary['lone_deterministic']}/{len(rows)} lone decodes repeat exactly; "
          f"{summary['lone_equals_six_row']}/{len(rows)} equal the greedy row of a six-row sample; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
