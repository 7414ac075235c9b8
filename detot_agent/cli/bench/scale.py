"""`detot bench scale`: problems per second, local executor against Ray with 1..N workers.

All runs answer the same synthetic arithmetic problems with the same method and budgets, through
`run_eval` into a scratch run folder (so the figures include writing the JSONL). By default the model
is the tiny random one from `detot_agent.testing` (its answers are noise; this measures plumbing
and scheduling, not accuracy). Every engine replica, local or in a Ray worker, runs one torch
thread: the tiny model gains nothing from more, and intra-op threads of two processes spinning on
the same cores would measure contention rather than scale-out. So the 1-worker Ray row against the
local row is the price of Ray per problem (task submission, argument and result serialisation, the
driver loop), and the N-worker rows show what N replicas buy. Start-up (Ray itself, and each actor
loading its model) is reported apart from the run.

Example:
    >>> from detot_agent.cli.bench.scale import run_scale_bench
    >>> result = run_scale_bench(workers=[1, 2], problems=24)  # doctest: +SKIP
    >>> result["rows"][0]["executor"]  # doctest: +SKIP
    'local'
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import dspy

from detot_agent.evaluation.runner import run_eval
from detot_agent.evaluation.spec import ContextSpec, build_context

__all__ = ["run_scale_bench", "synthetic_problems"]


def synthetic_problems(count: int, *, seed: int = 0) -> list[dspy.Example]:
    """`count` one-step addition problems with gold answers."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        out.append(dspy.Example(id=f"synthetic:{i}", question=f"Sam has {a} marbles and finds {b} more. "
                                f"How many marbles does Sam have now?", answer=str(a + b)).with_inputs("question"))
    return out


def _timed_run(examples: list[dspy.Example], method: str, out: Path, *, ctx: Any = None, executor: Any = None,
               threads: int) -> float:
    run = {"suite": "synthetic", "source": "synthetic", "model": "bench", "seed": 0, "limit": len(examples)}
    start = time.perf_counter()
    run_eval(examples, [method], ctx, out, run=run, threads=threads, progress=False, executor=executor)
    return time.perf_counter() - start


def run_scale_bench(*, workers: list[int], problems: int = 24, threads: int = 4, max_tokens: int = 24,
                    model: str | None = None, method: str = "dspy_cot", cpus: int | None = None
                    ) -> dict[str, Any]:
    """Time the local executor and Ray with each worker count in `workers`; returns rows of figures."""
    import logging

    import ray
    import torch

    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)  # truncated answers are expected here
    cpus = cpus or os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="detot-bench-scale-"))
    if model is None:
        from detot_agent.testing import build_tiny_model

        model = str(build_tiny_model(scratch / "tiny", context=2048))
    spec = ContextSpec(model=model, device="cpu", dtype="float32", max_tokens=max_tokens, temperature=0.0,
                       max_batch_size=max(threads, 1), max_wait_ms=10)
    examples = synthetic_problems(problems)
    rows: list[dict[str, Any]] = []

    torch.set_num_threads(1)
    start = time.perf_counter()
    ctx = build_context(spec)
    load_s = time.perf_counter() - start
    _timed_run(examples[: min(4, problems)], method, scratch / "warm", ctx=ctx, threads=threads)  # warm-up
    run_s = _timed_run(examples, method, scratch / "local", ctx=ctx, threads=threads)
    rows.append({"executor": "local", "workers": 1, "cpus_per_worker": 1, "startup_s": load_s, "run_s": run_s,
                 "problems_per_s": problems / run_s})
    ctx.lm.engine.close()

    start = time.perf_counter()
    own_ray = not ray.is_initialized()  # else: measure on the Ray instance this process already joined
    if own_ray:
        ray.init(num_cpus=max([cpus, *workers]), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
                                           if k in os.environ}})
    ray_init_s = time.perf_counter() - start
    from detot_agent.evaluation.distributed import RayExecutor

    try:
        for w in workers:
            per = 1
            executor = RayExecutor(spec, workers=w, threads=threads, worker_cpus=per)
            start = time.perf_counter()
            executor.start()
            startup_s = time.perf_counter() - start
            try:
                _timed_run(examples[: min(4, problems)], method, scratch / f"warm-ray-{w}", executor=executor,
                           threads=threads)
                run_s = _timed_run(examples, method, scratch / f"ray-{w}", executor=executor, threads=threads)
            finally:
                executor.close()
            rows.append({"executor": "ray", "workers": w, "cpus_per_worker": per, "startup_s": startup_s,
                         "run_s": run_s, "problems_per_s": problems / run_s})
    finally:
        if own_ray:
            ray.shutdown()
    local = rows[0]
    one = next((r for r in rows if r["executor"] == "ray" and r["workers"] == 1), None)
    for r in rows:
        r["speedup_vs_local"] = r["problems_per_s"] / local["problems_per_s"]
    return {
        "model": "tiny random Llama (detot_agent.testing)" if spec.model and "detot-bench-scale-" in spec.model
        else spec.model,
        "method": method, "problems": problems, "threads_per_worker": threads, "max_tokens": max_tokens,
        "cpus": cpus, "ray_init_s": ray_init_s, "rows": rows,
        "ray_overhead_ms_per_problem": None if one is None else 1000 * (one["run_s"] - local["run_s"]) / problems,
    }
