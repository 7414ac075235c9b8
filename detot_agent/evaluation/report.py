"""Summaries of a run folder: a JSON and markdown table per run, and two plots.

`write_report(out)` reads only files (`run.json`, `<method>.jsonl`, `<method>.events.jsonl`), so
`detot eval report DIR` re-renders any run, finished or not.

Per method: accuracy with a 95% percentile-bootstrap interval, mean samples, output tokens and
seconds per question, parse failures (per sample drawn), errors, re-optimizations (run / accepted);
and McNemar's exact test of each method against the best baseline (the most accurate method that
is not DETOT) on the items both answered.

Fixed-budget self-consistency (`sc`, whose records keep every sample's vote key in the order
drawn, the greedy one first) also gets its prefix curve: the accuracy and output tokens of the
majority over its first m samples, for every m, which is what self-consistency with m samples
would have scored on the same problems. Each DETOT method is then placed on it: the fewest samples
fixed-N self-consistency needs to match its accuracy (`sc_samples_to_match`), and the same-budget
comparison: self-consistency over the fewest first samples that cost at least the method's output
tokens per question, with McNemar's exact test on the same problems (`vs_sc_at_its_tokens`). A DETOT
method's own records keep their sample keys too: its own prefix curve (what it would have answered
with at most m samples: a sample's seed depends only on its index; on llama.cpp, up to its batch-shape
dependence, README "Accuracy per token") and the fewest of its samples
that reach fixed-N self-consistency's full-budget accuracy (`samples_to_match_sc`).

Example:
    >>> summarize_method([{"id": "a", "correct": True, "samples": 1, "tokens": 10, "latency_s": 1.0,
    ...                    "parse_failures": 0}])["accuracy"]
    1.0
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from detot_agent.answers import AnswerFormat
from detot_agent.evaluation.engine_use import engine_log, render_use, summarize_use
from detot_agent.evaluation.metrics import accuracy, bootstrap_ci, paired
from detot_agent.evaluation.names import is_detot
from detot_agent.evaluation.paired import run_records
from detot_agent.evaluation.runner import is_correct, read_records, read_run
from detot_agent.evaluation.shadow_log import plot_evidence, render_shadow, shadow_log, summarize_shadow
from detot_agent.io.jsonlog import JsonlLog
from detot_agent.io.persist import atomic_write_text

__all__ = ["build_report", "prefix_curve", "prefix_outcomes", "render_markdown", "summarize_method",
           "write_report"]

CURVE_METHOD = "sc"  # the fixed-budget baseline whose sample prefixes make the self-consistency curve


def summarize_method(records: list[dict[str, Any]], events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Figures for one method's records (one per example)."""
    n = len(records)
    outcomes = [bool(r["correct"]) for r in records]
    lo, hi = bootstrap_ci(outcomes, seed=0)
    drawn = sum(int(r.get("samples") or 0) for r in records)
    logged = [e for e in events or [] if e.get("event") == "reoptimization"]
    reopts = [e for e in logged if _decides(e)]  # a started shadow trial decides nothing yet
    return {
        "n": n,
        "correct": sum(outcomes),
        "accuracy": accuracy(outcomes),
        "ci95": [lo, hi],
        "samples_per_question": drawn / n if n else 0.0,
        "tokens_per_question": sum(int(r.get("tokens") or 0) for r in records) / n if n else 0.0,
        "seconds_per_question": sum(float(r.get("latency_s") or 0.0) for r in records) / n if n else 0.0,
        "parse_failures": sum(int(r.get("parse_failures") or 0) for r in records),
        "parse_failure_rate": sum(int(r.get("parse_failures") or 0) for r in records) / drawn if drawn else 0.0,
        "unanswered": sum(1 for r in records if r.get("pred") is None),
        "errors": sum(1 for r in records if r.get("error")),
        "reoptimizations": len(reopts),
        "reoptimizations_accepted": sum(1 for e in reopts if e.get("accepted")),
        "shadow_trials_started": sum(1 for e in logged if _trial_start(e)),
        "stream_halves": _halves(records),
        "decisions": [_decision(e) for e in reopts],
    }


