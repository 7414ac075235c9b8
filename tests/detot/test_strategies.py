"""Program of thought and the CoT/PoT mix inside DETOT, on a batched engine with scripted decoding."""

from __future__ import annotations

import dspy
import pytest
from scripted import scripted_lm, scripted_local_lm

from detot_agent import DETOT, TaskProfile, analyze
from detot_agent.detot.adapters import PlainAdapter
from detot_agent.detot.strategies import parse_program, rationale_to_program
from detot_agent.errors import ConfigError
from detot_agent.retrieval.index import ExemplarIndex

ARITH = TaskProfile(name="arith", description="adding two numbers", kind="arithmetic", answer_format="number")
Q = "What is 3 plus 4?"


@pytest.fixture(scope="module")
def worked_index(encoder):
    index = ExemplarIndex(encoder)
    index.add([{"id": "w1", "text": "Sam has 5 pens and buys 6 more. How many pens?",
                "fields": {"question": "Sam has 5 pens and buys 6 more. How many pens?",
                           "rationale": "Sam has 5+6 = 11 pens. The answer is 11.", "answer": "11"}},
               {"id": "w2", "text": "Ann has 9 cups and breaks 2. How many cups?",
                "fields": {"question": "Ann has 9 cups and breaks 2. How many cups?",
                           "rationale": "Ann has 9 cups left.", "answer": "7"}}])  # no equation: no program
    return index


def reply(text: str, n: int) -> str:
    if "Python program" in text.rsplit("<|user|>", 1)[-1]:
        return "```python\nfirst = 3\nanswer = first + 4\n```"
    return f"step {n}\nThe answer is {8 if n % 2 else 7}."


def _detot(index, lm, strategy, **adj):
    return DETOT("question -> answer", task=ARITH, index=index, lm=lm, background=False, soft_prompt=False,
                 adapter=PlainAdapter(), adjustments=analyze(ARITH, strategy=strategy, k_exemplars=2, **adj))


def test_pot_asks_for_a_program_runs_it_and_shows_worked_exemplars_as_programs(worked_index, long_tiny_model_dir):
    lm, engine = scripted_local_lm(long_tiny_model_dir, reply, raw=True)
    pred = _detot(worked_index, lm, "pot", stopping="fixed", min_samples=2, max_samples=2)(question=Q)
    assert pred.answer == "7" and pred.votes == {"7": 2.0} and pred.reasoning == "first = 3\nanswer = first + 4"
    prompt = engine.prompts[0]
    assert "step1 = 5 + 6\nanswer = step1" in prompt  # w1's rationale, as a program demo
    assert "Ann has 9 cups" not in prompt  # w2's rationale has no equation: not a PoT demo
    assert prompt.count("Python program") == 2  # the demo's turn and the question's


def test_mix_pools_cot_and_pot_votes(worked_index, long_tiny_model_dir):
    lm, engine = scripted_local_lm(long_tiny_model_dir, reply, raw=True)
    pred = _detot(worked_index, lm, "mix", stopping="fixed", min_samples=4, max_samples=4,
                  greedy_first=False)(question=Q)
    # two CoT samples ("7" then "8" by call parity) and two programs (7): 7 wins 3 to 1
    assert pred.samples_used == 4 and pred.votes == {"7": 3.0, "8": 1.0}
    assert [r.n for r in engine.rows] == [2, 2] and sum("Python program" in p for p in engine.prompts) == 1


def test_a_refused_program_is_an_unparsed_sample(worked_index, long_tiny_model_dir):
    lm, _ = scripted_local_lm(long_tiny_model_dir, lambda t, n: "```python\nimport os\nanswer = 1\n```", raw=True)
    pred = _detot(worked_index, lm, "pot", max_samples=2)(question=Q)
    assert pred.answer is None and pred.parse_failures == 2


def test_pot_needs_a_batched_engine(worked_index):
    lm, _ = scripted_lm(lambda t, n: "7")
    with pytest.raises(ConfigError, match="samples through a batched engine"):
        _detot(worked_index, lm, "pot")(question=Q)
    with pytest.raises(ConfigError, match="strategy"):
        analyze(ARITH, strategy="tot")


def test_rationales_become_programs_only_when_they_compute_the_answer():
    expected = "# Sam has 5+6 = 11 pens.\nstep1 = 5 + 6\nanswer = step1"
    assert rationale_to_program("Sam has 5+6 = 11 pens.", "11") == expected
    assert rationale_to_program("Sam has 5+6 = 11 pens.", "12") is None  # the equations do not give the answer
    assert rationale_to_program("no arithmetic here", "3") is None
    assert rationale_to_program("She earned 0.2 x 50 = $10.", "10") is not None
    assert parse_program("no code, just words") is None
    assert parse_program("```python\nanswer = 10 / 4\n```") == {"reasoning": "answer = 10 / 4", "answer": "2.5"}


