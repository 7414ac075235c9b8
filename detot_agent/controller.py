"""The continuous optimization loop (DETOT section 3.2): re-optimize, validate, accept or roll back.

The controller owns the task's serving state, a `TaskState` (task embedding,
soft-prompt vectors, version). A `TaskState` is never changed once published:
re-optimization trains copies and, if they pass, publishes a new `TaskState`
with one reference assignment. A reader takes `controller.state` once per call
and sees the old or the new state, never half of each.

On a trigger, `reoptimize()` splits the evidence buffer (recent answered
questions) into training and held-out parts (every `holdout_every`-th record is
held out), then:

1. retrieval: for each good training record (correct, or agreement >= `good_agreement`
   when correctness is unknown), the demos it used are positives and the next-ranked
   exemplars it did not use are negatives; `TaskEmbedding.update` moves the weights;
2. soft prompt (local models): trains on targets from good records (a sample whose answer
   matched the gold answer, else the winning sample of a high-agreement vote);
3. validation on the held-out part, each half on its own: the soft prompt is kept if the mean
   NLL of the held-out targets falls by at least `min_gain`; the retrieval weights are kept if
   the *separation* (mean reciprocal rank of demos behind good answers minus that of demos
   behind poor ones) is not worse by more than `margin`. Plain MRR of good demos would favour
   the old state, whose own top results those demos are. A new version is published when
   either half is kept.

Errors inside re-optimization are logged and leave the old state serving.

Example:
    >>> from detot_agent.controller import TaskState
    >>> TaskState(version=0, embedding=None, soft_prompt=None).version
    0
"""

from __future__ import annotations

import copy
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from detot_agent.embeddings import TaskEmbedding
from detot_agent.index import ExemplarIndex
from detot_agent.monitor import Monitor, ReoptimizationEvent

__all__ = ["Controller", "ControllerConfig", "Evidence", "TaskState"]


@dataclass(frozen=True)
class TaskState:
    """What one call reads: never mutated after it is published."""

    version: int
    embedding: TaskEmbedding | None
    soft_prompt: torch.Tensor | None


@dataclass
class Evidence:
    """One answered question, as the optimization loop needs it.

    Attributes:
        id: the prediction's id.
        query: encoded input (not task-adapted), `(dim,)`.
        demo_ids: exemplars shown as demos.
        agreement: winner's share of the vote.
        messages: the chat messages the model saw (for soft-prompt targets), or None.
        target: completion text to learn (a good sample), or None.
        correct: correctness when known.
        gold_target: a sample whose answer matched the gold answer, when feedback supplied one.
    """

    id: str
    query: np.ndarray
    demo_ids: list[str]
    agreement: float
    messages: list[dict[str, str]] | None = None
    target: str | None = None
    correct: bool | None = None
    gold_target: str | None = None
    samples: list[tuple[str, str | None]] = field(default_factory=list)  # (text, vote key)

    def good(self, good_agreement: float) -> bool:
        """Correct, or (correctness unknown) agreed on strongly."""
        return self.correct if self.correct is not None else self.agreement >= good_agreement

    def learn_target(self, good_agreement: float) -> str | None:
        """The completion to train the soft prompt on, if this record offers one."""
        if self.gold_target:
            return self.gold_target
        if self.correct is None and self.agreement >= good_agreement:
            return self.target
        if self.correct:
            return self.target
        return None


@dataclass
class ControllerConfig:
    """Settings of the optimization loop."""

    evidence_size: int = 200
    min_evidence: int = 6
    holdout_every: int = 3
    good_agreement: float = 0.75
    margin: float = 0.02
    min_gain: float = 0.0
    retrieval_steps: int = 40
    retrieval_lr: float = 0.05
    soft_prompt_steps: int = 20
    soft_prompt_lr: float = 3e-3
    l2_to_init: float = 0.01
    dropout: float = 0.1
    negatives_per_query: int = 6


