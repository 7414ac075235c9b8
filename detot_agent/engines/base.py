"""What every engine shares: request -> decode row, and the DSPy engine contract on top of `_run(rows)`.

`RequestBuilder` renders a request (chat template), resolves its soft prompt and checks budgets, so
`LocalEngine` (transformers), `LlamaCppEngine` (llama.cpp) and `VLLMEngine` (vLLM) turn one DSPy
request into the same token ids, soft prompt and sampling settings; `generation.embed_row` then turns that row into the
`(k + T, hidden)` input embeddings. `BatchedEngine` adds dynamic batching, `sample`, `complete`,
`stream`, `close` and `dump_state`; an engine only supplies `_run(rows)`.

Example:
    >>> from detot_agent.engines.base import RequestBuilder
    >>> hasattr(RequestBuilder, "build_row")
    True
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

from detot_agent.config import build
from detot_agent.engines.batching import DynamicBatcher
from detot_agent.engines.config import EngineConfig, Overflow
from detot_agent.engines.continuous import ContinuousCore
from detot_agent.engines.generation import BACKGROUND, GenOutput, GenRow
from detot_agent.engines.models import ModelSource, resolve_model_source
from detot_agent.engines.serving import SERVING, ServingLoad
from detot_agent.errors import ConfigError, ContextLengthError, EmptyPromptError, InvalidRequestError
from detot_agent.softprompt.registry import METADATA_TASK, METADATA_VERSION, SoftPromptRegistry, check_soft_prompt

__all__ = ["AsyncEngine", "BatchedEngine", "RequestBuilder", "Sample"]


def _system_text(request: Request) -> str:
    system = request.system
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "".join(getattr(part, "text", "") or "" for part in system)


class RequestBuilder:
    """Turns DSPy requests into `GenRow`s; subclasses provide the attributes below.

    Attributes:
        config: the engine's `EngineConfig` (overflow rule, default max tokens).
        registry: where per-task soft prompts are looked up.
        tokenizer: the model's tokenizer (its chat template renders the messages).
        hidden_size: width of the model's input embeddings.
        context_length: most positions the model takes.
    """

    config: EngineConfig
    registry: SoftPromptRegistry

    @property
    def tokenizer(self) -> Any:
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def context_length(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> str:
        """Where decoding runs, for people (`cpu`, `cuda:0`, `cpu (llama.cpp, ...)`)."""
        raise NotImplementedError

    # ---- request -> row ----------------------------------------------------------
    def render(self, request: Request) -> list[int]:
        """Token ids of the request's prompt, through the model's chat template.

        Raises:
            EmptyPromptError: every message (and the system text) is empty or whitespace.
        """
        system = _system_text(request)
        messages = [{"role": m.role, "content": m.text or ""} for m in request.messages]
        if not system.strip() and not any(m["content"].strip() for m in messages):
            raise EmptyPromptError(
                "request has no text: every message is empty or whitespace; pass a non-empty prompt"
            )
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return self.render_messages(messages)

    def render_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids for chat messages (`role`, `content`), ending with the assistant turn."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:"
        return list(tok(text, add_special_tokens=True)["input_ids"])

    def soft_prompt_for(self, request: Request) -> tuple[str, int, torch.Tensor] | None:
        """`(task, version, tensor)` named by the request's metadata, or None."""
        extensions = request.config.extensions or {}
        metadata = extensions.get("metadata") or {}
        task = metadata.get(METADATA_TASK) if isinstance(metadata, dict) else None
        if not task:
            return None
        asked = metadata.get(METADATA_VERSION)
        users = [m.text for m in request.messages if m.role == "user"]
        version, tensor = self.registry.resolve(str(task), None if asked is None else int(asked),
                                                text=users[-1] if users else "")
        check_soft_prompt(tensor, hidden_size=self.hidden_size, where=f"soft prompt of task {task!r} v{version}")
        return str(task), version, tensor

    def build_row(self, request: Request, *, n: int = 1, soft_prompt: torch.Tensor | None = None) -> GenRow:
        """Validate a request and turn it into a decode row (used by `complete` and `sample`)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequestError(f"n must be an integer >= 1, got {n!r}")
        cfg = request.config
        if cfg.max_tokens is not None and cfg.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {cfg.max_tokens}")
        ids = self.render(request)
        if soft_prompt is None:
            found = self.soft_prompt_for(request)
            soft_prompt = found[2] if found else None
        else:
            check_soft_prompt(soft_prompt, hidden_size=self.hidden_size)
        k = 0 if soft_prompt is None else int(soft_prompt.shape[0])
        want = cfg.max_tokens or self.config.default_max_tokens
        if self.config.overflow is Overflow.TRUNCATE_MIDDLE and len(ids) + k + want > self.context_length:
            budget = self.context_length - k - min(want, self.context_length // 2)
            if budget >= 8:  # keep the head (instructions) and the tail (question, answer cue)
                head = budget // 4
                ids = ids[:head] + ids[len(ids) - (budget - head):]
        room = self.context_length - len(ids) - k
        if room < 1:
            raise ContextLengthError(
                f"prompt is {len(ids)} tokens + {k} soft-prompt vectors = {len(ids) + k} positions, "
                f"but the model's context is {self.context_length}; shorten the prompt or use fewer demos"
            )
        max_new = min(want, room)
        return GenRow(
            prompt_ids=ids,
            soft_prompt=soft_prompt,
            n=n,
            temperature=float(cfg.temperature or 0.0),
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=max_new,
            stop=tuple(cfg.stop or ()),
            seed=cfg.seed,
            background=BACKGROUND.get(),  # built inside `background_work()`: serving goes first
        )


@dataclass(frozen=True)
class Sample:
    """One completion drawn by `LocalEngine.sample`.

    Attributes:
        text: the completion text.
        output_tokens: tokens generated for it.
        logprob: summed log-probability of those tokens under the model (before temperature).
        finish_reason: `stop` or `length`.
        input_tokens: prompt positions its prefill read (text tokens plus soft-prompt vectors); the `n`
            samples of one `sample` call share that one prefill.
    """

    text: str
    output_tokens: int
    logprob: float
    finish_reason: str
    input_tokens: int = 0


class BatchedEngine(RequestBuilder):
    """The DSPy engine contract on top of `_run(rows)`: dynamic batching, `sample`, `complete`, state.

    Subclasses set `config`, `registry`, `source`, `_batcher = None`, `_batcher_lock` and implement
    `_run(rows) -> outputs per row`; `id_prefix` names their responses.
    """

    supported_params = frozenset({"temperature", "top_p", "max_tokens", "stop", "seed"})
    id_prefix = "engine"
    source: ModelSource
    _batcher: DynamicBatcher | ContinuousCore | None
    _batcher_lock: threading.Lock
    _gen_lock: threading.Lock

    def _setup(self, model: str | None, config: EngineConfig | None, registry: SoftPromptRegistry | None,
               overrides: dict[str, Any]) -> None:
        """What every engine's `__init__` does first: settings (validated), model source, registry, batcher."""
        base = config.model_dump() if config is not None else {}
        if model is not None:
            overrides["model"] = str(model)
        self.config = build(EngineConfig, base, **overrides)
        self.source = resolve_model_source(self.config.model)
        self.registry = registry if registry is not None else SoftPromptRegistry()
        self._gen_lock = threading.Lock()
        self._batcher = None
        self._batcher_lock = threading.Lock()
        self._static_prompt_tokens = 0  # prompt positions the static path prefilled (soft prompts included)

    def __deepcopy__(self, memo: dict[int, Any]) -> BatchedEngine:
        return self  # engines (and their weights) are shared by reference, never copied

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its settings (`dump_state`): unpickling rebuilds the engine and loads the model
        again (how `save_program=True` stores a program that holds a local LM)."""
        return (type(self).load_state, (self.dump_state(),))

    @property
    def name(self) -> str:
        """Short model name (file or folder name), used in `local/<name>` and `vllm/<name>`."""
        return self.source.name

    @property
    def serving_load(self) -> ServingLoad:
        """Serving rows in flight in every engine of this process (`engines/serving.py`): training waits on it."""
        return SERVING

    @property
    def batch_stats(self) -> dict[str, float]:
        """What the dynamic batcher has done so far (empty before the first batched call)."""
        return self._batcher.stats.as_dict() if self._batcher is not None else {}

    @property
    def prompt_tokens_decoded(self) -> int:
        """Prompt positions prefilled so far (soft prompts included), by either scheduler; prefix-cache hits
        are not counted (they are `batch_stats["prompt_tokens_reused"]`)."""
        return self._static_prompt_tokens + int(self.batch_stats.get("prompt_tokens_decoded", 0))

    def _run(self, rows: list[GenRow]) -> list[list[GenOutput]]:
        raise NotImplementedError

    def generate_batch(self, rows: list[GenRow]) -> list[list[GenOutput]]:
        """Decode prepared rows together in one batch, bypassing the batcher."""
        return self._run(rows)

    def _decode(self, row: GenRow) -> list[GenOutput]:
        with contextlib.nullcontext() if row.background else SERVING.serving():  # engines/serving.py
            if not self.config.dynamic_batching:
                return self._run([row])[0]
            return self._batcher_now().submit(row).result()

    def _batcher_now(self) -> DynamicBatcher | ContinuousCore:
        """The batcher, started on first use: the engine's continuous scheduler (`_continuous_scheduler`, with
        `scheduler="continuous"`), else the static dynamic batcher."""
        with self._batcher_lock:
            if self._batcher is None:
                scheduler = self._continuous_scheduler() if self.config.continuous else None
                self._batcher = scheduler or DynamicBatcher(self._run, max_batch_size=self.config.max_batch_size,
                                                            max_wait_ms=self.config.max_wait_ms)
            return self._batcher

    def _continuous_scheduler(self) -> ContinuousCore | None:
        """This engine's continuous scheduler (`engines/continuous.py`); None: it batches statically."""
        return None

    def sample(self, request: Request, n: int, *, soft_prompt: torch.Tensor | None = None,
               greedy: int = 0) -> list[Sample]:
        """Draw `n` completions of one request from a single shared prefill.

        Args:
            request: the canonical request (temperature, top_p, max_tokens, stop, seed honoured;
                temperature 0 or unset means greedy, so all n samples are equal).
            n: number of samples (>= 1).
            soft_prompt: a `(k, hidden)` tensor to use instead of the one named in metadata.
            greedy: the first `greedy` samples are greedy whatever the temperature (the same prefill
                serves a greedy answer and sampled ones; sampled sample j uses seed + j - greedy).
        """
        row = self._sample_row(request, n, soft_prompt, greedy)
        return self._samples(row, self._decode(row))

    async def asample(self, request: Request, n: int, *, soft_prompt: torch.Tensor | None = None,
                      greedy: int = 0) -> list[Sample]:
        """`sample`, awaited on the event loop: the row joins the dynamic batcher's queue and the caller awaits
        its future (no thread per call); without dynamic batching the batch of one runs in a worker thread."""
        row = self._sample_row(request, n, soft_prompt, greedy)
        with contextlib.nullcontext() if row.background else SERVING.serving():
            if not self.config.dynamic_batching:
                return self._samples(row, await asyncio.to_thread(lambda: self._run([row])[0]))
            return self._samples(row, await asyncio.wrap_future(self._batcher_now().submit(row)))

    def _sample_row(self, request: Request, n: int, soft_prompt: torch.Tensor | None, greedy: int) -> GenRow:
        row = self.build_row(request, n=n, soft_prompt=soft_prompt)
        if isinstance(greedy, bool) or not isinstance(greedy, int) or not 0 <= greedy <= n:
            raise InvalidRequestError(f"greedy must be an integer from 0 to n ({n}), got {greedy!r}")
        row.greedy = greedy
        return row

    @staticmethod
    def _samples(row: GenRow, outputs: list[GenOutput]) -> list[Sample]:
        return [Sample(o.text, len(o.token_ids), o.logprob, o.finish_reason, row.positions) for o in outputs]

    def complete(self, request: Request) -> Response:
        """DSPy engine entry point: one request, one response (with token usage)."""
        row = self.build_row(request)
        out = self._decode(row)[0]
        return Response(
            id=f"{self.id_prefix}-{uuid.uuid4().hex[:12]}",
            model=request.model,
            message=Message.assistant([TextPart(out.text)]),
            finish_reason="stop" if out.finish_reason == "stop" else "length",
            usage=Usage(input_tokens=row.positions, output_tokens=len(out.token_ids)),
        )

    def stream(self, request: Request) -> Iterator[Any]:
        """Non-incremental stream: the whole response as canonical events."""
        return iter(response_to_events(self.complete(request)))

    def close(self) -> None:
        """Stop the batcher thread (the engine may be used again afterwards)."""
        with self._batcher_lock:
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

    def dump_state(self) -> dict[str, Any]:
        """Settings that rebuild this engine (the model by the spec the user gave)."""
        state = self.config.model_dump(mode="json")
        state["model"] = self.source.spec
        return state

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> BatchedEngine:
        """Rebuild an engine from `dump_state()`."""
        raise NotImplementedError


