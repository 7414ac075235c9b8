"""The torch prefix cache within a byte budget (`EngineConfig.prefix_cache_mb`): least recently used prompts are
evicted until the key/values fit, a prompt larger than the whole budget is computed but not kept, and outputs are
those of the static scheduler whatever was kept. llama.cpp refuses the setting (its streams are sized up front)."""

from __future__ import annotations

import pytest
from dspy.lm15 import Config, Message, Request

from detot_agent import LlamaCppEngine, LocalEngine
from detot_agent.errors import ConfigError


def _req(text: str) -> Request:
    return Request(model="m", messages=(Message.user(text),), config=Config(max_tokens=8))


def _engine(tiny_gguf, **kw) -> LocalEngine:
    return LocalEngine(str(tiny_gguf), device="cpu", dtype="float32", max_wait_ms=20, **kw)


@pytest.fixture(scope="module")
def entry_bytes(tiny_gguf) -> int:
    """The key/values of one of the prompts below (they all have the same length)."""
    engine = _engine(tiny_gguf)
    try:
        engine.complete(_req("question number 0"))
        return int(engine.batch_stats["prefix_bytes"])
    finally:
        engine.close()


def test_eviction_keeps_the_cached_key_values_within_the_byte_budget(tiny_gguf, entry_bytes):
    budget = 2.5 * entry_bytes  # room for two prompts, not three
    static = _engine(tiny_gguf, scheduler="static")
    engine = _engine(tiny_gguf, prefix_cache=8, prefix_cache_mb=budget / 1e6)
    unbounded = _engine(tiny_gguf, prefix_cache=8)
    try:
        for i in range(5):
            req = _req(f"question number {i}")
            assert engine.complete(req).message.text == static.complete(req).message.text
            unbounded.complete(req)
            assert 0 < engine.batch_stats["prefix_bytes"] <= budget
        stats = engine.batch_stats
        assert len(engine._batcher.cache.entries) == 2 and stats["evictions"] == 3
        assert stats["prefix_bytes"] == 2 * entry_bytes
        # the check catches a cache that keeps more: the same prompts without a byte budget
        assert unbounded.batch_stats["prefix_bytes"] == 5 * entry_bytes > budget
        engine.complete(_req("question number 4"))  # the most recent ones stay
        assert engine.batch_stats["prefix_hits"] == 1
        engine.complete(_req("question number 0"))  # the oldest was evicted
        assert engine.batch_stats["prefix_hits"] == 1
    finally:
        for e in (static, engine, unbounded):
            e.close()


def test_a_prompt_larger_than_the_budget_is_served_but_not_kept(tiny_gguf, entry_bytes):
    static = _engine(tiny_gguf, scheduler="static")
    engine = _engine(tiny_gguf, prefix_cache_mb=entry_bytes / 2 / 1e6)
    try:
        req = _req("question number 1")
        for _ in range(2):
            assert engine.complete(req).message.text == static.complete(req).message.text
        stats = engine.batch_stats
        assert stats["prefix_bytes"] == 0 and stats["prefix_hits"] == 0 and stats["prefix_misses"] == 2
        assert stats["evictions"] == 0
    finally:
        static.close()
        engine.close()


def test_llamacpp_refuses_a_byte_budget_and_names_what_to_set(tiny_gguf):
    with pytest.raises(ConfigError, match="prefix_cache"):
        LlamaCppEngine(str(tiny_gguf), prefix_cache_mb=10)


def test_a_budget_that_is_not_positive_is_refused_when_the_settings_are_built(tiny_gguf):
    with pytest.raises(ConfigError, match="prefix_cache_mb"):
        _engine(tiny_gguf, prefix_cache_mb=0)
