"""The continuous optimization loop (DETOT section 3.2): re-optimize, validate, accept or roll back.

The controller owns the task's serving state, a `TaskState`: the task's one `TaskEmbedding`
(query side for retrieval and soft-prompt head) under a version. A `TaskState` is never
changed once published: re-optimization trains a copy and, if it passes, publishes a new
`TaskState` with one reference assignment. A reader takes `controller.state` once per call
and reads `q(x)` and `P(x)` from it in one snapshot (`TaskEmbedding.serve`).

On a trigger, `reoptimize()` splits the evidence buffer (recent answered questions) into
training and held-out parts (every `holdout_every`-th record is held out), then:

1. train: one `TaskEmbedding.update` on the training records: for each good record (correct,
   or agreement >= `good_agreement` when correctness is unknown) the demos it used are
   positives and the next-ranked exemplars it did not use are negatives (retrieval side), and
   its learnable target (a sample that matched the gold answer, else the winning sample of a
   high-agreement vote) is an LM example with the prompt it was served (soft-prompt side).
   Only the sides the held-out records can judge are trained; a step and wall-time budget
   (`max_seconds`) bounds the update;
2. judge the candidate on the held-out part: the soft-prompt side by the mean NLL of the
   held-out targets, each under its own `P(x)` (must fall by at least `min_gain`); the retrieval
   side by the *separation* (mean reciprocal rank of demos behind good answers minus that of
   demos behind poor ones; may not fall by more than `margin`). Plain MRR of good demos would
   favour the old state, whose own top results those demos are;
3. publish the candidate as one object only if every judged side passes; otherwise roll back.

The code reads in the order it runs: `_gather`, `_train`, `_judge` (one `Verdict` per side),
`_publish`. Errors inside re-optimization are logged and leave the old state serving.

Example:
    >>> from detot_agent.detot.records import TaskState
    >>> TaskState(version=0, embedding=None).version
    0
"""

from __future__ import annotations

import copy
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from detot_agent.config import StrictModel
from detot_agent.detot.judging import Replayed, collapsed, hub_share
from detot_agent.detot.monitor import Monitor, ReoptimizationEvent
from detot_agent.detot.records import Evidence, TaskState, Verdict
from detot_agent.detot.task import Policy
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.errors import ArtefactError, ConfigError, DetotError
from detot_agent.io.jsonlog import JsonlLog
from detot_agent.retrieval.index import ExemplarIndex

__all__ = ["Controller", "ControllerConfig", "Evidence", "TaskState"]


