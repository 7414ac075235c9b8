"""Shared fixtures: a tiny randomly initialised Llama with a freshly trained BPE tokenizer.

Nothing is downloaded: the tokenizer is trained here on a few sentences and the
model is built from a config, then both are saved to a folder that the engine
loads like any local Hugging Face model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "Question: what is two plus three? Answer: five.",
    "The answer is 42. Reasoning: add the numbers, then divide.",
    "[[ ## answer ## ]] [[ ## reasoning ## ]] [[ ## completed ## ]] {\"answer\": \"4\"}",
    "Tom has 3 apples and buys 4 more; he has 7 apples. 0 1 2 3 4 5 6 7 8 9",
    "You are a helpful assistant. Respond with the corresponding output fields.",
] * 20


def build_tiny_model(folder: Path, *, seed: int = 0, context: int = 512) -> Path:
    """Train a byte-level BPE tokenizer and save a 2-layer random Llama next to it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding the tiny model and tokenizer (built once per test session)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def long_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 2048-token context: room for few-shot prompts (its BPE spends many tokens a word)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-long"), context=2048)


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
    from detot_agent.embeddings import Encoder

    return Encoder()


@pytest.fixture(scope="session")
def gsm8k_train() -> Path:
    """Path of the shared GSM8K train file (read by path, never copied)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def gsm8k_index(encoder, gsm8k_train):
    """An exact index over the first 400 GSM8K train problems."""
    from detot_agent.datasets import read_exemplars
    from detot_agent.index import ExemplarIndex

    index = ExemplarIndex(encoder)
    index.add(read_exemplars(gsm8k_train, fmt="gsm8k")[:400])
    return index
