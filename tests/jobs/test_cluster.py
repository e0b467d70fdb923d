"""Cluster files are data: the ray up YAML validates offline, the DeepSpeed JSONs parse and fill in."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

# Private: Ray has no public call that validates a `ray up` YAML offline (ray.autoscaler.sdk only fills in defaults;
# `ray up` validates on its way to launching nodes), and these two are what `ray up` runs on the file.
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.config import load_config
from pipelines.train.worker import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RAY_UP = sorted(CLUSTER.glob("*.yaml"))
LOCK = ROOT / "requirements" / "lock.txt"


def _ray_up(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _gpu_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def _lock_pin(package: str) -> str:
    (line,) = [ln for ln in LOCK.read_text().splitlines() if ln.startswith(f"{package}==")]
    return line.partition("==")[2]


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_yaml_validates(path):
    config = prepare_config(_ray_up(path))
    validate_config(config)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_gpu_types_are_bounded_and_selectable(path):
    config = _ray_up(path)
    assert config["idle_timeout_minutes"] > 0
    gpu_types = _gpu_types(config)
    assert gpu_types
    accelerators = set()
    for name, node_type in gpu_types.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
        custom = [r for r in node_type["resources"] if r.startswith("accelerator_")]
        assert len(custom) == 1 and node_type["resources"][custom[0]] > 0, name
        accelerators.add(custom[0])
    assert len(accelerators) == len(gpu_types)  # one resource name per type, so a job can ask for exactly one
    # The name a job config gives is one the cluster has.
    cfg = load_config(None, [f"scaling.resources_per_worker={{{sorted(accelerators)[0]}: 1}}"])
    assert set(cfg.scaling.resources_per_worker) <= accelerators


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_docker_image_runs_the_locked_ray(path):
    docker = _ray_up(path)["docker"]
    images = [docker[key] for key in ("image", "head_image", "worker_image") if key in docker]
    assert images
    for image in images:
        match = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-py(\d)(\d+)(?:-[a-z0-9.]+)*", image)
        assert match, image
        assert match[1] == _lock_pin("ray"), f"{image} vs ray=={_lock_pin('ray')} in {LOCK.name}"
        assert (match[2], match[3]) == ("3", "11")  # the lock's --python-version


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_nodes_reach_s3_through_an_instance_profile_not_keys(path):
    text = path.read_text()
    assert not re.search(r"aws_(access_key_id|secret_access_key|session_token)", text, re.IGNORECASE)
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    for name, node_type in _ray_up(path)["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert re.fullmatch(r"arn:aws:iam::[^:]+:instance-profile/[\w+=,.@-]+", profile.get("Arn", "")), name


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_dashboard_listens_on_loopback_only(path):
    config = _ray_up(path)
    (head_start,) = [cmd for cmd in config["head_start_ray_commands"] if "ray start" in cmd]
    assert "--dashboard-host=127.0.0.1" in head_start.split()
    assert any("--address=$RAY_HEAD_IP:6379" in cmd for cmd in config["worker_start_ray_commands"])


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_setup_installs_cuda_torch_then_the_lock_without_its_cpu_torch(path, tmp_path):
    """Runs the setup's pip commands against the real lock, with a pip that only records its arguments."""
    (tmp_path / "lvpruning").symlink_to(ROOT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text('#!/bin/sh\necho "$*" >> "$HOME/pip.log"\n')
    (bin_dir / "pip").chmod(0o755)
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for cmd in _ray_up(path)["setup_commands"]:
        if "pip install" in cmd:
            subprocess.run(["bash", "-c", cmd], env=env, check=True)
    torch_install, lock_install = (tmp_path / "pip.log").read_text().splitlines()
    version = _lock_pin("torch").partition("+")[0]
    assert torch_install.startswith(f"install torch=={version} --index-url https://download.pytorch.org/whl/cu")
    constraints = lock_install.split()[lock_install.split().index("-c") + 1]
    kept = Path(constraints).read_text().splitlines()
    assert not [ln for ln in kept if ln.startswith("torch==")]
    assert f"ray=={_lock_pin('ray')}" in kept and lock_install.endswith(f"-e {tmp_path}/lvpruning")


@pytest.mark.parametrize("path", sorted((CLUSTER / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_fill_in_from_the_job_config(path):
    gpu = json.loads(path.read_text()).get("bf16", {}).get("enabled", False)
    cfg = load_config(None, [f"scaling.deepspeed_config={path}", f"scaling.use_gpu={gpu}"])
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert ds["train_micro_batch_size_per_gpu"] * cfg.scaling.num_workers * ds["gradient_accumulation_steps"] == (
        cfg.train.global_batch_size
    )
    assert ds["gradient_clipping"] == cfg.train.max_grad_norm


def test_bf16_deepspeed_config_without_gpus_fails_before_cluster_work():
    cfg = load_config(None, [f"scaling.deepspeed_config={CLUSTER / 'deepspeed' / 'zero2_bf16.json'}"])
    with pytest.raises(ValueError, match="bf16"):
        deepspeed_config(cfg)
