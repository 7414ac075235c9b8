"""DETOT's sampling loop: draw answers in rounds until the stopping rule is satisfied.

Two ways to draw a round: through a batched engine (`local_lm` or vLLM: one
`engine.sample(request, n, soft_prompt=...)` per round, so the samples of one input
share one prefill) or, for any other `dspy.LM`, one rollout per sample
(`lm.copy(rollout_id=i, temperature=t)`). Either way each sample becomes a
`ParsedSample` (text, tokens, log-probability, parsed fields, vote key), and
`vote_in_rounds` counts keys and applies the stopping rule after each round.

Example:
    >>> from detot_agent.detot.records import ParsedSample
    >>> from detot_agent.detot.task import TaskProfile, analyze
    >>> adj = analyze(TaskProfile(name="t", kind="arithmetic", answer_format="number"), stopping="fixed",
    ...               min_samples=2, max_samples=4, round_size=2)
    >>> samples, result, drawn = vote_in_rounds(lambda n, drawn: [ParsedSample("x", key="7")] * n, adj)
    >>> result.winner, drawn
    ('7', 4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from detot_agent.detot.records import ParsedSample
from detot_agent.detot.steps import EngineCall, Steps, now, run_steps
from detot_agent.detot.task import Adjustments
from detot_agent.detot.voting import VoteResult, confidence, should_stop, vote, vote_weights

if TYPE_CHECKING:
    from detot_agent.engines.base import BatchedEngine, Sample

__all__ = ["engine_request", "round_seed", "sample_engine", "vote_in_rounds", "vote_steps"]

Draw = Callable[[int, int], list[ParsedSample]]  # (n to draw, drawn so far) -> n parsed samples
StepDraw = Callable[[int, int], Steps[list[ParsedSample]]]  # the same, as pipeline steps


def round_seed(base: int, drawn: int, *, greedy_first: bool) -> int:
    """The seed of a round drawn after `drawn` samples of one question, so that the question's i-th
    sampled answer has seed `base + i` however its budget is split into rounds.

    An engine seeds sample j of a row with `seed + j - greedy` (the greedy answer takes no seed), so a
    one-shot `sample(6, greedy=1, seed=base)` and rounds of 2 with these seeds draw the same samples:
    adaptive stopping (DETOT, the `sc_adaptive` eval method) sees a prefix of what fixed-N self-consistency
    (`sc`) draws for the same question.

    Example:
        >>> [round_seed(100, drawn, greedy_first=True) for drawn in (0, 2, 4)]
        [100, 101, 103]
        >>> [round_seed(100, drawn, greedy_first=False) for drawn in (0, 2, 4)]
        [100, 102, 104]
    """
    return base + drawn - (1 if greedy_first and drawn > 0 else 0)


def vote_in_rounds(draw: Draw, adj: Adjustments) -> tuple[list[ParsedSample], VoteResult, int]:
    """Draw `min_samples`, then `round_size` more at a time, until `should_stop` or `max_samples`.

    Returns `(samples, vote, drawn)`.
    """
    return run_steps(vote_steps(lambda n, drawn: now(draw(n, drawn)), adj))


def vote_steps(draw: StepDraw, adj: Adjustments) -> Steps[tuple[list[ParsedSample], VoteResult, int]]:
    """`vote_in_rounds` as pipeline steps (`detot/steps.py`): `draw(n, drawn)` is itself a step generator that
    yields the engine rounds it needs."""
    samples: list[ParsedSample] = []
    drawn = 0
    while True:
        n = adj.min_samples if drawn == 0 else min(adj.round_size, adj.max_samples - drawn)
        samples += yield from draw(n, drawn)
        drawn += n
        keys = [s.key for s in samples]
        counted = vote(keys)
        # the parsed samples' confidences decide the weights; an unparsed sample has no vote anyway
        weights = vote_weights([confidence(s.logprob, s.tokens) for s in samples if s.key is not None],
                               weighting=adj.weighting, temperature=adj.cisc_temperature,
                               keep_fraction=adj.keep_fraction)
        result = counted
        if weights is not None:
            it = iter(weights)
            result = vote(keys, [next(it) if k is not None else 0.0 for k in keys])
        if should_stop(counted, drawn, rule=adj.stopping, threshold=adj.stop_threshold,
                       min_samples=adj.min_samples, max_samples=adj.max_samples, weighted=result):
            return samples, result, drawn


def sample_engine(engine: BatchedEngine, model: str, messages: list[dict[str, str]], n: int, *,
                  soft_prompt: Any, seed: int, stop: tuple[str, ...], temperature: float, max_tokens: int,
                  greedy: int = 0, lm: Any = None) -> list[Sample]:
    """`n` completions of chat `messages` from one prefill, the first `greedy` of them greedy; recorded
    on `lm` (history, usage, callbacks) as one LM call when given (`detot/tracing.py`)."""
    request = engine_request(model, messages, seed=seed, stop=stop, temperature=temperature, max_tokens=max_tokens)
    return EngineCall(lm, engine, request, n, soft_prompt, greedy).run()


def engine_request(model: str, messages: list[dict[str, str]], *, seed: int, stop: tuple[str, ...],
                   temperature: float, max_tokens: int) -> Any:
    """DSPy's canonical `Request` for chat `messages` (system turns joined into its system prompt)."""
    from dspy.lm15 import Config, Message, Request

    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    chat = tuple(Message.user(m["content"]) if m["role"] == "user" else Message.assistant(m["content"])
                 for m in messages if m["role"] != "system")
    config = Config(temperature=temperature, max_tokens=max_tokens, seed=seed, stop=stop)
    return Request(model=model, messages=chat, system=system or None, config=config)
