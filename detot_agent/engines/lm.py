"""`local_lm`: a local model as a `dspy.LM`, served by the torch engine or by llama.cpp.

`engine="auto"` (the default) picks llama.cpp for a `.gguf` file on the CPU when llama-cpp-python
is installed (several times faster there), and the torch engine otherwise (Hugging Face folders,
hub ids, CUDA). Both render prompts with the same tokenizer and chat template, take soft prompts,
batch concurrent calls and draw `sample(n)` from one prefill. Soft prompts are *trained* only on
the torch engine (gradients); `training_engine(engine)` returns what trains for either (for
llama.cpp, a torch engine on the same file, loaded on first use).

Example:
    >>> import dspy
    >>> lm = local_lm("model.gguf", engine="llamacpp", max_tokens=256)  # doctest: +SKIP
    >>> dspy.configure(lm=lm)                                            # doctest: +SKIP
"""

from __future__ import annotations

import threading
from typing import Any, Literal

from detot_agent.config import build
from detot_agent.engines.base import AsyncEngine, BatchedEngine
from detot_agent.engines.config import Device, EngineConfig
from detot_agent.errors import ConfigError, InvalidRequestError
from detot_agent.softprompt.registry import SoftPromptRegistry

__all__ = ["ENGINES", "AsyncLlamaCppEngine", "LazyTrainingEngine", "build_engine", "choose_engine", "local_lm",
           "serving_engine", "training_engine"]

ENGINES = ("auto", "torch", "llamacpp")
EngineKind = Literal["auto", "torch", "llamacpp"]
_ENGINE_FIELDS = set(EngineConfig.model_fields)


def choose_engine(kind: str, config: EngineConfig) -> str:
    """`torch` or `llamacpp` for an engine kind (`auto` decides by model file, device and what is installed).

    Example:
        >>> choose_engine("torch", EngineConfig())
        'torch'
    """
    if kind not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {kind!r}")
    if kind != "auto":
        return kind
    from detot_agent.engines.llamacpp_runtime import llama_cpp_available
    from detot_agent.engines.models import resolve_model_source

    if Device(config.device) not in (Device.AUTO, Device.CPU) or not llama_cpp_available():
        return "torch"
    if resolve_model_source(config.model).gguf_file is None:
        return "torch"
    if Device(config.device) is Device.AUTO:
        import torch

        if torch.cuda.is_available():
            return "torch"
    return "llamacpp"


def build_engine(model: str | None = None, *, engine: str = "auto", registry: SoftPromptRegistry | None = None,
                 **settings: Any) -> BatchedEngine:
    """An engine of the chosen kind (see `choose_engine`)."""
    config = build(EngineConfig, {"model": str(model)} if model is not None else None, **settings)
    if choose_engine(engine, config) == "llamacpp":
        from detot_agent.engines.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(config=config, registry=registry)
    from detot_agent.engines.torch_engine import LocalEngine

    return LocalEngine(config=config, registry=registry)


class AsyncLlamaCppEngine(AsyncEngine):
    """The async twin of a `LlamaCppEngine` (`load_state` rebuilds a llama.cpp engine)."""

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncLlamaCppEngine:
        """Rebuild around a llama.cpp engine."""
        from detot_agent.engines.llamacpp_engine import LlamaCppEngine

        return cls(LlamaCppEngine.load_state(state))


def local_lm(
    model: str | None = None,
    *,
    engine: EngineKind | str | BatchedEngine = "auto",
    registry: SoftPromptRegistry | None = None,
    **kwargs: Any,
) -> Any:
    """A `dspy.LM` backed by a local engine.

    Args:
        model: HF folder, `.gguf` file, hub id, or None for the embedded default.
        engine: `auto` (llama.cpp for GGUF on CPU when installed, else torch), `torch`, `llamacpp`,
            or an engine object to reuse.
        registry: soft-prompt registry for a new engine.
        **kwargs: `EngineConfig` fields go to the engine; the rest (temperature, max_tokens,
            cache, num_retries, ...) to `dspy.LM`.

    Raises:
        ConfigError: an unknown engine kind or setting (before any model is loaded).

    Example:
        >>> import dspy
        >>> lm = local_lm(max_tokens=256, max_batch_size=8)  # doctest: +SKIP
        >>> dspy.configure(lm=lm)  # doctest: +SKIP
    """
    import dspy

    engine_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _ENGINE_FIELDS}
    if isinstance(engine, str):
        built = build_engine(model, engine=engine, registry=registry, **engine_kw)
    elif isinstance(engine, BatchedEngine):
        if engine_kw or model is not None:
            raise InvalidRequestError(f"pass either an engine object or model/engine settings, not both "
                                      f"({sorted(engine_kw)})")
        built = engine
    else:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)} or an engine object, got {engine!r}")
    kwargs.setdefault("num_retries", 0)
    from detot_agent.engines.llamacpp_engine import LlamaCppEngine

    if isinstance(built, LlamaCppEngine):
        return dspy.LM(f"llamacpp/{built.name}", engine=built, async_engine=AsyncLlamaCppEngine(built), **kwargs)
    from detot_agent.engines.torch_engine import AsyncLocalEngine

    return dspy.LM(f"local/{built.name}", engine=built, async_engine=AsyncLocalEngine(built), **kwargs)


class LazyTrainingEngine:
    """Stands in for the torch engine that trains soft prompts for a llama.cpp-served model.

    Knows the soft-prompt width at once (from the serving engine); the torch engine itself is loaded
    the first time anything else is asked of it (a re-optimization that trains), then kept.
    """

    def __init__(self, serving: BatchedEngine) -> None:
        self.serving = serving
        self._engine: Any = None
        self._lock = threading.Lock()

    @property
    def hidden_size(self) -> int:
        """Width of the model's input embeddings."""
        return self.serving.hidden_size

    @property
    def loaded(self) -> bool:
        """Whether the torch engine has been loaded."""
        return self._engine is not None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        with self._lock:
            if self._engine is None:
                from detot_agent.engines.torch_engine import LocalEngine

                cfg = self.serving.config
                self._engine = LocalEngine(cfg.model, device="cpu", dtype="float32", dynamic_batching=False)
        return getattr(self._engine, name)


def serving_engine(lm: Any) -> BatchedEngine | None:
    """The LM's engine when it serves batched `sample(request, n, soft_prompt=...)` (torch, llama.cpp, vLLM), else
    None (any other `dspy.LM`, or no LM)."""
    engine = getattr(lm, "engine", None)
    return engine if isinstance(engine, BatchedEngine) else None


def training_engine(serving: Any) -> Any:
    """What trains soft prompts for `serving`'s model: itself (torch), a `LazyTrainingEngine` (llama.cpp:
    a torch engine on the same GGUF file, loaded on first use), or None (vLLM and others)."""
    from detot_agent.engines.llamacpp_engine import LlamaCppEngine
    from detot_agent.engines.torch_engine import LocalEngine

    if isinstance(serving, LocalEngine):
        return serving
    if isinstance(serving, LlamaCppEngine):
        return LazyTrainingEngine(serving)
    return None
