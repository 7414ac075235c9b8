"""Stream halves of two prequential runs on the same stream: method A of run folder A against method B of run folder
B (`detot eval report DIR --halves A,B` does this within one folder). Refuses runs whose stream orders differ.

Usage: .venv/bin/python evals/scripts/prequential_halves.py evals/results/prequential_gsm8k_v4 detot_loop \
           evals/results/prequential_gsm8k_v3 detot [--json evals/results/prequential_gsm8k_v4/halves.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detot_agent.evaluation.metrics import paired
from detot_agent.evaluation.paired import need_methods, run_outcomes
from detot_agent.evaluation.runner import read_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("method_a")
    ap.add_argument("run_b", type=Path)
    ap.add_argument("method_b")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ids = read_run(args.run_a)["ids"]
    if read_run(args.run_b)["ids"] != ids:
        raise SystemExit(f"{args.run_a} and {args.run_b} answered different streams (run.json ids differ)")
    a, b = run_outcomes(args.run_a), run_outcomes(args.run_b)
    need_methods(a, args.method_a)
    need_methods(b, args.method_b)
    x_all, y_all = a[args.method_a], b[args.method_b]
    half = len(ids) // 2
    rows = {}
    for name, part in (("first half", ids[:half]), ("second half", ids[half:]), ("whole stream", ids)):
        both = [i for i in part if i in x_all and i in y_all]
        if not both:
            continue
        x, y = {i: x_all[i] for i in both}, {i: y_all[i] for i in both}
        t = paired(x, y)
        rows[name] = {"n": len(both), args.method_a: sum(x.values()) / len(both),
                      args.method_b: sum(y.values()) / len(both), f"only_{args.method_a}": t.b,
                      f"only_{args.method_b}": t.c, "p_value": t.p_value}
        print(f"{name}: n {len(both)}, {args.method_a} {rows[name][args.method_a]:.3f}, {args.method_b} "
              f"{rows[name][args.method_b]:.3f}, only {args.method_a} {t.b}, only {args.method_b} {t.c}, "
              f"exact McNemar p {t.p_value:.3f}")
    out = {"problems": len(ids), "a": f"{args.run_a}:{args.method_a}", "b": f"{args.run_b}:{args.method_b}",
           "halves": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
