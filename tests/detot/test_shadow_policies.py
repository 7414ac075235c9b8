"""Shadow judging of policies and the shadow backlog's bound. A policy candidate needs no training, so under
`judging="shadow"` the loop's first trigger starts its trial at once; the scripted engine answers better when a
row carries no soft prompt, so `Policy(soft_prompt=False)` is truly better by construction. The backlog: at most
`ShadowConfig.max_pending` shadow answers queued or running, and a trial's end cancels the queued ones."""

from __future__ import annotations

import threading

import pytest
from scripted import AdditionEngine

from detot_agent import DETOT, TaskProfile, analyze, local_lm
from detot_agent.detot.adapters import PlainAdapter
from detot_agent.detot.controller import ControllerConfig
from detot_agent.detot.policy_trials import policy_key
from detot_agent.detot.records import Replayed, TaskState
from detot_agent.detot.shadow import ShadowConfig, ShadowJudge
from detot_agent.detot.task import Policy
from detot_agent.errors import ArtefactError
from detot_agent.retrieval.index import ExemplarIndex

ARITH = TaskProfile(name="arith", description="adding two numbers", kind="arithmetic", answer_format="number")


class PromptEngine(AdditionEngine):
    """`rule(a, b, with_soft_prompt)`: the answer to "What is a plus b?" with the soft prompt in front or not."""

    def __init__(self, model_dir, rule):
        super().__init__(model_dir, rule)
        self.rows_without_prompt = 0

    def kind(self, row):  # called under the engine's lock
        soft = row.soft_prompt is not None
        self.rows_without_prompt += not soft
        return soft


def better_without_prompt(a, b, soft):
    right = a % 2 == 0 or (not soft and a % 10 in (1, 3))  # +20 points without the prompt
    return str(a + b) if right else str(a + b + 1)


def the_same(a, b, soft):
    return str(a + b) if a % 2 == 0 else str(a + b + 1)


@pytest.fixture(scope="module")
def index(encoder):
    return ExemplarIndex(encoder)


def _detot(index, engine, policies, **shadow):
    cfg = ControllerConfig(judging="shadow", min_evidence=6, update={"steps": 2, "retrieval_steps": 1},
                           max_seconds=None, policies=policies, shadow={"share": 1.0, **shadow})
    return DETOT("question -> answer", task=ARITH, index=index, lm=local_lm(engine=engine, cache=False),
                 background=False, adapter=PlainAdapter(), controller_config=cfg,
                 adjustments=analyze(ARITH, k_exemplars=0, soft_prompt_k=2, min_samples=1, max_samples=1,
                                     round_size=1, stopping="fixed", greedy_first=True))


def _serve(program, a, b=5):
    pred = program(question=f"What is {a} plus {b}?")
    program.feedback(pred, gold=str(a + b))
    return pred


def test_a_better_policy_starts_its_trial_without_training_and_is_accepted(index, long_tiny_model_dir):
    engine = PromptEngine(long_tiny_model_dir, better_without_prompt)
    program = _detot(index, engine, [Policy(soft_prompt=False)])
    for a in range(8):
        _serve(program, a)
    assert engine.rows_without_prompt == 0  # serving uses the soft prompt
    started = program.reoptimize()
    assert started.change == "policy soft_prompt=off (shadow trial)" and not started.decided, started
    assert "shadow trial started" in started.reason and started.training == {}  # nothing was trained
    again = program.reoptimize()  # a trigger during the trial: no decision, no training, the trial named
    assert not again.decided and again.reason == "the shadow trial of policy soft_prompt=off is running; kept it"
    version = program.version
    for i in range(300):
        _serve(program, 100 + i)
        if program.version != version:
            break
    program.controller.settle_shadow()
    event = program.controller.history[-1]
    assert event.accepted and program.version == version + 1, event.reason
    assert event.change == "policy soft_prompt=off (shadow trial)" and event.verdicts[0]["losses"] == 0
    assert event.verdicts[0]["outcomes"] <= 150
    assert program.controller.state.policy == Policy(soft_prompt=False)
    program.controller.shadow.close()  # a shadow answer still running when the trial ended finishes first
    before = engine.rows_without_prompt
    _serve(program, 1000)
    assert engine.rows_without_prompt == before + 1  # the accepted policy serves without the vectors
    program.controller.close()


