"""Evaluation: suites, methods, a resumable runner, and reports with significance tests and plots.

May import: `detot/` and everything below it (never `cli/`). Names resolve lazily.

Example:
    >>> from detot_agent.evaluation import METHODS
    >>> "sc" in METHODS and "dspy_sc" in METHODS
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from detot_agent._lazy import lazy_exports

if TYPE_CHECKING:
    from detot_agent.evaluation.data import KNOWN_SUITES, Suite, load_suite, sample_examples
    from detot_agent.evaluation.distributed import RayExecutor, WorkerLostError
    from detot_agent.evaluation.methods import METHODS, EvalContext, build_method
    from detot_agent.evaluation.metrics import bootstrap_ci, mcnemar_exact, paired
    from detot_agent.evaluation.report import build_report, render_markdown, write_report
    from detot_agent.evaluation.runner import LocalExecutor, run_eval
    from detot_agent.evaluation.spec import ContextSpec, build_context

_WHERE = {
    "ContextSpec": "detot_agent.evaluation.spec",
    "EvalContext": "detot_agent.evaluation.methods",
    "KNOWN_SUITES": "detot_agent.evaluation.data",
    "LocalExecutor": "detot_agent.evaluation.runner",
    "METHODS": "detot_agent.evaluation.methods",
    "RayExecutor": "detot_agent.evaluation.distributed",
    "Suite": "detot_agent.evaluation.data",
    "WorkerLostError": "detot_agent.evaluation.distributed",
    "bootstrap_ci": "detot_agent.evaluation.metrics",
    "build_context": "detot_agent.evaluation.spec",
    "build_method": "detot_agent.evaluation.methods",
    "build_report": "detot_agent.evaluation.report",
    "load_suite": "detot_agent.evaluation.data",
    "mcnemar_exact": "detot_agent.evaluation.metrics",
    "paired": "detot_agent.evaluation.metrics",
    "render_markdown": "detot_agent.evaluation.report",
    "run_eval": "detot_agent.evaluation.runner",
    "sample_examples": "detot_agent.evaluation.data",
    "write_report": "detot_agent.evaluation.report",
}

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

__all__ = [
    "KNOWN_SUITES",
    "METHODS",
    "ContextSpec",
    "EvalContext",
    "LocalExecutor",
    "RayExecutor",
    "Suite",
    "WorkerLostError",
    "bootstrap_ci",
    "build_context",
    "build_method",
    "build_report",
    "load_suite",
    "mcnemar_exact",
    "paired",
    "render_markdown",
    "run_eval",
    "sample_examples",
    "write_report",
]
