"""`ExemplarIndex`: a FAISS store of exemplars (text + fields) with stable ids.

Search is exact up to `exact_threshold` records (a BLAS matrix product over the
stored vectors: for single queries it beats FAISS's flat index, which only
switches to BLAS for batches of 20 or more) and FAISS IVF-Flat above it.
When the IVF index is built, its `nprobe` is tuned: the smallest power of two
whose recall@10 against exact search, measured on a sample of stored vectors
used as queries (their own entry excluded), reaches `target_recall`. The
measured recall is kept in `stats()` and the manifest.

Vectors are unit-normalised, so inner product is cosine similarity.

Example:
    >>> import numpy as np
    >>> from detot_agent.retrieval.index import Exemplar, ExemplarIndex
    >>> idx = ExemplarIndex(encoder_name="demo", dim=3)
    >>> vecs = np.eye(3, dtype=np.float32)
    >>> idx.add_vectors([Exemplar(id=f"e{i}", text=f"t{i}", fields={"split": "a"}) for i in range(3)], vecs)
    >>> [h.id for h in idx.search(np.array([0.9, 0.1, 0.0], dtype=np.float32), 2)]
    ['e0', 'e1']
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from pydantic import Field, ValidationError

from detot_agent.config import StrictModel
from detot_agent.errors import EmptyIndexError, IndexDataError
from detot_agent.io.persist import save_tensors
from detot_agent.io.records import Exemplar
from detot_agent.retrieval.encoder import Encoder
from detot_agent.retrieval.index_files import read_index_files
from detot_agent.retrieval.scoring import Hit, check_vectors, exact_top, matches, mmr_select

__all__ = ["Exemplar", "ExemplarIndex", "Hit", "IndexConfig"]


class IndexConfig(StrictModel):
    """Search settings of an `ExemplarIndex` (validated when built).

    Attributes:
        exact_threshold: most records searched exactly; above it an IVF index is built.
        target_recall: recall@10 the IVF `nprobe` is tuned to reach.
    """

    exact_threshold: int = Field(default=50_000, ge=0)
    target_recall: float = Field(default=0.97, gt=0, le=1)


class ExemplarIndex:
    """FAISS-backed exemplar store.

    Args:
        encoder: encodes record texts in `add` and query texts in `search_text`; may be None when
            vectors are supplied (then give `encoder_name` and `dim`).
        encoder_name: recorded in the manifest; defaults to `encoder.name`.
        dim: vector dimension; defaults to `encoder.dim`.
        exact_threshold: most records searched exactly; above it an IVF index is built.
        target_recall: recall@10 the IVF `nprobe` is tuned to reach.
    """

    FORMAT = "detot-exemplar-index"
    FORMAT_VERSION = 1
    VECTORS = "vectors.safetensors"

    def __init__(
        self,
        encoder: Encoder | None = None,
        *,
        encoder_name: str | None = None,
        dim: int | None = None,
        exact_threshold: int = 50_000,
        target_recall: float = 0.97,
    ) -> None:
        if encoder is None and (encoder_name is None or dim is None):
            raise IndexDataError("an index without an encoder needs encoder_name= and dim=")
        self.config = IndexConfig(exact_threshold=exact_threshold, target_recall=target_recall)
        self.encoder = encoder
        self.encoder_name: str = encoder_name or (encoder.name if encoder else "")
        self.dim: int = int(dim or (encoder.dim if encoder else 0))
        if encoder is not None and (encoder.name != self.encoder_name or encoder.dim != self.dim):
            raise IndexDataError(
                f"encoder {encoder.name!r} ({encoder.dim} dims) does not match encoder_name={self.encoder_name!r}, "
                f"dim={self.dim}"
            )
        self.exact_threshold = self.config.exact_threshold
        self.target_recall = self.config.target_recall
        self._vecs = np.zeros((0, self.dim), dtype=np.float32)
        self._records: list[Exemplar | None] = []
        self._row_of: dict[str, int] = {}
        self._faiss: Any = None  # the IVF index, when approximate
        self._flat: tuple[np.ndarray, np.ndarray] | None = None  # (rows, vectors) of live records, when exact
        self._kind = "flat"
        self._nprobe = 0
        self._recall: float | None = None
        self._lock = threading.RLock()

    def __deepcopy__(self, memo: dict[int, Any]) -> ExemplarIndex:
        return self  # held by reference: optimizers copy programs, not indexes

    def __getstate__(self) -> dict[str, Any]:
        """Pickle support (`save_program=True`): the FAISS index as bytes, no lock."""
        with self._lock:
            state = {k: v for k, v in self.__dict__.items() if k != "_lock"}
            if self._faiss is not None:
                state["_faiss"] = faiss.serialize_index(self._faiss)
            return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if state.get("_faiss") is not None:
            state["_faiss"] = faiss.deserialize_index(state["_faiss"])
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, exemplar_id: object) -> bool:
        return exemplar_id in self._row_of

    # ---- writing ---------------------------------------------------------------------
    def add(self, records: Iterable[Exemplar | dict[str, Any]]) -> None:
        """Embed and add records (`Exemplar`s or dicts with id, text, fields)."""
        recs = self._validate_records(records)
        if self.encoder is None:
            raise IndexDataError("this index has no encoder; use add_vectors(records, vectors)")
        self.add_vectors(recs, self.encoder.encode([r.text for r in recs]))

    def add_vectors(self, records: Sequence[Exemplar | dict[str, Any]], vectors: np.ndarray) -> None:
        """Add records with their (unit) vectors; ids must be new and unique."""
        recs = self._validate_records(records)
        vecs = check_vectors(vectors, self.dim, "vectors")
        if len(vecs) != len(recs):
            raise IndexDataError(f"{len(recs)} records but {len(vecs)} vectors")
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        if (norms == 0).any():
            raise IndexDataError(f"{int((norms == 0).sum())} vector(s) are all zeros")
        vecs = vecs / norms
        with self._lock:
            clash = [r.id for r in recs if r.id in self._row_of]
            if clash:
                raise IndexDataError(f"ids already in the index: {clash[:5]}{' ...' if len(clash) > 5 else ''}")
            start = len(self._records)
            self._vecs = np.concatenate([self._vecs, vecs]) if len(self._vecs) else vecs.copy()
            for i, r in enumerate(recs):
                self._records.append(r)
                self._row_of[r.id] = start + i
            self._flat = None  # rebuilt on the next search
            if self._faiss is not None:
                self._faiss.add_with_ids(vecs, np.arange(start, start + len(recs), dtype=np.int64))

    def remove(self, ids: Iterable[str]) -> int:
        """Remove records by id; unknown ids are an error. Returns how many were removed."""
        ids = list(ids)
        with self._lock:
            unknown = [i for i in ids if i not in self._row_of]
            if unknown:
                raise IndexDataError(f"ids not in the index: {unknown[:5]}")
            rows = np.array([self._row_of.pop(i) for i in ids], dtype=np.int64)
            for r in rows:
                self._records[r] = None
            self._flat = None
            if self._faiss is not None:
                self._faiss.remove_ids(rows)
            return len(rows)

    def _validate_records(self, records: Iterable[Exemplar | dict[str, Any]]) -> list[Exemplar]:
        out: list[Exemplar] = []
        for i, r in enumerate(records):
            if isinstance(r, Exemplar):
                out.append(r)
                continue
            try:
                out.append(Exemplar(**r))
            except (ValidationError, TypeError) as exc:
                detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
                rid = r.get("id") if isinstance(r, dict) else None
                raise IndexDataError(f"record #{i} (id={rid!r}) is invalid: {detail}") from None
        seen: set[str] = set()
        dups = [r.id for r in out if r.id in seen or seen.add(r.id)]  # type: ignore[func-returns-value]
        if dups:
            raise IndexDataError(f"duplicate ids in the records: {sorted(set(dups))[:5]}")
        return out

    # ---- the FAISS index -------------------------------------------------------------
    def _alive_rows(self) -> np.ndarray:
        return np.fromiter(self._row_of.values(), dtype=np.int64, count=len(self._row_of))

    def _ensure_index(self) -> Any:
        """The IVF index when approximate; None when exact (then `_flat` holds the live vectors)."""
        if self._faiss is not None:
            return self._faiss
        if self._flat is not None:
            return None
        rows = np.sort(self._alive_rows())
        vecs = self._vecs[rows]
        if len(rows) <= self.exact_threshold:
            self._flat = (rows, np.ascontiguousarray(vecs))
            self._kind, self._nprobe, self._recall = "flat", 0, 1.0
            return None
        else:
            nlist = int(2 ** round(math.log2(4 * math.sqrt(len(rows)))))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            train = vecs[rng.choice(len(vecs), size=min(len(vecs), 40 * nlist), replace=False)]
            index.cp.niter = 10  # plenty for the coarse quantizer; nprobe is tuned below
            index.train(train)
            index.add_with_ids(vecs, rows)
            self._kind = "ivf"
            self._nprobe, self._recall = self._tune_nprobe(index, vecs, rows, nlist)
            index.nprobe = self._nprobe
        self._faiss = index
        return index

    def _tune_nprobe(self, index: Any, vecs: np.ndarray, rows: np.ndarray, nlist: int) -> tuple[int, float]:
        rng = np.random.default_rng(1)
        pick = rng.choice(len(vecs), size=min(200, len(vecs)), replace=False)
        queries = vecs[pick]
        exact = faiss.IndexFlatIP(self.dim)
        exact.add(vecs)
        _, truth = exact.search(queries, 11)
        truth_rows = [set(rows[t[1:]].tolist()) for t in truth]  # own entry excluded
        nprobe, recall = 1, 0.0
        while True:
            index.nprobe = nprobe
            _, got = index.search(queries, 11)
            recall = float(np.mean([len(truth_rows[i] & set(g[1:].tolist())) / 10 for i, g in enumerate(got)]))
            if recall >= self.target_recall or nprobe >= nlist:
                return nprobe, recall
            nprobe *= 2

    def stats(self) -> dict[str, Any]:
        """Records, index type, nprobe and measured recall@10 of the approximate index (1.0 when exact)."""
        with self._lock:
            self._ensure_index() if len(self) else None
            return {"count": len(self), "dim": self.dim, "encoder": self.encoder_name, "index_type": self._kind,
                    "nprobe": self._nprobe, "recall_at_10": self._recall}

    # ---- searching ---------------------------------------------------------------------
    def search(
        self,
        query: np.ndarray,
        k: int,
        *,
        mmr: float | None = None,
        where: dict[str, Any] | None = None,
        fetch_k: int | None = None,
    ) -> list[Hit]:
        """Top-k exemplars for one query vector.

        Args:
            query: `(dim,)` vector (normalised here).
            k: results wanted; 1 <= k <= len(index). With `where`, fewer come back if fewer match.
            mmr: lambda in [0, 1] for maximal marginal relevance (1 = pure relevance); None = plain top-k.
            where: field filter, `{"field": value}` or `{"field": [allowed, values]}`; all must hold.
            fetch_k: candidates considered by MMR (default max(4k, 20)).
        """
        return self.search_many(np.asarray(query, dtype=np.float32).reshape(1, -1), k, mmr=mmr, where=where,
                                fetch_k=fetch_k)[0]

    def search_text(self, text: str, k: int, **kwargs: Any) -> list[Hit]:
        """Encode `text` with the index's encoder and search."""
        if self.encoder is None:
            raise IndexDataError("this index has no encoder; pass a vector to search()")
        return self.search(self.encoder.encode([text])[0], k, **kwargs)

    def search_many(
        self,
        queries: np.ndarray,
        k: int,
        *,
        mmr: float | None = None,
        where: dict[str, Any] | None = None,
        fetch_k: int | None = None,
    ) -> list[list[Hit]]:
        """`search` for a batch of query vectors `(N, dim)`."""
        q = check_vectors(queries, self.dim, "query")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if (norms == 0).any():
            raise IndexDataError("query vector is all zeros")
        q = q / norms
        if mmr is not None and not 0.0 <= mmr <= 1.0:
            raise IndexDataError(f"mmr lambda must be in [0, 1], got {mmr}")
        with self._lock:
            n = len(self)
            if n == 0:
                raise EmptyIndexError("the index is empty; add exemplars before searching")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > n:
                raise IndexDataError(f"k must be an integer in [1, {n}] (the index holds {n} records), got {k!r}")
            index = self._ensure_index()
            want = k if mmr is None else min(n, max(fetch_k or 4 * k, 20, k))
            if where:
                rows = np.array([r for r, rec in enumerate(self._records) if rec is not None
                                 and matches(rec.fields, where)], dtype=np.int64)
                if len(rows) == 0:
                    return [[] for _ in range(len(q))]
                want = min(want, len(rows))
                scores, found = self._filtered_search(index, q, rows, want)
            elif index is None:
                rows, vecs = self._flat  # type: ignore[misc]
                scores, found = exact_top(q, rows, vecs, want)
            else:
                scores, found = index.search(q, want)
            out: list[list[Hit]] = []
            for i in range(len(q)):
                cand = [(int(r), float(s)) for r, s in zip(found[i], scores[i], strict=True) if r >= 0]
                if mmr is not None:
                    cand = mmr_select(q[i], cand, k, mmr, self._vecs)
                out.append([self._hit(r, s) for r, s in cand[:k]])
            return out

    def _filtered_search(self, index: Any, q: np.ndarray, rows: np.ndarray, want: int) -> tuple[Any, Any]:
        # Exact over the matching rows unless they are many (an IVF probe could miss a small subset entirely).
        if index is None or len(rows) <= self.exact_threshold:
            return exact_top(q, rows, self._vecs[rows], want)
        sel = faiss.IDSelectorBatch(rows)
        params = faiss.SearchParametersIVF(sel=sel, nprobe=max(self._nprobe, 1))  # type: ignore[call-arg]
        return index.search(q, want, params=params)

    def _hit(self, row: int, score: float) -> Hit:
        rec = self._records[row]
        assert rec is not None
        return Hit(rec.id, rec.text, dict(rec.fields), score)

    def get(self, exemplar_id: str) -> Exemplar:
        """The record with this id."""
        row = self._row_of.get(exemplar_id)
        if row is None:
            raise IndexDataError(f"id {exemplar_id!r} is not in the index")
        rec = self._records[row]
        assert rec is not None
        return rec

    def records(self) -> list[Exemplar]:
        """The live records, in insertion order."""
        with self._lock:
            return [r for r in self._records if r is not None and r.id in self._row_of]

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored unit vectors of these ids, `(len(ids), dim)`."""
        with self._lock:
            rows = []
            for i in ids:
                if i not in self._row_of:
                    raise IndexDataError(f"id {i!r} is not in the index")
                rows.append(self._row_of[i])
            return self._vecs[np.array(rows, dtype=np.int64)].copy()

    def sample_vectors(self, n: int, *, seed: int = 0) -> np.ndarray:
        """Up to `n` stored vectors of live records, a seeded sample, `(min(n, len), dim)`."""
        with self._lock:
            rows = np.array(sorted(self._row_of.values()), dtype=np.int64)
            if len(rows) > n:
                rows = np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))
            return self._vecs[rows].copy()

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Atomically save vectors (safetensors), records (JSONL) and the FAISS index, with a manifest."""

        with self._lock:
            self._compact()
            index = self._ensure_index() if len(self) else None
            meta = {"encoder": self.encoder_name, "dim": self.dim, "count": len(self), "index_type": self._kind,
                    "nprobe": self._nprobe, "recall_at_10": self._recall, "exact_threshold": self.exact_threshold,
                    "target_recall": self.target_recall}
            records = "".join(json.dumps(rec.model_dump(), ensure_ascii=False) + "\n"
                              for rec in self._records if rec is not None)
            files = {"records.jsonl": records.encode("utf-8")}
            if index is not None:
                files["faiss.index"] = faiss.serialize_index(index).tobytes()
            save_tensors(path, kind=self.FORMAT, version=self.FORMAT_VERSION, meta=meta, filename=self.VECTORS,
                         tensors={"vectors": self._vecs}, files=files)
        return Path(path)

    def _compact(self) -> None:
        if len(self._records) == len(self):
            return
        rows = np.sort(self._alive_rows())
        self._vecs = self._vecs[rows]
        self._records = [self._records[r] for r in rows]
        self._row_of = {rec.id: i for i, rec in enumerate(self._records) if rec is not None}
        self._flat = None
        if self._faiss is not None:
            self._faiss.reset()  # IVF keeps its trained centroids
            self._faiss.add_with_ids(self._vecs, np.arange(len(rows), dtype=np.int64))

    @classmethod
    def load(cls, path: str | Path, *, encoder: Encoder | None = None) -> ExemplarIndex:
        """Load a saved index, checking checksums, counts, shapes and the encoder.

        Raises:
            ArtefactError: corrupted or truncated files, a newer format, or an index built with another
                encoder or dimension than `encoder` (the message names both).
        """
        m, vecs, records, index = read_index_files(Path(path), encoder, kind=cls.FORMAT,
                                                   max_version=cls.FORMAT_VERSION, filename=cls.VECTORS)
        idx = cls(encoder, encoder_name=m["encoder"], dim=int(m["dim"]), exact_threshold=int(m["exact_threshold"]),
                  target_recall=float(m["target_recall"]))
        idx._vecs = vecs
        idx._records = list(records)
        idx._row_of = {r.id: i for i, r in enumerate(records)}
        idx._kind = m["index_type"]
        if index is not None:
            idx._faiss = index
            idx._nprobe, idx._recall = int(m["nprobe"]), m["recall_at_10"]
            index.nprobe = idx._nprobe
        return idx
