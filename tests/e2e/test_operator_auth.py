"""Operator API keys against the running API: roles on every endpoint, creation, listing, revocation, storage."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import text

from microupdates.api.auth import OPERATOR_ROUTE_ROLES
from microupdates.cli.api_client import OperatorApiClient, OperatorApiError
from microupdates.cli.stack import Stack
from microupdates.db.session import Database
from microupdates.roles import Role
from microupdates.settings import ServerSettings
from tests.stack_helpers import operator_headers

KEY_COMMAND_TIMEOUT_SECONDS = 60
CALLERS = [None, *Role]


@pytest.fixture(scope="module")
def role_keys(stack: Stack) -> dict[Role, str]:
    """One API key per role, created through the API with the stack's admin key."""

    with OperatorApiClient(stack.api_url, stack.admin_api_key) as admin:
        return {role: admin.create_api_key(f"test-{role.value}", role.value)["key"] for role in Role}


@pytest.fixture
def stack_database(stack: Stack) -> Iterator[Database]:
    settings = ServerSettings(data_dir=stack.data_dir, database_url=stack.database_url)
    database = Database(settings.resolved_database_url())
    yield database
    database.dispose()


def fill_path(path: str) -> str:
    """Replace each path parameter with an id that does not exist."""

    return re.sub(r"\{(\w+)\}", lambda match: f"no-such-{match.group(1).replace('_', '-')}", path)


def call(stack: Stack, method: str, path: str, key: str | None) -> httpx.Response:
    headers = operator_headers(stack, key) if key else {}
    body = {} if method in ("POST", "PATCH") else None
    return httpx.request(method, stack.api_url + fill_path(path), json=body, headers=headers, timeout=30)


@pytest.mark.parametrize("caller", CALLERS, ids=lambda caller: "no key" if caller is None else caller.value)
@pytest.mark.parametrize(("method", "path"), sorted(OPERATOR_ROUTE_ROLES), ids=lambda value: str(value))
def test_operator_endpoint_checks_role(stack, role_keys, method, path, caller):
    required = OPERATOR_ROUTE_ROLES[(method, path)]

    response = call(stack, method, path, None if caller is None else role_keys[caller])

    if caller is None:
        assert response.status_code == 401, response.text
        assert response.json()["detail"] == "Missing API key: send 'Authorization: Bearer <API key>'."
        assert response.headers["www-authenticate"] == "Bearer"
    elif not caller.includes(required):
        assert response.status_code == 403, response.text
        detail = response.json()["detail"]
        assert f"needs the {required.value} role" in detail
        assert f"has the {caller.value} role" in detail
    else:
        assert response.status_code not in (401, 403), response.text


def test_create_api_key_shows_key_once(api):
    created = api.create_api_key("shown-once", "deployer")

    assert created["key"].startswith("muk_")
    assert created["role"] == "deployer"
    assert created["revoked_at"] is None
    listed = api.list_api_keys()
    assert [key["id"] for key in listed].count(created["id"]) == 1
    assert created["key"] not in json.dumps(listed)
    assert all("key" not in key for key in listed)


def test_api_key_stored_as_hash(api, stack_database):
    created = api.create_api_key("hashed", "read-only")

    with stack_database.engine.connect() as connection:
        row = connection.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": created["id"]}).mappings().one()
    assert row["key_hash"] == hashlib.sha256(created["key"].encode()).hexdigest()
    assert created["key"] not in json.dumps({name: str(value) for name, value in row.items()})


def test_revoked_api_key_gets_401(stack, api):
    created = api.create_api_key("to-revoke", "admin")
    with OperatorApiClient(stack.api_url, created["key"]) as holder:
        holder.list_devices()

        revoked = api.revoke_api_key(created["id"])

        with pytest.raises(OperatorApiError) as raised:
            holder.list_devices()
    assert revoked["revoked_at"] is not None
    assert raised.value.status_code == 401
    assert f"API key {created['id']} (to-revoke) was revoked" in str(raised.value)
    listed = {key["id"]: key for key in api.list_api_keys()}
    assert listed[created["id"]]["revoked_at"] == revoked["revoked_at"]


