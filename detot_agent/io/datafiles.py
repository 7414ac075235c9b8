"""Reading problem files into exemplars: GSM8K JSONL, MultiArith-style JSON, generic JSONL.

Every reader names the file and the line (or item) of anything it cannot read:
invalid UTF-8, broken JSON, missing fields. Ids are stable: `<stem>:<line>` for
JSONL files, `<stem>:<iIndex>` for the MultiArith layout.

Example:
    >>> import json, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.jsonl"
    >>> _ = p.write_text(json.dumps({"question": "1+1?", "answer": "1+1 = <<1+1=2>>2.\\n#### 2"}) + "\\n")
    >>> ex = read_exemplars(p, fmt="gsm8k")[0]
    >>> ex.id, ex.fields["answer"], ex.fields["rationale"]
    ('train:1', '2', '1+1 = 2. The answer is 2.')
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from detot_agent.answers import format_number
from detot_agent.errors import DataFileError
from detot_agent.io.records import Exemplar

__all__ = ["DataFormat", "detect_format", "read_exemplars"]

_CALC = re.compile(r"<<[^<>]*>>")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class DataFormat(str, Enum):
    """Known file layouts."""

    GSM8K = "gsm8k"
    MULTIARITH = "multiarith"
    JSONL = "jsonl"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    for no, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataFileError(f"{path} line {no}: invalid UTF-8 at byte {exc.start}") from None
        if _CONTROL.search(text):
            raise DataFileError(f"{path} line {no}: control character {_CONTROL.search(text).group()!r}")  # type: ignore[union-attr]
        if text.strip():
            yield no, text


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for no, text in _lines(path):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = ("; the file looks like one JSON array (the MultiArith layout): pass --format multiarith"
                    if no == 1 and text.lstrip().startswith("[") else "")
            raise DataFileError(f"{path} line {no}: not valid JSON ({exc.msg} at column {exc.colno}){hint}") from None
        if not isinstance(obj, dict):
            hint = ("; a JSON array of problems is the MultiArith layout: pass --format multiarith"
                    if isinstance(obj, list) else "")
            raise DataFileError(f"{path} line {no}: expected a JSON object, got {type(obj).__name__}{hint}")
        yield no, obj


def _need(obj: dict[str, Any], key: str, path: Path, where: str) -> Any:
    if key not in obj:
        raise DataFileError(f"{path} {where}: missing field {key!r} (has: {', '.join(sorted(obj)) or 'none'})")
    return obj[key]


def detect_format(path: Path) -> DataFormat:
    """Guess the layout from the first record."""
    path = Path(path)
    head = path.read_bytes()[:4096].lstrip()
    if head.startswith(b"["):
        return DataFormat.MULTIARITH
    for _, obj in _jsonl(path):
        return DataFormat.GSM8K if {"question", "answer"} <= obj.keys() and "####" in str(obj["answer"]) \
            else DataFormat.JSONL
    raise DataFileError(f"{path} holds no records")


def read_exemplars(
    path: str | Path,
    *,
    fmt: DataFormat | str | None = None,
    text_field: str = "question",
    answer_field: str | None = "answer",
    id_field: str | None = None,
) -> list[Exemplar]:
    """Read a problem file into exemplars with fields `question`, `rationale`, `answer`.

    Args:
        path: the data file.
        fmt: `gsm8k`, `multiarith`, `jsonl`, or None to detect from the content.
        text_field: (jsonl) field embedded and used as the question.
        answer_field: (jsonl) field holding the answer, if any.
        id_field: (jsonl) field holding a stable id; default `<stem>:<line>`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file not found: {path}")
    form = DataFormat(fmt) if fmt else detect_format(path)
    out: list[Exemplar] = []
    if form is DataFormat.GSM8K:
        for no, obj in _jsonl(path):
            q = str(_need(obj, "question", path, f"line {no}")).strip()
            full = str(_need(obj, "answer", path, f"line {no}"))
            if "####" not in full:
                raise DataFileError(f"{path} line {no}: GSM8K answer has no '#### <number>' line")
            body, _, final = full.rpartition("####")
            answer = format_number(final)
            rationale = " ".join(_CALC.sub("", body).split())
            out.append(Exemplar(id=f"{path.stem}:{no}", text=q, fields={
                "question": q, "rationale": f"{rationale} The answer is {answer}.", "answer": answer}))
    elif form is DataFormat.MULTIARITH:
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataFileError(f"{path}: invalid UTF-8 at byte {exc.start}") from None
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(items, list):
            raise DataFileError(f"{path}: expected a JSON list of problems")
        for i, obj in enumerate(items):
            where = f"item {i}"
            if not isinstance(obj, dict):
                raise DataFileError(f"{path} {where}: expected an object")
            if "sQuestion" in obj:
                q = str(obj["sQuestion"]).strip()
                sols = _need(obj, "lSolutions", path, where)
                answer = format_number(sols[0] if isinstance(sols, list) and sols else sols)
                eq = (obj.get("lEquations") or [""])[0]
            else:
                q = f"{str(_need(obj, 'Body', path, where)).strip()} {str(_need(obj, 'Question', path, where)).strip()}"
                answer = format_number(_need(obj, "Answer", path, where))
                eq = str(obj.get("Equation", ""))
            ident = obj.get("iIndex", obj.get("ID", i))
            rationale = f"{eq.strip()}. The answer is {answer}." if eq else f"The answer is {answer}."
            out.append(Exemplar(id=f"{path.stem}:{ident}", text=q, fields={
                "question": q, "rationale": rationale, "answer": answer}))
    else:
        for no, obj in _jsonl(path):
            text = str(_need(obj, text_field, path, f"line {no}"))
            if not text.strip():
                raise DataFileError(f"{path} line {no}: field {text_field!r} is empty")
            fields = {k: v for k, v in obj.items()}
            fields.setdefault("question", text)
            if answer_field and answer_field in obj:
                fields["answer"] = str(obj[answer_field])
            ident = str(obj[id_field]) if id_field and id_field in obj else f"{path.stem}:{no}"
            out.append(Exemplar(id=ident, text=text, fields=fields))
    if not out:
        raise DataFileError(f"{path} holds no records")
    return out
