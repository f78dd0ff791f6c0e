"""Helpers shared by the benchmark scripts: process statistics, limits, device registration, tables and JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from microupdates.cli.api_client import OperatorApiClient, OperatorApiConnectionError
from microupdates.cli.stack import Stack, StackPorts
from microupdates.db import devices as device_store
from microupdates.db.session import Database
from microupdates.settings import ServerSettings
from microupdates.workflows.contracts import FINAL_DEPLOYMENT_STATUSES

# Devices registered per database transaction.
REGISTRATION_BATCH = 500
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """Raised when a benchmark cannot run or its result is wrong (a device failed, a wait timed out)."""


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft limit on open files to the hard limit and return it.

    Child processes inherit the limit, so a stack started afterwards gets it
    too; its API keeps one socket open per long poll. Raises BenchError when
    the hard limit is below `needed`.
    """

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        raise BenchError(
            f"The open-file limit is {target} but this run needs about {needed}; "
            f"raise the hard limit (ulimit -Hn, or LimitNOFILE for a service) or run a smaller size."
        )
    return target


@dataclass
class ProcessSample:
    """CPU and memory of one process read from /proc: CPU seconds include its waited-for children."""

    pid: int
    cpu_seconds: float
    rss_bytes: int
    peak_rss_bytes: int
    open_files: int


def sample_process(pid: int) -> ProcessSample:
    """Read a process's CPU time (utime, stime, cutime, cstime), resident set, peak resident set and open fds."""

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Fields after the command name start at field 3 (state); utime is field 14.
    cpu_ticks = sum(int(value) for value in fields[11:15])
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        status[name] = value.strip()
    try:
        open_files = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        open_files = -1
    return ProcessSample(
        pid=pid,
        cpu_seconds=cpu_ticks / CLOCK_TICKS_PER_SECOND,
        rss_bytes=kibibytes(status.get("VmRSS", "0 kB")) * 1024,
        peak_rss_bytes=kibibytes(status.get("VmHWM", "0 kB")) * 1024,
        open_files=open_files,
    )


def kibibytes(value: str) -> int:
    return int(value.split()[0])


def stack_pids(stack: Stack) -> dict[str, int]:
    return {name: process.pid for name, process in stack.processes.items()}


def sample_processes(pids: dict[str, int]) -> dict[str, ProcessSample]:
    return {name: sample_process(pid) for name, pid in pids.items()}


def mebibytes(size_bytes: float) -> float:
    return size_bytes / (1024 * 1024)


def start_stack(data_dir: Path) -> Stack:
    stack = Stack(data_dir=data_dir, ports=StackPorts.free())
    stack.start()
    return stack


def database_url(stack: Stack) -> str:
    """Return the application database URL the stack's API and worker use."""

    return stack.database_url or ServerSettings(data_dir=stack.data_dir).resolved_database_url()


