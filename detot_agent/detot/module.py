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

from detot_agent.answers import extract_number, normalize
from detot_agent.detot.adapters import LenientChatAdapter
from detot_agent.detot.controller import Controller, ControllerConfig
from detot_agent.detot.monitor import Monitor, Observation
from detot_agent.detot.records import Evidence, ParsedSample, TaskState
from detot_agent.detot.sampling import sample_engine, vote_in_rounds
from detot_agent.detot.task import Adjustments, TaskProfile, analyze
from detot_agent.engines.base import BatchedEngine
from detot_agent.engines.generation import text_seed
from detot_agent.engines.lm import training_engine
from detot_agent.errors import ArtefactError, ConfigError, DetotError, EmptyPromptError, InvalidRequestError
from detot_agent.retrieval.encoder import Encoder
from detot_agent.retrieval.index import ExemplarIndex
from detot_agent.embedding.task_embedding import TaskEmbedding

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
        soft_prompt: initial `(k, hidden)` vectors; with a local LM and None, one is initialised from
            the adjustments' init text; pass `False` to run without.
        demo_fields: signature field -> exemplar field for demos; defaults map the first input to
            `question`, `reasoning` to `rationale`, the answer field to `answer`.
        background: re-optimize in a background thread (True) or only when `reoptimize()` is called.
        event_log: JSONL file for the monitor's events.
        controller_config: settings of the optimization loop.
        adapter: how prompts are laid out and replies parsed; default: the adapter set with
            `dspy.configure(adapter=...)` / `dspy.context`, else `LenientChatAdapter` (DSPy's field
            layout). `PlainAdapter()` prompts in plain text ("... The answer is N."), which small
            local models follow better, for signatures with one answer field.
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
        demo_fields: dict[str, str] | None = None,
        background: bool = True,
        event_log: str | Path | None = None,
        controller_config: ControllerConfig | None = None,
        adapter: dspy.Adapter | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.adjustments = adjustments or analyze(task, samples or [])
        adj = self.adjustments
        self.predictor = (dspy.ChainOfThought(signature) if adj.strategy == "cot" else dspy.Predict(signature))
        sig = self._signature()
        self.answer_field = list(sig.output_fields)[-1]
        inputs = list(sig.input_fields)
        self.demo_fields = demo_fields or {inputs[0]: "question", "reasoning": "rationale", self.answer_field: "answer"}
        self.index = index
        found = encoder or index.encoder
        if found is None:
            raise ConfigError("DETOT needs an encoder: pass encoder= or an index built with one")
        self.encoder: Encoder = found
        self.lm = lm
        self.background = background
        self.adapter = adapter
        self._default_adapter = LenientChatAdapter()
        embedding = TaskEmbedding.from_description(task.name, task.description or task.name, encoder=self.encoder,
                                                   samples=samples or [])
        engine = _trainer(lm)
        vectors: torch.Tensor | None = None
        if isinstance(soft_prompt, torch.Tensor):
            vectors = soft_prompt.detach().float().clone()
        elif soft_prompt is None and engine is not None:
            from detot_agent.softprompt.prompt import SoftPrompt

            # initialised from the serving engine's token embeddings (llama.cpp reads them from the file)
            vectors = SoftPrompt.initialize(lm.engine, task.name, k=adj.soft_prompt_k, init="text",
                                            text=adj.soft_prompt_init_text).vectors
        self.monitor = Monitor(agreement_threshold=adj.agreement_threshold,
                               accuracy_threshold=adj.accuracy_threshold, window=adj.window,
                               min_count=adj.min_count, cooldown=adj.cooldown, log_path=event_log)
        if controller_config is not None and not isinstance(controller_config, ControllerConfig):
            raise ConfigError(f"controller_config must be a ControllerConfig, got {type(controller_config).__name__}")
        self.controller = Controller(TaskState(0, embedding, vectors), index=index, monitor=self.monitor,
                                     engine=engine, config=controller_config, k=adj.k_exemplars)
        self._rollout = 0
        self._rollout_lock = threading.Lock()

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
        clone.monitor = Monitor(self.monitor.config, log_path=self.monitor.log_path)
        clone.controller = Controller(
            TaskState(state.version, state.embedding, None if state.soft_prompt is None else state.soft_prompt.clone()),
            index=self.index, monitor=clone.monitor, engine=self.controller.engine, config=self.controller.config,
            k=self.adjustments.k_exemplars)
        clone._rollout_lock = threading.Lock()
        return clone

    def active_adapter(self) -> dspy.Adapter:
        """The adapter a call uses: `adapter=`, else DSPy's configured one, else `LenientChatAdapter`."""
        return self.adapter or dspy.settings.adapter or self._default_adapter

    @property
    def version(self) -> int:
        """Version of the task embedding now serving."""
        return self.controller.state.version

    # ---- one call ------------------------------------------------------------------------------------
    def _demos(self, state: TaskState, query: np.ndarray) -> tuple[list[dspy.Example], list[str]]:
        k = min(self.adjustments.k_exemplars, len(self.index))
        if k == 0:
            return [], []
        q = state.embedding.query(query) if state.embedding is not None else query
        hits = self.index.search(q, k, mmr=self.adjustments.mmr_lambda)
        sig = self._signature()
        demos = []
        for h in hits:
            values = {name: h.fields.get(src, h.text if src == "question" else None)
                      for name, src in self.demo_fields.items() if name in sig.fields}
            demos.append(dspy.Example(**{k2: _defuse(v) for k2, v in values.items() if v is not None}))
        return demos, [h.id for h in hits]

    def _draw_engine(self, engine: BatchedEngine, lm: Any, adapter: dspy.Adapter, sig: Any,
                     messages: list[dict[str, str]], soft: torch.Tensor | None, text: str) -> Any:
        """A round drawer for a batched engine: one `sample(n)` per round (greedy answer first)."""
        adj = self.adjustments
        # a ChatAdapter reply ends at its end marker: small models otherwise keep writing to max_tokens
        stop = ("[[ ## completed ## ]]",) if isinstance(adapter, dspy.ChatAdapter) else ()
        model = lm.model if lm is not None else engine.name

        def draw(n: int, drawn: int) -> list[ParsedSample]:
            seed = text_seed(text) + drawn  # same input, same samples
            # the greedy answer votes first (and so wins ties); it shares the round's prefill
            greedy = 1 if drawn == 0 and adj.greedy_first else 0
            out = sample_engine(engine, model, messages, n, soft_prompt=soft, seed=seed, stop=stop,
                                temperature=adj.temperature, max_tokens=adj.max_tokens, greedy=greedy)
            parsed = []
            for s in out:
                try:
                    fields: dict[str, Any] | None = adapter.parse(sig, s.text)
                except Exception:
                    fields = self._stated_answer(s.text)
                parsed.append(ParsedSample(text=s.text, key=self._key(fields), tokens=s.output_tokens,
                                           logprob=s.logprob, fields=fields))
            return parsed

        return draw

    def _draw_rollouts(self, lm: Any, adapter: dspy.Adapter, inputs: dict[str, Any],
                       demos: list[dspy.Example]) -> Any:
        """A round drawer for any other `dspy.LM`: one rollout per sample (an unparseable one counts as None)."""
        adj = self.adjustments

        def draw(n: int, drawn: int) -> list[ParsedSample]:
            out = []
            for i in range(n):
                with self._rollout_lock:
                    self._rollout += 1
                    rid = self._rollout
                sampler = (lm.copy(temperature=0.0) if adj.greedy_first and drawn == 0 and i == 0
                           else lm.copy(rollout_id=rid, temperature=adj.temperature))
                try:
                    with dspy.context(lm=sampler, adapter=adapter):
                        pred = self.predictor(**inputs, demos=list(self._inner().demos) + demos)
                    fields: dict[str, Any] | None = dict(pred.items())
                except Exception:  # an unparseable sample is counted and skipped
                    fields = None
                out.append(ParsedSample(text=json.dumps(fields, default=str) if fields else "",
                                        key=self._key(fields), fields=fields))
            return out

        return draw

    def forward(self, **inputs: Any) -> dspy.Prediction:
        """Answer one input; returns the answer field(s), reasoning, agreement, votes, samples_used,
        parse_failures, demo_ids, embedding_version and an `id` for `feedback`.

        Raises:
            InvalidRequestError: a missing input field; `EmptyPromptError` for an empty input.
            ConfigError: no LM given or configured.
        """
        start = time.perf_counter()
        sig = self._signature()
        missing = [name for name in sig.input_fields if name not in inputs]
        if missing:
            raise InvalidRequestError(f"missing input field(s) {missing}; the signature takes "
                                      f"{list(sig.input_fields)}")
        text = " ".join(str(inputs[name]) for name in sig.input_fields)
        if not text.strip():
            raise EmptyPromptError("the input is empty or whitespace; pass a question")
        lm = self.lm or dspy.settings.lm
        if lm is None:
            raise ConfigError("no LM: pass lm= to DETOT or call dspy.configure(lm=...)")
        state = self.controller.state  # one consistent snapshot for the whole call
        query = self.encoder.encode([text])[0]
        demos, demo_ids = self._demos(state, query)
        engine = _serving_engine(lm)
        adapter = self.active_adapter()
        messages = None
        if engine is not None:
            messages = adapter.format(sig, demos=list(self._inner().demos) + demos, inputs=inputs)
            draw = self._draw_engine(engine, lm, adapter, sig, messages, state.soft_prompt, text)
        else:
            draw = self._draw_rollouts(lm, adapter, inputs, demos)
        samples, result, drawn = vote_in_rounds(draw, self.adjustments)
        tokens = sum(s.tokens for s in samples)
        winner = next((s for s in samples if s.key == result.winner and s.fields is not None), None)
        fields = winner.fields if winner is not None and winner.fields else {}
        latency = time.perf_counter() - start
        pred_id = uuid.uuid4().hex[:16]
        out: dict[str, Any] = {name: fields.get(name) for name in sig.output_fields}
        out.update(answer_key=result.winner, agreement=result.agreement, votes=dict(result.counts),
                   samples_used=drawn, parse_failures=result.unparsed, demo_ids=demo_ids,
                   embedding_version=state.version, id=pred_id, tokens=tokens, latency_s=latency,
                   reason=None if result.winner is not None else f"none of {drawn} samples gave a parseable answer")
        self.controller.add_evidence(Evidence(
            id=pred_id, query=query, demo_ids=demo_ids, agreement=result.agreement, messages=messages,
            target=(winner.text or None) if winner is not None else None, samples=samples))
        trigger = self.monitor.observe(Observation(id=pred_id, agreement=result.agreement, samples=drawn,
                                                   tokens=tokens, latency_s=latency, embedding_version=state.version))
        if trigger is not None and self.background:
            self.controller.submit()
        return dspy.Prediction(**out)

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
        """DSPy state (predictor demos/instructions) plus DETOT's own: profile, adjustments, version."""
        state = super().dump_state(json_mode=json_mode)
        st = self.controller.state
        state["detot"] = {"task": self.task.model_dump(mode="json"),
                          "adjustments": self.adjustments.model_dump(mode="json"), "version": st.version,
                          "index": {"encoder": self.index.encoder_name, "dim": self.index.dim,
                                    "count": len(self.index)},
                          "monitor": self.monitor.stats()}
        return state

    def load_state(self, state: dict[str, Any], **kwargs: Any) -> DETOT:
        """Restore `dump_state` (tensors come from the side file; see `load`)."""
        extra = state.get("detot")
        inner = {k: v for k, v in state.items() if k != "detot"}
        super().load_state(inner, **kwargs)
        if extra:
            info = extra.get("index", {})
            if info.get("encoder") != self.index.encoder_name or info.get("dim") != self.index.dim:
                raise ArtefactError(f"saved DETOT state used encoder {info.get('encoder')!r} ({info.get('dim')} "
                                    f"dims); this index uses {self.index.encoder_name!r} ({self.index.dim} dims)")
            self.task = TaskProfile(**extra["task"])
            self.adjustments = Adjustments(**extra["adjustments"])
        return self

    TENSORS_KIND = "detot-program-tensors"

    def save(self, path: str | Path, save_program: bool = False, **kwargs: Any) -> None:
        """Save to `path` (DSPy's JSON state) and `<path>.tensors/` (task embedding and soft prompt).

        Both go through the shared atomic persistence path: the side folder is swapped in whole,
        then the JSON file is replaced in one rename, so a crash leaves the old program loadable.
        """
        import orjson
        from dspy.utils.saving import get_dependency_versions

        from detot_agent.io.persist import atomic_write_bytes, save_tensors

        target = Path(path)
        if save_program or target.suffix != ".json":
            raise ConfigError(f"DETOT saves its state as JSON plus a tensors folder: pass a path ending in .json "
                              f"(got {str(path)!r}{', save_program=True' if save_program else ''})")
        st = self.controller.state
        meta: dict[str, Any] = {"version": st.version, "has_soft_prompt": st.soft_prompt is not None}
        tensors: dict[str, torch.Tensor] = {}
        if st.embedding is not None:
            emeta, etensors = st.embedding.to_tensors()
            meta.update(alpha=emeta["alpha"], alpha_init=emeta["alpha_init"], task=emeta["task"],
                        encoder=emeta["encoder"])
            tensors.update({f"embedding.{k}": v for k, v in etensors.items()})
        if st.soft_prompt is not None:
            tensors["soft_prompt"] = st.soft_prompt
        save_tensors(Path(str(path) + ".tensors"), kind=self.TENSORS_KIND, version=1, meta=meta, tensors=tensors)
        state = self.dump_state()
        state["metadata"] = {"dependency_versions": get_dependency_versions()}
        atomic_write_bytes(target, orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))

    def load(self, path: str | Path, **kwargs: Any) -> DETOT:
        """Load what `save` wrote; validates shapes, finiteness and the encoder before changing anything."""
        from detot_agent.io.persist import load_tensors
        from detot_agent.softprompt.registry import check_soft_prompt

        side = Path(str(path) + ".tensors")
        m, tensors = load_tensors(side, kind=self.TENSORS_KIND, max_version=1)
        # validate everything before changing anything: a failed load leaves the current state serving
        embedding = None
        if "embedding.t" in tensors:
            parts = {k.removeprefix("embedding."): v for k, v in tensors.items() if k.startswith("embedding.")}
            embedding = TaskEmbedding.from_tensors({**m, "dim": int(parts["t"].shape[0])}, parts, where=str(side),
                                                   encoder_name=self.index.encoder_name)
        soft = tensors.get("soft_prompt")
        if soft is not None:
            engine = self.controller.engine
            try:
                check_soft_prompt(soft, hidden_size=engine.hidden_size if engine else None, where=f"{side} soft_prompt")
            except DetotError as exc:
                raise ArtefactError(str(exc)) from None
        try:
            super().load(str(path), **kwargs)
        except (ValueError, UnicodeDecodeError, OSError) as exc:  # JSONDecodeError is a ValueError
            raise ArtefactError(f"{path}: not a loadable DETOT program ({type(exc).__name__}: {exc})") from None
        self.controller.publish(TaskState(int(m["version"]), embedding, soft))
        return self
