"""A disk cache of the Hugging Face tokenizers converted from GGUF files.

Reading a GGUF's tokenizer through transformers converts it (vocabulary, merges, chat template) every time:
about 13 s of a llama.cpp engine's 14 s start on the bench model, against 0.4 s for llama.cpp to load the
weights. The converted tokenizer is saved once under `$DETOT_CACHE/tokenizers/<key>/` (default
`~/.cache/detot`), written atomically with a checksummed manifest (`io/persist.py`), and read back from there
afterwards. The key hashes the file's name, size and modification time, its first and last MiB, and the
transformers version, so a changed or replaced file, or another converter, gets a new entry. A damaged entry
is rebuilt; a cache folder that cannot be written is skipped (the tokenizer is converted as before).

Example:
    >>> import pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "m.gguf"
    >>> _ = f.write_bytes(b"GGUF" + bytes(100))
    >>> len(gguf_key(f)), gguf_key(f) == gguf_key(f)
    (32, True)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detot_agent.errors import ArtefactError
from detot_agent.io.persist import MANIFEST, atomic_dir, read_manifest

__all__ = ["KIND", "cache_root", "cached_tokenizer", "converted_once", "gguf_key"]

KIND = "detot-tokenizer-cache"
_MIB = 1 << 20


def cache_root() -> Path:
    """Where converted tokenizers are kept: `$DETOT_CACHE/tokenizers` (default `~/.cache/detot/tokenizers`)."""
    return Path(os.environ.get("DETOT_CACHE") or Path.home() / ".cache" / "detot") / "tokenizers"


def gguf_key(path: Path) -> str:
    """A key that changes when the file (or the converter) does: name, size, mtime, first and last MiB."""
    import transformers

    st = path.stat()
    h = hashlib.sha256(f"{path.name}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if st.st_size > 2 * _MIB:
            f.seek(-_MIB, os.SEEK_END)
            h.update(f.read(_MIB))
    return h.hexdigest()[:32]


def cached_tokenizer(path: Path, convert: Callable[[], Any]) -> tuple[Any, bool]:
    """`(tokenizer, from_cache)`: the cached conversion of the GGUF at `path`, else `convert()` (then cached)."""
    from transformers import AutoTokenizer

    return converted_once(cache_root() / gguf_key(path), kind=KIND, meta={"gguf": path.name}, convert=convert,
                          load=lambda folder: AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
                          save=lambda tokenizer, folder: tokenizer.save_pretrained(str(folder)))


def converted_once(folder: Path, *, kind: str, meta: dict[str, Any], convert: Callable[[], Any],
                   load: Callable[[Path], Any], save: Callable[[Any, Path], None]) -> tuple[Any, bool]:
    """`(value, from_cache)`: `load(folder)` where a whole entry is there (its checksums hold; a damaged one is
    rebuilt), else `convert()`, then `save(value, tmp)` into the entry, written atomically; a cache folder that
    cannot be written (or a full disk) is skipped, and the value served anyway. The tokenizer and model caches'
    one rule."""
    if (folder / MANIFEST).is_file():
        try:
            read_manifest(folder, kind=kind, max_version=1)
            return load(folder), True
        except (ArtefactError, OSError, ValueError):
            pass
    value = convert()
    with contextlib.suppress(OSError), atomic_dir(folder, kind=kind, version=1, meta=meta) as tmp:
        save(value, tmp)
    return value, False
