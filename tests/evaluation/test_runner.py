"""The eval runner on the tiny model: every method end to end, resume after SIGKILL, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from detot_agent import local_lm
from detot_agent.errors import ArtefactError, ConfigError
from detot_agent.evaluation import METHODS, EvalContext, load_suite, run_eval, write_report
from detot_agent.evaluation.names import is_detot
from detot_agent.evaluation.report import render_markdown
from detot_agent.evaluation.runner import read_records


@pytest.fixture(scope="module")
def suite_file(multiarith_head) -> Path:
    return multiarith_head(4)




@pytest.fixture(scope="module")
def engine(long_tiny_model_dir):
    from detot_agent import LocalEngine

    eng = LocalEngine(str(long_tiny_model_dir), device="cpu", dtype="float32", max_wait_ms=20)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def pool(encoder, multiarith_file):
    """A small demo pool of short MultiArith problems (the tiny model's context is 512 tokens)."""
    from detot_agent.io.datafiles import read_exemplars
    from detot_agent.retrieval.index import ExemplarIndex

    index = ExemplarIndex(encoder)
    index.add(read_exemplars(multiarith_file, fmt="multiarith")[100:140])
    return index


def _run(out: Path, suite_file: Path, engine, index, methods: list[str], **kw) -> Path:
    suite = load_suite(str(suite_file))
    lm = local_lm(engine=engine, cache=False)
    ctx = EvalContext(lm=lm, index=index, encoder=index.encoder, k=2, n=3, max_tokens=10, task_name="multiarith",
                      questions=[ex.question for ex in suite.examples])
    run = {"suite": suite.name, "source": suite.source, "model": "tiny", "seed": 0, "limit": None, "k": 2, "n": 3,
           "temperature": 0.7, "max_tokens": 10}
    return run_eval(suite.examples, methods, ctx, out, run=run, threads=2, progress=False, **kw)


def test_every_method_runs_and_reports(tmp_path, suite_file, engine, pool):
    out = _run(tmp_path / "run", suite_file, engine, pool, list(METHODS))
    for method in METHODS:
        records = read_records(out / f"{method}.jsonl")
        assert sorted(r["id"] for r in records) == [f"MultiArith:{i}" for i in range(4)], method
        assert all(r["error"] is None and r["gold"] for r in records), (method, [r["error"] for r in records])
    report = write_report(out)
    assert set(report["methods"]) == set(METHODS) and report["n_examples"] == 4
    sc = report["methods"]["dspy_sc"]
    assert sc["samples_per_question"] == 3 and sc["complete"]
    assert 1 <= report["methods"]["dspy_detot_loop"]["samples_per_question"] <= 4
    assert report["best_baseline"] in METHODS and not is_detot(report["best_baseline"])
    assert (out / "accuracy_vs_samples.png").stat().st_size > 0 and (out / "agreement.png").stat().st_size > 0
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert all(f"| {m} | 4 |" in md for m in METHODS)
    assert json.loads((out / "methods.json").read_text())["dspy_fewshot_cot"]["k"] == 2


def test_existing_runs_are_not_overwritten_or_mixed(tmp_path, suite_file, engine, pool):
    out = _run(tmp_path / "run", suite_file, engine, pool, ["dspy_predict"])
    with pytest.raises(ConfigError, match=r"already holds a run .*pass --resume"):
        _run(out, suite_file, engine, pool, ["dspy_predict"])
    run = json.loads((out / "run.json").read_text())
    run["max_tokens"] = 99
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(ConfigError, match="started with other settings: max_tokens: 99 then, 10 now"):
        _run(out, suite_file, engine, pool, ["dspy_predict"], resume=True)


def test_torn_last_line_is_repaired_and_duplicates_count_once(tmp_path, suite_file, engine, pool):
    out = _run(tmp_path / "run", suite_file, engine, pool, ["dspy_predict"])
    path = out / "dspy_predict.jsonl"
    lines = path.read_text().splitlines()
    # a crash mid-write: the last record is cut off; an earlier record was written twice
    path.write_text("\n".join([lines[0], lines[0], *lines[1:3]]) + "\n" + lines[3][:25])
    assert len(read_records(path)) == 4
    _run(out, suite_file, engine, pool, ["dspy_predict"], resume=True)
    assert len(read_records(path)) == 5  # the torn record was run again; the duplicate stays on disk
    assert write_report(out, plots=False)["methods"]["dspy_predict"]["n"] == 4
    path.write_text("{broken\n" + path.read_text())
    with pytest.raises(ArtefactError, match="line 1: not valid JSON"):
        read_records(path, repair=True)


def test_report_needs_a_run_folder(tmp_path):
    with pytest.raises(ArtefactError, match=r"not a run folder: no run\.json"):
        write_report(tmp_path)


def _stable(report: dict) -> dict:
    """A report without what depends on how the run was cut: timings, and the engine's work (a SIGKILLed stretch
    writes no engine line, and its problems in flight are answered again)."""
    return {m: {k: v for k, v in s.items() if k not in ("seconds_per_question", "engine")}
            for m, s in report["methods"].items()}


def test_a_run_killed_midway_resumes_to_the_same_report(tmp_path, suite_file, long_tiny_model_dir, pool):
    index_dir = pool.save(tmp_path / "index")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "detot_agent", "eval", "--suite", str(suite_file), "--model", str(long_tiny_model_dir),
           "--methods", "dspy_cot,dspy_sc,dspy_detot", "--index", str(index_dir), "--n", "3",
           "--max-tokens", "12", "--threads", "1", "--max-batch-size", "1", "--device", "cpu", "--dtype", "float32"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run([*cmd, "--out", str(whole)], check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen([*cmd, "--out", str(broken)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = broken / "dspy_sc.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if target.exists() and len(target.read_bytes().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_records(target))
    assert 2 <= killed_at < 4 and not (broken / "dspy_detot.jsonl").exists()
    subprocess.run([*cmd, "--out", str(broken), "--resume"], check=True, env=env, capture_output=True, timeout=600)
    a, b = json.loads((whole / "report.json").read_text()), json.loads((broken / "report.json").read_text())
    assert _stable(a) == _stable(b)
    assert b["methods"]["dspy_sc"]["engine"]["records"] == 4 - killed_at  # only the resumed stretch's line
    for method in ("dspy_cot", "dspy_sc", "dspy_detot"):
        preds = [{r["id"]: r["answer"] for r in read_records(d / f"{method}.jsonl")} for d in (whole, broken)]
        assert preds[0] == preds[1], method


def test_prequential_gold_feedback_reaches_the_loop_and_the_report(tmp_path, multiarith_head, engine, pool):
    from detot_agent.detot.monitor import Monitor

    suite = load_suite(str(multiarith_head(8)))
    lm = local_lm(engine=engine, cache=False)
    ctx = EvalContext(lm=lm, index=pool, encoder=pool.encoder, k=1, n=1, max_tokens=6, task_name="multiarith",
                      questions=[ex.question for ex in suite.examples], feedback="gold",
                      canary=[("What is 1 plus 1?", "2"), ("What is 2 plus 2?", "4")])
    run = {"suite": suite.name, "source": suite.source, "model": "tiny", "seed": 0, "limit": None, "k": 1, "n": 1,
           "temperature": 0.7, "max_tokens": 6, "feedback": "gold"}
    seen: list[bool] = []
    original = Monitor.feedback

    def spy(self, pred_id, correct):
        seen.append(correct)
        return original(self, pred_id, correct)

    Monitor.feedback = spy  # type: ignore[method-assign]
    try:
        out = run_eval(suite.examples, ["dspy_detot_loop"], ctx, tmp_path / "run", run=run, threads=1, progress=False)
    finally:
        Monitor.feedback = original  # type: ignore[method-assign]
    records = read_records(out / "dspy_detot_loop.jsonl")
    assert len(seen) == 8 and [r["fed_back"] for r in sorted(records, key=lambda r: r["finished_at"])] == seen
    assert all(r["fed_back"] == r["correct"] for r in records)  # the loop was told what the scorer found
    report = write_report(out)
    assert len(report["methods"]["dspy_detot_loop"]["stream_halves"]) == 2
    assert (out / "learning_curve.png").stat().st_size > 0
    config = json.loads((out / "methods.json").read_text())["dspy_detot_loop"]
    assert config["feedback"] == "gold" and config["canary"] == 2


def _write_run(out, records_by_method):
    ids = [r["id"] for r in next(iter(records_by_method.values()))]
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"suite": "s", "model": "m", "seed": 0, "ids": ids,
                                              "methods": list(records_by_method), "answer_format": "number",
                                              "method_names": 2}))
    for method, records in records_by_method.items():
        (out / f"{method}.jsonl").write_text("".join(json.dumps({"method": method, **r}) + "\n" for r in records))


def _rec(i, gold, keys, correct):
    return {"id": f"q{i}", "gold": gold, "pred": keys[0], "correct": correct, "samples": len(keys),
            "tokens": 10 * len(keys), "sample_keys": keys, "sample_tokens": [10] * len(keys)}


def test_the_report_places_detot_on_fixed_n_self_consistency_s_prefix_curve(tmp_path):
    # sc: q0 right from the first sample, q1 only once the majority turns (m = 3), q2 never
    sc = [_rec(0, "1", ["1", "1", "1"], True), _rec(1, "2", ["5", "2", "2"], True),
          _rec(2, "3", ["9", "9", "9"], False)]
    detot = [_rec(0, "1", ["1", "1"], True), _rec(1, "2", ["2", "2"], True), _rec(2, "3", ["9", "9"], False)]
    better = [{**r, "correct": True} for r in detot]  # above anything the curve reaches
    _write_run(tmp_path / "a", {"sc": sc, "detot": detot, "detot_loop": better})
    report = write_report(tmp_path / "a", plots=False)
    curve = report["methods"]["sc"]["prefix_curve"]
    assert [round(p["accuracy"], 3) for p in curve] == [0.333, 0.333, 0.667]  # m=2: the tie goes to "5", drawn first
    assert [p["tokens_per_question"] for p in curve] == [10, 20, 30]
    assert curve[-1]["accuracy"] == report["methods"]["sc"]["accuracy"]  # the full budget is sc itself
    assert report["methods"]["detot"]["sc_samples_to_match"] == 3
    assert report["methods"]["detot_loop"]["sc_samples_to_match"] is None
    text = render_markdown(report)
    assert "needs 3 samples to match it (1.50x its samples)" in text and "does not reach it with 3" in text
    # the same budget: DETOT spends 20 tokens/q, so it meets the majority over sc's first 2 samples (20 tok),
    # which solves only q0; q1 is the one problem only DETOT solved
    same = report["methods"]["detot"]["vs_sc_at_its_tokens"]
    assert (same["m"], same["tokens_per_question"], round(same["accuracy"], 3)) == (2, 20, 0.333)
    assert (same["only_this_right"], same["only_sc_right"], same["p_value"]) == (1, 0, 1.0)
    assert report["methods"]["detot_loop"]["vs_sc_at_its_tokens"]["only_this_right"] == 2
    assert ("first 2 samples (20 tok) gets 0.333: 1 problems only `detot` solved, 0 only "
            "self-consistency solved") in text
    # DETOT's own prefix curve: its first sample alone is right on q0 and q1, which sc needs 3 samples for
    own = report["methods"]["detot"]
    assert [round(p["accuracy"], 3) for p in own["prefix_curve"]] == [0.667, 0.667]
    assert own["samples_to_match_sc"] == 1
    assert "reaches fixed-N self-consistency's 0.667 (3 samples) with 1 (3.00x fewer samples)" in text
    # the violation: a DETOT whose own samples never reach that accuracy gets no such claim
    # (q0 stopped early, after one sample: its later prefixes keep that one vote)
    weak = [_rec(0, "1", ["1"], True), _rec(1, "2", ["7", "7"], False), _rec(2, "3", ["9", "9"], False)]
    _write_run(tmp_path / "d", {"sc": sc, "detot": weak})
    report_d = write_report(tmp_path / "d", plots=False)
    assert report_d["methods"]["detot"]["samples_to_match_sc"] is None
    assert [round(p["accuracy"], 3) for p in report_d["methods"]["detot"]["prefix_curve"]] == [0.333] * 2
    assert "does not reach fixed-N self-consistency's 0.667" in render_markdown(report_d)
    # a method spending more tokens than sc's whole budget gets no same-budget claim
    dear = [{**r, "tokens": 100} for r in detot]
    _write_run(tmp_path / "c", {"sc": sc, "detot": dear})
    assert "vs_sc_at_its_tokens" not in write_report(tmp_path / "c", plots=False)["methods"]["detot"]
    # a run whose records predate sample_keys has no curve (and no claim)
    _write_run(tmp_path / "b", {"sc": [{k: v for k, v in r.items() if k != "sample_keys"} for r in sc],
                                "detot": detot})
    report = write_report(tmp_path / "b", plots=False)
    assert report["methods"]["sc"]["prefix_curve"] == []
    assert "sc_samples_to_match" not in report["methods"]["detot"]


def test_ablations_run_as_their_own_methods_on_the_same_problems(tmp_path, suite_file, engine, pool):
    names = ["dspy_detot", "dspy_detot-retrieval", "dspy_detot-softprompt", "dspy_detot_loop-loop"]
    out = _run(tmp_path / "run", suite_file, engine, pool, names)
    records = {m: read_records(out / f"{m}.jsonl") for m in names}
    assert all(sorted(r["id"] for r in rs) == [f"MultiArith:{i}" for i in range(4)] for rs in records.values())
    assert all(r["demo_ids"] == [] for r in records["dspy_detot-retrieval"])
    assert all(len(r["demo_ids"]) == 2 for r in records["dspy_detot"])
    config = json.loads((out / "methods.json").read_text())
    assert config["dspy_detot-softprompt"]["soft_prompt_off"] and not config["dspy_detot"]["soft_prompt_off"]
    loop_off = config["dspy_detot_loop-loop"]
    assert loop_off["reoptimization"] is False and loop_off["ablate"] == ["loop"]
    best = write_report(out)["best_baseline"]
    assert best is None or not is_detot(best)


@pytest.mark.parametrize(("name", "why"), [
    ("cot-retrieval", "only DETOT methods take ablations"),
    ("detot-bogus", r"unknown ablation\(s\) \['bogus'\]"),
    ("detot-", "unknown ablation"),
    ("nope", "unknown method 'nope'"),
])
def test_bad_method_names_are_refused_naming_what_exists(name, why):
    from detot_agent.evaluation.methods import check_method

    with pytest.raises(ConfigError, match=why):
        check_method(name)


def test_soft_prompt_none_and_the_softprompt_ablation_serve_no_vectors(engine, pool):
    from detot_agent.evaluation.methods import build_method

    lm = local_lm(engine=engine, cache=False)
    base = EvalContext(lm=lm, index=pool, encoder=pool.encoder, k=1, n=1, max_tokens=4)
    assert build_method("dspy_detot", base).program.controller.state.soft_prompt is not None
    off = EvalContext(lm=lm, index=pool, encoder=pool.encoder, k=1, n=1, max_tokens=4, no_soft_prompt=True)
    for method in (build_method("dspy_detot", off), build_method("dspy_detot-softprompt", base)):
        state = method.program.controller.state
        assert state.embedding is not None and not state.embedding.has_head and state.soft_prompt is None
    with pytest.raises(ConfigError, match="has no loop to ablate"):
        build_method("dspy_detot-loop", base)
    with pytest.raises(ConfigError, match="needs a task embedding whose head has components"):
        build_method("dspy_detot-dynamic", base)


def test_shadow_judging_reaches_the_looping_method_with_outcomes_from_gold_or_agreement(engine, pool, tmp_path):
    from detot_agent.evaluation.methods import build_method

    lm = local_lm(engine=engine, cache=False)
    logs = []

    def config(name="dspy_detot_loop", **kw):
        ctx = EvalContext(lm=lm, index=pool, encoder=pool.encoder, k=1, n=1, max_tokens=4, **kw)
        method = build_method(name, ctx)
        method.close()
        shadow = method.program.controller.shadow
        logs.append(None if shadow is None or shadow.log is None else shadow.log.path)
        return method.program.controller.config, method.config()

    gold, gold_row = config(judging="shadow", feedback="gold", shadow_share=0.5, events_dir=tmp_path,
                            shadow_settings={"workers": 4, "background": False})
    assert logs[-1] == tmp_path / "dspy_detot_loop.shadow.jsonl"  # each paired outcome's answers, in the run
    assert (gold.judging, gold.shadow.outcomes, gold.shadow.share) == ("shadow", "gold", 0.5)
    assert (gold.shadow.workers, gold.shadow.background) == (4, False)  # `detot eval --shadow K=V`
    assert gold_row["judging"] == "shadow"  # methods.json says how the run judged
    label_free, _ = config(judging="shadow")
    assert (label_free.shadow.outcomes, label_free.shadow.share) == ("agreement", 0.25)
    assert logs[-1] is None  # no run folder, no log
    replay, replay_row = config()  # the default stays the replay
    assert replay.judging == "replay" and replay_row["judging"] == "replay"
    static, _ = config("dspy_detot", judging="shadow")  # a method without the loop judges nothing
    assert static.judging == "replay"


def test_a_strategy_run_and_its_ablation_on_the_tiny_model(tmp_path, suite_file, engine, pool):
    suite = load_suite(str(suite_file))
    ctx = EvalContext(lm=local_lm(engine=engine, cache=False), index=pool, encoder=pool.encoder, k=1, n=2,
                      max_tokens=8, task_name="multiarith", strategy="mix")
    run = {"suite": suite.name, "source": suite.source, "model": "tiny", "seed": 0, "limit": None, "k": 1, "n": 2,
           "temperature": 0.7, "max_tokens": 8, "strategy": "mix"}
    out = run_eval(suite.examples, ["dspy_detot", "dspy_detot-strategy"], ctx, tmp_path / "run", run=run,
                   threads=2, progress=False)
    config = json.loads((out / "methods.json").read_text())
    assert config["dspy_detot"]["adjustments"]["strategy"] == "mix"
    assert config["dspy_detot-strategy"]["adjustments"]["strategy"] == "cot"
    assert config["dspy_detot"]["adjustments"]["weighting"] == "uniform"  # task analysis's default
    assert all(r["error"] is None for m in ("dspy_detot", "dspy_detot-strategy")
               for r in read_records(out / f"{m}.jsonl"))
    # each sample's vote key and tokens, in the order drawn
    assert all(len(r["sample_keys"]) == len(r["sample_tokens"]) == r["samples"]
               and sum(r["sample_tokens"]) == r["tokens"]
               for m in ("dspy_detot", "dspy_detot-strategy") for r in read_records(out / f"{m}.jsonl"))
    # the call's id (what `feedback` and the shadow log name a request by), one per record
    requests = [r["request"] for r in read_records(out / "dspy_detot.jsonl")]
    assert len(set(requests)) == len(requests) == len(suite.examples) and all(requests)


def test_a_weighting_reaches_the_detot_methods_and_their_ablations(engine, pool):
    from detot_agent.evaluation.methods import build_method

    ctx = EvalContext(lm=local_lm(engine=engine, cache=False), index=pool, encoder=pool.encoder, k=1, n=2,
                      max_tokens=8, task_name="multiarith", weighting="cisc")
    for name in ("detot", "dspy_detot-retrieval"):
        method = build_method(name, ctx)
        assert method.program.adjustments.weighting.value == "cisc" == method.config()["adjustments"]["weighting"]
    assert build_method("detot", EvalContext(lm=ctx.lm, index=pool, encoder=pool.encoder, k=1, n=2,
                                                          max_tokens=8)).adjustments.weighting.value == "uniform"


def test_ctrl_c_keeps_finished_records_exits_at_once_and_says_how_to_resume(tmp_path, multiarith_head,
                                                                             long_tiny_model_dir):
    suite = multiarith_head(12)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "detot_agent", "eval", "--suite", str(suite), "--model", str(long_tiny_model_dir),
           "--methods", "cot", "--max-tokens", "48", "--threads", "1", "--max-batch-size", "1",
           "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    # a test suite started in the background (`make test &`) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: the child gets the default disposition back, as an interactive Ctrl-C would find it
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    target = out / "cot.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if target.exists() and target.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    kept = read_records(target)
    assert proc.returncode == 130, output
    assert 1 <= len(kept) < 12  # it stopped, and kept what finished
    assert "interrupted: finished records are kept in" in output and "--resume" in output


def test_a_resumed_run_may_add_the_index_only_if_no_finished_record_used_one(tmp_path):
    from detot_agent.evaluation.runner import check_run

    run = {"suite": "s", "index": None, "methods": ["cot"], "ids": ["a"]}
    check_run(tmp_path, run, resume=False)
    later = {**run, "index": "/idx", "methods": ["cot", "dspy_detot_loop"]}
    with pytest.raises(ConfigError, match="index: None then, '/idx' now"):
        check_run(tmp_path, later, resume=True)
    check_run(tmp_path, later, resume=True, addable=frozenset({"index"}))
    assert json.loads((tmp_path / "run.json").read_text())["index"] == "/idx"


def test_a_missing_requirement_fails_before_anything_loads_or_runs(tmp_path, multiarith_head):
    from typer.testing import CliRunner

    from detot_agent.cli.app import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "--suite", str(multiarith_head(2)), "--methods",
                                      "dspy_cot,dspy_fewshot_cot,dspy_detot", "--model", "/no/such/model",
                                      "--out", str(out)])
    assert isinstance(result.exception, ConfigError)
    assert "dspy_fewshot_cot, dspy_detot need an exemplar pool: pass --index DIR" in str(result.exception)
    assert not (out / "run.json").exists()  # nothing started


