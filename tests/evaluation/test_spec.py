"""Eval contexts take a soft prompt or a whole task embedding from `--soft-prompt`."""

from __future__ import annotations

import pytest
import torch

from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.errors import ConfigError
from detot_agent.evaluation.methods import build_method
from detot_agent.evaluation.spec import ContextSpec, build_context
from detot_agent.softprompt.prompt import SoftPrompt


def test_soft_prompt_option_takes_a_task_embedding_or_a_static_prompt(tmp_path, long_tiny_model_dir, encoder,
                                                                      gsm8k_index, tiny_engine):
    folder = gsm8k_index.save(tmp_path / "index")
    te = TaskEmbedding.from_description("multiarith", "math word problems", encoder=encoder)
    te.attach_head(torch.randn(3, tiny_engine.hidden_size), components=2, model_id="tiny")
    te.head.set(bank=torch.randn(2, 3, tiny_engine.hidden_size))
    te.save(tmp_path / "te")
    spec = ContextSpec(model=str(long_tiny_model_dir), device="cpu", dtype="float32", index=str(folder), k=1, n=1,
                       max_tokens=4, soft_prompt=str(tmp_path / "te"), task_name="multiarith")
    ctx = build_context(spec)
    assert ctx.task_embedding is not None and ctx.soft_prompt is None
    a, b = build_method("dspy_detot", ctx), build_method("dspy_detot_loop", ctx)
    ea, eb = a.program.task_embedding, b.program.task_embedding
    assert ea is not eb and ea is not ctx.task_embedding  # each method learns on its own copy
    q = encoder.encode(["Tom has 3 apples."])
    assert torch.equal(ea.soft_prompts(q), te.soft_prompts(q))
    # a first-release static soft prompt still works
    SoftPrompt("multiarith", torch.randn(3, tiny_engine.hidden_size), model_id="tiny").save(tmp_path / "sp")
    ctx2 = build_context(spec.model_copy(update={"soft_prompt": str(tmp_path / "sp")}))
    assert ctx2.soft_prompt is not None and ctx2.task_embedding is None
    # a task embedding without a head is not a soft prompt
    TaskEmbedding.from_description("m", "math", encoder=encoder).save(tmp_path / "bare")
    with pytest.raises(ConfigError, match="without a soft-prompt head"):
        build_context(spec.model_copy(update={"soft_prompt": str(tmp_path / "bare")}))


def test_every_spec_setting_reaches_the_context(long_tiny_model_dir):
    """A Ray actor builds its context from the spec alone: a setting the spec holds but `build_context` drops would
    silently run with the default there (the violation this catches: a field left out of the mapping)."""
    from dataclasses import fields

    from detot_agent.evaluation.context import EvalContext

    spec = ContextSpec(model=str(long_tiny_model_dir), device="cpu", dtype="float32", k=1, n=2, max_tokens=4,
                       temperature=0.3, seed=7, task_name="t", feedback="gold", reopt_seconds=9.0, reopt_cooldown=3,
                       replay_items=5, judging="shadow", shadow_share=0.5, shadow_settings={"workers": 2},
                       strategy="pot", weighting="cisc",
                       canary=[("1 + 1?", "2")], questions=["q"], loop_policies=[{"strategy": "pot"}],
                       max_batch_size=3, prefix_match="exact", prefix_cache=5)
    ctx = build_context(spec)
    shared = {f.name for f in fields(EvalContext)} & set(ContextSpec.model_fields)
    for name in shared - {"labels", "answer_format", "canary", "loop_policies", "soft_prompt"}:
        assert getattr(ctx, name) == getattr(spec, name), name
    assert ctx.canary == [("1 + 1?", "2")] and [p.strategy for p in ctx.loop_policies] == ["pot"]
    engine = ctx.lm.engine.config  # the engine settings, which the context does not hold
    assert (engine.max_batch_size, engine.prefix_match, engine.prefix_cache) == (3, "exact", 5)
    ctx.lm.engine.close()