def test_revoke_api_key_twice_changes_nothing(api):
    created = api.create_api_key("twice", "read-only")

    first = api.revoke_api_key(created["id"])
    second = api.revoke_api_key(created["id"])

    assert second["revoked_at"] == first["revoked_at"]


def test_revoke_unknown_api_key_is_not_found(api):
    with pytest.raises(OperatorApiError) as raised:
        api.revoke_api_key("key-missing")

    assert raised.value.status_code == 404
    assert "API key 'key-missing' not found" in str(raised.value)


def test_api_key_use_sets_last_used(stack, api):
    created = api.create_api_key("used", "read-only")
    with OperatorApiClient(stack.api_url, created["key"]) as holder:
        holder.list_updates(limit=1)

    listed = {key["id"]: key for key in api.list_api_keys()}

    assert listed[created["id"]]["last_used_at"] is not None


def test_unknown_api_key_gets_401(stack):
    response = httpx.get(f"{stack.api_url}/api/v1/devices", headers=operator_headers(stack, "muk_not-a-real-key"))

    assert response.status_code == 401
    assert response.json()["detail"].startswith("The API key is not valid;")


def test_device_token_as_api_key_gets_401(stack, api, unique_name):
    token = api.register_device(f"token-{unique_name}", groups=[])["token"]

    response = httpx.get(f"{stack.api_url}/api/v1/devices", headers=operator_headers(stack, token))

    assert response.status_code == 401
    assert response.json()["detail"] == "This is a device token; operator endpoints need an API key (muk_...)."


def test_api_key_name_is_validated(api):
    with pytest.raises(OperatorApiError) as raised:
        api.create_api_key("Not Valid", "admin")

    assert raised.value.status_code == 422
    assert "'Not Valid' is not a valid name" in str(raised.value)


def test_api_key_role_is_validated(api):
    with pytest.raises(OperatorApiError) as raised:
        api.create_api_key("wrong-role", "root")

    assert raised.value.status_code == 422
    assert "role" in str(raised.value)


def test_server_command_key_authenticates(stack):
    environment = stack.server_env()
    command = [sys.executable, "-m", "microupdates.api.main", "api-keys"]

    created = subprocess.run([*command, "create", "--name", "bootstrap", "--role", "deployer"], env=environment,
                             capture_output=True, text=True, timeout=KEY_COMMAND_TIMEOUT_SECONDS, check=True)
    key = created.stdout.strip()
    listed = subprocess.run([*command, "list"], env=environment, capture_output=True, text=True,
                            timeout=KEY_COMMAND_TIMEOUT_SECONDS, check=True)

    assert key.startswith("muk_")
    assert "shown only once" in created.stderr
    assert key not in listed.stdout
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    [entry] = [entry for entry in entries if entry["name"] == "bootstrap"]
    assert entry["role"] == "deployer"
    with OperatorApiClient(stack.api_url, key) as holder:
        assert isinstance(holder.list_deployments(limit=1), list)

    revoked = subprocess.run([*command, "revoke", entry["id"]], env=environment, capture_output=True, text=True,
                             timeout=KEY_COMMAND_TIMEOUT_SECONDS, check=True)

    assert json.loads(revoked.stdout)["revoked_at"] is not None
    response = httpx.get(f"{stack.api_url}/api/v1/deployments", headers=operator_headers(stack, key))
    assert response.status_code == 401


def test_stack_writes_cli_config_with_admin_key(stack):
    config = stack.cli_config_path

    assert config.stat().st_mode & 0o777 == 0o600
    assert f"api_key: {stack.admin_api_key}" in config.read_text()
    assert f"server: {stack.api_url}" in config.read_text()
    response = httpx.get(f"{stack.api_url}/api/v1/api-keys", headers=operator_headers(stack))
    assert response.status_code == 200


def test_stack_reuses_working_admin_key(stack):
    assert stack._ensure_admin_key() == stack.admin_api_key
