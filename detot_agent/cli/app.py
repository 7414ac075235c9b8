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
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from detot_agent.cli.eval import eval_app
from detot_agent.errors import ConfigError, DetotError

app = typer.Typer(help="DETOT: task-adapted prompting for DSPy on local models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
index_app = typer.Typer(help="Build and search FAISS exemplar indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(eval_app, name="eval")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

# Third-party libraries' warnings (transformers, DSPy, LiteLLM, torch) are not the user's to act on: the one
# place that silences them for the command line. `detot --verbose ...` (or DETOT_VERBOSE=1) shows them.
_NOISY_LOGGERS = ("transformers", "dspy", "LiteLLM", "litellm", "httpx", "sentence_transformers", "accelerate")


def quiet_third_party(verbose: bool) -> None:
    """Silence other packages' warnings and info logs unless `verbose` (ours still show)."""
    import logging
    import os
    import warnings

    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars (our own progress still shows)
    import sys

    if "huggingface_hub" in sys.modules:  # already imported (the switch above is read at import): say it directly
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:  # it copied the switch when it was imported
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"(?!detot_agent)")  # a warning raised outside this package
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", help="Show other packages' warnings and "
                                                                     "logs too.")] = False) -> None:
    """DETOT: task-adapted prompting for DSPy on local models."""
    import os

    quiet_third_party(verbose or os.environ.get("DETOT_VERBOSE") == "1")

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="HF folder, .gguf file or hub id; default: embedded SmolLM2-135M.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` atomically (temp file, fsync, rename)."""
    from detot_agent.io.persist import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: ModelOpt = None,
    n: Annotated[int, typer.Option(help="Number of completions (one shared prefill).", min=1)] = 1,
    temperature: Annotated[float, typer.Option(help="0 is greedy.", min=0.0, max=2.0)] = 0.0,
    max_tokens: Annotated[int, typer.Option(help="New tokens per completion.", min=1)] = 128,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    engine_kind: Annotated[str, typer.Option("--engine", help="auto (llama.cpp for a .gguf file on the CPU when "
                                                              "installed, else torch), torch or llamacpp.")] = "auto",
) -> None:
    """Print completions of PROMPT with their token counts."""
    from dspy.lm15 import Config, Message, Request

    from detot_agent.engines.lm import build_engine

    engine = build_engine(model, engine=engine_kind, device=device, dtype=dtype)
    console.print(f"[dim]model {engine.name} on {engine.device}[/]")
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


