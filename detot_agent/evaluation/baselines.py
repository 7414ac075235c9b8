"""Matched-budget baselines in DETOT's own plain prompt, on the same batched engine path.

Each builds the prompt DETOT's plain methods send without demos (`PlainAdapter`: the question plus
"Let's think step by step."), draws through `sample_engine` (one prefill, the greedy answer first,
the same seeds as DETOT for the same question) and votes with `vote_in_rounds`: they differ from
DETOT only in what DETOT adds (retrieved demos, the soft prompt, the loop), so a comparison says
what those parts earn.

The three voting baselines draw the same samples for a question (the same seeds, rounds seeded by
`round_seed`), so in a run folder where `sc` already answered a question, `sc_adaptive` and
`cisc` re-vote its recorded samples (vote key, tokens, log-probability, in the order drawn) under
their own rule instead of drawing them again: the same outcome without the engine's batch-to-batch
noise, at no generation cost (their records say `revoted_from`, and their seconds per question are
not a timing). Elsewhere (no `sc` records, a Ray executor) they draw.

| name | what it is |
|---|---|
| `sc` | self-consistency: the greedy answer, then `n` samples at `temperature`, majority vote |
| `sc_adaptive` | the same budget (`n + 1` at most) with the Beta stopping rule (Adaptive-Consistency) |
| `cisc` | `sc` with confidence-weighted votes (CISC: softmax of mean token log-probs) |
| `pot` | greedy program of thought: the model writes a short Python program, `run_program` runs it |

Example:
    >>> from detot_agent.evaluation.baselines import BASELINES
    >>> list(BASELINES)
    ['sc', 'sc_adaptive', 'cisc', 'pot']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dspy

from detot_agent.answers import extract_number
from detot_agent.detot.adapters import PlainAdapter
from detot_agent.detot.pot import run_program
from detot_agent.detot.records import ParsedSample
from detot_agent.detot.sampling import round_seed, sample_engine, vote_in_rounds
from detot_agent.detot.strategies import POT_CUE, extract_program, pot_messages
from detot_agent.detot.task import AnswerFormat, StoppingRule, TaskProfile, Weighting, analyze
from detot_agent.engines.base import BatchedEngine
from detot_agent.engines.generation import text_seed
from detot_agent.errors import ConfigError, ProgramError
from detot_agent.evaluation.context import SIGNATURE, EvalContext, MethodRunner
from detot_agent.io.jsonlog import JsonlLog

__all__ = ["BASELINES", "PlainPoT", "PlainVote"]



def _engine(ctx: EvalContext) -> BatchedEngine:
    engine = getattr(ctx.lm, "engine", None)
    if not isinstance(engine, BatchedEngine):
        raise ConfigError("the matched-budget baselines (sc, sc_adaptive, cisc, pot) sample through a local or "
                          "vLLM engine (`sample(n)`); this LM "
                          "has none")
    return engine


class PlainVote(MethodRunner):
    """Greedy first, then samples, voted; `stopping` and `weighting` name the rule."""

    name = "sc"
    stopping = StoppingRule.FIXED
    weighting = Weighting.UNIFORM

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self.engine = _engine(ctx)
        self.plain = PlainAdapter()
        self.signature = dspy.ChainOfThought(SIGNATURE).predict.signature
        budget = ctx.n + 1  # DETOT's adaptive budget: the greedy answer and n samples
        fixed = self.stopping is StoppingRule.FIXED
        self.adjustments = analyze(TaskProfile(name=ctx.task_name, answer_format=ctx.answer_format),
                                   stopping=self.stopping, weighting=self.weighting, max_samples=budget,
                                   min_samples=budget if fixed else min(2, budget), round_size=2,
                                   temperature=ctx.temperature, max_tokens=ctx.max_tokens)

        self.recorded = self._recorded_draws() if self.name != PlainVote.name else {}

    def _recorded_draws(self) -> dict[str, list[ParsedSample]]:
        """`sc`'s recorded samples per question id, from this run folder (empty: none usable)."""
        run_dir = self.ctx.events_dir
        path = None if run_dir is None else run_dir / f"{PlainVote.name}.jsonl"
        if path is None or not path.exists():
            return {}
        out = {}
        for r in JsonlLog(path).read():
            keys, tokens, logprobs = r.get("sample_keys"), r.get("sample_tokens"), r.get("sample_logprobs")
            if (r.get("error") or not isinstance(r.get("id"), str) or not isinstance(keys, list)
                    or len(keys) != self.adjustments.max_samples or not isinstance(tokens, list)
                    or not isinstance(logprobs, list) or not len(keys) == len(tokens) == len(logprobs)):
                continue  # an older record, a failure, another budget: that question is drawn again
            out[r["id"]] = [ParsedSample("", key=k, tokens=int(t), logprob=lp,
                                         fields=None if k is None else {"answer": k})
                            for k, t, lp in zip(keys, tokens, logprobs, strict=True)]
        return out

    def config(self) -> dict[str, Any]:
        adj = self.adjustments
        return {"max_samples": adj.max_samples, "stopping": adj.stopping.value, "weighting": adj.weighting.value,
                "temperature": adj.temperature, "max_tokens": adj.max_tokens, "prompt": "PlainAdapter, no demos",
                **({"revoted_from": PlainVote.name, "revoted_questions": len(self.recorded)} if self.recorded else {})}

    def _parse(self, text: str) -> dict[str, Any] | None:
        try:
            return self.plain.parse(self.signature, text)
        except Exception:
            if self.ctx.answer_format is not AnswerFormat.NUMBER:
                return None
            value, stated = extract_number(text)
            return {"answer": value} if stated and value is not None else None

    def __call__(self, example: dspy.Example) -> dict[str, Any]:
        adj, q = self.adjustments, example.question
        messages = self.plain.format(self.signature, demos=[], inputs={"question": q})
        recorded = self.recorded.get(str(example.get("id")))

        def replay(n: int, drawn: int) -> list[ParsedSample]:
            assert recorded is not None
            return recorded[drawn:drawn + n]

        def draw(n: int, drawn: int) -> list[ParsedSample]:
            out = sample_engine(self.engine, self.engine.name, messages, n, soft_prompt=None,
                                seed=round_seed(text_seed(q), drawn, greedy_first=True), stop=(),
                                temperature=adj.temperature,
                                max_tokens=adj.max_tokens, greedy=1 if drawn == 0 else 0)
            parsed = []
            for s in out:
                fields = self._parse(s.text)
                key = self.ctx.key(fields.get("answer")) if fields else None
                parsed.append(ParsedSample(s.text, key=key, tokens=s.output_tokens, logprob=s.logprob, fields=fields))
            return parsed

        samples, result, drawn = vote_in_rounds(draw if recorded is None else replay, adj)
        winner = next((s for s in samples if s.key == result.winner and s.fields), None)
        return self._record(None if winner is None or winner.fields is None else winner.fields.get("answer"),
                            tokens=sum(s.tokens for s in samples), samples=drawn, parse_failures=result.unparsed,
                            agreement=result.agreement, votes=dict(result.counts),
                            sample_keys=[s.key for s in samples], sample_tokens=[s.tokens for s in samples],
                            sample_logprobs=[s.logprob for s in samples],
                            **({"revoted_from": PlainVote.name} if recorded is not None else {}))


