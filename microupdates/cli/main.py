"""The `microupdates` operator command line; it talks to the REST API only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from microupdates.cli.api_client import OperatorApiClient, OperatorApiError
from microupdates.cli.demo import BROKEN_RECIPE, EXAMPLE_RECIPE, run_demo
from microupdates.recipe_files import RecipeError, load_recipe_file

app = typer.Typer(help="Ship application updates to fleets of Linux edge devices.", no_args_is_help=True)
console = Console()

ServerOption = Annotated[
    str, typer.Option("--server", envvar="MICROUPDATES_SERVER", help="Base URL of the microupdates API.")
]


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Directory for the demo's stack and devices; emptied first.")] = Path(
        "var/demo"
    ),
    recipe: Annotated[Path, typer.Option(help="Recipe to deploy.")] = EXAMPLE_RECIPE,
    broken_recipe: Annotated[
        Path, typer.Option(help="A failing release deployed next, to show the rollback.")
    ] = BROKEN_RECIPE,
    show_rollback: Annotated[bool, typer.Option(help="Deploy the broken release after the first one.")] = True,
    keep_running: Annotated[bool, typer.Option(help="Keep the stack running after the demo until Ctrl-C.")] = False,
) -> None:
    """Start the embedded stack and three local agents, deploy the example update, check the result."""

    logging.basicConfig(level="WARNING")
    try:
        succeeded = run_demo(
            data_dir.resolve(), recipe, broken_recipe if show_rollback else None, keep_running, console
        )
    except (OperatorApiError, RecipeError, TimeoutError, RuntimeError) as error:
        console.print(f"[red]Demo failed:[/red] {error}")
        raise typer.Exit(1) from error
    raise typer.Exit(0 if succeeded else 1)


@app.command()
def validate(recipe: Path) -> None:
    """Check a recipe file without contacting the server."""

    try:
        loaded = load_recipe_file(recipe)
    except RecipeError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from error
    console.print(f"{recipe}: valid; stages: {', '.join(loaded.recipe.stages())}")


@app.command("create-update")
def create_update(recipe: Path, server: ServerOption = "http://127.0.0.1:8080") -> None:
    """Upload a recipe's files and store it as an update."""

    with OperatorApiClient(server) as api:
        update = call(lambda: api.create_update_from_file(recipe))
    console.print(f"Created update {update['id']} (version {update['version']})")


@app.command()
def deploy(
    update_id: str,
    server: ServerOption = "http://127.0.0.1:8080",
    device: Annotated[Optional[list[str]], typer.Option(help="Target device; repeat for several.")] = None,
    group: Annotated[Optional[list[str]], typer.Option(help="Target group; repeat for several.")] = None,
) -> None:
    """Deploy an update to devices and groups (the recipe's targets when none are given)."""

    with OperatorApiClient(server) as api:
        created = call(lambda: api.deploy(update_id, devices=device, groups=group))
    console.print(f"Deployment {created['id']} started (workflow {created['workflow_id']})")


@app.command()
def deployments(server: ServerOption = "http://127.0.0.1:8080", limit: int = 20) -> None:
    """List recent deployments, newest first."""

    with OperatorApiClient(server) as api:
        rows = call(lambda: api.list_deployments(limit))
    for row in rows:
        counts = ", ".join(f"{status} {count}" for status, count in sorted(row["device_status_counts"].items()))
        console.print(f"{row['id']}  {row['status']:<12} update {row['update_version']:<10} {counts}")


@app.command()
def show(deployment_id: str, server: ServerOption = "http://127.0.0.1:8080", device: Optional[str] = None) -> None:
    """Show one deployment, or one device's stage results with --device."""

    with OperatorApiClient(server) as api:
        if device:
            body = call(lambda: api.read_device_result(deployment_id, device))
        else:
            body = call(lambda: api.read_deployment(deployment_id))
    console.print_json(json.dumps(body))


def call(function):
    try:
        return function()
    except (OperatorApiError, RecipeError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from error
