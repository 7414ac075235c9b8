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

import copy
import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dspy
import numpy as np
import torch

from detot_agent.answers import extract_number, format_number, normalize
from detot_agent.detot.adapters import LenientChatAdapter, PlainAdapter
from detot_agent.detot.controller import Controller, ControllerConfig
from detot_agent.detot.judging import Replayed
from detot_agent.detot.monitor import Monitor, Observation
from detot_agent.detot.records import Evidence, ParsedSample, TaskState
from detot_agent.detot.sampling import round_seed, sample_engine, vote_in_rounds
from detot_agent.detot.strategies import parse_program, pot_messages, rationale_to_program
from detot_agent.detot.task import Adjustments, Policy, TaskProfile, analyze
from detot_agent.detot.tracing import record_trace
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.engines.base import BatchedEngine
from detot_agent.engines.generation import text_seed
from detot_agent.engines.lm import training_engine
from detot_agent.errors import ArtefactError, ConfigError, DetotError, EmptyPromptError, InvalidRequestError
from detot_agent.retrieval.encoder import Encoder
from detot_agent.retrieval.index import ExemplarIndex

__all__ = ["DETOT"]


def _trainer(lm: Any) -> Any:
    """What trains the LM's soft prompts: its torch engine, a lazily loaded one for llama.cpp, or None."""
    return training_engine(getattr(lm, "engine", None))


def _serving_engine(lm: Any) -> BatchedEngine | None:
    """The LM's engine when it serves batched `sample(request, n, soft_prompt=...)` (torch, llama.cpp, vLLM)."""
    engine = getattr(lm, "engine", None)
    return engine if isinstance(engine, BatchedEngine) else None


_MARKER = re.compile(r"\[\[\s*##")


def _defuse(value: Any) -> Any:
    """Exemplar text that contains DSPy field markers (`[[ ## answer ## ]]`) is shown with the marker
    broken up, so a demo cannot open a field in the prompt; answers are parsed from the model's reply only."""
    return _MARKER.sub("[ [ ##", value) if isinstance(value, str) else value


