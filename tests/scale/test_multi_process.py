"""Two API and two worker processes on one PostgreSQL database: deployments, aborts, restarts and idle check-ins.

Every part is real: the Temporal dev server, the API and worker processes
(`python -m microupdates.api.main` and `python -m microupdates.worker.main`),
PostgreSQL and one agent process per device.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.local_fleet import LocalDevice, LocalFleet
from microupdates.cli.stack import find_temporal_cli
from microupdates.db import deployments as deployment_store
from microupdates.db.session import Database
from microupdates.protocol.device_api import DEVICE_API_PREFIX
from microupdates.protocol.recipe import TargetSelection
from tests.e2e.test_rollback_and_abort import wait_for_file
from tests.scale.conftest import Cluster
from tests.stack_helpers import wait_for_deployment, write_recipe

# An abort reaches a running stage through the progress long poll, which the notifier wakes within a second.
ABORT_DELIVERY_MAX_SECONDS = 10.0
IDLE_CHECK_INS = 100
API_RESTART_PAUSE_SECONDS = 2.0


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[OperatorApiClient]:
    with OperatorApiClient(cluster.api_urls[0], cluster.stack.admin_api_key) as client:
        yield client


@pytest.fixture
def fleets(cluster: Cluster, tmp_path: Path) -> Iterator[list[LocalFleet]]:
    """One fleet of agents per API process."""

    fleets = [
        LocalFleet(server_url=url, devices_dir=tmp_path / f"devices-{index}", long_poll_seconds=10)
        for index, url in enumerate(cluster.api_urls)
    ]
    yield fleets
    for fleet in fleets:
        fleet.stop_all()


def enrol(operator: OperatorApiClient, fleet: LocalFleet, name: str, group: str) -> LocalDevice:
    created = operator.register_device(name, groups=[group])
    device = fleet.add(name, created["token"])
    fleet.start(device)
    return device


def create_update(operator: OperatorApiClient, directory: Path, group: str, before: str) -> str:
    recipe = {
        "version": "1.0.0",
        "targets": {"groups": [group]},
        "before": {"run": before},
        "files": [{"source": "app.txt", "destination": "/opt/app/app.txt"}],
        "after": {"run": 'test -f "$MICROUPDATES_DEVICE_ROOT/opt/app/app.txt"'},
    }
    return operator.create_update_from_file(write_recipe(directory, recipe, {"app.txt": b"release 1\n"}))["id"]


def device_statuses(detail: dict) -> dict[str, str]:
    return {row["device_id"]: row["status"] for row in detail["devices"]}


def device_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_deploy_across_two_apis_and_two_workers(cluster, operator, fleets, tmp_path, unique_name):
    group = f"spread-{unique_name}"
    names = [f"spread-{unique_name}-{index}" for index in range(6)]
    for index, name in enumerate(names):
        enrol(operator, fleets[index % 2], name, group)
    update_id = create_update(operator, tmp_path / "recipe", group, "echo before")

    detail = wait_for_deployment(operator, operator.deploy(update_id)["id"])

    assert detail["status"] == "succeeded"
    assert device_statuses(detail) == {name: "succeeded" for name in names}
    for api_url in cluster.api_urls:
        handed_out = read_metric(api_url, 'microupdates_device_check_ins_total{outcome="job"}')
        # Three devices per API, three stages each (the check-in job is completed without the device).
        assert handed_out == 3 * 3, f"{api_url} handed out {handed_out} jobs"


def test_abort_on_one_api_reaches_device_on_other(cluster, operator, fleets, tmp_path, unique_name):
    group = f"abort-{unique_name}"
    name = f"abort-{unique_name}"
    device = enrol(operator, fleets[1], name, group)
    marker = device.root / "before-started"
    update_id = create_update(operator, tmp_path / "recipe", group, f'echo $$ > "{marker}"; sleep 120')
    deployment_id = operator.deploy(update_id)["id"]
    wait_for_file(marker)

    aborted_at = time.monotonic()
    operator.abort(deployment_id)
    detail = wait_for_deployment(operator, deployment_id)
    delivery_seconds = time.monotonic() - aborted_at

    assert detail["status"] == "aborted"
    assert device_statuses(detail) == {name: "aborted"}
    assert delivery_seconds < ABORT_DELIVERY_MAX_SECONDS


def test_report_to_other_api_completes_stage(cluster, operator, tmp_path, unique_name):
    group = f"switch-{unique_name}"
    name = f"switch-{unique_name}"
    token = operator.register_device(name, groups=[group])["token"]
    recipe = {"version": "1.0.0", "targets": {"groups": [group]}, "before": {"run": "true"}}
    update_id = operator.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))["id"]
    deployment_id = operator.deploy(update_id)["id"]

    # A device whose requests a load balancer sends to a different API process each time.
    job = check_in(cluster.api_urls[0], token, wait_seconds=30)["job"]
    report = httpx.post(
        f"{cluster.api_urls[1]}{DEVICE_API_PREFIX}/jobs/{job['job_id']}/report",
        json={"status": "succeeded", "exit_code": 0}, headers=device_headers(token), timeout=30,
    )
    repeated = httpx.post(
        f"{cluster.api_urls[0]}{DEVICE_API_PREFIX}/jobs/{job['job_id']}/report",
        json={"status": "succeeded", "exit_code": 0}, headers=device_headers(token), timeout=30,
    )
    detail = wait_for_deployment(operator, deployment_id)

    assert job["stage"] == "before"
    assert report.status_code == 200, report.text
    assert report.json()["detail"] == "recorded"
    assert repeated.status_code == 200, repeated.text
    assert repeated.json()["detail"] == "already recorded"
    assert detail["status"] == "succeeded"
    assert device_statuses(detail) == {name: "succeeded"}


def test_killed_workers_replaced_mid_deployment_finish_it(cluster, operator, fleets, tmp_path, unique_name):
    group = f"workers-{unique_name}"
    names = [f"workers-{unique_name}-{index}" for index in range(2)]
    devices = [enrol(operator, fleets[index], name, group) for index, name in enumerate(names)]
    update_id = create_update(operator, tmp_path / "recipe", group,
                              'touch "$MICROUPDATES_DEVICE_ROOT/before-started"; sleep 3')
    deployment_id = operator.deploy(update_id)["id"]
    for device in devices:
        wait_for_file_present(device.root / "before-started")

    for name in [name for name in cluster.stack.processes if name.startswith("worker")]:
        cluster.stack.kill(name)
    time.sleep(1)
    cluster.stack.start_worker(f"worker-{unique_name}")
    detail = wait_for_deployment(operator, deployment_id)

    assert detail["status"] == "succeeded"
    assert device_statuses(detail) == {name: "succeeded" for name in names}


def test_killed_api_loses_no_report(cluster, operator, fleets, tmp_path, unique_name):
    group = f"api-kill-{unique_name}"
    names = [f"api-kill-{unique_name}-{index}" for index in range(3)]
    devices = [enrol(operator, fleets[1], name, group) for name in names]
    update_id = create_update(operator, tmp_path / "recipe", group,
                              'touch "$MICROUPDATES_DEVICE_ROOT/before-started"; sleep 3')
    deployment_id = operator.deploy(update_id)["id"]
    for device in devices:
        wait_for_file_present(device.root / "before-started")

    # The agents are in the middle of a progress long poll on the second API; their
    # reports arrive while it is down or just after it is back.
    port = int(cluster.api_urls[1].rsplit(":", 1)[1])
    cluster.stack.kill("api-2")
    time.sleep(API_RESTART_PAUSE_SECONDS)
    cluster.stack.start_api("api-2", port)
    detail = wait_for_deployment(operator, deployment_id)

    assert detail["status"] == "succeeded"
    assert device_statuses(detail) == {name: "succeeded" for name in names}
    with psycopg.connect(cluster.postgres_url) as connection:
        jobs = connection.execute(
            "SELECT device_id, stage, state, count(*) FROM stage_jobs WHERE deployment_id = %s "
            "GROUP BY device_id, stage, state",
            (deployment_id,),
        ).fetchall()
    assert sorted({(device_id, stage) for device_id, stage, _, _ in jobs}) == sorted(
        (name, stage) for name in names for stage in ("check_in", "before", "files", "after")
    )
    assert {(state, count) for _, _, state, count in jobs} == {("reported", 1)}
    retried = [device.name for device in devices if "failed" in device.log_path.read_text()]
    assert retried, "no agent saw the API go away; the kill missed the running stage"


def test_pending_deployment_without_workflow_is_started(cluster, operator, fleets, tmp_path, unique_name):
    group = f"lost-{unique_name}"
    name = f"lost-{unique_name}"
    enrol(operator, fleets[0], name, group)
    update_id = create_update(operator, tmp_path / "recipe", group, "echo before")

    # The row as the create request leaves it when the API dies before it starts the workflow.
    database = Database(cluster.database_url)
    try:
        with database.session() as session:
            deployment_id = deployment_store.create_deployment(
                session, update_id, TargetSelection(groups=[group])
            ).id
    finally:
        database.dispose()
    detail = wait_for_deployment(operator, deployment_id)

    assert detail["status"] == "succeeded"
    assert device_statuses(detail) == {name: "succeeded"}
    assert workflow_ids_with_prefix(cluster, f"deployment-{deployment_id}") == {
        f"deployment-{deployment_id}", f"deployment-{deployment_id}-device-{name}",
    }


def test_idle_check_ins_write_nothing(cluster, operator, fleets, tmp_path, unique_name):
    group = f"idle-{unique_name}"
    name = f"idle-{unique_name}"
    token = operator.register_device(name, groups=[group])["token"]
    fleet = fleets[0]
    device = fleet.add(name, token)
    fleet.start(device)
    update_id = create_update(operator, tmp_path / "recipe", group, "echo before")
    wait_for_deployment(operator, operator.deploy(update_id)["id"])
    fleet.stop(device)
    for url in cluster.api_urls:
        check_in(url, token)

    workflows_before = workflow_histories(cluster)
    calls_before = [read_metric(url, "microupdates_api_temporal_calls_total") for url in cluster.api_urls]
    rows_before = device_row_versions(cluster, name)
    for index in range(IDLE_CHECK_INS):
        assert check_in(cluster.api_urls[index % 2], token)["job"] is None
    time.sleep(1)

    assert [read_metric(url, "microupdates_api_temporal_calls_total") for url in cluster.api_urls] == calls_before
    assert device_row_versions(cluster, name) == rows_before
    assert workflow_histories(cluster) == workflows_before


def wait_for_file_present(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def check_in(api_url: str, token: str, wait_seconds: int = 0) -> dict:
    response = httpx.post(
        f"{api_url}{DEVICE_API_PREFIX}/check-in", json={"agent_version": "test", "wait_seconds": wait_seconds},
        headers=device_headers(token), timeout=wait_seconds + 10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def read_metric(api_url: str, name: str) -> float:
    """Return the sum of the samples whose name (with labels, when given) starts with `name`."""

    text = httpx.get(f"{api_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith(name) and not line.startswith(name + "_created")
    )


def temporal_workflow_list(cluster: Cluster, query: str = "") -> list[dict]:
    command = [find_temporal_cli(), "workflow", "list", "--address", cluster.stack.temporal_address,
               "--output", "json", "--limit", "10000"]
    if query:
        command += ["--query", query]
    output = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(output or "[]")


def workflow_histories(cluster: Cluster) -> dict[tuple[str, str], tuple[str, str]]:
    """Return (status, history length) of every workflow run, keyed by workflow and run id."""

    return {
        (item["execution"]["workflowId"], item["execution"]["runId"]): (item["status"], item["historyLength"])
        for item in temporal_workflow_list(cluster)
    }


def workflow_ids_with_prefix(cluster: Cluster, prefix: str) -> set[str]:
    return {
        item["execution"]["workflowId"] for item in temporal_workflow_list(cluster)
        if item["execution"]["workflowId"].startswith(prefix)
    }


def device_row_versions(cluster: Cluster, device_id: str) -> dict[str, list]:
    """Return the row versions (PostgreSQL's xmin) of every row of the device; an update changes them."""

    with psycopg.connect(cluster.postgres_url) as connection:
        return {
            table: connection.execute(
                f"SELECT xmin::text FROM {table} WHERE {column} = %s ORDER BY xmin::text", (device_id,)
            ).fetchall()
            for table, column in (("devices", "id"), ("stage_jobs", "device_id"),
                                  ("deployment_devices", "device_id"))
        }
