"""`detot eval`: run methods side by side on a suite, and re-render reports.

Example:
    $ detot eval --suite multiarith --data-dir ../shared/data --methods cot,sc,detot \
        --limit 100 --seed 0 --index runs/gsm8k-train-index --out runs/eval-multiarith
    $ detot eval report runs/eval-multiarith
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from detot_agent.cli.report_cmd import eval_report
from detot_agent.errors import ConfigError

eval_app = typer.Typer(help="Evaluate methods side by side on a suite (resumable), and render reports.",
                       invoke_without_command=True)
console = Console(soft_wrap=True)


@eval_app.callback()
def eval_run(
    ctx: typer.Context,
    suite: Annotated[str | None, typer.Option(help="gsm8k, multiarith, svamp, addsub, singleeq, a file PATH, "
                                                   "or hf:<dataset>[:<config>][@<split>].")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods (see `detot eval methods`).")] =
        "dspy_cot,dspy_fewshot_cot,dspy_knn_fewshot,dspy_sc,dspy_detot,dspy_detot_loop",
    limit: Annotated[int | None, typer.Option(help="Evaluate a seeded sample of this many problems.", min=1)] = None,
    offset: Annotated[int, typer.Option(help="Skip this many problems of the seeded draw first: --offset 300 "
                                             "--limit 50 is a development split disjoint from --limit 300 (same "
                                             "seed; nested draw only).", min=0)] = 0,
    seed: Annotated[int, typer.Option(help="Seed for the sample, the fixed demos and sampling.")] = 0,
    model: Annotated[str | None, typer.Option("--model", "-m", help="HF folder, .gguf file or hub id; "
                                                                    "default: embedded SmolLM2-135M.")] = None,
    index: Annotated[Path | None, typer.Option(help="Exemplar index (demo pool) for the few-shot and DETOT "
                                                    "methods.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder; default runs/eval-<suite>.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding the named suites "
                                                       "(default $DETOT_DATA_DIR).")] = None,
    data_format: Annotated[str | None, typer.Option("--format", help="gsm8k, multiarith or jsonl; "
                                                                     "detected when omitted.")] = None,
    question_field: Annotated[str, typer.Option(help="Question field of JSONL / hub data.")] = "question",
    answer_field: Annotated[str, typer.Option(help="Answer field of JSONL / hub data.")] = "answer",
    labels: Annotated[str | None, typer.Option(help="Comma-separated label set (classification).")] = None,
    k: Annotated[int, typer.Option(help="Demos per question.", min=0)] = 3,
    n: Annotated[int, typer.Option(help="Samples for self-consistency (DETOT's adaptive budget is n+1).", min=1)] = 5,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the voting methods.", min=0.0,
                                               max=2.0)] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="New tokens per sample.", min=1)] = 256,
    soft_prompt: Annotated[Path | None, typer.Option(help="Trained soft prompt or task embedding (from `detot tune`) "
                                                          "for the DETOT methods; `none`: no soft-prompt vectors "
                                                          "(default: a text-initialised, untrained prompt).")] = None,
    threads: Annotated[int, typer.Option(help="Problems in flight at once (their generations are batched).",
                                         min=1)] = 4,
    feedback: Annotated[str, typer.Option(help="none, or gold: prequential evaluation, each problem answered, then "
                                               "scored, then its gold answer given to DETOT's `feedback` (the loop "
                                               "sees accuracy).")] = "none",
    reopt_cooldown: Annotated[int | None, typer.Option(help="Answers that must pass between two re-optimizations "
                                                            "of the looping DETOT methods (default 20); each "
                                                            "one replays its held-out and canary items twice.",
                                                       min=0)] = None,
    reopt_seconds: Annotated[float | None, typer.Option(help="Budget of one re-optimization of the looping DETOT "
                                                             "methods (training and replay; default 120).")] = None,
    canary_file: Annotated[Path | None, typer.Option(help="Labelled problems (a suite file or name) from which a "
                                                          "seeded canary set is drawn: every re-optimization of a "
                                                          "looping DETOT replays it (see --canary-size).")] = None,
    canary_size: Annotated[int, typer.Option(help="Problems in the canary set.", min=1)] = 16,
    replay_items: Annotated[int | None, typer.Option(help="Held-out records each re-optimization of the looping "
                                                          "DETOT methods replays under both states (default 16; "
                                                          "the canary set comes on top).", min=1)] = None,
    judging: Annotated[str, typer.Option(help="How the looping DETOT methods judge a trained candidate: replay "
                                              "(held-out and canary items, at once) or shadow (a share of later "
                                              "problems is also answered by the candidate, never scored; an "
                                              "always-valid sequential test on the paired outcomes, from gold with "
                                              "--feedback gold, else from agreement).")] = "replay",
    shadow_share: Annotated[float | None, typer.Option(help="With --judging shadow: the share of problems the "
                                                            "candidate also answers (default 0.25).")] = None,
    shadow: Annotated[list[str] | None, typer.Option(
        "--shadow", metavar="SETTING=VALUE", help="With --judging shadow: another ShadowConfig setting (repeatable), "
        "e.g. workers=4, background=false (shadow answers compete with live problems as equals: evidence at the "
        "pace of the stream, at the cost of latency), max_pending=8, when_full=wait (a problem that finds the "
        "backlog full waits for room instead of going unshadowed).")] = None,
    strategy: Annotated[str | None, typer.Option(help="The DETOT methods' reasoning: cot, pot (a program, run "
                                                      "safely) or mix (half each, votes pooled); default: task "
                                                      "analysis (cot).")] = None,
    weighting: Annotated[str | None, typer.Option(help="The DETOT methods' vote weighting: uniform, cisc (votes "
                                                       "weighted by sample confidence) or filter (only the most "
                                                       "confident samples vote); default: task analysis "
                                                       "(uniform).")] = None,
    loop_policy: Annotated[list[str] | None, typer.Option(metavar="POLICY",
                                                          help="A configuration the looping DETOT methods may switch "
                                                              "to (strategy, weighting, temperature, k_exemplars), "
                                                              "e.g. strategy=pot or temperature=0.3,k_exemplars=0 "
                                                              "(repeatable): each "
                                                              "re-optimization judges it on gold items (feedback, "
                                                              "canary) and adopts it only if it helps.")] = None,
    ablate: Annotated[str | None, typer.Option(help="Comma-separated parts of DETOT to switch off, each run as an "
                                                    "extra method `<detot method>-<part>` on the same problems: "
                                                    "retrieval, softprompt, loop (looping methods), dynamic "
                                                    "(task embeddings with M > 0), strategy (--strategy pot|mix)."
                                                    )] = None,
    fit: Annotated[Path | None, typer.Option(help="A fit folder (`detot fit`): the DETOT methods serve its shipped "
                                                  "configuration and task embedding (its k, budget, temperature, "
                                                  "weighting and soft prompt; --k, --n, --temperature, --weighting and "
                                                  "--soft-prompt then apply to the other methods; --max-tokens, the "
                                                  "run's budget, to all).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Most sequences decoded together.", min=1)] = 16,
    scheduler: Annotated[str, typer.Option(help="The local engine's batching: continuous (rows join between decode "
                                                "steps; prompts reused from the prefix cache) or static.")] =
        "continuous",
    prefix_match: Annotated[str, typer.Option(help="prefix (reuse the longest cached prefix) or exact (only an "
                                                   "identical prompt: greedy replies stay the static scheduler's "
                                                   "on quantized llama.cpp models).")] = "prefix",
    prefix_cache: Annotated[int | None, typer.Option(help="Prompts the continuous scheduler keeps for reuse (least "
                                                          "recently used evicted first) [default: twice --threads, at "
                                                          "least 8; fewer lets a problem's later rounds find its "
                                                          "prompt evicted].", min=0, max=64)] = None,
    engine: Annotated[str, typer.Option(help="auto (llama.cpp for a .gguf file on the CPU when installed, else "
                                             "torch), torch (transformers; `local` is the old name), llamacpp, or "
                                             "vllm (CUDA GPUs, the `vllm` extra).")] = "auto",
    executor: Annotated[str, typer.Option(help="local (this process) or ray (Ray actors, one engine each; "
                                               "needs the `ray` extra).")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (auto, HOST:PORT, ray://...); "
                                                     "default: start a local Ray instance.")] = None,
    workers: Annotated[int, typer.Option(help="Ray actors (engine replicas).", min=1)] = 2,
    worker_cpus: Annotated[float, typer.Option(help="CPUs reserved per Ray actor.")] = 1.0,
    worker_gpus: Annotated[float, typer.Option(help="GPUs per Ray actor (1: one GPU per replica).")] = 0.0,
    task_timeout: Annotated[float | None, typer.Option(help="Seconds after which an unanswered problem marks its "
                                                            "Ray actor as hung (killed, problems re-queued).")] = None,
) -> None:
    """Run METHODS on SUITE; per-example results stream to OUT/<method>.jsonl, then report.md and plots."""
    if ctx.invoked_subcommand is not None:
        return
    if suite is None:
        raise ConfigError("detot eval needs --suite (a name such as multiarith, or a data file); "
                          "see `detot eval --help`")
    from detot_agent.engines.models import resolve_model_source
    from detot_agent.evaluation import load_suite, run_eval, sample_examples, write_report
    from detot_agent.evaluation.methods import (
        METHODS,
        check_method,
        expand_ablations,
        missing_requirements,
        needs_index,
    )
    from detot_agent.evaluation.report import render_markdown
    from detot_agent.evaluation.runner import check_run, read_records
    from detot_agent.evaluation.spec import ContextSpec, build_context

    # a truncated sample is a normal outcome here (it is counted as a parse failure), not a warning per call
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise ConfigError(f"--methods is empty; choose from {', '.join(METHODS)}")
    names = _current_names(names)
    parts = [p.strip() for p in (ablate or "").split(",") if p.strip()]
    if parts:
        names = expand_ablations(names, parts)
    for m in names:
        check_method(m)  # one line naming the method and what exists
    from detot_agent.detot.task import Policy

    policies = [Policy.parse(text) for text in loop_policy or []]
    if judging not in ("replay", "shadow"):
        raise ConfigError(f"--judging must be replay or shadow, got {judging!r}")
    if shadow_share is not None and (judging != "shadow" or not 0 < shadow_share <= 1):
        raise ConfigError(f"--shadow-share takes a share in (0, 1] and needs --judging shadow, got {shadow_share} "
                          f"with --judging {judging}")
    shadow_settings = _shadow_settings(shadow or [], judging)
    problems = missing_requirements(names, index=index is not None, k=k, fit=fit is not None)
    if problems:  # every requirement of every method, before anything loads
        raise ConfigError("; ".join(problems))
    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor must be local or ray, got {executor!r}")
    if reopt_seconds is not None and not reopt_seconds > 0:
        raise ConfigError(f"--reopt-seconds must be > 0, got {reopt_seconds}")
    if strategy not in (None, "cot", "pot", "mix"):
        raise ConfigError(f"--strategy must be cot, pot or mix, got {strategy!r}")
    if weighting not in (None, "uniform", "cisc", "filter"):
        raise ConfigError(f"--weighting must be uniform, cisc or filter, got {weighting!r}")
    if feedback not in ("none", "gold"):
        raise ConfigError(f"--feedback must be none or gold, got {feedback!r}")
    if scheduler not in ("continuous", "static"):
        raise ConfigError(f"--scheduler must be continuous or static, got {scheduler!r}")
    if prefix_match not in ("prefix", "exact"):
        raise ConfigError(f"--prefix-match must be prefix or exact, got {prefix_match!r}")
    engine = "torch" if engine == "local" else engine
    if prefix_cache is None:  # DETOT at 8 problems in flight: 31.5 output tok/s with 8 prompts kept, 51.6 with 16
        prefix_cache = min(64, max(8, 2 * threads))
    if engine not in ("auto", "torch", "llamacpp", "vllm"):
        raise ConfigError(f"--engine must be auto, torch, llamacpp or vllm, got {engine!r}")
    label_list = [x.strip() for x in labels.split(",")] if labels else None
    loaded = load_suite(suite, data_dir=data_dir, fmt=data_format, question_field=question_field,
                        answer_field=answer_field, labels=label_list)
    out = out or Path("runs") / f"eval-{loaded.name}"
    if resume:
        from detot_agent.evaluation.rename_runs import upgrade_run

        upgrade_run(out)  # a folder written under 0.3's method names gets 0.4's first
    stored = _stored_run(out)
    # runs from before `draw` existed used the legacy draw, removed in 0.4: sample_examples refuses it
    draw = stored.get("draw", "legacy") if resume and stored else "nested"
    examples = sample_examples(loaded.examples, limit=limit, seed=seed, draw=draw, offset=offset)
    canary: list[tuple[str, str]] = []
    if canary_file is not None:
        from detot_agent.evaluation.data import draw_canary

        source = load_suite(str(canary_file), data_dir=data_dir, question_field=question_field,
                            answer_field=answer_field, labels=label_list)
        canary = draw_canary(source.examples, examples, size=canary_size, seed=seed, draw=draw)
    if fit is not None:
        from detot_agent.fit.report import read_fit

        read_fit(fit)  # a finished fit folder, or one line saying what is wrong
    no_soft = soft_prompt is not None and str(soft_prompt) == "none"
    for what, path in (("--index", index), ("--soft-prompt", None if no_soft else soft_prompt)):
        if path is not None and not path.exists():
            raise ConfigError(f"{what} {path} does not exist")
    # absolute paths: Ray actors do not run in this folder
    local_model = model if model is None or not Path(model).exists() else str(Path(model).resolve())
    if engine != "vllm":  # decided here, once, so every Ray actor and a resumed run use the same engine
        from detot_agent.config import build
        from detot_agent.engines.config import EngineConfig
        from detot_agent.engines.lm import choose_engine

        engine = choose_engine(engine, build(EngineConfig, {"model": local_model, "device": device, "dtype": dtype}))
    spec = ContextSpec(model=local_model, engine=engine, device=device, dtype=dtype,  # type: ignore[arg-type]
                       max_batch_size=max_batch_size, scheduler=scheduler,  # type: ignore[arg-type]
                       prefix_match=prefix_match, prefix_cache=prefix_cache,  # type: ignore[arg-type]
                       index=None if index is None else str(index.resolve()),
                       soft_prompt=None if soft_prompt is None else "none" if no_soft else str(soft_prompt.resolve()),
                       answer_format=loaded.answer_format, labels=loaded.labels, k=k, n=n, temperature=temperature,
                       max_tokens=max_tokens, seed=seed, task_name=loaded.name, feedback=feedback,  # type: ignore[arg-type]
                       reopt_seconds=reopt_seconds, canary=canary, strategy=strategy,  # type: ignore[arg-type]
                       weighting=weighting,  # type: ignore[arg-type]
                       reopt_cooldown=reopt_cooldown, loop_policies=[p.changes() for p in policies],
                       replay_items=replay_items, judging=judging, shadow_share=shadow_share,  # type: ignore[arg-type]
                       shadow_settings=shadow_settings,
                       fit=None if fit is None else str(fit.resolve()),
                       questions=[ex.question for ex in examples[:5]])
    run = {"suite": loaded.name, "source": loaded.source, "seed": seed, "limit": limit, "draw": draw,
           **({"offset": offset} if offset else {}), "k": k, "n": n,
           "temperature": temperature, "max_tokens": max_tokens,
           "soft_prompt": None if soft_prompt is None else str(soft_prompt),
           "index": None if index is None else str(index), "answer_format": loaded.answer_format.value,
           "engine": engine, "scheduler": scheduler,
           **({"prefix_match": prefix_match} if prefix_match != "prefix" else {}),
           **({"prefix_cache": prefix_cache} if prefix_cache != 8 else {}), "feedback": feedback,
           "reopt_seconds": reopt_seconds,
           "strategy": strategy,
           **({"weighting": weighting} if weighting else {}),
           "reopt_cooldown": reopt_cooldown, "loop_policies": [p.describe() for p in policies],
           "replay_items": replay_items, **({"fit": str(fit)} if fit is not None else {}),
           **({"judging": judging, "shadow_share": shadow_share} if judging != "replay" else {}),
           **({"shadow": shadow_settings} if shadow_settings else {}),
           "canary": None if canary_file is None else {"file": str(canary_file), "size": len(canary)},
           "command": "detot " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "model": resolve_model_source(None).name if model is None else model}
    # a resumed run may add --index (and --soft-prompt) if no finished record came from a method using one
    finished = [m for m in stored.get("methods", []) if read_records(out / f"{m}.jsonl")]
    addable = frozenset() if any(needs_index(m) for m in finished) else frozenset({"index", "soft_prompt"})
    # the output folder and the resume state, checked before the model loads
    check_run(out, {**run, "methods": names, "ids": [ex.id for ex in examples]}, resume=resume, write=False,
              addable=addable)
    try:
        if executor == "ray":
            from detot_agent.evaluation.distributed import RayExecutor

            with RayExecutor(spec, workers=workers, threads=threads, address=address, worker_cpus=worker_cpus,
                             worker_gpus=worker_gpus, task_timeout_s=task_timeout) as ray_executor:
                run_eval(examples, names, None, out, run=run, resume=resume, threads=threads, executor=ray_executor,
                         addable=addable)
        else:
            context = build_context(spec)
            run_eval(examples, names, context, out, run=run, resume=resume, threads=threads, addable=addable)
    except KeyboardInterrupt:
        # finished records are already on disk (appended and fsynced one by one); in-flight problems are
        # dropped rather than waited for, so Ctrl-C ends in seconds
        command = str(run["command"])
        again = command if "--resume" in command else command + " --resume"
        console.print(f"\ninterrupted: finished records are kept in {out}; continue with:\n  {again}",
                      markup=False, highlight=False)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    report = write_report(out)
    console.print(render_markdown(report))
    console.print(f"wrote {out / 'report.md'}, {out / 'report.json'} and plots")


def _current_names(names: list[str]) -> list[str]:
    """0.4's names for `--methods`, saying which 0.3 names were read as what (`evaluation/names.py`)."""
    from detot_agent.evaluation.names import current

    renamed = {m: current(m) for m in names if current(m) != m}
    if renamed:
        clash = (" (`detot` keeps its 0.4 meaning, DETOT in the plain prompt without the loop; 0.3's `detot` is "
                 "`dspy_detot_loop`)" if any(m.partition("-")[0] == "detot" for m in names) else "")
        console.print("0.3 method names read as 0.4's: " + ", ".join(f"{a} -> {b}" for a, b in renamed.items())
                      + clash, markup=False, highlight=False)
    return [current(m) for m in names]


