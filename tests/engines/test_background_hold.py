"""Serving first on the llama.cpp scheduler: a background row that is decoding holds (keeps its KV, decodes
nothing) while a serving row runs, and gives the same output as alone; past its patience it decodes beside the
serving row in its share of the steps (with a share of 1, the rule before, in every step)."""

from __future__ import annotations

import threading
import time

import pytest
from dspy.lm15 import Config, Message, Request

from detot_agent import LlamaCppEngine
from detot_agent.engines.generation import background_work


def _req(text: str, **cfg) -> Request:
    return Request(model="m", messages=(Message.user(text),), config=Config(**cfg))


@pytest.mark.parametrize(("patience", "share"), [(30.0, 0.1), (0.0, 0.25), (0.0, 1.0)])
def test_a_running_background_row_holds_while_a_serving_row_decodes(tiny_gguf, patience, share):
    bg = _req("Tom has 3 apples", temperature=0.9, seed=3, max_tokens=600)
    fg = _req("alpha beta", max_tokens=40)
    static = LlamaCppEngine(str(tiny_gguf), scheduler="static")
    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=8, max_wait_ms=5, background_patience=patience,
                            background_share=share)
    try:
        expected = ([s.text for s in static.sample(bg, 2)], static.complete(fg).text)
        out: dict[str, list[str]] = {}

        def background() -> None:
            with background_work():
                out["bg"] = [s.text for s in engine.sample(bg, 2)]

        worker = threading.Thread(target=background)
        worker.start()
        deadline = time.monotonic() + 10
        while engine.batch_stats.get("batches", 0) < 3 and time.monotonic() < deadline:  # the background row runs
            time.sleep(0.001)
        assert "bg" not in out  # still running when the serving row arrives
        served = engine.complete(fg).text
        worker.join()
        assert (out["bg"], served) == expected  # holding changes nothing in either output
        held, beside = engine.batch_stats["held"], engine.batch_stats["beside"]
        if patience:
            assert held > 0 and beside == 0  # it held for the serving row's steps
        elif share < 1:  # past its patience: one step in four beside the serving row, the rest held
            assert beside > 0 and 0.6 <= held / (held + beside) <= 0.85
        else:  # the violation the rule prevents: background decoding beside serving in every step
            assert held == 0 and beside > 0
    finally:
        static.close()
        engine.close()


def test_background_work_sent_right_after_a_serving_row_waits_for_the_lull(tiny_gguf):
    from detot_agent.engines.continuous import LULL_S

    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=8, max_wait_ms=1)
    try:
        engine.complete(_req("alpha beta", max_tokens=4))
        served = time.monotonic()
        with background_work():
            engine.sample(_req("Tom has 3 apples", max_tokens=2), 1)
        assert time.monotonic() - served >= LULL_S * 0.9  # it started only once no serving row was near
        before = time.monotonic()
        with background_work():  # well inside a lull: no wait
            engine.sample(_req("Tom has 3 apples", max_tokens=2), 1)
        assert time.monotonic() - before < LULL_S
    finally:
        engine.close()


@pytest.mark.parametrize(("beside", "chunks"), [(True, True), (False, True), (True, False)])
def test_a_background_row_prefills_its_prompt_in_chunks(tiny_gguf, monkeypatch, beside, chunks):
    from detot_agent.engines.continuous import LULL_CHUNK, PREFILL_CHUNK
    from detot_agent.engines.llamacpp_scheduler import ContinuousScheduler

    if not chunks:  # the violation: the whole prompt in one pass, every serving row waiting for it
        monkeypatch.setattr(ContinuousScheduler, "chunks_prefill", False)
    bg = _req("Tom has 3 apples and buys 4 more at the market, then gives 2 to Ann. " * 3, temperature=0.9,
              seed=5, max_tokens=30)
    fg = _req("alpha beta", max_tokens=400)
    static = LlamaCppEngine(str(tiny_gguf), scheduler="static")
    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=8, max_wait_ms=1, background_patience=0.0,
                            background_share=0.5, prefix_cache=0)
    try:
        expected = ([s.text for s in static.sample(bg, 2)], static.complete(fg).text)
        out: dict[str, str] = {}
        server = threading.Thread(target=lambda: out.update(fg=engine.complete(fg).text))
        if beside:  # the serving row decodes when the background row arrives: it is due at once (no patience)
            server.start()
            deadline = time.monotonic() + 10
            while engine.batch_stats.get("batches", 0) < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
        with background_work():
            got = [s.text for s in engine.sample(bg, 2)]
        if not beside:
            server.start()
        server.join()
        assert (got, out["fg"]) == expected  # chunks change neither output
        tokens, calls = engine.batch_stats["chunked"], engine.batch_stats["chunks"]
        if not chunks:
            assert tokens == calls == 0
        elif beside:  # a few tokens in each of its turns
            assert tokens > 2 * PREFILL_CHUNK and calls >= -(-tokens // PREFILL_CHUNK)
        else:  # in a lull: bigger chunks, still bounded
            assert tokens > 0 and calls == -(-tokens // LULL_CHUNK)
    finally:
        static.close()
        engine.close()


@pytest.mark.parametrize("top", [True, False])
def test_a_held_background_row_never_splits_the_serving_rows_into_two_passes(tiny_gguf, monkeypatch, top):
    from detot_agent.engines.llamacpp_scheduler import ContinuousScheduler

    if not top:  # the violation: background rows on the lowest free slots, as before, between serving rows
        monkeypatch.setattr(ContinuousScheduler, "compacts", False)
    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=8, max_wait_ms=1, background_patience=0.0,
                            background_share=0.1)
    try:
        first = threading.Thread(target=lambda: engine.sample(_req("alpha beta", max_tokens=900), 2))
        first.start()  # a serving row on slots 0-1

        def wait_for(key: str, n: int) -> None:
            deadline = time.monotonic() + 10
            while engine.batch_stats.get(key, 0) < n and time.monotonic() < deadline:
                time.sleep(0.001)

        wait_for("batches", 3)

        def background() -> None:
            with background_work():
                engine.sample(_req("Tom has 3 apples", max_tokens=900), 2)

        bg = threading.Thread(target=background)
        bg.start()
        wait_for("rows", 2)  # admitted beside the serving row (no patience)
        before = engine.batch_stats
        engine.sample(_req("gamma delta", max_tokens=60), 2)  # a second serving row while both run
        after = engine.batch_stats
        first.join()
        bg.join()
        steps = after["batches"] - before["batches"]
        extra = (after["passes"] - before["passes"]) - steps  # steps that took more than one pass
        turns = after["beside"] - before["beside"]  # the background row's own steps, on the top slots
        if top:
            assert extra <= turns  # only its turns (one step in ten) take a second pass
        else:
            assert extra > steps // 2  # the serving rows split around the held row: two passes a step
    finally:
        engine.close()
