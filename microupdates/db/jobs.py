"""Stage jobs: the queue between the worker's activities and the devices' check-ins."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from microupdates.db.models import (
    AbortRequest,
    Deployment,
    DeviceJobSequence,
    StageJob,
    Update,
    is_stored_id,
    utc_now,
)
from microupdates.errors import NotFoundError

CHECK_IN_STAGE = "check_in"


def queue_stage_job(
    session: Session,
    *,
    deployment_id: str,
    device_id: str,
    stage: str,
    workflow_id: str,
    activity_id: str,
    task_token: bytes,
    attempt: int,
) -> StageJob:
    """Insert the job for an activity attempt, or refresh its token when the attempt is retried."""

    job = session.scalars(
        select(StageJob).where(StageJob.workflow_id == workflow_id, StageJob.activity_id == activity_id)
    ).first()
    if job is None:
        job = StageJob(
            deployment_id=deployment_id,
            device_id=device_id,
            stage=stage,
            workflow_id=workflow_id,
            activity_id=activity_id,
            task_token=task_token,
            attempt=attempt,
        )
        session.add(job)
    else:
        job.task_token = task_token
        job.attempt = attempt
        job.state = "queued"
        job.picked_up_at = None
        job.reported_at = None
        job.report = None
    session.flush()
    return job


def next_job_to_hand_out(session: Session, device_id: str, picked_up_before: datetime) -> StageJob | None:
    """Return the device's oldest queued job, or a running one handed out before `picked_up_before`.

    An agent checks in only when it runs no stage, so a job still running
    from before this check-in began never reached the device: the API died,
    or the response was lost, between the hand-out and the device. Handing
    it out again keeps it from waiting for its timeout.
    """

    return session.scalars(
        select(StageJob)
        .where(
            StageJob.device_id == device_id,
            or_(
                StageJob.state == "queued",
                and_(StageJob.state == "running", StageJob.picked_up_at < picked_up_before),
            ),
        )
        .order_by(StageJob.id)
        .limit(1)
    ).first()


def mark_job_running(session: Session, job: StageJob) -> bool:
    """Hand a job out: move it from queued to running, or renew the hand-out time of a running one.

    The update matches the state and hand-out time that were read, so of two
    requests that read the same row only one changes it: False for the other.
    """

    condition = [StageJob.id == job.id, StageJob.state == job.state]
    if job.state == "running":
        condition.append(StageJob.picked_up_at == job.picked_up_at)
    result = session.execute(update(StageJob).where(*condition).values(state="running", picked_up_at=utc_now()))
    return result.rowcount == 1


def mark_job_reported(session: Session, job_id: int, report: dict[str, Any]) -> bool:
    """Store the report of a running job; False when a report was already stored."""

    result = session.execute(
        update(StageJob)
        .where(StageJob.id == job_id, StageJob.state == "running")
        .values(state="reported", reported_at=utc_now(), report=report)
    )
    return result.rowcount == 1


def next_job_sequence(session: Session, device_id: str) -> int:
    """Increment and return the device's job sequence number in one statement, so concurrent API processes never share one."""

    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(DeviceJobSequence)
        .values(device_id=device_id, last_sequence=1)
        .on_conflict_do_update(
            index_elements=[DeviceJobSequence.device_id],
            set_={"last_sequence": DeviceJobSequence.last_sequence + 1},
        )
        .returning(DeviceJobSequence.last_sequence)
    )
    return session.execute(statement).scalar_one()


def expire_job(session: Session, job_id: int) -> None:
    session.execute(update(StageJob).where(StageJob.id == job_id).values(state="expired"))


def expire_open_jobs(session: Session, deployment_id: str, device_id: str) -> int:
    """Expire jobs of a finished device update so a late check-in never receives them."""

    result = session.execute(
        update(StageJob)
        .where(
            StageJob.deployment_id == deployment_id,
            StageJob.device_id == device_id,
            StageJob.state.in_(("queued", "running")),
        )
        .values(state="expired")
    )
    return result.rowcount


