"""Continuous batching with a prefix cache for `LlamaCppEngine` (`EngineConfig.scheduler = "continuous"`).

The scheduling rule is `continuous.py`'s; this is its llama.cpp backend. The first `max_running` sequence ids of
the context are the running slots, the next `prefix_cache` ones hold cached prompts. At prefill each admitted
row's input (its soft prompt's content, then its token ids) is looked up in the **prefix cache**. An exact hit
copies the cached KV stream into the row's first slot and reuses the stored logits of its last position (nothing
is decoded); a hit on a prefix copies it, drops the cached positions past the prefix and decodes only the rest; a
miss decodes everything. The soft prompts of all misses go in one embeddings batch, every row's remaining tokens
in one token batch. A freshly prefilled prompt is then stored in the cache (LRU over `prefix_cache` reserved
streams), and the row's first slot is copied to its other samples (one prefill per row, as before).

Cache keys are the exact input: a hash of the soft prompt's values (so a new soft-prompt version, whose
values differ, never hits an old entry) and the token ids. A row's output does not depend on when it joined
or on its batch-mates (tested on a float32 GGUF; on a 4-bit file a prefix hit can change a greedy reply,
docs/results/bench-serve.md).

Example:
    >>> from detot_agent import LlamaCppEngine
    >>> engine = LlamaCppEngine("model.gguf", scheduler="continuous", prefix_cache=4)  # doctest: +SKIP
    >>> engine.batch_stats["prefix_hits"]                                                # doctest: +SKIP
    0
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from detot_agent.engines.continuous import ContinuousCore
from detot_agent.engines.generation import GenRow
from detot_agent.engines.llamacpp_runtime import LlamaContext
from detot_agent.engines.prefix_cache import PrefixCache, _Entry, soft_key
from detot_agent.engines.scheduler_jobs import _Job

__all__ = ["ContinuousScheduler"]


class ContinuousScheduler(ContinuousCore):
    """Continuous batching over one `LlamaContext` (the rule: `continuous.py`; the cache: the module docstring).

    Args:
        ctx: the context; its first `max_running` sequence ids are the running slots, the next
            `prefix_cache` ones hold cached prompts.
        tokenizer / eos_ids: for stop strings and the finished text.
        max_running: most sequences decoded together.
        prefix_cache: prompts kept (0: no cache).
        exact: only identical inputs hit the cache (`EngineConfig.prefix_match = "exact"`).
        max_wait_ms: how long an idle scheduler waits for company after the first arrival.
        lock: the engine's generation lock (held while the context is used).
    """

    partial_steps = True  # a decode call takes any subset of the sequences: background rows can hold
    chunks_prefill = True  # a background row's prompt is prefilled in chunks, a few tokens a step (`_prefill_chunks`)
    compacts = True  # a KV stream per slot: each run of consecutive slots decodes as its own pass (`_move`)

    def __init__(self, ctx: LlamaContext, tokenizer: Any, eos_ids: set[int], *, max_running: int,
                 prefix_cache: int, max_wait_ms: float, lock: threading.Lock, exact: bool = False,
                 background_patience: float | None = 30.0,
                 background_share: float = 1.0) -> None:
        super().__init__(tokenizer, eos_ids, max_running=max_running, max_wait_ms=max_wait_ms, lock=lock,
                         background_patience=background_patience, background_share=background_share)
        self.ctx = ctx
        self.cache = PrefixCache(list(range(max_running, max_running + prefix_cache)), exact=exact)
        self._epoch = -1  # the context's clear count when this scheduler last owned it

    def _check(self, row: GenRow) -> None:
        """A row too long for a sequence's cells is refused at submission (`ContextLengthError`), before it could
        fail a decode step it shares."""
        self.ctx.check_room(row.positions, row.max_new_tokens)

    def _acquired(self) -> None:
        if self.ctx.epoch != self._epoch:  # first use, or a direct path cleared the context since
            self.cache.reset()
            self.ctx.clear()
            self._epoch = self.ctx.epoch

    def _prefill(self, jobs: list[_Job]) -> None:
        ctx, cache = self.ctx, self.cache
        # serving first: a background row leaves its prompt's tokens to `_prefill_chunks`, a few a step, so a
        # serving row never waits for a whole prompt's prefill (`continuous.py`, PREFILL_CHUNK and LULL_CHUNK)
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
            first, k = job.slots[0], job.row.soft_positions
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
                rest = [(t, k + j, first, j == len(ids) - 1) for j, t in enumerate(ids) if j >= start]
                self.stats.prompt_tokens_decoded += len(ids) - start + (k if entry is None else 0)
                if job.row.background and self.chunks_prefill:
                    job.pending, job.prefill = rest, (soft, ids)
                    self.stats.chunked += len(rest)
                else:
                    owners.append(job)
                    tokens += rest
        try:
            ctx.decode_embeddings(embeddings)
            last = ctx.decode_tokens(tokens) if tokens else []
        except Exception as exc:  # a prefill that fails fails its rows, not the running ones
            for job in jobs:
                self._fail(job, exc)
            return
        logits = {id(job): ctx.logits(ix) for job, ix in zip(owners, last, strict=True)}
        for job, soft, ids, entry, _ in plans:
            if job.prefill is not None:  # its prompt comes in chunks: it starts once they are done
                self._running.append(job)
                continue
            row_logits = logits.get(id(job))
            if row_logits is None:  # an exact hit: the stored logits of the cached prompt (kept there already)
                assert entry is not None and entry.logits is not None
                self._ready(job, None, entry.logits, protect)
            else:
                self._ready(job, (soft, ids), row_logits, protect)
        self.stats.rows += len(jobs)

    def _ready(self, job: _Job, key: tuple[str | None, tuple[int, ...]] | None, row_logits: Any,
               protect: set[int]) -> None:
        """The row's prompt is in its first slot: keep it in the prefix cache under `key` (soft key, token ids;
        None: it came from there), copy it to the row's other samples and start decoding."""
        ctx, cache, first = self.ctx, self.cache, job.slots[0]
        if key is not None and (cache.free or cache.entries):
            seq, evicted = cache.slot(protect)
            self.stats.evictions += evicted
            if seq is not None:
                ctx.seq_rm(seq)
                ctx.seq_cp(first, seq)  # the prompt's KV, before any generated token joins it
                cache.entries[seq] = _Entry(seq, *key, row_logits)  # logits are read, never written
                protect.add(seq)
        for s in job.slots[1:]:
            ctx.seq_cp(first, s)  # the other samples share the row's prefill
        self._start(job, torch.from_numpy(row_logits))

    def _prefill_chunks(self, limit: int) -> None:
        for job in [j for j in self._running if j.prefill is not None]:
            if limit <= 0:
                return
            take = job.pending[:limit]
            try:
                last = self.ctx.decode_tokens(take)
            except Exception as exc:  # this row's prefill failed: the running rows go on
                self._fail(job, exc)
                continue
            self.stats.chunks += 1
            row_logits = self.ctx.logits(last[-1]) if last else None
            del job.pending[:len(take)]
            limit -= len(take)
            if not job.pending:
                assert row_logits is not None  # the prompt's last token asks for logits
                key, job.prefill = job.prefill, None
                self._ready(job, key, row_logits, set())

    def _decode(self, entries: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        indices = self.ctx.decode_tokens([(tok, pos, slot, True) for tok, pos, slot in entries])
        return [torch.from_numpy(self.ctx.logits(ix)) for ix in indices]

    def _drop(self, slot: int) -> None:
        self.ctx.seq_rm(slot)

    def _move(self, src: int, dst: int) -> None:
        self.ctx.seq_cp(src, dst)  # a copy of the stream's buffer at the next decode, no recompute
        self.ctx.seq_rm(src)
