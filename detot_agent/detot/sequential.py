"""An always-valid sequential test for paired outcomes, and one error budget for the life of a service.

A candidate and the serving state answer the same requests; each request gives a paired outcome
`x = +1` (only the candidate right), `-1` (only the serving state right) or `0` (both or neither). The
candidate's gain is `delta = E[x]` (accuracy points). Two e-processes run on the sequence, each a mixture of
bets (testing by betting: Waudby-Smith and Ramdas; Shafer's test martingales):

- **accept**: against `H0: delta <= 0`, the wealth `K_t = mean_j prod_s (1 + l_j x_s)` over a grid of bet sizes
  `l_j` in (0, 1/2]. Under `H0` it is a nonnegative supermartingale, so by Ville's inequality
  `P(sup_t K_t >= 1/a) <= a`: the test may be read after every outcome without inflating its error;
- **futility**: against `H0': delta >= min_effect`, the same on `y = (min_effect - x) / (1 + min_effect)`; wealth
  `>= 1/futility` is evidence that the gain is below `min_effect`, and the candidate is rejected for futility
  (a reject cannot make a false accept, so it costs no error budget).

**The budget** (`ErrorBudget`) is spent across the candidates a service ever tests by e-LOND (Xu and Ramdas,
2024): the j-th candidate gets level `a_j = alpha * gamma_j * (accepted_before_j + 1)` with `gamma_j =
6 / (pi^2 j^2)` (summing to 1), which keeps the false discovery rate of all acceptances at most `alpha` for
e-values under any dependence. A candidate proposed again keeps its evidence and its level (its key names
it), so repeated proposals accumulate evidence instead of spending new slices of the budget.

Example:
    >>> test = PairedBettingTest()
    >>> for x in [1] * 12:
    ...     test.observe(x)
    >>> round(test.accept_wealth, 1) > 1 / 0.05, test.decision(level=0.05)
    (True, 'accept')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from detot_agent.config import StrictModel
from detot_agent.errors import ArtefactError, InvalidRequestError

__all__ = ["BETS", "ErrorBudget", "PairedBettingTest", "SequentialRules"]

BETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)  # the mixture's bet sizes: small ones for small gains, large for large
Decision = Literal["accept", "reject", "continue"]


class SequentialRules(StrictModel):
    """Settings of the sequential test and its budget.

    Attributes:
        alpha: the error budget of every acceptance the service ever makes (e-LOND: a false discovery rate).
        min_effect: the least gain in accuracy points worth shipping; the futility test is against it.
        futility: reject once the evidence that the gain is below `min_effect` reaches `1 / futility`.
        max_outcomes: reject (undecided) after this many paired outcomes.
    """

    alpha: float = Field(default=0.05, gt=0, lt=1)
    min_effect: float = Field(default=0.03, gt=0, lt=1)
    futility: float = Field(default=0.1, gt=0, lt=1)
    max_outcomes: int = Field(default=2000, ge=1)


class PairedBettingTest:
    """The two e-processes of one candidate against the serving state (module docstring); state as log-wealth per
    bet, so it can be saved and resumed exactly."""

    def __init__(self, rules: SequentialRules | None = None) -> None:
        self.rules = rules or SequentialRules()
        self.log_accept = [0.0] * len(BETS)
        self.log_futile = [0.0] * len(BETS)
        self.wins = self.losses = self.ties = 0

    @property
    def outcomes(self) -> int:
        return self.wins + self.losses + self.ties

    def observe(self, x: int) -> None:
        """One paired outcome: +1 only the candidate right, -1 only the serving state right, 0 otherwise."""
        if x not in (-1, 0, 1):
            raise InvalidRequestError(f"a paired outcome is -1, 0 or +1, got {x!r}")
        self.wins += x == 1
        self.losses += x == -1
        self.ties += x == 0
        y = (self.rules.min_effect - x) / (1 + self.rules.min_effect)  # in [-1, 1]
        for j, bet in enumerate(BETS):
            self.log_accept[j] += math.log1p(bet * x)
            self.log_futile[j] += math.log1p(bet * y)

    @staticmethod
    def _mixture(logs: Sequence[float]) -> float:
        top = max(logs)
        return math.exp(top) * sum(math.exp(v - top) for v in logs) / len(logs)

    @property
    def accept_wealth(self) -> float:
        """The e-value against "the candidate is not better" (the mixture's wealth)."""
        return self._mixture(self.log_accept)

    @property
    def futility_wealth(self) -> float:
        """The e-value against "the candidate is at least `min_effect` better"."""
        return self._mixture(self.log_futile)

    def decision(self, *, level: float) -> Decision:
        """`accept` once the accept wealth reaches `1 / level`, `reject` on futility or at `max_outcomes`, else
        `continue`."""
        if self.accept_wealth >= 1 / level:
            return "accept"
        if self.futility_wealth >= 1 / self.rules.futility or self.outcomes >= self.rules.max_outcomes:
            return "reject"
        return "continue"

    def stats(self) -> dict[str, Any]:
        """What a decision's log entry records."""
        return {"outcomes": self.outcomes, "wins": self.wins, "losses": self.losses, "ties": self.ties,
                "accept_wealth": self.accept_wealth, "futility_wealth": self.futility_wealth}

    def evidence(self, *, level: float) -> dict[str, float]:
        """Where the evidence stands against the thresholds `decision` uses: what each shadow log line records
        (`ShadowJudge.record_to`) and `evidence.png` plots."""
        return {"accept_e": self.accept_wealth, "accept_at": 1 / level, "futility_e": self.futility_wealth,
                "reject_at": 1 / self.rules.futility}

    def to_json(self) -> dict[str, Any]:
        return {"log_accept": self.log_accept, "log_futile": self.log_futile, "wins": self.wins,
                "losses": self.losses, "ties": self.ties}

    @classmethod
    def from_json(cls, data: dict[str, Any], rules: SequentialRules | None = None) -> PairedBettingTest:
        test = cls(rules)
        try:
            accept, futile = [float(v) for v in data["log_accept"]], [float(v) for v in data["log_futile"]]
            counts = [int(data[k]) for k in ("wins", "losses", "ties")]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtefactError(f"not a saved sequential test ({type(exc).__name__}: {exc})") from None
        if len(accept) != len(BETS) or len(futile) != len(BETS) or min(counts) < 0:
            raise ArtefactError(f"a saved sequential test needs {len(BETS)} bets and non-negative counts")
        test.log_accept, test.log_futile = accept, futile
        test.wins, test.losses, test.ties = counts
        return test


class ErrorBudget:
    """e-LOND levels for the candidates a service tests over its life, each candidate named by a key.

    Example:
        >>> budget = ErrorBudget(alpha=0.05)
        >>> a = budget.level("candidate-a"); b = budget.level("candidate-b")
        >>> round(a, 4), round(b, 4), budget.level("candidate-a") == a
        (0.0304, 0.0076, True)
    """

    def __init__(self, alpha: float = 0.05) -> None:
        if not 0 < alpha < 1:
            raise InvalidRequestError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self.order: list[str] = []  # candidates in the order first tested
        self.levels: dict[str, float] = {}
        self.accepted: list[str] = []

    def level(self, key: str) -> float:
        """The level of candidate `key`: fixed when it is first tested (a repeat keeps it)."""
        if key not in self.levels:
            j = len(self.order) + 1
            gamma = 6 / (math.pi**2 * j**2)
            self.levels[key] = self.alpha * gamma * (len(self.accepted) + 1)
            self.order.append(key)
        return self.levels[key]

    def record_accept(self, key: str) -> None:
        if key not in self.levels:
            raise InvalidRequestError(f"candidate {key!r} was never tested")
        if key not in self.accepted:
            self.accepted.append(key)

    def to_json(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "order": self.order, "levels": self.levels, "accepted": self.accepted}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ErrorBudget:
        try:
            budget = cls(float(data["alpha"]))
            budget.order = [str(k) for k in data["order"]]
            budget.levels = {str(k): float(v) for k, v in data["levels"].items()}
            budget.accepted = [str(k) for k in data["accepted"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtefactError(f"not a saved error budget ({type(exc).__name__}: {exc})") from None
        if set(budget.order) != set(budget.levels) or not set(budget.accepted) <= set(budget.levels):
            raise ArtefactError("a saved error budget names candidates it has no level for")
        return budget
