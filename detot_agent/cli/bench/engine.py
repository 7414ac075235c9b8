"""`detot bench engine`: the engines side by side, soft prompt included.

For each engine asked for (`torch`, `llamacpp`), on one prompt and the same model file:

(a) `single`: one request, one sample (`sample(request, 1)`): single-stream decoding speed;
(b) `fanout`: `lm(prompt, n=N)` through DSPy, which calls the engine N times in a row;
(c) `batched`: one `sample(request, N)` (one prefill, N sequences decoded together);
(d) `concurrent`: N threads each sending one request, gathered by the dynamic batcher.

Every request carries the same `(k, hidden)` soft prompt (text-initialised; `soft_prompt_k=0` for
none). With llama-cpp-python installed, a reference row times llama.cpp's own high-level `Llama`
on the same prompt tokens, single stream, without a soft prompt (it cannot take one). Throughput
is generated tokens (end tokens included) per wall-clock second.

Example:
    >>> from detot_agent.cli.bench.engine import run_engine_bench
    >>> result = run_engine_bench(model=None, engines=["torch", "llamacpp"], n=6)  # doctest: +SKIP
    >>> result["engines"]["llamacpp"]["batched_tok_s"] > result["engines"]["torch"]["batched_tok_s"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from dspy.lm15 import Config, Message, Request

from detot_agent.engines.base import BatchedEngine
from detot_agent.engines.lm import build_engine, local_lm
from detot_agent.softprompt.registry import METADATA_TASK

__all__ = ["BENCH_PROMPT", "PATHS", "run_engine_bench"]

BENCH_PROMPT = "Write a short story about a robot who learns to count apples."
PATHS = {
    "single": "(a) one request, one sample",
    "fanout": "(b) DSPy n fan-out (sequential)",
    "batched": "(c) sample(n), one prefill",
    "concurrent": "(d) n threads, dynamic batching",
}


def _request(max_tokens: int, temperature: float, seed: int | None = None, *, soft: bool = False) -> Request:
    extensions = {"metadata": {METADATA_TASK: "bench"}} if soft else None
    cfg = Config(max_tokens=max_tokens, temperature=temperature, seed=seed, extensions=extensions)
    return Request(model="bench", messages=(Message.user(BENCH_PROMPT),), config=cfg)


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _concurrent(engine: BatchedEngine, n: int, max_tokens: int, temperature: float, soft: bool) -> tuple[float, int]:
    tokens = [0] * n
    barrier = threading.Barrier(n + 1)

    def worker(i: int) -> None:
        barrier.wait()
        response = engine.complete(_request(max_tokens, temperature, seed=i, soft=soft))
        tokens[i] = response.usage.output_tokens or 0

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(tokens)


def _bench_one(kind: str, *, model: str | None, n: int, max_tokens: int, temperature: float, dtype: str,
               device: str, soft_prompt_k: int) -> dict[str, Any]:
    from detot_agent.softprompt.prompt import SoftPrompt

    start = time.perf_counter()
    engine = build_engine(model, engine=kind, dtype=dtype, device=device, max_batch_size=max(n, 1), max_wait_ms=20)
    load_s = time.perf_counter() - start
    soft = soft_prompt_k > 0
    if soft:
        engine.registry.register("bench", SoftPrompt.initialize(engine, "bench", k=soft_prompt_k).vectors)
    lm = local_lm(engine=engine, cache=False)
    engine.sample(_request(8, temperature, soft=soft), 2)  # warm-up (allocator, kernels)
    seconds: dict[str, float] = {}
    tokens: dict[str, int] = {}

    start = time.perf_counter()
    tokens["single"] = sum(s.output_tokens for s in engine.sample(_request(max_tokens, temperature, 0, soft=soft), 1))
    seconds["single"] = time.perf_counter() - start

    dspy_log = logging.getLogger("dspy")
    level = dspy_log.level
    dspy_log.setLevel(logging.ERROR)  # "response was truncated" is expected here: outputs run to max_tokens
    try:
        start = time.perf_counter()
        lm(BENCH_PROMPT, n=n, temperature=temperature, max_tokens=max_tokens,
           metadata={METADATA_TASK: "bench"} if soft else None)
        seconds["fanout"] = time.perf_counter() - start
    finally:
        dspy_log.setLevel(level)
    tokens["fanout"] = int(lm.history[-1]["usage"].get("completion_tokens") or 0)

    start = time.perf_counter()
    tokens["batched"] = sum(s.output_tokens for s in engine.sample(_request(max_tokens, temperature, 0, soft=soft), n))
    seconds["batched"] = time.perf_counter() - start

    seconds["concurrent"], tokens["concurrent"] = _concurrent(engine, n, max_tokens, temperature, soft)
    batcher = engine.batch_stats
    engine.close()
    ids = engine.render(_request(max_tokens, temperature))
    out: dict[str, Any] = {"engine": kind, "class": type(engine).__name__, "load_s": load_s,
                           "prompt_tokens": len(ids), "prompt_ids": ids,
                           "seconds": seconds, "tokens": tokens, "batcher": batcher}
    model = getattr(engine, "model", None)  # the torch engine's; llama.cpp computes in the file's own types
    out.update(device=engine.device, dtype=str(model.dtype).removeprefix("torch.") if model is not None else "gguf")
    for path in PATHS:
        out[f"{path}_tok_s"] = _rate(tokens[path], seconds[path])
    return out


def _llama_cpp_reference(model: str | None, ids: list[int], *, max_tokens: int,
                         temperature: float) -> dict[str, Any]:
    """llama.cpp's own high-level `Llama`, single stream, on the same prompt tokens (no soft prompt)."""
    from detot_agent.engines.llamacpp_load import open_llama
    from detot_agent.engines.models import resolve_model_source

    source = resolve_model_source(model)
    assert source.gguf_file is not None  # the llama.cpp engine ran on it
    # the same buffer decision as the engine (llamacpp_load): AMX buffers crash llama.cpp
    llm, _ = open_llama(os.path.join(source.location, source.gguf_file), n_ctx=2048, verbose=False, seed=0)
    llm.eval(ids[:4])  # warm-up
    llm.reset()
    count = 0
    start = time.perf_counter()
    for _ in llm.generate(ids, temp=temperature, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, reset=True):
        count += 1
        if count >= max_tokens:
            break
    seconds = time.perf_counter() - start
    return {"engine": "llama-cpp-python Llama.generate (reference)", "tokens": count, "seconds": seconds,
            "single_tok_s": _rate(count, seconds)}


