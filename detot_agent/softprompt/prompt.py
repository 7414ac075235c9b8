"""`SoftPrompt`: one task's `(k, hidden)` vectors prepended to a model's input embeddings.

Initialised from text, vocabulary or at random; saved and loaded through the
shared persistence path (safetensors + manifest). Training lives in
`softprompt/training.py`, PEFT interchange in `softprompt/peft.py`, serving in
`softprompt/registry.py`.

Example:
    >>> import torch
    >>> sp = SoftPrompt("arith", torch.zeros(4, 8), model_id="tiny")
    >>> sp.k, sp.hidden_size
    (4, 8)
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import torch

from detot_agent.errors import ArtefactError, SoftPromptError
from detot_agent.io.persist import load_tensors, save_tensors
from detot_agent.softprompt.peft import read_adapter, write_adapter
from detot_agent.softprompt.registry import SoftPromptRegistry, check_soft_prompt

__all__ = ["DEFAULT_INIT_TEXT", "SoftPrompt", "SoftPromptInit"]


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
            engine: a local engine (torch or llama.cpp): its token embeddings are read, never changed.
            task: task name.
            k: number of virtual tokens (>= 1).
            init: `text`, `vocab` or `random`.
            text: instruction for `text` init (default: a CoT instruction ending in "The answer is <number>.").
            seed: for `vocab` and `random`.
        """
        if k < 1:
            raise SoftPromptError(f"k must be >= 1, got {k}")
        kind = SoftPromptInit(init)
        gen = torch.Generator().manual_seed(seed)
        if kind is SoftPromptInit.TEXT:
            text = text or DEFAULT_INIT_TEXT
            ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise SoftPromptError("init text tokenizes to nothing; pass a non-empty instruction")
            ids = (ids * (k // len(ids) + 1))[:k]
            vectors = engine.token_embeddings(ids)  # (k, H)
        elif kind is SoftPromptInit.VOCAB:
            vectors = engine.token_embeddings(torch.randint(0, engine.vocab_size, (k,), generator=gen).tolist())
        else:
            vectors = torch.randn(k, engine.hidden_size, generator=gen)
            table = engine.token_embeddings(None)  # (V, H)
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
    FILENAME = "soft_prompt.safetensors"

    def save(self, path: str | Path) -> Path:
        """Atomic save: `soft_prompt.safetensors` (vectors, init_vectors) + `manifest.json`."""
        meta = {"task": self.task, "model_id": self.model_id, "hidden_size": self.hidden_size, "k": self.k,
                "dtype": "float32", "init_kind": self.init_kind.value, "init_text": self.init_text,
                "version": self.version, "report": self.report}
        return save_tensors(path, kind=self.FORMAT, version=self.FORMAT_VERSION, meta=meta, filename=self.FILENAME,
                            tensors={"vectors": self.vectors, "init_vectors": self.init_vectors})

    @classmethod
    def load(cls, path: str | Path, *, hidden_size: int | None = None) -> SoftPrompt:
        """Load and validate; refuses another hidden size, wrong shapes, non-float or non-finite values."""
        from detot_agent.io.persist import read_manifest

        m = read_manifest(Path(path), kind=cls.FORMAT, max_version=cls.FORMAT_VERSION, verify=False)
        if hidden_size is not None and m.get("hidden_size") != hidden_size:
            raise ArtefactError(
                f"{path} holds a soft prompt of width {m.get('hidden_size')} (model {m.get('model_id')!r}), but this "
                f"model's hidden size is {hidden_size}; train one for this model"
            )
        m, tensors = load_tensors(path, kind=cls.FORMAT, max_version=cls.FORMAT_VERSION, filename=cls.FILENAME,
                                  names=("vectors", "init_vectors"))
        fpath = Path(m["_dir"]) / cls.FILENAME
        want = (int(m.get("k", -1)), int(m.get("hidden_size", -1)))
        for name in ("vectors", "init_vectors"):
            t = tensors[name]
            if tuple(t.shape) != want:
                raise ArtefactError(f"{fpath}: {name} has shape {tuple(t.shape)}, manifest says {want}")
            try:
                check_soft_prompt(t, where=f"{fpath}: {name}")
            except SoftPromptError as exc:
                raise ArtefactError(str(exc)) from None
        return cls(m["task"], tensors["vectors"], model_id=m["model_id"], init_kind=m["init_kind"],
                   init_text=m.get("init_text"), init_vectors=tensors["init_vectors"], version=int(m["version"]),
                   report=m.get("report"))

    # ---- PEFT interoperability (the folder format: softprompt/peft.py) ---------------------------
    def export_peft(self, path: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
        """Write a PEFT prompt-tuning adapter (`adapter_config.json` + `adapter_model.safetensors`), atomically.

        Example:
            >>> import tempfile, torch
            >>> folder = SoftPrompt("arith", torch.ones(2, 4), model_id="tiny").export_peft(tempfile.mkdtemp() + "/a")
            >>> SoftPrompt.from_peft(folder, task="arith").vectors.shape
            torch.Size([2, 4])
        """
        return write_adapter(path, self.vectors, task=self.task, model_id=self.model_id,
                             text_init=self.init_kind is SoftPromptInit.TEXT, init_text=self.init_text,
                             base_model=base_model_name_or_path)

    @classmethod
    def from_peft(cls, path: str | Path, *, task: str, hidden_size: int | None = None) -> SoftPrompt:
        """Read a PEFT prompt-tuning adapter folder into a soft prompt for `task`.

        Raises:
            ArtefactError: not a readable prompt-tuning adapter, or vectors of the wrong width.
        """
        adapter = read_adapter(path, hidden_size=hidden_size)
        return cls(task, adapter.vectors, model_id=adapter.base_model,
                   init_kind=SoftPromptInit.TEXT if adapter.text_init else SoftPromptInit.RANDOM,
                   init_text=adapter.init_text)
