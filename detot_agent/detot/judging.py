"""Judging a candidate: by paired replay (`ReplayJudge`, the rules as pure functions), or by held-out proxies.

Both states answer the same held-out items (questions the candidate never trained on, answered by
the serving version, plus the labelled canary set), through the whole pipeline (retrieval, soft
prompt, sampling with the same seeds). Each item gives a `Replayed` per state. Then:

**With gold** (items whose correct answer is known: canary items, and evidence given `feedback`):
let `b` = items only the candidate gets right, `c` = items only the serving state gets right. The
one-sided exact sign (McNemar) test `P(X >= b | X ~ Bin(b + c, 1/2))` must be `<= alpha_i`, and
the gain `(b - c) / n_gold` must be at least `min_effect`.

**Without gold**, a label-free rule that a constant answer, a collapsed retrieval or noise cannot
pass; all of:
- agreement rises significantly: one-sided sign test over the items whose agreement changed
  (`P(X >= up | Bin(up + down, 1/2)) <= alpha_i`);
- few flips away from confident majorities: among items the serving state answered with agreement
  `>= good_agreement`, the share whose winner changes is at most `max_flip`;
- no collapse (checked in both modes): the candidate's distinct answers across the items are at least
  `min_diversity` times the serving state's, and no single demo is shown for more than `max_hub_share`
  of the items (unless the serving state already showed it for half as many).
Its limits: it rewards *consistency*, not correctness: a candidate that makes the model confidently
and diversely wrong on items where the old state was unsure can pass. Gold (feedback or a canary
set) is the remedy; without it the loop can only become more self-consistent.

**Without replay** (a `Controller` used on its own), the held-out proxies: the target NLL under each
record's own soft prompt (`held_out_nll`) and the demo *separation* (`separation`: MRR of demos behind good
answers minus that of demos behind poor ones), with a retrieval-collapse check over probe queries
(`probe_hub_share`).

**Error budget**: the i-th test of a program (i = 0, 1, ...) runs at `alpha_i = alpha / 2^(i+1)`,
so all the re-optimizations of one program together accept a change that does not help with
probability at most `alpha` (a union bound over the series).

Example:
    >>> sign_test_p(6, 0)           # 6 wins, no losses
    0.015625
    >>> alpha_for(0, 0.05), alpha_for(2, 0.05)
    (0.025, 0.00625)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field

from detot_agent.config import StrictModel
from detot_agent.detot.records import Evidence, Replayed, TaskState, Verdict
from detot_agent.errors import DetotError, InvalidRequestError

__all__ = [
    "PROBES",
    "ReoptimizationStopped",
    "ReplayJudge",
    "ReplayRules",
    "Replayed",
    "alpha_for",
    "budget_check",
    "collapsed",
    "decide",
    "futile",
    "held_out_nll",
    "hub_share",
    "mrr",
    "probe_hub_share",
    "separation",
    "sign_test_p",
]

PROBES = 64  # probe queries for the retrieval-collapse check


class ReoptimizationStopped(DetotError):
    """A re-optimization that ends before publishing: the old state keeps serving, for `reason`; `decided=False`
    when nothing was judged (a shadow trial is still collecting), so reports do not count it as a rejection."""

    def __init__(self, reason: str, *, decided: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decided = decided


class ReplayRules(StrictModel):
    """The thresholds of `decide` and the loop's notion of a good answer (`ControllerConfig.replay`).

    Attributes:
        alpha: the family-wise error budget of all a program's tests.
        min_effect: the least accuracy gain on gold items.
        max_flip: without gold, the most flips of the serving state's confident answers.
        min_diversity: the least share of the serving state's distinct answers (and demos) a candidate keeps.
        max_hub_share: a retrieval collapse: one demo behind more than this share of items (and twice the
            serving state's share).
        good_agreement: agreement at which an unlabelled answer counts as good (also for training targets).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(default=0.05, gt=0, lt=1)
    min_effect: float = Field(default=0.05, ge=0, le=1)
    max_flip: float = Field(default=0.1, ge=0, le=1)
    min_diversity: float = Field(default=0.5, ge=0, le=1)
    max_hub_share: float = Field(default=0.5, gt=0, le=1)
    good_agreement: float = Field(default=0.75, ge=0, le=1)


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: `P(X >= wins)` for `X ~ Bin(wins + losses, 1/2)` (1.0 when no pair differs)."""
    from scipy.stats import binomtest

    n = wins + losses
    return 1.0 if n == 0 else float(binomtest(wins, n, 0.5, alternative="greater").pvalue)


def alpha_for(test_index: int, alpha: float) -> float:
    """The level of the `test_index`-th test (0-based): `alpha / 2^(i+1)` (they sum to `alpha`)."""
    return alpha / 2 ** (test_index + 1)


def gold_counts(old: Sequence[Replayed], new: Sequence[Replayed], gold: Sequence[str | None]) -> tuple[int, int]:
    """`(wins, losses)` on the gold items: the candidate alone right, the serving state alone right."""
    wins = sum(g is not None and n.key == g and o.key != g for o, n, g in zip(old, new, gold, strict=True))
    losses = sum(g is not None and o.key == g and n.key != g for o, n, g in zip(old, new, gold, strict=True))
    return wins, losses


def futile(old: Sequence[Replayed], new: Sequence[Replayed], gold: Sequence[str | None], *, remaining_gold: int,
           total_gold: int, rules: ReplayRules, test_index: int) -> bool:
    """Whether `decide` must reject whatever the `remaining_gold` gold items not yet replayed give: even if the
    candidate alone were right on every one of them, the sign test or the minimum effect would fail. A replay
    can stop there (the decision is the same, for less work).

    Example:
        >>> r = lambda key: Replayed(key, 1.0, ())
        >>> futile([r("1"), r("2")], [r("0"), r("0")], ["1", "2"], remaining_gold=2, total_gold=4,
        ...        rules=ReplayRules(), test_index=0)
        True
    """
    if total_gold == 0:
        return False  # label-free mode: agreement and flips, no early stop
    wins, losses = gold_counts(old, new, gold)
    best = wins + remaining_gold
    return (sign_test_p(best, losses) > alpha_for(test_index, rules.alpha)
            or (best - losses) / total_gold < rules.min_effect)


def _distinct(values: Sequence[Any]) -> int:
    return len({v for v in values if v is not None})


def hub_share(demo_lists: Sequence[Sequence[str]]) -> float:
    """The share of items whose demos include the most shown demo (1.0: one demo behind every item)."""
    if not demo_lists:
        return 0.0
    counts: dict[str, int] = {}
    for demos in demo_lists:
        for d in set(demos):
            counts[d] = counts.get(d, 0) + 1
    return max(counts.values(), default=0) / len(demo_lists)


def collapsed(hub_old: float, hub_new: float, max_hub_share: float) -> bool:
    """A retrieval collapse: one demo behind more than `max_hub_share` of the items, and more than twice
    as often as under the serving state (an index with one dominant exemplar is not a collapse)."""
    return hub_new > max_hub_share and hub_new > 2 * hub_old


def decide(old: Sequence[Replayed], new: Sequence[Replayed], gold: Sequence[str | None], *, rules: ReplayRules,
           test_index: int) -> tuple[bool, str, dict[str, Any]]:
    """Accept or reject a candidate from paired replays: `(accepted, reason, stats)` (module docstring).

    Args:
        old / new: per item, the serving state's and the candidate's `Replayed`.
        gold: per item, the gold vote key, or None where it is unknown.
        rules: thresholds.
        test_index: how many tests this program ran before (the error budget).
    """
    if not (len(old) == len(new) == len(gold)) or not old:
        raise InvalidRequestError(f"decide needs the same non-zero number of items: {len(old)}, {len(new)}, "
                                  f"{len(gold)}")
    level = alpha_for(test_index, rules.alpha)
    stats: dict[str, Any] = {"items": len(old), "alpha": level, "test_index": test_index}
    # no collapse, whatever the mode
    answers_old, answers_new = _distinct([r.key for r in old]), _distinct([r.key for r in new])
    hubs = [hub_share([r.demo_ids for r in old]), hub_share([r.demo_ids for r in new])]
    stats.update(distinct_answers=[answers_old, answers_new], demo_hub_share=hubs)
    if answers_new < rules.min_diversity * answers_old:
        return False, (f"answers collapsed: {answers_new} distinct answers against {answers_old} "
                       f"(needs >= {rules.min_diversity:.0%})"), stats
    if collapsed(hubs[0], hubs[1], rules.max_hub_share):
        return False, (f"retrieval collapsed: one demo is shown for {hubs[1]:.0%} of the items (serving state: "
                       f"{hubs[0]:.0%}; allowed: {rules.max_hub_share:.0%}, or at most twice the serving "
                       "state's)"), stats
    labelled = [i for i, g in enumerate(gold) if g is not None]
    if labelled:
        wins, losses = gold_counts(old, new, gold)
        p = sign_test_p(wins, losses)
        effect = (wins - losses) / len(labelled)
        stats.update(mode="gold", gold_items=len(labelled), only_candidate_right=wins, only_serving_right=losses,
                     p_value=p, effect=effect,
                     accuracy=[sum(old[i].key == gold[i] for i in labelled) / len(labelled),
                               sum(new[i].key == gold[i] for i in labelled) / len(labelled)])
        ok = p <= level and effect >= rules.min_effect
        why = (f"on {len(labelled)} gold items the candidate alone was right on {wins}, the serving state alone on "
               f"{losses}: one-sided sign test p = {p:.3g} (needs <= {level:.3g}), gain {effect:+.3f} "
               f"(needs >= {rules.min_effect:.3f})")
        return ok, why, stats
    up = sum(n.agreement > o.agreement for o, n in zip(old, new, strict=True))
    down = sum(n.agreement < o.agreement for o, n in zip(old, new, strict=True))
    p = sign_test_p(up, down)
    confident = [i for i, o in enumerate(old) if o.key is not None and o.agreement >= rules.good_agreement]
    flips = sum(new[i].key != old[i].key for i in confident)
    flip_share = flips / len(confident) if confident else 0.0
    stats.update(mode="label-free", agreement_up=up, agreement_down=down, p_value=p, confident_items=len(confident),
                 flips=flips, flip_share=flip_share)
    why = (f"no gold: agreement rose on {up} items and fell on {down} (one-sided sign test p = {p:.3g}, needs <= "
           f"{level:.3g}); {flips} of {len(confident)} confident answers flipped (share {flip_share:.2f}, needs <= "
           f"{rules.max_flip:.2f})")
    return p <= level and flip_share <= rules.max_flip, why, stats


# ---- paired replay ---------------------------------------------------------------------------------------------
Replay = Callable[[TaskState, dict[str, Any]], Replayed]


class ReplayJudge:
    """Judges a candidate state against the serving one by paired replay of held-out records and the canary set.

    Args:
        replay: answers one input under a given state through the whole pipeline (DETOT supplies it).

    The serving state's side is replayed only where its answer is unknown: a held-out record keeps the answer
    it was served (`Evidence.served`), and a canary item's answer is kept per serving state for its next
    judgement.
    """

    def __init__(self, replay: Replay) -> None:
        self.replay = replay
        self._canary_state: TaskState | None = None  # whose canary answers `_canary_answers` holds
        self._canary_answers: dict[int, Replayed] = {}

    def forget(self) -> None:
        """Drop the cached canary answers (the serving state came from outside the loop)."""
        self._canary_state, self._canary_answers = None, {}

    def judge(self, old: TaskState, new_state: TaskState, records: list[Evidence], *, rules: ReplayRules,
              test_index: int, max_items: int, check_budget: Callable[[Callable[[], str]], None],
              canary: Sequence[tuple[dict[str, Any], str]] = (), gold_only: bool = False) -> Verdict:
        """Both states answer the same records (never trained on by the candidate) and the `canary` set
        (labelled `(inputs, gold_key)` items); with `gold_only`, only the items whose gold answer is known.
        `check_budget(progress)` raises `ReoptimizationStopped` past the time budget."""
        held = [e for e in records if e.inputs is not None and (e.gold_key is not None or not gold_only)][:max_items]
        items = [(e.inputs, e.gold_key) for e in held] + [(inp, gold) for inp, gold in canary]
        if not items:
            if gold_only:
                raise ReoptimizationStopped("no gold items to judge a policy on (give feedback or a canary set); "
                                            "kept the old state")
            raise DetotError("internal: the controller let through a split with nothing to replay; please report it")
        golds = [g for _, g in items]
        total_gold = sum(g is not None for g in golds)
        olds: list[Replayed] = []
        news: list[Replayed] = []
        stopped = None
        reused = 0
        for j, (inputs, _) in enumerate(items):
            assert inputs is not None
            answer, known = self._serving_side(old, held[j] if j < len(held) else None, j - len(held), inputs)
            reused += known
            olds.append(answer)
            news.append(self.replay(new_state, inputs))

            def progress(done: int = j + 1) -> str:  # a budget-stopped judgement is still evidence
                wins, losses = gold_counts(olds, news, golds[:done])
                return (f"after {done} of {len(items)} items (so far the candidate alone was right on {wins} gold "
                        f"items, the serving state alone on {losses})")

            check_budget(progress)
            left = sum(g is not None for g in golds[j + 1:])
            if left and futile(olds, news, golds[: j + 1], remaining_gold=left, total_gold=total_gold, rules=rules,
                               test_index=test_index):
                stopped = j + 1  # no outcome of the rest can pass: the same rejection, for less work
                break
        accepted, why, stats = decide(olds, news, golds[: len(olds)], rules=rules, test_index=test_index)
        stats.update(held_out=len(held), canary=len(canary), serving_answers_reused=reused)
        if stopped is not None:
            accepted = False
            why = (f"stopped after {stopped} of {len(items)} items: even if the candidate alone were right on all "
                   f"{total_gold - sum(g is not None for g in golds[:stopped])} gold items left, it could not pass "
                   f"(so far: {why})")
            stats.update(stopped_after=stopped)
        if canary and stopped is None:  # the canary set's own accuracy, serving state vs candidate
            tail = len(canary)
            canary_golds = [g for _, g in canary]
            stats["canary_accuracy"] = [sum(r.key == g for r, g in zip(rs[-tail:], canary_golds, strict=True)) / tail
                                        for rs in (olds, news)]
        before, after = (stats["accuracy"] if stats.get("mode") == "gold" else
                         [sum(r.agreement for r in olds) / len(olds), sum(r.agreement for r in news) / len(news)])
        measure = "replayed accuracy on gold items" if stats.get("mode") == "gold" else "replayed mean agreement"
        return Verdict("replay", measure, float(before), float(after), accepted=accepted, reason=why, stats=stats)

    def _serving_side(self, old: TaskState, record: Evidence | None, canary_index: int,
                      inputs: dict[str, Any]) -> tuple[Replayed, bool]:
        """`(answer, already known)`: the serving state's side of an item."""
        if record is not None:
            if record.served is not None and record.version == old.version:
                return record.served, True
            return self.replay(old, inputs), False
        if self._canary_state is not old:
            self._canary_state, self._canary_answers = old, {}
        known = self._canary_answers.get(canary_index)
        if known is not None:
            return known, True
        answer = self._canary_answers[canary_index] = self.replay(old, inputs)
        return answer, False


def budget_check(start: float, limit: float | None, stage: str) -> Callable[..., None]:
    """A `check_budget(progress)` that raises `ReoptimizationStopped` once `limit` seconds have passed since
    `start` (None: never); `progress()` says how far `stage` got."""
    def check(progress: Callable[[], str] | None = None) -> None:
        if limit is not None and time.perf_counter() - start > limit:
            done = f", {progress()}" if progress is not None else ""
            raise ReoptimizationStopped(f"the {limit:g} s budget ran out during {stage}{done}; kept the old state")

    return check


# ---- held-out proxies (a Controller without replay) --------------------------------------------------------------
def probe_hub_share(index: Any, embedding: Any, k: int, probes: int = PROBES) -> float:
    """`hub_share` of the top-k exemplars over a fixed sample of the index's own inputs used as queries
    (the held-out records alone are too few to show a collapse)."""
    k = min(k, len(index))
    queries = embedding.query(index.sample_vectors(probes, seed=0))
    return hub_share([[h.id for h in index.search(q, k)] for q in queries])


def held_out_nll(engine: Any, embedding: Any, pairs: list[tuple[Evidence, Any]]) -> float | None:
    """Mean NLL of held-out targets (`(record, TuneExample)` pairs), each under its own soft prompt `P(x)`."""
    if engine is None or not embedding.has_head or not pairs:
        return None
    from detot_agent.softprompt.loss import target_nll

    prompts = embedding.soft_prompts(np.stack([ev.query for ev, _ in pairs]))  # (N, k, H)
    return target_nll(engine, prompts, [ex for _, ex in pairs])


def mrr(index: Any, embedding: Any, records: list[Evidence]) -> float | None:
    """Mean reciprocal rank of each record's demos under `embedding`'s query for that record."""
    records = [e for e in records if e.demo_ids]
    if not records:
        return None
    total = 0.0
    depth = min(len(index), 50)
    for ev in records:
        ranked = [h.id for h in index.search(embedding.query(ev.query), depth)]
        ranks = [ranked.index(d) + 1 for d in ev.demo_ids if d in ranked]
        total += sum(1.0 / r for r in ranks) / len(ev.demo_ids)
    return total / len(records)


def separation(index: Any, embedding: Any, held: list[Evidence], good_agreement: float) -> float | None:
    """MRR of the demos behind good held-out answers minus MRR of those behind poor ones.

    Every held-out demo was a top result of the *old* query, so plain MRR of good demos favours the
    old state whatever the new one learnt. The difference cancels that bias: a query that ranks
    helpful demos above unhelpful ones scores higher. Without poor records it falls back to the
    good demos' MRR (conservative: a retrieval change must then keep them where they were).
    """
    if embedding is None:
        return None
    good = mrr(index, embedding, [e for e in held if e.good(good_agreement)])
    if good is None:
        return None
    poor = mrr(index, embedding, [e for e in held if not e.good(good_agreement)])
    return good - (poor or 0.0)
