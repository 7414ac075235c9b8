"""Continuous batching with a prefix cache for the torch engine (`EngineConfig.scheduler = "continuous"`).

The scheduling rule is `continuous.py`'s; this is its torch backend. The running sequences share one
transformers `DynamicCache`, left padded, one row per sequence; `_slots[i]` is the slot whose sequence is row i::

    row 0 (slot 3):  [pad pad | s s t t t t | g g g]     s: soft prompt, t: prompt tokens, g: generated
    row 1 (slot 0):  [t t t t t t t t t t t | g g g]
    row 2 (slot 5):  [pad pad pad pad pad | t t t t g]   (joined two steps ago)

A sequence that leaves is dropped from the cache before the next forward (and pad columns every row has are
cut); rows that join are prefilled on their own cache, then the running cache and theirs are left padded to one
length and stacked. Position ids are per sequence (counted from its first real position) and pads are masked,
so a row decodes as it would alone (tested on the tiny float32 model).

**Prefix cache**: the key/values of a computed prompt (its soft prompt's values, then its token ids: a new
soft-prompt version never hits) are kept, unpadded, with the logits after its last position; LRU over
`prefix_cache` prompts and, with `prefix_cache_mb` set, within that many megabytes (a prompt larger than the
whole budget is computed but not kept). An exact hit starts the row from them (nothing computed); a hit on a
prefix of at least 16 tokens computes only the rest on top of the cached prefix; misses are prefilled together,
left padded.
`batch_stats["prefix_bytes"]` is the memory the cache holds.

Example:
    >>> from detot_agent import LocalEngine
    >>> engine = LocalEngine("tiny-model", scheduler="continuous", prefix_cache=4)  # doctest: +SKIP
    >>> engine.sample(request, 3)                                                    # doctest: +SKIP
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers import DynamicCache

from detot_agent.engines.continuous import ContinuousCore
from detot_agent.engines.generation import cache_argument, embed_row
from detot_agent.engines.prefix_cache import PrefixCache, _Entry, soft_key
from detot_agent.engines.scheduler_jobs import _Job

__all__ = ["TorchScheduler"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, each (B, heads, L, head_dim)


class TorchScheduler(ContinuousCore):
    """Continuous batching over a Hugging Face causal LM (the rule: `continuous.py`; the cache: the module
    docstring).

    Args:
        model: the frozen transformers model.
        tokenizer / eos_ids: for stop strings and the finished text.
        max_running: most sequences decoded together.
        prefix_cache: prompts kept (0: no cache).
        prefix_bytes: the most bytes of key/values the cache holds (None: bounded by `prefix_cache` only).
        exact: only identical inputs hit the cache (`EngineConfig.prefix_match = "exact"`).
        max_wait_ms: how long an idle scheduler waits for company after the first arrival.
        lock: the engine's generation lock (held while the model is used).
    """

    def __init__(self, model: Any, tokenizer: Any, eos_ids: set[int], *, max_running: int, prefix_cache: int,
                 max_wait_ms: float, lock: threading.Lock, exact: bool = False, prefix_bytes: int | None = None,
                 background_patience: float | None = 30.0,
                 background_share: float = 1.0) -> None:
        super().__init__(tokenizer, eos_ids, max_running=max_running, max_wait_ms=max_wait_ms, lock=lock,
                         background_patience=background_patience, background_share=background_share)
        self.model = model
        self.device = model.device
        self._cache_kw = cache_argument(model)
        self.cache = PrefixCache(list(range(prefix_cache)), exact=exact, max_bytes=prefix_bytes)
        self._slots: list[int | None] = []  # cache row -> slot (None: left, dropped at the next forward)
        self._running_cache: Any = None  # the running rows' DynamicCache (kept across steps: no copy per step)
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (B, L): 1 on real positions

    # ---- the backend ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, jobs: list[_Job]) -> None:
        self._compact()
        try:
            started = self._compute(jobs)
        except Exception as exc:  # a prefill that fails fails its rows, not the running ones
            for job in jobs:
                self._fail(job, exc)
            return
        self._join([(job, kv) for job, kv, _ in started])
        for job, _, logits in started:
            self._start(job, logits)
        self.stats.rows += len(jobs)

    def _compute(self, jobs: list[_Job]) -> list[tuple[_Job, KV, torch.Tensor]]:
        """Each job's prompt KV `(1, heads, k + T, head_dim)` per layer and its logits `(vocab,)`, from the cache
        where it can; computed prompts are stored in the cache."""
        out: dict[int, tuple[_Job, KV, torch.Tensor]] = {}
        misses: list[tuple[_Job, str | None]] = []
        protect: set[int] = set()
        for job in jobs:
            row = job.row
            soft = None if row.soft_prompt is None else soft_key(row.soft_prompt)
            ids = tuple(row.prompt_ids)
            entry, common = self.cache.lookup(soft, ids) if self.cache.entries else (None, 0)
            if entry is None:
                self.stats.prefix_misses += 1
                misses.append((job, soft))
                continue
            protect.add(entry.seq)
            assert entry.kv is not None  # this cache's entries always hold their key/values
            k = row.soft_positions
            self.stats.prompt_tokens_reused += k + common
            if common == len(ids):  # exact: the cached prompt itself
                self.stats.prefix_hits += 1
                out[id(job)] = (job, entry.kv, torch.as_tensor(entry.logits))
                continue
            self.stats.prefix_partial_hits += 1
            self.stats.prompt_tokens_decoded += len(ids) - common
            kv, logits = self._extend([(kk[:, :, :k + common], vv[:, :, :k + common]) for kk, vv in entry.kv],
                                      list(ids[common:]), k + common)
            out[id(job)] = (job, kv, logits)
            self._store(soft, ids, kv, logits, protect)
        if misses:
            for (job, soft), (kv, logits) in zip(misses, self._prefill_misses([j for j, _ in misses]), strict=True):
                self.stats.prompt_tokens_decoded += job.row.positions
                out[id(job)] = (job, kv, logits)
                self._store(soft, tuple(job.row.prompt_ids), kv, logits, protect)
        return [out[id(job)] for job in jobs]

    def _prefill_misses(self, jobs: list[_Job]) -> list[tuple[KV, torch.Tensor]]:
        """One forward over the jobs' whole inputs, left padded (as `generate_rows`), then each row unpadded."""
        embed = self.model.get_input_embeddings()
        seqs = [embed_row(embed, job.row, device=self.device, dtype=embed.weight.dtype) for job in jobs]
        B, L, H = len(seqs), max(s.shape[0] for s in seqs), seqs[0].shape[1]
        inputs = torch.zeros(B, L, H, dtype=embed.weight.dtype, device=self.device)  # (B, L, H)
        mask = torch.zeros(B, L, dtype=torch.long, device=self.device)  # (B, L)
        for i, seq in enumerate(seqs):
            inputs[i, L - seq.shape[0]:] = seq
            mask[i, L - seq.shape[0]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        cache = DynamicCache()
        out = self.model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: cache})
        logits = out.logits[:, -1, :].float()  # (B, V)
        layers = _layers(cache)
        # copies, not views: a cached entry must not keep its batch-mates' key/values alive
        return [([(kk[i:i + 1, :, L - s.shape[0]:].clone(), vv[i:i + 1, :, L - s.shape[0]:].clone())
                  for kk, vv in layers], logits[i].clone()) for i, s in enumerate(seqs)]

    def _extend(self, prefix: KV, ids: list[int], start: int) -> tuple[KV, torch.Tensor]:
        """The prompt's KV and last logits: `ids` computed at positions `start...` on top of a cached `prefix`."""
        cache = _as_cache(prefix)  # the forward concatenates onto new tensors: the cached entry is never written
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        mask = torch.ones(1, start + len(ids), dtype=torch.long, device=self.device)  # (1, start + T)
        positions = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)  # (1, T)
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: cache})
        return _layers(cache), out.logits[0, -1, :].float()

    def _store(self, soft: str | None, ids: tuple[int, ...], kv: KV, logits: torch.Tensor, protect: set[int]
               ) -> None:
        entry = _Entry(-1, soft, ids, logits, kv=kv)
        seq, evicted = self.cache.slot(protect, entry.nbytes())
        self.stats.evictions += evicted
        if seq is not None:
            entry.seq = seq
            self.cache.entries[seq] = entry
            protect.add(seq)
        self.stats.prefix_bytes = self.cache.nbytes()

    def _join(self, started: list[tuple[_Job, KV]]) -> None:
        """Stack the new rows (each job's prompt, once per sample) under the running ones, left padded."""
        if not started:
            return
        lengths = [int(kv[0][0].shape[2]) for _, kv in started]
        old_b, old_l = self._mask.shape
        length = max([old_l, *lengths])
        batch = old_b + sum(job.row.n for job, _ in started)
        mask = torch.zeros(batch, length, dtype=torch.long, device=self.device)  # (B', L')
        mask[:old_b, length - old_l:] = self._mask
        running = _layers(self._running_cache) if old_b else []
        layers: KV = []
        for li in range(len(started[0][1])):
            k0, v0 = started[0][1][li]
            keys = k0.new_zeros(batch, k0.shape[1], length, k0.shape[3])  # (B', heads, L', head_dim)
            values = v0.new_zeros(batch, v0.shape[1], length, v0.shape[3])
            if old_b:
                keys[:old_b, :, length - old_l:] = running[li][0]
                values[:old_b, :, length - old_l:] = running[li][1]
            row = old_b
            for (job, kv), n in zip(started, lengths, strict=True):
                keys[row:row + job.row.n, :, length - n:] = kv[li][0]  # broadcast over the job's samples
                values[row:row + job.row.n, :, length - n:] = kv[li][1]
                row += job.row.n
            layers.append((keys, values))
        row = old_b
        for (job, _), n in zip(started, lengths, strict=True):
            mask[row:row + job.row.n, length - n:] = 1
            row += job.row.n
            self._slots += job.slots
        self._running_cache, self._mask = _as_cache(layers), mask

    @torch.inference_mode()
    def _decode(self, entries: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        self._compact()
        at: dict[int | None, tuple[int, int]] = {slot: (tok, pos) for tok, pos, slot in entries}
        assert len(at) == len(self._slots) and all(s in at for s in self._slots), "every running row decodes"
        tokens = torch.tensor([[at[s][0]] for s in self._slots], dtype=torch.long, device=self.device)  # (B, 1)
        positions = torch.tensor([[at[s][1]] for s in self._slots], dtype=torch.long, device=self.device)  # (B, 1)
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)  # (B, L + 1)
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: self._running_cache})  # appends this step's keys and values
        self._mask = mask
        logits = out.logits[:, -1, :].float()  # (B, V)
        row = {s: i for i, s in enumerate(self._slots)}
        return [logits[row[slot]] for _, _, slot in entries]

    def _drop(self, slot: int) -> None:
        self._slots = [None if s == slot else s for s in self._slots]

    def _compact(self) -> None:
        """Drop the rows of sequences that left, then the pad columns every remaining row has."""
        keep = [i for i, s in enumerate(self._slots) if s is not None]
        if len(keep) != len(self._slots):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            for layer in self._running_cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            self._mask = self._mask[index]
            self._slots = [self._slots[i] for i in keep]
        if not self._slots:
            self._running_cache, self._mask = None, self._mask[:0, :0]
            return
        first = int(self._mask.any(dim=0).int().argmax())  # the first column some row uses
        if first:
            for layer in self._running_cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self._mask = self._mask[:, first:]


def _as_cache(layers: KV) -> Any:
    """A transformers cache holding these tensors themselves (built empty, then given them: building it from the
    data would copy every layer once more)."""
    cache: Any = DynamicCache(ddp_cache_data=[(kk[:, :, :0], vv[:, :, :0]) for kk, vv in layers])
    for layer, (kk, vv) in zip(cache.layers, layers, strict=True):
        layer.keys, layer.values = kk, vv
    return cache


def _layers(cache: Any) -> KV:
    """A transformers cache's per-layer keys and values."""
    return [(layer.keys, layer.values) for layer in cache.layers]
