"""Operator routes for artifacts (uploaded files) and updates (stored recipes)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status

from microupdates.api.deps import State
from microupdates.api.schemas import ArtifactPublic, UpdateCreate, UpdatePublic
from microupdates.artifact_store import ArtifactTooLargeError
from microupdates.db import deployments as deployment_store
from microupdates.db.models import Artifact, Update

router = APIRouter(tags=["updates"])


@router.post("/artifacts", status_code=status.HTTP_201_CREATED, response_model=ArtifactPublic)
async def upload_artifact(request: Request, state: State) -> ArtifactPublic:
    """Store the raw request body under its SHA-256; uploading the same content twice is harmless."""

    try:
        sha256, size = await state.artifacts.save_stream(request.stream())
    except ArtifactTooLargeError as error:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, str(error)) from error

    def record() -> None:
        with state.database.session() as session:
            if session.get(Artifact, sha256) is None:
                session.add(Artifact(sha256=sha256, size_bytes=size))

    await asyncio.to_thread(record)
    return ArtifactPublic(sha256=sha256, size_bytes=size)


@router.post("/updates", status_code=status.HTTP_201_CREATED, response_model=UpdatePublic)
def create_update(body: UpdateCreate, state: State) -> UpdatePublic:
    with state.database.session() as session:
        row = deployment_store.create_update(session, body.recipe)
        session.flush()
        return to_public(row)


@router.get("/updates", response_model=list[UpdatePublic])
def list_updates(state: State, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[UpdatePublic]:
    with state.database.session() as session:
        rows = deployment_store.list_updates(session, limit)
        return [to_public(row) for row in rows]


@router.get("/updates/{update_id}", response_model=UpdatePublic)
def read_update(update_id: str, state: State) -> UpdatePublic:
    with state.database.session() as session:
        return to_public(deployment_store.load_update(session, update_id))


def to_public(row: Update) -> UpdatePublic:
    return UpdatePublic(
        id=row.id, version=row.version, comment=row.comment, created_at=row.created_at, recipe=row.recipe
    )
