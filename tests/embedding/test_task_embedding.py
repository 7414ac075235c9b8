"""Encoder and the task embedding's query side (retrieval); the head is in test_head.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.embedding.update import TrainingItem
from detot_agent.errors import ArtefactError, ConfigError, DetotError


def _fb(e, pos, neg):
    return [TrainingItem(query=np.asarray(q), positives=p, negatives=n) for q, p, n in zip(e, pos, neg, strict=True)]


def test_encoder_outputs_unit_float32_and_caches_by_text(encoder):
    before = encoder.cache_info()["size"]
    v = encoder.encode(["apples and pears", "a train leaves at noon", "apples and pears"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(v[0], v[2])
    assert encoder.cache_info()["size"] == before + 2
    again = encoder.encode(["a train leaves at noon"])
    assert np.array_equal(again[0], v[1])
    with pytest.raises(TypeError, match="list of texts"):
        encoder.encode("not a list")


def test_query_is_normalised_mix_of_input_and_task():
    t = np.array([1, 0, 0, 0], dtype=np.float32)
    te = TaskEmbedding("t", t, encoder_name="demo", alpha=1.0)
    q = te.query(np.array([0, 1, 0, 0], dtype=np.float32))
    assert np.allclose(q, np.array([1, 1, 0, 0]) / np.sqrt(2), atol=1e-6)


def test_feedback_lifts_helpful_exemplars_into_top_k(gsm8k_index, encoder):
    te = TaskEmbedding.from_description("arith", "Solve grade-school math word problems.", encoder=encoder,
                                        samples=["Tom has 3 apples."])
    question = "A baker sells cupcakes for $2 each and sold 30 on Monday. How much money did she make?"
    e = encoder.encode([question])[0]
    ranked = [h.id for h in gsm8k_index.search(te.query(e), 40)]
    helpful = ranked[15:18]  # ranked 16th to 18th before feedback
    others = [i for i in ranked if i not in helpful]
    k = 5
    assert not set(helpful) & {h.id for h in gsm8k_index.search(te.query(e), k)}
    report = te.update(_fb(e[None], [gsm8k_index.vectors(helpful)], [gsm8k_index.vectors(others)]))
    assert report.accepted and report.loss_after < report.loss_before
    top = [h.id for h in gsm8k_index.search(te.query(e), k)]
    assert set(helpful) <= set(top)
    assert te.version == 1


def test_update_is_pulled_back_towards_the_initial_weights(gsm8k_index, encoder):
    e = encoder.encode(["How many marbles does Sam have left?"])[0]
    ranked = [h.id for h in gsm8k_index.search(e, 30)]
    pos, neg = gsm8k_index.vectors(ranked[20:22]), gsm8k_index.vectors(ranked[:10])
    drift = {}
    for l2 in (0.0, 10.0):
        te = TaskEmbedding("t", e, encoder_name=encoder.name)
        te.update(_fb(e[None], [pos], [neg]), l2_to_init=l2, retrieval_steps=40)
        drift[l2] = float(np.linalg.norm(te.w.numpy() - te.w_init.numpy()))
    assert drift[10.0] < 0.5 * drift[0.0]


def test_update_that_does_not_help_is_not_accepted():
    te = TaskEmbedding("t", np.ones(4, dtype=np.float32), encoder_name="demo")
    v = np.eye(4, dtype=np.float32)
    report = te.update(_fb(v[:1], [v[:1]], [np.zeros((0, 4), dtype=np.float32)]), retrieval_steps=5)
    # a lone positive with no negatives has zero contrastive loss: nothing to gain
    assert not report.accepted and te.version == 0


def test_bad_feedback_is_refused():
    te = TaskEmbedding("t", np.ones(4, dtype=np.float32), encoder_name="demo")
    v = np.eye(4, dtype=np.float32)
    with pytest.raises(DetotError, match="needs feedback with positives"):
        te.update(_fb(v[:1], [np.zeros((0, 4))], [v[1:2]]))
    with pytest.raises(DetotError, match="positives hold NaN or inf"):
        te.update(_fb(v[:1], [np.full((1, 4), np.nan)], [v[1:2]]))
    with pytest.raises(DetotError, match="everything this feedback could train is frozen"):
        te.update(_fb(v[:1], [v[1:2]], [v[2:3]]), freeze=["retrieval"])
    with pytest.raises(ConfigError, match="retrieval_steps"):
        te.update(_fb(v[:1], [v[1:2]], [v[2:3]]), retrieval_steps=0)
    assert te.version == 0


def test_save_load_round_trip_is_exact(tmp_path, encoder):
    te = TaskEmbedding.from_description("arith", "math", encoder=encoder)
    v = encoder.encode(["one", "two", "three"])
    te.update(_fb(v[:1], [v[1:2]], [v[2:3]]))
    te.save(tmp_path / "te")
    back = TaskEmbedding.load(tmp_path / "te", encoder_name=encoder.name)
    assert back.version == te.version
    assert np.array_equal(back.query(v), te.query(v))
    with pytest.raises(ArtefactError, match="field 'encoder' is 'all-MiniLM-L6-v2', but this program uses 'other'"):
        TaskEmbedding.load(tmp_path / "te", encoder_name="other")


def test_deepcopy_is_independent():
    te = TaskEmbedding("t", np.ones(4, dtype=np.float32), encoder_name="demo")
    clone = copy.deepcopy(te)
    v = np.eye(4, dtype=np.float32)
    assert clone.update(_fb(v[:1], [v[1:2]], [v[:1]])).accepted
    assert clone.version == 1 and te.version == 0
    assert not np.array_equal(clone.w.numpy(), te.w.numpy())


def test_corrupted_tensor_file_is_refused(tmp_path):
    te = TaskEmbedding("t", np.ones(4, dtype=np.float32), encoder_name="demo")
    te.save(tmp_path / "te")
    f = tmp_path / "te" / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ArtefactError, match="does not match its checksum"):
        TaskEmbedding.load(tmp_path / "te")
