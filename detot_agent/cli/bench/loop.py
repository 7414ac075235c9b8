"""`detot bench loop`: request latency while a re-optimization runs, against none running.

One DETOT program (plain prompts, a GSM8K-train exemplar index, the loop's default budget) answers
synthetic arithmetic questions one after another, as a single user would send them; every phase asks the same
`requests` questions in the same order (their answer lengths differ, so phases of different questions would not
compare). Phase 1 (quiet):
no re-optimization. Phase 2 (busy): a re-optimization is started in the background (training the
task embedding on the evidence phase 1 left, then judging it by replay) and restarted whenever one
finishes, so every request of phase 2 is served while one runs. Phase 3 (shadow, with `judging="shadow"`): once
the re-optimization has ended and its candidate's shadow trial runs, as many requests again, each also answered
by the candidate in the background until the sequential test decides (`shadowed_requests` counts those served
while the trial still ran). Reported: p50 and p99 latency of each
phase, their ratio, and the re-optimizations' own times and waits. Serving first: the trainer starts each step
only in a lull (no serving request for `QUIET_S`), a step that has started pauses at each layer boundary while a
request is in flight, and a step waits `yield_to_serving` seconds in all, so a trainer beside a client that never
pauses still advances (`ServingLoad.preempting`); the replays and shadow answers are background rows the
llama.cpp scheduler admits only when no serving row waits.

Example:
    >>> from detot_agent.cli.bench.loop import run_loop_bench
    >>> result = run_loop_bench(requests=8)  # doctest: +SKIP
    >>> sorted(result["phases"])  # doctest: +SKIP
    ['busy', 'quiet']
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_loop_bench"]


def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"n": len(values), "p50_s": float(np.percentile(arr, 50)), "p99_s": float(np.percentile(arr, 99)),
            "mean_s": float(arr.mean())}


def run_loop_bench(*, model: str | None = None, engine: str = "auto", requests: int = 24, max_tokens: int = 48,
                   train: Path | None = None, index_size: int = 300, max_seconds: float = 120.0,
                   yield_to_serving: float = 30.0, judging: str = "replay", think: float = 0.0,
                   shadow_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Serve `requests` questions quiet, then `requests` while re-optimizations run; returns the figures.

    `yield_to_serving`: what each training step waits for serving in all (`UpdateConfig`; 0: none). `judging`:
    `replay` or `shadow` (the candidate also answers every request in the background until the sequential test
    decides). `think`: seconds between an answer and the next request, in both phases (0: back to back).
    `shadow_settings`: more `ShadowConfig` settings (e.g. `{"background": False, "when_full": "wait"}`; the share
    is always 1)."""
    import dspy

    from detot_agent.answers import AnswerFormat
    from detot_agent.cli.bench.scale import synthetic_problems
    from detot_agent.detot.adapters import PlainAdapter
    from detot_agent.detot.controller import ControllerConfig
    from detot_agent.detot.module import DETOT
    from detot_agent.detot.task import TaskKind, TaskProfile, analyze
    from detot_agent.embedding.update import UpdateConfig
    from detot_agent.engines.lm import local_lm
    from detot_agent.io.datafiles import read_exemplars
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.retrieval.index import ExemplarIndex

    lm = local_lm(model, engine=engine, cache=False)
    index = ExemplarIndex(Encoder())
    if train is not None:
        index.add(read_exemplars(train, fmt="gsm8k")[:index_size])
    else:
        index.add([{"id": f"ex:{i}", "text": p.question, "fields": {"question": p.question, "answer": p.answer,
                                                                       "rationale": f"The answer is {p.answer}."}}
                   for i, p in enumerate(synthetic_problems(index_size, seed=99))])
    task = TaskProfile(name="arith", description="Solve arithmetic word problems step by step.",
                       kind=TaskKind.ARITHMETIC, answer_format=AnswerFormat.NUMBER)
    adj = analyze(task, max_samples=3, min_samples=2, max_tokens=max_tokens, k_exemplars=2, cooldown=10_000)
    config = ControllerConfig.model_validate({
        "min_evidence": 6, "max_seconds": max_seconds, "replay_items": 6, "judging": judging,
        "shadow": {**(shadow_settings or {}), "share": 1.0},
        "update": UpdateConfig(steps=10, retrieval_steps=40, yield_to_serving=yield_to_serving)})
    program = DETOT("question -> answer", task=task, index=index, lm=lm, adjustments=adj, background=False,
                    controller_config=config, adapter=PlainAdapter())
    questions = synthetic_problems(requests + 1, seed=1)  # the same questions in every phase: paired latencies
    program(question=questions[-1].question)  # warm-up (first prefill, caches)

    work: dict[str, list[tuple[int, int]]] = {"quiet": [], "busy": [], "shadow": []}

    def serve(batch: list[dspy.Example], busy: bool, phase: str) -> list[float]:
        out = []
        for ex in batch:
            if busy:
                program.controller.submit()  # no-op while one runs
            start = time.perf_counter()
            pred = program(question=ex.question)
            program.feedback(pred, gold=ex.answer)
            out.append(time.perf_counter() - start)
            work[phase].append((int(pred.samples_used), int(pred.tokens)))  # what the request cost: paired work
            time.sleep(think)
        return out

    quiet = serve(questions[:requests], busy=False, phase="quiet")
    t0 = time.perf_counter()
    busy = serve(questions[:requests], busy=True, phase="busy")
    busy_wall = time.perf_counter() - t0
    program.controller.wait()
    judge = program.controller.shadow
    shadow: list[float] = []
    shadowed = shadow_answered = 0
    if judge is not None and judge.trial is not None:  # phase 3: served while the candidate answers in shadow
        trial = judge.trial
        answered = trial.answered
        for ex in questions[:requests]:
            shadowed += judge.trial is not None
            shadow += serve([ex], busy=False, phase="shadow")
        shadow_answered = trial.answered - answered  # shadow answers finished while the phase was served
    program.controller.close()
    events = [e for e in program.monitor.events if e.get("event") == "reoptimization"]
    phases = {"quiet": _percentiles(quiet), "busy": _percentiles(busy)}
    if shadow:
        phases["shadow"] = _percentiles(shadow)
    return {
        "model": lm.engine.name, "engine": type(lm.engine).__name__, "requests": requests, "max_tokens": max_tokens,
        "phases": phases, "latencies_s": {name: [round(x, 3) for x in xs] for name, xs in
                                          (("quiet", quiet), ("busy", busy), ("shadow", shadow)) if xs},
        "shadow_p99_ratio": phases["shadow"]["p99_s"] / phases["quiet"]["p99_s"] if shadow else None,
        "work": {name: [list(w) for w in ws] for name, ws in work.items() if ws},  # (samples, tokens) a request
        "shadowed_requests": shadowed, "shadow_answered_in_phase": shadow_answered,
        "engine_stats": {k: v for k, v in getattr(lm.engine, "batch_stats", {}).items()
                         if k in ("held", "beside", "chunked", "batches", "prefix_hits", "prefix_misses",
                                   "prefix_partial_hits")},
        "p99_ratio": phases["busy"]["p99_s"] / phases["quiet"]["p99_s"],
        "p50_ratio": phases["busy"]["p50_s"] / phases["quiet"]["p50_s"],
        "reoptimizations": [{"seconds": e.get("seconds"), "accepted": e.get("accepted"), "reason": e.get("reason"),
                             "training": e.get("training"), "error": e.get("error")} for e in events],
        "busy_share": min(1.0, sum(float(e.get("seconds") or 0) for e in events) / busy_wall) if busy_wall else 0.0,
        "max_seconds": max_seconds, "yield_to_serving": yield_to_serving, "judging": judging, "think_s": think,
        "background_share": {"engine": getattr(getattr(lm.engine, "config", None), "background_share", None),
                             "training": config.update.background_share},
        "shadow_config": None if program.controller.shadow is None else  # what the judge ran with
        program.controller.shadow.config.model_dump(mode="json", include={"share", "workers", "background",
                                                                          "max_pending", "when_full"}),
        "decisions": [{"change": e.get("change"), "accepted": e.get("accepted"), "reason": e.get("reason")}
                      for e in events if "shadow" in str(e.get("change"))],
    }
