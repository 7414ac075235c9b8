"""The loop's evidence buffer: the last answered questions (`Evidence`), with their outcomes once known.

Thread-safe. With a log file, every record and every later outcome is appended to it (JSONL, not fsynced),
so `restore` rebuilds the buffer after a restart exactly as the logged buffer held it.

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> log = pathlib.Path(tempfile.mkdtemp()) / "evidence.jsonl"
    >>> buffer = EvidenceBuffer(4, log=log)
    >>> buffer.add(Evidence(id="q1", query=np.zeros(4, np.float32), demo_ids=[], agreement=1.0))
    >>> buffer.record_outcome("q1", correct=True)
    >>> again = EvidenceBuffer(4, log=log)
    >>> again.restore(), again.records()[0].correct
    (1, True)
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from detot_agent.detot.records import Evidence
from detot_agent.errors import ArtefactError, ConfigError
from detot_agent.io.jsonlog import JsonlLog

__all__ = ["EvidenceBuffer", "Split"]


class EvidenceBuffer:
    """The last `size` answered questions, by id, optionally logged to `log` (a JSONL file)."""

    def __init__(self, size: int, *, log: str | Path | None = None) -> None:
        self._records: deque[Evidence] = deque(maxlen=size)
        self._by_id: dict[str, Evidence] = {}
        self._lock = threading.Lock()
        self.log = Path(log) if log is not None else None
        self._file = JsonlLog(self.log, fsync=False) if self.log is not None else None

    def add(self, ev: Evidence) -> None:
        """Append an answered question (the oldest is dropped beyond `size`)."""
        with self._lock:
            self._push(ev)
            if self._file is not None:
                self._file.append({"kind": "evidence", **ev.to_record()})

    def record_outcome(self, pred_id: str, *, correct: bool, gold_key: str | None = None) -> None:
        """Attach correctness (and the gold-matching sample, if any) to a buffered record; unknown ids are ignored."""
        with self._lock:
            ev = self._by_id.get(pred_id)
            if ev is None:
                return
            _outcome(ev, correct, gold_key)
            if self._file is not None:
                self._file.append({"kind": "outcome", "id": pred_id, "correct": correct, "gold_key": gold_key})

    def records(self) -> list[Evidence]:
        """A copy of the buffer, oldest first."""
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        """Empty the buffer (the log is not touched)."""
        with self._lock:
            self._records.clear()
            self._by_id.clear()

    def restore(self, path: str | Path | None = None) -> int:
        """Rebuild the buffer from an evidence log (this buffer's own by default): its last `size` records with
        their outcomes; returns how many. The log is not written to.

        Raises:
            ConfigError: no log to read. ArtefactError: a line that is not a record (named by its number).
        """
        source = Path(path) if path is not None else self.log
        if source is None:
            raise ConfigError("restore_evidence: no log to read (pass a path, or build the controller with "
                              "evidence_log)")
        lines = JsonlLog(source, fsync=False).read()
        with self._lock:
            self._records.clear()
            self._by_id.clear()
            for no, data in enumerate(lines, 1):
                kind = data.get("kind") if isinstance(data, dict) else None
                try:
                    if kind == "evidence":
                        self._push(Evidence.from_record(data))
                    elif kind == "outcome":
                        old = self._by_id.get(str(data["id"]))
                        if old is not None:
                            _outcome(old, bool(data["correct"]), data.get("gold_key"))
                    else:
                        raise ArtefactError(f"unknown kind {kind!r} (evidence or outcome)")
                except (ValueError, KeyError) as exc:
                    raise ArtefactError(f"{source} line {no}: {exc}; fix or remove that line") from None
            return len(self._records)

    def _push(self, ev: Evidence) -> None:
        """Append `ev`, dropping the oldest record (and its id) beyond the size. Caller holds the lock."""
        if len(self._records) == self._records.maxlen:
            self._by_id.pop(self._records[0].id, None)
        self._records.append(ev)
        self._by_id[ev.id] = ev


def _outcome(ev: Evidence, correct: bool, gold_key: str | None) -> None:
    ev.correct = correct
    ev.gold_key = gold_key
    if gold_key is not None:
        ev.gold_target = next((s.text for s in ev.samples if s.key == gold_key), None)


@dataclass(frozen=True)
class Split:
    """Evidence for one re-optimization (`Controller._gather`): what trains, what judges, and which parts can be
    judged."""

    evidence: list[Evidence]
    train: list[Evidence]
    held: list[Evidence]
    judge_soft: bool
    judge_retrieval: bool
