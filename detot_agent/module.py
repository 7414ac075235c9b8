"""`DETOT`: the DSPy module users compose (DESIGN.md, "Data flow of one call").

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
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dspy
import numpy as np
import torch
from dspy.lm15 import Config, Message, Request

from detot_agent.adapters import LenientChatAdapter
from detot_agent.controller import Controller, ControllerConfig, Evidence, TaskState
from detot_agent.embeddings import Encoder, TaskEmbedding
from detot_agent.engine import LocalEngine
from detot_agent.errors import ArtefactError, DetotError
from detot_agent.generation import text_seed
from detot_agent.index import ExemplarIndex
from detot_agent.monitor import Monitor, Observation
from detot_agent.rows import BatchedEngine
from detot_agent.task import Adjustments, TaskProfile, analyze
from detot_agent.voting import extract_number, normalize, should_stop, vote

__all__ = ["DETOT"]


def _local_engine(lm: Any) -> LocalEngine | None:
    """The LM's engine when it can also *train* soft prompts (gradients through the HF model)."""
    engine = getattr(lm, "engine", None)
    return engine if isinstance(engine, LocalEngine) else None


def _serving_engine(lm: Any) -> BatchedEngine | None:
    """The LM's engine when it serves batched `sample(request, n, soft_prompt=...)` (local or vLLM)."""
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
            sampling and the task's soft prompt; any other `dspy.LM` is sampled by rollouts.
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
            raise DetotError("DETOT needs an encoder: pass encoder= or an index built with one")
        self.encoder: Encoder = found
        self.lm = lm
        self.background = background
        self.adapter = adapter
        self._default_adapter = LenientChatAdapter()
        embedding = TaskEmbedding.from_description(task.name, task.description or task.name, encoder=self.encoder,
                                                   samples=samples or [])
        engine = _local_engine(lm)
        vectors: torch.Tensor | None = None
        if isinstance(soft_prompt, torch.Tensor):
            vectors = soft_prompt.detach().float().clone()
        elif soft_prompt is None and engine is not None:
            from detot_agent.softprompt import SoftPrompt

            vectors = SoftPrompt.initialize(engine, task.name, k=adj.soft_prompt_k, init="text",
                                            text=adj.soft_prompt_init_text).vectors
        self.monitor = Monitor(agreement_threshold=adj.agreement_threshold,
                               accuracy_threshold=adj.accuracy_threshold, window=adj.window,
                               min_count=adj.min_count, cooldown=adj.cooldown, log_path=event_log)
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
        clone.monitor = Monitor(agreement_threshold=self.monitor.agreement_threshold,
                                accuracy_threshold=self.monitor.accuracy_threshold,
                                window=self.adjustments.window, min_count=self.monitor.min_count,
                                cooldown=self.monitor.cooldown, log_path=self.monitor.log_path)
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

    def _sample_local(self, engine: BatchedEngine, lm: Any, messages: list[dict[str, str]], n: int,
                      soft: torch.Tensor | None, seed: int, *, stop: tuple[str, ...],
                      greedy: bool = False) -> list[tuple[str, int]]:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        chat = tuple(Message.user(m["content"]) if m["role"] == "user" else Message.assistant(m["content"])
                     for m in messages if m["role"] != "system")
        config = Config(temperature=0.0 if greedy else self.adjustments.temperature,
                        max_tokens=self.adjustments.max_tokens, seed=None if greedy else seed,
                        stop=stop)
        request = Request(model=lm.model if lm is not None else engine.name, messages=chat, system=system or None,
                          config=config)
        return [(s.text, s.output_tokens) for s in engine.sample(request, n, soft_prompt=soft)]

    def _sample_rollouts(self, lm: Any, adapter: dspy.Adapter, inputs: dict[str, Any], demos: list[dspy.Example],
                         n: int, *, greedy_first: bool = False) -> list[tuple[dict[str, Any] | None, int]]:
        out: list[tuple[dict[str, Any] | None, int]] = []
        for i in range(n):
            with self._rollout_lock:
                self._rollout += 1
                rid = self._rollout
            sampler = (lm.copy(temperature=0.0) if greedy_first and i == 0
                       else lm.copy(rollout_id=rid, temperature=self.adjustments.temperature))
            try:
                with dspy.context(lm=sampler, adapter=adapter):
                    pred = self.predictor(**inputs, demos=list(self._inner().demos) + demos)
                out.append((dict(pred.items()), 0))
            except Exception:  # an unparseable sample is counted and skipped
                out.append((None, 0))
        return out

    def forward(self, **inputs: Any) -> dspy.Prediction:
        """Answer one input; returns the answer field(s), reasoning, agreement, votes, samples_used,
        parse_failures, demo_ids, embedding_version and an `id` for `feedback`."""
        start = time.perf_counter()
        sig = self._signature()
        missing = [name for name in sig.input_fields if name not in inputs]
        if missing:
            raise DetotError(f"missing input field(s) {missing}; the signature takes {list(sig.input_fields)}")
        text = " ".join(str(inputs[name]) for name in sig.input_fields)
        if not text.strip():
            raise DetotError("the input is empty or whitespace; pass a question")
        state = self.controller.state  # one consistent snapshot for the whole call
        query = self.encoder.encode([text])[0]
        demos, demo_ids = self._demos(state, query)
        lm = self.lm or dspy.settings.lm
        if lm is None:
            raise DetotError("no LM: pass lm= to DETOT or call dspy.configure(lm=...)")
        engine = _serving_engine(lm)
        adj = self.adjustments
        adapter = self.active_adapter()
        # a ChatAdapter reply ends at its end marker: small models otherwise keep writing to max_tokens
        stop = ("[[ ## completed ## ]]",) if isinstance(adapter, dspy.ChatAdapter) else ()
        messages = None
        if engine is not None:
            all_demos = list(self._inner().demos) + demos
            messages = adapter.format(sig, demos=all_demos, inputs=inputs)
        pred_id = uuid.uuid4().hex[:16]
        samples: list[tuple[dict[str, Any] | None, str, str | None]] = []  # (fields, raw text, key)
        tokens = 0
        result = vote([])
        drawn = 0
        while True:
            n = adj.min_samples if drawn == 0 else min(adj.round_size, adj.max_samples - drawn)
            if engine is not None:
                assert messages is not None
                soft = state.soft_prompt
                seed = text_seed(text) + drawn  # same input, same samples
                drawn_now: list[tuple[str, int]] = []
                if drawn == 0 and adj.greedy_first:  # the greedy answer votes first (and so wins ties)
                    drawn_now += self._sample_local(engine, lm, messages, 1, soft, seed, stop=stop, greedy=True)
                if n - len(drawn_now) > 0:
                    drawn_now += self._sample_local(engine, lm, messages, n - len(drawn_now), soft, seed, stop=stop)
                for raw, used in drawn_now:
                    tokens += used
                    try:
                        fields: dict[str, Any] | None = adapter.parse(sig, raw)
                    except Exception:
                        fields = self._stated_answer(raw)
                    samples.append((fields, raw, self._key(fields)))
            else:
                for fields, used in self._sample_rollouts(lm, adapter, inputs, demos, n,
                                                          greedy_first=drawn == 0 and adj.greedy_first):
                    tokens += used
                    samples.append((fields, json.dumps(fields, default=str) if fields else "", self._key(fields)))
            drawn += n
            result = vote([key for _, _, key in samples])
            if should_stop(result, drawn, rule=adj.stopping, threshold=adj.stop_threshold,
                           min_samples=adj.min_samples, max_samples=adj.max_samples):
                break
        winner = next(((f, raw) for f, raw, key in samples if key == result.winner and f is not None), (None, ""))
        fields = winner[0] or {}
        latency = time.perf_counter() - start
        out: dict[str, Any] = {name: fields.get(name) for name in sig.output_fields}
        out.update(answer_key=result.winner, agreement=result.agreement, votes=dict(result.counts),
                   samples_used=drawn, parse_failures=result.unparsed, demo_ids=demo_ids,
                   embedding_version=state.version, id=pred_id, tokens=tokens, latency_s=latency,
                   reason=None if result.winner is not None else f"none of {drawn} samples gave a parseable answer")
        self.controller.add_evidence(Evidence(
            id=pred_id, query=query, demo_ids=demo_ids, agreement=result.agreement, messages=messages,
            target=winner[1] or None, samples=[(raw, key) for _, raw, key in samples]))
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
            raise DetotError("feedback needs gold= or correct=")
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

    def save(self, path: str | Path, **kwargs: Any) -> None:
        """Save to `path` (DSPy JSON) and `<path>.tensors/` (task embedding and soft prompt, safetensors)."""
        from safetensors.torch import save_file

        from detot_agent.persist import atomic_dir

        st = self.controller.state
        side = Path(str(path) + ".tensors")
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"version": st.version, "has_soft_prompt": st.soft_prompt is not None}
        if st.embedding is not None:
            es = st.embedding.state_dict()
            tensors.update({f"embedding.{k}": es[k] for k in ("t", "w", "w_init")})
            meta.update(alpha=float(es["alpha"]), alpha_init=float(es["alpha_init"]), task=st.embedding.task,
                        encoder=st.embedding.encoder_name)
        if st.soft_prompt is not None:
            tensors["soft_prompt"] = st.soft_prompt.contiguous()
        with atomic_dir(side, kind="detot-program-tensors", version=1, meta=meta) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        # DSPy writes the JSON in place; write it beside the target and rename, so a crash leaves the old file
        target = Path(path)
        staging = target.with_name(f".{target.stem}.tmp-{os.getpid()}-{threading.get_ident()}{target.suffix}")
        try:
            super().save(str(staging), **kwargs)
            with staging.open("rb+") as f:
                os.fsync(f.fileno())
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)

    def load(self, path: str | Path, **kwargs: Any) -> DETOT:
        """Load what `save` wrote; validates shapes, finiteness and the encoder."""
        from safetensors.torch import load_file

        from detot_agent.persist import read_manifest
        from detot_agent.softprompt import check_soft_prompt

        side = Path(str(path) + ".tensors")
        m = read_manifest(side, kind="detot-program-tensors", max_version=1)
        try:
            tensors = load_file(str(Path(m["_dir"]) / "tensors.safetensors"))
        except Exception as exc:  # safetensors' own errors: name the file
            raise ArtefactError(f"{side}: unreadable tensors ({exc})") from None
        # validate everything before changing anything: a failed load leaves the current state serving
        embedding = None
        if "embedding.t" in tensors:
            if m.get("encoder") != self.index.encoder_name:
                raise ArtefactError(f"{side}: task embedding built with encoder {m.get('encoder')!r}, this index "
                                    f"uses {self.index.encoder_name!r}")
            try:
                embedding = TaskEmbedding(m["task"], tensors["embedding.t"].numpy(), encoder_name=m["encoder"])
                embedding.load_state_dict({"t": tensors["embedding.t"], "w": tensors["embedding.w"],
                                           "w_init": tensors["embedding.w_init"], "alpha": m["alpha"],
                                           "alpha_init": m["alpha_init"], "version": m["version"]})
            except (DetotError, KeyError) as exc:
                raise ArtefactError(f"{side}: {exc}") from None
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
