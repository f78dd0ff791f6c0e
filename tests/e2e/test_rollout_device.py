"""Per-device rollout behaviour with real agents: skipped devices, retried transient failures, the check-in deadline."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from microupdates.cli.api_client import OperatorApiError
from microupdates.device_agent.client import DeviceApiClient
from microupdates.protocol.device_api import DeviceFacts
from tests.stack_helpers import wait_for_deployment, write_recipe

requires_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed on this machine")

# Bound on polls for a state the deployment passes through on its way.
STATE_WAIT_SECONDS = 60.0


def register(api, fleet, name: str, group: str):
    created = api.register_device(name, groups=[group])
    return fleet.add(name, created["token"])


def start_without_npm(fleet, device, tmp_path: Path) -> None:
    """Start an agent whose stages see a PATH with python3 and bash but no npm, apt-get or dpkg."""

    bin_dir = tmp_path / f"{device.name}-bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("bash"), bin_dir / "bash")
    # The interpreter itself, not a wrapper such as a pyenv shim that needs more of the PATH.
    os.symlink(os.path.realpath(sys.executable), bin_dir / "python3")
    config = tmp_path / f"{device.name}-agent.yaml"
    # PATH is passed from the agent's environment into the stage environment, and so into the facts probes.
    config.write_text("pass_environment: [PATH]\n")
    fleet.start(device, extra_args=["--config", str(config)], environment={"PATH": str(bin_dir)})


def wait_until(condition, description: str):
    deadline = time.monotonic() + STATE_WAIT_SECONDS
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{description} did not happen within {STATE_WAIT_SECONDS} s")


def artifact_path(stack, sha256: str) -> Path:
    # The stack keeps artifacts in the default place under its data directory.
    return stack.data_dir / "artifacts" / sha256[:2] / sha256


@requires_npm
def test_device_without_npm_skipped_while_other_succeeds(api, fleet, tmp_path, unique_name):
    group = f"skip-{unique_name}"
    capable = register(api, fleet, f"npm-{unique_name}", group)
    lacking = register(api, fleet, f"nonpm-{unique_name}", group)
    fleet.start(capable)
    start_without_npm(fleet, lacking, tmp_path)
    recipe = {
        "version": "1.0.0",
        "targets": {"groups": [group]},
        "before": {"run": 'mkdir -p "$MICROUPDATES_DEVICE_ROOT/var" && touch "$MICROUPDATES_DEVICE_ROOT/var/before-ran"'},
        "dependencies": {"npm": {"directory": "/opt/app", "packages": [{"name": "is-number", "version": "7.0.0"}]}},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    deployment = api.deploy(update["id"])
    detail = wait_for_deployment(api, deployment["id"])

    assert detail["status"] == "succeeded", detail
    assert detail["device_status_counts"] == {"succeeded": 1, "skipped": 1}
    rows = {row["device_id"]: row for row in detail["devices"]}
    assert rows[capable.name]["status"] == "succeeded"
    assert rows[lacking.name]["status"] == "skipped"
    assert rows[lacking.name]["error"] == "npm is not installed on this device"
    assert (capable.root / "opt/app/node_modules/is-number/package.json").is_file()
    # Nothing ran on the skipped device: no stage job, no before command, no rollback.
    assert api.read_device_result(deployment["id"], lacking.name)["stages"] == []
    assert not (lacking.root / "var/before-ran").exists()

    capable_facts = api.read_device(capable.name)["facts"]
    lacking_facts = api.read_device(lacking.name)["facts"]
    assert "npm" in capable_facts["package_managers"]
    assert "npm" not in lacking_facts["package_managers"]
    assert "apt" not in lacking_facts["package_managers"]
    assert "python3" in lacking_facts["package_managers"]
    assert lacking_facts["python_version"] is not None
    assert lacking_facts["architecture"]


def test_stored_facts_skip_device_without_check_in(api, stack, tmp_path, unique_name):
    name = f"stored-{unique_name}"
    token = api.register_device(name, groups=[name])["token"]
    device_api = DeviceApiClient(stack.api_url, token)
    try:
        device_api.check_in("test", 0, DeviceFacts(package_managers=["apt", "python3"]))
    finally:
        device_api.close()
    recipe = {
        "version": "1.0.0",
        "targets": {"devices": [name]},
        "dependencies": {"pip3": {"packages": [{"name": "six"}]}},
        "timeouts": {"check_in_deadline_seconds": 600},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    # The device never checks in again; its stored facts alone decide.
    deployment = api.deploy(update["id"])
    detail = wait_for_deployment(api, deployment["id"], timeout=60)

    row = detail["devices"][0]
    assert row["status"] == "skipped"
    assert row["error"] == "pip is not installed for `python3` on this device (`python3 -m pip` does not run)"
    assert detail["status"] == "succeeded"
    assert api.read_device_result(deployment["id"], name)["stages"] == []


def test_unavailable_artifact_retried_until_restored(api, fleet, stack, tmp_path, unique_name):
    group = f"retry-{unique_name}"
    device = register(api, fleet, f"retry-{unique_name}", group)
    fleet.start(device)
    content = f"retried {unique_name}\n".encode()
    recipe = {
        "version": "1.0.0",
        "targets": {"groups": [group]},
        "files": [{"source": "hello.txt", "destination": "/opt/retry/hello.txt"}],
        "retries": {"max_attempts": 3, "initial_interval_seconds": 5},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe, {"hello.txt": content}))
    stored = artifact_path(stack, update["recipe"]["files"][0]["artifact"])
    hidden = stored.with_name(stored.name + ".hidden")
    # The artifact disappears from the server's store, so every download returns 404.
    os.replace(stored, hidden)
    try:
        deployment = api.deploy(update["id"])

        def first_attempt_failed():
            try:
                stages = api.read_device_result(deployment["id"], device.name)["stages"]
            except OperatorApiError as error:
                # 404 until the workflow has frozen the deployment's targets.
                if error.status_code != 404:
                    raise
                return []
            return [stage for stage in stages if stage["stage"] == "files" and stage["status"] == "failed"]

        failed = wait_until(first_attempt_failed, "a failed first files attempt")
    finally:
        os.replace(hidden, stored)
    detail = wait_for_deployment(api, deployment["id"])

    assert failed[0]["attempt"] == 1
    assert "HTTP 404" in failed[0]["error"]
    assert detail["status"] == "succeeded", detail
    row = detail["devices"][0]
    assert row["status"] == "succeeded"
    assert row["stage_attempts"] == {"files": 2}
    result = api.read_device_result(deployment["id"], device.name)
    files_attempts = [(stage["attempt"], stage["status"]) for stage in result["stages"] if stage["stage"] == "files"]
    assert files_attempts == [(1, "failed"), (2, "succeeded")]
    assert (device.root / "opt/retry/hello.txt").read_bytes() == content


def test_interrupted_stage_runs_again_after_restart(api, fleet, tmp_path, unique_name):
    group = f"interrupted-{unique_name}"
    device = register(api, fleet, f"interrupted-{unique_name}", group)
    fleet.start(device)
    # The first run records its pid and sleeps; a second run finds the marker and succeeds.
    script = (
        'marker="$MICROUPDATES_DEVICE_ROOT/first-run"; '
        'if [ -e "$marker" ]; then echo second-run; exit 0; fi; '
        'touch "$marker"; echo $$ > "$MICROUPDATES_DEVICE_ROOT/running"; sleep 300'
    )
    recipe = {
        "version": "1.0.0",
        "targets": {"groups": [group]},
        "before": {"run": script, "timeout_seconds": 600},
        "retries": {"max_attempts": 2, "initial_interval_seconds": 1},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment = api.deploy(update["id"])
    wait_until(lambda: (device.root / "running").exists(), "the first run of the before stage")

    fleet.stop(device, kill=True)
    fleet.start(device)
    detail = wait_for_deployment(api, deployment["id"])

    row = detail["devices"][0]
    assert row["status"] == "succeeded", row
    assert row["stage_attempts"] == {"before": 2}
    stages = api.read_device_result(deployment["id"], device.name)["stages"]
    assert [(stage["attempt"], stage["status"]) for stage in stages] == [(1, "interrupted"), (2, "succeeded")]
    assert "second-run" in stages[1]["steps"][0]["output"]


def test_permanent_failure_not_retried(api, fleet, tmp_path, unique_name):
    group = f"permanent-{unique_name}"
    device = register(api, fleet, f"permanent-{unique_name}", group)
    fleet.start(device)
    recipe = {
        "version": "1.0.0",
        "targets": {"groups": [group]},
        "before": {"run": "echo broken >&2; exit 4"},
        "retries": {"max_attempts": 3, "initial_interval_seconds": 1},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    deployment = api.deploy(update["id"])
    detail = wait_for_deployment(api, deployment["id"])

    row = detail["devices"][0]
    assert row["status"] == "failed"
    assert row["stage_attempts"] == {}
    assert "exited with status 4" in row["error"]
    result = api.read_device_result(deployment["id"], device.name)
    assert [(stage["stage"], stage["attempt"]) for stage in result["stages"]] == [("before", 1)]


def test_silent_device_times_out_at_deployment_deadline(api, fleet, tmp_path, unique_name):
    group = f"deadline-{unique_name}"
    online = register(api, fleet, f"online-{unique_name}", group)
    silent = register(api, fleet, f"silent-{unique_name}", group)
    fleet.start(online)
    recipe = {"version": "1.0.0", "targets": {"groups": [group]}, "before": {"run": "true"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    started = time.monotonic()
    deployment = api.deploy(update["id"], check_in_deadline="8s")
    detail = wait_for_deployment(api, deployment["id"], timeout=60)
    elapsed = time.monotonic() - started

    assert detail["check_in_deadline_at"] is not None
    rows = {row["device_id"]: row for row in detail["devices"]}
    assert rows[online.name]["status"] == "succeeded"
    assert rows[silent.name]["status"] == "timed_out"
    assert rows[silent.name]["error"].startswith("the device did not check in before the deployment's deadline ")
    # The recipe's own check-in deadline is 24 h; only the deployment's deadline can end it this soon.
    assert 7 <= elapsed < 40
    assert detail["status"] == "failed"


@pytest.mark.parametrize(
    ("deadline", "message"),
    [
        ("2020-01-01T00:00:00Z", "2020-01-01T00:00:00+00:00 is in the past"),
        ("2030-01-01T00:00:00", "2030-01-01T00:00:00 has no time zone"),
        ("soon", "Input should be a valid datetime"),
    ],
)
def test_invalid_deadline_rejected(api, tmp_path, unique_name, deadline, message):
    name = f"bad-deadline-{unique_name}"
    api.register_device(name, groups=[name])
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"run": "true"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    with pytest.raises(OperatorApiError) as raised:
        api.deploy(update["id"], check_in_deadline=deadline)

    assert raised.value.status_code == 422
    assert message in str(raised.value)
