"""Rollback, abort and lost devices through the whole system, with real agents as subprocesses."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

from tests.stack_helpers import wait_for_deployment, write_recipe

RUNNING_MARKER_WAIT_SECONDS = 60


def register_and_start(api, fleet, name: str, group: str, start: bool = True):
    created = api.register_device(name, groups=[group])
    device = fleet.add(name, created["token"])
    if start:
        fleet.start(device)
    return device


def wait_for_file(path: Path, timeout: float = RUNNING_MARKER_WAIT_SECONDS) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has ended; its parent has not collected it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_failed_stage_reverts_files_and_runs_rollback_command(api, fleet, tmp_path, unique_name):
    name = f"revert-{unique_name}"
    device = register_and_start(api, fleet, name, f"revert-{unique_name}", start=False)
    app = device.root / "opt/app"
    app.mkdir(parents=True)
    (app / "config.txt").write_text("old config\n")
    os.chmod(app / "config.txt", 0o600)
    os.symlink("config.txt", app / "current")
    fleet.start(device)

    recipe = {
        "version": "2.0.0",
        "targets": {"devices": [name]},
        "files": [
            {"source": "config.txt", "destination": "/opt/app/config.txt", "mode": "0644"},
            {"source": "new.txt", "destination": "/opt/app/new/new.txt"},
        ],
        "after": {"run": "echo health check failed >&2; exit 1"},
        "rollback": {"command": 'echo rolled-back > "$MICROUPDATES_DEVICE_ROOT/rollback-marker"'},
    }
    update = api.create_update_from_file(
        write_recipe(tmp_path / "recipe", recipe, {"config.txt": b"new config\n", "new.txt": b"added\n"})
    )

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    assert detail["status"] == "failed"
    row = detail["devices"][0]
    assert row["status"] == "rolled_back", row
    assert row["stage"] == "after"
    assert "exited with status 1" in row["error"]
    assert row["rollback_error"] is None
    assert (app / "config.txt").read_text() == "old config\n"
    assert stat.S_IMODE((app / "config.txt").stat().st_mode) == 0o600
    assert os.readlink(app / "current") == "config.txt"
    assert not (app / "new").exists()
    assert (device.root / "rollback-marker").read_text() == "rolled-back\n"
    stages = [s["stage"] for s in api.read_device_result(detail["id"], name)["stages"]]
    assert stages == ["files", "after", "revert_files", "rollback_command"]


def test_failing_rollback_command_gives_rollback_failed(api, fleet, tmp_path, unique_name):
    name = f"rbfail-{unique_name}"
    register_and_start(api, fleet, name, f"rbfail-{unique_name}")
    recipe = {
        "version": "2.0.0",
        "targets": {"devices": [name]},
        "before": {"run": "exit 2"},
        "rollback": {"command": "echo cannot restore >&2; exit 7"},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    row = detail["devices"][0]
    assert row["status"] == "rollback_failed"
    assert row["stage"] == "before"
    assert row["rollback_error"].startswith("rollback_command:")
    assert "exited with status 7" in row["rollback_error"]


def test_rollback_reboot_restarts_agent_and_reports(api, fleet, tmp_path, unique_name):
    name = f"reboot-{unique_name}"
    device = register_and_start(api, fleet, name, f"reboot-{unique_name}")
    recipe = {
        "version": "2.0.0",
        "targets": {"devices": [name]},
        "before": {"run": "exit 1"},
        "rollback": {"reboot": True},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    assert detail["devices"][0]["status"] == "rolled_back", detail["devices"][0]
    stages = api.read_device_result(detail["id"], name)["stages"]
    assert [s["stage"] for s in stages] == ["before", "reboot"]
    assert stages[-1]["status"] == "succeeded"
    assert device.process.poll() is None, "the agent must be running again after its restart"
    assert "restarting the agent in place of a reboot" in device.log_path.read_text()


def test_abort_stops_running_command_and_rolls_back(api, fleet, tmp_path, unique_name):
    name = f"abort-{unique_name}"
    device = register_and_start(api, fleet, name, f"abort-{unique_name}")
    recipe = {
        "version": "2.0.0",
        "targets": {"devices": [name]},
        "files": [{"source": "a.txt", "destination": "/opt/abort/a.txt"}],
        "after": {"run": 'sleep 300 & echo $! > "$MICROUPDATES_DEVICE_ROOT/sleep.pid"; wait', "timeout_seconds": 600},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe, {"a.txt": b"a\n"}))
    deployment = api.deploy(update["id"])
    sleep_pid = int(wait_for_file(device.root / "sleep.pid"))
    assert (device.root / "opt/abort/a.txt").exists()

    requested = time.monotonic()
    first = api.abort(deployment["id"])
    while process_exists(sleep_pid) and time.monotonic() - requested < 30:
        time.sleep(0.02)
    stopped_after = time.monotonic() - requested
    second = api.abort(deployment["id"])
    detail = wait_for_deployment(api, deployment["id"])

    assert first["accepted"] is True
    assert second["accepted"] is False
    assert not process_exists(sleep_pid)
    print(f"abort request to command stopped: {stopped_after:.3f} s")
    assert stopped_after < 10, f"the command ran {stopped_after:.1f} s after the abort"
    assert detail["status"] == "aborted"
    assert detail["devices"][0]["status"] == "aborted"
    assert not (device.root / "opt/abort/a.txt").exists(), "the files written before the abort are reverted"


def test_abort_ends_devices_that_never_started_without_contact(api, fleet, tmp_path, unique_name):
    group = f"offline-{unique_name}"
    for index in range(2):
        register_and_start(api, fleet, f"offline-{unique_name}-{index}", group, start=False)
    recipe = {"version": "1.0.0", "targets": {"groups": [group]}, "before": {"run": "true"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment = api.deploy(update["id"])
    time.sleep(1)

    api.abort(deployment["id"])
    detail = wait_for_deployment(api, deployment["id"], timeout=30)

    assert detail["status"] == "aborted"
    assert detail["device_status_counts"] == {"aborted": 2}


def test_abort_one_device_leaves_the_others_running(api, fleet, tmp_path, unique_name):
    group = f"one-{unique_name}"
    stopped = register_and_start(api, fleet, f"one-{unique_name}-a", group)
    kept = register_and_start(api, fleet, f"one-{unique_name}-b", group)
    recipe = {
        "version": "1.0.0",
        "targets": {"groups": [group]},
        "before": {"run": 'echo $$ > "$MICROUPDATES_DEVICE_ROOT/running"; sleep 4'},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment = api.deploy(update["id"])
    wait_for_file(stopped.root / "running")
    wait_for_file(kept.root / "running")

    result = api.abort(deployment["id"], stopped.name)
    detail = wait_for_deployment(api, deployment["id"])

    assert result["accepted"] is True
    statuses = {row["device_id"]: row["status"] for row in detail["devices"]}
    assert statuses == {stopped.name: "aborted", kept.name: "succeeded"}
    assert detail["status"] == "failed"


def test_agent_killed_mid_stage_reports_interrupted_once(api, fleet, tmp_path, unique_name):
    name = f"crash-{unique_name}"
    device = register_and_start(api, fleet, name, f"crash-{unique_name}")
    recipe = {
        "version": "1.0.0",
        "targets": {"devices": [name]},
        "before": {"run": 'echo $$ > "$MICROUPDATES_DEVICE_ROOT/running"; sleep 300', "timeout_seconds": 600},
        "rollback": {"command": "true"},
        # An interrupted stage would otherwise run again, and sleep again.
        "retries": {"max_attempts": 1},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment = api.deploy(update["id"])
    command_pid = int(wait_for_file(device.root / "running"))

    fleet.stop(device, kill=True)
    assert process_exists(command_pid), "the stage's process group outlives a killed agent"
    fleet.start(device)
    detail = wait_for_deployment(api, deployment["id"])

    row = detail["devices"][0]
    assert row["status"] == "rolled_back", row
    assert row["stage"] == "before"
    assert "restarted during the before stage" in row["error"]
    assert not process_exists(command_pid), "the restarted agent kills the interrupted stage's processes"
    stages = api.read_device_result(deployment["id"], name)["stages"]
    assert [s["stage"] for s in stages] == ["before", "rollback_command"]
    assert stages[0]["status"] == "interrupted"


def test_silent_device_fails_by_heartbeat_and_rolls_back_when_back(api, fleet, tmp_path, unique_name):
    name = f"silent-{unique_name}"
    device = register_and_start(api, fleet, name, f"silent-{unique_name}")
    recipe = {
        "version": "1.0.0",
        "targets": {"devices": [name]},
        "files": [{"source": "b.txt", "destination": "/opt/silent/b.txt"}],
        "after": {"run": 'echo $$ > "$MICROUPDATES_DEVICE_ROOT/running"; sleep 120', "timeout_seconds": 600},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe, {"b.txt": b"b\n"}))
    deployment = api.deploy(update["id"], timeouts={"heartbeat_timeout_seconds": 10})
    wait_for_file(device.root / "running")

    # A stopped agent sends nothing, like a device that lost its network.
    os.kill(device.process.pid, signal.SIGSTOP)
    try:
        time.sleep(16)
        # While the reverts wait for the device, the operator already sees why.
        waiting = api.read_deployment(deployment["id"])["devices"][0]
    finally:
        os.kill(device.process.pid, signal.SIGCONT)
    detail = wait_for_deployment(api, deployment["id"])

    assert waiting["status"] == "in_progress"
    assert waiting["stage"] == "after"
    assert "stopped reporting during the after stage" in waiting["error"]

    assert "stopped reporting during the after stage" in detail["devices"][0]["error"]
    assert detail["devices"][0]["status"] == "rolled_back", detail["devices"][0]
    assert not (device.root / "opt/silent/b.txt").exists()
