"""`TaskRetriever`: the task-adapted exemplar index as a DSPy retriever for RAG.

Call it directly (`retriever(query, k)` -> `dspy.Prediction(passages, ids, scores)`),
hold it in a `dspy.Module`, or install it as `dspy.configure(rm=retriever)` for
`dspy.Retrieve`. Queries go through the task embedding; `feedback` adapts the
task embedding so helpful passages rank higher for similar queries.

It is a `dspy.Parameter`, so `module.save()` / `module.load()` carry its state
(k, and the task embedding's weights and version) as JSON. The FAISS index is
held by reference: `copy.deepcopy` (and so DSPy's optimizers) give a copy with
its own task embedding that shares the index, and nothing is pickled.

Example:
    >>> import dspy
    >>> from detot_agent import Encoder, ExemplarIndex, TaskRetriever
    >>> index = ExemplarIndex(Encoder())                                  # doctest: +SKIP
    >>> index.add([{"id": "p1", "text": "FAISS does vector search."}])  # doctest: +SKIP
    >>> retrieve = TaskRetriever(index, k=1)                             # doctest: +SKIP
    >>> retrieve("what searches vectors?").passages                       # doctest: +SKIP
    ['FAISS does vector search.']
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import dspy
import numpy as np
from dspy.dsp.utils import dotdict
from dspy.predict.parameter import Parameter

from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.embedding.update import TrainingItem, UpdateReport
from detot_agent.errors import ArtefactError, IndexDataError
from detot_agent.retrieval.index import ExemplarIndex

__all__ = ["RetrievedPassages", "TaskRetriever"]


class RetrievedPassages(dspy.Prediction):
    """`Prediction(passages, ids, scores)`; iterating yields passages with `.long_text` (for `dspy.Retrieve`)."""

    def __iter__(self) -> Iterator[Any]:
        for text, pid, score in zip(self.passages, self.ids, self.scores, strict=True):
            yield dotdict(long_text=text, id=pid, score=score)

    def __len__(self) -> int:
        return len(self.passages)


class TaskRetriever(Parameter):
    """Retriever over an `ExemplarIndex` of passages with a task-adapted query.

    Args:
        index: the passages (needs an encoder, to embed queries).
        task_embedding: the task's `TaskEmbedding` (the same object type a `DETOT` serves, so the two can
            share one); default: a neutral one centred on the index's vectors (task weight 0, so it starts
            as plain dense retrieval).
        k: passages returned when the call does not say.
        mmr: MMR lambda for diverse results (None: plain top-k).
        where: a fixed field filter applied to every search.
    """

    def __init__(
        self,
        index: ExemplarIndex,
        task_embedding: TaskEmbedding | None = None,
        *,
        k: int = 3,
        mmr: float | None = None,
        where: dict[str, Any] | None = None,
        task: str = "retrieval",
    ) -> None:
        if index.encoder is None:
            raise IndexDataError("TaskRetriever needs an index with an encoder to embed queries")
        if k < 1:
            raise IndexDataError(f"k must be >= 1, got {k}")
        self.index = index
        if task_embedding is None:
            centre = index._vecs.mean(axis=0) if len(index) else np.ones(index.dim, dtype=np.float32)
            task_embedding = TaskEmbedding(task, centre, encoder_name=index.encoder_name, alpha=0.0)
        if task_embedding.encoder_name != index.encoder_name or task_embedding.dim != index.dim:
            raise IndexDataError(
                f"task embedding uses encoder {task_embedding.encoder_name!r} ({task_embedding.dim} dims), the index "
                f"{index.encoder_name!r} ({index.dim} dims)"
            )
        self.task_embedding = task_embedding
        self.k = k
        self.mmr = mmr
        self.where = where

    def __deepcopy__(self, memo: dict[int, Any]) -> TaskRetriever:
        return TaskRetriever(self.index, copy.deepcopy(self.task_embedding, memo), k=self.k, mmr=self.mmr,
                             where=dict(self.where) if self.where else None)

    def reset(self) -> None:
        """Nothing to clear between optimizer rounds (the task embedding is learned state)."""

    def _encode(self, query: str) -> np.ndarray:
        if not isinstance(query, str) or not query.strip():
            raise IndexDataError("query must be a non-empty string")
        assert self.index.encoder is not None
        return self.index.encoder.encode([query])[0]

    def __call__(self, query: str, k: int | None = None, **kwargs: Any) -> RetrievedPassages:
        """Top passages for `query`: `Prediction(passages=[...], ids=[...], scores=[...])`."""
        return self.forward(query, k=k, **kwargs)

    def forward(self, query: str, k: int | None = None, **kwargs: Any) -> RetrievedPassages:
        """See `__call__`; extra keyword arguments (`mmr`, `where`) override the defaults for this call."""
        k = k or self.k
        q = self.task_embedding.query(self._encode(query))
        hits = self.index.search(q, min(k, len(self.index)), mmr=kwargs.get("mmr", self.mmr),
                                 where=kwargs.get("where", self.where))
        return RetrievedPassages(passages=[h.text for h in hits], ids=[h.id for h in hits],
                                 scores=[h.score for h in hits])

    def feedback(
        self, query: str, helpful_ids: Sequence[str], unhelpful_ids: Sequence[str] = (), **update_kwargs: Any
    ) -> UpdateReport:
        """Adapt the task embedding: `helpful_ids` should rank above `unhelpful_ids` for queries like this one.

        With no `unhelpful_ids`, the passages the retriever currently ranks in the top 2k that are not
        helpful serve as negatives. `update_kwargs` are `UpdateConfig` fields (`retrieval_steps`,
        `retrieval_lr`, ...). The task embedding may be the one a `DETOT` on the same task serves
        (`DETOT(..., task_embedding=te)`): this feedback then moves that program's retrieval too.
        """
        if not helpful_ids:
            raise IndexDataError("feedback needs at least one helpful id")
        e = self._encode(query)
        negatives = list(unhelpful_ids)
        if not negatives:
            hits = self.index.search(self.task_embedding.query(e), min(2 * self.k, len(self.index)))
            negatives = [h.id for h in hits if h.id not in set(helpful_ids)]
        pos = self.index.vectors(list(helpful_ids))
        neg = self.index.vectors(negatives) if negatives else np.zeros((0, self.index.dim), dtype=np.float32)
        return self.task_embedding.update([TrainingItem(query=e, positives=pos, negatives=neg)], **update_kwargs)

    # ---- DSPy state (module.save / module.load) ----------------------------------------
    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        """k, mmr, where, the index's identity and the task embedding (JSON)."""
        return {"k": self.k, "mmr": self.mmr, "where": self.where,
                "index": {"encoder": self.index.encoder_name, "dim": self.index.dim, "count": len(self.index)},
                "task_embedding": self.task_embedding.to_json()}

    def load_state(self, state: dict[str, Any]) -> TaskRetriever:
        """Restore what `dump_state` wrote; the index must use the same encoder."""
        info = state.get("index", {})
        if info.get("encoder") != self.index.encoder_name or info.get("dim") != self.index.dim:
            raise ArtefactError(
                f"saved retriever state was built for encoder {info.get('encoder')!r} ({info.get('dim')} dims); "
                f"this retriever's index uses {self.index.encoder_name!r} ({self.index.dim} dims)"
            )
        self.k, self.mmr, self.where = int(state["k"]), state.get("mmr"), state.get("where")
        self.task_embedding = TaskEmbedding.from_json(state["task_embedding"])
        return self
