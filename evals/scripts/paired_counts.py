"""Paired comparisons the eval report does not print: one method against every other, on the same problems.

`detot eval report` compares each method with the best baseline only. This prints, for METHOD, McNemar's
exact test (`evaluation.metrics.paired`) against every other method in the folder, and, where `plain_sc`
and `plain_cot` are both there, how often `plain_sc`'s greedy first sample and `plain_cot`'s greedy reply
disagree (no stated answer / another value), and on how many problems `plain_sc_adaptive` stopped early:

    python evals/scripts/paired_counts.py evals/results/accuracy/gsm8k detot_plain_static
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from detot_agent.evaluation.metrics import paired
from detot_agent.evaluation.runner import RUN_FILE, read_records


def methods(folder: Path) -> list[str]:
    """The run's methods, as `detot eval report` lists them (from `run.json`)."""
    return list(json.loads((folder / RUN_FILE).read_text())["methods"])


def load(folder: Path, method: str) -> dict[str, dict]:
    """id -> record of one method (`evaluation.runner.read_records`); empty if it has none yet."""
    path = folder / f"{method}.jsonl"
    return {r["id"]: r for r in read_records(path)} if path.is_file() else {}


def main() -> None:
    folder, method = Path(sys.argv[1]), sys.argv[2]
    ours = {i: r["correct"] for i, r in load(folder, method).items()}
    for other in methods(folder):
        if other == method:
            continue
        t = paired(ours, {i: r["correct"] for i, r in load(folder, other).items()})
        print(f"{method} vs {other}: only {method} right {t.b}, only {other} right {t.c}, exact McNemar p = "
              f"{t.p_value:.3f}")
    sc, cot = load(folder, "plain_sc"), load(folder, "plain_cot")
    if sc and cot:
        common = sc.keys() & cot.keys()
        none = sum(1 for i in common if sc[i]["sample_keys"][0] is None)
        other = sum(1 for i in common if sc[i]["sample_keys"][0] not in (None, cot[i]["answer"]))
        print(f"plain_sc's greedy first sample vs plain_cot on {len(common)} problems: states no answer {none}, "
              f"another answer {other}")
    adaptive = load(folder, "plain_sc_adaptive")
    if adaptive and sc:  # it re-votes plain_sc's samples: fewer of them is an early stop
        early = sum(1 for i, r in adaptive.items() if i in sc and r["samples"] < sc[i]["samples"])
        print(f"plain_sc_adaptive stopped early on {early} of {len(adaptive)} problems")


if __name__ == "__main__":
    main()
