"""DETOT under DSPy's machinery on the batched-engine path: traces, history, usage, callbacks, `set_lm`,
optimizers (BootstrapFewShot, MIPROv2, GEPA) and whole-program saving.

The engine is `ScriptedLocalEngine`: the tiny model's tokenizer, chat template, `build_row` and `sample(n)`
run for real; only the decoded text is scripted, so an optimizer's effect on the prompt can be read off.
"""

from __future__ import annotations

import copy
import logging
import re

import dspy
import pytest
from scripted import filling_lm, scripted_lm, scripted_local_lm

from detot_agent import DETOT, TaskProfile, analyze
from detot_agent.detot.adapters import PlainAdapter
from detot_agent.retrieval.index import ExemplarIndex

ARITH = TaskProfile(name="arith", description="adding two numbers", kind="arithmetic", answer_format="number")
_ASKED = re.compile(r"What is (\d+) plus (\d+)\?")

TRAIN = [(3, 4), (10, 5), (6, 6), (12, 9), (7, 1), (2, 8)]
VAL = [(11, 3), (5, 9), (4, 13), (8, 8)]


def _examples(pairs):
    return [dspy.Example(question=f"What is {a} plus {b}?", answer=str(a + b)).with_inputs("question")
            for a, b in pairs]


def _last_sum(text: str) -> int:
    a, b = _ASKED.findall(text)[-1]  # the last question in the prompt is the one asked
    return int(a) + int(b)


def right(text: str, n: int) -> str:
    return str(_last_sum(text))


def metric(example, pred, trace=None):
    return str(pred.answer).strip() == example.answer


@pytest.fixture(scope="module")
def small_index(encoder):
    index = ExemplarIndex(encoder)
    index.add([{"id": f"e{i}", "text": f"What is {i} plus {i + 20}?",
                "fields": {"question": f"What is {i} plus {i + 20}?", "rationale": f"{i} + {i + 20} = {2 * i + 20}.",
                           "answer": str(2 * i + 20)}} for i in range(1, 7)])
    return index


class MathQA(dspy.Module):
    """A user's program with DETOT inside."""

    def __init__(self, index, lm, **adj):
        super().__init__()
        self.solve = DETOT("question -> answer", task=ARITH, index=index, lm=lm, background=False,
                           soft_prompt=False, adapter=PlainAdapter(),
                           adjustments=analyze(ARITH, **({"k_exemplars": 1, "max_samples": 4} | adj)))

    def forward(self, question):
        return self.solve(question=question)


# ---- what one call leaves behind --------------------------------------------------------------------------
def test_the_trace_holds_the_winning_sample_and_history_usage_and_callbacks_hold_every_round(small_index,
                                                                                             long_tiny_model_dir):
    # greedy first sample wrong, the sampled ones right: the vote (and so the trace) must take a later one
    lm, engine = scripted_local_lm(long_tiny_model_dir, lambda t, n: "99" if n == 0 else right(t, n), plain=True)
    program = MathQA(small_index, lm, stopping="fixed", min_samples=2, round_size=2, max_samples=4)
    seen = []

    class Spy(dspy.utils.BaseCallback):
        def on_lm_start(self, call_id, instance, inputs):
            seen.append(("start", instance, inputs["kwargs"]["n"]))

        def on_lm_end(self, call_id, outputs, exception=None):
            seen.append(("end", outputs, exception))

    with dspy.context(trace=[], track_usage=True, callbacks=[Spy()]):
        pred = program(question="What is 3 plus 4?")
        trace = list(dspy.settings.trace)
    assert pred.answer == "7" and pred.samples_used == 4
    assert len(trace) == 1
    predictor, inputs, outputs = trace[0]
    assert predictor is program.solve.predictor.predict
    assert inputs == {"question": "What is 3 plus 4?"}
    assert outputs.answer == "7" and outputs.reasoning.startswith("step ") and outputs.reasoning != "step 0"
    # two rounds of `sample(n)`: two LM calls in history, callbacks and usage
    assert [e["kwargs"]["n"] for e in lm.history] == [2, 2]
    assert lm.history[0]["outputs"][0].endswith("The answer is 99.")
    prompt_tokens = len(engine.rows[0].prompt_ids)
    completion = sum(len(engine.tokenizer(t, add_special_tokens=False)["input_ids"])
                     for e in lm.history for t in e["outputs"])
    usage = pred.get_lm_usage()[lm.model]
    assert usage["prompt_tokens"] == 2 * prompt_tokens and usage["completion_tokens"] == completion == pred.tokens
    assert [s[0] for s in seen] == ["start", "end", "start", "end"]
    assert seen[0][1] is lm and seen[0][2] == 2 and seen[1][1] == lm.history[0]["outputs"]


