"""The compared methods, each a named recipe that answers one example and reports what it spent.

Methods are named by what they are (0.3's names still work: `evaluation/names.py`). `cot`, the
matched-budget baselines (`sc`, `sc_adaptive`, `cisc`, `pot`) and `detot`/`detot_loop` prompt in plain
text, all in one prompt: the question, then "Let's think step by step." (`COT_CUE`, `PlainAdapter`'s
cue; the prompt DETOT's arithmetic soft prompt was trained on). The `dspy_*` methods are DSPy modules:
they run on the same LM and the same adapter (`LenientChatAdapter`, DSPy's field layout), and parse
the answer the same way: the signature's answer field, else (numeric tasks) an explicit "The answer
is N" in a reply that broke the field layout. Greedy methods run at temperature 0.

| name | what it is |
|---|---|
| `cot` | question + "Let's think step by step." as one message, greedy, no DSPy adapter (reference) |
| `sc` ... `pot` | matched-budget baselines in DETOT's plain prompt (`evaluation/baselines.py`) |
| `detot` | DETOT in the plain prompt (`PlainAdapter`): task-adapted retrieval, soft prompt, adaptive voting; no loop |
| `detot_loop` | `detot` with the monitor and background re-optimization |
| `dspy_predict` | `dspy.Predict("question -> answer")` |
| `dspy_cot` | `dspy.ChainOfThought("question -> answer")` |
| `dspy_fewshot_cot` | ChainOfThought with `k` demos drawn once from the exemplar pool (seeded) |
| `dspy_knn_fewshot` | ChainOfThought with the `k` nearest pool examples by `dspy.KNN` (DSPy's kNN demos) |
| `dspy_sc` | `n` ChainOfThought samples at `temperature`, `dspy.majority` of the answers |
| `dspy_detot` | `detot` in DSPy's field layout |
| `dspy_detot_loop` | `detot_loop` in DSPy's field layout |

`dspy_knn_fewshot` uses `dspy.KNN`, the retriever inside `dspy.KNNFewShot`, and attaches its
neighbours as labelled demos: `KNNFewShot.compile` would re-run `BootstrapFewShot` (with its own
progress bar and print) on every call to produce the same labelled demos.

Example:
    >>> sorted(name for name in METHODS if "detot" in name)
    ['detot', 'detot_loop', 'dspy_detot', 'dspy_detot_loop']
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy

from detot_agent.answers import extract_number
from detot_agent.detot.adapters import COT_CUE, PlainAdapter
from detot_agent.detot.controller import ControllerConfig
from detot_agent.detot.task import AnswerFormat, TaskKind, TaskProfile, analyze
from detot_agent.errors import ConfigError
from detot_agent.evaluation.baselines import BASELINES
from detot_agent.evaluation.context import SIGNATURE, EvalContext, MethodRunner, count_tokens, sample_seed
from detot_agent.evaluation.names import current
from detot_agent.retrieval.encoder import Encoder

__all__ = ["ABLATABLE", "METHODS", "EvalContext", "MethodRunner", "build_method", "check_method",
           "expand_ablations", "missing_requirements", "needs_index", "split_ablation"]


class PlainCoT(MethodRunner):
    """Zero-shot CoT without DSPy's field layout, in the shared plain prompt (the greedy draw of `plain_sc`)."""

    name = "cot"
    cue = COT_CUE

    def config(self) -> dict[str, Any]:
        return {**super().config(), "cue": self.cue}

    def __call__(self, example: dspy.Example) -> dict[str, Any]:
        out = self.greedy(f"{example.question}\n{self.cue}")  # one user message
        raw = str(out[0] if out else "")
        if self.ctx.answer_format is AnswerFormat.NUMBER:
            answer = extract_number(raw)[0]  # the stated answer, else the last number
        else:
            answer = raw.strip().splitlines()[-1] if raw.strip() else None
        return self._record(answer, tokens=count_tokens(raw, self.greedy), samples=1,
                            parse_failures=int(answer is None))


