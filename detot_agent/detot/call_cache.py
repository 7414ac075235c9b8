"""DSPy's cache for whole DETOT calls: the same inputs under the same serving state answer from it.

A DETOT call samples its engine directly (batched rounds), so DSPy's LM cache never sees it. When the LM
in use caches (`dspy.LM(cache=True)`, `local_lm`'s default), a finished call is put in `dspy.cache` (memory and
disk, as `dspy.configure_cache` sets them), keyed by everything its answer depends on: the inputs, the
signature's instructions and fields, the inner predictor's demos, the task, the adjustments under the serving
policy, the serving version and a digest of the task embedding's tensors, the index's encoder and size, the
adapter, and the LM's model and settings (a new `rollout_id` or temperature is a new key). A hit returns the
stored prediction (`from_cache=True`, a fresh `id`) and records the inner predictor's trace as a call does; it
adds no evidence and no monitor observation (the answer is not new evidence about the serving state).

Example:
    >>> request_digest({"b": 1, "a": [1, 2]}) == request_digest({"a": [1, 2], "b": 1})
    True
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import dspy

from detot_agent.detot.persistence import embedding_bytes
from detot_agent.detot.records import TaskState

__all__ = ["cache_request", "embedding_digest", "request_digest"]

_DIGESTS: dict[int, tuple[TaskState, str]] = {}  # id(state) -> (state, digest): a state never changes


def request_digest(request: dict[str, Any]) -> str:
    """A stable hash of a JSON-able request (keys sorted)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()


def embedding_digest(state: TaskState) -> str | None:
    """sha256 of the serving task embedding's tensors (computed once per published state)."""
    if state.embedding is None:
        return None
    known = _DIGESTS.get(id(state))
    if known is not None and known[0] is state:
        return known[1]
    meta, raw = embedding_bytes(state.embedding)  # the bytes a save writes
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    h.update(raw)
    if len(_DIGESTS) > 64:
        _DIGESTS.clear()
    _DIGESTS[id(state)] = (state, h.hexdigest())
    return h.hexdigest()


def _json_able(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}


def cache_request(program: Any, state: TaskState, inputs: dict[str, Any], lm: Any) -> dict[str, Any] | None:
    """The cache request of a call, or None when the LM does not cache (then nothing is cached)."""
    if not getattr(lm, "cache", False):
        return None
    sig = program._signature()
    adapter = program.active_adapter()
    return {
        "detot_call": 1,
        "inputs": {name: inputs[name] for name in sig.input_fields},
        "signature": {"instructions": sig.instructions, "fields": list(sig.fields)},
        "demos": [dict(d) for d in program._inner().demos],
        "task": program.task.model_dump(mode="json"),
        "adjustments": state.adjust(program.adjustments).model_dump(mode="json"),
        "version": state.version,
        "embedding": embedding_digest(state),
        "index": [program.index.encoder_name, len(program.index)],
        "adapter": [type(adapter).__name__, getattr(adapter, "cue", None), getattr(adapter, "labels", None)],
        "lm": [getattr(lm, "model", None), _json_able(dict(getattr(lm, "kwargs", {}) or {}))],
    }


def get(request: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored call's prediction fields, or None."""
    return None if request is None else dspy.cache.get({"detot": request_digest(request)})


def put(request: dict[str, Any] | None, fields: dict[str, Any]) -> None:
    """Store a finished call's prediction fields."""
    if request is not None:
        dspy.cache.put({"detot": request_digest(request)}, dict(fields))
