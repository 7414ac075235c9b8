"""A candidate configuration applied to a DETOT: a copy of the program whose adjustments and task embedding are the
candidate's. The copy shares the index, encoder, LM and engine (`PersistentModule.__deepcopy__`); what it changes is
what a DSPy `save` carries (adjustments and the task embedding), so shipping a choice is serving this copy's state.

Example:
    >>> fitted = configured(detot, Choice(name="plain", k=0, weighting="cisc", stopping="fixed"),
    ...                     embedding=None, budget=6)                                  # doctest: +SKIP
    >>> fitted.adjustments.k_exemplars, fitted.task_embedding.has_head                # doctest: +SKIP
    (0, False)
"""

from __future__ import annotations

import copy
from typing import Any

from detot_agent.detot.module import DETOT
from detot_agent.detot.records import TaskState
from detot_agent.detot.task import Adjustments, StoppingRule
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.errors import ConfigError
from detot_agent.fit.config import PLAIN, Choice

__all__ = ["adjusted", "configured", "without_head"]


def without_head(embedding: TaskEmbedding) -> TaskEmbedding:
    """A copy of `embedding` that serves no soft prompt (its retrieval side kept)."""
    clone = copy.deepcopy(embedding)
    clone.head, clone.model_id = None, None
    return clone


def adjusted(base: Adjustments, choice: Choice, *, budget: int) -> Adjustments:
    """`base` with the choice's settings; `plain` draws its whole budget (the greedy answer first) and votes it."""
    if (choice.strategy == "direct") != (base.strategy == "direct") and choice.strategy is not None:
        raise ConfigError(f"candidate {choice.name!r}: strategy {choice.strategy!r} needs another inner predictor "
                          f"than the program's {base.strategy!r} (direct answers vs reasoning); leave strategy unset "
                          "or build the DETOT with it")
    values: dict[str, Any] = {"k_exemplars": choice.k, "max_samples": budget}
    if choice.temperature is not None:
        values["temperature"] = choice.temperature
    if choice.strategy is not None:
        values["strategy"] = choice.strategy
    if choice.weighting is not None:
        values["weighting"] = choice.weighting
    if choice.stopping is not None:
        values["stopping"] = choice.stopping
    if choice.name == PLAIN or choice.stopping is StoppingRule.FIXED:
        values.update(min_samples=budget, greedy_first=True, stopping=StoppingRule.FIXED)
    else:
        values["min_samples"] = min(base.min_samples, budget)
    return base.model_copy(update=values)


def configured(program: DETOT, choice: Choice, *, embedding: TaskEmbedding | None, budget: int) -> DETOT:
    """A copy of `program` serving `choice` with `embedding` (None: no task embedding) as a new version.

    Raises:
        ConfigError: demos asked of an empty index, or a strategy the program's predictor cannot serve.
    """
    if choice.k > 0 and len(program.index) == 0:
        raise ConfigError(f"candidate {choice.name!r} retrieves {choice.k} demos but the program's exemplar index is "
                          "empty: add exemplars or race k = 0 only")
    adjustments = Adjustments.model_validate(adjusted(program.adjustments, choice, budget=budget).model_dump())
    clone = copy.deepcopy(program)
    clone.adjustments = adjustments
    state = program.controller.state
    clone.controller.restore(TaskState(state.version + 1, embedding, None))
    clone.controller.k = choice.k
    clone.background = False  # a candidate answers the race; it does not re-optimize
    return clone
