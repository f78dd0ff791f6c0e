"""Every operator route checks an API key and has a role; the OpenAPI page documents both. No stack needed."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI, Security

from microupdates.api.app import create_app
from microupdates.api.auth import (
    OPERATOR_API_PREFIX,
    OPERATOR_ROUTE_ROLES,
    REQUIRED_ROLE_EXTENSION,
    assign_operator_roles,
    authorize_operator,
    depends_on,
    find_unguarded_operator_routes,
    iter_routes,
)
from microupdates.roles import Role
from microupdates.settings import ServerSettings


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return create_app(ServerSettings())


def operator_route_methods(app: FastAPI) -> list[tuple[str, str, object]]:
    found = []
    for route in iter_routes(app):
        path = getattr(route, "path", "") or ""
        if path.startswith(OPERATOR_API_PREFIX + "/"):
            found.extend((method, path, route) for method in sorted(route.methods))
    return found


def test_every_operator_route_checks_api_key_role(app):
    routes = operator_route_methods(app)

    assert len(routes) >= len(OPERATOR_ROUTE_ROLES)
    for method, path, route in routes:
        assert depends_on(route.dependant, authorize_operator), f"{method} {path} does not check the API key"
        assert (method, path) in OPERATOR_ROUTE_ROLES, f"{method} {path} has no role in OPERATOR_ROUTE_ROLES"
        assert route.openapi_extra[REQUIRED_ROLE_EXTENSION] == OPERATOR_ROUTE_ROLES[(method, path)].value


def test_role_table_names_only_existing_routes(app):
    existing = {(method, path) for method, path, _ in operator_route_methods(app)}

    assert set(OPERATOR_ROUTE_ROLES) - existing == set()


def test_unguarded_operator_route_is_found():
    app = create_app(ServerSettings())
    extra = APIRouter()

    @extra.get("/secrets")
    def read_secrets() -> dict[str, str]:
        return {}

    app.include_router(extra, prefix=OPERATOR_API_PREFIX)

    assert find_unguarded_operator_routes(app) == ["GET /api/v1/secrets"]


def test_route_without_role_entry_is_rejected():
    router = APIRouter()

    @router.post("/reboot-everything")
    def reboot_everything() -> None:
        return None

    with pytest.raises(RuntimeError, match=r"POST /api/v1/reboot-everything needs one entry per method"):
        assign_operator_roles(router)


def test_guarded_route_with_role_passes_check():
    router = APIRouter()

    @router.get("/devices")
    def list_all() -> list[str]:
        return []

    app = FastAPI()
    assign_operator_roles(router)
    app.include_router(router, prefix=OPERATOR_API_PREFIX, dependencies=[Security(authorize_operator)])

    assert find_unguarded_operator_routes(app) == []


def test_openapi_documents_api_key_scheme(app):
    schema = app.openapi()

    scheme = schema["components"]["securitySchemes"]["ApiKey"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"


def test_openapi_operator_operations_name_role(app):
    paths = app.openapi()["paths"]

    for (method, path), role in OPERATOR_ROUTE_ROLES.items():
        operation = paths[path][method.lower()]
        assert operation["security"] == [{"ApiKey": []}], f"{method} {path}"
        assert operation[REQUIRED_ROLE_EXTENSION] == role.value, f"{method} {path}"
        assert f"Required role: `{role.value}`." in operation["description"], f"{method} {path}"


def test_openapi_device_operations_have_no_api_key(app):
    paths = app.openapi()["paths"]

    for path, operations in paths.items():
        if path.startswith("/device/v1/"):
            for method, operation in operations.items():
                assert "security" not in operation, f"{method} {path}"


def test_roles_include_lower_roles():
    assert Role.ADMIN.includes(Role.DEPLOYER)
    assert Role.ADMIN.includes(Role.READ_ONLY)
    assert Role.DEPLOYER.includes(Role.READ_ONLY)
    assert not Role.DEPLOYER.includes(Role.ADMIN)
    assert not Role.READ_ONLY.includes(Role.DEPLOYER)


def test_get_routes_role_read_only():
    for (method, path), role in OPERATOR_ROUTE_ROLES.items():
        # Lists of credentials and secret names are not for read-only keys.
        if method == "GET" and not path.startswith(("/api/v1/api-keys", "/api/v1/enrolment-keys", "/api/v1/secrets")):
            assert role == Role.READ_ONLY, f"{method} {path}"
