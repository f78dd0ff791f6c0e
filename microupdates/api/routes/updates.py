"""Operator routes for artifacts (uploaded files) and updates (stored recipes)."""

from __future__ import annotations

import asyncio
import json
import tarfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, status

from microupdates.api.body_limits import HTTP_CONTENT_TOO_LARGE
from microupdates.api.deps import State
from microupdates.api.responses import error_responses
from microupdates.api.schemas import ArtifactPublic, UpdateCreate, UpdatePublic
from microupdates.artifact_store import ArtifactTooLargeError
from microupdates.db import deployments as deployment_store
from microupdates.db.models import Artifact, Update
from microupdates.errors import InvalidRequestError
from microupdates.protocol.archives import UnsafeArchiveError, check_archive
from microupdates.protocol.recipe import Recipe

router = APIRouter(tags=["updates"])


ArtifactKind = Literal["file", "directory"]

# The upload's body is read as a stream, not parsed, so its schema is declared
# by hand. It is optional because an empty body stores an empty file.
RAW_BODY_SCHEMA = {
    "requestBody": {
        "required": False,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/artifacts",
    status_code=status.HTTP_201_CREATED,
    response_model=ArtifactPublic,
    openapi_extra=RAW_BODY_SCHEMA,
)
async def upload_artifact(
    request: Request,
    state: State,
    kind: Annotated[
        ArtifactKind | None,
        Query(description="`directory` checks that the body is a safe tar archive before storing it."),
    ] = None,
) -> ArtifactPublic:
    """Store the raw request body under its SHA-256; uploading the same content twice is harmless.

    The body streams to disk and the upload stops with 413 at the byte that
    passes `max_artifact_bytes`.
    """

    check = check_directory_artifact if kind == "directory" else None
    try:
        sha256, size = await state.artifacts.save_stream(request.stream(), check)
    except ArtifactTooLargeError as error:
        raise HTTPException(HTTP_CONTENT_TOO_LARGE, str(error)) from error

    def record() -> None:
        with state.database.session() as session:
            if session.get(Artifact, sha256) is None:
                session.add(Artifact(sha256=sha256, size_bytes=size))

    await asyncio.to_thread(record)
    return ArtifactPublic(sha256=sha256, size_bytes=size)


@router.post("/updates", status_code=status.HTTP_201_CREATED, response_model=UpdatePublic)
def create_update(body: UpdateCreate, state: State) -> UpdatePublic:
    """Store a recipe whose file entries name uploaded artifacts; directory archives are checked again."""

    check_recipe_size(body.recipe, state.settings.max_recipe_bytes)
    for index, entry in enumerate(body.recipe.files):
        if entry.kind == "directory" and entry.artifact is not None and state.artifacts.exists(entry.artifact):
            try:
                check_directory_artifact(state.artifacts.path_for(entry.artifact))
            except InvalidRequestError as error:
                raise InvalidRequestError(f"files[{index}] ({entry.source}): {error}") from error

    with state.database.session() as session:
        row = deployment_store.create_update(session, body.recipe)
        session.flush()
        return to_public(row)


@router.get("/updates", response_model=list[UpdatePublic])
def list_updates(state: State, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[UpdatePublic]:
    with state.database.session() as session:
        rows = deployment_store.list_updates(session, limit)
        return [to_public(row) for row in rows]


@router.get("/updates/{update_id}", response_model=UpdatePublic, responses=error_responses(404))
def read_update(update_id: str, state: State) -> UpdatePublic:
    with state.database.session() as session:
        return to_public(deployment_store.load_update(session, update_id))


def check_recipe_size(recipe: Recipe, max_recipe_bytes: int) -> None:
    """Raise InvalidRequestError when the recipe, as compact JSON, is over max_recipe_bytes."""

    size = len(json.dumps(recipe.model_dump(mode="json", exclude_none=True), separators=(",", ":")).encode("utf-8"))
    if size > max_recipe_bytes:
        raise InvalidRequestError(
            f"The recipe is {size} bytes as JSON, over the limit of {max_recipe_bytes} bytes "
            "(MICROUPDATES_MAX_RECIPE_BYTES); move large content into files."
        )


def check_directory_artifact(path: Path) -> None:
    """Raise InvalidRequestError when the file is not a tar archive that is safe to extract."""

    try:
        with open(path, "rb") as archive_file:
            check_archive(archive_file)
    except UnsafeArchiveError as error:
        raise InvalidRequestError(f"The directory archive is unsafe: {error}; pack the directory again.") from error
    except tarfile.TarError as error:
        raise InvalidRequestError(
            f"The directory artifact is not a readable tar archive ({error}); upload a tar or tar.gz of the directory."
        ) from error


def to_public(row: Update) -> UpdatePublic:
    return UpdatePublic(
        id=row.id, version=row.version, comment=row.comment, created_at=row.created_at, recipe=row.recipe
    )
