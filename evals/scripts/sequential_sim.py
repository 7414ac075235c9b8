"""How many paired outcomes the always-valid test (`detot/sequential.py`) needs to accept a +3, +5 and +10 point
change, on recorded data: the committed GSM8K records of `cot` (the serving state) and `pot` (a candidate, the
program-of-thought strategy change the loop once trialled), as paired outcomes per problem.

The two are equally accurate on those 300 problems (0.227 each), with their real discordance. A +d change is made
by turning a random share of the problems the candidate lost (`-1`) into ties, so the discordance structure stays
the recorded one. Problems are resampled with replacement into streams; the test reads every outcome, at the
first candidate's e-LOND level (alpha 0.05 * 6 / pi^2), min_effect 0.03, futility 0.1. The old rule is shown for
comparison: the fixed replay of 16 gold items at alpha / 2, sign test with min_effect 0.05.

Usage: .venv/bin/python evals/scripts/sequential_sim.py [--streams 400] [--out evals/results/sequential]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from detot_agent.detot.judging import sign_test_p
from detot_agent.detot.sequential import PairedBettingTest, SequentialRules
from detot_agent.evaluation.paired import run_outcomes

RUN = Path("evals/results/accuracy/gsm8k")
GAINS = (0.0, 0.03, 0.05, 0.10)
CAP = 3000


def pairs() -> list[int]:
    outcomes = run_outcomes(RUN)
    serving, candidate = outcomes["cot"], outcomes["pot"]
    return [int(candidate[i]) - int(serving[i]) for i in serving if i in candidate]


def stream(base: list[int], gain: float, rng: random.Random) -> list[int]:
    losses = sum(x == -1 for x in base) / len(base)
    lift = gain / losses if losses else 0.0
    out = []
    for _ in range(CAP):
        x = rng.choice(base)
        out.append(0 if x == -1 and rng.random() < lift else x)
    return out


def sequential(xs: list[int], level: float, rules: SequentialRules) -> tuple[str, int]:
    test = PairedBettingTest(rules)
    for x in xs:
        test.observe(x)
        decision = test.decision(level=level)
        if decision != "continue":
            return decision, test.outcomes
    return "reject", len(xs)


def fixed_replay(xs: list[int]) -> bool:
    window = xs[:16]
    wins, losses = sum(x == 1 for x in window), sum(x == -1 for x in window)
    return sign_test_p(wins, losses) <= 0.025 and (wins - losses) / 16 >= 0.05


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("evals/results/sequential"))
    args = parser.parse_args()
    base = pairs()
    rules = SequentialRules(min_effect=0.03, futility=0.1, max_outcomes=CAP)
    level = 0.05 * 6 / math.pi**2
    result: dict[str, object] = {"problems": len(base), "wins": base.count(1), "losses": base.count(-1),
                                 "level": level, "rules": rules.model_dump(), "streams": args.streams, "gains": {}}
    print(f"recorded pairs: {len(base)} problems, pot alone right {base.count(1)}, cot alone right "
          f"{base.count(-1)}; level {level:.4f}")
    print("| gain | accepted (sequential) | outcomes to accept: median | 90th pct | rejected for futility | "
          "old fixed replay (16 items) accepts |")
    print("|---:|---:|---:|---:|---:|---:|")
    curves = {}
    for gain in GAINS:
        runs, fixed = [], 0
        for seed in range(args.streams):
            xs = stream(base, gain, random.Random(seed * 7919 + int(gain * 1000)))
            runs.append(sequential(xs, level, rules))
            fixed += fixed_replay(xs)
        needed = sorted(n for d, n in runs if d == "accept")
        accepted = len(needed) / args.streams
        median = needed[len(needed) // 2] if needed else None
        p90 = needed[int(0.9 * (len(needed) - 1))] if needed else None
        futile = sum(d == "reject" and n < CAP for d, n in runs) / args.streams
        result["gains"][f"{gain:.2f}"] = {"accepted": accepted, "median_outcomes": median, "p90_outcomes": p90,  # type: ignore[index]
                                          "futility": futile, "fixed_replay_accepts": fixed / args.streams}
        curves[gain] = needed
        print(f"| +{gain * 100:.0f} pts | {accepted:.1%} | {median or '-'} | {p90 or '-'} | {futile:.1%} | "
              f"{fixed / args.streams:.1%} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sequential_sim.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for gain, needed in curves.items():
        xs = [0, *needed, CAP]
        ys = [0, *[(i + 1) / args.streams for i in range(len(needed))], len(needed) / args.streams]
        ax.step(xs, ys, where="post", label=f"+{gain * 100:.0f} points")
    ax.set_xscale("log")
    ax.set_xlabel("paired outcomes observed")
    ax.set_ylabel("share of streams accepted")
    ax.set_title("Always-valid paired test on recorded GSM8K pairs (cot vs pot)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "sequential_sim.png", dpi=120)


if __name__ == "__main__":
    main()
