"""detot-agent: DETOT (Dynamic Embeddings with Task-Oriented prompting) for DSPy.

Public API; everything else is internal. Names resolve lazily: `import detot_agent`
loads no torch, dspy, faiss or transformers until a name that needs them is used.
The map of the subpackages is ARCHITECTURE.md at the repository root.

Example:
    >>> import detot_agent
    >>> "LocalEngine" in detot_agent.__all__, "Controller" in detot_agent.__all__
    (True, False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from detot_agent._lazy import lazy_exports

if TYPE_CHECKING:
    from detot_agent.detot.adapters import LenientChatAdapter, PlainAdapter
    from detot_agent.detot.controller_config import ControllerConfig
    from detot_agent.detot.module import DETOT
    from detot_agent.detot.task import Adjustments, Policy, TaskProfile, analyze
    from detot_agent.embedding.task_embedding import TaskEmbedding
    from detot_agent.embedding.tune import tune
    from detot_agent.embedding.update import UpdateConfig
    from detot_agent.engines.config import EngineConfig
    from detot_agent.engines.llamacpp_engine import LlamaCppEngine
    from detot_agent.engines.lm import local_lm
    from detot_agent.engines.models import release_models
    from detot_agent.engines.torch_engine import LocalEngine
    from detot_agent.engines.vllm_engine import VLLMEngine, vllm_lm
    from detot_agent.errors import (
        ArtefactError,
        ConfigError,
        ContextLengthError,
        DataFileError,
        DetotError,
        EmptyIndexError,
        EmptyPromptError,
        EngineClosedError,
        FitError,
        IndexDataError,
        InputTypeError,
        InvalidRequestError,
        ModelNotFoundError,
        ProgramError,
        SoftPromptError,
    )
    from detot_agent.fit.config import Choice, FitConfig
    from detot_agent.fit.optimizer import DETOTFit
    from detot_agent.io.datafiles import read_exemplars
    from detot_agent.io.records import Exemplar
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.retrieval.index import ExemplarIndex
    from detot_agent.retrieval.retriever import TaskRetriever
    from detot_agent.softprompt.loss import TuneExample
    from detot_agent.softprompt.prompt import SoftPrompt
    from detot_agent.softprompt.registry import SoftPromptRegistry

__version__ = "0.4.0.dev0"  # the next release; CHANGELOG.md lists what it holds so far

# what a user builds or catches (README and docs import only these)
_WHERE = {
    "Adjustments": "detot_agent.detot.task",
    "analyze": "detot_agent.detot.task",
    "ArtefactError": "detot_agent.errors",
    "ConfigError": "detot_agent.errors",
    "ContextLengthError": "detot_agent.errors",
    "ControllerConfig": "detot_agent.detot.controller_config",
    "DataFileError": "detot_agent.errors",
    "Choice": "detot_agent.fit.config",
    "DETOT": "detot_agent.detot.module",
    "DETOTFit": "detot_agent.fit.optimizer",
    "DetotError": "detot_agent.errors",
    "EmptyIndexError": "detot_agent.errors",
    "EmptyPromptError": "detot_agent.errors",
    "Encoder": "detot_agent.retrieval.encoder",
    "EngineClosedError": "detot_agent.errors",
    "EngineConfig": "detot_agent.engines.config",
    "FitConfig": "detot_agent.fit.config",
    "FitError": "detot_agent.errors",
    "Exemplar": "detot_agent.io.records",
    "ExemplarIndex": "detot_agent.retrieval.index",
    "IndexDataError": "detot_agent.errors",
    "InputTypeError": "detot_agent.errors",
    "InvalidRequestError": "detot_agent.errors",
    "LenientChatAdapter": "detot_agent.detot.adapters",
    "LlamaCppEngine": "detot_agent.engines.llamacpp_engine",
    "local_lm": "detot_agent.engines.lm",
    "LocalEngine": "detot_agent.engines.torch_engine",
    "ModelNotFoundError": "detot_agent.errors",
    "PlainAdapter": "detot_agent.detot.adapters",
    "Policy": "detot_agent.detot.task",
    "ProgramError": "detot_agent.errors",
    "read_exemplars": "detot_agent.io.datafiles",
    "release_models": "detot_agent.engines.models",
    "SoftPrompt": "detot_agent.softprompt.prompt",
    "SoftPromptError": "detot_agent.errors",
    "SoftPromptRegistry": "detot_agent.softprompt.registry",
    "TaskEmbedding": "detot_agent.embedding.task_embedding",
    "TaskProfile": "detot_agent.detot.task",
    "TaskRetriever": "detot_agent.retrieval.retriever",
    "tune": "detot_agent.embedding.tune",
    "TuneExample": "detot_agent.softprompt.loss",
    "UpdateConfig": "detot_agent.embedding.update",
    "vllm_lm": "detot_agent.engines.vllm_engine",
    "VLLMEngine": "detot_agent.engines.vllm_engine",
}
# plumbing: importable from its subpackage; from the top level it still resolves, with a warning
_DEPRECATED = {
    "AnswerFormat": "detot_agent.answers",
    "AsyncLocalEngine": "detot_agent.engines.torch_engine",
    "Controller": "detot_agent.detot.controller",
    "default_model_path": "detot_agent.engines.models",
    "extract_number": "detot_agent.answers",
    "Feedback": "detot_agent.embedding.update",  # 0.3's name of embedding.update.TrainingItem
    "Hit": "detot_agent.retrieval.index",
    "Monitor": "detot_agent.detot.monitor",
    "normalize": "detot_agent.answers",
    "PromptHead": "detot_agent.embedding.head",
    "RetrievedPassages": "detot_agent.retrieval.retriever",
    "Sample": "detot_agent.engines.base",
    "SoftPromptInit": "detot_agent.softprompt.prompt",
    "TaskKind": "detot_agent.detot.task",
    "TaskState": "detot_agent.detot.records",
    "TuneConfig": "detot_agent.embedding.tune",
    "TuneReport": "detot_agent.embedding.tune",
    "UpdateReport": "detot_agent.embedding.update",
    "vote": "detot_agent.detot.voting",
}

__getattr__, __dir__ = lazy_exports(__name__, _WHERE, _DEPRECATED)

__all__ = [
    "DETOT",
    "Adjustments",
    "ArtefactError",
    "Choice",
    "ConfigError",
    "ContextLengthError",
    "ControllerConfig",
    "DETOTFit",
    "DataFileError",
    "DetotError",
    "EmptyIndexError",
    "EmptyPromptError",
    "Encoder",
    "EngineClosedError",
    "EngineConfig",
    "Exemplar",
    "ExemplarIndex",
    "FitConfig",
    "FitError",
    "IndexDataError",
    "InputTypeError",
    "InvalidRequestError",
    "LenientChatAdapter",
    "LlamaCppEngine",
    "LocalEngine",
    "ModelNotFoundError",
    "PlainAdapter",
    "Policy",
    "ProgramError",
    "SoftPrompt",
    "SoftPromptError",
    "SoftPromptRegistry",
    "TaskEmbedding",
    "TaskProfile",
    "TaskRetriever",
    "TuneExample",
    "UpdateConfig",
    "VLLMEngine",
    "__version__",
    "analyze",
    "local_lm",
    "read_exemplars",
    "release_models",
    "tune",
    "vllm_lm",
]
