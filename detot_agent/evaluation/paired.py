"""Paired comparisons inside one run folder: one method against every other, on the problems both answered.

`detot eval report DIR --paired METHOD` prints them; the report itself compares each method with the best
baseline only. Each row is McNemar's exact test (`metrics.paired`): the problems only METHOD got right, those
only the other got right, and the two-sided p-value.

Example:
    >>> rows = paired_rows({"a": {"q1": True, "q2": True}, "b": {"q1": False, "q2": True}}, "a")
    >>> rows[0]["other"], rows[0]["only_method"], rows[0]["only_other"]
    ('b', 1, 0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detot_agent.errors import ConfigError
from detot_agent.evaluation.metrics import paired
from detot_agent.evaluation.runner import read_records, read_run

__all__ = ["need_methods", "paired_against", "paired_rows", "run_outcomes", "run_records"]


def run_records(run_dir: str | Path, run: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """method -> its records over the run's problems, in the run's problem order (`run.json`'s `ids`); the first
    record of an id counts (a duplicate is never counted twice). `run`: the folder's `read_run`, if read."""
    folder = Path(run_dir)
    run = read_run(folder) if run is None else run
    ids = set(run["ids"])
    out: dict[str, list[dict[str, Any]]] = {}
    for method in run["methods"]:
        path = folder / f"{method}.jsonl"
        seen: dict[str, dict[str, Any]] = {}
        for r in read_records(path) if path.is_file() else []:
            if r["id"] in ids:
                seen.setdefault(r["id"], r)
        out[method] = [seen[i] for i in run["ids"] if i in seen]
    return out


def run_outcomes(run_dir: str | Path) -> dict[str, dict[str, bool]]:
    """method -> {problem id -> correct} for every method of a run folder (`run_records`)."""
    return {m: {r["id"]: bool(r["correct"]) for r in recs} for m, recs in run_records(run_dir).items()}


def need_methods(methods: dict[str, Any], *names: str) -> None:
    """Refuse names that are not methods of the run, listing the ones that are (`ConfigError`)."""
    missing = [n for n in names if n not in methods]
    if missing:
        raise ConfigError(f"no method {', '.join(map(repr, missing))} in this run; it has {', '.join(methods)}")


def paired_rows(outcomes: dict[str, dict[str, bool]], method: str) -> list[dict[str, Any]]:
    """McNemar's exact test of `method` against each other method (in run order).

    Raises:
        ConfigError: `method` is not in the run (the message lists the ones that are).
    """
    need_methods(outcomes, method)
    ours = outcomes[method]
    rows = []
    for other, theirs in outcomes.items():
        if other == method:
            continue
        t = paired(ours, theirs)
        rows.append({"other": other, "problems": len(ours.keys() & theirs.keys()), "only_method": t.b,
                     "only_other": t.c, "p_value": t.p_value})
    return rows


def paired_against(run_dir: str | Path, method: str) -> list[dict[str, Any]]:
    """`paired_rows` for a run folder."""
    return paired_rows(run_outcomes(run_dir), method)