def test_the_trace_of_a_pot_call_holds_the_program(worked_index, long_tiny_model_dir):
    lm, _ = scripted_local_lm(long_tiny_model_dir, reply, raw=True)
    program = _detot(worked_index, lm, "pot", max_samples=2)
    with dspy.context(trace=[]):
        program(question=Q)
        (_, _, outputs), = dspy.settings.trace
    assert outputs.answer == "7" and outputs.reasoning.startswith("first = 3")


def test_direct_answers_through_the_adapter_prompt(worked_index, long_tiny_model_dir):
    lm, engine = scripted_local_lm(long_tiny_model_dir, lambda t, n: "7", plain=True)
    pred = _detot(worked_index, lm, "direct", max_samples=2)(question=Q)
    assert pred.answer == "7" and not any("Python program" in p for p in engine.prompts)


def test_pot_fills_the_signatures_own_answer_field(worked_index, long_tiny_model_dir):
    lm, _ = scripted_local_lm(long_tiny_model_dir, reply, raw=True)
    detot = DETOT("question -> total", task=ARITH, index=worked_index, lm=lm, background=False, soft_prompt=False,
                  adapter=PlainAdapter(), demo_fields={"question": "question", "reasoning": "rationale",
                                                       "total": "answer"},
                  adjustments=analyze(ARITH, strategy="pot", k_exemplars=2, max_samples=2))
    pred = detot(question=Q)
    assert pred.total == "7" and pred.answer_key == "7"


def test_the_loop_switches_to_pot_when_gold_shows_it_fixes_cot_and_the_switch_is_saved(worked_index,
                                                                                         long_tiny_model_dir,
                                                                                         tmp_path):
    """CoT replies are always wrong (99), programs right: with a canary set and `policies=[strategy=pot]`, a
    re-optimization adopts PoT, the next call asks for a program, and save/load keeps the policy."""
    import re

    from detot_agent.detot.controller import ControllerConfig
    from detot_agent.detot.task import Policy

    asked = re.compile(r"What is (\d+) plus (\d+)\?")

    def program_right(text: str, n: int) -> str:
        a, b = asked.findall(text)[-1]
        if "Python program" in text.rsplit("<|user|>", 1)[-1]:
            return f"```python\nanswer = {a} + {b}\n```"
        return "The answer is 99."

    lm, engine = scripted_local_lm(long_tiny_model_dir, program_right, raw=True)
    canary = [dspy.Example(question=f"What is {a} plus {b}?", answer=str(a + b)).with_inputs("question")
              for a, b in [(1, 2), (3, 5), (2, 9), (4, 4), (6, 7), (8, 1), (5, 5), (9, 3)]]
    config = ControllerConfig(min_evidence=2, holdout_every=2, max_seconds=None, policies=[Policy(strategy="pot")])
    adj = analyze(ARITH, strategy="cot", k_exemplars=2, stopping="fixed", min_samples=2, max_samples=2)
    detot = DETOT("question -> answer", task=ARITH, index=worked_index, lm=lm, background=False, soft_prompt=False,
                  adapter=PlainAdapter(), controller_config=config, canary=canary, adjustments=adj)
    assert detot(question=Q).answer == "99"  # CoT, wrong
    detot(question="What is 2 plus 2?")
    detot.reoptimize()
    trial = detot.controller.history[-1]
    assert trial.change == "policy strategy=pot" and trial.accepted, trial.reason
    assert trial.verdicts[0]["stats"]["canary_accuracy"] == [0.0, 1.0]
    n_prompts = len(engine.prompts)
    pred = detot(question=Q)
    assert pred.answer == "7" and pred.embedding_version == detot.controller.state.version
    assert all("Python program" in p for p in engine.prompts[n_prompts:])  # the call now asks for a program
    detot.save(tmp_path / "p.json")
    fresh = DETOT("question -> answer", task=ARITH, index=worked_index, lm=lm, background=False, soft_prompt=False,
                  adapter=PlainAdapter(), adjustments=adj)
    assert fresh.controller.state.policy is None
    fresh.load(tmp_path / "p.json")
    assert fresh.controller.state.policy == Policy(strategy="pot") and fresh(question=Q).answer == "7"
