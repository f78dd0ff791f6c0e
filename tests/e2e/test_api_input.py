"""Bad requests to the running API get a 4xx that names the problem, and change nothing."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from microupdates.cli.api_client import OperatorApiError
from microupdates.cli.stack import Stack, StackError, StackPorts
from microupdates.device_agent.client import DeviceApiClient
from tests.stack_helpers import operator_headers, wait_for_deployment, write_recipe


def test_create_update_rejects_unresolved_script(stack):
    body = {"recipe": {"version": "1.0.0", "before": {"script": "scripts/stop.sh"}}}

    response = httpx.post(f"{stack.api_url}/api/v1/updates", json=body, headers=operator_headers(stack))

    assert response.status_code == 422
    assert response.json()["detail"].startswith("before.script (scripts/stop.sh) names a file the server cannot read")


def test_abort_of_device_outside_deployment_is_not_found(api, tmp_path, unique_name):
    name = f"member-{unique_name}"
    api.register_device(name, groups=[f"member-{unique_name}"])
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"run": "true"},
              "timeouts": {"check_in_deadline_seconds": 30}}
    deployment = api.deploy(api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))["id"])

    with pytest.raises(OperatorApiError, match=rf"HTTP 404: Device 'nobody-{unique_name}' is not part of deployment"):
        api.abort(deployment["id"], f"nobody-{unique_name}")
    api.abort(deployment["id"])


def test_stage_report_with_unknown_status_is_rejected(api, stack, tmp_path, unique_name):
    name = f"bogus-{unique_name}"
    token = api.register_device(name, groups=[f"bogus-{unique_name}"])["token"]
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"run": "true"}}
    deployment = api.deploy(api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))["id"])
    device_api = DeviceApiClient(stack.api_url, token)
    try:
        job = None
        deadline = time.monotonic() + 60
        while job is None and time.monotonic() < deadline:
            job = device_api.check_in("test", 10).job
        assert job is not None
        url = f"{stack.api_url}/device/v1/jobs/{job.job_id}/report"
        headers = {"Authorization": f"Bearer {token}"}

        bogus = httpx.post(url, json={"status": "bogus"}, headers=headers)
        huge = httpx.post(url, json={"status": "failed", "exit_code": 10**20}, headers=headers)
        valid = httpx.post(url, json={"status": "succeeded", "exit_code": 0}, headers=headers)
    finally:
        device_api.close()

    assert bogus.status_code == 422
    assert huge.status_code == 422
    assert valid.status_code == 200
    assert wait_for_deployment(api, deployment["id"], timeout=60)["status"] == "succeeded"


def test_remove_device_with_running_update_is_a_conflict(api, tmp_path, unique_name):
    name = f"busy-{unique_name}"
    api.register_device(name, groups=[f"busy-{unique_name}"])
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"run": "true"},
              "timeouts": {"check_in_deadline_seconds": 30}}
    deployment = api.deploy(api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))["id"])
    # The deployment freezes its devices when its workflow starts.
    deadline = time.monotonic() + 30
    while not api.read_deployment(deployment["id"])["devices"] and time.monotonic() < deadline:
        time.sleep(0.1)

    with pytest.raises(OperatorApiError, match=rf"HTTP 409: Device '{name}' is still updating in deployment\(s\) "
                                              rf"{deployment['id']}"):
        api.remove_device(name)
    api.abort(deployment["id"])
    wait_for_deployment(api, deployment["id"], timeout=60)
    api.remove_device(name)


def test_stack_refuses_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = StackPorts.free()
        ports.api = taken.getsockname()[1]

        with pytest.raises(StackError, match=rf"Port {ports.api} for api is already in use"):
            Stack(data_dir=tmp_path / "stack", ports=ports).start()

    assert not (tmp_path / "stack" / "temporal.log").exists(), "nothing starts when a port is taken"
