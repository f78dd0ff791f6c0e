"""Measure how many idle check-ins one API process serves per second on PostgreSQL.

Run: .venv/bin/python -m tests.scale.measure_idle_check_ins [SECONDS] [CONCURRENCY]

It starts a Temporal dev server, one worker and one API on a fresh database
(dropped afterwards), registers 200 devices, and sends check-ins with
`wait_seconds` 0 from CONCURRENCY tasks for SECONDS. Every check-in finds no
job, which is what an idle fleet sends. The load generator runs on the same
machine and takes CPU from the API, so the rate is a lower bound. The API
process's CPU time per check-in, read from /proc, depends much less on it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.stack import Stack, StackPorts
from microupdates.protocol.device_api import DEVICE_API_PREFIX
from tests.postgres_helpers import connect_admin, new_database

DEVICES = 200


async def send_check_ins(api_url: str, tokens: list[str], seconds: float, concurrency: int) -> int:
    deadline = time.monotonic() + seconds
    sent = 0

    async def loop(worker: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=api_url + DEVICE_API_PREFIX, timeout=30) as client:
            index = worker
            while time.monotonic() < deadline:
                token = tokens[index % len(tokens)]
                response = await client.post("/check-in", json={"agent_version": "measure", "wait_seconds": 0},
                                             headers={"Authorization": f"Bearer {token}"})
                response.raise_for_status()
                sent += 1
                index += concurrency

    await asyncio.gather(*(loop(worker) for worker in range(concurrency)))
    return sent


def process_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of a process, from /proc/PID/stat."""

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 15.0
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    with connect_admin() as admin, new_database(admin, "mu_measure") as database_url:
        with tempfile.TemporaryDirectory() as directory:
            stack = Stack(data_dir=Path(directory), ports=StackPorts.free(), database_url=database_url)
            stack.start()
            try:
                with OperatorApiClient(stack.api_url, stack.admin_api_key) as operator:
                    tokens = [operator.register_device(f"idle-{index}", groups=["idle"])["token"]
                              for index in range(DEVICES)]
                api_pid = stack.processes["api"].pid
                cpu_before = process_cpu_seconds(api_pid)
                sent = asyncio.run(send_check_ins(stack.api_url, tokens, seconds, concurrency))
                cpu_used = process_cpu_seconds(api_pid) - cpu_before
            finally:
                stack.stop()
    print(f"{sent} idle check-ins in {seconds:.0f} s from {concurrency} tasks: {sent / seconds:.0f} per second")
    print(f"API process CPU: {cpu_used:.1f} s, {1000 * cpu_used / sent:.2f} ms per check-in")


if __name__ == "__main__":
    main()
