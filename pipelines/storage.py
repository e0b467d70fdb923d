"""Read bytes from a local path or ``s3://bucket/key`` with one call, and decode a user's file so that an error
names the file, the line and the problem.

S3 goes through boto3; ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) points it at an S3-compatible server
(MinIO, moto's server in tests), credentials and region come from the usual AWS environment/config chain.
A missing object raises ``FileNotFoundError`` on both backends, so callers can count it without knowing which.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

S3_SCHEME = "s3://"
COMPLETE = "COMPLETE"  # the last object upload_folder writes


def is_s3(path: str) -> bool:
    return path.startswith(S3_SCHEME)


def join(root: str, relative: str) -> str:
    """``root`` / ``relative`` for a local folder or an ``s3://bucket/prefix``."""
    if is_s3(root):
        return f"{root.rstrip('/')}/{relative.lstrip('/')}"
    return os.path.join(root, relative)


def split_s3(path: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = path[len(S3_SCHEME) :].partition("/")
    if not bucket or not key:
        raise ValueError(f"not an s3://bucket/key path: {path!r}")
    return bucket, key


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint the environment names (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``); None:
    AWS's own."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client() -> Any:
    """A boto3 S3 client for the endpoint the environment names now (AWS's default when none)."""
    return _client(s3_endpoint())


@cache
def _client(endpoint: str | None) -> Any:
    import boto3  # cached per endpoint: clients are thread-safe and slow to build

    return boto3.client("s3", endpoint_url=endpoint)


def ray_storage(path: str) -> tuple[str, Any]:
    """Ray's ``storage_path`` and ``storage_filesystem`` (a ``pyarrow.fs.FileSystem``, or None: Ray's default)
    for ``path``: local paths made absolute; ``s3://`` honours ``AWS_ENDPOINT_URL`` (MinIO, moto)."""
    if not is_s3(path):
        return str(Path(path).resolve()), None
    endpoint = s3_endpoint()
    if endpoint is None:
        return path, None
    import pyarrow.fs

    scheme, _, host = endpoint.partition("://")
    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=host, scheme=scheme, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    )
    return path.removeprefix("s3://"), fs


def read_bytes(path: str) -> bytes:
    """The content of a local file or S3 object; ``FileNotFoundError`` when it does not exist."""
    if not is_s3(path):
        with open(path, "rb") as f:
            return f.read()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(path)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(path) from e
        raise


class NotUtf8Error(ValueError):
    """Bytes of a user's file that are not UTF-8 text; the message is ``<file>:<line>: <problem>``."""

    def __init__(self, name: str, line: int, problem: str) -> None:
        super().__init__(f"{name}:{line}: {problem}")
        self.line, self.problem = line, problem


def decode_utf8(data: bytes, name: str, line: int = 1) -> str:
    """``data``, a whole file or its line number ``line``, as UTF-8 text; else ``NotUtf8Error`` naming the line
    and column of the first byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        column = e.start - data.rfind(b"\n", 0, e.start)
        problem = f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})"
        raise NotUtf8Error(name, line + data.count(b"\n", 0, e.start), problem) from None


def load_json(data: bytes, name: str, line: int = 1) -> Any:
    """``data``, a whole file or its line number ``line``, as JSON; else ``ValueError`` naming the file, line and
    problem (bytes that are not UTF-8, or not JSON)."""
    text = decode_utf8(data, name, line)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}:{line + e.lineno - 1}:{e.colno}: not valid JSON ({e.msg})") from None


def _listing(uri: str) -> list[tuple[str, int, str]]:
    """(key relative to ``uri``, size, ETag) of every object under the prefix ``uri``, sorted."""
    bucket, prefix = split_s3(uri.rstrip("/") + "/")
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    found = [(o["Key"][len(prefix) :], o["Size"], o["ETag"]) for page in pages for o in page.get("Contents", [])]
    return sorted(found)


def local_copy(path: str) -> str:
    """A local path with the content of ``path``: ``path`` itself when it is local; for an ``s3://`` folder, a copy
    downloaded once per machine (keyed by the objects' names and ETags, so a changed folder is fetched again) under
    ``$TMPDIR/lvpruning-cache/``, keeping the folder's name (a model's id). ``FileNotFoundError`` when the prefix
    holds nothing."""
    if not is_s3(path):
        return path
    listing = [item for item in _listing(path) if item[0] != COMPLETE]
    if not listing:
        raise FileNotFoundError(f"{path}: no objects under this prefix")
    digest = hashlib.sha256(json.dumps([path, listing]).encode()).hexdigest()[:16]
    cached = Path(tempfile.gettempdir()) / "lvpruning-cache" / digest / path.rstrip("/").rsplit("/", 1)[-1]
    if cached.is_dir():
        return str(cached)
    cached.parents[1].mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{digest}-", dir=cached.parents[1]))  # then one rename: never half
    bucket, prefix = split_s3(path.rstrip("/") + "/")
    for relative, _, _ in listing:
        target = partial / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        s3_client().download_file(bucket, prefix + relative, str(target))
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.rename(cached)
    except OSError:  # another process of this machine was first: its copy is the same
        shutil.rmtree(partial, ignore_errors=True)
    return str(cached)


def upload_folder(folder: Path, uri: str) -> None:
    """Every file under ``folder`` to the ``s3://`` prefix ``uri`` (eight at a time); ``COMPLETE`` last, so that a
    prefix with that object holds the whole folder."""
    bucket, prefix = split_s3(uri.rstrip("/") + "/")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    client = s3_client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), bucket, prefix + str(p.relative_to(folder))), files))
    client.put_object(Bucket=bucket, Key=prefix + COMPLETE, Body=b"")


def is_complete(uri: str) -> bool:
    """Whether :func:`upload_folder` finished writing ``uri``."""
    try:
        read_bytes(join(uri, COMPLETE))
    except FileNotFoundError:
        return False
    return True
