"""What a decode step of llama.cpp costs by where its sequences sit (a KV stream per sequence, as the engine runs it):
llama.cpp decodes each run of consecutive sequence ids as its own pass over the weights, so holes between the
running sequences' slots cost whole passes. Why the continuous scheduler keeps its running sequences on the lowest
slots (issue 38):

    python evals/scripts/ubatch_slots.py "$(../shared/tools/bench-model.sh)" --json evals/results/ubatch_slots.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from detot_agent.engines.llamacpp_runtime import LlamaContext

LAYOUTS = {"8 on slots 0-7": list(range(8)), "8 in two runs of 4 (0-3, 8-11)": [0, 1, 2, 3, 8, 9, 10, 11],
           "8 on even slots 0-14": list(range(0, 16, 2)), "16 on slots 0-15": list(range(16))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ctx = LlamaContext(args.model, n_ctx=512, n_seq_max=16)
    prompt = list(range(1000, 1060))
    for s in range(16):
        ctx.decode_tokens([(t, j, s, j == len(prompt) - 1) for j, t in enumerate(prompt)])
    rows = []
    for label, slots in [*LAYOUTS.items(), ("8 on slots 0-7 (again)", list(range(8)))]:
        pos = len(prompt)
        start = time.perf_counter()
        for i in range(args.steps):
            ctx.decode_tokens([(1234, pos + i, s, True) for s in slots])
        ms = (time.perf_counter() - start) / args.steps * 1000
        for s in slots:
            ctx.seq_rm_from(s, len(prompt))
        rows.append({"layout": label, "sequences": len(slots), "ms_per_step": ms})
        print(f"| {label} | {ms:.1f} ms |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model.name, "cpus": os.cpu_count(), "steps": args.steps,
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
