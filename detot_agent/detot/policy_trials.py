"""The loop's policy trials: each `Policy` listed in `ControllerConfig.policies` (a reasoning strategy, vote
weighting, demo count, temperature or the soft prompt's switch) judged against the serving state: by paired replay
on gold items (`try_policies`, `judging="replay"`), or as a shadow trial on live requests (`propose_policy`,
`judging="shadow"`: a policy needs no training, so its trial can start at the loop's first trigger).

Example:
    >>> events = list(try_policies(cfg.policies, serving=lambda: controller.state, held=controller._usable,
    ...                            judge=controller._judge_replay, publish=controller.publish))  # doctest: +SKIP
    >>> event = propose_policy(controller.shadow, cfg.policies, controller.state)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable, Iterator, Sequence

from detot_agent.detot.judging import ReoptimizationStopped
from detot_agent.detot.monitor import ReoptimizationEvent
from detot_agent.detot.records import Evidence, TaskState, Verdict
from detot_agent.detot.shadow import ShadowJudge
from detot_agent.detot.shadow_events import propose_state
from detot_agent.detot.task import Policy

__all__ = ["policy_key", "propose_policy", "resume_trial", "try_policies"]


def policy_key(policy: Policy, serving: TaskState) -> str:
    """A policy candidate's name in the shadow judge: the policy served, over the serving version it is compared
    with (a policy rejected against one state may be tried again against a later one)."""
    return f"policy {policy.describe()} over version {serving.version}"


def propose_policy(judge: ShadowJudge, policies: Sequence[Policy], old: TaskState,
                   only: str | None = None) -> ReoptimizationEvent | None:
    """Start the shadow trial of the first listed policy that changes what `old` serves and whose evidence does not
    decide yet (with `only`, of the one named so: a trial that a restart interrupted); returns its event, or None
    when no policy is left to try (then the loop trains an embedding)."""
    for policy in policies:
        new_policy = policy.merged(old.policy)
        if new_policy == old.policy:
            continue  # already serving
        key = policy_key(new_policy, old)
        if judge.decided(key) or only not in (None, key):
            continue  # accepted or rejected before: its evidence is kept, not re-spent
        embedding = copy.deepcopy(old.embedding)  # a copy: publishing sets its version, the old state is not touched
        return propose_state(judge, old, TaskState(old.version + 1, embedding, new_policy), key,
                             f"policy {policy.describe()}")
    return None


def resume_trial(judge: ShadowJudge, policies: Sequence[Policy], serving: TaskState) -> ReoptimizationEvent | None:
    """Restart the policy trial that ran when the judge's restored state was saved (`ShadowJudge.interrupted`); its
    evidence goes on. An embedding's candidate is not saved (its key names no policy): it is trained again at the
    next trigger. Returns the start event, or None."""
    was, judge.interrupted = judge.interrupted, None
    if was is None or judge.trial is not None:
        return None
    return propose_policy(judge, policies, serving, only=was["key"])


def try_policies(policies: Sequence[Policy], *, serving: Callable[[], TaskState], held: Callable[[], list[Evidence]],
                 judge: Callable[..., Verdict], publish: Callable[[TaskState], None]) -> Iterator[ReoptimizationEvent]:
    """Judge each policy against the serving state (`serving()`) on gold items of `held()` (paired replay by `judge`,
    each spending the error budget); yield one event per trial; the first that passes is `publish`ed."""
    for policy in policies:
        old = serving()
        new_policy = policy.merged(old.policy)
        if new_policy == old.policy:
            continue  # already serving
        start = time.perf_counter()
        change = f"policy {policy.describe()}"
        try:
            items = [e for e in held() if e.inputs is not None]
            verdict = judge(old, TaskState(old.version + 1, old.embedding, new_policy), items, start, gold_only=True)
            if verdict.accepted:  # the same embedding under the new version (a copy: the old state is not touched)
                embedding = copy.deepcopy(old.embedding)
                if embedding is not None:
                    embedding.version = old.version + 1
                publish(TaskState(old.version + 1, embedding, new_policy))
            event = ReoptimizationEvent(
                accepted=verdict.accepted, change=change,
                reason=("accepted: " if verdict.accepted else "rolled back: ") + verdict.describe(),
                version_before=old.version, version_after=serving().version, old_score=verdict.before,
                new_score=verdict.after, verdicts=[verdict.log("policy")])
        except ReoptimizationStopped as out:
            event = ReoptimizationEvent(accepted=False, change=change, reason=out.reason,
                                        version_before=old.version, version_after=old.version)
        except Exception as exc:  # the old state keeps serving
            event = ReoptimizationEvent(accepted=False, change=change, reason="policy trial raised; kept the "
                                        "old state", version_before=old.version, version_after=old.version,
                                        error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        event.seconds = time.perf_counter() - start
        yield event
