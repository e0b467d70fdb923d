"""LLaVA instruction data through Ray Data: rows, skip counts, the threshold, s3:// images, collate."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
import torch
from PIL import Image
from transformers import LlavaProcessor

from lvpruning.tiny import build_processor, tiny_llava_config
from pipelines.conversation import IGNORE_INDEX, encode, parse_turns, render, split_supervised
from pipelines.images import expand_to_square
from pipelines.train.collate import PaddingCollateFn, collate
from pipelines.train.data import RECORD_SKIPS, build_instruct_dataset, read_records
from tests.bad_bytes import SEEDS, not_utf8, not_utf8_problem

WORDS = "what color is cube how many spheres there red green blue two three".split()
MAX_LENGTH = 256
N_GOOD = 12
BUCKET = "instruct"
FAST = {"max_length": MAX_LENGTH, "batch_size": 4, "concurrency": 2, "num_cpus": 1}


def good_record(i: int) -> dict:
    turns = [
        {"from": "human", "value": "what color is the cube ?\n<image>" if i % 2 else "<image>\nwhat color ?"},
        {"from": "gpt", "value": ["red", "green", "blue"][i % 3]},
    ]
    if i % 4 == 0:  # some two-round conversations
        turns += [{"from": "human", "value": "how many spheres ?"}, {"from": "gpt", "value": "two spheres ."}]
    return {"id": f"good-{i}", "image": f"img/good_{i}.png", "conversations": turns}


def bad_records() -> dict[str, list[dict]]:
    """Records that must be skipped, by the reason they are counted under."""
    ok = [{"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": "red"}]
    return {
        "text_only": [{"id": "text", "conversations": [{"from": "human", "value": "hi"}, ok[1]]}],
        "malformed_conversation": [
            {"id": "order", "image": "img/good_0.png", "conversations": ok[::-1]},
            {
                "id": "empty",
                "image": "img/good_0.png",
                "conversations": [ok[0], {"from": "gpt", "value": ""}],
            },
            {"id": "notlist", "image": "img/good_0.png", "conversations": "<image>\nwhat color ? red"},
        ],
        "bad_image_placeholder": [
            {
                "id": "none",
                "image": "img/good_0.png",
                "conversations": [{"from": "human", "value": "hi"}, ok[1]],
            },
            {
                "id": "two",
                "image": "img/good_0.png",
                "conversations": [{"from": "human", "value": "<image>" * 2}, ok[1]],
            },
        ],
        "too_long": [
            {
                "id": "long",
                "image": "img/good_0.png",
                "conversations": [ok[0], {"from": "gpt", "value": "red " * 300}],
            }
        ],
        "missing_image": [{"id": "missing", "image": "img/nowhere.png", "conversations": ok}],
        "corrupt_image": [{"id": "corrupt", "image": "img/corrupt.png", "conversations": ok}],
    }


def write_images(root: Path) -> None:
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        size = (24 + 4 * (i % 3), 32 - 4 * (i % 2), 3)  # (H, W, 3), mostly not square
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / "img" / f"good_{i}.png")
    png = (root / "img" / "good_0.png").read_bytes()
    (root / "img" / "corrupt.png").write_bytes(png[: len(png) // 2])  # truncated: the header opens, pixels don't


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    progress_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # quiet test logs
    yield
    ctx.enable_progress_bars = progress_bars
    ray.shutdown()


@pytest.fixture(scope="module")
def processor() -> LlavaProcessor:
    return build_processor(tiny_llava_config(), WORDS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train.json`` (good records interleaved with one group per skip reason) and its images."""
    root = tmp_path_factory.mktemp("instruct")
    write_images(root)
    records = [good_record(i) for i in range(N_GOOD)]
    for i, group in enumerate(bad_records().values()):
        records[2 * i + 1 : 2 * i + 1] = group
    (root / "train.json").write_text(json.dumps(records))
    return root


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["id"]: row for row in rows}


