"""The llama.cpp engine against the torch engine and llama.cpp's own token path, on a tiny GGUF written here."""

from __future__ import annotations

import threading

import dspy
import pytest
import torch
from dspy.lm15 import Config, Message, Request

from detot_agent import LlamaCppEngine, LocalEngine, local_lm
from detot_agent.engines.config import EngineConfig
from detot_agent.engines.generation import GenRow
from detot_agent.engines.llamacpp_load import open_llama
from detot_agent.engines.lm import AsyncLlamaCppEngine, choose_engine
from detot_agent.errors import ArtefactError, ConfigError, InvalidRequestError, SoftPromptError

LOGIT_ATOL = 2e-3  # float32 weights in both engines; only the order of float operations differs


def _req(text: str, **cfg) -> Request:
    cfg.setdefault("max_tokens", 12)
    return Request(model="m", messages=(Message.user(text),), config=Config(**cfg))


@pytest.fixture(scope="module")
def cpp(tiny_gguf):
    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=8, max_wait_ms=50)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def pt(tiny_gguf):
    engine = LocalEngine(str(tiny_gguf), device="cpu", dtype="float32", max_wait_ms=50)
    yield engine
    engine.close()


def _soft(k: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, 64, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_the_tiny_gguf_loads_in_both_engines_with_the_same_prompt_tokens(cpp, pt):
    assert cpp.hidden_size == pt.hidden_size == 64
    assert cpp.vocab_size == pt.vocab_size and cpp.eos_ids == pt.eos_ids
    req = _req("Tom has 3 apples")
    assert cpp.render(req) == pt.render(req)
    assert torch.equal(cpp.token_embeddings([1, 5, 9]), pt.token_embeddings([1, 5, 9]))


def test_greedy_tokens_equal_llama_cpp_own_token_path(cpp, tiny_gguf):
    ids = cpp.render(_req("what is two plus three"))
    ours = cpp.generate_batch([GenRow(prompt_ids=ids, max_new_tokens=16)])[0][0].token_ids
    llm, _ = open_llama(tiny_gguf, n_ctx=256, verbose=False)
    theirs = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        theirs.append(tok)
        if tok in cpp.eos_ids or len(theirs) == 16:
            break
    assert ours == theirs and len(ours) > 1


@pytest.mark.parametrize("soft", [None, _soft()])
def test_first_token_logits_agree_with_the_torch_engine(cpp, pt, soft):
    req = _req("Tom has 3 apples and buys 4 more")
    a, b = pt.next_token_logits(req, soft_prompt=soft), cpp.next_token_logits(req, soft_prompt=soft)
    assert torch.allclose(a, b, atol=LOGIT_ATOL), float((a - b).abs().max())
    # and the soft prompt really moves them
    if soft is not None:
        assert not torch.allclose(b, cpp.next_token_logits(req), atol=1e-2)


def test_greedy_and_seeded_samples_match_the_torch_engine_with_a_soft_prompt(cpp, pt):
    req = _req("Tom has 3 apples", max_tokens=10)
    assert [s.text for s in cpp.sample(req, 1, soft_prompt=_soft())] == [
        s.text for s in pt.sample(req, 1, soft_prompt=_soft())]
    seeded = _req("Tom has 3 apples", max_tokens=10, temperature=0.8, seed=3)
    ours, theirs = cpp.sample(seeded, 3, soft_prompt=_soft()), pt.sample(seeded, 3, soft_prompt=_soft())
    assert [s.text for s in ours] == [s.text for s in theirs]
    assert [s.logprob for s in ours] == pytest.approx([s.logprob for s in theirs], abs=1e-2)


def test_per_row_soft_prompts_in_one_batch_give_each_row_what_it_gives_alone(cpp):
    rows = [GenRow(prompt_ids=cpp.render(_req(t)), soft_prompt=s, max_new_tokens=10)
            for t, s in [("alpha beta", _soft(4, 1)), ("Tom has apples", None), ("answer: five", _soft(6, 2))]]
    together = cpp.generate_batch(rows)
    alone = [cpp.generate_batch([row])[0] for row in rows]
    assert [o[0].token_ids for o in together] == [o[0].token_ids for o in alone]
    assert [o[0].logprob for o in together] == pytest.approx([o[0].logprob for o in alone], abs=1e-3)


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_n_samples_share_one_prefill(tiny_gguf, scheduler):
    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=8, scheduler=scheduler)
    req = _req("Tom has 3 apples", temperature=0.9, seed=1, max_tokens=6)
    prompt = len(engine.render(req)) + 4
    samples = engine.sample(req, 5, soft_prompt=_soft())
    assert len(samples) == 5 and len({s.text for s in samples}) > 1
    assert engine.prompt_tokens_decoded == prompt  # once, not five times
    # five separate requests: the static scheduler prefills five times, the continuous one reuses the cached prompt
    for _ in range(5):
        engine.sample(req, 1, soft_prompt=_soft())
    assert engine.prompt_tokens_decoded == (6 if scheduler == "static" else 1) * prompt
    engine.close()


