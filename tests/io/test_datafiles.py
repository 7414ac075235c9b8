"""Readers for GSM8K, MultiArith-style JSON and generic JSONL, on real sample lines."""

from __future__ import annotations

import json

import pytest

from detot_agent.errors import DataFileError
from detot_agent.io.datafiles import DataFormat, detect_format, read_exemplars


def test_gsm8k_real_lines(gsm8k_train, tmp_path):
    lines = gsm8k_train.read_text(encoding="utf-8").splitlines()[:3]
    p = tmp_path / "g.jsonl"
    p.write_text("\n".join(lines) + "\n")
    ex = read_exemplars(p)
    assert detect_format(p) is DataFormat.GSM8K
    assert [e.id for e in ex] == ["g:1", "g:2", "g:3"]
    assert ex[0].fields["answer"] == "72" and ex[1].fields["answer"] == "10"
    assert "<<" not in ex[0].fields["rationale"] and ex[0].fields["rationale"].endswith("The answer is 72.")
    assert ex[0].text.startswith("Natalia sold clips")


def test_multiarith_real_items(tmp_path, multiarith_file):
    items = json.loads(multiarith_file.read_text())[:2]
    p = tmp_path / "MultiArith.json"
    p.write_text(json.dumps(items))
    ex = read_exemplars(p)
    assert ex[0].id == "MultiArith:0" and ex[0].fields["answer"] == "39"
    assert ex[0].text.startswith("For Halloween")


def test_svamp_style_body_question(tmp_path):
    p = tmp_path / "svamp.json"
    p.write_text(json.dumps([{"ID": "chal-1", "Body": "Jack had 8 pens.", "Question": "How many now?",
                              "Equation": "( 8.0 - 2.0 )", "Answer": 6.0}]))
    ex = read_exemplars(p, fmt="multiarith")[0]
    assert (ex.id, ex.text, ex.fields["answer"]) == ("svamp:chal-1", "Jack had 8 pens. How many now?", "6")


def test_generic_jsonl_with_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "great film", "label": "pos", "uid": "a1"}\n\n{"text": "dull", "label": "neg"}\n')
    ex = read_exemplars(p, fmt="jsonl", text_field="text", answer_field="label", id_field="uid")
    assert [(e.id, e.fields["answer"]) for e in ex] == [("a1", "pos"), ("d:3", "neg")]


@pytest.mark.parametrize(("content", "message"), [
    (b'{"question": "q", "answer": "#### 1"}\n\xff\xfe\n', r"line 2: invalid UTF-8 at byte 0"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "bad\x01", "answer": "#### 2"}\n',
     r"line 2: control character"),
    (b'{"question": "q", "answer": "#### 1"}\n{oops\n', r"line 2: not valid JSON"),
    (b'{"question": "q", "answer": "no marker"}\n', r"line 1: GSM8K answer has no '#### <number>' line"),
    (b'{"answer": "#### 3"}\n', r"line 1: missing field 'question'"),
])
def test_bad_files_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataFileError, match=message):
        read_exemplars(p, fmt="gsm8k")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataFileError, match="data file not found"):
        read_exemplars(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataFileError, match="holds no records"):
        read_exemplars(tmp_path / "empty.jsonl")
