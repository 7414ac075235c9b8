"""What a looping method's shadow candidates answered: `<method>.shadow.jsonl` (`ShadowJudge.record_to`), one
line per paired outcome the sequential test observed. `detot eval report` sums it per candidate: paired outcomes,
wins and losses, and, where gold came, the served and the candidate's accuracy on the same shadowed requests (the
candidate's own accuracy on the stream, which the test's win/loss counts do not give), and `plot_evidence` draws
each candidate's e-values against the paired outcomes, with the thresholds that decide (`evidence.png`).

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

__all__ = ["plot_evidence", "render_shadow", "shadow_log", "summarize_shadow"]


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


def plot_evidence(out: Path, methods: list[str], plt: Any) -> list[Path]:
    """`out/evidence.png`: per logged candidate, the accept e-value (solid) and the futility e-value (dashed) after
    each of its logged paired outcomes, log scale, with the thresholds they must reach (grey; each distinct pair of
    thresholds once, as the candidate's last line states them). Lines written before the log held evidence are
    left out; when no line has any, no plot is written and an old one is removed (it would describe another log)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    thresholds: set[tuple[float, float]] = set()
    for method in methods:
        by_candidate: dict[str, list[dict[str, Any]]] = {}
        for row in shadow_log(out, method).read():
            if row.get("accept_e") is not None:
                by_candidate.setdefault(str(row.get("candidate")), []).append(row)
        for key, rows in by_candidate.items():
            x = range(1, len(rows) + 1)
            (line,) = ax.plot(x, [r["accept_e"] for r in rows], label=f"{method}: {key}")
            ax.plot(x, [r["futility_e"] for r in rows], ls="--", color=line.get_color())
            thresholds.add((rows[-1]["accept_at"], rows[-1]["reject_at"]))
    path = out / "evidence.png"
    if thresholds:
        for accept_at, reject_at in sorted(thresholds):
            ax.axhline(accept_at, color="black", lw=1, ls="-", alpha=0.5)
            ax.axhline(reject_at, color="black", lw=1, ls="--", alpha=0.5)
            ax.annotate(f"accept at {accept_at:.3g}", (0, accept_at), xycoords=("axes fraction", "data"),
                        xytext=(4, 3), textcoords="offset points", fontsize=7)
            ax.annotate(f"reject (futility) at {reject_at:.3g}", (0, reject_at),
                        xycoords=("axes fraction", "data"), xytext=(4, 3), textcoords="offset points", fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("paired outcomes of the candidate (the order the test saw them)")
        ax.set_ylabel("e-value")
        ax.set_title("shadow trials: accept e-value (solid) against its threshold (grey solid), futility e-value "
                     "(dashed) against its own (grey dashed)", fontsize=8)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    else:
        path.unlink(missing_ok=True)
    plt.close(fig)
    return [path] if thresholds else []
