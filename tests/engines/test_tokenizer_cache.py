"""The disk cache of tokenizers converted from GGUF files: the same tokenizer back, rebuilt when the file
changes or the entry is damaged, skipped when the folder cannot be written."""

from __future__ import annotations

import os
import shutil

import pytest
from transformers import AutoTokenizer

from detot_agent.engines.tokenizer_cache import cache_root, cached_tokenizer, gguf_key

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom has 3 apples"}]


def _convert(path):
    return lambda: AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def _same(a, b) -> bool:
    text = "Tom has 3 apples and buys 4 more. <|user|> 12,345"
    return (a(text)["input_ids"] == b(text)["input_ids"]
            and a.apply_chat_template(MESSAGES, tokenize=False) == b.apply_chat_template(MESSAGES, tokenize=False)
            and a.all_special_ids == b.all_special_ids and a.eos_token_id == b.eos_token_id)


@pytest.fixture
def gguf(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("DETOT_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "model" / "tiny.gguf"
    copy.parent.mkdir()
    shutil.copy(tiny_gguf, copy)
    return copy


def test_the_second_load_comes_from_the_cache_and_is_the_same_tokenizer(gguf):
    first, hit = cached_tokenizer(gguf, _convert(gguf))
    assert not hit and (cache_root() / gguf_key(gguf) / "manifest.json").is_file()
    second, hit = cached_tokenizer(gguf, _convert(gguf))
    assert hit and _same(first, second)


def test_a_changed_file_gets_a_new_entry(gguf):
    cached_tokenizer(gguf, _convert(gguf))
    before = gguf_key(gguf)
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    assert gguf_key(gguf) != before
    _, hit = cached_tokenizer(gguf, _convert(gguf))
    assert not hit


def test_a_damaged_entry_is_rebuilt(gguf):
    first, _ = cached_tokenizer(gguf, _convert(gguf))
    entry = cache_root() / gguf_key(gguf)
    (entry / "tokenizer.json").write_text("{broken")
    again, hit = cached_tokenizer(gguf, _convert(gguf))
    assert not hit and _same(first, again)  # converted afresh (the checksum caught it) and cached again
    assert cached_tokenizer(gguf, _convert(gguf))[1]


def test_a_cache_folder_that_cannot_be_written_is_skipped(gguf, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DETOT_CACHE", str(blocker))
    tok, hit = cached_tokenizer(gguf, _convert(gguf))
    assert not hit and tok("Tom")["input_ids"]
