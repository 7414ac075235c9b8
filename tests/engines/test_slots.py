"""Where llama.cpp's running sequences sit. With a KV stream per sequence, llama.cpp decodes each run of consecutive
sequence ids (in batch order) as its own pass over the weights, so the batch is sorted by sequence and the
continuous scheduler keeps its running sequences on the lowest slots (a finished sequence's slot is free at once;
the sequence on the highest slot moves into a hole). Outputs do not change (tiny float32 GGUF)."""

from __future__ import annotations

import threading
import time

import numpy as np
from dspy.lm15 import Config, Message, Request

from detot_agent import LlamaCppEngine
from detot_agent.engines.llamacpp_runtime import LlamaContext
from detot_agent.engines.llamacpp_scheduler import ContinuousScheduler


def _req(text: str, **cfg) -> Request:
    return Request(model="m", messages=(Message.user(text),), config=Config(**cfg))


SHORT = _req("alpha beta", max_tokens=6)
WIDE = _req("Tom has 3 apples", temperature=0.9, seed=4, max_tokens=24)  # drawn 3 times, the first greedy


def low_and_consecutive(steps: list[list[int]]) -> bool:
    """Whether every decode step's sequences sit on slots 0..n-1."""
    return all(sorted(slots) == list(range(len(slots))) for slots in steps)


def test_the_check_catches_a_hole():
    assert low_and_consecutive([[0, 1, 2], [1, 0], [0]])
    assert not low_and_consecutive([[0, 1, 2], [1, 2]])
    assert not low_and_consecutive([[0, 2]])


def test_tokens_decoded_out_of_sequence_order_give_each_sequence_its_own_logits(tiny_gguf):
    ctx = LlamaContext(tiny_gguf, n_ctx=128, n_seq_max=3)
    prompt = [5, 9, 14, 3]
    follow = {0: 21, 1: 33, 2: 47}  # a different next token per sequence

    def fill() -> None:
        ctx.clear()
        for s in range(3):
            ctx.decode_tokens([(t, j, s, False) for j, t in enumerate(prompt)])

    alone = {}
    for s, tok in follow.items():
        fill()
        (ix,) = ctx.decode_tokens([(tok, len(prompt), s, True)])
        alone[s] = ctx.logits(ix)
    for order in ([2, 0, 1], [1, 2, 0], [0, 1, 2]):
        fill()
        entries = [(follow[s], len(prompt), s, True) for s in order]
        got = [ctx.logits(ix) for ix in ctx.decode_tokens(entries)]
        for s, lg in zip(order, got, strict=True):
            np.testing.assert_allclose(lg, alone[s], rtol=0, atol=1e-4)


def _run_short_then_long(tiny_gguf, monkeypatch) -> tuple[list[list[int]], dict[str, object], dict]:
    steps: list[list[int]] = []
    decode = ContinuousScheduler._decode

    def recording(self, entries):
        steps.append([slot for _, _, slot in entries])
        return decode(self, entries)

    monkeypatch.setattr(ContinuousScheduler, "_decode", recording)
    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=4, max_wait_ms=0)
    try:
        out: dict[str, object] = {}
        first = threading.Thread(target=lambda: out.setdefault("short", engine.complete(SHORT).text))
        first.start()
        while engine.batch_stats.get("batches", 0) < 1:  # the short row runs on slot 0
            time.sleep(0.001)
        out["wide"] = [s.text for s in engine.sample(WIDE, 3, greedy=1)]  # slots 1-3, then lower
        first.join()
        return steps, out, engine.batch_stats
    finally:
        engine.close()


def test_running_sequences_move_to_the_lowest_slots_and_their_outputs_do_not_change(tiny_gguf, monkeypatch):
    static = LlamaCppEngine(str(tiny_gguf), max_batch_size=4, scheduler="static")
    try:
        expected = {"short": static.complete(SHORT).text, "wide": [s.text for s in static.sample(WIDE, 3, greedy=1)]}
    finally:
        static.close()
    steps, out, stats = _run_short_then_long(tiny_gguf, monkeypatch)
    assert out == expected
    assert low_and_consecutive(steps)
    assert stats["moves"] >= 1  # the wide row's sequences came down when slot 0 was freed


def test_without_moves_the_running_sequences_leave_a_hole(tiny_gguf, monkeypatch):
    monkeypatch.setattr(ContinuousScheduler, "compacts", False)
    steps, _, stats = _run_short_then_long(tiny_gguf, monkeypatch)
    assert stats["moves"] == 0
    assert not low_and_consecutive(steps)  # slot 0 freed, slots 1-3 still decoding


def _bare_core(free: list[int], jobs: list[list[int]]):
    """A continuous core without a model: its slot bookkeeping over jobs holding the given slots."""
    from concurrent.futures import Future

    from detot_agent.engines.continuous import ContinuousCore
    from detot_agent.engines.generation import GenRow
    from detot_agent.engines.prefix_cache import SchedulerStats
    from detot_agent.engines.scheduler_jobs import _Job, _Request

    core = ContinuousCore.__new__(ContinuousCore)
    core._free, core.stats, core._serving_left = list(free), SchedulerStats(), 0.0
    core.dropped, core.moved = [], []
    core._drop = core.dropped.append
    core._move = lambda src, dst: core.moved.append((src, dst))
    core._running = [_Job(GenRow([1], n=len(slots)), _Request(Future(), len(slots)), 0, slots=list(slots))
                     for slots in jobs]
    return core


def test_a_finished_sample_frees_its_slot_at_once_and_its_row_frees_only_what_it_still_holds():
    core = _bare_core([0], [[1, 2, 3]])
    job = core._running[0]
    core._free_slot(job, 1)  # the row's second sample finished; the others still run
    assert core.dropped == [2] and core._free == [0, 2] and job.slots == [1, -1, 3]
    core._free_slot(job, 1)  # already gone: nothing twice
    assert core.dropped == [2]
    core._release(job)
    assert core.dropped == [2, 1, 3] and core._free == [0, 1, 2, 3] and job.slots == []


def test_compaction_moves_the_highest_running_sequences_into_the_lowest_holes():
    core = _bare_core([0, 2], [[1, 3], [5]])
    a, b = core._running
    where = [(a, 0), (a, 1), (b, 0)]
    entries = core._lower_slots([(7, 10, 1), (8, 10, 3), (9, 4, 5)], where)
    assert core.moved == [(5, 0), (3, 2)]
    assert entries == [(7, 10, 1), (8, 10, 2), (9, 4, 0)]  # tokens and positions kept, slots lowered
    assert a.slots == [1, 2] and b.slots == [0] and core._free == [3, 5]
    assert core.stats.moves == 2
