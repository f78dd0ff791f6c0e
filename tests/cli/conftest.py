"""Helpers for CLI tests: run the CLI in-process with CliRunner or as a subprocess, against the e2e stack."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from microupdates.cli.main import app

CLI_SUBPROCESS_TIMEOUT_SECONDS = 120

# Variables that would point the CLI at another server or config file.
CLI_SETTING_VARIABLES = (
    "MICROUPDATES_SERVER", "MICROUPDATES_API_KEY", "MICROUPDATES_CONFIG", "MICROUPDATES_CA_FILE", "XDG_CONFIG_HOME",
)

API_KEY_VARIABLE = "MICROUPDATES_API_KEY"

RunCli = Callable[..., Result]


def isolated_environment(config_home: Path, **settings: str) -> dict[str, str | None]:
    """Return environment overrides that unset every CLI setting, then set `settings`.

    XDG_CONFIG_HOME points at an empty directory, so no config file of the
    machine running the tests is read.
    """

    environment: dict[str, str | None] = {name: None for name in CLI_SETTING_VARIABLES}
    environment["XDG_CONFIG_HOME"] = str(config_home)
    environment.update(settings)
    return environment


def invoke(args: list[str], environment: dict[str, str | None]) -> Result:
    return CliRunner().invoke(app, args, env=environment, catch_exceptions=False)


@pytest.fixture
def config_home(tmp_path: Path) -> Path:
    path = tmp_path / "config-home"
    path.mkdir()
    return path


@pytest.fixture
def cli(stack, config_home: Path) -> RunCli:  # noqa: F811
    """Run the CLI in-process against the test stack, as if MICROUPDATES_SERVER and MICROUPDATES_API_KEY pointed at it."""

    def run(*args: str) -> Result:
        environment = isolated_environment(
            config_home, MICROUPDATES_SERVER=stack.api_url, MICROUPDATES_API_KEY=stack.admin_api_key
        )
        return invoke(list(args), environment)

    return run


def run_cli_process(
    args: list[str], server: str, config_home: Path, api_key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m microupdates.cli` with stdout and stderr on pipes, sending `api_key` when given."""

    environment = {key: value for key, value in os.environ.items() if key not in CLI_SETTING_VARIABLES}
    environment.update(MICROUPDATES_SERVER=server, XDG_CONFIG_HOME=str(config_home))
    if api_key is not None:
        environment[API_KEY_VARIABLE] = api_key
    return subprocess.run(
        [sys.executable, "-m", "microupdates.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=CLI_SUBPROCESS_TIMEOUT_SECONDS,
    )


def register_devices(api, fleet, names: list[str], group: str, start: bool = True):  # noqa: F811
    """Register devices in one group and start an agent for each unless `start` is False."""

    devices = []
    for name in names:
        created = api.register_device(name, groups=[group])
        device = fleet.add(name, created["token"])
        if start:
            fleet.start(device)
        devices.append(device)
    return devices
