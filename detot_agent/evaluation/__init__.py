"""Evaluation: suites, methods, a resumable runner, and reports with significance tests and plots.

Example:
    >>> from detot_agent.evaluation import METHODS
    >>> "self_consistency" in METHODS
    True
"""

from __future__ import annotations

from detot_agent.evaluation.data import KNOWN_SUITES, Suite, load_suite, sample_examples
from detot_agent.evaluation.distributed import RayExecutor, WorkerLostError
from detot_agent.evaluation.methods import METHODS, EvalContext, build_method
from detot_agent.evaluation.metrics import bootstrap_ci, mcnemar_exact, paired
from detot_agent.evaluation.report import build_report, render_markdown, write_report
from detot_agent.evaluation.runner import LocalExecutor, run_eval
from detot_agent.evaluation.spec import ContextSpec, build_context

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
