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

import json
from pathlib import Path
from typing import Any

from detot_agent.errors import ArtefactError, ConfigError
from detot_agent.evaluation.metrics import paired
from detot_agent.evaluation.rename_runs import upgrade_run
from detot_agent.evaluation.runner import RUN_FILE, read_records

__all__ = ["paired_against", "paired_rows", "run_outcomes"]


def run_outcomes(run_dir: str | Path) -> dict[str, dict[str, bool]]:
    """method -> {problem id -> correct} for every method of a run folder, over the run's problems (the first record
    of an id counts), as `report.build_report` counts them."""
    folder = Path(run_dir)
    if not (folder / RUN_FILE).is_file():
        raise ArtefactError(f"{folder} is not a run folder: no {RUN_FILE} (start one with `detot eval --suite ...`)")
    upgrade_run(folder)  # a folder written under 0.3's method names is read under 0.4's
    run = json.loads((folder / RUN_FILE).read_text())
    ids = set(run["ids"])
    out: dict[str, dict[str, bool]] = {}
    for method in run["methods"]:
        path = folder / f"{method}.jsonl"
        seen: dict[str, bool] = {}
        for r in read_records(path) if path.is_file() else []:
            if r["id"] in ids:  # the run's problems only, as the report counts them
                seen.setdefault(r["id"], bool(r["correct"]))
        out[method] = seen
    return out


def paired_rows(outcomes: dict[str, dict[str, bool]], method: str) -> list[dict[str, Any]]:
    """McNemar's exact test of `method` against each other method (in run order).

    Raises:
        ConfigError: `method` is not in the run (the message lists the ones that are).
    """
    if method not in outcomes:
        raise ConfigError(f"no method {method!r} in this run; it has {', '.join(outcomes)}")
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
