"""One DETOT call written once, run two ways: a generator that yields the engine rounds it needs.

DETOT's pipeline (retrieve, prompt, draw rounds, vote, record) is a generator: where it needs samples it
yields an `EngineCall` and receives the engine's `Sample`s back. `run_steps` drives it synchronously
(`engine.sample` on the calling thread, as `DETOT.__call__` always did); `arun_steps` drives it on the
event loop (`await engine.asample`: the row joins the engine's dynamic batcher and the task awaits its
future), so `await detot.acall(...)` needs no thread per call and concurrent calls share the engine's
batches. Everything else in the pipeline is quick, synchronous code that runs where the driver runs.

Example:
    >>> def pipeline():
    ...     first = yield "round 1"
    ...     second = yield "round 2"
    ...     return first + second
    >>> run_steps(pipeline(), lambda call: [call])
    ['round 1', 'round 2']
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from detot_agent.detot.tracing import aengine_round, engine_round

if TYPE_CHECKING:
    from dspy.lm15 import Request

    from detot_agent.engines.base import BatchedEngine, Sample

__all__ = ["EngineCall", "Steps", "arun_steps", "now", "run_steps"]

T = TypeVar("T")
Steps = Generator[Any, Any, T]  # yields EngineCall, is sent list[Sample], returns T


@dataclass(frozen=True)
class EngineCall:
    """One round a pipeline needs: `n` samples of `request` from `engine`, recorded on `lm` (None: not)."""

    lm: Any
    engine: BatchedEngine
    request: Request
    n: int
    soft_prompt: Any
    greedy: int

    def run(self) -> list[Sample]:
        return engine_round(self.lm, self.engine, self.request, self.n, soft_prompt=self.soft_prompt,
                            greedy=self.greedy)

    async def arun(self) -> list[Sample]:
        return await aengine_round(self.lm, self.engine, self.request, self.n, soft_prompt=self.soft_prompt,
                                   greedy=self.greedy)


def now(value: T) -> Steps[T]:
    """A pipeline step that needs no round: returns `value` (for draws that sample synchronously)."""
    return value
    yield  # unreachable: makes this a generator


def run_steps(steps: Steps[T], execute: Callable[[Any], Any] = lambda call: call.run()) -> T:
    """Drive `steps` on this thread, each yielded call answered by `execute(call)`; returns its result. An error
    of a call is thrown into the pipeline, so its `finally` blocks and handlers run."""
    value: Any = None
    error: BaseException | None = None
    while True:
        finished, call = _advance(steps, value, error)
        if finished:
            return call
        error = None
        try:
            value = execute(call)
        except BaseException as exc:  # handed to the pipeline, which re-raises it unless it handles it
            error = exc


async def arun_steps(steps: Steps[T], execute: Callable[[Any], Awaitable[Any]] = lambda call: call.arun()) -> T:
    """`run_steps` on the event loop: each call is awaited."""
    value: Any = None
    error: BaseException | None = None
    while True:
        finished, call = _advance(steps, value, error)
        if finished:
            return call
        error = None
        try:
            value = await execute(call)
        except BaseException as exc:
            error = exc


def _advance(steps: Steps[Any], value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Resume `steps` with the last call's value (or throw its error in): `(False, next call)`, or `(True, the
    pipeline's result)` once it returns."""
    try:
        return False, (steps.throw(error) if error is not None else steps.send(value))
    except StopIteration as stop:
        return True, stop.value
