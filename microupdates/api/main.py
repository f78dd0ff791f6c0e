"""The API process: serves the operator and device APIs with uvicorn, or manages API keys in the database.

`microupdates-api` without arguments serves. `microupdates-api api-keys
create|list|revoke` works on the application database directly, with the
same MICROUPDATES_* settings as the server, so the first admin key can be
created before any key exists.
"""

from __future__ import annotations

import argparse
import json
import sys

import uvicorn
from pydantic import ValidationError

from microupdates.api.app import create_app
from microupdates.api.job_signing import SigningKeyError
from microupdates.api.routes.api_keys import to_public
from microupdates.api.schemas import check_label
from microupdates.db import api_keys as api_key_store
from microupdates.db.models import ApiKey
from microupdates.db.session import Database
from microupdates.errors import MicroupdatesError
from microupdates.logs import configure_logging
from microupdates.roles import Role
from microupdates.settings import ServerSettings


def main(argv: list[str] | None = None) -> None:
    arguments = build_parser().parse_args(argv)
    try:
        settings = ServerSettings()
    except ValidationError as error:
        sys.exit(f"microupdates-api: invalid settings: {error}")
    if arguments.command is None:
        serve(settings)
        return
    try:
        arguments.run(settings, arguments)
    except MicroupdatesError as error:
        sys.exit(f"microupdates-api: {error}")


def serve(settings: ServerSettings) -> None:
    configure_logging(settings.log_format)
    try:
        app = create_app(settings)
    except SigningKeyError as error:
        sys.exit(f"microupdates-api: {error}")
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        # HTTPS when both are set; ServerSettings rejects one without the other.
        ssl_certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
        ssl_keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
        log_level="warning",
        timeout_keep_alive=75,
        # Long polls would otherwise hold a shutdown for up to a minute.
        timeout_graceful_shutdown=5,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microupdates-api",
        description="Serve the microupdates API (without arguments), or manage operator API keys in the "
        "application database named by MICROUPDATES_DATABASE_URL (default: DATA_DIR/microupdates.db).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    keys = commands.add_parser("api-keys", help="create, list or revoke operator API keys")
    key_commands = keys.add_subparsers(dest="key_command", metavar="ACTION", required=True)

    create = key_commands.add_parser(
        "create", help="create a key and print it on stdout; it is shown only this once"
    )
    create.add_argument("--name", required=True, type=key_name,
                        help="label of the key's holder, such as `admin` or `ci`: 1-63 lower-case letters, digits, '.', '_' or '-'")
    create.add_argument("--role", required=True, choices=[role.value for role in Role], help="the key's role")
    create.set_defaults(run=create_key)

    listing = key_commands.add_parser("list", help="list keys as JSON, one object per line; never the keys")
    listing.set_defaults(run=list_keys)

    revoke = key_commands.add_parser("revoke", help="revoke a key at once, even the last admin key")
    revoke.add_argument("key_id", metavar="ID", help="the key's id, as `list` prints it")
    revoke.set_defaults(run=revoke_key)
    return parser


def key_name(value: str) -> str:
    try:
        return check_label(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def open_database(settings: ServerSettings) -> Database:
    database = Database(settings.resolved_database_url())
    database.create_schema()
    return database


def create_key(settings: ServerSettings, arguments: argparse.Namespace) -> None:
    database = open_database(settings)
    try:
        with database.session() as session:
            row, key = api_key_store.create_api_key(session, arguments.name, Role(arguments.role))
    finally:
        database.dispose()
    print(f"Created API key {row.id} ({row.name}, role {row.role}); the key follows and is shown only once.",
          file=sys.stderr)
    print(key)


def list_keys(settings: ServerSettings, _arguments: argparse.Namespace) -> None:
    database = open_database(settings)
    try:
        with database.session() as session:
            rows = [describe_key(row) for row in api_key_store.list_api_keys(session)]
    finally:
        database.dispose()
    for row in rows:
        print(json.dumps(row))


def revoke_key(settings: ServerSettings, arguments: argparse.Namespace) -> None:
    database = open_database(settings)
    try:
        with database.session() as session:
            row = api_key_store.revoke_api_key(session, arguments.key_id, keep_an_admin=False)
            description = describe_key(row)
    finally:
        database.dispose()
    print(json.dumps(description))


def describe_key(row: ApiKey) -> dict[str, str | None]:
    return to_public(row).model_dump(mode="json")


if __name__ == "__main__":
    main()
