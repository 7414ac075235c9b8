"""Atomic directory saves: crash between renames, temp cleanup, manifest checks."""

from __future__ import annotations

import json
import os

import pytest

from detot_agent.errors import ArtefactError
from detot_agent.io.persist import atomic_dir, atomic_write_text, read_manifest, resolve_for_load


def _save(path, text: str) -> None:
    with atomic_dir(path, kind="demo", version=1, meta={"text": text}) as tmp:
        (tmp / "data.txt").write_text(text)


def test_save_replaces_and_leaves_nothing_behind(tmp_path):
    _save(tmp_path / "a", "one")
    _save(tmp_path / "a", "two")
    assert (tmp_path / "a" / "data.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_crash_between_renames_recovers_the_old_copy(tmp_path, monkeypatch):
    _save(tmp_path / "a", "one")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / "a", "two")
    monkeypatch.setattr(os, "rename", real_rename)
    folder = resolve_for_load(tmp_path / "a")
    assert folder.name.startswith(".a.old-")
    assert read_manifest(tmp_path / "a", kind="demo", max_version=1)["text"] == "one"
    _save(tmp_path / "a", "three")  # the next save cleans the backup up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_manifest_checks(tmp_path):
    _save(tmp_path / "a", "one")
    with pytest.raises(ArtefactError, match="is a 'demo' artefact, not a 'other'"):
        read_manifest(tmp_path / "a", kind="other", max_version=1)
    (tmp_path / "a" / "data.txt").write_text("swapped")
    with pytest.raises(ArtefactError, match="does not match its checksum"):
        read_manifest(tmp_path / "a", kind="demo", max_version=1)
    (tmp_path / "a" / "data.txt").unlink()
    with pytest.raises(ArtefactError, match=r"data\.txt is missing"):
        read_manifest(tmp_path / "a", kind="demo", max_version=1)
    atomic_write_text(tmp_path / "a" / "manifest.json", "{not json")
    with pytest.raises(ArtefactError, match="is not valid JSON"):
        read_manifest(tmp_path / "a", kind="demo", max_version=1)
    atomic_write_text(tmp_path / "a" / "manifest.json", json.dumps({"kind": "demo", "format_version": "x"}))
    with pytest.raises(ArtefactError, match="no valid format_version"):
        read_manifest(tmp_path / "a", kind="demo", max_version=1)
    with pytest.raises(ArtefactError, match="does not exist"):
        read_manifest(tmp_path / "missing", kind="demo", max_version=1)


def test_tensor_artefacts_round_trip_and_refuse_nan_or_missing_tensors(tmp_path):
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    from detot_agent.io.persist import load_tensors, save_tensors, sha256_file

    path = save_tensors(tmp_path / "t", kind="demo", version=1, meta={"n": 2}, tensors={"x": torch.arange(3.0)})
    m, tensors = load_tensors(path, kind="demo", max_version=1, names=["x"])
    assert m["n"] == 2 and tensors["x"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ArtefactError, match=r"lacks tensors \['y'\]"):
        load_tensors(path, kind="demo", max_version=1, names=["x", "y"])
    # a NaN written by some other tool, with the checksum re-signed: still refused
    save_file({"x": np.array([1.0, np.nan], dtype=np.float32)}, str(path / "tensors.safetensors"))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["tensors.safetensors"] = sha256_file(path / "tensors.safetensors")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError, match="t: x holds NaN or inf"):
        load_tensors(path, kind="demo", max_version=1)


def test_artefacts_get_the_modes_of_plain_files_and_folders(tmp_path):
    import stat

    import torch

    from detot_agent.io.persist import DIR_MODE, FILE_MODE, atomic_write_text, save_tensors

    atomic_write_text(tmp_path / "a.json", "{}")
    folder = save_tensors(tmp_path / "t", kind="demo", version=1, meta={}, tensors={"x": torch.zeros(2)})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == FILE_MODE
    assert stat.S_IMODE(folder.stat().st_mode) == DIR_MODE
    assert all(stat.S_IMODE(p.stat().st_mode) == FILE_MODE for p in folder.iterdir())
    assert FILE_MODE & 0o044  # readable by others under the usual umask, unlike tempfile's 0600
