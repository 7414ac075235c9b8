"""Task analysis: rules fire with reasons, overrides win, bad profiles are refused."""

from __future__ import annotations

import pytest

from detot_agent.detot.task import AnswerFormat, StoppingRule, TaskProfile, analyze, estimate_complexity
from detot_agent.errors import ConfigError


def test_arithmetic_profile_gets_cot_number_voting_and_reasons():
    p = TaskProfile(name="a", description="math", kind="arithmetic", answer_format="number")
    adj = analyze(p, ["Tom has 3 apples and buys 4 more. How many?"])
    assert adj.strategy == "cot" and adj.normalizer is AnswerFormat.NUMBER and adj.stopping is StoppingRule.BETA
    names = [a.rule for a in adj.applied]
    assert "reasoning-needs-cot" in names and "numbers-vote-exactly" in names
    assert all(a.reason for a in adj.applied)


def test_classification_is_direct_and_labels_drive_the_soft_prompt_text():
    p = TaskProfile(name="c", kind="classification", answer_format="label", labels=["pos", "neg"])
    adj = analyze(p, ["great film"])
    assert adj.strategy == "direct" and adj.normalizer is AnswerFormat.LABEL
    assert "pos, neg" in adj.soft_prompt_init_text and adj.max_tokens == 32


def test_desired_outcome_trades_samples():
    base = TaskProfile(name="a", kind="arithmetic", answer_format="number", complexity=0.4)
    rich = analyze(base.model_copy(update={"desired_outcome": 0.9}))
    cheap = analyze(base.model_copy(update={"desired_outcome": 0.1}))
    assert rich.max_samples > analyze(base).max_samples > cheap.max_samples


def test_complexity_estimate_orders_inputs():
    easy = estimate_complexity(["2 plus 3?"])
    hard = estimate_complexity(["A shop sold 120 pens on Monday, then half as many each day after; each pen costs "
                                "$3 and 15 were returned. If 40 more are sold, what is the total revenue left?"])
    assert 0 <= easy < hard <= 1
    adj = analyze(TaskProfile(name="x", kind="arithmetic", answer_format="number", complexity=0.9))
    assert adj.k_exemplars == 4


def test_user_overrides_win_and_are_recorded():
    p = TaskProfile(name="a", kind="arithmetic", answer_format="number")
    adj = analyze(p, k_exemplars=1, stopping="fixed")
    assert adj.k_exemplars == 1 and adj.stopping is StoppingRule.FIXED
    assert adj.applied[-1].rule == "user-overrides"


def test_bad_profiles_and_adjustments_are_refused():
    with pytest.raises(ConfigError, match="labels list"):
        TaskProfile(name="c", answer_format="label")
    with pytest.raises(ConfigError, match="desired_outcome"):
        TaskProfile(name="c", desired_outcome=2)
    with pytest.raises(ConfigError, match=r"min_samples .* exceeds max_samples"):
        analyze(TaskProfile(name="c"), min_samples=9, max_samples=4)
    with pytest.raises(ConfigError, match="unknown setting"):
        analyze(TaskProfile(name="c"), k_exemplar=3)