def _stored_run(out: Path) -> dict[str, Any]:
    """The settings a run folder was started with (empty when it holds no readable run)."""
    from detot_agent.evaluation.runner import RUN_FILE

    try:
        stored = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


eval_app.command("report")(eval_report)


@eval_app.command("methods")
def eval_methods() -> None:
    """List the methods (and how to name an ablation)."""
    from detot_agent.evaluation import baselines, methods

    for mod in (methods, baselines):
        for line in (mod.__doc__ or "").splitlines():
            if line.startswith("| `") and not line.startswith("| `sc` ..."):
                console.print(line, markup=False, highlight=False)
    console.print(f"ablations: <detot method>-<part>[+<part>], parts: {', '.join(methods.ABLATABLE)}",
                  markup=False, highlight=False)


def _shadow_settings(texts: list[str], judging: str) -> dict[str, Any]:
    """`["workers=4", "background=false"]` -> ShadowConfig fields, validated now (`ConfigError` naming the bad one)."""
    from detot_agent.detot.shadow import ShadowConfig

    if texts and judging != "shadow":
        raise ConfigError(f"--shadow {texts[0]} needs --judging shadow, got --judging {judging}")
    settings: dict[str, Any] = {}
    for text in texts:
        name, eq, value = (part.strip() for part in text.partition("="))
        if not eq or name in ("share", "outcomes"):
            raise ConfigError(f"--shadow takes SETTING=VALUE (a ShadowConfig field other than share and outcomes, "
                              f"which --shadow-share and --feedback set), got {text!r}")
        settings[name] = value
    checked = ShadowConfig(**settings)  # unknown names and bad values are refused here, before anything loads
    return {name: getattr(checked, name) for name in settings}
