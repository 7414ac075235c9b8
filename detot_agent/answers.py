"""Answer text: canonical numbers, answer extraction, and normalisation to vote keys.

Pure Python, no heavy imports: data readers (gold answers), voting, evaluation and the
adapters all read answers through this one module.

Normalisers turn a raw answer into the key that votes are counted on:
`number` (see `extract_number`), `label` (case, whitespace and synonyms mapped
onto the label set; anything else is unparseable), `text` (SQuAD-style:
lower case, punctuation and articles removed, whitespace collapsed).

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
    >>> format_number("1,000.50")
    '1000.5'
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from enum import Enum
from fractions import Fraction

__all__ = ["ANSWER_CUE", "AnswerFormat", "extract_number", "format_number", "normalize", "normalize_label",
           "normalize_text", "numbers_equal"]


class AnswerFormat(str, Enum):
    """How answers are compared and voted on."""

    NUMBER = "number"
    LABEL = "label"
    TEXT = "text"



def format_number(value: float | int | str) -> str:
    """Canonical text of a numeric answer: `39.0` -> `39`, `0.50` -> `0.5`, `1,000` -> `1000`."""
    text = str(value).replace(",", "").strip()
    try:
        num = float(text)
    except ValueError:
        return text
    if num.is_integer():
        return str(int(num))
    return f"{num:.6f}".rstrip("0").rstrip(".")


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
