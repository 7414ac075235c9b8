"""Settings of the engines: where the model runs, in what dtype, how requests are batched.

Example:
    >>> EngineConfig(max_batch_size=8).max_batch_size
    8
    >>> EngineConfig(max_batch_size=0)
    Traceback (most recent call last):
    ...
    detot_agent.errors.ConfigError: invalid EngineConfig:
      max_batch_size: Input should be greater than or equal to 1 (got 0)
"""

from __future__ import annotations

from enum import Enum

from pydantic import Field

from detot_agent.config import StrictModel

__all__ = ["DType", "Device", "EngineConfig", "ExtraBuffers", "Overflow", "PrefixMatch", "Scheduler"]


class Device(str, Enum):
    """Where the model runs. `auto` picks CUDA when present, else the CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


class DType(str, Enum):
    """Floating-point type of the model weights. `auto`: float32 (batch-invariant greedy answers; README)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Overflow(str, Enum):
    """What the engine does with a prompt longer than the model's context.

    `error` refuses it (`ContextLengthError`). `truncate_middle` keeps the first quarter and the
    last three quarters of the token budget and drops the middle, so the instructions at the
    start and the question and answer cue at the end survive; the budget is the context minus
    the soft prompt minus the requested new tokens (at most half the context).
    """

    ERROR = "error"
    TRUNCATE_MIDDLE = "truncate_middle"


class ExtraBuffers(str, Enum):
    """Whether llama.cpp may put weights in its extra CPU buffer types (weight repacking, AMX).

    `auto` (default): read `$DETOT_LLAMACPP_EXTRA_BUFFERS` if set, else off where llama.cpp reports
    AMX (its AMX buffers segfault at the first decode, ggml-org/llama.cpp#20824) and on elsewhere
    (repacking speeds up prompt processing). `on` and `off` decide outright.
    """

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Scheduler(str, Enum):
    """How the local engines' batches are formed. `continuous` (default): rows join and leave the running batch
    at every decode step, and prompts already computed are reused from the prefix cache (`engines/continuous.py`;
    backends `llamacpp_scheduler.py` and `torch_scheduler.py`). `static`: a batch is gathered, decoded to its
    longest sequence, then the next is formed (`engines/batching.py`). vLLM schedules its own batches."""

    CONTINUOUS = "continuous"
    STATIC = "static"


class PrefixMatch(str, Enum):
    """Which cached prompts a new one may reuse. `prefix` (default): the cached prompt sharing the longest prefix
    of at least 16 tokens (only the rest is computed). `exact`: only an identical input (soft prompt and tokens),
    so a prompt is always computed in one piece: on quantized llama.cpp models, where prefilling a prompt in two
    pieces moves the logits (`evals/scripts/prefill_chunks.py`), this keeps greedy replies those of the static
    scheduler, at the cost of recomputing shared prefixes (DETOT's later rounds still hit)."""

    PREFIX = "prefix"
    EXACT = "exact"


class EngineConfig(StrictModel):
    """Settings of `LocalEngine`.

    Attributes:
        model: a local Hugging Face folder, a `.gguf` file, or a hub id (only where a
            hub is reachable). None means the embedded default model.
        device: `auto`, `cpu`, `cuda` or `mps`.
        dtype: weight dtype; `auto` is float32 on every device (in bfloat16 a greedy answer depends on its
            batch-mates, measured on CPU and CUDA); `bfloat16` halves memory for large models.
        dynamic_batching: gather concurrent `complete` calls into one batch.
        max_batch_size: most sequences (rows x samples) decoded together.
        max_wait_ms: how long the batcher waits for more requests after the first.
        default_max_tokens: new tokens when a request does not say.
        attn_implementation: passed to transformers (`sdpa`, `eager`, ...); None keeps its default.
        overflow: prompts longer than the context: `error` (default) or `truncate_middle` (see `Overflow`).
        n_ctx: (llama.cpp) KV cells of each sequence, the most positions (soft prompt + prompt + completion)
            one request may take; 0 is the model's training context. The cache holds `max_batch_size` such
            streams (Qwen2.5-0.5B: about 12 KB a cell, so 16 x 2048 cells is 400 MB).
        n_threads: (llama.cpp) CPU threads; None is the CPUs this process may use.
        extra_buffers: (llama.cpp) `auto`, `on` or `off`: may the weights go into llama.cpp's extra CPU
            buffer types (repacked, AMX)? `auto` is off on CPUs where llama.cpp reports AMX (it crashes
            there) and on elsewhere; see `ExtraBuffers` and `engines/llamacpp_load.py`.
        scheduler: (llama.cpp, torch) `continuous` or `static` batching (see `Scheduler`); with `continuous`,
            `max_batch_size` is the most sequences running at once and `max_wait_ms` how long an idle
            scheduler waits for company after the first request.
        prefix_cache: (continuous) prompts whose KV is kept for reuse, least recently used evicted first
            (0: no cache); on llama.cpp each takes one more stream of `n_ctx` cells, on torch the prompt's own
            key/values (`batch_stats["prefix_bytes"]`).
        prefix_cache_mb: (torch, continuous) the most megabytes (10**6 bytes) of key/values the prefix cache
            holds, least recently used evicted first; None: bounded by `prefix_cache` prompts only. llama.cpp's
            cached prompts live in `prefix_cache` reserved streams of `n_ctx` cells, sized when its context is
            made: the llama.cpp engine refuses this setting.
        prefix_match: (continuous) `prefix` or `exact`: which cached prompts a new one may reuse (`PrefixMatch`).
        background_patience: (continuous) serving first: background rows (shadow answers, replays:
            `generation.background_work`) start only in a lull (no serving row waiting or running for
            `continuous.LULL_S`, 0.5 s), and on llama.cpp a running one holds (decodes nothing, keeps its KV)
            while serving rows decode; once a background row has waited this many seconds since it was submitted
            it runs beside them (on at most a quarter of the slots), so a saturated service still gets its
            background work done. None: never beside serving rows; 0: always (the rule of 0.4.0.dev0 before
            this change).
        background_share: (continuous, llama.cpp) once a running background row's patience is spent, the share
            of the serving rows' decode steps it decodes in (holding in the others), so that a saturated
            service slows by about this share of a background row's cost per step, not all of it. 1: every
            step (the rule before this setting). The torch backend decodes all its running rows together, so
            there a due row decodes every step.
    """

    model: str | None = None
    device: Device = Device.AUTO
    dtype: DType = DType.AUTO
    dynamic_batching: bool = True
    max_batch_size: int = Field(default=16, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=10_000.0)
    default_max_tokens: int = Field(default=512, ge=1)
    attn_implementation: str | None = None
    overflow: Overflow = Overflow.ERROR
    n_ctx: int = Field(default=2048, ge=0)
    n_threads: int | None = Field(default=None, ge=1)
    extra_buffers: ExtraBuffers = ExtraBuffers.AUTO
    scheduler: Scheduler = Scheduler.CONTINUOUS
    prefix_cache: int = Field(default=8, ge=0, le=64)
    prefix_cache_mb: float | None = Field(default=None, gt=0)
    prefix_match: PrefixMatch = PrefixMatch.PREFIX
    background_patience: float | None = Field(default=30.0, ge=0)
    background_share: float = Field(default=0.1, gt=0, le=1)

    @property
    def continuous(self) -> bool:
        """Whether rows are scheduled continuously: `scheduler="continuous"` with dynamic batching on."""
        return self.scheduler is Scheduler.CONTINUOUS and self.dynamic_batching
