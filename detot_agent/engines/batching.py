"""Dynamic batching: concurrent requests from many threads share one decode batch.

A single worker thread owns the model. Callers `submit` a `GenRow` and wait on a
future; the worker takes the first waiting row, then keeps collecting rows for
up to `max_wait_ms` or until the batch holds `max_batch_size` sequences
(a row asking for n samples counts n), and decodes them together.

Example:
    >>> from detot_agent.engines.batching import DynamicBatcher
    >>> from detot_agent.engines.generation import GenOutput, GenRow
    >>> echo = lambda rows: [[GenOutput(str(r.prompt_ids))] * r.n for r in rows]
    >>> b = DynamicBatcher(echo, max_batch_size=4, max_wait_ms=1)
    >>> b.submit(GenRow([7], n=2)).result()[1].text
    '[7]'
    >>> b.close()
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from detot_agent.engines.generation import GenOutput, GenRow
from detot_agent.errors import EngineClosedError

__all__ = ["BatchStats", "DynamicBatcher", "QueueWorker"]

Runner = Callable[[list[GenRow]], list[list[GenOutput]]]


class BatchStats:
    """Counters of what the batcher did (read them for benchmarks and tests)."""

    def __init__(self) -> None:
        self.batches = 0
        self.rows = 0
        self.sequences = 0
        self.largest = 0

    def as_dict(self) -> dict[str, float]:
        """Counts plus the mean number of sequences per batch."""
        mean = self.sequences / self.batches if self.batches else 0.0
        return {"batches": self.batches, "rows": self.rows, "sequences": self.sequences,
                "largest": self.largest, "mean_sequences_per_batch": mean}


class QueueWorker:
    """One daemon thread fed by a queue: `_enqueue` starts it on first use; `close` queues a `None`, which tells
    `_loop` to stop, and waits for the thread. What happens to work queued before it is the subclass's rule (the
    static batcher finishes it; the continuous scheduler fails it with `EngineClosedError`)."""

    thread_name = "detot-worker"

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _enqueue(self, items: list[Any]) -> None:
        with self._lock:
            if self._closed:
                raise EngineClosedError(f"the engine's {self.thread_name.removeprefix('detot-')} is closed; build a "
                                        "new engine")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                self._thread.start()
            for item in items:
                self._queue.put(item)

    def close(self) -> None:
        """Stop the worker thread (see the class docstring for the work still queued)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(None)
        if thread is not None:
            thread.join(timeout=60)

    def _loop(self) -> None:
        raise NotImplementedError


class DynamicBatcher(QueueWorker):
    """Gathers rows submitted from any thread into batches run by `runner` on one worker thread.

    Args:
        runner: decodes a list of rows (for the engine: `generate_rows` under its lock).
        max_batch_size: most sequences per batch; a single row asking for more still runs alone.
        max_wait_ms: how long to wait for company after the first row arrives.
    """

    thread_name = "detot-batcher"

    def __init__(self, runner: Runner, *, max_batch_size: int, max_wait_ms: float) -> None:
        super().__init__()
        self._runner = runner
        self._max = max_batch_size
        self._wait = max_wait_ms / 1000.0
        self._held: tuple[GenRow, Future[list[GenOutput]]] | None = None
        self.stats = BatchStats()

    def submit(self, row: GenRow) -> Future[list[GenOutput]]:
        """Queue a row; the future resolves to its `n` outputs (or the error that decoding raised)."""
        fut: Future[list[GenOutput]] = Future()
        self._enqueue([(row, fut)])
        return fut

    def _collect(self) -> list[tuple[GenRow, Future[list[GenOutput]]]] | None:
        first = self._held if self._held is not None else self._queue.get()
        self._held = None
        if first is None:
            return None
        batch, size = [first], first[0].n
        deadline = time.monotonic() + self._wait
        while size < self._max:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            if size + item[0].n > self._max:
                self._held = item  # first in the next batch
                break
            batch.append(item)
            size += item[0].n
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            rows = [row for row, _ in batch]
            self.stats.batches += 1
            self.stats.rows += len(rows)
            seqs = sum(r.n for r in rows)
            self.stats.sequences += seqs
            self.stats.largest = max(self.stats.largest, seqs)
            try:
                outputs = self._runner(rows)
            except Exception:  # one bad row must not fail its batch-mates: retry them one by one
                outputs = None
            if outputs is not None:
                for (_, fut), out in zip(batch, outputs, strict=True):
                    fut.set_result(out)
                continue
            for row, fut in batch:
                try:
                    fut.set_result(self._runner([row])[0])
                except Exception as exc:  # handed to the caller's thread
                    fut.set_exception(exc)
