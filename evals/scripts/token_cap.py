"""How much of a no-demo candidate's gain survives a smaller token budget? An estimate on recorded chains.

The prequential GSM8K stream serves static DETOT at 256 new tokens (`evals/results/prequential_gsm8k_v3`); the
candidates a loop `Policy` reaches from it were recorded at 320 (`loop_counterfactual.py` lists them). Each record
keeps every sampled chain's answer and length (`sample_keys`, `sample_tokens`), so for a budget C the chains that
reached C tokens are the ones a C-token run would have cut off (a cut chain rarely ends in "The answer is").
Dropping them and voting the rest by plain majority estimates the candidate at budget C; its wins and losses are
paired with static DETOT's outcomes on the same problems.

This is an estimate, not a re-run: the recorded runs voted with CISC weights and stopped adaptively (plain majority
over the chains left is lower: compare the estimate at 320 with the recorded accuracy), a cut chain may still have
given its answer, and a cut run would have drawn other chains after the first. The v4 stream's live candidate (the
same policy at 256 tokens) measured +3.5 points (13 wins, 8 losses of 141), in line with the estimate at 256.

Usage: .venv/bin/python evals/scripts/token_cap.py [--out evals/results/loop_counterfactual]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detot_agent.detot.voting import vote
from detot_agent.evaluation.runner import read_records

STREAM = Path("evals/results/prequential_gsm8k_v3/detot.jsonl")
RUNS = {  # label -> the committed run's records (320 new tokens, the same 300 problems)
    "the fit's choice (no demos, no soft prompt, CISC)": Path("evals/results/fit/gsm8k-300/detot.jsonl"),
    "no demos, no soft prompt, CISC": Path("evals/results/accuracy/gsm8k/cisc.jsonl"),
    "no demos, no soft prompt": Path("evals/results/accuracy/gsm8k/detot-softprompt.jsonl"),
}
BUDGETS = (256, 288, 320)


def _vote(keys: list[str | None], tokens: list[int], budget: int) -> str | None:
    """Plain majority (DETOT's `vote`) over the chains that ended before `budget` tokens (None: no chain left)."""
    return vote([k if t < budget else None for k, t in zip(keys, tokens, strict=True)]).winner


def estimate(records: list[dict], static: dict[str, bool], budget: int) -> dict:
    right = wins = losses = 0
    for r in records:
        ok = _vote(r["sample_keys"], r["sample_tokens"], budget) == str(r["gold"])
        served = static[r["id"]]
        right += ok
        wins += ok and not served
        losses += served and not ok
    n = len(records)
    return {"budget": budget, "accuracy": right / n, "wins": wins, "losses": losses, "gain": (wins - losses) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("evals/results/loop_counterfactual"))
    args = parser.parse_args()
    static = {r["id"]: bool(r["correct"]) for r in read_records(STREAM)}
    out: dict = {"stream": str(STREAM), "static_accuracy": sum(static.values()) / len(static), "runs": {}}
    lines = ["| candidate (recorded at 320 tokens) | recorded acc. | chains | mean tokens a chain | chains that "
             "reached 320 | estimate at 320 | at 288 | at 256 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, path in RUNS.items():
        records = read_records(path)
        assert {r["id"] for r in records} == set(static), f"{path} is not the stream's 300 problems"
        tokens = [t for r in records for t in r["sample_tokens"]]
        row = {"run": str(path), "recorded_accuracy": sum(bool(r["correct"]) for r in records) / len(records),
               "chains": len(tokens), "mean_tokens": sum(tokens) / len(tokens),
               "reached_320": sum(t >= 320 for t in tokens) / len(tokens),
               "estimates": [estimate(records, static, b) for b in BUDGETS]}
        out["runs"][label] = row
        cells = {e["budget"]: f"{e['accuracy']:.3f} ({e['wins']} / {e['losses']}, {100 * e['gain']:+.1f})"
                 for e in row["estimates"]}
        lines.append(f"| {label} | {row['recorded_accuracy']:.3f} | {row['chains']} | {row['mean_tokens']:.0f} | "
                     f"{100 * row['reached_320']:.0f}% | {cells[320]} | {cells[288]} | {cells[256]} |")
    stream_tokens = [t for r in read_records(STREAM) for t in r["sample_tokens"]]
    lines.append(f"| static DETOT (v3, demos and soft prompt, 256 tokens) | {out['static_accuracy']:.3f} | "
                 f"{len(stream_tokens)} | {sum(stream_tokens) / len(stream_tokens):.0f} | - | - | - | - |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "token_cap.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "token_cap.md").write_text(table)
    print(table)
    print("estimate cells: plain-majority accuracy (wins / losses against static DETOT, gain in points)")


if __name__ == "__main__":
    main()
