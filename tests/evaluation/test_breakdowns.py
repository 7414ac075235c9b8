"""`detot eval report DIR --halves A,B | --against DIR | --steps FILE`: the readings folded in from evals/scripts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from detot_agent.cli.app import app
from detot_agent.errors import ConfigError, DataFileError
from detot_agent.evaluation.breakdowns import (
    by_steps,
    compare_runs,
    gold_steps,
    run_records,
    stream_halves,
    vote_anatomy,
)


def _run(folder, rows: dict[str, list[dict]], ids: list[str], **settings):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"suite": "t", "ids": ids, "methods": list(rows),
                                                 "answer_format": "number", **settings}))
    for method, recs in rows.items():
        lines = [json.dumps({"method": method, "gold": "1", "pred": "1", "answer": "1", "tokens": 10, "samples": 1,
                             "parse_failures": 0, "latency_s": 0.5, "error": None, "finished_at": 100.0 + n * 30,
                             **r}) for n, r in enumerate(recs)]
        (folder / f"{method}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _ok(i: str, ok: bool, **extra) -> dict:
    return {"id": i, "gold": "1", "correct": ok, "pred": "1" if ok else "2", **extra}


def test_stream_halves_pair_the_same_problems_in_stream_order(tmp_path):
    ids = ["q4", "q1", "q2", "q3"]  # stream order is the run's, not the file's
    run = _run(tmp_path, {"static": [_ok("q1", True), _ok("q2", False), _ok("q3", True), _ok("q4", False)],
                          "loop": [_ok("q1", True), _ok("q2", True), _ok("q3", True), _ok("q4", True)]}, ids)
    out = stream_halves(run, "static", "loop")
    first, second = out["halves"]["first half"], out["halves"]["second half"]
    assert (first["n"], first["static"], first["loop"], first["only_loop"]) == (2, 0.5, 1.0, 1)  # q4, q1
    assert (second["static"], second["only_static"], second["only_loop"]) == (0.5, 0, 1)  # q2, q3
    assert out["halves"]["whole stream"]["only_loop"] == 2
    with pytest.raises(ConfigError, match="no method 'other' in this run; it has static, loop"):
        stream_halves(run, "static", "other")


def test_compare_runs_pairs_each_method_across_two_folders(tmp_path):
    ids = ["q1", "q2", "q3"]
    a = _run(tmp_path / "torch", {"cot": [_ok("q1", True), _ok("q2", True), _ok("q3", False)],
                                  "only_here": [_ok("q1", True)]}, ids)
    b = _run(tmp_path / "cpp", {"cot": [_ok("q1", True), _ok("q2", False, tokens=40)]}, ids)
    (row,) = compare_runs(a, b)  # the shared method only, on the problems both answered (q1, q2)
    assert (row["method"], row["problems"], row["only_run"], row["only_other"]) == ("cot", 2, 1, 0)
    assert row["same_answer"] == 1 and row["run"]["accuracy"] == 1.0 and row["other"]["accuracy"] == 0.5
    assert row["identical"] == 1 and row["differing_ids"] == ["q2"]  # q1 the same decode, q2 not
    assert row["other"]["tokens_per_q"] == 25 and row["run"]["minutes"] == 0.5
    with pytest.raises(ConfigError, match="no method 'only_here'"):
        compare_runs(a, b, ["only_here"])


def test_steps_buckets_cut_offs_and_the_votes(tmp_path):
    data = tmp_path / "test.jsonl"
    answers = ["a\n#### 1", "a\nb\nc\n#### 1", "a\nb\nc\nd\ne\nf\n#### 1"]
    data.write_text("\n".join(json.dumps({"question": "q", "answer": a}) for a in answers) + "\n")
    steps = gold_steps(data)
    assert steps == {"test:1": 1, "test:2": 3, "test:3": 6}
    records = [_ok("test:1", True, sample_keys=["1", "1", "2"], sample_tokens=[10, 10, 10], samples=3),
               _ok("test:2", False, sample_keys=[None, "2", "2"], sample_tokens=[64, 12, 12], samples=3),
               _ok("test:3", False, sample_keys=["2", "1"], sample_tokens=[9, 9], samples=2)]
    row = by_steps(records, steps, max_tokens=64)
    assert [b["accuracy"] for b in row["buckets"].values()] == [1.0, 0.0, 0.0]
    assert row["samples"] == 8 and row["no_answer"] == pytest.approx(1 / 8) and row["cut_off"] == pytest.approx(1 / 8)
    votes = vote_anatomy(records)
    assert votes is not None
    assert (votes["greedy_right"], votes["any_right"]) == (1, 2)
    assert (votes["first_states_none"], votes["stopped_early"]) == (1, 1)
    assert votes["distinct_per_q"] == pytest.approx((2 + 1 + 2) / 3)
    assert votes["stated_right"] == pytest.approx(3 / 7)
    assert vote_anatomy([_ok("test:1", True)]) is None  # one reply per problem: nothing voted
    with pytest.raises(DataFileError, match="'elsewhere:7' is not in the steps file"):
        by_steps([_ok("elsewhere:7", True)], steps, max_tokens=64)
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(DataFileError, match=r"bad\.jsonl:1: not a GSM8K line"):
        gold_steps(tmp_path / "bad.jsonl")


def test_the_report_command_prints_and_writes_the_readings(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps({"answer": "x\n#### 1"}) for _ in range(2)) + "\n")
    ids = ["test:1", "test:2"]
    recs = {"a": [_ok("test:1", True, sample_keys=["1", "1"], samples=2), _ok("test:2", True, sample_keys=["1", "2"],
                                                                                samples=2)],
            "b": [_ok("test:1", False), _ok("test:2", True)]}
    run = _run(tmp_path / "run", recs, ids, max_tokens=64)
    other = _run(tmp_path / "other", {"a": recs["b"]}, ids)
    out = tmp_path / "readings.json"
    done = CliRunner().invoke(app, ["eval", "report", str(run), "--halves", "a,b", "--against", str(other),
                                    "--steps", str(data), "--paired", "a", "--json", str(out)], terminal_width=200)
    assert done.exit_code == 0, done.output
    assert "| whole stream (2) | 1.000 | 0.500 | 1 | 0 | 1.000 |" in done.output
    assert "| a | run | 1.000 | 1.00 (1 vs 0) | 1/2 |" in done.output
    assert "cut at 64 tokens" in done.output and "1-2 steps, a vs b: only a right 1, only b right 0" in done.output
    saved = json.loads(out.read_text())
    assert set(saved) == {"paired", "halves", "against", "steps"}
    assert saved["steps"]["votes"]["a"]["greedy_right"] == 2 and list(run_records(run)) == ["a", "b"]
    bad = CliRunner().invoke(app, ["eval", "report", str(run), "--halves", "a"])
    assert isinstance(bad.exception, ConfigError) and "--halves takes two methods, A,B (got 'a')" in str(bad.exception)
    assert "Suite" not in bad.output  # refused before the report is rendered
