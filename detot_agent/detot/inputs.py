"""What a DETOT call accepts: every input field of its signature, by name, none of them None, text fields as text.

Example:
    >>> import dspy
    >>> check_inputs(dspy.Signature("question -> answer"), {"question": "2 + 3?"})
    >>> check_inputs(dspy.Signature("question -> answer"), {"question": None})
    Traceback (most recent call last):
    ...
    detot_agent.errors.InvalidRequestError: input field 'question' is None; pass the text to answer
"""

from __future__ import annotations

from typing import Any

from detot_agent.errors import InputTypeError, InvalidRequestError

__all__ = ["check_inputs"]


def check_inputs(sig: Any, inputs: dict[str, Any], args: tuple[Any, ...] = ()) -> None:
    """Refuse a call DETOT cannot answer as given, saying what to pass instead.

    Raises:
        InvalidRequestError: positional arguments, a missing input field, or one that is None.
        InputTypeError: a text field given something else (also a `TypeError`).
    """
    names = list(sig.input_fields)
    if args:
        raise InvalidRequestError(f"DETOT takes its inputs by name, as DSPy modules do: detot({names[0]}=...) "
                                  f"(got {len(args)} positional argument(s); the inputs are {names})")
    missing = [name for name in names if name not in inputs]
    if missing:
        raise InvalidRequestError(f"missing input field(s) {missing}; the signature takes {names}")
    for name, field in sig.input_fields.items():
        value = inputs[name]
        if value is None:
            raise InvalidRequestError(f"input field {name!r} is None; pass the text to answer")
        if field.annotation is str and not isinstance(value, str):
            raise InputTypeError(f"input field {name!r} takes text, got {type(value).__name__} ({value!r:.40}); "
                                 f"pass str(...) if that is what you mean")
