"""`detot bench ...`: the benchmarks' commands (each prints a table and writes JSON; the measuring code is in
`cli/bench/`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from detot_agent.cli.common import DeviceOpt, DtypeOpt, ModelOpt, console, default_gsm8k, write_json_atomic
from detot_agent.errors import ConfigError

__all__ = ["bench_app"]

bench_app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True)


def _write(json_path: Path | None, result: dict[str, Any]) -> None:
    """Write a benchmark's figures to `--json`, when given, and say so."""
    if json_path:
        write_json_atomic(json_path, result)
        console.print(f"wrote {json_path}")


@bench_app.command("engine")
def bench_engine(
    model: ModelOpt = None,
    engine: Annotated[str, typer.Option(help="Engines to compare, comma-separated: torch, llamacpp.")] = "torch",
    n: Annotated[int, typer.Option(help="Samples per prompt / concurrent requests.", min=1)] = 6,
    max_tokens: Annotated[int, typer.Option(help="New tokens per sample.", min=1)] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.", min=0.0)] = 0.7,
    soft_prompt_k: Annotated[int, typer.Option(help="Soft-prompt vectors on every request (0: none).", min=0)] = 8,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Engines side by side: single stream, DSPy fan-out, one batched sample(n), n concurrent calls."""
    from detot_agent.cli.bench.engine import PATHS, run_engine_bench
    from detot_agent.engines.lm import ENGINES

    kinds = [k.strip() for k in engine.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ENGINES or k == "auto"]
    if not kinds or bad:
        raise ConfigError(f"--engine takes torch and/or llamacpp, comma-separated; got {engine!r}")
    result = run_engine_bench(model=model, engines=kinds, n=n, max_tokens=max_tokens, temperature=temperature,
                              dtype=dtype, device=device, soft_prompt_k=soft_prompt_k)
    table = Table(title=f"engines on {result['model']}: n={n}, max_tokens={max_tokens}, prompt "
                        f"{result['prompt_tokens']} tokens, soft prompt k={soft_prompt_k}, {result['cpus']} CPUs")
    table.add_column("engine")
    table.add_column("path")
    table.add_column("tokens", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("tok/s", justify="right")
    for kind, row in result["engines"].items():
        for path, label in PATHS.items():
            table.add_row(f"{kind} ({row['dtype']})", label, str(row["tokens"][path]), f"{row['seconds'][path]:.2f}",
                          f"{row[path + '_tok_s']:.1f}")
    ref = result.get("reference")
    if ref:
        table.add_row("llama-cpp-python Llama", "(a) single stream, no soft prompt", str(ref["tokens"]),
                      f"{ref['seconds']:.2f}", f"{ref['single_tok_s']:.1f}")
    console.print(table)
    for name, value in result["ratios"].items():
        console.print(f"{name}: [bold]{value:.2f}x[/]")
    _write(json_path, result)


@bench_app.command("buffers")
def bench_buffers(
    model: ModelOpt = None,
    settings: Annotated[str, typer.Option(help="Extra-buffer settings to measure, comma-separated: on, off, "
                                               "auto (each in a child process; a crash is reported).")] = "on,off",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for the prefill figure.", min=1)] = 512,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per sequence.", min=1)] = 64,
    n: Annotated[int, typer.Option(help="Sequences of the batched decode figure.", min=1)] = 6,
    repeats: Annotated[int, typer.Option(help="Timed runs per figure (the median is kept).", min=1)] = 3,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
) -> None:
    """llama.cpp with and without its extra buffer types (repacking, AMX): prefill and decode tok/s."""
    from detot_agent.cli.bench.buffers import PHASES, run_buffers_bench

    wanted = [s.strip() for s in settings.split(",") if s.strip()]
    result = run_buffers_bench(model=model, settings=wanted, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                               n=n, repeats=repeats)
    amx = ", ".join(result["amx_flags"]) or "no AMX flags"
    table = Table(title=f"llama.cpp extra buffers on {result['model']}: {result['cpu']} ({amx}), "
                        f"{result['cpus']} CPUs; prompt {prompt_tokens}, {new_tokens} new tokens, n={n}")
    table.add_column("setting")
    table.add_column("extra buffers")
    for label in PHASES.values():
        table.add_column(f"{label} tok/s", justify="right")
    for setting, row in result["settings"].items():
        if "crashed" in row:
            table.add_row(setting, f"[red]crashed ({row['crashed']})[/]", *["-"] * len(PHASES))
            continue
        table.add_row(setting, "on" if row["enabled"] else "off",
                      *[f"{row[p + '_tok_s']:.1f}" for p in PHASES])
    console.print(table)
    for phase, ratio in result.get("off_over_on", {}).items():
        console.print(f"off / on, {PHASES[phase]}: [bold]{ratio:.2f}x[/]")
    _write(json_path, result)


@bench_app.command("retrieval")
def bench_retrieval(
    sizes: Annotated[str, typer.Option(help="Comma-separated index sizes.")] = "10000,100000,1000000",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    train: Annotated[Path | None, typer.Option(help="GSM8K train JSONL (calibration corpus).")] = None,
    test: Annotated[Path | None, typer.Option(help="GSM8K test JSONL (calibration queries).")] = None,
    queries: Annotated[int, typer.Option(help="Queries per size.")] = 1000,
    baseline_queries: Annotated[int, typer.Option(help="Queries for the slow baselines.")] = 50,
    dspy_baseline: Annotated[bool, typer.Option(help="Also time dspy.retrievers.Embeddings.")] = True,
) -> None:
    """ExemplarIndex vs numpy brute force vs dspy.retrievers.Embeddings on calibrated synthetic vectors."""
    from detot_agent.cli.bench.retrieval import run_retrieval_bench

    size_list = [int(s) for s in sizes.split(",") if s.strip()]
    result = run_retrieval_bench(size_list, train=train or default_gsm8k("train.jsonl"),
                                 test=test or default_gsm8k("test.jsonl"), queries=queries,
                                 baseline_queries=baseline_queries, with_dspy=dspy_baseline)
    cal = next(iter(result.values()))["calibration"]
    table = Table(title=f"retrieval, 384 dims; calibration: real MiniLM GSM8K median top-1 "
                        f"{cal['real_median_top1']:.3f}, synthetic {cal['synthetic_median_top1_at_reference']:.3f}")
    cols = ["size", "index", "build s", "mem MB", "p50 ms", "p99 ms", "batch q/s", "recall@10",
            "numpy p50 ms", "speed-up", "dspy Embeddings p50 ms (direct)"]
    for col in cols:
        table.add_column(col, justify="right")
    for size, r in result.items():
        dspy_cell = (f"{r['baseline_dspy_embeddings_p50_ms']:.1f} ({r['baseline_dspy_embeddings_direct_p50_ms']:.2f})"
                     if "baseline_dspy_embeddings_p50_ms" in r else "-")
        table.add_row(f"{int(size):,}", f"{r['index_type']} (nprobe {r['nprobe']})" if r["nprobe"] else r["index_type"],
                      f"{r['build_s']:.1f}", f"{r['memory_mb']:.0f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                      f"{r['batch_qps']:.0f}", f"{r['recall_at_10']:.3f}", f"{r['baseline_numpy_p50_ms']:.2f}",
                      f"{r['speedup_vs_numpy_p50']:.0f}x", dspy_cell)
    console.print(table)
    _write(json_path, result)


@bench_app.command("scale")
def bench_scale(
    workers: Annotated[str, typer.Option(help="Comma-separated Ray worker counts.")] = "1,2",
    problems: Annotated[int, typer.Option(help="Synthetic problems per run.")] = 200,
    threads: Annotated[int, typer.Option(help="Problems in flight per worker (and locally).", min=1)] = 4,
    max_tokens: Annotated[int, typer.Option(help="New tokens per answer.", min=1)] = 24,
    model: ModelOpt = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
) -> None:
    """Problems per second: the local executor against Ray with each worker count (tiny model by default)."""
    from detot_agent.cli.bench.scale import run_scale_bench

    counts = [int(w) for w in workers.split(",") if w.strip()]
    if not counts or min(counts) < 1:
        raise ConfigError(f"--workers needs positive counts, got {workers!r}")
    result = run_scale_bench(workers=counts, problems=problems, threads=threads, max_tokens=max_tokens,
                             model=model)
    table = Table(title=f"scale-out: {result['problems']} problems, {result['method']}, {result['max_tokens']} "
                        f"tokens, {result['cpus']} CPUs, model {result['model']}")
    for col in ("executor", "workers", "CPUs/worker", "start-up s", "run s", "problems/s", "vs local"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(r["executor"], str(r["workers"]), str(r["cpus_per_worker"]), f"{r['startup_s']:.1f}",
                      f"{r['run_s']:.2f}", f"{r['problems_per_s']:.2f}", f"{r['speedup_vs_local']:.2f}x")
    console.print(table)
    overhead = result["ray_overhead_ms_per_problem"]
    console.print(f"Ray start-up {result['ray_init_s']:.1f} s; Ray overhead per problem (1 worker vs local): "
                  + ("n/a" if overhead is None else f"{overhead:.0f} ms"))
    _write(json_path, result)


@bench_app.command("loop")
def bench_loop(
    model: ModelOpt = None,
    engine: Annotated[str, typer.Option(help="auto, torch or llamacpp.")] = "auto",
    requests: Annotated[int, typer.Option(help="Requests per phase (quiet, then busy).", min=1)] = 24,
    max_tokens: Annotated[int, typer.Option(help="New tokens per sample.", min=1)] = 48,
    train: Annotated[Path | None, typer.Option(help="GSM8K train JSONL for the exemplar index (default: "
                                                    "synthetic exemplars).")] = None,
    max_seconds: Annotated[float, typer.Option(help="Budget of one re-optimization.")] = 120.0,
    yield_to_serving: Annotated[float, typer.Option(help="Seconds each training step waits for serving in "
                                                         "all (0: never).", min=0.0, max=60.0)] = 30.0,
    judging: Annotated[str, typer.Option(help="replay, or shadow (the candidate answers every request in the "
                                              "background until the sequential test decides).")] = "replay",
    think: Annotated[float, typer.Option(help="Seconds between an answer and the next request (both phases).",
                                         min=0.0)] = 0.0,
    shadow: Annotated[list[str] | None, typer.Option(
        "--shadow", metavar="SETTING=VALUE", help="With --judging shadow: another ShadowConfig setting (repeatable), "
        "e.g. background=false, when_full=wait (what full shadow coverage costs the served requests).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
) -> None:
    """Request latency (p50/p99) while a re-optimization runs, against none running."""
    from detot_agent.cli.bench.loop import run_loop_bench
    from detot_agent.cli.eval import _shadow_settings

    if requests < 2 or max_tokens < 1 or not max_seconds > 0:
        raise ConfigError(f"--requests must be >= 2, --max-tokens >= 1, --max-seconds > 0 "
                          f"(got {requests}, {max_tokens}, {max_seconds})")
    if judging not in ("replay", "shadow"):
        raise ConfigError(f"--judging must be replay or shadow, got {judging!r}")
    settings = _shadow_settings(shadow or [], judging)  # validated before the model loads
    result = run_loop_bench(model=model, engine=engine, requests=requests, max_tokens=max_tokens, train=train,
                            max_seconds=max_seconds, yield_to_serving=yield_to_serving, judging=judging, think=think,
                            shadow_settings=settings)
    table = Table(title=f"loop: {requests} requests per phase, model {result['model']} ({result['engine']}), "
                        f"{os.cpu_count()} CPUs")
    for col in ("phase", "requests", "p50 s", "p99 s", "mean s"):
        table.add_column(col, justify="right")
    for name, ph in result["phases"].items():
        table.add_row(name, str(ph["n"]), f"{ph['p50_s']:.2f}", f"{ph['p99_s']:.2f}", f"{ph['mean_s']:.2f}")
    console.print(table)
    reopts = result["reoptimizations"]
    console.print(f"p99 busy/quiet {result['p99_ratio']:.2f}x (goal <= 1.20x), p50 {result['p50_ratio']:.2f}x; "
                  f"{len(reopts)} re-optimization(s) ran during the busy phase "
                  f"({result['busy_share']:.0%} of it), " + ", ".join(f"{r['seconds']:.0f}s" for r in reopts))
    if result["shadow_p99_ratio"] is not None:
        console.print(f"p99 shadow/quiet {result['shadow_p99_ratio']:.2f}x (goal <= 1.20x): "
                      f"{result['shadowed_requests']} of {requests} requests shadowed, "
                      f"{result['shadow_answered_in_phase']} shadow answers finished during the phase")
    _write(json_path, result)


@bench_app.command("serve")
def bench_serve(
    model: ModelOpt = None,
    data: Annotated[Path | None, typer.Option(help="GSM8K JSONL for questions and demos (default: GSM8K "
                                                   "train).")] = None,
    schedulers: Annotated[str, typer.Option(help="Schedulers, comma-separated: static, "
                                                 "continuous.")] = "static,continuous",
    engine: Annotated[str, typer.Option(help="llamacpp or torch.")] = "llamacpp",
    device: DeviceOpt = "auto",
    problems: Annotated[int, typer.Option(help="DETOT-shaped problems.", min=1)] = 8,
    concurrency: Annotated[int, typer.Option(help="Problems in flight.", min=1)] = 4,
    rounds: Annotated[int, typer.Option(help="Voting rounds per problem (the same prompt).", min=1)] = 3,
    round_size: Annotated[int, typer.Option(help="Samples per round.", min=1)] = 2,
    demos: Annotated[int, typer.Option(help="Worked answers in front of each question.", min=0)] = 3,
    single: Annotated[int, typer.Option(help="Plain single requests, one after another.", min=1)] = 8,
    max_tokens: Annotated[int, typer.Option(help="New tokens per sample.", min=1)] = 96,
    prefix_cache: Annotated[int, typer.Option(help="Prompts the continuous scheduler keeps.", min=0)] = 8,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
) -> None:
    """A local engine's static and continuous schedulers under a DETOT-shaped load and a single-request load."""
    from detot_agent.cli.bench.serve import SCHEDULERS, run_serve_bench

    wanted = [s.strip() for s in schedulers.split(",") if s.strip()]
    if not wanted or any(s not in SCHEDULERS for s in wanted):
        raise ConfigError(f"--schedulers takes static and/or continuous, comma-separated; got {schedulers!r}")
    if engine not in ("llamacpp", "torch"):
        raise ConfigError(f"--engine takes llamacpp or torch; got {engine!r}")
    result = run_serve_bench(model=model, data=data or default_gsm8k("train.jsonl"), schedulers=wanted,
                             problems=problems, concurrency=concurrency, rounds=rounds, round_size=round_size,
                             demos=demos, single=single, max_tokens=max_tokens, prefix_cache=prefix_cache,
                             engine_kind=engine, device=device)
    table = Table(title=f"serving {result['model']} on {result['device']}: {problems} problems x {rounds} rounds "
                        f"of {round_size}, "
                        f"{concurrency} in flight, {demos} demos ({result['prompt_tokens']}-token prompts), "
                        f"{result['cpus']} CPUs")
    for col in ("scheduler", "DETOT-shaped tok/s", "round p50 s", "round p99 s", "prompt tokens prefilled",
                "prefix hit rate", "single p50 s", "single p99 s", "peak RSS MB"):
        table.add_column(col, justify="left" if col == "scheduler" else "right")
    for name, row in result["schedulers"].items():
        d, s = row["detot"], row["single"]
        table.add_row(name, f"{d['tok_s']:.1f}", f"{d['p50_round_s']:.2f}", f"{d['p99_round_s']:.2f}",
                      str(d["prompt_tokens_prefilled"]), f"{row['stats'].get('prefix_hit_rate', 0.0):.2f}",
                      f"{s['p50_s']:.2f}", f"{s['p99_s']:.2f}", f"{row['peak_rss_mb']:.0f}")
    console.print(table)
    if "speedup_detot_tok_s" in result:
        console.print(f"continuous / static: DETOT-shaped tok/s [bold]{result['speedup_detot_tok_s']:.2f}x[/], "
                      f"single-request p99 [bold]{result['single_p99_ratio']:.2f}x[/]")
    _write(json_path, result)
