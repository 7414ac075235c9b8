"""Paired comparisons for the accuracy write-up: one method against every other, on the same problems.

The paired tests themselves are `detot eval report DIR --paired METHOD` (`evaluation/paired.py`); this adds,
where `plain_sc` and `plain_cot` are both there, how often `plain_sc`'s greedy first sample and `plain_cot`'s
greedy reply disagree (no stated answer / another value), and on how many problems `plain_sc_adaptive`
stopped early:

    python evals/scripts/paired_counts.py evals/results/accuracy/gsm8k detot_plain_static
"""

from __future__ import annotations

import sys
from pathlib import Path

from detot_agent.evaluation.paired import paired_against
from detot_agent.evaluation.runner import read_records


def load(folder: Path, method: str) -> dict[str, dict]:
    """id -> record of one method (`evaluation.runner.read_records`); empty if it has none yet."""
    path = folder / f"{method}.jsonl"
    return {r["id"]: r for r in read_records(path)} if path.is_file() else {}


def main() -> None:
    folder, method = Path(sys.argv[1]), sys.argv[2]
    for row in paired_against(folder, method):
        print(f"{method} vs {row['other']}: only {method} right {row['only_method']}, only {row['other']} right "
              f"{row['only_other']}, exact McNemar p = {row['p_value']:.3f}")
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