def test_no_parseable_sample_leaves_no_trace(small_index, long_tiny_model_dir):
    lm, _ = scripted_local_lm(long_tiny_model_dir, lambda t, n: None, plain=True)
    with dspy.context(trace=[]):
        pred = MathQA(small_index, lm)(question="What is 3 plus 4?")
        assert pred.answer is None and dspy.settings.trace == []


def test_a_replay_for_judging_records_nothing(small_index, long_tiny_model_dir):
    lm, engine = scripted_local_lm(long_tiny_model_dir, right, plain=True)
    program = MathQA(small_index, lm)
    with dspy.context(trace=[]):
        replayed = program.solve._replay(program.solve.controller.state, {"question": "What is 3 plus 4?"})
        assert dspy.settings.trace == []
    assert replayed.key == "7" and engine.calls > 0 and lm.history == []


# ---- which LM a call uses ----------------------------------------------------------------------------------
def test_set_lm_and_dspy_context_are_honoured_on_the_local_path(small_index, long_tiny_model_dir):
    first, e1 = scripted_local_lm(long_tiny_model_dir, right, plain=True)
    second, e2 = scripted_local_lm(long_tiny_model_dir, right, plain=True)
    unset = MathQA(small_index, None)
    with dspy.context(lm=first):
        assert unset(question="What is 3 plus 4?").answer == "7"
    assert e1.calls > 0 and e2.calls == 0
    program = MathQA(small_index, first)
    program.set_lm(second)  # DSPy's way: the LM goes on every predictor, DETOT's inner one included
    calls = e1.calls
    assert program(question="What is 3 plus 4?").answer == "7"
    assert e1.calls == calls and e2.calls > 0


def test_rollouts_keep_their_temperature_and_rollout_id_when_an_lm_is_set_on_the_predictor(small_index):
    lm, engine = scripted_lm(lambda t, n: "7")
    program = MathQA(small_index, None, stopping="fixed", min_samples=4, max_samples=4, temperature=0.6)
    program.set_lm(lm)
    temps = []
    original = engine.complete

    def spy(request):
        temps.append(request.config.temperature)
        return original(request)

    engine.complete = spy
    pred = program(question="What is 3 plus 4?")
    assert pred.samples_used == 4 and engine.calls == 4
    assert temps == [0.0, 0.6, 0.6, 0.6]  # greedy first, then the DETOT temperature, not the LM's default
    # each sampled rollout goes out under its own id, so DSPy's cache cannot fold them into one
    seen_ids = []
    real_copy = lm.copy

    def copy_spy(**kw):
        seen_ids.append(kw.get("rollout_id"))
        return real_copy(**kw)

    lm.copy = copy_spy
    program(question="What is 5 plus 4?")
    assert seen_ids[0] is None and len(set(seen_ids[1:])) == 3


