"""The fit folder's artefact: the fitted program's state, `fit.json`, `report.md` and the candidates plot.

| file | holds |
|---|---|
| `program.json` | the shipped DETOT as `DETOT.save` writes it; `DETOT.load(folder)` reads it |
| `fit.json` | the choice, the guard's test, each candidate's accuracy, tokens and samples, timings |
| `report.md` | the same as a table |
| `candidates.png` | accuracy against output tokens per item, one point per candidate |
| `settings.json`, `chains-*.jsonl`, `prompts/`, `race.jsonl` | what a resumed fit reads |

Example:
    >>> json.loads((Path("fits/arith") / "fit.json").read_text())["shipped"]        # doctest: +SKIP
    'plain'
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from detot_agent.detot.module import DETOT
from detot_agent.errors import ArtefactError
from detot_agent.fit.config import PLAIN, FitConfig
from detot_agent.io.persist import atomic_write_bytes

__all__ = ["FIT_FILE", "PROGRAM_FILE", "markdown", "read_fit", "write"]

FIT_FILE = "fit.json"
PROGRAM_FILE = "program.json"
FORMAT = "detot-fit"


def write(folder: Path, *, program: DETOT, decision: dict[str, Any], table: dict[str, dict[str, Any]],
          choices: dict[str, Any], distill: dict[str, Any], timings: dict[str, float], config: FitConfig,
          stopped_by_time: bool, stopping: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the artefact (program first, `fit.json` last: a folder with `fit.json` is complete)."""
    program.save(folder / PROGRAM_FILE)
    out = {"format": FORMAT, "version": 1, "shipped": decision["shipped"], "best_detot": decision["best"],
           "guard": decision, "candidates": table, "choices": choices, "distill": distill,
           "seconds": timings, "stopped_by_time": stopped_by_time, "config": config.model_dump(mode="json"),
           "adjustments": program.adjustments.model_dump(mode="json"), "stopping": stopping}
    atomic_write_bytes(folder / "report.md", markdown(out).encode())
    _plot(folder / "candidates.png", table, decision)
    atomic_write_bytes(folder / FIT_FILE, json.dumps(out, indent=2, default=str).encode())
    return out


def read_fit(folder: str | Path) -> dict[str, Any]:
    """A finished fit's `fit.json`, validated (`ArtefactError` naming what is wrong)."""
    path = Path(folder) / FIT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtefactError(f"{folder} is not a finished fit folder ({type(exc).__name__}: {exc}); run `detot fit` "
                            "to make one (a killed fit resumes with the same command)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("shipped"), str):
        raise ArtefactError(f"{path} is not a detot fit report (format {FORMAT!r} expected)")
    if not (Path(folder) / PROGRAM_FILE).is_file():
        raise ArtefactError(f"{folder} lacks {PROGRAM_FILE}: the fit did not finish; run it again to resume")
    return data


def markdown(fit: dict[str, Any]) -> str:
    """The report as Markdown: the decision, then one row per candidate."""
    g = fit["guard"]
    lines = [f"# DETOT fit: ships `{fit['shipped']}`", ""]
    if g["best"] is None:
        lines.append("The race dropped every DETOT configuration (each significantly behind the leader), so plain "
                     "confidence-weighted voting ships.")
    elif g["guard_fired"]:
        lines.append(f"The guard fired: DETOT's best configuration `{g['best']}` did not beat plain voting on the "
                     f"{g['items']} dev items ({g['wins_over_plain']} wins, {g['losses_to_plain']} losses, one-sided "
                     f"p worse = {g['p_worse_than_plain']:.3f}), so plain confidence-weighted voting ships.")
    else:
        lines.append(f"`{g['best']}` against plain voting on {g['items']} dev items: {g['wins_over_plain']} wins, "
                     f"{g['losses_to_plain']} losses (one-sided p better = {g['p_better_than_plain']:.3f}).")
    stop = fit.get("stopping") or {}
    if stop.get("chosen"):
        c, r = stop["chosen"], stop["raced"]
        lines.append(f"Stopping rule, replayed on the shipped configuration's race answers: `{c['rule']}` at "
                     f"{c['threshold']}: {c['samples'] / r['items']:.2f} samples per item instead of "
                     f"{r['samples'] / r['items']:.2f}, {c['correct']} items right (raced: {r['correct']}; counted "
                     "on the items it was chosen on).")
    elif stop:
        lines.append("Stopping rule: no replayed rule drew fewer samples at the raced correct count; the raced one "
                     "stays.")
    if fit["stopped_by_time"]:
        lines.append("The race stopped at the time budget; the decision used the items every survivor answered.")
    lines += ["", "| candidate | items | accuracy | tokens/item | samples/item | distinct answers/item | dropped "
                  "after |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in fit["candidates"].items():
        mark = " (shipped)" if name == fit["shipped"] else ""
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        tok = "-" if row["tokens"] is None else f"{row['tokens']:.0f}"
        smp = "-" if row["samples"] is None else f"{row['samples']:.2f}"
        dis = "-" if row.get("distinct_answers") is None else f"{row['distinct_answers']:.2f}"
        drop = row["dropped_after"] or ""
        lines.append(f"| `{name}`{mark} | {row['items']} | {acc} | {tok} | {smp} | {dis} | {drop} |")
    if fit["distill"]:
        lines += ["", "Self-distillation: " + json.dumps(fit["distill"])]
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in fit["seconds"].items()), ""]
    return "\n".join(lines)


def _plot(path: Path, table: dict[str, dict[str, Any]], decision: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in table.items():
        if row["accuracy"] is None:
            continue
        marker = "s" if name == PLAIN else ("*" if name == decision["shipped"] else "o")
        ax.scatter(row["tokens"], row["accuracy"], marker=marker, s=80 if marker == "*" else 30)
        ax.annotate(name, (row["tokens"], row["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("output tokens per item")
    ax.set_ylabel("dev accuracy (items answered)")
    ax.set_title(f"DETOT fit: ships {decision['shipped']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
