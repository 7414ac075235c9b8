"""`LlamaCppEngine`: GGUF models served by llama.cpp, soft prompts included, behind DSPy's engine contract.

The same contract as the torch engine (`BatchedEngine`: `complete`, `sample`, `stream`, dynamic
batching, `dump_state`/`load_state`): requests are rendered by the same Hugging Face tokenizer and
chat template (`models.load_tokenizer`), so both engines feed the model the same token ids; only
decoding differs. One batch of rows decodes in one llama.cpp context (`llamacpp_runtime.py`):

1. every row's soft prompt goes in as one batch of input embeddings, at positions `0..k-1` of the
   row's own sequence (positions counted from the first real position, as in the torch engine);
2. every row's tokens follow in one token batch, at positions `k..k+T-1`; logits at its last token;
3. a row's sequence is copied to its other `n - 1` samples (one prefill per row; each sequence has its
   own KV stream, so a token attends over its own row's cells only);
4. each step decodes one token for every live sequence of every row together.

Tokens are chosen by the same sampling code as the torch engine (temperature, top-p, top-k, greedy
samples first when asked, and a torch generator seeded with `seed + j - greedy` for sample j), and
their log-probabilities are taken under the raw distribution, as the torch engine reports them. Soft
prompts are served, never trained, here: training needs gradients (`softprompt/training.py` runs on a
`LocalEngine`).

Example:
    >>> from detot_agent import local_lm
    >>> lm = local_lm("model.gguf", engine="llamacpp")  # doctest: +SKIP
    >>> lm.engine.sample(request, 6)                    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from dspy.lm15 import Request

from detot_agent.engines.base import BatchedEngine
from detot_agent.engines.config import EngineConfig, PrefixMatch
from detot_agent.engines.generation import (
    GenOutput,
    GenRow,
    _pick,
    finish_text,
    sample_ranks,
    seeded_generators,
    split_row,
    stop_in_tail,
)
from detot_agent.engines.llamacpp_load import BufferChoice
from detot_agent.engines.llamacpp_runtime import LlamaContext
from detot_agent.engines.llamacpp_scheduler import ContinuousScheduler
from detot_agent.engines.models import load_tokenizer
from detot_agent.errors import ConfigError
from detot_agent.softprompt.registry import SoftPromptRegistry

__all__ = ["LlamaCppEngine", "generate_rows_llamacpp"]


class LlamaCppEngine(BatchedEngine):
    """A GGUF model decoded by llama.cpp, with batching and soft prompts.

    Args:
        model: a `.gguf` file (or a folder holding one), or None for the embedded default.
        config: engine settings (`EngineConfig`; `n_ctx` (cells per sequence), `n_threads` and
            `max_batch_size` (the most sequences decoded together) size the llama.cpp context); keyword
            overrides win over it.
        registry: where per-task soft prompts are looked up (a new empty one by default).

    Example:
        >>> engine = LlamaCppEngine("model.gguf", max_batch_size=8)  # doctest: +SKIP
    """

    id_prefix = "llamacpp"

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 registry: SoftPromptRegistry | None = None, **overrides: Any) -> None:
        self._setup(model, config, registry, overrides)
        if self.source.gguf_file is None:
            raise ConfigError(f"the llama.cpp engine serves .gguf files; {self.source.spec!r} is a "
                              f"{self.source.kind}: pass a .gguf file or engine='torch'")
        if self.config.prefix_cache_mb is not None:
            raise ConfigError("prefix_cache_mb bounds the torch engine's cached key/values; llama.cpp keeps cached "
                              "prompts in prefix_cache reserved streams of n_ctx cells, sized when its context is "
                              "made: set prefix_cache (and n_ctx) instead")
        cached = self.config.prefix_cache if self.config.continuous else 0  # reserved streams beside the running ones
        self._ctx = LlamaContext(f"{self.source.location}/{self.source.gguf_file}", n_ctx=self.config.n_ctx,
                                 n_seq_max=self.config.max_batch_size + cached, n_threads=self.config.n_threads,
                                 extra_buffers=self.config.extra_buffers)
        self._tokenizer = load_tokenizer(self.source)
        specials = set(self._tokenizer.all_special_ids)
        eos = {i for i in specials if 0 <= i < self._ctx.n_vocab and self._ctx.is_eog(i)}
        if self._tokenizer.eos_token_id is not None:
            eos.add(self._tokenizer.eos_token_id)
        self.eos_ids: set[int] = eos
        self._embedding_table: Any = None

    def _continuous_scheduler(self) -> ContinuousScheduler:
        """llama.cpp's continuous scheduler (`engines/llamacpp_scheduler.py`) over this engine's context."""
        return ContinuousScheduler(self._ctx, self._tokenizer, self.eos_ids, max_running=self.config.max_batch_size,
                                   prefix_cache=self.config.prefix_cache, max_wait_ms=self.config.max_wait_ms,
                                   lock=self._gen_lock, exact=self.config.prefix_match is PrefixMatch.EXACT,
                                   background_patience=self.config.background_patience,
                                   background_share=self.config.background_share)

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (read from the GGUF file)."""
        return self._tokenizer

    @property
    def hidden_size(self) -> int:
        """Width of the input embeddings (and of soft prompts for this model)."""
        return self._ctx.n_embd

    @property
    def device(self) -> str:
        """Where decoding runs and where the weights sit, for people (the load line of `detot demo`/`generate`)."""
        return f"cpu (llama.cpp, {self._ctx.n_threads} threads; {self._ctx.buffers.describe()})"

    @property
    def buffers(self) -> BufferChoice:
        """The extra-buffer decision this engine's model was loaded with (`llamacpp_load`)."""
        return self._ctx.buffers

    @property
    def vocab_size(self) -> int:
        """Tokens in the model's vocabulary (rows of its token-embedding table)."""
        return self._ctx.n_vocab

    def token_embeddings(self, ids: list[int] | None) -> torch.Tensor:
        """Rows of the GGUF token-embedding table, dequantized to float32, `(len(ids), hidden)`; None: all.

        Read from the file with the `gguf` package (llama.cpp does not expose the table); the file is
        opened on first use.
        """
        import numpy as np
        from gguf.quants import dequantize

        if self._embedding_table is None:
            from gguf import GGUFReader

            reader = GGUFReader(f"{self.source.location}/{self.source.gguf_file}")
            self._embedding_table = next(t for t in reader.tensors if t.name == "token_embd.weight")
        table = self._embedding_table
        rows = table.data if ids is None else table.data[np.asarray(ids, dtype=np.int64)]
        out = dequantize(np.asarray(rows), table.tensor_type).reshape(len(rows), self.hidden_size)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    @property
    def context_length(self) -> int:
        """Most positions one request may take: the smaller of the model's context and `n_ctx`."""
        return min(self._ctx.n_ctx_train or self._ctx.n_ctx, self._ctx.n_ctx)

    def _run(self, rows: list[GenRow]) -> list[list[GenOutput]]:
        with self._gen_lock:
            results: list[list[GenOutput]] = [[] for _ in rows]
            parts = [(i, part) for i, row in enumerate(rows) for part in self._split(row)]
            for group in self._groups(parts):
                outs = generate_rows_llamacpp(self._ctx, self.tokenizer, [part for _, part in group],
                                              eos_ids=self.eos_ids)
                self._static_prompt_tokens += sum(part.positions for _, part in group)
                for (owner, _), out in zip(group, outs, strict=True):
                    results[owner] += out  # a row's parts run in order, so its samples stay in order
            return results

    def next_token_logits(self, request: Request, *, soft_prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the first new token for `request` (its soft prompt included), `(vocab,)` float32."""
        row = self.build_row(request, soft_prompt=soft_prompt)
        with self._gen_lock:
            self._ctx.clear()
            if row.soft_prompt is not None:
                self._ctx.decode_embeddings([(row.soft_prompt.detach().float().cpu().numpy(), 0, 0)])
            k, ids = row.soft_positions, row.prompt_ids
            last = self._ctx.decode_tokens([(t, k + j, 0, j == len(ids) - 1) for j, t in enumerate(ids)])
            return torch.from_numpy(self._ctx.logits(last[0]))

    def _split(self, row: GenRow) -> list[GenRow]:
        """A row as parts of at most `max_batch_size` samples (each sample keeps its greedy flag and seed)."""
        self._ctx.check_room(row.positions, row.max_new_tokens)
        return split_row(row, self.config.max_batch_size)  # the running streams (not the prefix cache's)

    def _groups(self, parts: list[tuple[int, GenRow]]) -> list[list[tuple[int, GenRow]]]:
        """Consecutive `(row index, part)` pairs packed into groups of at most `max_batch_size` sequences."""
        groups: list[list[tuple[int, GenRow]]] = []
        seqs = 0
        for owner, part in parts:
            if groups and seqs + part.n <= self.config.max_batch_size:
                groups[-1].append((owner, part))
                seqs += part.n
            else:
                groups.append([(owner, part)])
                seqs = part.n
        return groups

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> LlamaCppEngine:
        """Rebuild an engine from `dump_state()`."""
        return cls(config=EngineConfig(**state))


def generate_rows_llamacpp(ctx: LlamaContext, tokenizer: Any, rows: list[GenRow], *,
                           eos_ids: set[int]) -> list[list[GenOutput]]:
    """Decode rows that fit one context together; returns, per row, its `n` samples in order."""
    if not rows:
        return []
    ctx.clear()
    owner = [i for i, row in enumerate(rows) for _ in range(row.n)]  # sequence id -> row
    first = [owner.index(i) for i in range(len(rows))]  # the sequence that holds row i's prefill
    # ---- prefill: soft prompts (one embeddings batch), then every row's tokens (one token batch)
    ctx.decode_embeddings([(row.soft_prompt.detach().float().cpu().numpy(), first[i], 0)
                           for i, row in enumerate(rows) if row.soft_prompt is not None])
    entries = [(tok, row.soft_positions + j, first[i], j == len(row.prompt_ids) - 1)
               for i, row in enumerate(rows) for j, tok in enumerate(row.prompt_ids)]
    last = ctx.decode_tokens(entries)  # batch index of each row's last prompt token
    row_logits = [torch.from_numpy(ctx.logits(ix)) for ix in last]  # (V,) per row
    # ---- fan out: the other samples of a row share its cells
    for s, i in enumerate(owner):
        if s != first[i]:
            ctx.seq_cp(first[i], s)
    logits = {s: row_logits[i] for s, i in enumerate(owner)}
    pos = {s: rows[i].positions for s, i in enumerate(owner)}
    generators = seeded_generators(rows, "cpu")
    rank = sample_ranks(rows)
    tokens: list[list[int]] = [[] for _ in owner]
    logprob = [0.0] * len(owner)
    finish = ["length"] * len(owner)
    active = list(range(len(owner)))
    while active:
        step: list[tuple[int, int, int, bool]] = []
        for s in active:
            row = rows[owner[s]]
            tok = _pick(logits[s], row, generators[s], greedy=row.is_greedy(rank[s]))
            logprob[s] += float(torch.log_softmax(logits[s], dim=-1)[tok])
            tokens[s].append(tok)
            if tok in eos_ids or stop_in_tail(tokenizer, tokens[s], row.stop):
                finish[s] = "stop"
            elif len(tokens[s]) < row.max_new_tokens:
                step.append((tok, pos[s], s, True))
                continue
            ctx.seq_rm(s)
        if not step:
            break
        for (_, _, s, _), ix in zip(step, ctx.decode_tokens(step), strict=True):
            logits[s] = torch.from_numpy(ctx.logits(ix))
            pos[s] += 1
        active = [s for _, _, s, _ in step]
    results: list[list[GenOutput]] = [[] for _ in rows]
    for s, i in enumerate(owner):
        text, reason = finish_text(tokenizer, tokens[s], rows[i].stop, eos_ids, finish[s])
        results[i].append(GenOutput(text, tokens[s], reason, logprob[s]))
    return results
