"""Operator authentication: API keys sent as bearer tokens, and the role each operator endpoint requires.

OPERATOR_ROUTE_ROLES is the one place that decides who may call what.
`create_app` copies each route's role into the route (`assign_operator_roles`),
includes every operator router with `authorize_operator` as a dependency, and
does not start when an operator route lacks either
(`find_unguarded_operator_routes`).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Request, Security, status
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from microupdates.api.deps import State
from microupdates.db import api_keys as api_key_store
from microupdates.db.api_keys import API_KEY_PREFIX
from microupdates.db.models import ApiKey
from microupdates.roles import Role

OPERATOR_API_PREFIX = "/api/v1"
DEVICE_TOKEN_PREFIX = "mu_"
REQUIRED_ROLE_EXTENSION = "x-required-role"

READ_ONLY, DEPLOYER, ADMIN = Role.READ_ONLY, Role.DEPLOYER, Role.ADMIN

# The role each operator endpoint requires, by method and path template. A role includes the roles above it.
OPERATOR_ROUTE_ROLES: dict[tuple[str, str], Role] = {
    ("GET", "/api/v1/devices"): READ_ONLY,
    ("GET", "/api/v1/devices/{device_id}"): READ_ONLY,
    ("POST", "/api/v1/devices"): ADMIN,
    ("PATCH", "/api/v1/devices/{device_id}"): ADMIN,
    ("DELETE", "/api/v1/devices/{device_id}"): ADMIN,
    ("POST", "/api/v1/devices/{device_id}/token"): ADMIN,
    ("POST", "/api/v1/devices/{device_id}/token/revoke"): ADMIN,
    ("POST", "/api/v1/enrolment-keys"): ADMIN,
    ("GET", "/api/v1/enrolment-keys"): ADMIN,
    ("POST", "/api/v1/enrolment-keys/{key_id}/revoke"): ADMIN,

    ("POST", "/api/v1/artifacts"): DEPLOYER,
    ("POST", "/api/v1/updates"): DEPLOYER,
    ("GET", "/api/v1/updates"): READ_ONLY,
    ("GET", "/api/v1/updates/{update_id}"): READ_ONLY,

    ("POST", "/api/v1/deployments"): DEPLOYER,
    ("GET", "/api/v1/deployments"): READ_ONLY,
    ("GET", "/api/v1/deployments/{deployment_id}"): READ_ONLY,
    ("GET", "/api/v1/deployments/{deployment_id}/devices/{device_id}"): READ_ONLY,
    ("POST", "/api/v1/deployments/{deployment_id}/abort"): DEPLOYER,
    ("POST", "/api/v1/deployments/{deployment_id}/devices/{device_id}/abort"): DEPLOYER,
    ("GET", "/api/v1/deployments/{deployment_id}/devices"): READ_ONLY,
    ("POST", "/api/v1/deployments/{deployment_id}/redeploy"): DEPLOYER,
    ("POST", "/api/v1/deployments/{deployment_id}/pause"): DEPLOYER,
    ("POST", "/api/v1/deployments/{deployment_id}/resume"): DEPLOYER,
    ("POST", "/api/v1/deployments/{deployment_id}/promote"): DEPLOYER,

    ("PUT", "/api/v1/secrets/{name}"): ADMIN,
    ("GET", "/api/v1/secrets"): DEPLOYER,
    ("DELETE", "/api/v1/secrets/{name}"): ADMIN,

    ("POST", "/api/v1/api-keys"): ADMIN,
    ("GET", "/api/v1/api-keys"): ADMIN,
    ("POST", "/api/v1/api-keys/{key_id}/revoke"): ADMIN,
}

api_key_scheme = HTTPBearer(
    scheme_name="ApiKey",
    bearerFormat="muk_...",
    description="An operator API key in `Authorization: Bearer <API key>`. "
    "Each operation's `x-required-role` names the role it needs: read-only, deployer or admin.",
    auto_error=False,
)


def unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


async def authorize_operator(
    request: Request,
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(api_key_scheme)],
) -> ApiKey:
    """Authenticate the request's API key and check that its role covers the endpoint; return the key's row."""

    # NOTE: FastAPI decodes a JSON body before it runs dependencies, so a body that is not valid JSON
    # gets 422 even without a key. The endpoint itself never runs without a valid key.

    route = request.scope["route"]
    path = request.url.path
    role_name = (route.openapi_extra or {}).get(REQUIRED_ROLE_EXTENSION)
    if role_name is None:
        # create_app does not start with such a route, so reject the request rather than let it through.
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{request.method} {path} has no role assigned.")
    required = Role(role_name)

    if credentials is None:
        raise unauthorized("Missing API key: send 'Authorization: Bearer <API key>'.")
    key = credentials.credentials
    if not key.startswith(API_KEY_PREFIX):
        if key.startswith(DEVICE_TOKEN_PREFIX):
            raise unauthorized(f"This is a device token; operator endpoints need an API key ({API_KEY_PREFIX}...).")
        raise unauthorized(f"The API key is not valid: API keys start with {API_KEY_PREFIX!r}.")

    row = await asyncio.to_thread(find_and_mark_used, state, key)
    if row is None:
        raise unauthorized("The API key is not valid; ask an admin for a key (`microupdates api-keys create`).")
    if row.revoked_at is not None:
        raise unauthorized(f"API key {row.id} ({row.name}) was revoked; ask an admin for a new key.")

    role = Role(row.role)
    if not role.includes(required):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"{request.method} {path} needs the {required.value} role; "
            f"API key {row.id} ({row.name}) has the {role.value} role.",
            headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
        )
    return row


def find_and_mark_used(state: State, key: str) -> ApiKey | None:
    with state.database.session() as session:
        row = api_key_store.find_api_key(session, key)
        if row is None:
            return None
        if row.revoked_at is None:
            api_key_store.mark_api_key_used(row)
        session.flush()
        session.expunge(row)
        return row


CurrentOperator = Annotated[ApiKey, Security(authorize_operator)]


def assign_operator_roles(router: APIRouter) -> None:
    """Store each route's role from OPERATOR_ROUTE_ROLES in its OpenAPI extension and description.

    Call it before the router is included: FastAPI copies these attributes
    into the included route, and `authorize_operator` reads the role back
    from the extension. Raises RuntimeError for a route without a role.
    """

    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        path = OPERATOR_API_PREFIX + route.path
        roles = {OPERATOR_ROUTE_ROLES.get((method, path)) for method in route.methods}
        if None in roles or len(roles) != 1:
            raise RuntimeError(
                f"Operator route {'/'.join(sorted(route.methods))} {path} needs one entry per method "
                "in OPERATOR_ROUTE_ROLES (microupdates/api/auth.py), with the same role."
            )
        role = roles.pop()
        route.openapi_extra = {**(route.openapi_extra or {}), REQUIRED_ROLE_EXTENSION: role.value}
        note = f"Required role: `{role.value}`."
        if note not in (route.description or ""):
            route.description = f"{route.description}\n\n{note}" if route.description else note


def find_unguarded_operator_routes(app: FastAPI) -> list[str]:
    """Return "METHOD PATH" of each operator route that lacks `authorize_operator` or a role."""

    unguarded = []
    for route in iter_routes(app):
        path = getattr(route, "path", "") or ""
        if not path.startswith(OPERATOR_API_PREFIX + "/"):
            continue
        dependant = getattr(route, "dependant", None)
        role = (getattr(route, "openapi_extra", None) or {}).get(REQUIRED_ROLE_EXTENSION)
        if dependant is None or not depends_on(dependant, authorize_operator) or role is None:
            unguarded.extend(f"{method} {path}" for method in sorted(route.methods or ["?"]))
    return unguarded


def iter_routes(app: FastAPI) -> list[Any]:
    """Return the app's routes with included routers flattened, each with its full path."""

    try:
        # FastAPI 0.165 keeps each included router as one entry of app.routes, and this flattens them.
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def depends_on(dependant: Dependant, call: object) -> bool:
    return any(sub.call is call or depends_on(sub, call) for sub in dependant.dependencies)