def prefix_curve(records: list[dict[str, Any]], fmt: AnswerFormat = AnswerFormat.NUMBER, *,
                 upto: int | None = None) -> list[dict[str, Any]]:
    """Self-consistency over each record's first m samples, for m = 1 .. `upto` (default: the shortest
    record's count).

    Uniform majority, a tie going to the key drawn first (as `vote` breaks it); a sample that did not
    parse (key None) counts as drawn but casts no vote. A record with fewer than m samples (a method
    that stopped early) votes over all it has, as it did. Returns `{"m", "accuracy", "tokens_per_question"}`
    per m; empty when a record lacks `sample_keys` (runs from before they were recorded).

    Example:
        >>> recs = [{"gold": "2", "sample_keys": ["3", "2", "2"], "sample_tokens": [10, 10, 10]},
        ...         {"gold": "5", "sample_keys": ["5", "4", "4"], "sample_tokens": [8, 9, 10]}]
        >>> [(p["m"], p["accuracy"]) for p in prefix_curve(recs)]
        [(1, 0.5), (2, 0.5), (3, 0.5)]
    """
    if not records or any(not r.get("sample_keys") for r in records):
        return []
    depth = upto if upto is not None else min(len(r["sample_keys"]) for r in records)
    curve = []
    for m in range(1, depth + 1):
        right = sum(_prefix_right(r, m, fmt) for r in records)
        tokens = sum(int(t) for r in records for t in (r.get("sample_tokens") or [])[:m])
        curve.append({"m": m, "accuracy": right / len(records), "tokens_per_question": tokens / len(records)})
    return curve


def prefix_outcomes(records: list[dict[str, Any]], m: int,
                    fmt: AnswerFormat = AnswerFormat.NUMBER) -> dict[str, bool]:
    """Per problem id, whether self-consistency over the record's first `m` samples is right (as `prefix_curve`).

    Example:
        >>> prefix_outcomes([{"id": "q1", "gold": "2", "sample_keys": ["3", "2", "2"]}], 3)
        {'q1': True}
    """
    return {r["id"]: _prefix_right(r, m, fmt) for r in records}


def _prefix_right(record: dict[str, Any], m: int, fmt: AnswerFormat) -> bool:
    """Whether the uniform majority over the record's first `m` sample keys matches its gold answer."""
    from detot_agent.detot.voting import vote

    return is_correct(vote(record["sample_keys"][:m]).winner, str(record["gold"]), fmt)


def _token_matched(curve: list[dict[str, Any]], tokens: float) -> dict[str, Any] | None:
    """The cheapest point of the curve spending at least `tokens` per question (None: none does)."""
    return next((p for p in curve if p["tokens_per_question"] >= tokens), None)


def _samples_to_match(curve: list[dict[str, Any]], target: float) -> int | None:
    """The fewest samples on the curve whose accuracy reaches `target` (None: none does)."""
    return next((p["m"] for p in curve if p["accuracy"] >= target - 1e-12), None)


def _trial_start(event: dict[str, Any]) -> bool:
    """A shadow trial's start (its decision comes later, in another event)."""
    return not event.get("decided", True) and str(event.get("change", "")).endswith("(shadow trial)")


def _decides(event: dict[str, Any]) -> bool:
    """Whether a re-optimization event is a decision: not a trial's start, nor a trigger that found a shadow trial
    running (logs before 2026-12-07 marked those decided)."""
    return event.get("decided", True) and not str(event.get("reason", "")).endswith("is running; kept it")


