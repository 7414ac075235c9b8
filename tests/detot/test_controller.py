"""Controller: accept and roll back on constructed evidence; errors keep the old state serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detot_agent import LocalEngine
from detot_agent.detot.controller import Controller, ControllerConfig
from detot_agent.detot.monitor import Monitor
from detot_agent.detot.records import Evidence, ParsedSample, TaskState
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.errors import ArtefactError
from detot_agent.softprompt.prompt import SoftPrompt


def _monitor() -> Monitor:
    return Monitor(agreement_threshold=0.6, accuracy_threshold=0.5, window=20, min_count=5, cooldown=0)


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer the question."},
            {"role": "user", "content": f"Tom has {i} apples and buys 2 more. How many?"}]


def _evidence(engine_dim: int, targets: list[str], correct: bool | None = None) -> list[Evidence]:
    rng = np.random.default_rng(0)
    return [Evidence(id=f"e{i}", query=rng.standard_normal(engine_dim).astype(np.float32), demo_ids=[],
                     agreement=1.0, messages=_messages(i), target=t, correct=correct) for i, t in enumerate(targets)]


@pytest.fixture
def engine(tiny_model_dir):
    return LocalEngine(str(tiny_model_dir), device="cpu", dtype="float32")


def _with_head(te: TaskEmbedding, engine, components: int = 0) -> TaskEmbedding:
    te.attach_head(SoftPrompt.initialize(engine, "t", k=4, init="vocab").vectors, components=components,
                   model_id=engine.source.spec)
    return te


LOOP_UPDATE = {"steps": 25, "retrieval_steps": 40, "head_lr": 0.05, "dropout": 0.0}


def _controller(engine, index, components: int = 0, **cfg) -> tuple[Controller, Monitor]:
    te = _with_head(TaskEmbedding("t", np.ones(384, dtype=np.float32), encoder_name=index.encoder_name), engine,
                    components)
    mon = _monitor()
    config = ControllerConfig(min_evidence=6, holdout_every=3, update=LOOP_UPDATE, margin=0.0, **cfg)
    return Controller(TaskState(0, te), index=index, monitor=mon, engine=engine, config=config), mon


def test_consistent_evidence_is_accepted(engine, gsm8k_index):
    # varied answers in one format (a constant answer would be harm, and replay rejects it: test_judging.py)
    ctl, mon = _controller(engine, gsm8k_index)
    for ev in _evidence(384, [f"{i} + 2 = {i + 2}. The answer is {i + 2}." for i in range(9)]):
        ctl.add_evidence(ev)
    old = ctl.state
    event = ctl.reoptimize()
    assert event.accepted, event.reason
    assert ctl.state.version == 1 and not torch.equal(ctl.state.soft_prompt, old.soft_prompt)
    assert "soft prompt accepted (held-out NLL" in event.reason and event.new_score > event.old_score
    assert mon.events[-1]["event"] == "reoptimization" and mon.events[-1]["accepted"]
    trained = mon.events[-1]["training"]  # the update's own report travels with the event
    assert trained["steps"] >= 1 and trained["seconds"] > 0 and trained["pauses"] == 0  # nothing was served
    assert old.embedding.version == 0 and ctl.state.embedding is not old.embedding  # the old object is untouched


def test_a_dynamic_head_is_trained_and_judged_per_input(engine, gsm8k_index, encoder):
    ctl, _ = _controller(engine, gsm8k_index, components=2)
    vecs = encoder.encode([gsm8k_index.get(f"train:{i}").text for i in range(1, 10)])
    for i, ev in enumerate(_evidence(384, ["The answer is 5."] * 9)):
        ev.query = vecs[i]
        ctl.add_evidence(ev)
    old = ctl.state
    event = ctl.reoptimize()
    assert event.accepted, event.reason
    new = ctl.state.embedding
    assert new.head.bank.abs().sum() > 0 and old.embedding.head.bank.abs().sum() == 0
    p = new.soft_prompts(vecs[:2])
    assert not torch.allclose(p[0], p[1])  # two inputs, two soft prompts


def test_contradicting_held_out_evidence_is_rolled_back(gsm8k_index, encoder):
    te = TaskEmbedding.from_description("arith", "math word problems", encoder=encoder)
    ctl = Controller(TaskState(0, te), index=gsm8k_index, monitor=_monitor(), engine=None,
                     config=ControllerConfig(min_evidence=6, margin=0.0), k=3)
    vecs = encoder.encode([gsm8k_index.get(f"train:{i}").text for i in range(1, 13)])
    for i, v in enumerate(vecs):
        # training records: two fixed, far-away exemplars helped;
        # held-out records (every third): the exemplars ranked first today were the helpful ones
        held_out = (i + 1) % 3 == 0
        demos = [h.id for h in gsm8k_index.search(te.query(v), 2)] if held_out else ["train:300", "train:301"]
        ctl.add_evidence(Evidence(id=f"q{i}", query=v, demo_ids=demos, agreement=1.0, correct=True))
    old = ctl.state
    event = ctl.reoptimize()
    assert not event.accepted and event.reason.startswith("rolled back: retrieval rolled back")
    assert ctl.state is old and ctl.state.version == 0 and te.version == 0


def test_a_retrieval_that_collapses_every_query_onto_two_demos_is_rolled_back(gsm8k_index, encoder):
    # The same two exemplars "helped" every question; learning that sends every query to them raises the
    # held-out separation, but it is a collapse, and a collapse is refused whatever the proxy says.
    te = TaskEmbedding.from_description("arith", "math word problems", encoder=encoder)
    mon = _monitor()
    ctl = Controller(TaskState(0, te), index=gsm8k_index, monitor=mon, engine=None,
                     config=ControllerConfig(min_evidence=6, margin=0.0), k=3)
    questions = [gsm8k_index.get(f"train:{i}").text for i in range(1, 13)]
    vecs = encoder.encode(questions)
    helpful = ["train:300", "train:301"]
    for i, v in enumerate(vecs):
        ctl.add_evidence(Evidence(id=f"q{i}", query=v, demo_ids=helpful, agreement=1.0, correct=True))
    old = ctl.state
    event = ctl.reoptimize()
    assert not event.accepted and "retrieval collapsed" in event.reason, event.reason
    old_hub, new_hub = event.verdicts[0]["stats"]["demo_hub_share"]
    assert new_hub > 0.5 and old_hub < 0.25
    assert ctl.state is old and te.version == 0


def test_retrieval_is_judged_by_separating_good_demos_from_poor_ones(gsm8k_index, encoder):
    # Held-out demos are always the old query's own top results, so the old state wins on plain MRR.
    # Here the held-out *poor* answers used today's top exemplars and the good ones used the helpful
    # pair: a query that learnt to prefer the helpful pair separates them better and is kept.
    te = TaskEmbedding.from_description("arith", "math word problems", encoder=encoder)
    ctl = Controller(TaskState(0, te), index=gsm8k_index, monitor=_monitor(), engine=None,
                     config=ControllerConfig(min_evidence=6, margin=0.0), k=3)
    vecs = encoder.encode([gsm8k_index.get(f"train:{i}").text for i in range(1, 19)])
    helpful = ["train:300", "train:301"]
    for i, v in enumerate(vecs):
        poor = i % 6 == 5  # every other held-out record
        demos = [h.id for h in gsm8k_index.search(te.query(v), 2)] if poor else helpful
        ctl.add_evidence(Evidence(id=f"q{i}", query=v, demo_ids=demos, agreement=1.0, correct=not poor))
    event = ctl.reoptimize()
    # the measure sees the better separation; whether the change is kept is the collapse guard's call
    assert "separation" in event.reason and event.new_score > event.old_score, event.reason
    assert event.accepted == ("collapsed" not in event.reason)


def test_one_object_is_rolled_back_whole_when_one_side_fails(engine, gsm8k_index, encoder):
    # The soft prompt learns the held-out targets; the retrieval change contradicts the held-out demos.
    # One object, one decision: the candidate is not published, not even its better soft prompt.
    te = _with_head(TaskEmbedding.from_description("arith", "math word problems", encoder=encoder), engine)
    config = ControllerConfig(min_evidence=6, holdout_every=3, update=LOOP_UPDATE, margin=0.0)
    ctl = Controller(TaskState(0, te), index=gsm8k_index, monitor=_monitor(), engine=engine, config=config, k=3)
    vecs = encoder.encode([gsm8k_index.get(f"train:{i}").text for i in range(1, 13)])
    for i, v in enumerate(vecs):
        held_out = (i + 1) % 3 == 0
        demos = [h.id for h in gsm8k_index.search(te.query(v), 2)] if held_out else ["train:300", "train:301"]
        ctl.add_evidence(Evidence(id=f"q{i}", query=v, demo_ids=demos, agreement=1.0, messages=_messages(i),
                                  target="The answer is 5.", correct=True))
    old = ctl.state
    event = ctl.reoptimize()
    assert not event.accepted and "soft prompt accepted" in event.reason and "retrieval rolled back" in event.reason
    assert [v["accepted"] for v in event.verdicts] == [True, False]
    assert ctl.state is old and te.version == 0


def test_too_little_evidence_and_errors_keep_the_old_state(engine, gsm8k_index, monkeypatch):
    ctl, _ = _controller(engine, gsm8k_index)
    old = ctl.state
    assert "only 0 evidence records" in ctl.reoptimize().reason and ctl.state is old
    for ev in _evidence(384, ["The answer is 5."] * 9):
        ctl.add_evidence(ev)

    def boom(*a, **k):
        raise RuntimeError("out of memory while training")

    monkeypatch.setattr(TaskEmbedding, "update", boom)
    event = ctl.reoptimize()
    assert not event.accepted and "RuntimeError: out of memory while training" in event.error
    assert ctl.state is old


def test_nothing_is_trained_when_the_held_out_records_cannot_judge_it(engine, gsm8k_index, monkeypatch):
    ctl, _ = _controller(engine, gsm8k_index)
    for i, ev in enumerate(_evidence(384, ["The answer is 5."] * 9)):
        if (i + 1) % 3 == 0:  # the held-out records: low agreement, so no target to learn or judge by
            ev.agreement = 0.2
        ctl.add_evidence(ev)
    trained: list[int] = []
    monkeypatch.setattr(TaskEmbedding, "update", lambda *a, **k: trained.append(1))
    old = ctl.state
    event = ctl.reoptimize()
    assert not event.accepted and "without training" in event.reason and "3 held-out records" in event.reason
    assert trained == [] and ctl.state is old


def test_background_submit_runs_once_at_a_time(engine, gsm8k_index):
    ctl, _ = _controller(engine, gsm8k_index)
    for ev in _evidence(384, ["The answer is 5."] * 9):
        ctl.add_evidence(ev)
    first = ctl.submit()
    second = ctl.submit()
    assert first is not None and (second is None or first.done())
    event = ctl.wait(timeout=120)
    assert event is not None and event.version_before == 0
    ctl.close()


def test_gold_feedback_picks_the_matching_sample_as_target(engine, gsm8k_index):
    ctl, _ = _controller(engine, gsm8k_index)
    ev = Evidence(id="x", query=np.zeros(384, dtype=np.float32), demo_ids=[], agreement=0.5, target="wrong 3",
                  samples=[ParsedSample("wrong 3", key="3"), ParsedSample("right 4", key="4")])
    ctl.add_evidence(ev)
    ctl.record_outcome("x", correct=False, gold_key="4")
    assert ev.learn_target(0.75) == "right 4"


def test_the_evidence_log_rebuilds_the_buffer_with_outcomes_and_evictions(tmp_path):
    from detot_agent.detot.judging import Replayed

    log = tmp_path / "evidence.jsonl"
    config = ControllerConfig(evidence_size=6, min_evidence=6, holdout_every=3)
    live = Controller(TaskState(2, None), index=None, monitor=_monitor(), config=config, evidence_log=log)
    for i, ev in enumerate(_evidence(8, [f"The answer is {i}." for i in range(9)])):
        ev.samples = [ParsedSample(f"The answer is {i}.", key=str(i), tokens=7, logprob=-1.5,
                                   fields={"answer": str(i)}), ParsedSample("junk", tokens=3, strategy="pot")]
        ev.version, ev.inputs, ev.served = 2, {"question": f"q{i}"}, Replayed(str(i), 0.5, ("d1", "d2"))
        live.add_evidence(ev)
        if i % 2 == 0:
            live.record_outcome(ev.id, correct=i % 4 == 0, gold_key=str(i))
    live.record_outcome("e0", correct=True)  # evicted: changes nothing, logs nothing
    again = Controller(TaskState(2, None), index=None, monitor=_monitor(), config=config, evidence_log=log)
    assert again.restore_evidence() == 6
    got, want = again.evidence(), live.evidence()
    assert [e.id for e in got] == [e.id for e in want] == [f"e{i}" for i in range(3, 9)]
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g.query, w.query) and g.query.dtype == np.float32
        assert (g.correct, g.gold_key, g.gold_target, g.samples, g.served, g.inputs, g.messages, g.version) == (
            w.correct, w.gold_key, w.gold_target, w.samples, w.served, w.inputs, w.messages, w.version)
    assert again.evidence()[1].gold_target == "The answer is 4." and again.evidence()[0].correct is None
    # restoring reads the log without writing to it; outcomes recorded later reach the restored record
    size = log.stat().st_size
    again.restore_evidence()
    assert log.stat().st_size == size
    again.record_outcome("e3", correct=False)
    assert again.evidence()[0].correct is False


def test_a_malformed_evidence_line_is_refused_with_its_line_number(tmp_path):
    log = tmp_path / "evidence.jsonl"
    live = Controller(TaskState(0, None), index=None, monitor=_monitor(), evidence_log=log)
    for ev in _evidence(4, ["a", "b"]):
        live.add_evidence(ev)
    lines = log.read_text().splitlines()
    broken = lines[0].replace('"query": "', '"query": "!!')
    log.write_text("\n".join([broken, lines[1]]) + "\n")
    with pytest.raises(ArtefactError, match=r"line 1: .*malformed"):
        Controller(TaskState(0, None), index=None, monitor=_monitor(), evidence_log=log).restore_evidence()
    log.write_text("\n".join([lines[0], '{"kind": "note"}', lines[1]]) + "\n")
    with pytest.raises(ArtefactError, match=r"line 2: unknown kind 'note'"):
        Controller(TaskState(0, None), index=None, monitor=_monitor(), evidence_log=log).restore_evidence()
    with pytest.raises(ValueError, match="no log to read"):
        Controller(TaskState(0, None), index=None, monitor=_monitor()).restore_evidence()
