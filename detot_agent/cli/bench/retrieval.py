"""`detot bench retrieval`: ExemplarIndex against numpy brute force and `dspy.retrievers.Embeddings`.

Synthetic data: 384-dim unit vectors from a mixture of 7,473 Gaussian clusters
whose centres are the real MiniLM embeddings of the GSM8K train questions
(so the mixture keeps the real data's anisotropy and topic structure), with
isotropic noise of scale `sigma`; queries are drawn from the same mixture.
`sigma` is calibrated so that, at the size of GSM8K train, the median top-1
cosine similarity of a query equals that of real MiniLM embeddings of GSM8K
test questions against GSM8K train. Both medians are reported (and the median
cosine of random pairs, real and synthetic): clusters that are too tight
flatter an approximate index, uniform noise misleads the other way.

Per size: build time, memory, p50/p99 single-query latency through the public
`search` API, batch throughput, recall@10 of the approximate index against exact
search, and the same queries through the two baselines.

Example:
    >>> import numpy as np
    >>> from detot_agent.cli.bench.retrieval import synthetic
    >>> centres = np.eye(8, dtype=np.float32)[:2]
    >>> synthetic(5, centres, sigma=0.1, seed=0).shape
    (5, 8)
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from detot_agent.retrieval.index import Exemplar, ExemplarIndex

__all__ = ["calibrate_sigma", "median_top1", "real_embeddings", "run_retrieval_bench", "synthetic"]

DIM = 384


def synthetic(n: int, centres: np.ndarray, *, sigma: float, seed: int = 0, chunk: int = 200_000) -> np.ndarray:
    """`n` unit vectors around randomly chosen `centres`; `seed` picks the points (queries use another seed)."""
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        pts = centres[rng.integers(0, len(centres), m)].astype(np.float32)
        pts += (sigma / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    return out


def median_top1(corpus: np.ndarray, queries: np.ndarray) -> float:
    """Median over queries of the best cosine similarity in `corpus` (unit vectors)."""
    best = np.concatenate([(queries[i:i + 256] @ corpus.T).max(axis=1) for i in range(0, len(queries), 256)])
    return float(np.median(best))


def median_pair(vecs: np.ndarray, pairs: int = 20_000, seed: int = 0) -> float:
    """Median cosine of random pairs (the background similarity of a collection)."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vecs), pairs), rng.integers(0, len(vecs), pairs)
    keep = a != b
    return float(np.median(np.einsum("ij,ij->i", vecs[a[keep]], vecs[b[keep]])))


