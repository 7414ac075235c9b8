"""`VLLMEngine`: the same DSPy engine contract as `LocalEngine`, decoded by vLLM on GPUs.

vLLM takes soft prompts as input embeddings: `LLM(model, enable_prompt_embeds=True)`, then
`generate({"prompt_embeds": tensor})` with a `(positions, hidden)` tensor. This engine renders a DSPy
request exactly as `LocalEngine` does (`RequestBuilder.build_row`: chat template, soft prompt named in
the request metadata or passed in, budget checks), then embeds the row with `generation.embed_row`,
the function `LocalEngine`'s own prefill uses. So the tensor sent to vLLM is, bit for bit, what the
local engine feeds its first layer for the same request (tested in `tests/engines/test_vllm_engine.py`).

Only the model's input-embedding matrix is loaded on the host (read from the checkpoint's
safetensors where it can be found, else from the whole model); vLLM holds the weights on the GPUs.
Concurrent `complete` calls from DSPy threads are gathered by the same `DynamicBatcher` into one
`LLM.generate` call (vLLM then schedules them with continuous batching).

Differences from `LocalEngine`: sampling is vLLM's (the same seed gives other samples than the local
engine), and soft prompts cannot be *trained* through vLLM (no gradients): train them with
`detot tune` on the local engine, then serve them here.

`vllm` is an optional extra (`pip install 'detot-agent[vllm]'`, Linux with a CUDA GPU); this module
imports it only when the engine first generates.

Example:
    >>> from detot_agent.engines.vllm_engine import vllm_lm
    >>> lm = vllm_lm("Qwen/Qwen2.5-0.5B-Instruct", gpu_memory_utilization=0.8)  # doctest: +SKIP
    >>> import dspy; dspy.configure(lm=lm)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from dspy.lm15 import Request

from detot_agent.config import build
from detot_agent.engines.base import AsyncEngine, BatchedEngine
from detot_agent.engines.batching import DynamicBatcher
from detot_agent.engines.config import EngineConfig
from detot_agent.engines.generation import GenOutput, GenRow, embed_row
from detot_agent.engines.models import ModelSource, load_model, pick_dtype, resolve_model_source
from detot_agent.errors import ConfigError
from detot_agent.softprompt.registry import SoftPromptRegistry

__all__ = ["AsyncVLLMEngine", "VLLMEngine", "load_input_embeddings", "vllm_lm"]


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise ConfigError("the vLLM engine needs vLLM on a CUDA machine: pip install 'detot-agent[vllm]'; "
                          "on CPU use the local engine (the default)") from None
    return vllm


def _embedding_from_safetensors(folder: Path, dtype: torch.dtype) -> tuple[torch.Tensor, Any] | None:
    """(input-embedding weight, HF config) read from the checkpoint alone, or None when not found."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    weight = skeleton.get_input_embeddings().weight
    name = next((n for n, p in skeleton.named_parameters() if p is weight), None)
    if name is None:
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        file = json.loads(index.read_text()).get("weight_map", {}).get(name)
        files = [folder / file] if file else []
    else:
        files = [folder / "model.safetensors"]
    for path in files:
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if name in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    return f.get_tensor(name).to(dtype), config
    return None


def load_input_embeddings(source: ModelSource, *, dtype: torch.dtype) -> tuple[Any, torch.Tensor, int]:
    """(tokenizer, input-embedding weight `(V, H)` on CPU, context length) of a model.

    Reads only the embedding tensor from a safetensors checkpoint when it can; GGUF files and other
    layouts load the whole model once on CPU, copy its embedding matrix and free the rest (the model is
    not kept in the process's model cache: vLLM holds its own copy).
    """
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.kind != "hub":
        kwargs["local_files_only"] = True
    tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    found = None
    if source.kind == "folder":
        found = _embedding_from_safetensors(Path(source.location), dtype)
    elif source.kind == "hub":  # the same snapshot vLLM reads: nothing is fetched twice
        from huggingface_hub import snapshot_download

        folder = snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors"])
        found = _embedding_from_safetensors(Path(folder), dtype)
    if found is not None:
        weight, config = found
    else:
        loaded = load_model(source, device=torch.device("cpu"), dtype=dtype, cache=False)  # not kept
        weight, config = loaded.model.get_input_embeddings().weight.detach().clone(), loaded.model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    return tokenizer, weight, int(context)


