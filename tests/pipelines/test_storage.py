"""Decoding a user's file: bytes that are not UTF-8, or text that is not JSON, name the file, the line and why. A
folder uploaded to S3 (moto) comes back byte for byte, downloaded once per content."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import boto3
import pytest

from pipelines.storage import NotUtf8Error, decode_utf8, is_complete, load_json, local_copy, upload_folder
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


def random_folder(root, seed: int) -> dict[str, bytes]:
    """A folder of random files (nested, one empty) under ``root``; {relative path: content}."""
    rng = random.Random(seed)
    files = {f"{'sub/' * rng.randint(0, 2)}f{i}.bin": rng.randbytes(rng.choice([0, 17, 5000])) for i in range(6)}
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    return files


def read_folder(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("seed", [0, 1])
def test_a_folder_uploaded_then_copied_back_is_the_same_and_is_fetched_again_only_when_it_changed(
    seed, s3_endpoint, tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # this test's own downloads cache
    (tmp_path / "tmp").mkdir()
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=f"copies{seed}")
    files = random_folder(tmp_path / "model", seed)
    uri = f"s3://copies{seed}/shared/abc/model"
    assert not is_complete(uri)
    upload_folder(tmp_path / "model", uri)
    assert is_complete(uri)
    copy = Path(local_copy(uri))
    assert copy.name == "model" and read_folder(copy) == files  # the marker object is not part of the copy
    assert local_copy(uri) == str(copy)  # cached: not downloaded twice
    assert local_copy(str(tmp_path / "model")) == str(tmp_path / "model")  # a local path is itself

    changed = dict(files) | {"f0.bin": b"new weights"}
    (tmp_path / "model" / "f0.bin").write_bytes(b"new weights")
    upload_folder(tmp_path / "model", uri)
    again = Path(local_copy(uri))
    assert again != copy and read_folder(again) == changed and read_folder(copy) == files
    with pytest.raises(FileNotFoundError, match="no objects"):
        local_copy(f"s3://copies{seed}/nothing/here")
