"""Decoding: equality with transformers' own generate, soft-prompt placement under left padding."""

from __future__ import annotations

import torch
from dspy.lm15 import Config, Message, Request

from detot_agent.engines.generation import GenRow, generate_rows

PROMPTS = ["hi there", "what is two plus three? tell me the answer", "x", "Tom has 3 apples and buys 4 more"]


def _req(text: str, **cfg) -> Request:
    return Request(model="tiny", messages=(Message.user(text),), config=Config(**cfg))


def _hf_greedy(engine, ids: list[int], n_new: int, soft: torch.Tensor | None = None) -> list[int]:
    model = engine.model
    if soft is None:
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False,
                             eos_token_id=None, pad_token_id=engine.tokenizer.pad_token_id)
        return out[0, len(ids):].tolist()
    emb = model.get_input_embeddings()(torch.tensor(ids))
    inputs = torch.cat([soft, emb]).unsqueeze(0)
    out = model.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long),
                         max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                         pad_token_id=engine.tokenizer.pad_token_id)
    return out[0].tolist()


def _row(engine, text: str, **kw) -> GenRow:
    return GenRow(prompt_ids=engine.render(_req(text)), **kw)


def test_greedy_without_soft_prompt_equals_input_ids_generation(tiny_engine):
    for text in PROMPTS:
        row = _row(tiny_engine, text, max_new_tokens=24)
        ours = generate_rows(tiny_engine.model, tiny_engine.tokenizer, [row], eos_ids=set())[0][0]
        assert ours.token_ids == _hf_greedy(tiny_engine, row.prompt_ids, 24)
        assert len(ours.token_ids) == 24 and ours.finish_reason == "length"


def test_greedy_with_soft_prompt_equals_inputs_embeds_generation(tiny_engine):
    soft = torch.randn(5, tiny_engine.hidden_size, generator=torch.Generator().manual_seed(1))
    row = _row(tiny_engine, PROMPTS[1], soft_prompt=soft, max_new_tokens=16)
    ours = generate_rows(tiny_engine.model, tiny_engine.tokenizer, [row], eos_ids=set())[0][0]
    assert ours.token_ids == _hf_greedy(tiny_engine, row.prompt_ids, 16, soft)
    plain = generate_rows(tiny_engine.model, tiny_engine.tokenizer, [_row(tiny_engine, PROMPTS[1], max_new_tokens=16)],
                          eos_ids=set())[0][0]
    assert plain.token_ids != ours.token_ids  # the soft prompt is really used


def test_row_output_does_not_depend_on_batch_mates_under_left_padding(tiny_engine):
    g = torch.Generator().manual_seed(2)
    softs = [torch.randn(3, tiny_engine.hidden_size, generator=g), None,
             torch.randn(7, tiny_engine.hidden_size, generator=g), None]
    rows = [_row(tiny_engine, t, soft_prompt=s, max_new_tokens=20) for t, s in zip(PROMPTS, softs, strict=True)]
    alone = [generate_rows(tiny_engine.model, tiny_engine.tokenizer, [r], eos_ids=set())[0][0].token_ids
             for r in rows]
    together = [o[0].token_ids for o in generate_rows(tiny_engine.model, tiny_engine.tokenizer, rows, eos_ids=set())]
    assert together == alone
    # rows of very different lengths force heavy padding on the short ones
    reversed_batch = generate_rows(tiny_engine.model, tiny_engine.tokenizer, rows[::-1], eos_ids=set())
    assert [o[0].token_ids for o in reversed_batch][::-1] == alone


def test_shared_prefill_samples_match_their_own_logprobs(tiny_engine):
    row = _row(tiny_engine, PROMPTS[3], n=4, temperature=1.0, max_new_tokens=12, seed=7)
    outs = generate_rows(tiny_engine.model, tiny_engine.tokenizer, [row], eos_ids=set())[0]
    assert len(outs) == 4
    assert len({tuple(o.token_ids) for o in outs}) > 1  # samples differ
    model = tiny_engine.model
    for o in outs:  # teacher-forced log-probability of each sample equals the one reported
        x = torch.tensor([row.prompt_ids + o.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0].float(), -1)
        start = len(row.prompt_ids) - 1
        expected = sum(float(logp[start + i, t]) for i, t in enumerate(o.token_ids))
        assert abs(expected - o.logprob) < 1e-3


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    row = _row(tiny_engine, PROMPTS[0], n=3, temperature=0.9, top_p=0.9, top_k=50, max_new_tokens=10, seed=11)
    first = generate_rows(tiny_engine.model, tiny_engine.tokenizer, [row], eos_ids=set())[0]
    mate = _row(tiny_engine, PROMPTS[1], n=2, temperature=0.9, max_new_tokens=10, seed=3)
    second = generate_rows(tiny_engine.model, tiny_engine.tokenizer, [mate, row], eos_ids=set())[1]
    assert [o.token_ids for o in first] == [o.token_ids for o in second]


def test_stop_strings_cut_text_and_end_sample(tiny_engine):
    row = _row(tiny_engine, PROMPTS[2], max_new_tokens=30)
    full = generate_rows(tiny_engine.model, tiny_engine.tokenizer, [row], eos_ids=set())[0][0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    row.stop = (stop,)
    cut = generate_rows(tiny_engine.model, tiny_engine.tokenizer, [row], eos_ids=set())[0][0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert len(cut.token_ids) < len(full.token_ids)


def test_end_token_finishes_a_sample(tiny_engine):
    row = _row(tiny_engine, PROMPTS[0], max_new_tokens=10)
    full = generate_rows(tiny_engine.model, tiny_engine.tokenizer, [row], eos_ids=set())[0][0]
    eos = {full.token_ids[2]}
    ended = generate_rows(tiny_engine.model, tiny_engine.tokenizer, [row], eos_ids=eos)[0][0]
    assert ended.finish_reason == "stop"
    assert ended.token_ids == full.token_ids[: full.token_ids.index(full.token_ids[2]) + 1]


def test_decoding_runs_in_inference_mode(tiny_engine):
    """No autograd bookkeeping on the hot path, even for a soft prompt that is a trainable parameter."""
    seen = []
    handle = tiny_engine.model.register_forward_pre_hook(
        lambda mod, args: seen.append(torch.is_inference_mode_enabled()))
    try:
        soft = torch.nn.Parameter(torch.randn(3, tiny_engine.hidden_size))
        generate_rows(tiny_engine.model, tiny_engine.tokenizer, [_row(tiny_engine, PROMPTS[0], soft_prompt=soft,
                                                                     max_new_tokens=4)], eos_ids=set())
    finally:
        handle.remove()
    assert seen and all(seen)
