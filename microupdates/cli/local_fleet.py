"""Simulated devices on this host: one agent process per device, each under its own device root."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

AGENT_STOP_TIMEOUT_SECONDS = 10.0


@dataclass
class LocalDevice:
    name: str
    token: str
    root: Path
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.root.parent / f"{self.name}.agent.log"


@dataclass
class LocalFleet:
    server_url: str
    devices_dir: Path
    long_poll_seconds: int = 25
    # More agent flags for every device, e.g. ["--ca-file", PATH].
    agent_arguments: list[str] = field(default_factory=list)
    devices: list[LocalDevice] = field(default_factory=list)

    def add(self, name: str, token: str) -> LocalDevice:
        root = self.devices_dir / name
        root.mkdir(parents=True, exist_ok=True)
        device = LocalDevice(name=name, token=token, root=root)
        self.devices.append(device)
        return device

    def start(
        self, device: LocalDevice, extra_args: list[str] | None = None, environment: dict[str, str] | None = None
    ) -> None:
        """Start the device's agent; `extra_args` are added to its command line, `environment` to its environment."""

        command = [
            sys.executable, "-m", "microupdates.device_agent.main",
            "--server-url", self.server_url,
            f"--device-token={device.token}",
            "--device-root", str(device.root),
            "--long-poll-seconds", str(self.long_poll_seconds),
            # A rollback reboot restarts this agent process instead of the host.
            "--restart-instead-of-reboot",
            *self.agent_arguments,
            *(extra_args or []),
        ]
        log = open(device.log_path, "ab")
        device.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**agent_environment(), **(environment or {})},
        )
        log.close()
        logger.info("Agent for %s started (pid %d, root %s)", device.name, device.process.pid, device.root)

    def start_all(self) -> None:
        for device in self.devices:
            self.start(device)

    def stop(self, device: LocalDevice, kill: bool = False) -> None:
        process = device.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=AGENT_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=AGENT_STOP_TIMEOUT_SECONDS)

    def stop_all(self) -> None:
        for device in self.devices:
            self.stop(device)


def agent_environment() -> dict[str, str]:
    """Return this process's environment without the server's MICROUPDATES_* settings, which a device must not see."""

    return {key: value for key, value in os.environ.items() if not key.startswith("MICROUPDATES_")}
