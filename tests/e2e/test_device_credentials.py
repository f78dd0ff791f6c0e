"""Device tokens (revoke, issue, rotate) and enrolment keys (limits, expiry, revocation) against the running API."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from microupdates.device_agent.client import CredentialsRejectedError, DeviceApiClient
from microupdates.device_agent.config import AgentConfig
from microupdates.device_agent.credentials import DeviceCredentials


def check_in(stack, token: str) -> httpx.Response:
    return httpx.post(f"{stack.api_url}/device/v1/check-in", json={"agent_version": "test", "wait_seconds": 0},
                      headers={"Authorization": f"Bearer {token}"})


def enrol(stack, key: str, name: str, tags: list[str] | None = None) -> httpx.Response:
    return httpx.post(f"{stack.api_url}/device/v1/enrol",
                      json={"enrolment_key": key, "device_name": name, "tags": tags or []})


def test_revoked_token_gets_same_401_as_unknown(api, stack, unique_name):
    name = f"revoked-{unique_name}"
    token = api.register_device(name, groups=[name])["token"]
    assert check_in(stack, token).status_code == 200

    shown = api.revoke_device_token(name)
    revoked = check_in(stack, token)
    unknown = check_in(stack, "mu_" + "x" * 43)

    assert shown["token_revoked_at"] is not None
    assert revoked.status_code == 401
    assert revoked.json() == unknown.json()
    assert unknown.status_code == 401


def test_issued_token_replaces_the_old_one(api, stack, unique_name):
    name = f"reissued-{unique_name}"
    old = api.register_device(name, groups=[name])["token"]
    api.revoke_device_token(name)

    new = api.issue_device_token(name)["token"]

    assert check_in(stack, new).status_code == 200
    assert check_in(stack, old).status_code == 401
    assert api.read_device(name)["token_revoked_at"] is None


def test_rotated_token_keeps_old_one_until_first_use(api, stack, unique_name):
    name = f"rotated-{unique_name}"
    old = api.register_device(name, groups=[name])["token"]
    headers = {"Authorization": f"Bearer {old}"}

    first = httpx.post(f"{stack.api_url}/device/v1/token/rotate", headers=headers).json()["device_token"]
    # A lost response: the device asks again, and the first new token is dropped.
    second = httpx.post(f"{stack.api_url}/device/v1/token/rotate", headers=headers).json()["device_token"]

    assert check_in(stack, old).status_code == 200
    assert check_in(stack, first).status_code == 401
    assert check_in(stack, second).status_code == 200
    assert check_in(stack, old).status_code == 401
    assert check_in(stack, second).status_code == 200


def test_agent_rotates_and_saves_its_token(api, stack, tmp_path, unique_name):
    name = f"agent-rotates-{unique_name}"
    old = api.register_device(name, groups=[name])["token"]
    config = AgentConfig(server_url=stack.api_url, device_token=old, state_dir=tmp_path, token_rotation_seconds=1)
    client = DeviceApiClient(stack.api_url)
    try:
        credentials = DeviceCredentials(config, client)
        credentials.load()
        time.sleep(1.1)

        credentials.rotate_if_due()
        client.check_in("test", 0)
        saved = json.loads(config.credentials_path().read_text())
    finally:
        client.close()

    assert saved["device_token"] != old
    assert saved["device_token"] == client.device_token
    assert (config.credentials_path().stat().st_mode & 0o777) == 0o600
    assert check_in(stack, old).status_code == 401
    assert check_in(stack, saved["device_token"]).status_code == 200


def test_agent_falls_back_to_configured_token_when_saved_one_is_rejected(api, stack, tmp_path, unique_name):
    name = f"fallback-{unique_name}"
    stale = api.register_device(name, groups=[name])["token"]
    issued = api.issue_device_token(name)["token"]
    config = AgentConfig(server_url=stack.api_url, device_token=issued, state_dir=tmp_path, token_rotation_seconds=0)
    config.save_token(name, stale)
    client = DeviceApiClient(stack.api_url)
    try:
        credentials = DeviceCredentials(config, client)
        credentials.load()
        with pytest.raises(CredentialsRejectedError):
            client.check_in("test", 0)

        switched = credentials.fall_back_after_rejection()
        client.check_in("test", 0)
        again = credentials.fall_back_after_rejection()
    finally:
        client.close()

    assert switched is True
    assert again is False
    assert json.loads(config.credentials_path().read_text())["device_token"] == issued


def test_enrolment_key_puts_device_in_group_with_tags(api, stack, unique_name):
    group = f"enrolled-{unique_name}"
    key = api.create_enrolment_key(group, tags=["site-a"])

    response = enrol(stack, key["key"], f"gw-{unique_name}", tags=["own"])

    assert response.status_code == 201
    device = api.read_device(f"gw-{unique_name}")
    assert device["groups"] == [group]
    assert device["tags"] == ["own", "site-a"]


def test_enrolment_key_used_up_is_forbidden(api, stack, unique_name):
    key = api.create_enrolment_key(f"limited-{unique_name}", max_uses=2)

    first = enrol(stack, key["key"], f"one-{unique_name}")
    clash = enrol(stack, key["key"], f"one-{unique_name}")
    second = enrol(stack, key["key"], f"two-{unique_name}")
    third = enrol(stack, key["key"], f"three-{unique_name}")

    assert first.status_code == 201
    assert clash.status_code == 409
    assert second.status_code == 201
    assert third.status_code == 403
    assert third.json()["detail"] == (
        "The enrolment key has been used 2 of 2 times; ask the operator for a new key."
    )
    listed = [row for row in api.list_enrolment_keys() if row["id"] == key["id"]]
    assert listed[0]["use_count"] == 2
    assert "key" not in listed[0]


def test_enrolment_key_expired_is_forbidden(api, stack, unique_name):
    key = api.create_enrolment_key(f"expiring-{unique_name}", expires_in_seconds=1)
    time.sleep(1.2)

    response = enrol(stack, key["key"], f"late-{unique_name}")

    assert response.status_code == 403
    expires_at = key["expires_at"].replace("Z", "+00:00")
    assert response.json()["detail"].startswith(f"The enrolment key expired at {expires_at[:19]}")


def test_enrolment_key_revoked_is_forbidden(api, stack, unique_name):
    key = api.create_enrolment_key(f"revoked-key-{unique_name}")
    revoked = api.revoke_enrolment_key(key["id"])

    response = enrol(stack, key["key"], f"refused-{unique_name}")

    assert revoked["revoked_at"] is not None
    assert response.status_code == 403
    assert response.json()["detail"].startswith("The enrolment key was revoked at ")


def test_unknown_enrolment_key_is_unauthorized(stack, unique_name):
    response = enrol(stack, "mu_unknown", f"stranger-{unique_name}")

    assert response.status_code == 401
    assert response.json()["detail"] == "The enrolment key is not valid; ask the operator for a new key."
