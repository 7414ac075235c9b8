"""ExemplarIndex: exact and IVF search, MMR, filters, removal, persistence and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detot_agent.errors import ArtefactError, EmptyIndexError, IndexDataError
from detot_agent.retrieval.index import Exemplar, ExemplarIndex


def clustered(n: int, dim: int = 32, clusters: int = 40, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Points from one fixed mixture of Gaussian clusters; `seed` picks the points, not the clusters."""
    centres = np.random.default_rng(1234).standard_normal((clusters, dim))
    rng = np.random.default_rng(seed)
    pts = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    return (pts / np.linalg.norm(pts, axis=1, keepdims=True)).astype(np.float32)


def records(n: int, start: int = 0) -> list[Exemplar]:
    return [Exemplar(id=f"r{i}", text=f"text {i}", fields={"parity": "even" if i % 2 == 0 else "odd", "i": i})
            for i in range(start, start + n)]


@pytest.fixture
def small() -> ExemplarIndex:
    idx = ExemplarIndex(encoder_name="synthetic", dim=32)
    idx.add_vectors(records(300), clustered(300))
    return idx


@pytest.fixture(scope="module")
def ivf() -> ExemplarIndex:
    idx = ExemplarIndex(encoder_name="synthetic", dim=32, exact_threshold=1000)
    idx.add_vectors(records(6000), clustered(6000))
    return idx


def test_exact_search_matches_brute_force(small):
    q = clustered(5, seed=9)
    vecs = clustered(300)
    for row in q:
        expected = [f"r{i}" for i in np.argsort(-(vecs @ row))[:7]]
        hits = small.search(row, 7)
        assert [h.id for h in hits] == expected
        assert hits[0].score == pytest.approx(float(np.max(vecs @ row)), abs=1e-5)


def test_ivf_is_built_above_threshold_and_reaches_its_measured_recall(ivf):
    stats = ivf.stats()
    assert stats["index_type"] == "ivf" and stats["recall_at_10"] >= 0.97 and stats["nprobe"] >= 1
    vecs = clustered(6000)
    queries = clustered(100, seed=5)
    truth = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    got = ivf.search_many(queries, 10)
    recall = np.mean([len({f"r{i}" for i in t} & {h.id for h in g}) / 10 for t, g in zip(truth, got, strict=True)])
    assert recall >= 0.9


def test_mmr_returns_more_diverse_results(small):
    # ten near-copies of one vector crowd plain top-k; MMR spreads out
    base = clustered(1, seed=3)[0]
    rng = np.random.default_rng(4)
    copies = base + 0.01 * rng.standard_normal((10, 32)).astype(np.float32)
    small.add_vectors([Exemplar(id=f"dup{i}", text="dup") for i in range(10)], copies)
    plain = small.search(base, 6)
    diverse = small.search(base, 6, mmr=0.3)

    def mean_pairwise(hits) -> float:
        v = small.vectors([h.id for h in hits])
        sim = v @ v.T
        return float((sim.sum() - len(v)) / (len(v) * (len(v) - 1)))

    assert sum(h.id.startswith("dup") for h in plain) == 6
    assert sum(h.id.startswith("dup") for h in diverse) < 3
    assert mean_pairwise(diverse) < mean_pairwise(plain) - 0.2
    assert small.search(base, 6, mmr=1.0)[0].id == plain[0].id  # lambda 1 = pure relevance


@pytest.mark.parametrize("which", ["small", "ivf"])
def test_where_filters_on_fields(which, request):
    idx = request.getfixturevalue(which)
    q = clustered(1, seed=7)[0]
    hits = idx.search(q, 5, where={"parity": "odd"})
    assert len(hits) == 5 and all(h.fields["parity"] == "odd" for h in hits)
    few = idx.search(q, 5, where={"i": [2, 4]})
    assert sorted(h.id for h in few) == ["r2", "r4"]
    assert idx.search(q, 5, where={"parity": "none"}) == []


@pytest.mark.parametrize("exact_threshold", [10_000, 100])
def test_remove_hides_records(exact_threshold):
    idx = ExemplarIndex(encoder_name="synthetic", dim=32, exact_threshold=exact_threshold)
    vecs = clustered(400)
    idx.add_vectors(records(400), vecs)
    top = [h.id for h in idx.search(vecs[0], 5)]
    assert top[0] == "r0"
    assert idx.remove(top[:2]) == 2
    after = [h.id for h in idx.search(vecs[0], 5)]
    assert not set(top[:2]) & set(after) and len(idx) == 398
    idx.add_vectors([Exemplar(id="r0", text="back again")], vecs[:1])  # an id can be reused after removal
    assert idx.search(vecs[0], 1)[0].text == "back again"