def _halves(records: list[dict[str, Any]]) -> list[float] | None:
    """Accuracy on the first and second half of the stream, in the order answers finished."""
    if len(records) < 2:
        return None
    ordered = sorted(records, key=lambda r: r.get("finished_at", 0))
    mid = len(ordered) // 2
    return [accuracy([bool(r["correct"]) for r in part]) for part in (ordered[:mid], ordered[mid:])]


def _decision(event: dict[str, Any]) -> dict[str, Any]:
    """One re-optimization as the report shows it: outcome, why, and its evidence (a replay's sign test or a
    shadow trial's sequential test)."""
    parts = {v.get("part"): v.get("stats") or v for v in event.get("verdicts") or []}
    stats: dict[str, Any] = next((parts[p] for p in ("replay", "policy", "shadow") if p in parts), {})
    return {"change": event.get("change", "embedding"), "accepted": bool(event.get("accepted")),
            "version": [event.get("version_before"), event.get("version_after")],
            "after_observations": event.get("observations"), "seconds": event.get("seconds"),
            "evidence": event.get("evidence"), "mode": "sequential" if "shadow" in parts else stats.get("mode"),
            "p_value": stats.get("p_value"), "alpha": stats.get("alpha"), "items": stats.get("items"),
            "canary_accuracy": stats.get("canary_accuracy"), "test": _test_summary(stats),
            "reason": event.get("reason"), "error": event.get("error")}


def _test_summary(stats: dict[str, Any]) -> str:
    """The paired counts, the statistic and its threshold of one decision, in words ('' when none was run)."""
    if "accept_wealth" in stats:  # a shadow trial's always-valid test (detot/sequential.py)
        text = (f"{stats['wins']} wins / {stats['losses']} losses / {stats.get('ties', 0)} ties in "
                f"{stats['outcomes']} paired outcomes; e-value {stats['accept_wealth']:.3g} (accept at "
                f"{1 / stats['level']:.3g}), futility e-value {stats['futility_wealth']:.3g}")
        return text + (f" (reject at {1 / stats['futility_level']:.3g})" if stats.get("futility_level") else "")
    if "only_candidate_right" in stats:  # a replay's exact sign test on gold items
        p = "" if stats.get("p_value") is None else f"; sign test p {stats['p_value']:.3g} (alpha {stats['alpha']:.3g})"
        return (f"{stats['only_candidate_right']} only candidate / {stats['only_serving_right']} only serving right "
                f"of {stats.get('gold_items', stats.get('items'))} gold items{p}")
    if stats.get("p_value") is not None:
        return f"p {stats['p_value']:.3g} (alpha {stats['alpha']:.3g}) on {stats.get('items')} items"
    return ""


def _events(path: Path) -> list[dict[str, Any]]:
    return JsonlLog(path).read()


