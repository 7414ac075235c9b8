"""Performance monitoring: sliding windows, trigger rules, and a typed JSONL event log.

Every answered question is an `Observation` (agreement, samples, tokens,
latency, and later its correctness if gold or user feedback arrives). The
monitor keeps the last `window` of them and decides, after each, whether the
task embedding should be re-optimized: when the mean agreement, or the accuracy
over the observations whose correctness is known, falls below its threshold
with at least `min_count` observations in the window, and at least `cooldown`
observations have passed since the last re-optimization.

Every observation, trigger and re-optimization outcome is appended to a JSONL
log (one JSON object per line, with its `event` type), flushed as written.

Example:
    >>> from detot_agent.monitor import Monitor, Observation
    >>> m = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=4, min_count=2, cooldown=0)
    >>> m.observe(Observation(id="q1", agreement=0.5, samples=4, tokens=300, latency_s=2.0)) is None
    True
    >>> m.observe(Observation(id="q2", agreement=0.5, samples=4, tokens=300, latency_s=2.0)).reason
    'agreement 0.50 < 0.60 over the last 2'
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = ["Monitor", "Observation", "ReoptimizationEvent", "Trigger"]


class Observation(BaseModel):
    """One answered question."""

    event: Literal["observation"] = "observation"
    id: str
    agreement: float = Field(ge=0, le=1)
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    latency_s: float = Field(ge=0)
    correct: bool | None = None
    embedding_version: int = 0
    time: float = Field(default_factory=time.time)


class FeedbackEvent(BaseModel):
    """Correctness learned after the fact for an observation."""

    event: Literal["feedback"] = "feedback"
    id: str
    correct: bool
    time: float = Field(default_factory=time.time)


class Trigger(BaseModel):
    """A decision to re-optimize, with the window's figures."""

    event: Literal["trigger"] = "trigger"
    reason: str
    agreement: float | None
    accuracy: float | None
    count: int
    observations: int
    time: float = Field(default_factory=time.time)


class ReoptimizationEvent(BaseModel):
    """What a re-optimization did: accepted (new version) or rolled back, and why."""

    event: Literal["reoptimization"] = "reoptimization"
    accepted: bool
    reason: str
    version_before: int
    version_after: int
    old_score: float | None = None
    new_score: float | None = None
    evidence: int = 0
    seconds: float = 0.0
    error: str | None = None
    observations: int = 0
    time: float = Field(default_factory=time.time)


class Monitor:
    """Sliding-window monitor with trigger rules and an optional JSONL event log.

    Args:
        agreement_threshold: trigger when mean agreement in the window is below this.
        accuracy_threshold: trigger when accuracy (known outcomes only) is below this.
        window: observations kept.
        min_count: observations (or known outcomes, for accuracy) needed before a rule may fire.
        cooldown: observations that must pass after a re-optimization before the next trigger.
        log_path: JSONL file to append every event to (None: keep events in memory only).
    """

    def __init__(self, *, agreement_threshold: float, accuracy_threshold: float, window: int, min_count: int,
                 cooldown: int, log_path: str | Path | None = None) -> None:
        self.agreement_threshold = agreement_threshold
        self.accuracy_threshold = accuracy_threshold
        self.min_count = min_count
        self.cooldown = cooldown
        self._window: deque[Observation] = deque(maxlen=window)
        self._by_id: dict[str, Observation] = {}
        self.count = 0
        self.last_reopt_at: int | None = None
        self.pending = False  # a trigger was raised and its re-optimization has not finished
        self.events: list[dict[str, Any]] = []
        self.log_path = Path(log_path) if log_path else None
        self._lock = threading.Lock()

    def _log(self, record: BaseModel) -> None:
        data = record.model_dump(mode="json")
        self.events.append(data)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(data) + "\n")
                f.flush()

    def stats(self) -> dict[str, Any]:
        """Window means: agreement, accuracy (known outcomes), samples, tokens, latency."""
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        obs = list(self._window)
        known = [o.correct for o in obs if o.correct is not None]

        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return {"count": len(obs), "known": len(known), "agreement": mean([o.agreement for o in obs]),
                "accuracy": mean([float(c) for c in known]), "samples": mean([float(o.samples) for o in obs]),
                "tokens": mean([float(o.tokens) for o in obs]), "latency_s": mean([o.latency_s for o in obs]),
                "observations": self.count}

    def observe(self, obs: Observation) -> Trigger | None:
        """Record an answered question; returns a `Trigger` if re-optimization is due."""
        with self._lock:
            self._window.append(obs)
            self._by_id[obs.id] = obs
            if len(self._by_id) > 10 * (self._window.maxlen or 1):
                for key in list(self._by_id)[: len(self._by_id) // 2]:
                    del self._by_id[key]
            self.count += 1
            self._log(obs)
            return self._check()

    def feedback(self, obs_id: str, correct: bool) -> Trigger | None:
        """Record whether an earlier answer was correct; may trigger on accuracy."""
        with self._lock:
            obs = self._by_id.get(obs_id)
            if obs is not None:
                obs.correct = bool(correct)
            self._log(FeedbackEvent(id=obs_id, correct=bool(correct)))
            return self._check()

    def _check(self) -> Trigger | None:
        if self.pending:
            return None
        if self.last_reopt_at is not None and self.count - self.last_reopt_at < self.cooldown:
            return None
        s = self._stats()
        reason = None
        if s["count"] >= self.min_count and s["agreement"] is not None and s["agreement"] < self.agreement_threshold:
            reason = f"agreement {s['agreement']:.2f} < {self.agreement_threshold:.2f} over the last {s['count']}"
        elif s["known"] >= self.min_count and s["accuracy"] is not None and s["accuracy"] < self.accuracy_threshold:
            reason = f"accuracy {s['accuracy']:.2f} < {self.accuracy_threshold:.2f} over {s['known']} known outcomes"
        if reason is None:
            return None
        self.pending = True
        trigger = Trigger(reason=reason, agreement=s["agreement"], accuracy=s["accuracy"], count=s["count"],
                          observations=self.count)
        self._log(trigger)
        return trigger

    def reoptimized(self, event: ReoptimizationEvent) -> None:
        """Record a finished re-optimization and start the cooldown (the window restarts if accepted)."""
        with self._lock:
            event.observations = self.count
            self._log(event)
            self.pending = False
            self.last_reopt_at = self.count
            if event.accepted:
                self._window.clear()  # judge the new state on its own answers
