"""detot-agent: DETOT (Dynamic Embeddings with Task-Oriented prompting) for DSPy.

Public API; everything else is internal. Names resolve lazily: `import detot_agent`
loads no torch, dspy, faiss or transformers until a name that needs them is used.
The map of the subpackages is ARCHITECTURE.md at the repository root.

Example:
    >>> import detot_agent
    >>> "LocalEngine" in detot_agent.__all__
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from detot_agent._lazy import lazy_exports

if TYPE_CHECKING:
    from detot_agent.answers import AnswerFormat, extract_number, normalize
    from detot_agent.detot.adapters import LenientChatAdapter, PlainAdapter
    from detot_agent.detot.controller import Controller, ControllerConfig, TaskState
    from detot_agent.detot.module import DETOT
    from detot_agent.detot.monitor import Monitor
    from detot_agent.detot.task import Adjustments, TaskKind, TaskProfile, analyze
    from detot_agent.detot.voting import vote
    from detot_agent.embedding.head import PromptHead
    from detot_agent.embedding.task_embedding import TaskEmbedding
    from detot_agent.embedding.update import Feedback, UpdateConfig, UpdateReport
    from detot_agent.engines.base import Sample
    from detot_agent.engines.config import EngineConfig
    from detot_agent.engines.llamacpp_engine import LlamaCppEngine
    from detot_agent.engines.lm import local_lm
    from detot_agent.engines.models import default_model_path, release_models
    from detot_agent.engines.torch_engine import AsyncLocalEngine, LocalEngine
    from detot_agent.engines.vllm_engine import VLLMEngine, vllm_lm
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
    from detot_agent.io.datafiles import read_exemplars
    from detot_agent.io.records import Exemplar
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.retrieval.index import ExemplarIndex, Hit
    from detot_agent.retrieval.retriever import RetrievedPassages, TaskRetriever
    from detot_agent.softprompt.prompt import SoftPrompt, SoftPromptInit
    from detot_agent.softprompt.registry import SoftPromptRegistry
    from detot_agent.softprompt.training import TuneConfig, TuneExample, TuneReport, tune

__version__ = "0.4.0.dev0"  # the next release; CHANGELOG.md lists what it holds so far

_WHERE = {
    "Adjustments": "detot_agent.detot.task",
    "AnswerFormat": "detot_agent.answers",
    "ArtefactError": "detot_agent.errors",
    "AsyncLocalEngine": "detot_agent.engines.torch_engine",
    "ConfigError": "detot_agent.errors",
    "ContextLengthError": "detot_agent.errors",
    "Controller": "detot_agent.detot.controller",
    "ControllerConfig": "detot_agent.detot.controller",
    "DETOT": "detot_agent.detot.module",
    "DataFileError": "detot_agent.errors",
    "DetotError": "detot_agent.errors",
    "EmptyIndexError": "detot_agent.errors",
    "EmptyPromptError": "detot_agent.errors",
    "Encoder": "detot_agent.retrieval.encoder",
    "EngineConfig": "detot_agent.engines.config",
    "Exemplar": "detot_agent.io.records",
    "ExemplarIndex": "detot_agent.retrieval.index",
    "Hit": "detot_agent.retrieval.index",
    "IndexDataError": "detot_agent.errors",
    "InvalidRequestError": "detot_agent.errors",
    "LenientChatAdapter": "detot_agent.detot.adapters",
    "LlamaCppEngine": "detot_agent.engines.llamacpp_engine",
    "LocalEngine": "detot_agent.engines.torch_engine",
    "ModelNotFoundError": "detot_agent.errors",
    "Monitor": "detot_agent.detot.monitor",
    "PlainAdapter": "detot_agent.detot.adapters",
    "RetrievedPassages": "detot_agent.retrieval.retriever",
    "Sample": "detot_agent.engines.base",
    "SoftPrompt": "detot_agent.softprompt.prompt",
    "SoftPromptError": "detot_agent.errors",
    "SoftPromptInit": "detot_agent.softprompt.prompt",
    "SoftPromptRegistry": "detot_agent.softprompt.registry",
    "TaskEmbedding": "detot_agent.embedding.task_embedding",
    "TaskKind": "detot_agent.detot.task",
    "TaskProfile": "detot_agent.detot.task",
    "TaskRetriever": "detot_agent.retrieval.retriever",
    "TaskState": "detot_agent.detot.controller",
    "TuneConfig": "detot_agent.softprompt.training",
    "TuneExample": "detot_agent.softprompt.training",
    "TuneReport": "detot_agent.softprompt.training",
    "UpdateReport": "detot_agent.embedding.update",
    "UpdateConfig": "detot_agent.embedding.update",
    "Feedback": "detot_agent.embedding.update",
    "PromptHead": "detot_agent.embedding.head",
    "VLLMEngine": "detot_agent.engines.vllm_engine",
    "analyze": "detot_agent.detot.task",
    "default_model_path": "detot_agent.engines.models",
    "extract_number": "detot_agent.answers",
    "local_lm": "detot_agent.engines.lm",
    "normalize": "detot_agent.answers",
    "read_exemplars": "detot_agent.io.datafiles",
    "release_models": "detot_agent.engines.models",
    "tune": "detot_agent.softprompt.training",
    "vllm_lm": "detot_agent.engines.vllm_engine",
    "vote": "detot_agent.detot.voting",
}

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

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
    "Feedback",
    "Hit",
    "IndexDataError",
    "InvalidRequestError",
    "LenientChatAdapter",
    "LlamaCppEngine",
    "LocalEngine",
    "ModelNotFoundError",
    "Monitor",
    "PlainAdapter",
    "PromptHead",
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
    "UpdateConfig",
    "UpdateReport",
    "VLLMEngine",
    "__version__",
    "analyze",
    "default_model_path",
    "extract_number",
    "local_lm",
    "normalize",
    "read_exemplars",
    "release_models",
    "tune",
    "vllm_lm",
    "vote",
]
