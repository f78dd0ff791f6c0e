"""Updates, deployments and the per-device projection of each deployment."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from microupdates.db.models import AbortRequest, Artifact, Deployment, DeploymentDevice, Device, DeviceGroup, DeviceTag, Update, utc_now
from microupdates.errors import InvalidRequestError, NotFoundError
from microupdates.protocol.recipe import DeviceTimeouts, Recipe, StageRetries, TargetSelection
from microupdates.rollout import RolloutOptions, assign_phases
from microupdates.workflows.contracts import (
    DEPLOYMENT_ABORTED,
    DEPLOYMENT_FAILED,
    DEPLOYMENT_FAILED_TO_START,
    DEPLOYMENT_IN_PROGRESS,
    DEPLOYMENT_PENDING,
    DEPLOYMENT_STOPPED,
    DEPLOYMENT_SUCCEEDED,
    DEVICE_ABORTED,
    DEVICE_IN_PROGRESS,
    DEVICE_PENDING,
    DEVICE_SKIPPED,
    DEVICE_SUCCEEDED,
    FINAL_DEPLOYMENT_STATUSES,
    FINAL_DEVICE_STATUSES,
)
TARGET_INSERT_PAGE_SIZE = 1000


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def create_update(session: Session, recipe: Recipe) -> Update:
    """Store a bundled recipe; every file entry must name an uploaded artifact."""

    for stage, command in (("before", recipe.before), ("after", recipe.after)):
        if command is not None and command.script is not None:
            raise InvalidRequestError(
                f"{stage}.script ({command.script}) names a file the server cannot read; put the script text in "
                f"{stage}.run, as `microupdates updates create RECIPE` does."
            )
    for index, entry in enumerate(recipe.files):
        if entry.artifact is None or entry.kind is None:
            raise InvalidRequestError(
                f"files[{index}] ({entry.source}) has no uploaded artifact; "
                "create updates with `microupdates updates create RECIPE`, which uploads the files."
            )
        if session.get(Artifact, entry.artifact) is None:
            raise InvalidRequestError(
                f"files[{index}].artifact {entry.artifact} was not uploaded; upload it to /api/v1/artifacts first."
            )

    row = Update(
        id=new_id("upd"),
        version=recipe.version,
        comment=recipe.comment,
        recipe=recipe.model_dump(mode="json", exclude_none=True),
    )
    session.add(row)
    return row


def load_update(session: Session, update_id: str) -> Update:
    row = session.get(Update, update_id)
    if row is None:
        raise NotFoundError(f"Update {update_id!r} not found.")
    return row


def load_recipe(session: Session, update_id: str) -> Recipe:
    return Recipe.model_validate(load_update(session, update_id).recipe)


def list_updates(session: Session, limit: int) -> list[Update]:
    return list(session.scalars(select(Update).order_by(Update.created_at.desc()).limit(limit)))


def create_deployment(
    session: Session,
    update_id: str,
    targets: TargetSelection,
    timeouts: DeviceTimeouts | None = None,
    rollout: RolloutOptions | None = None,
    source_deployment_id: str | None = None,
    retries: StageRetries | None = None,
    check_in_deadline_at: datetime | None = None,
) -> Deployment:
    """Insert a pending deployment after checking that its targets exist."""

    load_update(session, update_id)
    if targets.is_empty():
        raise InvalidRequestError("The target is empty: name at least one device, group or tag.")

    missing_devices = [d for d in targets.devices if session.get(Device, d) is None]
    if missing_devices:
        raise InvalidRequestError(f"Unknown devices in the target: {missing_devices}. Register them first.")
    for group in targets.groups:
        member = session.scalars(select(DeviceGroup.device_id).where(DeviceGroup.group_name == group).limit(1))
        if member.first() is None:
            raise InvalidRequestError(f"Unknown group in the target: {group!r} has no devices.")
    for tag in targets.tags:
        member = session.scalars(select(DeviceTag.device_id).where(DeviceTag.tag == tag).limit(1))
        if member.first() is None:
            raise InvalidRequestError(f"Unknown tag in the target: no device has the tag {tag!r}.")

    row = Deployment(
        id=new_id("dep"),
        update_id=update_id,
        targets=targets.model_dump(mode="json"),
        timeouts=timeouts.model_dump(mode="json") if timeouts is not None else None,
        rollout=rollout.model_dump(mode="json") if rollout is not None else None,
        source_deployment_id=source_deployment_id,
        retries=retries.model_dump(mode="json") if retries is not None else None,
        check_in_deadline_at=check_in_deadline_at,
    )
    session.add(row)
    return row


def rollout_options(deployment: Deployment) -> RolloutOptions:
    return RolloutOptions.model_validate(deployment.rollout or {})


def list_follow_up_ids(session: Session, deployment_id: str) -> list[str]:
    """Return the deployments created from this one, oldest first."""

    return list(session.scalars(
        select(Deployment.id)
        .where(Deployment.source_deployment_id == deployment_id)
        .order_by(Deployment.created_at, Deployment.id)
    ))


def load_deployment(session: Session, deployment_id: str) -> Deployment:
    row = session.get(Deployment, deployment_id)
    if row is None:
        raise NotFoundError(f"Deployment {deployment_id!r} not found.")
    return row


def freeze_deployment_targets(session: Session, deployment_id: str) -> int:
    """Resolve the targets into per-device rows once; later calls return the frozen count."""

    deployment = load_deployment(session, deployment_id)
    if deployment.started_at is not None:
        return deployment.device_count

    targets = TargetSelection.model_validate(deployment.targets)
    device_ids = set(targets.devices)
    for group in targets.groups:
        device_ids.update(session.scalars(select(DeviceGroup.device_id).where(DeviceGroup.group_name == group)))
    for tag in targets.tags:
        device_ids.update(session.scalars(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
    device_ids &= set(session.scalars(select(Device.id).where(Device.id.in_(device_ids))))

    phases = rollout_options(deployment).phases
    groups_of, tags_of = load_labels(session, device_ids) if phases else ({}, {})
    phase_of = assign_phases(deployment_id, device_ids, phases, groups_of, tags_of)
    # Devices that no phase selects are left out of the deployment.
    ordered = sorted(phase_of)
    for start in range(0, len(ordered), TARGET_INSERT_PAGE_SIZE):
        page = ordered[start:start + TARGET_INSERT_PAGE_SIZE]
        session.add_all(
            DeploymentDevice(deployment_id=deployment_id, device_id=device_id, phase=phase_of[device_id])
            for device_id in page
        )
        session.flush()

    deployment.device_count = len(ordered)
    deployment.status = DEPLOYMENT_IN_PROGRESS
    deployment.started_at = utc_now()
    return deployment.device_count


def load_labels(session: Session, device_ids: set[str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Return the groups and the tags of each device, read in pages."""

    groups_of: dict[str, set[str]] = {}
    tags_of: dict[str, set[str]] = {}
    ordered = sorted(device_ids)
    for start in range(0, len(ordered), TARGET_INSERT_PAGE_SIZE):
        page = ordered[start:start + TARGET_INSERT_PAGE_SIZE]
        for device_id, group in session.execute(
            select(DeviceGroup.device_id, DeviceGroup.group_name).where(DeviceGroup.device_id.in_(page))
        ):
            groups_of.setdefault(device_id, set()).add(group)
        for device_id, tag in session.execute(select(DeviceTag.device_id, DeviceTag.tag).where(DeviceTag.device_id.in_(page))):
            tags_of.setdefault(device_id, set()).add(tag)
    return groups_of, tags_of