class DETOT(dspy.Module):
    """Dynamic Embeddings with Task-Oriented prompting, as a DSPy module.

    Args:
        signature: a DSPy signature (string or class); its last output field is the voted answer.
        task: the `TaskProfile`.
        index: exemplars to retrieve demos from (fields `question`, `rationale`, `answer` by default).
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
        index: ExemplarIndex,
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
        sig = self._signature()
        self.answer_field = list(sig.output_fields)[-1]
        inputs = list(sig.input_fields)
        self.demo_fields = demo_fields or {inputs[0]: "question", "reasoning": "rationale", self.answer_field: "answer"}
        if adj.k_exemplars > 0:
            _check_demo_fields(index, self.demo_fields, self.answer_field)
        self.index = index
        found = encoder or index.encoder
        if found is None:
            raise ConfigError("DETOT needs an encoder: pass encoder= or an index built with one")
        self.encoder: Encoder = found
        self.lm = lm
        self.background = background
        self.adapter = adapter
        self._default_adapter = LenientChatAdapter()
        engine = _trainer(lm)
        embedding = self._task_embedding(task_embedding, soft_prompt, components, samples or [], lm, engine)
        self.monitor = Monitor(agreement_threshold=adj.agreement_threshold,
                               accuracy_threshold=adj.accuracy_threshold, window=adj.window,
                               min_count=adj.min_count, cooldown=adj.cooldown, log_path=event_log)
        if controller_config is not None and not isinstance(controller_config, ControllerConfig):
            raise ConfigError(f"controller_config must be a ControllerConfig, got {type(controller_config).__name__}")
        self.canary = self._canary(canary or [])
        self.controller = Controller(TaskState(embedding.version, embedding), index=index, monitor=self.monitor,
                                     engine=engine, config=controller_config, k=adj.k_exemplars,
                                     replay=self._replay, canary=self.canary, evidence_log=evidence_log)
        self._rollout = 0
        self._rollout_lock = threading.Lock()

    def _task_embedding(self, given: TaskEmbedding | None, soft_prompt: torch.Tensor | bool | None,
                        components: int, samples: list[str], lm: Any, engine: Any) -> TaskEmbedding:
        """The one task embedding this program serves: given, or built; with a soft-prompt head when asked."""
        if components < 0:
            raise ConfigError(f"components must be >= 0, got {components}")
        serving = _serving_engine(lm)
        hidden = getattr(serving, "hidden_size", None)
        if given is not None:
            if not isinstance(given, TaskEmbedding):
                raise ConfigError(f"task_embedding must be a TaskEmbedding, got {type(given).__name__}")
            if given.encoder_name != self.index.encoder_name or given.dim != self.index.dim:
                raise ConfigError(f"task_embedding uses encoder {given.encoder_name!r} ({given.dim} dims), the index "
                                  f"{self.index.encoder_name!r} ({self.index.dim} dims)")
            if given.has_head and (isinstance(soft_prompt, torch.Tensor) or soft_prompt is False):
                raise ConfigError("task_embedding already has a soft-prompt head, which supplies the soft prompts; "
                                  "pass soft_prompt=None (or a task embedding without a head)")
            if given.head is not None and hidden is not None and given.head.hidden_size != hidden:
                raise ConfigError(f"task_embedding's soft prompts are {given.head.hidden_size} wide, the model's "
                                  f"hidden size is {hidden}; train one for this model")
            if given.has_head or soft_prompt is False or (soft_prompt is None and engine is None):
                return given
            embedding = given
        else:
            task = self.task
            embedding = TaskEmbedding.from_description(task.name, task.description or task.name,
                                                       encoder=self.encoder, samples=samples)
        p0: torch.Tensor | None = None
        if isinstance(soft_prompt, torch.Tensor):
            p0 = soft_prompt.detach().float().clone()
        elif soft_prompt is None and engine is not None:
            from detot_agent.softprompt.prompt import SoftPrompt

            # initialised from the serving engine's token embeddings (llama.cpp reads them from the file)
            adj = self.adjustments
            p0 = SoftPrompt.initialize(lm.engine, self.task.name, k=adj.soft_prompt_k, init="text",
                                       text=adj.soft_prompt_init_text).vectors
        if p0 is not None:
            from detot_agent.softprompt.registry import check_soft_prompt

            check_soft_prompt(p0, hidden_size=hidden, where="soft_prompt")
            inputs = None  # the gate starts at centroids of the task's inputs: samples, else the exemplars
            if components > 0:
                inputs = (self.encoder.encode(samples) if len(samples) >= components else
                          self.index.sample_vectors(2000) if len(self.index) else None)
            embedding.attach_head(p0, components=components, model_id=getattr(
                getattr(serving, "source", None), "spec", None) or "unknown", inputs=inputs)
        elif components:
            raise ConfigError("components > 0 needs a soft prompt: a local LM, or soft_prompt=<tensor>")
        return embedding

    def _canary(self, examples: list[dspy.Example]) -> list[tuple[dict[str, Any], str]]:
        """`(inputs, gold_key)` per canary example; refuses examples without the fields or a usable answer."""
        sig = self._signature()
        out = []
        for i, ex in enumerate(examples):
            missing = [f for f in [*sig.input_fields, self.answer_field] if f not in ex]
            if missing:
                raise ConfigError(f"canary example #{i} lacks field(s) {missing}")
            gold = normalize(str(ex[self.answer_field]), self.adjustments.normalizer, labels=self.task.labels or (),
                             synonyms=self.task.label_synonyms)
            if gold is None:
                raise ConfigError(f"canary example #{i}: answer {ex[self.answer_field]!r} does not normalise to a "
                                  f"{self.adjustments.normalizer.value}")
            out.append(({f: ex[f] for f in sig.input_fields}, gold))
        return out

    @property
    def task_embedding(self) -> TaskEmbedding | None:
        """The task embedding now serving (pass it to a `TaskRetriever` to share it)."""
        return self.controller.state.embedding

    # ---- DSPy plumbing -------------------------------------------------------------------------------
    def _signature(self) -> Any:
        return self.predictor.predict.signature if hasattr(self.predictor, "predict") else self.predictor.signature

    def _inner(self) -> dspy.Predict:
        return self.predictor.predict if hasattr(self.predictor, "predict") else self.predictor

    def __deepcopy__(self, memo: dict[int, Any]) -> DETOT:
        """Optimizers' copies: predictor and state copied; index, encoder, LM and engine shared."""
        clone = DETOT.__new__(DETOT)
        clone.__dict__.update(self.__dict__)
        clone.predictor = self.predictor.deepcopy()
        state = self.controller.state
        embedding = None if state.embedding is None else copy.deepcopy(state.embedding)
        clone._start_loop(TaskState(state.version, embedding, state.policy), self.monitor.config,
                          self.monitor.log_path, self.controller.config, self.controller.engine)
        return clone

    def _start_loop(self, state: TaskState, monitor_config: Any, log_path: Any, config: ControllerConfig,
                    engine: Any) -> None:
        """A fresh monitor and controller serving `state` (for copies and unpickled programs)."""
        self.monitor = Monitor(monitor_config, log_path=log_path)
        self.controller = Controller(state, index=self.index, monitor=self.monitor, engine=engine, config=config,
                                     k=self.adjustments.k_exemplars, replay=self._replay, canary=self.canary)
        self._rollout_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle support (`save_program=True`, `dspy.load`): the serving state, not the running loop (its
        thread, locks and evidence); the LM's engine and the encoder pickle as their settings."""
        out = {k: v for k, v in super().__getstate__().items() if k not in ("controller", "monitor", "_rollout_lock")}
        out["_loop"] = (self.controller.state, self.monitor.config, self.monitor.log_path, self.controller.config)
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        served, monitor_config, log_path, config = state.pop("_loop")
        super().__setstate__(state)
        self._start_loop(served, monitor_config, log_path, config, _trainer(self.lm))

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
    def _checked(self, inputs: dict[str, Any]) -> Any:
        """The signature, once `inputs` are known to hold each of its input fields (else `InvalidRequestError`)."""
        sig = self._signature()
        missing = [name for name in sig.input_fields if name not in inputs]
        if missing:
            raise InvalidRequestError(f"missing input field(s) {missing}; the signature takes "
                                      f"{list(sig.input_fields)}")
        return sig

    def _context(self, state: TaskState, text: str) -> tuple[np.ndarray, Any, list[dspy.Example], list[str]]:
        """What one task embedding gives an input under `state`: `(e(x), P(x) or None, demos shown, their ids)`;
        `q(x)` and `P(x)` come from one snapshot."""
        query = self.encoder.encode([text])[0]  # (dim,)
        q, soft, _ = state.embedding.serve(query) if state.embedding is not None else (query, None, 0)
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
        return list(self.active_adapter().format(sig, demos=demos, inputs=inputs))

    def _demos(self, state: TaskState, q: np.ndarray, text: str) -> tuple[list[dspy.Example], list[str]]:
        """Demos for the task-adapted query `q` (read from `state` by the caller); an exemplar whose question
        is the input itself (`text`) is never shown (it would hand the model its own answer, and let an
        optimizer bootstrap demos by copying)."""
        k = min(self.adjustments.k_exemplars, len(self.index))
        if k == 0:
            return [], []
        hits = self.index.search(q, k, mmr=self.adjustments.mmr_lambda)
        own = _squash(text)
        if any(_squash(h.text) == own for h in hits):
            hits = [h for h in self.index.search(q, min(k + 1, len(self.index)), mmr=self.adjustments.mmr_lambda)
                    if _squash(h.text) != own][:k]
        sig = self._signature()
        demos = []
        for h in hits:
            values = {name: h.fields.get(src, h.text if src == "question" else None)
                      for name, src in self.demo_fields.items() if name in sig.fields}
            demos.append(dspy.Example(**{k2: _defuse(v) for k2, v in values.items() if v is not None}))
        return demos, [h.id for h in hits]

    def _prompt_demos(self, retrieved: list[dspy.Example]) -> list[dspy.Example]:
        """The demos a prompt shows, in order: the inner predictor's own `demos` (set by an optimizer or by
        hand, all of them), then the retrieved ones, less any whose first input repeats an attached demo's."""
        attached = list(self._inner().demos)
        first = self._first_input()
        seen = {_squash(str(d.get(first, ""))) for d in attached}
        return attached + [d for d in retrieved if _squash(str(d.get(first, ""))) not in seen]

    def _first_input(self) -> str:
        """The signature's first input field (the one demos and exemplars are matched on)."""
        return next(iter(self._signature().input_fields))

    def _parse_with(self, adapter: dspy.Adapter, sig: Any) -> Any:
        """A reply parser for the adapter's layout (numeric tasks: a stated answer in a broken layout counts)."""
        def parse(text: str) -> dict[str, Any] | None:
            try:
                return dict(adapter.parse(sig, text))
            except Exception:
                return self._stated_answer(text)

        return parse

    def _draw_engine(self, engine: BatchedEngine, lm: Any, parse: Any, messages: list[dict[str, str]],
                     soft: torch.Tensor | None, text: str, record: bool, adj: Adjustments, *,
                     stop: tuple[str, ...] = (), strategy: str = "cot", seed_offset: int = 0) -> Any:
        """A round drawer for a batched engine: one `sample(n)` per round (greedy answer first), recorded
        on `lm` as one LM call (history, usage, callbacks) when `record`; `parse(text)` reads a reply's fields."""
        model = lm.model if lm is not None else engine.name

        def draw(n: int, drawn: int) -> list[ParsedSample]:
            # same input, same samples; the i-th sampled answer has the same seed however rounds split the budget
            seed = round_seed(text_seed(text) + seed_offset, drawn, greedy_first=adj.greedy_first)
            # the greedy answer votes first (and so wins ties); it shares the round's prefill
            greedy = 1 if drawn == 0 and adj.greedy_first else 0
            out = sample_engine(engine, model, messages, n, soft_prompt=soft, seed=seed, stop=stop,
                                temperature=adj.temperature, max_tokens=adj.max_tokens, greedy=greedy,
                                lm=lm if record else None)
            parsed = []
            for s in out:
                fields = parse(s.text)
                parsed.append(ParsedSample(text=s.text, key=self._key(fields), tokens=s.output_tokens,
                                           logprob=s.logprob, fields=fields, strategy=strategy))
            return parsed

        return draw

    def _program_fields(self, text: str) -> dict[str, Any] | None:
        """A PoT reply's fields under this signature's names: `reasoning` (the program), the answer field."""
        ran = parse_program(text)
        return None if ran is None else {"reasoning": ran["reasoning"], self.answer_field: ran["answer"]}

    def _pot_demos(self, demos: list[dspy.Example]) -> list[tuple[str, str]]:
        """`(question, program)` demos for a PoT prompt: a demo whose reasoning already is a program that gives
        its answer (an optimizer's PoT trace), else its rationale turned into one; others are left out."""
        first = self._first_input()
        out = []
        for d in demos:
            answer, reasoning = d.get(self.answer_field), d.get("reasoning")
            if d.get(first) is None or answer is None:
                continue
            ran = parse_program(str(reasoning)) if reasoning else None
            program = (str(reasoning) if ran is not None and ran["answer"] == format_number(str(answer))
                       else rationale_to_program(None if reasoning is None else str(reasoning), answer))
            if program is not None:
                out.append((str(d[first]), program))
        return out

    def _draw_rollouts(self, lm: Any, adapter: dspy.Adapter, inputs: dict[str, Any],
                       demos: list[dspy.Example], adj: Adjustments) -> Any:
        """A round drawer for any other `dspy.LM`: one rollout per sample (an unparseable one counts as None).

        Each rollout is the inner predictor called with `lm=` a copy of `lm` carrying its own temperature
        and rollout id (so an LM set on the predictor cannot override them, and DSPy's cache keeps distinct
        samples apart); its trace entries are dropped, since the call's trace records the winner only.
        """

        def draw(n: int, drawn: int) -> list[ParsedSample]:
            out = []
            for i in range(n):
                with self._rollout_lock:
                    self._rollout += 1
                    rid = self._rollout
                sampler = (lm.copy(temperature=0.0) if adj.greedy_first and drawn == 0 and i == 0
                           else lm.copy(rollout_id=rid, temperature=adj.temperature))
                try:
                    with dspy.context(lm=sampler, adapter=adapter, trace=[]):
                        pred = self.predictor(**inputs, demos=demos, lm=sampler)
                    fields: dict[str, Any] | None = dict(pred.items())
                except Exception:  # an unparseable sample is counted and skipped
                    fields = None
                out.append(ParsedSample(text=json.dumps(fields, default=str) if fields else "",
                                        key=self._key(fields), fields=fields))
            return out

        return draw

    def forward(self, **inputs: Any) -> dspy.Prediction:
        """Answer one input; returns the answer field(s), reasoning, agreement, votes, samples_used,
        parse_failures, demo_ids, embedding_version, `sample_keys` / `sample_tokens` (each sample's vote key
        and output tokens, in the order drawn) and an `id` for `feedback`.

        Raises:
            InvalidRequestError: a missing input field; `EmptyPromptError` for an empty input.
            ConfigError: no LM given or configured.
        """
        start = time.perf_counter()
        sig = self._checked(inputs)
        text = self._input_text(inputs)
        if not text.strip():
            raise EmptyPromptError("the input is empty or whitespace; pass a question")
        lm = self._lm()
        if lm is None:
            raise ConfigError("no LM: pass lm= to DETOT, call set_lm(...) or dspy.configure(lm=...)")
        state = self.controller.state  # one consistent snapshot for the whole call
        query, demo_ids, shown, samples, result, drawn = self._answer(state, inputs, text, lm)
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
        return dspy.Prediction(**out)

    def _answer(self, state: TaskState, inputs: dict[str, Any], text: str, lm: Any,
                record: bool = True) -> tuple[Any, ...]:
        """The pipeline under one state: `(query, demo_ids, messages, samples, vote, drawn)`; with `record`,
        the engine rounds are recorded on the LM as DSPy records its calls (history, usage, callbacks)."""
        sig = self._signature()
        query, soft, demos, demo_ids = self._context(state, text)
        engine = _serving_engine(lm)
        adapter = self.active_adapter()
        adj = state.adjust(self.adjustments)  # the task's adjustments under the state's policy
        strategy = adj.strategy
        messages: dict[str, list[dict[str, str]]] = {}  # per strategy: what the model was shown
        if engine is not None:
            draws = {}
            if strategy in ("cot", "direct", "mix"):
                messages["cot"] = adapter.format(sig, demos=demos, inputs=inputs)
                # a ChatAdapter reply ends at its end marker: small models otherwise keep writing to max_tokens
                stop = ("[[ ## completed ## ]]",) if isinstance(adapter, dspy.ChatAdapter) else ()
                draws["cot"] = self._draw_engine(engine, lm, self._parse_with(adapter, sig), messages["cot"], soft,
                                                 text, record, adj, stop=stop)
            if strategy in ("pot", "mix"):
                system = PlainAdapter().format_system_message(sig)
                messages["pot"] = pot_messages(text, self._pot_demos(demos), system)
                draws["pot"] = self._draw_engine(engine, lm, self._program_fields, messages["pot"], soft, text,
                                                 record, adj, strategy="pot", seed_offset=1_000_003)
            draw = _pooled(draws["cot"], draws["pot"]) if strategy == "mix" else next(iter(draws.values()))
        elif strategy in ("pot", "mix"):
            raise ConfigError(f"strategy {strategy!r} samples through a batched engine (local_lm or vLLM); this LM "
                              "has none: use strategy='cot'")
        else:
            draw = self._draw_rollouts(lm, adapter, inputs, demos, adj)
        samples, result, drawn = vote_in_rounds(draw, adj)
        return query, demo_ids, messages, samples, result, drawn

    def _input_text(self, inputs: dict[str, Any]) -> str:
        """What the encoder reads for a call (and for its replay): the input fields, joined."""
        return " ".join(str(inputs[name]) for name in self._signature().input_fields)

    def _replay(self, state: TaskState, inputs: dict[str, Any]) -> Replayed:
        """Answer `inputs` under `state` (the same seeds as a call), for judging a candidate; records nothing."""
        text = self._input_text(inputs)
        with dspy.context(disable_history=True, trace=None):  # a replay is not a call the user made
            _, demo_ids, _, _, result, _ = self._answer(state, inputs, text, self._lm(), record=False)
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

    # ---- persistence -------------------------------------------------------------------------------------
    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        """DSPy state (predictor demos/instructions) plus DETOT's own: profile, adjustments, version, policy, and
        the loop's spent error budget (`tests_run`).

        The LM is not part of the state (DETOT is loaded into an object built with its LM and index): the
        inner predictor's `lm` is saved as None, and loading keeps the LM the object has."""
        state = super().dump_state(json_mode=json_mode)
        for part in state.values():
            if isinstance(part, dict) and "lm" in part:
                part["lm"] = None
        st = self.controller.state
        state["detot"] = {"task": self.task.model_dump(mode="json"),
                          "adjustments": self.adjustments.model_dump(mode="json"), "version": st.version,
                          "policy": None if st.policy is None else st.policy.model_dump(mode="json", exclude_none=True),
                          "index": {"encoder": self.index.encoder_name, "dim": self.index.dim,
                                    "count": len(self.index)},
                          "monitor": self.monitor.stats(),
                          # the loop's error budget: a reloaded program must not test afresh at the first alpha
                          "tests_run": self.controller.tests_run}
        return state

    def load_state(self, state: dict[str, Any], **kwargs: Any) -> DETOT:
        """Restore `dump_state` (tensors come from the side file; see `load`)."""
        extra = state.get("detot")
        inner = {k: v for k, v in state.items() if k != "detot"}
        kept = self._inner().lm
        super().load_state(inner, **kwargs)
        self._inner().lm = kept
        if extra:
            info = extra.get("index", {})
            if info.get("encoder") != self.index.encoder_name or info.get("dim") != self.index.dim:
                raise ArtefactError(f"saved DETOT state used encoder {info.get('encoder')!r} ({info.get('dim')} "
                                    f"dims); this index uses {self.index.encoder_name!r} ({self.index.dim} dims)")
            self.task = TaskProfile(**extra["task"])
            self.adjustments = Adjustments(**extra["adjustments"])
            policy = Policy(**extra["policy"]) if extra.get("policy") else None
            self.controller.tests_run = max(self.controller.tests_run, int(extra.get("tests_run", 0)))
            st = self.controller.state
            if policy != st.policy:  # the loop's policy serves with the loaded state
                self.controller.restore(TaskState(st.version, st.embedding, policy))
        return self

    TENSORS_KIND = "detot-program-tensors"

    def save(self, path: str | Path, save_program: bool = False, **kwargs: Any) -> None:
        """Save to `path` (DSPy's JSON state) and `<path>.tensors/` (the task embedding, head included).

        Both go through the shared atomic persistence path: the side folder is swapped in whole,
        then the JSON file is replaced in one rename, so a crash leaves the old program loadable.

        With `save_program=True`, `path` is a directory (no suffix) that receives the whole program as
        DSPy writes it (`program.pkl` by cloudpickle, `metadata.json`), swapped in whole; read it back with
        `dspy.load(path, allow_pickle=True)`. The pickle holds the index, the task embedding and the
        predictor; the LM's engine and the encoder are stored as their settings and load their models again.

        Example:
            >>> detot.save("runs/arith.json")                                       # doctest: +SKIP
            >>> detot.save("runs/arith_program", save_program=True)                 # doctest: +SKIP
            >>> again = dspy.load("runs/arith_program", allow_pickle=True)          # doctest: +SKIP
        """
        import orjson
        from dspy.utils.saving import get_dependency_versions

        from detot_agent.io.persist import atomic_dir, atomic_write_bytes, save_tensors

        target = Path(path)
        meta_bytes = orjson.dumps({"dependency_versions": get_dependency_versions()},
                                  option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
        if save_program:
            import cloudpickle

            if target.suffix:
                raise ConfigError(f"save_program=True saves a directory: pass a path without a suffix (got "
                                  f"{str(path)!r})")
            if target.exists() and not target.is_dir():
                raise ConfigError(f"{str(path)!r} exists and is not a directory")
            with atomic_dir(target, kind="detot-program", version=1, meta={}) as tmp:
                with open(tmp / "program.pkl", "wb") as f:
                    cloudpickle.dump(self, f)
                (tmp / "metadata.json").write_bytes(meta_bytes)
            return
        if target.suffix != ".json":
            raise ConfigError(f"DETOT saves its state as JSON plus a tensors folder: pass a path ending in .json, "
                              f"or a directory with save_program=True (got {str(path)!r})")
        st = self.controller.state
        meta: dict[str, Any] = {"version": st.version, "embedding": None}
        tensors: dict[str, torch.Tensor] = {}
        if st.embedding is not None:
            emeta, etensors = st.embedding.to_tensors()
            meta["embedding"] = emeta
            tensors.update({f"embedding.{k}": v for k, v in etensors.items()})
        save_tensors(Path(str(path) + ".tensors"), kind=self.TENSORS_KIND, version=2, meta=meta, tensors=tensors)
        state = self.dump_state()
        state["metadata"] = {"dependency_versions": get_dependency_versions()}
        atomic_write_bytes(target, orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))

    def load(self, path: str | Path, **kwargs: Any) -> DETOT:
        """Load what `save` wrote (this release's or the first release's side folder); validates shapes,
        finiteness, the encoder and the soft prompts' width before changing anything."""
        from detot_agent.io.persist import load_tensors

        side = Path(str(path) + ".tensors")
        m, tensors = load_tensors(side, kind=self.TENSORS_KIND, max_version=2)
        where = str(side / "tensors.safetensors")
        serving = _serving_engine(self._lm())
        hidden = getattr(serving, "hidden_size", None)
        # validate everything before changing anything: a failed load leaves the current state serving
        embedding = None
        parts = {k.removeprefix("embedding."): v for k, v in tensors.items() if k.startswith("embedding.")}
        if parts:
            emeta = m.get("embedding") or {**m, "dim": int(parts["t"].shape[0])}  # first release: fields at the top
            embedding = TaskEmbedding.from_tensors(emeta, parts, where=where, encoder_name=self.index.encoder_name,
                                                   hidden_size=hidden)
        soft = tensors.get("soft_prompt")  # first release: a static prompt beside the embedding
        if soft is not None and embedding is not None:
            from detot_agent.softprompt.registry import check_soft_prompt

            try:
                check_soft_prompt(soft, hidden_size=hidden, where=f"{where}: soft_prompt")
            except DetotError as exc:
                raise ArtefactError(str(exc)) from None
            embedding.attach_head(soft, components=0, model_id="unknown")
        try:
            super().load(str(path), **kwargs)
        except (ValueError, UnicodeDecodeError, OSError) as exc:  # JSONDecodeError is a ValueError
            raise ArtefactError(f"{path}: not a loadable DETOT program ({type(exc).__name__}: {exc})") from None
        self.controller.restore(TaskState(int(m["version"]), embedding, self.controller.state.policy))
        return self


