"""`microupdates deploy --wait` with real agents: exit codes, plain lines, JSON lines and the live display."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time

from tests.cli.conftest import CLI_SUBPROCESS_TIMEOUT_SECONDS, register_devices, run_cli_process
from tests.stack_helpers import write_recipe

# `<time> <device> <old status> -> <new status> [stage] [(error)]`
EVENT_LINE = re.compile(r"^(\S+) (\S+) (\S+) -> (\S+)(?: ([a-z_]+))?(?: \((.*)\))?$")
DEPLOYMENT_LINE = re.compile(r"^\S+ deployment (\S+) (\S+) -> (\S+)$")


def two_stage_recipe(group: str) -> dict:
    return {
        "version": "1.0.0",
        "targets": {"groups": [group]},
        "before": {"run": "sleep 0.6"},
        "files": [{"source": "app.txt", "destination": "/opt/cli/app.txt"}],
        "after": {"run": "sleep 0.6; echo after-ran"},
    }


def parse_device_events(output: str) -> dict[str, list[tuple[str, str, str | None]]]:
    """Return each device's (old status, new status, stage) events in the order printed."""

    events: dict[str, list[tuple[str, str, str | None]]] = {}
    for line in output.splitlines():
        if DEPLOYMENT_LINE.match(line):
            continue
        match = EVENT_LINE.match(line)
        if match:
            _, device, old, new, stage, _ = match.groups()
            events.setdefault(device, []).append((old, new, stage))
    return events


def test_deploy_wait_exits_zero_when_all_succeed(cli, api, fleet, tmp_path, unique_name):
    group = f"ok-{unique_name}"
    names = [f"ok-{unique_name}-a", f"ok-{unique_name}-b"]
    devices = register_devices(api, fleet, names, group)
    recipe = write_recipe(tmp_path / "recipe", two_stage_recipe(group), {"app.txt": b"app\n"})

    result = cli("deploy", str(recipe), "--group", group, "--wait")

    assert result.exit_code == 0, result.output
    output = result.stdout
    assert re.search(r"^Created update upd-\S+ \(version 1\.0\.0\) from ", output, re.MULTILINE)
    assert re.search(r"^Deployment dep-\S+ of update upd-\S+ started", output, re.MULTILINE)
    for name in names:
        assert re.search(rf"^{name} +succeeded +\d+\.\d", output, re.MULTILINE), output
    assert re.search(r"^Deployment dep-\S+ of update 1\.0\.0: succeeded \(succeeded 2\)$", output, re.MULTILINE)
    for device in devices:
        assert (device.root / "opt/cli/app.txt").read_text() == "app\n"


def test_deploy_wait_exits_two_when_a_device_fails(cli, api, fleet, tmp_path, unique_name):
    group = f"bad-{unique_name}"
    name = f"bad-{unique_name}"
    register_devices(api, fleet, [name], group)
    recipe = write_recipe(tmp_path / "recipe", {"version": "1.0.1", "targets": {"groups": [group]},
                                                "before": {"run": "exit 3"}})

    result = cli("deploy", str(recipe), "--wait")

    assert result.exit_code == 2, result.output
    # A poll may see the device in_progress first, or only after it has failed.
    assert re.search(rf"^\S+ {name} (pending|in_progress) -> failed before \(before: exited with status 3\)$",
                     result.stdout, re.MULTILINE), result.stdout
    assert re.search(rf"^{name} +failed +before", result.stdout, re.MULTILINE)
    assert "failed (failed 1)" in result.stdout


def test_deploy_wait_json_prints_one_object_per_line(cli, api, fleet, tmp_path, unique_name):
    group = f"json-{unique_name}"
    names = [f"json-{unique_name}-a", f"json-{unique_name}-b"]
    register_devices(api, fleet, names, group)
    recipe = write_recipe(tmp_path / "recipe", two_stage_recipe(group), {"app.txt": b"app\n"})

    result = cli("deploy", str(recipe), "--group", group, "--wait", "--json")

    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [item["event"] for item in objects]
    assert kinds[:2] == ["update_created", "deployment_created"]
    assert kinds[-1] == "summary"
    summary = objects[-1]
    assert summary["status"] == "succeeded"
    assert summary["exit_code"] == 0
    assert summary["timed_out"] is False
    assert sorted(row["device_id"] for row in summary["devices"]) == names
    device_events = [item for item in objects if item["event"] == "device"]
    for name in names:
        statuses = [item["status"] for item in device_events if item["device_id"] == name]
        assert statuses[-1] == "succeeded"
    deployment_statuses = [item["status"] for item in objects if item["event"] == "deployment"]
    assert deployment_statuses[-1] == "succeeded"


