"""SoftPrompt initialisation, training with regularisation, persistence, PEFT round trip, serving."""

from __future__ import annotations

import hashlib

import pytest
import torch
from dspy.lm15 import Config, Message, Request

from detot_agent import LocalEngine, SoftPromptRegistry, TuneExample, local_lm, tune
from detot_agent.errors import ArtefactError, DetotError
from detot_agent.softprompt.prompt import SoftPrompt, SoftPromptInit

TRAIN = [TuneExample(prompt=f"Tom has {i} apples and buys 2 more. How many?", target=f"The answer is {i + 2}.")
         for i in range(12)]
VAL = [TuneExample(prompt=f"Sam has {i} pens and finds 2 more. How many?", target=f"The answer is {i + 2}.")
       for i in range(20, 24)]


def _checksum(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", list(SoftPromptInit))
def test_initialisations(tiny_engine, kind):
    ids = tiny_engine.tokenizer("solve it", add_special_tokens=False)["input_ids"]
    k = 2 * len(ids) + 1  # the text repeats to fill k
    sp = SoftPrompt.initialize(tiny_engine, "t", k=k, init=kind, text="solve it")
    assert sp.vectors.shape == (k, tiny_engine.hidden_size) and torch.isfinite(sp.vectors).all()
    table = tiny_engine.model.get_input_embeddings().weight
    if kind is SoftPromptInit.TEXT:
        assert torch.equal(sp.vectors[0], table[ids[0]]) and torch.equal(sp.vectors[len(ids)], table[ids[0]])
        assert torch.equal(sp.vectors[-1], table[ids[0]])
    if kind is SoftPromptInit.RANDOM:
        assert sp.vectors.norm(dim=1).mean() == pytest.approx(float(table.norm(dim=1).mean()), rel=1e-4)


def test_training_lowers_loss_and_leaves_the_model_untouched(tiny_engine):
    before = _checksum(tiny_engine.model)
    sp = SoftPrompt.initialize(tiny_engine, "arith", k=4, init="vocab")
    start = sp.vectors.clone()
    report = tune(sp, tiny_engine, TRAIN, val_examples=VAL, steps=30, head_lr=0.05, eval_every=5, patience=10,
                  progress=False)
    assert report.accepted and report.best_val_loss < report.initial_val_loss
    assert sum(report.train_loss[-5:]) / 5 < sum(report.train_loss[:5]) / 5
    assert not torch.equal(sp.vectors, start) and sp.version == 1
    assert _checksum(tiny_engine.model) == before
    assert all(not p.requires_grad and p.grad is None for p in tiny_engine.model.parameters())


def test_l2_pull_is_active(tiny_engine):
    drift = {}
    for l2 in (0.0, 50.0):
        sp = SoftPrompt.initialize(tiny_engine, "t", k=4, init="vocab")
        tune(sp, tiny_engine, TRAIN, steps=15, head_lr=0.05, l2_to_init=l2, dropout=0.0, progress=False)
        drift[l2] = float((sp.vectors - sp.init_vectors).norm())
    assert drift[50.0] < 0.5 * drift[0.0]


def test_dropout_is_active(tiny_engine):
    results = []
    for dropout in (0.0, 0.5):
        sp = SoftPrompt.initialize(tiny_engine, "t", k=4, init="vocab")
        report = tune(sp, tiny_engine, TRAIN, steps=6, head_lr=0.05, dropout=dropout, seed=3, progress=False)
        results.append((sp.vectors.clone(), report.train_loss[0]))
    # same data order and init: only dropout differs, and it changes both the first loss and the result
    assert results[0][1] != results[1][1]
    assert not torch.allclose(results[0][0], results[1][0])


def test_early_stopping_keeps_the_best_vectors(tiny_engine):
    sp = SoftPrompt.initialize(tiny_engine, "t", k=4, init="vocab")
    report = tune(sp, tiny_engine, TRAIN, val_examples=TRAIN[:2], steps=200, head_lr=1.0, max_grad_norm=100.0,
                  eval_every=2, patience=2, dropout=0.0, progress=False)
    assert report.stopped_early and report.steps_run < 200
    best = min(v for _, v in report.val_loss)
    assert report.best_val_loss == pytest.approx(min(best, report.initial_val_loss))


def test_save_load_round_trip_is_exact_and_bad_files_are_refused(tiny_engine, tmp_path):
    sp = SoftPrompt.initialize(tiny_engine, "arith", k=3, init="text")
    tune(sp, tiny_engine, TRAIN[:4], steps=2, progress=False)
    sp.save(tmp_path / "sp")
    back = SoftPrompt.load(tmp_path / "sp", hidden_size=tiny_engine.hidden_size)
    assert torch.equal(back.vectors, sp.vectors) and torch.equal(back.init_vectors, sp.init_vectors)
    assert (back.version, back.init_kind, back.model_id, back.report) == (sp.version, sp.init_kind, sp.model_id,
                                                                          sp.report)
    with pytest.raises(ArtefactError, match=r"width 64 .* this model's hidden size is 576"):
        SoftPrompt.load(tmp_path / "sp", hidden_size=576)
    from safetensors.torch import save_file

    from detot_agent.io.persist import atomic_dir

    nan = sp.vectors.clone()
    nan[0, 0] = float("nan")
    meta = {"task": "t", "model_id": "m", "hidden_size": 64, "k": 3, "init_kind": "text", "version": 1}
    with atomic_dir(tmp_path / "nan", kind=SoftPrompt.FORMAT, version=1, meta=meta) as d:
        save_file({"vectors": nan, "init_vectors": sp.vectors}, str(d / "soft_prompt.safetensors"))
    with pytest.raises(ArtefactError, match="non-finite"):
        SoftPrompt.load(tmp_path / "nan")
    with atomic_dir(tmp_path / "shape", kind=SoftPrompt.FORMAT, version=1, meta=meta) as d:
        save_file({"vectors": torch.zeros(5, 64), "init_vectors": torch.zeros(5, 64)},
                  str(d / "soft_prompt.safetensors"))
    with pytest.raises(ArtefactError, match=r"shape \(5, 64\), manifest says \(3, 64\)"):
        SoftPrompt.load(tmp_path / "shape")


def test_bad_training_input(tiny_engine):
    sp = SoftPrompt.initialize(tiny_engine, "t", k=2)
    with pytest.raises(DetotError, match="at least one training example"):
        tune(sp, tiny_engine, [], progress=False)
    with pytest.raises(DetotError, match="batch_size"):
        tune(sp, tiny_engine, TRAIN, batch_size=0, progress=False)
    with pytest.raises(DetotError, match="differs from the model's hidden size"):
        tune(SoftPrompt("t", torch.zeros(2, 8), model_id="x"), tiny_engine, TRAIN, progress=False)


def test_engine_serves_the_registry_current_version(tiny_model_dir):
    registry = SoftPromptRegistry()
    engine = LocalEngine(str(tiny_model_dir), device="cpu", dtype="float32", registry=registry)
    lm = local_lm(engine=engine, cache=True, max_tokens=10)
    sp = SoftPrompt.initialize(engine, "arith", k=4, init="vocab")
    sp.register(registry)
    first = lm("Tom has 3 apples", metadata=registry.metadata("arith"))[0]
    tune(sp, engine, TRAIN, steps=10, head_lr=0.2, dropout=0.0, progress=False)
    assert sp.register(registry) == 2
    second = lm("Tom has 3 apples", metadata=registry.metadata("arith"))[0]
    direct = engine.sample(Request(model="t", messages=(Message.user("Tom has 3 apples"),),
                                   config=Config(max_tokens=10)), 1, soft_prompt=sp.vectors)[0].text
    assert second == direct and second != first


def test_peft_adapter_round_trip_gives_the_engine_logits(tiny_engine, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    sp = SoftPrompt.initialize(tiny_engine, "arith", k=5, init="random", seed=4)
    sp.export_peft(tmp_path / "adapter", base_model_name_or_path=str(tiny_engine.source.location))
    base = AutoModelForCausalLM.from_pretrained(tiny_engine.source.location, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    ids = torch.tensor([tiny_engine.render(Request(model="t", messages=(Message.user("2 plus 2?"),)))])
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1]:]
        emb = tiny_engine.model.get_input_embeddings()(ids[0])
        ours = tiny_engine.model(inputs_embeds=torch.cat([sp.vectors, emb]).unsqueeze(0)).logits[0, sp.k:]
    assert torch.allclose(peft_logits, ours, atol=1e-5)
    back = SoftPrompt.from_peft(tmp_path / "adapter", task="arith", hidden_size=tiny_engine.hidden_size)
    assert torch.equal(back.vectors, sp.vectors)
    with pytest.raises(ArtefactError, match="hidden size is 32"):
        SoftPrompt.from_peft(tmp_path / "adapter", task="arith", hidden_size=32)


def test_a_peft_export_is_swapped_in_whole_and_checked_on_read(tmp_path):
    folder = SoftPrompt("arith", torch.ones(3, 8), model_id="tiny").export_peft(tmp_path / "adapter")
    SoftPrompt("arith", torch.zeros(3, 8), model_id="tiny").export_peft(folder)  # replaces it whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert float(SoftPrompt.from_peft(folder, task="arith").vectors.sum()) == 0.0
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped byte
    (folder / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match="does not match its checksum"):
        SoftPrompt.from_peft(folder, task="arith")


def test_the_old_peft_functions_still_work_with_a_deprecation_warning(tmp_path):
    import detot_agent.softprompt.peft as peft

    with pytest.warns(DeprecationWarning, match="use SoftPrompt.export_peft"):
        export_peft = peft.export_peft
    with pytest.warns(DeprecationWarning, match="use SoftPrompt.from_peft"):
        from_peft = peft.from_peft
    folder = export_peft(SoftPrompt("arith", torch.ones(3, 8), model_id="tiny"), tmp_path / "adapter")
    assert float(from_peft(folder, task="arith").vectors.sum()) == 24.0
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = peft.nope


def test_tune_is_a_wrapper_over_update_and_the_old_names_still_work(tiny_engine):
    """One training loop: `tune` runs `update`; the moved names and `lr` still work, with a warning."""
    import detot_agent.softprompt.training as old

    with pytest.warns(DeprecationWarning, match="moved to detot_agent.embedding.tune"):
        old_tune = old.tune
    assert old_tune is tune
    from detot_agent.embedding.tune import TuneConfig

    with pytest.warns(DeprecationWarning, match="TuneConfig is deprecated"):
        cfg = TuneConfig(lr=0.05, steps=4, dropout=0.0)
    assert (cfg.head_lr, cfg.steps) == (0.05, 4)
    sp = SoftPrompt.initialize(tiny_engine, "t", k=4, init="vocab")
    with pytest.warns(DeprecationWarning, match="tune\\(lr=...\\) is deprecated"):
        report = tune(sp, tiny_engine, TRAIN, steps=4, lr=0.05, dropout=0.0, progress=False)
    assert report.steps_run == 4 and report.examples == len(TRAIN)
    assert report.accepted == (sp.version == 1)


def test_the_package_has_one_soft_prompt_training_loop():
    import ast
    from pathlib import Path

    import detot_agent

    loops = []
    for path in Path(detot_agent.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("Adam", "AdamW", "SGD")
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "optim"):
                loops.append(path.name)
    assert loops == ["update.py"]
