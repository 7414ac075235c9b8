"""`PromptHead`: turns the task-adapted query `q(x)` into the soft prompt `P(x)`.

An attentional mixture over a small bank of prompt components (the idea of ATTEMPT,
Asai et al. 2022)::

    a(x) = softmax(G q(x) / tau)              # (M,)  which components this input uses
    P(x) = P0 + sum_m a_m(x) * B_m            # (k, H)

`P0` is the input-independent part (exactly today's static soft prompt), `B` the bank
of `M` components (zero at the start: the head starts as the static prompt), `G` the
gate, one row per component, in the encoder's space (initialised at centroids of the
task's inputs, so different kinds of input lean on different components). With `M = 0`
or a zero bank, `P(x) = P0` for every input.

Why a mixture and not a low-rank generator (IDPG): the mixture keeps every soft
prompt a convex shift of `P0` inside the span of `M` learned prompts, so it cannot
leave the region the LM was trained to read, and its cost is one `(M, D)` matmul and an
`(M, k*H)` weighted sum per input (microseconds); `balance` in `UpdateConfig` keeps
the gate from collapsing onto one component.

Example:
    >>> import torch
    >>> head = PromptHead(torch.zeros(4, 8), components=2, dim=3, seed=0)
    >>> head(torch.eye(3)[:2]).shape              # (N, k, H)
    torch.Size([2, 4, 8])
    >>> bool((head(torch.eye(3)[:2]) == 0).all())  # zero bank: P(x) = P0
    True
"""

from __future__ import annotations

from typing import Any

import torch

from detot_agent.errors import SoftPromptError

__all__ = ["PromptHead"]


