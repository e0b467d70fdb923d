"""The frontier as a user sees it: ``jobs/frontier.py`` against an ``mlflow server``, then the links it prints and
its PNG in the MLflow UI in headless chromium (a screenshot is saved under ``$PYTEST_ARTIFACTS`` or
``test-artifacts/``)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.browser import browser_binaries, open_artifact, page_text, screenshot_path
from tests.pipelines.test_frontier import log_setting, setting_metrics

JOB = Path(__file__).resolve().parents[2] / "jobs" / "frontier.py"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_frontier_png_renders_in_the_mlflow_ui(mlflow_server, tmp_path):
    browser_binaries()  # fail early, with the install command, when chromium is missing
    client = MlflowClient(mlflow_server)
    name = f"frontier-ui-{uuid.uuid4().hex[:8]}"
    experiment = client.create_experiment(name)
    log_setting(client, experiment, "none", "none", setting_metrics(8.6, 80, 86, prefill_ms=90))
    for ratios, tflops, acc in [([0.6, 0.4, 0.2], 4.5, 78), ([0.5, 0.3, 0.1], 3.7, 77), ([0.45, 0.25, 0.05], 3.0, 74)]:
        log_setting(
            client, experiment, "lv", "lvpruning", setting_metrics(tflops, acc, acc + 6, 10 * tflops), ratios=ratios
        )
        log_setting(
            client,
            experiment,
            "random-setting",
            "random",
            setting_metrics(tflops - 0.3, acc - 8, acc - 2),
            ratios=ratios,
        )

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    argv = [sys.executable, str(JOB), "--experiments", name, "--tracking-uri", mlflow_server]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = client.search_runs([experiment], filter_string="tags.`lvpruning.kind` = 'frontier'")
    assert f"frontier run {run.info.run_id}" in done.stdout

    # The printed links open MLflow's model-training view (the runs, the run's page); the bare experiment link
    # opens its GenAI view, where the runs are not listed.
    links = {
        k: v.strip() for k, v in (line.strip().split(": ", 1) for line in done.stdout.splitlines() if ": http" in line)
    }
    assert links["runs"] == f"{mlflow_server}/#/experiments/{experiment}?workflowType=machine_learning"
    text, landed = page_text(links["runs"], "random-setting")
    assert "random-setting" in text and "/runs" in landed, (text[:500], landed)
    text, _ = page_text(links["run"], run.info.run_id)
    assert run.info.run_id in text and "Artifacts" in text, text[:500]
    text, landed = page_text(links["runs"].split("?")[0], "Usage")  # its overview
    assert "random-setting" not in text and "genai" in landed, (text[:500], landed)

    shot = screenshot_path("frontier-ui.png")
    facts = open_artifact(mlflow_server, experiment, run.info.run_id, "frontier.png", shot)
    print(f"screenshot: {shot} ({facts['url']})")
    with Image.open(client.download_artifacts(run.info.run_id, "frontier.png", str(tmp_path))) as png:
        assert (facts["natural_width"], facts["natural_height"]) == png.size  # the artifact itself, decoded
    assert facts["complete"] and facts["width"] > 200 and facts["height"] > 100
    with Image.open(shot) as image:
        assert image.size[0] > 0 and image.size[1] > 0
