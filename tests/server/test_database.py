"""The application database on PostgreSQL (127.0.0.1:5432, trust authentication, as on the CI machines)."""

from __future__ import annotations

import threading

import psycopg
import pytest
from sqlalchemy import inspect

from microupdates.db.session import Database
from tests.postgres_helpers import connect_admin, new_database


@pytest.fixture
def empty_postgres_database():
    try:
        admin = connect_admin()
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432: {error}")
    with admin, new_database(admin, "microupdates") as url:
        yield url


def test_create_schema_concurrently_on_empty_postgres(empty_postgres_database):
    databases = [Database(empty_postgres_database) for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(databases))

    def create(database: Database) -> None:
        start.wait()
        try:
            database.create_schema()
        except BaseException as error:  # noqa: BLE001 - collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=create, args=(database,)) for database in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    tables = set(inspect(databases[0].engine).get_table_names())
    assert {"devices", "deployments", "deployment_devices", "stage_jobs", "abort_requests"} <= tables
    for database in databases:
        database.dispose()
