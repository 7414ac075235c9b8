"""`JsonlLog`: the one append-only JSONL log (eval records, their event files, the monitor's log).

One JSON object per line. Durability is stated per log: `fsync=True` (eval records and
events, which a resumed run relies on) flushes and fsyncs every append, so a crash loses at
most the line being written; `fsync=False` flushes to the OS only (cheaper, survives a
process crash but not a power cut). Appends from several threads are serialised.

Reading drops a torn last line (a crash mid-write) and, with `repair=True`, cuts it off the
file, so appending can go on; a bad line anywhere else is an error naming the line.

Example:
    >>> import tempfile, pathlib
    >>> log = JsonlLog(pathlib.Path(tempfile.mkdtemp()) / "a.jsonl")
    >>> log.append({"id": "q1"}); log.extend([{"id": "q2"}])
    >>> [r["id"] for r in log.read()]
    ['q1', 'q2']
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from detot_agent.errors import ArtefactError

__all__ = ["JsonlLog"]


class JsonlLog:
    """Append-only JSONL file.

    Args:
        path: the file (its folder is created on the first append).
        fsync: fsync after every append (see the module docstring).
        check: called on every record read back; raise `ArtefactError` to refuse one.
    """

    def __init__(self, path: str | Path, *, fsync: bool = True,
                 check: Callable[[Any, str], None] | None = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._check = check
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        """Append one record."""
        self.extend([record])

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records in one write (and one fsync)."""
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
        if not text:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())

    def read(self, *, repair: bool = False) -> list[Any]:
        """Every record; a torn last line is dropped (and cut off the file if `repair`)."""
        path = self.path
        if not path.exists():
            return []
        with self._lock:
            raw = path.read_bytes()
            lines = raw.split(b"\n")  # the last item is what follows the last newline (b"" when none)
            out: list[Any] = []
            offset = 0
            for no, line in enumerate(lines, 1):
                last = no == len(lines)
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError:  # bad JSON or bad UTF-8
                        if not last:
                            raise ArtefactError(f"{path} line {no}: not valid JSON (only a torn last line is "
                                                "repaired); fix or remove that line and resume") from None
                        if repair:
                            with path.open("r+b") as f:
                                f.truncate(offset)
                        return out
                    if self._check is not None:
                        self._check(record, f"{path} line {no}")
                    out.append(record)
                offset += len(line) + 1
            if repair and raw and not raw.endswith(b"\n"):  # a whole record whose newline did not make it
                with path.open("ab") as f:
                    f.write(b"\n")
            return out
