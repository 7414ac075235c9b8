"""DETOT on arithmetic word problems: demos retrieved from a training file, voting, soft prompt.

    python -m programs.math_qa --train ../shared/data/gsm8k/train.jsonl \
        --question "Tom has 3 apples and buys 5 more. How many apples does he have?"

The first run embeds the training file into an index (saved under --index and reused).
Prompts are plain text by default (`PlainAdapter`: demos and replies end in "The answer is N."),
which small local models follow better than DSPy's field layout; `--adapter chat` uses the latter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
          questions: list[str], adapter: str = "plain") -> DETOT:
    """A DETOT module for numeric answers on a local model."""
    lm = local_lm(model, cache=False)
    task = TaskProfile(name="math", description="Solve arithmetic word problems step by step.",
                       kind=TaskKind.ARITHMETIC, answer_format=AnswerFormat.NUMBER)
    adjustments = analyze(task, questions, max_tokens=max_tokens, max_samples=max_samples)
    layout = PlainAdapter() if adapter == "plain" else LenientChatAdapter()
    return DETOT("question -> answer", task=task, index=index, lm=lm, adjustments=adjustments, background=False,
                 adapter=layout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m programs.math_qa", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--question", action="append", required=True, help="A word problem (repeatable).")
    ap.add_argument("--train", type=Path, help="Training problems for demos (GSM8K JSONL, MultiArith JSON, JSONL).")
    ap.add_argument("--index", type=Path, default=Path("runs/math-qa-index"), help="Where the index lives.")
    ap.add_argument("--train-limit", type=int, help="Index only the first N training problems.")
    ap.add_argument("--model", help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M).")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-samples", type=int, default=6)
    ap.add_argument("--adapter", choices=["plain", "chat"], default="plain",
                    help="Prompt layout: plain text (default) or DSPy's [[ ## field ## ]] layout.")
    args = ap.parse_args(argv)
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