def test_concurrent_requests_are_batched_and_match_one_by_one(tiny_gguf, cpp):
    prompts = ["alpha beta", "what is two plus three", "Tom has apples", "answer: five"]
    expected = [cpp.complete(_req(p)).text for p in prompts]
    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=8, max_wait_ms=300)
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = engine.complete(_req(prompts[i])).text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == expected
    assert engine.batch_stats["largest"] >= 2
    engine.close()


def test_stop_strings_seeds_max_tokens_and_usage(cpp):
    free = cpp.complete(_req("Tom has 3 apples", max_tokens=16))
    text = free.text
    assert free.usage.output_tokens == 16 and free.finish_reason == "length"
    assert free.usage.input_tokens == len(cpp.render(_req("Tom has 3 apples")))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = cpp.complete(_req("Tom has 3 apples", max_tokens=16, stop=[stop]))
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"
    a = [s.text for s in cpp.sample(_req("Tom", temperature=1.0, seed=7), 3)]
    b = [s.text for s in cpp.sample(_req("Tom", temperature=1.0, seed=7), 3)]
    c = [s.text for s in cpp.sample(_req("Tom", temperature=1.0, seed=8), 3)]
    assert a == b and a != c
    assert all(s.output_tokens <= 5 for s in cpp.sample(_req("Tom", temperature=1.0, seed=7, max_tokens=5), 4))


def test_a_bad_gguf_file_and_a_soft_prompt_of_the_wrong_width_are_refused(cpp, tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("these are my notes, not a model")
    with pytest.raises(ArtefactError, match=r"notes\.gguf: not a valid GGUF"):
        LlamaCppEngine(str(bad))
    with pytest.raises(SoftPromptError, match="width 32 but the model's hidden size is 64"):
        cpp.sample(_req("Tom"), 1, soft_prompt=torch.zeros(4, 32))


def test_engine_choice(tiny_gguf, tiny_model_dir):
    assert choose_engine("auto", EngineConfig(model=str(tiny_gguf), device="cpu")) == "llamacpp"
    assert choose_engine("auto", EngineConfig(model=str(tiny_model_dir), device="cpu")) == "torch"
    assert choose_engine("torch", EngineConfig(model=str(tiny_gguf))) == "torch"
    with pytest.raises(ConfigError, match="engine must be one of"):
        choose_engine("llama", EngineConfig())
    with pytest.raises(ConfigError, match=r"serves \.gguf files"):
        LlamaCppEngine(str(tiny_model_dir))
    lm = local_lm(str(tiny_gguf), device="cpu")
    assert isinstance(lm.engine, LlamaCppEngine) and lm.model.startswith("llamacpp/")
    lm.engine.close()


def test_a_program_holding_a_llama_cpp_lm_saves_and_loads(cpp, tmp_path):
    lm = local_lm(engine=cpp, max_tokens=8)
    program = dspy.Predict("question -> answer")
    program.set_lm(lm)
    program.save(str(tmp_path / "p.json"))
    loaded = dspy.Predict("question -> answer")
    loaded.load(str(tmp_path / "p.json"), allow_unsafe_lm_state=True)
    assert isinstance(loaded.lm.engine, LlamaCppEngine)
    assert isinstance(loaded.lm._async_engine_spec, AsyncLlamaCppEngine)
    assert loaded.lm.engine.source.spec == cpp.source.spec
    loaded.lm.engine.close()


@pytest.mark.parametrize("which", ["cpp", "pt"])
def test_a_greedy_answer_and_samples_share_one_prefill(cpp, pt, which):
    engine = cpp if which == "cpp" else pt
    req = _req("Tom has 3 apples", max_tokens=8, temperature=0.9, seed=4)
    before = cpp.prompt_tokens_decoded
    together = engine.sample(req, 4, soft_prompt=_soft(), greedy=1)
    if which == "cpp":
        assert cpp.prompt_tokens_decoded - before == len(cpp.render(req)) + 4  # one prefill for all four
    greedy = engine.sample(_req("Tom has 3 apples", max_tokens=8), 1, soft_prompt=_soft())
    sampled = engine.sample(req, 3, soft_prompt=_soft())
    assert [s.text for s in together] == [s.text for s in greedy + sampled]  # same greedy answer, same seeds
    with pytest.raises(InvalidRequestError, match="greedy must be an integer from 0 to n"):
        engine.sample(req, 2, greedy=3)
