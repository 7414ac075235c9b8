"""VLLMEngine's request construction against LocalEngine on the tiny model (vLLM itself needs a CUDA GPU).

The check that matters: the `prompt_embeds` tensor sent to vLLM equals, bit for bit, the input
embeddings LocalEngine's own prefill feeds the model for the same request (captured with a hook on
the model's forward), with and without a soft prompt.
"""

from __future__ import annotations

import importlib.util
import threading
from types import SimpleNamespace

import pytest
import torch
from dspy.lm15 import Config, Message, Request

from detot_agent import LocalEngine
from detot_agent.engines.vllm_engine import VLLMEngine, _embedding_from_safetensors
from detot_agent.errors import ConfigError, ContextLengthError
from detot_agent.softprompt.registry import SoftPromptRegistry


def _request(text: str, **cfg) -> Request:
    return Request(model="tiny", messages=(Message.user(text),), system="Answer briefly.", config=Config(**cfg))


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    registry = SoftPromptRegistry()
    local = LocalEngine(str(tiny_model_dir), device="cpu", dtype="float32", registry=registry,
                        dynamic_batching=False)
    remote = VLLMEngine(str(tiny_model_dir), dtype="float32", registry=registry)
    yield local, remote, registry
    local.close()


def _prefill_embeds(local: LocalEngine, request: Request, soft: torch.Tensor | None = None) -> torch.Tensor:
    """The inputs_embeds LocalEngine's prefill hands the model (one row: no padding)."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None and not seen:
            seen.append(kwargs["inputs_embeds"].detach().clone())

    handle = local.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        local.sample(request, 1, soft_prompt=soft)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0][0]  # (k + T, H)


def test_embedding_matrix_is_read_from_the_checkpoint_alone(tiny_model_dir, engines):
    local, remote, _ = engines
    found = _embedding_from_safetensors(tiny_model_dir, torch.float32)
    assert found is not None
    assert torch.equal(found[0], local.model.get_input_embeddings().weight)
    assert remote.hidden_size == local.hidden_size and remote.context_length == local.context_length


def test_prompt_embeds_equal_the_local_prefill(engines):
    local, remote, _ = engines
    request = _request("Tom has 3 apples and buys 4 more. How many now?", max_tokens=4)
    assert torch.equal(remote.prompt_embeds(request), _prefill_embeds(local, request))


def test_prompt_embeds_carry_the_soft_prompt_first(engines):
    local, remote, registry = engines
    g = torch.Generator().manual_seed(0)
    soft = torch.randn(5, local.hidden_size, generator=g)
    request = _request("2 plus 2?", max_tokens=4)
    sent = remote.prompt_embeds(request, soft_prompt=soft)
    assert torch.equal(sent, _prefill_embeds(local, request, soft))
    assert torch.equal(sent[:5], soft) and sent.shape[0] == 5 + len(local.render(request))
    # the soft prompt named in the request metadata (what DETOT sends) resolves the same way
    version = registry.register("arith", soft)
    named = _request("2 plus 2?", max_tokens=4,
                     extensions={"metadata": {"detot_task": "arith", "detot_version": version}})
    assert torch.equal(remote.prompt_embeds(named), sent)


def test_sampling_settings_and_budgets_follow_the_request(engines):
    local, remote, _ = engines
    row = remote.build_row(_request("hi", max_tokens=7, temperature=0.5, top_p=0.9, stop=["\n\n"], seed=3), n=4)
    assert remote.sampling_kwargs(row) == {"n": 4, "temperature": 0.5, "max_tokens": 7, "top_p": 0.9,
                                           "stop": ["\n\n"], "seed": 3}
    greedy_row = remote.build_row(_request("hi"))
    greedy = remote.sampling_kwargs(greedy_row)
    # default 512 new tokens, cut to the room the 512-position context leaves: as on the local engine
    assert greedy["temperature"] == 0.0 and greedy["max_tokens"] == 512 - len(greedy_row.prompt_ids)
    assert greedy["max_tokens"] == local.build_row(_request("hi")).max_new_tokens
    with pytest.raises(ContextLengthError, match="context is 512"):
        remote.prompt_embeds(_request("word " * 2000))


class _StubLLM:
    """Stands in for `vllm.LLM.generate` (vLLM cannot run on this CPU machine) to check the plumbing:
    requests gathered into one call, outputs mapped back to the right caller, usage counted."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict], list[dict]]] = []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params))
        outs = []
        for prompt, p in zip(prompts, params, strict=True):
            length = int(prompt["prompt_embeds"].shape[0])
            outs.append(SimpleNamespace(outputs=[
                SimpleNamespace(text=f"len={length} i={i}", token_ids=[1] * (i + 1), finish_reason="stop",
                                cumulative_logprob=-1.0 * i) for i in range(p["n"])]))
        return outs


