"""A picklable recipe for an `EvalContext`: paths and budgets only, so another process can rebuild it.

The CLI builds its context from a `ContextSpec`, and so does every Ray actor
(`evaluation.distributed`), so a local run and a scaled-out run load the same model, index and
soft prompt with the same settings. Paths are read where the context is built: on a cluster they
must exist on every node (shared storage, or the same layout on each machine).

Example:
    >>> from detot_agent.evaluation.spec import ContextSpec
    >>> spec = ContextSpec(model="path/to/model.gguf", k=3, n=5, max_tokens=256)
    >>> ContextSpec.model_validate_json(spec.model_dump_json()) == spec
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from detot_agent.answers import AnswerFormat
from detot_agent.config import StrictModel
from detot_agent.detot.task import Policy
from detot_agent.errors import ArtefactError, ConfigError
from detot_agent.evaluation.methods import EvalContext

__all__ = ["ContextSpec", "build_context"]


class ContextSpec(StrictModel):
    """What an `EvalContext` is built from.

    Attributes:
        model: HF folder, `.gguf` file or hub id (None: the embedded default model).
        engine: `torch` (transformers, CPU or GPU), `llamacpp` (GGUF on the CPU, `LlamaCppEngine`),
            `auto` (see `engines.lm.choose_engine`) or `vllm` (`VLLMEngine`, CUDA GPUs; soft prompts sent as
            `prompt_embeds`).
        device, dtype, max_batch_size, max_wait_ms: engine settings; scheduler: the local engines' (`continuous`
            or `static`, `EngineConfig.scheduler`); prefix_match: which cached prompts the continuous scheduler
            reuses (`EngineConfig.prefix_match`); prefix_cache: how many prompts it keeps (`EngineConfig.prefix_cache`).
        index: exemplar index folder (demo pool), or None.
        soft_prompt: trained soft prompt folder for the DETOT methods, None (a text-initialised prompt), or
            `"none"` (no soft-prompt vectors).
        answer_format, labels: the suite's answer format and label set.
        k, n, temperature, max_tokens, seed: method budgets (see `EvalContext`).
        task_name: the task's name (soft-prompt registry key, DETOT's profile name).
        canary: `(question, gold answer)` pairs every re-optimization of a looping DETOT replays.
        strategy: the DETOT methods' reasoning strategy (`cot`, `pot`, `mix`; None: task analysis decides).
        weighting: the DETOT methods' vote weighting (`uniform`, `cisc`, `filter`; None: task analysis decides).
        reopt_cooldown: answers between two re-optimizations of a looping DETOT (None: task analysis's).
        loop_policies: `Policy` fields (`{"strategy": "pot"}`) a looping DETOT may switch to when gold shows
            they help (`ControllerConfig.policies`).
        replay_items: held-out records a looping DETOT replays per judgement (None: `ControllerConfig`'s 16).
        judging: how a looping DETOT judges its candidates: `replay`, or `shadow` (a share of live requests is also
            answered by the candidate; paired outcomes from gold feedback, or from agreement without feedback).
        shadow_share: the share of requests shadowed (None: `ShadowConfig`'s).
        shadow_settings: other `ShadowConfig` fields for a looping DETOT (`{"workers": 4, "background": False}`).
        questions: a few of the suite's questions (DETOT's task analysis reads them).
        fit: a fit folder (`detot fit`) whose shipped configuration and task embedding the DETOT methods serve.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None
    engine: Literal["auto", "torch", "llamacpp", "vllm"] = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = Field(default=16, ge=1)
    max_wait_ms: float = Field(default=50.0, ge=0)
    scheduler: Literal["continuous", "static"] = "continuous"
    prefix_match: Literal["prefix", "exact"] = "prefix"
    prefix_cache: int = Field(default=8, ge=0, le=64)
    index: str | None = None
    soft_prompt: str | None = None
    answer_format: AnswerFormat = AnswerFormat.NUMBER
    labels: list[str] = Field(default_factory=list)
    k: int = Field(default=3, ge=0)
    n: int = Field(default=5, ge=1)
    temperature: float = Field(default=0.7, ge=0)
    max_tokens: int = Field(default=256, ge=1)
    seed: int = 0
    task_name: str = "task"
    feedback: Literal["none", "gold"] = "none"
    reopt_seconds: float | None = Field(default=None, gt=0)
    canary: list[tuple[str, str]] = Field(default_factory=list)
    strategy: Literal["cot", "pot", "mix"] | None = None
    weighting: Literal["uniform", "cisc", "filter"] | None = None
    reopt_cooldown: int | None = Field(default=None, ge=0)
    loop_policies: list[dict[str, Any]] = Field(default_factory=list)
    replay_items: int | None = Field(default=None, ge=1)
    judging: Literal["replay", "shadow"] = "replay"
    shadow_share: float | None = Field(default=None, gt=0, le=1)
    shadow_settings: dict[str, Any] = Field(default_factory=dict)
    questions: list[str] = Field(default_factory=list)
    fit: str | None = None


def build_context(spec: ContextSpec, **lm_kwargs: Any) -> EvalContext:
    """Load what `spec` names (engine, index, soft prompt) and return the shared `EvalContext`.

    Args:
        spec: the recipe.
        **lm_kwargs: extra `EngineConfig` / `dspy.LM` settings for `local_lm`.
    """
    from detot_agent.engines.lm import local_lm

    pool = None
    if spec.index is not None:
        from detot_agent.retrieval.encoder import Encoder
        from detot_agent.retrieval.index import ExemplarIndex

        pool = ExemplarIndex.load(spec.index, encoder=Encoder())
    if spec.engine == "vllm":
        from detot_agent.engines.vllm_engine import vllm_lm

        if spec.model is None:
            raise ConfigError("--engine vllm needs --model (a Hugging Face folder or hub id)")
        lm = vllm_lm(spec.model, dtype=spec.dtype, max_batch_size=spec.max_batch_size, max_wait_ms=spec.max_wait_ms,
                     cache=False, **lm_kwargs)
    else:
        lm = local_lm(spec.model, engine=spec.engine, device=spec.device, dtype=spec.dtype, cache=False,
                      max_batch_size=spec.max_batch_size, max_wait_ms=spec.max_wait_ms, scheduler=spec.scheduler,
                      prefix_match=spec.prefix_match, prefix_cache=spec.prefix_cache, **lm_kwargs)
    vectors = task_embedding = None
    if spec.soft_prompt is not None and spec.soft_prompt != "none":
        from detot_agent.embedding.task_embedding import TaskEmbedding
        from detot_agent.io.persist import read_manifest
        from detot_agent.softprompt.prompt import SoftPrompt

        try:  # a task embedding (`detot tune`): the whole object, head included
            read_manifest(Path(spec.soft_prompt), kind=TaskEmbedding.FORMAT, max_version=TaskEmbedding.FORMAT_VERSION,
                          verify=False)
        except ArtefactError:  # a static soft prompt (the first release's `detot tune`)
            vectors = SoftPrompt.load(spec.soft_prompt, hidden_size=lm.engine.hidden_size).vectors
        else:
            task_embedding = TaskEmbedding.load(
                spec.soft_prompt, hidden_size=lm.engine.hidden_size,
                encoder_name=pool.encoder_name if pool is not None else None)
            if not task_embedding.has_head:
                raise ConfigError(f"{spec.soft_prompt} is a task embedding without a soft-prompt head; train one with "
                                  "`detot tune` or pass a soft prompt")
    return EvalContext(lm=lm, answer_format=spec.answer_format, labels=list(spec.labels), index=pool,
                       encoder=pool.encoder if pool is not None else None, k=spec.k, n=spec.n,
                       temperature=spec.temperature, max_tokens=spec.max_tokens, seed=spec.seed,
                       soft_prompt=vectors, task_embedding=task_embedding, task_name=spec.task_name,
                       feedback=spec.feedback, reopt_seconds=spec.reopt_seconds, canary=list(spec.canary),
                       no_soft_prompt=spec.soft_prompt == "none", strategy=spec.strategy, weighting=spec.weighting,
                       reopt_cooldown=spec.reopt_cooldown,
                       loop_policies=[Policy(**p) for p in spec.loop_policies],
                       replay_items=spec.replay_items, judging=spec.judging, shadow_share=spec.shadow_share,
                       shadow_settings=dict(spec.shadow_settings),
                       questions=list(spec.questions), fit=spec.fit)
