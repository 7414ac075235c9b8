"""Answer extraction and normalisation (the start of the voting module).

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

import re
from fractions import Fraction

from detot_agent.datasets import format_number

__all__ = ["extract_number", "numbers_equal"]

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?"
_STATED = re.compile(rf"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:)\s*[:=]?\s*\**\s*({_NUM})", re.IGNORECASE)
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
