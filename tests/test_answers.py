"""Answer text: number extraction, number formatting, label and text normalisation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detot_agent.answers import extract_number, format_number, normalize, normalize_label, normalize_text


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


@pytest.mark.parametrize(("raw", "text"), [(39.0, "39"), ("1,000", "1000"), (0.5, "0.5"), ("2.50", "2.5"),
                                           (-3.0, "-3"), ("abc", "abc")])
def test_format_number(raw, text):
    assert format_number(raw) == text
