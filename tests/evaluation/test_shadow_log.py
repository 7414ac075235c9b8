"""The report's table of shadow candidates, read from `<method>.shadow.jsonl` as `ShadowJudge.record_to` writes it:
per candidate the paired outcomes, wins / losses and, with gold, both accuracies on the same shadowed requests."""

from __future__ import annotations

import json

import pytest

from detot_agent import LocalEngine, local_lm
from detot_agent.detot.records import Replayed, TaskState
from detot_agent.detot.shadow import ShadowConfig, ShadowJudge
from detot_agent.evaluation import EvalContext, load_suite, run_eval, write_report


@pytest.fixture
def engine(long_tiny_model_dir):
    eng = LocalEngine(str(long_tiny_model_dir), device="cpu", dtype="float32", max_wait_ms=20)
    yield eng
    eng.close()


def test_the_report_scores_each_shadow_candidate_on_the_requests_it_shadowed(tmp_path, engine, multiarith_head):
    suite = load_suite(str(multiarith_head(2)))
    run = {"suite": suite.name, "source": suite.source, "model": "tiny", "seed": 0, "limit": None, "n": 1,
           "max_tokens": 4}
    out = run_eval(suite.examples, ["cot"], EvalContext(lm=local_lm(engine=engine, cache=False), n=1, max_tokens=4,
                                                        task_name="multiarith"),
                   tmp_path / "run", run=run, threads=1, progress=False)
    judge = ShadowJudge(lambda state, inputs: Replayed(str(int(inputs["q"]) * state.version), 0.8),
                        ShadowConfig(share=1.0))
    judge.record_to(out / "cot.shadow.jsonl")
    for version in (1, 2):  # two candidates: one always right (x * 1), one right only on 0 (x * 2)
        judge.propose(TaskState(version, None), f"cand-{version}")
        for q in range(4):
            judge.shadow(f"r{version}{q}", {"q": str(q)}, Replayed(str(q) if q % 2 else "9", 0.5)).result()
            judge.outcome(f"r{version}{q}", str(q))
    judge.close()
    report = write_report(out)
    shadow = report["methods"]["cot"]["shadow"]
    assert str(out / "evidence.png") in report["plots"]
    assert shadow["cand-1"]["outcomes"] == 4 and (shadow["cand-1"]["wins"], shadow["cand-1"]["losses"]) == (2, 0)
    assert shadow["cand-1"]["served_accuracy"] == 0.5 and shadow["cand-1"]["shadow_accuracy"] == 1.0
    assert (shadow["cand-2"]["wins"], shadow["cand-2"]["losses"]) == (1, 2)  # right on 0, wrong on 1 and 3
    assert shadow["cand-2"]["shadow_accuracy"] == 0.25
    md = (out / "report.md").read_text()
    assert "| `cot` | cand-1 | 4 | 2 / 0 | 4 | 0.500 | 1.000 |" in md
    assert "| `cot` | cand-2 | 4 | 1 / 2 | 4 | 0.500 | 0.250 |" in md
    assert (out / "evidence.png").exists()  # each candidate's e-values against its outcomes
    log = out / "cot.shadow.jsonl"
    old = [{k: v for k, v in json.loads(line).items() if k not in ("accept_e", "futility_e")}
           for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(r) + "\n" for r in old))  # a log written before lines held the evidence
    report = write_report(out)
    assert report["methods"]["cot"]["shadow"] == shadow  # the table is the same
    assert not (out / "evidence.png").exists() and str(out / "evidence.png") not in report["plots"]
    log.unlink()  # no log, no table
    write_report(out)
    assert "Shadow candidates' answers" not in (out / "report.md").read_text()
