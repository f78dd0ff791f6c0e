"""Error responses declared in the OpenAPI schema, so clients and schema checks know every 4xx body."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """The body of every error except request validation: one sentence saying what failed and what to do."""

    detail: str


class ValidationErrorBody(BaseModel):
    """The body of a 422: pydantic's list of errors for an invalid request, or one sentence for a valid
    request that cannot be carried out (an empty target, a recipe over the size limit)."""

    detail: str | list[dict[str, Any]] = Field(
        description="Each list item has `loc` (where), `msg` (what) and `type`."
    )


ERROR_DESCRIPTIONS = {
    400: "The request could not be read.",
    401: "No valid token in `Authorization: Bearer`.",
    403: "The token is valid but may not use this endpoint.",
    404: "A device, update, deployment, job or artifact in the request does not exist.",
    409: "The request clashes with stored state.",
    413: "The request body, or a part of it such as a device's output, is over its size limit.",
    416: "The requested range starts past the end of the artifact.",
    422: "The request is invalid or cannot be carried out.",
    503: "Temporal did not accept the request.",
    504: "The deployment's workflow did not answer in time.",
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """Return the `responses` argument of a route or router that declares these error statuses."""

    responses: dict[int | str, dict[str, Any]] = {}
    for status_code in status_codes:
        model = ValidationErrorBody if status_code == 422 else ErrorBody
        responses[status_code] = {"model": model, "description": ERROR_DESCRIPTIONS[status_code]}
    return responses


# Every operator route may fail authentication, read a body over the limit or
# fail validation.
OPERATOR_ERROR_RESPONSES = error_responses(400, 401, 403, 413, 422)
# Device routes: the same without 403; enrolment alone needs no token.
DEVICE_ERROR_RESPONSES = error_responses(400, 401, 413, 422)
