"""What every compared method shares: the `EvalContext` (LM, exemplar pool, budgets) and the
`MethodRunner` base class that answers one example and reports what it spent.

Example:
    >>> EvalContext(lm=None).key("7.0")
    '7'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
import torch

from detot_agent.answers import extract_number, normalize
from detot_agent.detot.adapters import LenientChatAdapter
from detot_agent.detot.task import AnswerFormat, Policy
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.engines.generation import text_seed
from detot_agent.errors import ConfigError
from detot_agent.retrieval.encoder import Encoder
from detot_agent.retrieval.index import ExemplarIndex

__all__ = ["SIGNATURE", "EvalContext", "MethodRunner", "count_tokens", "sample_seed"]

SIGNATURE = "question -> answer"


@dataclass
class EvalContext:
    """What every method shares: the LM, the exemplar pool, the suite's answer format, budgets."""

    lm: Any
    answer_format: AnswerFormat = AnswerFormat.NUMBER
    labels: list[str] = field(default_factory=list)
    index: ExemplarIndex | None = None
    encoder: Encoder | None = None
    k: int = 3
    n: int = 5
    temperature: float = 0.7
    max_tokens: int = 256
    seed: int = 0
    soft_prompt: torch.Tensor | None = None
    task_embedding: TaskEmbedding | None = None
    task_name: str = "task"
    feedback: str = "none"  # "gold": DETOT methods get each problem's gold answer after answering it
    reopt_seconds: float | None = None  # the loop's budget per re-optimization (None: ControllerConfig's)
    canary: list[tuple[str, str]] = field(default_factory=list)  # (question, gold): replayed by every judgement
    reopt_cooldown: int | None = None  # answers between two re-optimizations of a looping method (None: default)
    loop_policies: list[Policy] = field(default_factory=list)  # what the loop may switch to (ControllerConfig)
    replay_items: int | None = None  # held-out records replayed per judgement (None: ControllerConfig's)
    judging: str = "replay"  # or "shadow": a looping method's candidates answer a share of live requests too
    shadow_share: float | None = None  # that share (None: ShadowConfig's)
    shadow_settings: dict[str, Any] = field(default_factory=dict)  # other ShadowConfig fields (`--shadow K=V`)
    no_soft_prompt: bool = False  # `--soft-prompt none`: the DETOT methods run without soft-prompt vectors
    strategy: str | None = None  # the DETOT methods' reasoning strategy (None: task analysis decides)
    weighting: str | None = None  # the DETOT methods' vote weighting (None: task analysis decides)
    questions: list[str] = field(default_factory=list)
    events_dir: Path | None = None
    fit: str | None = None  # a fit folder (`detot fit`): the DETOT methods serve its choice and task embedding

    def key(self, answer: Any) -> str | None:
        """The normalised vote key of a raw answer."""
        return None if answer is None else normalize(str(answer), self.answer_format, labels=self.labels)

    def pool(self) -> list[dspy.Example]:
        """The exemplar pool as labelled demos (question, reasoning, answer)."""
        if self.index is None:
            raise ConfigError("this method needs an exemplar pool: pass --index DIR (build one with "
                              "`detot index build --data TRAIN_FILE --out DIR`)")
        out = []
        for rec in self.index.records():
            f = rec.fields
            demo = {"question": f.get("question", rec.text), "answer": f.get("answer")}
            if f.get("rationale"):
                demo["reasoning"] = f["rationale"]
            if demo["answer"] is not None:
                out.append(dspy.Example(id=rec.id, **demo).with_inputs("question"))
        if not out:
            raise ConfigError("the exemplar index holds no records with an `answer` field to use as demos")
        return out


def sample_seed(text: str, i: int) -> int:
    """The seed of sample `i` of a question (reproducible, distinct per sample)."""
    return (text_seed(text) + i) % (2**31)


class MethodRunner:
    """Answers one example; returns a record of the answer and what it cost."""

    name = "base"
    stateful = False  # True: the method learns while it runs (its state is saved and restored on resume)
    needs_index = False  # True: the method draws demos from the exemplar pool (`--index`)

    def __init__(self, ctx: EvalContext) -> None:
        self.ctx = ctx
        self.adapter = LenientChatAdapter()
        self.greedy = ctx.lm.copy(temperature=0.0, max_tokens=ctx.max_tokens)

    def config(self) -> dict[str, Any]:
        """The method's settings, for the report."""
        return {"max_tokens": self.ctx.max_tokens, "temperature": 0.0}

    def __call__(self, example: dspy.Example) -> dict[str, Any]:
        raise NotImplementedError

    def _call(self, program: Any, lm: Any, question: str, demos: list[dspy.Example] | None = None
              ) -> tuple[Any, int, bool]:
        """(raw answer or None, output tokens, parsed) for one DSPy call."""
        kwargs: dict[str, Any] = {"question": question}
        if demos is not None:
            kwargs["demos"] = demos
        with dspy.context(lm=lm, adapter=self.adapter, track_usage=True):
            try:
                pred = program(**kwargs)
            except dspy.utils.exceptions.AdapterParseError as exc:
                raw = str(exc.lm_response or "")
                value = extract_number(raw) if self.ctx.answer_format is AnswerFormat.NUMBER else (None, False)
                return (value[0] if value[1] else None), count_tokens(raw, lm), False
        usage = pred.get_lm_usage() or {}
        tokens = sum(int(u.get("completion_tokens") or 0) for u in usage.values())
        return pred.answer, tokens, True

    def _record(self, answer: Any, *, tokens: int, samples: int, parse_failures: int, **extra: Any
                ) -> dict[str, Any]:
        return {"answer": None if answer is None else str(answer), "pred": self.ctx.key(answer), "tokens": tokens,
                "samples": samples, "parse_failures": parse_failures, **extra}


def count_tokens(raw: str, lm: Any) -> int:
    """Tokens of `raw` under the LM's engine tokenizer (0 when it has none)."""
    engine = getattr(lm, "engine", None)
    tok = getattr(engine, "tokenizer", None)
    return len(tok(raw)["input_ids"]) if tok is not None and raw else 0
