"""The stopping rule of the shipped configuration, chosen by replaying its race answers (no model calls).

A stopping rule only decides how many of a problem's samples are drawn; the samples do not depend on it (each is
seeded by its position). So every rule can be measured exactly on the race's own answers: each row records its
samples' vote keys, output tokens and log-probabilities in drawing order, and which keys the metric accepts. A rule
is replayed in the program's schedule (`min_samples`, then rounds of `round_size`); a rule that would want a
sample the race did not draw (the raced rule stopped sooner) cannot be judged and is not eligible. The choice:
the rule and threshold with the fewest samples that get **at least as many** dev items right as the raced
configuration (ties: fewer tokens); none fewer: the raced rule stays. The count is on the same dev items the
threshold was chosen on, so it is optimistic; the eval on other problems measures it (docs/results/stopping.md).

Example:
    >>> row = {"sample_keys": ["7", "8", "7", "7", "7", "7"], "sample_tokens": [10] * 6,
    ...        "sample_logprobs": [-1.0] * 6, "key_correct": {"7": True, "8": False}}
    >>> replay(row, rule="beta", threshold=0.8, min_samples=2, round_size=2, max_samples=6)
    (True, 4, 40)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from detot_agent.detot.records import ParsedSample
from detot_agent.detot.sampling import vote_in_rounds
from detot_agent.detot.task import Adjustments, StoppingRule, Weighting
from detot_agent.errors import DetotError

__all__ = ["choose_stopping", "replay"]


class _NotDrawn(DetotError):
    """The rule replayed wants a sample the race did not draw."""


def replay(row: dict[str, Any], *, rule: StoppingRule | str, threshold: float, min_samples: int, round_size: int,
           max_samples: int, weighting: str = "cisc", cisc_temperature: float = 0.1,
           keep_fraction: float = 0.9) -> tuple[bool, int, int] | None:
    """`(correct, samples, tokens)` of one recorded answer under a stopping rule, through DETOT's own sampling loop
    (`sampling.vote_in_rounds`) drawing the recorded samples; None when the rule wants a sample the row did not draw
    (or the row records no samples)."""
    keys = row.get("sample_keys")
    tokens, logprobs, right = row.get("sample_tokens"), row.get("sample_logprobs"), row.get("key_correct")
    if not keys or tokens is None or logprobs is None or right is None:
        return None
    recorded = [ParsedSample("", key=k, tokens=int(t), logprob=lp) for k, t, lp in zip(keys, tokens, logprobs,
                                                                                         strict=False)]
    adj = Adjustments(stopping=StoppingRule(rule), stop_threshold=threshold, min_samples=min(min_samples, max_samples),
                      round_size=round_size, max_samples=max_samples, weighting=Weighting(weighting),
                      cisc_temperature=cisc_temperature, keep_fraction=keep_fraction)

    def draw(n: int, drawn: int) -> list[ParsedSample]:
        if drawn + n > len(recorded):
            raise _NotDrawn(f"sample {drawn + n} was not drawn")
        return recorded[drawn:drawn + n]

    try:
        _, result, drawn = vote_in_rounds(draw, adj)
    except _NotDrawn:
        return None
    return bool(result.winner is not None and right.get(result.winner)), drawn, int(sum(tokens[:drawn]))


def choose_stopping(rows: Sequence[dict[str, Any]], adj: Adjustments, *, schedule: Adjustments,
                    rules: Sequence[StoppingRule], thresholds: Sequence[float]) -> dict[str, Any]:
    """The cheapest rule x threshold that keeps the raced rows' correct count, replayed in `schedule`'s rounds
    (`min_samples`, `round_size`) under `adj`'s vote (weighting, budget).

    Returns `{"chosen": {rule, threshold, ...} | None, "raced": {...}, "table": [...]}`; `chosen` None keeps the
    raced stopping rule (nothing replayable, or nothing cheaper at the same correct count)."""
    raced = {"correct": sum(bool(r["correct"]) for r in rows), "samples": sum(int(r["samples"]) for r in rows),
             "tokens": sum(int(r["tokens"]) for r in rows), "items": len(rows)}
    table: list[dict[str, Any]] = []
    for rule in rules:
        for threshold in thresholds:
            runs = [replay(r, rule=rule, threshold=threshold, min_samples=schedule.min_samples,
                           round_size=schedule.round_size, max_samples=adj.max_samples, weighting=adj.weighting.value,
                           cisc_temperature=adj.cisc_temperature, keep_fraction=adj.keep_fraction) for r in rows]
            known = [x for x in runs if x is not None]
            entry = {"rule": StoppingRule(rule).value, "threshold": threshold, "replayable": len(known) == len(rows)}
            if entry["replayable"] and rows:
                entry.update(correct=sum(x[0] for x in known), samples=sum(x[1] for x in known),
                             tokens=sum(x[2] for x in known))
            table.append(entry)
    eligible = [e for e in table if e["replayable"] and rows and e["correct"] >= raced["correct"]
                and e["samples"] < raced["samples"]]
    chosen = min(eligible, key=lambda e: (e["samples"], e["tokens"])) if eligible else None
    return {"chosen": chosen, "raced": raced, "table": table}