# ---- optimizers --------------------------------------------------------------------------------------------
def test_bootstrap_fewshot_attaches_winning_demos_that_reach_the_next_prompt_and_survive_save(
        small_index, long_tiny_model_dir, tmp_path):
    lm, engine = scripted_local_lm(long_tiny_model_dir, lambda t, n: "99" if n % 4 == 0 else right(t, n),
                                   plain=True)
    program = MathQA(small_index, lm, stopping="fixed", min_samples=4, max_samples=4)
    tp = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=2, max_labeled_demos=0, max_rounds=1)
    compiled = tp.compile(program, trainset=_examples(TRAIN))
    demos = compiled.solve.predictor.predict.demos
    assert len(demos) == 2 and all(d.augmented for d in demos)
    assert all(d.answer == str(_last_sum(d.question)) for d in demos)  # the winners, never the greedy "99"
    pred = compiled(question="What is 30 plus 12?")
    last = engine.prompts[-1]
    retrieved = small_index.get(pred.demo_ids[0]).fields["question"]
    # order: the attached demos first, then the retrieved one, then the question
    assert last.index(demos[0].question) < last.index(demos[1].question) < last.index(retrieved) < last.index(
        "What is 30 plus 12?")
    compiled.save(tmp_path / "p.json")
    fresh = MathQA(small_index, lm, stopping="fixed", min_samples=4, max_samples=4)
    fresh.load(tmp_path / "p.json")
    assert [d["question"] for d in fresh.solve.predictor.predict.demos] == [d.question for d in demos]
    assert fresh.solve._lm() is lm  # the LM is not saved and loading keeps the one the program has


def test_bootstrap_fewshot_attaches_nothing_when_every_trace_fails_the_metric(small_index, long_tiny_model_dir):
    lm, _ = scripted_local_lm(long_tiny_model_dir, lambda t, n: "99", plain=True)
    tp = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=2, max_labeled_demos=0, max_rounds=1)
    compiled = tp.compile(MathQA(small_index, lm), trainset=_examples(TRAIN))
    assert compiled.solve.predictor.predict.demos == []


def test_a_retrieved_exemplar_never_hands_the_model_its_own_question(small_index, long_tiny_model_dir):
    lm, engine = scripted_local_lm(long_tiny_model_dir, right, plain=True)
    pred = MathQA(small_index, lm, k_exemplars=2)(question="What is 1 plus 21?")  # exemplar e1's question
    assert "e1" not in pred.demo_ids and len(pred.demo_ids) == 2
    assert engine.prompts[-1].count("What is 1 plus 21?") == 1


def _instructed(tag):
    """A model that answers right only when `tag` is in its prompt (so the optimizer must find the tag)."""
    return lambda text, n: right(text, n) if tag in text else "0"


def test_mipro_proposes_an_instruction_that_reaches_the_prompt(small_index, long_tiny_model_dir, tmp_path):
    lm, engine = scripted_local_lm(long_tiny_model_dir, _instructed("MIPRO-TAG"), plain=True)
    prompt_lm, _ = filling_lm(lambda field: "Add the two numbers. MIPRO-TAG" if "instruction" in field else "ok")
    program = MathQA(small_index, lm, stopping="fixed", min_samples=1, max_samples=1)
    assert metric(_examples(VAL)[0], program(**_examples(VAL)[0].inputs())) is False
    tp = dspy.MIPROv2(metric=metric, prompt_model=prompt_lm, task_model=lm, auto=None, num_candidates=2,
                      max_bootstrapped_demos=1, max_labeled_demos=0, num_threads=1, verbose=False, seed=0)
    compiled = tp.compile(program, trainset=_examples(TRAIN), valset=_examples(VAL), num_trials=3, minibatch=False)
    instructions = compiled.solve.predictor.predict.signature.instructions
    assert "MIPRO-TAG" in instructions
    pred = compiled(question="What is 30 plus 12?")
    assert pred.answer == "42" and "MIPRO-TAG" in engine.prompts[-1]
    compiled.save(tmp_path / "m.json")
    fresh = MathQA(small_index, lm)
    fresh.load(tmp_path / "m.json")
    assert "MIPRO-TAG" in fresh.solve.predictor.predict.signature.instructions


