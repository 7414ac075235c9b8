"""Task profiles and the task-oriented adjustment rules (DETOT section 3.1).

`analyze(profile, samples)` starts from defaults, applies the rules in `RULES`
in order (each a condition, a set of changes, and a one-line reason), then the
user's overrides, and returns `Adjustments`: everything the module, the voting
controller and the monitor need to know about how to handle this task.

Example:
    >>> from detot_agent.detot.task import TaskProfile, analyze
    >>> profile = TaskProfile(name="arith", description="Grade-school math word problems",
    ...                       kind="arithmetic", answer_format="number")
    >>> adj = analyze(profile, ["Tom has 3 apples and buys 4 more. How many?"])
    >>> adj.strategy, adj.normalizer.value, adj.stopping.value
    ('cot', 'number', 'beta')
    >>> [a.rule for a in adj.applied][:2]
    ['reasoning-needs-cot', 'numbers-vote-exactly']
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import Field, model_validator

from detot_agent.answers import AnswerFormat
from detot_agent.config import StrictModel
from detot_agent.detot.monitor import MonitorConfig
from detot_agent.errors import ConfigError

__all__ = ["RULES", "Adjustments", "AnswerFormat", "AppliedRule", "Policy", "Rule", "StoppingRule", "TaskKind",
           "TaskProfile", "Weighting", "analyze", "estimate_complexity"]


class TaskKind(str, Enum):
    """What sort of task it is."""

    ARITHMETIC = "arithmetic"
    CLASSIFICATION = "classification"
    EXTRACTION = "extraction"
    OPEN_QA = "open_qa"
    MULTIPLE_CHOICE = "multiple_choice"


class StoppingRule(str, Enum):
    """When to stop drawing samples for one question (see `voting.should_stop`)."""

    FIXED = "fixed"
    MAJORITY = "majority"
    BETA = "beta"
    ENTROPY = "entropy"
    CONFIDENCE = "confidence"


class Weighting(str, Enum):
    """How much each sample's vote counts (see `voting.vote_weights`)."""

    UNIFORM = "uniform"
    CISC = "cisc"
    FILTER = "filter"


class TaskProfile(StrictModel):
    """A task as the user describes it.

    Attributes:
        name: task id (soft prompts and task embeddings are keyed by it).
        description: one or two sentences; encoded into the task vector.
        kind: `arithmetic`, `classification`, `extraction`, `open_qa`, `multiple_choice`.
        answer_format: `number`, `label` (one of `labels`) or `text`.
        labels: the label set for `label` answers.
        label_synonyms: extra spellings per label, e.g. {"positive": ["pos", "good"]}.
        complexity: 0 (trivial) to 1 (hard); estimated from sample inputs when None.
        desired_outcome: 0 = cheapest, 1 = most accurate; trades samples and demos for accuracy.
    """

    name: str = Field(min_length=1)
    description: str = ""
    kind: TaskKind = TaskKind.OPEN_QA
    answer_format: AnswerFormat = AnswerFormat.TEXT
    labels: list[str] | None = None
    label_synonyms: dict[str, list[str]] = Field(default_factory=dict)
    complexity: float | None = Field(default=None, ge=0, le=1)
    desired_outcome: float = Field(default=0.7, ge=0, le=1)

    @model_validator(mode="after")
    def _labels_for_label_tasks(self) -> TaskProfile:
        if self.answer_format is AnswerFormat.LABEL and not self.labels:
            raise ConfigError("answer_format 'label' needs a non-empty labels list")
        return self


class AppliedRule(StrictModel):
    """A rule that fired, with its reason (kept in `Adjustments.applied` for reports)."""

    rule: str
    reason: str


def _monitor_field(name: str) -> Any:
    """`MonitorConfig`'s declaration of `name` (its default and limits), for `Adjustments` to carry."""
    return copy.copy(MonitorConfig.model_fields[name])


