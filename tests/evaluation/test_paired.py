"""`detot eval report DIR --paired METHOD`: one method against every other, problem by problem."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from detot_agent.cli.app import app
from detot_agent.errors import ArtefactError, ConfigError
from detot_agent.evaluation.paired import paired_against


def _run(tmp_path, outcomes: dict[str, dict[str, bool]]):
    ids = sorted({i for o in outcomes.values() for i in o})
    (tmp_path / "run.json").write_text(json.dumps({"suite": "t", "ids": ids, "methods": list(outcomes),
                                                   "answer_format": "number"}))
    for method, rows in outcomes.items():
        lines = [json.dumps({"id": i, "method": method, "gold": "1", "answer": "1" if ok else "2", "pred": "1",
                             "tokens": 5, "samples": 1, "parse_failures": 0, "correct": ok, "latency_s": 0.1,
                             "error": None}) for i, ok in rows.items()]
        (tmp_path / f"{method}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_paired_rows_count_the_discordant_problems_on_the_shared_ones(tmp_path):
    run = _run(tmp_path, {"a": {"q1": True, "q2": True, "q3": False, "q4": True},
                          "b": {"q1": False, "q2": True, "q3": True},
                          "c": {"q1": False, "q2": False, "q3": False, "q4": False}})
    rows = {r["other"]: r for r in paired_against(run, "a")}
    assert (rows["b"]["problems"], rows["b"]["only_method"], rows["b"]["only_other"]) == (3, 1, 1)
    assert (rows["c"]["problems"], rows["c"]["only_method"], rows["c"]["only_other"]) == (4, 3, 0)
    assert rows["b"]["p_value"] == pytest.approx(1.0) and rows["c"]["p_value"] == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="no method 'z' in this run; it has a, b, c"):
        paired_against(run, "z")
    with pytest.raises(ArtefactError, match="not a run folder"):
        paired_against(tmp_path / "nowhere", "a")


def test_the_report_command_prints_them(tmp_path):
    run = _run(tmp_path, {"a": {"q1": True, "q2": True}, "b": {"q1": False, "q2": True}})
    done = CliRunner().invoke(app, ["eval", "report", str(run), "--paired", "a"], terminal_width=200)
    assert done.exit_code == 0, done.output
    assert "a vs b on 2 problems: only a right 1, only b right 0, exact McNemar p = 1.000" in done.output
