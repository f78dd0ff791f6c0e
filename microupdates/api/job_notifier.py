"""Wakes long-polling requests when a job is queued for their device or their update is aborted.

One background task per API process reads the ids of new stage jobs and abort
requests every `poll_interval_seconds` and sets the events of the waiting
requests. The cost is two indexed queries per interval whatever the fleet
size, and it works with several API processes, since every process reads the
shared database.

Ids are not committed in order: with several workers or API processes
writing, the row with id 7 can become visible after the row with id 8. So
each poll also asks again for the ids it skipped (`IdCursor`), until they
appear or `MISSING_ID_WAIT_SECONDS` pass (a rolled-back insert leaves a gap
for good).

Waiters register under a key: `device_key(device_id)` or
`deployment_key(deployment_id)`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from microupdates.db import jobs as job_store
from microupdates.db.session import Database

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_SECONDS = 0.2
READ_LIMIT = 5000
# An insert's transaction takes milliseconds; an id still missing after this is a rolled-back insert.
MISSING_ID_WAIT_SECONDS = 10.0
# Of a larger jump only the ids just below the new one are tracked, since those are the inserts
# still in flight; devices of older missing rows find them at their next check-in.
MAX_MISSING_IDS = 1000


def device_key(device_id: str) -> str:
    return f"device:{device_id}"


def deployment_key(deployment_id: str) -> str:
    return f"deployment:{deployment_id}"


class IdCursor:
    """The position of a reader of an id column whose rows may become visible out of id order."""

    def __init__(self, last_id: int) -> None:
        self.last_id = last_id
        self._missing: dict[int, float] = {}

    @property
    def missing_ids(self) -> list[int]:
        return sorted(self._missing)

    def advance(self, found_ids: list[int], now: float) -> list[int]:
        """Record the ids one read returned and return those not seen before."""

        new_ids = []
        for found in sorted(found_ids):
            if found in self._missing:
                del self._missing[found]
                new_ids.append(found)
            elif found > self.last_id:
                for skipped in range(max(self.last_id + 1, found - MAX_MISSING_IDS), found):
                    self._missing[skipped] = now
                self.last_id = found
                new_ids.append(found)

        for missing, since in list(self._missing.items()):
            if now - since > MISSING_ID_WAIT_SECONDS:
                del self._missing[missing]
        return new_ids


class JobNotifier:
    def __init__(self, database: Database, poll_interval_seconds: float = DEFAULT_POLL_INTERVAL_SECONDS) -> None:
        self.database = database
        self.poll_interval_seconds = poll_interval_seconds
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._jobs = IdCursor(0)
        self._aborts = IdCursor(0)
        self._task: asyncio.Task | None = None

    @property
    def waiting_count(self) -> int:
        return sum(len(events) for events in self._waiters.values())

    async def start(self) -> None:
        last_job_id, last_abort_id = await asyncio.to_thread(self._read_max_ids)
        self._jobs, self._aborts = IdCursor(last_job_id), IdCursor(last_abort_id)
        self._task = asyncio.create_task(self._run(), name="job-notifier")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def register(self, keys: list[str]) -> asyncio.Event:
        """Register interest before reading the database, so a change in between still wakes the request."""

        event = asyncio.Event()
        for key in keys:
            self._waiters.setdefault(key, set()).add(event)
        return event

    def unregister(self, keys: list[str], event: asyncio.Event) -> None:
        for key in keys:
            events = self._waiters.get(key)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[key]

    def notify(self, key: str) -> None:
        for event in self._waiters.get(key, ()):
            event.set()

    async def _run(self) -> None:
        while True:
            try:
                new_jobs, new_aborts = await asyncio.to_thread(self._read_changes)
                now = time.monotonic()
                job_devices = dict(new_jobs)
                for job_id in self._jobs.advance(list(job_devices), now):
                    self.notify(device_key(job_devices[job_id]))
                abort_targets = {abort_id: (deployment, device) for abort_id, deployment, device in new_aborts}
                for abort_id in self._aborts.advance(list(abort_targets), now):
                    deployment_id, device_id = abort_targets[abort_id]
                    self.notify(device_key(device_id) if device_id else deployment_key(deployment_id))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the notifier must outlive a database hiccup
                logger.exception("Reading new stage jobs failed; retrying in %s s", self.poll_interval_seconds)
            await asyncio.sleep(self.poll_interval_seconds)

    def _read_changes(self) -> tuple[list[tuple[int, str]], list[tuple[int, str, str | None]]]:
        with self.database.session() as session:
            jobs = job_store.job_ids_after(session, self._jobs.last_id, self._jobs.missing_ids, READ_LIMIT)
            aborts = job_store.abort_requests_after(
                session, self._aborts.last_id, self._aborts.missing_ids, READ_LIMIT
            )
            return jobs, aborts

    def _read_max_ids(self) -> tuple[int, int]:
        with self.database.session() as session:
            return job_store.max_job_id(session), job_store.max_abort_request_id(session)
