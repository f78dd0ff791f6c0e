"""A cluster of two API and two worker processes on one Temporal dev server and a fresh PostgreSQL database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from microupdates.cli.stack import Stack, StackPorts, free_port

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
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

    name = f"mu_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432: {error}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


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
