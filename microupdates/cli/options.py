"""Options shared by several commands."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ServerOption = Annotated[
    Optional[str],
    typer.Option(
        "--server",
        help="Base URL of the microupdates API. Default: $MICROUPDATES_SERVER, then `server` in the config file, "
        "then http://127.0.0.1:8080.",
        show_default=False,
    ),
]

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

DEFAULT_WATCH_TIMEOUT_SECONDS = 3600.0

WatchTimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="Seconds to wait for the deployment to finish; exit code 1 after that."),
]

PlainOption = Annotated[
    bool,
    typer.Option("--plain", help="One line per event, without colour or live display; the default when stdout is not a terminal."),
]

WatchJsonOption = Annotated[
    bool, typer.Option("--json", help="One JSON object per event on its own line, then a JSON summary.")
]
