"""The event log's side of shadow trials: a trial's start (`propose_state`, `start_trial`), its decision
(`shadow_decision`, which publishes an accepted candidate) and how events name a candidate (`trial_name`).

Example:
    >>> trial_name("0123456789abcdef", "embedding"), trial_name("k", "policy soft_prompt=off")
    ('candidate 0123456789ab', 'policy soft_prompt=off')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from detot_agent.detot.monitor import ReoptimizationEvent
from detot_agent.detot.records import TaskState
from detot_agent.detot.shadow import ShadowJudge, embedding_key
from detot_agent.embedding.task_embedding import TaskEmbedding

__all__ = ["propose_state", "shadow_decision", "start_trial", "trial_name"]


def trial_name(key: str, change: str) -> str:
    """How events name a trial's candidate: an embedding by its hash's start, a policy by what it changes."""
    return f"candidate {key[:12]}" if change == "embedding" else change


def start_trial(judge: ShadowJudge, old: TaskState, candidate: TaskEmbedding) -> ReoptimizationEvent:
    """Propose a trained candidate for shadow judging; the event says that a trial started (nothing is published)."""
    return propose_state(judge, old, TaskState(old.version + 1, candidate, old.policy), embedding_key(candidate),
                         "embedding")


def propose_state(judge: ShadowJudge, old: TaskState, state: TaskState, key: str, change: str) -> ReoptimizationEvent:
    """Start the shadow trial of candidate `state` (named `key`, changing `change`) against `old`; the event says
    that a trial started (nothing is published)."""
    known = key in judge.tests
    judge.propose(state, key, change)
    test = judge.tests[key]
    name = trial_name(key, change)
    return ReoptimizationEvent(
        accepted=False, decided=False, change=f"{change} (shadow trial)", version_before=old.version,
        version_after=old.version,
        reason=(f"shadow trial started: {name} answers {judge.config.share:.0%} of live requests "
                f"{'in the background' if judge.config.background else 'beside them, as their equal'} (at most "
                f"{judge.config.max_pending} pending); decided by the sequential test at level "
                f"{judge.budget.level(key):.4g}"
                + (f", continuing its {test.outcomes} earlier paired outcomes" if known else "")),
        verdicts=[{"part": "shadow", "candidate": key, "change": change, **test.stats()}])


def shadow_decision(decided: tuple[str, dict[str, Any], TaskState], serving: TaskState,
                    publish: Callable[[TaskState], None]) -> ReoptimizationEvent:
    """The event of a decided trial, publishing the candidate when it was accepted and still succeeds what serves
    (a state published in between, by a policy trial or a load, makes it stale: then it is not published)."""
    decision, stats, state = decided
    accepted = decision == "accept" and state.version == serving.version + 1
    if accepted:
        if state.embedding is not None:
            state.embedding.version = state.version
        publish(state)
    why = (f"accepted by the sequential test: e-value {stats['accept_wealth']:.3g} >= 1/{stats['level']:.4g} after "
           f"{stats['outcomes']} paired outcomes ({stats['wins']} wins, {stats['losses']} losses)" if accepted else
           f"vetoed: {stats['veto']}" if "veto" in stats else
           "stale: another state was published during the trial" if decision == "accept" else
           f"rejected for futility or at the cap after {stats['outcomes']} paired outcomes ({stats['wins']} wins, "
           f"{stats['losses']} losses; futility e-value {stats['futility_wealth']:.3g})")
    return ReoptimizationEvent(accepted=accepted, change=f"{stats.get('change', 'embedding')} (shadow trial)",
                               reason=why, version_before=serving.version,
                               version_after=state.version if accepted else serving.version,
                               verdicts=[{"part": "shadow", **stats}])
