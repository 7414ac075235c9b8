"""Racing candidate configurations on the valset, and the guard against plain voting.

Every candidate answers the same valset items in the same order (the samples' seeds come from the question, so
candidates share them). After every `race_every` items the leader (most correct, then fewest tokens) is compared
with each other candidate by a one-sided exact sign test on the items where they differ; a candidate behind at
`race_alpha` stops answering (F-race). `plain`, the guard's baseline, is never dropped. Each answer is one JSONL
row, so a killed race resumes where it stopped, and the drops are recomputed from the rows.

Example:
    >>> outcomes = {"plain": [True, True, False], "a": [True, False, False]}
    >>> leader(outcomes, {"plain": [9, 9, 9], "a": [5, 5, 5]}, 3)
    'plain'
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy

from detot_agent.detot.judging import sign_test_p
from detot_agent.detot.module import DETOT
from detot_agent.errors import FitError
from detot_agent.fit.config import PLAIN, FitConfig
from detot_agent.fit.distill import accepted, inputs_of
from detot_agent.io.jsonlog import JsonlLog

__all__ = ["answer_item", "guard", "leader", "race", "standings"]


def answer_item(program: DETOT, example: dspy.Example, metric: Callable[..., Any], threshold: float) -> dict[str, Any]:
    """One valset item under one candidate: correctness by the metric, tokens and samples spent, and each sample's
    key, tokens and log-probability with the keys the metric accepts (what `fit/stopping.py` replays)."""
    pred = program(**inputs_of(program, example))
    fields = {name: pred.get(name) for name in program._signature().output_fields}
    drawn = list(pred.get("sample_keys") or [])
    keys = [k for k in drawn if k is not None]
    key_correct: dict[str, bool] = {}
    for key, sample in zip(drawn, pred.get("sample_fields") or [None] * len(drawn), strict=False):
        if key is not None and key not in key_correct:
            key_correct[key] = bool(sample) and accepted(metric, example, dict(sample), threshold)
    return {"correct": accepted(metric, example, fields, threshold), "tokens": int(pred.get("tokens") or 0),
            "samples": int(pred.get("samples_used") or 0), "answer": pred.get("answer_key"),
            "agreement": pred.get("agreement"), "distinct": len(set(keys)),
            "unparsed": int(pred.get("parse_failures") or 0), "sample_keys": drawn,
            "sample_tokens": list(pred.get("sample_tokens") or []),
            "sample_logprobs": list(pred.get("sample_logprobs") or []), "key_correct": key_correct}


def leader(correct: dict[str, list[bool]], tokens: dict[str, list[int]], upto: int) -> str:
    """The candidate with the most correct of the first `upto` items; ties go to fewer tokens, then `plain`."""
    return max(correct, key=lambda c: (sum(correct[c][:upto]), -sum(tokens[c][:upto]), c == PLAIN))


def _table(rows: dict[str, dict[int, dict[str, Any]]], names: Sequence[str], upto: int
           ) -> tuple[dict[str, list[bool]], dict[str, list[int]]]:
    """`(correct, tokens)` per candidate of `names` over the first `upto` items."""
    return ({c: [bool(rows[c][i]["correct"]) for i in range(upto)] for c in names},
            {c: [int(rows[c][i]["tokens"]) for i in range(upto)] for c in names})


def _wins(a: list[bool], b: list[bool]) -> int:
    """Items `a` got right and `b` did not (one side of a paired sign test)."""
    return sum(x and not y for x, y in zip(a, b, strict=True))


def _dropped(correct: dict[str, list[bool]], tokens: dict[str, list[int]], upto: int, alpha: float) -> list[str]:
    """The candidates a look after `upto` items drops: behind the leader by the one-sided sign test at `alpha`."""
    best = leader(correct, tokens, upto)
    return [c for c in correct if c not in (best, PLAIN)
            and sign_test_p(_wins(correct[best][:upto], correct[c][:upto]),
                            _wins(correct[c][:upto], correct[best][:upto])) < alpha]


def race(candidates: dict[str, DETOT], valset: Sequence[dspy.Example], metric: Callable[..., Any], cfg: FitConfig,
         log: JsonlLog, *, deadline: float, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Race `candidates` on `valset`; returns `{"rows", "dropped", "items", "stopped_by_time"}` (rows per
    candidate in valset order; `items`: the valset items every surviving candidate answered)."""
    rows: dict[str, dict[int, dict[str, Any]]] = {c: {} for c in candidates}
    for r in log.read(repair=True):
        if r.get("candidate") in rows:
            rows[r["candidate"]][int(r["item"])] = r
    alive = list(candidates)
    dropped: dict[str, int] = {}
    stopped = False
    for start in range(0, len(valset), cfg.race_every):
        block = range(start, min(start + cfg.race_every, len(valset)))
        for name in alive:
            todo = [i for i in block if i not in rows[name]]
            if not todo:
                continue
            if time.monotonic() > deadline:
                stopped = True
                break

            def one(i: int, name: str = name) -> dict[str, Any]:
                return {"candidate": name, "item": i, **answer_item(candidates[name], valset[i], metric,
                                                                      cfg.metric_threshold)}
            with ThreadPoolExecutor(max_workers=cfg.threads) as pool:
                for row in pool.map(one, todo):
                    rows[name][row["item"]] = row
                    log.append(row)
            progress(f"race: {name} answered items {block.start + 1}-{block.stop} of {len(valset)}")
        if stopped:
            break
        upto = block.stop
        for c in _dropped(*_table(rows, alive, upto), upto, cfg.race_alpha):
            dropped[c] = upto
            alive.remove(c)
            progress(f"race: {c} dropped after {upto} items (behind the leader, sign test p < {cfg.race_alpha})")
    items = min((_answered(rows[c]) for c in alive), default=0)
    if items == 0:
        raise FitError("the race answered no valset item with every candidate before the time budget ran out; "
                       "raise max_minutes or race fewer candidates")
    return {"rows": rows, "dropped": dropped, "items": items, "stopped_by_time": stopped, "alive": alive}