class ZeroShot(MethodRunner):
    name = "dspy_predict"

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self.program = dspy.Predict(SIGNATURE)

    def __call__(self, example: dspy.Example) -> dict[str, Any]:
        answer, tokens, ok = self._call(self.program, self.greedy, example.question)
        return self._record(answer, tokens=tokens, samples=1, parse_failures=int(not ok))


class ZeroShotCoT(ZeroShot):
    name = "dspy_cot"

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self.program = dspy.ChainOfThought(SIGNATURE)


class FewShotCoT(MethodRunner):
    name = "dspy_fewshot_cot"
    needs_index = True

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        pool = ctx.pool()
        self.demos = random.Random(ctx.seed).sample(pool, min(ctx.k, len(pool)))
        self.program = dspy.ChainOfThought(SIGNATURE)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.ctx.k, "demo_ids": [d.id for d in self.demos]}

    def __call__(self, example: dspy.Example) -> dict[str, Any]:
        answer, tokens, ok = self._call(self.program, self.greedy, example.question, self.demos)
        return self._record(answer, tokens=tokens, samples=1, parse_failures=int(not ok),
                            demo_ids=[d.id for d in self.demos])


class KNNFewShotCoT(MethodRunner):
    name = "dspy_knn_fewshot"
    needs_index = True

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        pool = ctx.pool()
        encoder = ctx.encoder or (ctx.index.encoder if ctx.index is not None else None) or Encoder()
        # KNN embeds "question: ..." strings of the trainset's input fields with the given embedder
        self.knn = dspy.KNN(k=min(ctx.k, len(pool)), trainset=pool,
                            vectorizer=dspy.Embedder(lambda texts: encoder.encode(list(texts))))
        self.program = dspy.ChainOfThought(SIGNATURE)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.ctx.k}

    def __call__(self, example: dspy.Example) -> dict[str, Any]:
        demos = list(self.knn(question=example.question))
        answer, tokens, ok = self._call(self.program, self.greedy, example.question, demos)
        return self._record(answer, tokens=tokens, samples=1, parse_failures=int(not ok),
                            demo_ids=[d.get("id") for d in demos])


class SelfConsistency(MethodRunner):
    name = "dspy_sc"

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self.program = dspy.ChainOfThought(SIGNATURE)

    def config(self) -> dict[str, Any]:
        return {"n": self.ctx.n, "temperature": self.ctx.temperature, "max_tokens": self.ctx.max_tokens}

    def __call__(self, example: dspy.Example) -> dict[str, Any]:
        ctx = self.ctx

        def one(i: int) -> tuple[Any, int, bool]:
            # rollout_id separates DSPy's cache entries; the seed makes each sample reproducible
            lm = ctx.lm.copy(rollout_id=i, temperature=ctx.temperature, max_tokens=ctx.max_tokens,
                             seed=sample_seed(example.question, i))
            return self._call(self.program, lm, example.question)

        # concurrent samples: the engine's dynamic batcher decodes them in one batch
        with ThreadPoolExecutor(ctx.n) as pool:
            outs = list(pool.map(one, range(ctx.n)))
        answers = [dspy.Prediction(answer=a) for a, _, _ in outs if a is not None]
        tokens = sum(t for _, t, _ in outs)
        failures = sum(1 for _, _, ok in outs if not ok)
        if not answers:
            return self._record(None, tokens=tokens, samples=ctx.n, parse_failures=failures)
        best = dspy.majority(answers, normalize=ctx.key, field="answer")
        keys = [ctx.key(a.answer) for a in answers]
        top = keys.count(ctx.key(best.answer))
        return self._record(best.answer, tokens=tokens, samples=ctx.n, parse_failures=failures,
                            agreement=top / ctx.n, votes={k: keys.count(k) for k in dict.fromkeys(keys) if k})


ABLATABLE = ("retrieval", "softprompt", "loop", "dynamic", "strategy")


def split_ablation(name: str) -> tuple[str, frozenset[str]]:
    """`"detot_loop-retrieval+softprompt"` -> `("detot_loop", {"retrieval", "softprompt"})`.

    Example:
        >>> split_ablation("detot-retrieval")
        ('detot', frozenset({'retrieval'}))
    """
    base, _, rest = name.partition("-")
    return base, frozenset(p for p in rest.split("+") if p)


