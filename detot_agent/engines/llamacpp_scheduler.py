"""Continuous batching with a prefix cache for `LlamaCppEngine` (`EngineConfig.scheduler = "continuous"`).

One worker thread owns the llama.cpp context. The scheduling rule, at every step:

1. **admit**: waiting rows join while free sequence slots last (a row of n samples takes n slots; at most
   `max_batch_size` sequences run). When nothing runs, the first arrival waits up to `max_wait_ms` for
   company, so requests sent together are prefilled together. A row with more samples than free slots
   starts the ones that fit and the rest wait at the head of the queue (each sample keeps its seed and greedy
   flag, so its output does not change).
2. **prefill** the admitted rows: each row's input (its soft prompt's content, then its token ids) is looked
   up in the **prefix cache**. An exact hit copies the cached KV stream into the row's first slot and reuses
   the stored logits of its last position (nothing is decoded); a hit on a prefix copies it, drops the
   cached positions past the prefix and decodes only the rest; a miss decodes everything. The soft prompts of
   all misses go in one embeddings batch, every row's remaining tokens in one token batch. A freshly
   prefilled prompt is then stored in the cache (LRU over `prefix_cache` reserved streams), and the row's
   first slot is copied to its other samples (one prefill per row, as before).
3. **decode** one token for every running sequence together; a sequence that finishes leaves at once and
   frees its slot, and a row's future resolves as soon as its own samples are done.

Cache keys are the exact input: a hash of the soft prompt's values (so a new soft-prompt version, whose
values differ, never hits an old entry) and the token ids. Sampling, seeds, stop strings, log-probabilities
and usage are the static path's (`generate_rows_llamacpp`): a row's output does not depend on when it joined
or on its batch-mates (tested on a float32 GGUF). A cancelled future's sequences are dropped at the next
step; an error in one row fails that row only; `close()` fails what is in flight with `EngineClosedError`.

Example:
    >>> from detot_agent import LlamaCppEngine
    >>> engine = LlamaCppEngine("model.gguf", scheduler="continuous", prefix_cache=4)  # doctest: +SKIP
    >>> engine.batch_stats["prefix_hits"]                                                # doctest: +SKIP
    0
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
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
from detot_agent.engines.llamacpp_runtime import LlamaContext
from detot_agent.engines.prefix_cache import PrefixCache, SchedulerStats, _Entry, soft_key
from detot_agent.errors import EngineClosedError

__all__ = ["ContinuousScheduler"]


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


class _Request:
    """A submitted row: its future and its samples' outputs, filled in by its parts as they finish (a part is
    the samples from `offset` on)."""

    def __init__(self, future: Future[list[GenOutput]], n: int) -> None:
        self.future = future
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


class ContinuousScheduler(QueueWorker):
    """Continuous batching over one `LlamaContext` (see the module docstring for the rule).

    Args:
        ctx: the context; its first `max_running` sequence ids are the running slots, the next
            `prefix_cache` ones hold cached prompts.
        tokenizer / eos_ids: for stop strings and the finished text.
        max_running: most sequences decoded together.
        prefix_cache: prompts kept (0: no cache).
        max_wait_ms: how long an idle scheduler waits for company after the first arrival.
        lock: the engine's generation lock (held while the context is used).
    """

    thread_name = "detot-scheduler"

    def __init__(self, ctx: LlamaContext, tokenizer: Any, eos_ids: set[int], *, max_running: int,
                 prefix_cache: int, max_wait_ms: float, lock: threading.Lock) -> None:
        super().__init__()
        self.ctx, self.tokenizer, self.eos_ids = ctx, tokenizer, eos_ids
        self.max_running = max_running
        self.cache = PrefixCache(list(range(max_running, max_running + prefix_cache)))
        self._wait = max_wait_ms / 1000.0
        self._gen_lock = lock
        self._waiting: list[tuple[GenRow, _Request, int]] = []
        self._free = list(range(max_running))
        self._running: list[_Job] = []
        self.stats = SchedulerStats()
        self._epoch = -1  # the context's clear count when this scheduler last owned it

    # ---- the callers' side ------------------------------------------------------------------------------
    def submit(self, row: GenRow) -> Future[list[GenOutput]]:
        """Queue a row; the future resolves to its `n` outputs as soon as they are done. A row too long for a
        sequence's cells is refused here (`ContextLengthError`), before it could fail a decode step it shares."""
        self.ctx.check_room(len(row.prompt_ids) + _k(row), row.max_new_tokens)
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
                    self._gen_lock.release()  # idle: the engine's direct paths may use the context meanwhile
                    held = False
                if not self._pull():
                    break
                admitted = self._admit()
                if not held:
                    self._gen_lock.acquire()
                    held = True
                    if self.ctx.epoch != self._epoch:  # first use, or a direct path cleared the context since
                        self.cache.reset()
                        self.ctx.clear()
                        self._epoch = self.ctx.epoch
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

    def _admit(self) -> list[_Job]:
        """Waiting rows on the free slots, serving first: rows in arrival order, background rows
        (`GenRow.background`) only when no other row waits and on at most a quarter of the slots. A row with more
        samples than it may take starts the ones that fit and leaves the rest at the head of its lane
        (`split_row`: each sample keeps its seed and greedy flag, so its output does not change)."""
        admitted: list[_Job] = []
        self._waiting = [w for w in self._waiting if not (w[1].future.cancelled() or w[1].failed)]
        while self._free:
            lane = next((i for i, w in enumerate(self._waiting) if not w[0].background), None)
            room = len(self._free)
            if lane is None:  # only background work waits: within its share of the slots
                busy = sum(len(job.slots) for job in [*self._running, *admitted] if job.row.background)
                room = min(room, max(1, self.max_running // 4) - busy)
                lane = 0 if self._waiting and room > 0 else None
            if lane is None:
                break
            row, request, offset = self._waiting.pop(lane)
            if row.n > room:
                row, rest = split_at(row, room)
                self._waiting.insert(lane, (rest, request, offset + row.n))
            job = _Job(row=row, request=request, part=offset, slots=[self._free.pop(0) for _ in range(row.n)])
            admitted.append(job)
        return admitted

    def _prefill(self, jobs: list[_Job]) -> None:
        ctx, cache = self.ctx, self.cache
        plans = []  # (job, soft key, ids, entry hit, common prefix length)
        for job in jobs:
            row = job.row
            soft = None if row.soft_prompt is None else soft_key(row.soft_prompt)
            ids = tuple(row.prompt_ids)
            entry, common = cache.lookup(soft, ids) if cache.entries else (None, 0)
            plans.append((job, soft, ids, entry, common))
        protect = {p[3].seq for p in plans if p[3] is not None}
        embeddings, tokens, owners = [], [], []
        for job, _, ids, entry, common in plans:
            first, k = job.slots[0], _k(job.row)
            if entry is not None:
                ctx.seq_cp(entry.seq, first)
                if common < len(ids):
                    ctx.seq_rm_from(first, k + common)  # the cached positions past the shared prefix
                    self.stats.prefix_partial_hits += 1
                else:
                    self.stats.prefix_hits += 1
                self.stats.prompt_tokens_reused += k + common
            else:
                self.stats.prefix_misses += 1
                if job.row.soft_prompt is not None:
                    embeddings.append((job.row.soft_prompt.detach().float().cpu().numpy(), first, 0))
            start = common if entry is not None else 0
            if start < len(ids):
                owners.append(job)
                tokens += [(t, k + j, first, j == len(ids) - 1) for j, t in enumerate(ids) if j >= start]
                self.stats.prompt_tokens_decoded += len(ids) - start + (k if entry is None else 0)
        try:
            ctx.decode_embeddings(embeddings)
            last = ctx.decode_tokens(tokens) if tokens else []
        except Exception as exc:  # a prefill that fails fails its rows, not the running ones
            for job in jobs:
                self._fail(job, exc)
            return
        logits = {id(job): ctx.logits(ix) for job, ix in zip(owners, last, strict=True)}
        for job, soft, ids, entry, _ in plans:
            first = job.slots[0]
            row_logits = logits.get(id(job))
            if row_logits is None:  # an exact hit: the stored logits of the cached prompt
                assert entry is not None and entry.logits is not None
                row_logits = entry.logits
            elif self.cache.free or self.cache.entries:
                seq, evicted = cache.slot(protect)
                if seq is not None:
                    ctx.seq_rm(seq)
                    ctx.seq_cp(first, seq)  # the prompt's KV, before any generated token joins it
                    cache.entries[seq] = _Entry(seq, soft, ids, row_logits)  # logits are read, never written
                    self.stats.evictions += int(evicted)
                    protect.add(seq)
            for s in job.slots[1:]:
                ctx.seq_cp(first, s)  # the other samples share the row's prefill
            self._start(job, torch.from_numpy(row_logits))
        self.stats.rows += len(jobs)

    def _start(self, job: _Job, logits: torch.Tensor) -> None:
        row, n = job.row, job.row.n
        job.tokens = [[] for _ in range(n)]
        job.logprob = [0.0] * n
        job.finish = ["length"] * n
        job.pos = [_k(row) + len(row.prompt_ids)] * n
        job.logits = [logits] * n
        job.active = [True] * n
        job.generators = seeded_generators([row], "cpu")
        job.rank = sample_ranks([row])
        self._running.append(job)

    def _step(self) -> None:
        """Pick the next token of every running sequence, then decode them together."""
        ctx = self.ctx
        entries: list[tuple[int, int, int, bool]] = []
        where: list[tuple[_Job, int]] = []
        for job in list(self._running):
            if job.request.future.cancelled() or job.request.failed:
                self._release(job)
                continue
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
                        entries.append((tok, job.pos[j], job.slots[j], True))
                        where.append((job, j))
                        continue
                    job.active[j] = False
                    ctx.seq_rm(job.slots[j])
            except Exception as exc:  # this row's own failure (a bad stop string, ...): the others go on
                self._fail(job, exc)
                continue
            if not any(job.active):
                self._finish(job)
        if not entries:
            return
        self.stats.batches += 1
        self.stats.sequences += len(entries)
        self.stats.largest = max(self.stats.largest, len(entries))
        try:
            indices = ctx.decode_tokens(entries)
        except Exception as exc:  # a failed decode step: every row in it fails
            for job in {id(j): j for j, _ in where}.values():
                self._fail(job, exc)
            return
        for (job, j), ix in zip(where, indices, strict=True):
            job.logits[j] = torch.from_numpy(ctx.logits(ix))
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

    def _release(self, job: _Job) -> None:
        for s in job.slots:
            self.ctx.seq_rm(s)
        self._free += job.slots
        job.slots = []
        if job in self._running:
            self._running.remove(job)


def _k(row: GenRow) -> int:
    return 0 if row.soft_prompt is None else int(row.soft_prompt.shape[0])
