"""Serving first: how many serving rows are in flight in this process's engines, so background work can wait.

Every engine call that serves a request (`BatchedEngine.sample`, `asample`, `complete`: a row not built inside
`generation.background_work()`) is counted from submission to its last token. Training that must not slow serving
(the loop's re-optimization, `UpdateConfig.yield_to_serving`) calls `SERVING.wait_idle(timeout, quiet=...)`
between two steps: it waits until no serving row has been in flight for `quiet` seconds, at most `timeout`
seconds, so a training step starts in a lull (not in the gap between two back-to-back requests) and a busy service
still sees training progress (one step per `timeout` at worst). A step that has started runs to its end. The
llama.cpp scheduler's own rule (background rows only on free slots) covers shadow answers and replays; this covers
the trainer, which runs on another engine and competes for the same cores.

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

__all__ = ["SERVING", "ServingLoad"]


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


SERVING = ServingLoad()  # one per process: every engine's serving rows
