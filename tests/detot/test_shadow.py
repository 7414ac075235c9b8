"""Shadow judging inside a DETOT (`ControllerConfig(judging="shadow")`): a trained candidate answers live requests
in the background; gold feedback decides it with the always-valid test. The engine is scripted and told whether a
row carries the serving soft prompt or the candidate's, so how much better the candidate is is known by
construction."""

from __future__ import annotations

import threading

import pytest
import torch
from scripted import AdditionEngine

from detot_agent import DETOT, TaskProfile, analyze, local_lm
from detot_agent.detot.adapters import PlainAdapter
from detot_agent.detot.controller import ControllerConfig
from detot_agent.errors import ConfigError
from detot_agent.retrieval.index import ExemplarIndex

ARITH = TaskProfile(name="arith", description="adding two numbers", kind="arithmetic", answer_format="number")


class StateEngine(AdditionEngine):
    """`rule(a, b, candidate)`: the answer to "What is a plus b?" under the serving prompt or another one."""

    def __init__(self, model_dir, rule):
        super().__init__(model_dir, rule)
        self.serving: torch.Tensor | None = None

    def kind(self, row):
        return self.serving is not None and not torch.equal(row.soft_prompt, self.serving)


def _detot(index, engine, **shadow):
    cfg = ControllerConfig(judging="shadow", min_evidence=6, update={"steps": 3, "retrieval_steps": 2},
                           max_seconds=None, shadow={"share": 1.0, **shadow})
    program = DETOT("question -> answer", task=ARITH, index=index, lm=local_lm(engine=engine, cache=False),
                    background=False, adapter=PlainAdapter(), controller_config=cfg,
                    adjustments=analyze(ARITH, k_exemplars=0, soft_prompt_k=2, min_samples=1, max_samples=1,
                                        round_size=1, stopping="fixed", greedy_first=True))
    engine.serving = program.task_embedding.head.p0.detach().clone()
    return program


@pytest.fixture(scope="module")
def index(encoder):
    return ExemplarIndex(encoder)


def _serve(program, a, b):
    pred = program(question=f"What is {a} plus {b}?")
    program.feedback(pred, gold=str(a + b))
    return pred


def _start(program, n=12):
    for a in range(n):
        _serve(program, a, 3)
    event = program.reoptimize()
    assert "shadow trial started" in event.reason and not event.accepted, event.reason
    return event


def serving_half(a, b, candidate):
    return str(a + b) if a % 2 == 0 else str(a + b + 1)


def better_by_20(a, b, candidate):
    right = a % 2 == 0 or (candidate and a % 10 in (1, 3))
    return str(a + b) if right else str(a + b + 1)


def test_a_better_candidate_is_accepted_within_a_bounded_number_of_outcomes(index, long_tiny_model_dir):
    engine = StateEngine(long_tiny_model_dir, better_by_20)
    program = _detot(index, engine)
    _start(program)
    version = program.version
    for i in range(300):
        _serve(program, 100 + i, 5)
        if program.version != version:
            break
    event = program.controller.history[-1]
    assert event.accepted and program.version == version + 1, event.reason
    assert "accepted by the sequential test" in event.reason and event.verdicts[0]["losses"] == 0
    assert event.verdicts[0]["outcomes"] <= 150  # about 20 wins at +20 points
    # the run report: the trial's start is no decision (it would read as a rejection), its end is, with evidence
    from detot_agent.evaluation.report import summarize_method

    summary = summarize_method([], [e.model_dump() for e in program.controller.history])
    assert summary["shadow_trials_started"] == 1, program.controller.history
    assert summary["reoptimizations"] == summary["reoptimizations_accepted"] == 1
    (row,) = summary["decisions"]
    assert row["mode"] == "sequential" and row["test"].startswith(f"{event.verdicts[0]['wins']} wins / 0 losses")
    assert f"(accept at {1 / event.verdicts[0]['level']:.3g})" in row["test"] and "(reject at 10)" in row["test"]
    program.controller.close()


