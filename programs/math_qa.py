"""DETOT on arithmetic word problems: demos retrieved from a training file, voting, soft prompt.

    python -m programs.math_qa --train ../shared/data/gsm8k/train.jsonl \
        --question "Tom has 3 apples and buys 5 more. How many apples does he have?"

The first run embeds the training file into an index (saved under --index and reused).
Prompts are plain text by default (`PlainAdapter`: demos and replies end in "The answer is N."),
which small local models follow better than DSPy's field layout; `--adapter chat` uses the latter.

Compiling with a DSPy optimizer (`--optimize bootstrap|mipro|gepa`): the program is scored on a seeded
evaluation sample of a suite (`detot eval --limit N --seed S`'s problems; `--draw legacy` the 100 MultiArith
problems of the optimizers study, 0.3's draw), compiled on training
problems drawn from the rest of the suite (never from the evaluation sample), and scored again; the
report gives both accuracies, the paired counts and an exact two-sided McNemar p-value:

    python -m programs.math_qa --optimize bootstrap --suite multiarith --data-dir ../shared/data \
        --train ../shared/data/gsm8k/train.jsonl --model "$(../shared/tools/bench-model.sh)" \
        --eval-size 100 --train-size 50 --out evals/results/optimize/bootstrap.json

MIPROv2 and GEPA use the same local model to propose instructions (GEPA: as its reflection LM) and split
the training problems 60/40 into the optimizer's train and validation sets.

Each stage is written to --out as it ends (the first scoring, then the compiled program beside the report), so
`--resume` goes on from where a stopped run got; `--before REPORT` takes the uncompiled program's scores from
another optimizer's report on the same problems and settings instead of scoring them again.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy

from detot_agent import DETOT, Encoder, ExemplarIndex, LenientChatAdapter, PlainAdapter, TaskProfile, analyze, local_lm
from detot_agent.answers import AnswerFormat
from detot_agent.detot.task import TaskKind
from detot_agent.errors import ArtefactError, DetotError
from detot_agent.io.datafiles import read_exemplars


def load_or_build_index(index_dir: Path, train: Path | None, *, limit: int | None = None) -> ExemplarIndex:
    """The exemplar index in `index_dir`, built from `train` (GSM8K / MultiArith / JSONL) when missing."""
    encoder = Encoder()
    try:
        return ExemplarIndex.load(index_dir, encoder=encoder)
    except ArtefactError:
        if train is None:
            raise DetotError(f"no index at {index_dir}; pass --train FILE to build one") from None
    index = ExemplarIndex(encoder)
    index.add(read_exemplars(train)[:limit])
    index.save(index_dir)
    return index


def build(index: ExemplarIndex, *, model: str | None, max_tokens: int, max_samples: int,
          questions: list[str], adapter: str = "plain", lm: Any = None) -> DETOT:
    """A DETOT module for numeric answers on a local model."""
    lm = lm if lm is not None else local_lm(model, cache=False)
    task = TaskProfile(name="math", description="Solve arithmetic word problems step by step.",
                       kind=TaskKind.ARITHMETIC, answer_format=AnswerFormat.NUMBER)
    adjustments = analyze(task, questions, max_tokens=max_tokens, max_samples=max_samples)
    layout = PlainAdapter() if adapter == "plain" else LenientChatAdapter()
    return DETOT("question -> answer", task=task, index=index, lm=lm, adjustments=adjustments, background=False,
                 adapter=layout)


OPTIMIZERS = ("bootstrap", "mipro", "gepa")


def _correct(example: dspy.Example, pred: Any) -> bool:
    from detot_agent.answers import normalize

    answer = getattr(pred, "answer", None)
    return answer is not None and normalize(str(answer), AnswerFormat.NUMBER) == example.answer


def metric(example: dspy.Example, pred: Any, trace: Any = None) -> bool:
    """Exact numeric match with the gold answer (the suites' normalised `answer`)."""
    return _correct(example, pred)


def feedback_metric(gold: dspy.Example, pred: Any, trace: Any = None, pred_name: Any = None,
                    pred_trace: Any = None) -> dspy.Prediction:
    """GEPA's metric: the score plus a sentence of feedback for its reflection LM."""
    ok = _correct(gold, pred)
    said = getattr(pred, "answer", None)
    return dspy.Prediction(score=float(ok), feedback="Correct." if ok else
                           f"Wrong: answered {said!r}, the correct answer is {gold.answer}.")


def split_for_compiling(examples: list[dspy.Example], *, eval_size: int, train_size: int, seed: int,
                        draw: str = "nested") -> tuple[list[dspy.Example], list[dspy.Example]]:
    """`(evalset, trainset)`: the seeded evaluation sample (`nested`: `detot eval`'s; `legacy`: 0.3's draw, on which
    the optimizers study in the docs ran: `random.sample` of the indices, in file order) and training problems
    drawn (seeded) from the rest, so none is evaluated on."""
    from detot_agent.evaluation.data import sample_examples

    if draw == "legacy":  # kept here (not in the library) so the committed optimizers study stays reproducible
        picked = sorted(random.Random(seed).sample(range(len(examples)), min(eval_size, len(examples))))
        evalset = [examples[i] for i in picked]
    else:
        evalset = sample_examples(examples, limit=eval_size, seed=seed, draw=draw)
    held = {ex.id for ex in evalset}
    rest = [ex for ex in examples if ex.id not in held]
    if len(rest) < train_size:
        raise DetotError(f"only {len(rest)} problems are left beside the {len(evalset)} evaluated; "
                         f"lower --train-size ({train_size}) or --eval-size")
    return evalset, random.Random(seed + 1).sample(rest, train_size)


def make_optimizer(name: str, lm: Any, *, threads: int, seed: int, proposer: Any = None) -> Any:
    """The DSPy optimizer `name` with settings sized for a CPU run; `proposer` (default: `lm`, the program's LM)
    writes MIPROv2's instructions and GEPA's reflections."""
    proposer = proposer if proposer is not None else lm
    if name == "bootstrap":
        return dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=2, max_labeled_demos=2, max_rounds=1)
    if name == "mipro":
        return dspy.MIPROv2(metric=metric, prompt_model=proposer, task_model=lm, auto="light", num_threads=threads,
                            max_bootstrapped_demos=2, max_labeled_demos=2, seed=seed, verbose=False)
    if name == "gepa":
        return dspy.GEPA(metric=feedback_metric, reflection_lm=proposer, auto="light", num_threads=threads, seed=seed)
    raise DetotError(f"--optimize must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def compile_and_compare(program: DETOT, optimizer: str, evalset: list[dspy.Example], trainset: list[dspy.Example],
                        *, lm: Any, threads: int, seed: int, proposer: Any = None, before: list[bool] | None = None,
                        compiled: Any = None, checkpoint: Callable[[str, dict[str, Any], Any], None] | None = None,
                        elapsed: float = 0.0) -> tuple[Any, dict[str, Any]]:
    """Score `program` on `evalset`, compile it with `optimizer` on `trainset`, score it again.

    `proposer` (default `lm`) runs the optimizer's own prompts (MIPROv2's instructions, GEPA's reflections):
    give it a context long enough for them (`local_lm(model, n_ctx=8192)`).

    Each stage can come from an earlier run: `before` (the uncompiled program's per-problem scores on
    `evalset`) skips the first scoring, `compiled` skips compiling. `checkpoint(stage, report, compiled)` is
    called after the first scoring (stage "scored") and after compiling (stage "compiled") with the report
    so far, so a stopped run can resume from it (`--resume`). `seconds` in the report counts from the start,
    `elapsed` being the seconds an earlier run spent on the stages it finished.
    """
    from scipy.stats import binomtest

    def score(prog: Any) -> list[bool]:
        out = dspy.Evaluate(devset=evalset, metric=metric, num_threads=threads, display_progress=True,
                            provide_traceback=True)(prog)
        by_id = {ex.id: bool(s) for ex, _, s in out.results}
        return [by_id[ex.id] for ex in evalset]

    start = time.perf_counter()
    report: dict[str, Any] = {
        "optimizer": optimizer, "eval_size": len(evalset), "train_size": len(trainset), "seed": seed,
        "eval_ids": [ex.id for ex in evalset], "train_ids": [ex.id for ex in trainset],
    }
    if before is None:
        before = score(program)
    elif len(before) != len(evalset):
        raise DetotError(f"{len(before)} earlier scores for {len(evalset)} evaluated problems")
    report.update(stage="scored", accuracy_before=sum(before) / len(before), correct_before=before)

    def seconds() -> float:
        return round(elapsed + time.perf_counter() - start, 1)

    if compiled is None:
        if checkpoint is not None:
            checkpoint("scored", {**report, "seconds": seconds()}, None)
        opt = make_optimizer(optimizer, lm, threads=threads, seed=seed, proposer=proposer)
        if optimizer == "bootstrap":
            compiled = opt.compile(program, trainset=trainset)
        else:
            cut = int(len(trainset) * 0.6)
            # MIPROv2's program-aware proposer would put DETOT's whole source (~9k tokens) in every prompt:
            # beyond a small model's context, and nothing about the task
            extra = {"program_aware_proposer": False} if optimizer == "mipro" else {}
            compiled = opt.compile(program, trainset=trainset[:cut], valset=trainset[cut:], **extra)
        report["stage"] = "compiled"
        if checkpoint is not None:
            checkpoint("compiled", {**report, "seconds": seconds()}, compiled)
    after = score(compiled)
    gained = sum(a and not b for a, b in zip(after, before, strict=True))
    lost = sum(b and not a for a, b in zip(after, before, strict=True))
    inner = compiled.predictor.predict if hasattr(compiled.predictor, "predict") else compiled.predictor
    report.update(
        stage="done", accuracy_after=sum(after) / len(after), gained=gained, lost=lost,
        mcnemar_p_two_sided=1.0 if gained + lost == 0 else float(binomtest(gained, gained + lost, 0.5).pvalue),
        demos_attached=len(inner.demos), instructions=inner.signature.instructions, correct_after=after,
        seconds=seconds())
    return compiled, report


