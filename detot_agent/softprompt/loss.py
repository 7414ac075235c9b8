"""The soft-prompt training loss, shared by every trainer: the NLL of a target completion given
`[soft prompt; prompt]` through a frozen model, counted on target tokens only.

Batches are right-padded: `[soft | prompt | target | pad ...]`. The soft prompt starts every row at
position 0, exactly as at inference (where left pads come before it and positions count from it), so
what is learned is what is served. `embedding/update.py` (the one training loop) and the loop's judging
(`detot/judging.py`) read it from here.

Example:
    >>> TuneExample(prompt="2+3?", target="2 + 3 = 5. The answer is 5.").target[-2:]
    '5.'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator

from detot_agent.config import StrictModel
from detot_agent.errors import ConfigError, DetotError

__all__ = ["TuneExample", "batch_loss", "encode_example", "mean_nll", "target_nll"]


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


def encode_example(engine: Any, ex: TuneExample, max_length: int) -> tuple[list[int], list[int]]:
    """`(prompt ids, target ids)` of a pair through the engine's chat template, the target ended by EOS; the
    prompt is cut from the left so both fit `max_length`."""
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


def batch_loss(model: Any, soft: torch.Tensor, batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
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
    encoded = [encode_example(engine, ex, max_length) for ex in examples]
    if not encoded:
        raise DetotError("target_nll needs at least one example")
    if soft.dim() == 3 and soft.shape[0] != len(encoded):
        raise DetotError(f"{soft.shape[0]} soft prompts for {len(encoded)} examples")
    return mean_nll(model, soft, encoded, batch_size)


def mean_nll(model: Any, soft: torch.Tensor, encoded: list[tuple[list[int], list[int]]], batch_size: int) -> float:
    """Example-weighted mean of `batch_loss` over `encoded`, without gradients (`soft` as in `batch_loss`,
    `(N, k, H)` covering all of `encoded`)."""
    def part(i: int) -> torch.Tensor:
        return soft if soft.dim() == 2 else soft[i:i + batch_size]

    with torch.no_grad():
        total = sum(float(batch_loss(model, part(i), encoded[i:i + batch_size])) * len(encoded[i:i + batch_size])
                    for i in range(0, len(encoded), batch_size))
    return total / len(encoded)
