"""Dynamic batcher: gathering, size limits, error isolation."""

from __future__ import annotations

import threading
import time

import pytest

from detot_agent.engines.batching import DynamicBatcher
from detot_agent.engines.generation import GenOutput, GenRow


def _echo(batches: list[list[int]]):
    def run(rows: list[GenRow]) -> list[list[GenOutput]]:
        batches.append([r.prompt_ids[0] for r in rows])
        if any(r.prompt_ids[0] < 0 for r in rows):
            raise ValueError("negative prompt")
        return [[GenOutput(str(r.prompt_ids[0]))] * r.n for r in rows]
    return run


def test_concurrent_rows_share_a_batch_and_get_their_own_results():
    batches: list[list[int]] = []
    b = DynamicBatcher(_echo(batches), max_batch_size=8, max_wait_ms=200)
    futures = [b.submit(GenRow([i])) for i in range(5)]
    assert [f.result()[0].text for f in futures] == [str(i) for i in range(5)]
    assert len(batches) <= 2 and sorted(x for b in batches for x in b) == list(range(5))
    b.close()


def test_batch_size_counts_samples():
    batches: list[list[int]] = []
    b = DynamicBatcher(_echo(batches), max_batch_size=4, max_wait_ms=100)
    futures = [b.submit(GenRow([i], n=3)) for i in range(3)]
    for f in futures:
        assert len(f.result()) == 3
    assert all(len(x) == 1 for x in batches)  # 3 + 3 > 4: never two rows together
    b.close()


def test_one_failing_row_does_not_fail_its_batch_mates():
    batches: list[list[int]] = []
    b = DynamicBatcher(_echo(batches), max_batch_size=8, max_wait_ms=200)
    good, bad = b.submit(GenRow([1])), b.submit(GenRow([-1]))
    assert good.result()[0].text == "1"
    with pytest.raises(ValueError, match="negative prompt"):
        bad.result()
    b.close()


def test_close_finishes_queued_work_and_refuses_new_rows():
    def slow(rows):
        time.sleep(0.05)
        return [[GenOutput("ok")] for _ in rows]

    b = DynamicBatcher(slow, max_batch_size=1, max_wait_ms=0)
    futures = [b.submit(GenRow([i])) for i in range(3)]
    closer = threading.Thread(target=b.close)
    closer.start()
    closer.join()
    assert all(f.result(timeout=5)[0].text == "ok" for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(GenRow([0]))
