"""Label-free shadow outcomes (`ShadowConfig(outcomes="agreement")`): where the candidate's answer differs from
the served one, the better-agreed vote wins. A candidate better by that proxy is accepted within a bounded number
of requests; an equal one never is (across seeds); a collapsed one is vetoed although it always agrees most; gold
feedback does not feed this test."""

from __future__ import annotations

import random

from detot_agent.detot.records import Replayed, TaskState
from detot_agent.detot.shadow import ShadowConfig, ShadowJudge, agreement_outcome


def _run(candidate, served, *, n=400, seed=0, **cfg):
    """Serve `n` requests; `served(i, rng)` and `candidate(i, rng)` give each request's two answers. Returns the
    decision, its stats and the request count at which it came (None: still collecting)."""
    rng = random.Random(seed)
    answers = {}

    def replay(state, inputs):
        return answers[inputs["i"]]

    judge = ShadowJudge(replay, ShadowConfig(share=1.0, outcomes="agreement", **cfg))
    judge.propose(TaskState(1, None), "cand")
    try:
        for i in range(n):
            answers[i] = candidate(i, rng)
            judge.shadow(f"q{i}", {"i": i}, served(i, rng)).result()  # one worker: answers in order
            decided = judge.settle()
            if decided is not None:
                return decided[0], decided[1], i + 1
        return None, None, n
    finally:
        judge.close()


def _varied(i, rng):
    return Replayed(str(rng.randrange(20)), rng.uniform(0.3, 0.7))


def test_a_candidate_whose_votes_agree_more_is_accepted_within_a_bounded_number_of_requests():
    def better(i, rng):  # on 60% of requests its differing answer is far better agreed, else the same answer
        return Replayed(str(100 + rng.randrange(20)), 0.9) if rng.random() < 0.6 else Replayed(None, 0.0) \
            if rng.random() < 0.05 else Replayed("same", 0.5)

    decision, stats, at = _run(better, lambda i, rng: Replayed("same", 0.5) if i % 3 else _varied(i, rng))
    assert decision == "accept" and at < 200 and stats["outcomes_from"] == "agreement", (decision, at, stats)


def test_an_equal_candidate_is_accepted_no_more_often_than_the_level_allows():
    # each stream peeks after every outcome; the false-accept rate across streams stays under the trial's level
    runs = [_run(_varied, _varied, n=300, seed=seed) for seed in range(200)]
    accepts = sum(decision == "accept" for decision, _, _ in runs)
    level = next(stats["level"] for decision, stats, _ in runs if stats is not None)
    assert accepts / len(runs) <= level, (accepts, level)


def test_a_collapsed_candidate_is_vetoed_though_it_always_agrees_most():
    decision, stats, at = _run(lambda i, rng: Replayed("0", 1.0), _varied)
    assert decision == "reject" and "collapsed" in stats["veto"], stats
    assert at == ShadowConfig().veto_after  # vetoed as soon as the veto may look


def test_gold_feedback_does_not_feed_a_label_free_trial():
    judge = ShadowJudge(lambda state, inputs: Replayed("7", 0.9), ShadowConfig(share=1.0, outcomes="agreement"))
    judge.propose(TaskState(1, None), "cand")
    judge.shadow("q1", {"q": 1}, Replayed("8", 0.5)).result()
    assert judge.outcome("q1", "7") is None and judge.trial.test.outcomes == 0
    assert judge.settle() is None and judge.trial.test.wins == 1  # counted once, by agreement
    assert judge.settle() is None and judge.trial.test.outcomes == 1  # not twice
    judge.close()


def test_the_outcome_rule():
    assert agreement_outcome(Replayed("1", 0.55), Replayed("2", 0.5), 0.1) == 0  # within the margin: a tie
    assert agreement_outcome(Replayed("1", 0.3), Replayed("2", 0.8), 0.1) == -1
    assert agreement_outcome(Replayed("1", 0.3), Replayed(None, 0.0), 0.1) == 1
