"""`DETOT`: the DSPy module users compose (ARCHITECTURE.md, "One DETOT call").

One call: encode the input, adapt the query with the task embedding, retrieve
demos (MMR), sample answers in rounds until the stopping rule is satisfied
(local or vLLM engine: one batched `sample` per round with the task's soft prompt;
any other `dspy.LM`: one rollout per sample), normalise and vote, report to the
monitor, and let the controller re-optimize in the background when triggered.

Example:
    >>> import dspy
    >>> from detot_agent import DETOT, Encoder, ExemplarIndex, TaskProfile, local_lm
    >>> enc = Encoder()                                                     # doctest: +SKIP
    >>> index = ExemplarIndex(enc); index.add(read_exemplars("train.jsonl"))  # doctest: +SKIP
    >>> task = TaskProfile(name="arith", description="math word problems", kind="arithmetic",
    ...                    answer_format="number")
    >>> detot = DETOT("question -> answer", task=task, index=index, lm=local_lm())  # doctest: +SKIP
    >>> pred = detot(question="Tom has 3 apples and buys 4 more. How many?")      # doctest: +SKIP
    >>> pred.answer, pred.agreement, pred.samples_used                          # doctest: +SKIP
    ('7', 1.0, 4)
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dspy
import numpy as np
import torch

from detot_agent.answers import extract_number, normalize
from detot_agent.detot import call_cache, drawers
from detot_agent.detot.adapter_messages import shown_messages
from detot_agent.detot.adapters import LenientChatAdapter, PlainAdapter
from detot_agent.detot.assembly import build_task_embedding, canary_items, resolve_index
from detot_agent.detot.controller import Controller, ControllerConfig
from detot_agent.detot.demos import check_demo_fields, prompt_demos, retrieve_demos
from detot_agent.detot.inputs import check_inputs
from detot_agent.detot.judging import Replayed
from detot_agent.detot.monitor import Monitor, Observation
from detot_agent.detot.persistence import CarryingPredict, PersistentModule
from detot_agent.detot.records import Evidence, TaskState
from detot_agent.detot.sampling import vote_steps
from detot_agent.detot.steps import Steps, arun_steps, run_steps
from detot_agent.detot.strategies import pot_messages
from detot_agent.detot.streaming import stream_fields
from detot_agent.detot.task import Adjustments, TaskProfile, analyze
from detot_agent.detot.tracing import record_trace
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.engines.lm import serving_engine, training_engine
from detot_agent.errors import ConfigError, EmptyPromptError, InvalidRequestError, SoftPromptError
from detot_agent.retrieval.encoder import Encoder
from detot_agent.retrieval.index import ExemplarIndex

__all__ = ["DETOT"]


def _trainer(lm: Any) -> Any:
    """What trains the LM's soft prompts: its torch engine, a lazily loaded one for llama.cpp, or None."""
    return training_engine(getattr(lm, "engine", None))