def test_an_equal_candidate_is_never_accepted_and_is_rejected_for_futility(index, long_tiny_model_dir):
    engine = StateEngine(long_tiny_model_dir, serving_half)
    program = _detot(index, engine, rules={"min_effect": 0.05})
    _start(program)
    version = program.version
    for i in range(200):
        _serve(program, 100 + i, 5)
    decided = [e for e in program.controller.history if e.change == "embedding (shadow trial)" and e.verdicts
               and "outcomes" in e.verdicts[0] and "started" not in e.reason]
    assert program.version == version and decided and not decided[-1].accepted
    assert "futility" in decided[-1].reason and decided[-1].verdicts[0]["wins"] == 0
    program.controller.close()


def test_a_collapsed_candidate_is_vetoed_whatever_the_test_says(index, long_tiny_model_dir):
    def constant(a, b, candidate):
        return "7" if candidate else serving_half(a, b, candidate)

    # every one of the 12 requests shadowed (the backlog bound would skip some when shadow answers lag)
    program = _detot(index, StateEngine(long_tiny_model_dir, constant), veto_after=10, max_pending=100)
    _start(program)
    for i in range(12):
        _serve(program, 100 + i, 5)
    program.controller.settle_shadow()  # outcomes whose shadow answers were still running
    event = program.controller.history[-1]
    assert not event.accepted and "vetoed: answers collapsed" in event.reason
    program.controller.close()


def test_the_trial_evidence_and_budget_survive_a_save_and_load(index, long_tiny_model_dir, tmp_path):
    engine = StateEngine(long_tiny_model_dir, better_by_20)
    program = _detot(index, engine)
    _start(program)
    for i in range(5):
        _serve(program, 100 + i, 5)
    program.controller.settle_shadow()
    saved = program.controller.shadow.to_json()
    assert sum(t["wins"] + t["losses"] + t["ties"] for t in saved["tests"].values()) == 5
    program.save(tmp_path / "p.json")
    again = _detot(index, engine)
    again.load(tmp_path / "p.json")
    assert saved["running"]["change"] == "embedding"  # a trained candidate is not saved: its trial does not resume
    assert again.controller.shadow.to_json() == {**saved, "running": None}
    program.controller.close()
    again.controller.close()


def test_shadow_judging_needs_a_replaying_controller():
    from detot_agent.detot.controller import Controller
    from detot_agent.detot.monitor import Monitor
    from detot_agent.detot.records import TaskState

    with pytest.raises(ConfigError, match="needs a replaying controller"):
        Controller(TaskState(0, None), index=None, monitor=Monitor(), config=ControllerConfig(judging="shadow"))


def test_a_failed_shadow_answer_is_no_outcome_and_never_reaches_feedback():
    from detot_agent.detot.records import Replayed, TaskState
    from detot_agent.detot.shadow import ShadowConfig, ShadowJudge

    def broken(state, inputs):
        raise RuntimeError("engine gone")

    judge = ShadowJudge(broken, ShadowConfig(share=1.0))
    judge.propose(TaskState(1, None), "c")
    judge.shadow("q1", {"question": "1 + 1?"}, Replayed("2", 1.0))
    judge.outcome("q1", "2")
    assert judge.drain() is None and judge.trial is not None and judge.trial.test.outcomes == 0
    assert "q1" not in judge.trial.pairs and not judge.trial.gold
    judge.close()


