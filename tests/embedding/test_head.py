"""The task embedding's soft-prompt head: one object, per-input prompts, training both sides, artefacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dspy.lm15 import Config, Message, Request

from detot_agent.embedding.head import PromptHead
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.embedding.update import TrainingItem
from detot_agent.errors import ArtefactError, DetotError
from detot_agent.io.persist import save_tensors
from detot_agent.softprompt.loss import TuneExample, batch_loss, encode_example
from detot_agent.softprompt.prompt import SoftPrompt

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples?", "A train travels 60 miles in 2 hours. Speed?",
             "Sara reads 12 pages a day for 5 days. Pages?", "There are 9 birds and 4 fly away. How many left?",
             "A shop sells pens at $2 each. Cost of 7 pens?", "Jim had 20 marbles and lost 6. How many now?"]


def _te(encoder, engine, components=3, seed=0) -> TaskEmbedding:
    te = TaskEmbedding.from_description("arith", "math word problems", encoder=encoder)
    p0 = SoftPrompt.initialize(engine, "arith", k=4, init="vocab", seed=seed).vectors
    te.attach_head(p0, components=components, model_id=engine.source.spec, inputs=encoder.encode(QUESTIONS))
    return te


def _nonzero_bank(te: TaskEmbedding, scale: float = 0.5) -> None:
    head = te.head
    assert head is not None
    head.set(bank=torch.randn(head.bank.shape, generator=torch.Generator().manual_seed(1)) * scale)


def _feedback(encoder, targets: list[str]) -> list[TrainingItem]:
    e = encoder.encode(QUESTIONS)
    return [TrainingItem(query=e[i], example=TuneExample(prompt=q, target=t))
            for i, (q, t) in enumerate(zip(QUESTIONS, targets, strict=True))]


def test_zero_head_gives_every_input_p0_and_a_nonzero_head_differs_per_input(tiny_engine, encoder):
    te = _te(encoder, tiny_engine)
    e = encoder.encode(QUESTIONS[:2])
    p = te.soft_prompts(e)  # (2, k, H)
    assert p.shape == (2, 4, tiny_engine.hidden_size)
    assert torch.equal(p[0], p[1]) and torch.equal(p[0], te.head.p0)
    _nonzero_bank(te)
    p = te.soft_prompts(e)
    assert not torch.allclose(p[0], p[1])
    # M = 0 is the static case whatever the input
    static = _te(encoder, tiny_engine, components=0)
    assert torch.equal(static.soft_prompt(e[0]), static.soft_prompt(e[1]))


def test_gate_starts_at_centroids_of_the_task_inputs(tiny_engine, encoder):
    te = _te(encoder, tiny_engine, components=3)
    a = te.gate_weights(encoder.encode(QUESTIONS))  # (6, 3)
    assert a.shape == (6, 3) and torch.allclose(a.sum(-1), torch.ones(6))
    assert len(set(a.argmax(-1).tolist())) >= 2  # inputs lean on different components from the start


def test_zero_head_output_equals_the_static_soft_prompt_path_token_for_token(tiny_engine, encoder):
    te = _te(encoder, tiny_engine, components=4)
    p0 = te.head.p0.clone()
    reqs = [Request(model="tiny", messages=(Message.user(q),), config=Config(max_tokens=12)) for q in QUESTIONS[:3]]
    dynamic = tiny_engine.generate_batch([tiny_engine.build_row(r, soft_prompt=s) for r, s in
                                          zip(reqs, te.soft_prompts(encoder.encode(QUESTIONS[:3])), strict=True)])
    static = tiny_engine.generate_batch([tiny_engine.build_row(r, soft_prompt=p0) for r in reqs])
    assert [o[0].token_ids for o in dynamic] == [o[0].token_ids for o in static]


def test_rows_with_different_soft_prompts_in_one_batch_get_what_they_get_alone(tiny_engine, encoder):
    te = _te(encoder, tiny_engine)
    _nonzero_bank(te, 2.0)
    prompts = te.soft_prompts(encoder.encode(QUESTIONS[:3]))
    reqs = [Request(model="tiny", messages=(Message.user(q),), config=Config(max_tokens=10)) for q in QUESTIONS[:3]]
    together = tiny_engine.generate_batch([tiny_engine.build_row(r, soft_prompt=s)
                                           for r, s in zip(reqs, prompts, strict=True)])
    alone = [tiny_engine.generate_batch([tiny_engine.build_row(r, soft_prompt=s)])[0]
             for r, s in zip(reqs, prompts, strict=True)]
    assert [o[0].token_ids for o in together] == [o[0].token_ids for o in alone]
    assert len({tuple(o[0].token_ids) for o in alone}) > 1  # the prompts do differ in what they produce


def test_lm_loss_gradient_reaches_the_head_and_reaches_the_query_only_when_coupled(tiny_engine, encoder):
    te = _te(encoder, tiny_engine)
    _nonzero_bank(te)
    head = te.head
    ex = TuneExample(prompt=QUESTIONS[0], target="The answer is 7.")
    enc = [encode_example(tiny_engine, ex, 256)]
    e = torch.as_tensor(encoder.encode(QUESTIONS[:1]))
    for couple in (False, True):
        w = te.w.clone().requires_grad_(True)
        p0, bank, gate = (head.p0.clone().requires_grad_(True), head.bank.clone().requires_grad_(True),
                          head.gate.clone().requires_grad_(True))
        q = te._query(e, w, te.alpha)
        P, _ = PromptHead.mix(q if couple else q.detach(), p0, bank, gate, head.tau)
        batch_loss(tiny_engine.model, P, enc).backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (p0, bank, gate))
        assert (w.grad is not None and w.grad.abs().sum() > 0) == couple


def test_update_trains_the_head_and_leaves_retrieval_alone_unless_coupled(tiny_engine, encoder):
    fb = _feedback(encoder, ["The answer is 7."] * 6)
    for couple in (False, True):
        te = _te(encoder, tiny_engine)
        w0, p00 = te.w.clone(), te.head.p0.clone()
        report = te.update(fb[:4], val=fb[4:], engine=tiny_engine, steps=15, head_lr=0.05, dropout=0.0,
                           eval_every=5, lm_moves_retrieval=couple)
        assert report.accepted and report.head_accepted and report.lm_after < report.lm_before
        assert te.version == 1 and not torch.equal(te.head.p0, p00)
        assert te.head.bank.abs().sum() > 0 and report.gate_usage is not None and len(report.gate_usage) == 3
        assert torch.equal(te.w, w0) != couple


def test_a_harmful_head_update_is_rejected(tiny_engine, encoder):
    te = _te(encoder, tiny_engine)
    eights = _feedback(encoder, ["8 8 8 8 8 8 8 8"] * 6)
    first = te.update(eights[:4], val=eights[4:], engine=tiny_engine, steps=30, head_lr=0.2, dropout=0.0,
                      eval_every=5, patience=10)
    assert first.accepted and first.lm_after < first.lm_before and te.version == 1
    before = te.state_dict()
    # training towards another answer while the held-out items still want "8 ...": held-out NLL rises
    mixed = _feedback(encoder, ["7 7 7 7 7 7 7 7"] * 4 + ["8 8 8 8 8 8 8 8"] * 2)
    report = te.update(mixed[:4], val=mixed[4:], engine=tiny_engine, steps=10, head_lr=0.2, dropout=0.0,
                       eval_every=2)
    assert all(v > report.lm_before for _, v in report.val_loss)
    assert not report.accepted and report.head_accepted is False
    assert te.version == 1 and torch.equal(te.head.p0, before["head"]["p0"])
    assert torch.equal(te.head.bank, before["head"]["bank"]) and torch.equal(te.head.gate, before["head"]["gate"])


def test_balance_keeps_the_gate_from_collapsing(tiny_engine, encoder):
    usage = {}
    for balance in (0.0, 5.0):
        te = _te(encoder, tiny_engine, components=3)
        te.head.tau = 0.02  # a sharp gate, quick to collapse
        report = te.update(_feedback(encoder, ["The answer is 7."] * 6), engine=tiny_engine, steps=20,
                           head_lr=0.05, dropout=0.0, balance=balance)
        usage[balance] = max(report.gate_usage)
    assert usage[5.0] <= usage[0.0]
    assert usage[5.0] < 0.9


def test_update_budget_and_refusals(tiny_engine, encoder):
    te = _te(encoder, tiny_engine)
    fb = _feedback(encoder, ["The answer is 7."] * 6)
    report = te.update(fb, engine=tiny_engine, steps=10_000, max_seconds=1.0)
    assert report.budget_hit and report.steps < 10_000 and report.seconds < 30
    with pytest.raises(DetotError, match="pass engine="):
        te.update(fb)
    bare = TaskEmbedding.from_description("arith", "math", encoder=encoder)
    with pytest.raises(DetotError, match="has none: call attach_head"):
        bare.update(fb, engine=tiny_engine)
    with pytest.raises(DetotError, match="no soft-prompt head"):
        bare.soft_prompts(encoder.encode(["x"]))


def test_save_load_round_trip_reproduces_prompts_and_predictions(tmp_path, tiny_engine, encoder):
    te = _te(encoder, tiny_engine)
    _nonzero_bank(te)
    te.save(tmp_path / "te")
    back = TaskEmbedding.load(tmp_path / "te", encoder_name=encoder.name, hidden_size=tiny_engine.hidden_size,
                              model_id=tiny_engine.source.spec)
    e = encoder.encode(QUESTIONS[:2])
    assert torch.equal(back.soft_prompts(e), te.soft_prompts(e)) and back.version == te.version
    req = Request(model="tiny", messages=(Message.user(QUESTIONS[0]),), config=Config(max_tokens=8))
    outs = [tiny_engine.generate_batch([tiny_engine.build_row(req, soft_prompt=x.soft_prompt(e[0]))])[0][0].token_ids
            for x in (te, back)]
    assert outs[0] == outs[1]
    # DSPy's JSON state carries the whole object too
    again = TaskEmbedding.from_json(json.loads(json.dumps(te.to_json())))
    assert torch.equal(again.soft_prompts(e), te.soft_prompts(e))


def test_mismatched_or_corrupted_artefacts_are_refused_naming_file_and_field(tmp_path, tiny_engine, encoder):
    te = _te(encoder, tiny_engine)
    te.save(tmp_path / "te")
    with pytest.raises(ArtefactError, match=r"tensors\.safetensors: field 'head\.hidden_size' is 64"):
        TaskEmbedding.load(tmp_path / "te", hidden_size=896)
    with pytest.raises(ArtefactError, match=r"field 'head\.model_id' names model"):
        TaskEmbedding.load(tmp_path / "te", model_id="/models/other.gguf")
    meta, tensors = te.to_tensors()
    meta["head"]["k"] = 5  # the manifest disagrees with the tensors
    save_tensors(tmp_path / "bad", kind=TaskEmbedding.FORMAT, version=2, meta=meta, tensors=tensors)
    with pytest.raises(ArtefactError, match=r"bad/tensors\.safetensors: tensor 'head\.p0' has shape \(4, 64\), "
                                            r"fields 'head\.k'"):
        TaskEmbedding.load(tmp_path / "bad")
    tensors["head.bank"] = torch.full_like(tensors["head.bank"], float("nan"))
    meta["head"]["k"] = 4
    save_tensors(tmp_path / "nan", kind=TaskEmbedding.FORMAT, version=2, meta=meta, tensors=tensors)
    with pytest.raises(ArtefactError, match=r"nan: head\.bank holds NaN or inf .* in tensors\.safetensors"):
        TaskEmbedding.load(tmp_path / "nan")
    f = tmp_path / "te" / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-9])
    with pytest.raises(ArtefactError, match="checksum"):
        TaskEmbedding.load(tmp_path / "te")


def test_first_release_artefacts_load_or_say_how_to_convert(tmp_path, tiny_engine, encoder):
    # a retrieval-only task embedding in the first release's format (version 1, no head) loads as it was
    te = TaskEmbedding.from_description("arith", "math", encoder=encoder)
    meta, tensors = te.to_tensors()
    save_tensors(tmp_path / "v1", kind=TaskEmbedding.FORMAT, version=1, meta=meta, tensors=tensors)
    back = TaskEmbedding.load(tmp_path / "v1")
    v = encoder.encode(["one"])
    assert np.array_equal(back.query(v), te.query(v)) and not back.has_head
    old_json = {**meta, **{k: t.tolist() for k, t in tensors.items()}}  # the first release's DSPy JSON
    assert np.array_equal(TaskEmbedding.from_json(old_json).query(v), te.query(v))
    # a static soft prompt is refused with the command that converts it
    SoftPrompt.initialize(tiny_engine, "arith", k=4, init="vocab").save(tmp_path / "sp")
    with pytest.raises(ArtefactError, match=r"is a static soft prompt, not a task embedding; convert it .*"
                                            r"`detot convert --soft-prompt"):
        TaskEmbedding.load(tmp_path / "sp")


def test_head_refuses_bad_shapes():
    with pytest.raises(Exception, match="P0 must be a floating"):
        PromptHead(torch.zeros(4), components=1, dim=3)
    head = PromptHead(torch.zeros(2, 3), components=2, dim=4)
    with pytest.raises(Exception, match="bank has shape"):
        head.set(bank=torch.zeros(3, 2, 3))
    assert head.bank.shape == (2, 2, 3)  # a refused set leaves the head as it was


def test_registered_task_embedding_serves_each_request_its_own_prompt(tiny_model_dir, encoder):
    from detot_agent import LocalEngine
    from detot_agent.errors import SoftPromptError
    from detot_agent.softprompt.registry import SoftPromptRegistry

    registry = SoftPromptRegistry()
    engine = LocalEngine(str(tiny_model_dir), device="cpu", dtype="float32", registry=registry,
                         dynamic_batching=False)
    te = _te(encoder, engine)
    _nonzero_bank(te)
    version = te.register(registry, encoder)
    meta = registry.metadata("arith")
    assert meta == {"detot_task": "arith", "detot_version": version}  # what DSPy's cache key carries
    rows = [engine.build_row(Request(model="tiny", messages=(Message.user(q),),
                                     config=Config(max_tokens=4, extensions={"metadata": meta})))
            for q in QUESTIONS[:2]]
    for q, row in zip(QUESTIONS[:2], rows, strict=True):
        assert torch.allclose(row.soft_prompt, te.soft_prompt(encoder.encode([q])[0]))
    assert not torch.equal(rows[0].soft_prompt, rows[1].soft_prompt)
    # the registered version is frozen: a later update of the object needs a new registration
    te.head.set(bank=torch.zeros_like(te.head.bank))
    again = engine.build_row(Request(model="tiny", messages=(Message.user(QUESTIONS[0]),),
                                     config=Config(max_tokens=4, extensions={"metadata": meta})))
    assert torch.equal(again.soft_prompt, rows[0].soft_prompt)
    assert te.register(registry, encoder) == version + 1  # now static: P0 itself
    with pytest.raises(SoftPromptError, match="is per input: pass the input text"):
        registry.resolve("arith", version)
    engine.close()