class DetotMethod(MethodRunner):
    """A DETOT method; `ablate` switches parts off (named `<method>-<part>[+<part>]`):

    - `retrieval`: no retrieved demos (`k = 0`);
    - `softprompt`: no soft-prompt vectors (the task embedding's head is dropped);
    - `loop`: no re-optimization (for the looping methods);
    - `dynamic`: the per-input prompt `P(x)` replaced by its static part `P0` (task embeddings with `M > 0`);
    - `strategy`: chain of thought instead of the run's `--strategy pot|mix`.
    """

    name = "dspy_detot"
    background = False
    plain = False
    needs_index = True

    def __init__(self, ctx: EvalContext, ablate: frozenset[str] = frozenset()) -> None:
        super().__init__(ctx)
        from detot_agent.detot.module import DETOT

        unknown = sorted(ablate - set(ABLATABLE))
        if unknown:
            raise ConfigError(f"unknown ablation(s) {unknown}; choose from {', '.join(ABLATABLE)}")
        if "loop" in ablate and not self.background:
            raise ConfigError(f"{self.name} has no loop to ablate; ablate `loop` on detot_loop or dspy_detot_loop")
        if "strategy" in ablate and ctx.strategy in (None, "cot"):
            raise ConfigError("the `strategy` ablation replaces --strategy pot or mix by cot; this run uses cot")
        self.ablate = ablate
        if ablate:
            self.name = f"{self.name}-{'+'.join(sorted(ablate))}"
        self.background = self.background and "loop" not in ablate
        embedding = copy.deepcopy(ctx.task_embedding)  # each method its own copy: a learning one moves only its own
        no_soft = ctx.no_soft_prompt or "softprompt" in ablate
        if embedding is not None and no_soft:
            embedding.head = None
        if "dynamic" in ablate:
            head = None if embedding is None else embedding.head
            if embedding is None or head is None or head.components == 0:
                raise ConfigError("the `dynamic` ablation needs a task embedding whose head has components (M > 0); "
                                  "this one serves a static prompt")
            embedding.attach_head(head.p0, components=0, model_id=embedding.model_id or "unknown")

        if ctx.index is None and ctx.k > 0 and ctx.fit is None:
            ctx.pool()  # raises the "needs an exemplar pool" error
        if ctx.index is None and ctx.encoder is None:  # k = 0 or a fit: DETOT serves without an index
            ctx.encoder = Encoder()  # one encoder for every method of the run
        number = ctx.answer_format is AnswerFormat.NUMBER
        kind = TaskKind.ARITHMETIC if number else (
            TaskKind.CLASSIFICATION if ctx.answer_format is AnswerFormat.LABEL else TaskKind.OPEN_QA)
        desc = ("Solve arithmetic word problems step by step." if number else
                f"Answer with one of: {', '.join(ctx.labels)}." if ctx.labels else "Answer the question.")
        self.task = TaskProfile(name=ctx.task_name, description=desc, kind=kind,
                                answer_format=ctx.answer_format, labels=ctx.labels or None)
        self.adjustments = analyze(self.task, ctx.questions[:5], max_samples=ctx.n + 1, max_tokens=ctx.max_tokens,
                                   k_exemplars=0 if "retrieval" in ablate or ctx.index is None else ctx.k,
                                   temperature=ctx.temperature,
                                   **({"strategy": "cot" if "strategy" in ablate else ctx.strategy}
                                      if ctx.strategy else {}),
                                   **({"weighting": ctx.weighting} if ctx.weighting else {}),
                                   **({"cooldown": ctx.reopt_cooldown} if ctx.reopt_cooldown is not None else {}))
        log = ctx.events_dir / f"{self.name}.events.jsonl" if ctx.events_dir is not None else None
        # a looping method's evidence buffer, so a resumed run re-optimizes from what the stopped one had
        evidence = ctx.events_dir / f"{self.name}.evidence.jsonl" if ctx.events_dir and self.background else None
        loop: dict[str, Any] = {"policies": list(ctx.loop_policies)}  # ControllerConfig's defaults otherwise
        if ctx.reopt_seconds is not None:
            loop["max_seconds"] = ctx.reopt_seconds
        if ctx.replay_items is not None:
            loop["replay_items"] = ctx.replay_items
        if ctx.judging == "shadow" and self.background:  # gold outcomes from feedback, else from agreement
            loop.update(judging="shadow", shadow={"outcomes": "gold" if ctx.feedback == "gold" else "agreement",
                                                  **ctx.shadow_settings,
                                                  **({"share": ctx.shadow_share} if ctx.shadow_share else {})})
        self.program = DETOT(SIGNATURE, task=self.task, index=ctx.index, encoder=ctx.encoder, lm=ctx.lm,
                             adjustments=self.adjustments,
                             soft_prompt=False if no_soft else ctx.soft_prompt, background=self.background,
                             event_log=log, evidence_log=evidence, task_embedding=embedding,
                             controller_config=ControllerConfig(**loop),
                             adapter=PlainAdapter() if self.plain else None,
                             canary=[dspy.Example(question=q, answer=a).with_inputs("question")
                                     for q, a in ctx.canary] or None)
        if self.program.controller.shadow is not None and ctx.events_dir is not None:  # each shadow pair's answers
            self.program.controller.shadow.record_to(ctx.events_dir / f"{self.name}.shadow.jsonl")
        if ctx.fit is not None:  # the fit's shipped configuration and task embedding (validated by `load`)
            self.program.load(ctx.fit)
            if self.program.adjustments.k_exemplars > 0 and ctx.index is None:
                raise ConfigError(f"the fit {ctx.fit} serves {self.program.adjustments.k_exemplars} demos: pass the "
                                  "--index it was fitted with")
            # the token cap is the run's budget (the baselines' too), not a fitted choice
            self.program.adjustments = self.program.adjustments.model_copy(update={"max_tokens": ctx.max_tokens})
            self.adjustments = self.program.adjustments

    def config(self) -> dict[str, Any]:
        return {"adjustments": self.adjustments.model_dump(mode="json", exclude={"applied"}), "fit": self.ctx.fit,
                "trained_soft_prompt": self.ctx.soft_prompt is not None or self.ctx.task_embedding is not None,
                "task_embedding": None if self.ctx.task_embedding is None else repr(self.ctx.task_embedding),
                "reoptimization": self.background, "feedback": self.ctx.feedback,
                "reopt_seconds": self.ctx.reopt_seconds, "canary": len(self.ctx.canary),
                "replay_items": self.program.controller.config.replay_items,
                "judging": self.program.controller.config.judging,
                "loop_policies": [p.describe() for p in self.ctx.loop_policies] if self.background else [],
                "ablate": sorted(self.ablate),
                "soft_prompt_off": self.ctx.no_soft_prompt or "softprompt" in self.ablate,
                "adapter": type(self.program.active_adapter()).__name__}

    def __call__(self, example: dspy.Example) -> dict[str, Any]:
        pred = self.program(question=example.question)
        extra: dict[str, Any] = {}
        if self.ctx.feedback == "gold":  # prequential: answered first, then told the gold answer
            extra["fed_back"] = self.program.feedback(pred, gold=example.answer)
        return self._record(pred.answer, tokens=pred.tokens, samples=pred.samples_used,
                            parse_failures=pred.parse_failures, agreement=pred.agreement, votes=pred.votes,
                            demo_ids=pred.demo_ids, embedding_version=pred.embedding_version,
                            sample_keys=pred.sample_keys, sample_tokens=pred.sample_tokens,
                            sample_logprobs=pred.sample_logprobs, request=pred.id, **extra)

    def close(self) -> None:
        """Wait for a running re-optimization, feed the shadow outcomes still pending, stop the background work."""
        self.program.controller.wait()
        self.program.controller.settle_shadow()
        self.program.controller.close()


