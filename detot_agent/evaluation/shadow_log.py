"""What a looping method's shadow candidates answered: `<method>.shadow.jsonl` (`ShadowJudge.record_to`), one
line per paired outcome the sequential test observed. `detot eval report` sums it per candidate: paired outcomes,
wins and losses, and, where gold came, the served and the candidate's accuracy on the same shadowed requests (the
candidate's own accuracy on the stream, which the test's win/loss counts do not give).

Example:
    >>> rows = [{"candidate": "policy max_tokens=320 over version 1", "served": "4", "shadow": "4", "gold": "4",
    ...          "outcome": 0}, {"candidate": "policy max_tokens=320 over version 1", "served": "6", "shadow": "5",
    ...          "gold": "5", "outcome": 1}]
    >>> s = summarize_shadow(rows)["policy max_tokens=320 over version 1"]
    >>> s["outcomes"], s["wins"], s["losses"], s["served_accuracy"], s["shadow_accuracy"]
    (2, 1, 0, 0.5, 1.0)
    >>> render_shadow({"detot_loop": {"shadow": summarize_shadow(rows)}})[2]
    '| `detot_loop` | policy max_tokens=320 over version 1 | 2 | 1 / 0 | 2 | 0.500 | 1.000 |'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detot_agent.io.jsonlog import JsonlLog

__all__ = ["render_shadow", "shadow_log", "summarize_shadow"]


def shadow_log(out: Path, method: str) -> JsonlLog:
    """The method's shadow log in the run folder `out`."""
    return JsonlLog(out / f"{method}.shadow.jsonl", fsync=False)


def summarize_shadow(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per candidate: paired outcomes, wins, losses, and on the outcomes with gold the served and the candidate's
    accuracy (None without gold: label-free outcomes)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        s = out.setdefault(str(row.get("candidate")), {"outcomes": 0, "wins": 0, "losses": 0, "with_gold": 0,
                                                        "served_right": 0, "shadow_right": 0})
        s["outcomes"] += 1
        s["wins"] += row.get("outcome") == 1
        s["losses"] += row.get("outcome") == -1
        if row.get("gold") is not None:
            s["with_gold"] += 1
            s["served_right"] += row.get("served") == row["gold"]
            s["shadow_right"] += row.get("shadow") == row["gold"]
    for s in out.values():
        n = s["with_gold"]
        s["served_accuracy"] = s["served_right"] / n if n else None
        s["shadow_accuracy"] = s["shadow_right"] / n if n else None
    return out


def render_shadow(methods: dict[str, dict[str, Any]]) -> list[str]:
    """The report's table of shadow candidates (no lines when no method logged any)."""
    rows = [(name, key, s) for name, m in methods.items() for key, s in (m.get("shadow") or {}).items()]
    if not rows:
        return []

    def acc(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = ["| method | candidate | paired outcomes | wins / losses | with gold | served acc. | candidate acc. |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| `{name}` | {key} | {s['outcomes']} | {s['wins']} / {s['losses']} | {s['with_gold']} | "
              f"{acc(s['served_accuracy'])} | {acc(s['shadow_accuracy'])} |" for name, key, s in rows]
    return lines
