"""`DETOTFit`: a DSPy optimizer that fits every DETOT in a program to the user's task, guarded by plain voting.

`compile(program, trainset=..., valset=...)` runs, for each DETOT in the program (in a fit folder, each stage's
output written as it is made, so a killed fit resumes where it stopped):

1. **checks** (before any model work): a DETOT to fit, a labelled trainset (or the agreement filter), a labelled
   valset large enough for the racing rule, a metric that accepts a label as its own prediction and does not
   raise, positive budgets, rationales when the gold prompt is asked for;
2. **distil** (`fit/distill.py`): sample the model's own chains on training problems under the current prompt at
   the serving temperature, keep the distinct accepted ones, train the soft prompt on them with the one training
   loop (`TaskEmbedding.update`); `rounds` > 1 samples again under the new prompt;
3. **gold** (when asked): train the same prompt on the trainset's rationales;
4. **race** (`fit/race.py`): every configuration of the space and `plain` (confidence-weighted voting at the same
   sample budget, no soft prompt, no demos) answer the valset, the losers dropped by a paired sign test;
5. **guard**: DETOT's best survivor ships only if plain does not beat it on the dev items; else plain ships;
   then the shipped configuration's stopping rule is chosen by replaying its race answers (`fit/stopping.py`:
   the cheapest rule and threshold that get as many dev items right; no model calls);
6. **write** (`fit/report.py`): the fitted program state, `fit.json`, `report.md` and the candidates plot; for a
   parent program, its whole fitted state as `student.json` too (`program.load("DIR/student.json")`).

Example:
    >>> fit = DETOTFit(metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
    ...                config=FitConfig(max_minutes=30), out="fits/arith")               # doctest: +SKIP
    >>> fitted = fit.compile(program, trainset=train, valset=dev)                      # doctest: +SKIP
    >>> fit.reports[0]["shipped"]                                                      # doctest: +SKIP
    'distilled-k0'
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from detot_agent.detot.module import DETOT
from detot_agent.detot.task import Adjustments
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.errors import ConfigError, FitError
from detot_agent.fit import distill, report
from detot_agent.fit.config import FitConfig
from detot_agent.fit.configure import configured, without_head
from detot_agent.fit.race import guard, race, standings
from detot_agent.fit.stopping import choose_stopping
from detot_agent.io.jsonlog import JsonlLog
from detot_agent.io.persist import atomic_write_bytes

__all__ = ["DETOTFit"]

log = logging.getLogger("detot_agent.fit")


class DETOTFit(Teleprompter):
    """Fit the DETOTs of a program to a task (see the module docstring for the stages).

    Args:
        metric: `metric(example, prediction, trace=None)`, truthy (or at least `config.metric_threshold`) when
            the prediction is right; it judges chains and valset answers.
        config: `FitConfig` (budgets, the self-distillation, the space raced, the tests' levels).
        out: the fit folder (resumed when it holds a fit of the same settings and data); None: a temporary one.
        progress: called with one line per step (default: the `detot_agent.fit` logger).
        **overrides: `FitConfig` fields, applied over `config`.
    """

    def __init__(self, metric: Callable[..., Any] | None = None, *, config: FitConfig | None = None,
                 out: str | Path | None = None, progress: Callable[[str], None] | None = None,
                 **overrides: Any) -> None:
        super().__init__()
        base = config or FitConfig()
        self.config = FitConfig.model_validate({**base.model_dump(), **overrides}) if overrides else base
        self.metric = metric
        self.out = Path(out) if out is not None else None
        self.progress = progress or log.info
        self.reports: list[dict[str, Any]] = []

    # ---- checks (no model work) ----------------------------------------------------------------------
    def _check(self, student: Any, trainset: Sequence[Any], valset: Sequence[Any] | None) -> list[DETOT]:
        cfg = self.config
        if self.metric is None or not callable(self.metric):
            raise ConfigError("DETOTFit needs metric=, a callable metric(example, prediction, trace=None)")
        if not isinstance(student, dspy.Module):
            raise ConfigError(f"compile() fits a DSPy program holding a DETOT, got {type(student).__name__}")
        detots = [m for _, m in student.named_sub_modules() if isinstance(m, DETOT)]
        if not detots:
            raise ConfigError("the program holds no DETOT module to fit")
        if not trainset:
            raise ConfigError("trainset is empty: pass the task's training examples (dspy.Example with the inputs "
                              "and, for the metric filter, the answer)")
        if valset is None or len(valset) < cfg.min_valset:
            raise ConfigError(f"valset has {0 if valset is None else len(valset)} examples; the racing rule and "
                              f"the guard need at least {cfg.min_valset} (race_every={cfg.race_every}, alpha="
                              f"{min(cfg.race_alpha, cfg.guard_alpha)}): pass a larger dev split")
        for program in detots:
            for where, examples in (("trainset", trainset), ("valset", valset)):
                for i, ex in enumerate(examples):
                    if not isinstance(ex, dspy.Example):
                        raise ConfigError(f"{where}[{i}] is a {type(ex).__name__}, not a dspy.Example")
                    distill.inputs_of(program, ex)
            field = program.answer_field
            unlabelled = [i for i, ex in enumerate(valset) if ex.get(field) in (None, "")]
            if unlabelled:
                raise ConfigError(f"valset examples {unlabelled[:5]} have no {field!r}: the race needs labels")
            if cfg.filter == "metric":
                unlabelled = [i for i, ex in enumerate(trainset) if ex.get(field) in (None, "")]
                if unlabelled:
                    raise ConfigError(f"trainset examples {unlabelled[:5]} have no {field!r}: label them, or fit "
                                      "label-free with filter='agreement' (keeps high-agreement chains)")
            if "gold" in cfg.prompts and not any(distill.gold_target(program, ex) for ex in trainset):
                raise ConfigError("prompts has 'gold' but no trainset example has a 'rationale' (or 'reasoning') "
                                  "and an answer; drop 'gold' or add worked answers")
            if program.controller.engine is None:
                raise ConfigError("DETOTFit trains soft prompts: the DETOT's LM must be a local one (local_lm: "
                                  "torch or llama.cpp); this LM has no training engine")
            ex = valset[0]
            gold = {field: ex.get(field), "reasoning": ex.get("rationale") or ""}
            try:
                ok = distill.accepted(self.metric, ex, gold, cfg.metric_threshold)
            except FitError as exc:
                raise ConfigError(f"the metric raised on valset[0] with its own label as the prediction "
                                  f"({exc.__cause__!r}); fix the metric before fitting") from None
            if not ok:
                raise ConfigError(f"the metric rejects valset[0]'s own label {ex.get(field)!r} as its prediction; "
                                  "it would reject every right answer")
        return detots

    def _fingerprint(self, program: DETOT, trainset: Sequence[Any], valset: Sequence[Any]) -> str:
        # settings left at their defaults are not hashed (a release that adds a setting still resumes a fit), nor
        # the time budget and the threads: a fit stopped by its budget resumes with a larger one
        data = {"config": self.config.model_dump(mode="json", exclude_defaults=True,
                                                 exclude={"max_minutes", "threads"}),
                "task": program.task.model_dump(mode="json"),
                "signature": str(program._signature()), "version": program.version,
                "train": [dict(e) for e in trainset], "val": [dict(e) for e in valset]}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()

    # ---- compile ------------------------------------------------------------------------------------
    def compile(self, student: Any, *, trainset: Sequence[Any], valset: Sequence[Any] | None = None,
                teacher: Any = None, **kwargs: Any) -> Any:
        """Return a copy of `student` with every DETOT fitted (its adjustments and task embedding replaced)."""
        detots = self._check(student, trainset, valset)
        assert valset is not None
        fitted = student.deepcopy()
        targets = [m for _, m in fitted.named_sub_modules() if isinstance(m, DETOT)]
        root = self.out or Path(tempfile.mkdtemp(prefix="detot-fit-"))
        self.reports = []
        for i, (program, target) in enumerate(zip(detots, targets, strict=True)):
            folder = root if len(detots) == 1 else root / f"detot-{i}"
            result = self._fit_one(program, list(trainset), list(valset), folder)
            target.adjustments = result["program"].adjustments
            target.controller.restore(result["program"].controller.state)
            self.reports.append(result["report"])
        if not isinstance(fitted, DETOT):  # a parent program: its whole state, every fitted DETOT inside
            fitted.save(str(root / "student.json"))
        return fitted

    def _fit_one(self, program: DETOT, trainset: list[Any], valset: list[Any], folder: Path) -> dict[str, Any]:
        cfg, say = self.config, self.progress
        folder.mkdir(parents=True, exist_ok=True)
        fingerprint = self._fingerprint(program, trainset, valset)
        settings = folder / "settings.json"
        if settings.exists():
            known = json.loads(settings.read_text()).get("fingerprint")
            if known != fingerprint:
                raise FitError(f"{folder} holds a fit of other settings or data; fit into a new folder or "
                                       "delete it")
            say(f"resuming the fit in {folder}")
        else:
            atomic_write_bytes(settings, json.dumps({"fingerprint": fingerprint, "config": cfg.model_dump(
                mode="json")}, indent=2).encode())
        start = time.monotonic()
        deadline = start + cfg.max_minutes * 60
        timings: dict[str, float] = {}
        base = _base_embedding(program)
        prompts: dict[str, TaskEmbedding | None] = {"none": None if program.task_embedding is None else
                                                    without_head(program.task_embedding)}
        if program.task_embedding is not None and program.task_embedding.has_head:
            prompts["current"] = program.task_embedding
        stats: dict[str, Any] = {}
        train = trainset[:cfg.max_train_problems]
        if "distilled" in cfg.prompts:
            t0 = time.monotonic()
            prompt = base
            for r in range(1, cfg.rounds + 1):
                drawer = distill.sampler(configured(program, _serving(program), embedding=prompt,
                                                    budget=program.adjustments.max_samples), cfg)
                records = self._chains(drawer, train, folder / f"chains-{r}.jsonl",
                                       start + cfg.max_minutes * 60 * 0.3 * r / cfg.rounds, r)
                kept = sum(len(x["kept"]) for x in records)
                stats[f"round_{r}"] = {"problems": len(records), "drawn": sum(x["drawn"] for x in records),
                                       "accepted": sum(x["accepted"] for x in records), "kept": kept,
                                       "problems_with_a_chain": sum(bool(x["kept"]) for x in records),
                                       "filter": cfg.filter}
                if not kept:
                    say(f"distil round {r}: no accepted chain in {len(records)} problems; no distilled prompt")
                    break
                items = distill.chain_items(program, records)
                prompt = self._train(program, prompt, items, folder / "prompts" / f"distilled-{r}", deadline)
                prompts["distilled"] = prompt
            timings["distil"] = _spent(folder, "distil", time.monotonic() - t0)
        if "gold" in cfg.prompts:
            t0 = time.monotonic()
            gold_program = configured(program, _serving(program), embedding=base,
                                      budget=program.adjustments.max_samples)
            items = distill.gold_items(gold_program, train)
            stats["gold"] = {"items": len(items)}
            prompts["gold"] = self._train(program, base, items, folder / "prompts" / "gold", deadline)
            timings["gold"] = _spent(folder, "gold", time.monotonic() - t0)
        t0 = time.monotonic()
        budget = cfg.budget or program.adjustments.max_samples
        space = [c for c in cfg.candidates(has_current="current" in prompts) if c.prompt in prompts]
        candidates = {c.name: configured(program, c, embedding=prompts[c.prompt], budget=budget) for c in space}
        say(f"race: {len(candidates)} candidates on {len(valset)} valset items")
        assert self.metric is not None
        result = race(candidates, valset, self.metric, cfg, JsonlLog(folder / "race.jsonl"), deadline=deadline,
                      progress=say)
        timings["race"] = _spent(folder, "race", time.monotonic() - t0)
        decision = guard(result, cfg.guard_alpha)
        shipped = candidates[decision["shipped"]]
        stopping = _stop_sooner(program, shipped, result, decision["shipped"], cfg)
        if stopping["chosen"] is not None:
            c, r = stopping["chosen"], stopping["raced"]
            say(f"fit: stopping {c['rule']} at {c['threshold']} (replayed on the race's answers): {c['samples']} "
                f"samples in all instead of {r['samples']}, {c['correct']} right as raced {r['correct']}")
        say(f"fit: ships {decision['shipped']}" + (f" (the guard fired: {decision['best']} lost to plain voting on "
                                                   "the dev split)" if decision["guard_fired"] else ""))
        out = report.write(folder, program=shipped, decision=decision, table=standings(result),
                           choices={c.name: c.model_dump(mode="json") for c in space}, distill=stats,
                           timings=timings, config=cfg, stopped_by_time=result["stopped_by_time"], stopping=stopping)
        return {"program": shipped, "report": out}

    def _chains(self, drawer: DETOT, train: list[Any], path: Path, stop_at: float, r: int) -> list[dict[str, Any]]:
        """Chains for every training problem, `threads` problems at once (resumed from `path`; no new problem is
        started after `stop_at`)."""
        chains = JsonlLog(path)
        done = {int(x["i"]): x for x in chains.read(repair=True)}
        todo = [i for i in range(len(train)) if i not in done]

        def one(i: int) -> dict[str, Any] | None:
            if time.monotonic() > stop_at:
                return None
            return {"i": i, **distill.draw_chains(drawer, train[i], self.metric, self.config)}

        with ThreadPoolExecutor(max_workers=self.config.threads) as pool:
            for record in pool.map(one, todo):
                if record is None:
                    continue
                chains.append(record)
                done[record["i"]] = record
                if len(done) % 8 == 0 or len(done) == len(train):
                    kept = sum(len(x["kept"]) for x in done.values())
                    self.progress(f"distil round {r}: {len(done)}/{len(train)} problems, {kept} chains kept")
        if len(done) < len(train):
            self.progress(f"distil round {r}: time share spent after {len(done)} of {len(train)} problems")
        return [done[i] for i in sorted(done)]

    def _train(self, program: DETOT, start: TaskEmbedding, items: list[Any], path: Path,
               deadline: float) -> TaskEmbedding:
        """`start` trained on `items` (loaded instead when `path` holds it from an earlier run)."""
        if (path / "manifest.json").exists():
            self.progress(f"train: {path.name} already trained, loaded")
            return TaskEmbedding.load(path, encoder_name=start.encoder_name)
        cfg = self.config
        share = max(1.0, min(cfg.max_minutes * 60 * 0.15, deadline - time.monotonic()))
        limit = share if cfg.train.max_seconds is None else min(share, cfg.train.max_seconds)
        val = items[::8] if len(items) >= 16 else []
        train = [x for j, x in enumerate(items) if not (val and j % 8 == 0)]
        trained = copy.deepcopy(start)
        self.progress(f"train: {path.name} on {len(train)} items ({len(val)} for validation)")
        result = trained.update(train, engine=program.controller.engine, val=val,
                                config=cfg.train.model_copy(update={"max_seconds": limit}))
        self.progress(f"train: {path.name} NLL {result.lm_before} -> {result.lm_after}, {result.steps} steps")
        trained.save(path)
        atomic_write_bytes(path.with_suffix(".report.json"), result.model_dump_json(indent=2).encode())
        return trained


def _stop_sooner(program: DETOT, shipped: DETOT, result: dict[str, Any], name: str, cfg: FitConfig
                 ) -> dict[str, Any]:
    """Give `shipped` the cheapest stopping rule that keeps its dev correct count, replayed on its race answers in
    the program's rounds (`fit/stopping.py`); returns the replay's table and choice."""
    rows = [result["rows"][name][i] for i in range(result["items"])]
    out = choose_stopping(rows, shipped.adjustments, schedule=program.adjustments, rules=cfg.stop_rules,
                          thresholds=cfg.stop_thresholds)
    chosen = out["chosen"]
    if chosen is not None:
        adj = shipped.adjustments
        shipped.adjustments = Adjustments.model_validate({**adj.model_dump(), "stopping": chosen["rule"],
                                                          "stop_threshold": chosen["threshold"],
                                                          "min_samples": min(program.adjustments.min_samples,
                                                                             adj.max_samples),
                                                          "round_size": program.adjustments.round_size})
    return out


def _spent(folder: Path, stage: str, seconds: float) -> float:
    """A stage's seconds over every run of this fit (a resumed fit adds to what the killed one spent)."""
    path = folder / "seconds.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known[stage] = float(known.get(stage, 0.0)) + seconds
    atomic_write_bytes(path, json.dumps(known, indent=2).encode())
    return float(known[stage])


def _serving(program: DETOT) -> Any:
    """The program's own configuration as a `Choice` (its demos, temperature, strategy and weighting)."""
    from detot_agent.fit.config import Choice

    adj = program.adjustments
    return Choice(name="serving", k=adj.k_exemplars, temperature=adj.temperature, strategy=adj.strategy,
                  weighting=adj.weighting, stopping=adj.stopping)


def _base_embedding(program: DETOT) -> TaskEmbedding:
    """The prompt self-distillation starts from: the program's soft prompt, else one initialised from the task's
    init text (the model's token embeddings) on a copy of its task embedding."""
    te = program.task_embedding
    if te is not None and te.has_head:
        return te
    from detot_agent.engines.lm import serving_engine
    from detot_agent.softprompt.prompt import SoftPrompt

    engine = serving_engine(program._lm())
    if engine is None:
        raise ConfigError("DETOTFit serves soft prompts through a batched engine (local_lm); this LM has none")
    out = copy.deepcopy(te) if te is not None else TaskEmbedding.from_description(
        program.task.name, program.task.description or program.task.name, encoder=program.encoder)
    adj = program.adjustments
    p0 = SoftPrompt.initialize(engine, program.task.name, k=adj.soft_prompt_k, init="text",
                               text=adj.soft_prompt_init_text).vectors
    out.attach_head(p0, model_id=getattr(getattr(engine, "source", None), "spec", None) or "unknown")
    return out
