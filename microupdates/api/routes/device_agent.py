"""The device API: enrolment, long-polling check-in, progress, stage reports and artifact downloads."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from microupdates.api.body_limits import HTTP_CONTENT_TOO_LARGE
from microupdates.api.deps import CurrentDevice, State
from microupdates.api.responses import error_responses
from microupdates.db import devices as device_store
from microupdates.db import jobs as job_store
from microupdates.db.models import Device
from microupdates.errors import EnrolmentKeyRejectedError
from microupdates.protocol.device_api import (
    MAX_REPORTED_OUTPUT_BYTES,
    CheckInRequest,
    CheckInResponse,
    DeviceIdentity,
    EnrolRequest,
    EnrolResponse,
    ProgressReport,
    ProgressResponse,
    StageReport,
    StageReportResponse,
    TokenRotationResponse,
)
from microupdates.api.schemas import check_label

logger = logging.getLogger(__name__)

router = APIRouter(tags=["device agent"])


@router.post(
    "/enrol", status_code=status.HTTP_201_CREATED, response_model=EnrolResponse, responses=error_responses(404, 409)
)
def enrol_device(body: EnrolRequest, state: State) -> EnrolResponse:
    """Register a device that presents a fleet enrolment key; the token is returned once."""

    try:
        device_id = check_label(body.device_name)
        tags = [check_label(tag) for tag in body.tags]
    except ValueError as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"device_name or tags: {error}") from error

    try:
        with state.database.session() as session:
            token, groups = device_store.enrol_device(session, body.enrolment_key, device_id, tags)
    except EnrolmentKeyRejectedError as error:
        logger.warning("Enrolment of device %s rejected: %s", device_id, error)
        raise
    logger.info("Device %s enrolled in groups %s", device_id, groups)
    return EnrolResponse(
        device_id=device_id, device_token=token, groups=groups, server_public_key=state.signer.public_key_text
    )


@router.get("/identity", response_model=DeviceIdentity)
def read_identity(device: CurrentDevice, state: State) -> DeviceIdentity:
    """Return the device's id and the server's job-signing key, for an agent given a token instead of enrolling."""

    return DeviceIdentity(device_id=device.id, server_public_key=state.signer.public_key_text)


@router.post("/token/rotate", response_model=TokenRotationResponse)
def rotate_token(device: CurrentDevice, state: State) -> TokenRotationResponse:
    """Issue the calling device a new token. The current one keeps working until a request uses the new one."""

    with state.database.session() as session:
        token = device_store.rotate_device_token(session, device.id)
    logger.info("Device %s rotated its token; the old one is valid until the new one is used", device.id)
    return TokenRotationResponse(device_token=token)


@router.post("/check-in", response_model=CheckInResponse)
async def check_in(body: CheckInRequest, device: CurrentDevice, state: State) -> CheckInResponse:
    """Return the device's next stage job, holding the request open up to `wait_seconds` for one."""

    facts = body.facts.model_dump(mode="json") if body.facts is not None else None

    def mark_seen() -> None:
        with state.database.session() as session:
            row = session.get(Device, device.id)
            if row is not None:
                device_store.mark_device_seen(session, row, body.agent_version, facts)

    # The device row read by the authentication shows whether a write is due, so most
    # check-ins open no transaction for it.
    if device_store.device_seen_write_due(device, body.agent_version, facts):
        await asyncio.to_thread(mark_seen)
    response = await state.device_jobs.check_in(device.id, body.wait_seconds)
    state.metrics.check_ins.labels("job" if response.job is not None else "no_job").inc()
    return response


@router.post("/jobs/{job_id}/progress", response_model=ProgressResponse, responses=error_responses(404, 409))
async def report_progress(job_id: int, body: ProgressReport, device: CurrentDevice, state: State) -> ProgressResponse:
    """Keep a running stage alive; the response, at most `wait_seconds` later, carries whether the device must abort it."""

    check_output_size(device.id, job_id, "output_tail", body.output_tail)
    return await state.device_jobs.report_progress(device.id, job_id, body.wait_seconds)


@router.post("/jobs/{job_id}/report", response_model=StageReportResponse, responses=error_responses(404, 409))
async def report_stage(job_id: int, body: StageReport, device: CurrentDevice, state: State) -> StageReportResponse:
    """Record a stage's result; sending the same report again is accepted and changes nothing."""

    for index, step in enumerate(body.steps):
        check_output_size(device.id, job_id, f"steps[{index}].output ({step.name})", step.output)
    detail = await state.device_jobs.report_result(device.id, job_id, body)
    return StageReportResponse(accepted=True, detail=detail)


def check_output_size(device_id: str, job_id: int, field: str, output: str) -> None:
    """Reject device output over MAX_REPORTED_OUTPUT_BYTES with 413; the agent cuts output to fit before sending."""

    # surrogatepass counts a lone surrogate from a JSON escape instead of failing on it.
    size = len(output.encode("utf-8", "surrogatepass"))
    if size > MAX_REPORTED_OUTPUT_BYTES:
        logger.warning("Device %s sent %d bytes in %s of job %d, over the limit of %d bytes",
                       device_id, size, field, job_id, MAX_REPORTED_OUTPUT_BYTES)
        raise HTTPException(
            HTTP_CONTENT_TOO_LARGE,
            f"{field} is {size} bytes, over the limit of {MAX_REPORTED_OUTPUT_BYTES} bytes of reported output; "
            "cut the output to its first and last bytes and set output_truncated.",
        )


@router.get(
    "/artifacts/{sha256}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The artifact's content."},
        206: {"content": {"application/octet-stream": {}}, "description": "The requested range."},
        **error_responses(404, 416),
    },
)
def download_artifact(sha256: str, device: CurrentDevice, state: State) -> FileResponse:
    """Serve a file of the device's running files stage; HTTP Range requests let an interrupted download resume.

    An artifact that no running job of this device uses gets the same 404 as
    one that does not exist, so a device learns nothing about other devices.
    """

    not_found = HTTPException(status.HTTP_404_NOT_FOUND, f"Artifact {sha256!r} not found.")
    with state.database.session() as session:
        allowed = job_store.device_job_uses_artifact(session, device.id, sha256)
    if not allowed:
        raise not_found
    try:
        path = state.artifacts.path_for(sha256)
    except ValueError as error:
        raise not_found from error
    if not path.is_file():
        raise not_found
    return FileResponse(path, media_type="application/octet-stream")
