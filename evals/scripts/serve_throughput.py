"""Problems per minute and aggregate output tok/s per method of run folders (llama.cpp's static and continuous
schedulers, other settings), from the records' finish times, with paired accuracy comparisons:

    python evals/scripts/serve_throughput.py evals/results/serve_multiarith/static \\
        evals/results/serve_multiarith/continuous --json evals/results/serve_multiarith/throughput.json

Each RUN is a folder, labelled by its name, or `LABEL=FOLDER`. Every run after the first is compared with the
first (exact McNemar on the problems both answered); `--reference FOLDER` (the committed rows) is compared with
every run. A method's wall time is from its first record's start (finish time minus latency) to its last finish.
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


def pairs(run: Path, other: Path) -> dict:
    """method -> McNemar of `run` against `other` on the problems both answered (methods in both runs)."""
    mine, theirs = run_records(run), run_records(other)
    shared = [m for m, recs in mine.items() if recs and theirs.get(m)]  # methods with records in both
    return {row["method"]: {k: row[k] for k in ("problems", "only_run", "only_other", "p_value", "same_answer")}
            for row in (compare_runs(run, other, shared) if shared else [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders, FOLDER or LABEL=FOLDER; the first is the baseline")
    ap.add_argument("--reference", type=Path, help="committed rows to compare every run's accuracy with")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        runs[label or Path(folder).name] = Path(folder)
    out: dict = {label: {m: throughput(recs) for m, recs in run_records(folder).items() if recs}
                 for label, folder in runs.items()}
    first, *rest = runs
    out["paired"] = {label: pairs(runs[first], runs[label]) for label in rest}
    if args.reference:
        out["reference"] = {"folder": str(args.reference),
                            **{label: pairs(folder, args.reference) for label, folder in runs.items()}}
    print("| method | run | problems/min | output tok/s | tokens/q | accuracy |")
    print("|---|---|---:|---:|---:|---:|")
    for method in sorted({m for label in runs for m in out[label]}):
        for label in runs:
            r = out[label].get(method)
            if r:
                print(f"| {method} | {label} | {r['problems_per_min']:.2f} | {r['output_tok_s']:.1f} | "
                      f"{r['tokens_per_q']:.0f} | {r['accuracy']:.2f} |")
    comparisons = [(first, label, out["paired"][label]) for label in rest]
    if args.reference:
        comparisons += [(label, "reference", out["reference"][label]) for label in runs]
    for mine, theirs, by_method in comparisons:
        for method, p in by_method.items():
            print(f"{method}: {mine} vs {theirs} on {p['problems']} problems: only {mine} right {p['only_run']}, "
                  f"only {theirs} right {p['only_other']}, McNemar p = {p['p_value']:.2f}, same answer "
                  f"{p['same_answer']}/{p['problems']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
