"""Add the sequential test's evidence to a shadow log written before its lines held it.

`<method>.shadow.jsonl` lines now carry the test's e-values after each outcome (`accept_e`, `futility_e`, and the
thresholds `accept_at`, `reject_at`), which `detot eval report` plots (`evidence.png`). Logs written before that
(v5 of the prequential GSM8K stream) hold only the outcomes. This replays each candidate's logged outcomes, in
order, through a fresh `PairedBettingTest` with the given rules and adds the fields, but only where the replay
ends exactly where the test saved in `<method>.program.json` ended (the same counts and log-wealths): a log that
misses outcomes, or rules that differ, are refused and nothing is written. The file is replaced in one rename.

Usage:
    .venv/bin/python evals/scripts/shadow_evidence_backfill.py evals/results/prequential_gsm8k_v5 \\
        [--method detot_loop] [--min-effect 0.03] [--futility 0.1]
    .venv/bin/detot eval report evals/results/prequential_gsm8k_v5    # then draws evidence.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from detot_agent.detot.sequential import PairedBettingTest, SequentialRules
from detot_agent.io.persist import atomic_write_text


def saved_shadow(program: Path) -> dict[str, Any]:
    """The shadow judge's saved state (`ShadowJudge.to_json`) inside a saved program."""

    def find(node: Any) -> dict[str, Any] | None:
        if isinstance(node, dict):
            if isinstance(node.get("tests"), dict) and isinstance(node.get("budget"), dict):
                return node
            for value in node.values():
                if (hit := find(value)) is not None:
                    return hit
        return None

    found = find(json.loads(program.read_text()))
    if found is None:
        raise SystemExit(f"{program} holds no saved shadow judge")
    return found


def backfill(rows: list[dict[str, Any]], shadow: dict[str, Any], rules: SequentialRules) -> list[dict[str, Any]]:
    """`rows` with each line's evidence added (see the module docstring); SystemExit when a replay disagrees."""
    tests: dict[str, PairedBettingTest] = {}
    out = []
    for row in rows:
        key = str(row["candidate"])
        test = tests.setdefault(key, PairedBettingTest(rules))
        test.observe(int(row["outcome"]))
        out.append({**row, **test.evidence(level=shadow["budget"]["levels"][key])})  # as ShadowJudge logs it
    for key, test in tests.items():
        saved = PairedBettingTest.from_json(shadow["tests"][key], rules)
        same = (saved.wins, saved.losses, saved.ties) == (test.wins, test.losses, test.ties)
        close = all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in
                    zip(saved.log_accept + saved.log_futile, test.log_accept + test.log_futile, strict=True))
        if not (same and close):
            raise SystemExit(f"the replay of {key!r} does not end where the saved test did ({test.stats()} against "
                             f"{saved.stats()}): the log misses outcomes or the rules differ; nothing written")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--method", default="detot_loop")
    ap.add_argument("--min-effect", type=float, default=SequentialRules().min_effect)
    ap.add_argument("--futility", type=float, default=SequentialRules().futility)
    args = ap.parse_args()
    log = args.run / f"{args.method}.shadow.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if all("accept_e" in r for r in rows):
        print(f"{log}: every line already holds its evidence")
        return
    rules = SequentialRules(min_effect=args.min_effect, futility=args.futility)
    filled = backfill(rows, saved_shadow(args.run / f"{args.method}.program.json"), rules)
    atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in filled))
    last = filled[-1]
    print(f"{log}: {len(filled)} lines; last accept e-value {last['accept_e']:.2f} (accepts at "
          f"{last['accept_at']:.1f}), futility e-value {last['futility_e']:.2f} (rejects at {last['reject_at']:.0f})")


if __name__ == "__main__":
    main()
