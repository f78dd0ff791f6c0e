"""`microupdates secrets`: values go in on standard input and never come back out."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from microupdates.cli.main import app
from tests.cli.conftest import isolated_environment


def run_with_input(stack, config_home, stdin: str, *args: str):
    environment = isolated_environment(
        config_home, MICROUPDATES_SERVER=stack.api_url, MICROUPDATES_API_KEY=stack.admin_api_key
    )
    return CliRunner().invoke(app, list(args), input=stdin, env=environment, catch_exceptions=False)


def test_secrets_set_list_delete(cli, stack, config_home, unique_name):
    name = f"CLI_SECRET_{unique_name}"

    stored = run_with_input(stack, config_home, "cli-value\n", "secrets", "set", name)
    listed = cli("secrets", "list", "--json")
    deleted = cli("secrets", "delete", name)
    after = cli("secrets", "list", "--json")

    assert stored.exit_code == 0, stored.output
    assert listed.exit_code == 0, listed.output
    assert name in [row["name"] for row in json.loads(listed.stdout)]
    assert "cli-value" not in listed.stdout
    assert deleted.exit_code == 0, deleted.output
    assert name not in [row["name"] for row in json.loads(after.stdout)]


def test_secrets_set_without_value_fails(stack, config_home, unique_name):
    result = run_with_input(stack, config_home, "", "secrets", "set", f"EMPTY_{unique_name}")

    assert result.exit_code == 1
    assert f"No value for secret EMPTY_{unique_name}" in result.output
