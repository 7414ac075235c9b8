"""LenientChatAdapter: tolerant only where a field is clearly present. PlainAdapter: plain-text prompts."""

from __future__ import annotations

from typing import Literal

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from detot_agent.detot.adapters import LenientChatAdapter, PlainAdapter
from detot_agent.errors import ConfigError

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


def test_plain_adapter_lays_out_demos_as_turns_without_field_markers():
    demos = [{"question": "Q1", "reasoning": "2 + 2 = 4. The answer is 4.", "answer": "4"},  # GSM8K-style
             {"question": "Q2", "reasoning": "3 * 3 = 9.", "answer": "9"},
             {"question": "Q3", "answer": "5"},  # no rationale: the statement alone
             {"question": "Q5", "reasoning": "unfinished"}]  # no answer: left out
    messages = PlainAdapter().format(COT, demos, {"question": "Q4"})
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]  # no system turn for DSPy's default
    contents = [m["content"] for m in messages]
    assert not any("[[ ##" in c for c in contents)
    cue = "Let's think step by step."
    assert contents[0] == f"Q1\n{cue}" and contents[-1] == f"Q4\n{cue}"
    # the rationale's own statement is not repeated; a missing one is added; a bare answer becomes a statement
    assert contents[1:6:2] == ["2 + 2 = 4. The answer is 4.", "3 * 3 = 9.\nThe answer is 9.", "The answer is 5."]


def test_plain_adapter_keeps_custom_instructions_and_cue():
    sig = dspy.Signature("question -> answer", "Answer in dollars.")
    messages = PlainAdapter(cue="Be brief.").format(sig, [], {"question": "Q"})
    assert messages == [{"role": "system", "content": "Answer in dollars."},
                        {"role": "user", "content": "Q\nBe brief."}]
    two = dspy.Signature("context, question -> answer")
    user = PlainAdapter().format(two, [], {"context": "C", "question": "Q"})[-1]["content"]
    assert user.splitlines() == ["Context: C", "Question: Q", "Reply with: The answer is <answer>."]


@pytest.mark.parametrize(("reply", "expected"), [
    ("5 + 3 = 8 apples.\nThe answer is 8.", {"reasoning": "5 + 3 = 8 apples.", "answer": "8"}),
    ("The answer is 7? No. The final answer is **$1,200**.", {"reasoning": "The answer is 7? No.", "answer": "$1,200"}),
    ("Working.\nAnswer: blue", {"reasoning": "Working.", "answer": "blue"}),
    ("1. It is Paris.\nThe answer is:\n\nParis", {"reasoning": "1. It is Paris.", "answer": "Paris"}),
])
def test_plain_adapter_parses_the_last_statement(reply, expected):
    assert PlainAdapter().parse(COT, reply) == expected


def test_plain_adapter_round_trips_its_own_demos():
    demo = {"question": "Q", "reasoning": "1 + 2 = 3.", "answer": "3"}
    adapter = PlainAdapter()
    assert adapter.parse(COT, adapter.format_assistant_message_content(COT, demo)) == {"reasoning": "1 + 2 = 3.",
                                                                                      "answer": "3"}


def test_plain_adapter_refuses_what_it_cannot_read():
    with pytest.raises(AdapterParseError, match="no \"The answer is"):
        PlainAdapter().parse(COT, "3 + 4 = 7")
    with pytest.raises(AdapterParseError, match="no \"The answer is"):
        PlainAdapter().parse(COT, "3 + 4 = 7. The answer is:\n\n")  # a cue with nothing after it
    with pytest.raises(AdapterParseError, match="does not parse"):
        PlainAdapter().parse(NUM, "The answer is twelve.")
    assert PlainAdapter().parse(NUM, "The answer is 12.") == {"answer": 12}
    with pytest.raises(ConfigError, match="one answer field"):
        PlainAdapter().format(dspy.Signature("question -> answer, confidence"), [], {"question": "Q"})


def test_plain_adapter_serves_dspy_modules():
    from scripted import scripted_lm

    lm, engine = scripted_lm(lambda text, n: "8", plain=True)
    with dspy.context(lm=lm, adapter=PlainAdapter()):
        pred = dspy.ChainOfThought("question -> answer")(question="5 + 3?")
    assert (pred.answer, pred.reasoning) == ("8", "step 0")
    assert "[[ ##" not in engine.prompts[0] and engine.prompts[0].endswith("Let's think step by step.")


def test_plain_cue_lists_a_literal_answer_fields_labels_and_leaves_other_signatures_alone():
    class Sentiment(dspy.Signature):
        review: str = dspy.InputField()
        sentiment: Literal["positive", "negative"] = dspy.OutputField()

    direct = PlainAdapter().format(Sentiment, [], {"review": "Loved it."})[-1]["content"]
    assert direct.endswith("Reply with: The answer is one of: positive, negative.")
    cot = PlainAdapter().format(dspy.ChainOfThought(Sentiment).predict.signature, [], {"review": "Loved it."})
    assert cot[-1]["content"].endswith("Let's think step by step. The answer is one of: positive, negative.")
    # free-text answers keep the one shared plain prompt
    assert PlainAdapter().format(COT, [], {"question": "2 + 3?"})[-1]["content"] == "2 + 3?\nLet's think step by step."
    plain = dspy.Predict("question -> answer").signature
    assert PlainAdapter().format(plain, [], {"question": "2 + 3?"})[-1]["content"].endswith("The answer is <answer>.")


def test_labels_list_a_str_fields_labels_and_a_literal_field_keeps_its_own():
    plain = dspy.Predict("review -> sentiment").signature
    labelled = PlainAdapter(labels=["positive", "negative"])
    content = labelled.format(plain, [], {"review": "Loved it."})[-1]["content"]
    assert content == "Loved it.\nReply with: The answer is one of: positive, negative."
    assert PlainAdapter().format(plain, [], {"review": "x"})[-1]["content"].endswith("<answer>.")
    # a field's own Literal wins over the adapter's labels; a non-str field gets none
    class Sentiment(dspy.Signature):
        review: str = dspy.InputField()
        sentiment: Literal["good", "bad"] = dspy.OutputField()

    assert labelled.format(Sentiment, [], {"review": "x"})[-1]["content"].endswith("one of: good, bad.")
    assert labelled.format(NUM, [], {"question": "x"})[-1]["content"].endswith("<answer>.")
    with pytest.raises(ConfigError, match="non-empty label strings"):
        PlainAdapter(labels=[])
