"""Judging candidates by paired replay: harmful ones are rejected, a real fix is accepted, budgets hold."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from detot_agent.detot.controller import Controller, ControllerConfig
from detot_agent.detot.judging import Replayed, ReplayRules, alpha_for, decide, sign_test_p
from detot_agent.detot.monitor import Monitor, MonitorConfig
from detot_agent.detot.records import Evidence, TaskState
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.embedding.update import UpdateReport
from detot_agent.errors import ConfigError

RULES = ReplayRules()
N = 12
GOLD = [str(i) for i in range(N)]
OLD = [Replayed(str(i) if i < 4 else f"{i}x", 0.8, (f"d{i}", f"d{i + 1}")) for i in range(N)]  # right on 4 of 12


def test_a_constant_answer_is_rejected_with_and_without_gold():
    constant = [Replayed("5", 1.0, r.demo_ids) for r in OLD]
    for gold in (GOLD, [None] * N):
        ok, why, stats = decide(OLD, constant, gold, rules=RULES, test_index=0)
        assert not ok and "answers collapsed" in why and stats["distinct_answers"] == [N, 1]


def test_a_collapsed_retrieval_is_rejected():
    collapsed = [Replayed(r.key, 0.9, ("d0", "d1")) for r in OLD]
    ok, why, _ = decide(OLD, collapsed, [None] * N, rules=RULES, test_index=0)
    assert not ok and "retrieval collapsed" in why


def test_random_noise_is_rejected():
    rng = random.Random(0)
    for trial in range(20):
        noise = [Replayed(rng.choice([*GOLD, "7x", "9x"]), rng.random(), r.demo_ids) for r in OLD]
        for gold in (GOLD, [None] * N):
            ok, why, _ = decide(OLD, noise, gold, rules=RULES, test_index=0)
            assert not ok, (trial, why)


def test_a_candidate_that_fixes_a_systematic_error_on_gold_is_accepted():
    fixed = [Replayed(str(i), 0.8, r.demo_ids) for i, r in enumerate(OLD)]  # right on all 12
    ok, why, stats = decide(OLD, fixed, GOLD, rules=RULES, test_index=0)
    assert ok, why
    assert stats["only_candidate_right"] == 8 and stats["only_serving_right"] == 0
    assert stats["p_value"] == pytest.approx(0.5 ** 8) and stats["accuracy"] == [4 / 12, 1.0]
    # the same evidence, late in the program's error budget, is no longer enough
    late = decide(OLD, fixed, GOLD, rules=RULES, test_index=6)
    assert not late[0] and "needs <=" in late[1]
    # the run report's decisions table shows the paired counts, the statistic and its level
    from detot_agent.evaluation.report import summarize_method

    event = {"event": "reoptimization", "accepted": True, "reason": why, "verdicts": [{"part": "replay",
                                                                                      "stats": stats}]}
    (row,) = summarize_method([], [event])["decisions"]
    assert row["test"] == f"8 only candidate / 0 only serving right of 12 gold items; sign test p {0.5 ** 8:.3g} " \
                          f"(alpha {stats['alpha']:.3g})"


def test_label_free_rule_accepts_a_consistent_rise_without_flips_and_refuses_flips():
    surer = [Replayed(r.key, 1.0, r.demo_ids) for r in OLD]
    ok, why, stats = decide(OLD, surer, [None] * N, rules=RULES, test_index=0)
    assert ok and stats["agreement_up"] == N, why
    flipped = [Replayed(r.key + "y" if i % 3 == 0 else r.key, 1.0, r.demo_ids) for i, r in enumerate(OLD)]
    ok, why, stats = decide(OLD, flipped, [None] * N, rules=RULES, test_index=0)
    assert not ok and stats["flips"] == 4 and "confident answers flipped" in why


def test_statistics_helpers():
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(3, 3) > 0.5
    assert sum(alpha_for(i, 0.05) for i in range(40)) < 0.05


# ---- the controller with a replay function ---------------------------------------------------------------
def _controller(encoder, index, replay, **cfg) -> Controller:
    te = TaskEmbedding.from_description("arith", "math word problems", encoder=encoder)
    config = ControllerConfig(min_evidence=6, holdout_every=2, **cfg)
    mon = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=20, min_count=5, cooldown=0)
    canary = [({"question": f"canary {i}"}, str(i)) for i in range(10)]
    return Controller(TaskState(0, te), index=index, monitor=mon, config=config, k=2, replay=replay, canary=canary)


def _fill(ctl: Controller, encoder, index, version: int = 0) -> None:
    vecs = encoder.encode([index.get(f"train:{i}").text for i in range(1, 13)])
    for i, v in enumerate(vecs):
        ctl.add_evidence(Evidence(id=f"v{version}q{i}", query=v, demo_ids=["train:300", "train:301"], agreement=1.0,
                                  correct=True, version=version, inputs={"question": f"held {i}"}))


def _candidate(kind: str, monkeypatch, seconds: float = 0.0) -> None:
    """Training yields a candidate marked `kind` (what it does is the replay function's business)."""

    def update(self, feedback, **kw):
        time.sleep(seconds)
        self.task = kind
        self.version += 1
        return UpdateReport(accepted=True, retrieval_accepted=True, version=self.version)

    monkeypatch.setattr(TaskEmbedding, "update", update)


def _replay(state: TaskState, inputs: dict) -> Replayed:
    """Serving state: right on canary items 0-2 only. `fixed`: right on all. `constant`: always 5."""
    q = inputs["question"]
    i = int(q.split()[-1])
    kind = state.embedding.task
    demos = (f"d{i}", f"e{i}")
    if kind == "constant":
        return Replayed("5", 1.0, demos)
    if kind == "fixed" or (q.startswith("canary") and i < 3):
        return Replayed(str(i), 0.8, demos)
    return Replayed(f"{i}x", 0.8, demos)


@pytest.mark.parametrize("kind, accepted", [("fixed", True), ("constant", False)])
def test_the_controller_publishes_only_a_candidate_that_replays_better(kind, accepted, encoder, gsm8k_index,
                                                                       monkeypatch):
    ctl = _controller(encoder, gsm8k_index, _replay)
    _fill(ctl, encoder, gsm8k_index)
    _candidate(kind, monkeypatch)
    old = ctl.state
    event = ctl.reoptimize()
    assert event.accepted == accepted, event.reason
    verdict = event.verdicts[0]
    assert verdict["part"] == "replay" and verdict["stats"]["canary"] == 10 and verdict["stats"]["held_out"] == 6
    assert "p_value" in verdict["stats"] or "collapsed" in verdict["reason"]
    if accepted:  # the canary set's own accuracy, serving state vs candidate: 3 of 10, then all 10
        assert verdict["stats"]["canary_accuracy"] == [0.3, 1.0] and "stopped_after" not in verdict["stats"]
    else:  # the constant candidate could no longer pass part-way: the replay stopped there, rejected
        assert verdict["stats"]["stopped_after"] < 16 and "stopped after" in event.reason
    assert (ctl.state is not old) == accepted and ctl.judgements_spent == 1


def test_evidence_from_older_versions_is_not_used(encoder, gsm8k_index, monkeypatch):
    ctl = _controller(encoder, gsm8k_index, _replay)
    _fill(ctl, encoder, gsm8k_index, version=0)
    ctl.publish(TaskState(1, ctl.state.embedding))
    _candidate("fixed", monkeypatch)
    event = ctl.reoptimize()
    assert not event.accepted and "only 0 evidence records from serving version 1" in event.reason
    _fill(ctl, encoder, gsm8k_index, version=1)
    assert ctl.reoptimize().accepted


def test_a_budget_stops_a_long_reoptimization_and_the_old_state_serves(encoder, gsm8k_index, monkeypatch):
    ctl = _controller(encoder, gsm8k_index, _replay, max_seconds=0.3)
    _fill(ctl, encoder, gsm8k_index)
    _candidate("fixed", monkeypatch, seconds=0.6)
    old = ctl.state
    event = ctl.reoptimize()
    assert not event.accepted and "budget ran out during training" in event.reason
    assert ctl.state is old


def test_bad_loop_settings_are_refused_when_built_one_line_per_field():
    with pytest.raises(ConfigError) as err:
        ControllerConfig(holdout_every=0, margin=-5, replay={"alpha": 2})
    lines = str(err.value).splitlines()
    assert any("holdout_every" in ln for ln in lines) and any("margin" in ln for ln in lines)
    assert any("alpha" in ln for ln in lines)
    with pytest.raises(ConfigError, match="window"):
        MonitorConfig(window=0)


def test_detot_replays_its_own_pipeline_deterministically(gsm8k_index):
    from scripted import scripted_lm

    from detot_agent import DETOT, TaskProfile

    lm, engine = scripted_lm(lambda text, n: "7")
    task = TaskProfile(name="arith", description="math", kind="arithmetic", answer_format="number")
    import dspy

    detot = DETOT("question -> answer", task=task, index=gsm8k_index, lm=lm, background=False,
                  canary=[dspy.Example(question="1 + 6?", answer="7")])
    pred = detot(question="Tom has 3 apples and buys 4 more. How many?")
    ev = detot.controller.evidence()[0]
    assert ev.version == 0 and ev.inputs == {"question": "Tom has 3 apples and buys 4 more. How many?"}
    calls = engine.calls
    again = detot._replay(detot.controller.state, ev.inputs)
    assert again == Replayed("7", pred.agreement, tuple(pred.demo_ids)) == ev.served  # what it served, replayed
    assert engine.calls > calls and len(detot.controller.evidence()) == 1  # replay records nothing
    assert detot.canary == [({"question": "1 + 6?"}, "7")]
    with pytest.raises(ConfigError, match="canary example #0 lacks field"):
        DETOT("question -> answer", task=task, index=gsm8k_index, lm=lm, canary=[dspy.Example(question="x")])
    assert np.isfinite(pred.agreement)


def test_a_replay_stops_once_the_candidate_cannot_pass_and_decides_as_the_full_replay(encoder, gsm8k_index,
                                                                                      monkeypatch):
    calls = []

    def counting(state, inputs):
        calls.append(state.version)
        return _replay(state, inputs)

    for kind, accepted in (("unchanged", False), ("fixed", True)):  # "unchanged" answers as the serving state
        calls.clear()
        ctl = _controller(encoder, gsm8k_index, counting)
        _fill(ctl, encoder, gsm8k_index)
        _candidate(kind, monkeypatch)
        event = ctl.reoptimize()
        assert event.accepted == accepted, event.reason
        # 6 held-out records (no gold) + 10 canary items (gold), two states each: 32 replays in full
        assert (len(calls) < 32) == (not accepted), (kind, len(calls))
    # the early stop never changes a decision: with every item replayed the unchanged candidate is rejected too
    te = TaskEmbedding.from_description("arith", "math word problems", encoder=encoder)
    unchanged = TaskEmbedding.from_description("unchanged", "math word problems", encoder=encoder)
    items = [{"question": f"held {i}"} for i in range(6)] + [{"question": f"canary {i}"} for i in range(10)]
    gold = [None] * 6 + [str(i) for i in range(10)]
    ok, _, _ = decide([_replay(TaskState(0, te), x) for x in items], [_replay(TaskState(1, unchanged), x)
                                                                         for x in items], gold,
                      rules=ReplayRules(), test_index=0)
    assert not ok


def test_under_replay_held_out_records_need_no_targets_of_their_own(encoder, gsm8k_index, monkeypatch):
    """Paired replay judges the whole pipeline on held-out inputs and the canary: a loop on a hard task, whose
    held-out answers were all wrong, still trains on its good training records and is judged."""
    ctl = _controller(encoder, gsm8k_index, _replay)
    vecs = encoder.encode([gsm8k_index.get(f"train:{i}").text for i in range(1, 13)])
    for i, v in enumerate(vecs):
        good = i % 2 == 0  # holdout_every=2: the held-out records are the odd ones, all wrong, low agreement
        ctl.add_evidence(Evidence(id=f"q{i}", query=v, demo_ids=["train:300", "train:301"],
                                  agreement=1.0 if good else 0.2, correct=good, version=0,
                                  inputs={"question": f"held {i}"}))
    _candidate("fixed", monkeypatch)
    event = ctl.reoptimize()
    assert event.accepted, event.reason
    assert event.verdicts[0]["part"] == "replay" and event.verdicts[0]["stats"]["held_out"] == 6


# ---- policies: the loop may change how the task reasons or votes, judged on gold only -----------------------
def _policy_replay(pot: str):
    """Serving (CoT) state: right on canary items 0-2 only. Under a `strategy=pot` policy: `pot` says how
    ("right": right on every item; "wrong": wrong on every item; "constant": always 5)."""

    def replay(state: TaskState, inputs: dict) -> Replayed:
        q = inputs["question"]
        i = int(q.split()[-1])
        demos = (f"d{i}", f"e{i}")
        if state.policy is not None and state.policy.strategy == "pot":
            key = {"right": str(i), "wrong": f"{i}x", "constant": "5"}[pot]
            return Replayed(key, 0.8, demos)
        return Replayed(str(i) if q.startswith("canary") and i < 3 else f"{i}x", 0.8, demos)

    return replay


@pytest.mark.parametrize("pot, accepted", [("right", True), ("wrong", False), ("constant", False)])
def test_a_policy_is_adopted_only_when_it_replays_better_on_gold(pot, accepted, encoder, gsm8k_index, monkeypatch):
    from detot_agent.detot.task import Policy

    ctl = _controller(encoder, gsm8k_index, _policy_replay(pot), policies=[Policy(strategy="pot")])
    _fill(ctl, encoder, gsm8k_index)
    _candidate("unchanged", monkeypatch)  # the embedding step finds nothing better
    old = ctl.state
    event = ctl.reoptimize()
    assert not event.accepted and event.change == "embedding"
    trial = ctl.history[-1]
    assert trial.change == "policy strategy=pot" and trial.accepted == accepted, trial.reason
    assert trial.verdicts[0]["part"] == "policy" and trial.verdicts[0]["stats"]["mode"] == "gold"
    assert trial.verdicts[0]["stats"]["held_out"] == 0  # the held-out records have no gold: canary only
    assert ctl.judgements_spent == 2  # the policy trial spent the error budget too
    if accepted:
        assert ctl.state.policy == Policy(strategy="pot") and ctl.state.version == old.version + 1
        assert trial.verdicts[0]["stats"]["canary_accuracy"] == [0.3, 1.0]
        # the same embedding, carrying the new version (saved on its own, it says which state it served)
        new = ctl.state.embedding
        assert new is not old.embedding and new.version == ctl.state.version and old.embedding.version == old.version
        assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.embedding.state_dict().values(),
                                                      strict=True) if isinstance(a, torch.Tensor))
    else:
        assert ctl.state is old


