"""The lower bound for a rollout: a bare parent workflow fanning out N children of four no-op activities.

For each size it starts a fresh Temporal dev server with the stack's
settings (a SQLite file with WAL and synchronous=normal), runs a worker in
this process, and times one parent workflow from its start to its result.
The parent has the deployment's shape: pages of ids from an activity, a
sliding window of running children and continue-as-new after a bounded
number of children (bench/bare_workflows.py). No API, no database, no
devices.

Usage: .venv/bin/python bench/bare_workflow.py --children 100 1000 10000 [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from bare_workflows import BareChildWorkflow, BareParentInput, BareParentWorkflow, child_page, stage
from benchlib import format_table, machine_line, mebibytes, sample_process, write_json
from microupdates.cli.stack import Stack, StackPorts
from microupdates.workflows.contracts import DeploymentInput
from microupdates.workflows.deployment import DEVICE_PAGE_SIZE, MAX_CHILDREN_PER_RUN

TASK_QUEUE = "bare-fan-out"
# The worker's activity slots, as in microupdates/worker/main.py.
MAX_CONCURRENT_ACTIVITIES = 200
RUN_TIMEOUT_SECONDS = 300.0
RUN_SECONDS_PER_CHILD = 0.5


def start_dev_server(data_dir: Path) -> Stack:
    """Start only the Temporal dev server, with the same command line as the stack's."""

    stack = Stack(data_dir=data_dir, ports=StackPorts.free())
    data_dir.mkdir(parents=True, exist_ok=True)
    # NOTE: uses Stack's private starter so the dev server's flags stay those of the real stack.
    stack._start_temporal()
    return stack


async def run_parent(address: str, children: int, window: int, timeout: float) -> tuple[float, int]:
    """Run one parent workflow with a worker in this process; return its wall time and its completed children."""

    client = await Client.connect(address)
    worker = Worker(
        client, task_queue=TASK_QUEUE, workflows=[BareParentWorkflow, BareChildWorkflow],
        activities=[child_page, stage], max_concurrent_activities=MAX_CONCURRENT_ACTIVITIES,
    )
    async with worker:
        started = time.monotonic()
        handle = await client.start_workflow(
            BareParentWorkflow.run,
            BareParentInput(children, window, DEVICE_PAGE_SIZE, MAX_CHILDREN_PER_RUN),
            id=f"bare-{uuid.uuid4().hex[:8]}", task_queue=TASK_QUEUE,
        )
        completed = await asyncio.wait_for(handle.result(), timeout)
        return time.monotonic() - started, completed


def measure(children: int, window: int, work_dir: Path) -> dict[str, Any]:
    server = start_dev_server(work_dir)
    try:
        pid = server.processes["temporal"].pid
        before = sample_process(pid)
        own_before = resource.getrusage(resource.RUSAGE_SELF)
        timeout = RUN_TIMEOUT_SECONDS + RUN_SECONDS_PER_CHILD * children
        wall_seconds, completed = asyncio.run(run_parent(server.temporal_address, children, window, timeout))
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        after = sample_process(pid)
    finally:
        server.stop()
    if completed != children:
        raise RuntimeError(f"The parent workflow completed {completed} children, expected {children}.")
    return {
        "children": children,
        "window": window,
        "wall_seconds": wall_seconds,
        "children_per_second": children / wall_seconds,
        "temporal_cpu_seconds": after.cpu_seconds - before.cpu_seconds,
        "temporal_peak_rss_mib": mebibytes(after.peak_rss_bytes),
        "worker_cpu_seconds": (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Measure a bare Temporal fan-out (parent, children of four no-op activities) on a fresh "
                    "dev server: the lower bound for bench/fleet_rollout.py.")
    parser.add_argument("--children", type=int, nargs="+", default=[100], help="numbers of children, e.g. 100 1000")
    parser.add_argument("--window", type=int, default=DeploymentInput.max_concurrent_devices,
                        help="children running at a time (default: the deployment's max_concurrent_devices)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--work-dir", type=Path, help="keep the dev server's database and log here")
    arguments = parser.parse_args()
    if min(arguments.children) < 1:
        parser.error(f"--children must be at least 1, got {min(arguments.children)}")
    if arguments.window < 1:
        parser.error(f"--window must be at least 1, got {arguments.window}")

    print(f"Machine: {machine_line()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="microupdates-bare-") as temporary:
        root = arguments.work_dir or Path(temporary)
        for children in arguments.children:
            print(f"Running {children} children ...", flush=True)
            results.append(measure(children, arguments.window, root / f"bare-{children}"))

    print(format_table(
        ["children", "wall s", "children/s", "Temporal CPU s", "worker CPU s", "Temporal peak RSS MiB"],
        [[result["children"], result["wall_seconds"], result["children_per_second"],
          result["temporal_cpu_seconds"], result["worker_cpu_seconds"], result["temporal_peak_rss_mib"]]
         for result in results],
    ))
    write_json(arguments.json, {"benchmark": "bare_workflow", "machine": machine_line(), "results": results})


if __name__ == "__main__":
    sys.exit(main())