class Adjustments(StrictModel):
    """How DETOT handles a task; every field can be overridden by the user."""

    strategy: str = Field(default="cot", pattern="^(cot|direct|pot|mix)$")
    k_exemplars: int = Field(default=3, ge=0, le=32)
    mmr_lambda: float | None = Field(default=0.7, ge=0, le=1)
    min_samples: int = Field(default=2, ge=1, le=64)
    max_samples: int = Field(default=8, ge=1, le=64)
    round_size: int = Field(default=2, ge=1, le=64)
    stopping: StoppingRule = StoppingRule.BETA
    stop_threshold: float = Field(default=0.95, gt=0, le=1)
    weighting: Weighting = Weighting.UNIFORM
    cisc_temperature: float = Field(default=0.1, gt=0, le=10)
    keep_fraction: float = Field(default=0.9, gt=0, le=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    greedy_first: bool = True
    max_tokens: int = Field(default=256, ge=1)
    normalizer: AnswerFormat = AnswerFormat.TEXT
    soft_prompt_init_text: str = "Answer the question. End with: The answer is <answer>."
    soft_prompt_k: int = Field(default=8, ge=1, le=256)
    # the monitor's thresholds for this task: declared once, in `MonitorConfig` (same defaults and limits)
    agreement_threshold: float = _monitor_field("agreement_threshold")
    accuracy_threshold: float = _monitor_field("accuracy_threshold")
    window: int = _monitor_field("window")
    min_count: int = _monitor_field("min_count")
    cooldown: int = _monitor_field("cooldown")
    applied: list[AppliedRule] = Field(default_factory=list)

    def monitor_config(self) -> MonitorConfig:
        """The `MonitorConfig` these adjustments ask for (what `DETOT` builds its monitor from)."""
        return MonitorConfig(**{name: getattr(self, name) for name in MonitorConfig.THRESHOLDS})

    @model_validator(mode="after")
    def _budget(self) -> Adjustments:
        if self.min_samples > self.max_samples:
            raise ConfigError(f"min_samples ({self.min_samples}) exceeds max_samples ({self.max_samples})")
        return self


class Policy(StrictModel):
    """How a task's calls reason and vote, as the optimization loop may change it: the `Adjustments` fields
    a serving state overrides (`TaskState.policy`). The loop tries the policies the user lists in
    `ControllerConfig.policies` and keeps one only when paired replay on gold items shows it helps.

    Attributes:
        strategy: `cot`, `pot` or `mix` (None: keep the task's; `direct` is the predictor's shape, chosen when
            the module is built).
        weighting: `uniform`, `cisc` or `filter` (None: keep the task's).
        temperature: the sampling temperature (None: keep the task's).
        k_exemplars: demos retrieved per call (None: keep the task's; more than 0 needs exemplars in the index).
        soft_prompt: False serves without the task embedding's soft-prompt vectors (retrieval still uses it),
            True with them again (None: keep the state's). `detot fit` ships no prompt when none earns its place.
        max_tokens: new tokens per sampled chain (None: keep the task's). A prompt without demos makes the model
            write longer chains: on GSM8K with the bench model, a third of the fit's choice's chains reach a
            320-token budget (docs, "the loop on a prequential GSM8K stream").

    The fields are the configuration space `detot fit` races (`FitConfig`), so the loop can propose what a fit
    would choose.

    Example:
        >>> pot = Policy(strategy="pot")
        >>> pot.apply(Adjustments()).strategy, pot.describe()
        ('pot', 'strategy=pot')
        >>> Policy.parse("temperature=0.3, k_exemplars=0").describe()
        'temperature=0.3, k_exemplars=0'
        >>> Policy.parse("soft_prompt=off, max_tokens=320").describe()
        'soft_prompt=off, max_tokens=320'
    """

    strategy: str | None = Field(default=None, pattern="^(cot|pot|mix)$")
    weighting: Weighting | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    k_exemplars: int | None = Field(default=None, ge=0, le=32)
    soft_prompt: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=8192)

    @model_validator(mode="after")
    def _changes_something(self) -> Policy:
        if not self.changes():
            raise ConfigError("a policy sets strategy, weighting, temperature, k_exemplars, soft_prompt or "
                              "max_tokens (at least one)")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields it sets."""
        return {k: v for k, v in (("strategy", self.strategy), ("weighting", self.weighting),
                                  ("temperature", self.temperature), ("k_exemplars", self.k_exemplars),
                                  ("soft_prompt", self.soft_prompt), ("max_tokens", self.max_tokens))
                if v is not None}

    @classmethod
    def parse(cls, text: str) -> Policy:
        """`"strategy=pot,weighting=cisc"` -> `Policy` (the command line's form).

        Example:
            >>> Policy.parse("strategy=mix, weighting=cisc").describe()
            'strategy=mix, weighting=cisc'
        """
        from detot_agent.errors import ConfigError

        fields: dict[str, str] = {}
        for part in (p.strip() for p in text.split(",")):
            name, eq, value = part.partition("=")
            if not eq or name.strip() not in cls.model_fields:
                raise ConfigError(f"policy {text!r}: expected strategy=cot|pot|mix, weighting=uniform|cisc|filter, "
                                  f"temperature=T, k_exemplars=K, soft_prompt=on|off and/or max_tokens=N, "
                                  f"comma-separated; got "
                                  f"{part!r}")
            fields[name.strip()] = value.strip()
        return cls(**fields)  # type: ignore[arg-type]

    def merged(self, base: Policy | None) -> Policy:
        """`base` with this policy's fields in place (what a state serving `base` switches to)."""
        return self if base is None else Policy(**{**base.changes(), **self.changes()})

    def apply(self, adjustments: Adjustments) -> Adjustments:
        """`adjustments` with this policy's fields in place of the task's (the soft prompt is the state's: it is
        not an adjustment; `TaskState.serves_soft_prompt`)."""
        return adjustments.model_copy(update={k: v for k, v in self.changes().items() if k != "soft_prompt"})

    def describe(self) -> str:
        """`strategy=pot, weighting=cisc`."""
        return ", ".join(f"{k}={('on' if v else 'off') if isinstance(v, bool) else getattr(v, 'value', v)}"
                         for k, v in self.changes().items())


_QUANTITY = re.compile(r"\d+(?:[.,]\d+)?")
_STEP_WORDS = re.compile(r"\b(then|after|each|every|twice|half|total|remaining|left|more than|less than|times)\b",
                         re.IGNORECASE)


def estimate_complexity(samples: Sequence[str]) -> float:
    """0..1 from sample inputs: length (words), count of quantities, and multi-step cue words."""
    if not samples:
        return 0.5
    scores = []
    for text in samples:
        words = len(text.split())
        quantities = len(_QUANTITY.findall(text))
        steps = len(_STEP_WORDS.findall(text))
        scores.append(min(1.0, 0.4 * min(words / 80, 1) + 0.4 * min(quantities / 6, 1) + 0.2 * min(steps / 4, 1)))
    return sum(scores) / len(scores)


@dataclass(frozen=True)
class Rule:
    """One adjustment rule: when `when(profile, complexity)` holds, apply `then` (a dict or a function)."""

    name: str
    when: Callable[[TaskProfile, float], bool]
    then: dict[str, Any] | Callable[[TaskProfile, float, dict[str, Any]], dict[str, Any]]
    reason: str


def _arith(p: TaskProfile, c: float) -> bool:
    return p.kind is TaskKind.ARITHMETIC


RULES: list[Rule] = [
    Rule("reasoning-needs-cot", lambda p, c: p.kind in (TaskKind.ARITHMETIC,) or c >= 0.5,
         {"strategy": "cot"}, "multi-step problems gain from written reasoning before the answer"),
    Rule("numbers-vote-exactly", lambda p, c: p.answer_format is AnswerFormat.NUMBER,
         {"normalizer": AnswerFormat.NUMBER, "soft_prompt_init_text":
          "Solve the problem step by step, then finish with: The answer is <number>."},
         "numeric answers compare exactly once commas, units and fractions are normalised"),
    Rule("labels-vote-on-the-set", lambda p, c: p.answer_format is AnswerFormat.LABEL,
         lambda p, c, a: {"normalizer": AnswerFormat.LABEL, "soft_prompt_init_text":
                          f"Answer with exactly one of: {', '.join(p.labels or [])}."},
         "label answers are mapped onto the label set (case, synonyms) before voting"),
    Rule("simple-classification-is-direct", lambda p, c: p.kind is TaskKind.CLASSIFICATION and c < 0.5,
         {"strategy": "direct", "max_tokens": 32, "temperature": 0.5},
         "short label outputs need no chain of thought; fewer tokens per sample"),
    Rule("extraction-is-direct-and-greedy", lambda p, c: p.kind is TaskKind.EXTRACTION,
         {"strategy": "direct", "temperature": 0.3, "stopping": StoppingRule.MAJORITY},
         "extracted spans vary little; low temperature, stop at a clear majority"),
    Rule("hard-tasks-get-more-demos", lambda p, c: c >= 0.6,
         {"k_exemplars": 4, "max_tokens": 384}, "long multi-quantity problems benefit from more worked examples"),
    Rule("easy-tasks-get-fewer-demos", lambda p, c: c < 0.25,
         {"k_exemplars": 2, "max_samples": 4}, "short problems are solved from little context; save tokens"),
    Rule("accuracy-first-buys-samples", lambda p, c: p.desired_outcome >= 0.8,
         lambda p, c, a: {"max_samples": min(64, a["max_samples"] * 2), "stop_threshold": 0.97},
         "the user values accuracy over cost: allow more votes and demand more certainty"),
    Rule("cost-first-saves-samples", lambda p, c: p.desired_outcome <= 0.3,
         lambda p, c, a: {"max_samples": max(a["min_samples"], a["max_samples"] // 2), "stop_threshold": 0.9},
         "the user values cost: fewer votes, stop earlier"),
    Rule("arithmetic-wants-agreement", _arith, {"agreement_threshold": 0.6, "mmr_lambda": 0.7},
         "arithmetic answers that disagree usually mean wrong reasoning; keep demos diverse"),
]
"""The adjustment rules, applied in order (a later rule may refine an earlier one)."""


def analyze(profile: TaskProfile, samples: Sequence[str] = (), **overrides: Any) -> Adjustments:
    """Adjustments for `profile`: defaults, then every rule that fires, then `overrides`.

    Args:
        profile: the task.
        samples: a few example inputs (used to estimate complexity when the profile does not give it).
        **overrides: any `Adjustments` field, applied last.
    """
    complexity = profile.complexity if profile.complexity is not None else estimate_complexity(samples)
    values: dict[str, Any] = Adjustments().model_dump(exclude={"applied"})
    applied: list[AppliedRule] = []
    for rule in RULES:
        if rule.when(profile, complexity):
            changes = rule.then(profile, complexity, values) if callable(rule.then) else rule.then
            values.update(changes)
            applied.append(AppliedRule(rule=rule.name, reason=rule.reason))
    values["min_samples"] = min(values["min_samples"], values["max_samples"])  # rules may lower the budget
    values.update(overrides)  # the user's values are validated as given
    if overrides:
        applied.append(AppliedRule(rule="user-overrides", reason=f"set by the user: {', '.join(sorted(overrides))}"))
    return Adjustments(**values, applied=applied)
