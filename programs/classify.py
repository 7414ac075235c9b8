"""DETOT for a label-set task: any JSONL with a text and a label field.

    python -m programs.classify --train train.jsonl --test test.jsonl --labels positive,negative \
        --text-field text --label-field label

Demos are the training rows nearest the input (through the task embedding); answers are
normalised onto the label set (case, punctuation, synonyms given as `label=syn1|syn2`), and
several samples vote. With --test, prints each prediction and the accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detot_agent import DETOT, Encoder, ExemplarIndex, TaskProfile, analyze, local_lm
from detot_agent.answers import AnswerFormat, normalize_label
from detot_agent.detot.task import TaskKind
from detot_agent.errors import DetotError
from detot_agent.io.datafiles import read_exemplars


def parse_labels(spec: str) -> tuple[list[str], dict[str, list[str]]]:
    """`"pos=good|great,neg"` -> (["pos", "neg"], {"pos": ["good", "great"]})."""
    labels, synonyms = [], {}
    for item in spec.split(","):
        name, _, syn = item.strip().partition("=")
        if not name:
            continue
        labels.append(name)
        if syn:
            synonyms[name] = [s for s in syn.split("|") if s]
    if len(labels) < 2:
        raise DetotError(f"--labels needs at least two labels, got {spec!r}")
    return labels, synonyms


def build(train: Path, labels: list[str], synonyms: dict[str, list[str]], *, text_field: str, label_field: str,
          model: str | None, max_tokens: int) -> DETOT:
    """DETOT over an index of the labelled training rows."""
    rows = read_exemplars(train, fmt="jsonl", text_field=text_field, answer_field=label_field)
    index = ExemplarIndex(Encoder())
    index.add(rows)
    task = TaskProfile(name="classify", description=f"Classify the text as one of: {', '.join(labels)}.",
                       kind=TaskKind.CLASSIFICATION, answer_format=AnswerFormat.LABEL, labels=labels,
                       label_synonyms=synonyms)
    adjustments = analyze(task, [r.text for r in rows[:5]], max_tokens=max_tokens)
    return DETOT("question -> answer", task=task, index=index, lm=local_lm(model, cache=False),
                 adjustments=adjustments, background=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m programs.classify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True, help="Labelled JSONL (the demo pool).")
    ap.add_argument("--labels", required=True, help="Comma-separated labels, optionally label=syn1|syn2.")
    ap.add_argument("--test", type=Path, help="Labelled JSONL to classify and score.")
    ap.add_argument("--text", action="append", default=[], help="A text to classify (repeatable).")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--label-field", default="label")
    ap.add_argument("--limit", type=int, help="Classify only the first N test rows.")
    ap.add_argument("--model", help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M).")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    try:
        labels, synonyms = parse_labels(args.labels)
        detot = build(args.train, labels, synonyms, text_field=args.text_field, label_field=args.label_field,
                      model=args.model, max_tokens=args.max_tokens)
        items = [(t, None) for t in args.text]
        if args.test:
            rows = read_exemplars(args.test, fmt="jsonl", text_field=args.text_field, answer_field=args.label_field)
            items += [(r.text, r.fields.get("answer")) for r in rows[:args.limit]]
        if not items:
            raise DetotError("nothing to classify: pass --text or --test")
        right = scored = 0
        for text, gold in items:
            pred = detot(question=text)
            line = f"{pred.answer_key or '(none)':>12}  votes {pred.votes}  {text[:60]!r}"
            if gold is not None:
                gold_key = normalize_label(str(gold), labels, synonyms)
                if gold_key is None:
                    raise DetotError(f"{args.test}: gold label {gold!r} is not in --labels ({', '.join(labels)})")
                scored += 1
                right += int(gold_key == pred.answer_key)
                line += f"  gold {gold_key} {'ok' if gold_key == pred.answer_key else '--'}"
            print(line)
        if scored:
            print(f"accuracy {right}/{scored} = {right / scored:.3f}")
    except DetotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
