"""Reading a saved `ExemplarIndex` folder, every part checked against the manifest before the index is built:
the vectors (safetensors), the records (JSONL), the FAISS IVF index when there is one, and the encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from pydantic import ValidationError

from detot_agent.errors import ArtefactError
from detot_agent.io.persist import load_tensors, read_manifest
from detot_agent.io.records import Exemplar
from detot_agent.retrieval.encoder import Encoder

__all__ = ["read_index_files"]


def read_index_files(path: Path, encoder: Encoder | None, *, kind: str, max_version: int,
                     filename: str) -> tuple[dict[str, Any], np.ndarray, list[Exemplar], Any]:
    """`(manifest, vectors (count, dim) float32, records, FAISS index or None)` of a saved index folder.

    Raises:
        ArtefactError: corrupted or truncated files, a newer format, or an index built with another
            encoder or dimension than `encoder` (the message names both).
    """
    m = read_manifest(path, kind=kind, max_version=max_version, verify=False)
    if encoder is not None and (encoder.name != m.get("encoder") or encoder.dim != m.get("dim")):
        raise ArtefactError(
            f"{path} was built with encoder {m.get('encoder')!r} ({m.get('dim')} dims), but the encoder given is "
            f"{encoder.name!r} ({encoder.dim} dims); rebuild the index or pass the same encoder"
        )
    m, arrays = load_tensors(path, kind=kind, max_version=max_version, filename=filename,
                             names=("vectors",), framework="np")
    folder = Path(m["_dir"])
    vecs = arrays["vectors"]
    count, dim = int(m["count"]), int(m["dim"])
    if vecs.shape != (count, dim) or vecs.dtype != np.float32:
        raise ArtefactError(f"{folder}/vectors.safetensors holds {vecs.dtype} {vecs.shape}, manifest says "
                            f"float32 ({count}, {dim})")
    records = []
    with open(folder / "records.jsonl", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                records.append(Exemplar(**json.loads(line)))
            except (json.JSONDecodeError, ValidationError, TypeError) as exc:
                raise ArtefactError(f"{folder}/records.jsonl line {line_no} is invalid: {exc}") from None
    if len(records) != count:
        raise ArtefactError(f"{folder}/records.jsonl has {len(records)} records, manifest says {count}")
    if len({r.id for r in records}) != count:
        raise ArtefactError(f"{folder}/records.jsonl repeats ids")
    fpath = folder / "faiss.index"
    index: Any = None
    if count and m["index_type"] == "ivf":
        try:
            index = faiss.deserialize_index(np.frombuffer(fpath.read_bytes(), dtype=np.uint8))
        except (RuntimeError, OSError) as exc:
            raise ArtefactError(f"{fpath} cannot be read: {exc}") from None
        if index.ntotal != count or index.d != dim:
            raise ArtefactError(f"{fpath} holds {index.ntotal} x {index.d}, manifest says {count} x {dim}")
    return m, vecs, records, index
