"""Exceptions raised by detot-agent.

Every error the library raises on purpose derives from `DetotError`, so callers
can catch the whole family in one place::

    DetotError
    ├── ConfigError          a setting is missing, unknown or out of range
    ├── ModelNotFoundError   no model at the given path / id, or no default model
    ├── InvalidRequestError  a request the engine cannot serve as given
    │   ├── EmptyPromptError      every message is empty or whitespace
    │   └── ContextLengthError    prompt (+ soft prompt) does not fit the context
    └── SoftPromptError      a soft prompt has the wrong shape, dtype or values,
                             or its task / version is not registered

Messages name the offending value and the limit it broke, and say what to do.

Example:
    >>> from detot_agent.errors import DetotError, EmptyPromptError
    >>> issubclass(EmptyPromptError, DetotError)
    True
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ContextLengthError",
    "DetotError",
    "EmptyPromptError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "SoftPromptError",
]


class DetotError(Exception):
    """Base class of every error detot-agent raises on purpose."""


class ConfigError(DetotError, ValueError):
    """A setting is missing, unknown, or out of its allowed range."""


class ModelNotFoundError(DetotError, FileNotFoundError):
    """No model could be found at the given path or id."""


class InvalidRequestError(DetotError, ValueError):
    """The engine cannot serve this request as given."""


class EmptyPromptError(InvalidRequestError):
    """Every message of the request is empty or whitespace only."""


class ContextLengthError(InvalidRequestError):
    """The prompt, with its soft prompt, does not fit the model's context window."""


class SoftPromptError(DetotError, ValueError):
    """A soft prompt is malformed (shape, dtype, NaN/inf) or not registered."""