def test_rows_are_model_inputs_and_every_skip_is_counted(ray_cluster, processor, data: Path) -> None:
    ds, ledger = build_instruct_dataset(str(data / "train.json"), str(data), processor, max_bad_fraction=0.5, **FAST)
    rows = ds.take_all()
    stats = ledger.check()

    expected = {reason: len(group) for reason, group in bad_records().items()}
    assert dict(stats.counts) == expected and tuple(stats.counts) == RECORD_SKIPS
    assert stats.total == N_GOOD + sum(expected.values())
    assert (stats.kept, stats.pending, stats.errors) == (N_GOOD, 0, sum(expected.values()) - 1)
    assert [row["id"] for row in rows] == [f"good-{i}" for i in range(N_GOOD)]  # file order, deterministic
    assert "missing_image=1" in stats.summary() and "text_only=1" in stats.summary()

    # Each row is what encode() makes of the record and its image padded to a square with the mean colour.
    record = good_record(4)
    image = Image.open(data / record["image"]).convert("RGB")
    background = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    expected_row = encode(processor, render(parse_turns(record["conversations"])), expand_to_square(image, background))
    row = by_id(rows)["good-4"]
    for name in ("input_ids", "attention_mask", "labels", "pixel_values"):
        np.testing.assert_array_equal(np.asarray(row[name]), expected_row[name])
    answers = [processor.tokenizer.decode(run, skip_special_tokens=True) for run in split_supervised(row["labels"])]
    assert answers == [record["conversations"][1]["value"], "two spheres ."]
    assert max(len(r["input_ids"]) for r in rows) <= MAX_LENGTH


def test_jsonl_gives_the_same_rows_and_counts_unparsable_lines(ray_cluster, processor, data: Path) -> None:
    records = json.loads((data / "train.json").read_text())
    lines = [json.dumps(r).encode() for r in records] + [b"{not json", not_utf8(0)]
    lines.insert(3, not_utf8(1))
    (data / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds_json, _ = build_instruct_dataset(str(data / "train.json"), str(data), processor, max_bad_fraction=0.5, **FAST)
    ds, ledger = build_instruct_dataset(str(data / "train.jsonl"), str(data), processor, max_bad_fraction=0.5, **FAST)
    rows, reference = ds.take_all(), ds_json.take_all()
    assert ledger.stats().counts["malformed_conversation"] == len(bad_records()["malformed_conversation"]) + 3
    assert [r["id"] for r in rows] == [r["id"] for r in reference]
    np.testing.assert_array_equal(rows[0]["pixel_values"], reference[0]["pixel_values"])


@pytest.mark.parametrize("seed", SEEDS)
def test_a_record_that_is_not_utf8_is_skipped_and_named(tmp_path: Path, caplog, seed: int) -> None:
    """A ``.jsonl`` line of such bytes is one malformed record (``None``, counted by the text stage); a ``.json``
    file of them fails, naming the file and line."""
    bad = not_utf8(seed)
    good = [good_record(i) for i in range(3)]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([json.dumps(good[0]).encode(), bad, b"", *(json.dumps(r).encode() for r in good[1:])]))
    with caplog.at_level(logging.WARNING, logger="pipelines.train.data"):
        records = read_records(str(path))
    assert records == [good[0], None, *good[1:]]
    assert f"{path}:2: {not_utf8_problem(bad)}" in caplog.text
    whole = tmp_path / "train.json"
    whole.write_bytes(b"[\n" + json.dumps(good[0]).encode() + b",\n" + bad + b"\n]")
    with pytest.raises(ValueError, match=re.escape(f"{whole}:3: {not_utf8_problem(bad)}")):
        read_records(str(whole))


def test_text_errors_over_the_threshold_fail_before_any_image_is_read(ray_cluster, processor, data: Path) -> None:
    with pytest.raises(ValueError, match="too many unusable records") as info:
        build_instruct_dataset(str(data / "train.json"), str(data), processor, max_bad_fraction=0.1, **FAST)
    message = str(info.value)
    assert "malformed_conversation=3" in message and "bad_image_placeholder=2" in message
    assert "max_bad_fraction=10.00%" in message