def test_the_reoptimization_cooldown_reaches_the_looping_method(engine, pool):
    from detot_agent.evaluation.methods import build_method

    ctx = EvalContext(lm=local_lm(engine=engine, cache=False), index=pool, encoder=pool.encoder, k=1, n=1,
                      max_tokens=4, reopt_cooldown=50)
    method = build_method("dspy_detot_loop", ctx)
    assert method.adjustments.cooldown == 50 and method.program.monitor.cooldown == 50
    default = build_method("dspy_detot_loop", EvalContext(lm=ctx.lm, index=pool, encoder=pool.encoder))
    assert default.program.monitor.cooldown == 20 and default.program.controller.config.policies == []
    assert default.program.controller.config.replay_items == 16
    smaller = build_method("dspy_detot_loop", EvalContext(lm=ctx.lm, index=pool, encoder=pool.encoder, replay_items=8,
                                                reopt_seconds=60))
    assert (smaller.program.controller.config.replay_items, smaller.program.controller.config.max_seconds) == (8, 60)
    assert smaller.config()["replay_items"] == 8


def test_loop_policies_reach_the_looping_method_only():
    from detot_agent.detot.task import Policy
    from detot_agent.evaluation.spec import ContextSpec

    spec = ContextSpec(loop_policies=[Policy.parse("strategy=pot").changes()])
    assert spec.loop_policies == [{"strategy": "pot"}]
    assert Policy(**spec.loop_policies[0]) == Policy(strategy="pot")


