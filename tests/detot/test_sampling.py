"""Rounds of sampling draw what one call would: adaptive stopping sees a prefix of fixed-N's samples."""

from __future__ import annotations

import pytest

from detot_agent.detot.sampling import round_seed, sample_engine

MESSAGES = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples?"}]


def _draw(engine, n, seed, greedy):
    return [s.text for s in sample_engine(engine, "m", MESSAGES, n, soft_prompt=None, seed=seed, stop=(),
                                          temperature=1.0, max_tokens=6, greedy=greedy)]


def _rounds(engine, base, sizes, *, seeds):
    texts, drawn = [], 0
    for n in sizes:
        texts += _draw(engine, n, seeds(base, drawn), 1 if drawn == 0 else 0)
        drawn += n
    return texts


@pytest.fixture(scope="module")
def cpp(tiny_gguf):
    from detot_agent.engines.llamacpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=8, max_wait_ms=20)
    yield engine
    engine.close()


@pytest.mark.parametrize("which", ["torch", "llamacpp"])
def test_rounds_of_two_draw_the_same_samples_as_one_call(which, tiny_engine, cpp):
    engine = tiny_engine if which == "torch" else cpp
    one_shot = _draw(engine, 6, 40, 1)  # the greedy answer, then five samples: sc's one call
    assert len(set(one_shot[1:])) > 1  # the samples differ, so a mismatch could not hide
    rounds = _rounds(engine, 40, [2, 2, 2], seeds=lambda base, drawn: round_seed(base, drawn, greedy_first=True))
    assert rounds == one_shot
    assert _rounds(engine, 40, [2, 2], seeds=lambda b, d: round_seed(b, d, greedy_first=True)) == one_shot[:4]
    # the earlier rule (seed + drawn) skipped a seed after the greedy round: rounds diverged from one call
    old = _rounds(engine, 40, [2, 2, 2], seeds=lambda base, drawn: base + drawn)
    assert old[:2] == one_shot[:2] and old[2:] != one_shot[2:]
