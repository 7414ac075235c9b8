"""`LocalEngine`: a local Hugging Face causal LM behind DSPy 3.4's engine contract.

DSPy hands the engine one canonical `dspy.lm15.Request` per completion. The
engine renders it with the model's chat template, resolves the task's soft
prompt from the request metadata, and decodes through a dynamic batcher, so
concurrent calls from DSPy worker threads share one batch. `sample(request, n)`
draws n completions from one prefill, for self-consistency voting.

Example:
    >>> import dspy
    >>> from detot_agent import local_lm
    >>> lm = local_lm()                                   # doctest: +SKIP
    >>> dspy.configure(lm=lm)                             # doctest: +SKIP
    >>> dspy.Predict("question -> answer")(question="2+3?").answer  # doctest: +SKIP
    '5'
"""

from __future__ import annotations

from typing import Any

import torch
from dspy.lm15 import Request

from detot_agent.engines.base import AsyncEngine, BatchedEngine
from detot_agent.engines.config import EngineConfig, PrefixMatch
from detot_agent.engines.generation import GenOutput, GenRow, embed_row, generate_rows
from detot_agent.engines.models import LoadedModel, load_model, pick_device, pick_dtype
from detot_agent.engines.torch_scheduler import TorchScheduler
from detot_agent.softprompt.registry import SoftPromptRegistry

__all__ = ["AsyncLocalEngine", "LocalEngine"]


class LocalEngine(BatchedEngine):
    """A local causal LM serving DSPy requests, with batching and soft prompts.

    Args:
        model: a local HF folder, a `.gguf` file, a hub id, or None for the embedded default.
        config: engine settings (`EngineConfig`); keyword overrides win over it.
        registry: where per-task soft prompts are looked up (a new empty one by default).
        **overrides: any `EngineConfig` field.

    Example:
        >>> engine = LocalEngine("path/to/model.gguf", max_batch_size=8)  # doctest: +SKIP
        >>> from dspy.lm15 import Message, Request
        >>> [s.text for s in engine.sample(Request(model="m", messages=(Message.user("Hi"),)), n=2)]  # doctest: +SKIP
        ['Hello!', 'Hi there.']
    """

    id_prefix = "local"

    def __init__(
        self,
        model: str | None = None,
        *,
        config: EngineConfig | None = None,
        registry: SoftPromptRegistry | None = None,
        **overrides: Any,
    ) -> None:
        self._setup(model, config, registry, overrides)
        device = pick_device(self.config.device)
        self._loaded: LoadedModel = load_model(
            self.source,
            device=device,
            dtype=pick_dtype(self.config.dtype, device),
            attn_implementation=self.config.attn_implementation,
        )
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids: set[int] = eos_ids

    # ---- the model -------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The frozen transformers model (shared with other engines on the same source)."""
        return self._loaded.model

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer."""
        return self._loaded.tokenizer

    @property
    def hidden_size(self) -> int:
        """Width of the input embeddings (and of soft prompts for this model)."""
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def device(self) -> str:
        """Where decoding runs, for people: `cpu`, `cuda:0`, ..."""
        return str(self.model.device)

    @property
    def vocab_size(self) -> int:
        """Rows of the token-embedding table."""
        return int(self.model.get_input_embeddings().weight.shape[0])

    def token_embeddings(self, ids: list[int] | None) -> torch.Tensor:
        """Rows of the token-embedding table as float32 on the CPU, `(len(ids), hidden)`; None: all of it."""
        table = self.model.get_input_embeddings().weight.detach()
        rows = table if ids is None else table[torch.tensor(ids, dtype=torch.long, device=table.device)]
        return rows.float().cpu()

    @property
    def context_length(self) -> int:
        """Most positions (soft prompt + prompt + completion) the model takes."""
        cfg = self.model.config
        limit: int = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        return int(limit)

    # ---- decoding ----------------------------------------------------------------
    def _continuous_scheduler(self) -> TorchScheduler:
        """The torch backend of continuous batching with a prefix cache (`engines/torch_scheduler.py`)."""
        return TorchScheduler(self.model, self.tokenizer, self.eos_ids, max_running=self.config.max_batch_size,
                              prefix_cache=self.config.prefix_cache, max_wait_ms=self.config.max_wait_ms,
                              lock=self._gen_lock, exact=self.config.prefix_match is PrefixMatch.EXACT,
                              prefix_bytes=None if self.config.prefix_cache_mb is None
                              else int(self.config.prefix_cache_mb * 1e6),
                              background_patience=self.config.background_patience,
                              background_share=self.config.background_share)

    def _run(self, rows: list[GenRow]) -> list[list[GenOutput]]:
        with self._gen_lock:
            outputs = generate_rows(self.model, self.tokenizer, rows, eos_ids=self.eos_ids)
            self._static_prompt_tokens += sum(r.positions for r in rows)
            return outputs

    def next_token_logits(self, request: Request, *, soft_prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the first new token for `request` (its soft prompt included), `(vocab,)` float32 on the CPU."""
        row = self.build_row(request, soft_prompt=soft_prompt)
        embed = self.model.get_input_embeddings()
        with self._gen_lock, torch.inference_mode():
            x = embed_row(embed, row, device=self.model.device, dtype=embed.weight.dtype).unsqueeze(0)  # (1, L, H)
            positions = torch.arange(x.shape[1], device=self.model.device).unsqueeze(0)  # (1, L)
            return self.model(inputs_embeds=x, position_ids=positions, logits_to_keep=1).logits[0, -1].float().cpu()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> LocalEngine:
        """Rebuild an engine from `dump_state()`; weights are shared if already loaded."""
        return cls(config=EngineConfig(**state))


class AsyncLocalEngine(AsyncEngine):
    """The async twin of a `LocalEngine` (what DSPy's `async_engine=` takes; `load_state` rebuilds a torch engine).

    Example:
        >>> from detot_agent.engines.torch_engine import AsyncLocalEngine, LocalEngine
        >>> async_engine = AsyncLocalEngine(LocalEngine())  # doctest: +SKIP
    """

    sync_engine = LocalEngine
