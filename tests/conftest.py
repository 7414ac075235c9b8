"""Shared fixtures: a tiny randomly initialised Llama (`detot_agent.testing.build_tiny_model`), the embedded
encoder, and paths of the shared data."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from detot_agent.testing import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tests' own cache folder (converted tokenizers, demo indexes): nothing is written to the user's
os.environ["DETOT_CACHE"] = tempfile.mkdtemp(prefix="detot-test-cache-")
os.environ["DSPY_CACHEDIR"] = tempfile.mkdtemp(prefix="detot-test-dspy-cache-")  # DSPy's disk cache, likewise


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding the tiny model and tokenizer (built once per test session)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def long_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 2048-token context: room for few-shot prompts (its BPE spends many tokens a word)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-long"), context=2048)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama written as a float32 GGUF file (both engines load it)."""
    from detot_agent.testing import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf", context=2048)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    """A float32 CPU engine on the tiny model, shared by tests that only read from it."""
    from detot_agent import LocalEngine

    engine = LocalEngine(str(tiny_model_dir), device="cpu", dtype="float32", max_wait_ms=20)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def encoder():
    """The embedded all-MiniLM-L6-v2 encoder (loaded once)."""
    from detot_agent.retrieval.encoder import Encoder

    return Encoder()


def _shared_data(*parts: str) -> Path:
    """A file under ../shared/data; skips the test when the shared data is not beside the checkout."""
    path = Path(__file__).resolve().parents[2].joinpath("shared", "data", *parts)
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def shared_data():
    """`shared_data("gsm8k/test.jsonl")`: a file under ../shared/data, or skip the test."""
    return lambda rel: _shared_data(*rel.split("/"))


@pytest.fixture(scope="session")
def multiarith_file() -> Path:
    """Path of the shared MultiArith file (read by path, never copied into the repository)."""
    return _shared_data("multiarith", "MultiArith.json")


@pytest.fixture(scope="session")
def multiarith_head(multiarith_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """`multiarith_head(n)`: a fresh MultiArith.json holding the first n shared problems (a small suite)."""

    def write(n: int) -> Path:
        path = tmp_path_factory.mktemp("multiarith") / "MultiArith.json"
        path.write_text(json.dumps(json.loads(multiarith_file.read_text())[:n]))
        return path

    return write


@pytest.fixture(scope="session")
def gsm8k_train() -> Path:
    """Path of the shared GSM8K train file (read by path, never copied)."""
    return _shared_data("gsm8k", "train.jsonl")


@pytest.fixture(scope="session")
def gsm8k_index(encoder, gsm8k_train):
    """An exact index over the first 400 GSM8K train problems."""
    from detot_agent.io.datafiles import read_exemplars
    from detot_agent.retrieval.index import ExemplarIndex

    index = ExemplarIndex(encoder)
    index.add(read_exemplars(gsm8k_train, fmt="gsm8k")[:400])
    return index
