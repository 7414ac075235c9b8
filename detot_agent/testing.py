"""A tiny randomly initialised model for tests and benchmarks of mechanics (seconds to build, no weights).

Nothing is downloaded: a byte-level BPE tokenizer is trained on a few sentences and a 2-layer Llama is
built from a config, then both are saved to a folder that the engine loads like any local Hugging
Face model. Its answers are noise; it exercises batching, soft prompts, voting and scale-out.

Example:
    >>> import tempfile, pathlib
    >>> from detot_agent.testing import build_tiny_model
    >>> folder = build_tiny_model(pathlib.Path(tempfile.mkdtemp()) / "tiny")
    >>> (folder / "config.json").is_file()
    True
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_tiny_model"]

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