def real_embeddings(train: Path, test: Path, *, queries: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM embeddings of GSM8K train questions and of the first `queries` test questions."""
    from detot_agent.io.datafiles import read_exemplars
    from detot_agent.retrieval.encoder import Encoder

    enc = Encoder()
    corpus = enc.encode([e.text for e in read_exemplars(train, fmt="gsm8k")])
    qs = enc.encode([e.text for e in read_exemplars(test, fmt="gsm8k")[:queries]])
    return corpus, qs


def calibrate_sigma(target: float, centres: np.ndarray, *, queries: int = 500) -> float:
    """Noise scale whose synthetic median top-1 at size `len(centres)` equals `target` (bisection)."""
    lo, hi = 0.01, 4.0
    for _ in range(22):
        mid = (lo + hi) / 2
        got = median_top1(synthetic(len(centres), centres, sigma=mid, seed=1),
                          synthetic(queries, centres, sigma=mid, seed=2))
        lo, hi = (mid, hi) if got > target else (lo, mid)
    return (lo + hi) / 2


def _latencies(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> np.ndarray:
    times = np.empty(len(queries))
    for i, q in enumerate(queries):
        start = time.perf_counter()
        fn(q)
        times[i] = time.perf_counter() - start
    return times * 1000.0


def _measure(index: ExemplarIndex, queries: np.ndarray) -> tuple[np.ndarray, list[Any], float]:
    index.search(queries[0], 10)  # warm-up
    lat = _latencies(lambda q: index.search(q, 10), queries)
    start = time.perf_counter()
    batch = index.search_many(queries, 10)
    return lat, batch, len(queries) / (time.perf_counter() - start)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _bench_size(n: int, centres: np.ndarray, sigma: float, n_queries: int, baseline_queries: int,
                with_dspy: bool) -> dict[str, Any]:
    from rich.console import Console

    say = Console(stderr=True).print
    corpus = synthetic(n, centres, sigma=sigma, seed=10)
    queries = synthetic(n_queries, centres, sigma=sigma, seed=11)
    gc.collect()
    rss0 = _rss_mb()
    say(f"[dim]{n:,}: building ExemplarIndex[/]")
    start = time.perf_counter()
    index = ExemplarIndex(encoder_name="synthetic", dim=DIM)
    index.add_vectors([Exemplar(id=str(i), text="x") for i in range(n)], corpus)
    stats = index.stats()  # builds the FAISS index (and tunes nprobe when approximate)
    build_s = time.perf_counter() - start
    mem_mb = _rss_mb() - rss0

    lat, batch, batch_qps = _measure(index, queries)

    import faiss

    exact = faiss.IndexFlatIP(DIM)
    exact.add(corpus)
    _, truth = exact.search(queries, 10)
    del exact
    recall = float(np.mean([len(set(map(str, t)) & {h.id for h in got}) / 10 for t, got in zip(truth, batch,
                                                                                              strict=True)]))
    median_sim = median_top1(corpus, queries[:500])

    say(f"[dim]{n:,}: numpy brute force baseline[/]")
    bq = queries[:baseline_queries]

    def numpy_knn(q: np.ndarray) -> np.ndarray:  # what dspy.KNN does: dot products, then top-k
        scores = corpus @ q
        top = np.argpartition(-scores, 10)[:10]
        return top[np.argsort(-scores[top])]

    np_lat = _latencies(numpy_knn, bq)
    row: dict[str, Any] = {
        "size": n, "index_type": stats["index_type"], "nprobe": stats["nprobe"],
        "tuned_recall_at_10": stats["recall_at_10"], "build_s": build_s, "memory_mb": mem_mb,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "batch_qps": batch_qps, "recall_at_10": recall, "median_top1_cosine": median_sim,
        "baseline_numpy_p50_ms": float(np.percentile(np_lat, 50)),
        "baseline_numpy_p99_ms": float(np.percentile(np_lat, 99)),
    }
    row["speedup_vs_numpy_p50"] = row["baseline_numpy_p50_ms"] / row["p50_ms"]
    del index  # free its memory before the baseline is built
    gc.collect()
    if with_dspy:
        say(f"[dim]{n:,}: dspy.retrievers.Embeddings baseline (building)[/]")
        import dspy

        lookup = {f"q{i}": v for i, v in enumerate(bq)}

        def embedder(texts: list[str]) -> np.ndarray:
            if texts and texts[0].startswith("q"):
                return np.stack([lookup[t] for t in texts])
            return corpus[np.array([int(t) for t in texts])]

        start = time.perf_counter()
        emb = dspy.retrievers.Embeddings(corpus=[str(i) for i in range(n)], embedder=embedder, k=10)
        row["baseline_dspy_embeddings_build_s"] = time.perf_counter() - start
        keys = list(lookup)
        call_lat = _latencies(lambda i: emb(keys[int(i[0])]), np.arange(len(keys))[:, None].astype(float))
        direct_lat = _latencies(lambda i: emb._batch_forward([keys[int(i[0])]]),
                                np.arange(len(keys))[:, None].astype(float))
        row["baseline_dspy_embeddings_p50_ms"] = float(np.percentile(call_lat, 50))
        row["baseline_dspy_embeddings_direct_p50_ms"] = float(np.percentile(direct_lat, 50))
        del emb
        gc.collect()
    return row


def run_retrieval_bench(
    sizes: list[int], *, train: Path, test: Path, queries: int = 1000, baseline_queries: int = 50,
    with_dspy: bool = True,
) -> dict[str, Any]:
    """Calibrate on real GSM8K embeddings, then measure every size. Keys of the result are sizes as strings."""
    centres, real_queries = real_embeddings(train, test)
    real = median_top1(centres, real_queries)
    sigma = calibrate_sigma(real, centres)
    ref_corpus = synthetic(len(centres), centres, sigma=sigma, seed=1)
    calibration = {
        "real_median_top1": real,
        "synthetic_median_top1_at_reference": median_top1(ref_corpus, synthetic(500, centres, sigma=sigma, seed=2)),
        "real_median_pair_cosine": median_pair(centres),
        "synthetic_median_pair_cosine": median_pair(ref_corpus),
        "reference_size": len(centres), "sigma": sigma, "clusters": len(centres),
    }
    result: dict[str, Any] = {}
    for n in sizes:
        row = _bench_size(n, centres, sigma, queries, baseline_queries, with_dspy)
        row["calibration"] = calibration
        result[str(n)] = row
    return result
