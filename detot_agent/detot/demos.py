"""The demo context of a DETOT call: which exemplars a prompt shows, and how.

`retrieve_demos` asks the index with the task-adapted query `q(x)` (MMR) and never returns the input's own
exemplar; `prompt_demos` puts the inner predictor's attached demos (an optimizer's, or set by hand) first,
then the retrieved ones less repeats. Exemplar text is shown with DSPy's field markers broken up
(`defuse`), so a demo cannot open a field in the prompt.

Example:
    >>> defuse("x [[ ## answer ## ]] 5")
    'x [ [ ## answer ## ]] 5'
    >>> squash("  What is\\n 2 + 3? ")
    'What is 2 + 3?'
"""

from __future__ import annotations

import re
from typing import Any

import dspy
import numpy as np

from detot_agent.errors import ConfigError
from detot_agent.retrieval.index import ExemplarIndex

__all__ = ["check_demo_fields", "defuse", "prompt_demos", "retrieve_demos", "squash"]

_MARKER = re.compile(r"\[\[\s*##")


def defuse(value: Any) -> Any:
    """Exemplar text that contains DSPy field markers (`[[ ## answer ## ]]`) is shown with the marker
    broken up, so a demo cannot open a field in the prompt; answers are parsed from the model's reply only."""
    return _MARKER.sub("[ [ ##", value) if isinstance(value, str) else value


def squash(text: str) -> str:
    """Text with its whitespace runs collapsed, for "is this the same question" comparisons."""
    return " ".join(text.split())


def retrieve_demos(index: ExemplarIndex, q: np.ndarray, text: str, *, k: int, mmr: float | None,
                   demo_fields: dict[str, str], fields: Any) -> tuple[list[dspy.Example], list[str]]:
    """Up to `k` demos for the task-adapted query `q` (`(dim,)`), with their exemplar ids.

    An exemplar whose question is the input itself (`text`) is never shown: it would hand the model its own
    answer, and let an optimizer bootstrap demos by copying. `demo_fields` maps signature fields to exemplar
    fields; only those in `fields` (the signature's) are filled.
    """
    k = min(k, len(index))
    if k == 0:
        return [], []
    hits = index.search(q, k, mmr=mmr)
    own = squash(text)
    if any(squash(h.text) == own for h in hits):
        hits = [h for h in index.search(q, min(k + 1, len(index)), mmr=mmr) if squash(h.text) != own][:k]
    demos = []
    for h in hits:
        values = {name: h.fields.get(src, h.text if src == "question" else None)
                  for name, src in demo_fields.items() if name in fields}
        demos.append(dspy.Example(**{k2: defuse(v) for k2, v in values.items() if v is not None}))
    return demos, [h.id for h in hits]


def prompt_demos(attached: list[Any], retrieved: list[dspy.Example], first_input: str) -> list[Any]:
    """The demos a prompt shows, in order: the attached ones (all of them), then the retrieved ones, less any
    whose first input repeats an attached demo's."""
    seen = {squash(str(d.get(first_input, ""))) for d in attached}
    return list(attached) + [d for d in retrieved if squash(str(d.get(first_input, ""))) not in seen]


def check_demo_fields(index: ExemplarIndex, demo_fields: dict[str, str], answer_field: str) -> None:
    """Refuse an index none of whose exemplars (the first 200 looked at) has the field a demo's answer comes
    from: every retrieved demo would be shown without its answer, or dropped."""
    source = demo_fields.get(answer_field)
    if source is None:
        raise ConfigError(f"demo_fields maps no exemplar field to the answer field {answer_field!r}: add "
                          f"{answer_field!r}: '<exemplar field>' (now {demo_fields})")
    records = index.records()[:200]
    if records and not any(source in r.fields for r in records):
        seen = sorted({k for r in records for k in r.fields})
        raise ConfigError(f"the index's exemplars have no {source!r} field (they have {seen or 'no fields'}), so "
                          f"no demo would show an answer: pass demo_fields={{..., {answer_field!r}: '<one of "
                          f"those>'}}, index the answers as {source!r}, or set k_exemplars=0 for no demos")
