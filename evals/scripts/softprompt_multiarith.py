#!/usr/bin/env python
"""Soft prompt vs none: greedy zero-shot CoT on a seeded MultiArith subset (issue: soft prompts, measurement).

1. trains a soft prompt for the arithmetic task on GSM8K train problems (target: the rationale ending in
   "The answer is N."), unless --soft-prompt points at one already trained;
2. answers the same seeded MultiArith subset greedily with and without it (same prompt, same engine);
3. reports accuracy and answer-format compliance (a number parses / an explicit "The answer is N").

Per-example results are appended to JSONL as they finish, so an interrupted run resumes.

    python evals/scripts/softprompt_multiarith.py --model "$(../shared/tools/bench-model.sh)" \
        --out evals/results/softprompt_multiarith
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from dspy.lm15 import Config, Message, Request

from detot_agent import TuneExample, tune
from detot_agent.answers import extract_number, numbers_equal
from detot_agent.cli.plots import plot_loss
from detot_agent.engines.torch_engine import LocalEngine
from detot_agent.io.datafiles import read_exemplars
from detot_agent.softprompt.prompt import SoftPrompt

COT = "\nLet's think step by step."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", type=Path, default=Path("evals/results/softprompt_multiarith"))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=600, help="GSM8K train problems used for tuning")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--soft-prompt", type=Path, default=None, help="use this trained soft prompt")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    engine = LocalEngine(args.model, dtype=args.dtype, device="cpu")
    sp_dir = args.soft_prompt or args.out / "soft_prompt"
    if (sp_dir / "manifest.json").is_file():
        soft = SoftPrompt.load(sp_dir, hidden_size=engine.hidden_size)
        print(f"using trained soft prompt {sp_dir} (v{soft.version})", flush=True)
    else:
        gsm = read_exemplars(Path(args.data_dir) / "gsm8k" / "train.jsonl", fmt="gsm8k")
        pick = random.Random(args.seed).sample(range(len(gsm)), args.train + 32)
        pairs = [TuneExample(prompt=gsm[i].text + COT, target=gsm[i].fields["rationale"]) for i in pick]
        soft = SoftPrompt.initialize(engine, "arithmetic", k=args.k, init="text")
        report = tune(soft, engine, pairs[32:], val_examples=pairs[:32], steps=args.steps, lr=args.lr,
                      batch_size=args.batch_size, eval_every=20, patience=3)
        soft.save(sp_dir)
        plot_loss(report.train_loss, report.val_loss, sp_dir / "loss.png", title="arithmetic soft prompt",
                  best_step=report.best_step or None, initial_val=report.initial_val_loss)
        (sp_dir / "report.json").write_text(json.dumps(report.model_dump(), indent=2))
        print(f"trained: val loss {report.initial_val_loss:.3f} -> {report.best_val_loss:.3f} "
              f"(step {report.best_step}, {report.seconds:.0f}s, accepted={report.accepted})", flush=True)

    problems = read_exemplars(Path(args.data_dir) / "multiarith" / "MultiArith.json", fmt="multiarith")
    chosen = [problems[i] for i in sorted(random.Random(args.seed).sample(range(len(problems)), args.limit))]
    summary = {}
    for cond, vectors in (("no_soft_prompt", None), ("soft_prompt", soft.vectors)):
        path = args.out / f"{cond}.jsonl"
        done = {json.loads(line)["id"] for line in path.open()} if path.exists() else set()
        todo = [p for p in chosen if p.id not in done]
        start = time.perf_counter()
        with path.open("a") as f:
            for i in range(0, len(todo), 8):
                batch = todo[i:i + 8]
                rows = [engine.build_row(Request(model="bench", messages=(Message.user(p.text + COT),),
                                                 config=Config(max_tokens=args.max_tokens)), soft_prompt=vectors)
                        for p in batch]
                for p, outs in zip(batch, engine.generate_batch(rows), strict=True):
                    value, strict = extract_number(outs[0].text)
                    rec = {"id": p.id, "gold": p.fields["answer"], "pred": value, "strict_format": strict,
                           "correct": numbers_equal(value, p.fields["answer"]), "tokens": len(outs[0].token_ids),
                           "output": outs[0].text}
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                print(f"{cond}: {len(done) + i + len(batch)}/{len(chosen)} ({time.perf_counter() - start:.0f}s)",
                      flush=True)
        recs = [json.loads(line) for line in path.open()]
        recs = [r for r in recs if r["id"] in {p.id for p in chosen}]
        n = len(recs)
        summary[cond] = {
            "n": n, "accuracy": sum(r["correct"] for r in recs) / n,
            "number_parse_rate": sum(r["pred"] is not None for r in recs) / n,
            "strict_format_rate": sum(r["strict_format"] for r in recs) / n,
            "mean_output_tokens": sum(r["tokens"] for r in recs) / n,
        }
    summary["config"] = {k: str(v) for k, v in vars(args).items()}
    summary["soft_prompt_version"] = soft.version
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