def test_deploy_wait_pipe_one_line_per_change(api, fleet, stack, tmp_path, config_home,
                                                               unique_name):
    group = f"pipe-{unique_name}"
    names = [f"pipe-{unique_name}-a", f"pipe-{unique_name}-b"]
    register_devices(api, fleet, names, group)
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", two_stage_recipe(group),
                                                      {"app.txt": b"app\n"}))

    completed = run_cli_process(["deploy", "--update", update["id"], "--group", group, "--wait"],
                                stack.api_url, config_home, stack.admin_api_key)

    print(completed.stdout)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "\x1b[" not in completed.stdout, "a pipe gets no colour or cursor codes"
    events = parse_device_events(completed.stdout)
    assert sorted(events) == names
    for name, device_events in events.items():
        assert device_events[0][0] == "pending", device_events
        assert device_events[-1][1] == "succeeded", device_events
        for previous, current in zip(device_events, device_events[1:]):
            assert current[0] == previous[1], f"{name}: each line starts from the status the previous one ended in"
            assert (current[1], current[2]) != (previous[1], previous[2]), f"{name}: a line without a change"
        stages_seen = [stage for _, status, stage in device_events if status == "in_progress"]
        assert "before" in stages_seen


def test_deploy_wait_on_terminal_shows_live_display(api, fleet, stack, tmp_path, config_home, unique_name):
    group = f"tty-{unique_name}"
    names = [f"tty-{unique_name}-a"]
    register_devices(api, fleet, names, group)
    recipe = write_recipe(tmp_path / "recipe", two_stage_recipe(group), {"app.txt": b"app\n"})
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MICROUPDATES_")}
    environment.update(MICROUPDATES_SERVER=stack.api_url, MICROUPDATES_API_KEY=stack.admin_api_key,
                       XDG_CONFIG_HOME=str(config_home), TERM="xterm-256color", COLUMNS="120", LINES="40")
    environment.pop("NO_COLOR", None)

    primary, secondary = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "microupdates.cli", "deploy", str(recipe), "--wait"],
                               stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary, env=environment)
    os.close(secondary)
    output = read_until_closed(primary, time.monotonic() + CLI_SUBPROCESS_TIMEOUT_SECONDS)
    exit_code = process.wait(timeout=10)

    assert exit_code == 0, output
    assert "\x1b[" in output, "a terminal gets colour and cursor codes"
    assert "in_progress" in output
    assert re.search(rf"{names[0]}\S* +\S*succeeded", output), output
    assert "succeeded (succeeded 1)" in output


def read_until_closed(primary: int, deadline: float) -> str:
    chunks = []
    while time.monotonic() < deadline:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            # Linux raises EIO once the last process holding the terminal has closed it.
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_deploy_check_in_deadline_times_out_silent_device(cli, api, fleet, tmp_path, unique_name):
    name = f"late-{unique_name}"
    register_devices(api, fleet, [name], f"late-{unique_name}", start=False)
    recipe = write_recipe(tmp_path / "recipe", {"version": "1.0.2", "before": {"run": "true"},
                                                "timeouts": {"heartbeat_timeout_seconds": 30}})

    result = cli("deploy", str(recipe), "--device", name, "--check-in-deadline", "2", "--wait", "--json")

    assert result.exit_code == 2, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["devices"][0]["status"] == "timed_out"
    deployment_id = summary["deployment_id"]
    stored = api.read_deployment(deployment_id)
    assert stored["status"] == "failed"


def test_deploy_deadline_times_out_silent_device(cli, api, fleet, tmp_path, unique_name):
    name = f"deadline-{unique_name}"
    register_devices(api, fleet, [name], f"deadline-{unique_name}", start=False)
    recipe = write_recipe(tmp_path / "recipe", {"version": "1.0.3", "before": {"run": "true"},
                                                "retries": {"max_attempts": 2}})

    result = cli("deploy", str(recipe), "--device", name, "--deadline", "3s", "--max-attempts", "1",
                 "--wait", "--json")

    assert result.exit_code == 2, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["devices"][0]["status"] == "timed_out"
    assert "the deployment's deadline" in summary["devices"][0]["error"]
    stored = api.read_deployment(summary["deployment_id"])
    assert stored["check_in_deadline_at"] is not None


def test_deploy_rejects_invalid_deadline(cli, api, fleet, tmp_path, unique_name):
    name = f"baddeadline-{unique_name}"
    register_devices(api, fleet, [name], f"baddeadline-{unique_name}", start=False)
    recipe = write_recipe(tmp_path / "recipe", {"version": "1.0.4", "before": {"run": "true"}})

    result = cli("deploy", str(recipe), "--device", name, "--deadline", "2020-01-01T00:00:00Z")

    assert result.exit_code == 1
    assert "check_in_deadline" in result.stderr
    assert "is in the past" in result.stderr


def test_deploy_needs_recipe_or_update(cli):
    neither = cli("deploy")
    both = cli("deploy", "recipe.yaml", "--update", "upd-1")

    assert neither.exit_code == 1
    assert both.exit_code == 1
    assert "Give either a RECIPE file or --update ID" in neither.stderr
    assert "Give either a RECIPE file or --update ID" in both.stderr


def test_deploy_missing_recipe_file_suggests_update_option(cli, tmp_path):
    result = cli("deploy", str(tmp_path / "upd-1234"))

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: Recipe file {tmp_path / 'upd-1234'} not found; to deploy a stored update, use --update ID."
    )
