"""The one settings convention: every settings object is a `StrictModel` (pydantic).

Each part of detot-agent reads one `StrictModel` subclass that lives beside it
(`EngineConfig` in `engines/config.py`, `ControllerConfig` and `MonitorConfig` in
`detot/`, `UpdateConfig` in `embedding/update.py`, `IndexConfig` in
`retrieval/index.py`, `Adjustments` in `detot/task.py`). Unknown keys and
out-of-range values are refused on construction, and on assignment, with one
readable line per offending field, so nothing that can fail validation is found
later inside a thread.

Example:
    >>> from pydantic import Field
    >>> class Demo(StrictModel):
    ...     size: int = Field(default=1, ge=1)
    >>> Demo(size=0)
    Traceback (most recent call last):
    ...
    detot_agent.errors.ConfigError: invalid Demo:
      size: Input should be greater than or equal to 1 (got 0)
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from detot_agent.errors import ConfigError

__all__ = ["StrictModel", "build", "format_validation_error"]


class StrictModel(BaseModel):
    """Base of every settings model: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(type(self).__name__, exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(type(self).__name__, exc)) from None


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
        >>> from detot_agent.engines.config import EngineConfig
        >>> build(EngineConfig, {"max_wait_ms": 2}, max_batch_size=4).max_batch_size
        4
    """
    merged = {**(data or {}), **overrides}
    return settings(**merged)
