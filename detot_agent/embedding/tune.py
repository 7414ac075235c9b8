"""`tune`: train one static soft prompt (a `SoftPrompt`) with the model frozen, through the one training loop.

A thin wrapper over `update` (`embedding/update.py`): the soft prompt becomes the `P0` of a static
soft-prompt head (no components, no gate; the L2 pull anchored at the soft prompt's `init_vectors`), the
examples become `TrainingItem`s, `update` trains the head with its dropout, L2 pull, gradient clipping,
patience and keep-best, and the soft prompt takes the best vectors and a new version if they helped:
on the validation NLL when `val_examples` are given, else on the NLL of (up to 32 of) the training pairs.

Example:
    >>> from detot_agent import LocalEngine, SoftPrompt, TuneExample, tune
    >>> engine = LocalEngine()                                                    # doctest: +SKIP
    >>> sp = SoftPrompt.initialize(engine, "arith", k=8, init="text")            # doctest: +SKIP
    >>> pairs = [TuneExample(prompt="2 + 3?", target="2 + 3 = 5. The answer is 5.")]
    >>> report = tune(sp, engine, pairs, steps=20, head_lr=3e-3, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from detot_agent.embedding.head import PromptHead
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.embedding.update import TrainingItem, UpdateConfig, update
from detot_agent.errors import DetotError
from detot_agent.softprompt.loss import TuneExample
from detot_agent.softprompt.prompt import SoftPrompt

__all__ = ["TuneConfig", "TuneReport", "tune"]


class TuneReport(BaseModel):
    """What `tune` did.

    Attributes:
        steps_run: LM steps run.
        train_loss / val_loss: the training loss curve and `(step, NLL)` validation points.
        initial_val_loss / best_val_loss: the validation NLL before and with the kept vectors (None: no validation).
        best_step: the step whose vectors were kept (0: none were).
        stopped_early: stopped on validation patience.
        seconds / seconds_per_step: wall time.
        examples: training pairs.
        accepted: whether the soft prompt took new vectors (and a new version).
    """

    steps_run: int
    train_loss: list[float]
    val_loss: list[tuple[int, float]]
    initial_val_loss: float | None
    best_step: int
    best_val_loss: float | None
    stopped_early: bool
    seconds: float
    seconds_per_step: float
    examples: int
    accepted: bool


def _renamed(settings: dict[str, Any]) -> dict[str, Any]:
    """`lr` (the old `TuneConfig` name) is `UpdateConfig.head_lr`."""
    if "lr" in settings:
        warnings.warn("tune(lr=...) is deprecated; the setting is UpdateConfig's head_lr", DeprecationWarning,
                      stacklevel=3)
        settings = {**settings, "head_lr": settings["lr"]}
        del settings["lr"]
    return settings


def TuneConfig(**settings: Any) -> UpdateConfig:  # noqa: N802: the name of the class it replaces
    """Deprecated since 0.4.0: `tune` takes an `UpdateConfig` (its `lr` is `head_lr`; `epochs` is an argument
    of `tune`)."""
    warnings.warn("TuneConfig is deprecated; pass an UpdateConfig (head_lr for lr) to tune", DeprecationWarning,
                  stacklevel=2)
    return UpdateConfig(**_renamed(settings))


def tune(soft_prompt: SoftPrompt, engine: Any, examples: Sequence[TuneExample], *,
         val_examples: Sequence[TuneExample] = (), config: UpdateConfig | None = None, epochs: float | None = None,
         progress: bool = True, **overrides: Any) -> TuneReport:
    """Train `soft_prompt` in place on `examples` with `engine`'s model frozen (through `update`).

    Args:
        soft_prompt: the vectors to train (its `init_vectors` anchor the L2 pull).
        engine: a torch `LocalEngine`; its model is never modified (checked).
        examples: training pairs.
        val_examples: held-out pairs for early stopping and for judging the result.
        config: `UpdateConfig` (default: its defaults with no time budget); keyword overrides (`steps`,
            `head_lr`, `batch_size`, `l2_to_init`, `dropout`, `max_grad_norm`, `patience`, `eval_every`, `seed`,
            `max_length`, `max_seconds`) win over it.
        epochs: passes over `examples` instead of `steps`.
        progress: show a progress bar.

    Returns:
        The report. The soft prompt takes the best vectors and a new version only if they lowered the
        judging NLL (`report.accepted`).

    Raises:
        DetotError: no examples, a soft prompt of another width than the model, a model that is not frozen.
        ConfigError: bad settings.
    """
    if not examples:
        raise DetotError("tune() needs at least one training example")
    if soft_prompt.hidden_size != engine.hidden_size:
        raise DetotError(f"soft prompt width {soft_prompt.hidden_size} differs from the model's hidden size "
                         f"{engine.hidden_size}")
    base = config.model_dump() if config is not None else {"max_seconds": None}
    settings = {**base, **_renamed(dict(overrides))}
    if epochs is not None:
        settings["steps"] = max(1, math.ceil(epochs * len(examples) / int(settings.get("batch_size", 4))))
    cfg = UpdateConfig(**settings)
    # a static head (M = 0) on a one-dimensional query: P(x) = P0 for every input
    te = TaskEmbedding(soft_prompt.task, np.ones(1, dtype=np.float32), encoder_name="tune")
    head = PromptHead(soft_prompt.vectors, components=0, dim=1)
    head.p0_init = soft_prompt.init_vectors.detach().float().clone()  # the L2 pull's anchor
    te.head, te.model_id = head, soft_prompt.model_id
    query = np.ones(1, dtype=np.float32)
    report = update(te, [TrainingItem(query=query, example=ex) for ex in examples], engine=engine,
                    val=[TrainingItem(query=query, example=ex) for ex in val_examples], config=cfg, progress=progress)
    accepted = bool(report.head_accepted)
    best_step = 0
    if accepted:
        best_step = (min(report.val_loss, key=lambda point: point[1])[0] if val_examples and report.val_loss
                     else report.steps)
        assert te.head is not None
        soft_prompt.vectors = te.head.p0.detach().float().cpu().clone()
    out = TuneReport(steps_run=report.steps, train_loss=report.train_loss, val_loss=report.val_loss,
                     initial_val_loss=report.lm_before if val_examples else None, best_step=best_step,
                     best_val_loss=report.lm_after if val_examples else None, stopped_early=report.stopped_early,
                     seconds=report.seconds, seconds_per_step=report.seconds / max(report.steps, 1),
                     examples=len(examples), accepted=accepted)
    if accepted:
        soft_prompt.version += 1
        soft_prompt.report = out.model_dump()
    return out
