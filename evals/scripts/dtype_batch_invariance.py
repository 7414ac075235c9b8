#!/usr/bin/env python
"""Does a greedy answer on the torch engine depend on its batch-mates? Per dtype, on the embedded model.

Three greedy rows are decoded alone, then together with a sampled row of four (rows of different lengths,
so padding differs); prints, per dtype, whether every greedy text came out the same.

    python evals/scripts/dtype_batch_invariance.py --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import sys

from dspy.lm15 import Config, Message, Request

from detot_agent import LocalEngine

PROMPTS = ["What is 2+3? Answer briefly.", "Name a prime number greater than 10 and explain why it is prime.",
           "Tom has 3 apples and buys 4 more. How many apples? Let's think step by step."]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args(argv)
    for dtype in args.dtypes.split(","):
        engine = LocalEngine(args.model, device="cpu", dtype=dtype)
        reqs = [Request(model="m", messages=(Message.user(p),), config=Config(max_tokens=40, temperature=0.0))
                for p in PROMPTS]
        alone = [engine.generate_batch([engine.build_row(r)])[0][0].text for r in reqs]
        sampled = engine.build_row(Request(model="m", messages=(Message.user("Write a poem about the sea."),),
                                           config=Config(max_tokens=40, temperature=0.8, seed=3)), n=4)
        rows = [engine.build_row(r) for r in reqs]
        out = engine.generate_batch([rows[2], sampled, rows[0], rows[1]])
        same = [out[2][0].text, out[3][0].text, out[0][0].text] == alone
        print(f"{dtype}: greedy answers {'identical' if same else 'DIFFERENT'} alone and inside a mixed batch")
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
