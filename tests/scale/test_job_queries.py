"""The check-in and job queries on PostgreSQL: exactly-once hand-out under concurrency, and index use.

These tests use a fresh PostgreSQL database of their own and no Temporal
server: hand-out is decided by the database alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import event, insert

from microupdates.api.device_jobs import DeviceJobs
from microupdates.api.job_notifier import (
    MAX_MISSING_IDS,
    MISSING_ID_WAIT_SECONDS,
    IdCursor,
    JobNotifier,
    device_key,
)
from microupdates.db import deployments as deployment_store
from microupdates.db import devices as device_store
from microupdates.db import jobs as job_store
from microupdates.db.models import AbortRequest, Deployment, DeploymentDevice, Device, StageJob, Update, utc_now
from microupdates.db.session import Database

CONCURRENT_JOBS = 40
THREADS_PER_PROCESS = 6
INDEXED_TABLE_ROWS = 20_000
NOTIFIER_POLL_SECONDS = 0.05
# Far above the poll interval, for a loaded machine, and below the notifier's MISSING_ID_WAIT_SECONDS.
LATE_JOB_WAKE_UP_SECONDS = 5.0
# The deployments table contains one row per deployment, four here, where a sequential scan is right.
INDEXED_TABLES = ("devices", "stage_jobs", "deployment_devices", "abort_requests")


@pytest.fixture
def databases(postgres_database: str) -> Iterator[list[Database]]:
    """Two engines on one empty schema, as two API processes have."""

    engines = [Database(postgres_database) for _ in range(2)]
    engines[0].create_schema()
    with engines[0].session() as session:
        for table in reversed(Device.metadata.sorted_tables):
            session.execute(table.delete())
    yield engines
    for database in engines:
        database.dispose()


def queue_jobs(database: Database, device_id: str, count: int, prefix: str) -> list[int]:
    with database.session() as session:
        return [
            job_store.queue_stage_job(
                session, deployment_id="dep-test", device_id=device_id, stage="before",
                workflow_id=f"{prefix}-{index}", activity_id="1", task_token=b"token", attempt=1,
            ).id
            for index in range(count)
        ]


def claim_concurrently(databases: list[Database], device_id: str, picked_up_before) -> list[int]:
    """Let every thread of both engines take jobs of one device until none is left; return the ids claimed."""

    claimed_ids: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(len(databases) * THREADS_PER_PROCESS)

    def take(jobs: DeviceJobs) -> None:
        start.wait()
        while (row := jobs.claim_next_row(device_id, picked_up_before)) is not None:
            with lock:
                claimed_ids.append(row.id)

    threads = [
        threading.Thread(target=take, args=(DeviceJobs(database, client=None, notifier=None, signer=None),))
        for database in databases for _ in range(THREADS_PER_PROCESS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return claimed_ids


def test_hand_out_concurrent_check_ins_once(databases):
    queued = queue_jobs(databases[0], "gw-1", CONCURRENT_JOBS, "wf")

    claimed_ids = claim_concurrently(databases, "gw-1", utc_now() - timedelta(hours=1))

    assert len(claimed_ids) == len(set(claimed_ids))
    assert sorted(claimed_ids) == sorted(queued)


def test_rehand_lost_job_once(databases):
    queued = queue_jobs(databases[0], "gw-2", 1, "lost")
    first = DeviceJobs(databases[0], client=None, notifier=None, signer=None).claim_next_row("gw-2", utc_now())

    not_yet = DeviceJobs(databases[1], client=None, notifier=None, signer=None).claim_next_row(
        "gw-2", first.picked_up_at - timedelta(seconds=1)
    )
    # Check-ins that began after the first hand-out: exactly one of them gets the job again.
    claimed_ids = claim_concurrently(databases, "gw-2", first.picked_up_at + timedelta(microseconds=1))

    assert first.id == queued[0]
    assert not_yet is None
    assert claimed_ids == queued


def test_id_cursor_reports_late_ids_once():
    cursor = IdCursor(last_id=10)

    assert cursor.advance([11, 13], now=0.0) == [11, 13]
    assert cursor.missing_ids == [12]
    assert cursor.advance([12, 13, 14], now=1.0) == [12, 14]
    assert cursor.missing_ids == []


def test_id_cursor_tracks_ids_below_large_jump():
    cursor = IdCursor(last_id=0)

    cursor.advance([50_000], now=0.0)

    assert cursor.missing_ids == list(range(50_000 - MAX_MISSING_IDS, 50_000))


def test_id_cursor_forgets_rolled_back_ids():
    cursor = IdCursor(last_id=0)
    cursor.advance([3], now=0.0)

    cursor.advance([], now=MISSING_ID_WAIT_SECONDS + 1)

    assert cursor.missing_ids == []
    assert cursor.last_id == 3


def fill_tables(database: Database) -> None:
    """Insert a fleet of INDEXED_TABLE_ROWS devices, each in one deployment with finished stage jobs and an abort."""

    now = utc_now()
    devices = [f"dev-{index:05d}" for index in range(INDEXED_TABLE_ROWS)]
    with database.session() as session:
        session.add(Update(id="upd-scale", version="1.0.0", recipe={"version": "1.0.0"}))
        session.flush()
        for index in range(4):
            session.add(Deployment(id=f"dep-{index}", update_id="upd-scale", targets={}, status="in_progress"))
        session.flush()
        session.execute(insert(Device), [
            {"id": device, "token_hash": device_store.hash_secret(device), "created_at": now, "last_seen_at": now}
            for device in devices
        ])
        session.execute(insert(DeploymentDevice), [
            {"deployment_id": f"dep-{index % 4}", "device_id": device, "status": "succeeded"}
            for index, device in enumerate(devices)
        ])
        session.execute(insert(StageJob), [
            {"deployment_id": f"dep-{index % 4}", "device_id": device, "stage": stage,
             "workflow_id": f"deployment-dep-{index % 4}-device-{device}", "activity_id": stage,
             "task_token": b"token", "state": "reported", "created_at": now}
            for index, device in enumerate(devices) for stage in ("before", "after")
        ])
        session.execute(insert(AbortRequest), [
            {"deployment_id": f"dep-{index % 4}", "device_id": device, "created_at": now}
            for index, device in enumerate(devices)
        ])
    with database.engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE")


def run_check_in_and_job_queries(database: Database) -> None:
    """Run every query a check-in, a progress report, a stage report and a queued stage make."""

    device_id = "dev-00042"
    with database.session() as session:
        device = device_store.authenticate_device(session, device_id)
        device_store.mark_device_seen(session, device, "2.0.0")
        job = job_store.queue_stage_job(
            session, deployment_id="dep-2", device_id=device_id, stage="files",
            workflow_id=f"deployment-dep-2-device-{device_id}", activity_id="files", task_token=b"token", attempt=1,
        )
        session.flush()
        row = job_store.next_job_to_hand_out(session, device_id, utc_now())
        job_store.mark_job_running(session, row)
        deployment_store.is_abort_requested(session, "dep-2", device_id)
        deployment_store.mark_device_stage(session, "dep-2", device_id, "files")
        deployment_store.load_deployment(session, "dep-2")
        job_store.load_device_job(session, job.id, device_id)
        job_store.mark_job_reported(session, job.id, {"status": "succeeded"})
        job_store.expire_job(session, job.id)
        job_store.expire_stage_jobs(session, "dep-2", device_id, "files")
        job_store.expire_open_jobs(session, "dep-2", device_id)
        job_store.list_device_jobs(session, "dep-2", device_id)
        job_store.job_ids_after(session, 2 * INDEXED_TABLE_ROWS - 5, [100, 200], 5000)
        job_store.abort_requests_after(session, INDEXED_TABLE_ROWS - 5, [100], 5000)
        job_store.max_job_id(session)
        job_store.max_abort_request_id(session)


def test_check_in_and_job_queries_use_indexes(databases):
    database = databases[0]
    fill_tables(database)
    statements: list[tuple[str, object]] = []

    def capture(_connection, _cursor, statement, parameters, _context, executemany):
        if not executemany and statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            statements.append((statement, parameters))

    event.listen(database.engine, "before_cursor_execute", capture)
    try:
        run_check_in_and_job_queries(database)
    finally:
        event.remove(database.engine, "before_cursor_execute", capture)

    assert len(statements) >= 15
    with database.engine.connect() as connection:
        for statement, parameters in statements:
            plan = "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters))
            for table in INDEXED_TABLES:
                assert f"Seq Scan on {table}" not in plan, f"{statement}\n{plan}"


async def test_notifier_wakes_device_of_late_committed_job(databases):
    """A job whose id is below one already read, but commits later, still wakes its device."""

    writer, reader = databases
    notifier = JobNotifier(reader, poll_interval_seconds=NOTIFIER_POLL_SECONDS)
    await notifier.start()
    late_device = notifier.register([device_key("gw-late")])
    try:
        with writer.session() as late_session:
            queue_one_job(late_session, "gw-late")
            queue_jobs(writer, "gw-early", 1, "early")
            await asyncio.sleep(NOTIFIER_POLL_SECONDS * 5)
            assert not late_device.is_set()

        await asyncio.wait_for(late_device.wait(), LATE_JOB_WAKE_UP_SECONDS)
    finally:
        await notifier.stop()


def queue_one_job(session, device_id: str) -> int:
    job = job_store.queue_stage_job(
        session, deployment_id="dep-test", device_id=device_id, stage="before",
        workflow_id=f"late-{device_id}", activity_id="1", task_token=b"token", attempt=1,
    )
    session.flush()
    return job.id
