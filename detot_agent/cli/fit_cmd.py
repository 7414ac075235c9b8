"""`detot fit`: fit DETOT to a task (`DETOTFit`) from data files, into one fit folder.

The DETOT it fits is the one `detot eval` runs as `detot` (the plain prompt, the same task profile and
budgets), so `detot eval --fit DIR` serves exactly what the fit chose.

Example:
    $ detot fit --train ../shared/data/gsm8k/train.jsonl --train-limit 64 \
        --dev ../shared/data/gsm8k/test.jsonl --dev-offset 300 --dev-limit 60 \
        --model QWEN.gguf --out fits/gsm8k --max-minutes 120
    $ detot eval --suite gsm8k --limit 300 --methods cisc,detot --fit fits/gsm8k --model QWEN.gguf
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from detot_agent.errors import ConfigError

console = Console(soft_wrap=True)


def _floats(text: str, what: str) -> list[Any]:
    out: list[Any] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            out.append(None if part == "default" else float(part))
        except ValueError:
            raise ConfigError(f"{what}: {part!r} is not a number (or `default`)") from None
    return out


def fit(
    train: Annotated[str, typer.Option(help="Training problems: a suite name or data file (GSM8K JSONL, MultiArith "
                                            "JSON or JSONL), as `detot eval --suite` reads them.")],
    dev: Annotated[str, typer.Option(help="Dev problems the configuration is chosen on (suite name or file).")],
    out: Annotated[Path, typer.Option(help="The fit folder (a killed fit resumes with the same command).")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="HF folder, .gguf file or hub id; default: "
                                                                    "the embedded SmolLM2-135M.")] = None,
    train_limit: Annotated[int, typer.Option(help="Training problems sampled for chains (seeded draw).", min=1)] = 64,
    dev_limit: Annotated[int, typer.Option(help="Dev problems (seeded draw).", min=1)] = 60,
    dev_offset: Annotated[int, typer.Option(help="Skip this many of the dev draw first: --dev-offset 300 keeps the dev "
                                                 "split off `detot eval --limit 300` on the same file and seed.",
                                            min=0)] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the draws and the training.")] = 0,
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding the named suites.")] = None,
    index: Annotated[Path | None, typer.Option(help="Exemplar index, needed only when --ks races k > 0.")] = None,
    soft_prompt: Annotated[Path | None, typer.Option(help="A task embedding to start from (`detot tune`), raced as "
                                                          "`current`; `none`: race no untrained prompt (distillation "
                                                          "starts from the text-initialised one). Default: the "
                                                          "text-initialised prompt, raced as `current`.")] = None,
    max_minutes: Annotated[float, typer.Option(help="Wall-time budget of the fit.")] = 60.0,
    samples_per_problem: Annotated[int, typer.Option("--samples", help="Chains drawn per training problem.",
                                                     min=1)] = 4,
    chains_per_problem: Annotated[int, typer.Option("--keep", help="Most distinct accepted chains kept per "
                                                                   "problem.", min=1)] = 2,
    rounds: Annotated[int, typer.Option(help="Self-distillation rounds.", min=1)] = 1,
    label_free: Annotated[bool, typer.Option("--label-free", help="Keep chains by agreement with the vote, not the "
                                                                  "labels.")] = False,
    prompts: Annotated[str, typer.Option(help="Trained prompts to race: distilled, gold or both (comma-separated).")] =
        "distilled",
    ks: Annotated[str, typer.Option(help="Demo counts raced (comma-separated; k > 0 needs --index).")] = "0",
    temperatures: Annotated[str, typer.Option(help="Temperatures raced (comma-separated; `default`: --temperature).")]
        = "default",
    weightings: Annotated[str, typer.Option(help="Vote weightings raced: uniform, cisc, filter.")] = "cisc",
    strategies: Annotated[str, typer.Option(help="Reasoning strategies raced: cot, pot, mix (`default`: cot).")] =
        "default",
    stoppings: Annotated[str, typer.Option(help="Stopping rules raced: beta, confidence, majority, entropy, fixed "
                                                "(`default`: the task's, beta).")] = "default",
    stop_rules: Annotated[str, typer.Option(help="Stopping rules the shipped configuration may take, replayed on "
                                                 "its race answers (no model calls); `none`: keep the raced rule.")]
        = "beta,confidence,majority",
    stop_thresholds: Annotated[str, typer.Option(help="Thresholds replayed for each stopping rule.")] =
        "0.6,0.7,0.8,0.9,0.95",
    steps: Annotated[int, typer.Option(help="Training steps per prompt.", min=1)] = 100,
    lr: Annotated[float, typer.Option(help="Learning rate of the soft prompt.")] = 3e-3,
    n: Annotated[int, typer.Option(help="Samples per problem after the greedy one (the budget is n + 1, as in "
                                        "`detot eval`).", min=1)] = 5,
    temperature: Annotated[float, typer.Option(help="Serving temperature.", min=0.0, max=2.0)] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="New tokens per sample.", min=1)] = 256,
    race_every: Annotated[int, typer.Option(help="Dev problems between two looks of the racing rule.", min=1)] = 10,
    threads: Annotated[int, typer.Option(help="Problems in flight at once.", min=1)] = 4,
    engine: Annotated[str, typer.Option(help="auto, torch or llamacpp.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
) -> None:
    """Fit DETOT to a task: self-distil its soft prompt, race configurations on the dev split, guard against plain
    voting; writes OUT (program.json, fit.json, report.md, candidates.png)."""
    from detot_agent.embedding.update_config import UpdateConfig
    from detot_agent.evaluation import load_suite, sample_examples
    from detot_agent.evaluation.methods import Detot
    from detot_agent.evaluation.spec import ContextSpec, build_context
    from detot_agent.fit.config import FitConfig
    from detot_agent.fit.optimizer import DETOTFit

    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    settings: dict[str, Any] = dict(
        max_minutes=max_minutes, max_train_problems=train_limit, samples_per_problem=samples_per_problem,
        chains_per_problem=chains_per_problem, rounds=rounds, filter="agreement" if label_free else "metric",
        train=UpdateConfig(steps=steps, head_lr=lr, max_seconds=None, seed=seed),
        prompts=[p.strip() for p in prompts.split(",") if p.strip()],
        ks=[int(x) for x in _floats(ks, "--ks")], temperatures=_floats(temperatures, "--temperatures"),
        weightings=[w.strip() for w in weightings.split(",") if w.strip()],
        strategies=[None if s.strip() == "default" else s.strip() for s in strategies.split(",") if s.strip()],
        stoppings=[None if s.strip() == "default" else s.strip() for s in stoppings.split(",") if s.strip()],
        stop_rules=[r.strip() for r in stop_rules.split(",") if r.strip() and r.strip() != "none"],
        stop_thresholds=_floats(stop_thresholds, "--stop-thresholds"),
        race_every=race_every, threads=threads, seed=seed)
    cfg = FitConfig(**settings)  # every setting checked before a model loads
    if any(k > 0 for k in cfg.ks) and index is None:
        raise ConfigError("--ks races k > 0 demos: pass --index (an exemplar index, `detot index build`)")
    no_soft = soft_prompt is not None and str(soft_prompt) == "none"
    for what, path in (("--index", index), ("--soft-prompt", None if no_soft else soft_prompt)):
        if path is not None and not path.exists():
            raise ConfigError(f"{what} {path} does not exist")
    train_suite = load_suite(train, data_dir=data_dir)
    dev_suite = load_suite(dev, data_dir=data_dir)
    trainset = sample_examples(train_suite.examples, limit=train_limit, seed=seed)
    valset = sample_examples(dev_suite.examples, limit=dev_limit, seed=seed, offset=dev_offset)
    spec = ContextSpec(model=model if model is None or not Path(model).exists() else str(Path(model).resolve()),
                       engine=engine, device=device, dtype=dtype,  # type: ignore[arg-type]
                       index=None if index is None else str(index.resolve()),
                       soft_prompt=None if soft_prompt is None else "none" if no_soft else str(soft_prompt.resolve()),
                       answer_format=dev_suite.answer_format, labels=dev_suite.labels, k=0, n=n,
                       temperature=temperature, max_tokens=max_tokens, seed=seed, task_name=train_suite.name,
                       questions=[ex.question for ex in trainset[:5]])
    ctx = build_context(spec)
    program = Detot(ctx).program

    def metric(example: Any, pred: Any, trace: Any = None) -> bool:
        return ctx.key(pred.get("answer")) == example.answer

    console.print(f"fit: {len(trainset)} training problems from {train_suite.source}, {len(valset)} dev problems "
                  f"from {dev_suite.source} (offset {dev_offset}); folder {out}", markup=False, highlight=False)
    command = "detot " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    def progress(line: str) -> None:
        console.print(line, markup=False, highlight=False)
        sys.stdout.flush()  # a log file (nohup) shows each step as it happens

    fitter = DETOTFit(metric=metric, config=cfg, out=out, progress=progress)
    try:
        fitter.compile(program, trainset=trainset, valset=valset)
    except KeyboardInterrupt:
        console.print(f"\ninterrupted: what the fit made is kept in {out}; continue with:\n  {command}",
                      markup=False, highlight=False)
        raise SystemExit(130) from None
    finally:
        program.controller.close()
    report = fitter.reports[0]
    console.print((out / "report.md").read_text(), markup=False, highlight=False)
    if report["guard"]["guard_fired"]:
        console.print("the guard fired: DETOT's best configuration did not beat plain voting on the dev split; the fit "
                      "ships plain confidence-weighted voting", markup=False, highlight=False)
    console.print(f"wrote {out} (serve it with `DETOT.load('{out}')` or `detot eval --fit {out}`)", markup=False,
                  highlight=False)
