"""The live shadow candidate against its recorded counterpart, on the same problems of a prequential stream.

A looping run's `<method>.shadow.jsonl` names each shadowed request by the call's id. Records written since the
`request` field carry that id; older records are matched through the monitor's observation events (same output
tokens and agreement, kept only where exactly one record matches). For the matched problems it prints the live
candidate's wins and losses against the served state beside a recorded run's against a recorded static run, so a
live candidate weaker than its recorded self shows.

Usage:
    .venv/bin/python evals/scripts/shadow_vs_recorded.py evals/results/prequential_gsm8k_v5 \\
        [--method detot_loop] [--recorded evals/results/fit/gsm8k-300/detot.jsonl] \\
        [--static evals/results/prequential_gsm8k_v3/detot.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detot_agent.evaluation.runner import read_records


def problem_ids(run: Path, method: str) -> dict[str, str]:
    """Request id -> problem id, from the records' `request` or, for older records, the observation events."""
    records = read_records(run / f"{method}.jsonl")
    ids = {r["request"]: r["id"] for r in records if r.get("request")}
    by_shape: dict[tuple[int, float], list[str]] = {}
    for r in records:
        by_shape.setdefault((int(r["tokens"]), round(float(r["agreement"] or 0.0), 6)), []).append(r["id"])
    for line in (run / f"{method}.events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "observation" and event["id"] not in ids:
            match = by_shape.get((int(event["tokens"]), round(float(event["agreement"] or 0.0), 6)), [])
            if len(match) == 1:
                ids[event["id"]] = match[0]
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--method", default="detot_loop")
    parser.add_argument("--recorded", type=Path, default=Path("evals/results/fit/gsm8k-300/detot.jsonl"))
    parser.add_argument("--static", type=Path, default=Path("evals/results/prequential_gsm8k_v3/detot.jsonl"))
    args = parser.parse_args()
    ids = problem_ids(args.run, args.method)
    recorded = {r["id"]: bool(r["correct"]) for r in read_records(args.recorded)}
    static = {r["id"]: bool(r["correct"]) for r in read_records(args.static)}
    rows = [json.loads(line) for line in (args.run / f"{args.method}.shadow.jsonl").read_text().splitlines()]
    live = {"right": 0, "wins": 0, "losses": 0}
    then = {"right": 0, "wins": 0, "losses": 0}
    matched = 0
    for row in rows:
        pid = ids.get(row["request"])
        if pid is None or pid not in recorded or pid not in static or row.get("gold") is None:
            continue
        matched += 1
        live["right"] += row["shadow"] == row["gold"]
        live["wins"] += row["outcome"] == 1
        live["losses"] += row["outcome"] == -1
        then["right"] += recorded[pid]
        then["wins"] += recorded[pid] and not static[pid]
        then["losses"] += static[pid] and not recorded[pid]
    print(f"{len(rows)} paired outcomes, {matched} matched to problems of both recorded runs")
    print(f"live candidate against the served state: {live['right']} right, {live['wins']} wins / "
          f"{live['losses']} losses")
    print(f"recorded candidate ({args.recorded}) against recorded static ({args.static}): {then['right']} right, "
          f"{then['wins']} wins / {then['losses']} losses")


if __name__ == "__main__":
    main()
