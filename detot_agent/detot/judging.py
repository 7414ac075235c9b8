"""Judging a candidate task embedding by paired replay (issue 17): the decision rules, as pure functions.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from detot_agent.errors import InvalidRequestError

__all__ = ["ReplayRules", "Replayed", "alpha_for", "collapsed", "decide", "futile", "hub_share", "sign_test_p"]


@dataclass(frozen=True)
class Replayed:
    """One item answered by one state.

    Attributes:
        key: the winning vote key (None: no parseable answer).
        agreement: the winner's share of the vote.
        demo_ids: the demos retrieved for it.
    """

    key: str | None
    agreement: float
    demo_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplayRules:
    """The thresholds of `decide` (from `ControllerConfig`)."""

    alpha: float = 0.05
    min_effect: float = 0.05
    max_flip: float = 0.1
    min_diversity: float = 0.5
    max_hub_share: float = 0.5
    good_agreement: float = 0.75


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
