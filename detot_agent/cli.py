"""The `detot` command line.

Example:
    $ detot --help
    $ detot generate "What is 2+3?" --n 4 --temperature 0.8
    $ detot demo
    $ detot bench engine --n 8 --json evals/results/bench_engine.json
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from detot_agent.errors import DetotError

app = typer.Typer(help="DETOT: task-adapted prompting for DSPy on local models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="HF folder, .gguf file or hub id; default: embedded SmolLM2-135M.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: ModelOpt = None,
    n: Annotated[int, typer.Option(help="Number of completions (one shared prefill).")] = 1,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    max_tokens: Annotated[int, typer.Option(help="New tokens per completion.")] = 128,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Print completions of PROMPT with their token counts."""
    from dspy.lm15 import Config, Message, Request

    from detot_agent.engine import LocalEngine

    engine = LocalEngine(model, device=device, dtype=dtype)
    request = Request(model=engine.name, messages=(Message.user(prompt),),
                      config=Config(max_tokens=max_tokens, temperature=temperature, seed=seed))
    start = time.perf_counter()
    samples = engine.sample(request, n)
    elapsed = time.perf_counter() - start
    for i, s in enumerate(samples):
        console.rule(f"[bold]#{i + 1}[/] {s.output_tokens} tokens, logprob {s.logprob:.2f}, {s.finish_reason}")
        console.print(s.text, markup=False, highlight=False)
    total = sum(s.output_tokens for s in samples)
    console.print(f"[dim]{total} tokens in {elapsed:.2f}s ({total / max(elapsed, 1e-9):.1f} tok/s)[/]")


DEMO_QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have now?", "7"),
    ("A box holds 6 eggs. How many eggs are in 5 boxes?", "30"),
    ("Lisa had 10 candies and ate 3 of them. How many candies are left?", "7"),
]
DEMO_DEMOS = [
    ("Sam has 2 pens and gets 5 more. How many pens does he have?",
     "Sam starts with 2 pens and gets 5 more, so 2 + 5 = 7.", "7"),
    ("Each bag has 4 apples. How many apples are in 3 bags?",
     "There are 3 bags with 4 apples each, so 3 * 4 = 12.", "12"),
]


@app.command()
def demo(
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option(help="New tokens per answer.")] = 160,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Answer a few arithmetic questions with dspy.ChainOfThought on the local model."""
    import dspy

    from detot_agent.adapters import LenientChatAdapter
    from detot_agent.engine import local_lm

    start = time.perf_counter()
    lm = local_lm(model, device=device, dtype=dtype, max_tokens=max_tokens, cache=False)
    console.print(f"loaded [bold]{lm.model}[/] on {lm.engine.model.device} in {time.perf_counter() - start:.1f}s")
    program = dspy.ChainOfThought("question -> answer")
    program.predict.demos = [dspy.Example(question=q, reasoning=r, answer=a) for q, r, a in DEMO_DEMOS]
    table = Table(title="dspy.ChainOfThought on the local engine")
    for col in ("question", "answer", "expected", "seconds", "tokens"):
        table.add_column(col)
    correct = 0
    with dspy.context(lm=lm, adapter=LenientChatAdapter()):
        for question, expected in DEMO_QUESTIONS:
            t0 = time.perf_counter()
            try:
                answer = str(program(question=question).answer).strip()
            except Exception as exc:  # a small model may still produce no parseable answer
                answer = f"(unparseable: {type(exc).__name__})"
            seconds = time.perf_counter() - t0
            tokens = lm.history[-1]["usage"].get("completion_tokens", 0) if lm.history else 0
            numbers = re.findall(r"-?\d+(?:\.\d+)?", answer.replace(",", ""))
            correct += bool(numbers) and numbers[-1] == expected
            table.add_row(question, answer, expected, f"{seconds:.1f}", str(tokens))
    console.print(table)
    console.print(f"{correct}/{len(DEMO_QUESTIONS)} correct; total {time.perf_counter() - start:.1f}s")


@bench_app.command("engine")
def bench_engine(
    model: ModelOpt = None,
    n: Annotated[int, typer.Option(help="Samples per prompt / concurrent requests.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="New tokens per sample.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """DSPy fan-out vs one batched sample(n) vs dynamic batching of concurrent calls."""
    from detot_agent.bench.engine import run_engine_bench

    result = run_engine_bench(model=model, n=n, max_tokens=max_tokens, temperature=temperature, dtype=dtype,
                              device=device)
    table = Table(title=f"engine: {result['model']} ({result['device']}, {result['dtype']}), n={n}, "
                        f"max_tokens={max_tokens}, prompt {result['prompt_tokens']} tokens")
    table.add_column("path")
    table.add_column("tokens", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("tok/s", justify="right")
    for key, label in [("sequential", "(a) DSPy n=8 fan-out (sequential)"), ("batched", "(b) sample(n), one prefill"),
                       ("concurrent_batched", "(c) 8 threads, dynamic batching"),
                       ("concurrent_unbatched", "(d) 8 threads, no batching")]:
        table.add_row(label, str(result["tokens"][key]), f"{result['seconds'][key]:.2f}",
                      f"{result[key + '_tok_s']:.1f}")
    console.print(table)
    console.print(f"batched / sequential: [bold]{result['batched_over_sequential']:.2f}x[/]   "
                  f"concurrent batched / unbatched: [bold]{result['concurrent_batched_over_unbatched']:.2f}x[/]")
    if json_path:
        write_json_atomic(json_path, result)
        console.print(f"wrote {json_path}")


def main() -> None:
    """Entry point: run the app, turning the library's own errors into one readable line."""
    try:
        app()
    except DetotError as exc:
        console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise SystemExit(2) from None
