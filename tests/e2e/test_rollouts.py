"""Rollout control through the whole system: redeploy, phases with gates, pause and resume, failure threshold.

Agents run as subprocesses. A device fails the update when a file named
`fail-update` exists under its device root, so each test picks its failing
devices by writing that file before the agent starts.
"""

from __future__ import annotations

import time

import pytest

from microupdates.cli.api_client import OperatorApiError
from tests.stack_helpers import wait_for_deployment, write_recipe

FAILING_AFTER = 'if [ -e "$MICROUPDATES_DEVICE_ROOT/fail-update" ]; then echo health check failed >&2; exit 1; fi'
STATE_WAIT_SECONDS = 120.0


def register(api, fleet, name: str, groups: list[str], fail: bool = False, start: bool = True, tags=None):
    created = api.register_device(name, groups=groups, tags=tags or [])
    device = fleet.add(name, created["token"])
    if fail:
        device.root.mkdir(parents=True, exist_ok=True)
        (device.root / "fail-update").write_text("1\n")
    if start:
        fleet.start(device)
    return device


def create_update(api, tmp_path, groups: list[str], before: str | None = None) -> str:
    recipe = {"version": "1.0.0", "targets": {"groups": groups}, "after": {"run": FAILING_AFTER}}
    if before is not None:
        recipe["before"] = {"run": before}
    return api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))["id"]


def wait_until(api, deployment_id: str, condition, what: str, timeout: float = STATE_WAIT_SECONDS) -> dict:
    deadline = time.monotonic() + timeout
    detail = api.read_deployment(deployment_id)
    while time.monotonic() < deadline:
        detail = api.read_deployment(deployment_id)
        if condition(detail):
            return detail
        time.sleep(0.3)
    raise AssertionError(f"deployment {deployment_id} did not reach {what} within {timeout} s: {detail}")


def control_when_ready(api, deployment_id: str, action: str) -> dict:
    """Send a rollout command, retrying while the workflow is still freezing its targets."""

    deadline = time.monotonic() + STATE_WAIT_SECONDS
    while True:
        try:
            return api.control_rollout(deployment_id, action)
        except OperatorApiError as error:
            if "resolving its targets" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def statuses(detail: dict) -> dict[str, str]:
    return {row["device_id"]: row["status"] for row in detail["devices"]}


def test_redeploy_sends_update_to_other_group(api, fleet, tmp_path, unique_name):
    first_group, second_group = f"first-{unique_name}", f"second-{unique_name}"
    first = f"redeploy-{unique_name}-a"
    second = f"redeploy-{unique_name}-b"
    register(api, fleet, first, [first_group])
    register(api, fleet, second, [second_group])
    update_id = create_update(api, tmp_path, [first_group])
    source = wait_for_deployment(api, api.deploy(update_id)["id"])

    created = api.redeploy(source["id"], groups=[second_group])
    follow_up = wait_for_deployment(api, created["id"])
    source_after = api.read_deployment(source["id"])

    assert source["status"] == "succeeded"
    assert follow_up["status"] == "succeeded"
    assert follow_up["update_id"] == update_id
    assert follow_up["source_deployment_id"] == source["id"]
    assert statuses(follow_up) == {second: "succeeded"}
    assert source_after["follow_up_ids"] == [created["id"]]
    assert source_after["source_deployment_id"] is None


def test_redeploy_of_unknown_deployment_is_not_found(api, unique_name):
    with pytest.raises(OperatorApiError) as error:
        api.redeploy(f"dep-{unique_name}", groups=["anything"])

    assert error.value.status_code == 404
    assert f"dep-{unique_name}" in str(error.value)


