"""Exceptions raised by detot-agent.

Every error the library raises on purpose derives from `DetotError`, so callers
can catch the whole family in one place::

    DetotError
    ├── ConfigError          a setting is missing, unknown or out of range
    ├── ModelNotFoundError   no model at the given path / id, or no default model
    ├── InvalidRequestError  a request (to an engine, to DETOT, to a helper) that cannot be served as given
    │   ├── EmptyPromptError      every message (or every input field) is empty or whitespace
    │   ├── ContextLengthError    prompt (+ soft prompt) does not fit the context
    │   └── InputTypeError        an argument of the wrong type (also a TypeError)
    ├── EngineClosedError    the engine (its batcher) was closed; build a new one (also a RuntimeError)
    ├── SoftPromptError      a soft prompt has the wrong shape, dtype or values,
    │                        or its task / version is not registered
    ├── IndexDataError       bad exemplar records or vectors (no text, duplicate id, NaN), bad k
    │   └── EmptyIndexError       searching an index that holds nothing
    ├── DataFileError        a data file cannot be read (names the file and the line)
    ├── ArtefactError        a saved artefact is missing, corrupted, swapped, of another kind,
    │                        built with another encoder/model, or from a newer format
    ├── ProgramError         a program of thought was refused (unsafe construct, a limit) or failed
    ├── FitError             a fit cannot go on (a metric that raised, a fit folder of other settings, no time left)
    └── WorkerLostError      (detot_agent.evaluation.distributed) every Ray worker of an eval is gone

Messages name the offending value and the limit it broke, and say what to do.

Example:
    >>> from detot_agent.errors import DetotError, EmptyPromptError
    >>> issubclass(EmptyPromptError, DetotError)
    True
"""

from __future__ import annotations

__all__ = [
    "ArtefactError",
    "ConfigError",
    "ContextLengthError",
    "DataFileError",
    "DetotError",
    "EmptyIndexError",
    "EmptyPromptError",
    "EngineClosedError",
    "FitError",
    "IndexDataError",
    "InputTypeError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "ProgramError",
    "SoftPromptError",
]


class DetotError(Exception):
    """Base class of every error detot-agent raises on purpose."""


class ConfigError(DetotError, ValueError):
    """A setting is missing, unknown, or out of its allowed range."""


class ModelNotFoundError(DetotError, FileNotFoundError):
    """No model could be found at the given path or id."""


class InvalidRequestError(DetotError, ValueError):
    """A request (to an engine, to DETOT, to a helper) that cannot be served as given."""


class EmptyPromptError(InvalidRequestError):
    """Every message of the request is empty or whitespace only."""


class ContextLengthError(InvalidRequestError):
    """The prompt, with its soft prompt, does not fit the model's context window."""


class InputTypeError(InvalidRequestError, TypeError):
    """An argument of the wrong type (say, a str where a list of texts is expected)."""


class EngineClosedError(DetotError, RuntimeError):
    """The engine, or its batcher, was closed; build a new one."""


class SoftPromptError(DetotError, ValueError):
    """A soft prompt is malformed (shape, dtype, NaN/inf) or not registered."""


class IndexDataError(DetotError, ValueError):
    """Exemplar records or vectors that cannot go into (or be searched in) an index."""


class EmptyIndexError(IndexDataError):
    """The index holds no records."""


class DataFileError(DetotError, ValueError):
    """A data file cannot be read; the message names the file and the line."""


class ArtefactError(DetotError, ValueError):
    """A saved artefact is missing, corrupted, of another kind, or from a newer format."""


class ProgramError(DetotError, ValueError):
    """A program of thought was refused (a construct outside the safe subset, a limit) or failed to run."""


class FitError(DetotError, RuntimeError):
    """A fit (`DETOTFit`, `detot fit`) cannot go on: a metric that raised mid-fit, a fit folder holding another fit,
    or a time budget spent before the race answered anything."""
