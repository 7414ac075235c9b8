"""LenientChatAdapter: tolerant only where a field is clearly present."""

from __future__ import annotations

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from detot_agent.adapters import LenientChatAdapter

COT = dspy.ChainOfThought("question -> answer").predict.signature
NUM = dspy.Predict("question -> answer: int").signature


def test_strict_output_parses_as_chat_adapter_does():
    text = "[[ ## reasoning ## ]]\nr\n\n[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]"
    assert LenientChatAdapter().parse(COT, text) == dspy.ChatAdapter().parse(COT, text)


def test_mislabelled_section_fills_the_missing_field_and_repeats_are_ignored():
    text = "[[ ## question ## ]]\n3 + 4 = 7.\n\n[[ ## answer ## ]]\n7\n\n[[ ## answer ## ]]\n8"
    assert LenientChatAdapter().parse(COT, text) == {"reasoning": "3 + 4 = 7.", "answer": "7"}


def test_unlabelled_leading_text_counts_as_reasoning():
    text = "First add: 3 + 4 = 7.\n[[ ## answer ## ]]\n7"
    assert LenientChatAdapter().parse(COT, text) == {"reasoning": "First add: 3 + 4 = 7.", "answer": "7"}


def test_missing_answer_still_fails():
    with pytest.raises(AdapterParseError):
        LenientChatAdapter().parse(COT, "[[ ## reasoning ## ]]\nI am not sure.")


def test_typed_fields_are_parsed_and_bad_values_fail():
    assert LenientChatAdapter().parse(NUM, "[[ ## question ## ]]\nx\n[[ ## answer ## ]]\n12") == {"answer": 12}
    with pytest.raises(AdapterParseError):
        LenientChatAdapter().parse(NUM, "[[ ## answer ## ]]\ntwelve")
