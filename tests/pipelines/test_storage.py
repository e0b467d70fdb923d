"""Decoding a user's file: bytes that are not UTF-8, or text that is not JSON, name the file, the line and why."""

from __future__ import annotations

import pytest

from pipelines.storage import NotUtf8Error, decode_utf8, load_json
from tests.bad_bytes import SEEDS, not_utf8, not_utf8_problem


@pytest.mark.parametrize("seed", SEEDS)
def test_bytes_that_are_not_utf8_name_the_line_and_column(seed):
    bad = not_utf8(seed)
    data = b'{"a": 1}\n\n  ' + bad + b"\n[2]\n"
    with pytest.raises(NotUtf8Error) as info:
        decode_utf8(data, "answers.jsonl")
    assert str(info.value) == f"answers.jsonl:3: {not_utf8_problem(b'  ' + bad)}"  # the column counts the indent
    assert (info.value.line, info.value.problem) == (3, not_utf8_problem(b"  " + bad))
    with pytest.raises(NotUtf8Error, match=r"^answers\.jsonl:7: not UTF-8 text \(byte 0x"):
        decode_utf8(bad, "answers.jsonl", line=7)  # one line of a file, numbered by the caller


def test_json_errors_name_the_line_and_column():
    assert load_json(b'{"a": [1,\n 2]}', "f.json") == {"a": [1, 2]}
    with pytest.raises(ValueError, match=r"^f\.json:2:5: not valid JSON \(Expecting value\)$"):
        load_json(b'{"a":\n [1,]}', "f.json")
    with pytest.raises(ValueError, match=r"^q\.jsonl:5:1: not valid JSON"):
        load_json(b"not json", "q.jsonl", line=5)
    with pytest.raises(NotUtf8Error, match=r"^q\.jsonl:5: not UTF-8 text"):
        load_json(not_utf8(0), "q.jsonl", line=5)
