"""Throwaway PostgreSQL databases on the local server (127.0.0.1:5432, trust authentication)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def connect_admin() -> psycopg.Connection:
    """Connect to the server's `test` database to create and drop others; raises psycopg.OperationalError."""

    return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)


@contextmanager
def new_database(admin: psycopg.Connection, prefix: str) -> Iterator[str]:
    """Create an empty database named PREFIX_<random>, yield its SQLAlchemy URL, and drop it afterwards."""

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
