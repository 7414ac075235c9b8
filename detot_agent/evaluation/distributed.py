"""Scale an eval out over Ray actors, each holding one engine replica (`detot eval --executor ray`).

How a run goes:

- The driver (the `detot eval` process) starts `workers` named actors. Each builds its own
  `EvalContext` from the same `ContextSpec` (model, index, soft prompt loaded once per actor) and is a
  threaded actor (`max_concurrency=threads`), so the problems it holds at once reach its engine
  together and are decoded in one batch.
- The driver keeps `threads` problems in flight per actor and hands out the next one as each
  finishes. Only the driver writes the run folder: records stream back and are appended to the
  same `<method>.jsonl` as a local run, so `--resume` and `detot eval report` work unchanged, and
  actors on other machines never need the run folder.
- An actor that dies (node lost, out of memory, `ray.kill`) has its unfinished problems put back
  at the head of the queue, and a fresh actor takes its slot (at most `max_restarts` times in a
  run). A problem is written only when its result reaches the driver, so nothing is lost and
  nothing is counted twice.
- Full DETOT keeps **one optimization loop per worker**: each actor's monitor sees its own share of
  the problems and re-optimizes its own task embedding. That costs no cross-worker traffic and no
  lock on the hot path, but each loop sees 1/N of the evidence (so it triggers later) and workers
  may serve different embedding versions at the same moment. The method's config in `methods.json`
  says so (`"loop": "per worker"`), events carry their `worker`, and the serving state is not
  checkpointed (a resumed run starts each worker's loop from the initial state).

Example:
    >>> from detot_agent.evaluation.distributed import RayExecutor
    >>> from detot_agent.evaluation.spec import ContextSpec
    >>> executor = RayExecutor(ContextSpec(model="model.gguf"), workers=2, threads=4)  # doctest: +SKIP
    >>> run_eval(examples, ["dspy_cot"], None, "runs/x", run=run, executor=executor)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import dspy

from detot_agent.errors import ConfigError, DetotError
from detot_agent.evaluation.methods import MethodRunner, build_method
from detot_agent.evaluation.runner import RecordSink, answer_example
from detot_agent.evaluation.spec import ContextSpec, build_context

__all__ = ["EvalWorker", "RayExecutor", "WorkerLostError"]

# environment a worker inherits from the driver (offline hubs, quiet tokenizers)
_PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
               "TRANSFORMERS_NO_ADVISORY_WARNINGS", "DETOT_DATA_DIR")


class WorkerLostError(DetotError):
    """Every worker died and the restart budget is spent: the run stops (finished records are kept)."""


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'detot-agent[ray]' (or pip install ray)") from None
    return ray


def _example(data: dict[str, Any]) -> dspy.Example:
    return dspy.Example(**data).with_inputs("question")


def _cause(exc: BaseException) -> str:
    """The last line of a Ray error (the worker's own exception), without Ray's colour codes."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class EvalWorker:
    """One engine replica answering problems (the body of a Ray actor; also usable in-process).

    Args:
        spec: JSON of the `ContextSpec` to build the context from.
        worker: this worker's slot number (recorded on its records and events).
        torch_threads: intra-op threads for torch (the CPUs Ray granted), or None to leave as is.
    """

    def __init__(self, spec: str, worker: int, torch_threads: int | None = None) -> None:
        import logging
        import threading

        import torch

        # as in `detot eval`: a truncated sample is counted as a parse failure, not logged per call
        logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.worker = worker
        self.ctx = build_context(ContextSpec.model_validate_json(spec))
        self.runners: dict[str, MethodRunner] = {}
        self.sent: dict[str, int] = {}  # events already handed back, per method
        self.lock = threading.Lock()

    def prepare(self, method: str) -> dict[str, Any]:
        """Build `method` once; returns its config (as the report shows it)."""
        with self.lock:
            if method not in self.runners:
                self.runners[method] = build_method(method, self.ctx)
                self.sent[method] = 0
            config = self.runners[method].config()
            if self.runners[method].stateful:
                config["loop"] = "per worker"
        return config

    def _new_events(self, method: str) -> list[dict[str, Any]]:
        monitor = getattr(getattr(self.runners[method], "program", None), "monitor", None)
        if monitor is None:
            return []
        with self.lock:
            events = monitor.events_since(self.sent[method])
            self.sent[method] = monitor.events_logged
        return [{**e, "worker": self.worker} for e in events]

    def answer(self, method: str, example: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Answer one problem: its record and the monitor events raised since the last call."""
        rec = answer_example(self.runners[method], _example(example), self.ctx.answer_format)
        rec["worker"] = self.worker
        return rec, self._new_events(method)

    def finish(self, method: str) -> list[dict[str, Any]]:
        """Let a running re-optimization end, stop background work; returns the remaining events."""
        runner = self.runners.get(method)
        if runner is None:
            return []
        close = getattr(runner, "close", None)
        if close is not None:
            close()
        return self._new_events(method)

    def ready(self) -> int:
        """Returns the worker's slot once its model is loaded (used to wait for start-up)."""
        return self.worker


class RayExecutor:
    """Answers examples on Ray actors; the driver streams their records into the run folder.

    Args:
        spec: what every actor loads (see `ContextSpec`).
        workers: actors (engine replicas).
        threads: problems in flight per actor (its engine batches them).
        address: Ray cluster to join (`auto`, `HOST:PORT`, `ray://...`); None: join the one already
            initialised in this process, or start a local instance.
        worker_cpus: CPUs Ray reserves per actor (also its torch thread count).
        worker_gpus: GPUs per actor (1 for one GPU worker per replica).
        max_restarts: fresh actors started in place of dead ones over the whole run (default: `workers`).
        on_record: called by the driver after each record is written, with the record (tests and
            progress hooks use it).
        task_timeout_s: a problem unanswered this long counts its actor as hung: the actor is killed,
            its problems re-queued and a fresh one started (None: wait for ever).

    Example:
        >>> ex = RayExecutor(ContextSpec(model="m.gguf"), workers=2, address="auto")  # doctest: +SKIP
        >>> ex.actor_names  # doctest: +SKIP
        ['detot-eval-3f2a-0', 'detot-eval-3f2a-1']
    """

    def __init__(self, spec: ContextSpec, *, workers: int = 2, threads: int = 4, address: str | None = None,
                 worker_cpus: float = 1.0, worker_gpus: float = 0.0, max_restarts: int | None = None,
                 on_record: Callable[[dict[str, Any], RayExecutor], None] | None = None,
                 task_timeout_s: float | None = None) -> None:
        if workers < 1 or threads < 1:
            raise ConfigError(f"--workers and --threads must be >= 1, got {workers} and {threads}")
        self.spec = spec
        self.workers = workers
        self.threads = threads
        self.address = address
        self.worker_cpus = worker_cpus
        self.worker_gpus = worker_gpus
        self.max_restarts = workers if max_restarts is None else max_restarts
        self.on_record = on_record
        self.task_timeout_s = task_timeout_s
        self.timeouts = 0
        self.prefix = f"detot-eval-{uuid.uuid4().hex[:6]}"
        self.actors: list[Any] = []
        self.actor_names: list[str] = []
        self.restarts = 0
        self.requeued = 0
        self._started_ray = False
        self._spawned = 0

    def describe(self) -> dict[str, Any]:
        return {"kind": "ray", "workers": self.workers, "threads": self.threads, "address": self.address,
                "worker_cpus": self.worker_cpus, "worker_gpus": self.worker_gpus,
                "task_timeout_s": self.task_timeout_s}

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> RayExecutor:
        """Join or start Ray and start the actors (waits until every model is loaded)."""
        ray = _require_ray()
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
            kwargs: dict[str, Any] = {"include_dashboard": False, "runtime_env": {"env_vars": env}}
            if self.address is not None:
                kwargs["address"] = self.address
            ray.init(**kwargs)
            self._started_ray = True
        if not self.actors:
            self.actors = [None] * self.workers
            self.actor_names = [""] * self.workers
            for slot in range(self.workers):
                self._spawn(slot)
            try:
                ray.get([a.ready.remote() for a in self.actors])
            except ray.exceptions.RayActorError as exc:
                self.close()
                raise WorkerLostError(f"a Ray worker failed to start: {_cause(exc)} (each worker loads the model, "
                                      "index and soft prompt itself: the paths must exist on every node)") from None
        return self

    def _spawn(self, slot: int) -> Any:
        ray = _require_ray()
        name = f"{self.prefix}-{self._spawned}"
        self._spawned += 1
        actor_cls = ray.remote(EvalWorker)
        threads = max(1, int(self.worker_cpus)) if self.worker_cpus >= 1 else None
        actor = actor_cls.options(name=name, max_concurrency=self.threads, num_cpus=self.worker_cpus,
                                  num_gpus=self.worker_gpus, max_restarts=0).remote(
            self.spec.model_dump_json(), slot, threads)
        self.actors[slot] = actor
        self.actor_names[slot] = name
        return actor

    def close(self) -> None:
        """Stop the actors (and the local Ray instance, if this executor started it)."""
        ray = _require_ray()
        for actor in self.actors:
            if actor is not None:
                with contextlib.suppress(Exception):  # already dead
                    ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayExecutor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one method ---------------------------------------------------------------------
    def _replace(self, slot: int, method: str) -> None:
        ray = _require_ray()
        if self.restarts >= self.max_restarts:
            self.actors[slot] = None
            return
        self.restarts += 1
        actor = self._spawn(slot)
        try:
            ray.get(actor.prepare.remote(method))
        except ray.exceptions.RayActorError:
            self.actors[slot] = None

    def run_method(self, method: str, todo: list[dspy.Example], sink: RecordSink, *, progress: bool) -> None:
        ray = _require_ray()
        from tqdm import tqdm

        self.start()
        lost = ray.exceptions.RayActorError
        configs = []
        for slot, actor in enumerate(self.actors):
            if actor is None:  # lost in an earlier method, restart budget spent
                continue
            try:
                configs.append(ray.get(actor.prepare.remote(method)))
            except lost:
                self._replace(slot, method)
        config = configs[0] if configs else {}
        sink.config({**config, "executor": self.describe()})

        queue: deque[dspy.Example] = deque(todo)
        inflight: dict[Any, tuple[int, dspy.Example]] = {}
        since: dict[Any, float] = {}  # when each in-flight problem was handed out
        load = [0] * len(self.actors)
        bar = tqdm(total=len(todo), desc=method, disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()
        try:
            while queue or inflight:
                for slot, actor in enumerate(self.actors):
                    while actor is not None and queue and load[slot] < self.threads:
                        ex = queue.popleft()
                        ref = actor.answer.remote(method, ex.toDict())
                        inflight[ref], since[ref] = (slot, ex), time.monotonic()
                        load[slot] += 1
                if not inflight:
                    hung = f" ({self.timeouts} taken for hung after {self.task_timeout_s} s)" if self.timeouts else ""
                    raise WorkerLostError(f"every Ray worker died{hung} and the restart budget ({self.max_restarts}) "
                                          f"is spent; {len(queue)} problems of {method} are left: fix the cause and "
                                          "run again with --resume")
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=self.task_timeout_s)
                if not ready:  # the oldest problem ran past the timeout: its actor is taken for hung
                    oldest = min(inflight, key=lambda r: since[r])
                    if time.monotonic() - since[oldest] >= (self.task_timeout_s or 0):
                        self.timeouts += 1
                        self._drop(inflight[oldest][0], method, inflight, queue, load)
                    continue
                for ref in ready:
                    since.pop(ref, None)
                    slot, ex = inflight.pop(ref)
                    load[slot] -= 1
                    try:
                        rec, events = ray.get(ref)
                    except lost:
                        queue.appendleft(ex)  # never written: it runs again elsewhere
                        self.requeued += 1
                        self._drop(slot, method, inflight, queue, load)
                        continue
                    sink.record(rec)
                    sink.events(events)
                    bar.update(1)
                    if self.on_record is not None:
                        self.on_record(rec, self)
            for actor in self.actors:
                if actor is not None:
                    with contextlib.suppress(lost):
                        sink.events(ray.get(actor.finish.remote(method)))
        finally:
            bar.close()
        if progress:
            rate = len(todo) / max(time.perf_counter() - start, 1e-9)
            print(f"{method}: {len(todo)} problems on {self.workers} Ray workers, {rate:.2f}/s, "
                  f"{self.requeued} re-queued, {self.restarts} workers restarted", flush=True)

    def _drop(self, slot: int, method: str, inflight: dict[Any, tuple[int, dspy.Example]],
              queue: deque[dspy.Example], load: list[int]) -> None:
        """Slot `slot`'s actor died: re-queue everything it held and start a replacement."""
        ray = _require_ray()
        with contextlib.suppress(Exception):  # an unreachable actor must not keep working on re-queued problems
            ray.kill(self.actors[slot])
        for ref, (s, ex) in list(inflight.items()):
            if s == slot:
                del inflight[ref]
                queue.appendleft(ex)
                self.requeued += 1
        load[slot] = 0
        self._replace(slot, method)