def test_targets_combine_devices_groups_and_tags(api, tmp_path, unique_name):
    group, tag = f"combo-{unique_name}", f"combo-tag-{unique_name}"
    names = [f"combo-{unique_name}-{letter}" for letter in "abcde"]
    api.register_device(names[0], groups=[group])
    api.register_device(names[1], groups=[group], tags=[tag])
    api.register_device(names[2], groups=["elsewhere"], tags=[tag])
    api.register_device(names[3], groups=["elsewhere"])
    api.register_device(names[4], groups=["elsewhere"])
    update_id = create_update(api, tmp_path, [group])

    # No agent runs, so the devices wait for their check-in until the abort below.
    deployment_id = api.deploy(update_id, devices=[names[3], names[1]], groups=[group], tags=[tag])["id"]
    detail = wait_until(api, deployment_id, lambda d: d["device_count"] > 0, "frozen targets")
    first_page = api.list_deployment_devices(deployment_id, limit=2)
    second_page = api.list_deployment_devices(deployment_id, limit=2, after=first_page[-1]["device_id"])
    api.abort(deployment_id)
    ended = wait_for_deployment(api, deployment_id)

    assert detail["device_count"] == 4
    assert [row["device_id"] for row in first_page + second_page] == names[:4]
    assert {row["phase"] for row in first_page + second_page} == {1}
    assert ended["status"] == "aborted"


def test_failed_gate_blocks_next_phase_until_promoted(api, fleet, tmp_path, unique_name):
    canary_group, main_group = f"canary-{unique_name}", f"main-{unique_name}"
    canary = f"gate-{unique_name}-canary"
    others = [f"gate-{unique_name}-{number}" for number in range(2)]
    register(api, fleet, canary, [canary_group], fail=True)
    for name in others:
        register(api, fleet, name, [main_group])
    update_id = create_update(api, tmp_path, [canary_group, main_group])

    deployment_id = api.deploy(
        update_id, rollout={"phases": [{"group": canary_group, "min_success_rate": 100}, {"rest": True}]}
    )["id"]
    blocked = wait_until(api, deployment_id, lambda d: d["phases"][0]["state"] == "blocked", "a blocked gate")
    # The second phase must not start on its own while the gate stays failed.
    time.sleep(2)
    still_blocked = api.read_deployment(deployment_id)
    answer = api.control_rollout(deployment_id, "promote")
    ended = wait_for_deployment(api, deployment_id)

    assert blocked["phases"][0]["gate"].startswith("failed: 0 of 1 finished devices succeeded")
    assert blocked["phases"][1]["state"] == "pending"
    assert blocked["current_phase"] == 1
    assert still_blocked["phases"][1]["state"] == "pending"
    for name in others:
        assert statuses(still_blocked)[name] == "pending", name
    assert answer["accepted"] is True
    assert answer["phase"] == 1
    assert ended["status"] == "failed"
    assert [phase["state"] for phase in ended["phases"]] == ["promoted", "passed"]
    assert statuses(ended) == {canary: "failed", **{name: "succeeded" for name in others}}
    assert ended["phases"][1]["device_status_counts"] == {"succeeded": 2}


def test_pause_stops_device_starts_until_resume(api, fleet, tmp_path, unique_name):
    group = f"pause-{unique_name}"
    names = [f"pause-{unique_name}-{number}" for number in range(3)]
    for name in names:
        register(api, fleet, name, [group])
    # Each device takes a second, so the pause lands while the first one still runs.
    update_id = create_update(api, tmp_path, [group], before="sleep 1")

    deployment_id = api.deploy(update_id, rollout={"max_concurrent": 1})["id"]
    paused = control_when_ready(api, deployment_id, "pause")
    again = api.control_rollout(deployment_id, "pause")
    time.sleep(4)
    held = api.read_deployment(deployment_id)
    resumed = api.control_rollout(deployment_id, "resume")
    ended = wait_for_deployment(api, deployment_id)

    assert paused["accepted"] is True
    assert paused["paused"] is True
    assert again["accepted"] is False
    assert held["paused"] is True
    # At most the device that was already running when the pause arrived has started.
    assert sum(1 for status in statuses(held).values() if status != "pending") <= 1
    assert resumed["accepted"] is True
    assert resumed["paused"] is False
    assert ended["status"] == "succeeded"
    assert ended["paused"] is False


