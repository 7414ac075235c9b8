"""detot-agent: DETOT (Dynamic Embeddings with Task-Oriented prompting) for DSPy.

Public API; everything else is internal.

Example:
    >>> import detot_agent
    >>> "LocalEngine" in detot_agent.__all__
    True
"""

from __future__ import annotations

from detot_agent.adapters import LenientChatAdapter, PlainAdapter
from detot_agent.config import EngineConfig
from detot_agent.controller import Controller, ControllerConfig, TaskState
from detot_agent.datasets import read_exemplars
from detot_agent.embeddings import Encoder, TaskEmbedding, UpdateReport
from detot_agent.engine import AsyncLocalEngine, LocalEngine, Sample, local_lm
from detot_agent.errors import (
    ArtefactError,
    ConfigError,
    ContextLengthError,
    DataFileError,
    DetotError,
    EmptyIndexError,
    EmptyPromptError,
    IndexDataError,
    InvalidRequestError,
    ModelNotFoundError,
    SoftPromptError,
)
from detot_agent.index import Exemplar, ExemplarIndex, Hit
from detot_agent.models import default_model_path
from detot_agent.module import DETOT
from detot_agent.monitor import Monitor
from detot_agent.retriever import RetrievedPassages, TaskRetriever
from detot_agent.softprompt import SoftPrompt, SoftPromptInit, SoftPromptRegistry
from detot_agent.task import Adjustments, AnswerFormat, TaskKind, TaskProfile, analyze
from detot_agent.tuning import TuneConfig, TuneExample, TuneReport, tune
from detot_agent.vllm_engine import VLLMEngine, vllm_lm
from detot_agent.voting import extract_number, normalize, vote

__version__ = "0.1.0"

__all__ = [
    "DETOT",
    "Adjustments",
    "AnswerFormat",
    "ArtefactError",
    "AsyncLocalEngine",
    "ConfigError",
    "ContextLengthError",
    "Controller",
    "ControllerConfig",
    "DataFileError",
    "DetotError",
    "EmptyIndexError",
    "EmptyPromptError",
    "Encoder",
    "EngineConfig",
    "Exemplar",
    "ExemplarIndex",
    "Hit",
    "IndexDataError",
    "InvalidRequestError",
    "LenientChatAdapter",
    "LocalEngine",
    "ModelNotFoundError",
    "Monitor",
    "PlainAdapter",
    "RetrievedPassages",
    "Sample",
    "SoftPrompt",
    "SoftPromptError",
    "SoftPromptInit",
    "SoftPromptRegistry",
    "TaskEmbedding",
    "TaskKind",
    "TaskProfile",
    "TaskRetriever",
    "TaskState",
    "TuneConfig",
    "TuneExample",
    "TuneReport",
    "UpdateReport",
    "VLLMEngine",
    "__version__",
    "analyze",
    "default_model_path",
    "extract_number",
    "local_lm",
    "normalize",
    "read_exemplars",
    "tune",
    "vllm_lm",
    "vote",
]
