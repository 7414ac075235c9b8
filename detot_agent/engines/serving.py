"""Serving first: how many serving rows are in flight in this process's engines, so background work can wait.

Every engine call that serves a request (`BatchedEngine.sample`, `asample`, `complete`: a row not built inside
`generation.background_work()`) is counted from submission to its last token. Training that must not slow serving
(the loop's re-optimization, `UpdateConfig.yield_to_serving`) calls `SERVING.wait_idle(timeout, quiet=...)` between
two steps: it waits until no serving row has been in flight for `quiet` seconds, at most `timeout` seconds, so a
training step starts in a lull (not in the gap between two back-to-back requests). Inside `preempting(model,
max_wait)` a step that has started also pauses: at every block boundary of the model's forward and backward passes
(the children of each `ModuleList`: a transformer's layers), it waits while a serving row is in flight, at most
`max_wait` seconds a pause, so a request that arrives mid-step shares the cores for one layer's work at most; a
`budget` bounds all of a step's pauses together, so that under serving that never pauses (a saturating client) the
trainer still advances instead of waiting `max_wait` twice per layer every step (48 waits a step on 24 layers);
once it is spent, a `share` keeps the trainer to that share of the time beside serving (after a block that took
`r` seconds it pauses up to `r * (1 - share) / share`), so the requests it overlaps slow by about that share of
what a block beside them costs, not all of it (before, the rest of the step ran at full speed beside them). The
continuous scheduler's own rule (background rows start only in a lull and, on llama.cpp, hold while serving rows
decode: `continuous.py`) covers shadow answers and replays; this covers the trainer, which runs on another engine
and competes for the same cores.

Example:
    >>> load = ServingLoad()
    >>> with load.serving():
    ...     load.in_flight, round(load.wait_idle(0.01), 2) >= 0.01
    (1, True)
    >>> load.in_flight, load.wait_idle(1.0) < 0.01          # no serving row: no wait
    (0, True)
    >>> load.wait_idle(1.0, quiet=0.5) < 0.75                 # a lull: 0.5 s since the last one ended
    True
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SERVING", "Pauses", "ServingLoad"]


@dataclass
class Pauses:
    """What a preempted trainer waited: `count` pauses that found a serving row in flight, `seconds` in all;
    `budget`: the seconds it may still wait (None: no bound; the trainer sets it before each step); `share`: once
    the budget is spent, the most of the time it runs beside serving (None or 1: all of it); `resumed`: when it
    last ran on after a pause (monotonic seconds); `shared` / `shared_s`: the pauses (and their seconds) taken
    to keep to `share`."""

    count: int = 0
    seconds: float = 0.0
    budget: float | None = None
    share: float | None = None
    resumed: float = field(default_factory=time.monotonic)
    shared: int = 0
    shared_s: float = 0.0


class ServingLoad:
    """A count of serving rows in flight, with a wait for it to reach zero (thread-safe)."""

    def __init__(self) -> None:
        self._n = 0
        self._idle_since = time.monotonic()
        self._cond = threading.Condition()

    @property
    def in_flight(self) -> int:
        """Serving rows submitted and not yet finished."""
        with self._cond:
            return self._n

    def enter(self) -> None:
        """A serving row was submitted."""
        with self._cond:
            self._n += 1

    def leave(self) -> None:
        """A serving row finished (or failed)."""
        with self._cond:
            self._n = max(0, self._n - 1)
            if self._n == 0:
                self._idle_since = time.monotonic()
                self._cond.notify_all()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Count the rows decoded inside as serving work."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def wait_idle(self, timeout: float, *, quiet: float = 0.0) -> float:
        """Wait until no serving row has been in flight for `quiet` seconds (a lull, not the gap between two
        back-to-back requests), at most `timeout` seconds; returns the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if self._n == 0 and now - self._idle_since >= quiet:
                    return now - start
                if now >= deadline:
                    return now - start
                wake = deadline if self._n else min(deadline, self._idle_since + quiet)
                self._cond.wait(timeout=max(0.0, wake - now))

    def pause(self, max_wait: float, pauses: Pauses) -> None:
        """Wait while a serving row is in flight, at most `max_wait` seconds and at most what is left of
        `pauses.budget`; once that is spent, at most `(1 - share) / share` times what the caller ran since its
        last pause (`pauses.share`); counted in `pauses`."""
        if not self.in_flight:
            pauses.resumed = time.monotonic()  # its share counts the time it runs beside serving, not in a lull
            return
        shared = pauses.budget is not None and pauses.budget <= 0
        if shared:
            share = pauses.share
            if share is None or share >= 1:
                return
            limit = min(max_wait, (time.monotonic() - pauses.resumed) * (1 - share) / share)
        else:
            limit = max_wait if pauses.budget is None else min(max_wait, pauses.budget)
        waited = self.wait_idle(limit)
        pauses.count += 1
        pauses.seconds += waited
        if shared:
            pauses.shared += 1
            pauses.shared_s += waited
        elif pauses.budget is not None:
            pauses.budget -= waited
        pauses.resumed = time.monotonic()

    @contextlib.contextmanager
    def preempting(self, model: Any, max_wait: float, budget: float | None = None,
                   share: float | None = None) -> Iterator[Pauses]:
        """Inside, `model`'s forward passes run from this thread, and the backward passes of what they computed,
        pause before each block (each child of a `ModuleList`, else the whole model) while a serving row is in
        flight, at most `max_wait` seconds a pause and `budget` seconds in all (None: no bound; the yielded
        `Pauses.budget` may be reset, as the trainer does before each step), then so as to run at most `share`
        of the time beside serving (None: at full speed). Forward passes from other threads (an engine serving
        the same model) never pause.

        Example:
            >>> import torch
            >>> layer, load = torch.nn.Linear(2, 2), ServingLoad()
            >>> with load.preempting(layer, max_wait=0.01) as pauses, load.serving():
            ...     layer(torch.ones(1, 2, requires_grad=True)).sum().backward()
            >>> pauses.count                                   # once before the forward, once in the backward
            2
        """
        import torch

        owner = threading.get_ident()
        pauses = Pauses(budget=budget, share=share)

        def after_grad(grad: torch.Tensor) -> None:  # backward: this block's input gradient is being computed
            self.pause(max_wait, pauses)

        def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if threading.get_ident() != owner:
                return
            self.pause(max_wait, pauses)
            hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(after_grad)

        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = [b for lst in lists for b in lst] or [model]
        handles = [b.register_forward_pre_hook(before, with_kwargs=True) for b in blocks]
        try:
            yield pauses
        finally:
            for h in handles:
                h.remove()


SERVING = ServingLoad()  # one per process: every engine's serving rows