def run_engine_bench(
    *, model: str | None, engines: list[str] | None = None, n: int = 6, max_tokens: int = 64,
    temperature: float = 0.7, dtype: str = "auto", device: str = "auto", soft_prompt_k: int = 8,
) -> dict[str, Any]:
    """Run the measurements for each engine (and the llama.cpp reference) and return their figures."""
    engines = engines or ["torch"]
    result: dict[str, Any] = {"n": n, "max_tokens": max_tokens, "temperature": temperature,
                              "soft_prompt_k": soft_prompt_k, "cpus": os.cpu_count(), "engines": {}}
    for kind in engines:
        result["engines"][kind] = _bench_one(kind, model=model, n=n, max_tokens=max_tokens, temperature=temperature,
                                             dtype=dtype, device=device, soft_prompt_k=soft_prompt_k)
    first = next(iter(result["engines"].values()))
    result["prompt_tokens"] = first["prompt_tokens"]
    from detot_agent.engines.models import resolve_model_source

    result["model"] = resolve_model_source(model).name
    if "llamacpp" in engines:
        result["reference"] = _llama_cpp_reference(model, result["engines"]["llamacpp"]["prompt_ids"],
                                                   max_tokens=max_tokens, temperature=temperature)
    torch_row, cpp_row = result["engines"].get("torch"), result["engines"].get("llamacpp")
    ratios: dict[str, float] = {}
    if torch_row and cpp_row:
        for path in PATHS:
            ratios[f"llamacpp_over_torch_{path}"] = _rate(cpp_row[f"{path}_tok_s"], torch_row[f"{path}_tok_s"])
    if cpp_row and result.get("reference"):
        ratios["llamacpp_batched_over_reference_single"] = _rate(cpp_row["batched_tok_s"],
                                                                 result["reference"]["single_tok_s"])
    result["ratios"] = ratios
    return result
