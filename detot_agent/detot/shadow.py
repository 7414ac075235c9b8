"""Shadow judging: a candidate answers a share of live requests in the background, never served, and each
request whose gold answer arrives gives one paired outcome to the always-valid test (`detot/sequential.py`).

`ShadowJudge.propose(state, key)` starts a trial of a candidate `TaskState`; `shadow(...)` is told of every
served request (a deterministic `share` of them, by request id, is also answered by the candidate on one
low-priority worker thread); `outcome(...)` is told of every gold answer (it never waits for the shadow answer:
an outcome whose shadow answer is still running is fed at a later call, or by `drain()`) and returns the trial's
decision once it is reached: `accept` (the test's wealth reached `1 / level` and no veto holds), `reject`
(futility, the cap, or a veto), or None (keep collecting). The veto: a candidate whose shadow answers collapse
(one answer for everything, or fewer than `min_diversity` of the serving state's distinct answers on the same
requests) is rejected whatever the test says. A candidate proposed again (the same key) continues its own
evidence at its own level (`ErrorBudget`).

Example:
    >>> judge = ShadowJudge(lambda state, inputs: Replayed("7", 1.0), ShadowConfig(share=1.0))
    >>> judge.propose(TaskState(1, None), "cand-1")
    >>> judge.shadow("q1", {"question": "3 + 4?"}, Replayed("8", 1.0)).result()
    Replayed(key='7', agreement=1.0, demo_ids=())
    >>> judge.outcome("q1", "7") is None, judge.trial.test.wins   # one win is not yet decisive
    (True, 1)
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from detot_agent.config import StrictModel
from detot_agent.detot.records import Replayed, TaskState
from detot_agent.detot.sequential import ErrorBudget, PairedBettingTest, SequentialRules
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.engines.generation import background_work
from detot_agent.errors import ArtefactError
from detot_agent.io.jsonlog import JsonlLog

__all__ = ["ShadowConfig", "ShadowJudge", "Trial", "agreement_outcome", "embedding_key", "selected"]


class ShadowConfig(StrictModel):
    """Settings of shadow judging (`ControllerConfig.shadow`).

    Attributes:
        share: the share of served requests the candidate also answers (chosen by request id).
        outcomes: what a paired outcome is: `gold` (the gold answer arrives by feedback; `outcome`) or
            `agreement` (label-free, `settle`: where the two answers differ, the one whose vote agreed more by at
            least `margin` wins; the same answer, or agreements within the margin, is a tie; an unparsed answer
            loses). Agreement is a proxy: a candidate that makes the samples agree on wrong answers wins it, so the
            collapse veto matters more here.
        rules: the sequential test's settings (alpha: the service's error budget, min_effect, futility, cap).
        min_diversity: veto when the candidate's distinct shadow answers fall below this share of the serving
            state's on the same requests.
        veto_after: shadow answers needed before the veto is checked.
        max_pending: the most shadow answers queued or running at once; a selected request that finds the backlog
            full is not shadowed (counted in the trial's `skipped`). Under a client that never lets the engine
            rest, background answers run slower than requests arrive: without a bound the backlog grows with the
            stream, and its answers arrive too late to decide anything.
        when_full: `skip` (the default): a selected request that finds the backlog full is not shadowed. `wait`:
            its serving thread waits until the backlog has room, so every selected request is shadowed and the
            stream slows to the candidate's pace (serving waits for judging: an offline or batch stream, or a
            prequential eval whose question is what the loop can learn, never a latency-bound service). The wait
            is in the serving call: under `acall` it holds the event loop, so use threads (`forward`) with it.
        workers: shadow answers run at once (threads); the candidate answers at most this many requests at a time.
        background: True (the default): shadow answers are background work (`background_work()`: live requests go
            first; under a client that never pauses they wait their patience and run on a quarter of the slots, so
            they cover a small share of the stream: 15 of 170 problems on the prequential GSM8K run). False: they
            compete with live requests as equals, so evidence comes at the pace of traffic (with `workers` about
            the number of requests in flight), at the cost of serving latency: a choice for a stream whose
            latency matters less than a decision (an offline or batch service, a prequential eval).
    """

    share: float = Field(default=0.25, gt=0, le=1)
    outcomes: Literal["gold", "agreement"] = "gold"
    margin: float = Field(default=0.1, ge=0, lt=1)
    rules: SequentialRules = Field(default_factory=SequentialRules)
    min_diversity: float = Field(default=0.5, ge=0, le=1)
    veto_after: int = Field(default=10, ge=2)
    max_pending: int = Field(default=8, ge=1)
    when_full: Literal["skip", "wait"] = "skip"
    workers: int = Field(default=1, ge=1, le=64)
    background: bool = True


def selected(request_id: str, share: float) -> bool:
    """Whether request `request_id` is shadowed: a fixed hash of its id below `share` (no random state)."""
    h = int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16)
    return h / 0x100000000 < share


@dataclass
class Trial:
    """One candidate under shadow judging."""

    key: str
    state: TaskState
    test: PairedBettingTest
    change: str = "embedding"  # what the candidate changes, as the event log names it
    pairs: dict[str, tuple[Replayed, Future[Replayed]]] = field(default_factory=dict)  # request id -> (served, shadow)
    gold: dict[str, str] = field(default_factory=dict)  # request id -> gold answer whose shadow answer is pending
    # tallied as each shadow answer finishes (so a decision's checks cost the same at the 10th pair and the 10,000th):
    finished: list[tuple[Replayed, Replayed | None]] = field(default_factory=list)  # (served, shadow; None: failed)
    settled: int = 0  # `finished` entries whose label-free outcome was observed
    answered: int = 0  # shadow answers that did not fail
    ours: set[str] = field(default_factory=set)  # their distinct answers
    theirs: set[str] = field(default_factory=set)  # the served answers' distinct answers on the same requests
    pending: int = 0  # shadow answers queued or running (bounded by `ShadowConfig.max_pending`)
    skipped: int = 0  # selected requests not shadowed because the backlog was full


class ShadowJudge:
    """Runs one trial at a time (module docstring).

    Args:
        replay: answers inputs under a given state through the whole pipeline, recording nothing (DETOT's `_replay`).
        config: `ShadowConfig`.
    """

    def __init__(self, replay: Callable[[TaskState, dict[str, Any]], Replayed],
                 config: ShadowConfig | None = None) -> None:
        self.replay = replay
        self.config = config or ShadowConfig()
        self.budget = ErrorBudget(self.config.rules.alpha)
        self.tests: dict[str, PairedBettingTest] = {}  # every candidate's evidence, by key
        self.trial: Trial | None = None
        self._lock = threading.RLock()  # re-entered: cancelling a queued answer (under it) runs its callback
        self._room = threading.Condition(self._lock)  # notified when a shadow answer settles or a trial ends
        self._worker = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="detot-shadow")
        self.log: JsonlLog | None = None  # `record_to`
        self.interrupted: dict[str, str] | None = None  # the trial running when the restored state was saved

    def record_to(self, path: str | Path) -> None:
        """Append every paired outcome fed to the test to JSONL file `path`: the request, the candidate, both
        answers, the gold answer (None for label-free outcomes), the outcome (+1 / 0 / -1), both agreements and the
        test's evidence after it (`accept_e` against its threshold `accept_at`, `futility_e` against `reject_at`),
        so a trial's candidate can be scored on the stream afterwards (`detot eval` writes `<method>.shadow.jsonl`,
        and its report plots the evidence: `evidence.png`).

        Example:
            >>> import pathlib, tempfile
            >>> judge = ShadowJudge(lambda state, inputs: Replayed("7", 1.0), ShadowConfig(share=1.0))
            >>> judge.record_to(pathlib.Path(tempfile.mkdtemp()) / "shadow.jsonl")
            >>> judge.propose(TaskState(1, None), "cand-1")
            >>> _ = judge.shadow("q1", {"question": "3 + 4?"}, Replayed("8", 1.0)).result()
            >>> _ = judge.outcome("q1", "7")
            >>> [(r["request"], r["served"], r["shadow"], r["outcome"], r["accept_e"] > 1) for r in judge.log.read()]
            [('q1', '8', '7', 1, True)]
        """
        self.log = JsonlLog(path, fsync=False)

    def _observe_outcome(self, trial: Trial, request_id: str | None, served: Replayed, shadow: Replayed,
                         gold: str | None, outcome: int) -> None:
        """Feed one paired outcome to the trial's test (under the lock) and log it with the evidence after it."""
        trial.test.observe(outcome)
        if self.log is not None:
            self.log.append({"request": request_id, "candidate": trial.key, "change": trial.change,
                             "served": served.key, "shadow": shadow.key, "gold": gold, "outcome": outcome,
                             "served_agreement": served.agreement, "shadow_agreement": shadow.agreement,
                             **trial.test.evidence(level=self.budget.level(trial.key)),
                             "time": time.time()})

    def propose(self, state: TaskState, key: str, change: str = "embedding") -> None:
        """Start the trial of candidate `state` named `key` (a key seen before continues its evidence); `change`
        names what it changes in the event log. A running trial ends (its queued shadow answers are cancelled)."""
        with self._lock:
            test = self.tests.setdefault(key, PairedBettingTest(self.config.rules))
            self.budget.level(key)  # fixed at its first trial
            self._end()
            self.trial = Trial(key, state, test, change)

    def decided(self, key: str) -> bool:
        """Whether candidate `key` was tested and its evidence already decides (accept or reject)."""
        with self._lock:
            test = self.tests.get(key)
            return test is not None and test.decision(level=self.budget.level(key)) != "continue"

    def stop(self) -> None:
        """End the running trial without a decision (its evidence is kept; queued shadow answers are cancelled)."""
        with self._lock:
            self._end()

    def _end(self) -> None:
        """End the running trial (under the lock): queued shadow answers that have not started are cancelled."""
        trial, self.trial = self.trial, None
        if trial is not None:
            for _, future in trial.pairs.values():
                future.cancel()
            self._room.notify_all()  # requests waiting for room (`when_full="wait"`) go on unshadowed

    def shadow(self, request_id: str, inputs: dict[str, Any] | None,
               served: Replayed | None) -> Future[Replayed] | None:
        """Also answer a served request with the candidate when it is selected; returns the background answer."""
        trial = self.trial
        if trial is None or inputs is None or served is None or not selected(request_id, self.config.share):
            return None
        with self._lock:
            while self.config.when_full == "wait" and trial.pending >= self.config.max_pending \
                    and self.trial is trial:
                self._room.wait()
            if self.trial is not trial:
                return None  # the trial ended while this request waited
            if trial.pending >= self.config.max_pending:
                trial.skipped += 1
                return None
            trial.pending += 1
        context = contextvars.copy_context()  # the caller's `dspy.context` (its LM, its settings) holds there too
        future = self._worker.submit(context.run, self._answer, trial, served, inputs)
        future.add_done_callback(lambda _: self._settled(trial))  # also when cancelled
        with self._lock:
            if self.trial is trial:
                trial.pairs[request_id] = (served, future)
        return future

    def _settled(self, trial: Trial) -> None:
        with self._lock:
            trial.pending -= 1
            self._room.notify_all()

    def _answer(self, trial: Trial, served: Replayed, inputs: dict[str, Any]) -> Replayed:
        try:
            # the engine serves live requests first (`GenRow.background`), unless configured as their equal
            with background_work() if self.config.background else contextlib.nullcontext():
                answer = self.replay(trial.state, inputs)
        except Exception:
            with self._lock:
                trial.finished.append((served, None))
            raise
        with self._lock:
            trial.finished.append((served, answer))
            trial.answered += 1
            if answer.key is not None:
                trial.ours.add(answer.key)
            if served.key is not None:
                trial.theirs.add(served.key)
        return answer

    def outcome(self, request_id: str, gold_key: str | None) -> tuple[str, dict[str, Any], TaskState] | None:
        """A gold answer arrived: its paired outcome is fed to the test once the request's shadow answer is done.
        Never waits for it (the caller is the serving path): outcomes whose shadow answers are done are fed now,
        the others at a later call or `drain()`. Returns `(decision, stats, candidate state)` once the trial is
        decided (the trial then ends), else None."""
        with self._lock:
            trial = self.trial
            if trial is None or self.config.outcomes != "gold":
                return None
            if gold_key is not None and request_id in trial.pairs:
                trial.gold[request_id] = gold_key
        return self._observe(trial, wait=False)

    def drain(self) -> tuple[str, dict[str, Any], TaskState] | None:
        """Wait for the shadow answers that gold answers wait on and feed their outcomes (as `outcome` does)."""
        trial = self.trial
        return None if trial is None else self._observe(trial, wait=True)

    def _observe(self, trial: Trial, *, wait: bool) -> tuple[str, dict[str, Any], TaskState] | None:
        """Feed the pending gold outcomes whose shadow answers are done (all of them, waiting, with `wait`)."""
        while True:
            with self._lock:
                if self.trial is not trial:
                    return None
                ready = next((rid for rid in trial.gold if wait or trial.pairs[rid][1].done()), None)
                if ready is None:
                    return None
                gold_key = trial.gold.pop(ready)
                served, future = trial.pairs[ready]
            try:
                candidate = future.result()
            except Exception:  # a failed shadow answer is no outcome (it never reaches the caller's feedback)
                with self._lock:
                    trial.pairs.pop(ready, None)
                continue
            x = int(candidate.key == gold_key) - int(served.key == gold_key)
            with self._lock:
                if self.trial is not trial:
                    return None
                self._observe_outcome(trial, ready, served, candidate, gold_key, x)
                decided = self._decide(trial)
            if decided is not None:
                return decided

    def settle(self) -> tuple[str, dict[str, Any], TaskState] | None:
        """Label-free outcomes (`outcomes="agreement"`): count every finished shadow answer not yet counted;
        returns `(decision, stats, candidate state)` once the trial is decided, else None."""
        if self.config.outcomes != "agreement":
            return None
        with self._lock:
            trial = self.trial
            if trial is None:
                return None
            ready = trial.finished[trial.settled:]
            trial.settled = len(trial.finished)
            for served, answer in ready:
                if answer is not None:
                    x = agreement_outcome(answer, served, self.config.margin)
                    self._observe_outcome(trial, None, served, answer, None, x)
            return self._decide(trial) if ready else None

    def _decide(self, trial: Trial) -> tuple[str, dict[str, Any], TaskState] | None:
        """The trial's decision after its latest outcome (called under the lock); ends the trial when reached."""
        level = self.budget.level(trial.key)
        stats = {"candidate": trial.key, "change": trial.change, "level": level,
                 "futility_level": self.config.rules.futility, "outcomes_from": self.config.outcomes,
                 "shadowed": len(trial.pairs), "skipped_backlog_full": trial.skipped, **trial.test.stats()}
        veto = self._veto(trial)
        decision = "reject" if veto else trial.test.decision(level=level)
        if veto:
            stats["veto"] = veto
        if decision == "continue":
            return None
        if decision == "accept":
            self.budget.record_accept(trial.key)
        self._end()
        return decision, stats, trial.state

    def _veto(self, trial: Trial) -> str | None:
        ours, theirs = len(trial.ours), len(trial.theirs)  # tallied as the answers finished (`_answer`)
        if trial.answered < self.config.veto_after:
            return None
        if ours <= 1 < theirs or ours < self.config.min_diversity * theirs:
            return (f"answers collapsed: {ours} distinct shadow answers against the serving state's "
                    f"{theirs} on the same {trial.answered} requests")
        return None

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    # ---- state across a restart ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The budget and every candidate's evidence (the running trial's candidate restarts when re-proposed)."""
        with self._lock:
            running = None if self.trial is None else {"key": self.trial.key, "change": self.trial.change}
            return {"budget": self.budget.to_json(), "tests": {k: t.to_json() for k, t in self.tests.items()},
                    "running": running}

    def restore(self, data: dict[str, Any]) -> None:
        """Read `to_json`'s output back (validated first; `ArtefactError` naming what is wrong)."""
        if not isinstance(data, dict) or not isinstance(data.get("tests"), dict):
            raise ArtefactError("not a saved shadow judge: no 'tests' mapping")
        budget = ErrorBudget.from_json(data.get("budget", {}))
        tests = {str(k): PairedBettingTest.from_json(v, self.config.rules) for k, v in data["tests"].items()}
        running = data.get("running")
        if running is not None and not (isinstance(running, dict) and isinstance(running.get("key"), str)
                                        and isinstance(running.get("change"), str)):
            raise ArtefactError(f"saved shadow judge: 'running' must be null or {{key, change}}, got {running!r}")
        with self._lock:
            self._end()
            self.budget, self.tests, self.interrupted = budget, tests, running


def agreement_outcome(candidate: Replayed, served: Replayed, margin: float) -> int:
    """A label-free paired outcome: +1 the candidate's answer is the better-agreed one, -1 the serving state's, 0 a
    tie (the same answer, or agreements within `margin`); an unparsed answer (key None) loses to a parsed one.

    Example:
        >>> agreement_outcome(Replayed("7", 0.9), Replayed("8", 0.5), 0.1), agreement_outcome(Replayed("7", 0.9),
        ...     Replayed("7", 0.5), 0.1), agreement_outcome(Replayed(None, 0.0), Replayed("8", 0.4), 0.1)
        (1, 0, -1)
    """
    if candidate.key == served.key:
        return 0
    if candidate.key is None or served.key is None:
        return 1 if served.key is None else -1
    gap = candidate.agreement - served.agreement
    return 0 if abs(gap) < margin else 1 if gap > 0 else -1


def embedding_key(embedding: TaskEmbedding) -> str:
    """A candidate's name: sha256 of its tensors (the same training result is the same candidate)."""
    meta, tensors = embedding.to_tensors()
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "version"}, sort_keys=True,
                                  default=str).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()
