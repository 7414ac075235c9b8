"""Choose DETOT's configuration for the reported run from development runs (issue 19).

Reads every `report.json` under DEV_DIR (one folder per configuration, written by
`bash evals/scripts/accuracy_suite.sh SUITE dev`), lists each DETOT row's configuration (reasoning
strategy, vote weighting, soft prompt on or off, demos per question) with its accuracy and output tokens, and picks the
most accurate; a tie goes to fewer output tokens per question. The development problems are
`--offset 300` of the seeded draw, so none of them is in the reported `--limit 300`.

A choice is made once, before the reported run: when `choice.json` exists it is kept (the reported run
was made with it, and `--resume` pins its settings); the script then prints what the rule would choose
now. `--rechoose` overwrites it (for a new reported run).

Usage:
    python evals/scripts/choose_config.py evals/results/accuracy/dev_multiarith
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from detot_agent.evaluation.names import is_detot
from detot_agent.io.persist import atomic_write_text


def rows(dev: Path) -> list[dict[str, Any]]:
    """One row per DETOT method of every complete run under `dev`."""
    out = []
    for report in sorted(dev.glob("*/report.json")):
        data = json.loads(report.read_text())
        for name, m in data["methods"].items():
            if not is_detot(name):
                continue
            adj = m["config"]["adjustments"]
            out.append({"run": report.parent.name, "method": name, "strategy": adj["strategy"],
                        "weighting": adj.get("weighting", "uniform"),
                        "soft_prompt": not m["config"].get("soft_prompt_off", False),
                        "k": adj["k_exemplars"],
                        "n": m["n"], "correct": m["correct"], "accuracy": m["accuracy"],
                        "tokens_per_question": round(m["tokens_per_question"], 1),
                        "samples_per_question": round(m["samples_per_question"], 2), "complete": m["complete"]})
    return out


def choose(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The most accurate complete row; ties: fewer output tokens per question.

    Example:
        >>> choose([{"accuracy": 0.5, "tokens_per_question": 300, "complete": True},
        ...         {"accuracy": 0.5, "tokens_per_question": 200, "complete": True}])["tokens_per_question"]
        200
    """
    done = [r for r in candidates if r["complete"]]
    if not done:
        raise SystemExit("no complete development run yet: run `accuracy_suite.sh SUITE dev` to the end first")
    return max(done, key=lambda r: (r["accuracy"], -r["tokens_per_question"]))


def describe(config: dict[str, Any]) -> str:
    """One configuration on one line (a choice from before `k` was recorded had 3 demos).

    Example:
        >>> describe({"strategy": "cot", "weighting": "uniform", "soft_prompt": True, "k": 0})
        'strategy=cot weighting=uniform soft_prompt=on k=0'
    """
    return (f"strategy={config['strategy']} weighting={config['weighting']} "
            f"soft_prompt={'on' if config['soft_prompt'] else 'off'} k={config.get('k', 3)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dev", type=Path, help="folder of development runs (one subfolder per configuration)")
    parser.add_argument("--rechoose", action="store_true", help="overwrite an existing choice.json")
    args = parser.parse_args()
    table = rows(args.dev)
    best = choose(table)
    print("| run | method | strategy | weighting | soft prompt | demos | accuracy | tokens/q | samples/q |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for r in table:
        mark = " **(chosen)**" if r is best else ""
        print(f"| {r['run']} | {r['method']}{mark} | {r['strategy']} | {r['weighting']} | "
              f"{'on' if r['soft_prompt'] else 'off'} | {r['k']} | {r['correct']}/{r['n']} | "
              f"{r['tokens_per_question']} | {r['samples_per_question']} |")
    path = args.dev / "choice.json"
    if path.exists() and not args.rechoose:
        print(f"kept {path} ({describe(json.loads(path.read_text()))}); the rule would choose now: "
              f"{describe(best)} (--rechoose to take it)")
        return
    choice = {"strategy": best["strategy"], "weighting": best["weighting"], "soft_prompt": best["soft_prompt"],
              "k": best["k"],
              "chosen_from": table, "rule": "most accurate on the development split; ties: fewer output tokens"}
    atomic_write_text(path, json.dumps(choice, indent=2) + "\n")
    print(f"chosen: {describe(best)} -> {path}")


if __name__ == "__main__":
    main()