# what must match for an earlier report's scores to stand in for this run's (the rest: `_REUSED_IF_RECORDED`)
_SAME_SCORING = ("suite", "model", "adapter", "max_samples", "seed", "eval_ids")
_REUSED_IF_RECORDED = ("max_tokens", "index", "draw")


def earlier_scores(path: Path, settings: dict[str, Any], *, keys: tuple[str, ...] = _SAME_SCORING) -> dict[str, Any]:
    """The report at `path` when it scored the same problems with the same settings, else a clear error.

    Example:
        >>> earlier_scores(Path("evals/results/optimize/bootstrap.json"), settings)["correct_before"]  # doctest: +SKIP
    """
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtefactError(f"{path}: not a readable --optimize report ({type(exc).__name__}: {exc})") from None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("correct_before"), list):
        raise ArtefactError(f"{path}: no correct_before in it; pass a report written by --optimize --out")
    differ = [k for k in keys if earlier.get(k) != settings.get(k)]
    differ += [k for k in _REUSED_IF_RECORDED if k in earlier and earlier[k] != settings.get(k)]
    if differ:
        shown = ", ".join(f"{k}: {earlier.get(k)!r} there, {settings.get(k)!r} here" for k in differ
                          if k not in ("eval_ids", "train_ids"))
        ids = [k for k in differ if k in ("eval_ids", "train_ids")]
        raise DetotError(f"{path} was scored with other settings ({shown}{'; ' if shown and ids else ''}"
                         f"{'other ' + ' and '.join(ids) if ids else ''}); rerun without reusing it")
    return earlier


