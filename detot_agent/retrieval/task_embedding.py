"""The task embedding's retrieval side: a task-adapted query for exemplar search.

`TaskEmbedding` adapts retrieval queries to a task::

    q(x) = normalize(w * e(x) + alpha * t)

where `e(x)` is the encoded input, `t` the task vector (the normalised mean of
the encoded task description and sample inputs), `w` learnable per-dimension
feature weights (initially all ones: neutral) and `alpha` a learnable scalar
(initially 0.1: a light pull towards the task). `update` moves `w` and `alpha`
with a contrastive loss on feedback (exemplars that helped vs. those that did
not) plus an L2 pull back to their initial values, and bumps `version` when it
changes them.

Example:
    >>> from detot_agent.retrieval.encoder import Encoder
    >>> enc = Encoder()                                               # doctest: +SKIP
    >>> task = TaskEmbedding.from_description("arith", "Solve arithmetic word problems.", encoder=enc)  # doctest: +SKIP
    >>> task.query(enc.encode(["Tom has 3 apples"])).shape           # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from detot_agent.errors import ArtefactError, DetotError
from detot_agent.io.persist import load_tensors, save_tensors

if TYPE_CHECKING:
    from detot_agent.retrieval.encoder import Encoder

__all__ = ["TaskEmbedding", "UpdateReport"]


@dataclass(frozen=True)
class UpdateReport:
    """What `TaskEmbedding.update` did.

    Attributes:
        accepted: whether the new weights were kept (the loss went down).
        loss_before: contrastive loss (plus L2 pull) on the feedback before the update.
        loss_after: the same after the update.
        steps: optimisation steps taken.
        version: the task embedding's version after the call.
    """

    accepted: bool
    loss_before: float
    loss_after: float
    steps: int
    version: int


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class TaskEmbedding:
    """A task's learnable retrieval state: task vector `t`, feature weights `w`, mix `alpha`.

    Args:
        task: task name.
        task_vector: `(dim,)` unit vector describing the task.
        encoder_name: name of the encoder the vectors come from (checked on load and on use).
        weights: initial per-dimension weights (default ones).
        alpha: initial weight of the task vector in queries.

    Example:
        >>> import numpy as np
        >>> te = TaskEmbedding("t", np.eye(4, dtype=np.float32)[0], encoder_name="demo")
        >>> [round(float(x), 3) for x in te.query(np.eye(4, dtype=np.float32)[1])]
        [0.1, 0.995, 0.0, 0.0]
    """

    FORMAT = "detot-task-embedding"
    FORMAT_VERSION = 1
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

    # ---- queries -------------------------------------------------------------------
    def _query(self, e: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return _normalize(w * e + alpha * self.t)  # (N, D)

    def query(self, vectors: np.ndarray) -> np.ndarray:
        """Task-adapted unit query vectors for encoded inputs `(N, dim)` (or `(dim,)`)."""
        arr = np.asarray(vectors, dtype=np.float32)
        single = arr.ndim == 1
        e = torch.as_tensor(arr.reshape(1, -1) if single else arr)
        if e.shape[-1] != self.dim:
            raise DetotError(f"query vectors have dimension {e.shape[-1]}, the task embedding {self.dim}")
        with self._lock:
            q = self._query(e, self.w, self.alpha).numpy()
        return q[0] if single else q

    # ---- learning --------------------------------------------------------------------
    def update(
        self,
        queries: np.ndarray,
        positives: Sequence[np.ndarray],
        negatives: Sequence[np.ndarray],
        *,
        steps: int = 50,
        lr: float = 0.05,
        temperature: float = 0.05,
        l2_to_init: float = 0.01,
    ) -> UpdateReport:
        """Move `w` and `alpha` so each query ranks its positives above its negatives.

        Loss per query: for each of its positives p, InfoNCE against all its negatives
        (scores s = q.v / temperature), so every helpful exemplar is pushed up, not just one::

            sum_p -log( exp(s_p) / (exp(s_p) + sum_n exp(s_n)) )

        plus `l2_to_init * (|w - w_init|^2 + (alpha - alpha_init)^2)`. The change is kept, and
        `version` bumped, only if the total loss went down.

        Args:
            queries: `(N, dim)` encoded inputs (not yet task-adapted).
            positives: per query, `(p_i, dim)` vectors of exemplars that helped (p_i >= 1).
            negatives: per query, `(n_i, dim)` vectors of exemplars that did not (may be empty).
        """
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32)).reshape(-1, self.dim)
        if len(positives) != len(q) or len(negatives) != len(q):
            raise DetotError(
                f"update needs one positives and one negatives array per query: {len(q)} queries, "
                f"{len(positives)} positives, {len(negatives)} negatives"
            )
        cands: list[tuple[torch.Tensor, int]] = []
        for i, (pos, neg) in enumerate(zip(positives, negatives, strict=True)):
            p = torch.as_tensor(np.asarray(pos, dtype=np.float32)).reshape(-1, self.dim)
            n = torch.as_tensor(np.asarray(neg, dtype=np.float32)).reshape(-1, self.dim)
            if len(p) == 0:
                raise DetotError(f"query #{i} has no positive exemplar; drop it or add one")
            if not (torch.isfinite(p).all() and torch.isfinite(n).all()):
                raise DetotError(f"feedback vectors of query #{i} hold NaN or inf")
            cands.append((torch.cat([p, n]), len(p)))
        with self._lock:
            w = self.w.clone().requires_grad_(True)
            alpha = self.alpha.clone().requires_grad_(True)

            def loss_fn() -> torch.Tensor:
                qa = self._query(q, w, alpha)  # (N, D)
                total = torch.zeros(())
                for i, (c, n_pos) in enumerate(cands):
                    s = c @ qa[i] / temperature  # (p+n,)
                    neg = s[n_pos:]  # (n,)
                    for j in range(n_pos):  # every positive against all negatives
                        total = total + torch.logsumexp(torch.cat([s[j : j + 1], neg]), 0) - s[j]
                reg = (w - self.w_init).pow(2).sum() + (alpha - self.alpha_init).pow(2)
                return total / len(cands) + l2_to_init * reg

            opt = torch.optim.Adam([w, alpha], lr=lr)
            with torch.no_grad():
                before = float(loss_fn())
            for _ in range(steps):
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                opt.step()
            with torch.no_grad():
                after = float(loss_fn())
            accepted = after < before and bool(torch.isfinite(w).all())
            if accepted:
                self.w = w.detach().clone()
                self.alpha = alpha.detach().clone()
                self.version += 1
            return UpdateReport(accepted, before, after, steps, self.version)

    # ---- state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and scalars of the current state (a consistent snapshot)."""
        with self._lock:
            return {"t": self.t.clone(), "w": self.w.clone(), "w_init": self.w_init.clone(),
                    "alpha": self.alpha.clone(), "alpha_init": self.alpha_init.clone(), "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the whole state at once (readers see the old or the new, never a mix)."""
        tensors = {k: torch.as_tensor(state[k], dtype=torch.float32) for k in ("t", "w", "w_init")}
        for name, value in tensors.items():
            if value.shape != (self.dim,):
                raise DetotError(f"{name} has shape {tuple(value.shape)}, expected ({self.dim},)")
            if not torch.isfinite(value).all():
                raise DetotError(f"{name} holds NaN or inf")
        with self._lock:
            self.t, self.w, self.w_init = tensors["t"].clone(), tensors["w"].clone(), tensors["w_init"].clone()
            self.alpha = torch.tensor(float(state["alpha"]))
            self.alpha_init = torch.tensor(float(state["alpha_init"]))
            self.version = int(state["version"])

    def to_tensors(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """`(meta, tensors)`: the one saved form of a task embedding (a directory via `save`, a
        DETOT program's side file, or JSON via `to_json`)."""
        s = self.state_dict()
        meta = {"task": self.task, "encoder": self.encoder_name, "dim": self.dim, "version": s["version"],
                "alpha": float(s["alpha"]), "alpha_init": float(s["alpha_init"])}
        return meta, {k: s[k] for k in self.TENSOR_NAMES}

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, Any], *, where: str = "task embedding",
                     encoder_name: str | None = None) -> TaskEmbedding:
        """Inverse of `to_tensors`; refuses another encoder, wrong shapes and non-finite values.

        Raises:
            ArtefactError: naming `where` and the mismatch.
        """
        if encoder_name is not None and meta.get("encoder") != encoder_name:
            raise ArtefactError(
                f"{where} was built with encoder {meta.get('encoder')!r}, but this program uses {encoder_name!r}")
        missing = sorted(set(cls.TENSOR_NAMES) - set(tensors))
        if missing:
            raise ArtefactError(f"{where} lacks tensors {missing}")
        t = torch.as_tensor(tensors["t"], dtype=torch.float32)
        dim = int(meta.get("dim", t.shape[0]))
        if tuple(t.shape) != (dim,):
            raise ArtefactError(f"{where}: task vector has shape {tuple(t.shape)}, manifest says ({dim},)")
        try:
            te = cls(meta["task"], t.numpy(), encoder_name=meta["encoder"])
            te.load_state_dict({**tensors, "alpha": meta["alpha"], "alpha_init": meta["alpha_init"],
                                "version": meta["version"]})
        except (DetotError, KeyError) as exc:
            raise ArtefactError(f"{where}: {exc}") from None
        return te

    def to_json(self) -> dict[str, Any]:
        """`to_tensors` as JSON (for DSPy's `module.save()`)."""
        meta, tensors = self.to_tensors()
        return {**meta, **{k: v.tolist() for k, v in tensors.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskEmbedding:
        """Inverse of `to_json`."""
        return cls.from_tensors(data, {k: data[k] for k in cls.TENSOR_NAMES if k in data}, where="task embedding JSON")

    def save(self, path: str | Path) -> Path:
        """Save to a directory: `tensors.safetensors` + `manifest.json` (atomic)."""
        meta, tensors = self.to_tensors()
        return save_tensors(path, kind=self.FORMAT, version=self.FORMAT_VERSION, meta=meta, tensors=tensors)

    @classmethod
    def load(cls, path: str | Path, *, encoder_name: str | None = None) -> TaskEmbedding:
        """Load a saved task embedding; refuses another encoder, wrong shapes and non-finite values."""
        meta, tensors = load_tensors(path, kind=cls.FORMAT, max_version=cls.FORMAT_VERSION)
        return cls.from_tensors(meta, tensors, where=str(path), encoder_name=encoder_name)

    def __repr__(self) -> str:
        return (f"TaskEmbedding(task={self.task!r}, dim={self.dim}, version={self.version}, "
                f"encoder={self.encoder_name!r})")
