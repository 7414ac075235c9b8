"""Problems per minute and aggregate output tok/s per method of two run folders (static vs continuous llama.cpp
scheduling), from the records' finish times, with the paired accuracy comparison of the two runs:

    python evals/scripts/serve_throughput.py evals/results/serve_multiarith/static \\
        evals/results/serve_multiarith/continuous --json evals/results/serve_multiarith/throughput.json

A method's wall time is from its first record's start (finish time minus latency) to its last finish.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detot_agent.evaluation.breakdowns import compare_runs, run_records


def throughput(records: list[dict]) -> dict:
    start = min(r["finished_at"] - r["latency_s"] for r in records)
    wall = max(r["finished_at"] for r in records) - start
    tokens = sum(r["tokens"] or 0 for r in records)
    return {"problems": len(records), "minutes": wall / 60, "problems_per_min": len(records) / (wall / 60),
            "output_tok_s": tokens / wall, "tokens_per_q": tokens / len(records),
            "accuracy": sum(bool(r["correct"]) for r in records) / len(records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("static", type=Path)
    ap.add_argument("continuous", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict = {}
    for label, folder in (("static", args.static), ("continuous", args.continuous)):
        out[label] = {m: throughput(recs) for m, recs in run_records(folder).items() if recs}
    out["paired"] = {row["method"]: {k: row[k] for k in ("problems", "only_run", "only_other", "p_value",
                                                         "same_answer")}
                     for row in compare_runs(args.static, args.continuous)}
    print("| method | scheduler | problems/min | output tok/s | tokens/q | accuracy |")
    print("|---|---|---:|---:|---:|---:|")
    for method in out["static"]:
        for label in ("static", "continuous"):
            r = out[label].get(method)
            if r:
                print(f"| {method} | {label} | {r['problems_per_min']:.2f} | {r['output_tok_s']:.1f} | "
                      f"{r['tokens_per_q']:.0f} | {r['accuracy']:.2f} |")
    for method, p in out["paired"].items():
        print(f"{method}: static vs continuous on {p['problems']} problems: only static right {p['only_run']}, "
              f"only continuous right {p['only_other']}, McNemar p = {p['p_value']:.2f}, same answer "
              f"{p['same_answer']}/{p['problems']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
