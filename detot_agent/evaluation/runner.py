"""Run methods over a suite, one JSONL line per finished example, resumable after a crash.

Layout of a run folder:

    run.json               suite, example ids, settings (checked on --resume)
    <method>.jsonl         one record per finished example, appended and fsynced as it finishes
    <method>.events.jsonl  DETOT's monitor and re-optimization events
    <method>.evidence.jsonl  a looping DETOT's evidence buffer (answered questions and their outcomes)
    <method>.shadow.jsonl  under shadow judging, every paired outcome: both answers, gold, the outcome (its
                           `request` is the DETOT record's `request`, the call's id)
    <method>.program.json  DETOT's latest serving state (one JSON file; runs of 0.3 have a .tensors/ beside it),
                           saved when its version changes
    report.json / report.md / *.png   written by `report.write_report`

A crash (or Ctrl-C, or SIGKILL) loses at most the examples in flight: `resume=True` skips the
ids already in each method's JSONL, drops a torn last line, and, for full DETOT, reloads the
last saved serving state and rebuilds its monitor (window, count, cooldown) and its loop's evidence buffer
from their logs, so the resumed run decides as the stopped one would have.

Example:
    >>> from detot_agent.evaluation.runner import read_records
    >>> import tempfile, pathlib
    >>> read_records(pathlib.Path(tempfile.mkdtemp()) / "none.jsonl")
    []
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Protocol

import dspy
from dspy.utils.parallelizer import ParallelExecutor

from detot_agent.answers import AnswerFormat, numbers_equal
from detot_agent.errors import ArtefactError, ConfigError
from detot_agent.evaluation.engine_use import difference, engine_log
from detot_agent.evaluation.methods import EvalContext, MethodRunner, build_method
from detot_agent.evaluation.names import NAMES_VERSION, current
from detot_agent.evaluation.rename_runs import upgrade_run
from detot_agent.io.jsonlog import JsonlLog
from detot_agent.io.persist import atomic_write_text

__all__ = ["RUN_FILE", "Executor", "LocalExecutor", "RecordSink", "answer_example", "check_run", "read_records",
           "read_run", "run_eval"]

RUN_FILE = "run.json"
# settings that must match for --resume to continue a run rather than mix two
_PINNED = ("suite", "source", "model", "seed", "limit", "k", "n", "temperature", "max_tokens", "soft_prompt",
           "strategy", "weighting", "index", "engine")
_OLD_NAMES = {"engine": {"local": "torch"}}  # values older runs recorded under another name


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise ArtefactError(f"{where}: not a result record (an object with a string 'id')")


def record_log(path: Path) -> JsonlLog:
    """The JSONL log of one method's records (fsynced per record; records must carry a string `id`)."""
    return JsonlLog(path, fsync=True, check=_check_record)