def test_a_looping_program_is_saved_again_when_a_rejected_judgement_spends_error_budget():
    from types import SimpleNamespace

    from detot_agent.evaluation.runner import _checkpoint_mark

    program = SimpleNamespace(version=2, controller=SimpleNamespace(judgements_spent=1))
    before = _checkpoint_mark(program)
    program.controller.judgements_spent += 1  # a candidate judged and rejected: same version
    assert _checkpoint_mark(program) != before
    assert _checkpoint_mark(SimpleNamespace()) == (0, 0, 0)  # a method without a loop


def test_a_looping_program_is_saved_again_when_its_shadow_trial_gains_an_outcome():
    """A kill mid-trial must not lose the paired outcomes collected since the last decision (the resumed run
    continues the candidate's evidence from the saved program)."""
    from types import SimpleNamespace

    from detot_agent.detot.records import Replayed, TaskState
    from detot_agent.detot.shadow import ShadowConfig, ShadowJudge
    from detot_agent.evaluation.runner import _checkpoint_mark

    judge = ShadowJudge(lambda state, inputs: Replayed("2", 1.0), ShadowConfig(share=1.0))
    program = SimpleNamespace(version=1, controller=SimpleNamespace(judgements_spent=0, shadow=judge))
    judge.propose(TaskState(2, None), "candidate")
    before = _checkpoint_mark(program)
    judge.shadow("q1", {"question": "1 + 1?"}, Replayed("3", 1.0)).result()
    judge.outcome("q1", "2")  # one paired outcome: same version, no judgement spent
    assert judge.tests["candidate"].outcomes == 1 and _checkpoint_mark(program) != before
    judge.close()


