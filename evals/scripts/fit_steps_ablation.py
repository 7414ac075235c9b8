"""Gold against self-distilled soft prompts at exactly equal training steps (issue 39's ablation), on GSM8K's dev
problems.

The GSM8K fit (`evals/results/fit/gsm8k`, `fit_gsm8k.sh`) trained both prompts from the same start with the same
seed and settings, but its time share stopped the self-distilled prompt after 31 steps (its validation checks at
10, 20 and 30: it kept step 30), while the gold prompt ran its 40 (it kept step 40). This re-trains the gold prompt
with `--steps 30` (the same seed, data order and checks, so the same trajectory as the first 30 steps of the 40-step
run: it keeps the best of steps 10, 20 and 30, as the self-distilled one did) and races it on the first 20 dev
problems, the ones the first fit answered with every candidate; the rows of the candidates the ablation does not
change (`plain`, `none-k0`) are copied from the first fit's race log, so only `gold-k0` is answered again.

    python evals/scripts/fit_steps_ablation.py            # resumable: run it again after a kill
    python evals/scripts/fit_steps_ablation.py --compare  # only the comparison (ablation.json)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FIRST = Path("evals/results/fit/gsm8k")
OUT = Path("evals/results/fit/gsm8k-gold-30")
ITEMS = 20
KEPT = ("plain", "none-k0")  # candidates whose dev answers this ablation does not change


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    race = OUT / "race.jsonl"
    if not race.exists():
        kept = [r for r in _rows(FIRST / "race.jsonl") if r["candidate"] in KEPT and r["item"] < ITEMS]
        race.write_text("".join(json.dumps(r) + "\n" for r in kept))


def fit() -> None:
    model = subprocess.run(["bash", "../shared/tools/bench-model.sh"], capture_output=True, text=True,
                           check=True).stdout.strip()
    subprocess.run([".venv/bin/detot", "fit", "--train", "../shared/data/gsm8k/train.jsonl", "--train-limit", "48",
                    "--dev", "../shared/data/gsm8k/test.jsonl", "--dev-offset", "300", "--dev-limit", str(ITEMS),
                    "--seed", "0", "--model", model, "--engine", "llamacpp", "--device", "cpu",
                    "--temperature", "0.5", "--max-tokens", "320", "--n", "5", "--prompts", "gold",
                    "--soft-prompt", "none", "--steps", "30", "--max-minutes", "400",
                    "--race-every", str(ITEMS), "--threads", "4", "--out", str(OUT)], check=True)


def _summary(rows: list[dict]) -> dict:
    rows = sorted(rows, key=lambda r: r["item"])
    n = len(rows)
    return {"problems": n, "correct": sum(r["correct"] for r in rows),
            "accuracy": round(sum(r["correct"] for r in rows) / n, 3),
            "distinct_answers": round(sum(r["distinct"] for r in rows) / n, 2),
            "tokens": round(sum(r["tokens"] for r in rows) / n),
            "samples": round(sum(r["samples"] for r in rows) / n, 2)}


def compare() -> dict:
    first = [r for r in _rows(FIRST / "race.jsonl") if r["item"] < ITEMS]
    new = [r for r in _rows(OUT / "race.jsonl") if r["candidate"] == "gold-k0"]
    steps = {name: json.loads((folder / "prompts" / f"{name}.report.json").read_text())
             for folder, name in ((FIRST, "distilled-1"), (OUT, "gold"))}
    out = {"items": ITEMS, "kept_step": {"distilled": 30, "gold (this run)": 30, "gold (first fit)": 40},
           "val_loss": {"distilled": steps["distilled-1"]["val_loss"], "gold (this run)": steps["gold"]["val_loss"]},
           "candidates": {
               "gold, 30 steps (this run)": _summary(new),
               "self-distilled, 30 steps (first fit)": _summary([r for r in first if r["candidate"] == "distilled-k0"]),
               "gold, 40 steps (first fit)": _summary([r for r in first if r["candidate"] == "gold-k0"]),
               "no prompt (first fit)": _summary([r for r in first if r["candidate"] == "none-k0"]),
               "plain cisc (first fit)": _summary([r for r in first if r["candidate"] == "plain"])}}
    gold = {r["item"]: r["correct"] for r in new}
    dist = {r["item"]: r["correct"] for r in first if r["candidate"] == "distilled-k0"}
    common = sorted(set(gold) & set(dist))
    out["paired"] = {"items": len(common), "only_distilled_right": sum(dist[i] and not gold[i] for i in common),
                     "only_gold_right": sum(gold[i] and not dist[i] for i in common)}
    (OUT / "ablation.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", action="store_true", help="only compare (the fit has run)")
    args = parser.parse_args()
    if not args.compare:
        prepare()
        fit()
    json.dump(compare(), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
