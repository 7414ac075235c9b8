"""A disk cache of the torch models converted from GGUF files.

Loading a GGUF into torch (`LocalEngine` on a `.gguf`, the torch engine that trains soft prompts for a llama.cpp
model) de-quantizes every tensor and builds the model through transformers' GGUF reader: about 20 s for the
0.5B bench model on this project's 2-core CPU, most of it CPU and memory traffic that competes with serving when
the loop's first re-optimization loads its trainer. The converted weights are saved once, as safetensors in the
dtype asked for, under `$DETOT_CACHE/models/<key>-<dtype>/` (default `~/.cache/detot`), written atomically with a
checksummed manifest (`io/persist.py`), and read back from there afterwards. The key is the tokenizer cache's
(`tokenizer_cache.gguf_key`: the file's name, size, modification time, first and last MiB, and the transformers
version), so a changed file or another converter gets a new entry; a damaged entry is rebuilt; a folder that
cannot be written is skipped. The cost is disk: a float32 copy is 4 bytes a parameter (2 GB for the bench
model). `DETOT_CACHE_MODELS=0` turns the cache off.

Example:
    >>> import os
    >>> os.environ["DETOT_CACHE_MODELS"] = "0"
    >>> caching_models()
    False
    >>> del os.environ["DETOT_CACHE_MODELS"]
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detot_agent.engines.tokenizer_cache import cache_root, converted_once, gguf_key

__all__ = ["KIND", "cached_model", "caching_models", "model_folder", "save_converted"]

KIND = "detot-model-cache"


def caching_models() -> bool:
    """Whether converted models are kept on disk (`DETOT_CACHE_MODELS`, default on; `0`, `off` or `false`: off)."""
    return os.environ.get("DETOT_CACHE_MODELS", "1").strip().lower() not in ("0", "off", "false", "no")


def model_folder(path: Path, dtype: Any) -> Path:
    """The cache entry of the GGUF at `path` converted to `dtype` (a `torch.dtype`)."""
    return cache_root().parent / "models" / f"{gguf_key(path)}-{str(dtype).removeprefix('torch.')}"


def cached_model(path: Path, dtype: Any, convert: Callable[[], Any], load: Callable[[str], Any]) -> tuple[Any, bool]:
    """`(model, from_cache)`: `load(folder)` of the cached conversion of the GGUF at `path` to `dtype`, else
    `convert()` (then saved by `save_converted`, unless caching is off or the folder cannot be written)."""
    if not caching_models():
        return convert(), False
    return converted_once(model_folder(path, dtype), kind=KIND, meta={"gguf": path.name, "dtype": str(dtype)},
                          convert=convert, load=lambda folder: load(str(folder)), save=save_converted)


def save_converted(model: Any, folder: Path) -> None:
    """Write a model loaded from a GGUF as a plain transformers folder (config + `model.safetensors`).

    transformers refuses `save_pretrained` on it (its GGUF "quantizer" is not serializable), although every
    weight is already de-quantized: the config is written without its `quantization_config`, and the weights
    with safetensors (tied weights once; `from_pretrained` ties them again)."""
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(folder))
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