class DspyDetotLoop(DetotMethod):
    name = "dspy_detot_loop"
    background = True
    stateful = True


class Detot(DetotMethod):
    name = "detot"
    plain = True


class DetotLoop(DspyDetotLoop):
    name = "detot_loop"
    plain = True


METHODS: dict[str, Callable[[EvalContext], MethodRunner]] = {
    PlainCoT.name: PlainCoT, **BASELINES,
    **{cls.name: cls for cls in (Detot, DetotLoop, ZeroShot, ZeroShotCoT, FewShotCoT, KNNFewShotCoT, SelfConsistency,
                                 DetotMethod, DspyDetotLoop)},
}


def check_method(name: str) -> None:
    """Refuse an unknown method, or an ablation of a method that is not DETOT's, naming what exists (a 0.3 name
    is read as its 0.4 name, `names.current`)."""
    base, parts = split_ablation(current(name))
    if base not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (DETOT methods also as "
                          f"<method>-<part>[+<part>], parts: {', '.join(ABLATABLE)})")
    if parts or "-" in name:
        cls = METHODS[base]
        if not (isinstance(cls, type) and issubclass(cls, DetotMethod)):
            raise ConfigError(f"{name!r}: only DETOT methods take ablations, not {base!r}")
        unknown = sorted(parts - set(ABLATABLE))
        if unknown or not parts:
            raise ConfigError(f"{name!r}: unknown ablation(s) {unknown or ['(none)']}; choose from "
                              f"{', '.join(ABLATABLE)}")


