"""`microupdates api-keys` against the test stack, and the CLI's messages for a missing or weak key."""

from __future__ import annotations

import json

from tests.cli.conftest import invoke, isolated_environment


def test_api_keys_create_prints_only_key_on_stdout(cli):
    result = cli("api-keys", "create", "--name", "cli-created", "--role", "read-only")

    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith("muk_")
    assert len(result.stdout.strip().splitlines()) == 1
    assert "the API shows it only this once" in result.stderr


def test_api_keys_list_never_shows_keys(cli):
    key = cli("api-keys", "create", "--name", "cli-listed", "--role", "deployer").stdout.strip()

    table = cli("api-keys", "list")
    as_json = cli("api-keys", "list", "--json")

    assert table.exit_code == 0, table.output
    assert "cli-listed" in table.stdout
    assert key not in table.stdout
    assert key not in as_json.stdout
    listed = [entry for entry in json.loads(as_json.stdout) if entry["name"] == "cli-listed"]
    assert [entry["role"] for entry in listed] == ["deployer"]


def test_api_keys_revoke_stops_key(cli, stack, config_home):
    created = json.loads(cli("api-keys", "create", "--name", "cli-revoked", "--role", "admin", "--json").stdout)
    environment = isolated_environment(config_home, MICROUPDATES_SERVER=stack.api_url)
    before = invoke(["--api-key", created["key"], "devices", "list"], environment)

    revoked = cli("api-keys", "revoke", created["id"])
    after = invoke(["--api-key", created["key"], "devices", "list"], environment)

    assert before.exit_code == 0, before.output
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout.strip() == f"Revoked API key {created['id']} (cli-revoked)."
    assert after.exit_code == 1
    assert f"HTTP 401: API key {created['id']} (cli-revoked) was revoked" in after.stderr
    assert "(API key from --api-key)" in after.stderr


def test_missing_api_key_error_message(stack, config_home):
    result = invoke(["devices", "list"], isolated_environment(config_home, MICROUPDATES_SERVER=stack.api_url))

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: GET /devices failed with HTTP 401: Missing API key: send 'Authorization: Bearer <API key>'. "
        "Give an API key with --api-key, MICROUPDATES_API_KEY or `api_key:` in the config file."
    )


def test_read_only_key_cannot_register_device(cli, stack, config_home):
    key = cli("api-keys", "create", "--name", "cli-reader", "--role", "read-only").stdout.strip()
    environment = isolated_environment(config_home, MICROUPDATES_SERVER=stack.api_url, MICROUPDATES_API_KEY=key)

    result = invoke(["devices", "register", "reader-made-device"], environment)

    assert result.exit_code == 1
    assert "HTTP 403: POST /api/v1/devices needs the admin role" in result.stderr
    assert "has the read-only role" in result.stderr
