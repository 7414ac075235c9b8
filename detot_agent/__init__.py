"""detot-agent: DETOT (Dynamic Embeddings with Task-Oriented prompting) for DSPy.

Public API; everything else is internal.

Example:
    >>> import detot_agent
    >>> "LocalEngine" in detot_agent.__all__
    True
"""

from __future__ import annotations

from detot_agent.config import EngineConfig
from detot_agent.engine import AsyncLocalEngine, LocalEngine, Sample, local_lm
from detot_agent.errors import (
    ConfigError,
    ContextLengthError,
    DetotError,
    EmptyPromptError,
    InvalidRequestError,
    ModelNotFoundError,
    SoftPromptError,
)
from detot_agent.models import default_model_path
from detot_agent.softprompt import SoftPromptRegistry

__version__ = "0.1.0"

__all__ = [
    "AsyncLocalEngine",
    "ConfigError",
    "ContextLengthError",
    "DetotError",
    "EmptyPromptError",
    "EngineConfig",
    "InvalidRequestError",
    "LocalEngine",
    "ModelNotFoundError",
    "Sample",
    "SoftPromptError",
    "SoftPromptRegistry",
    "__version__",
    "default_model_path",
    "local_lm",
]
