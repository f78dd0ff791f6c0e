"""Consoles, error messages and value formatting shared by the CLI commands.

Consoles are made per command because tests swap sys.stdout between
invocations, and a console's width and colour depend on where it writes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime, timezone
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

EXIT_ERROR = 1

# Rich wraps at 80 columns when it cannot ask a terminal and COLUMNS is unset; wider tables read better in logs.
PIPE_WIDTH = 160

STATUS_STYLES = {
    "pending": "dim",
    "in_progress": "cyan",
    "succeeded": "green",
    "failed": "red",
    "failed_to_start": "red",
    "rolled_back": "yellow",
    "rollback_failed": "bold red",
    "aborted": "magenta",
    "timed_out": "red",
    "stopped": "red",
    # States of a rollout phase.
    "running": "cyan",
    "soaking": "cyan",
    "blocked": "yellow",
    "passed": "green",
    "promoted": "green",
    "skipped": "blue",
}


# C0 controls except tab and newline, DEL and the C1 controls: a device's output
# could otherwise move the cursor, retitle the window or write the clipboard.
TERMINAL_CONTROL_PATTERN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_device_text(text: str) -> str:
    """Return device-supplied text with terminal control characters shown as \\xNN escapes."""

    return TERMINAL_CONTROL_PATTERN.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def make_console(plain: bool = False) -> Console:
    """Return a console on stdout; `plain` turns off colour and highlighting, as does a pipe."""

    terminal = stdout_is_terminal()
    if terminal and not plain:
        return Console(highlight=False)
    width = None if terminal or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(color_system=None, highlight=False, width=width)


def make_error_console() -> Console:
    return Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    """Print a message in red on stderr, without wrapping it at the console width."""

    make_error_console().print(Text(f"Error: {message}", style="red"), soft_wrap=True)


def print_warning(message: str) -> None:
    make_error_console().print(Text(f"Warning: {message}", style="yellow"), soft_wrap=True)


def fail(message: str, exit_code: int = EXIT_ERROR) -> NoReturn:
    print_error(message)
    raise typer.Exit(exit_code)


def echo_json(value: Any) -> None:
    """Write one JSON document on one line of stdout."""

    typer.echo(json.dumps(value, default=str))


def echo_json_document(value: Any) -> None:
    """Write a JSON document indented over several lines, for `--json` on show and list commands."""

    typer.echo(json.dumps(value, default=str, indent=2))


def styled_status(status: str | None) -> Text:
    if not status:
        return Text("")
    return Text(status, style=STATUS_STYLES.get(status, ""))


def format_timestamp(value: str | None) -> str:
    """Return an API timestamp as local time to the second, or '' for None."""

    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if moment.tzinfo is None:
        # The API stores UTC; SQLite drops the offset.
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def format_seconds(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.1f}"


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        started = datetime.fromisoformat(start.replace("Z", "+00:00"))
        finished = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    if (started.tzinfo is None) != (finished.tzinfo is None):
        return None
    return (finished - started).total_seconds()


def describe_device_error(row: dict[str, Any]) -> str:
    """Return a device's error with its rollback error and its retried stages, if any, as one line."""

    error = row.get("error") or ""
    rollback_error = row.get("rollback_error")
    if rollback_error:
        error = f"{error}; rollback failed: {rollback_error}" if error else f"rollback failed: {rollback_error}"
    # The failed stage's error already ends with "(after N attempts)".
    retried = {stage: count for stage, count in (row.get("stage_attempts") or {}).items() if stage != row.get("stage")}
    attempts = describe_stage_attempts(retried)
    if attempts:
        error = f"{error} ({attempts})" if error else attempts
    return escape_device_text(" ".join(error.split()))


def describe_stage_attempts(stage_attempts: dict[str, int]) -> str:
    """Return `files: 2 attempts` for the stages that ran more than once, or ''."""

    return ", ".join(f"{stage}: {count} attempts" for stage, count in stage_attempts.items())
