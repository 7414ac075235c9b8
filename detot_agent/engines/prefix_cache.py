"""The prefix cache of the continuous schedulers, and the schedulers' counters.

A cached prompt holds the KV of its input (soft prompt, then tokens) and the logits after its last position:
in a reserved llama.cpp sequence stream (`seq`), or as torch tensors (`kv`). `PrefixCache` finds the entry
sharing the longest token prefix with a new input under the same soft prompt, and hands out places least
recently used first: within `len(seqs)` places and, where `max_bytes` is set (torch), within that many bytes of
key/values (an input larger than the whole budget is not kept).

Example:
    >>> cache = PrefixCache([8, 9])
    >>> seq, evicted = cache.slot(set())
    >>> cache.entries[seq] = _Entry(seq, None, tuple(range(20)))
    >>> entry, common = cache.lookup(None, tuple(range(18)) + (99,))
    >>> entry.seq == seq, common
    (True, 18)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PrefixCache", "SchedulerStats", "soft_key"]


class SchedulerStats:
    """Counters of the continuous scheduler (read them for benchmarks and tests)."""

    def __init__(self) -> None:
        self.batches = 0  # decode steps
        self.rows = 0
        self.sequences = 0  # sequence-steps decoded
        self.largest = 0
        self.prefix_hits = 0
        self.prefix_partial_hits = 0
        self.prefix_misses = 0
        self.prompt_tokens_reused = 0
        self.prompt_tokens_decoded = 0
        self.evictions = 0
        self.prefix_bytes = 0  # torch: bytes of key/values the prefix cache holds (llama.cpp: its streams are fixed)
        self.held = 0  # row-steps a background row held while serving rows decoded (serving first)
        self.beside = 0  # row-steps a background row past its patience decoded beside serving rows (its share)
        self.chunked = 0  # prompt tokens of background rows prefilled in chunks (llama.cpp: all of them)
        self.chunks = 0  # the decode calls those chunks took
        self.passes = 0  # runs of consecutive slots decoded, over all steps (llama.cpp: a pass over the weights each)
        self.moves = 0  # running sequences moved to a lower free slot (llama.cpp: consecutive slots decode in one pass)

    def as_dict(self) -> dict[str, float]:
        """Counts plus the mean number of sequences per decode step and the prefix hit rate."""
        lookups = self.prefix_hits + self.prefix_partial_hits + self.prefix_misses
        return {"batches": self.batches, "rows": self.rows, "sequences": self.sequences, "largest": self.largest,
                "mean_sequences_per_batch": self.sequences / self.batches if self.batches else 0.0,
                "prefix_hits": self.prefix_hits, "prefix_partial_hits": self.prefix_partial_hits,
                "prefix_misses": self.prefix_misses,
                "prefix_hit_rate": (self.prefix_hits + self.prefix_partial_hits) / lookups if lookups else 0.0,
                "prompt_tokens_reused": self.prompt_tokens_reused,
                "prompt_tokens_decoded": self.prompt_tokens_decoded, "evictions": self.evictions,
                "prefix_bytes": self.prefix_bytes, "held": self.held, "beside": self.beside, "chunked": self.chunked,
                "chunks": self.chunks, "moves": self.moves, "passes": self.passes}


@dataclass
class _Entry:
    """One cached prompt: its place (llama.cpp: the reserved stream holding its KV), its key, the logits after
    its last token, and (torch) its key/values per layer, each `(1, heads, k + T, head_dim)`."""

    seq: int
    soft: str | None = None
    ids: tuple[int, ...] = ()
    logits: Any = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def nbytes(self) -> int:
        """Bytes of its torch key/values (0 where the KV lives in a llama.cpp stream)."""
        return sum(t.numel() * t.element_size() for pair in self.kv or [] for t in pair)


class PrefixCache:
    """Prompts whose KV is kept in `len(seqs)` reserved places (and at most `max_bytes` bytes of torch key/values),
    least recently used evicted first."""

    def __init__(self, seqs: list[int], min_prefix: int = 16, *, exact: bool = False,
                 max_bytes: int | None = None) -> None:
        self.free = list(seqs)
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # seq -> entry, oldest first
        self.min_prefix = min_prefix
        self.exact = exact  # only identical inputs hit (`EngineConfig.prefix_match = "exact"`)
        self.max_bytes = max_bytes  # None: bounded by the number of places only

    def lookup(self, soft: str | None, ids: tuple[int, ...]) -> tuple[_Entry | None, int]:
        """The entry sharing the longest token prefix with `ids` under the same soft prompt, and that length (an
        exact match, or (unless `exact`) a prefix of at least `min_prefix` tokens; otherwise `(None, 0)`). Where
        `ids` is a strict prefix of a cached input, its last token is left out of the shared length: the logits
        after it were never stored, so it must be computed."""
        best, length = None, 0
        for entry in self.entries.values():
            if entry.soft != soft:
                continue
            n = _common(entry.ids, ids)
            if n == len(ids) < len(entry.ids):
                n -= 1
            if n > length and (n == len(ids) == len(entry.ids) or (n >= self.min_prefix and not self.exact)):
                best, length = entry, n
        if best is not None:
            self.entries.move_to_end(best.seq)
        return best, length

    def reset(self) -> None:
        """Forget every entry (their streams were cleared)."""
        self.free += list(self.entries)
        self.entries.clear()

    def nbytes(self) -> int:
        """Bytes of torch key/values the entries hold."""
        return sum(e.nbytes() for e in self.entries.values())

    def slot(self, protect: set[int], nbytes: int = 0) -> tuple[int | None, int]:
        """A place for a new entry of `nbytes` bytes: a free one, after evicting the least recently used entries
        outside `protect` until the place and the bytes fit; `(seq, evicted)`, seq None where nothing fits (an
        entry larger than `max_bytes`, or every entry protected)."""
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return None, 0
        evicted = 0
        held = self.nbytes()
        while not self.free or (self.max_bytes is not None and held + nbytes > self.max_bytes):
            seq = next((s for s in self.entries if s not in protect), None)
            if seq is None:
                return None, evicted
            held -= self.entries.pop(seq).nbytes()
            self.free.append(seq)
            evicted += 1
        return self.free.pop(), evicted


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def soft_key(soft: torch.Tensor) -> str:
    """The soft prompt's identity for the cache: a hash of its shape and float32 values."""
    values = soft.detach().float().cpu().contiguous().numpy()
    return hashlib.blake2b(repr(values.shape).encode() + values.tobytes(), digest_size=16).hexdigest()
