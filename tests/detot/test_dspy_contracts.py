"""DETOT as DSPy users hold it (issue 37): bad inputs refused at build and call time, and the LM it was given is
the one wrappers sample."""

from __future__ import annotations

import dspy
import pytest
from scripted import scripted_lm

from detot_agent import DETOT, PlainAdapter, TaskProfile, analyze
from detot_agent.errors import ConfigError, InputTypeError, InvalidRequestError

ARITH = TaskProfile(name="arith", description="grade-school math word problems", kind="arithmetic",
                    answer_format="number")
Q = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def _detot(index, lm, **kw):
    return DETOT("question -> answer", task=ARITH, index=index, lm=lm, background=False,
                 adjustments=analyze(ARITH, stopping="fixed", max_samples=2), **kw)


def test_none_non_text_and_positional_inputs_are_refused_with_the_fix(gsm8k_index):
    lm, engine = scripted_lm(lambda text, n: "7")
    detot = _detot(gsm8k_index, lm)
    with pytest.raises(InvalidRequestError, match="input field 'question' is None"):
        detot(question=None)
    with pytest.raises(InputTypeError, match="input field 'question' takes text, got int"):
        detot(question=42)
    with pytest.raises(InvalidRequestError, match=r"takes its inputs by name.*detot\(question=\.\.\.\)"):
        detot(Q)
    assert engine.calls == 0  # refused before any sampling
    assert detot(question=Q).answer == "7"  # and a good call still works


def test_a_signature_plain_prompts_cannot_serve_is_refused_when_built(gsm8k_index):
    lm, _ = scripted_lm(lambda text, n: "7")
    with pytest.raises(ConfigError, match="PlainAdapter serves signatures with one answer field"):
        DETOT("question -> answer, unit", task=ARITH, index=gsm8k_index, lm=lm, background=False,
              adapter=PlainAdapter())
    DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=lm, background=False, adapter=PlainAdapter())


def test_get_lm_is_detots_own_and_best_of_n_samples_it_not_the_global_lm(gsm8k_index):
    own, own_engine = scripted_lm(lambda text, n: "7")
    other, other_engine = scripted_lm(lambda text, n: "9")
    detot = _detot(gsm8k_index, own)
    assert detot.get_lm() is own
    assert _detot(gsm8k_index, None).get_lm() is None  # nothing given: a call uses dspy.settings.lm
    best = dspy.BestOfN(module=detot, N=2, reward_fn=lambda args, pred: 1.0 if pred.answer else 0.0, threshold=1.0)
    with dspy.context(lm=other):
        pred = best(question=Q)
    assert pred.answer == "7"
    assert own_engine.calls > 0 and other_engine.calls == 0  # the global LM was never called


def test_refine_samples_detots_lm_and_its_hint_reaches_detots_prompt(gsm8k_index):
    """dspy.Refine appends its advice as a `hint_` input inside its adapter's `__call__`; DETOT, which formats
    instead of letting the adapter call an LM, shows it too. The advice itself is DSPy's own call, on the
    global LM (Refine's design); every DETOT sample goes to DETOT's LM."""
    import json

    from scripted import filling_lm

    hint = "Count the apples Tom buys as well."
    own, own_engine = scripted_lm(lambda text, n: "7" if hint in text else "5")
    detot = _detot(gsm8k_index, own)
    names = [name for name, _ in detot.named_predictors()]
    advisor, advisor_engine = filling_lm(lambda field: json.dumps({n: hint for n in names}) if field == "advice"
                                         else "the answer missed the bought apples")
    refine = dspy.Refine(module=detot, N=3, reward_fn=lambda args, pred: float(pred.answer == "7"), threshold=1.0)
    with dspy.context(lm=advisor):
        pred = refine(question=Q)
    assert pred.answer == "7"
    assert any(hint in p for p in own_engine.prompts)  # the second attempt's prompt carried the hint
    assert not any(hint in p for p in own_engine.prompts[:2])  # the first (two samples) did not
    # the global LM only ever answered Refine's own advice request, never a DETOT sample
    assert advisor_engine.calls >= 1 and all("`advice`" in p for p in advisor_engine.prompts)


def test_a_stream_listener_on_answer_receives_chunks_before_the_prediction(gsm8k_index):
    from dspy.streaming import StreamListener, StreamResponse

    own, engine = scripted_lm(lambda text, n: "7")
    detot = _detot(gsm8k_index, own)
    fields = list(next(p for _, p in detot.named_predictors()).signature.output_fields)
    listeners = [StreamListener(signature_field_name=name) for name in fields]
    streamed = dspy.streamify(detot, stream_listeners=listeners, async_streaming=False)
    out = list(streamed(question=Q))
    chunks = [o for o in out if isinstance(o, StreamResponse)]
    (pred,) = [o for o in out if isinstance(o, dspy.Prediction)]
    assert out[-1] is pred and pred.answer == "7" and engine.calls >= 1  # every chunk came before the prediction
    answer = [c for c in chunks if c.signature_field_name == "answer"]
    assert "".join(c.chunk for c in answer) == "7" and [c.is_last_chunk for c in answer] == [True]
    # one message per field: the samples' own LM streams were not passed on as the answer
    assert sum(c.is_last_chunk for c in chunks) == len(fields)
    if "reasoning" in fields:
        assert "".join(c.chunk for c in chunks if c.signature_field_name == "reasoning") == pred.reasoning
    plain = list(dspy.streamify(detot, async_streaming=False)(question=Q + " "))  # no listener: the prediction only
    assert not [o for o in plain if isinstance(o, StreamResponse)]


