"""The scoring under `ExemplarIndex`: exact top-k by a matrix product, maximal marginal relevance, field
filters, vector checks, and the `Hit` a search returns. Pure numpy.

Example:
    >>> import numpy as np
    >>> vecs = np.eye(3, dtype=np.float32)
    >>> scores, rows = exact_top(np.array([[0.9, 0.1, 0.0]], dtype=np.float32), np.arange(3), vecs, 2)
    >>> rows.tolist()
    [[0, 1]]
    >>> matches({"split": "a"}, {"split": ["a", "b"]})
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from detot_agent.errors import IndexDataError

__all__ = ["Hit", "check_vectors", "exact_top", "matches", "mmr_select"]


@dataclass(frozen=True)
class Hit:
    """A search result: the exemplar and its score (cosine similarity, or the MMR score when `mmr` is set)."""

    id: str
    text: str
    fields: dict[str, Any]
    score: float


def check_vectors(vecs: np.ndarray, dim: int, what: str) -> np.ndarray:
    """`vecs` as contiguous float32 `(N, dim)`, refused (naming `what`) when misshapen or non-finite."""
    arr = np.ascontiguousarray(np.asarray(vecs, dtype=np.float32))
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise IndexDataError(f"{what} must have shape (N, {dim}), got {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise IndexDataError(f"{what}: {int(bad.sum())} vector(s) hold NaN or inf (first at row {int(bad.argmax())})")
    return arr


def matches(fields: dict[str, Any], where: dict[str, Any]) -> bool:
    """Whether `fields` satisfy a `where=` filter (a value, or a collection of allowed values, per field)."""
    for key, want in where.items():
        have = fields.get(key)
        if isinstance(want, (list, tuple, set, frozenset)):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def exact_top(q: np.ndarray, rows: np.ndarray, vecs: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`want` by inner product: `(scores (Q, want), row ids (Q, want))` for queries `q` `(Q, D)` over
    `vecs` `(R, D)` whose row ids are `rows` `(R,)` (a BLAS matrix product; best first, ties stable)."""
    sims = q @ vecs.T  # (Q, R)
    if want < sims.shape[1]:
        part = np.argpartition(-sims, want - 1, axis=1)[:, :want]  # (Q, want), unordered
    else:
        part = np.broadcast_to(np.arange(sims.shape[1]), (len(q), sims.shape[1]))
    part_sims = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-part_sims, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(sims, top, axis=1), rows[top]


def mmr_select(q: np.ndarray, cand: list[tuple[int, float]], k: int, lam: float,
               table: np.ndarray) -> list[tuple[int, float]]:
    """Maximal marginal relevance: up to `k` of the candidate `(row, score)`s, each scored `lam * relevance -
    (1 - lam) * its highest similarity to those already picked`; `table` `(N, D)` holds the rows' unit vectors."""
    rows = np.array([r for r, _ in cand], dtype=np.int64)
    vecs = table[rows]  # (C, D)
    rel = vecs @ q  # (C,)
    sim = vecs @ vecs.T  # (C, C)
    chosen: list[int] = []
    best_sim = np.full(len(rows), -np.inf, dtype=np.float32)
    picked: list[tuple[int, float]] = []
    for _ in range(min(k, len(rows))):
        redundancy = np.where(np.isfinite(best_sim), best_sim, 0.0)
        score = lam * rel - (1 - lam) * redundancy
        score[chosen] = -np.inf
        j = int(np.argmax(score))
        chosen.append(j)
        picked.append((int(rows[j]), float(score[j])))
        best_sim = np.maximum(best_sim, sim[j])
    return picked
