"""The two-node cluster shares no disk where the jobs write (``head``'s second node sees an empty tmpfs there), and
the one route across it: ``pipelines.cluster.for_every_node`` copies a folder only this node has to
``run.storage_path`` (S3), every node reads it back with ``pipelines.storage.local_copy``; with a local storage path
the job fails before any cluster work, naming the key. Each check runs as a driver joined to the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.jobs.conftest import BUCKET

DRIVER = """
import json, os, sys, hashlib
from pathlib import Path
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from pipelines.cluster import check_paths, for_every_node, nodes_not_seeing
from pipelines.config import load_config
from pipelines.job import resolve
from pipelines.storage import local_copy

ray.init(address=os.environ["RAY_ADDRESS"])
folder, storage = Path(sys.argv[1]), sys.argv[2]
here = ray.get_runtime_context().get_node_id()
other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)

@ray.remote(num_cpus=0)
def digest(path):
    path = Path(local_copy(path))
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

def on(node, path):
    return ray.get(digest.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(path))

out = {"blind": nodes_not_seeing(str(folder)), "code_blind": nodes_not_seeing(os.getcwd())}
out["here"], out["there"] = on(here, str(folder)), on(other, str(folder))
shared = for_every_node(str(folder), "data.image_root", storage)
out["shared"], out["there_shared"] = shared, on(other, shared)
out["again"] = for_every_node(str(folder), "data.image_root", storage)  # uploaded once
try:
    for_every_node(str(folder), "data.image_root", str(folder.parent / "runs"))
except ValueError as e:
    out["local_error"] = str(e)
cfg = load_config(None, [f"run.storage_path={folder.parent / 'runs'}", "mlflow.tracking_uri=http://127.0.0.1:1"])
try:
    check_paths(resolve(cfg))
except ValueError as e:
    out["check_error"] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_a_folder_only_the_driver_has_reaches_the_other_node_through_s3(head, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "b.txt").write_text("the second node reads this from S3")
    env = head.env | {"RAY_ADDRESS": head.gcs}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER), str(folder), f"s3://{BUCKET}/shared-test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert len(out["blind"]) == 1 and out["code_blind"] == []  # pytest's temp root is hidden, the checkout is not
    assert out["here"] is not None and set(out["here"]) == {"a.bin", "sub/b.txt"}
    assert out["there"] is None  # the second node does not see the driver's folder
    assert out["shared"].startswith(f"s3://{BUCKET}/shared-test/.lvpruning/shared/")
    assert out["shared"].endswith("/images") and out["again"] == out["shared"]
    assert out["there_shared"] == out["here"]  # byte for byte, through S3
    assert "data.image_root" in out["local_error"] and "cannot see it" in out["local_error"]
    assert out["check_error"].startswith("run.storage_path: ") and "cannot see it" in out["check_error"]
    print(f"copied to {out['shared']}; the local route fails: {out['check_error']}")
