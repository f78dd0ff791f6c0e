"""Rollout throughput: one four-stage update to N simulated devices through the real stack.

For each size N it starts a fresh stack (Temporal dev server, worker, API on
free ports), registers N devices straight into the database (timed on its
own), starts simulated devices (bench/simulated_fleet.py: a few processes,
asyncio and httpx, real HTTP, stages done in-process at once) and waits until
every device keeps a check-in long poll open. Then it deploys an update with a
before command, one file, a pip3 package and an after command to all of
them and measures the time from the deploy request to the deployment's
final status. Every device must end `succeeded`, both in the API and on the
device's side, or the script exits 1.

By default it also runs bench/bare_workflow.py with the same N, the lower
bound of Temporal on this machine, and reports ours/bare.

Usage: .venv/bin/python bench/fleet_rollout.py --devices 100 1000 10000 [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from benchlib import (
    BenchError,
    SimulatorProcesses,
    bench_python,
    format_table,
    machine_line,
    mebibytes,
    raise_fd_limit,
    register_devices,
    sample_processes,
    stack_pids,
    start_stack,
    wait_for_deployment,
    write_json,
)
from microupdates.cli.api_client import OperatorApiClient

GROUP = "bench"
STAGES = ["before", "files", "dependencies", "after"]
DEVICES_PER_PROCESS = 2500
MAX_PROCESSES = 4
# Bounds that grow with the fleet: base seconds plus seconds per device.
START_TIMEOUT_SECONDS = 60.0
START_SECONDS_PER_DEVICE = 0.02
ROLLOUT_TIMEOUT_SECONDS = 300.0
ROLLOUT_SECONDS_PER_DEVICE = 0.5
# Open files the API needs per device: the socket of its long poll. The simulators raise their own limits.
FILES_PER_DEVICE = 1
SPARE_FILES = 1000
MIN_STATUS_POLL_SECONDS = 0.25
MAX_STATUS_POLL_SECONDS = 2.0
BARE_SCRIPT = Path(__file__).with_name("bare_workflow.py")


def write_update(directory: Path, heartbeat_timeout_seconds: int) -> Path:
    """Write the benchmark's recipe: before command, one file, one pip3 package, after command."""

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "app.txt").write_text("benchmark payload\n")
    recipe = {
        "version": "1.0.0",
        "comment": "fleet rollout benchmark",
        "targets": {"groups": [GROUP]},
        "before": {"run": "systemctl stop bench-app", "timeout_seconds": 60},
        "files": [{"source": "app.txt", "destination": "/opt/bench-app/app.txt", "mode": "0644"}],
        "dependencies": {"pip3": {"virtualenv": "/opt/bench-app/venv",
                                  "packages": [{"name": "benchpkg", "version": "1.0.0"}]}},
        "after": {"run": "systemctl start bench-app", "timeout_seconds": 60},
        "timeouts": {"heartbeat_timeout_seconds": heartbeat_timeout_seconds},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def status_poll_seconds(devices: int) -> float:
    """Return how often to read the deployment's status: often for short rollouts, less for long ones.

    Each read counts the devices by status, so at 10,000 devices four reads
    a second would add load of their own. One read every 2 s adds at most
    2 s to a rollout of many minutes.
    """

    return min(MAX_STATUS_POLL_SECONDS, max(MIN_STATUS_POLL_SECONDS, devices / 5000))


def process_count(devices: int, requested: int | None) -> int:
    if requested:
        return requested
    return max(1, min(MAX_PROCESSES, math.ceil(devices / DEVICES_PER_PROCESS)))


def check_devices(size: int, detail: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """Return a sentence per problem: the deployment's status, its counts, and each device's own stage record."""

    problems = []
    if detail["status"] != "succeeded":
        problems.append(f"deployment ended {detail['status']} (error: {detail.get('error')})")
    if detail["device_status_counts"] != {"succeeded": size}:
        problems.append(f"device statuses are {detail['device_status_counts']}, expected {{'succeeded': {size}}}")
    stages = {}
    for result in results:
        stages.update(result["device_stages"])
    expected = [[stage, "accepted"] for stage in STAGES]
    wrong = {name: record for name, record in stages.items() if record != expected}
    if len(stages) != size:
        problems.append(f"{len(stages)} simulated devices reported, expected {size}")
    for name, record in sorted(wrong.items())[:5]:
        problems.append(f"device {name} ran {record}, expected {expected}")
    if len(wrong) > 5:
        problems.append(f"... and {len(wrong) - 5} more devices with other stage records")
    return problems


def server_seconds(detail: dict[str, Any]) -> float | None:
    if not detail.get("finished_at"):
        return None
    created = datetime.fromisoformat(detail["created_at"].replace("Z", "+00:00"))
    finished = datetime.fromisoformat(detail["finished_at"].replace("Z", "+00:00"))
    return (finished - created).total_seconds()


def measure_rollout(size: int, arguments: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    stack = start_stack(work_dir / "server")
    simulators = None
    try:
        with OperatorApiClient(stack.api_url, stack.admin_api_key) as api:
            update_id = api.create_update_from_file(write_update(work_dir / "update", arguments.heartbeat_timeout))["id"]

            started = time.monotonic()
            credentials = register_devices(stack, [f"bench-{index:06d}" for index in range(size)], GROUP)
            registration_seconds = time.monotonic() - started

            simulators = SimulatorProcesses(
                stack.api_url, credentials, work_dir / "simulators", process_count(size, arguments.processes),
                ["--mode", "rollout", "--long-poll-seconds", str(arguments.long_poll_seconds),
                 "--start-rate", str(arguments.start_rate / process_count(size, arguments.processes))]
                + (["--no-progress"] if arguments.no_progress else []),
            )
            start_timeout = START_TIMEOUT_SECONDS + START_SECONDS_PER_DEVICE * size
            devices_start_seconds = simulators.start(start_timeout)

            pids = stack_pids(stack)
            before = sample_processes(pids)
            requested = time.monotonic()
            deployment = api.deploy(update_id, groups=[GROUP])
            timeout = arguments.timeout or ROLLOUT_TIMEOUT_SECONDS + ROLLOUT_SECONDS_PER_DEVICE * size
            detail = wait_for_deployment(api, deployment["id"], timeout, status_poll_seconds(size))
            wall_seconds = time.monotonic() - requested
            after = sample_processes(pids)
            stack.check_running()

            results = simulators.stop(timeout=60)
            simulators = None
    finally:
        if simulators is not None:
            simulators.kill()
        stack.stop()

    problems = check_devices(size, detail, results)
    measurement = {
        "devices": size,
        "simulator_processes": len(results),
        "registration_seconds": registration_seconds,
        "devices_start_seconds": devices_start_seconds,
        "wall_seconds": wall_seconds,
        "server_seconds": server_seconds(detail),
        "devices_per_second": size / wall_seconds,
        "deployment_status": detail["status"],
        "device_status_counts": detail["device_status_counts"],
        "processes": {
            name: {
                "cpu_seconds": after[name].cpu_seconds - before[name].cpu_seconds,
                "peak_rss_mib": mebibytes(after[name].peak_rss_bytes),
                "rss_mib": mebibytes(after[name].rss_bytes),
            }
            for name in pids
        },
        "simulators": {
            "cpu_seconds": sum(result["cpu_seconds"] for result in results),
            "check_ins": sum(result["check_ins"] for result in results),
            "errors": sum(result["errors"] for result in results),
            "error_samples": [sample for result in results for sample in result["error_samples"]][:10],
        },
        "problems": problems,
    }
    return measurement


def run_bare(size: int, work_dir: Path, timeout: float) -> dict[str, Any]:
    """Run bench/bare_workflow.py for `size` children in its own process and return its measurement."""

    output = work_dir / f"bare-{size}.json"
    completed = subprocess.run(
        [bench_python(), str(BARE_SCRIPT), "--children", str(size), "--json", str(output)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
    )
    if completed.returncode != 0:
        raise BenchError(f"bench/bare_workflow.py --children {size} exited with status {completed.returncode}: "
                         f"{completed.stderr.decode()[-2000:]}")
    return json.loads(output.read_text())["results"][0]


def print_results(results: list[dict[str, Any]]) -> None:
    headers = ["devices", "registration s", "rollout s", "devices/s", "bare s", "ours/bare",
               "API peak RSS MiB", "worker peak RSS MiB", "Temporal peak RSS MiB",
               "API CPU s", "worker CPU s", "Temporal CPU s", "simulators CPU s"]
    rows = []
    for result in results:
        processes = result["processes"]
        bare = result.get("bare")
        rows.append([
            result["devices"], result["registration_seconds"], result["wall_seconds"], result["devices_per_second"],
            bare["wall_seconds"] if bare else "-", result["ratio_to_bare"] if bare else "-",
            processes["api"]["peak_rss_mib"], processes["worker"]["peak_rss_mib"],
            processes["temporal"]["peak_rss_mib"], processes["api"]["cpu_seconds"],
            processes["worker"]["cpu_seconds"], processes["temporal"]["cpu_seconds"],
            result["simulators"]["cpu_seconds"],
        ])
    print(format_table(headers, rows))


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Measure a four-stage rollout to N simulated devices through the real stack, "
                    "and the same fan-out as a bare Temporal workflow.")
    parser.add_argument("--devices", type=int, nargs="+", default=[100], help="fleet sizes to measure, e.g. 100 1000")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--processes", type=int,
                        help=f"simulator processes (default: one per {DEVICES_PER_PROCESS} devices, "
                             f"at most {MAX_PROCESSES})")
    parser.add_argument("--long-poll-seconds", type=int, default=25,
                        help="wait_seconds of each device check-in, as the agent's long_poll_seconds")
    # A first check-in costs the API about as much as an idle one, so the
    # default stays below what one API process sustains on 2 cores.
    parser.add_argument("--start-rate", type=float, default=200.0,
                        help="devices started per second across all simulator processes (not measured)")
    parser.add_argument("--no-progress", action="store_true",
                        help="devices skip the one progress report per stage that the agent sends")
    parser.add_argument("--timeout", type=float,
                        help=f"seconds allowed for one rollout (default {ROLLOUT_TIMEOUT_SECONDS:.0f} + "
                             f"{ROLLOUT_SECONDS_PER_DEVICE} per device)")
    parser.add_argument("--heartbeat-timeout", type=int, default=60,
                        help="the recipe's heartbeat_timeout_seconds: how long a stage may go without a report "
                        "from its device; raise it when one API process responds slowly at large sizes")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-workflow comparison")
    parser.add_argument("--work-dir", type=Path,
                        help="keep databases, logs and simulator results here (default: a temporary directory)")
    arguments = parser.parse_args()
    if min(arguments.devices) < 1:
        parser.error(f"--devices must be at least 1, got {min(arguments.devices)}")

    raise_fd_limit(max(arguments.devices) * FILES_PER_DEVICE + SPARE_FILES)
    print(f"Machine: {machine_line()}", flush=True)
    results = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="microupdates-rollout-") as temporary:
        root = arguments.work_dir or Path(temporary)
        for size in arguments.devices:
            print(f"Rolling out to {size} devices ...", flush=True)
            result = measure_rollout(size, arguments, root / f"rollout-{size}")
            if not arguments.no_bare:
                bare_timeout = ROLLOUT_TIMEOUT_SECONDS + ROLLOUT_SECONDS_PER_DEVICE * size
                result["bare"] = run_bare(size, root, bare_timeout)
                result["ratio_to_bare"] = result["wall_seconds"] / result["bare"]["wall_seconds"]
            results.append(result)
            for problem in result["problems"]:
                print(f"FAILED ({size} devices): {problem}", file=sys.stderr)
            failed = failed or bool(result["problems"])

    print_results(results)
    write_json(arguments.json, {"benchmark": "fleet_rollout", "machine": machine_line(), "results": results})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
