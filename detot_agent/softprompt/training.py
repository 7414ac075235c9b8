"""Training a task's soft prompt with the model frozen.

The loss is the NLL of the target completion given `[soft prompt; prompt]`,
counted on target tokens only. Regularisation, as in DETOT section 3.3:
dropout on the soft-prompt vectors during training, an L2 pull towards the
initial vectors, gradient clipping, and early stopping on a validation loss
(the best vectors seen are kept).

Batches are right-padded: `[soft | prompt | target | pad ...]`. The soft prompt
starts every row at position 0, exactly as at inference (where left pads come
before it and positions count from it), so what is learned is what is served.

Example:
    >>> from detot_agent.softprompt.training import TuneExample
    >>> TuneExample(prompt="2+3?", target="2 + 3 = 5. The answer is 5.").target[-2:]
    '5.'
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from detot_agent.config import StrictModel
from detot_agent.errors import ConfigError, DetotError
from detot_agent.softprompt.prompt import SoftPrompt

__all__ = ["TuneConfig", "TuneExample", "TuneReport", "target_nll", "tune"]


class TuneExample(StrictModel):
    """One training pair: the prompt and the completion to learn.

    The prompt is either `prompt` (a user message, with optional `system` text) or `messages`
    (chat messages with `role` and `content`, as a DSPy adapter formats them, demos included).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = ""
    target: str = Field(min_length=1)
    system: str | None = None
    messages: list[dict[str, str]] | None = None

    @model_validator(mode="after")
    def _has_prompt(self) -> TuneExample:
        if not self.messages and not self.prompt.strip():
            raise ConfigError("a TuneExample needs a non-empty prompt or messages")
        return self


