"""Continuous batching, the part every backend shares (`EngineConfig.scheduler = "continuous"`).

One worker thread owns the model. The scheduling rule, at every step:

1. **admit**: waiting rows join while free sequence slots last (a row of n samples takes n slots; at most
   `max_running` sequences run). When nothing runs, the first arrival waits up to `max_wait_ms` for company, so
   requests sent together are prefilled together. Serving rows go first, in arrival order; background rows
   (`GenRow.background`) only in a lull, when no serving row has been waiting or running for `LULL_S` (not in the
   gap between two rounds or two back-to-back requests), or, once one has waited `background_patience` seconds
   since it was submitted, beside serving rows; on at most a quarter of the slots. A row with more samples than
   free slots starts the ones that fit and the rest wait at the head of the queue (each sample keeps its seed and
   greedy flag, so its output does not change).
2. **prefill** the admitted rows (the backend's `_prefill`: each looks its input up in the backend's prefix cache,
   computes what it must, and calls `_start` with the logits after the prompt; one prefill per row, shared by its
   samples).
3. **decode** one token for every running sequence together (the backend's `_decode`); a sequence that finishes
   leaves at once (`_drop` frees its slot's KV and the slot is free for the next admission), and a row's future
   resolves as soon as its own samples are done. Slots are taken lowest first; where the backend can move a
   sequence (llama.cpp: `compacts`, one KV stream per slot), the running serving sequences are kept on the lowest
   slots before each step and background rows take the highest, since llama.cpp decodes each run of consecutive
   slots as a separate pass over the weights (`SchedulerStats.passes`): a held background row in the middle
   would make every serving step two passes.
   Where the backend decodes any subset of its sequences (llama.cpp: `partial_steps`), a background row holds
   (keeps its KV, decodes nothing) while a serving row runs; once its patience is spent it decodes beside
   serving rows in `background_share` of their steps (0.1: one in ten), so a saturated service pays that share
   of its cost per step and still gets its background work done. A background row's prompt is prefilled in
   chunks (llama.cpp: `chunks_prefill`), not in one pass that would stall every serving row for the whole prompt
   (a 373-token prompt: 2.2 s on the bench model): `PREFILL_CHUNK` tokens in each of its turns beside serving
   rows and in each step between two serving rounds, `LULL_CHUNK` a step in a lull.

Sampling, seeds, stop strings, log-probabilities and usage are those of the static path (`generation.py`): a row's
output does not depend on when it joined or on its batch-mates. A cancelled future's sequences are dropped at the
next step; an error in one row fails that row only; `close()` fails what is in flight with `EngineClosedError`.
The backends: llama.cpp (`llamacpp_scheduler.py`, KV in llama.cpp sequence streams) and torch
(`torch_scheduler.py`, KV in one left-padded transformers cache).

Example:
    >>> from detot_agent import LocalEngine
    >>> engine = LocalEngine("tiny-model", scheduler="continuous", prefix_cache=4)  # doctest: +SKIP
    >>> engine.batch_stats["prefix_hits"]                                            # doctest: +SKIP
    0
"""

from __future__ import annotations

import bisect
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

import torch

from detot_agent.engines.batching import QueueWorker
from detot_agent.engines.generation import (
    GenOutput,
    GenRow,
    _pick,
    finish_text,
    sample_ranks,
    seeded_generators,
    split_at,
    stop_in_tail,
)
from detot_agent.engines.prefix_cache import SchedulerStats
from detot_agent.engines.scheduler_jobs import _Job, _Request
from detot_agent.errors import EngineClosedError

__all__ = ["LULL_S", "ContinuousCore"]

LULL_S = 0.5  # serving first: a background row starts after this long without a serving row in the scheduler
PREFILL_CHUNK = 8  # prompt tokens a background row prefills a step: in its turns beside serving rows, between rounds
LULL_CHUNK = 64  # ... and in a lull, so a serving row that arrives waits for at most this many tokens' prefill