def expand_ablations(names: list[str], parts: list[str]) -> list[str]:
    """`names` plus `<method>-<part>` for each DETOT method among them and each part (`loop` only for the
    looping methods), as `detot eval --ablate` asks.

    Example:
        >>> expand_ablations(["cot", "detot", "detot_loop"], ["retrieval", "loop"])
        ['cot', 'detot', 'detot_loop', 'detot-retrieval', 'detot_loop-retrieval', 'detot_loop-loop']
    """
    detot = {n: c for n, c in METHODS.items() if isinstance(c, type) and issubclass(c, DetotMethod)}
    names = [current(n) for n in names]
    out = list(names)
    for part in parts:
        for name in names:
            cls = detot.get(name)
            if cls is not None and (part != "loop" or cls.background) and f"{name}-{part}" not in out:
                out.append(f"{name}-{part}")
    if len(out) == len(names):
        raise ConfigError(f"--ablate needs a DETOT method in --methods (one of {', '.join(detot)})")
    return out


def _is_detot(name: str) -> bool:
    cls = METHODS[split_ablation(current(name))[0]]
    return isinstance(cls, type) and issubclass(cls, DetotMethod)


def needs_index(name: str) -> bool:
    """Whether the method (or ablation) `name` draws demos from the exemplar pool."""
    return bool(getattr(METHODS[split_ablation(current(name))[0]], "needs_index", False))


def missing_requirements(names: list[str], *, index: bool, k: int = 3, fit: bool = False) -> list[str]:
    """What the methods `names` need and were not given, one line each (checked before anything loads).

    Example:
        >>> missing_requirements(["cot", "dspy_fewshot_cot", "detot"], index=False)[0][:48]
        'dspy_fewshot_cot, detot need an exemplar pool: p'
        >>> missing_requirements(["cot"], index=False)
        []
    """
    out = []
    retrieve = k > 0 and not fit  # the DETOT methods read demos only then (a fit says its k itself)
    pooled = [n for n in names if needs_index(n) and (retrieve or not _is_detot(n))]
    if pooled and not index:
        verb = "needs" if len(pooled) == 1 else "need"
        out.append(f"{', '.join(pooled)} {verb} an exemplar pool: pass --index DIR (build one with "
                   "`detot index build --data TRAIN_FILE --out DIR`)")
    return out


def build_method(name: str, ctx: EvalContext) -> MethodRunner:
    """Build the named method on `ctx` (`<detot method>-<part>+...` builds an ablation); unknown names get the
    list of known ones."""
    name = current(name)
    check_method(name)
    base, parts = split_ablation(name)
    cls = METHODS[base]
    if parts:
        assert isinstance(cls, type) and issubclass(cls, DetotMethod)
        return cls(ctx, ablate=parts)
    return cls(ctx)
