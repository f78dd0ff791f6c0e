"""Handing stage jobs to devices and completing the waiting activities with their reports."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

from sqlalchemy.orm import Session
from temporalio.client import AsyncActivityCancelledError, AsyncActivityHandle, Client
from temporalio.service import RPCError, RPCStatusCode

from microupdates.api.job_notifier import JobNotifier, deployment_key, device_key
from microupdates.api.job_signing import JobSigner
from microupdates.db import deployments as deployment_store
from microupdates.db import devices as device_store
from microupdates.db import jobs as job_store
from microupdates.db import secrets as secret_store
from microupdates.db.models import StageJob as StageJobRow
from microupdates.db.models import utc_now
from microupdates.db.session import Database
from microupdates.errors import ConflictError
from microupdates.protocol.device_api import (
    ROLLBACK_COMMAND_STAGE,
    CheckInResponse,
    ProgressResponse,
    StageJob,
    StageReport,
)
from microupdates.protocol.recipe import CommandStage, DeviceTimeouts, Recipe
from microupdates.protocol.secret_references import mask_report, recipe_command_texts, referenced_secret_names
from microupdates.job_aborts import ABORTABLE_STAGES, end_queued_jobs, fail_job_aborted
from microupdates.workflows.contracts import CheckInOutcome, StageOutcome

logger = logging.getLogger(__name__)

MAX_PROGRESS_WAIT_SECONDS = 20
# A running job is handed out again only to a check-in that began this long after the
# hand-out, which covers clock differences between API hosts.
REHAND_MARGIN_SECONDS = 2.0
MAX_CLAIM_ATTEMPTS = 5
MAX_OUTCOME_ERROR_CHARS = 1000
# Max jobs whose latest heartbeat this process tracks. Jobs of lost devices are never
# reported, so at this size the table is cleared and those jobs' next progress reports heartbeat.
MAX_TRACKED_HEARTBEATS = 100_000


class DeviceJobs:
    def __init__(self, database: Database, client: Client, notifier: JobNotifier, signer: JobSigner) -> None:
        self.database = database
        self.client = client
        self.notifier = notifier
        self.signer = signer
        self._recipes: dict[str, Recipe] = {}
        # A deployment's update never changes, so neither do the secret names its recipe references.
        self._secret_names: dict[str, list[str]] = {}
        # Job id -> (monotonic time of its latest heartbeat, seconds within which a progress report skips one).
        self._heartbeats: dict[int, tuple[float, float]] = {}

    async def check_in(self, device_id: str, wait_seconds: int) -> CheckInResponse:
        """Return the device's next job, waiting up to `wait_seconds` for one to be queued."""

        keys = [device_key(device_id)]
        event = self.notifier.register(keys)
        picked_up_before = utc_now() - timedelta(seconds=REHAND_MARGIN_SECONDS)
        try:
            deadline = time.monotonic() + wait_seconds
            while True:
                job = await self._take_next_job(device_id, picked_up_before)
                if job is not None:
                    return CheckInResponse(job=job, job_signature=self.signer.sign_job(job))

                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return CheckInResponse()
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except asyncio.TimeoutError:
                    return CheckInResponse()
                event.clear()
        finally:
            self.notifier.unregister(keys, event)

    async def _take_next_job(self, device_id: str, picked_up_before: datetime) -> StageJob | None:
        while True:
            row = await asyncio.to_thread(self.claim_next_row, device_id, picked_up_before)
            if row is None:
                return None

            handle = self.client.get_async_activity_handle(task_token=row.task_token)
            if row.stage in ABORTABLE_STAGES and await asyncio.to_thread(self._abort_requested, row):
                await self._fail_aborted(handle, row)
                continue
            if row.stage == job_store.CHECK_IN_STAGE:
                # The check-in route stored this request's facts before it got here.
                package_managers = await asyncio.to_thread(self._stored_package_managers, device_id)
                await self._complete(handle, row, CheckInOutcome(package_managers))
                continue

            try:
                await handle.heartbeat()
            except (RPCError, AsyncActivityCancelledError) as error:
                logger.info("Job %d of device %s is no longer active (%s); skipping it", row.id, device_id, error)
                await asyncio.to_thread(self._write, job_store.expire_job, row.id)
                continue

            job = await asyncio.to_thread(self._hand_out, row)
            self._note_heartbeat(row.id, job.progress_interval_seconds / 2)
            logger.info("Job %d (%s of deployment %s) handed to device %s", row.id, row.stage, row.deployment_id,
                        device_id, extra=log_fields(row))
            return job

    def claim_next_row(self, device_id: str, picked_up_before: datetime) -> StageJobRow | None:
        """Hand out the device's next job; of concurrent check-ins on any API process, exactly one gets it."""

        for _ in range(MAX_CLAIM_ATTEMPTS):
            with self.database.session() as session:
                row = job_store.next_job_to_hand_out(session, device_id, picked_up_before)
                if row is None:
                    return None
                if job_store.mark_job_running(session, row):
                    session.expunge(row)
                    return row
        # Other requests kept taking the rows first; the notifier wakes this one again.
        return None

    def _stored_package_managers(self, device_id: str) -> list[str] | None:
        with self.database.session() as session:
            return device_store.stored_package_managers(session, device_id)

    def _abort_requested(self, row: StageJobRow) -> bool:
        with self.database.session() as session:
            return deployment_store.is_abort_requested(session, row.deployment_id, row.device_id)

    async def _fail_aborted(self, handle: AsyncActivityHandle, row: StageJobRow) -> None:
        await fail_job_aborted(self.database, handle, row)

    async def abort_queued_jobs(self, deployment_id: str, device_id: str | None) -> int:
        return await end_queued_jobs(self.database, self.client, deployment_id, device_id)

    def _write(self, function, *args) -> None:
        with self.database.session() as session:
            function(session, *args)

    async def _complete(self, handle, row: StageJobRow, outcome: StageOutcome | CheckInOutcome) -> bool:
        """Complete the activity; return False when it had already ended (completed before, or timed out)."""

        completed = True
        try:
            await handle.complete(outcome)
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            logger.info("Job %d: activity %s of %s had already ended", row.id, row.activity_id, row.workflow_id)
            completed = False
        if isinstance(outcome, CheckInOutcome):
            await asyncio.to_thread(self._write, job_store.mark_job_reported, row.id, {"status": "succeeded"})
        return completed

    def _hand_out(self, row: StageJobRow) -> StageJob:
        """Record the stage the device is in and build its job, in one transaction."""

        with self.database.session() as session:
            deployment_store.mark_device_stage(session, row.deployment_id, row.device_id, row.stage)
            return self._build_job(session, row)

    def _build_job(self, session: Session, row: StageJobRow) -> StageJob:
        recipe, timeouts = self._load_recipe(session, row.deployment_id)
        job = StageJob(
            job_id=row.id,
            deployment_id=row.deployment_id,
            device_id=row.device_id,
            update_version=recipe.version,
            stage=row.stage,
            progress_interval_seconds=progress_wait_seconds(timeouts),
            sequence=job_store.next_job_sequence(session, row.device_id),
            issued_at=utc_now().isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        )
        if row.stage == "before":
            job.command = recipe.before
        elif row.stage == "after":
            job.command = recipe.after
        elif row.stage == "files":
            job.files = recipe.files
        elif row.stage == "dependencies":
            job.dependencies = recipe.dependencies
        elif row.stage == ROLLBACK_COMMAND_STAGE and recipe.rollback.command:
            job.command = CommandStage(run=recipe.rollback.command,
                                       timeout_seconds=recipe.rollback.command_timeout_seconds)
        if job.command is not None:
            # A secret deleted since the deployment was created is left out; the
            # agent then fails the stage with a message naming it.
            names = referenced_secret_names([job.command.run])
            job.secrets = secret_store.load_secret_values(session, names) if names else {}
        return job

    def _load_recipe(self, session: Session, deployment_id: str) -> tuple[Recipe, DeviceTimeouts]:
        # Updates never change after creation, so their recipes are cached per process.
        deployment = deployment_store.load_deployment(session, deployment_id)
        if deployment.update_id not in self._recipes:
            self._recipes[deployment.update_id] = deployment_store.load_recipe(session, deployment.update_id)
        recipe = self._recipes[deployment.update_id]
        return recipe, deployment_store.effective_timeouts(deployment, recipe)

    async def report_progress(self, device_id: str, job_id: int, wait_seconds: int) -> ProgressResponse:
        """Heartbeat the stage, then hold the request up to `wait_seconds`, responding at once on abort."""

        row = await asyncio.to_thread(self._load_job, device_id, job_id)
        if row.state != "running":
            raise ConflictError(f"Job {job_id} is {row.state}, not running; stop it.")
        abortable = row.stage in ABORTABLE_STAGES
        keys = [device_key(device_id), deployment_key(row.deployment_id)]
        event = self.notifier.register(keys)
        try:
            if await self._heartbeat_or_abort(row, abortable):
                return ProgressResponse(abort=True)
            try:
                await asyncio.wait_for(event.wait(), min(wait_seconds, MAX_PROGRESS_WAIT_SECONDS))
            except asyncio.TimeoutError:
                return ProgressResponse()
            return ProgressResponse(abort=abortable and await asyncio.to_thread(self._abort_requested, row))
        finally:
            self.notifier.unregister(keys, event)

    async def _heartbeat_or_abort(self, row: StageJobRow, abortable: bool) -> bool:
        """Record a heartbeat; True when the device must stop the stage."""

        if abortable and await asyncio.to_thread(self._abort_requested, row):
            return True
        if self._heartbeat_is_recent(row.id):
            return False
        handle = self.client.get_async_activity_handle(task_token=row.task_token)
        try:
            await handle.heartbeat()
        except AsyncActivityCancelledError:
            return True
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            await asyncio.to_thread(self._write, job_store.expire_job, row.id)
            raise ConflictError(f"Job {row.id} has ended on the server (timed out); stop it.") from error
        if row.id in self._heartbeats:
            self._note_heartbeat(row.id, self._heartbeats[row.id][1])
        return False

    def _note_heartbeat(self, job_id: int, skip_seconds: float) -> None:
        if len(self._heartbeats) >= MAX_TRACKED_HEARTBEATS:
            self._heartbeats.clear()
        self._heartbeats[job_id] = (time.monotonic(), skip_seconds)

    def _heartbeat_is_recent(self, job_id: int) -> bool:
        """Check whether this process heartbeat the job so lately that a progress report need not.

        The agent's first progress report follows the hand-out, which
        heartbeat the activity, within moments. Skipping heartbeats within
        half the progress interval saves a Temporal write per stage. The agent
        sends a progress report every interval, at most a third of the
        heartbeat timeout, so heartbeats stay less than half the timeout
        apart. The Temporal SDKs throttle their own heartbeats in the same way.
        """

        latest = self._heartbeats.get(job_id)
        return latest is not None and time.monotonic() - latest[0] < latest[1]

    async def report_result(self, device_id: str, job_id: int, report: StageReport) -> str:
        """Store the device's report and complete the activity; a repeated report changes nothing."""

        row = await asyncio.to_thread(self._load_job, device_id, job_id)
        if row.state == "expired":
            raise ConflictError(f"Job {job_id} had already ended on the server (timed out); its report was not used.")
        if row.state == "queued":
            raise ConflictError(f"Job {job_id} was never handed to this device; check in first.")

        self._heartbeats.pop(row.id, None)
        report = await asyncio.to_thread(self._mask_secrets, row.deployment_id, report)
        first_report = await asyncio.to_thread(self._store_report, row.id, report)
        if not first_report:
            row = await asyncio.to_thread(self._load_job, device_id, job_id)
            report = StageReport.model_validate(row.report)

        outcome = StageOutcome(
            status=report.status,
            exit_code=report.exit_code,
            duration_seconds=report.duration_seconds,
            error=(report.error or "")[:MAX_OUTCOME_ERROR_CHARS] or None,
            transient=report.transient,
        )
        handle = self.client.get_async_activity_handle(task_token=row.task_token)
        completed = await self._complete(handle, row, outcome)
        if first_report and not completed:
            # The stage timed out on the server before this report arrived; the
            # report stays stored for the operator, but the workflow has moved on.
            await asyncio.to_thread(self._write, job_store.expire_job, row.id)
            raise ConflictError(
                f"Job {job_id} had already ended on the server (timed out) when its report arrived; "
                "the report was stored but not used."
            )
        logger.info("Job %d (%s of deployment %s) on device %s reported %s", row.id, row.stage,
                    row.deployment_id, device_id, report.status, extra=log_fields(row))
        return "recorded" if first_report else "already recorded"

    def _mask_secrets(self, deployment_id: str, report: StageReport) -> StageReport:
        """Mask the values of the secrets the deployment's recipe references, in case the agent did not mask them."""

        names = self._secret_names.get(deployment_id)
        if names == []:
            return report
        with self.database.session() as session:
            if names is None:
                recipe, _ = self._load_recipe(session, deployment_id)
                names = referenced_secret_names(recipe_command_texts(recipe))
                self._secret_names[deployment_id] = names
            values = secret_store.load_secret_values(session, names) if names else {}
        return mask_report(report, values.values())

    def _store_report(self, job_id: int, report: StageReport) -> bool:
        with self.database.session() as session:
            return job_store.mark_job_reported(session, job_id, report.model_dump(mode="json"))

    def _load_job(self, device_id: str, job_id: int) -> StageJobRow:
        with self.database.session() as session:
            row = job_store.load_device_job(session, job_id, device_id)
            session.expunge(row)
            return row


def progress_wait_seconds(timeouts: DeviceTimeouts) -> int:
    """Return how long a progress report waits: a third of the heartbeat timeout, so two can be lost in a row."""

    return max(1, min(MAX_PROGRESS_WAIT_SECONDS, timeouts.heartbeat_timeout_seconds // 3))


def log_fields(row: StageJobRow) -> dict[str, object]:
    """Return the ids of a job as `extra` fields, which JSON logs show as their own keys."""

    return {"deployment_id": row.deployment_id, "device_id": row.device_id, "job_id": row.id, "stage": row.stage}
