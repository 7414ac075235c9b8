"""A tiny randomly initialised model for tests and benchmarks of mechanics (seconds to build, no weights).

Nothing is downloaded: a byte-level BPE tokenizer is trained on a few sentences and a 2-layer Llama is
built from a config, then both are saved to a folder that the engine loads like any local Hugging
Face model. Its answers are noise; it exercises batching, soft prompts, voting and scale-out.
`build_tiny_gguf` writes the same kind of model as a float32 GGUF file (with the `gguf` package),
which both the torch engine (transformers' GGUF loader) and the llama.cpp engine load.

Example:
    >>> import tempfile, pathlib
    >>> from detot_agent.testing import build_tiny_model
    >>> folder = build_tiny_model(pathlib.Path(tempfile.mkdtemp()) / "tiny")
    >>> (folder / "config.json").is_file()
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["build_tiny_gguf", "build_tiny_model", "greedy_alone_and_batched"]

BATCH_PROMPTS = ("What is 2+3? Answer briefly.", "Name a prime number greater than 10 and explain why it is prime.",
                 "Tom has 3 apples and buys 4 more. How many apples? Let's think step by step.")


def greedy_alone_and_batched(engine: Any, prompts: tuple[str, ...] = BATCH_PROMPTS,
                             max_tokens: int = 40) -> tuple[list[str], list[str]]:
    """Greedy answers of `prompts` decoded alone, and decoded together beside a sampled row of four (rows of
    other lengths, so other padding): a batch-invariant engine returns the same two lists."""
    from dspy.lm15 import Config, Message, Request

    reqs = [Request(model="m", messages=(Message.user(p),), config=Config(max_tokens=max_tokens, temperature=0.0))
            for p in prompts]
    alone = [engine.generate_batch([engine.build_row(r)])[0][0].text for r in reqs]
    sampled = engine.build_row(Request(model="m", messages=(Message.user("Write a poem about the sea."),),
                                       config=Config(max_tokens=max_tokens, temperature=0.8, seed=3)), n=4)
    rows = [engine.build_row(r) for r in reqs]
    out = engine.generate_batch([rows[-1], sampled, *rows[:-1]])  # the last prompt first, the sampled row next
    batched = [o[0].text for o in out[2:]] + [out[0][0].text]
    return alone, batched

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


def _permute(w: Any, n_head: int) -> Any:
    """Reorder q/k rows as llama.cpp's converter does (its rotary layout); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_tiny_gguf(path: Path, *, seed: int = 0, context: int = 512, quantization: str = "f32") -> Path:
    """Write the tiny random Llama of `build_tiny_model` as a GGUF file at `path` (a `.gguf` file).

    `quantization` is `f32` (every tensor float32) or `q4_0` / `q8_0` (the layers' matrices quantised, as a
    released GGUF's are: what llama.cpp's extra buffer types repack).

    Example:
        >>> import tempfile, pathlib
        >>> build_tiny_gguf(pathlib.Path(tempfile.mkdtemp()) / "tiny.gguf").stat().st_size > 100_000
        True
    """
    import json
    import tempfile

    import gguf
    import gguf.quants
    import numpy as np
    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "hf", seed=seed, context=context)
        config = json.loads((folder / "config.json").read_text())
        weights = load_file(str(folder / "model.safetensors"))
        tok = json.loads((folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    tokens = [""] * (max([*vocab.values(), *added.values()]) + 1)
    for text, i in {**vocab, **added}.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("detot-tiny-llama")
    quant = {"f32": None, "q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}[quantization]
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantization])
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"].astype(np.float32))
    for i in range(config["num_hidden_layers"]):
        for hf, gg in names.items():
            w = weights[f"model.layers.{i}.{hf}.weight"].astype(np.float32)
            if gg == "attn_q":
                w = _permute(w, heads)
            elif gg == "attn_k":
                w = _permute(w, kv_heads)
            w = np.ascontiguousarray(w)
            if quant is not None and gg not in ("attn_norm", "ffn_norm"):
                writer.add_tensor(f"blk.{i}.{gg}.weight", gguf.quants.quantize(w, quant), raw_dtype=quant)
            else:
                writer.add_tensor(f"blk.{i}.{gg}.weight", w)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"].astype(np.float32))
    writer.add_tensor("output.weight", weights["lm_head.weight"].astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
