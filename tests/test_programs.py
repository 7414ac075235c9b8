"""The example programs end to end on the tiny model, plus the calculator's whitelist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from programs.agent import CalculatorAgent, calculate

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def train_file(multiarith_head) -> Path:
    return multiarith_head(30)


@pytest.mark.parametrize("name", ["math_qa", "rag_qa", "classify", "agent"])
def test_each_program_has_help(name):
    out = subprocess.run([sys.executable, "-m", f"programs.{name}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.startswith(f"usage: python -m programs.{name}") and "--model" in out


def test_calculator_evaluates_arithmetic():
    assert calculate("17 * 23 * 4") == "1564"
    assert calculate("(3 + 5) / 2") == "4"
    assert calculate("round(10 / 3, 2)") == "3.33"
    assert calculate("2 ^ 10") == "1024" and calculate("-max(1, 7) % 4") == "1"


@pytest.mark.parametrize(("expr", "why"), [
    ("__import__('os').system('ls')", "Call is not allowed|Attribute is not allowed"),
    ("().__class__", "Attribute is not allowed"),
    ("x + 1", "Name is not allowed"),
    ("9 ** 9 ** 9", "power too large"),
    ("1 / 0", "division by zero"),
    ("'a' * 3", "only numbers"),
    ("1 +", "not an arithmetic expression"),
    ("1" * 300, "limit is 200"),
    ("10 ** 40", "out of range"),
])
def test_calculator_refuses_anything_else(expr, why):
    with pytest.raises(ValueError, match=why):
        calculate(expr)


def test_math_qa_answers_with_votes(long_tiny_model_dir, train_file, tmp_path, capsys):
    from programs.math_qa import main

    rc = main(["--question", "Tom has 3 apples and buys 5 more. How many apples?", "--train", str(train_file),
               "--index", str(tmp_path / "index"), "--model", str(long_tiny_model_dir), "--max-tokens", "16",
               "--max-samples", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "A: " in out and "samples; votes" in out and "MultiArith:" in out
    assert (tmp_path / "index").is_dir()  # built once, reused next time


def test_math_qa_without_train_or_index_says_what_to_pass(tmp_path, capsys):
    from programs.math_qa import main

    assert main(["--question", "1+1?", "--index", str(tmp_path / "none")]) == 2
    assert "pass --train FILE" in capsys.readouterr().err


def test_rag_qa_feedback_lifts_the_helpful_passage(long_tiny_model_dir, tmp_path, capsys):
    from programs.rag_qa import main, write_corpus

    corpus = write_corpus(tmp_path / "c.jsonl")
    assert len(corpus) > 20 and all(p["text"] and p["id"] for p in corpus)
    rc = main(["--question", "How do I run the test suite?", "--expect", ".ci/run", "--corpus",
               str(tmp_path / "c.jsonl"), "--model", str(long_tiny_model_dir), "--max-tokens", "16"])
    out = capsys.readouterr().out
    assert rc == 0 and "A: " in out
    line = next(ln for ln in out.splitlines() if ln.startswith("feedback:"))
    before, after = (int(x) for x in line.rsplit("rank ", 1)[1].split(" -> "))
    assert "update accepted" in line and after <= before


def test_classify_scores_against_the_label_set(long_tiny_model_dir, tmp_path, capsys):
    from programs.classify import main

    rows = [("I loved this film", "positive"), ("Wonderful acting", "positive"), ("Terrible plot", "negative"),
            ("I hated it", "negative"), ("A joy to watch", "positive"), ("Boring and long", "negative")]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text": "Great fun", "label": "Positive"}) + "\n")
    rc = main(["--train", str(train), "--test", str(test), "--labels", "positive=pos|good,negative=neg|bad",
               "--model", str(long_tiny_model_dir), "--max-tokens", "12"])
    out = capsys.readouterr().out
    assert rc == 0 and "gold positive" in out and out.strip().splitlines()[-1].startswith("accuracy ")
    test.write_text(json.dumps({"text": "Meh", "label": "neutral"}) + "\n")
    assert main(["--train", str(train), "--test", str(test), "--labels", "positive,negative",
                 "--model", str(long_tiny_model_dir), "--max-tokens", "12"]) == 2
    assert "gold label 'neutral' is not in --labels" in capsys.readouterr().err


def test_agent_calls_the_tool_then_detot_answers(long_tiny_model_dir, train_file, tmp_path):
    import dspy
    from dspy.utils import DummyLM

    from detot_agent import Encoder, ExemplarIndex, local_lm
    from detot_agent.io.datafiles import read_exemplars

    index = ExemplarIndex(Encoder())
    index.add(read_exemplars(train_file))
    lm = local_lm(str(long_tiny_model_dir), cache=False, max_tokens=12, temperature=0.0)
    agent = CalculatorAgent(index, lm=lm, max_iters=3, max_tokens=12)
    # the tool-choosing steps are scripted; the answering step runs DETOT on the tiny model
    script = DummyLM([{"next_thought": "multiply", "next_tool_name": "calculate",
                       "next_tool_args": {"expression": "17 * 23 * 4"}},
                      {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}}])
    with dspy.context(lm=script):
        pred = agent(question="A crate holds 17 boxes of 23 pens. How many pens in 4 crates?")
    assert pred.trajectory["observation_0"] == "1564" and pred.trajectory["tool_name_1"] == "finish"
    assert pred.samples_used >= 1 and "demo_ids" in pred
    # with the tiny model choosing tools too, unreadable choices end the loop and DETOT still answers
    with dspy.context(lm=lm):
        pred = agent(question="What is 2 + 2?")
    assert "trajectory" in pred and pred.samples_used >= 1


def test_math_qa_optimize_compiles_on_problems_it_does_not_evaluate(long_tiny_model_dir, train_file, tmp_path,
                                                                    capsys):
    from programs.math_qa import main

    out = tmp_path / "opt" / "bootstrap.json"
    rc = main(["--optimize", "bootstrap", "--suite", str(train_file), "--train", str(train_file),
               "--index", str(tmp_path / "index"), "--model", str(long_tiny_model_dir), "--eval-size", "5",
               "--train-size", "4", "--max-tokens", "8", "--max-samples", "2", "--threads", "1", "--out", str(out)])
    assert rc == 0 and "bootstrap on" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert len(report["eval_ids"]) == 5 and len(report["train_ids"]) == 4
    assert not set(report["eval_ids"]) & set(report["train_ids"])
    assert len(report["correct_before"]) == len(report["correct_after"]) == 5
    assert out.with_suffix(".program.json").is_file()


def test_compile_and_compare_reports_a_gain_that_comes_from_the_attached_demos(encoder, long_tiny_model_dir):
    import dspy
    from scripted import scripted_local_lm

    from detot_agent import ExemplarIndex
    from programs.math_qa import build, compile_and_compare, split_for_compiling

    index = ExemplarIndex(encoder)
    index.add([{"id": "x", "text": "What is 1 plus 21?", "fields": {"question": "What is 1 plus 21?", "answer": "22"}}])
    problems = [dspy.Example(id=f"p{i}", question=f"What is {i} plus {i + 2}?", answer=str(2 * i + 2))
                .with_inputs("question") for i in range(12)]

    def answer(text, n):  # right only with at least three worked answers shown: the retrieved one is not enough
        a, b = text.rsplit("What is ", 1)[1].split("?")[0].split(" plus ")
        return str(int(a) + int(b)) if text.count("The answer is") >= 3 else "0"

    lm, _ = scripted_local_lm(long_tiny_model_dir, answer, plain=True)
    program = build(index, model=None, max_tokens=16, max_samples=2, questions=[], lm=lm)
    evalset, trainset = split_for_compiling(problems, eval_size=6, train_size=4, seed=0)
    compiled, report = compile_and_compare(program, "bootstrap", evalset, trainset, lm=lm, threads=1, seed=0)
    assert report["accuracy_before"] == 0.0 and report["accuracy_after"] == 1.0
    assert (report["gained"], report["lost"], report["demos_attached"]) == (6, 0, 2)
    assert report["mcnemar_p_two_sided"] == pytest.approx(2 / 2**6)
    assert compiled is not program and program.predictor.predict.demos == []


def _optimize_args(train_file, tmp_path, model_dir, optimizer="bootstrap"):
    return ["--optimize", optimizer, "--suite", str(train_file), "--train", str(train_file),
            "--index", str(tmp_path / "index"), "--model", str(model_dir), "--eval-size", "5",
            "--train-size", "4", "--max-tokens", "8", "--max-samples", "2", "--threads", "1"]


def test_math_qa_optimize_resumes_from_the_compiled_stage_and_reuses_earlier_scores(long_tiny_model_dir, train_file,
                                                                                      tmp_path, capsys):
    from programs.math_qa import main

    out = tmp_path / "opt" / "bootstrap.json"
    args = [*_optimize_args(train_file, tmp_path, long_tiny_model_dir), "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["stage"] == "done" and report["max_tokens"] == 8
    # a run stopped after compiling: its report names the stage, its first scores stand (the tiny model cannot
    # score 5/5: reading these back, not rescoring, is what puts them in the resumed report)
    report.update(stage="compiled", correct_before=[True] * 5, accuracy_before=1.0)
    for key in ("accuracy_after", "correct_after", "gained", "lost"):
        report.pop(key)
    out.write_text(json.dumps(report))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "resuming from the compiled program" in capsys.readouterr().out
    resumed = json.loads(out.read_text())
    assert resumed["stage"] == "done" and resumed["correct_before"] == [True] * 5
    assert resumed["resumed_from_stage"] == "compiled" and resumed["seconds"] >= report["seconds"]
    assert resumed["lost"] == 5 - sum(resumed["correct_after"])
    assert main([*args, "--resume"]) == 0 and "nothing to resume" in capsys.readouterr().out

    # another run borrows the first scoring from the finished report
    borrowed = tmp_path / "opt" / "again.json"
    base = _optimize_args(train_file, tmp_path, long_tiny_model_dir)
    assert main([*base, "--out", str(borrowed), "--before", str(out)]) == 0
    assert json.loads(borrowed.read_text())["correct_before"] == [True] * 5


def test_math_qa_refuses_scores_made_with_other_settings(long_tiny_model_dir, train_file, tmp_path, capsys):
    from programs.math_qa import earlier_scores, main

    settings = {"suite": "s", "model": "m", "adapter": "plain", "max_samples": 2, "max_tokens": 8, "seed": 0,
                "eval_ids": ["a", "b"]}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({**settings, "correct_before": [True, False]}))
    assert earlier_scores(earlier, settings)["correct_before"] == [True, False]
    with pytest.raises(Exception, match="max_samples: 2 there, 6 here"):
        earlier_scores(earlier, {**settings, "max_samples": 6})
    with pytest.raises(Exception, match="other eval_ids"):
        earlier_scores(earlier, {**settings, "eval_ids": ["a", "c"]})
    earlier.write_text(json.dumps({**settings, "max_tokens": 256, "correct_before": [True, False]}))
    with pytest.raises(Exception, match="max_tokens: 256 there, 8 here"):
        earlier_scores(earlier, settings)
    earlier.write_text("{not json")
    with pytest.raises(Exception, match="not a readable --optimize report"):
        earlier_scores(earlier, settings)
    # through the command line: a clear error and exit 2, nothing written
    out = tmp_path / "opt.json"
    rc = main([*_optimize_args(train_file, tmp_path, long_tiny_model_dir), "--out", str(out), "--before", str(earlier)])
    assert rc == 2 and "not a readable --optimize report" in capsys.readouterr().err and not out.exists()


def test_math_qa_runs_the_optimizer_s_own_prompts_on_the_proposer_model(long_tiny_model_dir, train_file, tmp_path,
                                                                          monkeypatch):
    import programs.math_qa as math_qa

    built: list[tuple[str | None, dict]] = []
    real = math_qa.local_lm

    class Stop(Exception):
        pass

    def spy(model=None, **kw):
        built.append((model, kw))
        if len(built) == 2:  # the proposer's engine: enough seen, skip the compile
            raise Stop
        return real(model, **kw)

    monkeypatch.setattr(math_qa, "local_lm", spy)
    other = str(tmp_path / "proposer.gguf")
    with pytest.raises(Stop):
        math_qa.main([*_optimize_args(train_file, tmp_path, long_tiny_model_dir, "mipro"), "--proposer-model", other,
                      "--proposer-ctx", "1024"])
    assert built[0][0] == str(long_tiny_model_dir)  # the program's LM
    assert built[1][0] == other and built[1][1]["n_ctx"] == 1024  # MIPROv2's prompts: the other model
    built.clear()
    with pytest.raises(Stop):
        math_qa.main(_optimize_args(train_file, tmp_path, long_tiny_model_dir, "mipro"))
    assert built[1][0] == str(long_tiny_model_dir)  # default: the program's own model


def test_the_optimizers_study_draw_reproduces_its_committed_problems(shared_data):
    """0.3's legacy draw lives on in programs/math_qa.py only, for the committed optimizers study."""
    from detot_agent.evaluation.data import load_suite
    from programs.math_qa import split_for_compiling

    suite = load_suite(str(shared_data("multiarith/MultiArith.json")))
    study = json.loads((ROOT / "evals/results/optimize/bootstrap.json").read_text())
    evalset, trainset = split_for_compiling(suite.examples, eval_size=100, train_size=50, seed=0, draw="legacy")
    assert [ex.id for ex in evalset] == study["eval_ids"] and [ex.id for ex in trainset] == study["train_ids"]
    nested, _ = split_for_compiling(suite.examples, eval_size=100, train_size=50, seed=0)
    assert [ex.id for ex in nested] != study["eval_ids"]  # the default draw is `detot eval`'s, another sample
