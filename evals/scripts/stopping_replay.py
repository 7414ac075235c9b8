"""Stopping rules replayed on recorded self-consistency samples (issue 39, item 6: stopping that stops).

    python evals/scripts/stopping_replay.py [--out evals/results/stopping]

A stopping rule only decides how many of a problem's samples are drawn; the samples themselves do not depend on it
(each is seeded by its position). So a rule can be measured exactly, without the model, on runs that drew the whole
budget and recorded every sample's answer key, output tokens and log-probability in drawing order: the committed
`sc` rows (greedy first, then 5 at temperature 0.5). Each rule walks a problem's samples in DETOT's schedule (2
first, then rounds of 2, at most 6) through the fit's replay (`fit/stopping.replay`: DETOT's own sampling loop
drawing the recorded samples), and the vote at the stop is the confidence-weighted one (`cisc`, temperature 0.1): at
6 samples it is the committed `cisc` row exactly (checked below). The threshold of each rule is chosen on a
development split (the 184 MultiArith problems of the blind confirmation's `sc` row, offset 340: none of them among
the reported 300): the rule and threshold with the fewest samples that answer at least as many dev problems right as
the whole budget. The choice is then reported on the reported 300 GSM8K and 300 MultiArith problems it never saw,
paired against the whole budget (exact McNemar). Writes `replay.json` (every rule on every split) and
`samples_vs_accuracy.png`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from detot_agent.answers import numbers_equal
from detot_agent.evaluation.metrics import mcnemar_exact
from detot_agent.fit import stopping

SPLITS = {  # name -> (records, role)
    "multiarith-dev-184": ("evals/results/accuracy/confirm_multiarith/sc.jsonl", "choice"),
    "gsm8k-300": ("evals/results/accuracy/gsm8k/sc.jsonl", "report"),
    "multiarith-300": ("evals/results/accuracy/multiarith/sc.jsonl", "report"),
}
CISC = {"gsm8k-300": "evals/results/accuracy/gsm8k/cisc.jsonl",
        "multiarith-300": "evals/results/accuracy/multiarith/cisc.jsonl"}
RULES: list[tuple[str, float]] = [("fixed", 1.0)]
RULES += [("beta", t) for t in (0.7, 0.8, 0.9, 0.95)]
RULES += [("majority", t) for t in (0.6, 0.75, 0.9, 1.0)]
RULES += [("confidence", t) for t in (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)]
RULES += [("entropy", t) for t in (0.5, 0.7, 0.9)]
MIN_SAMPLES, ROUND, MAX_SAMPLES, CISC_T = 2, 2, 6, 0.1


def load(path: str) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("error") is None and len(rec.get("sample_keys") or []) == MAX_SAMPLES:
                seen.setdefault(rec["id"], rec)
    return list(seen.values())


def replay(rec: dict[str, Any], rule: str, threshold: float) -> tuple[bool, int, int]:
    """(correct, samples drawn, output tokens) of one problem under one rule: the fit's replay
    (`fit/stopping.replay`, DETOT's own sampling loop over the recorded samples), a key right when it equals gold."""
    keys = rec["sample_keys"]
    right = {k: numbers_equal(k, rec["gold"]) for k in keys if k is not None}
    out = stopping.replay({**rec, "key_correct": right}, rule=rule, threshold=threshold, min_samples=MIN_SAMPLES,
                          round_size=ROUND, max_samples=MAX_SAMPLES, weighting="cisc", cisc_temperature=CISC_T)
    assert out is not None  # every record drew the whole budget (`load`)
    return out


def measure(records: list[dict[str, Any]], rule: str, threshold: float) -> dict[str, Any]:
    runs = [replay(r, rule, threshold) for r in records]
    full = [replay(r, "fixed", 1.0) for r in records]
    only_rule = sum(a[0] and not b[0] for a, b in zip(runs, full, strict=True))
    only_full = sum(b[0] and not a[0] for a, b in zip(runs, full, strict=True))
    n = len(records)
    return {"rule": rule, "threshold": threshold, "problems": n, "correct": sum(r[0] for r in runs),
            "accuracy": sum(r[0] for r in runs) / n, "samples": sum(r[1] for r in runs) / n,
            "tokens": sum(r[2] for r in runs) / n, "only_rule": only_rule, "only_full_budget": only_full,
            "mcnemar_p": mcnemar_exact(only_rule, only_full).p_value,
            "stopped_early": sum(r[1] < MAX_SAMPLES for r in runs) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("evals/results/stopping"))
    args = parser.parse_args()
    data = {name: load(path) for name, (path, _) in SPLITS.items()}
    for name, path in CISC.items():  # the replay's full budget is the committed cisc row
        cisc = {r["id"]: bool(r["correct"]) for r in load(path)}
        agree = sum(replay(r, "fixed", 1.0)[0] == cisc[r["id"]] for r in data[name] if r["id"] in cisc)
        print(f"{name}: the replay at 6 samples agrees with the committed cisc row on {agree}/{len(cisc)} problems")
    table = {name: [measure(recs, rule, t) for rule, t in RULES] for name, recs in data.items()}
    dev = table["multiarith-dev-184"]
    full_correct = dev[0]["correct"]
    eligible = [row for row in dev if row["correct"] >= full_correct]
    chosen = min(eligible, key=lambda row: (row["samples"], -row["correct"]))
    choice = (chosen["rule"], chosen["threshold"])
    print(f"chosen on the dev split: {choice[0]} at {choice[1]} ({chosen['samples']:.2f} samples, "
          f"{chosen['correct']}/{chosen['problems']} right; whole budget {full_correct})")
    print("| split | rule | threshold | accuracy | samples / problem | tokens / problem | only rule | only 6 | p |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in table.items():
        for row in rows:
            mark = " **chosen**" if (row["rule"], row["threshold"]) == choice else ""
            print(f"| {name} | {row['rule']}{mark} | {row['threshold']} | {row['accuracy']:.3f} | "
                  f"{row['samples']:.2f} | {row['tokens']:.0f} | {row['only_rule']} | {row['only_full_budget']} | "
                  f"{row['mcnemar_p']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"schedule": {"min_samples": MIN_SAMPLES, "round_size": ROUND, "max_samples": MAX_SAMPLES,
                           "weighting": "cisc", "cisc_temperature": CISC_T},
              "splits": {name: path for name, (path, _) in SPLITS.items()},
              "choice": {"rule": choice[0], "threshold": choice[1],
                         "rule_of_choice": "fewest samples with at least the whole budget's correct count on dev"},
              "table": table}
    (args.out / "replay.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(table, choice, args.out / "samples_vs_accuracy.png")
    print(f"wrote {args.out / 'replay.json'} and {args.out / 'samples_vs_accuracy.png'}")


def plot(table: dict[str, list[dict[str, Any]]], choice: tuple[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 4), sharey=False)
    for ax, (name, rows) in zip(axes, table.items(), strict=True):
        for rule in dict.fromkeys(r["rule"] for r in rows):
            pts = sorted((r["samples"], r["accuracy"]) for r in rows if r["rule"] == rule)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=rule)
        mine = next(r for r in rows if (r["rule"], r["threshold"]) == choice)
        ax.scatter([mine["samples"]], [mine["accuracy"]], s=160, facecolors="none", edgecolors="black",
                   label=f"chosen on dev: {choice[0]} {choice[1]}")
        ax.set_title(name)
        ax.set_xlabel("samples per problem")
        ax.set_ylabel("accuracy (cisc vote at the stop)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
