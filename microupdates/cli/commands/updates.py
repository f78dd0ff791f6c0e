"""`microupdates updates`: validate recipes, store them as updates, list and show updates, print the recipe schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from microupdates.cli.connection import fail_with_recipe_problems, operator_api
from microupdates.cli.options import JsonOption, ServerOption
from microupdates.cli.output import echo_json_document, make_console
from microupdates.cli.tables import update_details_table, updates_table
from microupdates.recipe_files import RecipeError, load_recipe_file
from microupdates.recipe_schema import render_recipe_schema

app = typer.Typer(help="Validate recipes and manage updates (stored recipes).", no_args_is_help=True)

RecipeArgument = Annotated[Path, typer.Argument(help="Recipe YAML file; `files[].source` paths are relative to it.")]


@app.command("validate")
def validate_recipe(recipe: RecipeArgument) -> None:
    """Check a recipe file and the files it names, without contacting the server.

    Each problem is printed as FILE:LINE: field: message. Exit code 1 when there is any.
    """

    try:
        loaded = load_recipe_file(recipe)
    except RecipeError as error:
        fail_with_recipe_problems(error)
    stages = ", ".join(loaded.recipe.stages())
    make_console().print(f"{recipe}: valid; version {loaded.recipe.version}; stages: {stages}", soft_wrap=True)


@app.command("create")
def create_update(recipe: RecipeArgument, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Validate a recipe, upload the files it names and store it as an update."""

    with operator_api(server) as api:
        update = api.create_update_from_file(recipe)

    if as_json:
        echo_json_document(update)
        return
    make_console().print(f"Created update {update['id']} (version {update['version']}) from {recipe}", soft_wrap=True)


@app.command("list")
def list_updates(
    server: ServerOption = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Number of updates to show, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List stored updates, newest first."""

    with operator_api(server) as api:
        updates = api.list_updates(limit)

    if as_json:
        echo_json_document(updates)
        return
    console = make_console()
    if not updates:
        console.print("No updates are stored.")
        return
    console.print(updates_table(updates))


@app.command("show")
def show_update(update: str, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Show one update and its stored recipe, as YAML."""

    with operator_api(server) as api:
        body = api.read_update(update)

    if as_json:
        echo_json_document(body)
        return
    console = make_console()
    console.print(update_details_table(body))
    console.print()
    typer.echo(yaml.safe_dump(body["recipe"], sort_keys=False, allow_unicode=True), nl=False)


@app.command("schema")
def print_schema() -> None:
    """Print the JSON Schema of a recipe, for editors and other tools; docs/recipe.schema.json contains a copy."""

    typer.echo(render_recipe_schema(), nl=False)
