"""`detot eval report DIR`: re-render a run's report, and print the readings asked for (paired tests, stream
halves, another run side by side, breakdowns by gold steps and of the votes).

Example:
    $ detot eval report evals/results/accuracy/gsm8k --paired detot --steps ../shared/data/gsm8k/test.jsonl
    $ detot eval report evals/results/prequential_gsm8k_v2 --halves detot,detot_loop --json halves.json
    $ detot eval report runs/eval-torch --against runs/eval-llamacpp --methods cot,detot
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from detot_agent.cli.common import write_json_atomic

console = Console(soft_wrap=True)

__all__ = ["eval_report"]


def _say(line: str = "") -> None:
    console.print(line, markup=False, highlight=False)


def eval_report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `detot eval`.")],
    paired: Annotated[str | None, typer.Option(help="Also compare this method with every other method of the run, "
                                                     "problem by problem (exact McNemar); with --steps, per "
                                                     "bucket too.")] = None,
    halves: Annotated[str | None, typer.Option(help="A,B: A against B on each half of the run's stream order "
                                                     "(a prequential run), paired; B's loop decisions listed.")] = None,
    against: Annotated[Path | None, typer.Option(help="Another run folder on the same problems (another engine or "
                                                      "machine): the same methods side by side, paired.")] = None,
    methods: Annotated[str | None, typer.Option(help="With --against: the methods to compare (default: all "
                                                     "both runs have).")] = None,
    steps: Annotated[Path | None, typer.Option(help="The GSM8K JSONL the run's ids point into: accuracy by gold "
                                                    "solution steps, token-limit cut-offs, and how the votes "
                                                    "fall.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="With --steps: the run's new-token limit (default: the "
                                                        "run's --max-tokens).", min=1)] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the readings asked for as JSON.")] = None,
) -> None:
    """Re-render report.md, report.json and the plots of RUN_DIR from its JSONL files."""
    from detot_agent.evaluation import write_report
    from detot_agent.evaluation.report import render_markdown

    pair = _pair_names(halves, "--halves") if halves is not None else None  # refused before any work
    report = write_report(run_dir)
    console.print(render_markdown(report))
    out: dict[str, Any] = {}
    if paired is not None:
        out["paired"] = _paired(run_dir, paired)
    if pair is not None:
        out["halves"] = _halves(run_dir, pair, report)
    if against is not None:
        out["against"] = _against(run_dir, against, methods)
    if steps is not None:
        from detot_agent.evaluation.runner import read_run

        run = read_run(run_dir)
        out["steps"] = _steps(run_dir, steps, max_tokens or int(run.get("max_tokens") or 256), paired)
    if json_out is not None:
        write_json_atomic(json_out, out)
        _say(f"wrote {json_out}")


def _paired(run_dir: Path, method: str) -> list[dict[str, Any]]:
    from detot_agent.evaluation.paired import paired_against

    rows = paired_against(run_dir, method)
    for row in rows:
        _say(f"{method} vs {row['other']} on {row['problems']} problems: only {method} right {row['only_method']}, "
             f"only {row['other']} right {row['only_other']}, exact McNemar p = {row['p_value']:.3f}")
    return rows


def _pair_names(value: str, flag: str) -> tuple[str, str]:
    from detot_agent.errors import ConfigError

    names = [x.strip() for x in value.split(",") if x.strip()]
    if len(names) != 2:
        raise ConfigError(f"{flag} takes two methods, A,B (got {value!r})")
    return names[0], names[1]


def _halves(run_dir: Path, pair: tuple[str, str], report: dict[str, Any]) -> dict[str, Any]:
    from detot_agent.evaluation.breakdowns import stream_halves

    a, b = pair
    result = stream_halves(run_dir, a, b)
    _say(f"\n{result['problems']} problems in stream order")
    _say(f"| part | {a} | {b} | only {a} right | only {b} right | McNemar p |")
    _say("|---|---:|---:|---:|---:|---:|")
    for name, row in result["halves"].items():
        _say(f"| {name} ({row['n']}) | {row[a]:.3f} | {row[b]:.3f} | {row[f'only_{a}']} | {row[f'only_{b}']} | "
             f"{row['p_value']:.3f} |")
    decisions = report["methods"][b].get("decisions") or []
    result["decisions"] = decisions
    if decisions:
        _say(f"\n{len(decisions)} re-optimization decisions of {b}, {sum(d['accepted'] for d in decisions)} accepted")
        for d in decisions:
            _say(f"- {d['change']} {'accepted' if d['accepted'] else 'rejected'} after {d['after_observations']} "
                 f"answers ({d['seconds'] or 0:.1f} s), canary {d['canary_accuracy']}: {d['reason'][:160]}"
                 + (f" [{d['test']}]" if d.get("test") else ""))
    return result


def _against(run_dir: Path, other: Path, methods: str | None) -> list[dict[str, Any]]:
    from detot_agent.evaluation.breakdowns import compare_runs

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    rows = compare_runs(run_dir, other, names)
    _say("\n| method | run | accuracy | p (run vs other) | same answer | identical records | tokens/q | s/q | "
         "minutes |")
    _say("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        for label, folder in (("run", run_dir), ("other", other)):
            r = row[label]
            _say(f"| {row['method']} | {folder.name} | {r['accuracy']:.3f} | {row['p_value']:.2f} ({row['only_run']} "
                 f"vs {row['only_other']}) | {row['same_answer']}/{row['problems']} | {row['identical']} | "
                 f"{r['tokens_per_q']:.0f} | "
                 f"{r['seconds_per_q']:.1f} | {r['minutes']:.1f} |")
    return rows


def _steps(run_dir: Path, data: Path, max_tokens: int, paired: str | None) -> dict[str, Any]:
    from detot_agent.evaluation.breakdowns import BUCKETS, by_steps, gold_steps, run_records, vote_anatomy
    from detot_agent.evaluation.metrics import paired as mcnemar

    steps = gold_steps(data)
    records = run_records(run_dir)
    rows = {m: by_steps(recs, steps, max_tokens=max_tokens) for m, recs in records.items() if recs}
    heads = [f"{lo}-{hi if hi < 99 else ''} steps" for lo, hi in BUCKETS]
    _say(f"\n| method | problems | {' | '.join(heads)} | samples with no answer | of them cut at {max_tokens} tokens |")
    _say("|---|---:|" + "---:|" * len(BUCKETS) + "---:|---:|")
    for m, row in rows.items():
        cells = [f"{b['accuracy']:.3f} ({b['n']})" if b["n"] else "-" for b in row["buckets"].values()]
        _say(f"| {m} | {row['problems']} | {' | '.join(cells)} | {row['no_answer']:.1%} | {row['cut_off']:.1%} |")
    votes = {m: v for m, recs in records.items() if (v := vote_anatomy(recs)) is not None}
    if votes:
        _say("\n| method | greedy first sample right | any sample right | distinct stated answers/q | stated answers "
             "that are right | first sample states none | stopped early |")
        _say("|---|---:|---:|---:|---:|---:|---:|")
        for m, v in votes.items():
            _say(f"| {m} | {v['greedy_right']} | {v['any_right']} | {v['distinct_per_q']:.2f} "
                 f"| {v['stated_right']:.3f} | {v['first_states_none']} | {v['stopped_early']} |")
    per_bucket: dict[str, Any] = {}
    if paired is not None:
        ours = {r["id"]: bool(r["correct"]) for r in records.get(paired, [])}
        for other, recs in records.items():
            if other == paired or not recs:
                continue
            theirs = {r["id"]: bool(r["correct"]) for r in recs}
            for lo, hi in BUCKETS:
                t = mcnemar({i: v for i, v in ours.items() if lo <= steps[i] <= hi}, theirs)
                label = f"{lo}-{hi if hi < 99 else ''}"
                per_bucket.setdefault(other, {})[label] = {"only_method": t.b, "only_other": t.c, "p_value": t.p_value}
                _say(f"{label} steps, {paired} vs {other}: only {paired} right {t.b}, only {other} right {t.c}, "
                     f"exact McNemar p = {t.p_value:.3f}")
    return {"by_steps": rows, "votes": votes, "paired_by_bucket": per_bucket}
