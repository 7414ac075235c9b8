"""What DSPy expects a predictor call to leave behind, for DETOT's batched-engine path.

A `dspy.Predict` call goes through `lm(...)`, which fires the LM callbacks, adds the call to
`lm.history` (and the calling modules' histories) and to usage tracking, and then appends
`(predictor, inputs, prediction)` to `dspy.settings.trace`. DETOT's local path samples through
`engine.sample(request, n)` instead (one prefill for n samples), so it does the same bookkeeping
itself, here:

- `engine_round` draws one round and records it as one LM call: `on_lm_start`/`on_lm_end` callbacks,
  one history entry (the messages, every sample's text as `outputs`, `n`), and usage with the real
  token counts (the shared prefill counted once, every sample's output tokens).
- `record_trace` appends the *winning* sample's parsed fields as the inner predictor's trace entry,
  which is what `BootstrapFewShot` turns into demos, what GEPA reflects on and what MIPROv2
  bootstraps from. A call with no parseable sample leaves no entry (as a failed `Predict` call).

Example:
    >>> import dspy
    >>> predictor = dspy.Predict("question -> answer")
    >>> with dspy.context(trace=[]):
    ...     record_trace(predictor, {"question": "2 + 3?"}, {"answer": "5"})
    ...     step = dspy.settings.trace[-1]
    >>> step[0] is predictor, step[1], step[2].answer
    (True, {'question': '2 + 3?'}, '5')
"""

from __future__ import annotations

import datetime
import logging
import uuid
from typing import TYPE_CHECKING, Any

import dspy
from dspy.utils import callback as dspy_callback

if TYPE_CHECKING:
    from dspy.lm15 import Request

    from detot_agent.engines.base import BatchedEngine, Sample

__all__ = ["aengine_round", "engine_round", "record_trace"]

logger = logging.getLogger(__name__)


def _history_messages(request: Request) -> list[dict[str, str]]:
    system = [{"role": "system", "content": request.system}] if isinstance(request.system, str) else []
    return system + [{"role": m.role, "content": m.text or ""} for m in request.messages]


def _callbacks(lm: Any) -> list[Any]:
    return list(dspy.settings.get("callbacks", []) or []) + list(getattr(lm, "callbacks", []) or [])


def engine_round(lm: Any, engine: BatchedEngine, request: Request, n: int, *, soft_prompt: Any,
                 greedy: int) -> list[Sample]:
    """`engine.sample(request, n, ...)`, recorded on `lm` as one LM call (callbacks, history, usage).

    `lm` is the `dspy.LM` the engine serves (None: nothing is recorded, for engines used bare).
    """
    if lm is None:
        return engine.sample(request, n, soft_prompt=soft_prompt, greedy=greedy)
    call = _RecordedCall(lm, request, n, soft_prompt, greedy)
    samples: list[Sample] = []
    try:
        samples = engine.sample(request, n, soft_prompt=soft_prompt, greedy=greedy)
    except BaseException as exc:
        call.end([], exc)
        raise
    call.end(samples, None)
    return samples


async def aengine_round(lm: Any, engine: BatchedEngine, request: Request, n: int, *, soft_prompt: Any,
                        greedy: int) -> list[Sample]:
    """`engine_round` awaited on the event loop (`engine.asample`)."""
    if lm is None:
        return await engine.asample(request, n, soft_prompt=soft_prompt, greedy=greedy)
    call = _RecordedCall(lm, request, n, soft_prompt, greedy)
    samples: list[Sample] = []
    try:
        samples = await engine.asample(request, n, soft_prompt=soft_prompt, greedy=greedy)
    except BaseException as exc:
        call.end([], exc)
        raise
    call.end(samples, None)
    return samples


class _RecordedCall:
    """One engine round as DSPy records an LM call: `on_lm_start` when built, `end` runs `on_lm_end` and writes
    usage and history."""

    def __init__(self, lm: Any, request: Request, n: int, soft_prompt: Any, greedy: int) -> None:
        cfg = request.config
        self.lm, self.request = lm, request
        self.kwargs = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "seed": cfg.seed, "n": n,
                       "greedy": greedy, "soft_prompt": None if soft_prompt is None else tuple(soft_prompt.shape)}
        self.messages = _history_messages(request)
        self.callbacks = _callbacks(lm)
        self.call_id = uuid.uuid4().hex
        for cb in self.callbacks:
            try:
                cb.on_lm_start(call_id=self.call_id, instance=lm, inputs={"prompt": None, "messages": self.messages,
                                                                           "kwargs": self.kwargs})
            except Exception as exc:  # DSPy's rule: a failing callback is logged, never fails the call
                logger.warning("callback %r failed on_lm_start: %s", cb, exc)
        self.parent = dspy_callback.ACTIVE_CALL_ID.get()
        dspy_callback.ACTIVE_CALL_ID.set(self.call_id)

    def end(self, samples: list[Sample], error: BaseException | None) -> None:
        dspy_callback.ACTIVE_CALL_ID.set(self.parent)
        outputs = [s.text for s in samples]
        for cb in self.callbacks:
            try:
                cb.on_lm_end(call_id=self.call_id, outputs=outputs if error is None else None, exception=error)
            except Exception as exc:
                logger.warning("callback %r failed on_lm_end: %s", cb, exc)
        if error is not None:
            return
        lm = self.lm
        prompt = samples[0].input_tokens if samples else 0
        completion = sum(s.output_tokens for s in samples)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if dspy.settings.usage_tracker:
            dspy.settings.usage_tracker.add_usage(lm.model, usage)
        if not dspy.settings.disable_history:
            lm.update_history({
                "prompt": None, "messages": self.messages, "kwargs": self.kwargs, "response": None,
                "outputs": outputs, "usage": usage, "cost": None, "timestamp": datetime.datetime.now().isoformat(),
                "uuid": str(uuid.uuid4()), "model": lm.model, "response_model": lm.model,
                "model_type": getattr(lm, "model_type", "chat"), "request": self.request})


def record_trace(predictor: Any, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Append `(predictor, inputs, Prediction(**outputs))` to `dspy.settings.trace`, as `Predict` does."""
    trace = dspy.settings.trace
    if trace is None or dspy.settings.max_trace_size <= 0:
        return
    if len(trace) >= dspy.settings.max_trace_size:
        trace.pop(0)
    trace.append((predictor, dict(inputs), dspy.Prediction(**outputs)))
