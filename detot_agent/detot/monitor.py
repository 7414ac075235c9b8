"""Performance monitoring: sliding windows, trigger rules, and a typed JSONL event log.

Every answered question is an `Observation` (agreement, samples, tokens,
latency, and later its correctness if gold or user feedback arrives). The
monitor keeps the last `window` of them and decides, after each, whether the
task embedding should be re-optimized: when the mean agreement, or the accuracy
over the observations whose correctness is known, falls below its threshold
with at least `min_count` observations in the window, and at least `cooldown`
observations have passed since the last re-optimization.

Every observation, trigger and re-optimization outcome is appended to a JSONL
log (one JSON object per line, with its `event` type; `io/jsonlog.py`), fsynced as written.

Example:
    >>> from detot_agent.detot.monitor import Monitor, Observation
    >>> m = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=4, min_count=2, cooldown=0)
    >>> m.observe(Observation(id="q1", agreement=0.5, samples=4, tokens=300, latency_s=2.0)) is None
    True
    >>> m.observe(Observation(id="q2", agreement=0.5, samples=4, tokens=300, latency_s=2.0)).reason
    'agreement 0.50 < 0.60 over the last 2'
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError

from detot_agent.config import StrictModel, build
from detot_agent.errors import ArtefactError, ConfigError
from detot_agent.io.jsonlog import JsonlLog

__all__ = ["Monitor", "MonitorConfig", "Observation", "ReoptimizationEvent", "Trigger"]


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
    """What a re-optimization did: accepted (new version) or rolled back, and why; or (`decided=False`) that a
    candidate went to shadow judging, whose decision is a later event of the same kind."""

    event: Literal["reoptimization"] = "reoptimization"
    change: str = "embedding"  # what was tried: a new task embedding, or "policy strategy=pot" (a `Policy`)
    accepted: bool
    reason: str
    version_before: int
    version_after: int
    old_score: float | None = None  # the judged part's held-out score (one part judged; see `verdicts`)
    new_score: float | None = None
    verdicts: list[dict[str, Any]] = Field(default_factory=list)  # one per judged part, never added up
    evidence: int = 0
    seconds: float = 0.0
    training: dict[str, Any] = Field(default_factory=dict)  # the update's steps, seconds and waits for serving
    error: str | None = None
    observations: int = 0
    decided: bool = True  # False: a shadow trial started (nothing accepted or rejected yet)
    time: float = Field(default_factory=time.time)


class MonitorConfig(StrictModel):
    """Settings of the `Monitor` (validated when built).

    Attributes:
        agreement_threshold: trigger when mean agreement in the window is below this.
        accuracy_threshold: trigger when accuracy (known outcomes only) is below this.
        window: observations kept for the window means.
        min_count: observations (or known outcomes, for accuracy) needed before a rule may fire.
        cooldown: observations that must pass after a re-optimization before the next trigger.
        keep_events: events held in memory (`Monitor.events`); the full history is the JSONL log.
    """

    agreement_threshold: float = Field(default=0.6, ge=0, le=1)
    accuracy_threshold: float = Field(default=0.5, ge=0, le=1)
    window: int = Field(default=20, ge=1)
    min_count: int = Field(default=10, ge=1)
    cooldown: int = Field(default=20, ge=0)
    keep_events: int = Field(default=1000, ge=1)

    THRESHOLDS: ClassVar[tuple[str, ...]] = (
        "agreement_threshold", "accuracy_threshold", "window", "min_count", "cooldown")
    """The fields a task's `Adjustments` carries (declared here once; task analysis may set them per task)."""


# the logged events `Monitor.restore` applies again, by their `event` field
_REPLAYED: dict[str, type[Observation | FeedbackEvent | ReoptimizationEvent]] = {
    "observation": Observation, "feedback": FeedbackEvent, "reoptimization": ReoptimizationEvent}


