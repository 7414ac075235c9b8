"""Engine use per eval method (`<method>.engine.jsonl`) on the tiny model: each stretch of a method records what the
engine did over that stretch only, and the report shows the sums."""

from __future__ import annotations

import json

from detot_agent import LocalEngine, local_lm
from detot_agent.evaluation import EvalContext, load_suite, run_eval, write_report
from detot_agent.evaluation.engine_use import COUNTERS


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_stretch_records_its_own_engine_counters_and_the_report_sums_them(tmp_path, long_tiny_model_dir,
                                                                              multiarith_head):
    suite = load_suite(str(multiarith_head(4)))
    engine = LocalEngine(str(long_tiny_model_dir), device="cpu", dtype="float32", max_wait_ms=20)
    try:
        ctx = EvalContext(lm=local_lm(engine=engine, cache=False), n=3, max_tokens=8, task_name="multiarith")
        run = {"suite": suite.name, "source": suite.source, "model": "tiny", "seed": 0, "limit": None, "n": 3,
               "max_tokens": 8}
        out = run_eval(suite.examples, ["cot", "sc"], ctx, tmp_path / "run", run=run, threads=2, progress=False)
        cot, sc = _lines(out / "cot.engine.jsonl"), _lines(out / "sc.engine.jsonl")
        assert [s["records"] for s in cot] == [4] and [s["records"] for s in sc] == [4]
        assert cot[0]["scheduler"] == "continuous" and cot[0]["batches"] > 0 and sc[0]["sequences"] > sc[0]["batches"]
        # a stopped stretch and its resumed part: drop two of `cot`'s records, resume, and only those two run again
        records = (out / "cot.jsonl").read_text().splitlines()
        (out / "cot.jsonl").write_text("\n".join(records[:2]) + "\n")
        run_eval(suite.examples, ["cot", "sc"], ctx, out, run=run, resume=True, threads=2, progress=False)
        cot = _lines(out / "cot.engine.jsonl")
        assert [s["records"] for s in cot] == [4, 2] and len(_lines(out / "sc.engine.jsonl")) == 1
        # the stretches are differences: together they are exactly what this (fresh) engine counted, no more
        total = engine.batch_stats
        for key in ("batches", "sequences", "prompt_tokens_decoded", "prefix_misses"):
            assert sum(s[key] for s in cot + sc) == total[key], key
        assert set(cot[0]) == {*COUNTERS, "records", "scheduler"}
        # a line torn by a kill is cut off when the next stretch appends, so the log stays readable
        with (out / "sc.engine.jsonl").open("a") as f:
            f.write('{"batches": 1')
        (out / "sc.jsonl").write_text("\n".join((out / "sc.jsonl").read_text().splitlines()[:3]) + "\n")
        run_eval(suite.examples, ["sc"], ctx, out, run=run, resume=True, threads=2, progress=False)
        assert [s["records"] for s in _lines(out / "sc.engine.jsonl")] == [4, 1]
    finally:
        engine.close()
    report = write_report(out)
    assert report["methods"]["sc"]["engine"]["records"] == 5
    use = report["methods"]["cot"]["engine"]
    assert use["records"] == 6 and use["batches"] == sum(s["batches"] for s in cot)
    assert use["sequences_per_step"] == use["sequences"] / use["batches"]
    md = (out / "report.md").read_text()
    assert "Engine use while each method ran" in md and "| `cot` | 6 |" in md and "| `sc` | 5 |" in md
