"""What the local engine did while an eval method ran: `<method>.engine.jsonl`, one line per stretch of the run.

An engine's counters (`batch_stats`) add up over its life, and the methods of a run share one engine, so each
stretch of a method (a whole run, or the part before a stop and each resumed part) appends the difference of the
counters over that stretch: decode steps (batches under the static scheduler), sequences decoded, prefix-cache
hits, partial hits and misses, prompt tokens prefilled and reused, evictions, and the records it wrote.
Background work of the method (a looping DETOT's shadow answers and replays) is in its stretch too. `detot eval
report` sums a method's lines into the report's engine table, the figures to read when choosing `--threads` and
`--prefix-cache`: a hit rate that falls as `--threads` rises means kept prompts are evicted before the next round
that needs them. Ray actors keep their own engines: a run on the Ray executor writes no such file.

Example:
    >>> before = {"batches": 3, "sequences": 6, "prefix_hits": 1, "prefix_misses": 1}
    >>> stretch = difference(before, {"batches": 10, "sequences": 34, "prefix_hits": 4, "prefix_misses": 2},
    ...                      records=2)
    >>> stretch["batches"], stretch["sequences"], stretch["prefix_hits"], stretch["records"]
    (7, 28, 3, 2)
    >>> total = summarize_use([stretch, stretch])
    >>> total["records"], total["sequences_per_step"], total["prefix_hit_rate"]
    (4, 4.0, 0.75)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detot_agent.io.jsonlog import JsonlLog

__all__ = ["COUNTERS", "difference", "engine_log", "render_use", "summarize_use"]

# cumulative counters of `BatchStats.as_dict()` (continuous) and of the static batcher's (the first three)
COUNTERS = ("batches", "sequences", "rows", "prefix_hits", "prefix_partial_hits", "prefix_misses",
            "prompt_tokens_decoded", "prompt_tokens_reused", "evictions", "moves", "held")


def engine_log(out: Path, method: str) -> JsonlLog:
    """The method's engine-use log in the run folder `out`."""
    return JsonlLog(out / f"{method}.engine.jsonl", fsync=True)


def difference(before: dict[str, float], after: dict[str, float], *, records: int,
               scheduler: str | None = None) -> dict[str, Any]:
    """One stretch: each counter `after` holds, less its value `before`, with the records written meanwhile."""
    stretch: dict[str, Any] = {k: after[k] - before.get(k, 0) for k in COUNTERS if k in after}
    stretch["records"] = records
    if scheduler is not None:
        stretch["scheduler"] = scheduler
    return stretch


def summarize_use(stretches: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A method's stretches summed, with sequences per step and the prefix hit rate; None without stretches."""
    if not stretches:
        return None
    total: dict[str, Any] = {k: sum(s.get(k, 0) for s in stretches) for k in (*COUNTERS, "records")}
    total["schedulers"] = sorted({s["scheduler"] for s in stretches if s.get("scheduler")})
    total["sequences_per_step"] = total["sequences"] / total["batches"] if total["batches"] else 0.0
    lookups = total["prefix_hits"] + total["prefix_partial_hits"] + total["prefix_misses"]
    total["prefix_hit_rate"] = (total["prefix_hits"] + total["prefix_partial_hits"]) / lookups if lookups else None
    return total


def render_use(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of the engine table: methods whose stretches decoded something (a method that re-voted
    another's samples did not); none: no lines. Method names are in backticks, unlike the accuracy table's rows."""
    rows = [(name, m["engine"]) for name, m in methods.items() if m.get("engine") and m["engine"]["batches"]]
    if not rows:
        return []
    lines = ["", "Engine use while each method ran (`<method>.engine.jsonl`; steps are batches under the static "
                 "scheduler):", "",
             "| method | records covered | steps | sequences/step | prefix hits + partial / misses | hit rate | "
             "prompt tokens prefilled | reused | evictions |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in rows:
        rate = "-" if e["prefix_hit_rate"] is None else f"{e['prefix_hit_rate']:.2f}"
        lines.append(f"| `{name}` | {e['records']} | {e['batches']} | {e['sequences_per_step']:.1f} | "
                     f"{e['prefix_hits']} + {e['prefix_partial_hits']} / {e['prefix_misses']} | {rate} | "
                     f"{e['prompt_tokens_decoded']} | {e['prompt_tokens_reused']} | {e['evictions']} |")
    return lines
