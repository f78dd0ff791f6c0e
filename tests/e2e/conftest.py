"""Fixtures for end-to-end tests: a real Temporal dev server, worker and API, and real agents as subprocesses."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.local_fleet import LocalFleet
from microupdates.cli.stack import Stack, StackPorts
from microupdates.workflows.contracts import FINAL_DEPLOYMENT_STATUSES

DEPLOYMENT_WAIT_SECONDS = 300.0


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(data_dir=tmp_path_factory.mktemp("stack"), ports=StackPorts.free())
    running.start()
    yield running
    running.stop()


@pytest.fixture
def api(stack: Stack) -> Iterator[OperatorApiClient]:
    with OperatorApiClient(stack.api_url) as client:
        yield client


@pytest.fixture
def fleet(stack: Stack, tmp_path: Path) -> Iterator[LocalFleet]:
    devices = LocalFleet(server_url=stack.api_url, devices_dir=tmp_path / "devices", long_poll_seconds=10)
    yield devices
    devices.stop_all()


@pytest.fixture
def unique_name() -> str:
    """A short unique suffix, so devices and groups of different tests never meet."""

    return uuid.uuid4().hex[:8]


def write_recipe(directory: Path, recipe: dict, files: dict[str, bytes] | None = None) -> Path:
    """Write a recipe and its source files into a directory and return the recipe's path."""

    directory.mkdir(parents=True, exist_ok=True)
    for relative, content in (files or {}).items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    recipe_path = directory / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    return recipe_path


def wait_for_deployment(api: OperatorApiClient, deployment_id: str, timeout: float = DEPLOYMENT_WAIT_SECONDS) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        detail = api.read_deployment(deployment_id)
        if detail["status"] in FINAL_DEPLOYMENT_STATUSES:
            return detail
        time.sleep(0.3)
    raise AssertionError(f"deployment {deployment_id} did not finish within {timeout} s: {detail}")
