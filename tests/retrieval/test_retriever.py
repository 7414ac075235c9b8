"""TaskRetriever in DSPy: direct calls, dspy.Retrieve, feedback, deepcopy, save/load."""

from __future__ import annotations

import copy

import dspy
import pytest

from detot_agent.errors import ArtefactError, IndexDataError
from detot_agent.retrieval.index import ExemplarIndex
from detot_agent.retrieval.retriever import TaskRetriever

PASSAGES = {
    "p-faiss": "FAISS searches dense vectors with exact or approximate indexes.",
    "p-dspy": "DSPy programs are built from modules such as Predict and ChainOfThought.",
    "p-peft": "PEFT prompt tuning learns soft prompt vectors while the model stays frozen.",
    "p-ray": "Ray schedules tasks and actors across the machines of a cluster.",
    "p-cats": "Cats sleep for most of the day and hunt at dusk.",
    "p-tea": "Green tea is brewed with water below boiling point.",
}


@pytest.fixture
def retriever(encoder) -> TaskRetriever:
    index = ExemplarIndex(encoder)
    index.add([{"id": i, "text": t, "fields": {"topic": "ml" if i in {"p-faiss", "p-dspy", "p-peft", "p-ray"}
                                                else "life"}} for i, t in PASSAGES.items()])
    return TaskRetriever(index, k=2)


class RAG(dspy.Module):
    def __init__(self, retriever: TaskRetriever) -> None:
        super().__init__()
        self.retrieve = retriever
        self.answer = dspy.Predict("context, question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        context = self.retrieve(question).passages
        return self.answer(context=context, question=question)


def test_direct_call_returns_passages_ids_scores(retriever):
    out = retriever("How do I search vectors approximately?")
    assert out.ids[0] == "p-faiss" and len(out.passages) == 2 and out.scores[0] >= out.scores[1]
    assert set(retriever("vectors", k=4, where={"topic": "life"}).ids) == {"p-cats", "p-tea"}


def test_works_as_dspy_rm_for_retrieve(retriever):
    with dspy.context(rm=retriever):
        got = dspy.Retrieve(k=1)("Which library trains soft prompts?")
    assert got.passages == [PASSAGES["p-peft"]]


def test_feedback_adapts_ranking(retriever):
    q = "distributed computing for machine learning"
    before = retriever(q, k=6).ids
    target = before[-2]  # nearly last before feedback
    report = retriever.feedback(q, [target])
    assert report.accepted and retriever.task_embedding.version == 1
    assert retriever(q, k=2).ids[0] == target


def test_module_survives_deepcopy_save_and_load(retriever, tmp_path):
    program = RAG(retriever)
    retriever.feedback("soft prompts", ["p-peft"], ["p-faiss", "p-dspy"])
    clone = copy.deepcopy(program)
    assert clone.retrieve.index is program.retrieve.index  # the FAISS index is shared, not copied
    assert clone.retrieve.task_embedding is not program.retrieve.task_embedding
    assert dict(program.named_parameters())["retrieve"] is retriever
    path = tmp_path / "rag.json"
    program.save(str(path))
    fresh = RAG(TaskRetriever(retriever.index, k=5))
    fresh.load(str(path))
    assert fresh.retrieve.k == 2 and fresh.retrieve.task_embedding.version == 1
    q = "tuning prompts without touching weights"
    assert fresh.retrieve(q).ids == program.retrieve(q).ids
    assert fresh.retrieve(q).scores == pytest.approx(program.retrieve(q).scores)
    reset = program.reset_copy()  # what optimizers do
    assert reset.retrieve.index is retriever.index


def test_inside_an_optimizer_style_copy_and_program_run(retriever):
    lm = dspy.utils.DummyLM([{"answer": "FAISS"}])
    with dspy.context(lm=lm):
        out = RAG(retriever).deepcopy()(question="vector search library?")
    assert out.answer == "FAISS"


def test_bad_queries_and_mismatched_state(retriever, encoder):
    with pytest.raises(IndexDataError, match="non-empty string"):
        retriever("   ")
    with pytest.raises(IndexDataError, match="at least one helpful id"):
        retriever.feedback("q", [])
    with pytest.raises(IndexDataError, match="not in the index"):
        retriever.feedback("q", ["nope"])
    other = ExemplarIndex(encoder_name="other", dim=384)
    state = retriever.dump_state()
    with pytest.raises(IndexDataError, match="needs an index with an encoder"):
        TaskRetriever(other)
    state["index"]["encoder"] = "other"
    with pytest.raises(ArtefactError, match="built for encoder 'other'"):
        retriever.load_state(state)
