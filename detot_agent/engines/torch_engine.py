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

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from dspy.lm15 import Request, Response, response_to_events

from detot_agent.config import build
from detot_agent.engines.base import BatchedEngine, Sample
from detot_agent.engines.batching import DynamicBatcher
from detot_agent.engines.config import EngineConfig
from detot_agent.engines.generation import GenOutput, GenRow, generate_rows
from detot_agent.engines.models import LoadedModel, load_model, pick_device, pick_dtype, resolve_model_source
from detot_agent.errors import InvalidRequestError
from detot_agent.softprompt.registry import SoftPromptRegistry

__all__ = ["AsyncLocalEngine", "LocalEngine", "Sample", "local_lm"]


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
        base = config.model_dump() if config is not None else {}
        if model is not None:
            overrides["model"] = str(model)
        self.config: EngineConfig = build(EngineConfig, base, **overrides)
        self.source = resolve_model_source(self.config.model)
        device = pick_device(self.config.device)
        self._loaded: LoadedModel = load_model(
            self.source,
            device=device,
            dtype=pick_dtype(self.config.dtype, device),
            attn_implementation=self.config.attn_implementation,
        )
        self.registry = registry if registry is not None else SoftPromptRegistry()
        self._gen_lock = threading.Lock()
        self._batcher: DynamicBatcher | None = None
        self._batcher_lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids: set[int] = eos_ids

    def __deepcopy__(self, memo: dict[int, Any]) -> LocalEngine:
        return self  # engines (and their weights) are shared by reference, never copied

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
    def context_length(self) -> int:
        """Most positions (soft prompt + prompt + completion) the model takes."""
        cfg = self.model.config
        limit: int = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        return int(limit)

    @property
    def batch_stats(self) -> dict[str, float]:
        """What the dynamic batcher has done so far (empty before the first batched call)."""
        return self._batcher.stats.as_dict() if self._batcher is not None else {}

    # ---- decoding ----------------------------------------------------------------
    def _run(self, rows: list[GenRow]) -> list[list[GenOutput]]:
        with self._gen_lock:
            return generate_rows(self.model, self.tokenizer, rows, eos_ids=self.eos_ids)

    def generate_batch(self, rows: list[GenRow]) -> list[list[GenOutput]]:
        """Decode prepared rows together in one batch, bypassing the batcher."""
        return self._run(rows)

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> LocalEngine:
        """Rebuild an engine from `dump_state()`; weights are shared if already loaded."""
        return cls(config=EngineConfig(**state))


class AsyncLocalEngine:
    """The async twin DSPy requires beside a custom engine; it runs the sync engine in a thread.

    Example:
        >>> engine = LocalEngine()  # doctest: +SKIP
        >>> async_engine = AsyncLocalEngine(engine)  # doctest: +SKIP
    """

    sync_engine: type[BatchedEngine] | None = None  # what load_state rebuilds (LocalEngine, set below)

    def __init__(self, engine: BatchedEngine) -> None:
        self.engine = engine

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncLocalEngine:
        return self

    @property
    def supported_params(self) -> frozenset[str]:
        """Same parameters as the sync engine."""
        return self.engine.supported_params

    async def complete(self, request: Request) -> Response:
        """Await one completion (decoded on the engine's batcher thread)."""
        return await asyncio.to_thread(self.engine.complete, request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        """Non-incremental async stream of canonical events."""
        response = await self.complete(request)
        for event in response_to_events(response):
            yield event

    async def aclose(self) -> None:
        """Nothing to release: the sync engine owns the model."""

    def dump_state(self) -> dict[str, Any]:
        """The sync engine's state."""
        return self.engine.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncLocalEngine:
        """Rebuild around a (shared-weights) sync engine."""
        return cls((cls.sync_engine or LocalEngine).load_state(state))


_ENGINE_FIELDS = set(EngineConfig.model_fields)


def local_lm(
    model: str | None = None,
    *,
    engine: LocalEngine | None = None,
    registry: SoftPromptRegistry | None = None,
    **kwargs: Any,
) -> Any:
    """A `dspy.LM` backed by a `LocalEngine`.

    Args:
        model: HF folder, `.gguf` file, hub id, or None for the embedded default.
        engine: reuse an existing engine instead of building one.
        registry: soft-prompt registry for a new engine.
        **kwargs: `EngineConfig` fields go to the engine; the rest (temperature, max_tokens,
            cache, num_retries, ...) to `dspy.LM`.

    Example:
        >>> import dspy
        >>> lm = local_lm(max_tokens=256, max_batch_size=8)  # doctest: +SKIP
        >>> dspy.configure(lm=lm)  # doctest: +SKIP
    """
    import dspy

    engine_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _ENGINE_FIELDS}
    if engine is None:
        engine = LocalEngine(model, registry=registry, **engine_kw)
    elif engine_kw or model is not None:
        raise InvalidRequestError(f"pass either engine= or model/engine settings, not both ({sorted(engine_kw)})")
    kwargs.setdefault("num_retries", 0)
    return dspy.LM(f"local/{engine.name}", engine=engine, async_engine=AsyncLocalEngine(engine), **kwargs)