class ControllerConfig(StrictModel):
    """Settings of the optimization loop (validated when built, never later inside its thread).

    Attributes:
        evidence_size: answered questions kept in the buffer.
        min_evidence: records needed before a re-optimization trains anything.
        holdout_every: every n-th record is held out for judging (n >= 2, so some are trained on).
        good_agreement: agreement at which an unlabelled answer counts as good.
        margin: how far held-out retrieval separation may fall before the change is rolled back.
        min_gain: how far the held-out NLL must fall for a new soft prompt to be kept.
        retrieval_steps / retrieval_lr: the retrieval update's optimisation.
        soft_prompt_steps / soft_prompt_lr: the soft-prompt side's optimisation (LM steps).
        l2_to_init: pull back to the initial state, for both sides.
        dropout: dropout on the soft-prompt vectors while training.
        balance: weight of the gate's anti-collapse term (`UpdateConfig.balance`).
        max_seconds: wall-time budget of one re-optimization, training and replay together (None: none);
            past it the re-optimization stops and the old state keeps serving. A replay judgement runs the
            pipeline twice per item: on a 2-core CPU with a 0.5B model that is tens of seconds an item, so
            raise this (or lower `replay_items`) there, or every re-optimization ends on the budget.
        train_share: the share of `max_seconds` training may use (the rest is for judging).
        alpha / min_effect / max_flip / min_diversity: the replay rules (`detot/judging.py`): the family-wise
            error budget, the least accuracy gain on gold items, the most flips of confident answers and the
            least share of distinct answers, without gold.
        max_hub_share: a retrieval collapse: one demo behind more than this share of items (and twice the
            serving state's share), by replay or over probe queries.
        replay_items: held-out evidence records replayed per judgement (the canary set comes on top).
        negatives_per_query: exemplars ranked just below a record's demos used as negatives.
        policies: reasoning strategies and vote weightings (`Policy`) the loop may switch to. After the
            embedding step of each re-optimization, every listed policy other than the serving one is judged
            against the serving state by paired replay on **gold items only** (held-out records given
            feedback, and the canary set), each test spending the error budget, each with its own
            `max_seconds`; the first that passes is published (one change per re-optimization). Empty (the
            default): the loop never changes how the task reasons or votes. Needs a replaying controller
            (inside `DETOT`); `pot` and `mix` need a batched engine.
    """

    evidence_size: int = Field(default=200, ge=1)
    min_evidence: int = Field(default=6, ge=2)
    holdout_every: int = Field(default=3, ge=2)
    good_agreement: float = Field(default=0.75, ge=0, le=1)
    margin: float = Field(default=0.02, ge=0)
    min_gain: float = Field(default=0.0, ge=0)
    retrieval_steps: int = Field(default=40, ge=1)
    retrieval_lr: float = Field(default=0.05, gt=0)
    soft_prompt_steps: int = Field(default=20, ge=1)
    soft_prompt_lr: float = Field(default=3e-3, gt=0)
    l2_to_init: float = Field(default=0.01, ge=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    balance: float = Field(default=0.1, ge=0)
    max_seconds: float | None = Field(default=120.0, gt=0)
    train_share: float = Field(default=0.5, gt=0, lt=1)
    negatives_per_query: int = Field(default=6, ge=1)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    min_effect: float = Field(default=0.05, ge=0, le=1)
    max_flip: float = Field(default=0.1, ge=0, le=1)
    min_diversity: float = Field(default=0.5, ge=0, le=1)
    max_hub_share: float = Field(default=0.5, gt=0, le=1)
    replay_items: int = Field(default=16, ge=1)
    policies: list[Policy] = Field(default_factory=list)

    @model_validator(mode="after")
    def _enough_to_hold_out(self) -> ControllerConfig:
        if self.min_evidence < self.holdout_every:
            raise ConfigError(f"min_evidence ({self.min_evidence}) must be at least holdout_every "
                             f"({self.holdout_every}), or no record is ever held out")
        if self.evidence_size < self.min_evidence:
            raise ConfigError(f"evidence_size ({self.evidence_size}) is below min_evidence ({self.min_evidence}): "
                             "the loop could never run")
        return self


@dataclass(frozen=True)
class _Split:
    """Evidence for one re-optimization: what trains, what judges, and which parts can be judged."""

    evidence: list[Evidence]
    train: list[Evidence]
    held: list[Evidence]
    judge_soft: bool
    judge_retrieval: bool


def _lower_priority() -> None:
    """Run the re-optimization thread at nice +10 (Linux: per thread), so serving threads win the cores.
    Torch's intra-op threads are shared by the whole process and keep their priority."""
    import contextlib
    import os

    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted: normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class _Outcome(Exception):
    """A re-optimization that ends before publishing: not accepted, with its reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Controller:
    """Owns the serving `TaskState`, the evidence buffer, and re-optimization (sync or in the background).

    Args:
        state: the initial state.
        index: the exemplar index (for demo vectors and negatives).
        monitor: receives re-optimization events.
        engine: what trains soft prompts (`engines.lm.training_engine`: a `LocalEngine`, or a lazily loaded
            one behind llama.cpp); None: retrieval only.
        config: loop settings.
        k: demos per question (negatives are drawn beyond them).
        replay: answers one input under a given state through the whole pipeline (DETOT supplies it); with
            it, candidates are judged by paired replay (`detot/judging.py`), without it by the held-out
            proxies (target NLL, demo separation), which are weaker: they cannot see answers.
        canary: labelled `(inputs, gold_key)` items every replay judgement also answers.
        evidence_log: JSONL file every buffered record and its later outcome are appended to (not fsynced),
            so `restore_evidence` can rebuild the buffer after a restart; None: memory only.
    """

    def __init__(self, state: TaskState, *, index: ExemplarIndex, monitor: Monitor, engine: Any = None,
                 config: ControllerConfig | None = None, k: int = 3,
                 replay: Callable[[TaskState, dict[str, Any]], Replayed] | None = None,
                 canary: Sequence[tuple[dict[str, Any], str]] = (),
                 evidence_log: str | Path | None = None) -> None:
        self._state = state
        self.replay = replay
        self.canary = list(canary)
        self.tests_run = 0  # the error budget's counter (detot/judging.py)
        self.history: deque[ReoptimizationEvent] = deque(maxlen=100)  # every decision, embedding and policy
        self._canary_state: TaskState | None = None  # whose canary answers `_canary_answers` holds
        self._canary_answers: dict[int, Replayed] = {}
        self.index = index
        self.monitor = monitor
        self.engine = engine
        self.config = config or ControllerConfig()
        self.k = k
        self._evidence: deque[Evidence] = deque(maxlen=self.config.evidence_size)
        self._by_id: dict[str, Evidence] = {}
        self._lock = threading.Lock()  # evidence buffer
        self.evidence_log = Path(evidence_log) if evidence_log is not None else None
        self._evidence_file = JsonlLog(self.evidence_log, fsync=False) if self.evidence_log is not None else None
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

    def restore(self, state: TaskState) -> None:
        """Serve a state that comes from outside the loop (a loaded program). The evidence buffer and the
        serving state's cached canary answers are dropped: they were gathered under what served before, and
        a loaded state may carry the same version number as that one."""
        with self._lock:
            self._evidence.clear()
            self._by_id.clear()
            self._canary_state, self._canary_answers = None, {}
            self._state = state

    # ---- evidence ----------------------------------------------------------------------------
    def add_evidence(self, ev: Evidence) -> None:
        """Append an answered question to the buffer (oldest dropped beyond `evidence_size`)."""
        with self._lock:
            self._push(ev)
            if self._evidence_file is not None:
                self._evidence_file.append({"kind": "evidence", **ev.to_record()})

    def record_outcome(self, pred_id: str, *, correct: bool, gold_key: str | None = None) -> None:
        """Attach correctness (and a gold-matching sample, if any) to a buffered record."""
        with self._lock:
            ev = self._by_id.get(pred_id)
            if ev is None:
                return
            self._outcome(ev, correct, gold_key)
            if self._evidence_file is not None:
                self._evidence_file.append({"kind": "outcome", "id": pred_id, "correct": correct,
                                            "gold_key": gold_key})

    def _push(self, ev: Evidence) -> None:
        """Append `ev`, dropping the oldest record (and its id) beyond `evidence_size`. Caller holds the lock."""
        if len(self._evidence) == self._evidence.maxlen:
            self._by_id.pop(self._evidence[0].id, None)
        self._evidence.append(ev)
        self._by_id[ev.id] = ev

    @staticmethod
    def _outcome(ev: Evidence, correct: bool, gold_key: str | None) -> None:
        ev.correct = correct
        ev.gold_key = gold_key
        if gold_key is not None:
            ev.gold_target = next((s.text for s in ev.samples if s.key == gold_key), None)

    def restore_evidence(self, path: str | Path | None = None) -> int:
        """Rebuild the evidence buffer from an evidence log (this controller's own by default): its last
        `evidence_size` records with their outcomes, as the logged controller held them; returns how many.
        The log is not written to. Call it after the serving state is restored (`restore` empties the
        buffer) and before serving.

        Example:
            >>> import tempfile, pathlib, numpy as np
            >>> log = pathlib.Path(tempfile.mkdtemp()) / "evidence.jsonl"
            >>> c = Controller(TaskState(0, None), index=None, monitor=Monitor(), evidence_log=log)
            >>> c.add_evidence(Evidence(id="q1", query=np.zeros(4, np.float32), demo_ids=[], agreement=1.0))
            >>> c.record_outcome("q1", correct=True)
            >>> again = Controller(TaskState(0, None), index=None, monitor=Monitor(), evidence_log=log)
            >>> again.restore_evidence(), again.evidence()[0].correct
            (1, True)
        """
        source = Path(path) if path is not None else self.evidence_log
        if source is None:
            raise ConfigError("Controller.restore_evidence: no log to read (pass a path, or build the controller "
                             "with evidence_log)")
        records = JsonlLog(source, fsync=False).read()
        with self._lock:
            self._evidence.clear()
            self._by_id.clear()
            for no, data in enumerate(records, 1):
                kind = data.get("kind") if isinstance(data, dict) else None
                try:
                    if kind == "evidence":
                        self._push(Evidence.from_record(data))
                    elif kind == "outcome":
                        old = self._by_id.get(str(data["id"]))
                        if old is not None:
                            self._outcome(old, bool(data["correct"]), data.get("gold_key"))
                    else:
                        raise ArtefactError(f"unknown kind {kind!r} (evidence or outcome)")
                except (ValueError, KeyError) as exc:
                    raise ArtefactError(f"{source} line {no}: {exc}; fix or remove that line") from None
            return len(self._evidence)

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
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detot-reopt",
                                                    initializer=_lower_priority)
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
        """Run one re-optimization synchronously: gather, train, judge, publish (or roll back); then try the
        configured policies (`ControllerConfig.policies`). Returns the embedding step's event; every event,
        policy trials included, goes to the monitor's log and `history`."""
        with self._reopt_lock:
            event = self._reoptimize_embedding()
            self._record(event)
            if self.config.policies and self.replay is not None:
                for trial in self._try_policies():
                    self._record(trial)
                    if trial.accepted:
                        break
            return event

    def _record(self, event: ReoptimizationEvent) -> None:
        self.history.append(event)
        self.monitor.reoptimized(event)

    def _reoptimize_embedding(self) -> ReoptimizationEvent:
        """Gather, train, judge and publish (or roll back) a new task embedding."""
        start = time.perf_counter()
        old = self._state
        evidence: list[Evidence] = []
        try:
            split = self._gather()
            evidence = split.evidence
            candidate = self._train(old, split)
            self._check_budget(start, "training")
            verdicts = self._judge(old, candidate, split, start)
            event = self._publish(old, candidate, verdicts)
        except _Outcome as out:
            event = ReoptimizationEvent(accepted=False, reason=out.reason, version_before=old.version,
                                        version_after=old.version)
        except Exception as exc:  # the old state keeps serving; the error is reported, not raised
            event = ReoptimizationEvent(accepted=False, reason="re-optimization raised; kept the old state",
                                        version_before=old.version, version_after=old.version,
                                        error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        event.evidence = len(evidence) if evidence else len(self._usable())
        event.seconds = time.perf_counter() - start
        return event

    def _try_policies(self) -> Iterator[ReoptimizationEvent]:
        """Judge each configured policy against the serving state on gold items; yield one event per trial."""
        for policy in self.config.policies:
            old = self._state
            new_policy = policy.merged(old.policy)
            if new_policy == old.policy:
                continue  # already serving
            start = time.perf_counter()
            change = f"policy {policy.describe()}"
            try:
                held = [e for e in self._usable() if e.inputs is not None]
                verdict = self._judge_replay(old, TaskState(old.version + 1, old.embedding, new_policy), held, start,
                                             gold_only=True)
                if verdict.accepted:  # the same embedding under the new version (a copy: the old state is not touched)
                    embedding = copy.deepcopy(old.embedding)
                    if embedding is not None:
                        embedding.version = old.version + 1
                    self.publish(TaskState(old.version + 1, embedding, new_policy))
                event = ReoptimizationEvent(
                    accepted=verdict.accepted, change=change,
                    reason=("accepted: " if verdict.accepted else "rolled back: ") + verdict.describe(),
                    version_before=old.version, version_after=self._state.version, old_score=verdict.before,
                    new_score=verdict.after, verdicts=[verdict.log("policy")])
            except _Outcome as out:
                event = ReoptimizationEvent(accepted=False, change=change, reason=out.reason,
                                            version_before=old.version, version_after=old.version)
            except Exception as exc:  # the old state keeps serving
                event = ReoptimizationEvent(accepted=False, change=change, reason="policy trial raised; kept the "
                                            "old state", version_before=old.version, version_after=old.version,
                                            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
            event.seconds = time.perf_counter() - start
            yield event

    # ---- 1. gather -----------------------------------------------------------------------------------
    def _usable(self) -> list[Evidence]:
        """Evidence answered by the serving version (older versions' answers say nothing about it)."""
        version = self._state.version
        return [e for e in self.evidence() if e.version == version and all(d in self.index for d in e.demo_ids)]

    def _gather(self) -> _Split:
        """Split the buffer into training and held-out records; decide which parts the held-out can judge."""
        cfg = self.config
        evidence = self._usable()
        if len(evidence) < cfg.min_evidence:
            raise _Outcome(f"only {len(evidence)} evidence records from serving version {self._state.version} "
                           f"(need {cfg.min_evidence}); kept the old state")
        held = evidence[cfg.holdout_every - 1::cfg.holdout_every]
        held_ids = {e.id for e in held}
        train = [e for e in evidence if e.id not in held_ids]
        embedding = self._state.embedding
        if embedding is None:
            raise _Outcome("no task embedding to re-optimize; kept the old state")
        if self.replay is not None:
            # paired replay judges the whole pipeline on held-out inputs and the canary set: a side is trained
            # when the *training* records can teach it, whatever the held-out records hold
            if not self.canary and not any(e.inputs is not None for e in held):
                raise _Outcome("no held-out record can be replayed (no inputs) and no canary set; kept the old state "
                               "without training")
            basis, nothing = train, (f"nothing to learn from: none of the {len(train)} training records has a "
                                     "learnable target or good demos")
        else:
            # the proxy judges measure each side on the held-out records: train only the sides they can judge
            # (training the soft prompt is the expensive part: minutes on a CPU), so an unjudgeable change is
            # never paid for
            basis, nothing = held, (f"no held-out evidence to validate on (none of the {len(held)} held-out "
                                    "records has a learnable target or good demos)")
        judge_soft = embedding.has_head and self.engine is not None and bool(self._examples(basis))
        judge_retrieval = any(e.good(cfg.good_agreement) and e.demo_ids for e in basis)
        if not judge_soft and not judge_retrieval:
            raise _Outcome(f"{nothing}; kept the old state without training")
        return _Split(evidence, train, held, judge_soft, judge_retrieval)

    # ---- 2. train ------------------------------------------------------------------------------------
    def _train(self, old: TaskState, split: _Split) -> TaskEmbedding:
        """Train a copy of the task embedding on the judgeable sides; the serving state is never touched."""
        from detot_agent.embedding.update import Feedback

        cfg = self.config
        assert old.embedding is not None
        candidate = copy.deepcopy(old.embedding)
        items: list[Feedback] = []
        for ev in split.train:
            pos = neg = None
            if split.judge_retrieval and ev.good(cfg.good_agreement) and ev.demo_ids:
                want = min(len(self.index), self.k + cfg.negatives_per_query + len(ev.demo_ids))
                ranked = [h.id for h in self.index.search(candidate.query(ev.query), want)]
                negatives = [i for i in ranked if i not in set(ev.demo_ids)][: cfg.negatives_per_query]
                if negatives:
                    pos, neg = self.index.vectors(ev.demo_ids), self.index.vectors(negatives)
            example = self._example(ev) if split.judge_soft else None
            if pos is not None or example is not None:
                items.append(Feedback(query=ev.query, positives=pos, negatives=neg, example=example))
        if not items:
            raise _Outcome("nothing to learn from: no good training records with usable demos or targets; "
                           "kept the old state")
        report = candidate.update(
            items, engine=self.engine if split.judge_soft else None, steps=cfg.soft_prompt_steps,
            retrieval_steps=cfg.retrieval_steps, retrieval_lr=cfg.retrieval_lr, head_lr=cfg.soft_prompt_lr,
            l2_to_init=cfg.l2_to_init, dropout=cfg.dropout, balance=cfg.balance,
            # training gets its share of the budget; the rest is left for judging
            max_seconds=None if cfg.max_seconds is None else cfg.max_seconds * cfg.train_share)
        if not report.accepted:
            raise _Outcome(f"the update learnt nothing on its training records (retrieval loss {report.loss_before:.3f}"
                           f" -> {report.loss_after:.3f}, LM {report.lm_before} -> {report.lm_after}); kept the old "
                           "state")
        return candidate

    def _example(self, ev: Evidence) -> Any:
        from detot_agent.softprompt.training import TuneExample

        target = ev.learn_target(self.config.good_agreement)
        return TuneExample(messages=ev.messages, target=target) if target and ev.messages else None

    def _examples(self, records: list[Evidence]) -> list[Any]:
        return [ex for ex in map(self._example, records) if ex is not None]

    # ---- 3. judge ------------------------------------------------------------------------------------
    def _check_budget(self, start: float, stage: str, progress: Callable[[], str] | None = None) -> None:
        """Stop with `_Outcome` past `max_seconds`; `progress()` says how far the stage got."""
        limit = self.config.max_seconds
        if limit is not None and time.perf_counter() - start > limit:
            done = f", {progress()}" if progress is not None else ""
            raise _Outcome(f"the {limit:g} s budget ran out during {stage}{done}; kept the old state")

    def _judge(self, old: TaskState, candidate: TaskEmbedding, split: _Split, start: float) -> list[Verdict]:
        """By paired replay when the controller can replay (one verdict for the whole candidate), else one
        proxy verdict per judged side, each on its own held-out measure (higher is better)."""
        if self.replay is not None:
            return [self._judge_replay(old, TaskState(old.version + 1, candidate, old.policy), split.held, start)]
        cfg = self.config
        assert old.embedding is not None
        verdicts = []
        if split.judge_soft:
            before, after = self._nll(old.embedding, split.held), self._nll(candidate, split.held)
            if before is not None and after is not None:
                verdicts.append(Verdict("soft_prompt", "held-out NLL", -before, -after,
                                        accepted=after <= before - cfg.min_gain))
        if split.judge_retrieval:
            before, after = self._separation(old.embedding, split.held), self._separation(candidate, split.held)
            if before is not None and after is not None:
                hubs = [self._hub_share(e) for e in (old.embedding, candidate)]
                gone = collapsed(hubs[0], hubs[1], cfg.max_hub_share)
                verdicts.append(Verdict("retrieval", "held-out demo separation", before, after,
                                        accepted=after >= before - cfg.margin and not gone,
                                        reason=(f"retrieval collapsed: one demo is in the top {self.k} of "
                                                f"{hubs[1]:.0%} of {self.PROBES} probe queries, against "
                                                f"{hubs[0]:.0%}") if gone else "",
                                        stats={"demo_hub_share": hubs}))
        if not verdicts:
            raise _Outcome("no held-out evidence to validate on; kept the old state")
        return verdicts

    def _judge_replay(self, old: TaskState, new_state: TaskState, records: list[Evidence], start: float, *,
                      gold_only: bool = False) -> Verdict:
        """Both states answer the same records (never trained on by the candidate) and the canary set; with
        `gold_only`, only the items whose gold answer is known."""
        from detot_agent.detot.judging import ReplayRules, decide, futile, gold_counts

        cfg = self.config
        assert self.replay is not None
        held = [e for e in records if e.inputs is not None and (e.gold_key is not None or not gold_only)]
        held = held[: cfg.replay_items]
        items = [(e.inputs, e.gold_key) for e in held] + [(inp, gold) for inp, gold in self.canary]
        if not items:
            if gold_only:
                raise _Outcome("no gold items to judge a policy on (give feedback or a canary set); kept the old "
                               "state")
            raise DetotError("internal: _gather let through a split with nothing to replay; please report it")
        rules = ReplayRules(alpha=cfg.alpha, min_effect=cfg.min_effect, max_flip=cfg.max_flip,
                            min_diversity=cfg.min_diversity, max_hub_share=cfg.max_hub_share,
                            good_agreement=cfg.good_agreement)
        golds = [g for _, g in items]
        total_gold = sum(g is not None for g in golds)
        olds, news = [], []
        stopped = None
        reused = 0
        for j, (inputs, _) in enumerate(items):
            assert inputs is not None
            answer, known = self._serving_side(old, held[j] if j < len(held) else None, j - len(held), inputs)
            reused += known
            olds.append(answer)
            news.append(self.replay(new_state, inputs))

            def progress(done: int = j + 1) -> str:  # a budget-stopped judgement is still evidence
                wins, losses = gold_counts(olds, news, golds[:done])
                return (f"after {done} of {len(items)} items (so far the candidate alone was right on {wins} gold "
                        f"items, the serving state alone on {losses})")

            self._check_budget(start, "replay", progress)
            left = sum(g is not None for g in golds[j + 1:])
            if left and futile(olds, news, golds[: j + 1], remaining_gold=left, total_gold=total_gold, rules=rules,
                               test_index=self.tests_run):
                stopped = j + 1  # no outcome of the rest can pass: the same rejection, for less work
                break
        accepted, why, stats = decide(olds, news, golds[: len(olds)], rules=rules, test_index=self.tests_run)
        self.tests_run += 1
        stats.update(held_out=len(held), canary=len(self.canary), serving_answers_reused=reused)
        if stopped is not None:
            accepted = False
            why = (f"stopped after {stopped} of {len(items)} items: even if the candidate alone were right on all "
                   f"{total_gold - sum(g is not None for g in golds[:stopped])} gold items left, it could not pass "
                   f"(so far: {why})")
            stats.update(stopped_after=stopped)
        if self.canary and stopped is None:  # the canary set's own accuracy, serving state vs candidate
            tail = len(self.canary)
            golds = [g for _, g in self.canary]
            stats["canary_accuracy"] = [sum(r.key == g for r, g in zip(rs[-tail:], golds, strict=True)) / tail
                                        for rs in (olds, news)]
        before, after = (stats["accuracy"] if stats.get("mode") == "gold" else
                         [sum(r.agreement for r in olds) / len(olds), sum(r.agreement for r in news) / len(news)])
        measure = "replayed accuracy on gold items" if stats.get("mode") == "gold" else "replayed mean agreement"
        return Verdict("replay", measure, float(before), float(after), accepted=accepted, reason=why, stats=stats)

    def _serving_side(self, old: TaskState, record: Evidence | None, canary_index: int,
                      inputs: dict[str, Any]) -> tuple[Replayed, bool]:
        """`(answer, already known)`: the serving state's side of an item. Replayed only when unknown: a
        held-out record keeps the answer it was served (`Evidence.served`: the same pipeline and seeds a
        replay would run); a canary item's answer is kept per serving state for its next judgement."""
        assert self.replay is not None
        if record is not None:
            if record.served is not None and record.version == old.version:
                return record.served, True
            return self.replay(old, inputs), False
        if self._canary_state is not old:
            self._canary_state, self._canary_answers = old, {}
        known = self._canary_answers.get(canary_index)
        if known is not None:
            return known, True
        answer = self._canary_answers[canary_index] = self.replay(old, inputs)
        return answer, False

    PROBES = 64

    def _hub_share(self, embedding: TaskEmbedding) -> float:
        """`hub_share` of the top-k exemplars over a fixed sample of the index's own inputs used as queries
        (the held-out records alone are too few to show a collapse)."""
        k = min(self.k, len(self.index))
        probes = embedding.query(self.index.sample_vectors(self.PROBES, seed=0))
        return hub_share([[h.id for h in self.index.search(q, k)] for q in probes])

    def _nll(self, embedding: TaskEmbedding, held: list[Evidence]) -> float | None:
        """Mean NLL of the held-out targets, each under its own soft prompt `P(x)`."""
        if self.engine is None or not embedding.has_head:
            return None
        from detot_agent.softprompt.training import target_nll

        pairs = [(ev, ex) for ev in held if (ex := self._example(ev)) is not None]
        if not pairs:
            return None
        prompts = embedding.soft_prompts(np.stack([ev.query for ev, _ in pairs]))  # (N, k, H)
        return target_nll(self.engine, prompts, [ex for _, ex in pairs])

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

    # ---- 4. publish ----------------------------------------------------------------------------------
    def _publish(self, old: TaskState, candidate: TaskEmbedding, verdicts: list[Verdict]) -> ReoptimizationEvent:
        """Publish the candidate under a new version if every judged side passed, or keep the old state."""
        accepted = all(v.accepted for v in verdicts)
        reasons = "; ".join(v.describe() for v in verdicts)
        # one side judged: its own before/after; two: each is in `verdicts` (they are never added up)
        scores: dict[str, Any] = ({"old_score": verdicts[0].before, "new_score": verdicts[0].after}
                                  if len(verdicts) == 1 else {})
        verdict_log = [v.log() for v in verdicts]
        if not accepted:
            return ReoptimizationEvent(accepted=False, reason="rolled back: " + reasons, version_before=old.version,
                                       version_after=old.version, verdicts=verdict_log, **scores)
        version = old.version + 1
        candidate.version = version
        self.publish(TaskState(version=version, embedding=candidate, policy=old.policy))
        return ReoptimizationEvent(accepted=True, reason="accepted: " + reasons, version_before=old.version,
                                   version_after=version, verdicts=verdict_log, **scores)
