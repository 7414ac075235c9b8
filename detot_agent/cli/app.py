"""The `detot` command line.

Example:
    $ detot --help
    $ detot generate "What is 2+3?" --n 4 --temperature 0.8
    $ detot demo
    $ detot bench engine --n 8 --json evals/results/bench_engine.json
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from detot_agent.cli.bench_cmd import bench_app
from detot_agent.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    console,
    err_console,
    load_index,
    quiet_third_party,
    write_json_atomic,
)
from detot_agent.cli.eval import eval_app
from detot_agent.cli.fit_cmd import fit
from detot_agent.cli.index_cmd import index_app
from detot_agent.errors import ConfigError, DetotError

app = typer.Typer(help="DETOT: task-adapted prompting for DSPy on local models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(bench_app, name="bench")
app.add_typer(index_app, name="index")
app.add_typer(eval_app, name="eval")
app.command("fit")(fit)


@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", help="Show other packages' warnings and "
                                                                     "logs too.")] = False) -> None:
    """DETOT: task-adapted prompting for DSPy on local models."""

    quiet_third_party(verbose or os.environ.get("DETOT_VERBOSE") == "1")

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


COT_SUFFIX = "\nLet's think step by step."


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
    virtual_tokens: Annotated[int, typer.Option(help="Soft-prompt vectors (virtual tokens) per prompt.")] = 16,
    old_k: Annotated[int | None, typer.Option("--k", hidden=True, help="0.3's --virtual-tokens.")] = None,
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
    from detot_agent.embedding.update import TrainingItem, UpdateConfig
    from detot_agent.engines.torch_engine import LocalEngine
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
    if old_k is not None:  # `--k` means k nearest elsewhere (demos in `eval`, results in `index search`)
        err_console.print("detot tune --k is deprecated: it is --virtual-tokens", markup=False, highlight=False)
        virtual_tokens = old_k
    k = virtual_tokens
    if k < 1 or components < 0 or not tau > 0:
        raise typer.BadParameter(f"--virtual-tokens must be >= 1, --components >= 0 and --tau > 0 (got {k}, "
                                 f"{components}, {tau})")
    form = DataFormat(fmt) if fmt else detect_format(data)
    if demos and (index is None or form is DataFormat.JSONL):
        raise typer.BadParameter("--demos needs --index (an exemplar index with rationales) and GSM8K or MultiArith "
                                 f"data (worked answers to learn after the demos); got --index {index}, {form.value} "
                                 "data. Drop --demos to train on the question alone")
    exemplars = load_index(index) if index is not None else None
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
    items = [TrainingItem(query=v, example=p) for v, p in zip(vectors, pairs, strict=True)]
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


def main() -> None:
    """Entry point: run the app, turning the library's own errors into one readable line.

    The command works offline unless told otherwise: `HF_HUB_OFFLINE=1` is set when the environment does
    not set it (models and encoders load from local files; `HF_HUB_OFFLINE=0 detot ...` allows the hub),
    so an unknown model name fails at once instead of retrying a hub this machine cannot reach.
    """

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        app()
    except DetotError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise SystemExit(2) from None
