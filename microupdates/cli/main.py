"""The `microupdates` operator command line; it talks to the REST API only, except `demo`.

Command groups: `devices`, `updates`, `deployments`, `secrets`, `api-keys`, plus `deploy` and `demo`.
The server address and API key come from `--server`, the environment or the
config file (see `microupdates.cli.config`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from microupdates.cli.api_client import OperatorApiError
from microupdates.cli.commands import api_keys, deployments, devices, secrets, updates
from microupdates.cli.commands.aliases import register_aliases
from microupdates.cli.commands.deploy import deploy
from microupdates.cli.connection import api_key_option, ca_file_option
from microupdates.cli.demo import BROKEN_RECIPE, EXAMPLE_RECIPE, run_demo
from microupdates.recipe_files import RecipeError

# Tracebacks of unexpected errors leave out local variables, which may include the API key.
app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)
console = Console()
# Rich assumes 80 columns when stdout is not a terminal, which squeezes the demo's result tables.
PIPED_DEMO_WIDTH = 160


def demo_console() -> Console:
    return console if console.is_terminal else Console(width=PIPED_DEMO_WIDTH)

app.add_typer(devices.app, name="devices")
app.add_typer(updates.app, name="updates")
app.add_typer(deployments.app, name="deployments")
app.add_typer(api_keys.app, name="api-keys")
app.add_typer(secrets.app, name="secrets")
app.command("deploy")(deploy)
register_aliases(app)


@app.callback()
def configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each HTTP request to stderr.")] = False,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            help="Operator API key (muk_...). Default: $MICROUPDATES_API_KEY, then `api_key` in the config file. "
            "Other users on this machine can read command lines, so prefer those two.",
            show_default=False,
        ),
    ] = None,
    ca_file: Annotated[Optional[Path], typer.Option(
        "--ca-file",
        help="CA bundle (PEM) that verifies an https server's certificate. Default: $MICROUPDATES_CA_FILE, "
        "then `ca_file` in the config file, then the system's CAs.",
        show_default=False,
    )] = None,
) -> None:
    """Ship application updates to fleets of Linux edge devices.

    The API address comes from --server, then $MICROUPDATES_SERVER, then
    `server:` in ~/.config/microupdates/config.yaml (or $MICROUPDATES_CONFIG),
    then http://127.0.0.1:8080. The API key comes from --api-key (before the
    command, as in `microupdates --api-key KEY devices list`), then
    $MICROUPDATES_API_KEY, then `api_key:` in the same file.
    """

    api_key_option.set(api_key)
    ca_file_option.set(str(ca_file) if ca_file else None)

    if verbose:
        logging.basicConfig(level="DEBUG", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # httpcore logs every socket step at DEBUG; httpx's one line per request is enough.
        logging.getLogger("httpcore").setLevel("INFO")


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Directory for the demo's stack and devices; new, empty, or made by an earlier demo (emptied first).")] = Path(
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
            data_dir.resolve(), recipe, broken_recipe if show_rollback else None, keep_running, demo_console()
        )
    except (OperatorApiError, RecipeError, TimeoutError, RuntimeError) as error:
        console.print(f"[red]Demo failed:[/red] {error}")
        raise typer.Exit(1) from error
    raise typer.Exit(0 if succeeded else 1)
