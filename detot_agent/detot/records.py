"""Named records DETOT passes between its parts: a parsed sample, the serving state, evidence, a verdict.

Example:
    >>> s = ParsedSample(text="3 + 4 = 7. The answer is 7.", key="7", tokens=12)
    >>> s.key, s.parsed
    ('7', False)
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from detot_agent.errors import ArtefactError

if TYPE_CHECKING:
    import torch

    from detot_agent.detot.task import Adjustments, Policy
    from detot_agent.embedding.task_embedding import TaskEmbedding

__all__ = ["Evidence", "ParsedSample", "Replayed", "TaskState", "Verdict"]


@dataclass(frozen=True)
class Replayed:
    """One item answered by one state (a served answer, or a replay of it for judging: `judging.py`).

    Attributes:
        key: the winning vote key (None: no parseable answer).
        agreement: the winner's share of the vote.
        demo_ids: the demos retrieved for it.
    """

    key: str | None
    agreement: float
    demo_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParsedSample:
    """One sampled answer as the vote sees it.

    Attributes:
        text: the raw completion (on the rollout path: its parsed fields as JSON).
        key: the normalised vote key (None: unparseable).
        tokens: output tokens it cost.
        logprob: sum of its tokens' log-probabilities, when the engine reports it.
        fields: the adapter's parsed output fields (None: unparseable).
        strategy: how it was asked for: `cot` (the adapter's prompt) or `pot` (a program).
    """

    text: str
    key: str | None = None
    tokens: int = 0
    logprob: float | None = None
    fields: dict[str, Any] | None = None
    strategy: str = "cot"

    @property
    def parsed(self) -> bool:
        """Whether the adapter could read its fields."""
        return self.fields is not None


@dataclass(frozen=True)
class TaskState:
    """What the controller publishes: the task's one `TaskEmbedding` (query side and soft-prompt head)
    under a version. Never mutated after it is published; a call reads it once.

    Attributes:
        version: the serving version (the embedding's own `version` follows it).
        embedding: the task embedding, or None (no retrieval adaptation, no soft prompt).
        policy: the reasoning strategy / vote weighting the loop switched to, or None (the task's own
            `Adjustments`).
    """

    version: int
    embedding: TaskEmbedding | None
    policy: Policy | None = None

    def adjust(self, adjustments: Adjustments) -> Adjustments:
        """The adjustments a call under this state uses: the task's, with the policy applied."""
        return adjustments if self.policy is None else self.policy.apply(adjustments)

    @property
    def serves_soft_prompt(self) -> bool:
        """Whether calls under this state get the soft-prompt vectors (a policy may switch them off)."""
        return self.policy is None or self.policy.soft_prompt is not False

    @property
    def soft_prompt(self) -> torch.Tensor | None:
        """`P0`, the input-independent part of the soft prompt (None without a head)."""
        head = None if self.embedding is None else self.embedding.head
        return None if head is None else head.p0


@dataclass
class Evidence:
    """One answered question, as the optimization loop needs it.

    Attributes:
        id: the prediction's id.
        query: encoded input (not task-adapted), `(dim,)`.
        demo_ids: exemplars shown as demos.
        agreement: winner's share of the vote.
        messages: the chat messages the model saw (for soft-prompt targets), or None.
        target: completion text to learn (a good sample), or None.
        correct: correctness when known.
        gold_target: a sample whose answer matched the gold answer, when feedback supplied one.
        samples: every sample drawn for it.
        version: the serving version that answered it (re-optimization uses only the current version's).
        inputs: the input fields (to replay it through a candidate state).
        gold_key: the gold answer's vote key, when feedback gave one.
        served: how the serving version answered it (winning key, agreement, demos): its side of a paired
            replay, which would reproduce it (the same pipeline and seeds), so it is not replayed again.
    """

    id: str
    query: np.ndarray
    demo_ids: list[str]
    agreement: float
    messages: list[dict[str, str]] | None = None
    target: str | None = None
    correct: bool | None = None
    gold_target: str | None = None
    samples: list[ParsedSample] = field(default_factory=list)
    version: int = 0
    inputs: dict[str, Any] | None = None
    gold_key: str | None = None
    served: Replayed | None = None

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict (`from_record` reads it back): the query as base64 float32 bytes, samples as
        dicts; input and parsed field values go through JSON (others as their `str`)."""
        served = None if self.served is None else {"key": self.served.key, "agreement": self.served.agreement,
                                                   "demo_ids": list(self.served.demo_ids)}
        query = np.ascontiguousarray(self.query, dtype=np.float32)
        return {"id": self.id, "query": base64.b64encode(query.tobytes()).decode("ascii"), "dim": int(query.size),
                "demo_ids": list(self.demo_ids), "agreement": self.agreement, "messages": self.messages,
                "target": self.target, "correct": self.correct, "gold_target": self.gold_target,
                "samples": [asdict(s) for s in self.samples], "version": self.version, "inputs": self.inputs,
                "gold_key": self.gold_key, "served": served}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Evidence:
        """The record `to_record` wrote; raises `ValueError` naming what is missing or malformed.

        Example:
            >>> ev = Evidence(id="q1", query=np.ones(3, dtype=np.float32), demo_ids=["d1"], agreement=0.5,
            ...               samples=[ParsedSample("The answer is 7.", key="7", tokens=5)])
            >>> back = Evidence.from_record(ev.to_record())
            >>> back.id, back.query.tolist(), back.samples[0].key
            ('q1', [1.0, 1.0, 1.0], '7')
        """
        try:
            query = np.frombuffer(base64.b64decode(data["query"], validate=True), dtype=np.float32).copy()
            if query.size != data["dim"]:
                raise ArtefactError(f"query has {query.size} values, dim says {data['dim']}")
            served = data.get("served")
            return cls(id=str(data["id"]), query=query, demo_ids=[str(d) for d in data["demo_ids"]],
                       agreement=float(data["agreement"]), messages=data.get("messages"),
                       target=data.get("target"), correct=data.get("correct"), gold_target=data.get("gold_target"),
                       samples=[ParsedSample(**s) for s in data.get("samples", [])], version=int(data["version"]),
                       inputs=data.get("inputs"), gold_key=data.get("gold_key"),
                       served=None if served is None else Replayed(served["key"], float(served["agreement"]),
                                                                   tuple(served["demo_ids"])))
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ArtefactError(f"evidence record {data.get('id', '?')!r}: missing or malformed {exc}") from None

    def good(self, good_agreement: float) -> bool:
        """Correct, or (correctness unknown) agreed on strongly."""
        return self.correct if self.correct is not None else self.agreement >= good_agreement

    def learn_target(self, good_agreement: float) -> str | None:
        """The completion to train the soft prompt on, if this record offers one."""
        if self.gold_target:
            return self.gold_target
        if self.correct is None and self.agreement >= good_agreement:
            return self.target
        if self.correct:
            return self.target
        return None


@dataclass(frozen=True)
class Verdict:
    """How one part of a candidate state fared on held-out evidence.

    Attributes:
        part: which part was judged (`replay`: the whole candidate, by paired replay).
        measure: what was compared (higher is better).
        before: the serving state's score.
        after: the candidate's score.
        accepted: whether the candidate part is kept.
        reason: the rule's own account (replay).
        stats: the evidence counts, test statistic and p-value (replay).
    """

    part: Literal["soft_prompt", "retrieval", "replay"]
    measure: str
    before: float
    after: float
    accepted: bool
    reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def log(self, part: str | None = None) -> dict[str, Any]:
        """The verdict as a `ReoptimizationEvent` lists it (`part` names it otherwise, e.g. `policy`)."""
        return {"part": part or self.part, "measure": self.measure, "before": self.before, "after": self.after,
                "accepted": self.accepted, "reason": self.reason, "stats": self.stats}

    def describe(self) -> str:
        """One line for the event's reason."""
        if self.part == "replay":
            return f"replay {'accepted' if self.accepted else 'rejected'}: {self.reason}"
        name = "soft prompt" if self.part == "soft_prompt" else "retrieval"
        shown = (-self.before, -self.after) if self.part == "soft_prompt" else (self.before, self.after)
        outcome = "accepted" if self.accepted else "rolled back"
        extra = f"; {self.reason}" if self.reason else ""
        return f"{name} {outcome} ({self.measure} {shown[0]:.3f} -> {shown[1]:.3f}{extra})"
