"""What `update` takes and gives: `TrainingItem` (one input's evidence), `UpdateConfig` (validated settings) and
`UpdateReport` (what it did). Re-exported by `embedding/update.py`.

Example:
    >>> UpdateConfig(steps=10, head_lr=1e-3).steps
    10
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from detot_agent.config import StrictModel
from detot_agent.softprompt.loss import TuneExample

__all__ = ["Part", "TrainingItem", "UpdateConfig", "UpdateReport"]

Part = Literal["retrieval", "p0", "components", "gate"]


@dataclass(frozen=True)
class TrainingItem:
    """One training item for `update` (0.3's `Feedback`): what one input taught.

    Attributes:
        query: `(dim,)` the encoded input `e(x)` (not task-adapted).
        positives: `(p, dim)` exemplars that helped this input (retrieval side), or None.
        negatives: `(n, dim)` exemplars that did not, or None.
        example: the completion to learn for this input, with the prompt it was served with
            (soft-prompt side), or None.
    """

    query: np.ndarray
    positives: np.ndarray | None = None
    negatives: np.ndarray | None = None
    example: TuneExample | None = None


class UpdateConfig(StrictModel):
    """Settings of `update` (validated when built).

    Attributes:
        steps: LM steps for the soft-prompt side.
        retrieval_steps: steps for the retrieval side in all (cheap: vectors only).
        max_seconds: wall-time budget of the whole call (None: steps only).
        retrieval_lr / head_lr: learning rates of the two sides.
        batch_size: LM examples per step.
        temperature: the contrastive loss's score temperature.
        l2_to_init: pull of every trained tensor back to its initial value.
        dropout: dropout on the soft-prompt vectors while training.
        balance: weight of KL(mean gate weights || uniform), against collapse onto one component.
        lm_moves_retrieval: let the LM loss move the retrieval weights too (see the module docstring; 0.3's
            `couple`, still accepted with a `DeprecationWarning`).
        freeze: parts kept as they are: `retrieval`, `p0`, `components` (the bank), `gate`.
        patience / eval_every: early stopping on the validation NLL.
        yield_to_serving: serving first: before each step, wait while a serving request is in flight in any of
            this process's engines (the training engine's `serving_load`, `engines/serving.py`), at most this many
            seconds (0: never wait); and inside a step, pause at each layer boundary of the model's forward and
            backward passes while one is in flight. A step waits at most this many seconds in all (its wait
            for a lull, then its pauses, a validation pass's included, share the rest), and so does each judging
            pass before and after the steps: under serving that never lulls, training still advances. The loop's
            re-optimization sets it; the time waited is in `UpdateReport.yielded_s` and `paused_s` and counts
            in `max_seconds`.
        background_share: (with `yield_to_serving`) once a step's bound is spent, it still pauses at each layer
            boundary while serving is in flight so that it runs at most this share of the time beside serving
            (0.1: a block that took r seconds is followed by a pause of up to 9r), so a saturating client's
            requests slow by about this share of what training beside them costs; 1: the rest of the step runs
            at full speed (the rule before this setting). The pauses it took are `UpdateReport.shared_s`.
    """

    steps: int = Field(default=50, ge=1)
    retrieval_steps: int = Field(default=50, ge=1)
    max_seconds: float | None = Field(default=120.0, gt=0)
    retrieval_lr: float = Field(default=0.05, gt=0)
    head_lr: float = Field(default=3e-3, gt=0)
    batch_size: int = Field(default=4, ge=1)
    temperature: float = Field(default=0.05, gt=0)
    l2_to_init: float = Field(default=0.01, ge=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    balance: float = Field(default=0.1, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    lm_moves_retrieval: bool = False
    freeze: list[Part] = Field(default_factory=list)
    patience: int = Field(default=3, ge=1)
    eval_every: int = Field(default=10, ge=1)
    seed: int = 0
    max_length: int = Field(default=768, ge=8)
    yield_to_serving: float = Field(default=0.0, ge=0, le=60)
    background_share: float = Field(default=0.1, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """0.3's `couple` is `lm_moves_retrieval`."""
        if isinstance(data, dict) and "couple" in data:
            warnings.warn("UpdateConfig(couple=...) is deprecated; the setting is lm_moves_retrieval",
                          DeprecationWarning, stacklevel=4)
            data = {**data}
            value = data.pop("couple")
            data.setdefault("lm_moves_retrieval", value)
        return data


class UpdateReport(BaseModel):
    """What `update` did.

    Attributes:
        accepted: whether anything was kept (and `version` bumped).
        retrieval_accepted / head_accepted: each side's outcome (None: that side had nothing to learn).
        loss_before / loss_after: the retrieval side's contrastive loss (plus pull) on the feedback (NaN: none).
        lm_before / lm_after: the head's judging NLL (validation, else training items) before and after.
        steps: steps run; seconds: wall time; budget_hit: stopped by `max_seconds`.
        yielded_s / yields: seconds spent waiting for serving to go quiet before a step, and the steps that waited.
        paused_s / pauses: seconds the model's passes paused at a layer boundary while serving was in flight
            (`ServingLoad.preempting`), and how many pauses; counted in `max_seconds` like `yielded_s`.
        shared_s / shared: of those, the seconds and pauses taken once a step's bound was spent, to keep it to
            `background_share` of the time beside serving.
        stopped_early: the head stopped on validation patience.
        train_loss / val_loss: the LM loss curve and `(step, NLL)` validation points.
        gate_usage: mean gate weight of each component over the training inputs (None: no components).
        version: the task embedding's version after the call.
    """

    accepted: bool
    retrieval_accepted: bool | None = None
    head_accepted: bool | None = None
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    lm_before: float | None = None
    lm_after: float | None = None
    steps: int = 0
    seconds: float = 0.0
    budget_hit: bool = False
    yielded_s: float = 0.0
    yields: int = 0
    paused_s: float = 0.0
    pauses: int = 0
    shared_s: float = 0.0
    shared: int = 0
    stopped_early: bool = False
    train_loss: list[float] = Field(default_factory=list)
    val_loss: list[tuple[int, float]] = Field(default_factory=list)
    gate_usage: list[float] | None = None
    version: int = 0
