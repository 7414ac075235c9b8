"""LocalEngine behind DSPy: adapters, batching across threads, soft prompts from metadata, bad input, save/load."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import dspy
import pytest
import torch
from dspy.lm15 import Config, Message, Request

from detot_agent import (
    ContextLengthError,
    EmptyPromptError,
    InvalidRequestError,
    LocalEngine,
    ModelNotFoundError,
    SoftPromptError,
    SoftPromptRegistry,
    local_lm,
)
from detot_agent.engines.torch_engine import AsyncLocalEngine

QUESTION = {"question": "What is 2 plus 2?"}
CHAT_TARGET = "[[ ## reasoning ## ]]\n2 plus 2 is 4.\n\n[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]"
JSON_TARGET = '{"reasoning": "2 plus 2 is 4.", "answer": "4"}'


def _req(text: str, **cfg) -> Request:
    return Request(model="tiny", messages=(Message.user(text),), config=Config(**cfg))


@pytest.fixture(scope="module")
def taught_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model taught (a few seconds of training) to answer DSPy's own prompts for one question.

    It learns the exact prompts that ChatAdapter and JSONAdapter render for Predict and
    ChainOfThought, so a pass means the engine rendered them exactly as DSPy formatted them.
    """
    from transformers import AutoModelForCausalLM

    from detot_agent.testing import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("taught"), context=2048)
    probe = LocalEngine(str(folder), device="cpu", dtype="float32")
    pairs = []
    for adapter, target in [(dspy.ChatAdapter(), CHAT_TARGET), (dspy.JSONAdapter(), JSON_TARGET)]:
        for sig in (dspy.Predict("question -> answer").signature,
                    dspy.ChainOfThought("question -> answer").predict.signature):
            ids = probe.render_messages(adapter.format(sig, demos=[], inputs=QUESTION))
            tids = probe.tokenizer(target, add_special_tokens=False)["input_ids"] + [probe.tokenizer.eos_token_id]
            pairs.append((ids, tids))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(300):
        opt.zero_grad()
        total = 0.0
        for ids, tids in pairs:
            loss = model(input_ids=torch.tensor([ids + tids]), labels=torch.tensor([[-100] * len(ids) + tids])).loss
            loss.backward()
            total += float(loss)
        opt.step()
        if total / len(pairs) < 0.005:
            break
    out = folder.parent / "taught-model"
    model.save_pretrained(out)
    probe.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def taught_lm(taught_model_dir: Path):
    return local_lm(str(taught_model_dir), device="cpu", dtype="float32", cache=False)


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
def test_predict_and_chain_of_thought_through_the_engine(taught_lm, adapter):
    with dspy.context(lm=taught_lm, adapter=adapter):
        assert dspy.Predict("question -> answer")(**QUESTION).answer == "4"
        pred = dspy.ChainOfThought("question -> answer")(**QUESTION)
    assert pred.answer == "4"
    assert pred.reasoning == "2 plus 2 is 4."
    usage = taught_lm.history[-1]["usage"]
    assert usage["prompt_tokens"] > 100 and usage["completion_tokens"] > 5


def test_async_engine_answers_through_dspy(taught_lm):
    async def run():
        with dspy.context(lm=taught_lm, adapter=dspy.ChatAdapter()):
            return await dspy.Predict("question -> answer").acall(**QUESTION)

    assert asyncio.run(run()).answer == "4"


def test_save_and_load_program_holding_the_lm(taught_lm, tmp_path):
    program = dspy.ChainOfThought("question -> answer")
    program.set_lm(taught_lm)
    path = tmp_path / "program.json"
    program.save(str(path))
    loaded = dspy.ChainOfThought("question -> answer")
    with pytest.raises(Exception, match="allow_unsafe_lm_state"):
        loaded.load(str(path))
    loaded.load(str(path), allow_unsafe_lm_state=True)
    lm = loaded.predict.lm
    assert isinstance(lm.engine, LocalEngine)
    assert lm.engine.model is taught_lm.engine.model  # weights shared, not loaded twice
    with dspy.context(adapter=dspy.ChatAdapter()):
        assert loaded(**QUESTION).answer == "4"


