"""`microupdates deploy` rollout options and `deployments redeploy|pause|resume|promote` against real agents."""

from __future__ import annotations

import json
import re
import time

from tests.cli.conftest import register_devices
from tests.stack_helpers import wait_for_deployment, write_recipe

FAILING_AFTER = 'if [ -e "$MICROUPDATES_DEVICE_ROOT/fail-update" ]; then exit 1; fi'
STATE_WAIT_SECONDS = 120.0


def store_update(api, tmp_path, groups: list[str]) -> str:
    recipe = {"version": "7.0.0", "targets": {"groups": groups}, "after": {"run": FAILING_AFTER}}
    return api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))["id"]


def test_deploy_with_phases_then_redeploy(cli, api, fleet, tmp_path, unique_name):
    test_group, main_group, other_group = (f"{kind}-{unique_name}" for kind in ("test", "main", "other"))
    register_devices(api, fleet, [f"cli-phase-{unique_name}-a"], test_group)
    register_devices(api, fleet, [f"cli-phase-{unique_name}-b", f"cli-phase-{unique_name}-c"], main_group)
    register_devices(api, fleet, [f"cli-phase-{unique_name}-d"], other_group)
    update_id = store_update(api, tmp_path, [test_group, main_group])

    deployed = cli(
        "deploy", "--update", update_id, "--group", test_group, "--group", main_group, "--wait", "--plain",
        "--phase", f"name=canary,group={test_group},min-success-rate=100",
        "--phase", "rest", "--max-failures", "20%", "--max-start-rate", "30/min", "--max-concurrent", "2",
    )
    deployment_id = re.search(r"Deployment (dep-\S+)", deployed.stdout).group(1)
    shown = cli("deployments", "show", deployment_id)
    redeployed = cli("deployments", "redeploy", deployment_id, "--group", other_group, "--wait", "--plain")
    follow_up_id = re.search(r"Deployment (dep-\S+) redeploys", redeployed.stdout).group(1)
    follow_up = json.loads(cli("deployments", "show", follow_up_id, "--json").stdout)

    assert deployed.exit_code == 0, deployed.output
    assert shown.exit_code == 0, shown.output
    assert re.search(rf"1 canary +group {test_group} +passed +1 \(succeeded 1\) +passed: 1 of 1", shown.stdout), shown.stdout
    assert re.search(r"2 rest +rest +passed +2 \(succeeded 2\)", shown.stdout), shown.stdout
    assert "2 at once, start rate 30/min, stop when more than 20% fail (after 1 finished)" in shown.stdout
    assert redeployed.exit_code == 0, redeployed.output
    assert follow_up["source_deployment_id"] == deployment_id
    assert follow_up["update_id"] == update_id
    assert [row["device_id"] for row in follow_up["devices"]] == [f"cli-phase-{unique_name}-d"]


def test_promote_pause_resume_commands(cli, api, fleet, tmp_path, unique_name):
    canary_group, main_group = f"canary-{unique_name}", f"main-{unique_name}"
    canary = register_devices(api, fleet, [f"cli-gate-{unique_name}-a"], canary_group, start=False)[0]
    canary.root.mkdir(parents=True, exist_ok=True)
    (canary.root / "fail-update").write_text("1\n")
    fleet.start(canary)
    register_devices(api, fleet, [f"cli-gate-{unique_name}-b"], main_group)
    update_id = store_update(api, tmp_path, [canary_group, main_group])
    deployment_id = api.deploy(update_id, rollout={"phases": [{"group": canary_group}, {"rest": True}]})["id"]
    deadline = time.monotonic() + STATE_WAIT_SECONDS
    while api.read_deployment(deployment_id)["phases"][0]["state"] != "blocked":
        assert time.monotonic() < deadline, api.read_deployment(deployment_id)
        time.sleep(0.3)

    paused = cli("deployments", "pause", deployment_id)
    wrong_phase = cli("deployments", "promote", deployment_id, "--phase", "2")
    promoted = cli("deployments", "promote", deployment_id, "--phase", "1")
    time.sleep(2)
    held = api.read_deployment(deployment_id)
    resumed = cli("deployments", "resume", deployment_id)
    ended = wait_for_deployment(api, deployment_id)

    assert paused.exit_code == 0, paused.output
    assert "Paused: no further device starts until resume." in paused.stdout
    assert f"Deployment {deployment_id}: phase 1 blocked, paused" in paused.stdout
    assert wrong_phase.exit_code == 1
    assert "Phase 2 is not the current phase; phase 1 is." in wrong_phase.output
    assert promoted.exit_code == 0, promoted.output
    assert "Promoted phase 1: phase 2 starts now." in promoted.stdout
    # The pause keeps the second phase's device from starting after the promote.
    assert held["phases"][1]["device_status_counts"] == {"pending": 1}
    assert resumed.exit_code == 0, resumed.output
    assert "Resumed: devices start again." in resumed.stdout
    assert ended["status"] == "failed"
    assert [phase["state"] for phase in ended["phases"]] == ["promoted", "passed"]


def test_deploy_rejects_unknown_phase_key(cli, unique_name):
    result = cli("deploy", "--update", f"upd-{unique_name}", "--group", "any", "--phase", "colour=blue")

    # Click prints the message in a box that wraps it, so compare the words only.
    words = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2
    assert "'colour=blue' in --phase 'colour=blue' is not a phase setting" in words