class PromptHead:
    """`P(x) = P0 + sum_m softmax(G q / tau)_m B_m` (shapes in the module docstring).

    Args:
        p0: `(k, hidden)` input-independent vectors (a static soft prompt).
        components: `M`, the number of bank components (0: static, `P(x) = P0`).
        dim: width of `q(x)` (the encoder's dimension).
        tau: gate softmax temperature (> 0); `q` and the gate rows are unit vectors, so scores
            lie in [-1/tau, 1/tau].
        gate: `(M, dim)` initial gate rows (normalised); default: random unit rows from `seed`.
        seed: for the default gate.

    Attributes:
        p0, bank, gate: the learnable tensors `(k, H)`, `(M, k, H)`, `(M, dim)`.
        p0_init, gate_init: their starting values (the anchors of the L2 pull; the bank's is zero).
    """

    TENSOR_NAMES = ("p0", "p0_init", "bank", "gate", "gate_init")

    def __init__(self, p0: torch.Tensor, *, components: int, dim: int, tau: float = 0.1,
                 gate: torch.Tensor | None = None, seed: int = 0) -> None:
        if not isinstance(p0, torch.Tensor) or p0.dim() != 2 or p0.shape[0] < 1 or not p0.is_floating_point():
            raise SoftPromptError(f"P0 must be a floating (k, hidden) tensor with k >= 1, got "
                                  f"{tuple(p0.shape) if isinstance(p0, torch.Tensor) else type(p0).__name__}")
        if components < 0 or dim < 1 or not tau > 0:
            raise SoftPromptError(f"components must be >= 0, dim >= 1 and tau > 0 (got {components}, {dim}, {tau})")
        self.p0 = p0.detach().float().clone()  # (k, H)
        self.p0_init = self.p0.clone()
        self.bank = torch.zeros(components, *self.p0.shape)  # (M, k, H)
        if gate is None:
            gate = torch.randn(components, dim, generator=torch.Generator().manual_seed(seed))
        gate = torch.as_tensor(gate, dtype=torch.float32)
        if tuple(gate.shape) != (components, dim):
            raise SoftPromptError(f"gate must have shape ({components}, {dim}), got {tuple(gate.shape)}")
        self.gate = gate / gate.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (M, D)
        self.gate_init = self.gate.clone()
        self.tau = float(tau)
        self._check()

    # ---- shape --------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Virtual tokens per soft prompt."""
        return int(self.p0.shape[0])

    @property
    def hidden_size(self) -> int:
        """Width of each vector (the model's hidden size)."""
        return int(self.p0.shape[1])

    @property
    def components(self) -> int:
        """`M`, the bank size (0: static)."""
        return int(self.bank.shape[0])

    @property
    def dim(self) -> int:
        """Width of the query it reads."""
        return int(self.gate.shape[1])

    def is_static(self) -> bool:
        """True when every input gets `P0` (no components, or an all-zero bank)."""
        return self.components == 0 or not bool(self.bank.any())

    # ---- the map q -> P -------------------------------------------------------------------------
    @staticmethod
    def gate_weights(q: torch.Tensor, gate: torch.Tensor, tau: float) -> torch.Tensor:
        """`a = softmax(G q / tau)` `(N, M)` for queries `q (N, D)` (differentiable)."""
        return torch.softmax(q @ gate.T / tau, dim=-1)

    @staticmethod
    def mix(q: torch.Tensor, p0: torch.Tensor, bank: torch.Tensor, gate: torch.Tensor, tau: float,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(P, a)` for queries `q (N, D)`: `P (N, k, H)`, gate weights `a (N, M)` (differentiable)."""
        n = q.shape[0]
        if bank.shape[0] == 0:
            return p0.unsqueeze(0).expand(n, -1, -1), q.new_zeros(n, 0)
        a = PromptHead.gate_weights(q, gate, tau)  # (N, M)
        return p0 + torch.einsum("nm,mkh->nkh", a, bank), a  # (N, k, H)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """Soft prompts `(N, k, H)` for unit queries `q (N, D)`."""
        return self.mix(q, self.p0, self.bank, self.gate, self.tau)[0]

    def weights(self, q: torch.Tensor) -> torch.Tensor:
        """Gate weights `a(x)` `(N, M)` (empty when static)."""
        return self.mix(q, self.p0, self.bank, self.gate, self.tau)[1]

    # ---- state --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the tensors, by `TENSOR_NAMES`."""
        return {name: getattr(self, name).clone() for name in self.TENSOR_NAMES}

    def set(self, **tensors: torch.Tensor) -> None:
        """Replace some of `p0`, `bank`, `gate` (checked: shapes and finiteness)."""
        old = self.tensors()
        for name, value in tensors.items():
            if name not in ("p0", "bank", "gate"):
                raise SoftPromptError(f"unknown head tensor {name!r}")
            setattr(self, name, value.detach().float().clone())
        try:
            self._check()
        except SoftPromptError:
            for name, value in old.items():
                setattr(self, name, value)
            raise

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], *, tau: float, where: str = "soft-prompt head") -> PromptHead:
        """Rebuild from `tensors()` output; refuses inconsistent shapes and non-finite values."""
        missing = [n for n in cls.TENSOR_NAMES if n not in tensors]
        if missing:
            raise SoftPromptError(f"{where} lacks tensors {missing}")
        t = {n: torch.as_tensor(tensors[n], dtype=torch.float32) for n in cls.TENSOR_NAMES}
        if t["gate"].dim() != 2:
            raise SoftPromptError(f"{where}: gate has shape {tuple(t['gate'].shape)}, expected (M, dim)")
        head = cls(t["p0_init"], components=int(t["gate"].shape[0]), dim=int(t["gate"].shape[1]), tau=tau,
                   gate=t["gate_init"])
        head.gate_init = t["gate_init"].clone()  # as saved, not re-normalised
        head.set(p0=t["p0"], bank=t["bank"], gate=t["gate"])
        return head

    def _check(self) -> None:
        k, h = self.p0.shape
        m, d = self.gate.shape
        want = {"p0": (k, h), "p0_init": (k, h), "bank": (m, k, h), "gate": (m, d), "gate_init": (m, d)}
        for name, shape in want.items():
            value = getattr(self, name)
            if tuple(value.shape) != shape:
                raise SoftPromptError(f"head tensor {name} has shape {tuple(value.shape)}, expected {shape}")
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise SoftPromptError(f"head tensor {name} holds {bad} non-finite value(s)")

    def copy(self) -> PromptHead:
        """An independent copy."""
        return PromptHead.from_tensors(self.tensors(), tau=self.tau)
