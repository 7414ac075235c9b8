"""Soft prompts: per-task `(k, hidden)` vectors prepended to a model's input embeddings.

`SoftPrompt` holds one task's vectors (initialised from text, vocabulary or at
random), saves and loads them (safetensors + manifest), and moves them to and
from PEFT's prompt-tuning adapter format. Training lives in `tuning.py`.
`SoftPromptRegistry` is what the engine reads at request time. A request names
its task (and optionally the version it was built against) in DSPy's request
`metadata`; the engine resolves the tensor here. Versions are part of DSPy's
cache key, so replacing a task's soft prompt never serves stale cached answers.

Example:
    >>> import torch
    >>> from detot_agent.softprompt import SoftPromptRegistry
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
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from detot_agent.errors import SoftPromptError

__all__ = [
    "DEFAULT_INIT_TEXT",
    "METADATA_TASK",
    "METADATA_VERSION",
    "SoftPrompt",
    "SoftPromptInit",
    "SoftPromptRegistry",
    "check_soft_prompt",
]

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
        self._tasks: dict[str, OrderedDict[int, torch.Tensor]] = {}

    def register(self, task: str, tensor: torch.Tensor, *, version: int | None = None) -> int:
        """Install `tensor` as the task's current soft prompt and return its version.

        Args:
            task: task name.
            tensor: `(k, hidden)` floating tensor; it is detached and copied.
            version: explicit version (must be greater than the current one); default current + 1.
        """
        if not task or not task.strip():
            raise SoftPromptError("task name must be a non-empty string")
        check_soft_prompt(tensor, where=f"soft prompt for task {task!r}")
        frozen = tensor.detach().clone()
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

    def resolve(self, task: str, version: int | None = None) -> tuple[int, torch.Tensor]:
        """Return `(version, tensor)`: the given version, or the current one when None.

        Raises:
            SoftPromptError: unknown task, or a version no longer (or never) kept.
        """
        with self._lock:
            versions = self._tasks.get(task)
            if not versions:
                known = ", ".join(sorted(self._tasks)) or "none"
                raise SoftPromptError(f"no soft prompt registered for task {task!r} (registered: {known})")
            if version is None:
                version = next(reversed(versions))
            tensor = versions.get(int(version))
            if tensor is None:
                raise SoftPromptError(
                    f"task {task!r} has no soft prompt version {version}; kept versions: {list(versions)}"
                )
            return int(version), tensor

    def metadata(self, task: str) -> dict[str, Any]:
        """The request metadata that pins the task's current version (pass as `metadata=` to a dspy.LM)."""
        return {METADATA_TASK: task, METADATA_VERSION: self.current_version(task)}


# ---------------------------------------------------------------------------------------
# SoftPrompt: learnable vectors for one task, with persistence and PEFT interoperability
# ---------------------------------------------------------------------------------------


class SoftPromptInit(str, Enum):
    """How a soft prompt's vectors start.

    `text`: embeddings of a task instruction, repeated or cut to k tokens (PEFT's TEXT init);
    `vocab`: embeddings of k tokens sampled from the vocabulary;
    `random`: Gaussian vectors scaled to the mean norm of the model's token embeddings.
    """

    TEXT = "text"
    VOCAB = "vocab"
    RANDOM = "random"


DEFAULT_INIT_TEXT = "Solve the problem step by step, then finish with: The answer is <number>."