def _looping_run(tmp_path, multiarith_head, engine, pool) -> tuple[Path, Callable[[], None]]:
    """Six problems through `detot` (the loop on); returns the run folder and a resume of it."""
    suite = load_suite(str(multiarith_head(6)))
    lm = local_lm(engine=engine, cache=False)
    ctx = EvalContext(lm=lm, index=pool, encoder=pool.encoder, k=1, n=1, max_tokens=6, task_name="multiarith",
                      questions=[ex.question for ex in suite.examples])
    run = {"suite": suite.name, "source": suite.source, "model": "tiny", "seed": 0, "limit": None, "k": 1, "n": 1,
           "temperature": 0.7, "max_tokens": 6}
    out = run_eval(suite.examples, ["dspy_detot_loop"], ctx, tmp_path / "run", run=run, threads=1, progress=False)

    def resume() -> None:
        run_eval(suite.examples, ["dspy_detot_loop"], ctx, out, run=run, resume=True, threads=1, progress=False)

    return out, resume


def test_a_resumed_looping_run_rebuilds_its_monitor_from_the_event_log(tmp_path, multiarith_head, engine, pool,
                                                                      monkeypatch):
    from detot_agent.detot.monitor import Monitor

    out, resume = _looping_run(tmp_path, multiarith_head, engine, pool)
    records = (out / "dspy_detot_loop.jsonl").read_text().splitlines()
    (out / "dspy_detot_loop.jsonl").write_text("\n".join(records[:4]) + "\n")  # the process stopped after 4 records
    restored: list[tuple[Monitor, int]] = []
    original = Monitor.restore

    def spy(self, path=None, **kw):
        restored.append((self, original(self, path, **kw)))
        return restored[-1][1]

    monkeypatch.setattr(Monitor, "restore", spy)
    resume()
    (monitor, read), = restored
    assert read == 6  # every observation the first process logged (two of them lost their records)
    assert monitor.count == 8  # and the two answered again after the resume
    assert len(read_records(out / "dspy_detot_loop.jsonl")) == 6


