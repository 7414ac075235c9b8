"""The CUDA path of the torch engine, measured on a lent GPU: greedy batch invariance and batched throughput.

(`dtype_batch_invariance.py` asks the invariance question on the CPU with three rows; this adds soft prompts,
longer outputs, the position where rows part, and throughput.)

For each dtype asked for (default: bfloat16, the `auto` choice on CUDA, and float32):

- invariance: 8 arithmetic prompts (half with a random soft prompt), 96 greedy tokens each, decoded alone,
  together and in reverse order; counts the rows whose tokens differ from the row decoded alone, and the
  first position where they part;
- throughput: one prompt sampled at temperature 0.7 (128 new tokens, no stop) in one `generate_rows` call
  of B rows x n samples, for growing batch sizes: generated tokens per second and peak GPU memory.

Writes `gpu_check.json` into the folder given. Run it where torch sees a GPU:

    python evals/scripts/gpu_check.py --model SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/out
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from dspy.lm15 import Config, Message, Request

from detot_agent.engines.generation import GenRow, generate_rows
from detot_agent.engines.torch_engine import LocalEngine

PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have? Let's think step by step.",
    "A baker made 24 cupcakes and sold 17. How many are left? Let's think step by step.",
    "What is 12 times 11?",
    "Sara reads 15 pages a day. How many pages does she read in a week? Let's think step by step.",
    "x",
    "There are 5 boxes with 8 pencils in each box and 3 loose pencils. How many pencils are there in all?",
    "If a train travels 60 miles in 1.5 hours, what is its average speed? Let's think step by step.",
    "Add 7, 9 and 14.",
]


def _req(text: str) -> Request:
    return Request(model="gpu", messages=(Message.user(text),), config=Config())


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def invariance(engine: LocalEngine, new_tokens: int) -> dict:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, text in enumerate(PROMPTS):
        soft = None
        if i % 2 == 0:  # (k, hidden) random soft prompt at the scale of the token embeddings
            scale = float(engine.token_embeddings(None).float().std())
            soft = (torch.randn(4 + i, engine.hidden_size, generator=g) * scale).to(engine.device)
        rows.append(GenRow(prompt_ids=engine.render(_req(text)), soft_prompt=soft, max_new_tokens=new_tokens))
    gen = lambda rs: [o[0].token_ids for o in generate_rows(engine.model, engine.tokenizer, rs, eos_ids=set())]  # noqa: E731
    alone = [gen([r])[0] for r in rows]
    together = gen(rows)
    reverse = gen(rows[::-1])[::-1]
    parts = [_first_difference(a, t) for a, t in zip(alone, together, strict=True)]
    parts_rev = [_first_difference(a, t) for a, t in zip(alone, reverse, strict=True)]
    return {
        "rows": len(rows), "new_tokens": new_tokens,
        "rows_differing_together": sum(p is not None for p in parts),
        "rows_differing_reversed": sum(p is not None for p in parts_rev),
        "first_difference_together": parts, "first_difference_reversed": parts_rev,
    }


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def throughput(engine: LocalEngine, batches: list[int], n: int, new_tokens: int) -> list[dict]:
    ids = engine.render(_req(PROMPTS[0]))
    out = []
    for b in batches:
        rows = [GenRow(prompt_ids=ids, n=n, temperature=0.7, max_new_tokens=new_tokens, seed=i) for i in range(b)]
        generate_rows(engine.model, engine.tokenizer, rows[:1], eos_ids=set())  # warm-up
        _sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = generate_rows(engine.model, engine.tokenizer, rows, eos_ids=set())
        _sync()
        dt = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for r in res for o in r)
        out.append({"rows": b, "samples_per_row": n, "sequences": b * n, "tokens": tokens, "seconds": round(dt, 3),
                    "tok_s": round(tokens / dt, 1), "peak_gib": _peak_gib()})
        print(f"  {b:>4} rows x {n}: {tokens:>7} tokens in {dt:6.2f} s = {tokens / dt:9.1f} tok/s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--batches", default="1,4,16,64,256")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--invariance-tokens", type=int, default=96)
    args = p.parse_args()
    result: dict = {"torch": torch.__version__, "model": Path(args.model).name,
                    "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
                    "dtypes": {}}
    for dtype in args.dtypes.split(","):
        t0 = time.perf_counter()
        engine = LocalEngine(args.model, device=args.device, dtype=dtype, dynamic_batching=False)
        load_s = time.perf_counter() - t0
        print(f"{dtype}: loaded in {load_s:.1f} s", flush=True)
        inv = invariance(engine, args.invariance_tokens)
        print(f"  invariance: {inv['rows_differing_together']}/{inv['rows']} rows differ together, "
              f"{inv['rows_differing_reversed']}/{inv['rows']} reversed", flush=True)
        tp = throughput(engine, [int(b) for b in args.batches.split(",")], args.n, args.new_tokens)
        result["dtypes"][dtype] = {"load_s": round(load_s, 1), "invariance": inv, "throughput": tp}
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
