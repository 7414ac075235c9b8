"""Deprecated since 0.4.0: soft-prompt training moved.

- the training pair and the loss: `detot_agent.softprompt.loss` (`TuneExample`, `target_nll`; re-exported here);
- `tune` and `TuneReport`: `detot_agent.embedding.tune` (a thin wrapper over `embedding.update.update`, the one
  training loop), also `from detot_agent import tune`;
- `TuneConfig`: `tune` takes an `UpdateConfig` (`lr` is `head_lr` there).

Example:
    >>> from detot_agent.softprompt.training import TuneExample
    >>> TuneExample(prompt="2+3?", target="5").target
    '5'
"""

from __future__ import annotations

import warnings
from typing import Any

from detot_agent.softprompt.loss import TuneExample, target_nll

__all__ = ["TuneExample", "target_nll"]


def __getattr__(name: str) -> Any:
    """`tune`, `TuneReport`, `TuneConfig` from their new home, with a `DeprecationWarning`."""
    if name in ("tune", "TuneReport", "TuneConfig"):
        warnings.warn(f"detot_agent.softprompt.training.{name} moved to detot_agent.embedding.tune (import tune "
                      "from detot_agent)", DeprecationWarning, stacklevel=2)
        from detot_agent.embedding import tune as moved

        return getattr(moved, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