@pytest.mark.parametrize("evidence_kept", [True, False], ids=["evidence-log", "evidence-log-lost"])
def test_a_resumed_looping_run_rebuilds_its_evidence_buffer(tmp_path, multiarith_head, engine, pool, monkeypatch,
                                                            evidence_kept):
    from detot_agent.detot.controller import Controller

    out, resume = _looping_run(tmp_path, multiarith_head, engine, pool)
    logged = [json.loads(line) for line in (out / "dspy_detot_loop.evidence.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in logged] == ["evidence"] * 6  # every answered question (no feedback: no outcomes)
    records = (out / "dspy_detot_loop.jsonl").read_text().splitlines()
    (out / "dspy_detot_loop.jsonl").write_text("\n".join(records[:4]) + "\n")  # the process stopped after 4 records
    if not evidence_kept:
        (out / "dspy_detot_loop.evidence.jsonl").unlink()
    built: list[Controller] = []
    init = Controller.__init__
    monkeypatch.setattr(Controller, "__init__", lambda self, *a, **kw: built.append(self) or init(self, *a, **kw))
    resume()
    controller, = [c for c in built if c.evidence_log is not None]  # the served program's (copies keep no log)
    buffer = controller.evidence()
    if evidence_kept:  # the six logged records, then the two answered again
        assert len(buffer) == 8
        assert [ev.id for ev in buffer[:6]] == [r["id"] for r in logged if r["kind"] == "evidence"]
        assert controller.monitor._restored_at is None  # it decides at once, as the stopped run would have
    else:  # the violation: only what was answered after the resume, and the monitor waits for fresh answers
        assert len(buffer) == 2
        assert controller.monitor._restored_at == 6


def test_a_0_3_run_resumes_under_its_new_names(tmp_path, suite_file, engine, pool):
    out = _run(tmp_path / "run", suite_file, engine, pool, ["plain_cot"])  # a 0.3 name, read as `cot`
    assert read_records(out / "cot.jsonl") and json.loads((out / "run.json").read_text())["methods"] == ["cot"]
    # make it a 0.3 folder: old file names, no `method_names`, a record missing (the run was stopped)
    run = json.loads((out / "run.json").read_text())
    run["methods"] = ["plain_cot"]
    del run["method_names"]
    (out / "run.json").write_text(json.dumps(run))
    lines = (out / "cot.jsonl").read_text().splitlines()
    (out / "plain_cot.jsonl").write_text("".join(line.replace('"cot"', '"plain_cot"') + "\n" for line in lines[:3]))
    (out / "cot.jsonl").unlink()
    _run(out, suite_file, engine, pool, ["plain_cot"], resume=True)
    records = read_records(out / "cot.jsonl")
    assert len(records) == 4 and {r["method"] for r in records} == {"cot"}  # three kept, the missing one run
    assert not (out / "plain_cot.jsonl").exists() and json.loads((out / "run.json").read_text())["method_names"] == 2
