"""Operator routes for deployments: deploy an update, list recent ones, open one, open one device's result."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy.orm import Session
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError

from microupdates.api.deployment_starts import start_deployment_workflow
from microupdates.api.deps import State
from microupdates.api.responses import error_responses
from microupdates.api.schemas import (
    AbortResult,
    DeploymentCreate,
    DeploymentCreated,
    DeploymentDetail,
    DeploymentDevicePublic,
    DeploymentRedeploy,
    DeploymentSummary,
    DeviceResultPublic,
    PhasePublic,
    RolloutControl,
    RolloutControlPublic,
    StageResultPublic,
)
from microupdates.db import deployments as deployment_store
from microupdates.db import jobs as job_store
from microupdates.db import secrets as secret_store
from microupdates.db.models import Deployment, DeploymentDevice, Update
from microupdates.errors import InvalidRequestError
from microupdates.protocol.recipe import DeviceTimeouts, Recipe, StageRetries, TargetSelection
from microupdates.protocol.secret_references import recipe_command_texts, referenced_secret_names
from microupdates.rollout import RolloutOptions
from microupdates.workflows.contracts import (
    ABORT_SIGNAL,
    FINAL_DEPLOYMENT_STATUSES,
    PAUSE_UPDATE,
    PHASE_PENDING,
    PROMOTE_UPDATE,
    RESUME_UPDATE,
    RolloutControlInput,
    RolloutControlResult,
    deployment_workflow_id,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["deployments"])

MAX_DEVICES_PER_PAGE = 1000
# Bound on the wait for the workflow's result of a pause, resume or promote.
ROLLOUT_CONTROL_TIMEOUT_SECONDS = 30


@router.post(
    "/deployments",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeploymentCreated,
    responses=error_responses(404, 503),
)
async def create_deployment(body: DeploymentCreate, state: State) -> DeploymentCreated:
    """Start a deployment and return at once; it runs as a Temporal workflow."""

    return await start_deployment(
        state, body.update_id, body.source_deployment_id, body.targets, body.timeouts, body.rollout_options(),
        body.retries, body.check_in_deadline,
    )


@router.post(
    "/deployments/{deployment_id}/redeploy",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeploymentCreated,
    responses=error_responses(404, 503),
)
async def redeploy_deployment(deployment_id: str, body: DeploymentRedeploy, state: State) -> DeploymentCreated:
    """Deploy this deployment's update, unchanged, to other targets; the new deployment records where it came from."""

    return await start_deployment(state, None, deployment_id, body.targets, body.timeouts, body.rollout_options())


async def start_deployment(
    state: State,
    update_id: str | None,
    source_deployment_id: str | None,
    targets: TargetSelection | None,
    timeouts: DeviceTimeouts | None,
    rollout: RolloutOptions,
    retries: StageRetries | None = None,
    check_in_deadline: datetime | None = None,
) -> DeploymentCreated:
    def insert() -> tuple[str, str, str, TargetSelection]:
        with state.database.session() as session:
            chosen_update_id, chosen_timeouts = update_id, timeouts
            if source_deployment_id is not None:
                source = deployment_store.load_deployment(session, source_deployment_id)
                chosen_update_id = source.update_id
                if chosen_timeouts is None and source.timeouts:
                    chosen_timeouts = DeviceTimeouts.model_validate(source.timeouts)
            recipe = deployment_store.load_recipe(session, chosen_update_id)
            check_recipe_secrets_exist(session, recipe)
            chosen_targets = targets or recipe.targets
            deployment = deployment_store.create_deployment(
                session, chosen_update_id, chosen_targets, chosen_timeouts, rollout, source_deployment_id,
                retries, check_in_deadline,
            )
            return deployment.id, chosen_update_id, recipe.version, chosen_targets

    deployment_id, update_id, version, targets = await asyncio.to_thread(insert)
    try:
        workflow_id = await start_deployment_workflow(
            state.temporal, state.settings.task_queue, deployment_id, update_id, version, targets,
            rollout.max_concurrent,
        )
    except RPCError as error:
        # NOTE: a start that reached Temporal but whose response was lost still runs,
        # although the row's status is failed_to_start.
        reason = str(error).rstrip(".")
        message = f"Temporal did not accept deployment {deployment_id}: {reason}. Check that the Temporal server runs."
        logger.error(message)

        def mark_failed() -> None:
            with state.database.session() as session:
                deployment_store.mark_deployment_not_started(session, deployment_id, message)

        await asyncio.to_thread(mark_failed)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, message) from error

    logger.info(
        "Deployment %s of update %s started as workflow %s (from deployment %s)",
        deployment_id, update_id, workflow_id, source_deployment_id,
    )
    return DeploymentCreated(id=deployment_id, workflow_id=workflow_id, status="pending")