def _check_demo_fields(index: ExemplarIndex, demo_fields: dict[str, str], answer_field: str) -> None:
    """Refuse an index none of whose exemplars (the first 200 looked at) has the field a demo's answer comes
    from: every retrieved demo would be shown without its answer, or dropped."""
    source = demo_fields.get(answer_field)
    if source is None:
        raise ConfigError(f"demo_fields maps no exemplar field to the answer field {answer_field!r}: add "
                          f"{answer_field!r}: '<exemplar field>' (now {demo_fields})")
    records = index.records()[:200]
    if records and not any(source in r.fields for r in records):
        seen = sorted({k for r in records for k in r.fields})
        raise ConfigError(f"the index's exemplars have no {source!r} field (they have {seen or 'no fields'}), so "
                          f"no demo would show an answer: pass demo_fields={{..., {answer_field!r}: '<one of "
                          f"those>'}}, index the answers as {source!r}, or set k_exemplars=0 for no demos")


def _squash(text: str) -> str:
    """Text with its whitespace runs collapsed, for "is this the same question" comparisons."""
    return " ".join(text.split())


def _pooled(cot: Any, pot: Any) -> Any:
    """The `mix` strategy's drawer: each round half CoT samples (the greedy one among them), half PoT.

    Each side is told how many samples *it* has drawn, so its seeds run as they do when it serves alone: a
    mix's CoT samples are a prefix of a CoT-only run's for the same question, and likewise for PoT.

    Example:
        >>> calls = []
        >>> side = lambda name: lambda n, drawn: calls.append((name, n, drawn)) or [name] * n
        >>> draw = _pooled(side("cot"), side("pot"))
        >>> draw(3, 0), draw(2, 3)
        (['cot', 'cot', 'pot'], ['cot', 'pot'])
        >>> calls
        [('cot', 2, 0), ('pot', 1, 0), ('cot', 1, 2), ('pot', 1, 1)]
    """
    taken = {"cot": 0, "pot": 0}

    def draw(n: int, drawn: int) -> list[ParsedSample]:
        half = (n + 1) // 2
        out = cot(half, taken["cot"])
        taken["cot"] += half
        if n - half:
            out += pot(n - half, taken["pot"])
            taken["pot"] += n - half
        return out

    return draw
