"""Why does llama.cpp's prefix cache change greedy replies on a 4-bit model? A prompt prefilled whole, prefilled in
two chunks, and prefilled the prefix cache's way (another prompt's KV copied, cut to the shared prefix, the rest
decoded) give different logits; this measures by how much, one prompt at a time, on llama.cpp's context directly.

    python evals/scripts/prefill_chunks.py --model "$(../shared/tools/bench-model.sh)"

For each of 8 MultiArith prompts (the same 8 as `prefix_cache_paths.py`; all start with the same instruction, so
each shares a prefix with the one before): the largest absolute difference of the last position's logits against
the whole prefill, for the whole prefill repeated, the two-chunk prefill split where the shared prefix ends, and
the cache path; and whether 60 greedy tokens from there equal the whole prefill's. Writes
`evals/results/prefill_chunks.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from dspy.lm15 import Config, Message, Request

from detot_agent.engines.llamacpp_engine import LlamaCppEngine

CUE = "Solve the problem step by step, then finish with: The answer is <number>.\n\n"
STEPS = 60


def prefill(ctx, ids: list[int], seq: int, start: int = 0) -> np.ndarray:
    """Decode `ids[start:]` at positions `start...` of `seq`; the logits after the last one."""
    (last,) = ctx.decode_tokens([(t, j, seq, j == len(ids) - 1) for j, t in enumerate(ids) if j >= start])
    return ctx.logits(last)


def greedy(ctx, logits: np.ndarray, seq: int, pos: int) -> list[int]:
    """`STEPS` greedy tokens from `logits`, decoding one at a time from position `pos`."""
    out = []
    for _ in range(STEPS):
        tok = int(np.argmax(logits))
        out.append(tok)
        (ix,) = ctx.decode_tokens([(tok, pos, seq, True)])
        logits, pos = ctx.logits(ix), pos + 1
    return out


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="../shared/data/multiarith/MultiArith.json")
    parser.add_argument("--out", type=Path, default=Path("evals/results/prefill_chunks.json"))
    args = parser.parse_args()
    data = json.loads(Path(args.data).read_text())
    questions = [data[i]["sQuestion"].strip() for i in range(0, 80, 10)]
    engine = LlamaCppEngine(args.model, scheduler="static", max_batch_size=2)
    ctx = engine._ctx  # the engine's llama.cpp context: two sequences, used directly (nothing else runs)
    prompts = [engine.render(Request(model="m", messages=[Message.user(CUE + q)], config=Config(max_tokens=8)))
               for q in questions]
    rows = []
    for before, ids in zip(prompts[-1:] + prompts[:-1], prompts, strict=True):
        c = min(common(before, ids), len(ids) - 1)  # an identical prompt: the cache's rule, the last token again
        ctx.clear()
        whole = prefill(ctx, ids, 0)
        reply = greedy(ctx, whole, 0, len(ids))
        ctx.clear()
        again = prefill(ctx, ids, 0)
        ctx.clear()
        prefill(ctx, ids[:c], 0)
        split = prefill(ctx, ids, 0, start=c)
        split_reply = greedy(ctx, split, 0, len(ids))
        ctx.clear()
        prefill(ctx, before, 1)  # the cached prompt, in its own stream
        ctx.seq_cp(1, 0)
        ctx.seq_rm_from(0, c)  # the cache path: its KV cut to the shared prefix, then the rest decoded
        cached = prefill(ctx, ids, 0, start=c)
        cached_reply = greedy(ctx, cached, 0, len(ids))
        rows.append({"prompt_tokens": len(ids), "shared_prefix": c,
                     "max_abs_logit_diff": {"whole_again": float(np.abs(again - whole).max()),
                                            "two_chunks": float(np.abs(split - whole).max()),
                                            "cache_path": float(np.abs(cached - whole).max()),
                                            "cache_path_vs_two_chunks": float(np.abs(cached - split).max())},
                     "same_greedy_reply_as_whole": {"two_chunks": split_reply == reply,
                                                    "cache_path": cached_reply == reply},
                     "same_greedy_reply_cache_path_vs_two_chunks": cached_reply == split_reply})
    engine.close()
    summary = {"prompts": len(rows), "greedy_tokens": STEPS,
               "same_reply_two_chunks": sum(r["same_greedy_reply_as_whole"]["two_chunks"] for r in rows),
               "same_reply_cache_path": sum(r["same_greedy_reply_as_whole"]["cache_path"] for r in rows),
               "cache_path_equals_two_chunks": sum(r["same_greedy_reply_cache_path_vs_two_chunks"] for r in rows),
               "max_diff_whole_again": max(r["max_abs_logit_diff"]["whole_again"] for r in rows),
               "max_diff_two_chunks": max(r["max_abs_logit_diff"]["two_chunks"] for r in rows),
               "max_diff_cache_path_vs_two_chunks": max(r["max_abs_logit_diff"]["cache_path_vs_two_chunks"]
                                                        for r in rows)}
    print(json.dumps(summary, indent=1))
    args.out.write_text(json.dumps({"summary": summary, "prompts": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
