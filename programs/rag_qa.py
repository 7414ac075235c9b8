"""RAG over this project's own documentation: `TaskRetriever` finds passages, DETOT answers.

    python -m programs.rag_qa --question "Which command runs the tests?" --expect "make test"

The corpus is written by the program itself: the repository's markdown files split into
passages (one per paragraph, headed by its section title). `--expect TEXT` plays the user who
knows the answer: the passages containing TEXT are marked helpful, `TaskRetriever.feedback`
adapts the task embedding, and the program shows the helpful passage's rank before and after.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import dspy

from detot_agent import DETOT, Encoder, ExemplarIndex, TaskProfile, TaskRetriever, analyze, local_lm
from detot_agent.answers import AnswerFormat
from detot_agent.detot.task import TaskKind
from detot_agent.errors import DetotError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "CHANGELOG.md", "programs/README.md", "evals/README.md"]


def write_corpus(out: Path, *, root: Path = ROOT, max_words: int = 120) -> list[dict[str, str]]:
    """Split the markdown docs into passages, write them as JSONL to `out`, and return them."""
    passages: list[dict[str, str]] = []
    for rel in DOCS:
        path = root / rel
        if not path.is_file():
            continue
        title = rel
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            block = block.strip()
            if not block:
                continue
            if block.startswith("#"):
                heading, _, block = block.partition("\n")
                title = f"{rel}: {heading.lstrip('#').strip()}"
                if not block.strip():
                    continue
            words = block.split()
            for start in range(0, len(words), max_words):
                text = " ".join(words[start:start + max_words])
                passages.append({"id": f"{rel}#{len(passages)}", "text": f"{title}. {text}"})
    if not passages:
        raise DetotError(f"no documentation found under {root}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p) + "\n" for p in passages), encoding="utf-8")
    return passages


class DocsQA(dspy.Module):
    """Retrieve passages with the task-adapted retriever, answer with DETOT over them."""

    def __init__(self, retriever: TaskRetriever, answerer: DETOT) -> None:
        super().__init__()
        self.retrieve = retriever
        self.answer = answerer

    def forward(self, question: str) -> dspy.Prediction:
        found = self.retrieve(question)
        context = "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(found.passages))
        pred = self.answer(context=context, question=question)
        return dspy.Prediction(answer=pred.answer, passage_ids=list(found.ids), agreement=pred.agreement)


def build(corpus: list[dict[str, str]], *, model: str | None, k: int, max_tokens: int) -> DocsQA:
    """Index the passages and wire retriever and DETOT together."""
    index = ExemplarIndex(Encoder())
    index.add(corpus)
    task = TaskProfile(name="docs-qa", description="Answer questions about detot-agent from the given passages.",
                       kind=TaskKind.OPEN_QA, answer_format=AnswerFormat.TEXT)
    # the passages are the context, not demos: DETOT retrieves no exemplars here
    adjustments = analyze(task, [], max_tokens=max_tokens, k_exemplars=0)
    answerer = DETOT("context, question -> answer", task=task, index=index, lm=local_lm(model, cache=False),
                     adjustments=adjustments, background=False)
    return DocsQA(TaskRetriever(index, k=k), answerer)


def rank_of(retriever: TaskRetriever, question: str, ids: set[str]) -> int | None:
    """1-based rank of the first of `ids` among the top 50 passages (None if absent)."""
    found = retriever(question, k=min(50, len(retriever.index)))
    return next((i + 1 for i, pid in enumerate(found.ids) if pid in ids), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m programs.rag_qa", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--question", required=True)
    ap.add_argument("--expect", help="Text the right passage contains: gives retrieval feedback.")
    ap.add_argument("--corpus", type=Path, default=Path("runs/docs-corpus.jsonl"), help="Where passages go.")
    ap.add_argument("--k", type=int, default=3, help="Passages per question.")
    ap.add_argument("--model", help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M).")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    try:
        corpus = write_corpus(args.corpus)
        qa = build(corpus, model=args.model, k=args.k, max_tokens=args.max_tokens)
        pred = qa(question=args.question)
        print(f"Q: {args.question}\nA: {pred.answer}  (agreement {pred.agreement:.2f}; passages {pred.passage_ids})")
        if args.expect:
            helpful = {p["id"] for p in corpus if args.expect.lower() in p["text"].lower()}
            if not helpful:
                raise DetotError(f"no passage contains {args.expect!r}; nothing to give feedback on")
            before = rank_of(qa.retrieve, args.question, helpful)
            report = qa.retrieve.feedback(args.question, helpful_ids=sorted(helpful))
            after = rank_of(qa.retrieve, args.question, helpful)
            print(f"feedback: {len(helpful)} helpful passage(s); update {'accepted' if report.accepted else 'refused'}"
                  f"; best helpful rank {before} -> {after}")
    except DetotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
