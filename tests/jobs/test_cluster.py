"""Cluster files are data: the ray up YAML validates offline, the DeepSpeed JSONs parse and fill in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.config import load_config
from pipelines.train_loop import deepspeed_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_ray_up_yaml_validates(path):
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}


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