def expire_stage_jobs(session: Session, deployment_id: str, device_id: str, stage: str) -> int:
    """Expire the open jobs of one stage of a device, once the workflow has given up on that stage."""

    result = session.execute(
        update(StageJob)
        .where(
            StageJob.deployment_id == deployment_id,
            StageJob.device_id == device_id,
            StageJob.stage == stage,
            StageJob.state.in_(("queued", "running")),
        )
        .values(state="expired")
    )
    return result.rowcount


def load_device_job(session: Session, job_id: int, device_id: str) -> StageJob:
    """Load a job of this device; another device's job is reported as not found."""

    job = session.get(StageJob, job_id) if is_stored_id(job_id) else None
    if job is None or job.device_id != device_id:
        raise NotFoundError(f"Job {job_id} not found.")
    return job


def device_job_uses_artifact(session: Session, device_id: str, sha256: str) -> bool:
    """Return whether a running files job of this device belongs to an update whose recipe lists the artifact."""

    recipes = session.scalars(
        select(Update.recipe)
        .join(Deployment, Deployment.update_id == Update.id)
        .join(StageJob, StageJob.deployment_id == Deployment.id)
        .where(StageJob.device_id == device_id, StageJob.stage == "files", StageJob.state == "running")
    )
    return any(entry.get("artifact") == sha256 for recipe in recipes for entry in recipe.get("files") or [])


def list_device_jobs(session: Session, deployment_id: str, device_id: str) -> list[StageJob]:
    return list(
        session.scalars(
            select(StageJob)
            .where(StageJob.deployment_id == deployment_id, StageJob.device_id == device_id)
            .order_by(StageJob.id)
        )
    )


def job_ids_after(session: Session, last_id: int, missing_ids: list[int], limit: int) -> list[tuple[int, str]]:
    """Return (id, device id) of jobs above `last_id` or among `missing_ids`, in id order."""

    condition = StageJob.id > last_id
    if missing_ids:
        condition = or_(condition, StageJob.id.in_(missing_ids))
    rows = session.execute(select(StageJob.id, StageJob.device_id).where(condition).order_by(StageJob.id).limit(limit))
    return [(job_id, device_id) for job_id, device_id in rows]


def max_job_id(session: Session) -> int:
    value = session.scalar(select(StageJob.id).order_by(StageJob.id.desc()).limit(1))
    return value or 0


def abort_requests_after(
    session: Session, last_id: int, missing_ids: list[int], limit: int
) -> list[tuple[int, str, str | None]]:
    """Return (id, deployment id, device id) of abort requests above `last_id` or among `missing_ids`."""

    condition = AbortRequest.id > last_id
    if missing_ids:
        condition = or_(condition, AbortRequest.id.in_(missing_ids))
    rows = session.execute(
        select(AbortRequest.id, AbortRequest.deployment_id, AbortRequest.device_id)
        .where(condition)
        .order_by(AbortRequest.id)
        .limit(limit)
    )
    return [(abort_id, deployment_id, device_id) for abort_id, deployment_id, device_id in rows]


def max_abort_request_id(session: Session) -> int:
    value = session.scalar(select(AbortRequest.id).order_by(AbortRequest.id.desc()).limit(1))
    return value or 0


def queued_jobs_to_abort(
    session: Session, deployment_id: str, device_id: str | None, stages: tuple[str, ...], limit: int
) -> list[StageJob]:
    """Queued jobs of update stages (not compensations) that an abort ends without the device."""

    query = (
        select(StageJob)
        .where(
            StageJob.deployment_id == deployment_id,
            StageJob.state == "queued",
            StageJob.stage.in_(stages),
        )
        .order_by(StageJob.id)
        .limit(limit)
    )
    if device_id is not None:
        query = query.where(StageJob.device_id == device_id)
    return list(session.scalars(query))
