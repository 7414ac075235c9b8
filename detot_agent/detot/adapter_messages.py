"""The messages an adapter would send, including what a wrapper adds in its `__call__`.

DETOT samples through its engine, so it asks the active adapter for messages (`format`) instead of letting
the adapter call an LM. An adapter that changes the signature or the inputs in `__call__` would be bypassed
that way: `dspy.Refine` does exactly that, wrapping the configured adapter to append a `hint_` input with its
advice from the last attempt. For such an adapter `shown_messages` runs its `__call__` against a stand-in LM
that records the messages and stops the call, so the hint reaches DETOT's prompt. Adapters that keep DSPy's
`__call__` (the built-in ones, `LenientChatAdapter`, `PlainAdapter`) are formatted directly.

Example:
    >>> import dspy
    >>> sig = dspy.Signature("question -> answer")
    >>> class Hinting(dspy.ChatAdapter):
    ...     def __call__(self, lm, lm_kwargs, signature, demos, inputs):
    ...         inputs["hint_"] = "count twice"
    ...         signature = signature.append("hint_", dspy.InputField(desc="a hint"))
    ...         return super().__call__(lm, lm_kwargs, signature, demos, inputs)
    >>> "count twice" in shown_messages(Hinting(), sig, [], {"question": "2 + 2?"})[-1]["content"]
    True
"""

from __future__ import annotations

from typing import Any

import dspy

__all__ = ["shown_messages"]

_PLAIN_CALLS = {dspy.Adapter.__call__, dspy.ChatAdapter.__call__, dspy.JSONAdapter.__call__}


class _Shown(Exception):
    """Raised by the stand-in LM with the messages the adapter would send."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        super().__init__("messages recorded")
        self.messages = messages


class _RecordingLM(dspy.BaseLM):
    """A stand-in LM: records the messages of the first call and stops it."""

    def __init__(self, model: str) -> None:
        super().__init__(model=model, cache=False)

    def __call__(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                 **kwargs: Any) -> Any:
        raise _Shown(list(messages or []))

    def forward(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                **kwargs: Any) -> Any:
        raise _Shown(list(messages or []))


def shown_messages(adapter: dspy.Adapter, signature: Any, demos: list[Any], inputs: dict[str, Any],
                   model: str = "detot") -> list[dict[str, Any]]:
    """What `adapter` would send for one call: `adapter.format(...)`, or, where its class overrides `__call__`
    (a wrapper such as `dspy.Refine`'s), the messages its `__call__` hands to the LM."""
    if type(adapter).__call__ in _PLAIN_CALLS:  # DSPy's own pipeline: format is what it would send
        return list(adapter.format(signature, demos=demos, inputs=inputs))
    try:
        adapter(_RecordingLM(model), {}, signature, demos, dict(inputs))
    except _Shown as shown:
        return shown.messages
    return list(adapter.format(signature, demos=demos, inputs=inputs))  # it never called the LM: its own layout

