"""Compare eval records of the same problems, field by field, against the first file given.

    python evals/scripts/rerun_compare.py REFERENCE.jsonl OTHER.jsonl [...] [--json OUT]

The comparison is the library's (`detot_agent.evaluation.breakdowns.compare_records`, what `detot eval report
--against` prints for two run folders): two records are the same decode when they are equal on every
`TRACE_FIELDS` field (answer, prediction, output tokens, samples, parse failures, correctness). This script takes
record files instead of run folders, so rows of differently named methods (`plain_cot` then, `cot` now) compare.
Prints a line per file and writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from detot_agent.evaluation.breakdowns import TRACE_FIELDS, compare_records
from detot_agent.evaluation.runner import read_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ref = list(read_records(args.reference))
    result = {"reference": str(args.reference), "fields": list(TRACE_FIELDS), "against": {}}
    print(f"reference {args.reference}: {len({r['id'] for r in ref})} problems")
    for path in args.others:
        row = compare_records(ref, list(read_records(path)))
        result["against"][str(path)] = row
        print(f"{path}: {row['identical']}/{row['problems']} identical records, {row['same_answer']} same answers, "
              f"accuracy {row['run']['accuracy']:.3f} vs {row['other']['accuracy']:.3f} "
              f"(McNemar p = {row['p_value']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