class TuneConfig(StrictModel):
    """Training settings (validated; unknown keys are errors).

    Exactly one of `steps` / `epochs` decides the length (default 100 steps).
    """

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    batch_size: int = Field(default=4, ge=1)
    l2_to_init: float = Field(default=0.01, ge=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    patience: int = Field(default=3, ge=1)
    eval_every: int = Field(default=10, ge=1)
    seed: int = 0
    max_length: int = Field(default=768, ge=8)


class TuneReport(BaseModel):
    """What a training run did."""

    steps_run: int
    train_loss: list[float]
    val_loss: list[tuple[int, float]]
    initial_val_loss: float | None
    best_step: int
    best_val_loss: float | None
    stopped_early: bool
    seconds: float
    seconds_per_step: float
    examples: int
    accepted: bool


def _encode(engine: Any, ex: TuneExample, max_length: int) -> tuple[list[int], list[int]]:
    messages = ex.messages or (([{"role": "system", "content": ex.system}] if ex.system else []) + [
        {"role": "user", "content": ex.prompt}])
    prompt_ids = engine.render_messages(messages)
    eos = engine.tokenizer.eos_token_id
    target_ids = engine.tokenizer(ex.target, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    room = max_length - len(target_ids)
    if room < 1:
        target_ids = target_ids[: max_length - 1]
        room = 1
    return prompt_ids[-room:], target_ids


def _batch_loss(model: Any, soft: torch.Tensor, batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Mean NLL of target tokens given [soft; prompt]; `soft` is `(k, H)` shared by every row, or
    `(B, k, H)` one per row (a dynamic prompt), in the model's dtype."""
    embed = model.get_input_embeddings()
    device = soft.device
    k = soft.shape[-2]
    if soft.dim() == 3 and soft.shape[0] != len(batch):
        raise DetotError(f"{soft.shape[0]} soft prompts for a batch of {len(batch)} examples")
    lengths = [k + len(p) + len(t) for p, t in batch]
    L = max(lengths)
    rows, labels, mask = [], torch.full((len(batch), L), -100, dtype=torch.long, device=device), \
        torch.zeros(len(batch), L, dtype=torch.long, device=device)
    for i, (p, t) in enumerate(batch):
        ids = torch.tensor(p + t, dtype=torch.long, device=device)
        with torch.no_grad():
            tok = embed(ids)  # (T, H)
        row = torch.cat([soft if soft.dim() == 2 else soft[i], tok], dim=0)  # (k+T, H)
        pad = torch.zeros(L - row.shape[0], row.shape[1], dtype=row.dtype, device=device)
        rows.append(torch.cat([row, pad], dim=0))
        labels[i, k + len(p): k + len(p) + len(t)] = torch.tensor(t, device=device)
        mask[i, : lengths[i]] = 1
    inputs = torch.stack(rows)  # (B, L, H)
    logits = model(inputs_embeds=inputs, attention_mask=mask).logits.float()  # (B, L, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def target_nll(engine: Any, vectors: torch.Tensor | None, examples: Sequence[TuneExample], *,
               batch_size: int = 4, max_length: int = 768) -> float:
    """Mean NLL of the examples' targets given [vectors; prompt].

    `vectors`: `(k, H)` for every example, `(N, k, H)` one per example (a dynamic prompt), or None
    (no soft prompt).
    """
    model = engine.model
    emb = model.get_input_embeddings().weight
    soft = (vectors if vectors is not None else torch.zeros(0, emb.shape[1])).to(device=emb.device, dtype=emb.dtype)
    encoded = [_encode(engine, ex, max_length) for ex in examples]
    if not encoded:
        raise DetotError("target_nll needs at least one example")
    if soft.dim() == 3 and soft.shape[0] != len(encoded):
        raise DetotError(f"{soft.shape[0]} soft prompts for {len(encoded)} examples")
    return _mean_nll(model, soft, encoded, batch_size)


def _mean_nll(model: Any, soft: torch.Tensor, encoded: list[tuple[list[int], list[int]]], batch_size: int) -> float:
    """Example-weighted mean of `_batch_loss` over `encoded`, without gradients (`soft` as in `_batch_loss`,
    `(N, k, H)` covering all of `encoded`)."""
    def part(i: int) -> torch.Tensor:
        return soft if soft.dim() == 2 else soft[i:i + batch_size]

    with torch.no_grad():
        total = sum(float(_batch_loss(model, part(i), encoded[i:i + batch_size])) * len(encoded[i:i + batch_size])
                    for i in range(0, len(encoded), batch_size))
    return total / len(encoded)


def tune(
    soft_prompt: SoftPrompt,
    engine: Any,
    examples: Sequence[TuneExample],
    *,
    val_examples: Sequence[TuneExample] = (),
    config: TuneConfig | None = None,
    progress: bool = True,
    **overrides: Any,
) -> TuneReport:
    """Train `soft_prompt` in place on `examples` with `engine`'s model frozen.

    Args:
        soft_prompt: the vectors to train (its `init_vectors` anchor the L2 pull).
        engine: a `LocalEngine`; its model is never modified (checked).
        examples: training pairs.
        val_examples: held-out pairs for early stopping; without them the last step's vectors are kept.
        config: `TuneConfig`; keyword overrides (steps, epochs, lr, batch_size, l2_to_init, dropout,
            max_grad_norm, patience, eval_every, seed) win over it.
        progress: show a progress bar.

    Returns:
        The report. The soft prompt takes the best vectors and a new version only if training
        did not make the validation loss worse (`report.accepted`).
    """
    from tqdm.auto import tqdm

    base = config.model_dump() if config else {}
    try:
        cfg = TuneConfig(**{**base, **overrides})
    except Exception as exc:
        raise ConfigError(str(exc)) from None
    if not examples:
        raise DetotError("tune() needs at least one training example")
    if soft_prompt.hidden_size != engine.hidden_size:
        raise DetotError(f"soft prompt width {soft_prompt.hidden_size} differs from the model's hidden size "
                         f"{engine.hidden_size}")
    model = engine.model
    params = list(model.parameters())
    if any(p.requires_grad for p in params):
        raise DetotError("the engine's model must be frozen (requires_grad False) before tuning")
    device, dtype = model.get_input_embeddings().weight.device, model.get_input_embeddings().weight.dtype
    train = [_encode(engine, ex, cfg.max_length) for ex in examples]
    val = [_encode(engine, ex, cfg.max_length) for ex in val_examples]
    steps = cfg.steps or (math.ceil(cfg.epochs * len(train) / cfg.batch_size) if cfg.epochs else 100)

    init = soft_prompt.init_vectors.to(device)
    soft = torch.nn.Parameter(soft_prompt.vectors.clone().to(device))  # float32 master copy
    opt = torch.optim.AdamW([soft], lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    was_training = model.training
    model.eval()  # the model's own dropout stays off; only the soft prompt gets dropout

    def val_loss(vectors: torch.Tensor) -> float | None:
        return _mean_nll(model, vectors.to(dtype), val, cfg.batch_size) if val else None

    start = time.perf_counter()
    initial_val = val_loss(soft.detach())
    best_val, best_step, best = initial_val, 0, soft.detach().clone()
    train_curve: list[float] = []
    val_curve: list[tuple[int, float]] = []
    bad_evals, stopped = 0, False
    order: list[int] = []
    bar = tqdm(total=steps, desc=f"tuning {soft_prompt.task}", disable=not progress, unit="step")
    step = 0
    try:
        for step in range(1, steps + 1):
            if len(order) < cfg.batch_size:
                order += rng.sample(range(len(train)), len(train))
            batch = [train[order.pop()] for _ in range(min(cfg.batch_size, len(train)))]
            dropped = F.dropout(soft, p=cfg.dropout, training=cfg.dropout > 0)  # (k, H)
            loss = _batch_loss(model, dropped.to(dtype), batch)
            pull = ((soft - init) ** 2).sum(dim=1).mean()
            total = loss + cfg.l2_to_init * pull
            opt.zero_grad()
            total.backward()
            if any(p.grad is not None for p in params):
                raise DetotError("a model parameter received a gradient: the base model must stay frozen")
            torch.nn.utils.clip_grad_norm_([soft], cfg.max_grad_norm)
            opt.step()
            value = float(loss.detach())
            train_curve.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
            if val and (step % cfg.eval_every == 0 or step == steps):
                v = val_loss(soft.detach())
                assert v is not None
                val_curve.append((step, v))
                if best_val is None or v < best_val:
                    best_val, best_step, best, bad_evals = v, step, soft.detach().clone(), 0
                else:
                    bad_evals += 1
                    if bad_evals >= cfg.patience:
                        stopped = True
                        break
    finally:
        bar.close()
        model.train(was_training)
    if not val:
        best, best_step = soft.detach().clone(), step
    if not torch.isfinite(best).all():
        raise DetotError("training produced non-finite soft-prompt values; lower lr or raise max_grad_norm")
    accepted = best_step > 0 and (initial_val is None or (best_val is not None and best_val <= initial_val))
    seconds = time.perf_counter() - start
    report = TuneReport(
        steps_run=step, train_loss=train_curve, val_loss=val_curve, initial_val_loss=initial_val,
        best_step=best_step, best_val_loss=best_val, stopped_early=stopped, seconds=seconds,
        seconds_per_step=seconds / max(step, 1), examples=len(train), accepted=accepted,
    )
    if accepted:
        soft_prompt.vectors = best.float().cpu()
        soft_prompt.version += 1
        soft_prompt.report = report.model_dump()
    return report
