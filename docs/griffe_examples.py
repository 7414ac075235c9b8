"""Griffe extension for the API reference: this package's docstrings head their doctests `Example:`
(DSPy's habit); Google style, as griffe reads it, calls that section `Examples:`. Renamed before parsing so
the doctests render as code, not as markdown."""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEAD = re.compile(r"(?m)^(\s*)Example:[ \t]*$")


class ExampleSections(griffe.Extension):
    """`Example:` -> `Examples:` in every docstring griffe loads."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEAD.sub(r"\1Examples:", obj.docstring.value)
