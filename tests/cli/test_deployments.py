"""`microupdates deployments`: list, show, device, abort and watch against real agents."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.cli.conftest import register_devices
from tests.stack_helpers import wait_for_deployment, write_recipe

MARKER_WAIT_SECONDS = 60


def wait_for_file(path: Path, timeout: float = MARKER_WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def test_deployments_list_show_and_device(cli, api, fleet, tmp_path, unique_name):
    name = f"show-{unique_name}"
    register_devices(api, fleet, [name], f"show-{unique_name}")
    recipe = {"version": "5.0.0", "targets": {"devices": [name]},
              "before": {"run": "echo hello-from-before"}, "after": {"run": "echo bye >&2; exit 4"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment_id = api.deploy(update["id"])["id"]
    wait_for_deployment(api, deployment_id)

    listed = cli("deployments", "list")
    bare = cli("deployments")
    shown = cli("deployments", "show", deployment_id)
    shown_json = cli("deployments", "show", deployment_id, "--json")
    device = cli("deployments", "device", deployment_id, name)
    old_show = cli("show", deployment_id, "--device", name)

    row = next(line for line in listed.stdout.splitlines() if line.startswith(deployment_id))
    assert re.search(r"failed +upd-\S+ +5\.0\.0 +1 +failed 1", row), row
    assert deployment_id in bare.stdout
    assert shown.exit_code == 0, shown.output
    assert re.search(rf"^{name} +failed +after +\S+ +after: exited with status 4", shown.stdout, re.MULTILINE)
    assert json.loads(shown_json.stdout)["devices"][0]["device_id"] == name
    assert device.exit_code == 0, device.output
    assert re.search(r"^before +succeeded +\d", device.stdout, re.MULTILINE), device.stdout
    assert "--- before: exit code 0, " in device.stdout
    assert re.search(r"^after +failed +4 ", device.stdout, re.MULTILINE), device.stdout
    assert "hello-from-before" in device.stdout
    assert "bye" in device.stdout
    assert old_show.stdout == device.stdout


def test_abort_via_cli_ends_deployment_aborted(cli, api, fleet, tmp_path, unique_name):
    name = f"abort-{unique_name}"
    device = register_devices(api, fleet, [name], f"abort-{unique_name}")[0]
    recipe = {"version": "6.0.0", "targets": {"devices": [name]},
              "before": {"run": 'touch "$MICROUPDATES_DEVICE_ROOT/running"; sleep 300', "timeout_seconds": 600}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment_id = api.deploy(update["id"])["id"]
    wait_for_file(device.root / "running")

    first = cli("deployments", "abort", deployment_id)
    watched = cli("deployments", "watch", deployment_id, "--timeout", "60")
    second = cli("deployments", "abort", deployment_id)

    assert first.exit_code == 0, first.output
    assert first.stdout.startswith(f"Abort requested for deployment {deployment_id}; ")
    assert watched.exit_code == 2, watched.output
    assert re.search(rf"^{name} +aborted +before", watched.stdout, re.MULTILINE), watched.stdout
    assert f"Deployment {deployment_id} of update 6.0.0: aborted (aborted 1)" in watched.stdout
    assert second.exit_code == 0
    assert second.stdout.strip() == (
        f"Nothing to abort: deployment {deployment_id} had already ended or been aborted."
    )


def test_abort_device_keeps_others_running(cli, api, fleet, tmp_path, unique_name):
    group = f"one-{unique_name}"
    stopped, kept = register_devices(api, fleet, [f"one-{unique_name}-a", f"one-{unique_name}-b"], group)
    recipe = {"version": "6.1.0", "targets": {"groups": [group]},
              "before": {"run": 'touch "$MICROUPDATES_DEVICE_ROOT/running"; sleep 4'}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment_id = api.deploy(update["id"])["id"]
    wait_for_file(stopped.root / "running")
    wait_for_file(kept.root / "running")

    aborted = cli("deployments", "abort", deployment_id, "--device", stopped.name)
    watched = cli("deployments", "watch", deployment_id, "--json", "--timeout", "60")

    assert aborted.exit_code == 0, aborted.output
    assert aborted.stdout.startswith(f"Abort requested for device {stopped.name} in deployment {deployment_id}")
    assert watched.exit_code == 2, watched.output
    summary = json.loads(watched.stdout.splitlines()[-1])
    statuses = {row["device_id"]: row["status"] for row in summary["devices"]}
    assert statuses == {stopped.name: "aborted", kept.name: "succeeded"}
    assert summary["status"] == "failed"


def test_watch_timeout_exits_one_and_deployment_keeps_running(cli, api, fleet, tmp_path, unique_name):
    name = f"slow-{unique_name}"
    register_devices(api, fleet, [name], f"slow-{unique_name}", start=False)
    recipe = {"version": "7.0.0", "targets": {"devices": [name]}, "before": {"run": "true"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    deployment_id = api.deploy(update["id"])["id"]

    try:
        result = cli("deployments", "watch", deployment_id, "--timeout", "1")
    finally:
        api.abort(deployment_id)

    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"Error: Deployment {deployment_id} did not finish within 1 s and keeps running; "
        f"watch it again with `microupdates deployments watch {deployment_id}`."
    )
    assert re.search(rf"^{name} +pending", result.stdout, re.MULTILINE), result.stdout


def test_show_missing_deployment_is_one_sentence_error(cli):
    result = cli("deployments", "show", "dep-missing")

    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "not found" in lines[0]
    assert "Traceback" not in result.output


def test_watch_missing_deployment_is_one_sentence_error(cli):
    result = cli("deployments", "watch", "dep-missing", "--timeout", "5")

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: GET /deployments/dep-missing failed with HTTP 404: Deployment 'dep-missing' not found."
    )
