"""Check-in capacity of one API process: idle check-ins per second, and memory per held long poll.

Starts the stack (one API process, the worker and the Temporal dev server),
registers the devices straight into the database, and measures two things
with simulated devices (bench/simulated_fleet.py) that have no work:

1. Sustained check-ins: `--concurrency` check-ins in flight at a time,
   each with `wait_seconds` 0, so the API returns `{"job": null}` at once
   after authenticating the device, recording it as seen and looking for a
   queued job. Reports check-ins per second and the median and p99 latency.
2. Held long polls: `--long-polls` devices each keep a check-in with
   `wait_seconds` 60 open. Once the API's `microupdates_long_polls_held`
   gauge shows them all, it reports the API's resident memory, its growth
   over the idle process, and its open file descriptors.

Usage: .venv/bin/python bench/check_in_capacity.py [--devices 1000] [--long-polls 10000] [--json results.json]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchlib import (
    BenchError,
    SimulatorProcesses,
    format_table,
    machine_line,
    mebibytes,
    percentile,
    raise_fd_limit,
    register_devices,
    sample_process,
    start_stack,
    wait_for,
    write_json,
)
from microupdates.protocol.device_api import MAX_LONG_POLL_SECONDS

GROUP = "bench"
LONG_POLLS_PER_PROCESS = 2500
MAX_PROCESSES = 4
START_TIMEOUT_SECONDS = 60.0
START_SECONDS_PER_DEVICE = 0.02
HOLD_SAMPLES = 5
HOLD_SAMPLE_INTERVAL_SECONDS = 1.0
SPARE_FILES = 1000
LONG_POLL_GAUGE = "microupdates_long_polls_held"


def read_long_polls_held(api_url: str) -> int:
    text = httpx.get(api_url + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(LONG_POLL_GAUGE + " "):
            return int(float(line.split()[1]))
    raise BenchError(f"The API's /metrics has no {LONG_POLL_GAUGE} line.")


def measure_sustained(stack, credentials, arguments, work_dir: Path) -> dict[str, Any]:
    simulators = SimulatorProcesses(
        stack.api_url, credentials, work_dir / "sustained", arguments.client_processes,
        ["--mode", "idle", "--concurrency", str(math.ceil(arguments.concurrency / arguments.client_processes)),
         "--warmup", str(arguments.warmup), "--duration", str(arguments.duration)],
    )
    api_pid = stack.processes["api"].pid
    try:
        simulators.start(START_TIMEOUT_SECONDS + START_SECONDS_PER_DEVICE * len(credentials))
        simulators.send("go")
        time.sleep(arguments.warmup)
        before = sample_process(api_pid)
        results = simulators.finish(arguments.duration + 120)
        after = sample_process(api_pid)
    finally:
        simulators.kill()

    latencies = [latency for result in results for latency in result["latencies"]]
    if not latencies:
        raise BenchError(f"No check-in succeeded during the measurement; errors: "
                         f"{[sample for result in results for sample in result['error_samples']][:5]}")
    return {
        "devices": len(credentials),
        "concurrency": arguments.concurrency,
        "duration_seconds": arguments.duration,
        "check_ins": len(latencies),
        "check_ins_per_second": len(latencies) / arguments.duration,
        "median_ms": statistics.median(latencies) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
        "errors": sum(result["errors"] for result in results),
        "error_samples": [sample for result in results for sample in result["error_samples"]][:10],
        # Includes the last moments after the recorded window ends; an estimate of the API's share of the CPUs.
        "api_cpu_seconds": after.cpu_seconds - before.cpu_seconds,
        "client_cpu_seconds": sum(result["cpu_seconds"] for result in results),
    }


def measure_long_polls(stack, credentials, arguments, work_dir: Path) -> dict[str, Any]:
    count = len(credentials)
    processes = arguments.client_processes or max(1, min(MAX_PROCESSES, math.ceil(count / LONG_POLLS_PER_PROCESS)))
    api_pid = stack.processes["api"].pid
    idle = sample_process(api_pid)
    simulators = SimulatorProcesses(
        stack.api_url, credentials, work_dir / "long-polls", processes,
        ["--mode", "rollout", "--long-poll-seconds", str(MAX_LONG_POLL_SECONDS),
         "--start-rate", str(arguments.start_rate / processes)],
    )
    try:
        start_timeout = START_TIMEOUT_SECONDS + START_SECONDS_PER_DEVICE * count
        started = time.monotonic()
        simulators.start(start_timeout)
        # A few polls are always between their return and the next request, so 99 % count as all.
        expected = count - count // 100
        wait_for(lambda: read_long_polls_held(stack.api_url) >= expected, start_timeout,
                 f"{expected} long polls to be held by the API", interval=0.5)
        open_seconds = time.monotonic() - started
        samples = []
        for _ in range(HOLD_SAMPLES):
            samples.append((sample_process(api_pid), read_long_polls_held(stack.api_url)))
            time.sleep(HOLD_SAMPLE_INTERVAL_SECONDS)
        results = simulators.stop(timeout=120)
    finally:
        simulators.kill()

    held_rss = max(sample.rss_bytes for sample, _ in samples)
    return {
        "long_polls": count,
        "client_processes": processes,
        "open_seconds": open_seconds,
        "held_min": min(held for _, held in samples),
        "held_max": max(held for _, held in samples),
        "api_idle_rss_mib": mebibytes(idle.rss_bytes),
        "api_rss_mib": mebibytes(held_rss),
        "api_peak_rss_mib": mebibytes(max(sample.peak_rss_bytes for sample, _ in samples)),
        "kib_per_long_poll": (held_rss - idle.rss_bytes) / 1024 / count,
        "api_open_files": max(sample.open_files for sample, _ in samples),
        "errors": sum(result["errors"] for result in results),
        "error_samples": [sample for result in results for sample in result["error_samples"]][:10],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Measure one API process: sustained idle check-ins per second with latencies, "
                    "and memory while many devices hold long polls.")
    parser.add_argument("--devices", type=int, default=1000, help="devices taking turns in the sustained phase")
    parser.add_argument("--concurrency", type=int, default=32, help="check-ins in flight at a time (sustained)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of recorded check-ins (sustained)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of check-ins before recording starts")
    parser.add_argument("--long-polls", type=int, default=10000,
                        help="devices holding a long poll at once (0 skips this phase)")
    parser.add_argument("--client-processes", type=int, default=0,
                        help=f"simulator processes (default: 2 for the sustained phase, one per "
                             f"{LONG_POLLS_PER_PROCESS} long polls up to {MAX_PROCESSES})")
    # A first check-in costs the API about as much as an idle one, so the
    # default stays below what one API process sustains on 2 cores.
    parser.add_argument("--start-rate", type=float, default=200.0,
                        help="devices started per second when opening long polls (not measured)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--work-dir", type=Path, help="keep databases, logs and simulator results here")
    arguments = parser.parse_args()
    for name in ("devices", "concurrency"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(arguments, name)}")
    if arguments.long_polls < 0 or arguments.duration <= 0 or arguments.warmup < 0:
        parser.error("--long-polls and --warmup must not be negative, and --duration must be positive")

    # The API inherits this limit and keeps one socket per long poll.
    raise_fd_limit(arguments.long_polls + SPARE_FILES)
    print(f"Machine: {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="microupdates-check-in-") as temporary:
        root = arguments.work_dir or Path(temporary)
        stack = start_stack(root / "server")
        try:
            started = time.monotonic()
            count = max(arguments.devices, arguments.long_polls)
            credentials = register_devices(stack, [f"bench-{index:06d}" for index in range(count)], GROUP)
            registration_seconds = time.monotonic() - started

            print(f"Sustained check-ins: {arguments.devices} devices, {arguments.concurrency} in flight ...",
                  flush=True)
            sustained_arguments = argparse.Namespace(**vars(arguments))
            sustained_arguments.client_processes = arguments.client_processes or 2
            sustained = measure_sustained(stack, credentials[:arguments.devices], sustained_arguments, root)
            long_polls = None
            if arguments.long_polls:
                print(f"Holding {arguments.long_polls} long polls ...", flush=True)
                long_polls = measure_long_polls(stack, credentials[:arguments.long_polls], arguments, root)
            stack.check_running()
        finally:
            stack.stop()

    print(format_table(
        ["devices", "in flight", "check-ins/s", "median ms", "p99 ms", "API CPU s", "client CPU s", "errors"],
        [[sustained["devices"], sustained["concurrency"], sustained["check_ins_per_second"], sustained["median_ms"],
          sustained["p99_ms"], sustained["api_cpu_seconds"], sustained["client_cpu_seconds"],
          sustained["errors"]]],
    ))
    if long_polls:
        print(format_table(
            ["long polls", "API idle RSS MiB", "API RSS MiB", "KiB per long poll", "API open fds", "errors"],
            [[long_polls["long_polls"], long_polls["api_idle_rss_mib"], long_polls["api_rss_mib"],
              long_polls["kib_per_long_poll"], long_polls["api_open_files"], long_polls["errors"]]],
        ))
    write_json(arguments.json, {
        "benchmark": "check_in_capacity", "machine": machine_line(),
        "registration_seconds": registration_seconds, "sustained": sustained, "long_polls": long_polls,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