class AsyncEngine:
    """The async twin DSPy requires beside a custom engine; it runs the sync engine in a thread.

    Each engine kind has its own subclass naming the sync class `load_state` rebuilds
    (`AsyncLocalEngine` in `torch_engine.py`, `AsyncLlamaCppEngine` in `lm.py`, `AsyncVLLMEngine`).

    Example:
        >>> from detot_agent.engines.torch_engine import AsyncLocalEngine, LocalEngine
        >>> engine = LocalEngine()  # doctest: +SKIP
        >>> async_engine = AsyncLocalEngine(engine)  # doctest: +SKIP
    """

    sync_engine: type[BatchedEngine] | None = None  # what load_state rebuilds (set by each subclass)

    def __init__(self, engine: BatchedEngine) -> None:
        self.engine = engine

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncEngine:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled around its sync engine (one pickle shares one rebuilt engine between the two)."""
        return (type(self), (self.engine,))

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
    def load_state(cls, state: dict[str, Any]) -> AsyncEngine:
        """Rebuild around a (shared-weights) sync engine of this kind."""
        if cls.sync_engine is None:
            raise ConfigError(f"{cls.__name__} names no sync engine to rebuild; use the async twin of an engine "
                              "kind (AsyncLocalEngine, AsyncLlamaCppEngine, AsyncVLLMEngine)")
        return cls(cls.sync_engine.load_state(state))


def __getattr__(name: str) -> Any:
    """Deprecated since 0.4.0: `AsyncLocalEngine` lives in `detot_agent.engines.torch_engine` (and at the top
    level). Programs saved before name this path; they still load."""
    if name == "AsyncLocalEngine":
        warnings.warn("detot_agent.engines.base.AsyncLocalEngine moved to detot_agent.engines.torch_engine "
                      "(import it from detot_agent)", DeprecationWarning, stacklevel=2)
        from detot_agent.engines.torch_engine import AsyncLocalEngine

        return AsyncLocalEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
