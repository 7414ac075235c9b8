"""The continuous optimization loop (DETOT section 3.2): re-optimize, validate, accept or roll back.

The controller owns the task's serving state, a `TaskState`: the task's one `TaskEmbedding` (query side for retrieval
and soft-prompt head) under a version. A `TaskState` is never changed once published: re-optimization trains a copy
and, if it passes, publishes a new `TaskState` with one reference assignment. A reader takes `controller.state` once
per call and reads `q(x)` and `P(x)` from it in one snapshot (`TaskEmbedding.serve`).

On a trigger, `reoptimize()` splits the evidence buffer (recent answered questions) into
training and held-out parts (every `holdout_every`-th record is held out), then:

1. train: one `TaskEmbedding.update` on the training records: for each good record (correct, or agreement >=
   `good_agreement` when correctness is unknown) the demos it used are positives and the next-ranked exemplars it did
   not use are negatives (retrieval side), and its learnable target (a sample that matched the gold answer, else the
   winning sample of a high-agreement vote) is an LM example with the prompt it was served (soft-prompt side). Only
   the sides the held-out records can judge are trained; a step and wall-time budget (`max_seconds`) bounds the
   update;
2. judge the candidate on the held-out part: the soft-prompt side by the mean NLL of the held-out targets, each under
   its own `P(x)` (must fall by at least `min_gain`); the retrieval side by the *separation* (mean reciprocal rank of
   demos behind good answers minus that of demos behind poor ones; may not fall by more than `margin`). Plain MRR of
   good demos would favour the old state, whose own top results those demos are;
3. publish the candidate as one object only if every judged side passes; otherwise roll back.

The code reads in the order it runs: `_gather`, `_train`, `_judge` (one `Verdict` per side), `_publish`. Errors inside
re-optimization are logged and leave the old state serving. Beside it: the evidence buffer (`evidence.py`), the
background runner (`runner.py`), the judging rules (`judging.py`), shadow trials (`shadow.py`) and policies
(`policy_trials.py`).

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
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from detot_agent.detot.controller_config import ControllerConfig
from detot_agent.detot.evidence import EvidenceBuffer, Split
from detot_agent.detot.judging import (
    PROBES,
    ReoptimizationStopped,
    ReplayJudge,
    budget_check,
    collapsed,
    held_out_nll,
    probe_hub_share,
    separation,
)
from detot_agent.detot.monitor import Monitor, ReoptimizationEvent
from detot_agent.detot.policy_trials import propose_policy, resume_trial, try_policies
from detot_agent.detot.records import Evidence, Replayed, TaskState, Verdict
from detot_agent.detot.runner import BackgroundRunner
from detot_agent.detot.shadow import ShadowJudge
from detot_agent.detot.shadow_events import shadow_decision, start_trial, trial_name
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.engines.generation import background_work
from detot_agent.errors import ConfigError
from detot_agent.retrieval.index import ExemplarIndex

__all__ = ["Controller", "ControllerConfig", "Evidence", "TaskState"]


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
        self.judge = ReplayJudge(replay) if replay is not None else None
        self.judgements_spent = 0  # judgements charged to the error budget: the next one's index (detot/judging.py)
        self.history: deque[ReoptimizationEvent] = deque(maxlen=100)  # every decision, embedding and policy
        self.index = index
        self.monitor = monitor
        self.engine = engine
        self.config = config or ControllerConfig()
        self.k = k
        self.buffer = EvidenceBuffer(self.config.evidence_size, log=evidence_log)
        if self.config.judging == "shadow" and replay is None:
            raise ConfigError("judging='shadow' answers live requests with the candidate: it needs a replaying "
                              "controller (the one inside a DETOT)")
        self.shadow = ShadowJudge(replay, self.config.shadow) if self.config.judging == "shadow" and replay else None
        self._reopt_lock = threading.Lock()  # one re-optimization at a time
        self._trained: dict[str, Any] = {}  # the running re-optimization's update report (its event's `training`)
        self._runner: BackgroundRunner[ReoptimizationEvent] = BackgroundRunner()

    @property
    def state(self) -> TaskState:
        """The current serving state (read it once per call)."""
        return self._state

    @property
    def tests_run(self) -> int:
        """Deprecated (0.3's name): `judgements_spent`."""
        warnings.warn("Controller.tests_run is deprecated; it is judgements_spent", DeprecationWarning, stacklevel=2)
        return self.judgements_spent

    @property
    def evidence_log(self) -> Path | None:
        """The evidence buffer's JSONL log, if any."""
        return self.buffer.log

    def publish(self, state: TaskState) -> None:
        """Replace the serving state (one assignment: readers see old or new)."""
        self._state = state

    def restore(self, state: TaskState) -> None:
        """Serve a state that comes from outside the loop (a loaded program). The evidence buffer and the
        serving state's cached canary answers are dropped: they were gathered under what served before, and
        a loaded state may carry the same version number as that one."""
        self.buffer.clear()
        if self.judge is not None:
            self.judge.forget()
        if self.shadow is not None:
            self.shadow.stop()  # a trial against what served before is over
        self._state = state

    # ---- evidence (detot/evidence.py) ------------------------------------------------------------
    def add_evidence(self, ev: Evidence) -> None:
        """Append an answered question to the buffer (oldest dropped beyond `evidence_size`); under shadow judging
        a selected request is also answered by the candidate, in the background."""
        self.buffer.add(ev)
        if self.shadow is not None:
            self.shadow.shadow(ev.id, ev.inputs, ev.served)
            self._shadow_decided(self.shadow.settle())  # label-free outcomes (ShadowConfig.outcomes="agreement")

    def record_outcome(self, pred_id: str, *, correct: bool, gold_key: str | None = None) -> None:
        """Attach correctness (and a gold-matching sample, if any) to a buffered record; under shadow judging, feed
        the paired outcome to the running trial and publish the candidate when the test accepts it."""
        self.buffer.record_outcome(pred_id, correct=correct, gold_key=gold_key)
        self._shadow_decided(None if self.shadow is None else self.shadow.outcome(pred_id, gold_key))  # never waits

    def settle_shadow(self) -> None:
        """Wait for the shadow answers that gold outcomes wait on, feed them, and publish a decision reached."""
        self._shadow_decided(None if self.shadow is None else self.shadow.drain())

    def resume_shadow_trial(self) -> None:
        """Restart the policy trial a restart interrupted, with its evidence (the same trial: not logged as a start)."""
        if self.shadow is not None and (event := resume_trial(self.shadow, self.config.policies, self._state)):
            self.history.append(event)

    def _shadow_decided(self, decided: Any) -> None:
        if decided is not None:
            self._record(shadow_decision(decided, self._state, self.publish))

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
        return self.buffer.restore(path)

    def evidence(self) -> list[Evidence]:
        """A copy of the buffer."""
        return self.buffer.records()

    # ---- running re-optimization (detot/runner.py) --------------------------------------------------
    def submit(self) -> Future[ReoptimizationEvent] | None:
        """Start a background re-optimization unless one is running; returns its future."""
        return self._runner.submit(self.reoptimize)

    def wait(self, timeout: float | None = None) -> ReoptimizationEvent | None:
        """Wait for a background re-optimization, if any, and return its event."""
        return self._runner.wait(timeout)

    def close(self) -> None:
        """Finish background work and stop the worker threads."""
        self._runner.close()
        if self.shadow is not None:
            self.shadow.close()

    def reoptimize(self) -> ReoptimizationEvent:
        """Run one re-optimization synchronously: gather, train, judge, publish (or roll back); then try the
        configured policies (`ControllerConfig.policies`; under shadow judging an undecided policy's trial starts
        instead, before any training). Returns the first event; every event goes to the monitor and `history`."""
        with self._reopt_lock, background_work():  # its replays let live requests go first (`GenRow.background`)
            started = None if self.shadow is None or self.shadow.trial is not None else \
                propose_policy(self.shadow, self.config.policies, self._state)
            if started is not None:
                self._record(started)
                return started
            event = self._reoptimize_embedding()
            self._record(event)
            if self.config.policies and self.replay is not None and self.shadow is None:
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
        self._trained = {}
        try:
            split = self._gather()
            evidence = split.evidence
            if self.shadow is not None and (trial := self.shadow.trial) is not None:  # no decision: it goes on
                raise ReoptimizationStopped(f"the shadow trial of {trial_name(trial.key, trial.change)} is running; "
                                            "kept it", decided=False)
            candidate = self._train(old, split)
            budget_check(start, self.config.max_seconds, "training")()
            if self.shadow is not None:
                event = start_trial(self.shadow, old, candidate)
            else:
                verdicts = self._judge(old, candidate, split, start)
                event = self._publish(old, candidate, verdicts)
        except ReoptimizationStopped as out:
            event = ReoptimizationEvent(accepted=False, reason=out.reason, version_before=old.version,
                                        version_after=old.version, decided=out.decided)
        except Exception as exc:  # the old state keeps serving; the error is reported, not raised
            event = ReoptimizationEvent(accepted=False, reason="re-optimization raised; kept the old state",
                                        version_before=old.version, version_after=old.version,
                                        error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        event.evidence = len(evidence) if evidence else len(self._usable())
        event.seconds = time.perf_counter() - start
        event.training = self._trained
        return event

    def _try_policies(self) -> Iterator[ReoptimizationEvent]:
        """Judge each configured policy against the serving state on gold items (`detot/policy_trials.py`)."""
        return try_policies(self.config.policies, serving=lambda: self._state, held=self._usable,
                            judge=self._judge_replay, publish=self.publish)

    # ---- 1. gather -----------------------------------------------------------------------------------
    def _usable(self) -> list[Evidence]:
        """Evidence answered by the serving version (older versions' answers say nothing about it)."""
        version = self._state.version
        return [e for e in self.evidence() if e.version == version and all(d in self.index for d in e.demo_ids)]

    def _gather(self) -> Split:
        """Split the buffer into training and held-out records; decide which parts the held-out can judge."""
        cfg = self.config
        evidence = self._usable()
        if len(evidence) < cfg.min_evidence:
            raise ReoptimizationStopped(f"only {len(evidence)} evidence records from serving version "
                                        f"{self._state.version} (need {cfg.min_evidence}); kept the old state")
        held = evidence[cfg.holdout_every - 1::cfg.holdout_every]
        held_ids = {e.id for e in held}
        train = [e for e in evidence if e.id not in held_ids]
        embedding = self._state.embedding
        if embedding is None:
            raise ReoptimizationStopped("no task embedding to re-optimize; kept the old state")
        if self.replay is not None:
            # paired replay judges the whole pipeline on held-out inputs and the canary set: a side is trained
            # when the *training* records can teach it, whatever the held-out records hold
            if not self.canary and not any(e.inputs is not None for e in held):
                raise ReoptimizationStopped("no held-out record can be replayed (no inputs) and no canary set; kept "
                                            "the old state without training")
            basis, nothing = train, (f"nothing to learn from: none of the {len(train)} training records has a "
                                     "learnable target or good demos")
        else:
            # the proxy judges measure each side on the held-out records: train only the sides they can judge
            # (training the soft prompt is the expensive part: minutes on a CPU), so an unjudgeable change is
            # never paid for
            basis, nothing = held, (f"no held-out evidence to validate on (none of the {len(held)} held-out "
                                    "records has a learnable target or good demos)")
        judge_soft = embedding.has_head and self.engine is not None and bool(self._examples(basis))
        judge_retrieval = any(e.good(cfg.replay.good_agreement) and e.demo_ids for e in basis)
        if not judge_soft and not judge_retrieval:
            raise ReoptimizationStopped(f"{nothing}; kept the old state without training")
        return Split(evidence, train, held, judge_soft, judge_retrieval)

    # ---- 2. train ------------------------------------------------------------------------------------
    def _train(self, old: TaskState, split: Split) -> TaskEmbedding:
        """Train a copy of the task embedding on the judgeable sides; the serving state is never touched."""
        from detot_agent.embedding.update import TrainingItem

        cfg = self.config
        assert old.embedding is not None
        candidate = copy.deepcopy(old.embedding)
        items: list[TrainingItem] = []
        for ev in split.train:
            pos = neg = None
            if split.judge_retrieval and ev.good(cfg.replay.good_agreement) and ev.demo_ids:
                want = min(len(self.index), self.k + cfg.negatives_per_query + len(ev.demo_ids))
                ranked = [h.id for h in self.index.search(candidate.query(ev.query), want)]
                negatives = [i for i in ranked if i not in set(ev.demo_ids)][: cfg.negatives_per_query]
                if negatives:
                    pos, neg = self.index.vectors(ev.demo_ids), self.index.vectors(negatives)
            example = self._example(ev) if split.judge_soft else None
            if pos is not None or example is not None:
                items.append(TrainingItem(query=ev.query, positives=pos, negatives=neg, example=example))
        if not items:
            raise ReoptimizationStopped("nothing to learn from: no good training records with usable demos or targets; "
                           "kept the old state")
        report = candidate.update(
            items, engine=self.engine if split.judge_soft else None, config=cfg.update,
            # training gets its share of the budget; the rest is left for judging
            max_seconds=None if cfg.max_seconds is None else cfg.max_seconds * cfg.train_share)
        self._trained = report.model_dump(include={"steps", "seconds", "budget_hit", "yielded_s", "yields",
                                                   "paused_s", "pauses", "shared_s", "shared"})
        if not report.accepted:
            raise ReoptimizationStopped(f"the update learnt nothing on its training records (retrieval loss "
                                        f"{report.loss_before:.3f} -> {report.loss_after:.3f}, LM "
                                        f"{report.lm_before} -> {report.lm_after}); kept the old state")
        return candidate

    def _example(self, ev: Evidence) -> Any:
        from detot_agent.softprompt.loss import TuneExample

        target = ev.learn_target(self.config.replay.good_agreement)
        return TuneExample(messages=ev.messages, target=target) if target and ev.messages else None

    def _examples(self, records: list[Evidence]) -> list[Any]:
        return [ex for ex in map(self._example, records) if ex is not None]

    # ---- 3. judge ------------------------------------------------------------------------------------
    def _judge(self, old: TaskState, candidate: TaskEmbedding, split: Split, start: float) -> list[Verdict]:
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
            good = cfg.replay.good_agreement
            before = separation(self.index, old.embedding, split.held, good)
            after = separation(self.index, candidate, split.held, good)
            if before is not None and after is not None:
                hubs = [probe_hub_share(self.index, e, self.k) for e in (old.embedding, candidate)]
                gone = collapsed(hubs[0], hubs[1], cfg.replay.max_hub_share)
                verdicts.append(Verdict("retrieval", "held-out demo separation", before, after,
                                        accepted=after >= before - cfg.margin and not gone,
                                        reason=(f"retrieval collapsed: one demo is in the top {self.k} of "
                                                f"{hubs[1]:.0%} of {self.PROBES} probe queries, against "
                                                f"{hubs[0]:.0%}") if gone else "",
                                        stats={"demo_hub_share": hubs}))
        if not verdicts:
            raise ReoptimizationStopped("no held-out evidence to validate on; kept the old state")
        return verdicts

    def _judge_replay(self, old: TaskState, new_state: TaskState, records: list[Evidence], start: float, *,
                      gold_only: bool = False) -> Verdict:
        """Paired replay (`judging.ReplayJudge`), spending one test of the error budget."""
        assert self.judge is not None
        cfg = self.config
        check = budget_check(start, cfg.max_seconds, "replay")
        verdict = self.judge.judge(old, new_state, records, rules=cfg.replay, test_index=self.judgements_spent,
                                   max_items=cfg.replay_items, check_budget=check, canary=self.canary,
                                   gold_only=gold_only)
        self.judgements_spent += 1
        return verdict

    PROBES = PROBES

    def _nll(self, embedding: TaskEmbedding, held: list[Evidence]) -> float | None:
        """Mean NLL of the held-out targets, each under its own soft prompt `P(x)`."""
        return held_out_nll(self.engine, embedding, [(ev, ex) for ev in held if (ex := self._example(ev)) is not None])

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
