"""The always-valid paired test (`detot/sequential.py`): its error under peeking, its power, futility, the
service's error budget, and its state across a restart."""

from __future__ import annotations

import random

import pytest

from detot_agent.detot.judging import sign_test_p
from detot_agent.detot.sequential import ErrorBudget, PairedBettingTest, SequentialRules
from detot_agent.errors import ArtefactError, InvalidRequestError


def _outcome(rng: random.Random, win: float, loss: float) -> int:
    u = rng.random()
    return 1 if u < win else -1 if u < win + loss else 0


def _run(seed: int, win: float, loss: float, *, level: float, n: int, rules: SequentialRules | None = None):
    """(decision, outcomes) of one candidate, the test read after every outcome."""
    rng = random.Random(seed)
    test = PairedBettingTest(rules or SequentialRules(max_outcomes=n))
    while True:
        test.observe(_outcome(rng, win, loss))
        decision = test.decision(level=level)
        if decision != "continue":
            return decision, test.outcomes


def test_peeking_after_every_outcome_keeps_the_false_accept_rate_under_alpha():
    # a candidate exactly as good as the serving state (30% of pairs differ, half each way), 300 services
    accepts = sum(_run(seed, 0.15, 0.15, level=0.05, n=400)[0] == "accept" for seed in range(300))
    assert accepts / 300 < 0.05
    worse = sum(_run(seed, 0.10, 0.20, level=0.05, n=400)[0] == "accept" for seed in range(300))
    assert worse == 0


def test_the_simulation_catches_a_test_that_peeking_breaks():
    # the violation: a fixed-sample sign test read after every outcome accepts a useless candidate far too often
    def peeking_sign_test(seed: int) -> bool:
        rng = random.Random(seed)
        wins = losses = 0
        for _ in range(400):
            x = _outcome(rng, 0.15, 0.15)
            wins += x == 1
            losses += x == -1
            if wins + losses >= 5 and sign_test_p(wins, losses) <= 0.05:
                return True
        return False

    assert sum(peeking_sign_test(seed) for seed in range(300)) / 300 > 0.05


def test_a_moderately_better_candidate_is_accepted_within_a_bounded_number_of_outcomes():
    runs = [_run(seed, 0.20, 0.10, level=0.05, n=1000) for seed in range(100)]  # +10 points
    accepted = sorted(n for d, n in runs if d == "accept")
    assert len(accepted) >= 90 and accepted[len(accepted) // 2] <= 400


def test_an_equal_candidate_is_rejected_for_futility_and_a_cap_ends_an_undecided_one():
    rules = SequentialRules(min_effect=0.1, max_outcomes=2000)
    runs = [_run(seed, 0.15, 0.15, level=0.05, n=2000, rules=rules) for seed in range(50)]
    assert sum(d == "reject" for d, _ in runs) >= 45  # the rest: false accepts, within the alpha of the test above
    assert max(n for _, n in runs) < 2000  # futility, not the cap, ended them
    assert _run(0, 0.15, 0.15, level=0.05, n=20, rules=SequentialRules(max_outcomes=20)) == ("reject", 20)


def test_the_evidence_survives_a_restart_exactly_and_a_bad_file_is_refused():
    test = PairedBettingTest()
    for x in [1, 1, 0, -1, 1, 0, 1]:
        test.observe(x)
    again = PairedBettingTest.from_json(test.to_json())
    assert again.stats() == test.stats()
    again.observe(1)
    test.observe(1)
    assert again.accept_wealth == test.accept_wealth
    with pytest.raises(ArtefactError, match="bets"):
        PairedBettingTest.from_json({**test.to_json(), "log_accept": [0.0]})
    with pytest.raises(InvalidRequestError):
        test.observe(2)


def test_the_budget_is_one_for_the_service_a_repeat_keeps_its_level_and_acceptances_earn_budget_back():
    budget = ErrorBudget(alpha=0.05)
    first = budget.level("a")
    second = budget.level("b")
    assert budget.level("a") == first and first > second
    budget.record_accept("b")
    third = budget.level("c")
    assert third == pytest.approx(0.05 * 6 / (3.14159265**2 * 9) * 2, rel=1e-6)  # one acceptance before it
    levels = [ErrorBudget(0.05).level(str(i)) for i in range(1)]  # the series of levels sums to at most alpha
    fresh = ErrorBudget(0.05)
    assert sum(fresh.level(str(i)) for i in range(10_000)) <= 0.05 and levels[0] < 0.05
    restored = ErrorBudget.from_json(budget.to_json())
    assert restored.level("a") == first and restored.accepted == ["b"]
    with pytest.raises(ArtefactError):
        ErrorBudget.from_json({"alpha": 0.05, "order": ["x"], "levels": {}, "accepted": []})
