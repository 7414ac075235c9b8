"""What a `DETOT` is built from, checked before anything serves: its one task embedding (given or built, with a
soft-prompt head when asked) and its canary set.

Example:
    >>> import dspy
    >>> from detot_agent.detot.task import TaskProfile, analyze
    >>> sig = dspy.Signature("question -> answer")
    >>> task = TaskProfile(name="arith", kind="arithmetic", answer_format="number")
    >>> canary_items([dspy.Example(question="1 + 1?", answer="2.0")], sig, "answer", task, analyze(task))
    [({'question': '1 + 1?'}, '2')]
"""

from __future__ import annotations

from typing import Any

import dspy
import torch

from detot_agent.answers import normalize
from detot_agent.detot.task import Adjustments, TaskProfile
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.errors import ConfigError
from detot_agent.retrieval.encoder import Encoder
from detot_agent.retrieval.index import ExemplarIndex

__all__ = ["build_task_embedding", "canary_items", "resolve_index"]


def resolve_index(index: ExemplarIndex | None, encoder: Encoder | None, k: int) -> tuple[ExemplarIndex, Encoder]:
    """`(index, encoder)` a DETOT serves with: without an index (a task served without demos) an empty one of the
    encoder's, so nothing else needs to know; the encoder defaults to the index's.

    Raises:
        ConfigError: no encoder anywhere, or demos (`k > 0`) asked of no index.
    """
    if index is None and k > 0:
        raise ConfigError(f"k_exemplars = {k} retrieves demos: pass index= (an ExemplarIndex), or serve without demos "
                          "(analyze(task, k_exemplars=0))")
    found = encoder or (index.encoder if index is not None else None)
    if found is None:
        raise ConfigError("DETOT needs an encoder: pass encoder= or an index built with one")
    return (index if index is not None else ExemplarIndex(found)), found


def build_task_embedding(given: TaskEmbedding | None, soft_prompt: torch.Tensor | bool | None, components: int,
                         samples: list[str], *, task: TaskProfile, adjustments: Adjustments, encoder: Encoder,
                         index: ExemplarIndex, serving: Any, trainer: Any) -> TaskEmbedding:
    """The one task embedding a program serves: `given`, or built from the task; with a soft-prompt head when
    asked (`soft_prompt` vectors `(k, hidden)`, or initialised from the adjustments' text through the serving
    engine `serving` when `soft_prompt` is None and `trainer` (what trains soft prompts) exists).

    Raises:
        ConfigError: a negative `components`, an embedding of another encoder or width, a head given twice,
            or components without a soft prompt.
    """
    if components < 0:
        raise ConfigError(f"components must be >= 0, got {components}")
    hidden = getattr(serving, "hidden_size", None)
    if given is not None:
        if not isinstance(given, TaskEmbedding):
            raise ConfigError(f"task_embedding must be a TaskEmbedding, got {type(given).__name__}")
        if given.encoder_name != index.encoder_name or given.dim != index.dim:
            raise ConfigError(f"task_embedding uses encoder {given.encoder_name!r} ({given.dim} dims), the index "
                              f"{index.encoder_name!r} ({index.dim} dims)")
        if given.has_head and (isinstance(soft_prompt, torch.Tensor) or soft_prompt is False):
            raise ConfigError("task_embedding already has a soft-prompt head, which supplies the soft prompts; "
                              "pass soft_prompt=None (or a task embedding without a head)")
        if given.head is not None and hidden is not None and given.head.hidden_size != hidden:
            raise ConfigError(f"task_embedding's soft prompts are {given.head.hidden_size} wide, the model's "
                              f"hidden size is {hidden}; train one for this model")
        if given.has_head or soft_prompt is False or (soft_prompt is None and trainer is None):
            return given
        embedding = given
    else:
        embedding = TaskEmbedding.from_description(task.name, task.description or task.name, encoder=encoder,
                                                   samples=samples)
    p0: torch.Tensor | None = None
    if isinstance(soft_prompt, torch.Tensor):
        p0 = soft_prompt.detach().float().clone()
    elif soft_prompt is None and trainer is not None:
        from detot_agent.softprompt.prompt import SoftPrompt

        # initialised from the serving engine's token embeddings (llama.cpp reads them from the file)
        p0 = SoftPrompt.initialize(serving, task.name, k=adjustments.soft_prompt_k, init="text",
                                   text=adjustments.soft_prompt_init_text).vectors
    if p0 is not None:
        from detot_agent.softprompt.registry import check_soft_prompt

        check_soft_prompt(p0, hidden_size=hidden, where="soft_prompt")
        inputs = None  # the gate starts at centroids of the task's inputs: samples, else the exemplars
        if components > 0:
            inputs = (encoder.encode(samples) if len(samples) >= components else
                      index.sample_vectors(2000) if len(index) else None)
        embedding.attach_head(p0, components=components, model_id=getattr(
            getattr(serving, "source", None), "spec", None) or "unknown", inputs=inputs)
    elif components:
        raise ConfigError("components > 0 needs a soft prompt: a local LM, or soft_prompt=<tensor>")
    return embedding


def canary_items(examples: list[dspy.Example], sig: Any, answer_field: str, task: TaskProfile,
                 adjustments: Adjustments) -> list[tuple[dict[str, Any], str]]:
    """`(inputs, gold_key)` per canary example; refuses examples without the fields or a usable answer."""
    out = []
    for i, ex in enumerate(examples):
        missing = [f for f in [*sig.input_fields, answer_field] if f not in ex]
        if missing:
            raise ConfigError(f"canary example #{i} lacks field(s) {missing}")
        gold = normalize(str(ex[answer_field]), adjustments.normalizer, labels=task.labels or (),
                         synonyms=task.label_synonyms)
        if gold is None:
            raise ConfigError(f"canary example #{i}: answer {ex[answer_field]!r} does not normalise to a "
                              f"{adjustments.normalizer.value}")
        out.append(({f: ex[f] for f in sig.input_fields}, gold))
    return out