def test_four_threads_batch_together_and_match_one_by_one(tiny_model_dir):
    engine = LocalEngine(str(tiny_model_dir), device="cpu", dtype="float32", max_wait_ms=200, max_batch_size=8)
    prompts = ["alpha beta", "what is two plus three", "Tom has apples", "answer: five"]
    solo = LocalEngine(str(tiny_model_dir), device="cpu", dtype="float32", dynamic_batching=False)
    expected = [solo.complete(_req(p, max_tokens=16)).text for p in prompts]
    results: dict[int, str] = {}
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = engine.complete(_req(prompts[i], max_tokens=16)).text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == expected
    stats = engine.batch_stats
    assert stats["rows"] == 4 and stats["largest"] == 4  # decoded together, not one by one
    engine.close()


def test_dspy_parallel_uses_dynamic_batching(tiny_model_dir):
    engine = LocalEngine(str(tiny_model_dir), device="cpu", dtype="float32", max_wait_ms=100)
    lm = local_lm(engine=engine, cache=False, max_tokens=8)
    texts = dspy.Parallel(num_threads=4)([(_Echo(lm), {"text": p}) for p in ["one", "two", "three", "four"]])
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert engine.batch_stats["rows"] == 4 and engine.batch_stats["largest"] >= 2
    engine.close()


class _Echo(dspy.Module):
    def __init__(self, lm) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, text: str) -> str:
        return self.lm(text)[0]


def test_sample_returns_n_completions_with_counts(tiny_engine):
    samples = tiny_engine.sample(_req("Tom has 3 apples", temperature=1.0, max_tokens=12, seed=5), 6)
    assert len(samples) == 6
    assert all(1 <= s.output_tokens <= 12 and s.logprob < 0 for s in samples)
    again = tiny_engine.sample(_req("Tom has 3 apples", temperature=1.0, max_tokens=12, seed=5), 6)
    assert [s.text for s in again] == [s.text for s in samples]
    greedy = tiny_engine.sample(_req("Tom has 3 apples", max_tokens=12), 3)
    assert len({s.text for s in greedy}) == 1


def test_complete_reports_usage_and_honours_stop(tiny_engine):
    full = tiny_engine.complete(_req("alpha beta", max_tokens=20))
    assert full.usage.input_tokens == len(tiny_engine.render(_req("alpha beta")))
    assert full.usage.output_tokens == 20 and full.finish_reason == "length"
    stop = full.text[4:7]
    cut = tiny_engine.complete(_req("alpha beta", max_tokens=20, stop=(stop,)))
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)


def test_soft_prompt_resolved_from_metadata_and_versioned(tiny_model_dir):
    registry = SoftPromptRegistry()
    engine = LocalEngine(str(tiny_model_dir), device="cpu", dtype="float32", registry=registry)
    g = torch.Generator().manual_seed(0)
    v1 = registry.register("arith", torch.randn(4, engine.hidden_size, generator=g) * 3)
    v2 = registry.register("arith", torch.randn(4, engine.hidden_size, generator=g) * 3)
    lm = local_lm(engine=engine, cache=True, max_tokens=12)
    plain = lm("alpha beta")[0]
    with_v1 = lm("alpha beta", metadata={"detot_task": "arith", "detot_version": v1})[0]
    with_v2 = lm("alpha beta", metadata={"detot_task": "arith", "detot_version": v2})[0]
    current = lm("alpha beta", metadata={"detot_task": "arith"})[0]
    assert len({plain, with_v1, with_v2}) == 3  # each version reaches the model, no stale cache hit
    assert current == with_v2
    direct = engine.sample(_req("alpha beta", max_tokens=12), 1, soft_prompt=registry.resolve("arith", v1)[1])
    assert direct[0].text == with_v1
    assert engine.complete(_req("alpha beta", max_tokens=12)).usage.input_tokens + 4 == engine.complete(
        Request(model="t", messages=(Message.user("alpha beta"),),
                config=Config(max_tokens=12, extensions={"metadata": {"detot_task": "arith"}}))).usage.input_tokens


# ---- bad input ------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_or_whitespace_prompt_is_refused(tiny_engine, text):
    with pytest.raises(EmptyPromptError, match="empty or whitespace"):
        tiny_engine.complete(_req(text))


