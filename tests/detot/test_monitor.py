"""Monitor: windows, triggers, cooldown, event log."""

from __future__ import annotations

import json

import pytest

from detot_agent.detot.monitor import Monitor, Observation, ReoptimizationEvent
from detot_agent.errors import ArtefactError


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


def _logged_run(log, *, stop_after: int) -> Monitor:
    """Five good answers, five bad (a trigger at the third), a rejected re-optimization, then `stop_after`
    more bad answers: the cooldown of 4 is running when the process stops."""
    m = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=5, min_count=3, cooldown=4, log_path=log)
    for i in range(5):
        m.observe(_obs(i, 1.0))
    for i in range(5, 10):
        m.observe(_obs(i, 0.25))
    m.feedback("q9", False)
    m.reoptimized(ReoptimizationEvent(accepted=False, reason="rejected", version_before=0, version_after=0))
    for i in range(10, 10 + stop_after):
        m.observe(_obs(i, 0.25))
    return m


def test_restore_goes_on_with_the_window_the_count_and_the_cooldown_of_the_log(tmp_path):
    log = tmp_path / "events.jsonl"
    before = _logged_run(log, stop_after=2)
    resumed = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=5, min_count=3, cooldown=4,
                      log_path=log)
    assert resumed.restore() == 12
    assert resumed.stats() == before.stats()  # the same window (feedback included) and count
    assert resumed.stats()["known"] == 1 and resumed.last_reopt_at == 10
    # two more observations finish the cooldown, and one more makes min_count (3) fresh answers, on which the
    # re-optimization can train (the controller's evidence is not in the log)
    assert [resumed.observe(_obs(i, 0.25)) for i in (12, 13)] == [None, None]
    assert resumed.observe(_obs(14, 0.25)) is not None


def test_a_monitor_not_restored_ignores_the_cooldown_after_a_resume(tmp_path):
    log = tmp_path / "events.jsonl"
    _logged_run(log, stop_after=2)
    fresh = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=5, min_count=3, cooldown=4,
                    log_path=log)
    fired = [fresh.observe(_obs(i, 0.25)) for i in range(12, 15)]
    assert fired[-1] is not None  # what `restore` prevents: a trigger two answers into the cooldown's last two


def test_restore_after_an_accepted_change_and_a_lost_trigger(tmp_path):
    log = tmp_path / "events.jsonl"
    m = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=5, min_count=3, cooldown=0, log_path=log)
    for i in range(3):
        m.observe(_obs(i, 0.25))
    m.reoptimized(ReoptimizationEvent(accepted=True, reason="accepted", version_before=0, version_after=1))
    for i in range(3, 6):
        m.observe(_obs(i, 0.25))  # the third raises a trigger; the process stops before it finishes
    assert m.pending
    resumed = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=5, min_count=3, cooldown=0,
                      log_path=log)
    resumed.restore()
    assert resumed.stats()["count"] == 3  # the accepted change cleared the window: only the answers after it
    assert not resumed.pending
    fired = [resumed.observe(_obs(i, 0.25)) for i in range(6, 9)]
    assert fired[:2] == [None, None] and fired[2] is not None  # raised again after min_count fresh answers
    # with the evidence restored too, it need not wait: it decides on the next answer as the stopped one would
    again = Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=5, min_count=3, cooldown=0,
                    log_path=log)
    again.restore(wait_for_fresh=False)
    assert again.observe(_obs(6, 0.25)) is not None


def test_restore_refuses_a_malformed_event_naming_its_line(tmp_path):
    log = tmp_path / "events.jsonl"
    log.write_text(json.dumps({"event": "observation", "id": "q1", "agreement": 0.5, "samples": 2, "tokens": 9,
                               "latency_s": 0.1}) + "\n"
                   + json.dumps({"event": "observation", "id": "q2", "agreement": 1.5}) + "\n")
    with pytest.raises(ArtefactError, match=r"events.jsonl line 2: invalid observation event"):
        Monitor(log_path=log).restore()
    with pytest.raises(ValueError, match="no log to read"):
        Monitor().restore()
