"""What the continuous scheduler keeps per submitted row (`_Request`) and per row (or part of one) it runs
(`_Job`): futures, slots and each sequence's decoding state (the rule itself: `continuous.py`).

Example:
    >>> from concurrent.futures import Future
    >>> request = _Request(Future(), 2)
    >>> request.done(0, ["a"]); request.future.done()   # one of its two samples is in
    False
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from detot_agent.engines.generation import GenOutput, GenRow

__all__: list[str] = []  # the schedulers' own bookkeeping, not public


@dataclass
class _Job:
    """One row (or one part of a row) in the scheduler, with its sequences' decoding state."""

    row: GenRow
    request: _Request
    part: int
    slots: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    logprob: list[float] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    logits: list[torch.Tensor | None] = field(default_factory=list)
    active: list[bool] = field(default_factory=list)
    generators: list[Any] = field(default_factory=list)
    rank: list[int] = field(default_factory=list)
    pending: list[tuple[int, int, int, bool]] = field(default_factory=list)  # prompt tokens still to prefill
    prefill: Any = None  # the backend's state of a prefill in chunks (None: the row is decoding)


class _Request:
    """A submitted row: its future and its samples' outputs, filled in by its parts as they finish (a part is
    the samples from `offset` on)."""

    def __init__(self, future: Future[list[GenOutput]], n: int) -> None:
        self.future = future
        self.since = time.monotonic()  # submitted
        self.outputs: list[GenOutput | None] = [None] * n
        self.failed = False

    def done(self, offset: int, outputs: list[GenOutput]) -> None:
        self.outputs[offset:offset + len(outputs)] = outputs
        if not self.failed and all(o is not None for o in self.outputs) and not self.future.done():
            self.future.set_result([o for o in self.outputs if o is not None])

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        if not self.future.done():
            self.future.set_exception(exc)
