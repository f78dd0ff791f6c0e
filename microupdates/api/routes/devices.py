"""Operator routes for the device registry and fleet enrolment keys."""

from __future__ import annotations

from datetime import timedelta
import logging
from typing import Annotated

from fastapi import APIRouter, Query, status

from microupdates.api.deps import State
from microupdates.api.responses import error_responses
from microupdates.api.schemas import (
    DeviceCreate,
    DeviceCreated,
    DeviceLabelsUpdate,
    DevicePublic,
    EnrolmentKeyCreate,
    EnrolmentKeyCreated,
    EnrolmentKeyPublic,
)
from microupdates.db import deployments as deployment_store
from microupdates.db import devices as device_store
from microupdates.db.models import utc_now

logger = logging.getLogger(__name__)

router = APIRouter(tags=["devices"])


@router.post("/devices", status_code=status.HTTP_201_CREATED, response_model=DeviceCreated, responses=error_responses(409))
def register_device(body: DeviceCreate, state: State) -> DeviceCreated:
    with state.database.session() as session:
        token = device_store.register_device(session, body.name, body.groups, body.tags)
    return DeviceCreated(id=body.name, token=token)


@router.get("/devices", response_model=list[DevicePublic])
def list_devices(
    state: State,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="Return devices whose id sorts after this one.")] = None,
) -> list[DevicePublic]:
    with state.database.session() as session:
        views = device_store.list_device_views(session, limit, after)
    return [DevicePublic(**view.__dict__) for view in views]


@router.get("/devices/{device_id}", response_model=DevicePublic, responses=error_responses(404))
def read_device(device_id: str, state: State) -> DevicePublic:
    with state.database.session() as session:
        view = device_store.load_device_view(session, device_id)
    return DevicePublic(**view.__dict__)


@router.patch("/devices/{device_id}", response_model=DevicePublic, responses=error_responses(404))
def update_device_labels(device_id: str, body: DeviceLabelsUpdate, state: State) -> DevicePublic:
    """Replace a device's groups, tags or both. Running deployments keep the devices they froze at start."""

    with state.database.session() as session:
        current = device_store.load_device_view(session, device_id)
        groups = body.groups if body.groups is not None else current.groups
        tags = body.tags if body.tags is not None else current.tags
        device_store.set_device_labels(session, device_id, groups, tags)
        session.flush()
        view = device_store.load_device_view(session, device_id)
    return DevicePublic(**view.__dict__)


@router.delete("/devices/{device_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404, 409))
def remove_device(device_id: str, state: State) -> None:
    with state.database.session() as session:
        device_store.remove_device(session, device_id, deployment_store.active_deployment_ids(session, device_id))


@router.post(
    "/devices/{device_id}/token",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceCreated,
    responses=error_responses(404),
)
def issue_device_token(device_id: str, state: State) -> DeviceCreated:
    """Give the device a new token, shown once; its previous token, revoked or not, stops working at once."""

    with state.database.session() as session:
        token = device_store.issue_device_token(session, device_id)
    logger.info("Issued a new token to device %s", device_id)
    return DeviceCreated(id=device_id, token=token)


@router.post("/devices/{device_id}/token/revoke", response_model=DevicePublic, responses=error_responses(404))
def revoke_device_token(device_id: str, state: State) -> DevicePublic:
    """Revoke the device's token: its requests get 401 until an operator issues a new token."""

    with state.database.session() as session:
        device_store.revoke_device_token(session, device_id)
        logger.info("Revoked the token of device %s", device_id)
        session.flush()
        view = device_store.load_device_view(session, device_id)
    return DevicePublic(**view.__dict__)


@router.post("/enrolment-keys", status_code=status.HTTP_201_CREATED, response_model=EnrolmentKeyCreated)
def create_enrolment_key(body: EnrolmentKeyCreate, state: State) -> EnrolmentKeyCreated:
    expires_at = utc_now() + timedelta(seconds=body.expires_in_seconds) if body.expires_in_seconds else None
    with state.database.session() as session:
        key, view = device_store.create_enrolment_key(session, body.group, body.tags, body.max_uses, expires_at)
    logger.info("Created enrolment key %d for group %s (max uses %s, expires %s)", view.id, view.group,
                view.max_uses or "unlimited", view.expires_at or "never")
    return EnrolmentKeyCreated(key=key, **view.__dict__)


@router.get("/enrolment-keys", response_model=list[EnrolmentKeyPublic])
def list_enrolment_keys(state: State) -> list[EnrolmentKeyPublic]:
    """List enrolment keys with their limits and use counts; the keys themselves are never shown again."""

    with state.database.session() as session:
        views = device_store.list_enrolment_keys(session)
    return [EnrolmentKeyPublic(**view.__dict__) for view in views]


@router.post("/enrolment-keys/{key_id}/revoke", response_model=EnrolmentKeyPublic, responses=error_responses(404))
def revoke_enrolment_key(key_id: int, state: State) -> EnrolmentKeyPublic:
    """Stop the key from enrolling more devices; devices it enrolled keep their tokens."""

    with state.database.session() as session:
        view = device_store.revoke_enrolment_key(session, key_id)
    logger.info("Revoked enrolment key %d", key_id)
    return EnrolmentKeyPublic(**view.__dict__)