def build_report(out: str | Path) -> dict[str, Any]:
    """The report of a run folder as a dict (no report written; a folder of 0.3 gets 0.4's method names first)."""
    out = Path(out)
    run = read_run(out)
    ids = set(run["ids"])
    configs = json.loads((out / "methods.json").read_text()) if (out / "methods.json").exists() else {}
    methods: dict[str, Any] = {}
    outcomes: dict[str, dict[str, bool]] = {}
    by_method: dict[str, list[dict[str, Any]]] = {}
    fmt = AnswerFormat(run.get("answer_format", AnswerFormat.NUMBER.value))
    for method, records in run_records(out, run).items():
        summary = summarize_method(records, _events(out / f"{method}.events.jsonl"))
        summary["complete"] = len(records) == len(ids)
        summary["config"] = configs.get(method, {})
        summary["engine"] = summarize_use(engine_log(out, method).read())
        summary["shadow"] = summarize_shadow(shadow_log(out, method).read())
        methods[method] = summary
        outcomes[method] = {r["id"]: bool(r["correct"]) for r in records}
        by_method[method] = records
        if method == CURVE_METHOD:
            summary["prefix_curve"] = prefix_curve(records, fmt)
    baselines = [m for m in methods if not is_detot(m) and methods[m]["n"]]
    best = max(baselines, key=lambda m: (methods[m]["accuracy"], -methods[m]["samples_per_question"]),
               default=None)
    sc = methods.get(CURVE_METHOD, {})
    curve = sc.get("prefix_curve") if sc.get("complete") else None
    for method, summary in methods.items():
        if is_detot(method) and summary["complete"]:
            records = by_method[method]
            own = prefix_curve(records, fmt, upto=max((len(r.get("sample_keys") or []) for r in records), default=0))
            if own:
                summary["prefix_curve"] = own
            if curve:
                summary["sc_samples_to_match"] = _samples_to_match(curve, summary["accuracy"])
                if own:  # how few of its own samples reach fixed-N self-consistency's full budget
                    summary["samples_to_match_sc"] = _samples_to_match(own, curve[-1]["accuracy"])
                # the same budget: self-consistency over the fewest first samples that cost at least its tokens
                point = _token_matched(curve, summary["tokens_per_question"])
                if point is not None:
                    test = paired(outcomes[method], prefix_outcomes(by_method[CURVE_METHOD], point["m"], fmt))
                    summary["vs_sc_at_its_tokens"] = {**point, "only_this_right": test.b,
                                                      "only_sc_right": test.c, "p_value": test.p_value}
        if best is None or method == best or not summary["n"]:
            summary["vs_best_baseline"] = None
            continue
        test = paired(outcomes[method], outcomes[best])
        summary["vs_best_baseline"] = {"baseline": best, "only_this_right": test.b, "only_baseline_right": test.c,
                                       "p_value": test.p_value}
    return {"suite": run.get("suite"), "source": run.get("source"), "model": run.get("model"),
            "n_examples": len(ids), "seed": run.get("seed"), "command": run.get("command"),
            "best_baseline": best, "methods": methods}


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table (plus a line on the baseline)."""
    lines = [f"Suite `{report['suite']}` ({report['n_examples']} problems), model `{Path(str(report['model'])).name}`",
             "",
             "| method | n | accuracy | 95% CI | samples/q | tokens/q | s/q | parse fail | reopt (acc.) | p vs best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        if not m["n"]:
            lines.append(f"| {name} | 0* | not run yet | | | | | | | |")
            continue
        vs = m["vs_best_baseline"]
        p = "best baseline" if name == report["best_baseline"] else ("-" if vs is None else f"{vs['p_value']:.3f}")
        looping = m.get("config", {}).get("reoptimization")
        reopt = f"{m['reoptimizations']} ({m['reoptimizations_accepted']})" if looping else "-"
        n = f"{m['n']}" + ("" if m["complete"] else "*")
        # a method that re-voted another's recorded samples spent no generation time of its own
        seconds = "re-voted" if m.get("config", {}).get("revoted_from") else f"{m['seconds_per_question']:.1f}"
        lines.append(f"| {name} | {n} | {m['accuracy']:.3f} | {m['ci95'][0]:.2f}-{m['ci95'][1]:.2f} | "
                     f"{m['samples_per_question']:.2f} | {m['tokens_per_question']:.0f} | "
                     f"{seconds} | {m['parse_failure_rate']:.1%} | {reopt} | {p} |")
    if any(not m["complete"] for m in report["methods"].values()):
        lines += ["", "\\* unfinished: fewer problems than the suite; resume the run to complete it."]
    curve = report["methods"].get(CURVE_METHOD, {}).get("prefix_curve")
    if curve:
        lines += ["", f"Self-consistency over the first m samples of `{CURVE_METHOD}` (greedy first; same problems): " +
                  ", ".join(f"m={p['m']} {p['accuracy']:.3f} ({p['tokens_per_question']:.0f} tok)" for p in curve)]
        for name, m in report["methods"].items():
            if "sc_samples_to_match" in m:
                need = m["sc_samples_to_match"]
                lines.append(f"- `{name}` ({m['accuracy']:.3f} at {m['samples_per_question']:.2f} samples): fixed-N "
                             "self-consistency " + (f"needs {need} samples to match it "
                                                    f"({need / m['samples_per_question']:.2f}x its samples)"
                                                    if need is not None else f"does not reach it with {len(curve)}"))
                same = m.get("vs_sc_at_its_tokens")
                if "samples_to_match_sc" in m:
                    own, sc_m = m["samples_to_match_sc"], curve[-1]
                    lines.append("  Its own first m samples: " + ", ".join(
                        f"m={p['m']} {p['accuracy']:.3f} ({p['tokens_per_question']:.0f} tok)"
                        for p in m["prefix_curve"]) + "; " +
                        (f"reaches fixed-N self-consistency's {sc_m['accuracy']:.3f} ({sc_m['m']} samples) "
                         f"with {own} ({sc_m['m'] / own:.2f}x fewer samples)" if own is not None else
                         f"does not reach fixed-N self-consistency's {sc_m['accuracy']:.3f}"))
                if same:
                    lines.append(f"  At its tokens ({m['tokens_per_question']:.0f}/q), self-consistency over the first "
                                 f"{same['m']} samples ({same['tokens_per_question']:.0f} tok) gets "
                                 f"{same['accuracy']:.3f}: {same['only_this_right']} problems only `{name}` solved, "
                                 f"{same['only_sc_right']} only self-consistency solved, "
                                 f"exact McNemar p = {same['p_value']:.3g}")
    halves = [(name, m["stream_halves"]) for name, m in report["methods"].items() if m.get("stream_halves")]
    if halves:
        lines += ["", "Accuracy on the first and second half of the stream (in answer order): " + "; ".join(
            f"{name} {h[0]:.3f} -> {h[1]:.3f}" for name, h in halves)]
    for name, m in report["methods"].items():
        if m.get("decisions"):
            lines += ["", f"Re-optimizations of `{name}`:", "",
                      "| # | change | outcome | after q | mode | evidence | canary acc. old -> new | reason |",
                      "|---|---|---|---|---|---|---|---|"]
            for i, d in enumerate(m["decisions"], 1):
                outcome = "accepted" if d["accepted"] else ("error" if d["error"] else "rejected")
                reason = str(d["reason"]).replace("|", "/")
                canary = d.get("canary_accuracy")
                can = "-" if not canary else f"{canary[0]:.2f} -> {canary[1]:.2f}"
                lines.append(f"| {i} | {d.get('change', 'embedding')} | {outcome} | {d['after_observations']} | "
                             f"{d['mode'] or '-'} | {d.get('test') or '-'} | {can} | {reason} |")
        if m.get("shadow_trials_started"):
            lines += ["", f"Shadow trials of `{name}` started: {m['shadow_trials_started']} (a decided one has its row "
                      "in the re-optimizations table; one still collecting evidence at the end has none)."]
    shadow = render_shadow(report["methods"])
    lines += ["", "Shadow candidates' answers on the requests they shadowed (`<method>.shadow.jsonl`):", "",
              *shadow] if shadow else []
    lines += render_use(report["methods"])
    return "\n".join(lines) + "\n"


def _plot(out: Path, report: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [_scatter(out, report, plt, "samples_per_question", "samples per question", "samples", 0.08),
               _scatter(out, report, plt, "tokens_per_question", "output tokens per question", "tokens", 4.0)]

    written += _plot_over_stream(
        out, report, plt, lambda r: r.get("agreement"), path=out / "agreement.png", window=lambda n: 10,
        ylabel="agreement (rolling mean of {w})",
        title="agreement over time; re-optimizations (method's colour): solid accepted, dashed rolled back, "
              "dotted shadow trial started")
    # is the loop learning? (with --feedback gold, a prequential learning curve)
    written += _plot_over_stream(
        out, report, plt, lambda r: float(bool(r["correct"])), path=out / "learning_curve.png",
        window=lambda n: max(5, min(25, n // 4)), ylabel="accuracy (rolling mean of {w})",
        title="learning curve; re-optimizations: solid accepted, dashed rejected, dotted shadow trial started")
    return written + plot_evidence(out, list(report["methods"]), plt)


def _scatter(out: Path, report: dict[str, Any], plt: Any, key: str, xlabel: str, what: str, nudge: float) -> Path:
    """Accuracy (95% CI) against a cost per question, one point per method (ablations included)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen: dict[tuple[float, float], int] = {}
    for name, m in report["methods"].items():
        if not m["n"] or m.get(key) is None:
            continue
        lo, hi = m["ci95"]
        x, y = m[key], m["accuracy"]
        # methods on (almost) the same spot are nudged right, so none hides another
        spot = (round(x / nudge), round(y, 2))
        x += nudge * seen.get(spot, 0)
        seen[spot] = seen.get(spot, 0) + 1
        bars = ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], fmt="o", capsize=3, label=name)
        if name != CURVE_METHOD and m.get("prefix_curve"):  # a DETOT method capped at m samples, its colour
            own = m["prefix_curve"]
            ax.plot([p["m"] if key == "samples_per_question" else p["tokens_per_question"] for p in own],
                    [p["accuracy"] for p in own], ":", color=bars[0].get_color(), marker=".", linewidth=0.8)
    curve = report["methods"].get(CURVE_METHOD, {}).get("prefix_curve")
    if curve:  # what fixed-N self-consistency scores with 1, 2, ... samples
        xs = [p["m"] if key == "samples_per_question" else p["tokens_per_question"] for p in curve]
        ax.plot(xs, [p["accuracy"] for p in curve], ":", color="black", marker=".",
                label=f"{CURVE_METHOD}, first m samples")
    ax.set_xlabel(xlabel + (" (coinciding points nudged right)" if max(seen.values(), default=1) > 1 else ""))
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.set_title(f"{report['suite']}: accuracy vs {what} (dotted: a method's first m samples)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = out / f"accuracy_vs_{what}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_over_stream(out: Path, report: dict[str, Any], plt: Any, value: Any, *, path: Path, window: Any,
                      ylabel: str, title: str) -> list[Path]:
    """A rolling mean of `value(record)` per method in the order answers finished, re-optimizations marked;
    `ylabel` may name the window actually used as `{w}` (a short run uses a shorter one)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    drew = False
    used: set[int] = set()
    for name in report["methods"]:
        records = sorted(read_records(out / f"{name}.jsonl"), key=lambda r: r.get("finished_at", 0))
        values = [value(r) for r in records]
        if len(records) < 4 or any(v is None for v in values):
            continue
        w = min(window(len(values)), len(values))
        used.add(w)
        series = np.convolve(np.asarray(values, dtype=float), np.ones(w) / w, mode="valid")
        (line,) = ax.plot(np.arange(len(series)) + w, series, label=name)
        drew = True
        times = [r.get("finished_at", 0) for r in records]
        for e in _events(out / f"{name}.events.jsonl"):
            if e.get("event") == "reoptimization" and (_decides(e) or _trial_start(e)):  # dotted: a trial started
                x = int(np.searchsorted(times, e.get("time", 0)))
                style = ":" if not e.get("decided", True) else "-" if e.get("accepted") else "--"
                ax.axvline(x, color=line.get_color(), ls=style, lw=1.5, alpha=0.8)
    written = []
    if drew:
        ax.set_xlabel("questions answered (stream order)")
        ax.set_ylabel(ylabel.format(w="/".join(str(w) for w in sorted(used))))
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        written.append(path)
    plt.close(fig)
    return written


def write_report(out: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Build the report of `out` and write `report.json`, `report.md` and the PNG plots; returns the report."""
    out = Path(out)
    report = build_report(out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report))
    if plots:
        report["plots"] = [str(p) for p in _plot(out, report)]
    return report
