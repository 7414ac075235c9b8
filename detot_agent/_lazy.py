"""Lazy re-exports: a package's public names resolve to their module on first access.

`import detot_agent` stays cheap (no torch, dspy, faiss or transformers until a name
that needs them is used).

Example:
    >>> getattr_, dir_ = lazy_exports("demo", {"sqrt": "math"})
    >>> getattr_("sqrt")(4.0)
    2.0
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: dict[str, str], deprecated: dict[str, str] | None = None,
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for a package whose public name `n` lives in module `where[n]`; a name in
    `deprecated` (name -> module) still resolves, with a `DeprecationWarning` naming where to import it from."""
    old = deprecated or {}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None and name in old:
            module = old[name]
            warnings.warn(f"`from {package} import {name}` is deprecated (it is plumbing, not public API since "
                          f"0.4.0); import it from {module}", DeprecationWarning, stacklevel=2)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__
