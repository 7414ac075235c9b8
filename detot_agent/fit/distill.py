"""Self-distillation (rejection-sampling fine-tuning, STaR) for the task embedding's soft prompt, and its gold twin.

`draw_chains` samples a training problem under a prompt at the serving temperature (fixed budget, no greedy
draw, the served context: demos and adapter as DETOT shows them) and keeps the distinct chains the filter
accepts: the metric (labelled tasks) or agreement with the vote (label-free). `chain_items` and `gold_items`
turn chains or the trainset's own rationales into `TrainingItem`s for `TaskEmbedding.update`, the one
training loop, each chain after the messages it was sampled with.

Example:
    >>> record = draw_chains(program, example, metric, cfg)                       # doctest: +SKIP
    >>> record["drawn"], len(record["kept"])                                       # doctest: +SKIP
    (4, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dspy

from detot_agent.detot.module import DETOT
from detot_agent.detot.steps import run_steps
from detot_agent.detot.task import StoppingRule
from detot_agent.embedding.update_config import TrainingItem
from detot_agent.errors import ConfigError, FitError
from detot_agent.fit.config import FitConfig
from detot_agent.softprompt.loss import TuneExample

__all__ = ["accepted", "chain_items", "draw_chains", "gold_items", "gold_target", "inputs_of",
           "sampler"]

Metric = Callable[..., Any]


def inputs_of(program: DETOT, example: dspy.Example) -> dict[str, Any]:
    """The program's input fields of `example` (KeyError-free: `ConfigError` names the missing field)."""
    names = list(program._signature().input_fields)
    missing = [n for n in names if n not in example]
    if missing:
        raise ConfigError(f"a training or validation example lacks the input field(s) {missing} of the DETOT's "
                          f"signature (it has {sorted(example.keys())})")
    return {n: example[n] for n in names}


def accepted(metric: Metric, example: dspy.Example, fields: dict[str, Any], threshold: float) -> bool:
    """Whether the metric accepts `fields` as the prediction for `example` (a raise is a `FitError`)."""
    try:
        score = metric(example, dspy.Prediction(**fields))
    except Exception as exc:
        raise FitError(f"the metric raised on a prediction ({type(exc).__name__}: {exc}); fix the metric") from exc
    return bool(score) if isinstance(score, bool) else float(score) >= threshold


def sampler(copied: DETOT, cfg: FitConfig) -> DETOT:
    """`copied` (a copy the caller made, e.g. by `configure.configured`) set to draw `cfg.samples_per_problem`
    tempered samples per problem in one round; returned for chaining."""
    n = cfg.samples_per_problem
    copied.adjustments = copied.adjustments.model_copy(update={
        "min_samples": n, "max_samples": n, "round_size": n, "stopping": StoppingRule.FIXED, "greedy_first": False})
    return copied


def draw_chains(drawer: DETOT, example: dspy.Example, metric: Metric | None, cfg: FitConfig) -> dict[str, Any]:
    """Sample one problem with a `sampler` copy, `drawer` (its serving prompt, the serving temperature) and keep the
    accepted chains.

    Returns a JSON-able record: `drawn`, `kept` (at most `chains_per_problem` distinct chains, each with its
    `text` and the `messages` it was sampled after), `accepted` (before the cap) and `agreement`.
    """
    inputs = inputs_of(drawer, example)
    text = drawer._input_text(inputs)
    with dspy.context(disable_history=True, trace=None):  # sampling for training is not a user's call
        _, _, messages, samples, result, drawn = run_steps(drawer._answer(drawer.controller.state, inputs, text,
                                                                           drawer._lm(), record=False))
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    n_ok = 0
    for s in samples:
        if s.fields is None or s.key is None or not s.text.strip():
            continue
        if cfg.filter == "metric":
            assert metric is not None
            ok = accepted(metric, example, s.fields, cfg.metric_threshold)
        else:
            ok = s.key == result.winner and result.agreement >= cfg.min_agreement
        n_ok += ok
        body = " ".join(s.text.split())
        if ok and body not in seen and len(kept) < cfg.chains_per_problem:
            seen.add(body)
            kept.append({"text": s.text, "messages": messages.get(s.strategy) or next(iter(messages.values()))})
    return {"drawn": drawn, "accepted": n_ok, "agreement": result.agreement, "kept": kept,
            "text": text}


def chain_items(program: DETOT, records: Sequence[dict[str, Any]]) -> list[TrainingItem]:
    """One `TrainingItem` per kept chain: the input's encoding and the chain after its messages."""
    texts = [r["text"] for r in records if r["kept"]]
    if not texts:
        return []
    queries = program.encoder.encode(texts)  # (N, dim)
    out = []
    for q, r in zip(queries, (r for r in records if r["kept"]), strict=True):
        out += [TrainingItem(query=q, example=TuneExample(messages=c["messages"], target=c["text"])) for c in r["kept"]]
    return out


def gold_target(program: DETOT, example: dspy.Example) -> str | None:
    """The trainset's own worked answer for `example` in the adapter's reply format (None: no rationale)."""
    rationale = example.get("rationale") or example.get("reasoning")
    answer = example.get(program.answer_field)
    if not rationale or answer is None:
        return None
    sig = program._signature()
    fields = {"reasoning": str(rationale), program.answer_field: answer}
    return str(program.active_adapter().format_assistant_message_content(sig, fields)).strip()


def gold_items(program: DETOT, examples: Sequence[dspy.Example]) -> list[TrainingItem]:
    """One `TrainingItem` per example with a rationale: its served messages, then the gold reply."""
    pairs = [(e, t) for e in examples if (t := gold_target(program, e))]
    if not pairs:
        return []
    texts = [program._input_text(inputs_of(program, e)) for e, _ in pairs]
    queries = program.encoder.encode(texts)
    return [TrainingItem(query=q, example=TuneExample(messages=program.prompt(**inputs_of(program, e)), target=t))
            for q, (e, t) in zip(queries, pairs, strict=True)]
