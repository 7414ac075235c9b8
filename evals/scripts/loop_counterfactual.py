"""Could the loop meet the prequential goal with the right candidate? A counterfactual on recorded data.

The prequential GSM8K stream (`evals/results/prequential_gsm8k_v3`, static DETOT: demos, soft prompt, 256 new
tokens) is the serving state. Each candidate is a committed run on the same 300 problems that a loop `Policy` can
reach from it (`detot eval`, 320 new tokens, seed 0): no demos and no soft prompt (`accuracy/gsm8k/detot-softprompt`,
`Policy(k_exemplars=0, soft_prompt=False)`), the same with CISC votes (`accuracy/gsm8k/cisc`, adding
`weighting=cisc`), the fit's shipped choice (`fit/gsm8k-300/detot`) and program of thought (`accuracy/gsm8k/pot`,
`strategy=pot`). Per problem the paired outcome is `candidate right - serving right`.

The loop is simulated as issue 40's shadow trial of a policy: it starts after answer `--trigger` (10: the v3
run's first trigger), a share of later problems is shadowed (chosen at random), each shadowed problem's outcome
reaches the always-valid test `--lag` answers later (the shadow answer runs behind), at the first candidate's
e-LOND level (alpha 0.05 x 6 / pi^2 = 0.0304), min_effect 0.03, futility 0.1. From the answer after acceptance the
candidate's recorded answers are served. The goal: second-half accuracy at least 3 points above static DETOT.
Streams: the recorded order first, then `--orders` random orders of the same 300 problems.

Caveats: the candidates were answered at 320 new tokens (the stream at 256) and in other runs (llama.cpp's
run-to-run variation moved 17 of these 300 outcomes between two runs of one configuration): this is what the test
would decide given outcomes like these, not a re-run.

Usage: .venv/bin/python evals/scripts/loop_counterfactual.py [--orders 400] [--out evals/results/loop_counterfactual]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from detot_agent.detot.sequential import PairedBettingTest, SequentialRules
from detot_agent.evaluation.paired import run_outcomes
from detot_agent.evaluation.runner import read_run

STREAM = Path("evals/results/prequential_gsm8k_v3")
CANDIDATES = {  # label -> (run folder, method, the Policy a loop would propose)
    "no demos, no soft prompt": ("evals/results/accuracy/gsm8k", "detot-softprompt", "k_exemplars=0, soft_prompt=off"),
    "no demos, no soft prompt, CISC": ("evals/results/accuracy/gsm8k", "cisc",
                                       "k_exemplars=0, soft_prompt=off, weighting=cisc"),
    "the fit's choice": ("evals/results/fit/gsm8k-300", "detot", "k_exemplars=0, soft_prompt=off, weighting=cisc"),
    "program of thought": ("evals/results/accuracy/gsm8k", "pot", "strategy=pot, k_exemplars=0, soft_prompt=off"),
}
SHARES = (1.0, 0.5, 0.25, 0.1)
LEVEL = 0.05 * 6 / math.pi**2


def simulate(ids: list[str], serving: dict[str, bool], candidate: dict[str, bool], share: float, trigger: int,
             lag: int, rng: random.Random) -> dict[str, float | int | None]:
    """One stream: when the test decides, and the second half's accuracy with and without the loop."""
    test = PairedBettingTest(SequentialRules(alpha=0.05, min_effect=0.03, futility=0.1))
    shadowed = [i for i in range(trigger, len(ids)) if rng.random() < share]
    arrivals = sorted((i + lag, i) for i in shadowed)  # (answer at which the outcome is in, problem position)
    accepted_at = rejected_at = None
    for at, i in arrivals:
        if at >= len(ids):
            break
        test.observe(int(candidate[ids[i]]) - int(serving[ids[i]]))
        decision = test.decision(level=LEVEL)
        if decision != "continue":
            accepted_at, rejected_at = (at, None) if decision == "accept" else (None, at)
            break
    half = len(ids) // 2
    served = [candidate[q] if accepted_at is not None and k > accepted_at else serving[q] for k, q in enumerate(ids)]
    static2 = sum(serving[q] for q in ids[half:]) / (len(ids) - half)
    loop2 = sum(served[half:]) / (len(ids) - half)
    return {"accepted_at": accepted_at, "rejected_at": rejected_at, "outcomes": test.outcomes, "wins": test.wins,
            "losses": test.losses, "static_second_half": static2, "loop_second_half": loop2,
            "gain_second_half": loop2 - static2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--orders", type=int, default=400)
    ap.add_argument("--trigger", type=int, default=10)
    ap.add_argument("--lag", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="evals/results/loop_counterfactual")
    args = ap.parse_args()
    ids = [str(i) for i in read_run(STREAM)["ids"]]
    serving = run_outcomes(STREAM)["detot"]
    out: dict[str, object] = {"stream": str(STREAM), "level": LEVEL, "trigger": args.trigger, "lag": args.lag,
                              "orders": args.orders, "seed": args.seed, "candidates": {}}
    rows = []
    for label, (folder, method, policy) in CANDIDATES.items():
        candidate = run_outcomes(Path(folder))[method]
        missing = [q for q in ids if q not in candidate]
        if missing:
            raise SystemExit(f"{folder}/{method} lacks {len(missing)} of the stream's problems (e.g. {missing[0]})")
        wins = sum(candidate[q] and not serving[q] for q in ids)
        losses = sum(serving[q] and not candidate[q] for q in ids)
        entry: dict[str, object] = {"run": f"{folder}/{method}", "policy": policy, "wins": wins, "losses": losses,
                                    "gain": (wins - losses) / len(ids), "shares": {}}
        for share in SHARES:
            rng = random.Random(args.seed)
            recorded = simulate(ids, serving, candidate, share, args.trigger, args.lag, rng)
            sims = []
            for _ in range(args.orders):
                order = ids[:]
                rng.shuffle(order)
                sims.append(simulate(order, serving, candidate, share, args.trigger, args.lag, rng))
            accepted = [s["accepted_at"] for s in sims if s["accepted_at"] is not None]
            summary = {
                "recorded_order": recorded,
                "p_accept": len(accepted) / len(sims),
                "p_accept_by_mid": sum(a <= len(ids) // 2 for a in accepted) / len(sims),  # type: ignore[operator]
                "p_reject": sum(s["rejected_at"] is not None for s in sims) / len(sims),
                "median_accept_at": sorted(accepted)[len(accepted) // 2] if accepted else None,
                "p_goal_met": sum(s["gain_second_half"] >= 0.03 - 1e-9 for s in sims) / len(sims),  # type: ignore[operator]
                "mean_gain_second_half": sum(s["gain_second_half"] for s in sims) / len(sims),  # type: ignore[misc]
            }
            entry["shares"][str(share)] = summary  # type: ignore[index]
            rows.append((label, share, wins, losses, summary))
        out["candidates"][label] = entry  # type: ignore[index]
    print("| candidate (recorded wins / losses of 300) | shadow share | recorded order: accepted at | "
          "P(accept) | P(accept by answer 150) | P(second half >= +3) | mean second-half gain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, share, wins, losses, s in rows:
        rec = s["recorded_order"]
        at = rec["accepted_at"] if rec["accepted_at"] is not None else (
            f"rejected at {rec['rejected_at']}" if rec["rejected_at"] is not None else "undecided")
        print(f"| {label} ({wins} / {losses}) | {share:.0%} | {at} | {s['p_accept']:.2f} | {s['p_accept_by_mid']:.2f} "
              f"| {s['p_goal_met']:.2f} | {100 * s['mean_gain_second_half']:+.1f} |")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "counterfactual.json").write_text(json.dumps(out, indent=1) + "\n")
    _plot(out, folder / "counterfactual.png")


def _plot(out: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, entry in out["candidates"].items():  # type: ignore[attr-defined]
        shares = sorted(entry["shares"], key=float)
        ax.plot([100 * float(s) for s in shares], [entry["shares"][s]["p_goal_met"] for s in shares], marker="o",
                label=f"{label} ({entry['wins']}/{entry['losses']})")
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("share of live problems shadowed (%)")
    ax.set_ylabel("P(second half >= static + 3 points)")
    ax.set_ylim(0, 1)
    ax.set_title(f"loop counterfactual on the prequential GSM8K stream ({out['orders']} stream orders)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