def test_concurrent_requests_share_one_generate_call(tiny_model_dir):
    stub = _StubLLM()
    engine = VLLMEngine(str(tiny_model_dir), dtype="float32", llm=stub, sampling_params=dict, max_wait_ms=200)
    texts = ["one", "two two", "three three three", "four"]
    results: dict[str, str] = {}

    def call(text: str) -> None:
        results[text] = engine.complete(_request(text, max_tokens=5)).message.text

    threads = [threading.Thread(target=call, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    assert sum(len(prompts) for prompts, _ in stub.calls) == 4 and len(stub.calls) < 4
    for text in texts:  # each caller got the output of its own prompt
        assert results[text] == f"len={engine.prompt_embeds(_request(text)).shape[0]} i=0"
    samples = VLLMEngine(str(tiny_model_dir), dtype="float32", llm=_StubLLM(), sampling_params=dict).sample(
        _request("x", max_tokens=5, temperature=0.7), 3)
    assert [s.output_tokens for s in samples] == [1, 2, 3] and samples[2].logprob == -2.0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_generation_names_the_extra(tiny_model_dir):
    engine = VLLMEngine(str(tiny_model_dir), dtype="float32")
    with pytest.raises(ConfigError, match=r"pip install 'detot-agent\[vllm\]'"):
        engine.sample(_request("hi", max_tokens=2), 1)
    engine.close()


def test_eval_contexts_can_be_built_on_the_vllm_engine(tiny_model_dir):
    from detot_agent.evaluation.spec import ContextSpec, build_context

    ctx = build_context(ContextSpec(model=str(tiny_model_dir), engine="vllm", dtype="float32", max_tokens=8))
    assert isinstance(ctx.lm.engine, VLLMEngine) and ctx.lm.model == f"vllm/{tiny_model_dir.name}"
    with pytest.raises(ConfigError, match="needs --model"):
        build_context(ContextSpec(engine="vllm"))


def test_engine_state_round_trips_through_the_async_twin(tiny_model_dir):
    from detot_agent.engines.vllm_engine import AsyncVLLMEngine

    engine = VLLMEngine(str(tiny_model_dir), dtype="float32", max_batch_size=8, overflow="truncate_middle")
    again = AsyncVLLMEngine.load_state(AsyncVLLMEngine(engine).dump_state())
    assert isinstance(again.engine, VLLMEngine) and again.engine.dump_state() == engine.dump_state()
    assert again.engine.config.overflow.value == "truncate_middle" and again.engine.dtype == torch.float32


def test_detot_serves_its_soft_prompt_through_the_vllm_engine(long_tiny_model_dir, gsm8k_index):
    from detot_agent import DETOT, TaskProfile
    from detot_agent.engines.vllm_engine import vllm_lm

    stub = _StubLLM()
    engine = VLLMEngine(str(long_tiny_model_dir), dtype="float32", llm=stub, sampling_params=dict)
    soft = torch.randn(4, engine.hidden_size, generator=torch.Generator().manual_seed(1))
    task = TaskProfile(name="arith", description="math word problems", kind="arithmetic", answer_format="number")
    lm = vllm_lm(str(long_tiny_model_dir), engine=engine)
    detot = DETOT("question -> answer", task=task, index=gsm8k_index, lm=lm, soft_prompt=soft, background=False)
    pred = detot(question="Tom has 3 apples and buys 4 more. How many apples does he have?")
    engine.close()
    sent = [pair for prompts, params in stub.calls for pair in zip(prompts, params, strict=True)]
    # batched rounds (n samples per request), each request carrying the task's soft prompt first
    assert sent and sum(p["n"] for _, p in sent) == pred.samples_used and max(p["n"] for _, p in sent) > 1
    assert all(torch.equal(prompt["prompt_embeds"][:4], soft) for prompt, _ in sent)
    assert detot.controller.engine is None  # serving only: soft prompts are not trained through vLLM


def test_prompt_embeds_equal_the_local_prefill_for_a_dynamic_prompt(engines, encoder):
    from detot_agent.embedding.task_embedding import TaskEmbedding

    local, remote, _ = engines
    te = TaskEmbedding.from_description("arith", "math word problems", encoder=encoder)
    te.attach_head(torch.randn(3, local.hidden_size, generator=torch.Generator().manual_seed(2)), components=2,
                   model_id="tiny")
    te.head.set(bank=torch.randn(2, 3, local.hidden_size, generator=torch.Generator().manual_seed(3)))
    texts = ["Tom has 3 apples and buys 4 more.", "A train goes 60 miles in 2 hours."]
    prompts = te.soft_prompts(encoder.encode(texts))  # (2, k, H): one per input
    assert not torch.equal(prompts[0], prompts[1])
    for text, soft in zip(texts, prompts, strict=True):
        request = _request(text, max_tokens=4)
        sent = remote.prompt_embeds(request, soft_prompt=soft)
        assert torch.equal(sent, _prefill_embeds(local, request, soft)) and torch.equal(sent[:3], soft)


def test_detot_sends_each_input_its_own_soft_prompt_through_vllm(long_tiny_model_dir, gsm8k_index, encoder):
    from detot_agent import DETOT, TaskProfile
    from detot_agent.engines.vllm_engine import vllm_lm

    stub = _StubLLM()
    engine = VLLMEngine(str(long_tiny_model_dir), dtype="float32", llm=stub, sampling_params=dict)
    task = TaskProfile(name="arith", description="math word problems", kind="arithmetic", answer_format="number")
    lm = vllm_lm(str(long_tiny_model_dir), engine=engine)
    soft = torch.randn(4, engine.hidden_size, generator=torch.Generator().manual_seed(1))
    detot = DETOT("question -> answer", task=task, index=gsm8k_index, lm=lm, soft_prompt=soft, components=2,
                  background=False)
    te = detot.task_embedding
    te.head.set(bank=torch.randn(2, 4, engine.hidden_size, generator=torch.Generator().manual_seed(5)))
    questions = ["Tom has 3 apples and buys 4 more. How many apples?", "A train goes 60 miles in 2 hours. Speed?"]
    firsts = []
    for q in questions:
        stub.calls.clear()
        detot(question=q)
        sent = [prompt["prompt_embeds"][:4] for prompts, _ in stub.calls for prompt in prompts]
        assert sent and all(torch.equal(s, sent[0]) for s in sent)  # the samples of one input share P(x)
        assert torch.allclose(sent[0], te.soft_prompt(encoder.encode([q])[0]))
        firsts.append(sent[0])
    engine.close()
    assert not torch.equal(firsts[0], firsts[1])