class SoftPrompt:
    """`k` learnable `(k, hidden)` vectors for one task on one model.

    Attributes:
        task: task name (the registry key).
        vectors: current `(k, hidden)` float32 vectors.
        init_vectors: the starting vectors (the anchor of the L2 pull during training).
        model_id: the model they were made for (its spec), checked on load.
        init_kind / init_text: how they started.
        version: bumped by every accepted training run; the same counter as the task embedding's.
        report: the last training report (a dict), if any.

    Example:
        >>> import torch
        >>> sp = SoftPrompt("arith", torch.zeros(4, 8), model_id="tiny")
        >>> sp.k, sp.hidden_size, sp.version
        (4, 8, 0)
    """

    FORMAT = "detot-soft-prompt"
    FORMAT_VERSION = 1

    def __init__(
        self,
        task: str,
        vectors: torch.Tensor,
        *,
        model_id: str,
        init_kind: SoftPromptInit | str = SoftPromptInit.RANDOM,
        init_text: str | None = None,
        init_vectors: torch.Tensor | None = None,
        version: int = 0,
        report: dict[str, Any] | None = None,
    ) -> None:
        vec = check_soft_prompt(vectors, where=f"soft prompt of task {task!r}").detach().float().clone()
        self.task = task
        self.vectors = vec
        self.init_vectors = vec.clone() if init_vectors is None else check_soft_prompt(
            init_vectors, hidden_size=vec.shape[1], where="initial soft prompt").detach().float().clone()
        if self.init_vectors.shape != vec.shape:
            raise SoftPromptError(f"initial vectors {tuple(self.init_vectors.shape)} differ from {tuple(vec.shape)}")
        self.model_id = model_id
        self.init_kind = SoftPromptInit(init_kind)
        self.init_text = init_text
        self.version = version
        self.report = report

    @property
    def k(self) -> int:
        """Number of virtual tokens."""
        return int(self.vectors.shape[0])

    @property
    def hidden_size(self) -> int:
        """Width of each vector (the model's hidden size)."""
        return int(self.vectors.shape[1])

    @classmethod
    def initialize(
        cls,
        engine: Any,
        task: str,
        *,
        k: int = 16,
        init: SoftPromptInit | str = SoftPromptInit.TEXT,
        text: str | None = None,
        seed: int = 0,
    ) -> SoftPrompt:
        """Make a soft prompt for `engine`'s model.

        Args:
            engine: a `LocalEngine` (its model's input embeddings are read, never changed).
            task: task name.
            k: number of virtual tokens (>= 1).
            init: `text`, `vocab` or `random`.
            text: instruction for `text` init (default: a CoT instruction ending in "The answer is <number>.").
            seed: for `vocab` and `random`.
        """
        if k < 1:
            raise SoftPromptError(f"k must be >= 1, got {k}")
        kind = SoftPromptInit(init)
        table = engine.model.get_input_embeddings().weight.detach().float().cpu()  # (V, H)
        gen = torch.Generator().manual_seed(seed)
        if kind is SoftPromptInit.TEXT:
            text = text or DEFAULT_INIT_TEXT
            ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise SoftPromptError("init text tokenizes to nothing; pass a non-empty instruction")
            ids = (ids * (k // len(ids) + 1))[:k]
            vectors = table[torch.tensor(ids)]
        elif kind is SoftPromptInit.VOCAB:
            vectors = table[torch.randint(0, table.shape[0], (k,), generator=gen)]
        else:
            vectors = torch.randn(k, table.shape[1], generator=gen)
            vectors = vectors / vectors.norm(dim=1, keepdim=True) * table.norm(dim=1).mean()
        return cls(task, vectors, model_id=engine.source.spec, init_kind=kind,
                   init_text=text if kind is SoftPromptInit.TEXT else None)

    def register(self, registry: SoftPromptRegistry) -> int:
        """Serve these vectors for `task` under this prompt's version (bumped to stay ahead of the registry)."""
        current = registry.current_version(self.task) or 0
        if self.version <= current:
            self.version = current + 1
        return registry.register(self.task, self.vectors, version=self.version)

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Atomic save: `soft_prompt.safetensors` (vectors, init_vectors) + `manifest.json`."""
        from safetensors.torch import save_file

        from detot_agent.persist import atomic_dir

        meta = {"task": self.task, "model_id": self.model_id, "hidden_size": self.hidden_size, "k": self.k,
                "dtype": "float32", "init_kind": self.init_kind.value, "init_text": self.init_text,
                "version": self.version, "report": self.report}
        with atomic_dir(Path(path), kind=self.FORMAT, version=self.FORMAT_VERSION, meta=meta) as tmp:
            save_file({"vectors": self.vectors.contiguous(), "init_vectors": self.init_vectors.contiguous()},
                      str(tmp / "soft_prompt.safetensors"))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, hidden_size: int | None = None) -> SoftPrompt:
        """Load and validate; refuses another hidden size, wrong shapes, non-float or non-finite values."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from detot_agent.errors import ArtefactError
        from detot_agent.persist import read_manifest

        m = read_manifest(Path(path), kind=cls.FORMAT, max_version=cls.FORMAT_VERSION)
        fpath = Path(m["_dir"]) / "soft_prompt.safetensors"
        if hidden_size is not None and m.get("hidden_size") != hidden_size:
            raise ArtefactError(
                f"{path} holds a soft prompt of width {m.get('hidden_size')} (model {m.get('model_id')!r}), but this "
                f"model's hidden size is {hidden_size}; train one for this model"
            )
        try:
            tensors = load_file(str(fpath))
        except (SafetensorError, OSError) as exc:
            raise ArtefactError(f"{fpath} cannot be read: {exc}") from None
        want = (int(m.get("k", -1)), int(m.get("hidden_size", -1)))
        for name in ("vectors", "init_vectors"):
            t = tensors.get(name)
            if t is None:
                raise ArtefactError(f"{fpath} lacks the tensor {name!r}")
            if tuple(t.shape) != want:
                raise ArtefactError(f"{fpath}: {name} has shape {tuple(t.shape)}, manifest says {want}")
            try:
                check_soft_prompt(t, where=f"{fpath}: {name}")
            except SoftPromptError as exc:
                raise ArtefactError(str(exc)) from None
        return cls(m["task"], tensors["vectors"], model_id=m["model_id"], init_kind=m["init_kind"],
                   init_text=m.get("init_text"), init_vectors=tensors["init_vectors"], version=int(m["version"]),
                   report=m.get("report"))

    # ---- PEFT interoperability ------------------------------------------------------------------
    def export_peft(self, path: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
        """Write a PEFT prompt-tuning adapter (`adapter_config.json` + `adapter_model.safetensors`)."""
        import json

        from safetensors.torch import save_file

        from detot_agent.persist import atomic_write_text

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": self.k,
            "token_dim": self.hidden_size, "num_transformer_submodules": 1, "inference_mode": True,
            "prompt_tuning_init": "TEXT" if self.init_kind is SoftPromptInit.TEXT else "RANDOM",
            "prompt_tuning_init_text": self.init_text, "tokenizer_name_or_path": self.model_id,
            "base_model_name_or_path": base_model_name_or_path or self.model_id,
        }
        tmp = folder / ".adapter_model.safetensors.tmp"
        save_file({"prompt_embeddings": self.vectors.contiguous()}, str(tmp))
        tmp.replace(folder / "adapter_model.safetensors")
        atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def from_peft(cls, path: str | Path, *, task: str, hidden_size: int | None = None) -> SoftPrompt:
        """Read a PEFT prompt-tuning adapter folder into a soft prompt."""
        import json

        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from detot_agent.errors import ArtefactError

        folder = Path(path)
        try:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            tensors = load_file(str(folder / "adapter_model.safetensors"))
        except (OSError, json.JSONDecodeError, SafetensorError) as exc:
            raise ArtefactError(f"{folder} is not a readable PEFT adapter: {exc}") from None
        if config.get("peft_type") != "PROMPT_TUNING":
            raise ArtefactError(f"{folder} is a {config.get('peft_type')!r} adapter, not PROMPT_TUNING")
        if "prompt_embeddings" not in tensors:
            raise ArtefactError(f"{folder}/adapter_model.safetensors has no 'prompt_embeddings' tensor")
        vec = tensors["prompt_embeddings"]
        try:
            check_soft_prompt(vec, hidden_size=hidden_size, where=f"{folder} prompt_embeddings")
        except SoftPromptError as exc:
            raise ArtefactError(str(exc)) from None
        kind = SoftPromptInit.TEXT if config.get("prompt_tuning_init") == "TEXT" else SoftPromptInit.RANDOM
        return cls(task, vec, model_id=str(config.get("base_model_name_or_path") or "unknown"), init_kind=kind,
                   init_text=config.get("prompt_tuning_init_text"))
