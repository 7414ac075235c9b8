"""`ControllerConfig`: the settings of the optimization loop (`controller.py`), nesting the training
settings (`UpdateConfig`) and the judging rules (`ReplayRules`) instead of re-declaring them.

Example:
    >>> cfg = ControllerConfig(max_seconds=60, update={"steps": 5}, replay={"alpha": 0.01})
    >>> cfg.update.steps, cfg.update.retrieval_steps, cfg.replay.alpha
    (5, 40, 0.01)
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field, model_validator

from detot_agent.config import StrictModel
from detot_agent.detot.judging import ReplayRules
from detot_agent.detot.shadow import ShadowConfig
from detot_agent.detot.task import Policy
from detot_agent.embedding.update import UpdateConfig
from detot_agent.errors import ConfigError

__all__ = ["ControllerConfig", "upgraded"]

# flat settings of releases before 0.4.0 -> where they live now
_MOVED = {"retrieval_steps": ("update", "retrieval_steps"), "retrieval_lr": ("update", "retrieval_lr"),
          "soft_prompt_steps": ("update", "steps"), "soft_prompt_lr": ("update", "head_lr"),
          "l2_to_init": ("update", "l2_to_init"), "dropout": ("update", "dropout"), "balance": ("update", "balance"),
          "alpha": ("replay", "alpha"), "min_effect": ("replay", "min_effect"), "max_flip": ("replay", "max_flip"),
          "min_diversity": ("replay", "min_diversity"), "max_hub_share": ("replay", "max_hub_share"),
          "good_agreement": ("replay", "good_agreement")}


def _loop_update() -> UpdateConfig:
    """The training settings the loop starts from: `UpdateConfig`'s, with fewer steps (a re-optimization runs
    beside serving), and serving first: each step of the model waits up to 30 s in all for serving (a lull before
    it, pauses inside it), then runs."""
    return UpdateConfig(steps=20, retrieval_steps=40, yield_to_serving=30.0)


class ControllerConfig(StrictModel):
    """Settings of the optimization loop (validated when built, never later inside its thread).

    Attributes:
        evidence_size: answered questions kept in the buffer.
        min_evidence: records needed before a re-optimization trains anything.
        holdout_every: every n-th record is held out for judging (n >= 2, so some are trained on).
        margin: how far held-out retrieval separation may fall before the change is rolled back (proxy judge).
        min_gain: how far the held-out NLL must fall for a new soft prompt to be kept (proxy judge).
        update: how a candidate is trained (`UpdateConfig`; default: 20 LM steps, 40 retrieval steps). Its
            `max_seconds` is replaced by the loop's own: `train_share` of `max_seconds`.
        replay: the judging rules and the notion of a good answer (`ReplayRules`, `detot/judging.py`).
        max_seconds: wall-time budget of one re-optimization, training and replay together (None: none);
            past it the re-optimization stops and the old state keeps serving. A replay judgement runs the
            pipeline twice per item: on a 2-core CPU with a 0.5B model that is tens of seconds an item, so
            raise this (or lower `replay_items`) there, or every re-optimization ends on the budget.
        train_share: the share of `max_seconds` training may use (the rest is for judging).
        replay_items: held-out evidence records replayed per judgement (the canary set comes on top).
        negatives_per_query: exemplars ranked just below a record's demos used as negatives.
        policies: reasoning strategies and vote weightings (`Policy`) the loop may switch to. After the
            embedding step of each re-optimization, every listed policy other than the serving one is judged
            against the serving state by paired replay on **gold items only** (held-out records given
            feedback, and the canary set), each test spending the error budget, each with its own
            `max_seconds`; the first that passes is published (one change per re-optimization). Under
            `judging="shadow"` each listed policy is instead shadow-judged, first (it needs no training): a
            trigger with no trial running proposes the first policy whose evidence does not decide yet, and
            trains the embedding only once every policy is decided. Empty (the default): the loop never changes
            how the task reasons or votes. Needs a replaying controller (inside `DETOT`); `pot` and `mix` need a
            batched engine.
        judging: how a trained candidate is judged: `replay` (paired replay of held-out and canary items, at
            the halving error budget of `replay.alpha`) or `shadow` (a share of live requests is also answered by
            the candidate in the background; each gold answer that arrives is one paired outcome of an
            always-valid sequential test with one error budget for the service's life: `detot/shadow.py`).
        shadow: shadow judging's settings (`ShadowConfig`: share, the test's rules, the collapse veto).

    The flat names of earlier releases (`soft_prompt_steps`, `alpha`, ...) are still accepted when building,
    with a `DeprecationWarning` naming where each lives now.

    Example:
        >>> ControllerConfig(update={"steps": 5}).update.steps, ControllerConfig().replay.alpha
        (5, 0.05)
    """

    evidence_size: int = Field(default=200, ge=1)
    min_evidence: int = Field(default=6, ge=2)
    holdout_every: int = Field(default=3, ge=2)
    margin: float = Field(default=0.02, ge=0)
    min_gain: float = Field(default=0.0, ge=0)
    update: UpdateConfig = Field(default_factory=_loop_update)
    replay: ReplayRules = Field(default_factory=ReplayRules)
    max_seconds: float | None = Field(default=120.0, gt=0)
    train_share: float = Field(default=0.5, gt=0, lt=1)
    negatives_per_query: int = Field(default=6, ge=1)
    replay_items: int = Field(default=16, ge=1)
    policies: list[Policy] = Field(default_factory=list)
    judging: Literal["replay", "shadow"] = "replay"
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """A partial `update` dict is laid over the loop's training defaults (not `UpdateConfig`'s); the flat
        names of earlier releases move to their new homes, with a warning."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        nested: dict[str, dict[str, Any]] = {"update": {}, "replay": {}}
        for old in [k for k in data if k in _MOVED]:
            part, new = _MOVED[old]
            nested[part][new] = data.pop(old)
            warnings.warn(f"ControllerConfig({old}=...) is deprecated; use ControllerConfig({part}={{{new!r}: ...}})",
                          DeprecationWarning, stacklevel=4)
        for part, values in nested.items():
            given = data.get(part)
            if isinstance(given, StrictModel):
                base = given.model_dump()
            else:
                base = {**(_loop_update().model_dump() if part == "update" else {}), **dict(given or {})}
            if values or part in data or part == "update":
                data[part] = {**base, **values}
        return data

    @model_validator(mode="after")
    def _enough_to_hold_out(self) -> ControllerConfig:
        if self.min_evidence < self.holdout_every:
            raise ConfigError(f"min_evidence ({self.min_evidence}) must be at least holdout_every "
                              f"({self.holdout_every}), or no record is ever held out")
        if self.evidence_size < self.min_evidence:
            raise ConfigError(f"evidence_size ({self.evidence_size}) is below min_evidence ({self.min_evidence}): "
                              "the loop could never run")
        return self


def upgraded(config: Any) -> ControllerConfig:
    """A `ControllerConfig` unpickled from a program saved by 0.3 (flat fields, no `update`/`replay`), rebuilt
    in this release's shape (pickles restore attributes without validation); a current one is returned as is."""
    if isinstance(config, ControllerConfig) and "update" in vars(config) and "replay" in vars(config):
        return config
    return ControllerConfig(**{k: v for k, v in vars(config).items() if not k.startswith("_")})