def test_unknown_model_path_names_the_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"nope\.gguf"):
        LocalEngine(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        LocalEngine(str(tmp_path))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [(torch.zeros(4, 32), "width 32 but the model's hidden size is 64"),
     (torch.full((4, 64), float("nan")), "256 non-finite"),
     (torch.zeros(64), "shape \\(k, hidden\\)"),
     (torch.zeros(4, 64, dtype=torch.long), "floating-point")],
)
def test_bad_soft_prompt_is_refused(tiny_engine, tensor, message):
    with pytest.raises(SoftPromptError, match=message):
        tiny_engine.sample(_req("hello"), 1, soft_prompt=tensor)


def test_unregistered_task_or_version_is_refused(tiny_engine):
    meta = {"metadata": {"detot_task": "nobody"}}
    with pytest.raises(SoftPromptError, match="no soft prompt registered for task 'nobody'"):
        tiny_engine.complete(Request(model="t", messages=(Message.user("hi"),), config=Config(extensions=meta)))


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_n_is_refused(tiny_engine, n):
    with pytest.raises(InvalidRequestError, match="n must be an integer >= 1"):
        tiny_engine.sample(_req("hello"), n)


def test_non_positive_max_tokens_is_refused(tiny_engine):
    with pytest.raises(ValueError, match="max_tokens"):
        tiny_engine.complete(_req("hello", max_tokens=0))
    lm = local_lm(engine=tiny_engine, cache=False)
    with pytest.raises(Exception, match="max_tokens"):
        lm("hello", max_tokens=-3)


def test_prompt_longer_than_context_is_refused(tiny_engine):
    with pytest.raises(ContextLengthError, match="model's context is 512"):
        tiny_engine.complete(_req("apples " * 600))


def test_long_prompt_clamps_new_tokens_to_the_context(tiny_engine):
    reps = 240
    while tiny_engine.context_length - len(tiny_engine.render(_req("apples " * reps))) > 20:
        reps += 10
    room = tiny_engine.context_length - len(tiny_engine.render(_req("apples " * reps)))
    assert 0 < room <= 20
    out = tiny_engine.complete(_req("apples " * reps, max_tokens=200))
    assert out.usage.output_tokens <= room and out.finish_reason in {"length", "stop"}


def test_engine_state_round_trip(tiny_engine):
    state = tiny_engine.dump_state()
    assert state["model"] == tiny_engine.config.model
    again = AsyncLocalEngine.load_state(state)
    assert again.engine.model is tiny_engine.model
    assert again.engine.config == tiny_engine.config


def test_a_program_saved_under_the_old_async_engine_path_still_loads(tiny_engine, tmp_path):
    """Programs saved before 0.4.0 name `detot_agent.engines.base:AsyncLocalEngine`; DSPy imports that path."""
    import json

    import dspy

    from detot_agent import local_lm

    program = dspy.Predict("question -> answer")
    program.set_lm(local_lm(engine=tiny_engine, cache=False))
    program.save(tmp_path / "p.json")
    saved = json.loads((tmp_path / "p.json").read_text())
    text = json.dumps(saved)
    assert "detot_agent.engines.torch_engine:AsyncLocalEngine" in text  # what a save writes now
    (tmp_path / "old.json").write_text(text.replace("detot_agent.engines.torch_engine:AsyncLocalEngine",
                                                    "detot_agent.engines.base:AsyncLocalEngine"))
    fresh = dspy.Predict("question -> answer")
    with pytest.warns(DeprecationWarning, match="AsyncLocalEngine moved to detot_agent.engines.torch_engine"):
        fresh.load(tmp_path / "old.json", allow_unsafe_lm_state=True)
    rebuilt = fresh.lm._async_engine_spec  # DSPy keeps the async engine object it was given here
    assert isinstance(rebuilt, AsyncLocalEngine)  # the class at its new home
    assert rebuilt.engine.model is tiny_engine.model


def test_the_generic_async_twin_refuses_to_guess_its_engine():
    from detot_agent.engines.base import AsyncEngine
    from detot_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="AsyncEngine names no sync engine"):
        AsyncEngine.load_state({})