@router.post(
    "/deployments/{deployment_id}/pause", response_model=RolloutControlPublic, responses=error_responses(404, 409, 504)
)
async def pause_deployment(
    deployment_id: str, state: State, body: RolloutControl | None = None
) -> RolloutControlPublic:
    """Start no further device until resumed; devices already updating go on."""

    return await control_rollout(state, deployment_id, PAUSE_UPDATE, body)


@router.post(
    "/deployments/{deployment_id}/resume", response_model=RolloutControlPublic, responses=error_responses(404, 409, 504)
)
async def resume_deployment(
    deployment_id: str, state: State, body: RolloutControl | None = None
) -> RolloutControlPublic:
    """Let a paused deployment start devices again."""

    return await control_rollout(state, deployment_id, RESUME_UPDATE, body)


@router.post(
    "/deployments/{deployment_id}/promote", response_model=RolloutControlPublic, responses=error_responses(404, 409, 504)
)
async def promote_deployment(
    deployment_id: str, state: State, body: RolloutControl | None = None
) -> RolloutControlPublic:
    """Skip the gate and soak time of the current phase, so the next phase starts once its devices finished."""

    return await control_rollout(state, deployment_id, PROMOTE_UPDATE, body)


async def control_rollout(
    state: State, deployment_id: str, update_name: str, body: RolloutControl | None
) -> RolloutControlPublic:
    """Send a workflow update and return the workflow's result. A rejected request is a 409 with the reason."""

    def read_status() -> str:
        with state.database.session() as session:
            return deployment_store.load_deployment(session, deployment_id).status

    current_status = await asyncio.to_thread(read_status)
    if current_status in FINAL_DEPLOYMENT_STATUSES:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"Deployment {deployment_id} has already ended ({current_status}), so there is nothing to {update_name}.",
        )

    handle = state.temporal.get_workflow_handle(deployment_workflow_id(deployment_id))
    request = RolloutControlInput(phase=body.phase if body is not None else None)
    try:
        result = await asyncio.wait_for(
            handle.execute_update(update_name, request, result_type=RolloutControlResult),
            ROLLOUT_CONTROL_TIMEOUT_SECONDS,
        )
    except WorkflowUpdateFailedError as error:
        reason = str(error.cause.message if hasattr(error.cause, "message") else error.cause)
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"Deployment {deployment_id} rejected {update_name}: {reason}"
        ) from error
    except RPCError as error:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"Deployment {deployment_id} could not take {update_name}: {error}. It may have just ended; "
            "read it again.",
        ) from error
    except asyncio.TimeoutError as error:
        raise HTTPException(
            status.HTTP_504_GATEWAY_TIMEOUT,
            f"Deployment {deployment_id} did not answer {update_name} within {ROLLOUT_CONTROL_TIMEOUT_SECONDS} s; "
            "check that the worker runs, then read the deployment to see whether it took effect.",
        ) from error

    logger.info("Deployment %s %s: accepted=%s, %s", deployment_id, update_name, result.accepted, result.message)
    return RolloutControlPublic(deployment_id=deployment_id, **vars(result))


@router.post("/deployments/{deployment_id}/abort", response_model=AbortResult, responses=error_responses(404))
async def abort_deployment(deployment_id: str, state: State) -> AbortResult:
    """Abort a deployment: devices not started never start; running ones stop at their next report."""

    return await abort(state, deployment_id, None)