class BudgetEngine(AdditionEngine):
    """`rule(a, b, max_new_tokens)`: the row's token budget decides (chains cut off below 320 tokens)."""

    def __init__(self, model_dir, rule):
        super().__init__(model_dir, rule)
        self.budgets: list[int] = []

    def kind(self, row):  # called under the engine's lock
        self.budgets.append(row.max_new_tokens)
        return row.max_new_tokens


def right_with_320_tokens(a, b, budget):
    right = a % 2 == 0 or (budget >= 320 and a % 10 in (1, 3))  # +20 points with the longer budget
    return str(a + b) if right else str(a + b + 1)


@pytest.mark.parametrize("rule, accepted", [(right_with_320_tokens, True), (the_same, False)])
def test_a_policy_can_give_chains_more_tokens_and_is_judged_like_any_other(index, long_tiny_model_dir, rule,
                                                                          accepted):
    """`Policy(max_tokens=320)`: the candidate's rows ask for 320 new tokens, the serving state's for the task's
    256; accepted only where the budget truly helps (where it does not, the budget must not change)."""
    engine = BudgetEngine(long_tiny_model_dir, rule)
    program = _detot(index, engine, [Policy(max_tokens=320)], rules={"min_effect": 0.05})
    program.adjustments = program.adjustments.model_copy(update={"max_tokens": 256})
    for a in range(8):
        _serve(program, a)
    assert set(engine.budgets) == {256}
    key = policy_key(Policy(max_tokens=320), program.controller.state)
    started = program.reoptimize()
    assert started.change == "policy max_tokens=320 (shadow trial)", started
    for i in range(300):
        _serve(program, 100 + i)
        if program.controller.shadow.decided(key):
            break
    program.controller.settle_shadow()
    assert 320 in engine.budgets  # the candidate's shadow answers asked for more
    decided = [e for e in program.controller.history if e.decided]
    assert decided and decided[-1].accepted is accepted, decided[-1].reason
    program.controller.shadow.close()
    n = len(engine.budgets)
    _serve(program, 1000)
    assert engine.budgets[n:] == [320 if accepted else 256]
    program.controller.close()


def test_a_policy_trial_interrupted_by_a_restart_goes_on_with_its_evidence(index, long_tiny_model_dir, tmp_path):
    """The saved state names the running trial; a program loading it restarts that policy's trial at once, its
    paired outcomes kept. The violation: a program whose policies do not include it starts nothing."""
    engine = PromptEngine(long_tiny_model_dir, the_same)
    program = _detot(index, engine, [Policy(soft_prompt=False)])
    for a in range(8):
        _serve(program, a)
    key = policy_key(Policy(soft_prompt=False), program.controller.state)
    program.reoptimize()
    for i in range(6):
        _serve(program, 100 + i)
    program.controller.settle_shadow()
    outcomes = program.controller.shadow.trial.test.outcomes
    assert outcomes > 0
    program.save(tmp_path / "p.json")
    program.controller.close()
    again = _detot(index, engine, [Policy(soft_prompt=False)])
    again.load(tmp_path / "p.json")
    trial = again.controller.shadow.trial
    assert trial is not None and trial.key == key and trial.test.outcomes == outcomes
    assert "continuing its" in again.controller.history[-1].reason
    assert not any("shadow trial started" in str(e.get("reason")) for e in again.monitor.events)  # not a new start
    _serve(again, 200)
    again.controller.settle_shadow()
    assert again.controller.shadow.trial.test.outcomes == outcomes + 1
    again.controller.close()
    other = _detot(index, engine, [Policy(weighting="cisc")])
    other.load(tmp_path / "p.json")
    assert other.controller.shadow.trial is None and other.controller.shadow.tests[key].outcomes == outcomes
    other.controller.close()