def count_phase_devices(session: Session, deployment_id: str) -> dict[int, dict[str, int]]:
    """Return the number of devices in each status, per phase index."""

    counts: dict[int, dict[str, int]] = {}
    rows = session.execute(
        select(DeploymentDevice.phase, DeploymentDevice.status, func.count())
        .where(DeploymentDevice.deployment_id == deployment_id)
        .group_by(DeploymentDevice.phase, DeploymentDevice.status)
    )
    for phase, status, count in rows:
        counts.setdefault(phase or 0, {})[status] = count
    return counts


def list_deployment_device_ids(
    session: Session, deployment_id: str, after: str | None, limit: int, phase: int | None = None
) -> list[str]:
    query = (
        select(DeploymentDevice.device_id)
        .where(DeploymentDevice.deployment_id == deployment_id)
        .order_by(DeploymentDevice.device_id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(DeploymentDevice.device_id > after)
    if phase is not None:
        query = query.where(DeploymentDevice.phase == phase)
    return list(session.scalars(query))


def mark_device_stage(session: Session, deployment_id: str, device_id: str, stage: str) -> None:
    """Show a device as working on a stage, unless it already has a final status."""

    now = utc_now()
    session.execute(
        update(DeploymentDevice)
        .where(
            DeploymentDevice.deployment_id == deployment_id,
            DeploymentDevice.device_id == device_id,
            DeploymentDevice.status.not_in(FINAL_DEVICE_STATUSES),
        )
        .values(status=DEVICE_IN_PROGRESS, stage=stage, started_at=func.coalesce(DeploymentDevice.started_at, now))
    )


def record_device_outcome(
    session: Session,
    deployment_id: str,
    device_id: str,
    status: str,
    stage: str | None,
    error: str | None,
    rollback_error: str | None = None,
    stage_attempts: dict[str, int] | None = None,
) -> None:
    row = load_deployment_device(session, deployment_id, device_id)
    row.stage_attempts = stage_attempts or None
    row.status = status
    row.stage = stage
    row.error = error
    row.rollback_error = rollback_error
    row.finished_at = utc_now()


def record_rollback_start(session: Session, deployment_id: str, device_id: str, stage: str, error: str) -> None:
    """Show why a device is being rolled back while its reverts run or wait for it."""

    row = load_deployment_device(session, deployment_id, device_id)
    if row.status in FINAL_DEVICE_STATUSES:
        return
    row.status = DEVICE_IN_PROGRESS
    row.stage = stage
    row.error = error


def mark_unstarted_devices_aborted(
    session: Session, deployment_id: str, after_device_id: str | None, error: str = "aborted before the device started"
) -> int:
    """Mark the devices the workflow never started (pending ones, with ids after `after_device_id` if given) as aborted."""

    query = (
        update(DeploymentDevice)
        .where(DeploymentDevice.deployment_id == deployment_id, DeploymentDevice.status == DEVICE_PENDING)
        .values(status=DEVICE_ABORTED, error=error, finished_at=utc_now())
    )
    if after_device_id is not None:
        query = query.where(DeploymentDevice.device_id > after_device_id)
    return session.execute(query).rowcount


def request_abort(session: Session, deployment_id: str, device_id: str | None) -> bool:
    """Flag a deployment, or one of its devices, as aborted; False when it had already ended or was flagged."""

    deployment = load_deployment(session, deployment_id)
    row = load_deployment_device(session, deployment_id, device_id) if device_id is not None else None
    if deployment.status in FINAL_DEPLOYMENT_STATUSES:
        return False

    if row is None:
        if deployment.abort_requested_at is not None:
            return False
        deployment.abort_requested_at = utc_now()
    else:
        if row.status in FINAL_DEVICE_STATUSES or row.abort_requested_at is not None:
            return False
        row.abort_requested_at = utc_now()
    session.add(AbortRequest(deployment_id=deployment_id, device_id=device_id))
    return True


def is_abort_requested(session: Session, deployment_id: str, device_id: str) -> bool:
    deployment = session.get(Deployment, deployment_id)
    if deployment is not None and deployment.abort_requested_at is not None:
        return True
    row = session.get(DeploymentDevice, (deployment_id, device_id))
    return row is not None and row.abort_requested_at is not None


def stop_deployment(session: Session, deployment_id: str, reason: str) -> None:
    """Record why the rollout stopped and flag it aborted, so running devices stop at their next report."""

    deployment = load_deployment(session, deployment_id)
    if deployment.stop_reason is None:
        deployment.stop_reason = reason
        deployment.error = reason
    request_abort(session, deployment_id, None)


def record_rollout_state(session: Session, deployment_id: str, state: dict) -> bool:
    """Store the workflow's phase state unless a newer revision is already stored; return whether it was stored."""

    deployment = session.scalars(
        select(Deployment).where(Deployment.id == deployment_id).with_for_update()
    ).first()
    if deployment is None:
        raise NotFoundError(f"Deployment {deployment_id!r} not found.")
    stored_revision = (deployment.rollout_state or {}).get("revision", -1)
    if state.get("revision", 0) < stored_revision:
        return False
    deployment.rollout_state = state
    return True


def effective_timeouts(deployment: Deployment, recipe: Recipe) -> DeviceTimeouts:
    """Return the deployment's own timeouts when it set them, else the recipe's."""

    if deployment.timeouts:
        return DeviceTimeouts.model_validate(deployment.timeouts)
    return recipe.timeouts


def effective_retries(deployment: Deployment, recipe: Recipe) -> StageRetries:
    """Return the deployment's own retry settings when it set them, else the recipe's."""

    if deployment.retries:
        return StageRetries.model_validate(deployment.retries)
    return recipe.retries


def count_device_statuses(session: Session, deployment_id: str) -> dict[str, int]:
    rows = session.execute(
        select(DeploymentDevice.status, func.count())
        .where(DeploymentDevice.deployment_id == deployment_id)
        .group_by(DeploymentDevice.status)
    )
    return {status: count for status, count in rows}


def finish_deployment(session: Session, deployment_id: str) -> tuple[str, dict[str, int]]:
    """Set the final status from the device counts: succeeded only when every device succeeded or was skipped."""

    deployment = load_deployment(session, deployment_id)
    counts = count_device_statuses(session, deployment_id)
    if deployment.stop_reason is not None:
        deployment.status = DEPLOYMENT_STOPPED
        deployment.error = deployment.stop_reason
    elif deployment.abort_requested_at is not None:
        deployment.status = DEPLOYMENT_ABORTED
    elif counts.get(DEVICE_SUCCEEDED, 0) + counts.get(DEVICE_SKIPPED, 0) == deployment.device_count:
        deployment.status = DEPLOYMENT_SUCCEEDED
    else:
        deployment.status = DEPLOYMENT_FAILED
    deployment.finished_at = utc_now()
    return deployment.status, counts


def mark_deployment_not_started(session: Session, deployment_id: str, error: str) -> None:
    deployment = load_deployment(session, deployment_id)
    deployment.status = DEPLOYMENT_FAILED_TO_START
    deployment.error = error
    deployment.finished_at = utc_now()


def list_pending_deployments(session: Session, created_before: datetime, limit: int) -> list[Deployment]:
    """Deployments still pending that were created before `created_before`, oldest first."""

    return list(session.scalars(
        select(Deployment)
        .where(Deployment.status == DEPLOYMENT_PENDING, Deployment.created_at < created_before)
        .order_by(Deployment.created_at)
        .limit(limit)
    ))


def list_recent_deployments(session: Session, limit: int) -> list[tuple[Deployment, Update, dict[str, int]]]:
    deployments = list(session.scalars(select(Deployment).order_by(Deployment.created_at.desc()).limit(limit)))
    counts: dict[str, dict[str, int]] = {deployment.id: {} for deployment in deployments}
    if deployments:
        rows = session.execute(
            select(DeploymentDevice.deployment_id, DeploymentDevice.status, func.count())
            .where(DeploymentDevice.deployment_id.in_(list(counts)))
            .group_by(DeploymentDevice.deployment_id, DeploymentDevice.status)
        )
        for deployment_id, status, count in rows:
            counts[deployment_id][status] = count
    return [(d, session.get(Update, d.update_id), counts[d.id]) for d in deployments]


def list_deployment_devices(
    session: Session, deployment_id: str, limit: int, after: str | None
) -> list[DeploymentDevice]:
    query = (
        select(DeploymentDevice)
        .where(DeploymentDevice.deployment_id == deployment_id)
        .order_by(DeploymentDevice.device_id)
        .limit(limit)
    )
    if after:
        query = query.where(DeploymentDevice.device_id > after)
    return list(session.scalars(query))


def load_deployment_device(session: Session, deployment_id: str, device_id: str) -> DeploymentDevice:
    row = session.get(DeploymentDevice, (deployment_id, device_id))
    if row is None:
        raise NotFoundError(f"Device {device_id!r} is not part of deployment {deployment_id!r}.")
    return row


def active_deployment_ids(session: Session, device_id: str) -> list[str]:
    """Return the deployments in which the device has not reached a final status."""

    return list(session.scalars(
        select(DeploymentDevice.deployment_id)
        .where(DeploymentDevice.device_id == device_id, DeploymentDevice.status.not_in(FINAL_DEVICE_STATUSES))
        .order_by(DeploymentDevice.deployment_id)
    ))
