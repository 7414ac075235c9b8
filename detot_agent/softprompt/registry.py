"""`SoftPromptRegistry`: what an engine reads at request time, and the one soft-prompt check.

A request names its task (and optionally the version it was built against) in DSPy's
request `metadata`; the engine resolves the tensor here. Versions are part of DSPy's
cache key, so replacing a task's soft prompt never serves stale cached answers.

A version is either one tensor (a static prompt) or a *provider*: a function from the
request's input text (its last user message) to that input's `(k, hidden)` prompt, which is
how a task embedding with a per-input head serves plain DSPy programs
(`TaskEmbedding.register`). The cache key (messages, task, version) then fixes the prompt.

Example:
    >>> import torch
    >>> reg = SoftPromptRegistry()
    >>> reg.register("arith", torch.zeros(4, 8))
    1
    >>> reg.register("arith", torch.ones(4, 8))
    2
    >>> reg.metadata("arith")
    {'detot_task': 'arith', 'detot_version': 2}
    >>> version, tensor = reg.resolve("arith", 1)
    >>> float(tensor.sum())
    0.0
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from detot_agent.errors import SoftPromptError

__all__ = ["METADATA_TASK", "METADATA_VERSION", "SoftPromptRegistry", "check_soft_prompt"]

METADATA_TASK = "detot_task"
METADATA_VERSION = "detot_version"


def check_soft_prompt(tensor: Any, *, hidden_size: int | None = None, where: str = "soft prompt") -> torch.Tensor:
    """Validate a soft prompt: a finite floating `(k, hidden)` tensor with k >= 1.

    Raises:
        SoftPromptError: naming the shape, dtype or the count of non-finite values.
    """
    if not isinstance(tensor, torch.Tensor):
        raise SoftPromptError(f"{where} must be a torch.Tensor of shape (k, hidden), got {type(tensor).__name__}")
    if tensor.dim() != 2 or tensor.shape[0] < 1:
        raise SoftPromptError(f"{where} must have shape (k, hidden) with k >= 1, got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise SoftPromptError(f"{where} must be a floating-point tensor, got dtype {tensor.dtype}")
    if hidden_size is not None and tensor.shape[1] != hidden_size:
        raise SoftPromptError(
            f"{where} has width {tensor.shape[1]} but the model's hidden size is {hidden_size}; "
            "train or load a soft prompt for this model"
        )
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise SoftPromptError(f"{where} holds {bad} non-finite value(s) (NaN or inf); refusing to use it")
    return tensor


class SoftPromptRegistry:
    """Thread-safe map task name -> versioned soft prompts, keeping the last `keep` versions.

    Args:
        keep: how many past versions per task stay resolvable (requests built against
            a version that was just replaced still get the tensor they were built with).
    """

    def __init__(self, *, keep: int = 4) -> None:
        if keep < 1:
            raise SoftPromptError(f"keep must be >= 1, got {keep}")
        self._keep = keep
        self._lock = threading.Lock()
        self._tasks: dict[str, OrderedDict[int, torch.Tensor | Callable[[str], torch.Tensor]]] = {}

    def register(self, task: str, tensor: torch.Tensor, *, version: int | None = None) -> int:
        """Install `tensor` as the task's current soft prompt and return its version.

        Args:
            task: task name.
            tensor: `(k, hidden)` floating tensor; it is detached and copied.
            version: explicit version (must be greater than the current one); default current + 1.
        """
        check_soft_prompt(tensor, where=f"soft prompt for task {task!r}")
        return self._install(task, tensor.detach().clone(), version)

    def register_provider(self, task: str, provider: Callable[[str], torch.Tensor], *,
                          version: int | None = None) -> int:
        """Install a per-input soft prompt: `provider(text) -> (k, hidden)` for the request's input text.

        The provider must not change once registered (register a new version instead): a cached answer
        names the version, so the same version must always give the same prompt for the same input.
        """
        if not callable(provider):
            raise SoftPromptError(f"provider for task {task!r} must be callable, got {type(provider).__name__}")
        return self._install(task, provider, version)

    def _install(self, task: str, frozen: torch.Tensor | Callable[[str], torch.Tensor], version: int | None) -> int:
        if not task or not task.strip():
            raise SoftPromptError("task name must be a non-empty string")
        with self._lock:
            versions = self._tasks.setdefault(task, OrderedDict())
            current = next(reversed(versions)) if versions else 0
            if version is None:
                version = current + 1
            elif version <= current:
                raise SoftPromptError(f"version {version} for task {task!r} is not newer than current {current}")
            versions[version] = frozen
            while len(versions) > self._keep:
                versions.popitem(last=False)
            return version

    def remove(self, task: str) -> None:
        """Forget every version of `task` (requests naming it then fail)."""
        with self._lock:
            self._tasks.pop(task, None)

    def tasks(self) -> list[str]:
        """Names of registered tasks."""
        with self._lock:
            return sorted(self._tasks)

    def current_version(self, task: str) -> int | None:
        """The task's current version, or None if it has no soft prompt."""
        with self._lock:
            versions = self._tasks.get(task)
            return next(reversed(versions)) if versions else None

    def resolve(self, task: str, version: int | None = None, *, text: str | None = None) -> tuple[int, torch.Tensor]:
        """Return `(version, tensor)`: the given version, or the current one when None.

        Args:
            text: the request's input text, for a per-input provider (ignored by a static prompt).

        Raises:
            SoftPromptError: unknown task, a version no longer (or never) kept, or a provider without `text`.
        """
        with self._lock:
            versions = self._tasks.get(task)
            if not versions:
                known = ", ".join(sorted(self._tasks)) or "none"
                raise SoftPromptError(f"no soft prompt registered for task {task!r} (registered: {known})")
            if version is None:
                version = next(reversed(versions))
            entry = versions.get(int(version))
            if entry is None:
                raise SoftPromptError(
                    f"task {task!r} has no soft prompt version {version}; kept versions: {list(versions)}"
                )
        if isinstance(entry, torch.Tensor):
            return int(version), entry
        if text is None:
            raise SoftPromptError(f"the soft prompt of task {task!r} v{version} is per input: pass the input text")
        return int(version), check_soft_prompt(entry(text), where=f"per-input soft prompt of task {task!r} v{version}")

    def metadata(self, task: str) -> dict[str, Any]:
        """The request metadata that pins the task's current version (pass as `metadata=` to a dspy.LM)."""
        return {METADATA_TASK: task, METADATA_VERSION: self.current_version(task)}
