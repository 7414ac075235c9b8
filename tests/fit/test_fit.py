"""`DETOTFit` on the tiny model with a scripted task: every stage, resume after a kill, budgets, the guard, and
bad inputs refused before any model work.

The engine is `ScriptedLocalEngine` (the tiny model's tokenizer, chat template, rows, soft prompts and training run
for real; only the decoded text is scripted), told here whether a row carries a soft prompt and how many samples
it draws, so which configuration is better is known by construction.
"""

from __future__ import annotations

import json
import re
import threading

import dspy
import pytest
from scripted import ScriptedLocalEngine

from detot_agent import DETOT, TaskProfile, analyze, local_lm
from detot_agent.detot.adapters import PlainAdapter
from detot_agent.embedding.update_config import UpdateConfig
from detot_agent.errors import ConfigError
from detot_agent.fit import optimizer
from detot_agent.fit.config import FitConfig
from detot_agent.fit.optimizer import DETOTFit
from detot_agent.fit.race import guard
from detot_agent.retrieval.index import ExemplarIndex

ARITH = TaskProfile(name="arith", description="adding two numbers", kind="arithmetic", answer_format="number")
_ASKED = re.compile(r"What is (\d+) plus (\d+)\?")


def _examples(pairs, rationale=True):
    return [dspy.Example(question=f"What is {a} plus {b}?", answer=str(a + b),
                         **({"rationale": f"{a} + {b} = {a + b}."} if rationale else {})).with_inputs("question")
            for a, b in pairs]


TRAIN = _examples([(i, i + 3) for i in range(1, 9)])
VAL = _examples([(i, 2 * i) for i in range(20, 32)])


def metric(example, pred, trace=None):
    return str(pred.answer).strip() == str(example.answer)


class RowEngine(ScriptedLocalEngine):
    """`rule(sum, row, i)`: the scripted answer to the row's i-th sample sees the row (its soft prompt, n, seed) and
    the asked sum; it does not depend on what other rows ran before (threads, a resumed fit)."""

    def __init__(self, model_dir, rule):
        super().__init__(model_dir, lambda text, n: None, plain=True)
        self.rule = rule
        self.lock = threading.Lock()  # valset items run on threads: one row's samples are numbered together

    def _run(self, rows):
        out = []
        for row in rows:
            with self.lock:
                start = self.calls
                self.answer = lambda text, n, row=row, start=start: self.rule(_sum(text), row, n - start)
                out += super()._run([row])
        return out


def _sum(text):
    a, b = _ASKED.findall(text)[-1]
    return int(a) + int(b)


@pytest.fixture(scope="module")
def index(encoder):
    return ExemplarIndex(encoder)  # k = 0 everywhere: no exemplar is read


def _program(index, engine, max_samples=4):
    return DETOT("question -> answer", task=ARITH, index=index, lm=local_lm(engine=engine, cache=False),
                 background=False, adapter=PlainAdapter(),
                 adjustments=analyze(ARITH, k_exemplars=0, max_samples=max_samples, soft_prompt_k=2))


def _cfg(**kw):
    base = dict(max_minutes=10, max_train_problems=6, samples_per_problem=3, chains_per_problem=2, race_every=5,
                threads=2, train=UpdateConfig(steps=3, max_seconds=None, eval_every=1))
    return FitConfig(**(base | kw))


def soft_prompt_helps(total, row, i):
    """Right with a soft prompt; without one, right on every other sample (by the row's seed)."""
    return str(total) if row.soft_prompt is not None or ((row.seed or 0) + i) % 2 == 0 else str(total + 1)


# ---- every stage, the artefact, the resume ----------------------------------------------------------------
def test_compile_runs_every_stage_writes_the_fit_folder_and_ships_the_distilled_prompt(index, long_tiny_model_dir,
                                                                                      tmp_path):
    engine = RowEngine(long_tiny_model_dir, soft_prompt_helps)
    program = _program(index, engine)
    fit = DETOTFit(metric=metric, config=_cfg(prompts=["gold", "distilled"]), out=tmp_path / "fit")
    fitted = fit.compile(program, trainset=TRAIN, valset=VAL)
    report = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert set(report["candidates"]) == {"plain", "none-k0", "current-k0", "distilled-k0", "gold-k0"}
    assert report["shipped"] in ("current-k0", "distilled-k0", "gold-k0") and not report["guard"]["guard_fired"]
    assert report["distill"]["round_1"]["problems"] == 6  # max_train_problems
    assert report["distill"]["round_1"]["drawn"] == 6 * 3  # samples_per_problem
    assert 0 < report["distill"]["round_1"]["kept"] <= 6 * 2  # chains_per_problem
    assert report["candidates"]["plain"]["items"] == len(VAL)
    for name in ("report.md", "candidates.png", "program.json", "prompts/distilled-1/manifest.json"):
        assert (tmp_path / "fit" / name).exists(), name
    steps = json.loads((tmp_path / "fit" / "prompts" / "distilled-1.report.json").read_text())["steps"]
    assert 0 < steps <= 3  # the step budget
    # the returned program serves the choice; the student is untouched
    assert fitted.task_embedding.has_head and fitted.adjustments.weighting.value == "cisc"
    assert program.adjustments.weighting.value == "uniform"
    # the fit folder loads into a fresh DETOT, and a parent's save carries it (DETOT's learned state)
    fresh = _program(index, engine)
    fresh.load(tmp_path / "fit")
    assert fresh.adjustments == fitted.adjustments and fresh.version == fitted.version
    assert fresh(question="What is 2 plus 5?").answer == "7"
    # the stopping rule was replayed on the shipped candidate's race answers (right from the first samples with a
    # soft prompt): it ships a rule that stops after the first round, and serving it does
    stop = report["stopping"]
    assert stop["chosen"] is not None and stop["chosen"]["correct"] == stop["raced"]["correct"]
    assert stop["chosen"]["samples"] < stop["raced"]["samples"]
    assert fitted.adjustments.stopping.value == stop["chosen"]["rule"]
    assert fitted.adjustments.stop_threshold == stop["chosen"]["threshold"]
    pred = fitted(question="What is 20 plus 40?")
    assert pred.answer == "60" and pred.samples_used == fitted.adjustments.min_samples < 4
    assert "Stopping rule, replayed" in (tmp_path / "fit" / "report.md").read_text()


