"""The demo: the embedded stack, three local agents and a real example update, end to end."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.local_fleet import LocalFleet
from microupdates.cli.stack import Stack, StackPorts, free_port
from microupdates.workflows.contracts import FINAL_DEPLOYMENT_STATUSES

logger = logging.getLogger(__name__)

DEVICE_NAMES = ("demo-device-1", "demo-device-2", "demo-device-3")
DEMO_GROUP = "demo"
DEPLOYMENT_TIMEOUT_SECONDS = 600.0
EXAMPLE_RECIPE = Path("examples/hello-service/recipe.yaml")
BROKEN_RECIPE = Path("examples/hello-service/recipe-broken.yaml")
DEMO_MARKER_FILE = ".microupdates-demo"


def run_demo(
    data_dir: Path, recipe_path: Path, broken_recipe_path: Path | None, keep_running: bool, console: Console
) -> bool:
    """Run the demo and return True when it went as expected.

    Expected: every device succeeds with the first recipe and its service
    responds; then, when a broken recipe is given, every device rolls back and
    its service responds with the first recipe's version again.
    """

    prepare_data_dir(data_dir)
    stack = Stack(data_dir=data_dir / "server", ports=StackPorts.free())
    fleet = None
    started = time.monotonic()
    try:
        console.print(f"Starting Temporal, the worker and the API in {data_dir} ...")
        stack.start()
        fleet = LocalFleet(server_url=stack.api_url, devices_dir=data_dir / "devices")
        with OperatorApiClient(stack.api_url, stack.admin_api_key) as api:
            ports = register_devices(api, fleet)
            fleet.start_all()
            console.print(f"Started {len(fleet.devices)} local agents; creating the update from {recipe_path} ...")

            detail, version = deploy_and_report(api, console, recipe_path)
            succeeded = detail["status"] == "succeeded" and check_services(console, ports, version)

            if succeeded and broken_recipe_path is not None:
                console.print(f"\nNow a broken release from {broken_recipe_path}; every device should roll back.")
                detail, _ = deploy_and_report(api, console, broken_recipe_path)
                rolled_back = all(device["status"] == "rolled_back" for device in detail["devices"])
                succeeded = rolled_back and check_services(console, ports, version)

        console.print(f"Temporal Web UI: {stack.temporal_ui_url}/namespaces/default/workflows")
        console.print(f"Demo {'succeeded' if succeeded else 'FAILED'} in {time.monotonic() - started:.1f} s")
        if keep_running:
            console.print(f"The stack keeps running; press Ctrl-C to stop it. For the CLI: "
                          f"export MICROUPDATES_CONFIG={stack.cli_config_path}", soft_wrap=True)
            wait_for_interrupt()
        return succeeded
    finally:
        if fleet is not None:
            fleet.stop_all()
            stop_services(fleet)
        stack.stop()


def prepare_data_dir(data_dir: Path) -> None:
    """Empty a directory that an earlier demo made; refuse any other non-empty directory."""

    marker = data_dir / DEMO_MARKER_FILE
    if data_dir.exists() and any(data_dir.iterdir()):
        if not marker.exists():
            raise RuntimeError(
                f"{data_dir} is not empty and was not made by the demo; give --data-dir a new or empty directory."
            )
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("This directory belongs to `microupdates demo`, which empties it at every run.\n")


def register_devices(api: OperatorApiClient, fleet: LocalFleet) -> dict[str, int]:
    ports = {}
    for name in DEVICE_NAMES:
        created = api.register_device(name, groups=[DEMO_GROUP], tags=["local"])
        device = fleet.add(name, created["token"])
        port = free_port()
        port_file = device.root / "etc/hello-service/port"
        port_file.parent.mkdir(parents=True, exist_ok=True)
        port_file.write_text(str(port))
        ports[name] = port
    return ports


def deploy_and_report(api: OperatorApiClient, console: Console, recipe_path: Path) -> tuple[dict, str]:
    """Create an update from a recipe, deploy it to the demo group, wait and print the result table."""

    update = api.create_update_from_file(recipe_path)
    deployment = api.deploy(update["id"], groups=[DEMO_GROUP])
    console.print(f"Deployment {deployment['id']} of update {update['version']} started "
                  f"(workflow {deployment['workflow_id']})")
    detail = wait_for_deployment(api, deployment["id"])
    print_result_table(console, api, detail)
    return detail, update["version"]


def wait_for_deployment(api: OperatorApiClient, deployment_id: str) -> dict:
    deadline = time.monotonic() + DEPLOYMENT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        detail = api.read_deployment(deployment_id)
        if detail["status"] in FINAL_DEPLOYMENT_STATUSES:
            return detail
        time.sleep(0.5)
    raise TimeoutError(f"Deployment {deployment_id} did not finish within {DEPLOYMENT_TIMEOUT_SECONDS:.0f} s.")


def print_result_table(console: Console, api: OperatorApiClient, detail: dict) -> None:
    table = Table(title=f"Deployment {detail['id']}: {detail['status']} (update {detail['update_version']})")
    for column in ("device", "status", "stage", "stages run", "seconds"):
        table.add_column(column, no_wrap=True)
    table.add_column("error", overflow="fold")
    for device in detail["devices"]:
        result = api.read_device_result(detail["id"], device["device_id"])
        stages = "\n".join(f"{s['stage']} {s['status'] or s['state']}" for s in result["stages"])
        seconds = sum(s["duration_seconds"] or 0 for s in result["stages"])
        error = device["error"] or ""
        if device["rollback_error"]:
            error += f" (rollback failed: {device['rollback_error']})"
        table.add_row(device["device_id"], device["status"], device["stage"] or "", stages, f"{seconds:.1f}", error)
    console.print(table)


def check_services(console: Console, ports: dict[str, int], expected_version: str) -> bool:
    """Return True when every device's service responds with the expected version."""

    all_ok = True
    for name, port in ports.items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                version = json.load(response)["version"]
        except OSError as error:
            console.print(f"{name}: hello-service does not respond on port {port}: {error}")
            all_ok = False
            continue
        console.print(f"{name}: hello-service responds on port {port} with version {version}")
        all_ok = all_ok and version == expected_version
    return all_ok


def stop_services(fleet: LocalFleet) -> None:
    """Stop the example services the deployment started, so the demo leaves nothing running."""

    for device in fleet.devices:
        pid_file = device.root / "run/hello-service.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def wait_for_interrupt() -> None:
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
