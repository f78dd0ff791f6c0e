"""`microupdates devices`: register, list, show, relabel and remove devices."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from microupdates.cli.connection import operator_api
from microupdates.cli.options import JsonOption, ServerOption
from microupdates.cli.output import echo_json_document, fail, make_console
from microupdates.cli.tables import device_details_table, devices_table

app = typer.Typer(help="Register, list, show, relabel and remove devices.", no_args_is_help=True)


@app.command("list")
def list_devices(
    server: ServerOption = None,
    limit: Annotated[
        Optional[int], typer.Option(min=1, help="Show at most this many devices, in name order. Default: all.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List registered devices with their groups, tags and last check-in."""

    with operator_api(server) as api:
        devices = []
        for device in api.iter_devices():
            if limit is not None and len(devices) >= limit:
                break
            devices.append(device)

    if as_json:
        echo_json_document(devices)
        return
    console = make_console()
    if not devices:
        console.print("No devices are registered.")
        return
    console.print(devices_table(devices))


@app.command("show")
def show_device(device: str, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Show one device."""

    with operator_api(server) as api:
        body = api.read_device(device)

    if as_json:
        echo_json_document(body)
        return
    make_console().print(device_details_table(body))


@app.command("register")
def register_device(
    name: Annotated[str, typer.Argument(help="Device name: 1-63 lower-case letters, digits, '.', '_' or '-'.")],
    group: Annotated[Optional[list[str]], typer.Option("--group", help="Group to add the device to; repeat for several.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", help="Tag to give the device; repeat for several.")] = None,
    server: ServerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the id and token as JSON.")] = False,
) -> None:
    """Register a device and print its token, which the API shows only this once."""

    with operator_api(server) as api:
        created = api.register_device(name, groups=group or [], tags=tag or [])

    if as_json:
        echo_json_document(created)
        return
    console = make_console()
    console.print(f"Registered device {created['id']}. Its token follows; the API shows it only this once:")
    typer.echo(created["token"])
    console.print(
        # With `=`, a token that starts with '-' is not read as another option.
        f"Start the device's agent with: microupdates-agent --server-url {api.server_url} --device-token=TOKEN",
        soft_wrap=True,
        style="dim",
    )


@app.command("set")
def set_device_labels(
    device: str,
    group: Annotated[
        Optional[list[str]], typer.Option("--group", help="The device's groups, replacing the current ones; repeat.")
    ] = None,
    tag: Annotated[
        Optional[list[str]], typer.Option("--tag", help="The device's tags, replacing the current ones; repeat.")
    ] = None,
    no_groups: Annotated[bool, typer.Option("--no-groups", help="Remove the device from every group.")] = False,
    no_tags: Annotated[bool, typer.Option("--no-tags", help="Remove every tag of the device.")] = False,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replace a device's groups or tags; a list not given stays as it is."""

    groups = [] if no_groups else group
    tags = [] if no_tags else tag
    if groups is None and tags is None:
        fail("Nothing to change: give --group, --tag, --no-groups or --no-tags.")

    with operator_api(server) as api:
        body = api.set_device_labels(device, groups=groups, tags=tags)

    if as_json:
        echo_json_document(body)
        return
    make_console().print(device_details_table(body))


@app.command("enrolment-key")
def create_enrolment_key(
    group: Annotated[str, typer.Option("--group", help="Group that devices enrolling with this key join.")],
    tags: Annotated[
        Optional[list[str]], typer.Option("--tag", help="Tag that devices enrolling with this key get; repeatable.")
    ] = None,
    max_uses: Annotated[
        Optional[int],
        typer.Option("--max-uses", min=1, help="How many devices may enrol with the key. Default: no limit."),
    ] = None,
    expires_in: Annotated[
        Optional[int],
        typer.Option("--expires-in", min=1, help="Seconds until the key expires. Default: never."),
    ] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a fleet enrolment key and print it, which the API does only this once."""

    with operator_api(server) as api:
        created = api.create_enrolment_key(group, tags or [], max_uses, expires_in)

    if as_json:
        echo_json_document(created)
        return
    console = make_console()
    limits = [f"at most {created['max_uses']} uses" if created["max_uses"] else "unlimited uses",
              f"expires {created['expires_at']}" if created["expires_at"] else "never expires"]
    console.print(f"Created enrolment key {created['id']} for group {created['group']} ({', '.join(limits)}). "
                  "It follows; the API shows it only this once:")
    typer.echo(created["key"])
    console.print(
        f"Enrol a device with: microupdates-agent --server-url {api.server_url} --enrolment-key=KEY --device-name NAME",
        soft_wrap=True,
        style="dim",
    )


@app.command("enrolment-keys")
def list_enrolment_keys(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """List enrolment keys with their group, limits and use count (never the keys themselves)."""

    with operator_api(server) as api:
        keys = api.list_enrolment_keys()
    if as_json:
        echo_json_document(keys)
        return
    for key in keys:
        state = "revoked" if key["revoked_at"] else "active"
        typer.echo(
            f"{key['id']}\t{key['group']}\t{state}\tused {key['use_count']} of {key['max_uses'] or 'unlimited'}"
            f"\texpires {key['expires_at'] or 'never'}"
        )


@app.command("revoke-enrolment-key")
def revoke_enrolment_key(key_id: int, server: ServerOption = None) -> None:
    """Stop an enrolment key from enrolling more devices; devices it enrolled keep working."""

    with operator_api(server) as api:
        api.revoke_enrolment_key(key_id)
    make_console().print(f"Revoked enrolment key {key_id}.")


@app.command("revoke-token")
def revoke_device_token(device: str, server: ServerOption = None) -> None:
    """Revoke a device's token; the device gets 401 until you issue it a new one."""

    with operator_api(server) as api:
        api.revoke_device_token(device)
    make_console().print(f"Revoked the token of device {device}.")


@app.command("issue-token")
def issue_device_token(device: str, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Give a device a new token and print it once; its previous token stops working at once."""

    with operator_api(server) as api:
        issued = api.issue_device_token(device)
    if as_json:
        echo_json_document(issued)
        return
    make_console().print(f"New token of device {device}; the API shows it only this once:")
    typer.echo(issued["token"])


@app.command("remove")
def remove_device(device: str, server: ServerOption = None) -> None:
    """Remove a device from the registry; its token stops working."""

    with operator_api(server) as api:
        api.remove_device(device)
    make_console().print(f"Removed device {device}.")