class Monitor:
    """Sliding-window monitor with trigger rules and an optional JSONL event log.

    Args:
        config: a `MonitorConfig`; keyword arguments are its fields and win over it.
        log_path: JSONL file to append every event to, fsynced per event (None: memory only).

    Memory is bounded: the window, an id map of at most ten windows, and the last
    `keep_events` events; the whole history is in the log.
    """

    def __init__(self, config: MonitorConfig | None = None, *, log_path: str | Path | None = None,
                 **settings: Any) -> None:
        self.config = build(MonitorConfig, (config.model_dump() if config else None), **settings)
        cfg = self.config
        self.agreement_threshold = cfg.agreement_threshold
        self.accuracy_threshold = cfg.accuracy_threshold
        self.min_count = cfg.min_count
        self.cooldown = cfg.cooldown
        self._window: deque[Observation] = deque(maxlen=cfg.window)
        self._by_id: dict[str, Observation] = {}
        self.count = 0
        self.last_reopt_at: int | None = None
        self.pending = False  # a trigger was raised and its re-optimization has not finished
        self._restored_at: int | None = None  # the count `restore` read from a log
        self._events: deque[dict[str, Any]] = deque(maxlen=cfg.keep_events)
        self.events_logged = 0  # events ever logged (the in-memory deque holds the last `keep_events`)
        self.log_path = Path(log_path) if log_path else None
        self._log_file = JsonlLog(self.log_path, fsync=True) if self.log_path is not None else None
        self._lock = threading.Lock()

    @property
    def events(self) -> list[dict[str, Any]]:
        """The most recent events (at most `keep_events`), oldest first."""
        with self._lock:
            return list(self._events)

    def events_since(self, seen: int) -> list[dict[str, Any]]:
        """Events logged after the first `seen` (those still held in memory); pass `events_logged` back."""
        with self._lock:
            fresh = self.events_logged - seen
            return list(self._events)[-fresh:] if fresh > 0 else []

    def _log(self, record: BaseModel) -> None:
        data = record.model_dump(mode="json")
        self._events.append(data)
        self.events_logged += 1
        if self._log_file is not None:
            self._log_file.append(data)

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
            self._apply(obs)
            self._log(obs)
            return self._check()

    def feedback(self, obs_id: str, correct: bool) -> Trigger | None:
        """Record whether an earlier answer was correct; may trigger on accuracy."""
        with self._lock:
            event = FeedbackEvent(id=obs_id, correct=bool(correct))
            self._apply(event)
            self._log(event)
            return self._check()

    def _apply(self, event: Observation | FeedbackEvent | ReoptimizationEvent) -> None:
        """What one event does to the window, the count and the cooldown (the lock is held): live, and when
        `restore` reads the log back."""
        if isinstance(event, Observation):
            self._window.append(event)
            self._by_id[event.id] = event
            if len(self._by_id) > 10 * (self._window.maxlen or 1):
                for key in list(self._by_id)[: len(self._by_id) // 2]:
                    del self._by_id[key]
            self.count += 1
        elif isinstance(event, FeedbackEvent):
            obs = self._by_id.get(event.id)
            if obs is not None:
                obs.correct = event.correct
        else:
            self.pending = False
            self.last_reopt_at = event.observations
            if event.accepted:
                self._window.clear()  # judge the new state on its own answers

    def _check(self) -> Trigger | None:
        if self.pending:
            return None
        if self.last_reopt_at is not None and self.count - self.last_reopt_at < self.cooldown:
            return None
        if self._restored_at is not None and self.count - self._restored_at < self.min_count:
            return None  # restored from a log: wait for evidence from this process (see `restore`)
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

    def restore(self, path: str | Path | None = None, *, wait_for_fresh: bool = True) -> int:
        """Rebuild the window, the observation count and the cooldown from an event log (this monitor's own
        by default), so a resumed run goes on where the logged one stopped; returns the observations read.

        Observations fill the window in order (with their later feedback), an accepted re-optimization
        clears it, and the last finished re-optimization starts the cooldown again. A trigger whose
        re-optimization never finished (the process stopped) is not pending: the rules may raise it again.
        With `wait_for_fresh` (the default) the restored monitor triggers only after `min_count` fresh
        observations: what a re-optimization trains on (the controller's evidence) is not in this log, so
        without `Controller.restore_evidence` it starts empty. Pass False when the evidence was restored too:
        the resumed monitor then decides as the logged one would have. The log is not written to. Call it
        before serving.

        Example:
            >>> import tempfile, pathlib
            >>> log = pathlib.Path(tempfile.mkdtemp()) / "events.jsonl"
            >>> m = Monitor(window=4, min_count=2, cooldown=0, log_path=log)
            >>> _ = m.observe(Observation(id="q1", agreement=0.9, samples=2, tokens=80, latency_s=1.0))
            >>> again = Monitor(window=4, log_path=log)
            >>> again.restore(), again.stats()["count"]
            (1, 1)
        """
        source = Path(path) if path is not None else self.log_path
        if source is None:
            raise ConfigError("Monitor.restore: no log to read (pass a path, or build the monitor with log_path)")
        events = JsonlLog(source, fsync=False).read()
        with self._lock:
            self._window.clear()
            self._by_id.clear()
            self.count, self.last_reopt_at, self.pending = 0, None, False
            for no, data in enumerate(events, 1):
                kind = data.get("event") if isinstance(data, dict) else None
                model = _REPLAYED.get(kind) if isinstance(kind, str) else None
                if model is None:
                    continue  # triggers (and anything else) change no state
                try:
                    self._apply(model.model_validate(data))
                except ValidationError as exc:
                    raise ArtefactError(f"{source} line {no}: invalid {kind} event "
                                        f"({exc.errors()[0]['msg']}); fix or remove that line") from None
            self._restored_at = self.count if wait_for_fresh else None
            return self.count

    def reoptimized(self, event: ReoptimizationEvent) -> None:
        """Record a finished re-optimization and start the cooldown (the window restarts if accepted)."""
        with self._lock:
            event.observations = self.count
            self._log(event)
            self._apply(event)