def test_a_fit_killed_between_stages_resumes_to_the_same_result(index, long_tiny_model_dir, tmp_path, monkeypatch):
    whole = DETOTFit(metric=metric, config=_cfg(), out=tmp_path / "whole")
    whole.compile(_program(index, RowEngine(long_tiny_model_dir, soft_prompt_helps)), trainset=TRAIN, valset=VAL)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after distillation and training, before the race

    monkeypatch.setattr(optimizer, "race", killed)
    engine = RowEngine(long_tiny_model_dir, soft_prompt_helps)
    with pytest.raises(KeyboardInterrupt):
        DETOTFit(metric=metric, config=_cfg(), out=tmp_path / "again").compile(
            _program(index, engine), trainset=TRAIN, valset=VAL)
    assert (tmp_path / "again" / "prompts" / "distilled-1" / "manifest.json").exists()
    assert not (tmp_path / "again" / "fit.json").exists()
    monkeypatch.undo()
    drawn = engine.calls
    lines = []
    DETOTFit(metric=metric, config=_cfg(), out=tmp_path / "again", progress=lines.append).compile(
        _program(index, engine), trainset=TRAIN, valset=VAL)
    assert any("already trained, loaded" in line for line in lines)
    assert not any(line.startswith("distil round 1:") and "problems," in line for line in lines)  # no chain redrawn
    assert engine.calls > drawn  # the race ran
    a, b = (json.loads((tmp_path / d / "fit.json").read_text()) for d in ("whole", "again"))
    assert a["shipped"] == b["shipped"] and a["candidates"] == b["candidates"] and a["distill"] == b["distill"]
    # a larger time budget (or other threads) resumes the same fit; a folder of other settings is refused
    DETOTFit(metric=metric, config=_cfg(max_minutes=20, threads=1), out=tmp_path / "again").compile(
        _program(index, engine), trainset=TRAIN, valset=VAL)
    with pytest.raises(Exception, match="other settings or data"):
        DETOTFit(metric=metric, config=_cfg(samples_per_problem=2), out=tmp_path / "again").compile(
            _program(index, engine), trainset=TRAIN, valset=VAL)


class Solver(dspy.Module):
    """A user's program with a DETOT inside."""

    def __init__(self, index, engine):
        super().__init__()
        self.solve = _program(index, engine)

    def forward(self, question):
        return self.solve(question=question)


def test_a_parent_program_is_fitted_and_its_save_carries_the_fit(index, long_tiny_model_dir, tmp_path):
    engine = RowEngine(long_tiny_model_dir, soft_prompt_helps)
    fit = DETOTFit(metric=metric, config=_cfg(), out=tmp_path / "fit")
    fitted = fit.compile(Solver(index, engine), trainset=TRAIN, valset=VAL)
    assert isinstance(fitted, Solver) and fitted.solve.adjustments.weighting.value == "cisc"
    fresh = Solver(index, engine)
    fresh.load(str(tmp_path / "fit" / "student.json"))
    assert fresh.solve.adjustments == fitted.solve.adjustments and fresh.solve.version == fitted.solve.version
    assert fresh(question="What is 4 plus 4?").answer == fitted(question="What is 4 plus 4?").answer


# ---- the guard ----------------------------------------------------------------------------------------------
def full_budget_only(total, row, i):
    """Right only without a soft prompt and when the whole budget is drawn at once: plain voting, by construction."""
    return str(total) if row.soft_prompt is None and row.n >= 4 else str(total + 1)