def read_records(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of one method's JSONL; a torn last line (a crash mid-write) is dropped (and cut off if `repair`)."""
    return record_log(path).read(repair=repair)


def read_run(out: str | Path) -> dict[str, Any]:
    """A run folder's `run.json`, for reading the run (a folder of 0.3 gets 0.4's method names first).

    Raises:
        ArtefactError: `out` holds no `run.json`.
    """
    folder = Path(out)
    if not (folder / RUN_FILE).is_file():
        raise ArtefactError(f"{folder} is not a run folder: no {RUN_FILE} (start one with `detot eval --suite ...`)")
    upgrade_run(folder)
    run: dict[str, Any] = json.loads((folder / RUN_FILE).read_text())
    return run


def check_run(out: Path, run: dict[str, Any], *, resume: bool, write: bool = True,
              addable: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Create `run.json`, or (resume) check it matches this run's settings and ids; returns the stored run.

    `write=False` only checks (the CLI does, before loading anything). `addable` names settings that a
    resumed run may add where the run had none (`--index` when no finished record used one).
    """
    path = out / RUN_FILE
    if resume and write:
        upgrade_run(out)  # a folder written under 0.3's method names gets 0.4's first
    if not path.exists():
        if write:
            atomic_write_text(path, json.dumps(run, indent=2) + "\n")
        return run
    if not resume:
        raise ConfigError(f"{out} already holds a run ({RUN_FILE}); pass --resume to continue it, or choose "
                          "another --out")
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtefactError(f"{path}: unreadable ({exc}); cannot resume") from None
    def pinned(k: str, value: Any) -> Any:
        return _OLD_NAMES.get(k, {}).get(value, value)

    added = [k for k in addable if stored.get(k) is None and run.get(k) is not None]
    diff = [f"{k}: {stored.get(k)!r} then, {run.get(k)!r} now" for k in _PINNED
            if pinned(k, stored.get(k)) != pinned(k, run.get(k)) and not (k == "engine" and stored.get(k) is None)
            and k not in added]
    if stored.get("ids") != run.get("ids"):
        diff.append("the example ids differ (--suite, --limit or --seed changed, or the data file did)")
    if diff:
        raise ConfigError(f"--resume: {out} was started with other settings: " + "; ".join(diff))
    methods = list(dict.fromkeys(list(stored.get("methods", [])) + list(run["methods"])))
    # extra methods may join on resume, and a run may continue on another executor (local <-> ray)
    if not write:
        return stored
    if methods != stored.get("methods") or run.get("executor") != stored.get("executor") or added:
        stored["methods"] = methods
        stored.update({k: run[k] for k in added})
        if run.get("executor") is not None:
            stored["executor"] = run["executor"]
        atomic_write_text(path, json.dumps(stored, indent=2) + "\n")
    return stored


def is_correct(pred: str | None, gold: str, fmt: AnswerFormat) -> bool:
    """Whether a normalised prediction matches the gold answer (numbers compare by value)."""
    if pred is None:
        return False
    return numbers_equal(pred, gold) if fmt is AnswerFormat.NUMBER else pred == gold


def run_eval(examples: list[dspy.Example], methods: list[str], ctx: EvalContext | None, out: str | Path, *,
             run: dict[str, Any], resume: bool = False, threads: int = 4, progress: bool = True,
             executor: Executor | None = None, addable: frozenset[str] = frozenset()) -> Path:
    """Run `methods` on `examples`, appending per-example records under `out`; returns `out`.

    Args:
        examples: the suite's examples (`id`, `question`, normalised `answer`).
        methods: method names (see `methods.METHODS`).
        ctx: what the methods share (LM, pool, answer format, budgets); None when `executor` builds
            its own contexts (Ray actors).
        out: run folder.
        run: settings recorded in `run.json` (and checked on resume).
        resume: continue a run in `out` (else `out` must not hold one).
        addable: settings a resumed run may add where it had none (see `check_run`).
        threads: examples in flight at once (the engine batches their generations).
        progress: show a progress bar per method.
        executor: where examples are answered; None: in this process (`LocalExecutor(ctx, threads)`).
            Whatever the executor, only this process writes the run folder.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if executor is None:
        if ctx is None:
            raise ConfigError("run_eval needs an EvalContext, or an executor that builds its own")
        executor = LocalExecutor(ctx, threads=threads)
    methods = [current(m) for m in methods]  # 0.3's names are read as 0.4's (evaluation/names.py)
    run = {**run, "methods": list(methods), "ids": [ex.id for ex in examples], "executor": executor.describe(),
           "method_names": NAMES_VERSION}
    check_run(out, run, resume=resume, addable=addable)
    for method in methods:
        path = out / f"{method}.jsonl"
        done = {r["id"] for r in read_records(path, repair=True)}
        unknown = done - set(run["ids"])
        if unknown:
            raise ArtefactError(f"{path} holds ids that are not in this run ({sorted(unknown)[:3]} ...)")
        todo = [ex for ex in examples if ex.id not in done]
        if progress:
            print(f"{method}: {len(done)} done, {len(todo)} to run", flush=True)
        if not todo:
            continue
        sink = RecordSink(out, method)
        executor.run_method(method, todo, sink, progress=progress)
    return out


class RecordSink:
    """Appends (and fsyncs) one method's records and events in the run folder; safe across threads.

    Executors call `record` once per finished example and `events` with monitor events that did not
    reach the events file on their own (Ray workers keep theirs in memory and send them back).
    """

    def __init__(self, out: Path, method: str) -> None:
        self.out = out
        self.method = method
        self.path = out / f"{method}.jsonl"
        self.events_path = out / f"{method}.events.jsonl"
        self.program_path = out / f"{method}.program.json"
        self.lock = threading.Lock()  # program saves, methods.json and the count below
        self.written = 0  # records appended by this sink (one stretch of the method)
        self._records = record_log(self.path)
        self._events = JsonlLog(self.events_path, fsync=True)

    def record(self, rec: dict[str, Any]) -> None:
        """Append (and fsync) one finished example's record."""
        self._records.append(rec)
        with self.lock:
            self.written += 1

    def events(self, events: list[dict[str, Any]]) -> None:
        """Append (and fsync) monitor events that reached the driver from elsewhere."""
        self._events.extend(events)

    def config(self, config: dict[str, Any]) -> None:
        """Record the method's settings in `methods.json`."""
        with self.lock:
            path = self.out / "methods.json"
            configs = json.loads(path.read_text()) if path.exists() else {}
            configs[self.method] = config
            atomic_write_text(path, json.dumps(configs, indent=2, default=str) + "\n")


def answer_example(runner: MethodRunner, ex: dspy.Example, fmt: AnswerFormat) -> dict[str, Any]:
    """Answer one example and return its record; an exception becomes a recorded failure, not a lost run."""
    start = time.perf_counter()
    try:
        rec = runner(ex)
        error = None
    except Exception as exc:
        rec = runner._record(None, tokens=0, samples=0, parse_failures=0)
        error = f"{type(exc).__name__}: {exc}"
        if not str(exc):
            error += " " + traceback.format_exc(limit=2)
    return {"id": ex.id, "method": runner.name, "gold": ex.answer, **rec,
            "correct": is_correct(rec.get("pred"), ex.answer, fmt), "latency_s": time.perf_counter() - start,
            "finished_at": time.time(), "error": error}


class Executor(Protocol):
    """Where a method's examples are answered (this process, or Ray actors)."""

    def describe(self) -> dict[str, Any]:
        """A short JSON description for `run.json` (kind, workers)."""
        ...

    def run_method(self, method: str, todo: list[dspy.Example], sink: RecordSink, *, progress: bool) -> None:
        """Answer `todo` with `method`, handing every record (and event) to `sink` as it finishes."""
        ...


def _checkpoint_mark(program: Any) -> tuple[int, int, int]:
    """What a saved program must be current with: its serving version, the judgements its loop has spent
    (a rejected candidate changes no version but spends error budget), and the paired outcomes its shadow trials
    have collected (the evidence a resumed run continues)."""
    controller = getattr(program, "controller", None)
    shadow = getattr(controller, "shadow", None)
    outcomes = sum(t.outcomes for t in list(shadow.tests.values())) if shadow is not None else 0
    return getattr(program, "version", 0), getattr(controller, "judgements_spent", 0), outcomes


class LocalExecutor:
    """Answers examples in this process: `threads` at once, their generations batched by the engine.

    Full DETOT's serving state is saved to `<method>.program.json` whenever its version changes or its loop
    judges a candidate (the spent error budget), and reloaded from there on resume; its monitor's window,
    observation count and cooldown are rebuilt from `<method>.events.jsonl`, its evidence buffer from
    `<method>.evidence.jsonl`.

    Example:
        >>> from detot_agent.evaluation.runner import LocalExecutor
        >>> LocalExecutor(ctx=None, threads=4).describe()  # doctest: +SKIP
        {'kind': 'local', 'threads': 4}
    """

    def __init__(self, ctx: EvalContext, *, threads: int = 4) -> None:
        self.ctx = ctx
        self.threads = max(1, threads)

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "threads": self.threads}

    def run_method(self, method: str, todo: list[dspy.Example], sink: RecordSink, *, progress: bool) -> None:
        self.ctx.events_dir = sink.out
        runner = build_method(method, self.ctx)
        sink.config(runner.config())
        stateful = runner.stateful
        program = getattr(runner, "program", None)
        if stateful and program is not None and sink.program_path.exists():
            program.load(sink.program_path)
        monitor = getattr(program, "monitor", None) if stateful else None
        controller = getattr(program, "controller", None) if stateful else None
        evidence_log = getattr(controller, "evidence_log", None)
        restored = controller is not None and evidence_log is not None and evidence_log.exists()
        if controller is not None and restored:
            controller.restore_evidence()  # what the next re-optimization trains and judges on
        if monitor is not None and monitor.log_path is not None and monitor.log_path.exists():
            # the window, count and cooldown go on from the log; without the evidence, wait for fresh answers
            monitor.restore(wait_for_fresh=not restored)
        saved = [_checkpoint_mark(program)]
        engine = getattr(self.ctx.lm, "engine", None)
        tracked = hasattr(engine, "batch_stats")  # local engines (the counters are empty before their first batch)

        def counters() -> dict[str, float]:
            return dict(getattr(engine, "batch_stats", {}))

        before = counters()

        def one(ex: dspy.Example) -> dict[str, Any]:
            rec = answer_example(runner, ex, self.ctx.answer_format)
            sink.record(rec)
            if stateful and program is not None:
                with sink.lock:
                    mark = _checkpoint_mark(program)
                    if mark != saved[0]:
                        program.save(sink.program_path)
                        saved[0] = mark
            return rec

        executor = ParallelExecutor(num_threads=self.threads, max_errors=len(todo) + 1, timeout=0,
                                    disable_progress_bar=not progress)
        interrupted = False
        try:
            executor.execute(one, todo)
        except KeyboardInterrupt:
            interrupted = True  # Ctrl-C: keep what finished, do not wait for a re-optimization to end
            raise
        finally:
            close = getattr(runner, "close", None)
            if close is not None and not interrupted:
                close()
            if stateful and program is not None:
                with sink.lock:
                    program.save(sink.program_path)
            if tracked:  # what the engine did over this stretch of the method (`evaluation/engine_use.py`)
                scheduler = getattr(getattr(engine, "config", None), "scheduler", None)
                log = engine_log(sink.out, method)
                log.read(repair=True)  # a line torn by a kill is cut off before this one follows it
                log.append(difference(before, counters(), records=sink.written, scheduler=scheduler))
