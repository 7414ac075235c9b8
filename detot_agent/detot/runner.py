"""The loop's background runner: one re-optimization at a time on one worker thread, at a lower OS priority.

Example:
    >>> runner = BackgroundRunner()
    >>> runner.submit(lambda: 42).result(), runner.submit(lambda: 43).result()
    (42, 43)
    >>> runner.close()
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

__all__ = ["BackgroundRunner"]

T = TypeVar("T")


def _lower_priority() -> None:
    """Run the worker thread at nice +10 (Linux: per thread), so serving threads win the cores. Torch's
    intra-op threads are shared by the whole process and keep their priority."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted: normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class BackgroundRunner(Generic[T]):
    """Runs one job at a time in the background; a job submitted while one runs is dropped (None)."""

    def __init__(self, name: str = "detot-reopt") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future[T] | None = None

    def submit(self, job: Callable[[], T]) -> Future[T] | None:
        """Start `job` unless one is running; returns its future (None: one was running)."""
        with self._lock:
            if self._running is not None and not self._running.done():
                return None
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name,
                                                    initializer=_lower_priority)
            self._running = self._executor.submit(job)
            return self._running

    def wait(self, timeout: float | None = None) -> T | None:
        """The running (or last) job's result, waiting up to `timeout` seconds; None if none was submitted."""
        fut = self._running
        return fut.result(timeout=timeout) if fut is not None else None

    def close(self) -> None:
        """Finish the running job and stop the worker thread (a later `submit` starts a new one)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
