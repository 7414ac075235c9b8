"""Batched decoding with a shared prefill, per-row soft prompts and per-row sampling settings.

`generate_rows` is the one place where tokens are produced. Each `GenRow` is one
prompt that wants `n` samples. All rows are prefilled together in one forward
pass; every row is prefilled once, however many samples it asks for, and its
key/value cache is then copied `n` times for decoding (on long prompts the
prefill dominates, so this is where batching pays most).

Layout of the prefill batch (left padding)::

    row 0:  [pad pad pad | s s s s | t t t t t]
    row 1:  [pad | s s s s | t t t t t t t t t]
    row 2:  [pad pad pad pad pad pad | t t t t]      (no soft prompt)

The soft prompt `s` sits directly before the row's own tokens `t`, never before
the pads (PEFT issue 1093), and position ids count from the first non-pad
position, so a row decodes the same whatever its batch-mates are.

Example:
    >>> from detot_agent.engines.generation import GenRow
    >>> GenRow(prompt_ids=[1, 2, 3], n=2).n
    2
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from transformers import DynamicCache

__all__ = ["BACKGROUND", "GenOutput", "GenRow", "background_work", "cache_argument", "embed_row", "finish_text",
           "generate_rows", "sample_ranks", "seeded_generators", "split_at", "split_row", "stop_in_tail", "text_seed"]


BACKGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("detot_background", default=False)


@contextlib.contextmanager
def background_work() -> Iterator[None]:
    """Rows built inside are background work (`GenRow.background`): serving goes first.

    Example:
        >>> with background_work():
        ...     BACKGROUND.get()
        True
    """
    token = BACKGROUND.set(True)
    try:
        yield
    finally:
        BACKGROUND.reset(token)


@dataclass
class GenRow:
    """One prompt to decode.

    Attributes:
        prompt_ids: token ids of the rendered prompt.
        soft_prompt: optional `(k, hidden)` tensor placed before the prompt's embeddings.
        n: number of samples to draw from this prompt.
        temperature: 0 means greedy.
        top_p: nucleus sampling mass (None or 1.0: off).
        top_k: keep only the k most likely tokens (None: off).
        max_new_tokens: most tokens to generate per sample.
        stop: strings that end a sample (the string itself is cut from the text).
        seed: makes the samples reproducible; sampled sample i uses seed + i - greedy.
        greedy: how many of the `n` samples (the first ones) are greedy whatever the temperature: a
            greedy answer and sampled ones from one prefill.
        background: background work (a shadow answer, a replay for judging): llama.cpp's continuous scheduler
            admits it only when no request waits, on at most a quarter of the slots (`background_work`).
    """

    prompt_ids: list[int]
    soft_prompt: torch.Tensor | None = None
    n: int = 1
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    greedy: int = 0
    background: bool = False

    @property
    def soft_positions(self) -> int:
        """Positions the soft prompt takes before the row's tokens (0 without one)."""
        return 0 if self.soft_prompt is None else int(self.soft_prompt.shape[0])

    @property
    def positions(self) -> int:
        """Input positions of the row: its soft prompt's, then its tokens'."""
        return self.soft_positions + len(self.prompt_ids)

    def is_greedy(self, j: int) -> bool:
        """Whether sample `j` of this row is greedy."""
        return self.temperature <= 0 or j < self.greedy


