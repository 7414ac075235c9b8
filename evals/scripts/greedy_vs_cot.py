"""One figure of the accuracy write-up that no report reading gives: how often `sc`'s greedy first sample
and `cot`'s greedy reply (the same prompt) disagree: no stated answer, or another value.

The paired tests are `detot eval report DIR --paired METHOD`; greedy first samples that state no answer and
early stops are in `detot eval report DIR --steps DATA_FILE` (the votes table):

    python evals/scripts/greedy_vs_cot.py evals/results/accuracy/gsm8k
"""

from __future__ import annotations

import sys
from pathlib import Path

from detot_agent.evaluation.runner import read_records


def load(folder: Path, method: str) -> dict[str, dict]:
    """id -> record of one method (`evaluation.runner.read_records`); empty if it has none yet."""
    path = folder / f"{method}.jsonl"
    return {r["id"]: r for r in read_records(path)} if path.is_file() else {}


def main() -> None:
    folder = Path(sys.argv[1])
    sc, cot = load(folder, "sc"), load(folder, "cot")
    if sc and cot:
        common = sc.keys() & cot.keys()
        none = sum(1 for i in common if sc[i]["sample_keys"][0] is None)
        other = sum(1 for i in common if sc[i]["sample_keys"][0] not in (None, cot[i]["answer"]))
        print(f"sc's greedy first sample vs cot on {len(common)} problems: states no answer {none}, "
              f"another answer {other}")


if __name__ == "__main__":
    main()
