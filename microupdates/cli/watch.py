"""Follow a deployment by polling `GET /api/v1/deployments/{id}` and turn each change into an event.

A device event is a change of a device's status or stage between two polls,
so a device that passes through several states within one poll interval
shows as one event from the first to the last. The reporters in
`watch_display` render the events.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Callable, Optional, Protocol

from microupdates.cli.api_client import OperatorApiClient, OperatorApiConnectionError, OperatorApiError
from microupdates.workflows.contracts import (
    DEPLOYMENT_SUCCEEDED,
    DEVICE_PENDING,
    DEVICE_SKIPPED,
    DEVICE_SUCCEEDED,
    FINAL_DEPLOYMENT_STATUSES,
    FINAL_DEVICE_STATUSES,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 0.5

# Connection errors and HTTP 5xx responses are retried for this long in a row,
# so a restarting API does not end a long watch. A 4xx response ends it at once.
TRANSIENT_ERROR_GRACE_SECONDS = 15.0

EXIT_ALL_SUCCEEDED = 0
EXIT_WATCH_ERROR = 1
EXIT_DEPLOYMENT_NOT_SUCCEEDED = 2


def now_text() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass(frozen=True)
class DeviceEvent:
    """A device's status or stage changed between two polls."""

    time: str
    deployment_id: str
    device_id: str
    old_status: str
    status: str
    stage: Optional[str]
    error: Optional[str]
    rollback_error: Optional[str]

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_DEVICE_STATUSES

    def to_json(self) -> dict[str, Any]:
        return {"event": "device", **asdict(self)}


@dataclass(frozen=True)
class DeploymentEvent:
    """The deployment's own status changed between two polls."""

    time: str
    deployment_id: str
    old_status: str
    status: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "deployment", **asdict(self)}


Event = DeviceEvent | DeploymentEvent


class DeploymentTracker:
    """The last seen status and stage of a deployment and each of its devices.

    With `baseline_first_poll`, the first snapshot is taken as the starting
    state and yields no events. Without it, the deployment starts as
    `pending` and so does every device, including devices not listed yet.
    """

    def __init__(self, deployment_id: str, baseline_first_poll: bool) -> None:
        self.deployment_id = deployment_id
        self.awaiting_baseline = baseline_first_poll
        self.deployment_status = DEVICE_PENDING
        self.device_states: dict[str, tuple[str, Optional[str]]] = {}

    def update(self, detail: dict[str, Any]) -> list[Event]:
        moment = now_text()
        events: list[Event] = []

        for row in detail["devices"]:
            device_id = row["device_id"]
            state = (row["status"], row["stage"])
            old_status, old_stage = self.device_states.get(device_id, (DEVICE_PENDING, None))
            self.device_states[device_id] = state
            if state == (old_status, old_stage):
                continue
            events.append(
                DeviceEvent(
                    time=moment,
                    deployment_id=self.deployment_id,
                    device_id=device_id,
                    old_status=old_status,
                    status=row["status"],
                    stage=row["stage"],
                    error=row.get("error"),
                    rollback_error=row.get("rollback_error"),
                )
            )

        # The deployment's own change comes last because it follows from the devices' changes.
        status = detail["status"]
        if status != self.deployment_status:
            events.append(DeploymentEvent(moment, self.deployment_id, self.deployment_status, status))
            self.deployment_status = status

        if self.awaiting_baseline:
            self.awaiting_baseline = False
            return []
        return events


class WatchReporter(Protocol):
    def start(self, detail: dict[str, Any]) -> None: ...

    def report(self, detail: dict[str, Any], events: list[Event]) -> None: ...

    def finish(self, detail: dict[str, Any], exit_code: int, timed_out: bool) -> None: ...

    def close(self) -> None: ...


@dataclass
class WatchResult:
    detail: dict[str, Any]
    timed_out: bool

    @property
    def exit_code(self) -> int:
        if self.timed_out:
            return EXIT_WATCH_ERROR
        return exit_code_for(self.detail)


def exit_code_for(detail: dict[str, Any]) -> int:
    """Return 0 when every device succeeded or was skipped, 2 when the deployment ended otherwise, 1 while it runs."""

    if detail["status"] not in FINAL_DEPLOYMENT_STATUSES:
        return EXIT_WATCH_ERROR
    every_device_succeeded = all(row["status"] in (DEVICE_SUCCEEDED, DEVICE_SKIPPED) for row in detail["devices"])
    if detail["status"] == DEPLOYMENT_SUCCEEDED and every_device_succeeded:
        return EXIT_ALL_SUCCEEDED
    return EXIT_DEPLOYMENT_NOT_SUCCEEDED


def read_with_retry(
    api: OperatorApiClient, deployment_id: str, sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """Read the deployment, retrying transient errors for up to TRANSIENT_ERROR_GRACE_SECONDS."""

    first_failure = None
    while True:
        try:
            return api.read_deployment_with_all_devices(deployment_id)
        except OperatorApiError as error:
            transient = isinstance(error, OperatorApiConnectionError) or (error.status_code or 0) >= 500
            if not transient:
                raise
            if first_failure is None:
                first_failure = time.monotonic()
            if time.monotonic() - first_failure > TRANSIENT_ERROR_GRACE_SECONDS:
                raise
            logger.info("Reading deployment %s failed, retrying: %s", deployment_id, error)
            sleep(POLL_INTERVAL_SECONDS)


def watch_deployment(
    api: OperatorApiClient,
    deployment_id: str,
    reporter: WatchReporter,
    timeout_seconds: float,
    baseline_first_poll: bool,
    poll_interval_seconds: float = POLL_INTERVAL_SECONDS,
) -> WatchResult:
    """Poll the deployment until it reaches a final status or `timeout_seconds` pass, reporting each change.

    The reporter is finished with the last snapshot either way. API errors
    other than transient ones propagate, after the reporter is closed.
    """

    deadline = time.monotonic() + timeout_seconds
    tracker = DeploymentTracker(deployment_id, baseline_first_poll)
    try:
        detail = read_with_retry(api, deployment_id)
        first_events = tracker.update(detail)
        reporter.start(detail)
        reporter.report(detail, first_events)

        while detail["status"] not in FINAL_DEPLOYMENT_STATUSES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result = WatchResult(detail, timed_out=True)
                reporter.finish(detail, result.exit_code, timed_out=True)
                return result
            time.sleep(min(poll_interval_seconds, remaining))
            detail = read_with_retry(api, deployment_id)
            reporter.report(detail, tracker.update(detail))

        result = WatchResult(detail, timed_out=False)
        reporter.finish(detail, result.exit_code, timed_out=False)
        return result
    finally:
        reporter.close()