class VLLMEngine(BatchedEngine):
    """A vLLM-served model behind DSPy's engine contract, soft prompts sent as `prompt_embeds`.

    Args:
        model: HF folder or hub id (what `vllm.LLM(model=...)` takes); GGUF as far as vLLM supports it.
        registry: soft-prompt registry (tasks' soft prompts, named through request metadata).
        llm: an existing `vllm.LLM` built with `enable_prompt_embeds=True` (default: built on first use).
        dtype: dtype of the embeddings sent (should match vLLM's model dtype; `auto`: bfloat16).
        max_model_len: context length (default: the model config's).
        max_batch_size: most rows gathered into one `generate` call.
        max_wait_ms: how long the batcher waits for more requests after the first.
        default_max_tokens: new tokens when a request does not say.
        overflow: `error` or `truncate_middle`, as for `LocalEngine`.
        sampling_params: factory of per-request sampling settings (default `vllm.SamplingParams`).
        **llm_kwargs: passed to `vllm.LLM` (tensor_parallel_size, gpu_memory_utilization, ...).

    Example:
        >>> engine = VLLMEngine("Qwen/Qwen2.5-0.5B-Instruct")  # doctest: +SKIP
        >>> engine.prompt_embeds(request).shape  # doctest: +SKIP
        torch.Size([31, 896])
    """

    id_prefix = "vllm"

    def __init__(self, model: str, *, registry: SoftPromptRegistry | None = None, llm: Any = None,
                 dtype: str = "auto", max_model_len: int | None = None, max_batch_size: int = 256,
                 max_wait_ms: float = 5.0, default_max_tokens: int = 512, overflow: str = "error",
                 sampling_params: Any = None, **llm_kwargs: Any) -> None:
        self.config = build(EngineConfig, {}, model=model, dtype=dtype, max_batch_size=max_batch_size,
                            max_wait_ms=max_wait_ms, default_max_tokens=default_max_tokens, overflow=overflow)
        self.source = resolve_model_source(model)
        self.dtype = torch.bfloat16 if dtype == "auto" else pick_dtype(self.config.dtype, torch.device("cpu"))
        self._tokenizer, weight, context = load_input_embeddings(self.source, dtype=self.dtype)
        self._embed = torch.nn.Embedding.from_pretrained(weight, freeze=True)  # (V, H) on CPU
        self._context = int(max_model_len or context)
        self.registry = registry if registry is not None else SoftPromptRegistry()
        eos = self._tokenizer.eos_token_id
        self.eos_ids: set[int] = {eos} if eos is not None else set()
        self._llm = llm
        self._sampling_params = sampling_params  # default: vllm.SamplingParams
        where = str(Path(self.source.location) / self.source.gguf_file) if self.source.gguf_file else \
            self.source.location
        self._llm_kwargs = {"model": where, "enable_prompt_embeds": True,
                            "max_model_len": self._context, **llm_kwargs}
        self._llm_lock = threading.Lock()
        self._batcher: DynamicBatcher | None = None
        self._batcher_lock = threading.Lock()
        self._static_prompt_tokens = 0  # `prompt_tokens_decoded`: vLLM's own prefill is not counted

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def hidden_size(self) -> int:
        return int(self._embed.weight.shape[1])

    @property
    def device(self) -> str:
        """Where decoding runs, for people."""
        return "cuda (vLLM)"

    @property
    def context_length(self) -> int:
        return self._context

    @property
    def llm(self) -> Any:
        """The `vllm.LLM` (built on first use)."""
        with self._llm_lock:
            if self._llm is None:
                self._llm = _require_vllm().LLM(**self._llm_kwargs)
            return self._llm

    # ---- what is sent to vLLM --------------------------------------------------------
    def prompt_embeds(self, request: Request, *, soft_prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The `(k + T, hidden)` embeddings this engine sends for `request` (soft prompt first)."""
        return self._embeds(self.build_row(request, soft_prompt=soft_prompt))

    def _embeds(self, row: GenRow) -> torch.Tensor:
        return embed_row(self._embed, row, device="cpu", dtype=self.dtype)

    @staticmethod
    def sampling_kwargs(row: GenRow) -> dict[str, Any]:
        """`vllm.SamplingParams` arguments for a row (temperature 0 is greedy in both engines)."""
        kw: dict[str, Any] = {"n": row.n, "temperature": row.temperature, "max_tokens": row.max_new_tokens}
        if row.top_p is not None:
            kw["top_p"] = row.top_p
        if row.top_k is not None:
            kw["top_k"] = row.top_k
        if row.stop:
            kw["stop"] = list(row.stop)
        if row.seed is not None:
            kw["seed"] = row.seed
        return kw

    def _run(self, rows: list[GenRow]) -> list[list[GenOutput]]:
        split = [part for row in rows for part in _greedy_apart(row)]  # vLLM: one temperature a request
        outs = self._run_plain([part for part, _ in split])
        results: list[list[GenOutput]] = [[] for _ in rows]
        i = 0
        for r, row in enumerate(rows):
            for _ in _greedy_apart(row):
                results[r] += outs[i]
                i += 1
        return results

    def _run_plain(self, rows: list[GenRow]) -> list[list[GenOutput]]:
        params_cls = self._sampling_params or _require_vllm().SamplingParams
        prompts = [{"prompt_embeds": self._embeds(row)} for row in rows]
        params = [params_cls(**self.sampling_kwargs(row)) for row in rows]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results: list[list[GenOutput]] = []
        for out in outputs:
            samples = []
            for c in out.outputs:
                finish = "stop" if c.finish_reason == "stop" else "length"
                samples.append(GenOutput(c.text, list(c.token_ids), finish, float(c.cumulative_logprob or 0.0)))
            results.append(samples)
        return results

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> VLLMEngine:
        """Rebuild an engine from `dump_state()`."""
        state = dict(state)
        return cls(state.pop("model"), dtype=state.get("dtype", "auto"), max_batch_size=state["max_batch_size"],
                   max_wait_ms=state["max_wait_ms"], default_max_tokens=state["default_max_tokens"],
                   overflow=state["overflow"])


def _greedy_apart(row: GenRow) -> list[tuple[GenRow, int]]:
    """A row whose first samples are greedy, as a greedy row and a sampled one (vLLM prefix-caches the prompt)."""
    if row.greedy == 0 or row.temperature <= 0:
        return [(row, 0)]
    parts = [(replace(row, n=row.greedy, temperature=0.0, seed=None, greedy=0), 0)]
    if row.n > row.greedy:
        parts.append((replace(row, n=row.n - row.greedy, greedy=0), 1))
    return parts


class AsyncVLLMEngine(AsyncEngine):
    """The async twin DSPy requires beside a custom engine (runs the sync engine in a thread)."""

    sync_engine = VLLMEngine


def vllm_lm(model: str, *, engine: VLLMEngine | None = None, **kwargs: Any) -> Any:
    """A `dspy.LM` backed by a `VLLMEngine`.

    Args:
        model: HF folder or hub id.
        engine: reuse an existing engine.
        **kwargs: `VLLMEngine` arguments (and `vllm.LLM` ones); `temperature`, `max_tokens`, `cache`,
            `num_retries` go to `dspy.LM`.

    Example:
        >>> lm = vllm_lm("Qwen/Qwen2.5-0.5B-Instruct", tensor_parallel_size=2)  # doctest: +SKIP
    """
    import dspy

    lm_kw = {k: kwargs.pop(k) for k in ("temperature", "max_tokens", "cache", "num_retries") if k in kwargs}
    engine = engine or VLLMEngine(model, **kwargs)
    lm_kw.setdefault("num_retries", 0)
    return dspy.LM(f"vllm/{engine.name}", engine=engine, async_engine=AsyncVLLMEngine(engine), **lm_kw)
