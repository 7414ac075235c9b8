"""The fitted DETOT (a `detot eval --fit` run) against the committed baselines on the same problems.

Usage: .venv/bin/python evals/scripts/fit_compare.py FIT_RUN BASELINE_RUN [--json OUT]
Prints one row per baseline: accuracy, tokens and samples per problem of both, the problems only each solved,
the exact McNemar p (two-sided) and the one-sided sign-test p that the fitted DETOT is better and worse. Only the
problems both runs answered count (a run still going is compared on its answered prefix).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detot_agent.detot.judging import sign_test_p
from detot_agent.evaluation.metrics import mcnemar_exact
from detot_agent.evaluation.paired import run_records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("fit_run", type=Path)
    parser.add_argument("baseline_run", type=Path)
    parser.add_argument("--method", default="detot")
    parser.add_argument("--baselines", default="cot,sc,cisc,pot")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ours = {r["id"]: r for r in run_records(args.fit_run)[args.method]}
    theirs = run_records(args.baseline_run)
    rows = []
    print(f"| baseline | problems | {args.method} (fit) | baseline | tokens/q fit vs baseline | samples/q fit vs "
          "baseline | only fit | only baseline | McNemar p | p fit better | p fit worse |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.baselines.split(","):
        base = {r["id"]: r for r in theirs[name]}
        common = [i for i in ours if i in base]
        if not common:
            continue
        a = [bool(ours[i]["correct"]) for i in common]
        b = [bool(base[i]["correct"]) for i in common]
        only_a = sum(x and not y for x, y in zip(a, b, strict=True))
        only_b = sum(y and not x for x, y in zip(a, b, strict=True))
        row = {"baseline": name, "problems": len(common), "fit_accuracy": sum(a) / len(a),
               "baseline_accuracy": sum(b) / len(b),
               "fit_tokens": sum(ours[i]["tokens"] for i in common) / len(common),
               "baseline_tokens": sum(base[i]["tokens"] for i in common) / len(common),
               "fit_samples": sum(ours[i]["samples"] for i in common) / len(common),
               "baseline_samples": sum(base[i]["samples"] for i in common) / len(common),
               "only_fit": only_a, "only_baseline": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b).p_value,
               "p_fit_better": sign_test_p(only_a, only_b), "p_fit_worse": sign_test_p(only_b, only_a)}
        rows.append(row)
        print(f"| {name} | {row['problems']} | {row['fit_accuracy']:.3f} | {row['baseline_accuracy']:.3f} | "
              f"{row['fit_tokens']:.0f} vs {row['baseline_tokens']:.0f} | {row['fit_samples']:.2f} vs "
              f"{row['baseline_samples']:.2f} | {only_a} | {only_b} | {row['mcnemar_p']:.3f} | "
              f"{row['p_fit_better']:.3f} | {row['p_fit_worse']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
