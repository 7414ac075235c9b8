"""Atomic saves and validated loads: the one persistence path of every artefact.

Index, task embedding, soft prompt, PEFT export, the DETOT program's tensors and eval
reports all save through here. A saved artefact is a directory holding data files and a
`manifest.json` that records the artefact kind, a format version, and the SHA-256 of every
data file; tensors go in one safetensors file (`save_tensors` / `load_tensors`).

Saving writes the new directory beside the old one and swaps them with two
renames; a crash at any point leaves either the old or the new directory
loadable (if it strikes between the two renames, `resolve_for_load` finds the
old one under its backup name). Loading checks the manifest's kind and version
and every checksum before any data file is parsed. Nothing is pickled.

Example:
    >>> import tempfile, pathlib
    >>> from detot_agent.io.persist import atomic_dir, read_manifest
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_dir(root / "thing", kind="demo", version=1, meta={"n": 1}) as tmp:
    ...     _ = (tmp / "data.txt").write_text("hello")
    >>> read_manifest(root / "thing", kind="demo", max_version=1)["n"]
    1
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from detot_agent.errors import ArtefactError

__all__ = [
    "MANIFEST",
    "TENSORS",
    "ArtefactError",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_tensors",
    "read_manifest",
    "resolve_for_load",
    "save_tensors",
    "sha256_file",
]

MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# tempfile makes files 0600 and folders 0700; artefacts get the modes a plain open()/mkdir() would give
_UMASK = _umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomic UTF-8 text write."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)


@contextlib.contextmanager
def atomic_dir(path: Path, *, kind: str, version: int, meta: dict[str, Any]) -> Iterator[Path]:
    """Yield an empty temp directory to fill; on success, write its manifest and swap it into `path`.

    The manifest gets `kind`, `format_version`, `meta` and the checksum of every file written.
    If the block raises, the temp directory is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new-"))
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
        for p in tmp.iterdir():
            os.chmod(p, FILE_MODE)  # some writers (safetensors) make their files 0600
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        manifest = {"kind": kind, "format_version": version, **meta, "files": files}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _fsync_dir(tmp)
        backup = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        had_old = path.exists()
        if had_old:
            os.rename(path, backup)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        if had_old:
            shutil.rmtree(backup, ignore_errors=True)
        for stale in _backups(path):
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_for_load(path: Path) -> Path:
    """The directory to load: `path`, or its backup when a save was cut between its two renames."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if not path.exists():
        for backup in _backups(path):
            if (backup / MANIFEST).is_file():
                return backup
        raise ArtefactError(f"{path} does not exist; pass the directory written by save()")
    raise ArtefactError(f"{path} has no {MANIFEST}: it is not a saved artefact, or its save did not finish")


def read_manifest(path: Path, *, kind: str, max_version: int, verify: bool = True) -> dict[str, Any]:
    """Read and check a manifest: kind, format version, and (by default) every file's checksum.

    Raises:
        ArtefactError: naming the file and what is wrong with it.
    """
    folder = resolve_for_load(Path(path))
    mpath = folder / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtefactError(f"{mpath} is not valid JSON ({exc}); the artefact is corrupted") from None
    if not isinstance(manifest, dict):
        raise ArtefactError(f"{mpath} must hold a JSON object, got {type(manifest).__name__}")
    if manifest.get("kind") != kind:
        raise ArtefactError(f"{mpath} is a {manifest.get('kind')!r} artefact, not a {kind!r}")
    got = manifest.get("format_version")
    if not isinstance(got, int) or got < 1:
        raise ArtefactError(f"{mpath} has no valid format_version (got {got!r})")
    if got > max_version:
        raise ArtefactError(
            f"{mpath} has format_version {got}, newer than this detot-agent reads ({max_version}); upgrade detot-agent"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtefactError(f"{mpath} lists no files")
    if verify:
        for name, digest in files.items():
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                raise ArtefactError(f"{mpath} lists an invalid file name {name!r}")
            fpath = folder / name
            if not fpath.is_file():
                raise ArtefactError(f"{fpath} is missing (listed in {mpath})")
            if sha256_file(fpath) != digest:
                raise ArtefactError(
                    f"{fpath} does not match its checksum in {mpath}: the file is corrupted or was swapped"
                )
    manifest["_dir"] = str(folder)
    return manifest


def save_tensors(
    path: str | Path,
    *,
    kind: str,
    version: int,
    meta: dict[str, Any],
    tensors: Mapping[str, Any],
    files: Mapping[str, bytes] | None = None,
    filename: str = TENSORS,
) -> Path:
    """Atomically save `tensors` (torch tensors or numpy arrays, one safetensors file) plus `files`.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = save_tensors(pathlib.Path(tempfile.mkdtemp()) / "a", kind="demo", version=1, meta={},
        ...                  tensors={"x": torch.ones(2)})
        >>> load_tensors(p, kind="demo", max_version=1, names=["x"])[1]["x"].tolist()
        [1.0, 1.0]
    """
    import numpy as np

    arrays = {}
    for name, value in tensors.items():
        arr = value.detach().cpu().float().contiguous().numpy() if hasattr(value, "detach") else value
        arrays[name] = np.ascontiguousarray(arr)
    with atomic_dir(Path(path), kind=kind, version=version, meta=meta) as tmp:
        from safetensors.numpy import save_file

        save_file(arrays, str(tmp / filename))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(path)


def load_tensors(
    path: str | Path,
    *,
    kind: str,
    max_version: int,
    names: Iterable[str] = (),
    filename: str = TENSORS,
    framework: str = "pt",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a `save_tensors` artefact: `(manifest, tensors)`, checked before anything is returned.

    Checks the manifest (kind, version, checksums), that the file parses, that every name in
    `names` is present, and that every floating tensor is finite. `framework`: "pt" (torch)
    or "np" (numpy).

    Raises:
        ArtefactError: naming the file and what is wrong with it.
    """
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    manifest = read_manifest(Path(path), kind=kind, max_version=max_version)
    fpath = Path(manifest["_dir"]) / filename
    try:
        arrays = load_file(str(fpath))
    except (SafetensorError, OSError) as exc:
        raise ArtefactError(f"{fpath} cannot be read: {exc}") from None
    missing = sorted(set(names) - set(arrays))
    if missing:
        raise ArtefactError(f"{fpath} lacks tensors {missing}")
    for name, arr in arrays.items():
        bad = int((~np.isfinite(arr)).sum()) if np.issubdtype(arr.dtype, np.floating) else 0
        if bad:
            raise ArtefactError(f"{path}: {name} holds NaN or inf ({bad} non-finite values in {fpath.name}); "
                                "refusing to load it")
    if framework == "pt":
        import torch

        return manifest, {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    return manifest, arrays
