"""A cluster of two API and two worker processes on one Temporal dev server and a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from microupdates.cli.stack import Stack, StackPorts, free_port
from tests.postgres_helpers import connect_admin, new_database

# The APIs look for deployments left without a workflow this often, so a test waits seconds, not a minute.
LOST_START_CHECK_SECONDS = 2


@dataclass
class Cluster:
    stack: Stack
    api_urls: list[str]
    database_url: str

    @property
    def postgres_url(self) -> str:
        """The database's URL for psycopg itself, without SQLAlchemy's driver name."""

        return self.database_url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[str]:
    """A database of its own for this module, dropped afterwards; skips when PostgreSQL is not running."""

    try:
        admin = connect_admin()
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432: {error}")
    with admin, new_database(admin, "mu_test") as url:
        yield url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_database: str) -> Iterator[Cluster]:
    stack = Stack(
        data_dir=tmp_path_factory.mktemp("cluster"),
        ports=StackPorts.free(),
        database_url=postgres_database,
        extra_env={"MICROUPDATES_LOST_START_CHECK_SECONDS": str(LOST_START_CHECK_SECONDS)},
    )
    stack.start()
    try:
        second_api = stack.start_api("api-2", free_port())
        stack.start_worker("worker-2")
        yield Cluster(stack=stack, api_urls=[stack.api_url, second_api], database_url=postgres_database)
    finally:
        stack.stop()