class Controller:
    """Owns the serving `TaskState`, the evidence buffer, and re-optimization (sync or in the background).

    Args:
        state: the initial state.
        index: the exemplar index (for demo vectors and negatives).
        monitor: receives re-optimization events.
        engine: a `LocalEngine` when soft prompts are in play (None: retrieval only).
        config: loop settings.
        k: demos per question (negatives are drawn beyond them).
    """

    def __init__(self, state: TaskState, *, index: ExemplarIndex, monitor: Monitor, engine: Any = None,
                 config: ControllerConfig | None = None, k: int = 3) -> None:
        self._state = state
        self.index = index
        self.monitor = monitor
        self.engine = engine
        self.config = config or ControllerConfig()
        self.k = k
        self._evidence: deque[Evidence] = deque(maxlen=self.config.evidence_size)
        self._by_id: dict[str, Evidence] = {}
        self._lock = threading.Lock()  # evidence buffer
        self._reopt_lock = threading.Lock()  # one re-optimization at a time
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future[ReoptimizationEvent] | None = None

    @property
    def state(self) -> TaskState:
        """The current serving state (read it once per call)."""
        return self._state

    def publish(self, state: TaskState) -> None:
        """Replace the serving state (one assignment: readers see old or new)."""
        self._state = state

    # ---- evidence ----------------------------------------------------------------------------
    def add_evidence(self, ev: Evidence) -> None:
        """Append an answered question to the buffer (oldest dropped beyond `evidence_size`)."""
        with self._lock:
            if len(self._evidence) == self._evidence.maxlen:
                old = self._evidence[0]
                self._by_id.pop(old.id, None)
            self._evidence.append(ev)
            self._by_id[ev.id] = ev

    def record_outcome(self, pred_id: str, *, correct: bool, gold_key: str | None = None) -> None:
        """Attach correctness (and a gold-matching sample, if any) to a buffered record."""
        with self._lock:
            ev = self._by_id.get(pred_id)
            if ev is None:
                return
            ev.correct = correct
            if gold_key is not None:
                ev.gold_target = next((text for text, key in ev.samples if key == gold_key), None)

    def evidence(self) -> list[Evidence]:
        """A copy of the buffer."""
        with self._lock:
            return list(self._evidence)

    # ---- running re-optimization ------------------------------------------------------------------
    def submit(self) -> Future[ReoptimizationEvent] | None:
        """Start a background re-optimization unless one is running; returns its future."""
        with self._lock:
            if self._running is not None and not self._running.done():
                return None
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detot-reopt")
            self._running = self._executor.submit(self.reoptimize)
            return self._running

    def wait(self, timeout: float | None = None) -> ReoptimizationEvent | None:
        """Wait for a background re-optimization, if any, and return its event."""
        fut = self._running
        return fut.result(timeout=timeout) if fut is not None else None

    def close(self) -> None:
        """Finish background work and stop the worker thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def reoptimize(self) -> ReoptimizationEvent:
        """Run one re-optimization synchronously: train copies, validate, accept or roll back."""
        with self._reopt_lock:
            start = time.perf_counter()
            old = self._state
            try:
                event = self._reoptimize(old)
            except Exception as exc:  # the old state keeps serving; the error is reported, not raised
                event = ReoptimizationEvent(accepted=False, reason="re-optimization raised; kept the old state",
                                            version_before=old.version, version_after=old.version,
                                            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
            event.seconds = time.perf_counter() - start
            self.monitor.reoptimized(event)
            return event

    def _reoptimize(self, old: TaskState) -> ReoptimizationEvent:
        cfg = self.config
        evidence = [e for e in self.evidence() if all(d in self.index for d in e.demo_ids)]

        def event(accepted: bool, reason: str, **kw: Any) -> ReoptimizationEvent:
            kw.setdefault("version_after", old.version)
            return ReoptimizationEvent(accepted=accepted, reason=reason, version_before=old.version,
                                       evidence=len(evidence), **kw)

        if len(evidence) < cfg.min_evidence:
            return event(False, f"only {len(evidence)} evidence records (need {cfg.min_evidence}); kept the old state")
        held = evidence[cfg.holdout_every - 1::cfg.holdout_every]
        held_ids = {e.id for e in held}
        train = [e for e in evidence if e.id not in held_ids]
        # train only the halves that the held-out records can judge (training the soft prompt is the
        # expensive part: minutes on a CPU), so an unjudgeable change is never paid for
        judge_soft = old.soft_prompt is not None and self.engine is not None and bool(self._examples(held))
        judge_retrieval = old.embedding is not None and any(
            e.good(cfg.good_agreement) and e.demo_ids for e in held)
        if not judge_soft and not judge_retrieval:
            return event(False, f"no held-out evidence to validate on (none of the {len(held)} held-out records "
                         "has a learnable target or good demos); kept the old state without training")

        new_embedding = copy.deepcopy(old.embedding) if judge_retrieval else None
        changed_retrieval = new_embedding is not None and self._update_retrieval(new_embedding, train)
        new_soft = old.soft_prompt
        if judge_soft:
            assert old.soft_prompt is not None
            new_soft = self._update_soft_prompt(old.soft_prompt, train)
        if not changed_retrieval and new_soft is old.soft_prompt:
            return event(False, "nothing to learn from: no good training records with usable demos or targets; "
                         "kept the old state")

        reasons: list[str] = []
        old_score = new_score = 0.0
        keep_soft, keep_embedding = old.soft_prompt, old.embedding
        if new_soft is not old.soft_prompt:
            old_nll, new_nll = self._nll(old.soft_prompt, held), self._nll(new_soft, held)
            if old_nll is not None and new_nll is not None:
                ok = new_nll <= old_nll - cfg.min_gain
                reasons.append(f"soft prompt {'accepted' if ok else 'rolled back'} "
                               f"(held-out NLL {old_nll:.3f} -> {new_nll:.3f})")
                old_score, new_score = old_score - old_nll, new_score - new_nll
                keep_soft = new_soft if ok else old.soft_prompt
        if new_embedding is not None and changed_retrieval:
            old_sep, new_sep = self._separation(old.embedding, held), self._separation(new_embedding, held)
            if old_sep is not None and new_sep is not None:
                ok = new_sep >= old_sep - cfg.margin
                reasons.append(f"retrieval {'accepted' if ok else 'rolled back'} "
                               f"(held-out demo separation {old_sep:.3f} -> {new_sep:.3f})")
                old_score, new_score = old_score + old_sep, new_score + new_sep
                keep_embedding = new_embedding if ok else old.embedding
        if not reasons:
            return event(False, "no held-out evidence to validate on; kept the old state")
        if keep_soft is old.soft_prompt and keep_embedding is old.embedding:
            return event(False, "rolled back: " + "; ".join(reasons), old_score=old_score, new_score=new_score)
        version = old.version + 1
        if keep_embedding is not None:
            if keep_embedding is old.embedding:  # the old weights under the new version number
                keep_embedding = copy.deepcopy(old.embedding)
            keep_embedding.version = version
        self.publish(TaskState(version=version, embedding=keep_embedding, soft_prompt=keep_soft))
        return event(True, "accepted: " + "; ".join(reasons), version_after=version, old_score=old_score,
                     new_score=new_score)

    # ---- the two halves ------------------------------------------------------------------------------
    def _update_retrieval(self, embedding: TaskEmbedding, train: list[Evidence]) -> bool:
        cfg = self.config
        queries, pos, neg = [], [], []
        for ev in train:
            if not ev.good(cfg.good_agreement) or not ev.demo_ids:
                continue
            want = min(len(self.index), self.k + cfg.negatives_per_query + len(ev.demo_ids))
            ranked = [h.id for h in self.index.search(embedding.query(ev.query), want)]
            negatives = [i for i in ranked if i not in set(ev.demo_ids)][: cfg.negatives_per_query]
            if not negatives:
                continue
            queries.append(ev.query)
            pos.append(self.index.vectors(ev.demo_ids))
            neg.append(self.index.vectors(negatives))
        if not queries:
            return False
        report = embedding.update(np.stack(queries), pos, neg, steps=cfg.retrieval_steps, lr=cfg.retrieval_lr,
                                  l2_to_init=cfg.l2_to_init)
        return report.accepted

    def _examples(self, records: list[Evidence]) -> list[Any]:
        from detot_agent.tuning import TuneExample

        out = []
        for ev in records:
            target = ev.learn_target(self.config.good_agreement)
            if target and ev.messages:
                out.append(TuneExample(messages=ev.messages, target=target))
        return out

    def _update_soft_prompt(self, vectors: torch.Tensor, train: list[Evidence]) -> torch.Tensor:
        from detot_agent.softprompt import SoftPrompt
        from detot_agent.tuning import tune

        examples = self._examples(train)
        if not examples:
            return vectors  # unchanged (the same object)
        sp = SoftPrompt("reopt", vectors, model_id="engine")
        cfg = self.config
        report = tune(sp, self.engine, examples, steps=cfg.soft_prompt_steps, lr=cfg.soft_prompt_lr,
                      l2_to_init=cfg.l2_to_init, dropout=cfg.dropout, progress=False)
        return sp.vectors.clone() if report.accepted else vectors

    def _nll(self, vectors: torch.Tensor | None, held: list[Evidence]) -> float | None:
        if self.engine is None or vectors is None:
            return None
        from detot_agent.tuning import target_nll

        examples = self._examples(held)
        return target_nll(self.engine, vectors, examples) if examples else None

    def _mrr(self, embedding: TaskEmbedding, records: list[Evidence]) -> float | None:
        """Mean reciprocal rank of each record's demos under `embedding`'s query for that record."""
        records = [e for e in records if e.demo_ids]
        if not records:
            return None
        total = 0.0
        depth = min(len(self.index), 50)
        for ev in records:
            ranked = [h.id for h in self.index.search(embedding.query(ev.query), depth)]
            ranks = [ranked.index(d) + 1 for d in ev.demo_ids if d in ranked]
            total += sum(1.0 / r for r in ranks) / len(ev.demo_ids)
        return total / len(records)

    def _separation(self, embedding: TaskEmbedding | None, held: list[Evidence]) -> float | None:
        """MRR of the demos behind good held-out answers minus MRR of those behind poor ones.

        Every held-out demo was a top result of the *old* query, so plain MRR of good demos favours the
        old state whatever the new one learnt. The difference cancels that bias: a query that ranks
        helpful demos above unhelpful ones scores higher. Without poor records it falls back to the
        good demos' MRR (conservative: a retrieval change must then keep them where they were).
        """
        if embedding is None:
            return None
        good_agreement = self.config.good_agreement
        good = self._mrr(embedding, [e for e in held if e.good(good_agreement)])
        if good is None:
            return None
        poor = self._mrr(embedding, [e for e in held if not e.good(good_agreement)])
        return good - (poor or 0.0)
