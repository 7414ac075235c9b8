"""Voting and stopping rules."""

from __future__ import annotations

import pytest

from detot_agent.detot.task import StoppingRule
from detot_agent.detot.voting import beta_confidence, should_stop, vote, vote_weights


def test_vote_counts_weights_and_ties():
    r = vote(["7", None, "8", "7"])
    assert (r.winner, r.counts, r.parsed, r.unparsed) == ("7", {"7": 2.0, "8": 1.0}, 3, 1)
    assert r.agreement == pytest.approx(2 / 3)
    assert vote(["8", "7"]).winner == "8"  # tie: first seen wins
    assert vote(["8", "7"], weights=[0.2, 0.9]).winner == "7"
    assert vote([None, None]).winner is None and vote([None]).unparsed == 1
    with pytest.raises(ValueError, match="weights"):
        vote(["1"], weights=[1.0, 2.0])


def test_beta_confidence_matches_the_beta_integral():
    from scipy.stats import beta

    for a, b in [(2, 0), (3, 1), (5, 2), (10, 9)]:
        assert beta_confidence(a, b) == pytest.approx(1 - beta.cdf(0.5, a + 1, b + 1))


SEQUENCES = {
    "unanimous": ["7"] * 8,
    "split": ["7", "8"] * 4,
    "late-majority": ["7", "8", "7", "7", "7", "7", "7", "7"],
}


def _first_stop(seq, rule, threshold, *, min_samples=2, max_samples=8, round_size=2):
    drawn = 0
    while True:
        drawn = min_samples if drawn == 0 else min(drawn + round_size, max_samples)
        if should_stop(vote(seq[:drawn]), drawn, rule=rule, threshold=threshold, min_samples=min_samples,
                       max_samples=max_samples):
            return drawn


@pytest.mark.parametrize(("name", "rule", "threshold", "expected"), [
    ("unanimous", StoppingRule.FIXED, 0.95, 8),
    ("unanimous", StoppingRule.BETA, 0.95, 4),      # 4-0: P = 0.969
    ("unanimous", StoppingRule.MAJORITY, 0.9, 2),
    ("unanimous", StoppingRule.ENTROPY, 0.9, 2),
    ("split", StoppingRule.BETA, 0.95, 8),
    ("split", StoppingRule.MAJORITY, 0.6, 8),
    ("split", StoppingRule.ENTROPY, 0.5, 8),
    ("late-majority", StoppingRule.BETA, 0.95, 8),  # 7-1 only at 8: 6-1 gives 0.965 at 7 (not a round)
    ("late-majority", StoppingRule.BETA, 0.9, 6),   # 5-1: P = 0.9375
    ("late-majority", StoppingRule.MAJORITY, 0.75, 4),
])
def test_stopping_rules_on_known_sequences(name, rule, threshold, expected):
    assert _first_stop(SEQUENCES[name], rule, threshold) == expected


def test_no_parse_never_stops_early():
    assert not should_stop(vote([None, None]), 2, rule="majority", threshold=0.5, min_samples=2, max_samples=8)
    assert should_stop(vote([None] * 8), 8, rule="beta", threshold=0.95, min_samples=2, max_samples=8)


# ---- confidence-aware voting (CISC weights, DeepConf filter and consensus stop) -------------------------------
def _samples(spec):
    """`(key, mean token log-prob)` pairs -> ParsedSamples of 10 tokens each."""
    from detot_agent.detot.records import ParsedSample

    return [ParsedSample("x", key=k, tokens=10, logprob=None if lp is None else 10 * lp) for k, lp in spec]


def _run(spec, **adj):
    from detot_agent.detot.sampling import vote_in_rounds
    from detot_agent.detot.task import TaskProfile, analyze

    samples = _samples(spec)
    settings = {"stopping": "fixed", "min_samples": len(samples), "max_samples": len(samples)} | adj
    return vote_in_rounds(lambda n, drawn: samples[drawn:drawn + n], analyze(TaskProfile(name="t"), **settings))


def test_cisc_lets_a_confident_minority_beat_an_unconfident_majority():
    spec = [("7", -1.2), ("7", -1.0), ("8", -0.05)]
    _, uniform, _ = _run(spec)
    _, cisc, _ = _run(spec, weighting="cisc", cisc_temperature=0.1)
    assert uniform.winner == "7" and cisc.winner == "8" and cisc.agreement > 0.99
    # at a high temperature CISC tends to the plain count again
    _, warm, _ = _run(spec, weighting="cisc", cisc_temperature=10.0)
    assert warm.winner == "7"


def test_the_filter_keeps_only_the_most_confident_samples():
    spec = [("7", -0.9), ("7", -0.8), ("8", -0.1), ("8", -0.2), ("9", -0.3)]
    _, kept, _ = _run(spec, weighting="filter", keep_fraction=0.4)  # the two most confident: both "8"
    assert kept.winner == "8" and kept.counts == {"7": 0.0, "8": 2.0, "9": 0.0}
    assert vote_weights([-0.5], weighting="filter", keep_fraction=0.01) == [1.0]  # at least one votes


def test_unknown_confidence_votes_uniformly_and_unparsed_samples_never_vote():
    _, result, _ = _run([("7", None), ("8", -0.01), ("8", -0.02)], weighting="cisc")
    assert result.counts == {"7": 1.0, "8": 2.0}
    _, result, _ = _run([(None, -0.01), ("7", -2.0), ("8", -0.1)], weighting="cisc", cisc_temperature=0.1)
    assert result.winner == "8" and result.unparsed == 1


def test_the_confidence_rule_stops_on_a_confident_prefix_and_not_on_a_split_one():
    confident = [("7", -0.01), ("7", -0.02)] + [("8", -2.0)] * 6
    _, result, drawn = _run(confident, stopping="confidence", stop_threshold=0.9, weighting="cisc",
                            min_samples=2, max_samples=8, round_size=2)
    assert drawn == 2 and result.winner == "7"
    split = [("7", -0.5), ("8", -0.5)] + [("7", -0.5)] * 6
    _, result, drawn = _run(split, stopping="confidence", stop_threshold=0.9, weighting="cisc",
                            min_samples=2, max_samples=8, round_size=2)
    assert drawn == 8  # never 90% of the weight on one answer, so the whole budget is drawn


def test_confidence_settings_are_checked_when_built():
    from detot_agent.detot.task import TaskProfile, analyze
    from detot_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="cisc_temperature"):
        analyze(TaskProfile(name="t"), cisc_temperature=0)
    with pytest.raises(ConfigError, match="keep_fraction"):
        analyze(TaskProfile(name="t"), keep_fraction=1.5)
    with pytest.raises(ConfigError, match="weighting"):
        analyze(TaskProfile(name="t"), weighting="loud")
