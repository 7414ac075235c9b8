"""Validated settings for every part of detot-agent.

Each part reads one pydantic model; unknown keys and out-of-range values are
refused on construction with one readable line per offending field.

Example:
    >>> from detot_agent.config import EngineConfig
    >>> EngineConfig(max_batch_size=8).max_batch_size
    8
    >>> EngineConfig(max_batch_size=0)
    Traceback (most recent call last):
    ...
    detot_agent.errors.ConfigError: invalid EngineConfig:
      max_batch_size: Input should be greater than or equal to 1 (got 0)
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from detot_agent.errors import ConfigError

__all__ = ["DType", "Device", "EngineConfig", "StrictModel", "build"]


class StrictModel(BaseModel):
    """Base of every settings model: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(type(self).__name__, exc)) from None


class Device(str, Enum):
    """Where the model runs. `auto` picks CUDA when present, else the CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


class DType(str, Enum):
    """Floating-point type of the model weights. `auto`: bfloat16 on CUDA, float32 elsewhere."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Overflow(str, Enum):
    """What the engine does with a prompt longer than the model's context.

    `error` refuses it (`ContextLengthError`). `truncate_middle` keeps the first quarter and the
    last three quarters of the token budget and drops the middle, so the instructions at the
    start and the question and answer cue at the end survive; the budget is the context minus
    the soft prompt minus the requested new tokens (at most half the context).
    """

    ERROR = "error"
    TRUNCATE_MIDDLE = "truncate_middle"


class EngineConfig(StrictModel):
    """Settings of `LocalEngine`.

    Attributes:
        model: a local Hugging Face folder, a `.gguf` file, or a hub id (only where a
            hub is reachable). None means the embedded default model.
        device: `auto`, `cpu`, `cuda` or `mps`.
        dtype: weight dtype; `auto` is bfloat16 on CUDA and float32 elsewhere.
        dynamic_batching: gather concurrent `complete` calls into one batch.
        max_batch_size: most sequences (rows x samples) decoded together.
        max_wait_ms: how long the batcher waits for more requests after the first.
        default_max_tokens: new tokens when a request does not say.
        attn_implementation: passed to transformers (`sdpa`, `eager`, ...); None keeps its default.
        overflow: prompts longer than the context: `error` (default) or `truncate_middle` (see `Overflow`).
    """

    model: str | None = None
    device: Device = Device.AUTO
    dtype: DType = DType.AUTO
    dynamic_batching: bool = True
    max_batch_size: int = Field(default=16, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=10_000.0)
    default_max_tokens: int = Field(default=512, ge=1)
    attn_implementation: str | None = None
    overflow: Overflow = Overflow.ERROR


M = TypeVar("M", bound=BaseModel)


def format_validation_error(name: str, exc: ValidationError) -> str:
    """One line per offending field: `field: message (got value)`."""
    lines = [f"invalid {name}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown setting; check the spelling or remove it"
        got = err.get("input")
        shown = repr(got)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"  {where}: {msg} (got {shown})")
    return "\n".join(lines)


def build(settings: type[M], data: dict[str, Any] | None = None, /, **overrides: Any) -> M:
    """Build a settings model from a dict plus keyword overrides.

    Example:
        >>> build(EngineConfig, {"max_wait_ms": 2}, max_batch_size=4).max_batch_size
        4
    """
    merged = {**(data or {}), **overrides}
    return settings(**merged)
