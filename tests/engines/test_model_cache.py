"""The disk cache of torch models converted from GGUF files: the same weights back (the same logits, bit for bit),
rebuilt when the file changes or the entry is damaged, skipped when the folder cannot be written or caching is
off; the torch engine loads through it."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from detot_agent.engines.model_cache import cached_model, model_folder
from detot_agent.engines.models import release_models

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def _convert(path):
    return lambda: AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                        local_files_only=True)


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture
def gguf(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("DETOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DETOT_CACHE_MODELS", raising=False)
    copy = tmp_path / "model" / "tiny.gguf"
    copy.parent.mkdir()
    shutil.copy(tiny_gguf, copy)
    return copy


def test_the_second_load_comes_from_the_cache_with_the_same_weights(gguf):
    first, hit = cached_model(gguf, torch.float32, _convert(gguf), _load)
    folder = model_folder(gguf, torch.float32)
    assert not hit and (folder / "manifest.json").is_file() and folder.name.endswith("-float32")
    second, hit = cached_model(gguf, torch.float32, _convert(gguf), _load)
    assert hit and torch.equal(_logits(first), _logits(second))
    assert model_folder(gguf, torch.bfloat16) != folder  # another dtype is another entry


def test_a_changed_file_gets_a_new_entry(gguf):
    cached_model(gguf, torch.float32, _convert(gguf), _load)
    before = model_folder(gguf, torch.float32)
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    assert model_folder(gguf, torch.float32) != before
    assert not cached_model(gguf, torch.float32, _convert(gguf), _load)[1]


def test_a_damaged_entry_is_rebuilt(gguf):
    first, _ = cached_model(gguf, torch.float32, _convert(gguf), _load)
    weights = next(model_folder(gguf, torch.float32).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # a few weights zeroed: still a loadable file, caught by the checksum
    weights.write_bytes(bytes(data))
    again, hit = cached_model(gguf, torch.float32, _convert(gguf), _load)
    assert not hit and torch.equal(_logits(first), _logits(again))
    assert cached_model(gguf, torch.float32, _convert(gguf), _load)[1]


def test_a_cache_folder_that_cannot_be_written_is_skipped(gguf, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DETOT_CACHE", str(blocker))
    model, hit = cached_model(gguf, torch.float32, _convert(gguf), _load)
    assert not hit and _logits(model).shape[-1] > 0


def test_caching_off_writes_nothing(gguf, monkeypatch):
    monkeypatch.setenv("DETOT_CACHE_MODELS", "0")
    assert not cached_model(gguf, torch.float32, _convert(gguf), _load)[1]
    assert not model_folder(gguf, torch.float32).exists()
    assert not cached_model(gguf, torch.float32, _convert(gguf), _load)[1]


def test_the_torch_engine_loads_a_gguf_through_the_cache(gguf):
    from detot_agent import LocalEngine

    def logits() -> torch.Tensor:
        engine = LocalEngine(str(gguf), device="cpu", dtype="float32", dynamic_batching=False)
        try:
            return _logits(engine.model)
        finally:
            engine.close()
            release_models(str(gguf))  # the next engine loads again, from disk

    first = logits()
    assert (model_folder(gguf, torch.float32) / "manifest.json").is_file()
    assert torch.equal(first, logits())
