"""Answer normalisation, voting, and adaptive stopping for self-consistency.

Normalisers turn a raw answer into the key that votes are counted on:
`number` (see `extract_number`), `label` (case, whitespace and synonyms mapped
onto the label set; anything else is unparseable), `text` (SQuAD-style:
lower case, punctuation and articles removed, whitespace collapsed).

`vote` counts keys (optionally weighted); ties go to the key whose first sample
came earliest. `should_stop` applies a stopping rule to the counts so far:

- `fixed`: never early; draw the whole budget;
- `majority`: stop when the winner's share reaches the threshold;
- `beta`: Adaptive-Consistency: with a votes for the winner and b for the runner-up,
  stop when P(p > 0.5) >= threshold for p ~ Beta(a + 1, b + 1);
- `entropy`: stop when the normalised entropy of the vote falls to 1 - threshold or below.

`extract_number` reads a numeric answer out of free text: first from an explicit
"The answer is N" (or `\\boxed{N}`) statement, else from the last number in the
text. Commas, currency signs, percent signs and units are dropped; simple
fractions are evaluated; the result is a canonical string ("39", "2.5", "-3").

Example:
    >>> extract_number("So 3 + 4 = 7 apples. The answer is $1,234.50.")
    ('1234.5', True)
    >>> extract_number("I think it is 12 or maybe 13")
    ('13', False)
    >>> extract_number("no idea")
    (None, False)
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from detot_agent.datasets import format_number
from detot_agent.task import AnswerFormat, StoppingRule

__all__ = ["VoteResult", "beta_confidence", "extract_number", "normalize", "normalize_label", "normalize_text",
           "numbers_equal", "should_stop", "vote"]

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?"
ANSWER_CUE = r"the\s+(?:final\s+)?answer\s+is|answer\s*:"  # what opens an answer statement (PlainAdapter too)
_STATED = re.compile(rf"(?:{ANSWER_CUE})\s*[:=]?\s*\**\s*({_NUM})", re.IGNORECASE)
_BOXED = re.compile(rf"\\boxed\{{\s*({_NUM})\s*\}}")
_ANY = re.compile(_NUM)


def _canon(raw: str) -> str | None:
    text = raw.replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            if int(den) == 0:
                return None
            value = Fraction(int(num), int(den))
            return format_number(float(value))
        return format_number(float(text))
    except ValueError:
        return None


def extract_number(text: str) -> tuple[str | None, bool]:
    """`(canonical number or None, whether it came from an explicit answer statement)`."""
    if not text:
        return None, False
    for pattern in (_STATED, _BOXED):
        found = pattern.findall(text)
        if found:
            value = _canon(found[-1])
            if value is not None:
                return value, True
    for raw in reversed(_ANY.findall(text)):
        value = _canon(raw)
        if value is not None:
            return value, False
    return None, False


def numbers_equal(a: str | None, b: str | None, *, tol: float = 1e-6) -> bool:
    """Numeric equality of two canonical numbers (None never equals anything)."""
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))
    except ValueError:
        return a == b


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_text(text: str) -> str | None:
    """SQuAD-style normalisation; None for empty results."""
    out = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    out = " ".join(_ARTICLES.sub(" ", out).split())
    return out or None


def normalize_label(text: str, labels: Sequence[str], synonyms: dict[str, list[str]] | None = None) -> str | None:
    """The label `text` names (case-insensitive, synonyms allowed), or None if it names none or several."""
    if not text:
        return None
    key = normalize_text(text)
    if key is None:
        return None
    table: dict[str, str] = {}
    for label in labels:
        for spelling in [label, *(synonyms or {}).get(label, [])]:
            norm = normalize_text(spelling)
            if norm:
                table[norm] = label
    if key in table:
        return table[key]
    found = {table[s] for s in table if re.search(rf"\b{re.escape(s)}\b", key)}
    return found.pop() if len(found) == 1 else None


def normalize(answer: str | None, fmt: AnswerFormat | str, *, labels: Sequence[str] = (),
              synonyms: dict[str, list[str]] | None = None) -> str | None:
    """The vote key of a raw answer under an answer format (None: unparseable)."""
    if answer is None:
        return None
    form = AnswerFormat(fmt)
    if form is AnswerFormat.NUMBER:
        return extract_number(str(answer))[0]
    if form is AnswerFormat.LABEL:
        return normalize_label(str(answer), labels, synonyms)
    return normalize_text(str(answer))


@dataclass(frozen=True)
class VoteResult:
    """Outcome of a vote.

    Attributes:
        winner: the winning key (None when no sample parsed).
        counts: weight per key, in order of first appearance.
        agreement: winner's share of the parsed weight (0 when nothing parsed).
        parsed: number of samples that parsed.
        unparsed: number that did not.
    """

    winner: str | None
    counts: dict[str, float] = field(default_factory=dict)
    agreement: float = 0.0
    parsed: int = 0
    unparsed: int = 0


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> VoteResult:
    """Count normalised answers (None = unparseable, skipped). Ties: the key seen first wins.

    Example:
        >>> vote(["7", None, "8", "7"]).winner, vote(["8", "7"]).winner
        ('7', '8')
    """
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    counts: dict[str, float] = {}
    parsed = 0
    for i, key in enumerate(answers):
        if key is None:
            continue
        w = 1.0 if weights is None else float(weights[i])
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight #{i} must be finite and >= 0, got {w}")
        counts[key] = counts.get(key, 0.0) + w
        parsed += 1
    if not counts:
        return VoteResult(None, {}, 0.0, 0, len(answers))
    best = max(counts.values())
    winner = next(k for k, v in counts.items() if v == best)  # dict order = first appearance
    total = sum(counts.values())
    return VoteResult(winner, counts, best / total if total else 0.0, parsed, len(answers) - parsed)


def beta_confidence(a: int, b: int) -> float:
    """P(p > 0.5) for p ~ Beta(a + 1, b + 1), exactly: P(Binomial(a + b + 1, 1/2) <= a)."""
    n = a + b + 1
    return sum(math.comb(n, i) for i in range(a + 1)) / 2**n


def should_stop(result: VoteResult, drawn: int, *, rule: StoppingRule | str, threshold: float, min_samples: int,
                max_samples: int) -> bool:
    """Whether to stop sampling after `drawn` samples with this vote so far."""
    if drawn >= max_samples:
        return True
    if drawn < min_samples or result.winner is None:
        return False
    rule = StoppingRule(rule)
    counts = sorted(result.counts.values(), reverse=True)
    if rule is StoppingRule.FIXED:
        return False
    if rule is StoppingRule.MAJORITY:
        return result.agreement >= threshold
    if rule is StoppingRule.BETA:
        a = round(counts[0])
        b = round(counts[1]) if len(counts) > 1 else 0
        return beta_confidence(a, b) >= threshold
    total = sum(counts)
    if len(counts) == 1:
        return True
    entropy = -sum(c / total * math.log(c / total) for c in counts if c > 0) / math.log(len(counts))
    return entropy <= 1 - threshold
