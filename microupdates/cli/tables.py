"""Rich tables of devices, updates, deployments and stage results, built from the API's JSON bodies."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from rich import box
from rich.table import Table
from rich.text import Text

from microupdates.cli.output import (
    describe_device_error,
    escape_device_text,
    format_seconds,
    format_timestamp,
    seconds_between,
    styled_status,
)
from microupdates.protocol.recipe import Recipe
from microupdates.workflows.contracts import (
    DEVICE_ABORTED,
    DEVICE_FAILED,
    DEVICE_IN_PROGRESS,
    DEVICE_PENDING,
    DEVICE_ROLLBACK_FAILED,
    DEVICE_ROLLED_BACK,
    DEVICE_SKIPPED,
    DEVICE_SUCCEEDED,
    DEVICE_TIMED_OUT,
)

DEVICE_STATUS_ORDER = (
    DEVICE_PENDING,
    DEVICE_IN_PROGRESS,
    DEVICE_SUCCEEDED,
    DEVICE_FAILED,
    DEVICE_ROLLED_BACK,
    DEVICE_ROLLBACK_FAILED,
    DEVICE_ABORTED,
    DEVICE_TIMED_OUT,
    DEVICE_SKIPPED,
)

MAX_COMMENT_CHARS_IN_LIST = 60


def new_table(*columns: str, title: str | None = None) -> Table:
    table = Table(*columns, title=title, box=box.SIMPLE, show_edge=False, title_justify="left", pad_edge=False)
    for column in table.columns:
        column.overflow = "fold"
    return table


def format_status_counts(counts: dict[str, int]) -> str:
    """Return counts as `succeeded 2, failed 1`, in lifecycle order, then any status this CLI does not know."""

    known = [status for status in DEVICE_STATUS_ORDER if counts.get(status)]
    unknown = sorted(status for status in counts if status not in DEVICE_STATUS_ORDER and counts[status])
    return ", ".join(f"{status} {counts[status]}" for status in known + unknown)


def devices_table(devices: list[dict[str, Any]]) -> Table:
    table = new_table("device", "groups", "tags", "last seen", "agent version", "registered")
    for device in devices:
        table.add_row(
            device["id"],
            ", ".join(device["groups"]),
            ", ".join(device["tags"]),
            format_timestamp(device["last_seen_at"]) or "never",
            device["agent_version"] or "",
            format_timestamp(device["created_at"]),
        )
    return table


def device_details_table(device: dict[str, Any]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("device", device["id"])
    table.add_row("groups", ", ".join(device["groups"]) or "none")
    table.add_row("tags", ", ".join(device["tags"]) or "none")
    table.add_row("registered", format_timestamp(device["created_at"]))
    table.add_row("last seen", format_timestamp(device["last_seen_at"]) or "never")
    table.add_row("agent version", device["agent_version"] or "unknown")
    revoked_at = device.get("token_revoked_at")
    table.add_row("token", f"revoked at {format_timestamp(revoked_at)}" if revoked_at else "valid")
    facts = device.get("facts")
    if facts is None:
        table.add_row("facts", "not reported yet")
        return table
    table.add_row("package managers", ", ".join(facts.get("package_managers") or []) or "none")
    table.add_row("python3", facts.get("python_version") or "not installed")
    table.add_row("architecture", facts.get("architecture") or "unknown")
    table.add_row("OS", facts.get("os_id") or "unknown")
    free_bytes = facts.get("free_disk_bytes")
    table.add_row("free disk", "unknown" if free_bytes is None else f"{free_bytes / 2**30:.1f} GiB")
    table.add_row("facts reported", format_timestamp(device.get("facts_reported_at")))
    return table


def describe_recipe_stages(recipe: dict[str, Any]) -> str:
    """Return the stages a stored recipe runs, or '' when this CLI's recipe model cannot read it."""

    try:
        return ", ".join(Recipe.model_validate(recipe).stages())
    except ValidationError:
        return ""


def first_line(text: str, limit: int) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def updates_table(updates: list[dict[str, Any]]) -> Table:
    table = new_table("update", "version", "stages", "created", "comment")
    for update in updates:
        table.add_row(
            update["id"],
            update["version"],
            describe_recipe_stages(update["recipe"]),
            format_timestamp(update["created_at"]),
            first_line(update["comment"], MAX_COMMENT_CHARS_IN_LIST),
        )
    return table


