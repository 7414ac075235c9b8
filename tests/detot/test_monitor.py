"""Monitor: windows, triggers, cooldown, event log."""

from __future__ import annotations

import json

from detot_agent.detot.monitor import Monitor, Observation, ReoptimizationEvent


def _obs(i: int, agreement: float) -> Observation:
    return Observation(id=f"q{i}", agreement=agreement, samples=4, tokens=100, latency_s=0.1)


def test_trigger_fires_when_agreement_drops_and_not_during_cooldown(tmp_path):
    log = tmp_path / "events.jsonl"
    m = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=5, min_count=3, cooldown=4, log_path=log)
    assert all(m.observe(_obs(i, 1.0)) is None for i in range(5))
    fired = [m.observe(_obs(i, 0.25)) for i in range(5, 10)]
    first = next(i for i, t in enumerate(fired) if t is not None)
    assert first == 2  # window mean: (1+1+.25+.25+.25)/5 = 0.55 < 0.6 at the third low one
    assert all(t is None for t in fired[first + 1:])  # pending until the re-optimization reports
    m.reoptimized(ReoptimizationEvent(accepted=False, reason="rolled back", version_before=0, version_after=0))
    during = [m.observe(_obs(i, 0.25)) for i in range(10, 13)]
    assert during == [None, None, None]  # cooldown of 4 observations
    assert m.observe(_obs(13, 0.25)) is not None
    kinds = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert kinds.count("trigger") == 2 and kinds.count("reoptimization") == 1 and kinds.count("observation") == 14


def test_accuracy_trigger_from_feedback():
    m = Monitor(agreement_threshold=0.0, accuracy_threshold=0.5, window=10, min_count=3, cooldown=0)
    for i in range(3):
        m.observe(_obs(i, 1.0))
    assert m.feedback("q0", False) is None and m.feedback("q1", False) is None
    trig = m.feedback("q2", True)
    assert trig is not None and "accuracy 0.33 < 0.50 over 3 known outcomes" in trig.reason
    assert m.stats()["accuracy"] == 1 / 3


def test_accepted_reoptimization_restarts_the_window():
    m = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=5, min_count=2, cooldown=0)
    m.observe(_obs(0, 0.1))
    assert m.observe(_obs(1, 0.1)) is not None
    m.reoptimized(ReoptimizationEvent(accepted=True, reason="ok", version_before=0, version_after=1))
    assert m.stats()["count"] == 0
    assert m.observe(_obs(2, 1.0)) is None


def test_memory_is_bounded_while_the_log_keeps_every_event(tmp_path):
    from detot_agent.io.jsonlog import JsonlLog

    log = tmp_path / "events.jsonl"
    m = Monitor(agreement_threshold=0.0, accuracy_threshold=0.0, window=3, min_count=1, cooldown=0, keep_events=5,
                log_path=log)
    for i in range(40):
        m.observe(_obs(i, 0.9))
    assert len(m.events) == 5 and m.events[-1]["id"] == "q39"
    assert m.events_logged == 40 and len(JsonlLog(log).read()) == 40
    assert [e["id"] for e in m.events_since(38)] == ["q38", "q39"]
    assert len(m._by_id) <= 30  # ids of at most ten windows
