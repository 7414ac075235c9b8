"""0.4's method names: 0.3's still work, and a 0.3 run folder is renamed when next opened, even after a stop."""

from __future__ import annotations

import json

import pytest

from detot_agent.errors import ArtefactError
from detot_agent.evaluation import METHODS
from detot_agent.evaluation import rename_runs as rename
from detot_agent.evaluation.methods import check_method, expand_ablations
from detot_agent.evaluation.names import RENAMED, current
from detot_agent.evaluation.paired import paired_against
from detot_agent.evaluation.report import write_report
from detot_agent.evaluation.runner import read_records


def test_every_0_3_name_resolves_to_a_method_and_detot_keeps_its_0_4_meaning():
    for old, new in RENAMED.items():
        assert new in METHODS, new
        check_method(old)  # accepted
        assert current(old, names=1) == new
    assert current("detot") == "detot" and current("detot", names=1) == "dspy_detot_loop"
    assert current("detot_plain_static-retrieval+softprompt") == "detot-retrieval+softprompt"
    assert expand_ablations(["plain_sc", "detot_plain"], ["loop"]) == ["sc", "detot_loop", "detot_loop-loop"]
    assert set(METHODS).isdisjoint(set(RENAMED) - {"detot"})  # no other 0.3 name is still a method


def _old_folder(tmp_path):
    """A run folder as 0.3 wrote it, with the name clash: its `detot` (DSPy, loop) and `detot_plain_static`
    (0.4's `detot`)."""
    out = tmp_path / "run"
    out.mkdir()
    ids = ["q1", "q2"]
    methods = {"plain_sc": [True, False], "plain_sc_adaptive": [True, True], "detot": [False, False],
               "detot_plain_static": [True, True]}
    (out / "run.json").write_text(json.dumps({"suite": "s", "ids": ids, "methods": list(methods),
                                              "answer_format": "number"}))
    for method, oks in methods.items():
        extra = {"revoted_from": "plain_sc"} if method == "plain_sc_adaptive" else {}
        (out / f"{method}.jsonl").write_text("".join(json.dumps({
            "id": i, "method": method, "gold": "1", "pred": "1" if ok else "2", "answer": "1" if ok else "2",
            "correct": ok, "tokens": 5, "samples": 1, "parse_failures": 0, "latency_s": 0.1, "error": None, **extra})
            + "\n" for i, ok in zip(ids, oks, strict=True)))
    for method in ("detot", "detot_plain_static"):
        (out / f"{method}.events.jsonl").write_text(json.dumps({"event": "observation", "from": method}) + "\n")
    (out / "detot.program.json.tensors").mkdir()  # a 0.3 program's side folder moves with it
    (out / "methods.json").write_text(json.dumps({m: {"revoted_from": "plain_sc"} if m == "plain_sc_adaptive"
                                                  else {} for m in methods}))
    (out / "report.md").write_text("old names\n")
    return out


def _check_renamed(out):
    run = json.loads((out / "run.json").read_text())
    assert run["methods"] == ["sc", "sc_adaptive", "dspy_detot_loop", "detot"] and run["method_names"] == 2
    assert [r["correct"] for r in read_records(out / "detot.jsonl")] == [True, True]  # 0.3's detot_plain_static
    assert [r["correct"] for r in read_records(out / "dspy_detot_loop.jsonl")] == [False, False]  # 0.3's detot
    assert {r["method"] for r in read_records(out / "detot.jsonl")} == {"detot"}
    assert {r["revoted_from"] for r in read_records(out / "sc_adaptive.jsonl")} == {"sc"}
    assert json.loads((out / "detot.events.jsonl").read_text())["from"] == "detot_plain_static"
    assert json.loads((out / "dspy_detot_loop.events.jsonl").read_text())["from"] == "detot"
    assert (out / "dspy_detot_loop.program.json.tensors").is_dir()
    assert json.loads((out / "methods.json").read_text())["sc_adaptive"] == {"revoted_from": "sc"}
    assert not (out / "report.md").exists() and not (out / rename.PLAN).exists()
    assert not list(out.glob("plain_*")) and not (out / rename.STAGING).exists()


def test_a_0_3_folder_is_renamed_once_and_reads_the_same(tmp_path):
    out = _old_folder(tmp_path)
    assert rename.upgrade_run(out) == {"plain_sc": "sc", "plain_sc_adaptive": "sc_adaptive",
                                       "detot": "dspy_detot_loop", "detot_plain_static": "detot"}
    _check_renamed(out)
    assert rename.upgrade_run(out) == {}  # a 0.4 folder: nothing to do, its `detot` stays
    _check_renamed(out)
    report = write_report(out, plots=False)
    assert report["methods"]["detot"]["accuracy"] == 1.0 and report["methods"]["dspy_detot_loop"]["accuracy"] == 0.0
    assert report["best_baseline"] == "sc_adaptive"


def test_reading_a_0_3_folder_renames_it_first(tmp_path):
    out = _old_folder(tmp_path)
    rows = {r["other"]: r for r in paired_against(out, "detot")}  # `detot` in 0.4's meaning, after the rename
    assert rows["dspy_detot_loop"]["only_method"] == 2
    _check_renamed(out)


@pytest.mark.parametrize("stop_at", ["_unstage", "_rewrite_records", "_rewrite_methods_json"])
def test_a_rename_stopped_part_way_finishes_on_the_next_open(tmp_path, monkeypatch, stop_at):
    out = _old_folder(tmp_path)
    real = getattr(rename, stop_at)

    def stop(*args):
        raise OSError("disk full")

    monkeypatch.setattr(rename, stop_at, stop)
    with pytest.raises(ArtefactError, match=r"renaming its methods to 0\.4's names stopped.*open it again"):
        rename.upgrade_run(out)
    assert (out / rename.PLAN).exists() and json.loads((out / "run.json").read_text()).get("method_names") is None
    monkeypatch.setattr(rename, stop_at, real)
    rename.upgrade_run(out)  # a second pass must not read the new `detot` files as 0.3's `detot`
    _check_renamed(out)


def test_without_the_step_log_a_second_pass_would_swap_the_clashing_names(tmp_path):
    """The violation the plan's step log prevents: staging again after the files moved renames 0.4's `detot`."""
    out = _old_folder(tmp_path)
    rename.upgrade_run(out)
    plan = {"detot": "dspy_detot_loop"}
    (out / "dspy_detot_loop.jsonl").unlink()
    rename._stage(out, plan)
    rename._unstage(out, plan)
    assert [r["correct"] for r in read_records(out / "dspy_detot_loop.jsonl")] == [True, True]  # the wrong records
