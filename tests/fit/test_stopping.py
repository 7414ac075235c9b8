"""The shipped configuration's stopping rule, replayed on recorded race answers (`fit/stopping.py`): exact replay,
no rule judged beyond the samples drawn, and never a rule that loses a dev item (its violation caught)."""

from __future__ import annotations

import pytest

from detot_agent import TaskProfile, analyze
from detot_agent.detot.task import StoppingRule
from detot_agent.errors import ConfigError
from detot_agent.fit.config import FitConfig
from detot_agent.fit.stopping import choose_stopping, replay

TASK = TaskProfile(name="t", description="numbers", kind="arithmetic", answer_format="number")
ADJ = analyze(TASK, k_exemplars=0, max_samples=6, weighting="cisc")
RULES = [StoppingRule.BETA, StoppingRule.CONFIDENCE, StoppingRule.MAJORITY]
THRESHOLDS = [0.6, 0.8, 0.95]


def _row(keys, right, *, samples=None, logprobs=None):
    """A race row: its samples in drawing order and which keys the metric accepts; `correct` and `samples` as the
    raced (whole-budget) vote had them."""
    tokens = [10] * len(keys)
    logprobs = logprobs or [-1.0] * len(keys)
    return {"sample_keys": keys, "sample_tokens": tokens, "sample_logprobs": logprobs,
            "key_correct": {k: k == right for k in keys if k is not None},
            "correct": replay({"sample_keys": keys, "sample_tokens": tokens, "sample_logprobs": logprobs,
                               "key_correct": {k: k == right for k in keys if k is not None}},
                              rule="fixed", threshold=1.0, min_samples=len(keys), round_size=2,
                              max_samples=len(keys))[0],
            "samples": samples or len(keys), "tokens": 10 * (samples or len(keys))}


def test_replay_of_the_raced_rule_is_the_raced_outcome_and_rules_stop_where_their_counts_say():
    row = _row(["7", "8", "7", "7", "8", "8"], "7")
    assert replay(row, rule="fixed", threshold=1.0, min_samples=2, round_size=2, max_samples=6) == (True, 6, 60)
    # beta at 0.8: 1-1 after 2 (P = 0.5), 3-1 after 4 (P = 0.81): stops at 4 with the right answer
    assert replay(row, rule="beta", threshold=0.8, min_samples=2, round_size=2, max_samples=6) == (True, 4, 40)
    # at 0.95 it needs 3-1 to be more certain: it draws all 6 (3-3), where the tie goes to the first seen, 7
    assert replay(row, rule="beta", threshold=0.95, min_samples=2, round_size=2, max_samples=6) == (True, 6, 60)
    # unparsed samples do not vote; a row without the samples' record cannot be replayed
    assert replay(_row([None, "5", "5", "5", "5", "5"], "5"), rule="majority", threshold=0.9, min_samples=2,
                  round_size=2, max_samples=6) == (True, 2, 20)
    assert replay({"correct": True, "samples": 6, "tokens": 60}, rule="beta", threshold=0.8, min_samples=2,
                  round_size=2, max_samples=6) is None


def test_a_rule_that_wants_samples_the_race_did_not_draw_is_not_judged():
    # the raced rule stopped after 4 samples; a rule that would go on cannot be judged from this row
    row = _row(["7", "8", "7", "8"], "7", samples=4)
    assert replay(row, rule="beta", threshold=0.95, min_samples=2, round_size=2, max_samples=6) is None
    out = choose_stopping([row], ADJ, schedule=ADJ, rules=[StoppingRule.BETA], thresholds=[0.95])
    assert out["chosen"] is None and not out["table"][0]["replayable"]


def test_the_cheapest_rule_that_keeps_the_correct_count_is_chosen():
    agree = [_row(["3", "3", "3", "3", "3", "3"], "3") for _ in range(5)]  # two agreeing samples settle it
    out = choose_stopping(agree, ADJ, schedule=ADJ, rules=RULES, thresholds=THRESHOLDS)
    chosen = out["chosen"]
    assert chosen is not None and chosen["samples"] == 5 * 2 and chosen["correct"] == 5
    assert out["raced"] == {"correct": 5, "samples": 30, "tokens": 300, "items": 5}


def test_a_rule_that_would_lose_a_dev_item_is_never_chosen():
    # the first two samples agree on a wrong answer that the whole budget outvotes: stopping early loses the item,
    # so every rule that stops after 2 is refused however cheap; only one that draws on is eligible
    trap = _row(["4", "4", "5", "5", "5", "5"], "5")
    easy = [_row(["3", "3", "3", "3", "3", "3"], "3") for _ in range(3)]
    out = choose_stopping([trap, *easy], ADJ, schedule=ADJ, rules=RULES, thresholds=THRESHOLDS)
    assert out["raced"]["correct"] == 4
    losing = [e for e in out["table"] if e["replayable"] and e["correct"] < 4]
    assert losing  # the violation exists among the rules ...
    assert out["chosen"] not in losing  # ... and is never shipped
    # beta at 0.95 waits for 4-0 (the easy rows stop at 4) and draws the trap's whole budget: the cheapest safe rule
    assert (out["chosen"]["rule"], out["chosen"]["threshold"]) == ("beta", 0.95)
    assert out["chosen"]["samples"] == 6 + 3 * 4 and out["chosen"]["correct"] == 4


def test_stop_thresholds_are_validated_when_the_settings_are_built():
    with pytest.raises(ConfigError, match="stop_thresholds"):
        FitConfig(stop_thresholds=[0.0])
    with pytest.raises(ConfigError, match="stop_rules"):
        FitConfig(stop_rules=["sometimes"])