def _answered(rows: dict[int, dict[str, Any]]) -> int:
    """How many items from the first on a candidate answered without a gap."""
    n = 0
    while n in rows:
        n += 1
    return n


def standings(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per candidate: items answered, accuracy, tokens, samples and distinct answers per item, and where it was
    dropped."""
    out = {}
    for c, rows in result["rows"].items():
        n = len(rows)
        out[c] = {"items": n, "correct": sum(bool(r["correct"]) for r in rows.values()),
                  "accuracy": sum(bool(r["correct"]) for r in rows.values()) / n if n else None,
                  "tokens": sum(int(r["tokens"]) for r in rows.values()) / n if n else None,
                  "samples": sum(int(r["samples"]) for r in rows.values()) / n if n else None,
                  "distinct_answers": sum(int(r.get("distinct", 0)) for r in rows.values()) / n if n else None,
                  "dropped_after": result["dropped"].get(c)}
    return out


def guard(result: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Choose DETOT's best surviving configuration on the items every survivor answered, then guard it against plain.

    The best (most correct, then fewest tokens) ships unless the race dropped every DETOT configuration or plain
    matches or beats it on those items (more correct, as many at no more tokens, or a one-sided paired sign test
    says it is worse at `alpha`); then plain ships (`guard_fired`).
    """
    n = result["items"]
    correct, tokens = _table(result["rows"], result["alive"], n)
    detot = {c: v for c, v in correct.items() if c != PLAIN}
    if not detot:  # the race dropped every DETOT configuration: each was significantly behind
        return {"best": None, "shipped": PLAIN, "guard_fired": True, "items": n, "wins_over_plain": 0,
                "losses_to_plain": 0, "p_worse_than_plain": None, "p_better_than_plain": None,
                "accuracy": {PLAIN: sum(correct[PLAIN]) / n}, "tokens": {PLAIN: sum(tokens[PLAIN]) / n}}
    best = leader(detot, tokens, n)
    plain_wins, best_wins = _wins(correct[PLAIN], correct[best]), _wins(correct[best], correct[PLAIN])
    p_worse = sign_test_p(plain_wins, best_wins)
    behind = (sum(correct[best]), -sum(tokens[best])) <= (sum(correct[PLAIN]), -sum(tokens[PLAIN]))  # ties: plain
    fired = behind or p_worse < alpha
    return {"best": best, "shipped": PLAIN if fired else best, "guard_fired": fired, "items": n,
            "wins_over_plain": best_wins, "losses_to_plain": plain_wins, "p_worse_than_plain": p_worse,
            "p_better_than_plain": sign_test_p(best_wins, plain_wins),
            "accuracy": {c: sum(v) / n for c, v in correct.items()},
            "tokens": {c: sum(v) / n for c, v in tokens.items()}}
