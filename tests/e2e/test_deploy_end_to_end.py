"""A deployment through the whole system: API, Temporal workflows, worker activities and agent subprocesses.

Everything is real: the Temporal dev server, HTTP on loopback, bash, files,
pip into a virtual environment and npm into a directory under each device root.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from microupdates.cli.api_client import OperatorApiError
from microupdates.device_agent.client import DeviceApiClient
from microupdates.protocol.device_api import StageReport
from tests.stack_helpers import wait_for_deployment, write_recipe

requires_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed on this machine")


def register(api, fleet, names: list[str], group: str, start: bool = True):
    devices = []
    for name in names:
        created = api.register_device(name, groups=[group])
        device = fleet.add(name, created["token"])
        if start:
            fleet.start(device)
        devices.append(device)
    return devices


@requires_npm
def test_deploy_runs_every_stage_on_real_agents(api, fleet, tmp_path, unique_name):
    group = f"e2e-{unique_name}"
    devices = register(api, fleet, [f"full-{unique_name}-a", f"full-{unique_name}-b"], group)
    recipe = {
        "version": "2.0.0",
        "comment": "every stage",
        "targets": {"groups": [group]},
        "before": {"run": 'mkdir -p "$MICROUPDATES_DEVICE_ROOT/var" && echo before-ran > "$MICROUPDATES_DEVICE_ROOT/var/before.txt"'},
        "files": [
            {"source": "app/run.sh", "destination": "/opt/app/run.sh", "mode": "0755"},
            {"source": "static", "destination": "/opt/app/static"},
        ],
        "dependencies": {
            "pip3": {"virtualenv": "/opt/app/venv", "packages": [{"name": "six", "version": "1.16.0"}]},
            "npm": {"directory": "/opt/app", "packages": [{"name": "is-number", "version": "7.0.0"}]},
        },
        "after": {"run": '"$MICROUPDATES_DEVICE_ROOT/opt/app/run.sh" && "$MICROUPDATES_DEVICE_ROOT/opt/app/venv/bin/python" -c "import six; print(six.__version__)"'},
    }
    files = {"app/run.sh": b"#!/bin/bash\necho app-script-ran\n", "static/index.html": b"<h1>hi</h1>\n",
             "static/css/site.css": b"body{}\n"}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe, files))

    deployment = api.deploy(update["id"])
    detail = wait_for_deployment(api, deployment["id"])

    assert detail["status"] == "succeeded", detail
    assert detail["device_status_counts"] == {"succeeded": 2}
    for device in devices:
        root = device.root
        assert (root / "var/before.txt").read_text() == "before-ran\n"
        assert stat.S_IMODE((root / "opt/app/run.sh").stat().st_mode) == 0o755
        assert (root / "opt/app/static/css/site.css").read_bytes() == b"body{}\n"
        package = json.loads((root / "opt/app/node_modules/is-number/package.json").read_text())
        assert package["version"] == "7.0.0"

        result = api.read_device_result(deployment["id"], device.name)
        assert [stage["stage"] for stage in result["stages"]] == ["before", "files", "dependencies", "after"]
        assert all(stage["status"] == "succeeded" for stage in result["stages"])
        after_output = result["stages"][-1]["steps"][0]["output"]
        assert "app-script-ran" in after_output
        assert "1.16.0" in after_output


def test_failing_stage_marks_device_failed(api, fleet, tmp_path, unique_name):
    group = f"fail-{unique_name}"
    register(api, fleet, [f"fail-{unique_name}"], group)
    recipe = {
        "version": "3.0.0",
        "targets": {"groups": [group]},
        "before": {"run": "echo starting; echo broken >&2; exit 3"},
        "after": {"run": "echo must-not-run"},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    deployment = api.deploy(update["id"])
    detail = wait_for_deployment(api, deployment["id"])

    assert detail["status"] == "failed"
    device = detail["devices"][0]
    assert device["status"] == "failed"
    assert device["stage"] == "before"
    assert "exited with status 3" in device["error"]
    result = api.read_device_result(deployment["id"], f"fail-{unique_name}")
    assert [stage["stage"] for stage in result["stages"]] == ["before"]
    assert result["stages"][0]["exit_code"] == 3
    assert "broken" in result["stages"][0]["steps"][0]["output"]


def test_device_that_never_checks_in_times_out(api, fleet, tmp_path, unique_name):
    group = f"silent-{unique_name}"
    register(api, fleet, [f"silent-{unique_name}"], group, start=False)
    recipe = {
        "version": "1.0.0",
        "targets": {"groups": [group]},
        "before": {"run": "true"},
        "timeouts": {"check_in_deadline_seconds": 3},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"], timeout=60)

    assert detail["status"] == "failed"
    assert detail["devices"][0]["status"] == "timed_out"
    assert "did not check in within 3 s" in detail["devices"][0]["error"]


def test_repeated_stage_report_is_recorded_once(api, stack, fleet, tmp_path, unique_name):
    """The test acts as the agent over the real device protocol and sends its report twice."""

    name = f"manual-{unique_name}"
    token = api.register_device(name, groups=[f"manual-{unique_name}"])["token"]
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"run": "true"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment = api.deploy(update["id"])

    device_api = DeviceApiClient(stack.api_url, token)
    try:
        job = None
        deadline = time.monotonic() + 60
        while job is None and time.monotonic() < deadline:
            job = device_api.check_in("test", 10).job
        assert job is not None and job.stage == "before"

        report = StageReport(status="succeeded", exit_code=0, duration_seconds=0.1)
        first = httpx.post(f"{stack.api_url}/device/v1/jobs/{job.job_id}/report",
                           json=report.model_dump(), headers={"Authorization": f"Bearer {token}"})
        second = httpx.post(f"{stack.api_url}/device/v1/jobs/{job.job_id}/report",
                            json=StageReport(status="failed", error="late duplicate").model_dump(),
                            headers={"Authorization": f"Bearer {token}"})
    finally:
        device_api.close()

    assert first.status_code == 200
    assert first.json()["detail"] == "recorded"
    assert second.status_code == 200
    assert second.json()["detail"] == "already recorded"
    detail = wait_for_deployment(api, deployment["id"], timeout=60)
    assert detail["status"] == "succeeded"
    stages = api.read_device_result(deployment["id"], name)["stages"]
    assert stages[0]["status"] == "succeeded"


def test_check_in_returns_job_before_long_poll_ends(api, stack, tmp_path, unique_name):
    name = f"poll-{unique_name}"
    token = api.register_device(name, groups=[f"poll-{unique_name}"])["token"]
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"run": "true"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    device_api = DeviceApiClient(stack.api_url, token)
    try:
        assert device_api.check_in("test", 0).job is None
        api.deploy(update["id"])
        # One long poll finds the check-in job queued (and completes it), then
        # the stage job queued by the workflow wakes it again.
        started = time.monotonic()
        job = device_api.check_in("test", 30).job
        waited = time.monotonic() - started
    finally:
        device_api.close()

    assert job is not None and job.stage == "before"
    assert waited < 25, f"the long poll was not woken by the queued job (waited {waited:.1f} s)"


def test_device_enrols_with_fleet_key(api, stack, fleet, tmp_path, unique_name):
    group = f"enrol-{unique_name}"
    key = api.create_enrolment_key(group)["key"]
    name = f"enrolled-{unique_name}"
    root = tmp_path / name
    process = subprocess.Popen(
        [sys.executable, "-m", "microupdates.device_agent.main", "--server-url", stack.api_url, "--enrolment-key", key, "--device-name", name,
         "--device-root", str(root), "--long-poll-seconds", "5"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(d["id"] == name for d in api.list_devices()):
            time.sleep(0.2)
        assert group in [d for d in api.list_devices() if d["id"] == name][0]["groups"]

        recipe = {"version": "1.0.0", "targets": {"groups": [group]},
                  "before": {"run": 'echo enrolled > "$MICROUPDATES_DEVICE_ROOT/marker"'}}
        update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
        detail = wait_for_deployment(api, api.deploy(update["id"])["id"], timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=15)

    assert detail["status"] == "succeeded"
    assert (root / "marker").read_text() == "enrolled\n"
    assert (root / "var/lib/microupdates-agent/credentials.json").exists()


def test_deploy_rejects_unknown_update_and_targets(api, tmp_path, unique_name):
    with pytest.raises(OperatorApiError, match=r"HTTP 404: Update 'upd-missing' not found"):
        api.deploy("upd-missing")

    recipe = {"version": "1.0.0", "targets": {"devices": [f"ghost-{unique_name}"]}, "before": {"run": "true"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    with pytest.raises(OperatorApiError, match=rf"HTTP 422: Unknown devices in the target: \['ghost-{unique_name}'\]"):
        api.deploy(update["id"])
    with pytest.raises(OperatorApiError, match=rf"HTTP 422: Unknown group in the target: 'nobody-{unique_name}'"):
        api.deploy(update["id"], groups=[f"nobody-{unique_name}"])


def test_register_device_twice_is_a_conflict(api, unique_name):
    api.register_device(f"twice-{unique_name}", groups=["g"])
    with pytest.raises(OperatorApiError, match=rf"HTTP 409: A device named 'twice-{unique_name}' already exists"):
        api.register_device(f"twice-{unique_name}", groups=["g"])


@pytest.mark.skipif(os.geteuid() != 0, reason="apt-get install needs root")
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is not installed (not a Debian-based system)")
def test_apt_installs_package_as_root(api, fleet, tmp_path, unique_name):
    if not list(Path("/var/lib/apt/lists").glob("*Packages*")):
        subprocess.run(["apt-get", "update", "-q"], check=True, stdin=subprocess.DEVNULL, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    group = f"apt-{unique_name}"
    register(api, fleet, [f"apt-{unique_name}"], group)
    recipe = {
        "version": "1.0.0",
        "targets": {"groups": [group]},
        "dependencies": {"apt": {"packages": [{"name": "hello"}]}},
        "after": {"run": "hello --version | head -n 1"},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    assert detail["status"] == "succeeded", detail
    result = api.read_device_result(detail["id"], f"apt-{unique_name}")
    assert "GNU Hello" in result["stages"][-1]["steps"][0]["output"]
    assert Path("/usr/bin/hello").exists()


def test_search_attributes_find_failed_devices(api, stack, fleet, tmp_path, unique_name):
    group = f"search-{unique_name}"
    good, bad = f"search-{unique_name}-good", f"search-{unique_name}-bad"
    register(api, fleet, [good, bad], group)
    recipe = {
        "version": "4.5.6",
        "targets": {"groups": [group]},
        "before": {"run": f'[ "$(basename "$MICROUPDATES_DEVICE_ROOT")" != "{bad}" ]'},
        "rollback": {"revert_files": False, "revert_packages": False},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment_id = api.deploy(update["id"])["id"]
    wait_for_deployment(api, deployment_id)

    query = f'MicroupdatesDeploymentId = "{deployment_id}" AND MicroupdatesStatus = "failed"'
    command = [str(Path(sys.executable).parent / "temporal"), "workflow", "list", "--address",
               stack.temporal_address, "--query", query, "--output", "json"]
    deadline = time.monotonic() + 20
    while True:
        listed = subprocess.run(command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert listed.returncode == 0, listed.stderr
        ids = sorted(item["execution"]["workflowId"] for item in json.loads(listed.stdout or "[]"))
        if ids or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    # The deployment itself ended failed too, because one of its devices failed.
    assert ids == [f"deployment-{deployment_id}", f"deployment-{deployment_id}-device-{bad}"]


def test_device_tokens_never_look_like_options(api, unique_name):
    tokens = [api.register_device(f"token-{unique_name}-{index}", groups=["tokens"])["token"] for index in range(40)]

    assert all(token.startswith("mu_") for token in tokens)
    assert len(set(tokens)) == len(tokens)


def test_report_after_stage_timed_out_is_rejected(api, stack, tmp_path, unique_name):
    """The test acts as an agent that goes silent past the heartbeat timeout, then reports."""

    name = f"late-{unique_name}"
    token = api.register_device(name, groups=[f"late-{unique_name}"])["token"]
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"run": "true"},
              "rollback": {"revert_files": False, "revert_packages": False}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment = api.deploy(update["id"], timeouts={"heartbeat_timeout_seconds": 10})

    device_api = DeviceApiClient(stack.api_url, token)
    try:
        job = None
        deadline = time.monotonic() + 60
        while job is None and time.monotonic() < deadline:
            job = device_api.check_in("test", 10).job
        assert job is not None
        detail = wait_for_deployment(api, deployment["id"], timeout=60)

        late = httpx.post(f"{stack.api_url}/device/v1/jobs/{job.job_id}/report",
                          json=StageReport(status="succeeded", exit_code=0).model_dump(),
                          headers={"Authorization": f"Bearer {token}"})
        again = httpx.post(f"{stack.api_url}/device/v1/jobs/{job.job_id}/report",
                           json=StageReport(status="succeeded", exit_code=0).model_dump(),
                           headers={"Authorization": f"Bearer {token}"})
    finally:
        device_api.close()

    assert detail["devices"][0]["status"] == "failed"
    assert "stopped reporting during the before stage" in detail["devices"][0]["error"]
    assert late.status_code == 409
    assert "had already ended on the server (timed out)" in late.json()["detail"]
    assert again.status_code == 409


def test_deploy_to_tag_reaches_only_tagged_devices(api, fleet, tmp_path, unique_name):
    tagged = f"tagged-{unique_name}"
    untagged = f"untagged-{unique_name}"
    for name, tags in ((tagged, [f"canary-{unique_name}"]), (untagged, [])):
        device = fleet.add(name, api.register_device(name, groups=[f"tags-{unique_name}"], tags=tags)["token"])
        fleet.start(device)
    recipe = {"version": "1.0.0", "before": {"run": "true"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    detail = wait_for_deployment(api, api.deploy(update["id"], tags=[f"canary-{unique_name}"])["id"])

    assert [row["device_id"] for row in detail["devices"]] == [tagged]
    assert detail["targets"]["tags"] == [f"canary-{unique_name}"]
    with pytest.raises(OperatorApiError, match=rf"HTTP 422: Unknown tag in the target: no device has the tag 'ghost-{unique_name}'"):
        api.deploy(update["id"], tags=[f"ghost-{unique_name}"])