@pytest.mark.parametrize("which", ["small", "ivf"])
def test_save_load_round_trip_gives_identical_results(which, request, tmp_path):
    idx = request.getfixturevalue(which)
    idx.remove(["r1", "r3"])
    queries = clustered(20, seed=11)
    before = idx.search_many(queries, 8)
    idx.save(tmp_path / "idx")
    back = ExemplarIndex.load(tmp_path / "idx")
    assert back.stats() == idx.stats()
    assert back.search_many(queries, 8) == before
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["count"] == len(idx) and manifest["encoder"] == "synthetic" and manifest["dim"] == 32
    expected = {"vectors.safetensors", "records.jsonl"} | ({"faiss.index"} if which == "ivf" else set())
    assert set(manifest["files"]) == expected


def test_text_round_trip_with_the_real_encoder(encoder, tmp_path):
    idx = ExemplarIndex(encoder)
    idx.add([{"id": "a", "text": "The cat sat on the mat."}, {"id": "b", "text": "Stocks fell sharply today."}])
    assert idx.search_text("a kitten on a rug", 1)[0].id == "a"
    idx.save(tmp_path / "i")
    assert ExemplarIndex.load(tmp_path / "i", encoder=encoder).search_text("market crash", 1)[0].id == "b"


# ---- bad input ---------------------------------------------------------------------------

def test_empty_index_search():
    with pytest.raises(EmptyIndexError, match="empty"):
        ExemplarIndex(encoder_name="x", dim=4).search(np.ones(4), 1)


@pytest.mark.parametrize("k", [0, -2, 301, 2.5])
def test_bad_k(small, k):
    with pytest.raises(IndexDataError, match=r"k must be an integer in \[1, 300\]"):
        small.search(np.ones(32), k)


def test_records_without_text_or_with_duplicate_ids(small):
    with pytest.raises(IndexDataError, match=r"record #1 \(id='x2'\) is invalid: .*text must be non-empty"):
        small.add_vectors([{"id": "x1", "text": "ok"}, {"id": "x2", "text": "  "}], np.ones((2, 32)))
    with pytest.raises(IndexDataError, match=r"duplicate ids in the records: \['x'\]"):
        small.add_vectors([{"id": "x", "text": "a"}, {"id": "x", "text": "b"}], np.ones((2, 32)))
    with pytest.raises(IndexDataError, match=r"ids already in the index: \['r0'\]"):
        small.add_vectors([{"id": "r0", "text": "a"}], np.ones((1, 32)))
    assert len(small) == 300  # nothing half-added


def test_nan_vectors_and_queries(small):
    bad = np.ones((2, 32), dtype=np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(IndexDataError, match=r"1 vector\(s\) hold NaN or inf \(first at row 1\)"):
        small.add_vectors(records(2, start=1000), bad)
    with pytest.raises(IndexDataError, match="NaN or inf"):
        small.search(bad[1], 3)
    with pytest.raises(IndexDataError, match=r"shape \(N, 32\)"):
        small.search(np.ones(16), 3)


def test_corrupted_or_truncated_files_are_named(ivf, tmp_path):
    ivf.save(tmp_path / "i")
    f = tmp_path / "i" / "faiss.index"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtefactError, match=r"faiss\.index does not match its checksum"):
        ExemplarIndex.load(tmp_path / "i")
    f.write_bytes(good)
    (tmp_path / "i" / "records.jsonl").write_text("garbage\n")
    with pytest.raises(ArtefactError, match=r"records\.jsonl does not match its checksum"):
        ExemplarIndex.load(tmp_path / "i")


def test_newer_format_and_other_encoder_are_refused(small, encoder, tmp_path):
    small.save(tmp_path / "i")
    mpath = tmp_path / "i" / "manifest.json"
    m = json.loads(mpath.read_text())
    with pytest.raises(ArtefactError, match=r"built with encoder 'synthetic' \(32 dims\).*'all-MiniLM-L6-v2' \(384"):
        ExemplarIndex.load(tmp_path / "i", encoder=encoder)
    m["format_version"] = 99
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtefactError, match="format_version 99, newer than this detot-agent reads"):
        ExemplarIndex.load(tmp_path / "i")


def test_failed_save_leaves_previous_index_intact(small, tmp_path, monkeypatch):
    import safetensors.numpy

    small.save(tmp_path / "i")
    small.add_vectors(records(5, start=500), clustered(5, seed=2))

    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        small.save(tmp_path / "i")
    back = ExemplarIndex.load(tmp_path / "i")
    assert len(back) == 300
    assert [p.name for p in tmp_path.iterdir()] == ["i"]  # no temp directories left behind
