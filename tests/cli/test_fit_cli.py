"""`detot fit` and `detot eval --fit` on the tiny model: one fit folder from data files, served by the eval."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from detot_agent.cli.app import app
from detot_agent.errors import ArtefactError, ConfigError

runner = CliRunner()


def test_fit_writes_a_folder_that_eval_serves_without_an_index(tiny_model_dir, multiarith_head, tmp_path):
    data = multiarith_head(24)
    out = tmp_path / "fit"
    result = runner.invoke(app, ["fit", "--train", str(data), "--train-limit", "3", "--dev", str(data),
                                 "--dev-offset", "3", "--dev-limit", "10", "--out", str(out), "--model",
                                 str(tiny_model_dir), "--samples", "2", "--steps", "1", "--n", "1",
                                 "--max-tokens", "4", "--race-every", "5", "--device", "cpu", "--label-free"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "fit.json").read_text())
    assert report["candidates"]["plain"]["items"] == 10 and report["shipped"] in report["candidates"]
    assert report["distill"]["round_1"]["filter"] == "agreement"
    assert {e["rule"] for e in report["stopping"]["table"]} == {"beta", "confidence", "majority"}  # the defaults
    assert "# DETOT fit: ships" in result.output and "detot eval --fit" in result.output
    run = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--suite", str(data), "--limit", "2", "--methods", "detot", "--fit", str(out),
                                 "--model", str(tiny_model_dir), "--max-tokens", "4", "--out", str(run),
                                 "--device", "cpu", "--prefix-match", "exact", "--threads", "6"])
    assert result.exit_code == 0, result.output
    stored = json.loads((run / "run.json").read_text())
    assert (stored["prefix_match"], stored["prefix_cache"]) == ("exact", 12)  # twice the problems in flight
    config = json.loads((run / "report.json").read_text())["methods"]["detot"]["config"]
    assert config["fit"] == str(out.resolve())
    assert config["adjustments"] == {k: v for k, v in report["adjustments"].items() if k != "applied"}


def test_fit_and_eval_refuse_bad_settings_before_loading_a_model(multiarith_head, tmp_path):
    data = str(multiarith_head(12))
    common = ["--train", data, "--dev", data, "--out", str(tmp_path / "fit"), "--model", str(tmp_path / "nope")]
    result = runner.invoke(app, ["fit", *common, "--ks", "0,3"])
    assert isinstance(result.exception, ConfigError) and "--ks races k > 0 demos: pass --index" in str(result.exception)
    result = runner.invoke(app, ["fit", *common, "--max-minutes", "0"])
    assert isinstance(result.exception, ConfigError) and "max_minutes" in str(result.exception)
    result = runner.invoke(app, ["fit", *common, "--stop-thresholds", "0.8,0"])
    assert isinstance(result.exception, ConfigError) and "stop_thresholds" in str(result.exception)
    result = runner.invoke(app, ["fit", *common, "--stop-rules", "beta,sometimes"])
    assert isinstance(result.exception, ConfigError) and "stop_rules" in str(result.exception)
    result = runner.invoke(app, ["eval", "--suite", data, "--methods", "detot", "--fit", str(tmp_path)])
    assert isinstance(result.exception, ArtefactError) and "not a finished fit folder" in str(result.exception)
    result = runner.invoke(app, ["eval", "--suite", data, "--methods", "detot", "--k", "2"])
    assert isinstance(result.exception, ConfigError) and "exemplar pool" in str(result.exception)
