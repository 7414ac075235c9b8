"""DETOT as a DSPy module: voting, adaptive stopping, triggers, concurrency, save/load, Evaluate."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading

import dspy
import pytest
import torch
from scripted import scripted_lm, scripted_local_lm

from detot_agent import DETOT, LocalEngine, TaskProfile, analyze, local_lm
from detot_agent.answers import extract_number
from detot_agent.detot.adapters import PlainAdapter
from detot_agent.detot.controller import ControllerConfig, TaskState
from detot_agent.embedding.update import TrainingItem
from detot_agent.errors import ArtefactError, ConfigError, DetotError

ARITH = TaskProfile(name="arith", description="grade-school math word problems", kind="arithmetic",
                    answer_format="number")
Q = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def make(index, lm, **adj):
    return DETOT("question -> answer", task=ARITH, index=index, lm=lm, background=False,
                 adjustments=analyze(ARITH, **adj) if adj else None)


def test_easy_input_uses_fewer_samples_under_beta_than_fixed(gsm8k_index):
    lm, engine = scripted_lm(lambda text, n: "7")
    beta = make(gsm8k_index, lm, stopping="beta", max_samples=8)(question=Q)
    fixed = make(gsm8k_index, lm, stopping="fixed", max_samples=8)(question=Q)
    assert (beta.answer, beta.agreement, beta.samples_used) == ("7", 1.0, 4)
    assert fixed.samples_used == 8 and fixed.votes == {"7": 8.0}
    assert engine.calls == 12


def test_votes_normalise_and_the_majority_wins(gsm8k_index):
    script = ["7", "The answer is 7 apples.", "8", "$7.00", "8", "7"]
    lm, _ = scripted_lm(lambda text, n: script[n % len(script)])
    pred = make(gsm8k_index, lm, stopping="fixed", max_samples=6)(question=Q)
    assert pred.answer_key == "7" and pred.votes == {"7": 4.0, "8": 2.0}
    assert pred.agreement == pytest.approx(4 / 6) and pred.reasoning.startswith("step")


def test_no_parseable_sample_says_so(gsm8k_index):
    lm, _ = scripted_lm(lambda text, n: None)
    pred = make(gsm8k_index, lm, max_samples=4)(question=Q)
    assert pred.answer is None and pred.answer_key is None
    assert pred.parse_failures == 4 and pred.samples_used == 4 and "none of 4 samples" in pred.reason


def test_retrieved_demos_reach_the_prompt(gsm8k_index):
    lm, engine = scripted_lm(lambda text, n: "7")
    pred = make(gsm8k_index, lm, k_exemplars=2)(question=Q)
    assert len(pred.demo_ids) == 2
    demo_question = gsm8k_index.get(pred.demo_ids[0]).fields["question"]
    assert demo_question in engine.prompts[0]
    assert pred.embedding_version == 0


def test_prompt_is_what_a_call_shows_and_never_holds_the_input_itself(gsm8k_index, long_tiny_model_dir):
    lm, _ = scripted_local_lm(long_tiny_model_dir, lambda text, n: "7", plain=True)
    detot = DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=lm, background=False, adapter=PlainAdapter(),
                  soft_prompt=False, adjustments=analyze(ARITH, stopping="fixed", max_samples=2, k_exemplars=3))
    shown = detot.prompt(question=Q)
    detot(question=Q)
    assert shown == detot.controller.evidence()[0].messages  # the messages the call sent, nothing generated
    assert [m["role"] for m in shown] == ["user", "assistant"] * 3 + ["user"]
    # an indexed question: its own exemplar (the nearest) is never a demo, as in a call
    own = gsm8k_index.get("train:1").fields["question"]
    demos = [m["content"] for m in detot.prompt(question=own)[:-1:2]]
    assert len(demos) == 3 and not any(own in d for d in demos)
    nearest = gsm8k_index.search(detot.task_embedding.query(detot.encoder.encode([own])[0]), 1)[0]
    assert nearest.text == own  # so the exclusion was needed
    without = DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=lm, background=False,
                    adapter=PlainAdapter(), adjustments=analyze(ARITH, k_exemplars=0))
    assert without.prompt(question=Q) == [{"role": "user", "content": f"{Q}\nLet's think step by step."}]
    with pytest.raises(DetotError, match="missing input field"):
        detot.prompt(text=Q)


def test_trigger_fires_on_falling_agreement(gsm8k_index):
    lm, _ = scripted_lm(lambda text, n: str(n))  # every sample disagrees
    detot = make(gsm8k_index, lm, max_samples=2, min_count=3, window=3, cooldown=5)
    for i in range(3):
        detot(question=f"{Q} ({i})")
    triggers = [e for e in detot.monitor.events if e["event"] == "trigger"]
    assert len(triggers) == 1 and "agreement 0.50 < 0.60" in triggers[0]["reason"]
    event = detot.reoptimize()
    assert not event.accepted  # three records of evidence are too few
    for i in range(3):
        detot(question=f"{Q} (again {i})")
    assert len([e for e in detot.monitor.events if e["event"] == "trigger"]) == 1  # cooldown holds


def test_feedback_records_accuracy(gsm8k_index):
    lm, _ = scripted_lm(lambda text, n: "7")
    detot = make(gsm8k_index, lm)
    pred = detot(question=Q)
    assert detot.feedback(pred, gold="7.0") is True
    assert detot.feedback(pred, correct=False) is False
    with pytest.raises(DetotError, match="gold= or correct="):
        detot.feedback(pred)


def test_named_predictors_and_deepcopy(gsm8k_index):
    lm, _ = scripted_lm(lambda text, n: "7")
    detot = make(gsm8k_index, lm)
    names = [name for name, _ in detot.named_predictors()]
    assert names == ["predictor.predict"]
    clone = copy.deepcopy(detot)
    assert clone.index is detot.index and clone.encoder is detot.encoder
    assert clone.predictor is not detot.predictor and clone.controller is not detot.controller
    assert clone(question=Q).answer == "7"


def test_save_load_reproduces_predictions(gsm8k_index, tmp_path, encoder):
    lm, _ = scripted_lm(lambda text, n: "7")
    detot = make(gsm8k_index, lm)
    state = detot.controller.state
    emb = copy.deepcopy(state.embedding)
    e = encoder.encode([Q])[0]
    ranked = [h.id for h in gsm8k_index.search(emb.query(e), 20)]
    emb.update([TrainingItem(query=e, positives=gsm8k_index.vectors(ranked[10:13]),
                         negatives=gsm8k_index.vectors(ranked[:10]))])
    emb.version = 1
    detot.controller.publish(TaskState(1, emb))
    detot.predictor.predict.demos = [dspy.Example(question="1+1?", reasoning="1+1=2", answer="2")]
    before = detot(question=Q)
    detot.controller.judgements_spent = 3  # three judgements spent the loop's error budget
    detot.save(tmp_path / "detot.json")
    fresh = make(gsm8k_index, lm)
    assert fresh(question=Q).demo_ids != before.demo_ids
    assert len(fresh.controller.evidence()) == 1  # served at version 0 by the state the load replaces
    fresh.controller.publish(TaskState(1, fresh.controller.state.embedding))  # as a re-optimization would
    fresh.controller.add_evidence(dataclasses.replace(fresh.controller.evidence()[0], id="other", version=1))
    fresh.load(tmp_path / "detot.json")
    # what the replaced state answered is not evidence about the loaded one, though both say version 1
    assert fresh.controller.evidence() == []
    after = fresh(question=Q)
    assert (after.demo_ids, after.answer, after.embedding_version) == (before.demo_ids, before.answer, 1)
    assert fresh.predictor.predict.demos[0]["question"] == "1+1?"
    assert fresh.controller.judgements_spent == 3  # a resumed loop tests on at the fourth alpha, not the first
    assert not (tmp_path / "detot.json.tensors").exists()  # one file: the learned state travels inside it
    saved = json.loads((tmp_path / "detot.json").read_text())
    carried = saved["predictor.predict"]["detot"]["embedding"]
    carried["data"] = carried["data"][:-8] + ("A" * 8 if not carried["data"].endswith("A" * 8) else "B" * 8)
    (tmp_path / "detot.json").write_text(json.dumps(saved))
    with pytest.raises(ArtefactError, match="checksum"):
        make(gsm8k_index, lm).load(tmp_path / "detot.json")


def test_inside_dspy_evaluate_with_four_threads(gsm8k_index):
    answers = {f"Sam has {i} pens and gets 2 more. How many pens?": str(i + 2) for i in range(8)}

    def answer(text: str, n: int) -> str:
        asked = text.split("[[ ## question ## ]]")[-1]  # the last question is the one being asked
        return next(v for k, v in answers.items() if k in asked)

    lm, _ = scripted_lm(answer)
    detot = make(gsm8k_index, lm, max_samples=4)
    devset = [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in answers.items()]

    def metric(example, pred, trace=None):
        return extract_number(str(pred.answer))[0] == example.answer

    result = dspy.Evaluate(devset=devset, metric=metric, num_threads=4, display_progress=False)(detot)
    assert result.score == 100.0
    assert detot.monitor.count == 8


def test_no_torn_reads_under_concurrent_calls_and_reoptimization(gsm8k_index):
    lm, _ = scripted_lm(lambda text, n: "7")
    detot = make(gsm8k_index, lm, max_samples=2)
    base = detot.controller.state.embedding
    seen: list[tuple[int, int, float]] = []
    original = detot._demos

    def spy(state, query, text):
        seen.append((state.version, state.embedding.version, float(state.soft_prompt[0, 0])))
        return original(state, query, text)

    detot._demos = spy
    stop = threading.Event()

    def publisher():
        v = 0
        while not stop.is_set():
            v += 1
            emb = copy.deepcopy(base)
            emb.attach_head(torch.full((2, 4), float(v)), model_id="m")
            emb.version = v
            detot.controller.publish(TaskState(v, emb))

    first = copy.deepcopy(base)
    first.attach_head(torch.zeros(2, 4), model_id="m")
    detot.controller.publish(TaskState(0, first))
    pub = threading.Thread(target=publisher)
    pub.start()
    outs = dspy.Parallel(num_threads=8)([(detot, {"question": f"{Q} #{i}"}) for i in range(48)])
    stop.set()
    pub.join()
    assert len(outs) == 48 and all(o.answer == "7" for o in outs)
    assert len(seen) == 48 and all(v == ev == sp for v, ev, sp in seen)
    assert detot.monitor.count == 48


def test_local_engine_path_end_to_end(gsm8k_index, long_tiny_model_dir):
    engine = LocalEngine(str(long_tiny_model_dir), device="cpu", dtype="float32", max_wait_ms=5)
    lm = local_lm(engine=engine, cache=False)
    detot = DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=lm, background=False,
                  adjustments=analyze(ARITH, max_samples=4, max_tokens=12, k_exemplars=1))
    state = detot.controller.state
    assert state.soft_prompt is not None and state.soft_prompt.shape == (detot.adjustments.soft_prompt_k, 64)
    pred = detot(question="2 plus 2?")
    assert pred.samples_used == 4 and pred.parse_failures + sum(int(v) for v in pred.votes.values()) == 4
    assert pred.tokens > 0 and len(pred.demo_ids) == 1
    assert detot.controller.evidence()[0].messages[0]["role"] == "system"
    engine.close()


@pytest.mark.parametrize("configured", [False, True], ids=["adapter=", "dspy.context(adapter=)"])
def test_plain_adapter_votes_on_stated_answers_with_plain_demos(gsm8k_index, configured):
    script = ["7", "7 apples", None, "8"]  # None: a reply with no answer statement
    lm, engine = scripted_lm(lambda text, n: script[n % len(script)], plain=True)
    detot = DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=lm, background=False,
                  adapter=None if configured else PlainAdapter(),
                  adjustments=analyze(ARITH, stopping="fixed", max_samples=4, k_exemplars=2))
    with dspy.context(adapter=PlainAdapter() if configured else None):
        pred = detot(question=Q)
    assert pred.answer_key == "7" and pred.votes == {"7": 2.0, "8": 1.0} and pred.parse_failures == 1
    assert pred.reasoning.startswith("step")
    prompt = engine.prompts[0]
    assert "[[ ##" not in prompt and prompt.rstrip().endswith("Let's think step by step.")
    rationale = gsm8k_index.get(pred.demo_ids[0]).fields["rationale"]
    assert rationale in prompt  # the demo's worked answer is the assistant's turn, as written


def test_plain_adapter_on_the_local_engine_prompts_without_markers_or_stop(gsm8k_index, long_tiny_model_dir):
    engine = LocalEngine(str(long_tiny_model_dir), device="cpu", dtype="float32", max_wait_ms=5)
    lm = local_lm(engine=engine, cache=False)
    detot = DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=lm, background=False, adapter=PlainAdapter(),
                  adjustments=analyze(ARITH, max_samples=2, max_tokens=8, k_exemplars=1))
    seen = []
    sample = engine.sample
    engine.sample = lambda request, n, **kw: seen.append(request) or sample(request, n, **kw)  # observe, then serve
    pred = detot(question="2 plus 2?")
    messages = detot.controller.evidence()[0].messages
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert not any("[[ ##" in m["content"] for m in messages)
    assert seen and all(r.config.stop == () and r.system is None for r in seen)
    assert pred.samples_used == 2
    engine.close()


def test_bad_inputs(gsm8k_index):
    lm, _ = scripted_lm(lambda text, n: "7")
    detot = make(gsm8k_index, lm)
    with pytest.raises(DetotError, match="missing input field"):
        detot(query=Q)
    with pytest.raises(DetotError, match="empty or whitespace"):
        detot(question="   ")
    bare = DETOT("question -> answer", task=ARITH, index=gsm8k_index, background=False)
    with dspy.context(lm=None), pytest.raises(DetotError, match="no LM"):
        bare(question=Q)
    assert ControllerConfig().min_evidence >= 1


def test_bad_inputs_raise_the_request_error_family(gsm8k_index):
    from detot_agent.errors import ConfigError, EmptyPromptError, InvalidRequestError

    lm, _ = scripted_lm(lambda text, n: "7")
    detot = make(gsm8k_index, lm)
    with pytest.raises(InvalidRequestError):
        detot(query=Q)
    with pytest.raises(EmptyPromptError):
        detot(question="\n\t ")
    with pytest.raises(InvalidRequestError, match="gold= or correct="):
        detot.feedback(detot(question=Q))
    with pytest.raises(ConfigError, match="ControllerConfig"):
        DETOT("question -> answer", task=ARITH, index=gsm8k_index, controller_config={"margin": 0})


def test_detot_serves_through_llama_cpp_and_trains_through_a_lazily_loaded_torch_engine(gsm8k_index, tiny_gguf):
    import numpy as np

    from detot_agent import LlamaCppEngine
    from detot_agent.detot.records import Evidence

    engine = LlamaCppEngine(str(tiny_gguf), max_wait_ms=5)
    detot = DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=local_lm(engine=engine, cache=False),
                  background=False, adapter=PlainAdapter(),
                  adjustments=analyze(ARITH, max_samples=2, max_tokens=8, k_exemplars=1),
                  controller_config=ControllerConfig(
                      min_evidence=6, margin=0.0,
                      update={"steps": 25, "retrieval_steps": 40, "head_lr": 0.05, "dropout": 0.0}))
    trainer = detot.controller.engine
    assert detot.controller.state.soft_prompt.shape == (detot.adjustments.soft_prompt_k, 64)  # from the GGUF table
    pred = detot(question="2 plus 2?")
    assert pred.samples_used == 2 and pred.embedding_version == 0
    assert not trainer.loaded  # serving never loads the torch engine
    rng = np.random.default_rng(0)
    for i in range(9):
        detot.controller.add_evidence(Evidence(
            id=f"e{i}", query=rng.standard_normal(384).astype(np.float32), demo_ids=[], agreement=1.0,
            messages=[{"role": "user", "content": f"Tom has {i} apples and buys 2 more. How many?"}],
            target="The answer is 5.", inputs={"question": f"Tom has {i} apples and buys 2 more. How many?"}))
    event = detot.reoptimize()
    # the head trained through the lazily loaded torch engine; the candidate was then judged by replay
    assert trainer.loaded and event.verdicts and event.verdicts[0]["part"] == "replay", event.reason
    candidate = copy.deepcopy(detot.controller.state.embedding)
    candidate.head.set(p0=candidate.head.p0 + 0.5)
    detot.controller.publish(TaskState(1, candidate))
    assert detot(question="2 plus 2?").embedding_version == 1  # a published prompt serves through llama.cpp
    engine.close()


def test_a_given_task_embedding_is_served_and_shared(gsm8k_index, encoder, long_tiny_model_dir):
    from detot_agent import TaskRetriever
    from detot_agent.embedding.task_embedding import TaskEmbedding

    engine = LocalEngine(str(long_tiny_model_dir), device="cpu", dtype="float32", max_wait_ms=5)
    lm = local_lm(engine=engine, cache=False)
    te = TaskEmbedding.from_description("arith", "math word problems", encoder=encoder)
    te.attach_head(torch.randn(3, 64), components=2, model_id="tiny")
    detot = DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=lm, background=False, task_embedding=te,
                  adjustments=analyze(ARITH, max_samples=2, max_tokens=4, k_exemplars=1))
    assert detot.task_embedding is te and te.head.components == 2
    retriever = TaskRetriever(gsm8k_index, detot.task_embedding, k=1)
    q = "Tom has 3 apples and buys 4 more. How many?"
    assert retriever(q).ids == detot(question=q).demo_ids  # one object drives both
    with pytest.raises(ConfigError, match="already has a soft-prompt head"):
        DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=lm, task_embedding=te,
              soft_prompt=torch.zeros(3, 64))
    wide = TaskEmbedding.from_description("arith", "math", encoder=encoder)
    wide.attach_head(torch.zeros(3, 896), model_id="other")
    with pytest.raises(ConfigError, match="896 wide, the model's hidden size is 64"):
        DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=lm, task_embedding=wide)
    engine.close()


def test_an_index_whose_exemplars_lack_the_answer_field_is_refused_when_built(encoder):
    from detot_agent import ExemplarIndex

    index = ExemplarIndex(encoder)
    index.add([{"id": f"r{i}", "text": t, "fields": {"review": t, "label": lab}}
               for i, (t, lab) in enumerate([("Great food.", "positive"), ("Cold soup.", "negative")])])
    lm, engine = scripted_lm(lambda text, n: "positive")
    task = TaskProfile(name="s", description="sentiment", kind="classification", answer_format="label",
                       labels=["positive", "negative"])
    with pytest.raises(ConfigError, match=r"no 'answer' field \(they have \['label', 'review'\]\)"):
        DETOT("question -> answer", task=task, index=index, lm=lm, background=False)
    # mapped onto the fields the exemplars have, the answers reach the prompt
    detot = DETOT("question -> answer", task=task, index=index, lm=lm, background=False,
                  demo_fields={"question": "review", "answer": "label"})
    assert detot(question="Lovely staff.").answer == "positive"
    assert "negative" in engine.prompts[0] and "positive" in engine.prompts[0]
    # no demos asked for: nothing to check (a RAG answerer over passages)
    DETOT("question -> answer", task=task, index=index, lm=lm, background=False,
          adjustments=analyze(task, k_exemplars=0))


def test_a_detot_without_demos_needs_no_index_and_one_with_demos_is_refused_without(encoder, tmp_path):
    lm, _engine = scripted_lm(lambda text, n: "positive")
    task = TaskProfile(name="s", description="sentiment", kind="classification", answer_format="label",
                       labels=["positive", "negative"])
    bare = DETOT("question -> answer", task=task, encoder=encoder, lm=lm, background=False,
                 adjustments=analyze(task, k_exemplars=0))
    pred = bare(question="Lovely staff.")
    assert pred.answer == "positive" and pred.demo_ids == []
    bare.save(tmp_path / "bare.json")  # and its state loads into another index-free DETOT
    DETOT("question -> answer", task=task, encoder=encoder, lm=lm, background=False,
          adjustments=analyze(task, k_exemplars=0)).load(tmp_path / "bare.json")
    with pytest.raises(ConfigError, match="k_exemplars = 2 retrieves demos: pass index="):
        DETOT("question -> answer", task=task, encoder=encoder, lm=lm, adjustments=analyze(task, k_exemplars=2))
    with pytest.raises(ConfigError, match="DETOT needs an encoder"):
        DETOT("question -> answer", task=task, lm=lm, adjustments=analyze(task, k_exemplars=0))


def test_a_label_tasks_plain_prompt_lists_its_labels_only_when_the_adapter_has_them(gsm8k_index):
    sentiment = TaskProfile(name="sentiment", description="Is the review positive or negative?", kind="classification",
                            answer_format="label", labels=["positive", "negative"], complexity=0.1)
    listed = "Reply with: The answer is one of: positive, negative."
    for adapter, cue in [(PlainAdapter(labels=sentiment.labels), listed),
                         (PlainAdapter(), "Reply with: The answer is <answer>.")]:  # not added by DETOT itself
        lm, engine = scripted_lm(lambda text, n: "positive", plain=True)
        detot = DETOT("question -> answer", task=sentiment, index=gsm8k_index, lm=lm, background=False, adapter=adapter,
                      adjustments=analyze(sentiment, stopping="fixed", max_samples=2, k_exemplars=0))
        pred = detot(question="The soup was warm and tasty.")
        assert engine.prompts[0].rstrip().endswith(cue), engine.prompts
        assert pred.answer_key == "positive" and pred.samples_used == 2


def test_a_program_saved_by_0_3_with_its_side_folder_still_loads(tmp_path, gsm8k_index):
    """0.3 wrote a top-level `detot` block and the tensors in `p.json.tensors/`; 0.4 writes one file."""
    from detot_agent.detot.persistence import TENSORS_KIND, detot_block
    from detot_agent.detot.task import Policy
    from detot_agent.io.persist import save_tensors

    lm, _ = scripted_lm(lambda text, n: "7")
    detot = make(gsm8k_index, lm)
    st = detot.controller.state
    emb = copy.deepcopy(st.embedding)
    emb.w = emb.w * 1.5
    detot.controller.publish(TaskState(4, emb, Policy(weighting="cisc")))
    detot.controller.judgements_spent = 2
    state = detot.dump_state()
    for part in state.values():
        part.pop("detot", None)  # no carried block: the 0.3 layout
    state["detot"] = detot_block(detot.task, detot.adjustments, detot.controller.state, detot.index,
                                 detot.monitor.stats(), detot.controller.judgements_spent)
    state["detot"]["tests_run"] = state["detot"].pop("judgements_spent")  # 0.3's key for the spent budget
    state["metadata"] = {"dependency_versions": {}}  # as DSPy writes it
    (tmp_path / "old.json").write_text(json.dumps(state))
    meta, tensors = detot.controller.state.embedding.to_tensors()  # 0.3's side folder, as it wrote it
    save_tensors(tmp_path / "old.json.tensors", kind=TENSORS_KIND, version=2,
                 meta={"version": 4, "embedding": meta}, tensors={f"embedding.{k}": v for k, v in tensors.items()})
    fresh = make(gsm8k_index, lm).load(tmp_path / "old.json")
    loaded = fresh.controller.state
    assert (loaded.version, loaded.policy, fresh.controller.judgements_spent) == (4, Policy(weighting="cisc"), 2)
    assert torch.equal(loaded.embedding.w, emb.w)


def test_a_policy_from_the_fit_space_changes_demos_and_temperature_of_the_calls(gsm8k_index):
    """`Policy(k_exemplars=..., temperature=...)` (the loop's candidates from `detot fit`'s space) is what a call
    under that state retrieves and samples with; the task's own adjustments are untouched."""
    from detot_agent.detot.task import Policy

    temps: list[float | None] = []
    lm, engine = scripted_lm(lambda text, n: "7")
    complete = engine.complete

    def recording(request):
        temps.append(request.config.temperature)
        return complete(request)

    engine.complete = recording
    detot = make(gsm8k_index, lm, k_exemplars=2, temperature=0.7, max_samples=2, stopping="fixed")
    before = detot(question=Q)
    assert len(before.demo_ids) == 2 and 0.7 in temps
    st = detot.controller.state
    detot.controller.publish(TaskState(st.version + 1, st.embedding, Policy(k_exemplars=0, temperature=0.2)))
    temps.clear()
    after = detot(question=Q)
    assert after.demo_ids == [] and 0.2 in temps and 0.7 not in temps
    assert detot.adjustments.k_exemplars == 2 and detot.adjustments.temperature == 0.7
