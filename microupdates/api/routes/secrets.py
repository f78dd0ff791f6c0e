"""Operator routes of the secret store: set, list names, delete. No route returns a value."""

from __future__ import annotations

import logging

from fastapi import APIRouter, status

from microupdates.api.deps import State
from microupdates.api.responses import error_responses
from microupdates.api.schemas import MAX_SECRET_VALUE_BYTES, SecretPublic, SecretSet
from microupdates.db import secrets as secret_store
from microupdates.errors import InvalidRequestError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["secrets"])


@router.put("/secrets/{name}", status_code=status.HTTP_204_NO_CONTENT)
def set_secret(name: str, body: SecretSet, state: State) -> None:
    """Create or replace a secret. Running deployments use the new value for jobs handed out from now on."""

    size = len(body.value.encode("utf-8"))
    if not 1 <= size <= MAX_SECRET_VALUE_BYTES:
        raise InvalidRequestError(
            f"The value of secret {name!r} is {size} bytes; it must be 1 to {MAX_SECRET_VALUE_BYTES} bytes."
        )
    with state.database.session() as session:
        created = secret_store.set_secret(session, name, body.value)
    logger.info("Secret %s %s", name, "created" if created else "replaced")


@router.get("/secrets", response_model=list[SecretPublic])
def list_secrets(state: State) -> list[SecretPublic]:
    with state.database.session() as session:
        views = secret_store.list_secrets(session)
    return [SecretPublic(**view.__dict__) for view in views]


@router.delete("/secrets/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404))
def delete_secret(name: str, state: State) -> None:
    """Delete a secret; a job that still references it fails on the device, naming the secret."""

    with state.database.session() as session:
        secret_store.delete_secret(session, name)
    logger.info("Secret %s deleted", name)