def test_image_errors_over_the_threshold_fail_while_streaming(ray_cluster, processor, data: Path) -> None:
    groups = bad_records()
    records = [good_record(i) for i in range(N_GOOD)] + groups["missing_image"] + groups["corrupt_image"]
    (data / "images_bad.json").write_text(json.dumps(records))
    ds, ledger = build_instruct_dataset(str(data / "images_bad.json"), str(data), processor, **FAST)
    with pytest.raises(ValueError, match="too many unusable records") as info:
        ds.take_all()
    # The two bad images are the last records, 12 and 13: one batch of the last block (from_items splits the 14 rows
    # into blocks of 4, 4, 3, 3), so both are counted when the threshold fails, whatever the other tasks got to.
    message = str(info.value)
    assert "too many unusable records: 2 errors in 14 image records (14.29% > max_bad_fraction=1.00%)" in message
    counts = r"; 14 records, \d+ kept(, \d+ pending)?, skipped: missing_image=1, corrupt_image=1$"
    assert re.search(counts, message, re.MULTILINE), message
    assert ledger.stats().counts == {**dict.fromkeys(RECORD_SKIPS, 0), "missing_image": 1, "corrupt_image": 1}
    with pytest.raises(ValueError, match="max_bad_fraction=1.00%"):
        ledger.check()


def test_s3_images_give_the_same_tensors_as_local(ray_cluster, processor, data: Path, s3_endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    for path in (data / "img").iterdir():
        s3.upload_file(str(path), BUCKET, f"llava/img/{path.name}")
    s3.upload_file(str(data / "train.json"), BUCKET, "llava/train.json")
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_endpoint

    local, _ = build_instruct_dataset(str(data / "train.json"), str(data), processor, max_bad_fraction=0.5, **FAST)
    remote, ledger = build_instruct_dataset(
        f"s3://{BUCKET}/llava/train.json", f"s3://{BUCKET}/llava", processor, max_bad_fraction=0.5, **FAST
    )
    local_rows, remote_rows = by_id(local.take_all()), by_id(remote.take_all())
    assert remote_rows.keys() == local_rows.keys() and len(remote_rows) == N_GOOD
    for key, row in remote_rows.items():
        for name in ("input_ids", "labels", "pixel_values"):
            np.testing.assert_array_equal(row[name], local_rows[key][name])
    stats = ledger.check()
    assert (stats.counts["missing_image"], stats.counts["corrupt_image"]) == (1, 1)


def test_collate_pads_right_for_training_and_left_for_generation() -> None:
    pixels = np.zeros((3, 4, 4), np.float32)
    rows = [
        {"input_ids": [1, 5, 6], "attention_mask": [1, 1, 1], "labels": [-100, 6, 2], "pixel_values": pixels},
        {"input_ids": [1, 7], "attention_mask": [1, 1], "labels": [-100, 7], "pixel_values": pixels + 1},
    ]
    batch = collate(rows, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 2], [-100, 7, IGNORE_INDEX]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"][1].eq(1).all()
    assert all(batch[k].dtype == torch.int64 for k in ("input_ids", "attention_mask", "labels"))

    left = collate(rows, pad_token_id=3, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 5, 6], [3, 1, 7]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    columns = {name: np.array([np.asarray(r[name]) for r in rows], dtype=object) for name in rows[0]}
    assert collate(columns, pad_token_id=3)["input_ids"].tolist() == batch["input_ids"].tolist()


def test_collate_as_ray_collate_fn(ray_cluster, processor, data: Path) -> None:
    ds, _ = build_instruct_dataset(str(data / "train.json"), str(data), processor, max_bad_fraction=0.5, **FAST)
    pad = processor.tokenizer.pad_token_id
    batches = list(ds.iter_torch_batches(batch_size=5, collate_fn=PaddingCollateFn(pad)))
    assert [b["input_ids"].shape[0] for b in batches] == [5, 5, 2]
    for batch in batches:
        lengths = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"].shape[1] == lengths.max()
        padded = batch["attention_mask"] == 0
        assert (batch["input_ids"][padded] == pad).all() and (batch["labels"][padded] == IGNORE_INDEX).all()
        assert batch["pixel_values"].shape[1:] == (3, 32, 32)
