"""Readings of committed run folders beyond the report: stream halves, two runs side by side, and where answers
are lost (by gold solution steps, by token-limit cut-offs, and in the votes).

`detot eval report DIR` prints them on request (`--halves A,B`, `--against OTHER_DIR`, `--steps DATA_FILE`);
each is paired where two methods or runs are compared (McNemar's exact test, `metrics.paired`), on the
problems both answered, counted as the report counts them (the run's problems, the first record of an id).

Example:
    >>> row = vote_anatomy([{"id": "q1", "gold": "3", "sample_keys": ["3", "4", None], "samples": 3},
    ...                     {"id": "q2", "gold": "5", "sample_keys": ["6", "6", "5"], "samples": 2}], budget=3)
    >>> row["greedy_right"], row["any_right"], row["first_states_none"], row["stopped_early"]
    (1, 2, 0, 1)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detot_agent.errors import ConfigError, DataFileError
from detot_agent.evaluation.metrics import paired
from detot_agent.evaluation.paired import need_methods, run_outcomes, run_records
from detot_agent.evaluation.runner import read_run

__all__ = ["BUCKETS", "TRACE_FIELDS", "by_steps", "compare_records", "compare_runs", "gold_steps", "run_records",
           "stream_halves", "vote_anatomy"]

BUCKETS = ((1, 2), (3, 4), (5, 99))  # gold solution steps
# what a record keeps of an answer's path: two records equal on all of them are the same decode (records hold no
# text, and equal answers with equal token counts are the trace a different greedy path would change)
TRACE_FIELDS = ("answer", "pred", "tokens", "samples", "parse_failures", "correct")


def stream_halves(run_dir: str | Path, a: str, b: str) -> dict[str, Any]:
    """`a` against `b` on the first half, the second half and the whole of the run's stream order (`run.json`'s
    `ids`, the order a prequential run answered in): accuracy of each and the paired counts.

    Raises:
        ConfigError: `a` or `b` is not a method of the run.
    """
    folder = Path(run_dir)
    ids = read_run(folder)["ids"]
    outcomes = run_outcomes(folder)
    need_methods(outcomes, a, b)
    half = len(ids) // 2
    rows: dict[str, Any] = {}
    for name, part in (("first half", ids[:half]), ("second half", ids[half:]), ("whole stream", ids)):
        both = [i for i in part if i in outcomes[a] and i in outcomes[b]]
        if not both:
            continue
        x, y = ({i: outcomes[m][i] for i in both} for m in (a, b))
        t = paired(x, y)
        rows[name] = {"n": len(both), a: sum(x.values()) / len(both), b: sum(y.values()) / len(both),
                      f"only_{a}": t.b, f"only_{b}": t.c, "p_value": t.p_value}
    return {"problems": len(ids), "methods": [a, b], "halves": rows}


def compare_runs(run_dir: str | Path, other_dir: str | Path, methods: list[str] | None = None) -> list[dict[str, Any]]:
    """The same methods in two runs (two engines, two machines) problem by problem: accuracy in each, McNemar
    between them, answers that agree, tokens and seconds per question and wall-clock minutes, on the
    problems both answered.

    Raises:
        ConfigError: no method is in both runs, or a named one is missing from either.
    """
    mine, theirs = run_records(run_dir), run_records(other_dir)
    names = methods or [m for m in mine if m in theirs]
    if not names:
        raise ConfigError(f"{run_dir} and {other_dir} share no method ({', '.join(mine)} vs {', '.join(theirs)})")
    need_methods(mine, *names)
    need_methods(theirs, *names)
    rows = []
    for method in names:
        try:
            rows.append({"method": method, **compare_records(mine[method], theirs[method])})
        except ConfigError:
            raise ConfigError(f"{method!r} answered no problem in both runs") from None
    return rows


def compare_records(run: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """Two sets of records of one method (the first record of an id counts) on the problems both answered, in
    `run`'s order: McNemar between them, answers that agree, records identical on every `TRACE_FIELDS` field (the
    ids that differ listed), and each side's accuracy, tokens and seconds per question and wall-clock minutes.

    Example:
        >>> a = [{"id": "q1", "pred": "3", "correct": True}, {"id": "q2", "pred": "4", "correct": False}]
        >>> b = [{"id": "q1", "pred": "3", "correct": True}, {"id": "q2", "pred": "5", "correct": True}]
        >>> row = compare_records(a, b)
        >>> row["problems"], row["identical"], row["differing_ids"], row["other"]["accuracy"]
        (2, 1, ['q2'], 1.0)

    Raises:
        ConfigError: no problem is in both.
    """
    a: dict[str, dict[str, Any]] = {}
    b: dict[str, dict[str, Any]] = {}
    for recs, into in ((run, a), (other, b)):
        for r in recs:
            into.setdefault(r["id"], r)
    common = [i for i in a if i in b]
    if not common:
        raise ConfigError("the two sets of records share no problem")
    t = paired({i: bool(a[i]["correct"]) for i in common}, {i: bool(b[i]["correct"]) for i in common})
    same = {i for i in common if all(a[i].get(f) == b[i].get(f) for f in TRACE_FIELDS)}
    row: dict[str, Any] = {"problems": len(common), "only_run": t.b, "only_other": t.c, "p_value": t.p_value,
                           "same_answer": sum(a[i].get("pred") == b[i].get("pred") for i in common),
                           "identical": len(same), "differing_ids": [i for i in common if i not in same]}
    for label, by_id in (("run", a), ("other", b)):
        part = [by_id[i] for i in common]
        ends = sorted(float(r.get("finished_at") or 0.0) for r in part)
        row[label] = {"accuracy": sum(bool(r["correct"]) for r in part) / len(part),
                      "tokens_per_q": sum(r.get("tokens") or 0 for r in part) / len(part),
                      "seconds_per_q": sum(r.get("latency_s") or 0.0 for r in part) / len(part),
                      "minutes": (ends[-1] - ends[0]) / 60 if len(ends) > 1 else 0.0}
    return row


def gold_steps(data_file: str | Path) -> dict[str, int]:
    """`<stem>:<line>` (how `io.datafiles.read_exemplars` names GSM8K-layout problems) -> the number of lines in the
    worked answer before `####`.

    Raises:
        DataFileError: the file is missing or not JSONL with a GSM8K-style `answer`.
    """
    path = Path(data_file)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file (pass the GSM8K JSONL the run's ids point into)")
    out = {}
    for no, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            try:
                answer = json.loads(line)["answer"]
            except (ValueError, KeyError, TypeError):
                raise DataFileError(f"{path}:{no}: not a GSM8K line (JSON with an `answer` whose worked solution "
                                    "ends in `#### N`)") from None
            body = str(answer).rpartition("####")[0]
            out[f"{path.stem}:{no}"] = sum(1 for s in body.splitlines() if s.strip())
    return out


def by_steps(records: list[dict[str, Any]], steps: dict[str, int], *, max_tokens: int) -> dict[str, Any]:
    """Accuracy per bucket of gold solution steps, and the share of samples that state no answer and of those
    that also reached `max_tokens` (cut off mid-solution). A method with one reply per problem counts that
    reply as its one sample.

    Raises:
        DataFileError: a record's id is not in `steps` (the data file is not the run's).
    """
    unknown = [r["id"] for r in records if r["id"] not in steps]
    if unknown:
        raise DataFileError(f"problem {unknown[0]!r} is not in the steps file ({len(unknown)} such): pass the data "
                            "file the run was drawn from")
    buckets = {}
    for lo, hi in BUCKETS:
        got = [bool(r["correct"]) for r in records if lo <= steps[r["id"]] <= hi]
        buckets[f"{lo}-{hi if hi < 99 else ''}"] = {"n": len(got), "accuracy": sum(got) / len(got) if got else None}
    keys = [(k, t) for r in records for k, t in zip(r.get("sample_keys") or [r.get("pred")],
                                                   r.get("sample_tokens") or [r.get("tokens") or 0], strict=False)]
    none = [t for k, t in keys if k is None]
    return {"problems": len(records), "buckets": buckets, "samples": len(keys),
            "no_answer": len(none) / max(len(keys), 1),
            "cut_off": sum(1 for t in none if t >= max_tokens) / max(len(keys), 1)}


def vote_anatomy(records: list[dict[str, Any]], *, budget: int | None = None) -> dict[str, Any] | None:
    """How a voting method's samples fall: its greedy first sample right, any sample right (the most a vote could
    get), distinct stated answers per problem, the share of stated answers that are right, first samples that
    state no answer, and problems that stopped before `budget` samples (the largest drawn, when None). None for
    a method with one reply per problem.
    """
    voted = [r for r in records if r.get("sample_keys")]
    if not voted or not any(len(r["sample_keys"]) > 1 for r in voted):
        return None
    budget = budget or max(len(r["sample_keys"]) for r in voted)
    stated = [(k, r["gold"]) for r in voted for k in r["sample_keys"] if k is not None]
    return {"problems": len(voted),
            "greedy_right": sum(r["sample_keys"][0] == r["gold"] for r in voted),
            "any_right": sum(r["gold"] in r["sample_keys"] for r in voted),
            "distinct_per_q": sum(len(set(r["sample_keys"]) - {None}) for r in voted) / len(voted),
            "stated_right": sum(k == g for k, g in stated) / max(len(stated), 1),
            "first_states_none": sum(r["sample_keys"][0] is None for r in voted),
            "stopped_early": sum(int(r.get("samples") or len(r["sample_keys"])) < budget for r in voted)}
