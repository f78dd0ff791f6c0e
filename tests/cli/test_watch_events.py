"""Event detection and exit codes of the deployment watch, on hand-made API bodies; no stack needed."""

from __future__ import annotations

from microupdates.cli.watch import (
    DeploymentEvent,
    DeploymentTracker,
    DeviceEvent,
    exit_code_for,
)
from microupdates.cli.output import describe_device_error, escape_device_text
from microupdates.cli.watch_display import describe_event


def snapshot(status: str, *devices: tuple[str, str, str | None]) -> dict:
    return {
        "id": "dep-1",
        "status": status,
        "devices": [
            {"device_id": name, "status": device_status, "stage": stage, "error": None, "rollback_error": None}
            for name, device_status, stage in devices
        ],
    }


def test_tracker_reports_unseen_devices_as_leaving_pending():
    tracker = DeploymentTracker("dep-1", baseline_first_poll=False)

    first = tracker.update(snapshot("pending"))
    second = tracker.update(snapshot("in_progress", ("a", "pending", None), ("b", "in_progress", "before")))

    assert first == []
    assert [(type(e).__name__, e.old_status, e.status) for e in second] == [
        ("DeviceEvent", "pending", "in_progress"),
        ("DeploymentEvent", "pending", "in_progress"),
    ]
    assert second[0].device_id == "b"


def test_tracker_reports_stage_change_within_status():
    tracker = DeploymentTracker("dep-1", baseline_first_poll=False)
    tracker.update(snapshot("in_progress", ("a", "in_progress", "before")))

    events = tracker.update(snapshot("in_progress", ("a", "in_progress", "files")))
    unchanged = tracker.update(snapshot("in_progress", ("a", "in_progress", "files")))

    assert len(events) == 1
    assert (events[0].old_status, events[0].status, events[0].stage) == ("in_progress", "in_progress", "files")
    assert unchanged == []


def test_tracker_with_baseline_ignores_first_snapshot():
    tracker = DeploymentTracker("dep-1", baseline_first_poll=True)

    first = tracker.update(snapshot("in_progress", ("a", "succeeded", None), ("b", "in_progress", "after")))
    second = tracker.update(snapshot("succeeded", ("a", "succeeded", None), ("b", "succeeded", None)))

    assert first == []
    assert [(e.old_status, e.status) for e in second] == [("in_progress", "succeeded"), ("in_progress", "succeeded")]
    assert isinstance(second[0], DeviceEvent)
    assert isinstance(second[1], DeploymentEvent)


def test_exit_code_for_each_final_status():
    assert exit_code_for(snapshot("succeeded", ("a", "succeeded", None))) == 0
    assert exit_code_for(snapshot("failed", ("a", "succeeded", None), ("b", "failed", "before"))) == 2
    assert exit_code_for(snapshot("aborted", ("a", "aborted", "before"))) == 2
    assert exit_code_for(snapshot("failed_to_start")) == 2
    assert exit_code_for(snapshot("in_progress", ("a", "in_progress", "before"))) == 1


def test_plain_line_shows_error_only_when_final():
    running = DeviceEvent("t", "dep-1", "gw-1", "in_progress", "in_progress", "revert_files",
                          "before: exited with status 3", None)
    finished = DeviceEvent("t", "dep-1", "gw-1", "in_progress", "rollback_failed", "before",
                           "before: exited with status 3", "rollback_command: exited with status 7")

    assert describe_event(running) == "t gw-1 in_progress -> in_progress revert_files"
    assert describe_event(finished) == (
        "t gw-1 in_progress -> rollback_failed before "
        "(before: exited with status 3; rollback failed: rollback_command: exited with status 7)"
    )
    assert describe_event(DeploymentEvent("t", "dep-1", "in_progress", "failed")) == (
        "t deployment dep-1 in_progress -> failed"
    )


def test_escape_device_text_neutralises_terminal_controls():
    text = "\x1b]0;title\x07\x1b[31mRED\x1b[0m line\nnext\ttab \x9b"

    escaped = escape_device_text(text)

    assert escaped == "\\x1b]0;title\\x07\\x1b[31mRED\\x1b[0m line\nnext\ttab \\x9b"


def test_exit_code_for_skipped_device_is_success():
    assert exit_code_for(snapshot("succeeded", ("a", "succeeded", None), ("b", "skipped", None))) == 0
    assert exit_code_for(snapshot("failed", ("a", "skipped", None), ("b", "failed", "before"))) == 2


def test_device_error_names_retried_stages():
    row = {"error": None, "rollback_error": None, "stage_attempts": {"files": 2}}
    failed_row = {"stage": "after", "error": "after: exited with status 1", "stage_attempts": {"files": 2}}
    retried_row = {"stage": "files", "error": "files: download failed (after 3 attempts)", "stage_attempts": {"files": 3}}

    assert describe_device_error(row) == "files: 2 attempts"
    assert describe_device_error(failed_row) == "after: exited with status 1 (files: 2 attempts)"
    assert describe_device_error(retried_row) == "files: download failed (after 3 attempts)"
