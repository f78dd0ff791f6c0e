"""Wakes long-polling check-ins when a job is queued for their device.

One background task per API process reads the ids of new stage jobs every
`poll_interval_seconds` and sets the event of each waiting device. The cost is
one indexed query per interval whatever the fleet size, and it works with
several API processes, since every process reads the shared database.
"""

from __future__ import annotations

import asyncio
import logging

from microupdates.db import jobs as job_store
from microupdates.db.session import Database

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_SECONDS = 0.2
READ_LIMIT = 5000


class JobNotifier:
    def __init__(self, database: Database, poll_interval_seconds: float = DEFAULT_POLL_INTERVAL_SECONDS) -> None:
        self.database = database
        self.poll_interval_seconds = poll_interval_seconds
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._last_job_id = 0
        self._task: asyncio.Task | None = None

    @property
    def waiting_count(self) -> int:
        return sum(len(events) for events in self._waiters.values())

    async def start(self) -> None:
        self._last_job_id = await asyncio.to_thread(self._read_max_job_id)
        self._task = asyncio.create_task(self._run(), name="job-notifier")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def register(self, device_id: str) -> asyncio.Event:
        """Register interest before reading the queue, so a job queued in between still wakes the device."""

        event = asyncio.Event()
        self._waiters.setdefault(device_id, set()).add(event)
        return event

    def unregister(self, device_id: str, event: asyncio.Event) -> None:
        events = self._waiters.get(device_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiters[device_id]

    def notify(self, device_id: str) -> None:
        for event in self._waiters.get(device_id, ()):
            event.set()

    async def _run(self) -> None:
        while True:
            try:
                new_jobs = await asyncio.to_thread(self._read_new_jobs)
                for job_id, device_id in new_jobs:
                    self._last_job_id = max(self._last_job_id, job_id)
                    self.notify(device_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the notifier must outlive a database hiccup
                logger.exception("Reading new stage jobs failed; retrying in %s s", self.poll_interval_seconds)
            await asyncio.sleep(self.poll_interval_seconds)

    def _read_new_jobs(self) -> list[tuple[int, str]]:
        with self.database.session() as session:
            return job_store.job_ids_after(session, self._last_job_id, READ_LIMIT)

    def _read_max_job_id(self) -> int:
        with self.database.session() as session:
            return job_store.max_job_id(session)
