"""The `detot` command line on the tiny model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from detot_agent.cli.app import app
from detot_agent.errors import ConfigError, DataFileError

runner = CliRunner()


def test_help_lists_every_command_with_one_line():
    out = runner.invoke(app, ["--help"]).output
    for command in ("generate", "demo", "bench"):
        assert command in out
    bench = runner.invoke(app, ["bench", "--help"]).output
    assert "engine" in bench


def test_generate_prints_completions_and_token_counts(tiny_model_dir):
    result = runner.invoke(app, ["generate", "Tom has apples", "--model", str(tiny_model_dir), "--n", "3",
                                 "--temperature", "0.8", "--max-tokens", "6", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.count("tokens, logprob") == 3
    assert "tok/s" in result.output


def test_bench_engine_writes_the_promised_keys(tiny_gguf, tmp_path):
    path = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "engine", "--model", str(tiny_gguf), "--engine", "torch,llamacpp", "--n", "4",
                                 "--max-tokens", "8", "--soft-prompt-k", "3", "--json", str(path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    for kind in ("torch", "llamacpp"):
        row = data["engines"][kind]
        for key in ("single_tok_s", "fanout_tok_s", "batched_tok_s", "concurrent_tok_s"):
            assert row[key] > 0
        assert 4 <= row["tokens"]["batched"] <= 4 * 8
        assert row["batcher"]["largest"] >= 2  # concurrent requests were gathered
    assert data["reference"]["single_tok_s"] > 0 and data["soft_prompt_k"] == 3
    assert set(data["ratios"]) >= {"llamacpp_over_torch_batched", "llamacpp_batched_over_reference_single"}
    assert "llama-cpp-python Llama" in result.output


def test_bench_engine_refuses_an_unknown_engine(tiny_model_dir):
    result = runner.invoke(app, ["bench", "engine", "--model", str(tiny_model_dir), "--engine", "torch,llama"])
    assert isinstance(result.exception, ConfigError)  # main() turns it into one line and exit code 2
    assert "--engine takes torch and/or llamacpp" in str(result.exception)


@pytest.mark.parametrize("engine", ["llamacpp", "torch"])
def test_bench_serve_runs_both_schedulers_and_the_cache_saves_prefill(tiny_gguf, gsm8k_train, tmp_path, engine):
    path = tmp_path / "serve.json"
    result = runner.invoke(app, ["bench", "serve", "--model", str(tiny_gguf), "--engine", engine, "--data",
                                 str(gsm8k_train), "--problems", "2", "--concurrency", "2", "--rounds", "2",
                                 "--demos", "1", "--single", "2", "--max-tokens", "4", "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    static, continuous = data["schedulers"]["static"], data["schedulers"]["continuous"]
    assert data["engine"] == engine and data["speedup_detot_tok_s"] > 0 and data["single_p99_ratio"] > 0
    assert static["detot"]["rounds"] == continuous["detot"]["rounds"] == 4
    # every round of a problem after its first reuses the prompt: half of the prefill or less
    assert continuous["detot"]["prompt_tokens_prefilled"] <= static["detot"]["prompt_tokens_prefilled"] / 2
    assert continuous["stats"]["prefix_hits"] >= 2


def test_bench_serve_refuses_an_unknown_engine(tiny_gguf):
    result = runner.invoke(app, ["bench", "serve", "--model", str(tiny_gguf), "--engine", "vllm"])
    assert isinstance(result.exception, ConfigError) and "--engine takes llamacpp or torch" in str(result.exception)


def test_bad_model_gives_one_line_error_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from detot_agent.cli.app import main; main()", "generate", "hi",
                           "--model", str(tmp_path / "missing.gguf")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "missing.gguf" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_index_build_and_search(gsm8k_train, tmp_path):
    out = tmp_path / "idx"
    result = runner.invoke(app, ["index", "build", "--data", str(gsm8k_train), "--format", "gsm8k", "--limit", "50",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "indexed 50 records" in result.output and (out / "manifest.json").is_file()
    found = runner.invoke(app, ["index", "search", str(out), "How many clips did Natalia sell?", "-k", "3",
                                "--task", "Solve grade-school math word problems"])
    assert found.exit_code == 0, found.output
    assert "train:1" in found.output and found.output.count("train:") == 3
    # with MMR, the similarity to the query and the MMR score are shown apart; the top hit's similarity is the
    # same as without MMR (MMR only reorders what follows it)
    plain = runner.invoke(app, ["index", "search", str(out), "How many clips did Natalia sell?", "-k", "1"])
    diverse = runner.invoke(app, ["index", "search", str(out), "How many clips did Natalia sell?", "-k", "3",
                                  "--mmr", "0.5"])
    assert "similarity" in diverse.output and "mmr score" in diverse.output and "mmr score" not in plain.output
    top = re.search(r"train:1\s*│\s*([0-9.]+)", plain.output)
    assert top is not None and top.group(1) in diverse.output
    empty = runner.invoke(app, ["index", "search", str(out), "  "])
    assert isinstance(empty.exception, ConfigError) and "query is empty" in str(empty.exception)


def test_index_build_reports_bad_data_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{broken\n')
    proc = subprocess.run([sys.executable, "-c", "from detot_agent.cli.app import main; main()", "index", "build",
                           "--data", str(bad), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "bad.jsonl line 2: not valid JSON" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_tune_trains_the_whole_task_embedding_and_its_artefact_serves_everywhere(tiny_model_dir, gsm8k_train,
                                                                                  tmp_path):
    from detot_agent.embedding.task_embedding import TaskEmbedding
    from detot_agent.softprompt.prompt import SoftPrompt

    out = tmp_path / "te"
    result = runner.invoke(app, ["tune", "--task", "arith", "--data", str(gsm8k_train), "--limit", "12", "--model",
                                 str(tiny_model_dir), "--virtual-tokens", "3", "--components", "2", "--steps", "4",
                                 "--val", "3", "--lr", "0.05", "--out", str(out), "--device", "cpu",
                                 "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps at the terminal width
    assert "2 component(s)" in text and "gate usage" in text
    te = TaskEmbedding.load(out)
    assert te.head is not None and (te.head.k, te.head.components) == (3, 2)
    assert (out / "loss.png").is_file() and json.loads((out / "report.json").read_text())["steps"] >= 1
    # the same artefact drives retrieval in `index search --task`
    idx = tmp_path / "idx"
    assert runner.invoke(app, ["index", "build", "--data", str(gsm8k_train), "--limit", "20", "--out",
                               str(idx)]).exit_code == 0
    found = runner.invoke(app, ["index", "search", str(idx), "How many clips?", "-k", "2", "--task", str(out)])
    assert found.exit_code == 0 and found.output.count("train:") == 2, found.output
    # PEFT gets P0 only, and says so
    peft = runner.invoke(app, ["export-peft", str(out), "--out", str(tmp_path / "peft")])
    assert peft.exit_code == 0, peft.output
    assert "no PEFT equivalent" in " ".join(peft.output.split()) or te.head.is_static()
    back = SoftPrompt.from_peft(tmp_path / "peft", task="arith")
    assert torch.equal(back.vectors, te.head.p0)
    # bad settings are refused before a model loads
    bad = runner.invoke(app, ["tune", "--task", "a", "--data", str(gsm8k_train), "--out", str(tmp_path / "x"),
                              "--freeze", "everything"])
    assert bad.exit_code != 0 and "freeze" in bad.output


def test_tune_with_demos_trains_on_the_prompts_detot_serves(tiny_model_dir, gsm8k_train, tmp_path, monkeypatch):
    from detot_agent.embedding.task_embedding import TaskEmbedding

    idx = tmp_path / "idx"  # the same problems as the training data: each question's own exemplar is nearest
    assert runner.invoke(app, ["index", "build", "--data", str(gsm8k_train), "--limit", "30", "--out",
                               str(idx)]).exit_code == 0
    seen = []
    update = TaskEmbedding.update
    monkeypatch.setattr(TaskEmbedding, "update", lambda self, items, **kw: seen.append((items, kw["val"])) or
                        update(self, items, **kw))  # observe what it trains on, then train
    out = tmp_path / "te"
    result = runner.invoke(app, ["tune", "--task", "arith", "--data", str(gsm8k_train), "--limit", "12", "--model",
                                 str(tiny_model_dir), "--virtual-tokens", "2", "--steps", "2", "--val", "3",
                                 "--index", str(idx), "--demos", "2", "--out", str(out), "--device", "cpu",
                                 "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "2 demo(s) from" in " ".join(result.output.split())
    items, val = seen[0]
    assert len(items) + len(val) == 12
    for item in [*items, *val]:
        messages = item.example.messages
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2 + ["user"]
        question = messages[-1]["content"].removesuffix("\nLet's think step by step.")
        assert not any(question in m["content"] for m in messages[:-1])  # never its own worked answer
        assert item.example.target.endswith(".") and "The answer is" in item.example.target
    report = json.loads((out / "report.json").read_text())
    assert report["demos_in_prompt"] == 2 and report["demo_index"] == str(idx)
    # without --demos the prompt is the question alone (as before)
    seen.clear()
    old = runner.invoke(app, ["tune", "--task", "arith", "--data", str(gsm8k_train), "--limit", "8", "--model",
                              str(tiny_model_dir), "--k", "2", "--steps", "1", "--val", "0", "--out",
                              str(tmp_path / "te0"), "--device", "cpu", "--dtype", "float32"])  # 0.3's flag
    assert old.exit_code == 0 and "--k is deprecated: it is --virtual-tokens" in old.output
    assert TaskEmbedding.load(tmp_path / "te0").head.k == 2
    assert all(i.example.messages is None and i.example.prompt.endswith("step by step.") for i in seen[0][0])
    # --demos without an index is refused before a model loads
    bad = runner.invoke(app, ["tune", "--task", "a", "--data", str(gsm8k_train), "--out", str(tmp_path / "x"),
                              "--demos", "2", "--model", "/nonexistent/model"])
    assert bad.exit_code != 0 and "--demos needs --index" in " ".join(bad.output.split())


def test_convert_turns_a_static_soft_prompt_into_the_zero_head_case(tiny_engine, tmp_path):
    from detot_agent.embedding.task_embedding import TaskEmbedding
    from detot_agent.softprompt.prompt import SoftPrompt

    sp = SoftPrompt.initialize(tiny_engine, "arith", k=4, init="vocab")
    sp.save(tmp_path / "sp")
    result = runner.invoke(app, ["convert", "--soft-prompt", str(tmp_path / "sp"), "--task", "arith",
                                 "--description", "math word problems", "--out", str(tmp_path / "te")])
    assert result.exit_code == 0, result.output
    te = TaskEmbedding.load(tmp_path / "te", hidden_size=tiny_engine.hidden_size)
    assert te.head is not None and te.head.components == 0 and torch.equal(te.head.p0, sp.vectors)


def test_bench_loop_writes_latency_of_both_phases(tiny_gguf, tmp_path):
    path = tmp_path / "loop.json"
    result = runner.invoke(app, ["bench", "loop", "--model", str(tiny_gguf), "--requests", "8", "--max-tokens", "4",
                                 "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    for phase in ("quiet", "busy"):
        ph = data["phases"][phase]
        assert ph["n"] == 8 and 0 < ph["p50_s"] <= ph["p99_s"]
    assert data["p99_ratio"] > 0 and len(data["reoptimizations"]) >= 1
    assert all(r["error"] is None for r in data["reoptimizations"])
    assert all("training" in r for r in data["reoptimizations"])  # the update's steps and waits (if it trained)
    assert "p99 busy/quiet" in " ".join(result.output.split())
    assert data["yield_to_serving"] == 30.0 and data["judging"] == "replay"  # serving first by default
    assert data["background_share"] == {"engine": 0.1, "training": 0.1}
    for phase in ("quiet", "busy"):  # each request's samples and output tokens: whether the phases did equal work
        assert len(data["work"][phase]) == 8 and all(n >= 1 and t >= 1 for n, t in data["work"][phase])


def test_bench_loop_with_shadow_judging_and_a_thinking_client(tiny_gguf, tmp_path):
    path = tmp_path / "loop.json"
    result = runner.invoke(app, ["bench", "loop", "--model", str(tiny_gguf), "--requests", "8", "--max-tokens", "4",
                                 "--judging", "shadow", "--think", "0.05", "--shadow", "background=false",
                                 "--shadow", "when_full=wait", "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["judging"] == "shadow" and data["think_s"] == 0.05
    assert data["shadow_config"]["background"] is False and data["shadow_config"]["when_full"] == "wait"
    assert data["shadow_config"]["share"] == 1.0  # the bench shadows every request
    assert all(r["error"] is None for r in data["reoptimizations"])
    started = any("shadow trial started" in r["reason"] for r in data["reoptimizations"])
    assert ("shadow" in data["phases"]) == started == (data["shadow_p99_ratio"] is not None)  # phase 3 iff a trial
    bad = runner.invoke(app, ["bench", "loop", "--model", str(tiny_gguf), "--judging", "vibes"])
    assert bad.exit_code != 0 and "replay or shadow" in str(bad.exception)
    for args, message in [(["--judging", "shadow", "--shadow", "when_full=never"], "when_full"),
                          (["--shadow", "workers=2"], "needs --judging shadow")]:  # refused before the model loads
        bad = runner.invoke(app, ["bench", "loop", "--model", "no-such-model.gguf", *args])
        assert bad.exit_code != 0 and message in str(bad.exception), bad.output


def test_eval_refuses_bad_methods_and_ablations_before_loading_anything(multiarith_head):
    suite = str(multiarith_head(2))
    cases = [(["--methods", "cot", "--ablate", "retrieval"], "--ablate needs a DETOT method"),
             (["--methods", "detot_loop", "--ablate", "bogus"], r"unknown ablation\(s\) \['bogus'\]"),
             (["--methods", "detot-retrieval,nope"], "unknown method 'nope'"),
             (["--methods", "detot_loop", "--loop-policy", "pot"], "policy 'pot': expected strategy="),
             (["--methods", "detot_loop", "--loop-policy", "strategy=direct"], "strategy: String should match"),
             (["--methods", "cot", "--weighting", "loudest"], "--weighting must be uniform, cisc or filter"),
             (["--methods", "cot", "--scheduler", "eager"], "--scheduler must be continuous or static"),
             (["--methods", "cot", "--prefix-match", "fuzzy"], "--prefix-match must be prefix or exact"),
             (["--methods", "detot_loop", "--judging", "vote"], "--judging must be replay or shadow"),
             (["--methods", "detot_loop", "--shadow-share", "0.5"], "needs --judging shadow, got 0.5 with "
                                                                   "--judging replay"),
             (["--methods", "detot_loop", "--judging", "shadow", "--shadow-share", "1.5"], "a share in \\(0, 1\\]"),
             (["--methods", "detot_loop", "--shadow", "workers=2"], "needs --judging shadow"),
             (["--methods", "detot_loop", "--judging", "shadow", "--shadow", "worker=2"], "worker: unknown setting"),
             (["--methods", "detot_loop", "--judging", "shadow", "--shadow", "workers=0"], "workers"),
             (["--methods", "detot_loop", "--judging", "shadow", "--shadow", "share=1"], "SETTING=VALUE"),
             (["--methods", "detot_loop", "--judging", "shadow", "--shadow", "when_full=block"], "when_full"),
             (["--methods", "detot_loop", "--loop-policy", "max_tokens=0"], "max_tokens")]
    for args, why in cases:
        result = runner.invoke(app, ["eval", "--suite", suite, *args, "--model", "/nonexistent/model"])
        assert isinstance(result.exception, ConfigError), result.output
        assert re.search(why, str(result.exception)), str(result.exception)
    result = runner.invoke(app, ["eval", "--suite", suite, "--methods", "cot", "--limit", "1", "--offset", "5",
                                 "--model", "/nonexistent/model"])
    assert isinstance(result.exception, DataFileError) and "--offset 5 skips all 2 problems" in str(result.exception)


def _bad_inputs(tmp_path, multiarith_head):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model\n")
    suite = str(multiarith_head(2))
    ev = ["eval", "--suite", suite, "--methods", "cot", "--out", str(tmp_path / "ev")]
    return [
        (["generate", "hi", "--model", str(fake)], "not a valid GGUF model file"),
        (["generate", "hi", "--max-tokens", "0"], "Invalid value for '--max-tokens'"),
        (["generate", "hi", "--max-tokens", "-3"], "Invalid value for '--max-tokens'"),
        (["generate", "hi", "--temperature", "-1"], "Invalid value for '--temperature'"),
        ([*ev, "--model", str(fake)], "not a valid GGUF model file"),
        ([*ev, "--max-tokens", "0"], "Invalid value for '--max-tokens'"),
        ([*ev, "--n", "0"], "Invalid value for '--n'"),
        ([*ev, "--threads", "0"], "Invalid value for '--threads'"),
        ([*ev, "--limit", "-2"], "Invalid value for '--limit'"),
        ([*ev, "--replay-items", "0"], "Invalid value for '--replay-items'"),
        (["eval", "--suite", suite, "--methods", "nope"], "unknown method 'nope'"),
        (["index", "build", "--data", suite, "--limit", "-3", "--out", str(tmp_path / "ix")],
         "Invalid value for '--limit'"),
        (["index", "build", "--data", suite, "--format", "gsm8k", "--out", str(tmp_path / "ix")],
         "pass --format multiarith"),
        (["demo", "--task", "bogus"], "Invalid value for --task: must be one of auto, arithmetic, sentiment"),
        (["demo", "--max-tokens", "0"], "Invalid value for '--max-tokens'"),
    ]


def test_bad_inputs_get_one_message_naming_what_was_wrong(tmp_path, multiarith_head):
    from detot_agent.errors import DetotError

    for args, why in _bad_inputs(tmp_path, multiarith_head):
        result = runner.invoke(app, args)
        said = str(result.exception) if isinstance(result.exception, DetotError) else result.output
        assert result.exit_code != 0 and why in " ".join(said.split()), (args, said)
        # no traceback of our own: either a usage error (exit 2) or one of the library's errors
        assert result.exit_code == 2 or isinstance(result.exception, DetotError), (args, result.exception)


def test_other_packages_warnings_are_quiet_unless_verbose():
    import logging
    import warnings

    from detot_agent.cli.app import quiet_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party(False)
        warnings.warn_explicit("third-party noise", UserWarning, "x.py", 1, module="transformers.generation")
        warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="detot_agent.engines.lm")
    assert [str(w.message) for w in seen] == ["ours"]
    assert logging.getLogger("transformers").level == logging.ERROR
    logging.getLogger("transformers").setLevel(logging.NOTSET)


def test_the_demo_shows_each_question_in_short_lines_with_demo_text_and_why_sampling_stopped(encoder):
    import dspy
    from rich.console import Console

    from detot_agent.cli.demo import demo_exemplars, describe
    from detot_agent.retrieval.index import ExemplarIndex

    index = ExemplarIndex(encoder)
    index.add(demo_exemplars(6))
    pred = dspy.Prediction(demo_ids=["demo:0", "demo:1"], votes={"7": 3.0, "8": 1.0}, agreement=0.75,
                           samples_used=4, parse_failures=2, answer_key="7")
    text = describe(1, "Tom has 3 apples and buys 4 more. " * 4, pred, "7", True, index=index, max_samples=6,
                    seconds=1.5)
    console = Console(width=80, record=True, force_terminal=False)
    console.print(text)
    shown = console.export_text()
    assert all(len(line) <= 80 for line in shown.splitlines())
    assert index.get("demo:0").text[:30] in shown and "2 unparsed" in shown and "stopped early" in shown
    assert "answer 7, gold 7: right" in shown
    full = describe(2, "q", dspy.Prediction(demo_ids=[], votes={}, agreement=0.0, samples_used=6, parse_failures=6,
                                            answer_key=None), "7", False, index=index, max_samples=6, seconds=1.0)
    assert "drew the whole budget" in full and "votes none" in full and "wrong" in full


def test_eval_methods_lists_every_method_once_and_the_ablation_syntax():
    from detot_agent.evaluation.methods import METHODS

    out = runner.invoke(app, ["eval", "methods"], terminal_width=200).output
    listed = re.findall(r"^\| `(\w+)`", out, re.M)
    assert sorted(listed) == sorted(METHODS)
    assert "ablations: <detot method>-<part>" in out and "strategy" in out
