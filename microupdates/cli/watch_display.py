"""Three ways to show a watched deployment: a live Rich display, plain lines, and JSON lines."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from microupdates.cli.output import (
    STATUS_STYLES,
    describe_device_error,
    echo_json,
    make_console,
    stdout_is_terminal,
    styled_status,
)
from microupdates.cli.tables import DEVICE_STATUS_ORDER, deployment_devices_table, format_status_counts
from microupdates.cli.watch import DeploymentEvent, DeviceEvent, Event, WatchReporter
from microupdates.workflows.contracts import DEVICE_IN_PROGRESS, DEVICE_PENDING, DEVICE_SUCCEEDED

# Statuses that get a bar even at zero, so the live display does not jump as the first devices move.
ALWAYS_SHOWN_STATUSES = (DEVICE_PENDING, DEVICE_IN_PROGRESS, DEVICE_SUCCEEDED)
MAX_RUNNING_DEVICES_SHOWN = 8
BAR_WIDTH = 40
LIVE_REFRESHES_PER_SECOND = 4


def describe_event(event: Event) -> str:
    """Return an event as one line: `<time> <device> <old status> -> <new status> [stage] [(error)]`.

    The error is shown once the device has reached a final status.
    """

    if isinstance(event, DeploymentEvent):
        return f"{event.time} deployment {event.deployment_id} {event.old_status} -> {event.status}"

    line = f"{event.time} {event.device_id} {event.old_status} -> {event.status}"
    if event.stage:
        line += f" {event.stage}"
    error = describe_device_error({"error": event.error, "rollback_error": event.rollback_error})
    if error and event.is_final:
        line += f" ({error})"
    return line


def describe_result(detail: dict[str, Any], timed_out: bool) -> str:
    counts = format_status_counts(detail["device_status_counts"]) or "no devices"
    state = f"still {detail['status']}" if timed_out else detail["status"]
    return f"Deployment {detail['id']} of update {detail['update_version']}: {state} ({counts})"


class PlainReporter:
    """One line of text per event, then the final table; no colour and no cursor movement."""

    def __init__(self) -> None:
        self.console = make_console(plain=True)

    def start(self, detail: dict[str, Any]) -> None:
        line = f"Watching deployment {detail['id']} of update {detail['update_version']}: {detail['status']}"
        # The count is 0 until the workflow has resolved the targets.
        if detail["device_count"]:
            counts = format_status_counts(detail["device_status_counts"])
            line += f", {detail['device_count']} devices ({counts})"
        typer.echo(line)

    def report(self, detail: dict[str, Any], events: list[Event]) -> None:
        for event in events:
            typer.echo(describe_event(event))

    def finish(self, detail: dict[str, Any], exit_code: int, timed_out: bool) -> None:
        self.console.print(deployment_devices_table(detail))
        self.console.print(describe_result(detail, timed_out), soft_wrap=True)

    def close(self) -> None:
        pass


class JsonReporter:
    """One JSON object per event on its own line, then a summary object with the exit code."""

    def start(self, detail: dict[str, Any]) -> None:
        pass

    def report(self, detail: dict[str, Any], events: list[Event]) -> None:
        for event in events:
            echo_json(event.to_json())

    def finish(self, detail: dict[str, Any], exit_code: int, timed_out: bool) -> None:
        echo_json(
            {
                "event": "summary",
                "deployment_id": detail["id"],
                "update_id": detail["update_id"],
                "update_version": detail["update_version"],
                "status": detail["status"],
                "timed_out": timed_out,
                "exit_code": exit_code,
                "device_count": detail["device_count"],
                "device_status_counts": detail["device_status_counts"],
                "devices": detail["devices"],
            }
        )

    def close(self) -> None:
        pass


class LiveReporter:
    """A Rich live display of a bar per device status and the running devices.

    Each device that reaches a final status is printed above the display as it
    finishes; the final table replaces the display at the end.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.monotonic()
        self.live: Live | None = None

    def start(self, detail: dict[str, Any]) -> None:
        self.live = Live(
            self.render(detail), console=self.console, refresh_per_second=LIVE_REFRESHES_PER_SECOND, transient=True
        )
        self.live.start()

    def report(self, detail: dict[str, Any], events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DeviceEvent) and event.is_final:
                self.console.print(self.render_finished_device(event))
        if self.live is not None:
            self.live.update(self.render(detail))

    def finish(self, detail: dict[str, Any], exit_code: int, timed_out: bool) -> None:
        self.close()
        self.console.print(deployment_devices_table(detail))
        style = "green" if exit_code == 0 else "red"
        self.console.print(Text(describe_result(detail, timed_out), style=style))

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def render_finished_device(self, event: DeviceEvent) -> Text:
        line = Text.assemble(f"{event.time[11:19]} ", (event.device_id, "bold"), " ", styled_status(event.status))
        if event.stage:
            line.append(f" {event.stage}")
        error = describe_device_error({"error": event.error, "rollback_error": event.rollback_error})
        if error:
            line.append(f" ({error})", style="red")
        return line

    def render(self, detail: dict[str, Any]) -> Group:
        elapsed = time.monotonic() - self.started
        header = Text.assemble(
            f"Deployment {detail['id']} of update {detail['update_version']}: ",
            styled_status(detail["status"]),
            f"  {elapsed:.0f} s",
        )
        return Group(header, self.render_status_bars(detail), self.render_running_devices(detail))

    def render_status_bars(self, detail: dict[str, Any]) -> Table:
        counts = detail["device_status_counts"]
        total = max(detail["device_count"], sum(counts.values()), 1)
        grid = Table.grid(padding=(0, 1))
        for status in DEVICE_STATUS_ORDER:
            count = counts.get(status, 0)
            if count == 0 and status not in ALWAYS_SHOWN_STATUSES:
                continue
            style = STATUS_STYLES.get(status, "")
            bar = ProgressBar(total=total, completed=count, width=BAR_WIDTH, complete_style=style, finished_style=style)
            grid.add_row(Text(f"  {status:<16}", style=style), bar, Text(f"{count}/{total}"))
        return grid

    def render_running_devices(self, detail: dict[str, Any]) -> Text:
        running = [row for row in detail["devices"] if row["status"] == DEVICE_IN_PROGRESS]
        if not running:
            return Text("")
        shown = ", ".join(f"{row['device_id']} ({row['stage'] or 'starting'})" for row in running[:MAX_RUNNING_DEVICES_SHOWN])
        more = len(running) - MAX_RUNNING_DEVICES_SHOWN
        return Text(f"  running: {shown}" + (f" and {more} more" if more > 0 else ""), style="cyan")


def choose_reporter(plain: bool, as_json: bool) -> WatchReporter:
    """Return the JSON reporter for --json, the plain one for --plain or a pipe, else the live display."""

    if as_json:
        return JsonReporter()
    if plain or not stdout_is_terminal():
        return PlainReporter()
    return LiveReporter(make_console())
