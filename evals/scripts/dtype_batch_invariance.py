#!/usr/bin/env python
"""Does a greedy answer on the torch engine depend on its batch-mates? Per dtype, on the embedded model.

Three greedy rows are decoded alone, then together with a sampled row of four (rows of different lengths,
so padding differs); prints, per dtype, whether every greedy text came out the same.

    python evals/scripts/dtype_batch_invariance.py --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import sys

from detot_agent import LocalEngine
from detot_agent.testing import greedy_alone_and_batched


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args(argv)
    for dtype in args.dtypes.split(","):
        engine = LocalEngine(args.model, device="cpu", dtype=dtype)
        alone, batched = greedy_alone_and_batched(engine)
        same = batched == alone
        print(f"{dtype}: greedy answers {'identical' if same else 'DIFFERENT'} alone and inside a mixed batch")
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