class DETOT(PersistentModule):
    """Dynamic Embeddings with Task-Oriented prompting, as a DSPy module.

    Args:
        signature: a DSPy signature (string or class); its last output field is the voted answer.
        task: the `TaskProfile`.
        index: exemplars to retrieve demos from (fields `question`, `rationale`, `answer` by default); None
            serves without demos (`k_exemplars` must be 0; `encoder` is then required).
        lm: the LM to use (default: `dspy.settings.lm` at call time). A `local_lm` gets batched
            sampling and the task's soft prompt; any other `dspy.LM` is sampled by rollouts. Behind
            llama.cpp, soft prompts are trained by a torch engine on the same file, loaded the first
            time a re-optimization trains.
        encoder: the index's encoder by default.
        adjustments: `Adjustments` (default: `analyze(task, samples)`).
        samples: a few example inputs, for task analysis and the task vector.
        soft_prompt: initial `(k, hidden)` vectors (`P0` of the task embedding's soft-prompt head); with a
            local LM and None, `P0` is initialised from the adjustments' init text; pass `False` to run
            without.
        task_embedding: the task's `TaskEmbedding` to serve (e.g. trained by `detot tune`, or shared with a
            `TaskRetriever`); default: one built from the task description and `samples`. Its head, if it
            has one, supplies the soft prompts (`soft_prompt` must then be None); one without a head gets
            one attached in place (from `soft_prompt`, or initialised as below), so a `TaskRetriever` holding
            it shares the whole object.
        components: `M` for a new soft-prompt head: 0 (default) serves one static prompt `P0`; `M > 0` a
            per-input prompt `P(x) = P0 + sum_m a_m(x) B_m` (the bank starts at zero, so it starts as `P0`
            and the loop learns the rest).
        demo_fields: signature field -> exemplar field for demos; defaults map the first input to
            `question`, `reasoning` to `rationale`, the answer field to `answer`.
        background: re-optimize in a background thread (True) or only when `reoptimize()` is called.
        event_log: JSONL file for the monitor's events.
        evidence_log: JSONL file the loop's evidence buffer is appended to, so a restarted program can
            rebuild it (`controller.restore_evidence()`); None: memory only.
        controller_config: settings of the optimization loop.
        adapter: how prompts are laid out and replies parsed; default: the adapter set with
            `dspy.configure(adapter=...)` / `dspy.context`, else `LenientChatAdapter` (DSPy's field
            layout). `PlainAdapter()` prompts in plain text ("... The answer is N."), which small
            local models follow better, for signatures with one answer field.
        canary: a small labelled set (examples with the input fields and the answer field) that every
            re-optimization replays under the serving state and the candidate: a change is kept only if it
            answers them significantly better (`detot/judging.py`).
    """

    def __init__(
        self,
        signature: str | type[dspy.Signature],
        *,
        task: TaskProfile,
        index: ExemplarIndex | None = None,
        lm: Any = None,
        encoder: Encoder | None = None,
        adjustments: Adjustments | None = None,
        samples: list[str] | None = None,
        soft_prompt: torch.Tensor | bool | None = None,
        task_embedding: TaskEmbedding | None = None,
        components: int = 0,
        demo_fields: dict[str, str] | None = None,
        background: bool = True,
        event_log: str | Path | None = None,
        evidence_log: str | Path | None = None,
        controller_config: ControllerConfig | None = None,
        adapter: dspy.Adapter | None = None,
        canary: list[dspy.Example] | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.adjustments = adjustments or analyze(task, samples or [])
        adj = self.adjustments
        # pot and mix keep ChainOfThought's fields: a program sample's `reasoning` is its program
        self.predictor = (dspy.Predict(signature) if adj.strategy == "direct" else dspy.ChainOfThought(signature))
        # the inner predictor carries the learned state in its DSPy state, so any program's save keeps it
        if adj.strategy == "direct":
            self.predictor = CarryingPredict(self.predictor.signature)
        else:
            self.predictor.predict = CarryingPredict(self.predictor.predict.signature)
        sig = self._signature()
        self.answer_field = list(sig.output_fields)[-1]
        inputs = list(sig.input_fields)
        self.demo_fields = demo_fields or {inputs[0]: "question", "reasoning": "rationale", self.answer_field: "answer"}
        self.index, self.encoder = resolve_index(index, encoder, adj.k_exemplars)
        if adj.k_exemplars > 0:
            check_demo_fields(self.index, self.demo_fields, self.answer_field)
        self.lm = lm
        self.background = background
        if isinstance(adapter, PlainAdapter):
            adapter._answer_field(sig)  # refused now (ConfigError), not at the first call
        self.adapter = adapter
        self._default_adapter = LenientChatAdapter()
        engine = _trainer(lm)
        embedding = build_task_embedding(task_embedding, soft_prompt, components, samples or [], task=task,
                                         adjustments=adj, encoder=self.encoder, index=self.index,
                                         serving=serving_engine(lm), trainer=engine)
        self.monitor = Monitor(adj.monitor_config(), log_path=event_log)
        if controller_config is not None and not isinstance(controller_config, ControllerConfig):
            raise ConfigError(f"controller_config must be a ControllerConfig, got {type(controller_config).__name__}")
        self.canary = canary_items(canary or [], sig, self.answer_field, task, adj)
        self.controller = Controller(TaskState(embedding.version, embedding), index=self.index, monitor=self.monitor,
                                     engine=engine, config=controller_config, k=adj.k_exemplars,
                                     replay=self._replay, canary=self.canary, evidence_log=evidence_log)
        self._rollout = 0
        self._rollout_lock = threading.Lock()
        self._link()

    @property
    def task_embedding(self) -> TaskEmbedding | None:
        """The task embedding now serving (pass it to a `TaskRetriever` to share it)."""
        return self.controller.state.embedding

    # ---- DSPy plumbing -------------------------------------------------------------------------------
    def _signature(self) -> Any:
        return self.predictor.predict.signature if hasattr(self.predictor, "predict") else self.predictor.signature

    def _inner(self) -> dspy.Predict:
        return self.predictor.predict if hasattr(self.predictor, "predict") else self.predictor

    def _start_loop(self, state: TaskState, monitor_config: Any, log_path: Any, config: ControllerConfig,
                    engine: Any) -> None:
        """A fresh monitor and controller serving `state` (for copies and unpickled programs: persistence.py)."""
        self.monitor = Monitor(monitor_config, log_path=log_path)
        self.controller = Controller(state, index=self.index, monitor=self.monitor, engine=engine, config=config,
                                     k=self.adjustments.k_exemplars, replay=self._replay, canary=self.canary)
        self._rollout_lock = threading.Lock()

    def get_lm(self) -> Any:
        """The LM this DETOT was given: one set on its predictor (`set_lm`), else `lm=`; None if neither (a call
        then uses `dspy.settings.lm`). Wrappers such as `dspy.BestOfN` and `dspy.Refine` read it, so they sample
        DETOT's own LM, not the global one."""
        return self._inner().lm or self.lm

    def _lm(self) -> Any:
        """The LM a call uses, by DSPy's rule: one set on the inner predictor (`set_lm`), else `lm=`, else
        `dspy.settings.lm` (`dspy.configure` / `dspy.context`)."""
        return self._inner().lm or self.lm or dspy.settings.lm

    def active_adapter(self) -> dspy.Adapter:
        """The adapter a call uses: `adapter=`, else DSPy's configured one, else `LenientChatAdapter`.
        A task's `labels` are not added to a `PlainAdapter`'s cue by themselves (on the embedded model that
        hurt: README, "The DETOT module"); pass `PlainAdapter(labels=task.labels)` to list them."""
        return self.adapter or dspy.settings.adapter or self._default_adapter

    @property
    def version(self) -> int:
        """Version of the task embedding now serving."""
        return self.controller.state.version

    # ---- one call ------------------------------------------------------------------------------------
    def _checked(self, inputs: dict[str, Any], args: tuple[Any, ...] = ()) -> Any:
        """The signature, once the call's inputs pass `inputs.check_inputs`."""
        sig = self._signature()
        check_inputs(sig, inputs, args)
        return sig

    def _context(self, state: TaskState, text: str) -> tuple[np.ndarray, Any, list[dspy.Example], list[str]]:
        """What one task embedding gives an input under `state`: `(e(x), P(x) or None, demos shown, their ids)`;
        `q(x)` and `P(x)` come from one snapshot."""
        query = self.encoder.encode([text])[0]  # (dim,)
        q, soft, _ = state.embedding.serve(query) if state.embedding is not None else (query, None, 0)
        soft = soft if state.serves_soft_prompt else None  # a policy may serve without the vectors
        retrieved, demo_ids = self._demos(state, q, text)
        return query, soft, self._prompt_demos(retrieved), demo_ids

    def prompt(self, **inputs: Any) -> list[dict[str, Any]]:
        """The chat messages a chain-of-thought call shows the model for `inputs` under the serving state
        (demos retrieved with the task embedding's query, never the input itself; the active adapter's
        layout), without generating. The soft prompt, if any, goes in front of them as vectors. Used to train
        a soft prompt in the context it is served in (`detot tune --demos`).

        Example:
            >>> task = TaskProfile(name="arith")
            >>> program = DETOT("question -> answer", task=task, index=index, soft_prompt=False,  # doctest: +SKIP
            ...                 adapter=PlainAdapter(), adjustments=analyze(task, k_exemplars=1), background=False)
            >>> [m["role"] for m in program.prompt(question="3 + 4?")]                    # doctest: +SKIP
            ['user', 'assistant', 'user']
        """
        sig = self._checked(inputs)
        _, _, demos, _ = self._context(self.controller.state, self._input_text(inputs))
        return shown_messages(self.active_adapter(), sig, demos, inputs)

    def _demos(self, state: TaskState, q: np.ndarray, text: str) -> tuple[list[dspy.Example], list[str]]:
        """Demos for the task-adapted query `q` (read from `state` by the caller); never the input's own
        exemplar (`demos.retrieve_demos`)."""
        adj = state.adjust(self.adjustments)  # a policy may change how many demos
        return retrieve_demos(self.index, q, text, k=adj.k_exemplars, mmr=adj.mmr_lambda,
                              demo_fields=self.demo_fields, fields=self._signature().fields)

    def _prompt_demos(self, retrieved: list[dspy.Example]) -> list[dspy.Example]:
        """The inner predictor's own `demos` (an optimizer's, all of them), then the retrieved ones less repeats."""
        return prompt_demos(list(self._inner().demos), retrieved, self._first_input())

    def _first_input(self) -> str:
        """The signature's first input field (the one demos and exemplars are matched on)."""
        return next(iter(self._signature().input_fields))

    def _next_rollout(self) -> int:
        with self._rollout_lock:
            self._rollout += 1
            return self._rollout

    def forward(self, *args: Any, **inputs: Any) -> dspy.Prediction:
        """Answer one input; returns the answer field(s), reasoning, agreement, votes, samples_used,
        parse_failures, demo_ids, embedding_version, `sample_keys` / `sample_tokens` / `sample_logprobs` /
        `sample_fields` (each sample's vote key, output tokens, summed log-probability and parsed fields, in the
        order drawn: enough to replay a stopping rule, `fit/stopping.py`) and an `id` for `feedback`.

        Raises:
            InvalidRequestError: a missing or None input field, positional arguments; `EmptyPromptError` for an
                empty input; `InputTypeError` for a text field given something else.
            ConfigError: no LM given or configured.
        """
        return run_steps(self._forward_steps(*args, **inputs))

    async def aforward(self, *args: Any, **inputs: Any) -> dspy.Prediction:
        """`forward` on the event loop (`acall`, `asyncio.gather`): engine rounds are awaited (`detot/steps.py`), no
        thread per call; an LM without a batched engine samples through DSPy calls, on a worker thread."""
        if serving_engine(self._lm()) is None:
            return await asyncio.to_thread(contextvars.copy_context().run, self.forward, *args, **inputs)
        return await arun_steps(self._forward_steps(*args, **inputs))

    def _forward_steps(self, *args: Any, **inputs: Any) -> Steps[dspy.Prediction]:  # engine rounds are yielded
        start = time.perf_counter()
        sig = self._checked(inputs, args)
        text = self._input_text(inputs)
        if not text.strip():
            raise EmptyPromptError("the input is empty or whitespace; pass a question")
        lm = self._lm()
        if lm is None:
            raise ConfigError("no LM: pass lm= to DETOT, call set_lm(...) or dspy.configure(lm=...)")
        state = self.controller.state  # one consistent snapshot for the whole call
        request = call_cache.cache_request(self, state, inputs, lm)
        cached = call_cache.get(request)
        if cached is not None:  # the same call under the same state: no sampling, no new evidence
            fields = {name: cached.get(name) for name in sig.output_fields}
            if cached.get("answer_key") is not None:
                record_trace(self._inner(), {name: inputs[name] for name in sig.input_fields}, fields)
            stream_fields(self._inner(), {name: cached.get(name) for name in sig.output_fields})
            return dspy.Prediction(**{**cached, "id": uuid.uuid4().hex[:16], "from_cache": True})
        with dspy.settings.context(send_stream=None):  # one sample's chunks are not the answer (detot/streaming.py)
            query, demo_ids, shown, samples, result, drawn = yield from self._answer(state, inputs, text, lm)
        tokens = sum(s.tokens for s in samples)
        winner = next((s for s in samples if s.key == result.winner and s.fields is not None), None)
        fields = winner.fields if winner is not None and winner.fields else {}
        if fields:  # what an optimizer learns from: the inner predictor's trace entry, with the winning sample
            record_trace(self._inner(), {name: inputs[name] for name in sig.input_fields},
                         {name: fields[name] for name in sig.output_fields if name in fields})
        latency = time.perf_counter() - start
        pred_id = uuid.uuid4().hex[:16]
        out: dict[str, Any] = {name: fields.get(name) for name in sig.output_fields}
        out.update(answer_key=result.winner, agreement=result.agreement, votes=dict(result.counts),
                   samples_used=drawn, parse_failures=result.unparsed, demo_ids=demo_ids,
                   sample_keys=[sm.key for sm in samples], sample_tokens=[sm.tokens for sm in samples],
                   sample_logprobs=[sm.logprob for sm in samples], sample_fields=[sm.fields for sm in samples],
                   embedding_version=state.version, id=pred_id, tokens=tokens, latency_s=latency,
                   reason=None if result.winner is not None else f"none of {drawn} samples gave a parseable answer")
        self.controller.add_evidence(Evidence(
            id=pred_id, query=query, demo_ids=demo_ids, agreement=result.agreement,
            messages=shown.get(winner.strategy if winner is not None else "cot") or next(iter(shown.values()), None),
            target=(winner.text or None) if winner is not None else None, samples=samples, version=state.version,
            inputs={name: inputs[name] for name in sig.input_fields},
            served=Replayed(result.winner, result.agreement, tuple(demo_ids))))
        trigger = self.monitor.observe(Observation(id=pred_id, agreement=result.agreement, samples=drawn,
                                                   tokens=tokens, latency_s=latency, embedding_version=state.version))
        if trigger is not None and self.background:
            self.controller.submit()
        call_cache.put(request, out)
        stream_fields(self._inner(), {name: out[name] for name in sig.output_fields})
        return dspy.Prediction(**out, from_cache=False)

    def _answer(self, state: TaskState, inputs: dict[str, Any], text: str, lm: Any,
                record: bool = True) -> Steps[tuple[Any, ...]]:
        """The pipeline under one state: `(query, demo_ids, messages, samples, vote, drawn)`; with `record`,
        the engine rounds are recorded on the LM as DSPy records its calls (history, usage, callbacks)."""
        sig = self._signature()
        query, soft, demos, demo_ids = self._context(state, text)
        engine = serving_engine(lm)
        if engine is not None and soft is not None and soft.shape[-1] != engine.hidden_size:
            raise SoftPromptError(f"this DETOT's soft prompts are {soft.shape[-1]} wide, made for another model; "
                                  f"the LM in use ({getattr(lm, 'model', engine.name)}) has hidden size "
                                  f"{engine.hidden_size}: use the model they were trained for, train a task "
                                  "embedding for this one (`detot tune`), or build the DETOT with soft_prompt=False")
        adapter = self.active_adapter()
        adj = state.adjust(self.adjustments)  # the task's adjustments under the state's policy
        strategy = adj.strategy
        messages: dict[str, list[dict[str, str]]] = {}  # per strategy: what the model was shown
        if engine is not None:
            draws = {}
            if strategy in ("cot", "direct", "mix"):
                messages["cot"] = shown_messages(adapter, sig, demos, inputs)  # with a wrapper's hint (Refine)
                # a ChatAdapter reply ends at its end marker: small models otherwise keep writing to max_tokens
                stop = ("[[ ## completed ## ]]",) if isinstance(adapter, dspy.ChatAdapter) else ()
                parse = drawers.reply_parser(adapter, sig, self._stated_answer)
                draws["cot"] = drawers.engine_drawer(engine, lm, parse, self._key, messages["cot"], soft, text,
                                                     record, adj, stop=stop)
            if strategy in ("pot", "mix"):
                system = PlainAdapter().format_system_message(sig)
                messages["pot"] = pot_messages(text, drawers.pot_demos(demos, self._first_input(), self.answer_field),
                                               system)
                draws["pot"] = drawers.engine_drawer(
                    engine, lm, lambda reply: drawers.program_fields(reply, self.answer_field), self._key,
                    messages["pot"], soft, text, record, adj, strategy="pot", seed_offset=1_000_003)
            draw = drawers.pooled(draws["cot"], draws["pot"]) if strategy == "mix" else next(iter(draws.values()))
        elif strategy in ("pot", "mix"):
            raise ConfigError(f"strategy {strategy!r} samples through a batched engine (local_lm or vLLM); this LM "
                              "has none: use strategy='cot'")
        else:
            draw = drawers.rollout_drawer(self.predictor, lm, adapter, inputs, demos, adj, self._key,
                                          self._next_rollout)
        samples, result, drawn = yield from vote_steps(draw, adj)
        return query, demo_ids, messages, samples, result, drawn

    def _input_text(self, inputs: dict[str, Any]) -> str:
        """What the encoder reads for a call (and for its replay): the input fields, joined."""
        return " ".join(str(inputs[name]) for name in self._signature().input_fields)

    def _replay(self, state: TaskState, inputs: dict[str, Any]) -> Replayed:
        """Answer `inputs` under `state` (the same seeds as a call), for judging a candidate; records nothing."""
        text = self._input_text(inputs)
        with dspy.context(disable_history=True, trace=None):  # a replay is not a call the user made
            _, demo_ids, _, _, result, _ = run_steps(self._answer(state, inputs, text, self._lm(), record=False))
        return Replayed(result.winner, result.agreement, tuple(demo_ids))

    def _stated_answer(self, raw: str) -> dict[str, Any] | None:
        """Numeric tasks only: an explicit "The answer is N" in a reply that broke the field layout."""
        if self.adjustments.normalizer.value != "number":
            return None
        value, stated = extract_number(raw)
        return {"reasoning": raw.strip(), self.answer_field: value} if stated and value is not None else None

    def _key(self, fields: dict[str, Any] | None) -> str | None:
        if not fields:
            return None
        return normalize(None if fields.get(self.answer_field) is None else str(fields[self.answer_field]),
                         self.adjustments.normalizer, labels=self.task.labels or (),
                         synonyms=self.task.label_synonyms)

    # ---- feedback and the loop -------------------------------------------------------------------------
    def feedback(self, prediction: dspy.Prediction, *, gold: Any = None, correct: bool | None = None) -> bool:
        """Tell DETOT whether a prediction was right (pass `gold` or `correct`); returns the correctness."""
        if gold is None and correct is None:
            raise InvalidRequestError("feedback needs gold= or correct=")
        gold_key = None
        if gold is not None:
            gold_key = normalize(str(gold), self.adjustments.normalizer, labels=self.task.labels or (),
                                 synonyms=self.task.label_synonyms)
            correct = gold_key is not None and gold_key == prediction.answer_key
        assert correct is not None
        self.controller.record_outcome(prediction.id, correct=correct, gold_key=gold_key)
        trigger = self.monitor.feedback(prediction.id, correct)
        if trigger is not None and self.background:
            self.controller.submit()
        return correct

    def reoptimize(self) -> Any:
        """Re-optimize now, synchronously; returns the `ReoptimizationEvent`."""
        return self.controller.reoptimize()
