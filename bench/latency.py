"""Deploy and abort latency for an online, long-polling agent.

Starts the embedded stack and one real agent, then repeats:
- deploy: from the deploy request to the before command running on the device
  (the command writes the wall-clock time to a file);
- abort: from the abort request to the running command having exited
  (its pid no longer exists).

Usage: .venv/bin/python bench/latency.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.local_fleet import LocalFleet
from microupdates.cli.stack import Stack, StackPorts
from microupdates.workflows.contracts import FINAL_DEPLOYMENT_STATUSES

WAIT_SECONDS = 60.0


def wait_for(predicate, timeout: float = WAIT_SECONDS, interval: float = 0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met within %.0f s" % timeout)


def read_number(path: Path) -> float | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return float(text) if text else None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return ordered[index]


def create_update(api: OperatorApiClient, directory: Path, name: str, device: str, command: str) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    recipe = {"version": "1.0.0", "targets": {"devices": [device]}, "before": {"run": command, "timeout_seconds": 600}}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return api.create_update_from_file(path)["id"]


def wait_until_finished(api: OperatorApiClient, deployment_id: str) -> None:
    wait_for(lambda: api.read_deployment(deployment_id)["status"] in FINAL_DEPLOYMENT_STATUSES, interval=0.05)


def measure(runs: int, work_dir: Path) -> dict[str, list[float]]:
    stack = Stack(data_dir=work_dir / "server", ports=StackPorts.free())
    stack.start()
    fleet = LocalFleet(server_url=stack.api_url, devices_dir=work_dir / "devices")
    results: dict[str, list[float]] = {"deploy": [], "abort": []}
    try:
        with OperatorApiClient(stack.api_url, stack.admin_api_key) as api:
            device = fleet.add("bench-device", api.register_device("bench-device", groups=["bench"])["token"])
            fleet.start(device)
            started_file = device.root / "started"
            pid_file = device.root / "pid"
            deploy_update = create_update(api, work_dir, "deploy", device.name,
                                          'date +%s.%N > "$MICROUPDATES_DEVICE_ROOT/started"')
            abort_update = create_update(api, work_dir, "abort", device.name,
                                         'echo $$ > "$MICROUPDATES_DEVICE_ROOT/pid"; exec sleep 600')

            for _ in range(runs):
                started_file.unlink(missing_ok=True)
                requested = time.time()
                deployment = api.deploy(deploy_update)
                started = wait_for(lambda: read_number(started_file))
                results["deploy"].append(started - requested)
                wait_until_finished(api, deployment["id"])

                pid_file.unlink(missing_ok=True)
                deployment = api.deploy(abort_update)
                pid = int(wait_for(lambda: read_number(pid_file)))
                requested = time.monotonic()
                api.abort(deployment["id"])
                wait_for(lambda: not pid_exists(pid))
                results["abort"].append(time.monotonic() - requested)
                wait_until_finished(api, deployment["id"])
    finally:
        fleet.stop_all()
        stack.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure deploy and abort latency for one online agent.")
    parser.add_argument("--runs", type=int, default=20, help="deployments measured for each latency")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="microupdates-latency-") as work_dir:
        results = measure(arguments.runs, Path(work_dir))

    for name, values in results.items():
        print(f"{name:>6}: n={len(values)} median={statistics.median(values):.3f} s "
              f"p95={percentile(values, 0.95):.3f} s max={max(values):.3f} s")


if __name__ == "__main__":
    main()
