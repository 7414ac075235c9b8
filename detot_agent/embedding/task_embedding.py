"""`TaskEmbedding`: a task's one learnable state, driving retrieval *and* the soft prompt.

One object, one version, one artefact::

    q(x) = normalize(w * e(x) + alpha * t)        # (D,)   the task-adapted query: retrieval reads it
    P(x) = P0 + sum_m a_m(x) B_m,                 # (k, H) the soft prompt: the head reads the same q(x)
    a(x) = softmax(G q(x) / tau)

`e(x)` is the encoded input, `t` the task vector (normalised mean of the encoded task
description and sample inputs), `w` per-dimension weights (ones at the start), `alpha`
a scalar (0.1: a light pull towards the task). The soft-prompt head (`head.py`) is
optional: without it the object is retrieval-only (what `TaskRetriever` needs); with
`M = 0` components, or a zero bank, `P(x) = P0` for every input, exactly a static soft
prompt. `update` (`update.py`) trains the whole object on evidence and bumps `version`
when it keeps a change.

Example:
    >>> import numpy as np, torch
    >>> te = TaskEmbedding("t", np.eye(4, dtype=np.float32)[0], encoder_name="demo")
    >>> [round(float(x), 3) for x in te.query(np.eye(4, dtype=np.float32)[1])]
    [0.1, 0.995, 0.0, 0.0]
    >>> te.attach_head(torch.zeros(2, 8), components=3, model_id="tiny")
    >>> te.soft_prompts(np.eye(4, dtype=np.float32)[:2]).shape   # (N, k, H)
    torch.Size([2, 2, 8])
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from detot_agent.embedding.head import PromptHead
from detot_agent.errors import ArtefactError, DetotError, SoftPromptError
from detot_agent.io.persist import load_tensors, read_manifest, save_tensors

if TYPE_CHECKING:
    from detot_agent.embedding.update import TrainingItem, UpdateConfig, UpdateReport


class Encoder(Protocol):
    """What the task embedding needs of a sentence encoder (`retrieval.encoder.Encoder` is one)."""

    name: str

    def encode(self, texts: list[str]) -> np.ndarray: ...

__all__ = ["TaskEmbedding"]

CONVERT_HINT = ("convert it into a task embedding with `detot convert --soft-prompt {path} --task NAME "
                "--description TEXT --out DIR` (the static prompt becomes P0, the zero-head case)")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class TaskEmbedding:
    """A task's learnable state: query side (`t`, `w`, `alpha`) and, optionally, a soft-prompt head.

    Args:
        task: task name.
        task_vector: `(dim,)` vector describing the task (normalised here).
        encoder_name: name of the encoder the vectors come from (checked on load and on use).
        weights: initial per-dimension weights (default ones).
        alpha: initial weight of the task vector in queries.

    Attributes:
        head: the soft-prompt head (`PromptHead`), or None (retrieval only).
        model_id: the model the head was made for (None without a head).
        version: bumped by every accepted `update`; one counter for the whole object.

    Example:
        >>> import numpy as np, torch
        >>> te = TaskEmbedding("t", np.ones(4, dtype=np.float32), encoder_name="demo")
        >>> te.attach_head(torch.ones(2, 8), components=0, model_id="tiny")  # a static soft prompt
        >>> bool((te.soft_prompt(np.eye(4, dtype=np.float32)[0]) == 1).all())
        True
    """

    FORMAT = "detot-task-embedding"
    FORMAT_VERSION = 2
    TENSOR_NAMES = ("t", "w", "w_init")

    def __init__(
        self,
        task: str,
        task_vector: np.ndarray,
        *,
        encoder_name: str,
        weights: np.ndarray | None = None,
        alpha: float = 0.1,
    ) -> None:
        t = torch.as_tensor(np.asarray(task_vector, dtype=np.float32)).flatten()
        if not torch.isfinite(t).all() or float(t.norm()) == 0.0:
            raise DetotError(f"task vector of {task!r} must be finite and non-zero")
        self.task = task
        self.encoder_name = encoder_name
        self.dim = int(t.shape[0])
        self.t = _normalize(t)
        w = torch.ones(self.dim) if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if w.shape != (self.dim,) or not torch.isfinite(w).all():
            raise DetotError(f"weights must be a finite ({self.dim},) vector, got shape {tuple(w.shape)}")
        self.w = w.clone()
        self.alpha = torch.tensor(float(alpha))
        self.w_init = self.w.clone()
        self.alpha_init = self.alpha.clone()
        self.head: PromptHead | None = None
        self.model_id: str | None = None
        self.version = 0
        self._lock = threading.RLock()

    @classmethod
    def from_description(
        cls, task: str, description: str, *, encoder: Encoder, samples: Sequence[str] = (), **kwargs: Any
    ) -> TaskEmbedding:
        """Task vector = normalised mean of the encoded description and sample inputs."""
        texts = [description, *samples]
        if not any(t.strip() for t in texts):
            raise DetotError("a task needs a non-empty description or sample inputs to build its vector")
        vec = encoder.encode([t for t in texts if t.strip()]).mean(axis=0)
        return cls(task, vec, encoder_name=encoder.name, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> TaskEmbedding:
        clone = TaskEmbedding(self.task, self.t.numpy(), encoder_name=self.encoder_name)
        clone.load_state_dict(self.state_dict())
        return clone

    def __getstate__(self) -> dict[str, Any]:
        """Pickle support (a whole DETOT program saved with `save_program=True`): everything but the lock."""
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ---- the soft-prompt head ------------------------------------------------------------------
    def attach_head(self, p0: torch.Tensor, *, components: int = 0, tau: float = 0.1, model_id: str,
                    inputs: np.ndarray | None = None, seed: int = 0) -> None:
        """Give the object a soft-prompt head starting at `P0` (the bank at zero: `P(x) = P0` until trained).

        Args:
            p0: `(k, hidden)` starting vectors (e.g. `SoftPrompt.initialize(...).vectors`, or a trained static prompt).
            components: `M` (0: a static soft prompt that `update` can still train).
            tau: the gate's softmax temperature.
            model_id: the model the vectors are for (saved, checked on load).
            inputs: `(N, dim)` encoded inputs of the task; the gate rows start at `M` k-means centroids of
                their queries (FAISS), so different kinds of input lean on different components. Without
                them (or with fewer than `M`), random unit rows.
            seed: for k-means and the random gate.
        """
        gate = None
        if components > 0 and inputs is not None and len(inputs) >= components:
            import faiss

            q = self.query(np.asarray(inputs, dtype=np.float32).reshape(-1, self.dim))
            km = faiss.Kmeans(self.dim, components, niter=20, seed=seed, spherical=True, verbose=False,
                              min_points_per_centroid=1)  # few task inputs are normal here: no warning
            km.train(np.ascontiguousarray(q, dtype=np.float32))
            assert km.centroids is not None
            gate = torch.as_tensor(np.array(km.centroids))
        try:
            head = PromptHead(p0, components=components, dim=self.dim, tau=tau, gate=gate, seed=seed)
        except SoftPromptError as exc:
            raise DetotError(str(exc)) from None
        with self._lock:
            self.head, self.model_id = head, model_id

    @property
    def has_head(self) -> bool:
        """Whether the object produces soft prompts."""
        return self.head is not None

    def _need_head(self) -> PromptHead:
        head = self.head
        if head is None:
            raise DetotError(f"task embedding {self.task!r} has no soft-prompt head; call attach_head(...) or "
                             "train one with `detot tune`")
        return head

    def soft_prompts(self, vectors: np.ndarray) -> torch.Tensor:
        """Soft prompts `P(x)` `(N, k, hidden)` for encoded inputs `(N, dim)` (the samples of one input share it)."""
        e = self._as_batch(vectors)
        with self._lock:
            head = self._need_head()
            return head(self._query(e, self.w, self.alpha))  # (N, k, H)

    def soft_prompt(self, vector: np.ndarray) -> torch.Tensor:
        """The soft prompt `(k, hidden)` for one encoded input `(dim,)`."""
        return self.soft_prompts(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0]

    def serve(self, vector: np.ndarray) -> tuple[np.ndarray, torch.Tensor | None, int]:
        """What one call reads, in one consistent snapshot: `(q(x) (dim,), P(x) (k, hidden) or None, version)`."""
        e = self._as_batch(vector)[:1]
        with self._lock:
            q = self._query(e, self.w, self.alpha)  # (1, D)
            soft = None if self.head is None else self.head(q)[0]
            return q[0].numpy(), soft, self.version

    def gate_weights(self, vectors: np.ndarray) -> torch.Tensor:
        """Which components each input uses: `a(x)` `(N, M)` (empty when `M = 0`)."""
        e = self._as_batch(vectors)
        with self._lock:
            return self._need_head().weights(self._query(e, self.w, self.alpha))

    def register(self, registry: Any, encoder: Encoder) -> int:
        """Serve this task embedding's soft prompts through a `SoftPromptRegistry` (plain DSPy programs on a
        local LM: requests with `metadata=registry.metadata(task)`); returns the registry version.

        A static head registers `P0`; a per-input head registers a provider that encodes the request's last
        user message and returns its `P(x)`. Either is a frozen copy of the current state: later updates need
        a new `register` (a new version, so DSPy's cache never serves the old prompt for it).
        """
        head = self._need_head()
        if encoder.name != self.encoder_name:
            raise DetotError(f"encoder {encoder.name!r} differs from the task embedding's {self.encoder_name!r}")
        current = registry.current_version(self.task) or 0
        version = max(self.version, current + 1)
        if head.is_static():
            return int(registry.register(self.task, head.p0, version=version))
        frozen = copy.deepcopy(self)

        def provider(text: str) -> torch.Tensor:
            return frozen.soft_prompt(encoder.encode([text])[0])

        return int(registry.register_provider(self.task, provider, version=version))

    def export_peft(self, path: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
        """Write `P0` as a PEFT prompt-tuning adapter (`softprompt/peft.py`).

        Only the input-independent part has a PEFT equivalent: PEFT's prompt tuning serves one prompt for
        every input, so the component bank and its gate (the per-input part) are not in the adapter.
        """
        from detot_agent.softprompt.peft import write_adapter

        head = self._need_head()
        return write_adapter(path, head.p0, task=self.task, model_id=self.model_id or "unknown",
                             base_model=base_model_name_or_path)

    # ---- queries -------------------------------------------------------------------------------
    def _query(self, e: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return _normalize(w * e + alpha * self.t)  # (N, D)

    def _as_batch(self, vectors: np.ndarray) -> torch.Tensor:
        arr = np.asarray(vectors, dtype=np.float32)
        e = torch.as_tensor(arr.reshape(1, -1) if arr.ndim == 1 else arr)
        if e.dim() != 2 or e.shape[-1] != self.dim:
            raise DetotError(f"query vectors have shape {tuple(arr.shape)}; the task embedding needs (N, {self.dim})")
        return e

    def query(self, vectors: np.ndarray) -> np.ndarray:
        """Task-adapted unit query vectors for encoded inputs `(N, dim)` (or `(dim,)`)."""
        single = np.asarray(vectors).ndim == 1
        e = self._as_batch(vectors)
        with self._lock:
            q = self._query(e, self.w, self.alpha).numpy()
        return q[0] if single else q

    # ---- learning ------------------------------------------------------------------------------
    def update(self, feedback: Sequence[TrainingItem], *, engine: Any = None, val: Sequence[TrainingItem] = (),
               config: UpdateConfig | None = None, progress: bool = False, **overrides: Any) -> UpdateReport:
        """Train the whole object on evidence; see `detot_agent.embedding.update.update`."""
        from detot_agent.embedding.update import update

        return update(self, feedback, engine=engine, val=val, config=config, progress=progress, **overrides)

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and scalars of the current state (a consistent snapshot)."""
        with self._lock:
            head = self.head
            return {"t": self.t.clone(), "w": self.w.clone(), "w_init": self.w_init.clone(),
                    "alpha": self.alpha.clone(), "alpha_init": self.alpha_init.clone(), "version": self.version,
                    "head": None if head is None else {**head.tensors(), "tau": head.tau},
                    "model_id": self.model_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the whole state at once (readers see the old or the new, never a mix)."""
        tensors = {k: torch.as_tensor(state[k], dtype=torch.float32) for k in ("t", "w", "w_init")}
        for name, value in tensors.items():
            if value.shape != (self.dim,):
                raise DetotError(f"{name} has shape {tuple(value.shape)}, expected ({self.dim},)")
            if not torch.isfinite(value).all():
                raise DetotError(f"{name} holds NaN or inf")
        head = None
        if state.get("head") is not None:
            spec = dict(state["head"])
            try:
                head = PromptHead.from_tensors(spec, tau=float(spec["tau"]))
            except SoftPromptError as exc:
                raise DetotError(str(exc)) from None
            if head.dim != self.dim:
                raise DetotError(f"head gate reads {head.dim}-dimension queries, the task embedding has {self.dim}")
        with self._lock:
            self.t, self.w, self.w_init = tensors["t"].clone(), tensors["w"].clone(), tensors["w_init"].clone()
            self.alpha = torch.tensor(float(state["alpha"]))
            self.alpha_init = torch.tensor(float(state["alpha_init"]))
            self.head, self.model_id = head, state.get("model_id")
            self.version = int(state["version"])

    def to_tensors(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """`(meta, tensors)`: the one saved form of the whole object (a directory via `save`, a DETOT
        program's carried state, or JSON via `to_json`). Head tensors are named `head.<name>`."""
        s = self.state_dict()
        meta: dict[str, Any] = {"task": self.task, "encoder": self.encoder_name, "dim": self.dim,
                                "version": s["version"], "alpha": float(s["alpha"]),
                                "alpha_init": float(s["alpha_init"])}
        tensors = {k: s[k] for k in self.TENSOR_NAMES}
        if s["head"] is not None:
            head = s["head"]
            p0 = head["p0"]
            meta["head"] = {"model_id": s["model_id"], "k": int(p0.shape[0]), "hidden_size": int(p0.shape[1]),
                            "components": int(head["bank"].shape[0]), "tau": head["tau"]}
            tensors.update({f"head.{n}": head[n] for n in PromptHead.TENSOR_NAMES})
        return meta, tensors

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, Any], *, where: str = "task embedding",
                     encoder_name: str | None = None, hidden_size: int | None = None,
                     model_id: str | None = None) -> TaskEmbedding:
        """Inverse of `to_tensors`; refuses another encoder or model, wrong shapes and non-finite values.

        Args:
            hidden_size: the serving model's hidden size; a head of another width is refused.
            model_id: the serving model's spec; a head made for a model with another file name is refused.

        Raises:
            ArtefactError: naming `where` and the field that is wrong.
        """
        if encoder_name is not None and meta.get("encoder") != encoder_name:
            raise ArtefactError(
                f"{where}: field 'encoder' is {meta.get('encoder')!r}, but this program uses {encoder_name!r}")
        missing = sorted(set(cls.TENSOR_NAMES) - set(tensors))
        if missing:
            raise ArtefactError(f"{where} lacks tensors {missing}")
        t = torch.as_tensor(tensors["t"], dtype=torch.float32)
        dim = int(meta.get("dim", t.shape[0]))
        if tuple(t.shape) != (dim,):
            raise ArtefactError(f"{where}: tensor 't' has shape {tuple(t.shape)}, field 'dim' says ({dim},)")
        info = meta.get("head")
        head_state = None
        if info is not None:
            if hidden_size is not None and info.get("hidden_size") != hidden_size:
                raise ArtefactError(
                    f"{where}: field 'head.hidden_size' is {info.get('hidden_size')} (model {info.get('model_id')!r}), "
                    f"but this model's hidden size is {hidden_size}; train a task embedding for this model")
            saved = Path(str(info.get("model_id") or "")).name
            if model_id is not None and saved and saved != Path(model_id).name:
                raise ArtefactError(f"{where}: field 'head.model_id' names model {saved!r}, but this program serves "
                                    f"{Path(model_id).name!r}; train a task embedding for this model")
            parts = {n: tensors.get(f"head.{n}") for n in PromptHead.TENSOR_NAMES}
            lacking = [f"head.{n}" for n, v in parts.items() if v is None]
            if lacking:
                raise ArtefactError(f"{where} lacks tensors {lacking}")
            p0 = torch.as_tensor(parts["p0"])
            want = (int(info.get("k", -1)), int(info.get("hidden_size", -1)))
            if tuple(p0.shape) != want:
                raise ArtefactError(f"{where}: tensor 'head.p0' has shape {tuple(p0.shape)}, fields 'head.k' and "
                                    f"'head.hidden_size' say {want}")
            head_state = {**parts, "tau": float(info.get("tau", 0.1))}
        try:
            te = cls(meta["task"], t.numpy(), encoder_name=meta["encoder"])
            te.load_state_dict({**tensors, "alpha": meta["alpha"], "alpha_init": meta["alpha_init"],
                                "version": meta["version"], "head": head_state,
                                "model_id": None if info is None else info.get("model_id")})
        except (DetotError, KeyError) as exc:
            raise ArtefactError(f"{where}: {exc}") from None
        return te

    def to_json(self) -> dict[str, Any]:
        """`to_tensors` as JSON (for DSPy's `module.save()`)."""
        meta, tensors = self.to_tensors()
        return {**meta, "tensors": {k: v.tolist() for k, v in tensors.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskEmbedding:
        """Inverse of `to_json` (also reads the first release's layout, tensors beside the fields)."""
        tensors = data.get("tensors") or {k: data[k] for k in cls.TENSOR_NAMES if k in data}
        return cls.from_tensors(data, tensors, where="task embedding JSON")

    def save(self, path: str | Path) -> Path:
        """Save to a directory: `tensors.safetensors` + `manifest.json` (atomic)."""
        meta, tensors = self.to_tensors()
        return save_tensors(path, kind=self.FORMAT, version=self.FORMAT_VERSION, meta=meta, tensors=tensors)

    @classmethod
    def load(cls, path: str | Path, *, encoder_name: str | None = None, hidden_size: int | None = None,
             model_id: str | None = None) -> TaskEmbedding:
        """Load a saved task embedding (this release's, or the first release's retrieval-only format).

        Refuses another encoder or model, wrong shapes and non-finite values, naming the file and the
        field. A static soft-prompt folder (`SoftPrompt.save`) is refused with the command that converts it.
        """
        p = Path(path)
        if (p / "manifest.json").is_file():
            from detot_agent.softprompt.prompt import SoftPrompt

            try:
                read_manifest(p, kind=SoftPrompt.FORMAT, max_version=SoftPrompt.FORMAT_VERSION, verify=False)
            except ArtefactError:
                pass
            else:
                raise ArtefactError(f"{p} is a static soft prompt, not a task embedding; "
                                    + CONVERT_HINT.format(path=p))
        meta, tensors = load_tensors(p, kind=cls.FORMAT, max_version=cls.FORMAT_VERSION)
        return cls.from_tensors(meta, tensors, where=str(p / "tensors.safetensors"), encoder_name=encoder_name,
                                hidden_size=hidden_size, model_id=model_id)

    def __repr__(self) -> str:
        head = self.head
        shape = "" if head is None else f", head=(k={head.k}, hidden={head.hidden_size}, M={head.components})"
        return (f"TaskEmbedding(task={self.task!r}, dim={self.dim}, version={self.version}, "
                f"encoder={self.encoder_name!r}{shape})")