@router.post(
    "/deployments/{deployment_id}/devices/{device_id}/abort", response_model=AbortResult, responses=error_responses(404)
)
async def abort_device(deployment_id: str, device_id: str, state: State) -> AbortResult:
    """Abort one device's update within a deployment."""

    return await abort(state, deployment_id, device_id)


async def abort(state: State, deployment_id: str, device_id: str | None) -> AbortResult:
    def flag() -> bool:
        with state.database.session() as session:
            return deployment_store.request_abort(session, deployment_id, device_id)

    accepted = await asyncio.to_thread(flag)
    if accepted and device_id is None:
        handle = state.temporal.get_workflow_handle(deployment_workflow_id(deployment_id))
        try:
            await handle.signal(ABORT_SIGNAL)
        except RPCError as error:
            # The workflow also reads the flag before each page of devices, so a lost signal only delays it.
            logger.warning("Abort signal to deployment %s failed: %s", deployment_id, error)

    jobs_ended = await state.device_jobs.abort_queued_jobs(deployment_id, device_id) if accepted else 0
    logger.info("Abort of deployment %s (device %s): accepted=%s, %d queued jobs ended",
                deployment_id, device_id, accepted, jobs_ended)
    return AbortResult(deployment_id=deployment_id, device_id=device_id, accepted=accepted, jobs_ended=jobs_ended)


@router.get("/deployments", response_model=list[DeploymentSummary])
def list_deployments(state: State, limit: Annotated[int, Query(ge=1, le=500)] = 20) -> list[DeploymentSummary]:
    """Recent deployments, newest first, with the number of devices in each status."""

    with state.database.session() as session:
        rows = deployment_store.list_recent_deployments(session, limit)
        return [summarize(deployment, update, counts) for deployment, update, counts in rows]


@router.get("/deployments/{deployment_id}", response_model=DeploymentDetail, responses=error_responses(404))
def read_deployment(
    deployment_id: str,
    state: State,
    limit: Annotated[int, Query(ge=1, le=MAX_DEVICES_PER_PAGE)] = MAX_DEVICES_PER_PAGE,
    after: Annotated[str | None, Query(description="Return devices whose id sorts after this one.")] = None,
) -> DeploymentDetail:
    with state.database.session() as session:
        deployment = deployment_store.load_deployment(session, deployment_id)
        update = deployment_store.load_update(session, deployment.update_id)
        counts = deployment_store.count_device_statuses(session, deployment_id)
        devices = deployment_store.list_deployment_devices(session, deployment_id, limit, after)
        summary = summarize(deployment, update, counts)
        return DeploymentDetail(
            **summary.model_dump(),
            workflow_id=deployment_workflow_id(deployment_id),
            targets=TargetSelection.model_validate(deployment.targets),
            rollout=deployment_store.rollout_options(deployment),
            phases=phases_public(deployment, deployment_store.count_phase_devices(session, deployment_id)),
            follow_up_ids=deployment_store.list_follow_up_ids(session, deployment_id),
            devices=[device_public(row) for row in devices],
        )


@router.get(
    "/deployments/{deployment_id}/devices", response_model=list[DeploymentDevicePublic], responses=error_responses(404)
)
def list_deployment_devices(
    deployment_id: str,
    state: State,
    limit: Annotated[int, Query(ge=1, le=MAX_DEVICES_PER_PAGE)] = MAX_DEVICES_PER_PAGE,
    after: Annotated[str | None, Query(description="Return devices whose id sorts after this one.")] = None,
) -> list[DeploymentDevicePublic]:
    """Return one page of the deployment's frozen target set, ordered by device id."""

    with state.database.session() as session:
        deployment_store.load_deployment(session, deployment_id)
        return [device_public(row) for row in deployment_store.list_deployment_devices(session, deployment_id, limit, after)]


