"""The embedded default model (SmolLM2-135M-Instruct, GGUF): few, slow, and kept in CI."""

from __future__ import annotations

import pytest
import torch
from dspy.lm15 import Config, Message, Request
from typer.testing import CliRunner

from detot_agent import LocalEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    e = LocalEngine(device="cpu", dtype="float32")
    yield e
    e.close()


def test_greedy_equals_transformers_generate_and_batch_mates_do_not_matter(engine):
    prompts = ["What is 2+3? Answer briefly.", "Name a prime number greater than 10."]
    reqs = [Request(model="m", messages=(Message.user(p),), config=Config(max_tokens=24)) for p in prompts]
    expected = []
    for r in reqs:
        ids = torch.tensor([engine.render(r)])
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        expected.append(engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    rows = [engine.build_row(r) for r in reqs]
    together = [o[0].text for o in engine.generate_batch(rows)]
    assert together == expected
    assert "5" in together[0]


def test_demo_runs_end_to_end(engine, tmp_path, monkeypatch):
    from detot_agent import Encoder, ExemplarIndex
    from detot_agent.cli.app import app

    monkeypatch.setenv("DETOT_CACHE", str(tmp_path))
    result = CliRunner().invoke(app, ["demo", "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "exemplar index: built 30 hand-written reviews" in result.output  # the embedded model: sentiment
    assert "correct; window agreement" in result.output
    assert "re-optimization" in result.output and "demo finished" in result.output
    said = [line for line in result.output.splitlines() if "cannot add" in line]
    assert len(said) == 1 and "--model M for arithmetic" in said[0]  # the model's limit, in one line, up front
    assert not any(w in result.output for w in ("Warning", "it/s]", "deprecated"))  # no third-party noise
    right = int(result.output.split("/6 correct")[0].rsplit(None, 1)[-1])
    assert right >= 4, result.output  # a task this model can do (5 of 6 when measured)
    assert len(ExemplarIndex.load(tmp_path / "demo-sentiment-index", encoder=Encoder())) == 30  # the next run's


def test_tune_cli_end_to_end_on_the_embedded_model(engine, gsm8k_train, tmp_path):
    from detot_agent.cli.app import app
    from detot_agent.embedding.task_embedding import TaskEmbedding

    out = tmp_path / "te"
    result = CliRunner().invoke(app, ["tune", "--task", "arith", "--data", str(gsm8k_train), "--limit", "12",
                                      "--steps", "3", "--virtual-tokens", "4", "--components", "2", "--val", "4",
                                      "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "loss.png").stat().st_size > 1000 and (out / "report.json").is_file()
    te = TaskEmbedding.load(out, hidden_size=engine.hidden_size, model_id=engine.source.spec)
    assert te.head is not None and (te.head.k, te.head.hidden_size, te.head.components) == (4, 576, 2)
    assert te.model_id == "default"


def test_zero_head_greedy_output_equals_the_static_prompt_path_on_the_embedded_model(engine, encoder):
    from detot_agent.embedding.task_embedding import TaskEmbedding
    from detot_agent.softprompt.prompt import SoftPrompt

    questions = ["Tom has 3 apples and buys 4 more. How many apples?", "What is 12 times 7?"]
    te = TaskEmbedding.from_description("arith", "math word problems", encoder=encoder)
    p0 = SoftPrompt.initialize(engine, "arith", k=8, init="text").vectors
    te.attach_head(p0, components=4, model_id=engine.source.spec, inputs=encoder.encode(questions * 2))
    reqs = [Request(model="m", messages=(Message.user(q),), config=Config(max_tokens=24)) for q in questions]
    dynamic = engine.generate_batch([engine.build_row(r, soft_prompt=s) for r, s in
                                     zip(reqs, te.soft_prompts(encoder.encode(questions)), strict=True)])
    static = engine.generate_batch([engine.build_row(r, soft_prompt=p0) for r in reqs])
    assert [o[0].token_ids for o in dynamic] == [o[0].token_ids for o in static]
    assert all(len(o[0].token_ids) > 0 for o in static)


def test_llama_cpp_first_token_distribution_agrees_with_the_torch_engine(engine):
    # llama.cpp multiplies the Q4_1 weights with 8-bit-quantized activations; transformers dequantizes the
    # weights to float32 first. Stated tolerance on the embedded model: max |logit difference| <= 1.0 (logits
    # span about 30), total variation distance <= 0.1, and at least 4 of the top 5 tokens shared.
    from detot_agent import LlamaCppEngine

    cpp = LlamaCppEngine()
    req = Request(model="m", messages=(Message.user("What is 2+3? Answer briefly."),), config=Config(max_tokens=8))
    soft = engine.token_embeddings(engine.tokenizer("Solve the problem step by step.")["input_ids"][:6])
    for sp in (None, soft):
        a, b = engine.next_token_logits(req, soft_prompt=sp), cpp.next_token_logits(req, soft_prompt=sp)
        tv = 0.5 * float((torch.softmax(a, -1) - torch.softmax(b, -1)).abs().sum())
        assert float((a - b).abs().max()) <= 1.0 and tv <= 0.1
        assert len(set(a.topk(5).indices.tolist()) & set(b.topk(5).indices.tolist())) >= 4
    assert cpp.sample(req, 1)[0].text == engine.sample(req, 1)[0].text == "The answer is 5."
    cpp.close()


def test_default_engine_greedy_answers_are_the_same_alone_and_inside_a_mixed_batch():
    """The embedded model on the default engine and dtype (llama.cpp where installed): a greedy row decodes
    the same alone and beside rows of other lengths and a sampled row of four."""
    from detot_agent.engines.lm import build_engine
    from detot_agent.testing import greedy_alone_and_batched

    e = build_engine(None)
    alone, batched = greedy_alone_and_batched(e)
    assert batched == alone and all(alone)
    e.close()