def test_an_lm_of_another_width_than_the_soft_prompt_gets_an_error_that_says_what_to_do(gsm8k_index,
                                                                                          tiny_model_dir):
    import torch

    from detot_agent import LocalEngine, TaskEmbedding, local_lm
    from detot_agent.errors import SoftPromptError

    te = TaskEmbedding.from_description("arith", "math word problems", encoder=gsm8k_index.encoder)
    te.attach_head(torch.zeros(4, 32), model_id="a-32-wide-model")  # made for another model
    detot = DETOT("question -> answer", task=ARITH, index=gsm8k_index, task_embedding=te, background=False,
                  adjustments=analyze(ARITH, stopping="fixed", max_samples=2, max_tokens=4))
    engine = LocalEngine(str(tiny_model_dir), device="cpu", dtype="float32", dynamic_batching=False)
    with dspy.context(lm=local_lm(engine=engine, cache=False)), pytest.raises(
            SoftPromptError, match=r"soft prompts are 32 wide, made for another model; the LM in use .* has hidden "
                                   r"size 64: .*detot tune.*soft_prompt=False"):
        detot(question=Q)


def test_acall_runs_on_the_event_loop_batches_in_the_engine_and_answers_as_call_does(gsm8k_index,
                                                                                      long_tiny_model_dir):
    import asyncio
    import threading

    from scripted import scripted_local_lm

    questions = [f"Sam has {i} pens and gets 2 more. How many pens?" for i in range(16)]
    lm, engine = scripted_local_lm(long_tiny_model_dir, lambda text, n: str(7 + len(text) % 3), plain=True)
    engine.config.dynamic_batching = True
    engine.config.max_wait_ms = 200.0
    detot = DETOT("question -> answer", task=ARITH, index=gsm8k_index, lm=lm, background=False,
                  adapter=PlainAdapter(), soft_prompt=False,
                  adjustments=analyze(ARITH, stopping="fixed", max_samples=2, k_exemplars=0))
    sync = [detot(question=q) for q in questions]
    sync_rows = len(engine.rows)

    class Where(dspy.utils.callback.BaseCallback):  # the thread each engine round starts on
        def __init__(self):
            self.threads = []

        def on_lm_start(self, call_id, instance, inputs):
            self.threads.append(threading.get_ident())

    where = Where()

    async def all_at_once():
        loop_thread = threading.get_ident()
        with dspy.context(callbacks=[where]):
            preds = await asyncio.gather(*(detot.acall(question=q) for q in questions))
        return preds, loop_thread

    before = dict(engine.batch_stats)
    together, loop_thread = asyncio.run(all_at_once())
    assert [(p.answer, p.votes) for p in together] == [(p.answer, p.votes) for p in sync]
    assert len(where.threads) == len(questions) and set(where.threads) == {loop_thread}  # on the event loop
    assert len(engine.rows) - sync_rows == len(questions)  # one round of two samples per question
    assert engine.batch_stats["largest"] > 1 and engine.batch_stats != before  # decoded together
    assert len(lm.history) >= len(questions)  # recorded on the LM as calls, as the sync path records them


def test_the_same_call_under_the_same_state_is_answered_from_dspys_cache(gsm8k_index, long_tiny_model_dir):
    import copy
    import uuid

    import torch
    from scripted import ScriptedLocalEngine

    from detot_agent import local_lm
    from detot_agent.detot.records import TaskState

    engine = ScriptedLocalEngine(long_tiny_model_dir, lambda text, n: "7", plain=True)
    task = TaskProfile(name=f"cached-{uuid.uuid4().hex[:8]}", kind="arithmetic", answer_format="number")
    adj = analyze(task, stopping="fixed", max_samples=2, k_exemplars=1)
    cached_lm = local_lm(engine=engine)  # DSPy's default: cache=True
    detot = DETOT("question -> answer", task=task, index=gsm8k_index, lm=cached_lm, background=False,
                  adapter=PlainAdapter(), adjustments=adj)
    first = detot(question=Q)
    calls = engine.calls
    second = detot(question=Q)
    assert engine.calls == calls and second.from_cache and not first.from_cache  # nothing sampled
    assert (second.answer, second.votes, second.demo_ids) == (first.answer, first.votes, first.demo_ids)
    assert second.id != first.id and len(detot.controller.evidence()) == 1  # not new evidence
    detot(question=Q + " Think twice.")  # other inputs: sampled
    assert engine.calls > calls
    calls = engine.calls
    st = detot.controller.state  # a new serving version misses, and so does a changed embedding
    emb = copy.deepcopy(st.embedding)
    emb.head.set(p0=emb.head.p0 + 0.1 * torch.ones_like(emb.head.p0))
    detot.controller.publish(TaskState(st.version + 1, emb, st.policy))
    assert not detot(question=Q).from_cache and engine.calls > calls
    calls = engine.calls
    detot.set_lm(cached_lm.copy(rollout_id=7))  # a new seed for the samples: another key
    assert not detot(question=Q).from_cache and engine.calls > calls
    uncached = DETOT("question -> answer", task=task, index=gsm8k_index, lm=local_lm(engine=engine, cache=False),
                     background=False, adapter=PlainAdapter(), adjustments=adj)
    calls = engine.calls
    uncached(question=Q)
    uncached(question=Q)
    assert engine.calls == calls + 4  # an LM that does not cache: every call samples (2 samples each)
