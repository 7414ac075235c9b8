"""Compare one eval run's methods across two engines on the same problems (the README's llama.cpp table).

    python evals/scripts/engine_compare.py evals/results/eval_multiarith evals/results/eval_multiarith_llamacpp \
        --methods plain_cot,detot_plain_static

Prints a markdown table: accuracy on each engine, exact McNemar p between them (paired, same problems),
answers that agree, tokens and seconds per question (latency, 4 in flight) and wall-clock minutes per method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detot_agent.evaluation.metrics import paired
from detot_agent.evaluation.runner import read_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--methods", required=True)
    parser.add_argument("--labels", default="torch,llama.cpp")
    args = parser.parse_args()
    name_a, name_b = args.labels.split(",")
    print(f"| method | engine | accuracy | p ({name_a} vs {name_b}) | same answer | tokens/q | s/q | minutes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        a = {r["id"]: r for r in read_records(args.base / f"{method}.jsonl")}
        b = {r["id"]: r for r in read_records(args.other / f"{method}.jsonl")}
        common = sorted(a.keys() & b.keys())
        test = paired({i: a[i]["correct"] for i in common}, {i: b[i]["correct"] for i in common})
        same = sum(a[i]["pred"] == b[i]["pred"] for i in common)
        for label, recs in ((name_a, a), (name_b, b)):
            rows = [recs[i] for i in common]
            ends = sorted(r["finished_at"] for r in rows)
            minutes = (ends[-1] - ends[0]) / 60 if len(ends) > 1 else 0.0
            acc = sum(r["correct"] for r in rows) / len(rows)
            tokens = sum(r["tokens"] for r in rows) / len(rows)
            latency = sum(r["latency_s"] for r in rows) / len(rows)
            print(f"| {method} | {label} | {acc:.2f} ({sum(r['correct'] for r in rows)}/{len(rows)}) | "
                  f"{test.p_value:.2f} ({test.b} vs {test.c}) | {same}/{len(common)} | {tokens:.0f} | {latency:.1f} | "
                  f"{minutes:.1f} |")


if __name__ == "__main__":
    main()