def phases_public(deployment: Deployment, phase_counts: dict[int, dict[str, int]]) -> list[PhasePublic]:
    """Combine the plan, the workflow's phase state and the device counts per phase."""

    specs = deployment_store.rollout_options(deployment).phases
    progress = (deployment.rollout_state or {}).get("phases") or []
    rows = [(spec.name or spec.describe(), spec.describe(), spec.min_success_rate, spec.soak_seconds) for spec in specs]
    if not rows:
        rows = [("all devices", "every target", 100.0, 0)]
    phases = []
    for index, (name, selects, min_success_rate, soak_seconds) in enumerate(rows):
        known = progress[index] if index < len(progress) else {}
        counts = phase_counts.get(index, {})
        phases.append(PhasePublic(
            number=index + 1,
            name=name,
            selects=selects,
            min_success_rate=min_success_rate,
            soak_seconds=soak_seconds,
            state=known.get("state", PHASE_PENDING),
            device_count=sum(counts.values()),
            device_status_counts=counts,
            gate=known.get("gate"),
            soak_until=known.get("soak_until"),
            promoted=known.get("promoted", False),
        ))
    return phases


@router.get(
    "/deployments/{deployment_id}/devices/{device_id}",
    response_model=DeviceResultPublic,
    responses=error_responses(404),
)
def read_device_result(deployment_id: str, device_id: str, state: State) -> DeviceResultPublic:
    """Return one device's result: each stage's status, exit code, duration and bounded output."""

    with state.database.session() as session:
        row = deployment_store.load_deployment_device(session, deployment_id, device_id)
        jobs = job_store.list_device_jobs(session, deployment_id, device_id)
        stages = [stage_public(job) for job in jobs if job.stage != job_store.CHECK_IN_STAGE]
        return DeviceResultPublic(**device_public(row).model_dump(), deployment_id=deployment_id, stages=stages)


def summarize(deployment: Deployment, update: Update, counts: dict[str, int]) -> DeploymentSummary:
    return DeploymentSummary(
        id=deployment.id,
        update_id=deployment.update_id,
        update_version=update.version,
        status=deployment.status,
        device_count=deployment.device_count,
        device_status_counts=counts,
        created_at=deployment.created_at,
        started_at=deployment.started_at,
        finished_at=deployment.finished_at,
        error=deployment.error,
        abort_requested=deployment.abort_requested_at is not None,
        source_deployment_id=deployment.source_deployment_id,
        paused=bool((deployment.rollout_state or {}).get("paused")),
        current_phase=(deployment.rollout_state or {}).get("phase_index", 0) + 1 if deployment.rollout_state else None,
        check_in_deadline_at=deployment.check_in_deadline_at,
    )


def device_public(row: DeploymentDevice) -> DeploymentDevicePublic:
    return DeploymentDevicePublic(
        device_id=row.device_id,
        phase=row.phase + 1 if row.phase is not None else None,
        status=row.status,
        stage=row.stage,
        error=row.error,
        rollback_error=row.rollback_error,
        stage_attempts=row.stage_attempts or {},
        abort_requested=row.abort_requested_at is not None,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def stage_public(job) -> StageResultPublic:
    report = job.report or {}
    return StageResultPublic(
        stage=job.stage,
        attempt=job.attempt,
        state=job.state,
        status=report.get("status"),
        exit_code=report.get("exit_code"),
        duration_seconds=report.get("duration_seconds"),
        error=report.get("error"),
        queued_at=job.created_at,
        picked_up_at=job.picked_up_at,
        reported_at=job.reported_at,
        steps=report.get("steps", []),
    )


def check_recipe_secrets_exist(session: Session, recipe: Recipe) -> None:
    """Raise InvalidRequestError (422) naming each secret the recipe references that the store does not hold."""

    names = referenced_secret_names(recipe_command_texts(recipe))
    missing = secret_store.missing_secret_names(session, names)
    if missing:
        raise InvalidRequestError(
            f"The recipe references unknown secret(s) {', '.join(missing)}; "
            "set each with PUT /api/v1/secrets/NAME, then deploy again."
        )
