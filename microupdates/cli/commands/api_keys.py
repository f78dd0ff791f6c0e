"""`microupdates api-keys`: create, list and revoke operator API keys (admin role)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from microupdates.cli.connection import operator_api
from microupdates.cli.options import JsonOption, ServerOption
from microupdates.cli.output import echo_json_document, format_timestamp, make_console
from microupdates.cli.tables import new_table
from microupdates.roles import Role

app = typer.Typer(help="Create, list and revoke operator API keys; needs an admin key.", no_args_is_help=True)


@app.command("create")
def create_api_key(
    name: Annotated[str, typer.Option("--name", help="Label of the key's holder: 1-63 lower-case letters, digits, '.', '_' or '-'.")],
    role: Annotated[
        Role,
        typer.Option("--role", help="read-only: GET endpoints; deployer: also updates, deployments and aborts; "
                     "admin: also devices, enrolment keys and API keys."),
    ],
    server: ServerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the key and its details as JSON.")] = False,
) -> None:
    """Create an API key and print it, which the API does only this once."""

    with operator_api(server) as api:
        created = api.create_api_key(name, role.value)

    if as_json:
        echo_json_document(created)
        return
    # The note goes to stderr, so that `KEY=$(microupdates api-keys create ...)` captures the key alone.
    typer.echo(f"Created API key {created['id']} ({created['name']}, role {created['role']}). "
               "The key follows; the API shows it only this once:", err=True)
    typer.echo(created["key"])


@app.command("list")
def list_api_keys(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """List API keys with their role, creation, last use and revocation; never the keys themselves."""

    with operator_api(server) as api:
        keys = api.list_api_keys()

    if as_json:
        echo_json_document(keys)
        return
    console = make_console()
    if not keys:
        console.print("No API keys exist.")
        return
    console.print(api_keys_table(keys))


@app.command("revoke")
def revoke_api_key(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id, as `api-keys list` shows it.")],
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke an API key; requests with it fail with HTTP 401 from then on."""

    with operator_api(server) as api:
        revoked = api.revoke_api_key(key_id)

    if as_json:
        echo_json_document(revoked)
        return
    make_console().print(f"Revoked API key {revoked['id']} ({revoked['name']}).")


def api_keys_table(keys: list[dict[str, Any]]) -> Table:
    table = new_table("id", "name", "role", "created", "last used", "revoked")
    for key in keys:
        table.add_row(
            key["id"],
            key["name"],
            key["role"],
            format_timestamp(key["created_at"]),
            format_timestamp(key["last_used_at"]) or "never",
            format_timestamp(key["revoked_at"]),
        )
    return table
