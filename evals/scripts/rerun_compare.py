"""Compare eval records of the same problems, field by field, against the first file given.

    python evals/scripts/rerun_compare.py REFERENCE.jsonl OTHER.jsonl [...] [--json OUT]

Two records are the same when their answer, prediction, output tokens, samples, parse failures and correctness are
equal (the records hold no text; equal token counts and answers are the trace a different greedy path leaves).
Compares only the problems the reference has; prints a line per file and writes the counts as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

FIELDS = ("answer", "pred", "tokens", "samples", "parse_failures", "correct")


def records(path: Path) -> dict[str, dict]:
    """The first record of each problem id in a JSONL file of eval records."""
    out: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out.setdefault(rec["id"], rec)
    return out


def compare(ref: dict[str, dict], other: dict[str, dict]) -> dict:
    shared = [i for i in ref if i in other]
    same = [i for i in shared if all(ref[i].get(f) == other[i].get(f) for f in FIELDS)]
    same_answer = [i for i in shared if ref[i]["answer"] == other[i]["answer"]]
    return {"problems": len(shared), "identical": len(same), "same_answer": len(same_answer),
            "accuracy_reference": sum(bool(ref[i]["correct"]) for i in shared) / max(len(shared), 1),
            "accuracy_other": sum(bool(other[i]["correct"]) for i in shared) / max(len(shared), 1),
            "differing_ids": [i for i in shared if i not in same]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ref = records(args.reference)
    result = {"reference": str(args.reference), "fields": list(FIELDS), "against": {}}
    print(f"reference {args.reference}: {len(ref)} problems")
    for path in args.others:
        row = compare(ref, records(path))
        result["against"][str(path)] = row
        print(f"{path}: {row['identical']}/{row['problems']} identical records, {row['same_answer']} same answers, "
              f"accuracy {row['accuracy_reference']:.3f} vs {row['accuracy_other']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
