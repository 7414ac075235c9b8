"""Eval suites: named data sets or files, read into `dspy.Example`s with stable ids and normalised gold.

A suite is a path (layout detected, or `fmt=`), a known name (`gsm8k`, `multiarith`, `svamp`,
`addsub`, `singleeq`) looked up under a data folder (`data_dir=` or `$DETOT_DATA_DIR`), or
`hf:<dataset>[:<config>][@<split>]` read with Hugging Face `datasets` when that package and a hub
(or its local cache) are available. Every example has `id`, `question` (the input) and `answer`
(gold, normalised by the answer format), plus any other fields of the record.

Example:
    >>> import json, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "test.jsonl"
    >>> _ = p.write_text(json.dumps({"question": "2+2?", "answer": "2+2=4\\n#### 4"}) + "\\n")
    >>> suite = load_suite(str(p))
    >>> suite.name, suite.examples[0].id, suite.examples[0].answer, suite.examples[0].inputs().keys()
    ('test', 'test:1', '4', ['question'])
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from detot_agent.answers import AnswerFormat, normalize
from detot_agent.errors import DataFileError
from detot_agent.io.datafiles import DataFormat, read_exemplars

__all__ = ["KNOWN_SUITES", "Suite", "draw_canary", "load_suite", "sample_examples"]

# name -> candidate files under the data folder (first that exists wins)
KNOWN_SUITES: dict[str, list[str]] = {
    "gsm8k": ["gsm8k/test.jsonl", "gsm8k/gsm8k_test.jsonl", "gsm8k.jsonl"],
    "multiarith": ["multiarith/MultiArith.json", "MultiArith/MultiArith.json", "MultiArith.json"],
    "svamp": ["svamp/SVAMP.json", "SVAMP/SVAMP.json", "SVAMP.json"],
    "addsub": ["addsub/AddSub.json", "AddSub/AddSub.json", "AddSub.json"],
    "singleeq": ["singleeq/questions.json", "SingleEq/questions.json", "singleeq/SingleEq.json"],
}


@dataclass
class Suite:
    """A loaded suite: its name, where it came from, the answer format and the examples."""

    name: str
    source: str
    answer_format: AnswerFormat
    examples: list[dspy.Example] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


def _data_dirs(data_dir: str | Path | None) -> list[Path]:
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get("DETOT_DATA_DIR"):
        dirs.append(Path(os.environ["DETOT_DATA_DIR"]))
    return dirs


def _resolve(suite: str, data_dir: str | Path | None) -> Path:
    path = Path(suite).expanduser()
    if path.is_file():
        return path
    name = suite.lower()
    if name in KNOWN_SUITES:
        dirs = _data_dirs(data_dir)
        tried = [d / rel for d in dirs for rel in KNOWN_SUITES[name]]
        for candidate in tried:
            if candidate.is_file():
                return candidate
        where = f"looked in {', '.join(str(t) for t in tried)}" if tried else \
            "no --data-dir given and $DETOT_DATA_DIR unset"
        raise DataFileError(f"suite {suite!r}: no data file found ({where}); pass --data-dir DIR "
                            f"holding {KNOWN_SUITES[name][0]}, or the file's path as --suite")
    known = ", ".join(KNOWN_SUITES)
    raise DataFileError(f"suite {suite!r} is neither a file nor a known name ({known}, or hf:<dataset>)")


def _hf_examples(spec: str, *, question_field: str, answer_field: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataFileError(f"suite {spec!r} needs the `datasets` package: pip install datasets") from None
    body = spec[3:]
    name, _, split = body.partition("@")
    path, _, config = name.partition(":")
    try:
        data = datasets.load_dataset(path, config or None, split=split or "test")
    except Exception as exc:  # offline, unknown name, ...: one readable line
        raise DataFileError(f"suite {spec!r}: Hugging Face datasets could not load it ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    rows = []
    for i, row in enumerate(data):
        if question_field not in row or answer_field not in row:
            raise DataFileError(f"suite {spec!r} row {i}: needs fields {question_field!r} and {answer_field!r} "
                                f"(has {sorted(row)}); pass --question-field / --answer-field")
        rows.append({"id": f"{path.split('/')[-1]}:{i}", **row})
    return rows


def load_suite(
    suite: str,
    *,
    data_dir: str | Path | None = None,
    fmt: DataFormat | str | None = None,
    answer_format: AnswerFormat | str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    labels: list[str] | None = None,
) -> Suite:
    """Load a suite into examples with inputs `question` and a normalised `answer`.

    Args:
        suite: a file path, a known name, or `hf:<dataset>[:<config>][@<split>]`.
        data_dir: folder holding the known suites (else `$DETOT_DATA_DIR`).
        fmt: file layout (`gsm8k`, `multiarith`, `jsonl`); detected when None.
        answer_format: how gold answers are normalised; `number` for the arithmetic suites, `label`
            when `labels` are given, else `number` if every gold answer parses as a number, else `text`.
        question_field / answer_field / id_field: field mapping for generic JSONL and hub data sets.
        labels: the label set of a classification suite.
    """
    if suite.startswith("hf:"):
        rows = _hf_examples(suite, question_field=question_field, answer_field=answer_field)
        records = [(str(r["id"]), str(r[question_field]), str(r[answer_field]), r) for r in rows]
        source, name = suite, suite[3:].split("@")[0].replace("/", "_").replace(":", "_")
    else:
        path = _resolve(suite, data_dir)
        exemplars = read_exemplars(path, fmt=fmt, text_field=question_field, answer_field=answer_field,
                                   id_field=id_field)
        records = []
        for ex in exemplars:
            if "answer" not in ex.fields:
                raise DataFileError(f"{path} record {ex.id}: no gold answer (field {answer_field!r}); "
                                    "pass --answer-field")
            records.append((ex.id, ex.text, str(ex.fields["answer"]), ex.fields))
        source = str(path)
        name = suite.lower() if suite.lower() in KNOWN_SUITES else path.stem
    if answer_format is None:
        if labels:
            answer_format = AnswerFormat.LABEL
        elif all(normalize(gold, AnswerFormat.NUMBER) is not None for _, _, gold, _ in records):
            answer_format = AnswerFormat.NUMBER
        else:
            answer_format = AnswerFormat.TEXT
    form = AnswerFormat(answer_format)
    if form is AnswerFormat.LABEL and not labels:
        labels = sorted({gold.strip() for _, _, gold, _ in records})
    examples = []
    seen: set[str] = set()
    for ident, question, gold, extra in records:
        if ident in seen:
            raise DataFileError(f"{source}: duplicate id {ident!r}; ids must be unique (pass --id-field)")
        seen.add(ident)
        key = normalize(gold, form, labels=labels or ())
        if key is None:
            raise DataFileError(f"{source} record {ident}: gold answer {gold!r} is not a valid {form.value}"
                                + (f" (labels: {', '.join(labels or [])})" if form is AnswerFormat.LABEL else ""))
        rest = {k: v for k, v in extra.items() if k not in ("id", "question", "answer") and _plain(v)}
        examples.append(dspy.Example(id=ident, question=question, answer=key, gold_raw=gold, **rest)
                        .with_inputs("question"))
    if not examples:
        raise DataFileError(f"{source} holds no examples")
    return Suite(name=name, source=source, answer_format=form, examples=examples, labels=list(labels or []))


def _plain(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


DRAWS = ("nested",)  # 0.3's `legacy` draw (not nested) was removed in 0.4 with the runs that used it


def sample_examples(examples: list[dspy.Example], *, limit: int | None, seed: int,
                    draw: str = "nested", offset: int = 0) -> list[dspy.Example]:
    """A seeded sample of `limit` examples (all of them, in file order, when `limit` is None).

    `nested` (the default): the first `limit` of one seeded permutation, in that order, so a smaller
    `limit` is a prefix of a larger one with the same seed. `offset` skips that many of the permutation
    first: `offset=300, limit=50` is a development split disjoint from `limit=300` (same seed), on which
    settings can be chosen before the reported run. (0.3's `legacy` draw, `random.sample` in file order,
    was removed in 0.4.)

    Example:
        >>> xs = [dspy.Example(id=str(i)) for i in range(20)]
        >>> small, large = sample_examples(xs, limit=5, seed=0), sample_examples(xs, limit=10, seed=0)
        >>> small == large[:5]
        True
        >>> dev = sample_examples(xs, limit=5, seed=0, offset=10)
        >>> set(x.id for x in dev) & set(x.id for x in large)
        set()
    """
    if draw == "legacy":
        raise DataFileError("the legacy draw was removed in 0.4 (with the runs that used it); a run folder started "
                            "on it can still be reported (`detot eval report DIR`), not resumed: start a new run")
    if draw not in DRAWS:
        raise DataFileError(f"draw must be one of {', '.join(DRAWS)}, got {draw!r}")
    if limit is not None and limit <= 0:
        raise DataFileError(f"--limit must be positive, got {limit}")
    if offset < 0:
        raise DataFileError(f"--offset must be >= 0, got {offset}")
    if offset and offset >= len(examples):
        raise DataFileError(f"--offset {offset} skips all {len(examples)} problems of the suite; lower it")
    if limit is None and not offset:
        return list(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    end = None if limit is None else offset + limit
    return [examples[i] for i in order[offset:end]]


def draw_canary(pool: list[dspy.Example], run: list[dspy.Example], *, size: int, seed: int,
                draw: str = "nested") -> list[tuple[str, str]]:
    """A seeded canary set of `size` `(question, gold)` pairs from `pool`, none of them a problem of `run`
    (`draw` as in `sample_examples`: a resumed run draws its canary set as it first did).

    Example:
        >>> pool = [dspy.Example(question=f"q{i}", answer=str(i)) for i in range(5)]
        >>> sorted(draw_canary(pool, [dspy.Example(question="q1")], size=4, seed=0))
        [('q0', '0'), ('q2', '2'), ('q3', '3'), ('q4', '4')]
    """
    if size < 1:
        raise DataFileError(f"--canary-size must be >= 1, got {size}")
    asked = {" ".join(ex.question.split()) for ex in run}
    left = [ex for ex in pool if " ".join(ex.question.split()) not in asked]
    if len(left) < size:
        raise DataFileError(f"only {len(left)} canary problems are not in the run; lower --canary-size ({size})")
    return [(ex.question, ex.answer) for ex in sample_examples(left, limit=size, seed=seed + 1, draw=draw)]
