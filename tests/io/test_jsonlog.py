"""The one JSONL log: appends, torn-line repair, bad lines named, concurrent appends."""

from __future__ import annotations

import threading

import pytest

from detot_agent.errors import ArtefactError
from detot_agent.io.jsonlog import JsonlLog


def test_a_torn_last_line_is_dropped_and_repaired_so_appends_go_on(tmp_path):
    log = JsonlLog(tmp_path / "a.jsonl")
    log.extend([{"id": "1"}, {"id": "2"}])
    with log.path.open("ab") as f:
        f.write(b'{"id": "3", "ha')  # a crash mid-write
    assert [r["id"] for r in log.read()] == ["1", "2"]
    assert log.path.read_bytes().endswith(b'"ha')  # reading alone changes nothing
    assert [r["id"] for r in log.read(repair=True)] == ["1", "2"]
    log.append({"id": "3"})
    assert [r["id"] for r in log.read()] == ["1", "2", "3"]


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "1"}\nnot json\n{"id": "3"}\n')
    with pytest.raises(ArtefactError, match="line 2: not valid JSON"):
        JsonlLog(path).read()


def test_records_can_be_checked_on_read(tmp_path):
    def check(record, where):
        if "id" not in record:
            raise ArtefactError(f"{where}: no id")

    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "1"}\n{"x": 2}\n')
    with pytest.raises(ArtefactError, match="line 2: no id"):
        JsonlLog(path, check=check).read()


def test_concurrent_appends_never_interleave(tmp_path):
    log = JsonlLog(tmp_path / "a.jsonl", fsync=False)
    text = "x" * 5000

    def work(t: int) -> None:
        for i in range(50):
            log.append({"id": f"{t}-{i}", "text": text})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    records = log.read()
    assert len(records) == 200 and len({r["id"] for r in records}) == 200


def test_a_missing_file_reads_as_empty(tmp_path):
    assert JsonlLog(tmp_path / "none.jsonl").read() == []