class PlainAdaptive(PlainVote):
    name = "sc_adaptive"
    stopping = StoppingRule.BETA


class PlainCISC(PlainVote):
    name = "cisc"
    weighting = Weighting.CISC


class PlainPoT(MethodRunner):
    """Greedy program of thought: the program is run by the safe evaluator (`detot/pot.py`)."""

    name = "pot"

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        if ctx.answer_format is not AnswerFormat.NUMBER:
            raise ConfigError("pot answers numeric suites only")
        self.engine = _engine(ctx)

    def config(self) -> dict[str, Any]:
        return {"max_tokens": self.ctx.max_tokens, "temperature": 0.0, "cue": POT_CUE}

    def __call__(self, example: dspy.Example) -> dict[str, Any]:
        messages = pot_messages(example.question, [])  # DETOT's PoT prompt, without demos
        out = sample_engine(self.engine, self.engine.name, messages, 1, soft_prompt=None, seed=text_seed(
            example.question), stop=(), temperature=0.0, max_tokens=self.ctx.max_tokens)[0]
        try:
            answer: Any = run_program(extract_program(out.text))
            error = None
        except ProgramError as exc:
            answer, error = None, str(exc)
        return self._record(answer, tokens=out.output_tokens, samples=1, parse_failures=int(answer is None),
                            program_error=error)


BASELINES: dict[str, Callable[[EvalContext], MethodRunner]] = {
    cls.name: cls for cls in (PlainVote, PlainAdaptive, PlainCISC, PlainPoT)}
