"""The sample drawers of a DETOT call: `draw(n, drawn)`, pipeline steps (`steps.py`) returning `[ParsedSample]`,
that `vote_steps` (`sampling.py`) runs once per round.

- `engine_drawer`: a batched engine (torch, llama.cpp, vLLM): one `sample(n)` per round, the greedy answer
  first, the input's soft prompt in front, recorded on the LM as one DSPy call;
- `rollout_drawer`: any other `dspy.LM`: one rollout of the inner predictor per sample;
- `pooled`: the `mix` strategy: each round half chain-of-thought, half program-of-thought samples.

Plus what the program-of-thought side needs: `program_fields` (a PoT reply's fields) and `pot_demos`
(`(question, program)` demos from retrieved exemplars).

Example:
    >>> from detot_agent.detot.steps import now, run_steps
    >>> calls = []
    >>> side = lambda name: lambda n, drawn: now(calls.append((name, n, drawn)) or [name] * n)
    >>> draw = pooled(side("cot"), side("pot"))
    >>> run_steps(draw(3, 0)), run_steps(draw(2, 3))
    (['cot', 'cot', 'pot'], ['cot', 'pot'])
    >>> calls
    [('cot', 2, 0), ('pot', 1, 0), ('cot', 1, 2), ('pot', 1, 1)]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import dspy
import torch

from detot_agent.answers import format_number
from detot_agent.detot.records import ParsedSample
from detot_agent.detot.sampling import engine_request, round_seed
from detot_agent.detot.steps import EngineCall, Steps, now
from detot_agent.detot.strategies import parse_program, rationale_to_program
from detot_agent.detot.task import Adjustments
from detot_agent.engines.base import BatchedEngine
from detot_agent.engines.generation import text_seed

__all__ = ["Drawer", "engine_drawer", "pooled", "pot_demos", "program_fields", "reply_parser", "rollout_drawer"]

Drawer = Callable[[int, int], Steps[list[ParsedSample]]]
"""`draw(n, drawn)`: `n` more samples, `drawn` already drawn for this input (pipeline steps)."""
Fields = dict[str, Any] | None
KeyOf = Callable[[Fields], str | None]


def reply_parser(adapter: dspy.Adapter, sig: Any, fallback: Callable[[str], Fields]) -> Callable[[str], Fields]:
    """A reply parser for the adapter's layout; `fallback(text)` reads a reply that broke it (None: no answer)."""
    def parse(text: str) -> Fields:
        try:
            return dict(adapter.parse(sig, text))
        except Exception:
            return fallback(text)

    return parse


def engine_drawer(engine: BatchedEngine, lm: Any, parse: Callable[[str], Fields], key: KeyOf,
                  messages: list[dict[str, str]], soft: torch.Tensor | None, text: str, record: bool,
                  adj: Adjustments, *, stop: tuple[str, ...] = (), strategy: str = "cot",
                  seed_offset: int = 0) -> Drawer:
    """A round drawer for a batched engine: one `sample(n)` per round (greedy answer first), recorded on `lm`
    as one LM call (history, usage, callbacks) when `record`; `parse(text)` reads a reply's fields, `key` turns
    them into a vote key. `soft` is the input's soft prompt `(k, hidden)` or None."""
    model = lm.model if lm is not None else engine.name

    def draw(n: int, drawn: int) -> Steps[list[ParsedSample]]:
        # same input, same samples; the i-th sampled answer has the same seed however rounds split the budget
        seed = round_seed(text_seed(text) + seed_offset, drawn, greedy_first=adj.greedy_first)
        # the greedy answer votes first (and so wins ties); it shares the round's prefill
        greedy = 1 if drawn == 0 and adj.greedy_first else 0
        request = engine_request(model, messages, seed=seed, stop=stop, temperature=adj.temperature,
                                 max_tokens=adj.max_tokens)
        out = yield EngineCall(lm if record else None, engine, request, n, soft, greedy)
        parsed = []
        for s in out:
            fields = parse(s.text)
            parsed.append(ParsedSample(text=s.text, key=key(fields), tokens=s.output_tokens,
                                       logprob=s.logprob, fields=fields, strategy=strategy))
        return parsed

    return draw


def rollout_drawer(predictor: Any, lm: Any, adapter: dspy.Adapter, inputs: dict[str, Any],
                   demos: list[dspy.Example], adj: Adjustments, key: KeyOf,
                   next_rollout: Callable[[], int]) -> Drawer:
    """A round drawer for any other `dspy.LM`: one rollout per sample (an unparseable one counts as None).

    Each rollout is `predictor` called with `lm=` a copy of `lm` carrying its own temperature and rollout id
    (`next_rollout()`; so an LM set on the predictor cannot override them, and DSPy's cache keeps distinct
    samples apart); its trace entries are dropped, since the call's trace records the winner only.
    """

    def draw(n: int, drawn: int) -> Steps[list[ParsedSample]]:
        return now(rollouts(n, drawn))  # synchronous DSPy calls: no engine round to hand out

    def rollouts(n: int, drawn: int) -> list[ParsedSample]:
        out = []
        for i in range(n):
            rid = next_rollout()
            sampler = (lm.copy(temperature=0.0) if adj.greedy_first and drawn == 0 and i == 0
                       else lm.copy(rollout_id=rid, temperature=adj.temperature))
            try:
                with dspy.context(lm=sampler, adapter=adapter, trace=[]):
                    pred = predictor(**inputs, demos=demos, lm=sampler)
                fields: Fields = dict(pred.items())
            except Exception:  # an unparseable sample is counted and skipped
                fields = None
            out.append(ParsedSample(text=json.dumps(fields, default=str) if fields else "", key=key(fields),
                                    fields=fields))
        return out

    return draw


def pooled(cot: Drawer, pot: Drawer) -> Drawer:
    """The `mix` strategy's drawer: each round half CoT samples (the greedy one among them), half PoT.

    Each side is told how many samples *it* has drawn, so its seeds run as they do when it serves alone: a
    mix's CoT samples are a prefix of a CoT-only run's for the same question, and likewise for PoT.
    """
    taken = {"cot": 0, "pot": 0}

    def draw(n: int, drawn: int) -> Steps[list[ParsedSample]]:
        half = (n + 1) // 2
        out = yield from cot(half, taken["cot"])
        taken["cot"] += half
        if n - half:
            out += yield from pot(n - half, taken["pot"])
            taken["pot"] += n - half
        return out

    return draw


def program_fields(text: str, answer_field: str) -> Fields:
    """A PoT reply's fields under the signature's names: `reasoning` (the program) and the answer field."""
    ran = parse_program(text)
    return None if ran is None else {"reasoning": ran["reasoning"], answer_field: ran["answer"]}


def pot_demos(demos: list[dspy.Example], first_input: str, answer_field: str) -> list[tuple[str, str]]:
    """`(question, program)` demos for a PoT prompt: a demo whose reasoning already is a program that gives its
    answer (an optimizer's PoT trace), else its rationale turned into one; others are left out."""
    out = []
    for d in demos:
        answer, reasoning = d.get(answer_field), d.get("reasoning")
        if d.get(first_input) is None or answer is None:
            continue
        ran = parse_program(str(reasoning)) if reasoning else None
        program = (str(reasoning) if ran is not None and ran["answer"] == format_number(str(answer))
                   else rationale_to_program(None if reasoning is None else str(reasoning), answer))
        if program is not None:
            out.append((str(d[first_input]), program))
    return out