def update_details_table(update: dict[str, Any]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    recipe = update["recipe"]
    targets = recipe.get("targets") or {}
    table.add_row("update", update["id"])
    table.add_row("version", update["version"])
    table.add_row("created", format_timestamp(update["created_at"]))
    table.add_row("stages", describe_recipe_stages(recipe))
    table.add_row("target devices", ", ".join(targets.get("devices", [])) or "none")
    table.add_row("target groups", ", ".join(targets.get("groups", [])) or "none")
    if update["comment"]:
        table.add_row("comment", update["comment"])
    return table


def deployments_table(deployments: list[dict[str, Any]]) -> Table:
    table = new_table("deployment", "status", "update", "version", "devices", "device statuses", "created")
    for row in deployments:
        table.add_row(
            row["id"],
            styled_status(row["status"]),
            row["update_id"],
            row["update_version"],
            str(row["device_count"]),
            format_status_counts(row["device_status_counts"]),
            format_timestamp(row["created_at"]),
        )
    return table


def deployment_details_table(detail: dict[str, Any]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("deployment", detail["id"])
    table.add_row("status", styled_status(detail["status"]))
    table.add_row("update", f"{detail['update_id']} (version {detail['update_version']})")
    table.add_row("workflow", detail.get("workflow_id", ""))
    targets = detail.get("targets") or {}
    table.add_row("target devices", ", ".join(targets.get("devices", [])) or "none")
    table.add_row("target groups", ", ".join(targets.get("groups", [])) or "none")
    table.add_row("devices", f"{detail['device_count']} ({format_status_counts(detail['device_status_counts'])})")
    if detail.get("source_deployment_id"):
        table.add_row("redeploys", detail["source_deployment_id"])
    if detail.get("follow_up_ids"):
        table.add_row("redeployed by", ", ".join(detail["follow_up_ids"]))
    rollout = detail.get("rollout") or {}
    if rollout:
        table.add_row("limits", describe_limits(rollout))
    if detail.get("paused"):
        table.add_row("paused", Text("yes: no device starts until resume", style="yellow"))
    table.add_row("created", format_timestamp(detail["created_at"]))
    table.add_row("started", format_timestamp(detail["started_at"]))
    table.add_row("finished", format_timestamp(detail["finished_at"]))
    if detail.get("check_in_deadline_at"):
        table.add_row("check-in deadline", format_timestamp(detail["check_in_deadline_at"]))
    if detail.get("abort_requested"):
        table.add_row("abort", "requested")
    if detail.get("error"):
        table.add_row("error", Text(escape_device_text(detail["error"]), style="red"))
    return table


def describe_limits(rollout: dict[str, Any]) -> str:
    parts = [f"{rollout['max_concurrent']} at once"]
    if rollout.get("max_start_rate") is not None:
        parts.append(f"start rate {rollout['max_start_rate']}" + ("/s" if isinstance(rollout["max_start_rate"], (int, float)) else ""))
    if rollout.get("max_failures") is not None:
        parts.append(f"stop when more than {rollout['max_failures']} fail (after {rollout['min_finished']} finished)")
    return ", ".join(parts)


def deployment_phases_table(detail: dict[str, Any]) -> Table:
    """Return one row per rollout phase: its selection, state, device counts, gate and soak time."""

    table = new_table("phase", "selects", "state", "devices", "gate", "soak", title="Phases")
    for phase in detail["phases"]:
        marker = " (current)" if phase["number"] == detail.get("current_phase") and phase["state"] != "passed" else ""
        soak = f"{phase['soak_seconds']} s" if phase["soak_seconds"] else ""
        if phase.get("soak_until"):
            soak += f" until {format_timestamp(phase['soak_until'])}"
        gate = phase["gate"] or f"needs {phase['min_success_rate']:g}%"
        if phase["promoted"]:
            gate += " (promoted)"
        table.add_row(
            f"{phase['number']} {phase['name']}{marker}",
            phase["selects"],
            styled_status(phase["state"]),
            f"{phase['device_count']} ({format_status_counts(phase['device_status_counts'])})",
            gate,
            soak,
        )
    return table


def deployment_devices_table(detail: dict[str, Any], title: str | None = None) -> Table:
    """Return one row per device: status, the current or failed stage, seconds taken and the error."""

    table = new_table("device", "status", "stage", "seconds", "error", title=title)
    for row in detail["devices"]:
        table.add_row(
            row["device_id"],
            styled_status(row["status"]),
            row["stage"] or "",
            format_seconds(seconds_between(row["started_at"], row["finished_at"])),
            describe_device_error(row),
        )
    return table


def stage_results_table(result: dict[str, Any]) -> Table:
    table = new_table("stage", "status", "exit code", "seconds", "error")
    for stage in result["stages"]:
        exit_code = stage["exit_code"]
        attempt = stage.get("attempt", 1)
        table.add_row(
            stage["stage"] if attempt == 1 else f"{stage['stage']} (attempt {attempt})",
            styled_status(stage["status"] or stage["state"]),
            "" if exit_code is None else str(exit_code),
            format_seconds(stage["duration_seconds"]),
            escape_device_text(stage["error"] or ""),
        )
    return table
