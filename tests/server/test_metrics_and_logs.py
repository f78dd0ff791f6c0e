"""Prometheus metrics of the API and the worker, and JSON logs, on the real stack."""

from __future__ import annotations

import io
import json
import logging

import httpx

from microupdates.logs import JsonFormatter
from tests.stack_helpers import wait_for_deployment, write_recipe


def metric_value(text: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    raise AssertionError(f"metric {prefix.strip()} not found")


def test_api_metrics_count_requests_and_check_ins(api, stack, unique_name):
    name = f"metrics-{unique_name}"
    token = api.register_device(name, groups=["metrics"])["token"]
    before = httpx.get(f"{stack.api_url}/metrics").text
    check_ins_before = 0.0
    if 'microupdates_device_check_ins_total{outcome="no_job"}' in before:
        check_ins_before = metric_value(before, "microupdates_device_check_ins_total", 'outcome="no_job"')

    response = httpx.post(f"{stack.api_url}/device/v1/check-in", json={"agent_version": "test", "wait_seconds": 0},
                          headers={"Authorization": f"Bearer {token}"})
    after = httpx.get(f"{stack.api_url}/metrics").text

    assert response.status_code == 200
    assert metric_value(after, "microupdates_device_check_ins_total", 'outcome="no_job"') == check_ins_before + 1
    assert metric_value(
        after, "microupdates_api_requests_total", 'method="POST",route="/device/v1/check-in",status="200"'
    ) >= 1
    assert "microupdates_long_polls_held " in after


def test_worker_serves_temporal_sdk_metrics(api, stack, fleet, tmp_path, unique_name):
    name = f"sdkmetrics-{unique_name}"
    fleet.start(fleet.add(name, api.register_device(name, groups=[name])["token"]))
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"run": "true"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    wait_for_deployment(api, api.deploy(update["id"])["id"])

    text = httpx.get(f"http://{stack.worker_metrics_address}/metrics", timeout=10).text

    assert "temporal_workflow_completed" in text
    assert "temporal_activity_execution_latency" in text


def test_json_logs_carry_ids_as_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("microupdates.test_json_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("Job %d failed", 7, extra={"deployment_id": "dep-1", "device_id": "gw-1"})
    finally:
        logger.removeHandler(handler)

    entry = json.loads(stream.getvalue())
    assert entry["message"] == "Job 7 failed"
    assert entry["level"] == "WARNING"
    assert entry["deployment_id"] == "dep-1"
    assert entry["device_id"] == "gw-1"


def test_progress_after_hand_out_skips_heartbeat(api, stack, tmp_path, unique_name):
    # The device is driven by hand over HTTP, so no agent of another test sends requests meanwhile.
    name = f"heartbeats-{unique_name}"
    token = api.register_device(name, groups=[name])["token"]
    headers = {"Authorization": f"Bearer {token}"}
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"run": "true"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment = api.deploy(update["id"])

    job = None
    for _ in range(10):
        response = httpx.post(f"{stack.api_url}/device/v1/check-in", headers=headers, timeout=30,
                              json={"agent_version": "test", "wait_seconds": 5})
        assert response.status_code == 200, response.text
        job = response.json()["job"]
        if job is not None:
            break
    assert job is not None and job["stage"] == "before"
    heartbeats = heartbeat_calls(stack)

    progress = httpx.post(f"{stack.api_url}/device/v1/jobs/{job['job_id']}/progress", headers=headers, timeout=30,
                          json={"output_tail": "", "wait_seconds": 0})
    after_progress = heartbeat_calls(stack)
    report = httpx.post(f"{stack.api_url}/device/v1/jobs/{job['job_id']}/report", headers=headers, timeout=30,
                        json={"status": "succeeded", "exit_code": 0, "duration_seconds": 0.1, "steps": []})

    assert progress.status_code == 200
    assert progress.json() == {"abort": False}
    # The hand-out sent a heartbeat moments before, so the progress report sent none.
    assert after_progress == heartbeats
    assert report.status_code == 200, report.text
    assert wait_for_deployment(api, deployment["id"])["status"] == "succeeded"


def heartbeat_calls(stack) -> float:
    text = httpx.get(f"{stack.api_url}/metrics", timeout=10).text
    return metric_value(text, "microupdates_api_temporal_calls_total", 'call="heartbeat_async_activity"')
