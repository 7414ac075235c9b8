"""Normalisers, voting and stopping rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detot_agent.answers import extract_number, normalize, normalize_label, normalize_text
from detot_agent.detot.task import StoppingRule
from detot_agent.detot.voting import beta_confidence, should_stop, vote


@pytest.mark.parametrize(("text", "value", "stated"), [
    ("The answer is 42.", "42", True),
    ("So he pays $1,250.00 in total. The answer is $1,250.", "1250", True),
    ("Answer: -3", "-3", True),
    ("the final answer is 3/4", "0.75", True),
    ("Thus \\boxed{17}", "17", True),
    ("He walks 5 km then 7 km, 12 km in all", "12", False),
    ("It costs 2.50 dollars", "2.5", False),
    ("The answer is 7 apples. Check: 3 + 4 = 7", "7", True),
    ("The answer is 10 or 1/0", "10", True),
    ("nothing numeric here", None, False),
    ("", None, False),
    ("1/0", None, False),
])
def test_number_extraction_table(text, value, stated):
    assert extract_number(text) == (value, stated)


@given(st.integers(min_value=-10**9, max_value=10**9))
def test_integers_survive_any_formatting(n):
    assert extract_number(f"The answer is {n:,}.")[0] == str(n)
    assert extract_number(f"so we get {n} in the end")[0] == str(n)


@given(st.text())
def test_number_parser_never_raises(text):
    value, stated = extract_number(text)
    assert value is None or float(value) == float(value)
    assert isinstance(stated, bool)


@given(st.decimals(min_value=-10**6, max_value=10**6, places=2, allow_nan=False, allow_infinity=False))
def test_decimals_round_trip(d):
    value = extract_number(f"The answer is {d}")[0]
    assert value is not None and abs(float(value) - float(d)) < 1e-6


def test_label_normalisation():
    labels, syn = ["positive", "negative"], {"positive": ["pos", "good"]}
    assert normalize_label("POSITIVE.", labels) == "positive"
    assert normalize_label("I'd say good", labels, syn) == "positive"
    assert normalize_label("neutral", labels, syn) is None
    assert normalize_label("positive or negative", labels) is None  # ambiguous: no guess


def test_text_normalisation_is_squad_style():
    assert normalize_text("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_text("...") is None
    assert normalize("An apple", "text") == normalize("apple.", "text")


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
