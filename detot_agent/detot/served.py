"""Training pairs in the context DETOT serves them in: each question behind the demos DETOT would retrieve for it.

A soft prompt trained on the question alone is served behind retrieved demos; `served_examples` builds each
training prompt with `DETOT.prompt` instead (the task embedding's query, MMR, never the question's own
exemplar, the plain prompt), so what the soft prompt learns after is what it will see. The task embedding's
retrieval side is not trained by the LM loss (`embedding/update.py`, `lm_moves_retrieval=False`), so the demos
a question trains with stay the ones it is served with.

Example:
    >>> pairs = served_examples(te, index, questions, targets, k=3)          # doctest: +SKIP
    >>> [m["role"] for m in pairs[0].messages]                               # doctest: +SKIP
    ['user', 'assistant', 'user', 'assistant', 'user', 'assistant', 'user']
"""

from __future__ import annotations

from collections.abc import Sequence

from detot_agent.detot.adapters import PlainAdapter
from detot_agent.detot.module import DETOT
from detot_agent.detot.task import TaskProfile, analyze
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.errors import ConfigError
from detot_agent.retrieval.index import ExemplarIndex
from detot_agent.softprompt.loss import TuneExample

__all__ = ["served_examples"]


def served_examples(te: TaskEmbedding, index: ExemplarIndex, questions: Sequence[str], targets: Sequence[str], *,
                    k: int) -> list[TuneExample]:
    """`TuneExample`s whose messages are what plain-prompt `DETOT` shows for each question with `k` demos.

    Args:
        te: the task embedding whose query picks the demos (its soft prompt is what will train on these).
        index: exemplars with `question`, `rationale` and `answer` fields (as `detot index build` writes them).
        questions / targets: the training questions and the worked answers to learn, pairwise.
        k: demos per prompt (0: the question alone, as DETOT serves it without demos).
    """
    if len(questions) != len(targets):
        raise ConfigError(f"served_examples needs one target per question, got {len(questions)} questions and "
                          f"{len(targets)} targets")
    profile = TaskProfile(name=te.task, description=te.task)
    program = DETOT("question -> answer", task=profile, index=index, task_embedding=te, adapter=PlainAdapter(),
                    adjustments=analyze(profile, k_exemplars=k), background=False)
    return [TuneExample(messages=program.prompt(question=q), target=t) for q, t in zip(questions, targets, strict=True)]
