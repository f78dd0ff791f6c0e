"""Hidden top-level spellings from earlier versions of the CLI, kept so existing scripts keep working."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from microupdates.cli.commands import deployments, updates
from microupdates.cli.options import ServerOption


def register_aliases(app: typer.Typer) -> None:
    app.command("validate", hidden=True)(validate)
    app.command("create-update", hidden=True)(create_update)
    app.command("show", hidden=True)(show)


def validate(recipe: Path) -> None:
    """Same as `updates validate`."""

    updates.validate_recipe(recipe)


def create_update(recipe: Path, server: ServerOption = None) -> None:
    """Same as `updates create`."""

    updates.create_update(recipe, server=server, as_json=False)


def show(
    deployment: str,
    device: Annotated[Optional[str], typer.Option("--device", help="Show this device's stage results.")] = None,
    server: ServerOption = None,
) -> None:
    """Same as `deployments show`, or `deployments device` with --device."""

    if device is None:
        deployments.show_deployment(deployment, server=server, as_json=False)
    else:
        deployments.show_device_result(deployment, device, server=server, output=True, as_json=False)