@dataclass
class GenOutput:
    """One sample.

    Attributes:
        text: decoded completion (special tokens removed, cut at the first stop string).
        token_ids: generated token ids (including a final end-of-sequence token, if any).
        finish_reason: `stop` (end token or stop string) or `length`.
        logprob: sum of the model's log-probabilities of the generated tokens, under the raw
            distribution (before temperature, top-p and top-k).
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    logprob: float = 0.0


def text_seed(text: str) -> int:
    """A seed derived from the input text (the first 32 bits of its SHA-256): same input, same samples.

    Example:
        >>> text_seed("2 + 3?") == text_seed("2 + 3?") != text_seed("2 + 4?")
        True
    """
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _filtered_scores(logits: torch.Tensor, row: GenRow) -> torch.Tensor:
    """Scores after temperature, top-k and top-p (`-inf` for dropped tokens); logits: (V,)."""
    scores = logits / row.temperature
    if row.top_k is not None and 0 < row.top_k < scores.shape[-1]:
        kth = torch.topk(scores, row.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if row.top_p is not None and row.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= row.top_p  # keep the token that crosses top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    return scores


def _pick(logits: torch.Tensor, row: GenRow, generator: torch.Generator | None, *, greedy: bool = False) -> int:
    """Greedy, or one draw by inverse CDF (a twentieth of `torch.multinomial`'s cost on a 150k vocabulary).

    logits: (V,) float32, on the model's device (only the chosen id leaves it).
    """
    if greedy or row.temperature <= 0:
        return int(torch.argmax(logits))
    cdf = torch.cumsum(torch.softmax(_filtered_scores(logits, row), dim=-1), dim=0)  # (V,)
    u = torch.rand((), generator=generator, device=cdf.device)
    # right=True: the first token whose cumulative mass exceeds u, never a token of zero probability
    return int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=cdf.shape[0] - 1))


def _find_stop(text: str, stops: tuple[str, ...]) -> int:
    cut = -1
    for s in stops:
        i = text.find(s)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return cut


def stop_in_tail(tokenizer: Any, tokens: list[int], stops: tuple[str, ...]) -> bool:
    """Whether a stop string ends in the text of the last few tokens (constant work per step).

    Only the tail that can hold a stop string is decoded (a character is at most 4 bytes and every
    token at least one), so checking costs the same at token 10 and token 1,000; the full text is
    decoded once, at the end, and cut at the first stop string there.
    """
    if not stops:
        return False
    width = 4 * max(len(s) for s in stops) + 4
    return _find_stop(tokenizer.decode(tokens[-width:], skip_special_tokens=True), stops) >= 0


def finish_text(tokenizer: Any, tokens: list[int], stops: tuple[str, ...], eos_ids: set[int],
                finish: str) -> tuple[str, str]:
    """`(text, finish_reason)` of a finished sample: end tokens dropped, cut at the first stop string."""
    text = tokenizer.decode([t for t in tokens if t not in eos_ids], skip_special_tokens=True)
    cut = _find_stop(text, stops)
    return (text[:cut], "stop") if cut >= 0 else (text, finish)


def split_at(row: GenRow, k: int) -> tuple[GenRow, GenRow]:
    """`row`'s first `k` samples and the rest (0 < k < n), each sample keeping its greedy flag and seed.

    Example:
        >>> [(p.n, p.greedy, p.seed) for p in split_at(GenRow([1], n=5, greedy=1, seed=10), 2)]
        [(2, 1, 10), (3, 0, 11)]
    """
    first, *_ = split_row(row, k)
    greedy = max(0, min(row.greedy - k, row.n - k))
    seed = None if row.seed is None else row.seed + k - row.greedy + greedy
    return first, replace(row, n=row.n - k, greedy=greedy, seed=seed)


def split_row(row: GenRow, fit: int) -> list[GenRow]:
    """`row` as parts of at most `fit` samples, in order; each sample keeps its greedy flag and its seed.

    Example:
        >>> [(p.n, p.greedy, p.seed) for p in split_row(GenRow([1], n=5, greedy=1, seed=10), 2)]
        [(2, 1, 10), (2, 0, 11), (1, 0, 13)]
    """
    parts = []
    for start in range(0, row.n, fit):
        n = min(fit, row.n - start)
        greedy = max(0, min(row.greedy - start, n))
        seed = None if row.seed is None else row.seed + start - row.greedy + greedy
        parts.append(replace(row, n=n, greedy=greedy, seed=seed))
    return parts


def seeded_generators(rows: list[GenRow], device: torch.device | str) -> list[torch.Generator | None]:
    """One generator per sequence (sampled sample j of a seeded row uses seed + j - greedy), on the device."""
    out: list[torch.Generator | None] = []
    for row in rows:
        for j in range(row.n):
            if row.seed is not None and not row.is_greedy(j):
                g = torch.Generator(device=device)
                g.manual_seed(row.seed + j - row.greedy)
                out.append(g)
            else:
                out.append(None)
    return out


def sample_ranks(rows: list[GenRow]) -> list[int]:
    """Each sequence's index among its row's samples (sequences in row order)."""
    return [j for row in rows for j in range(row.n)]


def embed_row(embed: torch.nn.Module, row: GenRow, *, device: torch.device | str, dtype: torch.dtype
              ) -> torch.Tensor:
    """The row's input embeddings: its soft prompt, then its token embeddings. Shape `(k + T, hidden)`.

    This is what the model's first layer sees for the row (before padding). `VLLMEngine` sends the
    same tensor to vLLM as `prompt_embeds`.

    Example:
        >>> import torch
        >>> embed = torch.nn.Embedding(10, 4)
        >>> row = GenRow(prompt_ids=[1, 2, 3], soft_prompt=torch.zeros(2, 4))
        >>> tuple(embed_row(embed, row, device="cpu", dtype=torch.float32).shape)
        (5, 4)
    """
    with torch.inference_mode():
        ids = torch.tensor(row.prompt_ids, dtype=torch.long, device=device)
        tok = embed(ids).to(dtype)  # (T, H)
        if row.soft_prompt is not None:
            tok = torch.cat([row.soft_prompt.to(device=device, dtype=dtype), tok], dim=0)  # (k+T, H)
        return tok


def cache_argument(model: Any) -> str:
    """The forward's name for the key/value cache: `cache` (recent transformers 5.x) or `past_key_values` (earlier).

    Example:
        >>> class Old:
        ...     def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...
        >>> cache_argument(Old())
        'past_key_values'
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate_rows(model, tokenizer, rows: list[GenRow], *, eos_ids: set[int]) -> list[list[GenOutput]]:
    """Decode every row; returns, per row, its `n` samples in order.

    Args:
        model: a frozen Hugging Face causal LM.
        tokenizer: its tokenizer (for decoding and stop strings).
        rows: prompts to decode together.
        eos_ids: token ids that end a sample.
    """
    if not rows:
        return []
    device = model.device
    embed = model.get_input_embeddings()
    dtype = embed.weight.dtype

    # ---- prefill: one forward over all distinct prompts, left padded
    seqs = [embed_row(embed, row, device=device, dtype=dtype) for row in rows]
    B, L, H = len(rows), max(s.shape[0] for s in seqs), seqs[0].shape[1]
    inputs = torch.zeros(B, L, H, dtype=dtype, device=device)  # (B, L, H)
    mask = torch.zeros(B, L, dtype=torch.long, device=device)  # (B, L)
    for i, seq in enumerate(seqs):
        inputs[i, L - seq.shape[0] :] = seq
        mask[i, L - seq.shape[0] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    cache = DynamicCache()  # filled in place by every forward below
    cache_kw = {cache_argument(model): cache}
    out = model(
        inputs_embeds=inputs,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **cache_kw,
    )
    logits = out.logits[:, -1, :].float()  # (B, V)

    # ---- fan out: sample j of row i gets a copy of row i's cache
    owner = [i for i, row in enumerate(rows) for _ in range(row.n)]  # sequence -> row
    index = torch.tensor(owner, dtype=torch.long, device=device)
    if len(owner) != B or owner != list(range(B)):
        cache.reorder_cache(cast(torch.LongTensor, index))
        logits, mask = logits[index], mask[index]
    next_pos = positions[index, -1] + 1  # (S,)
    generators = seeded_generators(rows, device)
    rank = sample_ranks(rows)

    S = len(owner)
    tokens: list[list[int]] = [[] for _ in range(S)]
    logprob = [0.0] * S
    finish = ["length"] * S
    active = list(range(S))  # sequence ids still decoding; row k of the cache is active[k]
    while active:
        # sampling stays on the model's device: only the chosen ids and their log-probs leave it
        picked = torch.tensor([_pick(logits[k], rows[owner[s]], generators[s], greedy=rows[owner[s]].is_greedy(rank[s]))
                               for k, s in enumerate(active)], dtype=torch.long, device=device)  # (A,)
        logp = torch.log_softmax(logits, dim=-1).gather(1, picked.unsqueeze(1)).squeeze(1)  # (A,)
        chosen: list[int] = []
        still: list[int] = []
        for k, (s, tok, lp) in enumerate(zip(active, picked.tolist(), logp.tolist(), strict=True)):
            row = rows[owner[s]]
            logprob[s] += lp
            tokens[s].append(tok)
            done = False
            if tok in eos_ids or stop_in_tail(tokenizer, tokens[s], row.stop):
                finish[s], done = "stop", True
            elif len(tokens[s]) >= row.max_new_tokens:
                done = True
            if not done:
                still.append(k)
                chosen.append(tok)
        if not still:
            break
        if len(still) != len(active):
            keep = torch.tensor(still, dtype=torch.long, device=device)
            cache.reorder_cache(cast(torch.LongTensor, keep))
            mask, next_pos = mask[keep], next_pos[keep]
            active = [active[k] for k in still]
        step_ids = torch.tensor(chosen, dtype=torch.long, device=device).unsqueeze(1)  # (A, 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (A, L+t)
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=next_pos.unsqueeze(1),
            use_cache=True,
            **cache_kw,
        )
        logits = out.logits[:, -1, :].float()  # (A, V)
        next_pos = next_pos + 1

    results: list[list[GenOutput]] = [[] for _ in rows]
    for s in range(S):
        text, reason = finish_text(tokenizer, tokens[s], rows[owner[s]].stop, eos_ids, finish[s])
        results[owner[s]].append(GenOutput(text, tokens[s], reason, logprob[s]))
    return results
