"""`detot bench engine`: DSPy's sequential fan-out against batched sampling and dynamic batching.

Four measurements on one prompt, all on the same loaded weights:

(a) `sequential`: `lm(prompt, n=N)` through DSPy, which calls the engine N times in a row;
(b) `batched`: one `LocalEngine.sample(request, N)` (one prefill, N sequences decoded together);
(c) `concurrent_batched`: N threads each sending one request, gathered by the dynamic batcher;
(d) `concurrent_unbatched`: the same N threads against an engine with dynamic batching off.

Throughput is generated tokens (end tokens included) per wall-clock second.

Example:
    >>> from detot_agent.cli.bench.engine import run_engine_bench
    >>> result = run_engine_bench(model=None, n=8, max_tokens=64)  # doctest: +SKIP
    >>> result["batched_over_sequential"] >= 3  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from dspy.lm15 import Config, Message, Request

from detot_agent.engines.torch_engine import LocalEngine, local_lm

__all__ = ["BENCH_PROMPT", "run_engine_bench"]

BENCH_PROMPT = "Write a short story about a robot who learns to count apples."


def _request(max_tokens: int, temperature: float, seed: int | None = None) -> Request:
    cfg = Config(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return Request(model="bench", messages=(Message.user(BENCH_PROMPT),), config=cfg)


def _concurrent(engine: LocalEngine, n: int, max_tokens: int, temperature: float) -> tuple[float, int]:
    tokens = [0] * n
    barrier = threading.Barrier(n + 1)

    def worker(i: int) -> None:
        barrier.wait()
        tokens[i] = engine.complete(_request(max_tokens, temperature, seed=i)).usage.output_tokens or 0

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(tokens)


def run_engine_bench(
    *, model: str | None, n: int = 8, max_tokens: int = 64, temperature: float = 0.7, dtype: str = "auto",
    device: str = "auto",
) -> dict[str, Any]:
    """Run the four measurements and return their figures (tokens/s, seconds, ratios)."""
    engine = LocalEngine(model, dtype=dtype, device=device, max_batch_size=max(n, 1), max_wait_ms=20)
    plain = LocalEngine(model, dtype=dtype, device=device, dynamic_batching=False)
    lm = local_lm(engine=engine, cache=False)
    engine.sample(_request(8, temperature), 2)  # warm-up (allocator, kernels)

    dspy_log = logging.getLogger("dspy")
    level = dspy_log.level
    dspy_log.setLevel(logging.ERROR)  # "response was truncated" is expected here: outputs run to max_tokens
    try:
        start = time.perf_counter()
        lm(BENCH_PROMPT, n=n, temperature=temperature, max_tokens=max_tokens)
        seq_s = time.perf_counter() - start
    finally:
        dspy_log.setLevel(level)
    seq_tokens = int(lm.history[-1]["usage"].get("completion_tokens") or 0)

    start = time.perf_counter()
    samples = engine.sample(_request(max_tokens, temperature, seed=0), n)
    bat_s = time.perf_counter() - start
    bat_tokens = sum(s.output_tokens for s in samples)

    conc_s, conc_tokens = _concurrent(engine, n, max_tokens, temperature)
    unb_s, unb_tokens = _concurrent(plain, n, max_tokens, temperature)
    batcher = engine.batch_stats
    engine.close()

    def rate(tokens: int, seconds: float) -> float:
        return tokens / seconds if seconds > 0 else 0.0

    result: dict[str, Any] = {
        "model": engine.name,
        "device": str(engine.model.device),
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "n": n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "prompt_tokens": len(engine.render(_request(max_tokens, temperature))),
        "sequential_tok_s": rate(seq_tokens, seq_s),
        "batched_tok_s": rate(bat_tokens, bat_s),
        "concurrent_batched_tok_s": rate(conc_tokens, conc_s),
        "concurrent_unbatched_tok_s": rate(unb_tokens, unb_s),
        "seconds": {"sequential": seq_s, "batched": bat_s, "concurrent_batched": conc_s,
                    "concurrent_unbatched": unb_s},
        "tokens": {"sequential": seq_tokens, "batched": bat_tokens, "concurrent_batched": conc_tokens,
                   "concurrent_unbatched": unb_tokens},
        "batcher": batcher,
    }
    result["batched_over_sequential"] = rate(result["batched_tok_s"], result["sequential_tok_s"])
    result["concurrent_batched_over_unbatched"] = rate(
        result["concurrent_batched_tok_s"], result["concurrent_unbatched_tok_s"]
    )
    return result