class ContinuousCore(QueueWorker):
    """Continuous batching over `max_running` sequence slots (see the module docstring for the rule).

    A backend implements `_prefill(jobs)` (ending in `_start(job, logits)` per job), `_decode(entries)` (one
    token for each `(token, position, slot)`, returning the logits after it, `(vocab,)` each), `_drop(slot)`
    (a sequence left) and may override `_check(row)` (refuse a row at submission) and `_acquired()` (the engine's
    lock was just taken after an idle spell).

    Args:
        tokenizer / eos_ids: for stop strings and the finished text.
        max_running: most sequences decoded together.
        max_wait_ms: how long an idle scheduler waits for company after the first arrival.
        lock: the engine's generation lock (held while the model is used).
        background_patience: seconds a background row waits for serving rows to be gone before it runs beside them
            (None: it never does; `EngineConfig.background_patience`).
        background_share: (backends with `partial_steps`) the share of serving rows' steps a background row
            past its patience decodes in (1: all; `EngineConfig.background_share`).
    """

    thread_name = "detot-scheduler"
    partial_steps = False  # whether `_decode` takes any subset of the running sequences (then background rows hold)
    chunks_prefill = False  # whether `_prefill` leaves a background row's prompt to `_prefill_chunks`
    compacts = False  # whether `_move(src, dst)` moves a running sequence to a free slot (then they are kept low)

    def __init__(self, tokenizer: Any, eos_ids: set[int], *, max_running: int, max_wait_ms: float,
                 lock: threading.Lock, background_patience: float | None = 30.0,
                 background_share: float = 1.0) -> None:
        super().__init__()
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.max_running = max_running
        self._wait = max_wait_ms / 1000.0
        self._gen_lock = lock
        self._patience = background_patience
        self._share = background_share
        self._credit = 0.0  # serving steps' share owed to due background rows: one step beside them per 1.0
        self._serving_left = time.monotonic() - LULL_S  # when the last serving row left (a lull has begun)
        self._waiting: list[tuple[GenRow, _Request, int]] = []
        self._free = list(range(max_running))  # sorted: slots are taken lowest first
        self._running: list[_Job] = []
        self.stats = SchedulerStats()
        self.device: Any = "cpu"  # where logits live and seeded samples draw (the model's device)

    # ---- what a backend provides ----------------------------------------------------------------------
    def _prefill(self, jobs: list[_Job]) -> None:
        raise NotImplementedError

    def _decode(self, entries: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _drop(self, slot: int) -> None:
        raise NotImplementedError

    def _move(self, src: int, dst: int) -> None:
        """Move the running sequence in slot `src` (its KV) to the free slot `dst` (backends that `compacts`)."""
        raise NotImplementedError

    def _prefill_chunks(self, limit: int) -> None:
        """Prefill at most `limit` more prompt tokens of the rows whose prefill was left in chunks
        (`_Job.prefill`, backends that `chunks_prefill`), starting each that finishes."""

    def _check(self, row: GenRow) -> None:
        """Refuse a row at submission (before it could fail a step it shares); nothing by default."""

    def _acquired(self) -> None:
        """Called when the scheduler takes the engine's lock after an idle spell; nothing by default."""

    # ---- the callers' side ------------------------------------------------------------------------------
    def submit(self, row: GenRow) -> Future[list[GenOutput]]:
        """Queue a row; the future resolves to its `n` outputs as soon as they are done."""
        self._check(row)
        fut: Future[list[GenOutput]] = Future()
        request = _Request(fut, row.n)
        self._enqueue([(row, request, 0)])  # `close()` (QueueWorker) stops the worker
        return fut

    # ---- the worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        held = False  # the engine's lock is held from the first admitted row until the scheduler is idle again
        try:
            while True:
                if held and not self._running and not self._waiting:
                    self._gen_lock.release()  # idle: the engine's direct paths may use the model meanwhile
                    held = False
                if not self._pull():
                    break
                admitted = self._admit()
                if not held:
                    self._gen_lock.acquire()
                    held = True
                    self._acquired()
                if admitted:
                    self._prefill(admitted)
                if self._running:
                    self._step()
        finally:
            if held:
                self._gen_lock.release()
            closed = EngineClosedError("the engine was closed while this request was in flight")
            for job in self._running:
                job.request.fail(closed)
            for _, request, _ in self._waiting:
                request.fail(closed)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[1].fail(closed)

    def _pull(self) -> bool:
        """Move arrivals into `_waiting`: block (then wait for company) when idle; False once closed."""
        if not self._running and self._waiting and all(w[0].background for w in self._waiting):
            wait = self._lull_left()  # only background rows wait, for a lull: sleep on the queue until it comes
            if wait > 0:
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = ()
                if item is None:
                    return False
                if item:
                    self._waiting.append(item)
        if not self._running and not self._waiting:
            item = self._queue.get()
            if item is None:
                return False
            self._waiting.append(item)
            deadline = time.monotonic() + self._wait
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    return False
                self._waiting.append(item)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            self._waiting.append(item)

    def _lull_left(self) -> float:
        """Seconds until the current spell without serving rows is a lull (0: it is one)."""
        return max(0.0, self._serving_left + LULL_S - time.monotonic())

    def _due(self, request: _Request) -> bool:
        """Whether a background request has waited out its patience (it may now run beside serving rows)."""
        return self._patience is not None and time.monotonic() - request.since >= self._patience

    def _turn(self) -> bool:
        """Whether this step (serving rows running) is one the due background rows decode in: they earn
        `background_share` of a step per step while one is due, and spend a whole one when they decode."""
        if not any(job.row.background and self._due(job.request) for job in self._running):
            self._credit = 0.0
            return False
        self._credit += self._share
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False

    def _admit(self) -> list[_Job]:
        """Waiting rows on the free slots, serving first: rows in arrival order, background rows
        (`GenRow.background`) only in a lull (no serving row waiting or running for `LULL_S`) unless the first one
        waiting is `_due`, and on at most a quarter of the slots. A row with more samples than it may take starts
        the ones that fit and leaves the rest at the head of its lane (`split_row`: each sample keeps its seed and
        greedy flag, so its output does not change)."""
        admitted: list[_Job] = []
        self._waiting = [w for w in self._waiting if not (w[1].future.cancelled() or w[1].failed)]
        while self._free:
            lane = next((i for i, w in enumerate(self._waiting) if not w[0].background), None)
            room = len(self._free)
            if lane is None:  # only background work waits: within its share of the slots
                busy = sum(sum(s >= 0 for s in job.slots) for job in [*self._running, *admitted] if job.row.background)
                room = min(room, max(1, self.max_running // 4) - busy)
                serving = any(not job.row.background for job in [*self._running, *admitted])
                lull = not serving and self._lull_left() == 0
                lane = 0 if self._waiting and room > 0 and (lull or self._due(self._waiting[0][1])) else None
            if lane is None:
                break
            row, request, offset = self._waiting.pop(lane)
            if row.n > room:
                row, rest = split_at(row, room)
                self._waiting.insert(lane, (rest, request, offset + row.n))
            top = row.background and self.compacts  # background rows on the highest slots: see `_lower_slots`
            job = _Job(row=row, request=request, part=offset,
                       slots=[self._free.pop(-1 if top else 0) for _ in range(row.n)])
            admitted.append(job)
        return admitted

    def _start(self, job: _Job, logits: torch.Tensor) -> None:
        """The job's prompt is in its first slot's KV (and copied to its other slots); `logits` `(vocab,)` follow
        its last position. Its sequences decode from the next step on."""
        row, n = job.row, job.row.n
        job.tokens = [[] for _ in range(n)]
        job.logprob = [0.0] * n
        job.finish = ["length"] * n
        job.pos = [row.positions] * n
        job.logits = [logits] * n
        job.active = [True] * n
        job.generators = seeded_generators([row], self.device)
        job.rank = sample_ranks([row])
        if job not in self._running:  # a row prefilled in chunks is there already
            self._running.append(job)

    def _step(self) -> None:
        """Pick the next token of every running sequence, then decode them together."""
        entries: list[tuple[int, int, int]] = []
        where: list[tuple[_Job, int]] = []
        serving = any(not job.row.background for job in self._running)
        hold = self.partial_steps and serving
        turn = hold and self._turn()
        if any(job.prefill is not None for job in self._running):
            lull = not serving and self._lull_left() == 0
            self._prefill_chunks(LULL_CHUNK if lull else PREFILL_CHUNK if turn or not hold else 0)
        for job in list(self._running):
            if job.request.future.cancelled() or job.request.failed:
                self._release(job)
                continue
            if job.prefill is not None:  # its prompt is still being prefilled in chunks
                continue
            if hold and job.row.background:
                if not (turn and self._due(job.request)):
                    self.stats.held += 1  # serving first: this row's sequences wait, their KV kept
                    continue
                self.stats.beside += 1  # past its patience: its share of the serving rows' steps
            try:
                for j in range(job.row.n):
                    if not job.active[j]:
                        continue
                    row, lg = job.row, job.logits[j]
                    assert lg is not None
                    tok = _pick(lg, row, job.generators[j], greedy=row.is_greedy(job.rank[j]))
                    job.logprob[j] += float(torch.log_softmax(lg, dim=-1)[tok])
                    job.tokens[j].append(tok)
                    if tok in self.eos_ids or stop_in_tail(self.tokenizer, job.tokens[j], row.stop):
                        job.finish[j] = "stop"
                    elif len(job.tokens[j]) < row.max_new_tokens:
                        entries.append((tok, job.pos[j], job.slots[j]))
                        where.append((job, j))
                        continue
                    job.active[j] = False
                    self._free_slot(job, j)
            except Exception as exc:  # this row's own failure (a bad stop string, ...): the others go on
                self._fail(job, exc)
                continue
            if not any(job.active):
                self._finish(job)
        if not entries:
            return
        if self.compacts:
            entries = self._lower_slots(entries, where)
        slots = sorted(slot for _, _, slot in entries)
        self.stats.passes += 1 + sum(b != a + 1 for a, b in itertools.pairwise(slots))
        self.stats.batches += 1
        self.stats.sequences += len(entries)
        self.stats.largest = max(self.stats.largest, len(entries))
        try:
            logits = self._decode(entries)
        except Exception as exc:  # a failed decode step: every row in it fails
            for job in {id(j): j for j, _ in where}.values():
                self._fail(job, exc)
            return
        for (job, j), lg in zip(where, logits, strict=True):
            job.logits[j] = lg
            job.pos[j] += 1

    def _finish(self, job: _Job) -> None:
        outputs = []
        for j in range(job.row.n):
            text, reason = finish_text(self.tokenizer, job.tokens[j], job.row.stop, self.eos_ids, job.finish[j])
            outputs.append(GenOutput(text, job.tokens[j], reason, job.logprob[j]))
        self._release(job)
        job.request.done(job.part, outputs)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        self._release(job)
        job.request.fail(exc)

    def _free_slot(self, job: _Job, j: int) -> None:
        """Sample `j` of `job` left: its KV is dropped and its slot is free at once (-1 marks it gone)."""
        slot = job.slots[j]
        if slot >= 0:
            self._drop(slot)
            bisect.insort(self._free, slot)  # lowest first: the running sequences stay on few runs of consecutive slots
            job.slots[j] = -1

    def _lower_slots(self, entries: list[tuple[int, int, int]], where: list[tuple[_Job, int]],
                     ) -> list[tuple[int, int, int]]:
        """Move the serving sequences on the highest slots to the lowest free ones until no free slot lies below a
        running serving one (each move: the backend's `_move`); returns `entries` with the moved slots. Background
        rows stay where they are, on the highest slots (`_admit`), so that while they hold they never split the
        serving rows into two runs of slots (two passes over the weights a step, on llama.cpp)."""
        entries = list(entries)
        by_slot = {slot: k for k, (_, _, slot) in enumerate(entries) if not where[k][0].row.background}
        while self._free and by_slot and self._free[0] < max(by_slot):
            src = max(by_slot)
            dst = self._free.pop(0)
            self._move(src, dst)
            k = by_slot.pop(src)
            job, j = where[k]
            job.slots[j] = dst
            tok, pos, _ = entries[k]
            entries[k] = (tok, pos, dst)
            by_slot[dst] = k
            bisect.insort(self._free, src)
            self.stats.moves += 1
        return entries

    def _release(self, job: _Job) -> None:
        for j in range(len(job.slots)):
            self._free_slot(job, j)
        job.slots = []
        if job in self._running:
            self._running.remove(job)
        if not job.row.background and all(j.row.background for j in self._running):
            self._serving_left = time.monotonic()  # the last serving row left: a lull may begin