@app.command()
def demo(
    model: ModelOpt = None,
    task: Annotated[str, typer.Option(help="arithmetic, sentiment, or auto: sentiment on the embedded model "
                                           "(it cannot add), arithmetic with --model.")] = "auto",
    max_tokens: Annotated[int | None, typer.Option(help="New tokens per sample [default: 160 for arithmetic, "
                                                        "48 for sentiment].", min=1)] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """DETOT end to end: retrieve demos, vote, monitor, then re-optimize (accept or roll back)."""
    from detot_agent.cli.demo import DEMO_TASKS, run_demo

    if task not in DEMO_TASKS:
        raise typer.BadParameter(f"must be one of {', '.join(DEMO_TASKS)}, got {task!r}", param_hint="--task")
    run_demo(model=model, task=task, device=device, dtype=dtype, max_tokens=max_tokens, say=console.print)


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
    if json_path:
        write_json_atomic(json_path, result)
        console.print(f"wrote {json_path}")


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
    if json_path:
        write_json_atomic(json_path, result)
        console.print(f"wrote {json_path}")


COT_SUFFIX = "\nLet's think step by step."


def _load_index(path: Path) -> Any:
    """An exemplar index folder with its own encoder (refused with the reason when it is not one)."""
    from detot_agent.io.persist import read_manifest
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.retrieval.index import ExemplarIndex

    manifest = read_manifest(path, kind=ExemplarIndex.FORMAT, max_version=ExemplarIndex.FORMAT_VERSION, verify=False)
    return ExemplarIndex.load(path, encoder=Encoder(manifest["encoder"]))


@app.command()
def tune(
    task: Annotated[str, typer.Option(help="Task name.")],
    data: Annotated[Path, typer.Option(help="Training data (GSM8K JSONL, MultiArith JSON, or JSONL).")],
    out: Annotated[Path, typer.Option(help="Directory for the task embedding (replaced atomically).")],
    fmt: Annotated[str | None, typer.Option("--format", help="gsm8k, multiarith or jsonl; default: detect.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use the first N records (validation taken from them).",
                                              min=1)] = None,
    model: ModelOpt = None,
    description: Annotated[str, typer.Option(help="Task description (with the inputs, it sets the task vector).")] =
        "Solve the problem step by step.",
    k: Annotated[int, typer.Option("--k", help="Virtual tokens.")] = 16,
    components: Annotated[int, typer.Option(help="M: prompt components of the per-input head (0: one static "
                                                  "prompt P0).")] = 0,
    tau: Annotated[float, typer.Option(help="Gate softmax temperature.")] = 0.1,
    balance: Annotated[float, typer.Option(help="Weight of the gate's anti-collapse term.")] = 0.1,
    freeze: Annotated[list[str] | None, typer.Option(help="Keep a part as it is: p0, components or gate "
                                                          "(repeatable).")] = None,
    steps: Annotated[int, typer.Option(help="Optimisation steps (the budget).")] = 100,
    max_seconds: Annotated[float | None, typer.Option(help="Wall-time budget in seconds (default: steps only).")] =
        None,
    lr: Annotated[float, typer.Option(help="Learning rate of the soft-prompt head.")] = 3e-3,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 4,
    val: Annotated[int, typer.Option(help="Held-out examples for early stopping (0: none).")] = 16,
    init: Annotated[str, typer.Option(help="P0 init: text, vocab or random.")] = "text",
    text_field: Annotated[str, typer.Option(help="(jsonl) prompt field.")] = "question",
    target_field: Annotated[str, typer.Option(help="(jsonl) target field; GSM8K/MultiArith use the rationale.")] =
        "answer",
    index: Annotated[Path | None, typer.Option(help="An exemplar index (`detot index build`) to take --demos from.")] =
        None,
    demos: Annotated[int, typer.Option(help="Demos in each training prompt, retrieved as DETOT serves them (the task "
                                            "embedding's query, MMR, never the question itself); 0: the question "
                                            "alone. Train with the k_exemplars you will serve with (longer prompts: "
                                            "slower steps).", min=0, max=32)] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Train a task embedding with a soft-prompt head (model frozen); saves it with a loss plot and report.

    The soft prompt learns in the context it will be served in: the question alone, or with `--demos`
    retrieved from `--index` exactly as `DETOT` retrieves them (the prompts are built by `DETOT.prompt`).
    The retrieval side learns from feedback at serving time (DETOT's loop, `TaskRetriever.feedback`),
    not from a data file: here it keeps its initial state, so the demos a question is trained with are
    the ones it is served with.
    """
    from detot_agent.cli.plots import plot_loss
    from detot_agent.detot.served import served_examples
    from detot_agent.embedding.task_embedding import TaskEmbedding
    from detot_agent.embedding.update import Feedback, UpdateConfig
    from detot_agent.engines.torch_engine import LocalEngine
    from detot_agent.errors import ConfigError
    from detot_agent.io.datafiles import DataFormat, detect_format, read_exemplars
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.softprompt.loss import TuneExample
    from detot_agent.softprompt.prompt import SoftPrompt, SoftPromptInit

    try:  # every setting checked before a model loads
        cfg = UpdateConfig.model_validate({"steps": steps, "head_lr": lr, "batch_size": batch_size, "balance": balance,
                                           "max_seconds": max_seconds, "freeze": list(freeze or [])})
        SoftPromptInit(init)
    except (ConfigError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if k < 1 or components < 0 or not tau > 0:
        raise typer.BadParameter(f"--k must be >= 1, --components >= 0 and --tau > 0 (got {k}, {components}, {tau})")
    form = DataFormat(fmt) if fmt else detect_format(data)
    if demos and (index is None or form is DataFormat.JSONL):
        raise typer.BadParameter("--demos needs --index (an exemplar index with rationales) and GSM8K or MultiArith "
                                 f"data (worked answers to learn after the demos); got --index {index}, {form.value} "
                                 "data. Drop --demos to train on the question alone")
    exemplars = _load_index(index) if index is not None else None
    records = read_exemplars(data, fmt=form, text_field=text_field, answer_field=target_field)
    records = records[:limit] if limit else records
    if form is DataFormat.JSONL:
        records = [r for r in records if str(r.fields.get("answer", "")).strip()]
        pairs = [TuneExample(prompt=r.text, target=str(r.fields["answer"])) for r in records]
    else:
        pairs = [TuneExample(prompt=r.text + COT_SUFFIX, target=r.fields["rationale"]) for r in records]
    if len(pairs) < 2:
        raise typer.BadParameter(f"{data} gave {len(pairs)} usable training pair(s); need at least 2")
    encoder = exemplars.encoder if exemplars is not None else Encoder()  # the index's own (`_load_index`)
    vectors = encoder.encode([r.text for r in records])
    n_val = min(val, len(pairs) // 4)
    engine = LocalEngine(model, device=device, dtype=dtype)
    te = TaskEmbedding.from_description(task, description, encoder=encoder, samples=[r.text for r in records[:32]])
    te.attach_head(SoftPrompt.initialize(engine, task, k=k, init=init).vectors, components=components, tau=tau,
                   model_id=engine.source.spec, inputs=vectors[n_val:])
    if exemplars is not None and demos:
        pairs = served_examples(te, exemplars, [r.text for r in records], [p.target for p in pairs], k=demos)
    items = [Feedback(query=v, example=p) for v, p in zip(vectors, pairs, strict=True)]
    console.print(f"training the task embedding of {task!r} on {engine.name}: soft prompts of {k} x "
                  f"{engine.hidden_size}, {components} component(s), "
                  f"{f'{demos} demo(s) from {index}' if demos else 'no demos'} in each prompt; "
                  f"{len(items) - n_val} training / {n_val} validation examples")
    report = te.update(items[n_val:], val=items[:n_val], engine=engine, config=cfg, progress=True)
    te.save(out)
    plot_loss(report.train_loss, report.val_loss, out / "loss.png", title=f"task embedding {task!r} on {engine.name}",
              initial_val=report.lm_before)
    write_json_atomic(out / "report.json", {**report.model_dump(), "demos_in_prompt": demos,
                                            "demo_index": None if index is None or not demos else str(index)})
    verdict = "accepted" if report.accepted else "NOT accepted (validation loss did not improve); kept the init"
    console.print(f"{report.steps} steps in {report.seconds:.1f}s; NLL {report.lm_before:.3f} -> {report.lm_after:.3f}"
                  f"{'' if report.gate_usage is None else f'; gate usage {report.gate_usage}'}"
                  f"{' (stopped by --max-seconds)' if report.budget_hit else ''}: {verdict}. "
                  f"Saved {out} (loss.png, report.json)")


@app.command()
def convert(
    soft_prompt: Annotated[Path, typer.Option(help="A static soft prompt folder (the first release's `detot tune`).")],
    task: Annotated[str, typer.Option(help="Task name.")],
    description: Annotated[str, typer.Option(help="Task description (sets the task vector).")],
    out: Annotated[Path, typer.Option(help="Directory for the task embedding.")],
) -> None:
    """Turn a static soft prompt into a task embedding (the prompt becomes P0: the zero-head case)."""
    from detot_agent.embedding.task_embedding import TaskEmbedding
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.softprompt.prompt import SoftPrompt

    sp = SoftPrompt.load(soft_prompt)
    te = TaskEmbedding.from_description(task, description, encoder=Encoder())
    te.attach_head(sp.vectors, components=0, model_id=sp.model_id)
    te.save(out)
    console.print(f"saved {out}: task embedding {task!r} serving the {sp.k}-vector soft prompt of {soft_prompt} "
                  "as P0 (no components)")


@app.command("export-peft")
def export_peft(
    task_embedding: Annotated[Path, typer.Argument(help="A task embedding folder (from `detot tune`).")],
    out: Annotated[Path, typer.Option(help="Directory for the PEFT prompt-tuning adapter.")],
    base_model: Annotated[str | None, typer.Option(help="base_model_name_or_path written in the adapter config.")] =
        None,
) -> None:
    """Write P0, the input-independent part of the soft prompt, as a PEFT prompt-tuning adapter.

    The per-input part (the component bank and its gate) has no PEFT equivalent: PEFT's prompt
    tuning serves one prompt for every input, so the adapter serves P0 alone.
    """
    from detot_agent.embedding.task_embedding import TaskEmbedding

    te = TaskEmbedding.load(task_embedding)
    te.export_peft(out, base_model_name_or_path=base_model)
    head = te.head
    assert head is not None
    dropped = (f"; its {head.components} input-dependent component(s) have no PEFT equivalent and are not in the "
               "adapter" if head.components and not head.is_static() else "")
    console.print(f"wrote {out}: P0 ({head.k} x {head.hidden_size}) as a PEFT prompt-tuning adapter{dropped}")


def _default_gsm8k(name: str) -> Path:
    for base in (os.environ.get("DETOT_DATA_DIR"), "../shared/data", "../../shared/data"):
        if base and (Path(base) / "gsm8k" / name).is_file():
            return Path(base) / "gsm8k" / name
    raise typer.BadParameter(f"GSM8K {name} not found in $DETOT_DATA_DIR/gsm8k or ../shared/data/gsm8k; pass it")


@index_app.command("build")
def index_build(
    data: Annotated[Path, typer.Option(help="Data file (GSM8K JSONL, MultiArith JSON, or JSONL).")],
    out: Annotated[Path, typer.Option(help="Directory to write the index to (replaced atomically).")],
    fmt: Annotated[str | None, typer.Option("--format", help="gsm8k, multiarith or jsonl; default: detect.")] = None,
    text_field: Annotated[str, typer.Option(help="(jsonl) field to embed.")] = "question",
    answer_field: Annotated[str, typer.Option(help="(jsonl) field holding the answer.")] = "answer",
    id_field: Annotated[str | None, typer.Option(help="(jsonl) field holding a stable id.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N records.", min=1)] = None,
    encoder: Annotated[str | None, typer.Option(help="sentence-transformers name or path.")] = None,
) -> None:
    """Embed a data file's problems and save them as an exemplar index."""
    from detot_agent.io.datafiles import read_exemplars
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.retrieval.index import ExemplarIndex

    records = read_exemplars(data, fmt=fmt, text_field=text_field, answer_field=answer_field, id_field=id_field)
    records = records[:limit] if limit else records
    start = time.perf_counter()
    index = ExemplarIndex(Encoder(encoder))
    index.add(records)
    index.save(out)
    stats = index.stats()
    console.print(f"indexed {stats['count']} records from {data} in {time.perf_counter() - start:.1f}s: "
                  f"{stats['index_type']} index, encoder {stats['encoder']} ({stats['dim']} dims) -> {out}")


@index_app.command("search")
def index_search(
    index_dir: Annotated[Path, typer.Argument(help="Directory written by `detot index build`.")],
    query: Annotated[str, typer.Argument(help="Query text.")],
    k: Annotated[int, typer.Option("-k", "--k", help="Results to show.", min=1)] = 5,
    task: Annotated[str | None, typer.Option(help="A saved task embedding directory, or a task description.")] = None,
    mmr: Annotated[float | None, typer.Option(help="MMR lambda for diverse results (1 = relevance only).")] = None,
    where: Annotated[list[str] | None, typer.Option(help="Field filter FIELD=VALUE (repeatable).")] = None,
) -> None:
    """Search an exemplar index (optionally through a task embedding)."""
    from detot_agent.embedding.task_embedding import TaskEmbedding

    if not query.strip():
        raise ConfigError("the query is empty; pass the text to search for")
    index = _load_index(index_dir)
    enc = index.encoder
    vec = enc.encode([query])[0]
    if task:
        te = (TaskEmbedding.load(task, encoder_name=enc.name) if Path(task).is_dir()
              else TaskEmbedding.from_description("cli", task, encoder=enc))
        vec = te.query(vec)
    filters = dict(item.split("=", 1) for item in (where or []) if "=" in item)
    hits = index.search(vec, min(k, len(index)), mmr=mmr, where=filters or None)
    # similarity is always the cosine to the query; with --mmr the order (and its score) also rewards
    # being unlike the hits above, shown apart so a diverse pick does not read as a poor match
    sims = index.vectors([h.id for h in hits]) @ vec if hits else []
    table = Table(title=f"top {len(hits)} of {len(index)} for {query!r}"
                        + (f" (MMR, lambda {mmr}: ordered by relevance and diversity)" if mmr is not None else ""))
    for col in ("rank", "id", "similarity", *(["mmr score"] if mmr is not None else []), "text"):
        table.add_column(col)
    for rank, (h, sim) in enumerate(zip(hits, sims, strict=True), 1):
        table.add_row(str(rank), h.id, f"{float(sim):.3f}", *([f"{h.score:.3f}"] if mmr is not None else []),
                      h.text[:100])
    console.print(table)


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
    result = run_retrieval_bench(size_list, train=train or _default_gsm8k("train.jsonl"),
                                 test=test or _default_gsm8k("test.jsonl"), queries=queries,
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
    if json_path:
        write_json_atomic(json_path, result)
        console.print(f"wrote {json_path}")


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
    if json_path:
        write_json_atomic(json_path, result)
        console.print(f"wrote {json_path}")


@bench_app.command("loop")
def bench_loop(
    model: ModelOpt = None,
    engine: Annotated[str, typer.Option(help="auto, torch or llamacpp.")] = "auto",
    requests: Annotated[int, typer.Option(help="Requests per phase (quiet, then busy).", min=1)] = 24,
    max_tokens: Annotated[int, typer.Option(help="New tokens per sample.", min=1)] = 48,
    train: Annotated[Path | None, typer.Option(help="GSM8K train JSONL for the exemplar index (default: "
                                                    "synthetic exemplars).")] = None,
    max_seconds: Annotated[float, typer.Option(help="Budget of one re-optimization.")] = 120.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
) -> None:
    """Request latency (p50/p99) while a re-optimization runs, against none running."""
    from detot_agent.cli.bench.loop import run_loop_bench

    if requests < 2 or max_tokens < 1 or not max_seconds > 0:
        raise ConfigError(f"--requests must be >= 2, --max-tokens >= 1, --max-seconds > 0 "
                          f"(got {requests}, {max_tokens}, {max_seconds})")
    result = run_loop_bench(model=model, engine=engine, requests=requests, max_tokens=max_tokens, train=train,
                            max_seconds=max_seconds)
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
    if json_path:
        write_json_atomic(json_path, result)
        console.print(f"wrote {json_path}")


def main() -> None:
    """Entry point: run the app, turning the library's own errors into one readable line.

    The command works offline unless told otherwise: `HF_HUB_OFFLINE=1` is set when the environment does
    not set it (models and encoders load from local files; `HF_HUB_OFFLINE=0 detot ...` allows the hub),
    so an unknown model name fails at once instead of retrying a hub this machine cannot reach.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        app()
    except DetotError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise SystemExit(2) from None