def test_failure_threshold_stops_rollout_and_aborts_the_rest(api, fleet, tmp_path, unique_name):
    group = f"threshold-{unique_name}"
    # Devices start in id order, so the failing device "a" runs first.
    failing = f"threshold-{unique_name}-a"
    others = [f"threshold-{unique_name}-{letter}" for letter in "bcd"]
    register(api, fleet, failing, [group], fail=True)
    for name in others:
        register(api, fleet, name, [group])
    update_id = create_update(api, tmp_path, [group])

    deployment_id = api.deploy(
        update_id, rollout={"max_concurrent": 1, "max_failures": "20%", "min_finished": 1}
    )["id"]
    ended = wait_for_deployment(api, deployment_id)

    reason = "stopped: 1 of 1 finished devices failed, threshold 20%"
    assert ended["status"] == "stopped"
    assert ended["error"] == reason
    assert statuses(ended) == {failing: "failed", **{name: "aborted" for name in others}}
    for row in ended["devices"]:
        if row["device_id"] in others:
            assert row["error"] == reason, row
    assert ended["phases"][0]["state"] == "stopped"


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ({"max_start_rate": "fast"}, "max_start_rate 'fast' is not a rate"),
        ({"max_failures": "120%"}, "max_failures '120%' is neither a device count"),
        ({"phases": [{"group": "test", "percent": 10}]}, "a phase selects its devices in exactly one way"),
        ({"phases": [{"rest": True}, {"percent": 5}]}, "phase 1 takes the rest of the targets"),
        ({"max_concurrent": 5000}, "max_concurrent"),
    ],
)
def test_deploy_rejects_invalid_rollout_options(api, tmp_path, unique_name, rollout, message):
    group = f"invalid-{unique_name}"
    api.register_device(f"invalid-{unique_name}", groups=[group])
    update_id = create_update(api, tmp_path, [group])

    with pytest.raises(OperatorApiError) as error:
        api.deploy(update_id, rollout=rollout)

    assert error.value.status_code == 422
    assert message in str(error.value)


def test_deploy_rejects_update_and_source_together(api, tmp_path, unique_name):
    group = f"both-{unique_name}"
    api.register_device(f"both-{unique_name}", groups=[group])
    update_id = create_update(api, tmp_path, [group])

    with pytest.raises(OperatorApiError) as error:
        api.deploy(update_id, rollout={"source_deployment_id": "dep-00000000"})

    assert error.value.status_code == 422
    assert "give either update_id or source_deployment_id" in str(error.value)


def test_control_of_ended_deployment_is_conflict(api, fleet, tmp_path, unique_name):
    group = f"ended-{unique_name}"
    register(api, fleet, f"ended-{unique_name}", [group])
    deployment_id = api.deploy(create_update(api, tmp_path, [group]))["id"]
    wait_for_deployment(api, deployment_id)

    with pytest.raises(OperatorApiError) as error:
        api.control_rollout(deployment_id, "pause")

    assert error.value.status_code == 409
    assert f"Deployment {deployment_id} has already ended (succeeded), so there is nothing to pause." in str(
        error.value
    )


def test_promote_of_last_phase_is_conflict(api, tmp_path, unique_name):
    group = f"last-{unique_name}"
    api.register_device(f"last-{unique_name}", groups=[group])
    # No agent runs, so the only phase stays running until the abort below.
    deployment_id = api.deploy(create_update(api, tmp_path, [group]))["id"]
    wait_until(api, deployment_id, lambda detail: detail["phases"][0]["state"] == "running", "a running phase")

    with pytest.raises(OperatorApiError) as error:
        api.control_rollout(deployment_id, "promote")
    api.abort(deployment_id)
    ended = wait_for_deployment(api, deployment_id)

    assert error.value.status_code == 409
    assert "Phase 1 is the last phase, so there is no next phase to promote to." in str(error.value)
    assert ended["status"] == "aborted"
    assert ended["phases"][0]["state"] == "stopped"
