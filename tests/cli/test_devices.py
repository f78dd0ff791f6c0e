"""`microupdates devices` against a real API."""

from __future__ import annotations

import json
import re

import httpx

from microupdates.device_agent.client import DeviceApiClient
from microupdates.protocol.device_api import DeviceFacts


def test_devices_register_prints_token_once(cli, api, unique_name):
    name = f"reg-{unique_name}"

    result = cli("devices", "register", name, "--group", f"g1-{unique_name}", "--group", f"g2-{unique_name}",
                 "--tag", "edge")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"Registered device {name}. Its token follows; the API shows it only this once:"
    token = lines[1]
    assert len(token) >= 40
    assert result.stdout.count(token) == 1
    stored = api.read_device(name)
    assert stored["groups"] == [f"g1-{unique_name}", f"g2-{unique_name}"]
    assert stored["tags"] == ["edge"]


def test_devices_register_json_gives_id_and_token(cli, unique_name):
    name = f"regjson-{unique_name}"

    result = cli("devices", "register", name, "--json")

    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["id"] == name
    assert body["token"]


def test_devices_list_and_show(cli, api, unique_name):
    name = f"list-{unique_name}"
    api.register_device(name, groups=[f"lab-{unique_name}"], tags=["rack-1"])

    listed = cli("devices", "list")
    listed_json = cli("devices", "list", "--json")
    shown = cli("devices", "show", name)

    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if line.startswith(name + " "))
    assert f"lab-{unique_name}" in row
    assert "rack-1" in row
    assert "never" in row
    assert name in [device["id"] for device in json.loads(listed_json.stdout)]
    assert shown.exit_code == 0, shown.output
    assert f"lab-{unique_name}" in shown.stdout
    assert "rack-1" in shown.stdout


def test_devices_remove_then_show_is_not_found(cli, api, unique_name):
    name = f"gone-{unique_name}"
    api.register_device(name, groups=[])

    removed = cli("devices", "remove", name)
    shown = cli("devices", "show", name)

    assert removed.exit_code == 0, removed.output
    assert removed.stdout.strip() == f"Removed device {name}."
    assert shown.exit_code == 1
    assert shown.stdout == ""
    assert shown.stderr.strip() == f"Error: GET /devices/{name} failed with HTTP 404: Device '{name}' not found."


def test_devices_register_taken_name_is_one_sentence_error(cli, api, unique_name):
    name = f"twice-{unique_name}"
    api.register_device(name, groups=[])

    result = cli("devices", "register", name)

    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"A device named '{name}' already exists" in result.stderr
    assert "Traceback" not in result.output


def test_devices_register_invalid_name_names_the_field(cli):
    result = cli("devices", "register", "Not_Valid")

    assert result.exit_code == 1
    assert "HTTP 422: name: 'Not_Valid' is not a valid name" in result.stderr


def test_devices_set_replaces_groups_and_keeps_tags(cli, api, unique_name):
    name = f"relabel-{unique_name}"
    api.register_device(name, groups=["old-group"], tags=["keep-me"])

    result = cli("devices", "set", name, "--group", "new-a", "--group", "new-b", "--json")

    assert result.exit_code == 0, result.output
    shown = api.read_device(name)
    assert sorted(shown["groups"]) == ["new-a", "new-b"]
    assert shown["tags"] == ["keep-me"]


def test_devices_set_without_changes_fails(cli, unique_name):
    result = cli("devices", "set", f"nothing-{unique_name}")

    assert result.exit_code == 1
    assert "Nothing to change" in result.stderr


def test_devices_enrolment_key_lets_a_device_enrol(cli, stack, unique_name):
    result = cli("devices", "enrolment-key", "--group", f"fleet-{unique_name}", "--json")

    assert result.exit_code == 0, result.output
    key = json.loads(result.stdout)["key"]
    enrolled = httpx.post(f"{stack.api_url}/device/v1/enrol",
                          json={"enrolment_key": key, "device_name": f"enrolled-{unique_name}"})
    assert enrolled.status_code == 201
    assert enrolled.json()["groups"] == [f"fleet-{unique_name}"]


def test_devices_enrolment_key_limits_and_revoke(cli, stack, unique_name):
    created = cli("devices", "enrolment-key", "--group", f"batch-{unique_name}", "--tag", "rack-3",
                  "--max-uses", "1", "--expires-in", "3600", "--json")
    key = json.loads(created.stdout)
    first = httpx.post(f"{stack.api_url}/device/v1/enrol",
                       json={"enrolment_key": key["key"], "device_name": f"batch-a-{unique_name}"})
    second = httpx.post(f"{stack.api_url}/device/v1/enrol",
                        json={"enrolment_key": key["key"], "device_name": f"batch-b-{unique_name}"})
    listed = cli("devices", "enrolment-keys", "--json")
    revoked = cli("devices", "revoke-enrolment-key", str(key["id"]))

    assert created.exit_code == 0, created.output
    assert key["max_uses"] == 1
    assert key["tags"] == ["rack-3"]
    assert key["expires_at"] is not None
    assert first.status_code == 201
    assert second.status_code == 403
    assert second.json()["detail"].startswith("The enrolment key has been used 1 of 1 times")
    assert [row["use_count"] for row in json.loads(listed.stdout) if row["id"] == key["id"]] == [1]
    assert revoked.exit_code == 0, revoked.output


def test_devices_revoke_and_issue_token(cli, api, stack, unique_name):
    name = f"tokens-{unique_name}"
    old = api.register_device(name, groups=[name])["token"]

    revoked = cli("devices", "revoke-token", name)
    shown_revoked = cli("devices", "show", name)
    issued = cli("devices", "issue-token", name, "--json")
    new = json.loads(issued.stdout)["token"]

    def check_in(token: str) -> int:
        return httpx.post(f"{stack.api_url}/device/v1/check-in", json={"agent_version": "cli-test", "wait_seconds": 0},
                          headers={"Authorization": f"Bearer {token}"}).status_code

    assert revoked.exit_code == 0, revoked.output
    assert "revoked at" in shown_revoked.stdout
    assert issued.exit_code == 0, issued.output
    assert check_in(old) == 401
    assert check_in(new) == 200


def test_devices_show_lists_reported_facts(cli, api, stack, unique_name):
    name = f"facts-{unique_name}"
    token = api.register_device(name, groups=[name])["token"]
    before = cli("devices", "show", name)
    device_api = DeviceApiClient(stack.api_url, token)
    try:
        device_api.check_in("test", 0, DeviceFacts(package_managers=["apt", "python3"], python_version="3.9.2",
                                                   architecture="aarch64", os_id="raspbian"))
    finally:
        device_api.close()

    after = cli("devices", "show", name)

    assert before.exit_code == 0, before.output
    assert "not reported yet" in before.stdout
    assert after.exit_code == 0, after.output
    assert re.search(r"^package managers +apt, python3 *$", after.stdout, re.MULTILINE), after.stdout
    assert re.search(r"^python3 +3\.9\.2 *$", after.stdout, re.MULTILINE), after.stdout
    assert re.search(r"^architecture +aarch64 *$", after.stdout, re.MULTILINE), after.stdout
    assert re.search(r"^OS +raspbian *$", after.stdout, re.MULTILINE), after.stdout
    assert re.search(r"^free disk +unknown *$", after.stdout, re.MULTILINE), after.stdout
