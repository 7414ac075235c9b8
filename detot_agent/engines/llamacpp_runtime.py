"""A thin, typed wrapper over llama.cpp's C API (llama-cpp-python's low-level bindings).

What `LlamaCppEngine` needs and llama-cpp-python's high-level `Llama` class does not offer
(abetlen/llama-cpp-python 1757): decoding a batch of *input embeddings* (a soft prompt) into a
sequence's KV cache, then tokens after it, several sequences in one context, and copying one
sequence's cache to others so n samples share one prefill. One `llama_batch` holds either
tokens or embeddings, never both, so a soft prompt and the text behind it are two decodes.

Each sequence has a KV stream of its own (`kv_unified` off): a token attends over its own
sequence's cells only, so rows with long, unrelated prompts decoded together do not slow each
other down (with one unified buffer every token attends over every row's cells, masked; measured
here, that made batched DETOT rounds with 3 GSM8K demos slower than the torch engine). A row's
prompt is still decoded once: `seq_cp` copies the finished prefix into the streams of its other
samples (a buffer copy, no recompute).

Example:
    >>> from detot_agent.engines.llamacpp_runtime import llama_cpp_available
    >>> isinstance(llama_cpp_available(), bool)
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from detot_agent.engines.config import ExtraBuffers
from detot_agent.engines.llamacpp_load import llama_cpp_available, load_library, load_model
from detot_agent.errors import ConfigError, ContextLengthError, InvalidRequestError

__all__ = ["LlamaContext", "llama_cpp_available"]


class LlamaContext:
    """One GGUF model and one llama.cpp context with `n_seq_max` parallel sequences.

    Args:
        path: the `.gguf` file.
        n_ctx: KV cells of each sequence, the most positions one request may take (0: the model's
            training context); llama.cpp rounds it up to a multiple of 256.
        n_seq_max: most sequences decoded together (each gets its own `n_ctx` cells).
        n_threads: CPU threads (None: the CPUs this process may use).
        extra_buffers: `auto`, `on` or `off`: may the weights go into llama.cpp's extra buffer types
            (decided by `llamacpp_load.load_model`; the result is `self.buffers`).

    Not thread-safe: the engine calls it from one thread at a time.
    """

    def __init__(self, path: str | Path, *, n_ctx: int, n_seq_max: int, n_threads: int | None = None,
                 extra_buffers: ExtraBuffers | str = ExtraBuffers.AUTO) -> None:
        lib = load_library()
        self._lib = lib
        path = Path(path)
        model, self.buffers = load_model(lib, path, extra_buffers)
        self._model = model
        self.n_embd = int(lib.llama_model_n_embd(model))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(model))
        self._vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        per_seq = n_ctx or self.n_ctx_train
        cells = per_seq * n_seq_max
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cells
        cparams.n_batch = cells  # the prefill of a whole batch of rows fits one decode call
        cparams.n_ubatch = min(512, per_seq)
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = False
        # llama.cpp's default (4) oversubscribes small machines: on 2 cores it decoded 1.7x slower than 2
        threads = n_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        if threads:
            cparams.n_threads = threads
            cparams.n_threads_batch = threads
        self.n_threads = int(cparams.n_threads)
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            raise ConfigError(f"llama.cpp could not create a context of {n_seq_max} sequences x {per_seq} cells "
                              "for this model; lower n_ctx or max_batch_size")
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self.n_seq_max = n_seq_max
        self.n_ctx = int(lib.llama_n_ctx(ctx)) // n_seq_max  # cells per sequence, after llama.cpp's rounding
        self.epoch = 0

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        if getattr(self, "_ctx", None):
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self._lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone
            self.close()

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation for this model (EOS, EOT, ...)."""
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def check_room(self, positions: int, new_tokens: int) -> None:
        """Refuse a request whose prompt `positions` (soft prompt included) plus `new_tokens` do not fit one
        sequence's cells (`ContextLengthError`), before it is decoded beside others."""
        if positions + new_tokens > self.n_ctx:
            raise ContextLengthError(f"prompt of {positions} positions plus {new_tokens} new tokens does not fit "
                                     f"llama.cpp's {self.n_ctx} cells a sequence; raise n_ctx or lower max_tokens")

    # ---- the KV cache -----------------------------------------------------------------
    def clear(self) -> None:
        """Empty every sequence (`epoch` counts the clears, so a scheduler can tell its streams were wiped)."""
        self._lib.llama_memory_clear(self._mem, True)
        self.epoch += 1

    def seq_cp(self, src: int, dst: int) -> None:
        """Give sequence `dst` a copy of everything sequence `src` holds (done before the next decode)."""
        self._lib.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def seq_rm(self, seq: int) -> None:
        """Drop sequence `seq`, freeing its cells."""
        self._lib.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def seq_rm_from(self, seq: int, pos: int) -> None:
        """Drop the positions `pos..` of sequence `seq` (its prefix stays)."""
        self._lib.llama_memory_seq_rm(self._mem, seq, pos, -1)

    # ---- decoding --------------------------------------------------------------------
    def decode_embeddings(self, parts: list[tuple[np.ndarray, int, int]]) -> None:
        """Decode input embeddings: each part is `(vectors (k, n_embd), seq, first position)`; no logits."""
        lib = self._lib
        total = sum(v.shape[0] for v, _, _ in parts)
        if total == 0:
            return
        batch = lib.llama_batch_init(total, self.n_embd, 1)
        try:
            flat = np.ascontiguousarray(np.concatenate([v for v, _, _ in parts]), dtype=np.float32)  # (total, H)
            ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            i = 0
            for vectors, seq, pos0 in parts:
                for j in range(vectors.shape[0]):
                    batch.pos[i] = pos0 + j
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = 0
                    i += 1
            batch.n_tokens = total
            self._decode(batch)
        finally:
            lib.llama_batch_free(batch)

    def decode_tokens(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode tokens `(token, position, seq, wants logits)`; returns each logits-bearing entry's batch index
        (in `entries`' order).

        The batch holds the tokens sorted by sequence id, then position: with a KV stream per sequence, llama.cpp
        splits a batch into micro-batches of *consecutive* sequence ids in batch order (`split_equal`, sequential),
        each a full pass over the weights, so sequences 2, 3, 0, 1 in that order cost two passes where 0, 1, 2, 3
        cost one. (Holes between the ids, 0, 1, 3, still cost a pass per run: the scheduler keeps its running
        sequences on the lowest ids.)"""
        lib = self._lib
        order = sorted(range(len(entries)), key=lambda i: (entries[i][2], entries[i][1]))
        at = [0] * len(entries)  # entry index -> batch index
        batch = lib.llama_batch_init(len(entries), 0, 1)
        try:
            for b, i in enumerate(order):
                token, pos, seq, logits = entries[i]
                batch.token[b] = token
                batch.pos[b] = pos
                batch.n_seq_id[b] = 1
                batch.seq_id[b][0] = seq
                batch.logits[b] = 1 if logits else 0
                at[i] = b
            batch.n_tokens = len(entries)
            self._decode(batch)
        finally:
            lib.llama_batch_free(batch)
        return [at[i] for i, e in enumerate(entries) if e[3]]

    def logits(self, index: int) -> np.ndarray:
        """A copy of the logits the last decode produced at batch index `index`, `(n_vocab,)` float32."""
        ptr = self._lib.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _decode(self, batch: Any) -> None:
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc == 1:
            raise InvalidRequestError(f"llama.cpp found no room in its KV cache ({self.n_ctx} cells a sequence) for "
                                      "this batch; raise n_ctx or send shorter requests")
        if rc != 0:
            raise InvalidRequestError(f"llama.cpp failed to decode a batch (llama_decode returned {rc})")
