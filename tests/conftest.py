"""Fixtures shared by the test folders: one real stack (Temporal dev server, worker, API) per session, and agents."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.local_fleet import LocalFleet
from microupdates.cli.stack import Stack, StackPorts


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
