"""`microupdates secrets`: set, list and delete the secrets that recipes reference as ${secret:NAME}."""

from __future__ import annotations

import sys

import typer

from microupdates.cli.connection import operator_api
from microupdates.cli.options import JsonOption, ServerOption
from microupdates.cli.output import echo_json_document, fail, make_console

app = typer.Typer(help="Set, list and delete secrets for recipes.", no_args_is_help=True)


@app.command("set")
def set_secret(name: str, server: ServerOption = None) -> None:
    """Create or replace secret NAME with the value read from standard input (one trailing newline is dropped).

    Reading the value from standard input keeps it out of the shell history
    and the process list: `microupdates secrets set DB_PASSWORD < password.txt`.
    """

    value = sys.stdin.read()
    if value.endswith("\n"):
        value = value[:-1]
    if not value:
        fail(f"No value for secret {name}: pipe it on standard input, for example `... secrets set {name} < FILE`.")
    with operator_api(server) as api:
        api.set_secret(name, value)
    make_console().print(f"Secret {name} set.")


@app.command("list")
def list_secrets(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """List secret names with their dates; values are never shown."""

    with operator_api(server) as api:
        secrets = api.list_secrets()
    if as_json:
        echo_json_document(secrets)
        return
    if not secrets:
        make_console().print("No secrets are set.")
        return
    for secret in secrets:
        typer.echo(f"{secret['name']}\tupdated {secret['updated_at']}")


@app.command("delete")
def delete_secret(name: str, server: ServerOption = None) -> None:
    """Delete a secret; a stage that still references it fails on the device, naming it."""

    with operator_api(server) as api:
        api.delete_secret(name)
    make_console().print(f"Secret {name} deleted.")
