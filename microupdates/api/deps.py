"""Shared objects of the API process and the dependencies that hand them to routes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status
from temporalio.client import Client

from microupdates.api.device_jobs import DeviceJobs
from microupdates.api.job_notifier import JobNotifier
from microupdates.api.job_signing import JobSigner
from microupdates.api.metrics import ApiMetrics
from microupdates.artifact_store import ArtifactStore
from microupdates.db import devices as device_store
from microupdates.db.models import Device
from microupdates.db.session import Database
from microupdates.settings import ServerSettings


@dataclass
class ApiState:
    settings: ServerSettings
    database: Database
    temporal: Client
    notifier: JobNotifier
    device_jobs: DeviceJobs
    artifacts: ArtifactStore
    metrics: ApiMetrics
    signer: JobSigner


def get_state(request: Request) -> ApiState:
    return request.app.state.api


State = Annotated[ApiState, Depends(get_state)]


async def get_current_device(
    state: State,
    authorization: Annotated[str | None, Header()] = None,
) -> Device:
    """Authenticate a device by its bearer token; every failure is the same 401."""

    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Missing device token: send 'Authorization: Bearer <device token>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def lookup() -> Device | None:
        with state.database.session() as session:
            device = device_store.authenticate_device(session, token)
            if device is not None:
                session.expunge(device)
            return device

    device = await asyncio.to_thread(lookup)
    if device is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "The device token is not valid; enrol the device again or ask the operator for a new token.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return device


CurrentDevice = Annotated[Device, Depends(get_current_device)]