def test_a_policy_is_not_judged_without_gold_and_the_serving_policy_is_not_retried(encoder, gsm8k_index,
                                                                                     monkeypatch):
    from detot_agent.detot.task import Policy

    ctl = _controller(encoder, gsm8k_index, _policy_replay("right"), policies=[Policy(strategy="pot")])
    ctl.canary = []
    _fill(ctl, encoder, gsm8k_index)
    _candidate("unchanged", monkeypatch)
    ctl.reoptimize()
    trial = ctl.history[-1]
    assert not trial.accepted and "no gold items to judge a policy on" in trial.reason
    ctl.publish(TaskState(ctl.state.version, ctl.state.embedding, Policy(strategy="pot")))
    before = len(ctl.history)
    ctl.reoptimize()
    assert len(ctl.history) == before + 1  # the embedding step only: pot already serves


def test_bad_policies_are_refused_when_built():
    from detot_agent.detot.task import Policy

    with pytest.raises(ConfigError, match="a policy sets strategy, weighting"):
        Policy()
    with pytest.raises(ConfigError, match="strategy"):
        Policy(strategy="direct")  # the predictor's shape, not a policy
    with pytest.raises(ConfigError, match="policies"):
        ControllerConfig(policies=[{"weighting": "loudest"}])


def test_the_serving_side_is_not_replayed_again_when_it_is_already_known(encoder, gsm8k_index, monkeypatch):
    """A held-out record's own served answer, and the canary answers of the same serving state from an earlier
    judgement, stand for the serving side; a published change starts the canary answers afresh."""
    calls: list[tuple[int, str]] = []

    def counting(state, inputs):
        calls.append((state.version, inputs["question"]))
        return _replay(state, inputs)

    ctl = _controller(encoder, gsm8k_index, counting)
    _fill(ctl, encoder, gsm8k_index)
    for ev in ctl.evidence():  # what the serving state answered when it served them (as DETOT records it)
        ev.served = _replay(ctl.state, ev.inputs)
    _candidate("unchanged", monkeypatch)
    first = ctl.reoptimize()
    served_side = [q for v, q in calls if v == 0]
    assert not first.accepted and served_side and all(q.startswith("canary") for q in served_side)  # held-out: not
    assert first.verdicts[0]["stats"]["serving_answers_reused"] == 6  # replayed; it stopped part-way (futile)
    calls.clear()
    _candidate("fixed", monkeypatch)
    second = ctl.reoptimize()  # the same serving state: the canary answers it gave before are known
    assert second.accepted, second.reason
    again = [q for v, q in calls if v == 0]
    assert again and not set(again) & set(served_side)  # only the canary items the first judgement never reached
    assert second.verdicts[0]["stats"]["serving_answers_reused"] == 6 + len(served_side)
    # the decision is the one a full replay gives (tested above: "fixed" is accepted with every item replayed)
    assert second.verdicts[0]["stats"]["canary_accuracy"] == [0.3, 1.0]
    calls.clear()
    _fill(ctl, encoder, gsm8k_index, version=ctl.state.version)
    ctl.reoptimize()
    assert any(v == ctl.state.version and q.startswith("canary") for v, q in calls)  # a new state: replayed


def test_a_budget_that_runs_out_during_replay_says_how_far_the_judgement_got(encoder, gsm8k_index, monkeypatch):
    def slow(state, inputs):
        time.sleep(0.05)
        return _replay(state, inputs)

    ctl = _controller(encoder, gsm8k_index, slow, max_seconds=0.5, train_share=0.1)
    _fill(ctl, encoder, gsm8k_index)
    _candidate("fixed", monkeypatch)
    old = ctl.state
    event = ctl.reoptimize()
    assert not event.accepted and ctl.state is old
    assert "budget ran out during replay, after" in event.reason, event.reason
    assert "of 16 items (so far the candidate alone was right on" in event.reason
