"""What `DETOTFit` takes: `FitConfig` (budgets, the self-distillation, the racing rule, the guard) and `Choice`
(one candidate configuration of a DETOT), both validated when built.

Example:
    >>> cfg = FitConfig(max_minutes=30, chains_per_problem=2)
    >>> [c.name for c in cfg.candidates()][:3]
    ['plain', 'none-k0', 'distilled-k0']
    >>> FitConfig(max_minutes=0)
    Traceback (most recent call last):
    ...
    detot_agent.errors.ConfigError: invalid FitConfig:
      max_minutes: Input should be greater than 0 (got 0)
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from detot_agent.config import StrictModel
from detot_agent.detot.task import StoppingRule, Weighting
from detot_agent.embedding.update_config import UpdateConfig
from detot_agent.errors import ConfigError

__all__ = ["PLAIN", "Choice", "FitConfig", "Prompt"]

Prompt = Literal["none", "current", "gold", "distilled"]
PLAIN = "plain"  # the guard's baseline: confidence-weighted self-consistency at DETOT's budget, no prompt, no demos


class Choice(StrictModel):
    """One configuration of a DETOT the fit can ship.

    Attributes:
        name: unique within a fit (`plain` is the guard's baseline).
        prompt: the soft prompt served: `none`, the program's `current` one, `gold` (trained on the trainset's
            rationales) or `distilled` (trained on the model's own correct chains).
        k: retrieved demos per call (0: no exemplar index is read).
        temperature / strategy / weighting / stopping: as in `Adjustments`.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    prompt: Prompt = "none"
    k: int = Field(default=0, ge=0, le=32)
    temperature: float | None = Field(default=None, ge=0, le=2)
    strategy: str | None = Field(default=None, pattern="^(cot|direct|pot|mix)$")
    weighting: Weighting | None = None
    stopping: StoppingRule | None = None


class FitConfig(StrictModel):
    """Settings of `DETOTFit` (every budget must be positive; checked before any model work).

    Attributes:
        max_minutes: wall time of the whole fit; each stage stops at its share (distillation 30%, each
            prompt's training 15%, the rest for the race) and the race decides on the items every surviving
            candidate answered.
        max_train_problems: training problems sampled for chains (the first ones of the trainset).
        samples_per_problem: chains drawn per training problem, at the serving temperature.
        chains_per_problem: most distinct accepted chains kept per problem (balances the training data).
        rounds: self-distillation rounds (each samples again under the prompt the last round trained).
        filter: `metric` (keep chains the metric accepts; needs labels) or `agreement` (label-free: keep chains
            whose answer is the vote of at least `min_agreement` of the problem's samples).
        min_agreement: the agreement filter's threshold.
        metric_threshold: a float metric accepts at or above it (a bool metric: True).
        train: the one training loop's settings (`UpdateConfig`: steps, learning rate, ...), for every prompt.
        prompts: which trained prompts to build (`gold` needs rationales in the trainset).
        ks / temperatures / strategies / weightings / stoppings: the configuration space raced on the valset
            (crossed with the prompts; `none` and `current` prompts too; None: the program's own setting).
        stop_rules / stop_thresholds: the stopping rules the shipped configuration may take, replayed on its
            race answers without model calls (`fit/stopping.py`): the cheapest that keeps its dev correct count
            ships; an empty `stop_rules` keeps the raced rule.
        budget: DETOT's and the baseline's sample budget per problem (None: the program's `max_samples`).
        race_every: valset items between two looks of the racing rule.
        race_alpha: a candidate is dropped once a one-sided paired sign test puts it behind the leader at this level.
        guard_alpha: the guard's one-sided paired test against plain voting.
        threads: valset items answered at once (batched engines batch them).
        seed: orders the chains and the training.
    """

    max_minutes: float = Field(default=60.0, gt=0)
    max_train_problems: int = Field(default=64, ge=1)
    samples_per_problem: int = Field(default=4, ge=1, le=64)
    chains_per_problem: int = Field(default=2, ge=1, le=16)
    rounds: int = Field(default=1, ge=1, le=5)
    filter: Literal["metric", "agreement"] = "metric"
    min_agreement: float = Field(default=0.75, gt=0.5, le=1)
    metric_threshold: float = 1.0
    train: UpdateConfig = Field(default_factory=lambda: UpdateConfig(steps=100, max_seconds=None))
    prompts: list[Literal["gold", "distilled"]] = Field(default=["distilled"])  # pydantic copies list defaults
    ks: list[int] = Field(default=[0], min_length=1)
    temperatures: list[float | None] = Field(default=[None], min_length=1)
    strategies: list[str | None] = Field(default=[None], min_length=1)
    weightings: list[Weighting | None] = Field(default=[Weighting.CISC], min_length=1)
    stoppings: list[StoppingRule | None] = Field(default=[None], min_length=1)
    stop_rules: list[StoppingRule] = Field(default=[StoppingRule.BETA, StoppingRule.CONFIDENCE,
                                                     StoppingRule.MAJORITY])
    stop_thresholds: list[float] = Field(default=[0.6, 0.7, 0.8, 0.9, 0.95], min_length=1)
    budget: int | None = Field(default=None, ge=1, le=64)
    race_every: int = Field(default=10, ge=1)
    race_alpha: float = Field(default=0.05, gt=0, lt=0.5)
    guard_alpha: float = Field(default=0.05, gt=0, lt=0.5)
    threads: int = Field(default=4, ge=1, le=64)
    seed: int = 0

    @model_validator(mode="after")
    def _space(self) -> FitConfig:
        if any(k < 0 or k > 32 for k in self.ks):
            raise ConfigError(f"ks must be between 0 and 32, got {self.ks}")
        for s in self.strategies:
            if s is not None and s not in ("cot", "direct", "pot", "mix"):
                raise ConfigError(f"strategies must be cot, direct, pot or mix (or None: the program's), got {s!r}")
        if any(not 0 < t <= 1 for t in self.stop_thresholds):
            raise ConfigError(f"stop_thresholds must be in (0, 1], got {self.stop_thresholds}")
        if any(t is not None and not 0 <= t <= 2 for t in self.temperatures):
            raise ConfigError(f"temperatures must be between 0 and 2, got {self.temperatures}")
        return self

    @property
    def min_valset(self) -> int:
        """The fewest valset items the racing rule and the guard need: the first look's items, and at least the
        paired sign test's smallest sample that can reach `min(race_alpha, guard_alpha)` (all pairs one way)."""
        alpha = min(self.race_alpha, self.guard_alpha)
        return max(self.race_every, math.ceil(math.log2(1 / alpha)))

    def candidates(self, *, has_current: bool = False) -> list[Choice]:
        """The raced configurations: `plain` first, then every prompt x k x temperature x strategy x weighting x
        stopping rule."""
        prompts: list[Prompt] = ["none", *(["current"] if has_current else ()), *self.prompts]
        out = [Choice(name=PLAIN, prompt="none", k=0, weighting=Weighting.CISC, stopping=StoppingRule.FIXED)]
        for prompt in prompts:
            for k in self.ks:
                for temp in self.temperatures:
                    for strategy in self.strategies:
                        for weighting in self.weightings:
                            for stopping in self.stoppings:
                                parts = [prompt, f"k{k}", *([f"t{temp:g}"] if temp is not None else []),
                                         *([strategy] if strategy else []),
                                         *([weighting.value] if weighting and len(self.weightings) > 1 else []),
                                         *([f"stop_{stopping.value}"] if stopping and len(self.stoppings) > 1 else [])]
                                out.append(Choice(name="-".join(parts), prompt=prompt, k=k, temperature=temp,
                                                  strategy=strategy, weighting=weighting, stopping=stopping))
        names = [c.name for c in out]
        if len(set(names)) != len(names):
            raise ConfigError(f"the configuration space names a candidate twice: {names}")
        return out
