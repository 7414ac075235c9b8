#!/usr/bin/env python
"""Static DETOT against DETOT with the loop on a prequential stream: accuracy per half, paired (issue 17).

The stream's order is the run's seeded problem order (`run.json` `ids`), the same for both methods, so each
half holds the same problems for both and they can be compared pairwise (exact McNemar). Also lists every
re-optimization decision of the looping method with the canary accuracy of the serving state and of the
candidate.

    python evals/scripts/stream_halves.py evals/results/prequential_gsm8k --static detot_plain_static \\
        --loop detot_plain --json evals/results/prequential_gsm8k/halves.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detot_agent.evaluation.metrics import paired
from detot_agent.evaluation.report import build_report
from detot_agent.evaluation.runner import read_records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--static", default="detot_plain_static")
    ap.add_argument("--loop", default="detot_plain")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    ids = json.loads((args.run / "run.json").read_text())["ids"]
    half = len(ids) // 2
    correct = {m: {r["id"]: bool(r["correct"]) for r in read_records(args.run / f"{m}.jsonl")}
               for m in (args.static, args.loop)}
    out: dict = {"problems": len(ids), "halves": {}}
    print(f"{len(ids)} problems in stream order; halves of {half} and {len(ids) - half}")
    print("| part | static | loop | only static right | only loop right | McNemar p |")
    print("|---|---|---|---|---|---|")
    for name, part in (("first half", ids[:half]), ("second half", ids[half:]), ("whole stream", ids)):
        both = [i for i in part if all(i in correct[m] for m in correct)]
        if not both:
            continue
        s = {i: correct[args.static][i] for i in both}
        lp = {i: correct[args.loop][i] for i in both}
        test = paired(s, lp)
        row = {"n": len(both), "static": sum(s.values()) / len(both), "loop": sum(lp.values()) / len(both),
               "only_static": test.b, "only_loop": test.c, "p_value": test.p_value}
        out["halves"][name] = row
        print(f"| {name} ({len(both)}) | {row['static']:.3f} | {row['loop']:.3f} | {test.b} | {test.c} | "
              f"{test.p_value:.3f} |")
    decisions = build_report(args.run)["methods"][args.loop]["decisions"]  # as `detot eval report` reads them
    out["decisions"] = decisions
    print(f"\n{len(decisions)} re-optimization decisions of {args.loop}, "
          f"{sum(d['accepted'] for d in decisions)} accepted")
    for d in decisions:
        print(f"- {d['change']} {'accepted' if d['accepted'] else 'rejected'} after {d['after_observations']} "
              f"answers ({d['seconds'] or 0:.1f} s), canary {d['canary_accuracy']}: {d['reason'][:160]}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