def test_gepa_reflects_on_detot_traces_and_its_instruction_reaches_the_prompt(small_index, long_tiny_model_dir,
                                                                            caplog):
    lm, engine = scripted_local_lm(long_tiny_model_dir, _instructed("GEPA-TAG"), plain=True)
    reflection, reflected = filling_lm(lambda field: "Add the two numbers given. GEPA-TAG")

    def feedback_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        ok = str(pred.answer).strip() == gold.answer
        return dspy.Prediction(score=float(ok), feedback="right" if ok else f"wrong: expected {gold.answer}")

    program = MathQA(small_index, lm, stopping="fixed", min_samples=1, max_samples=1)
    tp = dspy.GEPA(metric=feedback_metric, reflection_lm=reflection, max_metric_calls=40, reflection_minibatch_size=2,
                   num_threads=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="dspy"):  # explicit: a CLI test may have quieted DSPy's logger
        compiled = tp.compile(program, trainset=_examples(TRAIN), valset=_examples(VAL))
    assert "No valid reflective examples" not in caplog.text
    # the reflection LM saw DETOT's inputs and its (winning) outputs with the metric's feedback
    assert reflected.calls >= 1 and '"Generated Outputs": {"reasoning": "step' in reflected.prompts[0]
    assert "wrong: expected" in reflected.prompts[0]
    assert "GEPA-TAG" in compiled.solve.predictor.predict.signature.instructions
    assert compiled(question="What is 30 plus 12?").answer == "42" and "GEPA-TAG" in engine.prompts[-1]


# ---- DSPy contract on the local path -----------------------------------------------------------------------
def test_contract_on_the_local_path_named_predictors_deepcopy_evaluate_parallel(small_index, long_tiny_model_dir):
    lm, _ = scripted_local_lm(long_tiny_model_dir, right, plain=True)
    program = MathQA(small_index, lm)
    assert [n for n, _ in program.named_predictors()] == ["solve.predictor.predict"]
    clone = copy.deepcopy(program)
    assert clone.solve.index is program.solve.index and clone.solve._lm() is lm
    assert clone.solve.predictor is not program.solve.predictor
    assert clone.solve.controller is not program.solve.controller
    devset = _examples(VAL)
    result = dspy.Evaluate(devset=devset, metric=metric, num_threads=2, display_progress=False)(program)
    assert result.score == 100.0
    outs = dspy.Parallel(num_threads=2)([(program, ex) for ex in devset])
    assert [o.answer for o in outs] == [ex.answer for ex in devset]


def test_save_program_round_trip_for_detot_and_a_program_holding_it(small_index, long_tiny_model_dir, tmp_path):
    lm, _ = scripted_local_lm(long_tiny_model_dir, right, plain=True)
    program = MathQA(small_index, lm)
    program.solve.predictor.predict.demos = [dspy.Example(question="What is 1 plus 1?", reasoning="1 + 1 = 2.",
                                                          answer="2")]
    program.solve.save(tmp_path / "detot_program", save_program=True)
    again = dspy.load(str(tmp_path / "detot_program"), allow_pickle=True)
    assert isinstance(again, DETOT) and again.version == program.solve.version
    assert again.predictor.predict.demos[0].question == "What is 1 plus 1?"
    assert len(again.index) == len(small_index) and again.task_embedding is not None
    assert again(question="What is 3 plus 4?").answer == "7"
    program.save(str(tmp_path / "whole"), save_program=True)  # DSPy's own save of the user's program
    whole = dspy.load(str(tmp_path / "whole"), allow_pickle=True)
    assert whole(question="What is 30 plus 12?").answer == "42"
    with pytest.raises(Exception, match="without a suffix"):
        program.solve.save(tmp_path / "x.json", save_program=True)
