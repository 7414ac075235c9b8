#!/usr/bin/env python
"""DETOT beside plain greedy zero-shot CoT on a seeded MultiArith subset, index built from GSM8K train.

Same engine, same problems (the subset `softprompt_multiarith.py` uses). Plain CoT: the question plus
"Let's think step by step.", greedy, number parsed from the output. DETOT: 3 retrieved GSM8K demos (MMR)
through the task embedding, voting with Beta stopping, agreement-triggered background re-optimization;
no gold feedback is given (the unsupervised setting). Results stream to JSONL; a rerun resumes.

    python evals/scripts/detot_multiarith.py --model "$(../shared/tools/bench-model.sh)" \
        --out evals/results/detot_multiarith
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from detot_agent import DETOT, Encoder, ExemplarIndex, TaskProfile, analyze, local_lm
from detot_agent.answers import numbers_equal
from detot_agent.errors import ArtefactError
from detot_agent.io.datafiles import read_exemplars


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", type=Path, default=Path("evals/results/detot_multiarith"))
    ap.add_argument("--index", type=Path, default=Path("runs/gsm8k-train-index"))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--max-samples", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=224)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    enc = Encoder()
    try:
        index = ExemplarIndex.load(args.index, encoder=enc)
    except ArtefactError:
        index = ExemplarIndex(enc)
        index.add(read_exemplars(Path(args.data_dir) / "gsm8k" / "train.jsonl", fmt="gsm8k"))
        index.save(args.index)
    lm = local_lm(args.model, dtype=args.dtype, device="cpu", cache=False, max_batch_size=16, max_wait_ms=50)
    problems = read_exemplars(Path(args.data_dir) / "multiarith" / "MultiArith.json", fmt="multiarith")
    chosen = [problems[i] for i in sorted(random.Random(args.seed).sample(range(len(problems)), args.limit))]
    task = TaskProfile(name="arithmetic", description="Solve arithmetic word problems step by step.",
                       kind="arithmetic", answer_format="number")
    adj = analyze(task, [p.text for p in chosen[:5]], max_samples=args.max_samples, max_tokens=args.max_tokens,
                  k_exemplars=3)
    detot = DETOT("question -> answer", task=task, index=index, lm=lm, adjustments=adj,
                  event_log=args.out / "events.jsonl", background=True)
    path = args.out / "detot.jsonl"
    done = {json.loads(line)["id"] for line in path.open()} if path.exists() else set()
    todo = [p for p in chosen if p.id not in done]
    lock = threading.Lock()
    start = time.perf_counter()
    finished = [len(done)]

    def run(p):
        pred = detot(question=p.text)
        rec = {"id": p.id, "gold": p.fields["answer"], "pred": pred.answer_key,
               "correct": numbers_equal(pred.answer_key, p.fields["answer"]), "agreement": pred.agreement,
               "samples": pred.samples_used, "parse_failures": pred.parse_failures, "tokens": pred.tokens,
               "demo_ids": pred.demo_ids, "embedding_version": pred.embedding_version,
               "latency_s": pred.latency_s, "votes": pred.votes}
        with lock, path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            finished[0] += 1
            print(f"detot {finished[0]}/{len(chosen)} ({time.perf_counter() - start:.0f}s) "
                  f"{'ok' if rec['correct'] else '--'} v{pred.embedding_version}", flush=True)

    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(run, todo))
    detot.controller.wait()
    recs = [json.loads(line) for line in path.open()]
    n = len(recs)
    drawn = max(1, sum(r["samples"] for r in recs))
    events = [json.loads(line) for line in (args.out / "events.jsonl").open()]
    reopts = [e for e in events if e["event"] == "reoptimization"]
    summary = {
        "detot": {"n": n, "accuracy": sum(r["correct"] for r in recs) / n,
                  "samples_per_question": sum(r["samples"] for r in recs) / n,
                  "tokens_per_question": sum(r["tokens"] for r in recs) / n,
                  "parse_failure_rate": sum(r["parse_failures"] for r in recs) / drawn,
                  "mean_agreement": sum(r["agreement"] for r in recs) / n,
                  "seconds_per_question": sum(r["latency_s"] for r in recs) / n,
                  "reoptimizations": len(reopts), "accepted": sum(e["accepted"] for e in reopts),
                  "final_version": detot.version},
        "reoptimization_events": [{k: e[k] for k in ("accepted", "reason", "version_before", "version_after",
                                                     "evidence", "seconds")} for e in reopts],
        "adjustments": adj.model_dump(mode="json"),
        "config": {k: str(v) for k, v in vars(args).items()},
    }
    cot = args.out.parent / "softprompt_multiarith" / "no_soft_prompt.jsonl"
    if cot.exists():
        base = [json.loads(line) for line in cot.open()]
        base = [r for r in base if r["id"] in {p.id for p in chosen}]
        summary["plain_cot"] = {"n": len(base), "accuracy": sum(r["correct"] for r in base) / len(base),
                                "samples_per_question": 1.0,
                                "tokens_per_question": sum(r["tokens"] for r in base) / len(base),
                                "source": str(cot)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k in ("detot", "plain_cot")}, indent=2))
    detot.controller.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
