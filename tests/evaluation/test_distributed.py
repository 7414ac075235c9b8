"""The Ray executor on a local Ray instance and the tiny model: same records as the local executor,
and a killed actor's problems re-queued with nothing lost or counted twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray executor needs the `ray` extra (make test installs it)")

from detot_agent.evaluation import load_suite, run_eval, write_report  # noqa: E402
from detot_agent.evaluation.distributed import RayExecutor, WorkerLostError  # noqa: E402
from detot_agent.evaluation.runner import read_records  # noqa: E402
from detot_agent.evaluation.spec import ContextSpec, build_context  # noqa: E402

# what must agree between executors (timings and the worker slot may differ)
COMPARED = ("answer", "pred", "tokens", "samples", "parse_failures", "correct", "votes", "agreement", "demo_ids",
            "error")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def suite(multiarith_head):
    return load_suite(str(multiarith_head(8)))


@pytest.fixture(scope="module")
def spec(tmp_path_factory, encoder, long_tiny_model_dir, multiarith_file) -> ContextSpec:
    from detot_agent.io.datafiles import read_exemplars
    from detot_agent.retrieval.index import ExemplarIndex

    index = ExemplarIndex(encoder)
    index.add(read_exemplars(multiarith_file, fmt="multiarith")[100:140])
    folder = index.save(tmp_path_factory.mktemp("pool") / "index")
    # one row per generate call: a row decodes the same whatever its batch-mates, but one-row batches
    # make that exact to the last bit on both sides
    return ContextSpec(model=str(long_tiny_model_dir), device="cpu", dtype="float32", max_batch_size=1,
                       max_wait_ms=5, index=str(folder), k=2, n=3, temperature=0.7, max_tokens=10, seed=0,
                       task_name="multiarith")


def _run(suite, methods, out: Path, *, spec: ContextSpec, executor=None, resume=False) -> Path:
    run = {"suite": suite.name, "source": suite.source, "model": "tiny", "seed": 0, "limit": None, "k": spec.k,
           "n": spec.n, "temperature": spec.temperature, "max_tokens": spec.max_tokens}
    ctx = None if executor is not None else build_context(spec)
    return run_eval(suite.examples, methods, ctx, out, run=run, threads=2, progress=False, executor=executor,
                    resume=resume)


def _by_id(path: Path) -> dict[str, dict]:
    records = read_records(path)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"{path.name}: an example was written twice"
    return {r["id"]: {k: r.get(k) for k in COMPARED} for r in records}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, suite, spec) -> Path:
    return _run(suite, ["dspy_cot", "dspy_sc", "dspy_detot"], tmp_path_factory.mktemp("local"),
                spec=spec)


def test_ray_records_equal_the_local_executors(tmp_path, local_ray, suite, spec, local_run):
    methods = ["dspy_cot", "dspy_sc", "dspy_detot", "dspy_detot_loop"]
    executor = RayExecutor(spec, workers=2, threads=2)
    with executor:
        out = _run(suite, methods, tmp_path / "ray", spec=spec, executor=executor)
    ids = {ex.id for ex in suite.examples}
    for method in methods[:3]:
        local, remote = _by_id(local_run / f"{method}.jsonl"), _by_id(out / f"{method}.jsonl")
        assert set(remote) == ids and remote == local, method
    workers = {r["worker"] for r in read_records(out / "dspy_cot.jsonl")}
    assert workers == {0, 1}  # both replicas answered
    # full DETOT: one loop per worker, its events streamed back through the driver
    assert set(_by_id(out / "dspy_detot_loop.jsonl")) == ids
    events = [json.loads(line) for line in (out / "dspy_detot_loop.events.jsonl").read_text().splitlines()]
    observations = [e for e in events if e["event"] == "observation"]
    assert len(observations) == len(ids) and {e["worker"] for e in observations} == {0, 1}
    config = json.loads((out / "methods.json").read_text())["dspy_detot_loop"]
    assert config["loop"] == "per worker" and config["executor"]["workers"] == 2
    assert json.loads((out / "run.json").read_text())["executor"]["kind"] == "ray"
    assert write_report(out, plots=False)["methods"]["dspy_sc"]["n"] == len(ids)


def _kill_slot0_once(rec: dict, executor: RayExecutor) -> None:
    if executor.restarts == 0 and not getattr(executor, "_killed", False):
        executor._killed = True  # type: ignore[attr-defined]
        ray.kill(ray.get_actor(executor.actor_names[0]), no_restart=True)


def test_a_killed_actor_loses_nothing_and_counts_nothing_twice(tmp_path, local_ray, suite, spec, local_run):
    executor = RayExecutor(spec, workers=2, threads=2, on_record=_kill_slot0_once)
    with executor:
        out = _run(suite, ["dspy_sc"], tmp_path / "ray", spec=spec, executor=executor)
    # the kill came after the first record, with problems still queued: the driver saw the death,
    # re-queued what the dead actor held and started a replacement
    assert executor.restarts == 1 and executor.requeued >= 1
    assert _by_id(out / "dspy_sc.jsonl") == _by_id(local_run / "dspy_sc.jsonl")


def test_when_every_worker_is_gone_the_run_stops_and_resumes(tmp_path, local_ray, suite, spec, local_run):
    out = tmp_path / "ray"
    executor = RayExecutor(spec, workers=1, threads=2, max_restarts=0, on_record=_kill_slot0_once)
    with executor, pytest.raises(WorkerLostError, match=r"every Ray worker died .* --resume"):
        _run(suite, ["dspy_cot"], out, spec=spec, executor=executor)
    partial = _by_id(out / "dspy_cot.jsonl")
    assert 1 <= len(partial) < len(suite.examples)
    with RayExecutor(spec, workers=1, threads=2) as again:
        _run(suite, ["dspy_cot"], out, spec=spec, executor=again, resume=True)
    assert _by_id(out / "dspy_cot.jsonl") == _by_id(local_run / "dspy_cot.jsonl")


def test_a_hung_worker_is_replaced_after_the_task_timeout(tmp_path, local_ray, suite, spec):
    # 10 ms is far less than any answer takes: every actor is taken for hung, killed and replaced once
    executor = RayExecutor(spec, workers=1, threads=2, max_restarts=1, task_timeout_s=0.01)
    with executor, pytest.raises(WorkerLostError, match=r"2 taken for hung after 0.01 s"):
        _run(suite, ["dspy_cot"], tmp_path / "ray", spec=spec, executor=executor)
    assert executor.timeouts == 2 and executor.restarts == 1
    assert read_records(tmp_path / "ray" / "dspy_cot.jsonl") == []  # nothing half-written


def test_a_worker_that_cannot_load_its_model_names_the_cause(local_ray, spec, tmp_path):
    bad = spec.model_copy(update={"model": str(tmp_path / "no-such-model")})
    with pytest.raises(WorkerLostError, match=r"failed to start: .*ModelNotFoundError.*no-such-model"):
        RayExecutor(bad, workers=1).start()


def test_cli_runs_on_ray(tmp_path, local_ray, suite, spec, long_tiny_model_dir):
    from typer.testing import CliRunner

    from detot_agent.cli.app import app

    result = CliRunner().invoke(app, [
        "eval", "--suite", suite.source, "--methods", "dspy_predict", "--model", str(long_tiny_model_dir),
        "--device", "cpu", "--dtype", "float32", "--max-tokens", "6", "--executor", "ray", "--workers", "1",
        "--threads", "2", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert len(read_records(tmp_path / "cli" / "dspy_predict.jsonl")) == len(suite.examples)
    assert json.loads((tmp_path / "cli" / "run.json").read_text())["executor"]["workers"] == 1


def test_bench_scale_reports_local_and_ray_rows(tmp_path, local_ray, long_tiny_model_dir):
    from typer.testing import CliRunner

    from detot_agent.cli.app import app

    path = tmp_path / "scale.json"
    result = CliRunner().invoke(app, ["bench", "scale", "--workers", "1", "--problems", "8", "--max-tokens", "4",
                                      "--model", str(long_tiny_model_dir), "--json", str(path)])
    assert result.exit_code == 0, result.output
    figures = json.loads(path.read_text())
    assert [(r["executor"], r["workers"]) for r in figures["rows"]] == [("local", 1), ("ray", 1)]
    assert all(r["problems_per_s"] > 0 and r["run_s"] > 0 for r in figures["rows"])
    assert figures["problems"] == 8 and isinstance(figures["ray_overhead_ms_per_problem"], float)
    assert "Ray overhead per problem" in result.output