def test_where_plain_voting_is_better_by_construction_the_fit_ships_plain(index, long_tiny_model_dir, tmp_path):
    lines = []
    program = _program(index, RowEngine(long_tiny_model_dir, full_budget_only))
    # this world breaks the stopping replay's premise (a sample's answer depends on how many the row draws, not
    # only on its seed), so the replay is off: plain is the whole budget
    fit = DETOTFit(metric=metric, config=_cfg(stop_rules=[]), out=tmp_path / "fit", progress=lines.append)
    fitted = fit.compile(program, trainset=TRAIN, valset=VAL)
    report = fit.reports[0]
    assert report["shipped"] == "plain" and report["guard"]["guard_fired"]
    assert report["candidates"]["plain"]["accuracy"] == 1.0
    assert any("ships plain" in line for line in lines)
    assert not fitted.task_embedding.has_head and fitted.adjustments.k_exemplars == 0
    assert fitted.adjustments.weighting.value == "cisc" and fitted.adjustments.min_samples == 4
    assert "plain confidence-weighted voting ships" in (tmp_path / "fit" / "report.md").read_text()


def _result(plain, detot, tokens=(10, 10)):
    rows = {name: {i: {"correct": c, "tokens": t} for i, c in enumerate(v)}
            for (name, v), t in zip({"plain": plain, "a": detot}.items(), tokens, strict=True)}
    return {"items": len(plain), "rows": rows, "alive": ["plain", "a"]}


def test_the_guard_fires_on_a_worse_or_tied_choice_and_not_on_a_better_or_as_right_cheaper_one():
    worse = _result([True] * 10, [False] * 8 + [True] * 2)
    assert guard(worse, 0.05)["shipped"] == "plain" and guard(worse, 0.05)["p_worse_than_plain"] < 0.05
    one_behind = _result([True] * 10, [True] * 9 + [False])  # not significant, still behind: plain ships
    assert guard(one_behind, 0.05)["guard_fired"]
    costlier = _result([True] * 10, [True] * 10, tokens=(10, 30))
    assert guard(costlier, 0.05)["shipped"] == "plain"
    assert guard(_result([True] * 10, [True] * 10), 0.05)["shipped"] == "plain"  # a tie: the simpler one ships
    assert guard(_result([True] * 10, [True] * 10, tokens=(30, 10)), 0.05)["shipped"] == "a"  # as right, cheaper
    better = _result([False] * 5 + [True] * 5, [True] * 10)
    decision = guard(better, 0.05)
    assert decision["shipped"] == "a" and not decision["guard_fired"] and decision["p_better_than_plain"] < 0.05


# ---- budgets and bad inputs -----------------------------------------------------------------------------------
def test_a_spent_time_budget_stops_the_fit_with_a_clear_error(index, long_tiny_model_dir, tmp_path):
    engine = RowEngine(long_tiny_model_dir, soft_prompt_helps)
    with pytest.raises(Exception, match="time budget ran out"):
        DETOTFit(metric=metric, config=_cfg(max_minutes=1e-6), out=tmp_path / "fit").compile(
            _program(index, engine), trainset=TRAIN, valset=VAL)
    assert not (tmp_path / "fit" / "chains-1.jsonl").exists()  # no chain was drawn past the budget


def _raises(example, pred, trace=None):
    raise RuntimeError("metric bug")


@pytest.mark.parametrize("case, match", [
    ("empty trainset", "trainset is empty"),
    ("unlabelled trainset", "have no 'answer'"),
    ("metric raises", "metric raised"),
    ("small valset", "need at least 5"),
    ("no metric", "needs metric="),
    ("gold without rationales", "no trainset example has a 'rationale'"),
])
def test_bad_inputs_fail_before_any_model_work(index, long_tiny_model_dir, tmp_path, case, match):
    engine = RowEngine(long_tiny_model_dir, soft_prompt_helps)
    program = _program(index, engine)
    kwargs = {"trainset": TRAIN, "valset": VAL}
    fit_metric, cfg = metric, _cfg()
    if case == "empty trainset":
        kwargs["trainset"] = []
    elif case == "unlabelled trainset":
        kwargs["trainset"] = [dspy.Example(question="What is 1 plus 2?").with_inputs("question")]
    elif case == "metric raises":
        fit_metric = _raises
    elif case == "small valset":
        kwargs["valset"] = VAL[:4]
    elif case == "no metric":
        fit_metric = None
    else:
        cfg = _cfg(prompts=["gold"])
        kwargs["trainset"] = _examples([(1, 2), (3, 4)], rationale=False)
    with pytest.raises(ConfigError, match=match):
        DETOTFit(metric=fit_metric, config=cfg, out=tmp_path / "fit").compile(program, **kwargs)
    assert engine.calls == 0 and not (tmp_path / "fit").exists()


@pytest.mark.parametrize("field, value", [("max_minutes", 0), ("samples_per_problem", 0),
                                          ("max_train_problems", 0), ("chains_per_problem", 0)])
def test_a_zero_budget_is_refused_when_the_settings_are_built(field, value):
    with pytest.raises(ConfigError, match=field):
        FitConfig(**{field: value})