def test_a_saved_running_trial_that_is_not_a_key_and_change_is_refused():
    judge = ShadowJudge(lambda state, inputs: Replayed("2", 1.0), ShadowConfig())
    saved = judge.to_json()
    with pytest.raises(ArtefactError, match="'running' must be null"):
        judge.restore({**saved, "running": "policy x"})
    judge.close()


def test_an_equal_policy_is_rejected_then_the_loop_trains_the_embedding(index, long_tiny_model_dir):
    """The next trigger after a decided policy goes on to the embedding (a decided policy is not re-proposed:
    re-proposing it would be the violation)."""
    engine = PromptEngine(long_tiny_model_dir, the_same)
    program = _detot(index, engine, [Policy(soft_prompt=False)], rules={"min_effect": 0.05})
    for a in range(8):
        _serve(program, a)
    program.reoptimize()
    for i in range(200):
        _serve(program, 100 + i)
    program.controller.settle_shadow()
    decided = [e for e in program.controller.history if e.decided and e.change.startswith("policy")]
    assert decided and not decided[-1].accepted and "futility" in decided[-1].reason
    assert program.controller.state.policy is None
    key = decided[-1].verdicts[0]["candidate"]
    assert program.controller.shadow.decided(key)
    event = program.reoptimize()
    assert event.change != "policy soft_prompt=off (shadow trial)", event
    assert "shadow trial started" in event.reason and event.change == "embedding (shadow trial)", event.reason
    program.controller.close()


def _blocking_judge(max_pending, when_full="skip"):
    release, calls = threading.Event(), []

    def slow(state, inputs):
        calls.append(inputs["question"])
        release.wait(10)
        return Replayed("2", 1.0)

    judge = ShadowJudge(slow, ShadowConfig(share=1.0, max_pending=max_pending, when_full=when_full))
    judge.propose(TaskState(1, None), "c")
    return judge, release, calls


def test_the_backlog_is_bounded_and_frees_as_answers_finish():
    judge, release, _ = _blocking_judge(max_pending=2)
    futures = [judge.shadow(f"q{i}", {"question": f"{i}?"}, Replayed("3", 1.0)) for i in range(5)]
    assert sum(f is not None for f in futures) == 2 and judge.trial.skipped == 3
    release.set()
    for f in futures[:2]:
        f.result()
    assert judge.trial.pending == 0
    assert judge.shadow("q9", {"question": "9?"}, Replayed("3", 1.0)) is not None  # room again
    judge.close()


def test_without_the_bound_every_selected_request_queues():
    """The violation the bound prevents: a backlog as long as the stream."""
    judge, release, _ = _blocking_judge(max_pending=100)
    futures = [judge.shadow(f"q{i}", {"question": f"{i}?"}, Replayed("3", 1.0)) for i in range(5)]
    assert all(f is not None for f in futures) and judge.trial.skipped == 0
    release.set()
    judge.close()


def _shadow_in_threads(judge, n):
    results, threads = {}, []
    for i in range(n):
        def serve(i=i):
            results[i] = judge.shadow(f"q{i}", {"question": f"{i}?"}, Replayed("3", 1.0))
        threads.append(threading.Thread(target=serve))
        threads[-1].start()
    return results, threads


def test_waiting_for_room_shadows_every_selected_request():
    """`when_full="wait"`: the serving thread waits for room instead of skipping (with `skip` the same three
    requests leave two unshadowed: the bounded-backlog test above)."""
    judge, release, calls = _blocking_judge(max_pending=1, when_full="wait")
    results, threads = _shadow_in_threads(judge, 3)
    threads[0].join(0.5)
    threading.Event().wait(0.3)
    assert len(results) == 1 and judge.trial.pending == 1  # one shadowed, two serving threads waiting
    release.set()
    for t in threads:
        t.join(10)
    assert len(results) == 3 and all(f is not None for f in results.values()) and judge.trial.skipped == 0
    for f in results.values():
        f.result()
    assert sorted(calls) == ["0?", "1?", "2?"]
    judge.close()


