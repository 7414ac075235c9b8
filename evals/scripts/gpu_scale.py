"""The torch engine on a GPU at a released model's size (random weights): invariance, throughput, tuning.

A lent GPU machine cannot fetch a model and a call carries at most 64 MiB, so a 1.5B model's weights
cannot travel. Its *shape* can: this script builds a Qwen2.5 model of a released size (the published
config: layers, widths, heads, vocabulary) with random weights and the real Qwen2.5 tokenizer (saved from
the bench model's GGUF), saves it as a Hugging Face folder, and loads it through `LocalEngine` as a user's
model would be. Speed, memory and batch invariance depend on the shape, not on the weights, so they carry
over; accuracy does not, and nothing here measures it.

For each shape and dtype asked for:

- invariance: `gpu_check.invariance` (8 prompts, half with a random soft prompt, greedy, decoded alone,
  together and reversed). Random weights give nearly tied logits, so this is a harsher test of batch
  invariance than a trained model is;
- throughput: `gpu_check.throughput` (one prompt, B rows x n samples, no stop), tokens/s and peak memory;
- soft-prompt training: `softprompt.training.tune` on GSM8K train pairs (k = 8 vectors), seconds per step
  and peak memory (training steps only: no validation set).

Writes `gpu_scale.json` into `--out` after every part, so a run cut short keeps what it measured:

    python evals/scripts/gpu_scale.py --tokenizer .gpu/qwen-tok --train .gpu/train.jsonl \\
        --shapes qwen2.5-1.5b --dtypes float32,bfloat16 --out /tmp/out
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from gpu_check import _peak_gib, _sync, invariance, throughput  # same folder

from detot_agent import TuneExample, tune
from detot_agent.detot.adapters import COT_CUE
from detot_agent.engines.models import release_models
from detot_agent.engines.torch_engine import LocalEngine
from detot_agent.io.datafiles import read_exemplars
from detot_agent.softprompt.prompt import SoftPrompt

# The published Qwen2.5 configs (config.json of each release); `tiny` is for trying the script on a CPU.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
}


def build(shape: str, tokenizer_dir: Path, folder: Path, device: str) -> dict[str, Any]:
    """Save a random-weight model of `shape` (bfloat16 safetensors) and the tokenizer into `folder`."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"parameters": params, "build_and_save_s": round(time.perf_counter() - t0, 1)}


def gsm8k_pairs(path: Path) -> list[TuneExample]:
    """GSM8K train lines as (question + CoT cue, rationale + answer statement) pairs, as `detot tune` makes them."""
    return [TuneExample(prompt=f"{e.text}\n{COT_CUE}", target=e.fields["rationale"]) for e in read_exemplars(path)]


def tuning(engine: LocalEngine, pairs: list[TuneExample], steps: int) -> dict[str, Any]:
    sp = SoftPrompt.initialize(engine, "gsm8k", k=8)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    report = tune(sp, engine, pairs[:48], steps=steps, batch_size=4, progress=False)  # no validation passes
    _sync()
    return {"steps": report.steps_run, "batch_size": 4, "k": 8, "seconds": round(report.seconds, 2),
            "seconds_per_step": round(report.seconds_per_step, 3), "peak_gib": _peak_gib(),
            "train_loss_first_last": [round(report.train_loss[0], 3), round(report.train_loss[-1], 3)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="a folder holding the Qwen2.5 tokenizer")
    p.add_argument("--train", type=Path, required=True, help="GSM8K train JSONL (its first 48 lines are used)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shapes", default="qwen2.5-1.5b")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--invariance-tokens", type=int, default=96)
    p.add_argument("--tune-steps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_scale_models"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "torch": torch.__version__, "weights": "random (speed, memory and invariance only; no accuracy)",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device, "shapes": {}}

    def save() -> None:
        (args.out / "gpu_scale.json").write_text(json.dumps(result, indent=1))

    pairs = gsm8k_pairs(args.train)
    for shape in args.shapes.split(","):
        folder = args.work / shape
        entry: dict[str, Any] = {"config": SHAPES[shape], "dtypes": {}}
        result["shapes"][shape] = entry
        entry.update(build(shape, args.tokenizer, folder, args.device))
        print(f"{shape}: {entry['parameters'] / 1e9:.2f}B parameters, built and saved in "
              f"{entry['build_and_save_s']} s", flush=True)
        save()
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            engine = LocalEngine(str(folder), device=args.device, dtype=dtype, dynamic_batching=False)
            d: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 1)}
            entry["dtypes"][dtype] = d
            print(f" {dtype}: loaded in {d['load_s']} s", flush=True)
            d["invariance"] = invariance(engine, args.invariance_tokens)
            print(f"  invariance: {d['invariance']['rows_differing_together']}/{d['invariance']['rows']} rows "
                  f"differ together, {d['invariance']['rows_differing_reversed']} reversed", flush=True)
            save()
            d["tuning"] = tuning(engine, pairs, args.tune_steps)
            print(f"  tuning: {d['tuning']['seconds_per_step']} s/step, peak {d['tuning']['peak_gib']} GiB",
                  flush=True)
            save()
            d["throughput"] = throughput(engine, [int(b) for b in args.batches.split(",")], args.n,
                                         args.new_tokens)
            save()
            engine.close()
            del engine
            release_models()  # the process's model cache holds the weights until released


if __name__ == "__main__":
    main()