def test_the_shadow_log_holds_each_fed_outcome_once_and_no_failed_answer(tmp_path):
    """`record_to`: one line per outcome the test observed (gold or label-free), none for a failed shadow answer
    nor for a gold answer whose shadow answer is still pending; the lines' outcomes sum to the test's."""
    from detot_agent.detot.records import Replayed, TaskState
    from detot_agent.detot.shadow import ShadowConfig, ShadowJudge

    def answer(state, inputs):
        if inputs["question"] == "broken":
            raise RuntimeError("engine gone")
        return Replayed(inputs["question"], 0.9)

    judge = ShadowJudge(answer, ShadowConfig(share=1.0))
    judge.record_to(tmp_path / "shadow.jsonl")
    judge.propose(TaskState(1, None), "c", "policy k_exemplars=0")
    for rid, q, served in [("a", "4", "4"), ("b", "5", "6"), ("c", "7", "8"), ("d", "broken", "1")]:
        future = judge.shadow(rid, {"question": q}, Replayed(served, 0.5))
        if rid != "d":
            future.result()
    for rid, gold in [("a", "4"), ("b", "5"), ("c", "8"), ("d", "1")]:
        judge.outcome(rid, gold)
    judge.drain()
    rows = judge.log.read()
    assert [(r["request"], r["served"], r["shadow"], r["gold"], r["outcome"]) for r in rows] == [
        ("a", "4", "4", "4", 0), ("b", "6", "5", "5", 1), ("c", "8", "7", "8", -1)]
    assert rows[0]["change"] == "policy k_exemplars=0" and rows[0]["shadow_agreement"] == 0.9
    test = judge.trial.test
    assert sum(r["outcome"] for r in rows) == test.wins - test.losses and len(rows) == test.outcomes
    # each line carries the evidence just after its outcome: a tie leaves the accept e-value at 1, a win raises it,
    # a loss lowers it; the last line's is the test's own
    assert rows[0]["accept_e"] == 1.0 and rows[1]["accept_e"] > 1.0 > rows[2]["accept_e"] / rows[1]["accept_e"]
    assert (rows[-1]["accept_e"], rows[-1]["futility_e"]) == (test.accept_wealth, test.futility_wealth)
    assert rows[-1]["accept_at"] == 1 / judge.budget.level("c") and rows[-1]["reject_at"] == 10.0
    judge.close()

    label_free = ShadowJudge(answer, ShadowConfig(share=1.0, outcomes="agreement"))
    label_free.record_to(tmp_path / "free.jsonl")
    label_free.propose(TaskState(1, None), "c")
    label_free.shadow("a", {"question": "4"}, Replayed("5", 0.5)).result()
    label_free.settle()
    label_free.settle()  # nothing new: nothing written twice
    assert [(r["request"], r["gold"], r["outcome"]) for r in label_free.log.read()] == [(None, None, 1)]
    label_free.close()


def test_a_gold_answer_never_waits_for_its_shadow_answer():
    """The serving path's feedback returns at once; the outcome is fed once the shadow answer is done (the next
    feedback, or `drain`). The violation: waiting for the shadow answer, which `drain` does on purpose."""
    import time

    from detot_agent.detot.records import Replayed, TaskState
    from detot_agent.detot.shadow import ShadowConfig, ShadowJudge

    release = threading.Event()

    def slow(state, inputs):
        release.wait(10)
        return Replayed("2", 1.0)

    judge = ShadowJudge(slow, ShadowConfig(share=1.0))
    judge.propose(TaskState(1, None), "c")
    judge.shadow("q1", {"question": "1 + 1?"}, Replayed("3", 1.0))
    before = time.monotonic()
    assert judge.outcome("q1", "2") is None
    assert time.monotonic() - before < 1.0 and judge.trial.test.outcomes == 0 and judge.trial.gold == {"q1": "2"}
    threading.Timer(0.3, release.set).start()
    before = time.monotonic()
    judge.drain()  # waits for it, then feeds it: the candidate was right, the served answer wrong
    assert time.monotonic() - before >= 0.2 and judge.trial.test.outcomes == 1 and judge.trial.test.wins == 1
    judge.shadow("q2", {"question": "1 + 1?"}, Replayed("3", 1.0)).result()
    judge.outcome("q2", "2")  # done already: fed at once
    assert judge.trial.test.outcomes == 2
    judge.close()
