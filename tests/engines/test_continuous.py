"""Continuous batching and the prefix cache (`engines/continuous.py` with its llama.cpp and torch backends) on a
tiny float32 GGUF that both engines load: every row gives what the static scheduler gives it, token for token,
however it was scheduled and whatever it reused."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from dspy.lm15 import Config, Message, Request

from detot_agent import LlamaCppEngine, LocalEngine
from detot_agent.errors import EngineClosedError

SYSTEM = ("You are a careful assistant. Read the worked examples, then solve the new problem step by step, "
          "and end with the answer. Example: Tom has 3 apples and buys 4 more, so he has 7 apples. ")


def _req(text: str, system: str | None = None, **cfg) -> Request:
    cfg.setdefault("max_tokens", 12)
    return Request(model="m", messages=(Message.user(text),), system=system, config=Config(**cfg))


def _soft(k: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, 64, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.fixture(scope="module", params=["llamacpp", "torch"])
def backend(request) -> str:
    return request.param


def _engine(backend: str, tiny_gguf, **kw):
    if backend == "llamacpp":
        return LlamaCppEngine(str(tiny_gguf), **kw)
    return LocalEngine(str(tiny_gguf), device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def static(backend, tiny_gguf):
    engine = _engine(backend, tiny_gguf, max_batch_size=8, max_wait_ms=20, scheduler="static")
    yield engine
    engine.close()


def _continuous(backend, tiny_gguf, **kw):
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_wait_ms", 20)
    return _engine(backend, tiny_gguf, **kw)


def _texts(samples) -> list[str]:
    return [s.text for s in samples]


CASES = [("alpha beta", None, None, 1, {}),
         ("Tom has 3 apples", None, _soft(), 3, {"temperature": 0.9, "seed": 2}),
         ("what is two plus three", SYSTEM, None, 4, {"temperature": 0.7, "seed": 5}),
         ("answer: five", SYSTEM, _soft(6, 1), 2, {"temperature": 0.8, "seed": 9})]


def test_every_row_gives_what_it_gives_alone_with_hits_and_mixed_soft_prompts(backend, static, tiny_gguf):
    alone = [static.sample(_req(t, s, **kw), n, soft_prompt=sp, greedy=1) for t, s, sp, n, kw in CASES]
    engine = _continuous(backend, tiny_gguf)
    try:
        for _ in range(2):  # the second pass hits the prefix cache for every row
            got = [engine.sample(_req(t, s, **kw), n, soft_prompt=sp, greedy=1) for t, s, sp, n, kw in CASES]
            assert [_texts(g) for g in got] == [_texts(a) for a in alone]
            assert [g[0].logprob for g in got] == pytest.approx([a[0].logprob for a in alone], abs=1e-4)
            assert [g[0].input_tokens for g in got] == [a[0].input_tokens for a in alone]  # usage unchanged
        stats = engine.batch_stats
        assert stats["prefix_misses"] == len(CASES) and stats["prefix_hits"] == len(CASES)
        # rows with and without soft prompts, sent together, joining one running batch
        results: dict[int, list[str]] = {}

        def worker(i: int) -> None:
            t, s, sp, n, kw = CASES[i]
            results[i] = _texts(engine.sample(_req(t, s, **kw), n, soft_prompt=sp, greedy=1))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(CASES))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert [results[i] for i in range(len(CASES))] == [_texts(a) for a in alone]
        assert engine.batch_stats["largest"] >= 2
    finally:
        engine.close()


def test_a_row_joining_mid_decode_gives_what_it_gives_alone(backend, static, tiny_gguf):
    long_req, short_req = _req("alpha beta", max_tokens=64), _req("Tom has apples", SYSTEM, max_tokens=10)
    expected_long, expected_short = static.complete(long_req).text, static.complete(short_req).text
    engine = _continuous(backend, tiny_gguf, max_wait_ms=0)
    try:
        out: dict[str, str] = {}
        first = threading.Thread(target=lambda: out.setdefault("long", engine.complete(long_req).text))
        first.start()
        while engine.batch_stats.get("batches", 0) < 3:  # the long row is decoding
            time.sleep(0.001)
        out["short"] = engine.complete(short_req).text  # joins the running batch, finishes before the long one
        running = engine.batch_stats["batches"]
        first.join()
        assert (out["long"], out["short"]) == (expected_long, expected_short)
        assert engine.batch_stats["batches"] > running  # the long row was still running when the short one ended
        assert engine.batch_stats["rows"] == 2 and engine.batch_stats["largest"] == 2
    finally:
        engine.close()


def test_a_row_larger_than_the_free_slots_starts_what_fits_and_its_samples_do_not_change(backend, static, tiny_gguf):
    busy, wide = _req("alpha beta", max_tokens=48), _req("Tom has 3 apples", temperature=0.9, seed=4, max_tokens=10)
    expected_busy = static.complete(busy).text
    expected_wide = _texts(static.sample(wide, 7, greedy=1))
    engine = _continuous(backend, tiny_gguf, max_batch_size=4, max_wait_ms=0)
    try:
        out: dict[str, object] = {}
        first = threading.Thread(target=lambda: out.setdefault("busy", engine.complete(busy).text))
        first.start()
        while engine.batch_stats.get("batches", 0) < 2:  # one slot taken, three free
            time.sleep(0.001)
        out["wide"] = _texts(engine.sample(wide, 7, greedy=1))  # 3 start now, 4 when slots free up
        first.join()
        assert out == {"busy": expected_busy, "wide": expected_wide}
        assert engine.batch_stats["rows"] >= 3  # the wide row ran in more than one part
    finally:
        engine.close()


def test_a_shared_prefix_is_reused_and_only_the_rest_is_prefilled(backend, static, tiny_gguf):
    a, b = _req("what is two plus three", SYSTEM), _req("Tom has 3 apples and buys 4", SYSTEM)
    engine = _continuous(backend, tiny_gguf)
    try:
        engine.complete(a)
        before = engine.batch_stats["prompt_tokens_decoded"]
        assert engine.complete(b).text == static.complete(b).text
        stats = engine.batch_stats
        assert stats["prefix_partial_hits"] == 1 and stats["prompt_tokens_reused"] >= 16
        assert stats["prompt_tokens_decoded"] - before == len(engine.render(b)) - stats["prompt_tokens_reused"]
    finally:
        engine.close()


def test_exact_matching_reuses_only_an_identical_prompt(backend, static, tiny_gguf):
    """`prefix_match="exact"`: a prompt sharing a long prefix is computed whole (no partial hit), an identical one
    still hits; the default reuses the prefix (the test above), so the two settings differ where they should."""
    a, b = _req("what is two plus three", SYSTEM), _req("Tom has 3 apples and buys 4", SYSTEM)
    engine = _continuous(backend, tiny_gguf, prefix_match="exact")
    try:
        engine.complete(a)
        assert engine.complete(b).text == static.complete(b).text
        assert engine.complete(b).text == static.complete(b).text
        stats = engine.batch_stats
        assert (stats["prefix_partial_hits"], stats["prefix_misses"], stats["prefix_hits"]) == (0, 2, 1)
        assert stats["prompt_tokens_decoded"] == len(engine.render(a)) + len(engine.render(b))
    finally:
        engine.close()


def test_a_prompt_that_is_a_strict_prefix_of_a_cached_one_gives_what_it_gives_alone(backend, static, tiny_gguf):
    """The cache holds no logits after a cached prompt's inner positions: the shorter prompt's last token is
    computed again (reusing it all would hand it the longer prompt's next-token logits)."""
    from detot_agent.engines.generation import GenRow

    ids = static.render(_req("Tom has 3 apples and buys 4 more apples at the shop", SYSTEM))
    short = GenRow(prompt_ids=ids[:-3], max_new_tokens=10)
    engine = _continuous(backend, tiny_gguf)
    try:
        engine._batcher_now().submit(GenRow(prompt_ids=ids, max_new_tokens=10)).result()
        got = engine._batcher_now().submit(short).result()
        assert [o.token_ids for o in got] == [o.token_ids for o in static.generate_batch([short])[0]]
        stats = engine.batch_stats
        assert stats["prefix_partial_hits"] == 1 and stats["prompt_tokens_reused"] == len(ids) - 4
    finally:
        engine.close()


def test_a_new_soft_prompt_misses_and_eviction_keeps_the_cache_in_its_budget(backend, static, tiny_gguf):
    engine = _continuous(backend, tiny_gguf, prefix_cache=2)
    try:
        req = _req("Tom has 3 apples", temperature=0.8, seed=1)
        engine.sample(req, 2, soft_prompt=_soft(4, 0))
        new = engine.sample(req, 2, soft_prompt=_soft(4, 0) + 0.01)  # the next version of the same prompt
        assert engine.batch_stats["prefix_hits"] == 0 and engine.batch_stats["prefix_misses"] == 2
        assert _texts(new) == _texts(static.sample(req, 2, soft_prompt=_soft(4, 0) + 0.01))
        for i in range(4):
            engine.complete(_req(f"question number {i}"))
        stats = engine.batch_stats
        entries = engine._batcher.cache.entries
        assert stats["evictions"] == 4 and len(entries) == 2
        if backend == "torch":  # the key/values it holds are those of its two entries, nothing more
            assert 0 < stats["prefix_bytes"] == sum(e.nbytes() for e in entries.values())
        engine.complete(_req("question number 3"))  # the most recent ones stay
        assert engine.batch_stats["prefix_hits"] == 1
    finally:
        engine.close()


def test_no_cache_means_no_reuse(backend, tiny_gguf):
    engine = _continuous(backend, tiny_gguf, prefix_cache=0)
    try:
        req = _req("Tom has 3 apples")
        prompt = len(engine.render(req))
        engine.complete(req)
        engine.complete(req)
        stats = engine.batch_stats
        assert stats["prompt_tokens_decoded"] == 2 * prompt and stats["prefix_hits"] == 0
    finally:
        engine.close()


def test_a_cancelled_request_leaves_the_others_alone(backend, static, tiny_gguf):
    engine = _continuous(backend, tiny_gguf, max_wait_ms=50)
    keep = _req("what is two plus three", max_tokens=40)
    expected = static.complete(keep).text

    async def both() -> str:
        doomed = asyncio.ensure_future(engine.asample(_req("alpha beta", max_tokens=200), 4))
        kept = asyncio.ensure_future(engine.asample(keep, 1))
        await asyncio.sleep(0.05)
        doomed.cancel()
        return (await kept)[0].text

    try:
        assert asyncio.run(both()) == expected
        assert engine.complete(keep).text == expected  # and the freed slots serve the next request
    finally:
        engine.close()


def test_a_failing_row_fails_alone(backend, static, tiny_gguf, monkeypatch):
    from detot_agent.engines import continuous

    real = continuous.stop_in_tail

    def picky(tokenizer, tokens, stop):
        if "boom" in stop:
            raise RuntimeError("a stop string this tokenizer cannot check")
        return real(tokenizer, tokens, stop)

    monkeypatch.setattr(continuous, "stop_in_tail", picky)
    engine = _continuous(backend, tiny_gguf, max_wait_ms=50)
    good = _req("what is two plus three", max_tokens=20)
    out: dict[str, object] = {}

    def run(name: str, req: Request) -> None:
        try:
            out[name] = engine.complete(req).text
        except Exception as exc:
            out[name] = exc

    try:
        threads = [threading.Thread(target=run, args=("bad", _req("alpha beta", stop=["boom"]))),
                   threading.Thread(target=run, args=("good", good))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert isinstance(out["bad"], RuntimeError) and out["good"] == static.complete(good).text
    finally:
        engine.close()


def test_closing_with_requests_in_flight_fails_them_with_engine_closed(backend, tiny_gguf):
    engine = _continuous(backend, tiny_gguf, max_batch_size=1)
    out: list[object] = []

    def run() -> None:
        try:
            out.append(engine.complete(_req("alpha beta", max_tokens=400)).text)
        except Exception as exc:
            out.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]  # one runs, two wait
    for th in threads:
        th.start()
    while engine.batch_stats.get("batches", 0) < 2:
        time.sleep(0.001)
    engine.close()
    for th in threads:
        th.join()
    assert len(out) == 3 and all(isinstance(o, EngineClosedError) for o in out), out


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_a_row_too_long_for_a_sequence_is_refused_before_it_joins_a_batch(tiny_gguf, scheduler):
    """`build_row` already caps new tokens at the context; a row built past it (as a direct caller may) is
    refused by either scheduler before it is decoded beside others."""
    from detot_agent.engines.generation import GenRow
    from detot_agent.errors import ContextLengthError

    engine = _engine("llamacpp", tiny_gguf, max_batch_size=8, max_wait_ms=20, scheduler=scheduler)
    try:
        cells = engine._ctx.n_ctx
        row = GenRow(prompt_ids=engine.render(_req("alpha beta")), max_new_tokens=cells)
        with pytest.raises(ContextLengthError, match=f"does not fit llama.cpp's {cells} cells a sequence"):
            if scheduler == "static":
                engine.generate_batch([row])
            else:
                engine._batcher_now().submit(row)
        assert engine.complete(_req("alpha beta", max_tokens=4)).text  # the engine goes on serving
    finally:
        engine.close()


# ---- serving first: background rows (`background_work`) --------------------------------------------------------
def _admitting(max_running: int, waiting: list[tuple[str, int, bool]], running_background: int = 0,
               patience: float | None = 30.0, since_serving: float = 10.0):
    """The admission rule alone: a scheduler's `_admit` over rows named, sized and flagged as given."""
    from concurrent.futures import Future

    from detot_agent.engines.continuous import ContinuousCore
    from detot_agent.engines.generation import GenRow
    from detot_agent.engines.scheduler_jobs import _Job, _Request

    s = ContinuousCore.__new__(ContinuousCore)
    s.max_running = max_running
    s._patience = patience
    s._serving_left = time.monotonic() - since_serving  # when the last serving row left
    names = {}
    s._waiting = []
    for name, n, background in waiting:
        row = GenRow([1], n=n, background=background)
        names[id(row)] = name
        s._waiting.append((row, _Request(Future(), n), 0))
    busy = [_Job(GenRow([1], n=running_background, background=True), _Request(Future(), 1), 0,
                 slots=list(range(running_background)))] if running_background else []
    s._running = busy
    s._free = list(range(running_background, max_running))
    admitted = s._admit()
    return [(names.get(id(j.row), "part"), j.row.n) for j in admitted], [(r.n, r.background) for r, _, _ in s._waiting]


def test_serving_rows_go_first_and_background_work_gets_at_most_a_quarter_of_the_slots():
    # a background row that arrived first waits while serving rows take the slots, and while they run
    admitted, left = _admitting(8, [("shadow", 2, True), ("serve", 3, False), ("serve2", 2, False)])
    assert admitted == [("serve", 3), ("serve2", 2)] and left == [(2, True)]
    # once its patience is spent (0: at once, the rule before) it runs beside them, within its quarter
    admitted, left = _admitting(8, [("shadow", 2, True), ("serve", 3, False), ("serve2", 2, False)], patience=0)
    assert admitted[:2] == [("serve", 3), ("serve2", 2)] and admitted[2][1] == 2  # then 2 of 3 free, the quarter
    assert left == []
    admitted, left = _admitting(8, [("shadow", 4, True)])  # alone: still only a quarter (2 of 8)
    assert [n for _, n in admitted] == [2] and left == [(2, True)]
    admitted, left = _admitting(8, [("shadow", 2, True)], running_background=2)  # its quarter already busy
    assert admitted == [] and left == [(2, True)]
    admitted, _ = _admitting(2, [("shadow", 1, True)])  # a small engine still lets one background sequence run
    assert admitted == [("shadow", 1)]


def test_background_work_starts_in_a_lull_not_in_the_gap_between_two_serving_rows():
    from detot_agent.engines.continuous import LULL_S

    admitted, left = _admitting(8, [("shadow", 2, True)], since_serving=0.0)  # a serving row just left
    assert admitted == [] and left == [(2, True)]
    admitted, _ = _admitting(8, [("shadow", 2, True)], since_serving=LULL_S + 0.05)  # the lull has come
    assert admitted == [("shadow", 2)]
    admitted, _ = _admitting(8, [("shadow", 2, True)], since_serving=0.0, patience=0)  # patience spent: at once
    assert admitted == [("shadow", 2)]


def test_the_rule_check_catches_a_scheduler_that_admits_by_arrival_only():
    from detot_agent.engines.continuous import ContinuousCore

    rule = ContinuousCore._admit
    try:
        def by_arrival(self):  # the violation: the first waiting row first, whatever it is
            jobs = []
            while self._waiting and self._free:
                from detot_agent.engines.scheduler_jobs import _Job

                row, request, offset = self._waiting.pop(0)
                jobs.append(_Job(row=row, request=request, part=offset,
                                 slots=[self._free.pop(0) for _ in range(min(row.n, len(self._free)))]))
            return jobs

        ContinuousCore._admit = by_arrival
        admitted, _ = _admitting(8, [("shadow", 4, True), ("serve", 3, False)])
        assert admitted[0] == ("shadow", 4)  # what the test above would catch
    finally:
        ContinuousCore._admit = rule


def test_background_work_gives_what_it_gives_alone(backend, static, tiny_gguf):
    from detot_agent.engines.generation import background_work

    fg, bg = _req("alpha beta", max_tokens=20), _req("Tom has 3 apples", temperature=0.9, seed=3, max_tokens=10)
    expected = (static.complete(fg).text, _texts(static.sample(bg, 4)))
    engine = _continuous(backend, tiny_gguf, max_batch_size=4, max_wait_ms=20)
    try:
        out: dict[str, object] = {}

        def background() -> None:
            with background_work():
                out["bg"] = _texts(engine.sample(bg, 4))

        worker = threading.Thread(target=background)
        worker.start()
        out["fg"] = engine.complete(fg).text
        worker.join()
        assert (out["fg"], out["bg"]) == expected
    finally:
        engine.close()


def test_torch_drops_the_pad_columns_no_running_row_uses(tiny_gguf, monkeypatch):
    """After a long prompt's row leaves, the running cache shrinks to the longest row still decoding: every decode
    step's width is exactly the longest live row (the check fails on a scheduler that keeps the columns)."""
    from detot_agent.engines import torch_scheduler

    real_decode, real_compact = torch_scheduler.TorchScheduler._decode, torch_scheduler.TorchScheduler._compact

    def widths(trim: bool) -> list[tuple[int, int]]:
        seen: list[tuple[int, int]] = []

        def decode(self, entries):
            out = real_decode(self, entries)
            seen.append((int(self._mask.shape[1]), max(pos for _, pos, _ in entries) + 1))
            return out

        def compact(self):
            if trim:
                return real_compact(self)
            keep = [i for i, s in enumerate(self._slots) if s is not None]
            if len(keep) != len(self._slots):  # rows dropped, columns kept
                for layer in self._running_cache.layers:
                    layer.keys, layer.values = layer.keys[keep], layer.values[keep]
                self._mask, self._slots = self._mask[keep], [self._slots[i] for i in keep]

        monkeypatch.setattr(torch_scheduler.TorchScheduler, "_decode", decode)
        monkeypatch.setattr(torch_scheduler.TorchScheduler, "_compact", compact)
        engine = _engine("torch", tiny_gguf, max_batch_size=4, max_wait_ms=50)
        try:
            out: dict[str, str] = {}
            long_prompt = threading.Thread(target=lambda: out.setdefault(
                "a", engine.complete(_req("Tom has 3 apples and buys 4 more", SYSTEM, max_tokens=3)).text))
            long_prompt.start()
            out["b"] = engine.complete(_req("alpha", max_tokens=30)).text
            long_prompt.join()
        finally:
            engine.close()
        return seen

    kept = widths(trim=False)
    assert any(width > longest for width, longest in kept)  # the violation shows
    assert all(width == longest for width, longest in widths(trim=True))
