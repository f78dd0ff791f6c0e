"""Engine and sessions for the application database (SQLite file or PostgreSQL)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from microupdates.db.models import Base

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MILLISECONDS = 15_000
SCHEMA_CREATE_ATTEMPTS = 5
SCHEMA_CREATE_RETRY_SECONDS = 1.0


class Database:
    """One engine per process; `session()` opens a transaction that commits on success."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = self._create_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @staticmethod
    def _create_engine(url: str) -> Engine:
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MILLISECONDS / 1000})
            event.listen(engine, "connect", _set_sqlite_pragmas)
            return engine
        return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)

    def create_schema(self) -> None:
        """Create missing tables; the API and the worker both call it, possibly at the same moment.

        Two processes creating the same tables on an empty PostgreSQL database
        race, and the loser gets a duplicate-object error; it tries again and
        then finds the tables there.
        """

        # NOTE: tables are created when missing; there are no migrations yet,
        # so a changed table needs a new database.
        for attempt in range(1, SCHEMA_CREATE_ATTEMPTS + 1):
            try:
                Base.metadata.create_all(self.engine)
                return
            except (IntegrityError, ProgrammingError, OperationalError) as error:
                if attempt == SCHEMA_CREATE_ATTEMPTS:
                    raise
                logger.info("Creating tables raced with another process (%s); retrying", error.__class__.__name__)
                time.sleep(SCHEMA_CREATE_RETRY_SECONDS)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _set_sqlite_pragmas(connection, _record) -> None:
    # WAL lets the API read while the worker writes; the busy timeout makes a
    # writer wait for the other process's lock instead of failing at once.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MILLISECONDS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
