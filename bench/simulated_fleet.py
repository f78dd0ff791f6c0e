"""Simulated devices: many per process, each speaking the device protocol over real HTTP to the API.

A device here sends what the agent sends: check-in long polls, artifact
downloads with a SHA-256 check, one progress report per stage and the stage
report. It runs every stage in-process at once, so it starts no subprocess,
writes no files and installs no packages. A rollout to these devices
therefore measures the server side: API, worker, Temporal and the database.

The benchmark scripts start this file as a helper process and talk to it
through stdin and stdout:

1. It starts its devices at `--start-rate` per second, each sending a
   check-in with `wait_seconds` 0 to prove its token works, and prints
   `ready SECONDS` once all of them have. Every 25 devices share one httpx
   client (`--devices-per-client`).
2. `--mode rollout`: right after its first check-in, every device keeps a
   check-in long poll open and runs the jobs it is given.
   `--mode idle`: after the line `go` on stdin, `--concurrency` loops send
   back-to-back check-ins with `wait_seconds` 0 for `--warmup` plus
   `--duration` seconds, recording each latency after the warm-up. It then
   writes its result and exits.
3. A line `stop`, the end of stdin or SIGTERM stops it; it writes the JSON
   result to `--result` and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from microupdates import __version__
from microupdates.protocol.device_api import (
    DEVICE_API_PREFIX,
    MAX_LONG_POLL_SECONDS,
    STAGE_ABORTED,
    STAGE_FAILED,
    STAGE_SUCCEEDED,
    CheckInRequest,
    CheckInResponse,
    ProgressReport,
    ProgressResponse,
    StageJob,
    StageReport,
    StepResult,
)

# Extra time on top of a request's own wait before the client gives up on it.
READ_MARGIN_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 30.0
RETRY_MAX_SECONDS = 10.0
REPORT_ATTEMPTS = 10
# Error messages kept in the result, so a failing run shows what went wrong.
MAX_ERROR_SAMPLES = 20
# Connections per client beyond one per device; a device sends one request at a time.
SPARE_CONNECTIONS = 4


@dataclass
class FleetStats:
    """Counters and records of this process's devices, written to the result file."""

    first_check_ins: int = 0
    check_ins: int = 0
    jobs: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    stage_reports: Counter = field(default_factory=Counter)
    device_stages: dict[str, list[list[str]]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def record_error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(message)


class RequestFailed(Exception):
    """Raised when a device request ends in a network error or an unexpected HTTP status."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class SimulatedDevice:
    def __init__(self, name: str, token: str, http: httpx.AsyncClient, stats: FleetStats,
                 long_poll_seconds: int, send_progress: bool) -> None:
        self.name = name
        self.headers = {"Authorization": f"Bearer {token}"}
        self.http = http
        self.stats = stats
        self.long_poll_seconds = long_poll_seconds
        self.send_progress = send_progress
        self.stats.device_stages[name] = []

    async def post(self, path: str, body: dict, wait_seconds: float) -> httpx.Response:
        timeout = httpx.Timeout(wait_seconds + READ_MARGIN_SECONDS, connect=CONNECT_TIMEOUT_SECONDS)
        try:
            response = await self.http.post(path, json=body, headers=self.headers, timeout=timeout)
        except httpx.HTTPError as error:
            raise RequestFailed(f"{self.name}: POST {path} failed: {type(error).__name__} {error}") from error
        if response.status_code >= 400:
            raise RequestFailed(f"{self.name}: POST {path} returned HTTP {response.status_code}: "
                                f"{response.text[:200]}", response.status_code)
        return response

    async def check_in(self, wait_seconds: int) -> CheckInResponse:
        body = CheckInRequest(agent_version=__version__, wait_seconds=wait_seconds).model_dump()
        response = await self.post("/check-in", body, wait_seconds)
        self.stats.check_ins += 1
        return CheckInResponse.model_validate(response.json())

    async def first_check_in(self, deadline: float) -> None:
        """Check in without waiting, retrying until `deadline` (monotonic), to prove the token and connection."""

        failures = 0
        while True:
            try:
                await self.check_in(0)
                self.stats.first_check_ins += 1
                return
            except RequestFailed as error:
                failures += 1
                if time.monotonic() >= deadline:
                    raise
                self.stats.record_error(str(error))
                await asyncio.sleep(min(RETRY_MAX_SECONDS, 0.5 * 2 ** min(failures, 5)))

    async def poll_forever(self) -> None:
        """Keep one check-in long poll open and run each job it returns, until cancelled."""

        failures = 0
        while True:
            try:
                response = await self.check_in(self.long_poll_seconds)
                failures = 0
            except RequestFailed as error:
                failures += 1
                self.stats.record_error(str(error))
                await asyncio.sleep(min(RETRY_MAX_SECONDS, 2 ** min(failures - 1, 5)))
                continue
            if response.job is not None:
                await self.run_job(response.job)

    async def run_job(self, job: StageJob) -> None:
        self.stats.jobs += 1
        started = time.monotonic()
        status = STAGE_SUCCEEDED
        error = None
        try:
            steps = await self.run_stage(job)
            if self.send_progress and await self.report_progress(job):
                status, error = STAGE_ABORTED, "the server asked to abort the stage"
        except RequestFailed as failure:
            if failure.status_code in (404, 409):
                self.stats.record_error(f"job {job.job_id} ({job.stage}) ended on the server: {failure}")
                self.stats.device_stages[self.name].append([job.stage, "gone"])
                return
            steps = []
            status, error = STAGE_FAILED, str(failure)

        report = StageReport(status=status, exit_code=0 if status == STAGE_SUCCEEDED else 1,
                             duration_seconds=time.monotonic() - started, error=error, steps=steps)
        outcome = await self.deliver_report(job, report)
        self.stats.stage_reports[f"{job.stage} {outcome}"] += 1
        self.stats.device_stages[self.name].append([job.stage, outcome])

    async def run_stage(self, job: StageJob) -> list[StepResult]:
        """Do the stage's work at once: download and check files, and succeed every command and package step."""

        if job.stage == "files":
            steps = []
            for entry in job.files:
                await self.download(entry.artifact)
                steps.append(StepResult(name=f"write {entry.destination}", exit_code=0))
            return steps
        if job.stage == "dependencies" and job.dependencies is not None:
            groups = job.dependencies.model_dump(exclude_none=True)
            return [StepResult(name=f"{manager} install", exit_code=0) for manager in groups]
        return [StepResult(name=job.stage, exit_code=0, output=f"simulated {job.stage}\n")]

    async def download(self, sha256: str | None) -> None:
        if sha256 is None:
            raise RequestFailed(f"{self.name}: a file entry has no artifact digest")
        try:
            response = await self.http.get(f"/artifacts/{sha256}", headers=self.headers)
        except httpx.HTTPError as error:
            raise RequestFailed(f"{self.name}: downloading {sha256} failed: {error}") from error
        if response.status_code != 200:
            raise RequestFailed(f"{self.name}: downloading {sha256} returned HTTP {response.status_code}",
                                response.status_code)
        actual = hashlib.sha256(response.content).hexdigest()
        if actual != sha256:
            raise RequestFailed(f"{self.name}: artifact {sha256} arrived with digest {actual}")

    async def report_progress(self, job: StageJob) -> bool:
        """Send one progress report without waiting, as the agent's first one; return whether to abort."""

        body = ProgressReport(output_tail="", wait_seconds=0).model_dump()
        response = await self.post(f"/jobs/{job.job_id}/progress", body, 0)
        return ProgressResponse.model_validate(response.json()).abort

    async def deliver_report(self, job: StageJob, report: StageReport) -> str:
        """Send the report until the API accepts it; return `accepted`, `gone` (404/409) or `undelivered`."""

        body = report.model_dump(mode="json")
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            try:
                await self.post(f"/jobs/{job.job_id}/report", body, 0)
                return "accepted" if report.status == STAGE_SUCCEEDED else report.status
            except RequestFailed as error:
                self.stats.record_error(str(error))
                if error.status_code in (404, 409):
                    return "gone"
                await asyncio.sleep(min(RETRY_MAX_SECONDS, 2 ** (attempt - 1)))
        return "undelivered"

async def check_in_repeatedly(devices: list[SimulatedDevice], stats: FleetStats, record_after: float,
                              end: float) -> None:
    """Send back-to-back check-ins with `wait_seconds` 0 for `devices` in turn, recording latencies."""

    index = 0
    while time.monotonic() < end:
        device = devices[index % len(devices)]
        index += 1
        started = time.perf_counter()
        try:
            await device.check_in(0)
        except RequestFailed as error:
            stats.record_error(str(error))
            await asyncio.sleep(0.1)
            continue
        if time.monotonic() >= record_after:
            stats.latencies.append(time.perf_counter() - started)


def raise_own_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def read_command() -> str:
    """Return the next line of stdin, or `stop` at its end."""

    line = await asyncio.to_thread(sys.stdin.readline)
    return line.strip() or "stop"


async def start_devices(devices: list[SimulatedDevice], stats: FleetStats, start_rate: float, timeout: float,
                        poll: bool) -> list[asyncio.Task]:
    """Start the devices at `start_rate` per second and return once each has checked in once.

    The rate keeps the API's accept queue from overflowing. With `poll`, each
    device starts its long polls right after its first check-in, so they do
    not all arrive at the same moment; the returned tasks run them.
    """

    deadline = time.monotonic() + timeout
    all_checked_in = asyncio.Event()

    async def start(device: SimulatedDevice) -> None:
        await device.first_check_in(deadline)
        if stats.first_check_ins == len(devices):
            all_checked_in.set()
        if poll:
            await device.poll_forever()

    tasks = []
    for index, device in enumerate(devices):
        tasks.append(asyncio.create_task(start(device)))
        if start_rate > 0 and index % 50 == 49:
            await asyncio.sleep(50 / start_rate)
    while not all_checked_in.is_set():
        failed = [task for task in tasks if task.done() and task.exception() is not None]
        if failed:
            for task in tasks:
                task.cancel()
            raise failed[0].exception()
        try:
            await asyncio.wait_for(all_checked_in.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
    return tasks


async def run(arguments: argparse.Namespace) -> dict:
    credentials = json.loads(arguments.credentials.read_text())
    stats = FleetStats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    # httpx's pool scans all its connections for every request, so one pool
    # for thousands of devices costs O(devices) per request; small pools keep it flat.
    groups = [credentials[start:start + arguments.devices_per_client]
              for start in range(0, len(credentials), arguments.devices_per_client)]
    clients = [new_client(arguments.server_url, len(group)) for group in groups]
    devices = [SimulatedDevice(name, token, client, stats, arguments.long_poll_seconds, not arguments.no_progress)
               for client, group in zip(clients, groups) for name, token in group]
    try:
        return await drive(devices, stats, stop, arguments)
    finally:
        for client in clients:
            await client.aclose()


def new_client(server_url: str, devices: int) -> httpx.AsyncClient:
    connections = devices + SPARE_CONNECTIONS
    return httpx.AsyncClient(
        base_url=server_url.rstrip("/") + DEVICE_API_PREFIX,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        # A pool wait is bounded by the longest request it can queue behind.
        timeout=httpx.Timeout(MAX_LONG_POLL_SECONDS + READ_MARGIN_SECONDS, connect=CONNECT_TIMEOUT_SECONDS),
    )


async def drive(devices: list[SimulatedDevice], stats: FleetStats, stop: asyncio.Event,
                arguments: argparse.Namespace) -> dict:
    started = time.monotonic()
    tasks = await start_devices(devices, stats, arguments.start_rate, arguments.start_timeout,
                                poll=arguments.mode == "rollout")
    ready_seconds = time.monotonic() - started
    print(f"ready {ready_seconds:.3f}", flush=True)

    if arguments.mode == "rollout":
        commands = asyncio.create_task(wait_for_stop(stop))
        await stop.wait()
        commands.cancel()
    else:
        if await read_command() != "go":
            return result(stats, ready_seconds)
        record_after = time.monotonic() + arguments.warmup
        end = record_after + arguments.duration
        loops = [devices[index::arguments.concurrency] for index in range(min(arguments.concurrency, len(devices)))]
        tasks += [asyncio.create_task(check_in_repeatedly(group, stats, record_after, end)) for group in loops]
        await asyncio.wait(tasks)

    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return result(stats, ready_seconds)


async def wait_for_stop(stop: asyncio.Event) -> None:
    while await read_command() != "stop":
        pass
    stop.set()


def result(stats: FleetStats, ready_seconds: float) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "ready_seconds": ready_seconds,
        "first_check_ins": stats.first_check_ins,
        "check_ins": stats.check_ins,
        "jobs": stats.jobs,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "stage_reports": dict(stats.stage_reports),
        "device_stages": stats.device_stages,
        "latencies": stats.latencies,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Run simulated devices against the device API (a helper "
                                                 "process of the benchmark scripts; see the module docstring).")
    parser.add_argument("--server-url", required=True, help="base URL of the API, e.g. http://127.0.0.1:8080")
    parser.add_argument("--credentials", type=Path, required=True,
                        help="JSON file with a list of [device name, device token] pairs")
    parser.add_argument("--result", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--mode", choices=("rollout", "idle"), default="rollout",
                        help="rollout: long-poll and run jobs; idle: back-to-back check-ins without waiting")
    parser.add_argument("--long-poll-seconds", type=int, default=25,
                        help=f"wait_seconds of each check-in in rollout mode (0-{MAX_LONG_POLL_SECONDS})")
    parser.add_argument("--no-progress", action="store_true",
                        help="skip the one progress report per stage that the agent sends")
    parser.add_argument("--start-rate", type=float, default=200.0,
                        help="devices started per second (0: all at once)")
    parser.add_argument("--start-timeout", type=float, default=120.0,
                        help="seconds every device has for its first successful check-in")
    parser.add_argument("--devices-per-client", type=int, default=25,
                        help="devices sharing one httpx client and its connection pool")
    parser.add_argument("--concurrency", type=int, default=16, help="idle mode: check-ins in flight at a time")
    parser.add_argument("--warmup", type=float, default=2.0, help="idle mode: seconds before latencies count")
    parser.add_argument("--duration", type=float, default=10.0, help="idle mode: seconds of recorded check-ins")
    arguments = parser.parse_args()
    if not 0 <= arguments.long_poll_seconds <= MAX_LONG_POLL_SECONDS:
        parser.error(f"--long-poll-seconds must be 0-{MAX_LONG_POLL_SECONDS}, got {arguments.long_poll_seconds}")
    for name in ("concurrency", "devices_per_client"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(arguments, name)}")

    raise_own_fd_limit()
    outcome = asyncio.run(run(arguments))
    arguments.result.write_text(json.dumps(outcome))
    print("done", flush=True)


if __name__ == "__main__":
    main()