def _optimize(args: argparse.Namespace) -> int:
    from detot_agent.evaluation.data import load_suite
    from detot_agent.io.persist import atomic_write_text

    suite = load_suite(args.suite, data_dir=args.data_dir)
    evalset, trainset = split_for_compiling(suite.examples, eval_size=args.eval_size, train_size=args.train_size,
                                            seed=args.seed, draw=args.draw)
    settings = {"suite": suite.name, "model": args.model or "embedded SmolLM2-135M", "adapter": args.adapter,
                "max_samples": args.max_samples, "max_tokens": args.max_tokens, "seed": args.seed,
                "draw": args.draw, "index": str(args.index), "optimizer": args.optimize,
                "eval_ids": [ex.id for ex in evalset], "train_ids": [ex.id for ex in trainset],
                **({"proposer_model": args.proposer_model} if args.proposer_model and args.optimize != "bootstrap"
                   else {})}
    program_file = args.out.with_suffix(".program.json") if args.out else None
    before, resumed = None, None
    if args.before is not None:
        before = earlier_scores(args.before, settings)["correct_before"]
    if args.resume and args.out is not None and args.out.exists():
        resumed = earlier_scores(args.out, settings, keys=(*_SAME_SCORING, "optimizer", "train_ids"))
        if resumed.get("stage") == "done":
            print(f"{args.out} is complete (stage done); nothing to resume")
            return 0
        before = resumed["correct_before"]
    index = load_or_build_index(args.index, args.train, limit=args.train_limit)
    lm = local_lm(args.model, cache=False)
    program = build(index, model=args.model, max_tokens=args.max_tokens, max_samples=args.max_samples,
                    questions=[ex.question for ex in trainset], adapter=args.adapter, lm=lm)
    # the optimizers' own prompts (a data summary, instruction proposals, reflections) run far longer than a
    # word problem with its demos: they get their own engine on the same model with a longer context
    # (`--proposer-model`: another, stronger model for them; a 0.5B model proposes copied word problems)
    proposer = lm if args.optimize == "bootstrap" else local_lm(args.proposer_model or args.model, cache=False,
                                                                n_ctx=args.proposer_ctx)
    compiled, elapsed = None, 0.0
    if resumed is not None:  # the earlier run's time (runs from before stages recorded it: unknown, not counted)
        elapsed = float(resumed.get("seconds") or 0.0)
        settings["resumed_from_stage"] = resumed.get("stage")
    if resumed is not None and resumed.get("stage") == "compiled" and program_file is not None:
        compiled = program.deepcopy().load(program_file)
        print(f"resuming from the compiled program in {program_file}")

    def checkpoint(stage: str, report: dict[str, Any], prog: Any) -> None:
        if args.out is None:
            return
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if prog is not None:
            prog.save(program_file)  # before the report names the stage, so "compiled" always has its program
        atomic_write_text(args.out, json.dumps({**settings, **report}, indent=2) + "\n")

    compiled, report = compile_and_compare(program, args.optimize, evalset, trainset, lm=lm, threads=args.threads,
                                           seed=args.seed, proposer=proposer, before=before, compiled=compiled,
                                           checkpoint=checkpoint, elapsed=elapsed)
    report = {**settings, **report}
    print(f"{args.optimize} on {suite.name}: accuracy {report['accuracy_before']:.3f} -> "
          f"{report['accuracy_after']:.3f} on {len(evalset)} problems (+{report['gained']} / -{report['lost']}, "
          f"McNemar p = {report['mcnemar_p_two_sided']:.3g}); {report['demos_attached']} demos attached")
    if args.out:
        checkpoint("done", report, compiled)  # the program first, then the report naming the stage
        print(f"wrote {args.out} and {program_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m programs.math_qa", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--question", action="append", help="A word problem (repeatable).")
    ap.add_argument("--train", type=Path, help="Training problems for demos (GSM8K JSONL, MultiArith JSON, JSONL).")
    ap.add_argument("--index", type=Path, default=Path("runs/math-qa-index"), help="Where the index lives.")
    ap.add_argument("--train-limit", type=int, help="Index only the first N training problems.")
    ap.add_argument("--model", help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M).")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-samples", type=int, default=6)
    ap.add_argument("--adapter", choices=["plain", "chat"], default="plain",
                    help="Prompt layout: plain text (default) or DSPy's [[ ## field ## ]] layout.")
    ap.add_argument("--optimize", choices=OPTIMIZERS, help="Compile with a DSPy optimizer and report the "
                    "accuracy before and after on --suite (instead of answering --question).")
    ap.add_argument("--suite", default="multiarith", help="Suite for --optimize (name or file).")
    ap.add_argument("--data-dir", type=Path, help="Folder holding the known suites (else $DETOT_DATA_DIR).")
    ap.add_argument("--eval-size", type=int, default=100, help="Seeded evaluation sample (as detot eval --limit).")
    ap.add_argument("--train-size", type=int, default=50, help="Training problems, none from the evaluation sample.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draw", choices=["legacy", "nested"], default="nested",
                    help="The evaluation sample's draw (nested: detot eval's; legacy: 0.3's, the optimizers study's "
                         "problems).")
    ap.add_argument("--threads", type=int, default=2, help="Evaluation and optimizer threads.")
    ap.add_argument("--proposer-ctx", type=int, default=8192, help="Context (positions) of the engine that runs "
                    "MIPROv2's and GEPA's own prompts (llama.cpp; the program's engine keeps its default).")
    ap.add_argument("--proposer-model", help="The model that runs MIPROv2's and GEPA's own prompts (instruction "
                    "proposals, reflections); default: --model.")
    ap.add_argument("--out", type=Path, help="Write the --optimize report (JSON) and the compiled program here "
                    "(also after each stage, so --resume can go on from it).")
    ap.add_argument("--resume", action="store_true", help="Go on from the stage --out reached (scored or "
                    "compiled) when it was written with the same settings.")
    ap.add_argument("--before", type=Path, help="Take the uncompiled program's scores from this earlier "
                    "--optimize report (same suite, problems, model and settings) instead of scoring it again.")
    args = ap.parse_args(argv)
    if args.optimize is None and not args.question:
        ap.error("pass --question (repeatable), or --optimize bootstrap|mipro|gepa")
    if args.proposer_ctx < 512:
        ap.error(f"--proposer-ctx must be at least 512 positions, got {args.proposer_ctx}")
    if args.optimize is not None:
        try:
            return _optimize(args)
        except DetotError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        index = load_or_build_index(args.index, args.train, limit=args.train_limit)
        detot = build(index, model=args.model, max_tokens=args.max_tokens, max_samples=args.max_samples,
                      questions=args.question, adapter=args.adapter)
        for question in args.question:
            pred = detot(question=question)
            print(f"Q: {question}\nA: {pred.answer}  (agreement {pred.agreement:.2f} over {pred.samples_used} "
                  f"samples; votes {pred.votes}; demos {pred.demo_ids})")
    except DetotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