def test_a_trial_ending_releases_the_requests_waiting_for_room():
    judge, release, _ = _blocking_judge(max_pending=1, when_full="wait")
    results, threads = _shadow_in_threads(judge, 2)
    threading.Event().wait(0.3)
    assert len(results) == 1
    judge.stop()  # a decision or a new proposal ends the trial: the waiting request goes on, unshadowed
    threads[0].join(5)
    threads[1].join(5)
    assert len(results) == 2 and sum(f is None for f in results.values()) == 1
    release.set()
    judge.close()


def test_ending_a_trial_cancels_its_queued_shadow_answers():
    judge, release, calls = _blocking_judge(max_pending=4)
    futures = [judge.shadow(f"q{i}", {"question": f"{i}?"}, Replayed("3", 1.0)) for i in range(3)]
    while not calls:  # the first has started; the other two are queued
        threading.Event().wait(0.01)
    judge.stop()
    release.set()
    futures[0].result()
    assert futures[1].cancelled() and futures[2].cancelled() and calls == ["0?"]
    judge.close()


@pytest.mark.parametrize("background", [True, False])
def test_shadow_answers_are_background_work_unless_configured_as_equals(background):
    from detot_agent.engines.generation import BACKGROUND

    seen = []

    def replay(state, inputs):
        seen.append(BACKGROUND.get())
        return Replayed("2", 1.0)

    judge = ShadowJudge(replay, ShadowConfig(share=1.0, background=background))
    judge.propose(TaskState(1, None), "c")
    judge.shadow("q1", {"question": "1?"}, Replayed("3", 1.0)).result()
    assert seen == [background]
    judge.close()


def test_shadow_workers_answer_that_many_requests_at_once():
    started, release = threading.Semaphore(0), threading.Event()

    def replay(state, inputs):
        started.release()
        release.wait(10)
        return Replayed("2", 1.0)

    judge = ShadowJudge(replay, ShadowConfig(share=1.0, workers=3))
    judge.propose(TaskState(1, None), "c")
    futures = [judge.shadow(f"q{i}", {"question": f"{i}?"}, Replayed("3", 1.0)) for i in range(4)]
    assert all(started.acquire(timeout=5) for _ in range(3))  # three run together
    assert not started.acquire(timeout=0.3)  # the fourth waits for a worker
    release.set()
    assert [f.result().key for f in futures] == ["2"] * 4
    judge.close()


def test_a_trigger_during_a_trial_is_neither_a_decision_nor_a_trial_start_in_the_report():
    """Logs before 2026-12-07 marked such triggers decided: read as rejections, they made the decisions table lie
    (the violation: counting every logged re-optimization, as the report did)."""
    from detot_agent.evaluation.report import summarize_method

    start = {"event": "reoptimization", "change": "policy soft_prompt=off (shadow trial)", "decided": False,
             "accepted": False, "reason": "shadow trial started: ..."}
    old_kept = {"event": "reoptimization", "change": "embedding", "decided": True, "accepted": False,
                "reason": "a shadow trial of candidate policy soft is running; kept it"}
    new_kept = {**old_kept, "decided": False,
                "reason": "the shadow trial of policy soft_prompt=off is running; kept it"}
    decision = {"event": "reoptimization", "change": "policy soft_prompt=off (shadow trial)", "decided": True,
                "accepted": True, "reason": "accepted by the sequential test: ...", "verdicts": []}
    summary = summarize_method([], [start, old_kept, new_kept, decision])
    counts = summary["shadow_trials_started"], summary["reoptimizations"], summary["reoptimizations_accepted"]
    assert counts == (1, 1, 1)
