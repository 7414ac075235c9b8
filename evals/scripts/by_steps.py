"""Accuracy by the number of steps in GSM8K's gold solution, and how many samples ran out of tokens.

Tests a reading of a GSM8K result, not a method: if a soft prompt teaches brevity, its cost should grow with
the number of steps a problem needs, and the prompt without it should lose more samples to the token limit.
For every method in FOLDER (`detot eval` records), per bucket of gold steps (lines of the GSM8K worked
answer before `####`): problems, accuracy; then, over all samples, the share that stated no answer and the
share that stated none *and* reached the token limit (cut off mid-solution). `plain_cot` scores a reply
without an answer statement by its last number, so it shows none; its one reply per problem still counts.
A second table dissects the votes of each sampling method: how often its greedy first sample is right, how
often any sample is (the most voting could get), how many distinct answers the samples state per problem,
and how often a stated answer is right:

    python evals/scripts/by_steps.py evals/results/accuracy/gsm8k ../shared/data/gsm8k/test.jsonl --max-tokens 320 \\
        --pair detot_plain_static detot_plain_static-softprompt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paired_counts import load, methods  # same folder

from detot_agent.evaluation.metrics import paired

BUCKETS = ((1, 2), (3, 4), (5, 99))


def gold_steps(data: Path) -> dict[str, int]:
    """`test:N` (1-based line, as `io.datafiles.read_exemplars` names GSM8K problems) -> solution lines."""
    out = {}
    for no, line in enumerate(data.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            body = json.loads(line)["answer"].rpartition("####")[0]
            out[f"{data.stem}:{no}"] = sum(1 for s in body.splitlines() if s.strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("data", type=Path, help="the GSM8K file the records' ids point into")
    ap.add_argument("--max-tokens", type=int, default=320, help="the run's new-token limit")
    ap.add_argument("--pair", nargs=2, metavar=("A", "B"), help="also McNemar's exact test of A vs B per bucket")
    args = ap.parse_args()
    steps = gold_steps(args.data)
    head = " | ".join(f"{lo}-{hi if hi < 99 else ''} steps" for lo, hi in BUCKETS)
    print(f"| method | problems | {head} | samples with no answer | of them cut at {args.max_tokens} tokens |")
    print("|---|---:|" + "---:|" * len(BUCKETS) + "---:|---:|")
    records = {m: list(load(args.folder, m).values()) for m in methods(args.folder)}
    for name, rows in records.items():
        cells = []
        for lo, hi in BUCKETS:
            got = [r["correct"] for r in rows if lo <= steps[r["id"]] <= hi]
            cells.append(f"{sum(got) / len(got):.3f} ({len(got)})" if got else "-")
        keys = [(k, t) for r in rows for k, t in zip(r.get("sample_keys") or [r["pred"]],
                                                       r.get("sample_tokens") or [r["tokens"]], strict=False)]
        none = [t for k, t in keys if k is None]
        cut = sum(1 for t in none if t >= args.max_tokens)
        print(f"| {name} | {len(rows)} | " + " | ".join(cells)
              + f" | {len(none) / max(len(keys), 1):.1%} | {cut / max(len(keys), 1):.1%} |")
    print("\n| method | greedy first sample right | any sample right | distinct stated answers/q "
          "| stated answers that are right |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in records.items():
        if not any(len(r.get("sample_keys") or []) > 1 for r in rows):
            continue  # one reply per problem: nothing voted
        stated = [(k, r["gold"]) for r in rows for k in r["sample_keys"] if k is not None]
        print(f"| {name} | {sum(r['sample_keys'][0] == r['gold'] for r in rows)} "
              f"| {sum(r['gold'] in r['sample_keys'] for r in rows)} "
              f"| {sum(len(set(r['sample_keys']) - {None}) for r in rows) / len(rows):.2f} "
              f"| {sum(k == g for k, g in stated) / max(len(stated), 1):.3f} |")
    if args.pair:
        a, b = ({r["id"]: r["correct"] for r in records[m]} for m in args.pair)
        for lo, hi in BUCKETS:
            t = paired({i: v for i, v in a.items() if lo <= steps[i] <= hi}, b)
            print(f"{lo}-{hi if hi < 99 else ''} steps: only {args.pair[0]} right {t.b}, only {args.pair[1]} right "
                  f"{t.c}, exact McNemar p = {t.p_value:.3f}")


if __name__ == "__main__":
    main()
