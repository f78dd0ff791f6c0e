"""Operator routes for API keys: create one (shown once), list them, revoke one."""

from __future__ import annotations

import logging

from fastapi import APIRouter, status

from microupdates.api.auth import CurrentOperator
from microupdates.api.deps import State
from microupdates.api.responses import error_responses
from microupdates.api.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic
from microupdates.db import api_keys as api_key_store
from microupdates.db.models import ApiKey

logger = logging.getLogger(__name__)

router = APIRouter(tags=["api keys"])


@router.post("/api-keys", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated)
def create_api_key(body: ApiKeyCreate, state: State, operator: CurrentOperator) -> ApiKeyCreated:
    """Create an API key and return it; the key is shown only in this response."""

    with state.database.session() as session:
        row, key = api_key_store.create_api_key(session, body.name, body.role)
        created = ApiKeyCreated(**to_public(row).model_dump(), key=key)
    logger.info("API key %s (%s, role %s) created with API key %s", row.id, row.name, row.role, operator.id)
    return created


@router.get("/api-keys", response_model=list[ApiKeyPublic])
def list_api_keys(state: State) -> list[ApiKeyPublic]:
    """List every API key, revoked ones included, oldest first; the keys themselves are never returned."""

    with state.database.session() as session:
        return [to_public(row) for row in api_key_store.list_api_keys(session)]


@router.post("/api-keys/{key_id}/revoke", response_model=ApiKeyPublic, responses=error_responses(404, 409))
def revoke_api_key(key_id: str, state: State, operator: CurrentOperator) -> ApiKeyPublic:
    """Revoke an API key at once; revoking a revoked key changes nothing. The last active admin key cannot be revoked here."""

    with state.database.session() as session:
        row = api_key_store.revoke_api_key(session, key_id, keep_an_admin=True)
        revoked = to_public(row)
    logger.info("API key %s (%s) revoked with API key %s", key_id, revoked.name, operator.id)
    return revoked


def to_public(row: ApiKey) -> ApiKeyPublic:
    return ApiKeyPublic(
        id=row.id,
        name=row.name,
        role=row.role,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )
