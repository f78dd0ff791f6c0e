"""Fixtures shared by the test folders: one real stack (Temporal dev server, worker, API) per session, and agents."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

from typing import TYPE_CHECKING

import pytest

# The server-side modules are imported inside the fixtures: the agent's tests
# also run on Python 3.9 with only the agent's packages installed.
if TYPE_CHECKING:
    from microupdates.cli.api_client import OperatorApiClient
    from microupdates.cli.local_fleet import LocalFleet
    from microupdates.cli.stack import Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from microupdates.cli.stack import Stack, StackPorts

    running = Stack(data_dir=tmp_path_factory.mktemp("stack"), ports=StackPorts.free())
    running.start()
    yield running
    running.stop()


@pytest.fixture
def api(stack: Stack) -> Iterator[OperatorApiClient]:
    from microupdates.cli.api_client import OperatorApiClient

    with OperatorApiClient(stack.api_url, stack.admin_api_key) as client:
        yield client


@pytest.fixture
def fleet(stack: Stack, tmp_path: Path) -> Iterator[LocalFleet]:
    from microupdates.cli.local_fleet import LocalFleet

    devices = LocalFleet(server_url=stack.api_url, devices_dir=tmp_path / "devices", long_poll_seconds=10)
    yield devices
    devices.stop_all()


@pytest.fixture
def unique_name() -> str:
    """A short unique suffix, so devices and groups of different tests never meet."""

    return uuid.uuid4().hex[:8]
