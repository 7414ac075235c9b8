"""`detot bench serve`: a local engine's static and continuous schedulers under an eval-shaped load, side by side.

Two loads, each run through every scheduler asked for (one engine per scheduler, llama.cpp or torch
(`engine`), the same model file, one after the other in this process):

- `detot`: DETOT-shaped. `problems` GSM8K questions, each with `demos` worked GSM8K answers in front (the
  plain prompt DETOT serves with demos), answered `concurrency` at a time; each problem draws its samples in
  `rounds` rounds of `round_size` (the greedy answer first), every round the same prompt, as DETOT's voting
  rounds are. Reported: aggregate output tokens per second (all tokens over the wall time), p50/p99
  latency of one round, prompt positions prefilled, prefix-cache hits.
- `single`: `single` plain requests one after another (a question, no demos, greedy): p50/p99 latency of one
  request, which continuous batching must not make worse.

Peak memory is the process's peak resident set after each scheduler's runs (it only grows; the first
scheduler's figure bounds its own).

Example:
    >>> from detot_agent.cli.bench.serve import run_serve_bench
    >>> result = run_serve_bench(model="model.gguf", problems=8)            # doctest: +SKIP
    >>> result["speedup_detot_tok_s"] >= 2                                    # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dspy.lm15 import Config, Message, Request

__all__ = ["SCHEDULERS", "run_serve_bench"]

SCHEDULERS = ("static", "continuous")
CUE = "Let's think step by step."


def _problems(data: Path, count: int, demos: int) -> tuple[list[tuple[str, str]], list[str]]:
    """`demos` worked answers and `count` other questions from a GSM8K JSONL file (in file order)."""
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    worked = [(r["question"], r["answer"].replace("####", "The answer is").strip() + ".") for r in rows[:demos]]
    return worked, [r["question"] for r in rows[demos:demos + count]]


def _request(question: str, worked: list[tuple[str, str]], *, max_tokens: int, temperature: float,
             seed: int | None) -> Request:
    turns: list[Message] = []
    for q, a in worked:
        turns += [Message.user(f"{q}\n{CUE}"), Message.assistant(a)]
    turns.append(Message.user(f"{question}\n{CUE}"))
    return Request(model="bench", messages=tuple(turns),
                   config=Config(max_tokens=max_tokens, temperature=temperature, seed=seed))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _detot_load(engine: Any, questions: list[str], worked: list[tuple[str, str]], *, concurrency: int, rounds: int,
                round_size: int, max_tokens: int, temperature: float) -> dict[str, Any]:
    latencies: list[float] = []
    tokens = [0]

    def problem(i: int, question: str) -> None:
        request = _request(question, worked, max_tokens=max_tokens, temperature=temperature, seed=1000 + i)
        for r in range(rounds):
            start = time.perf_counter()
            samples = engine.sample(request, round_size, greedy=1 if r == 0 else 0)
            latencies.append(time.perf_counter() - start)
            tokens[0] += sum(s.output_tokens for s in samples)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(problem, range(len(questions)), questions))
    wall = time.perf_counter() - start
    return {"output_tokens": tokens[0], "seconds": wall, "tok_s": tokens[0] / wall if wall else 0.0,
            "rounds": len(latencies), "p50_round_s": _percentile(latencies, 0.5),
            "p99_round_s": _percentile(latencies, 0.99)}


def _single_load(engine: Any, questions: list[str], *, max_tokens: int) -> dict[str, Any]:
    latencies = []
    tokens = 0
    for question in questions:
        start = time.perf_counter()
        out = engine.sample(_request(question, [], max_tokens=max_tokens, temperature=0.0, seed=None), 1)
        latencies.append(time.perf_counter() - start)
        tokens += out[0].output_tokens
    total = sum(latencies)
    return {"requests": len(questions), "output_tokens": tokens, "tok_s": tokens / total if total else 0.0,
            "p50_s": _percentile(latencies, 0.5), "p99_s": _percentile(latencies, 0.99),
            "mean_s": statistics.fmean(latencies) if latencies else 0.0}


def run_serve_bench(*, model: str | None, data: Path, schedulers: tuple[str, ...] | list[str] = SCHEDULERS,
                    problems: int = 8, concurrency: int = 4, rounds: int = 3, round_size: int = 2, demos: int = 3,
                    single: int = 8, max_tokens: int = 96, temperature: float = 0.5, max_batch_size: int = 16,
                    prefix_cache: int = 8, engine_kind: str = "llamacpp", device: str = "auto") -> dict[str, Any]:
    """Both loads through each scheduler; returns the figures (see the module docstring)."""
    from detot_agent.engines.llamacpp_engine import LlamaCppEngine
    from detot_agent.engines.models import resolve_model_source
    from detot_agent.engines.torch_engine import LocalEngine

    worked, questions = _problems(data, problems + single, demos)
    detot_questions, single_questions = questions[:problems], questions[problems:]
    out: dict[str, Any] = {"model": resolve_model_source(model).name, "cpus": len(os.sched_getaffinity(0)),
                           "problems": problems, "concurrency": concurrency, "rounds": rounds,
                           "round_size": round_size, "demos": demos, "max_tokens": max_tokens,
                           "temperature": temperature, "max_batch_size": max_batch_size,
                           "prefix_cache": prefix_cache, "engine": engine_kind, "schedulers": {}}
    for name in schedulers:
        engine = (LlamaCppEngine(model, scheduler=name, max_batch_size=max_batch_size, prefix_cache=prefix_cache)
                  if engine_kind == "llamacpp" else
                  LocalEngine(model, scheduler=name, max_batch_size=max_batch_size, prefix_cache=prefix_cache,
                              device=device))
        out["device"] = engine.device
        try:
            out["prompt_tokens"] = len(engine.render(_request(detot_questions[0], worked, max_tokens=1,
                                                              temperature=0.0, seed=None)))
            engine.sample(_request("What is 2 + 3?", [], max_tokens=4, temperature=0.0, seed=None), 1)  # warm-up
            before = engine.prompt_tokens_decoded
            row: dict[str, Any] = {"detot": _detot_load(
                engine, detot_questions, worked, concurrency=concurrency, rounds=rounds, round_size=round_size,
                max_tokens=max_tokens, temperature=temperature)}
            row["detot"]["prompt_tokens_prefilled"] = engine.prompt_tokens_decoded - before
            row["single"] = _single_load(engine, single_questions, max_tokens=max_tokens)
            row["stats"] = engine.batch_stats
            row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        finally:
            engine.close()
        out["schedulers"][name] = row
    rows = out["schedulers"]
    if {"static", "continuous"} <= set(rows):
        static, cont = rows["static"], rows["continuous"]
        out["speedup_detot_tok_s"] = cont["detot"]["tok_s"] / max(static["detot"]["tok_s"], 1e-9)
        out["single_p99_ratio"] = cont["single"]["p99_s"] / max(static["single"]["p99_s"], 1e-9)
    return out