def register_devices(stack: Stack, names: Sequence[str], group: str) -> list[tuple[str, str]]:
    """Register devices straight into the stack's database, in batches, and return (name, token) pairs.

    The same store function as `POST /api/v1/devices` does the work, so the
    rows are those the API would write, without one HTTP request per device.
    """

    database = Database(database_url(stack))
    credentials = []
    try:
        for start in range(0, len(names), REGISTRATION_BATCH):
            with database.session() as session:
                for name in names[start:start + REGISTRATION_BATCH]:
                    credentials.append((name, device_store.register_device(session, name, [group], [])))
    finally:
        database.dispose()
    return credentials


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Call `predicate` until it returns a true value and return that; raise BenchError after `timeout` seconds."""

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"Timed out after {timeout:.0f} s waiting for {what}.")
        time.sleep(interval)


def wait_for_deployment(api: OperatorApiClient, deployment_id: str, timeout: float,
                        interval: float = 0.25) -> dict[str, Any]:
    """Poll a deployment until its status is final and return its detail (with one device)."""

    def finished() -> dict[str, Any] | None:
        try:
            detail = api.read_deployment(deployment_id, limit=1)
        except OperatorApiConnectionError as error:
            # An overloaded API responds late, and the rollout's own timeout still bounds the wait.
            print(f"Reading deployment {deployment_id} failed ({error}); trying again", file=sys.stderr)
            return None
        return detail if detail["status"] in FINAL_DEPLOYMENT_STATUSES else None

    return wait_for(finished, timeout, f"deployment {deployment_id} to finish", interval)


def read_line(process: subprocess.Popen, timeout: float, what: str) -> str:
    """Read one line from a child's stdout pipe, raising BenchError when it exits or `timeout` passes first."""

    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"Timed out after {timeout:.0f} s waiting for {what} (pid {process.pid}).")
        ready, _, _ = select.select([process.stdout], [], [], min(remaining, 1.0))
        if ready:
            line = process.stdout.readline()
            if not line:
                raise BenchError(f"Process {process.pid} exited with status {process.wait()} before {what}.")
            return line.decode().strip()
        if process.poll() is not None:
            raise BenchError(f"Process {process.pid} exited with status {process.returncode} before {what}.")


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Send SIGTERM, wait up to `timeout` seconds, then kill."""

    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values` (fraction 0.99 for p99)."""

    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def machine_line() -> str:
    """Describe the machine: CPU count, memory, Python version, kernel."""

    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = kibibytes(line.split(":", 1)[1])
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
            f"{memory_kib / 1024 / 1024:.1f} GiB RAM, Python {platform.python_version()}, "
            f"Linux {platform.release()}")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Render rows as a Markdown table, so the output pastes into docs/benchmarks.md."""

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(value) for value in row) + " |")
    return "\n".join(lines)


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def bench_python() -> str:
    """Return the interpreter that runs the benchmarks, for starting helper processes."""

    return sys.executable


def split_evenly(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Split `items` into at most `parts` lists of nearly equal length, none empty."""

    parts = max(1, min(parts, len(items)))
    return [list(items[index::parts]) for index in range(parts)]


SIMULATOR_SCRIPT = Path(__file__).with_name("simulated_fleet.py")


class SimulatorProcesses:
    """Helper processes running simulated devices (bench/simulated_fleet.py), the devices split evenly."""

    def __init__(self, server_url: str, credentials: Sequence[tuple[str, str]], work_dir: Path,
                 process_count: int, arguments: Sequence[str]) -> None:
        self.server_url = server_url
        self.work_dir = work_dir
        self.groups = split_evenly(list(credentials), process_count)
        self.arguments = list(arguments)
        self.processes: list[subprocess.Popen] = []
        self.result_paths: list[Path] = []

    def start(self, timeout: float) -> float:
        """Start the processes and wait until every device has checked in once; return the slowest start time."""

        self.work_dir.mkdir(parents=True, exist_ok=True)
        for index, group in enumerate(self.groups):
            credentials_path = self.work_dir / f"devices-{index}.json"
            credentials_path.write_text(json.dumps(group))
            result_path = self.work_dir / f"result-{index}.json"
            result_path.unlink(missing_ok=True)
            self.result_paths.append(result_path)
            log = open(self.work_dir / f"simulator-{index}.log", "ab")
            self.processes.append(subprocess.Popen(
                [bench_python(), str(SIMULATOR_SCRIPT), "--server-url", self.server_url,
                 "--credentials", str(credentials_path), "--result", str(result_path),
                 "--start-timeout", str(timeout), *self.arguments],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            ))
            log.close()
        ready = [read_line(process, timeout + 30, "the simulated devices to check in") for process in self.processes]
        return max(float(line.split()[1]) for line in ready)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def send(self, line: str) -> None:
        for process in self.processes:
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        """Wait for each process to print `done` (after `stop`, or at the end of idle mode) and return the results."""

        for process in self.processes:
            line = read_line(process, timeout, "the simulated devices to finish")
            if line != "done":
                raise BenchError(f"Simulator {process.pid} printed {line!r} where 'done' was expected.")
        for process in self.processes:
            process.wait(timeout=timeout)
        return [json.loads(path.read_text()) for path in self.result_paths]

    def stop(self, timeout: float) -> list[dict[str, Any]]:
        self.send("stop")
        return self.finish(timeout)

    def kill(self) -> None:
        """Stop processes that are still running (cleanup after an error)."""

        for process in self.processes:
            # The end of stdin also stops a simulator whose stdin reader would hold up its exit.
            if not process.stdin.closed:
                try:
                    process.stdin.close()
                except BrokenPipeError:
                    pass
            stop_process(process, timeout=10)
