"""One device's update: wait for the device to check in, run each stage on it, roll back on failure.

Rollback is a saga. Before the files and dependencies stages run, their
reverts are registered. When a stage fails, is aborted or the device is lost,
the registered reverts run on the device in reverse order, then the recipe's
rollback command and reboot. Every compensation is idempotent on the agent, so
running one again after a lost report is harmless.

A stage that fails transiently (the agent marks the report `transient`, or
the agent restarted during it) runs again, up to the plan's
`stage_max_attempts`, with exponential backoff. Only that stage runs again:
its compensation is registered already, and the change log on the device
keeps the records of every attempt, so a rollback still restores the state
from before the first one. A device whose reported facts lack a package
manager the recipe needs ends `skipped` before any stage runs.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, TimeoutError, TimeoutType

with workflow.unsafe.imports_passed_through():
    from microupdates import search_attributes
    from microupdates.device_requirements import incompatibility
    from microupdates.protocol.device_api import (
        REBOOT_STAGE,
        REVERT_FILES_STAGE,
        REVERT_PACKAGES_STAGE,
        ROLLBACK_COMMAND_STAGE,
        STAGE_ABORTED,
        STAGE_INTERRUPTED,
        STAGE_SUCCEEDED,
    )
    from microupdates.workflows.contracts import (
        ABORTED_ERROR_TYPE,
        AWAIT_DEVICE_CHECK_IN_ACTIVITY,
        DEVICE_ABORTED,
        DEVICE_FAILED,
        DEVICE_ROLLBACK_FAILED,
        DEVICE_ROLLED_BACK,
        DEVICE_SKIPPED,
        DEVICE_SUCCEEDED,
        DEVICE_TIMED_OUT,
        DEVICE_UPDATE_WORKFLOW,
        RECORD_DEVICE_OUTCOME_ACTIVITY,
        RECORD_DEVICE_ROLLBACK_START_ACTIVITY,
        RUN_DEVICE_STAGE_ACTIVITY,
        STAGE_PICKUP_ALLOWANCE_SECONDS,
        CheckInOutcome,
        DeploymentPlan,
        DeviceUpdateInput,
        DeviceUpdateResult,
        RecordDeviceOutcomeInput,
        RecordDeviceRollbackStartInput,
        StageJobInput,
        StageOutcome,
    )

# Device stages are not retried by Temporal: a non-zero exit is a result, and
# running a half-done stage again is the device's decision, not the server's.
NO_RETRY = RetryPolicy(maximum_attempts=1)
RECORD_TIMEOUT = timedelta(seconds=60)
RECORD_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# Time for the revert stages themselves once the device has picked them up.
REVERT_STAGE_SECONDS = 1800
# Maximum wait between two attempts of a stage.
MAX_RETRY_INTERVAL_SECONDS = 300


class StageFailure(Exception):
    """Raised inside the workflow when a stage did not succeed.

    `aborted` is true when the operator stopped it, `cancelled` when that came
    as a Temporal cancel of this workflow (for example from the Web UI), and
    `timed_out` when the device did not check in before its deadline.
    """

    def __init__(
        self, stage: str, reason: str, aborted: bool = False, cancelled: bool = False, timed_out: bool = False
    ) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
        self.aborted = aborted or cancelled
        self.cancelled = cancelled
        self.timed_out = timed_out


@workflow.defn(name=DEVICE_UPDATE_WORKFLOW)
class DeviceUpdateWorkflow:
    def __init__(self) -> None:
        self._cancelled = False
        self._stage_attempts: dict[str, int] = {}

    @workflow.run
    async def run(self, update: DeviceUpdateInput) -> DeviceUpdateResult:
        result = await self._update(update)
        result.stage_attempts = dict(self._stage_attempts)

        await workflow.execute_activity(
            RECORD_DEVICE_OUTCOME_ACTIVITY,
            RecordDeviceOutcomeInput(
                update.deployment_id, update.device_id, result.status, result.stage, result.error,
                result.rollback_error, result.stage_attempts,
            ),
            start_to_close_timeout=RECORD_TIMEOUT,
            retry_policy=RECORD_RETRY,
        )
        workflow.upsert_search_attributes([search_attributes.STATUS.value_set(result.status)])
        if self._cancelled:
            # The outcome is recorded and the device rolled back; now the cancel ends the workflow.
            raise asyncio.CancelledError()
        return result

    async def _update(self, update: DeviceUpdateInput) -> DeviceUpdateResult:
        """Run the update and return its result; a Temporal cancel is handled like an abort."""

        try:
            check_in = await self._await_check_in(update)
        except StageFailure as failure:
            self._cancelled = failure.cancelled
            if failure.aborted:
                status = DEVICE_ABORTED
            elif failure.timed_out:
                status = DEVICE_TIMED_OUT
            else:
                status = DEVICE_FAILED
            return DeviceUpdateResult(update.device_id, status, failure.stage, failure.reason)

        reason = incompatibility(update.plan.required_package_managers, check_in.package_managers)
        if reason is not None:
            workflow.logger.info(
                "Device %s of deployment %s skipped: %s", update.device_id, update.deployment_id, reason
            )
            return DeviceUpdateResult(update.device_id, DEVICE_SKIPPED, None, reason)

        compensations: list[str] = []
        try:
            await self._run_stages(update, compensations)
        except StageFailure as failure:
            self._cancelled = failure.cancelled
            return await self._roll_back(update, compensations, failure)
        return DeviceUpdateResult(update.device_id, DEVICE_SUCCEEDED)

    async def _await_check_in(self, update: DeviceUpdateInput) -> CheckInOutcome:
        """Wait for the device's first check-in and return its facts; stored facts that rule it out return at once."""

        plan = update.plan
        deadline = plan.check_in_deadline_seconds
        timeout_reason = f"the device did not check in within {deadline} s"
        if plan.check_in_deadline_epoch_seconds is not None:
            deadline_text = format_epoch(plan.check_in_deadline_epoch_seconds)
            remaining = plan.check_in_deadline_epoch_seconds - workflow.now().timestamp()
            if remaining <= 0:
                raise StageFailure(
                    "check_in", f"the device did not check in before the deployment's deadline {deadline_text}",
                    timed_out=True,
                )
            if remaining < deadline:
                deadline = max(1, int(remaining))
                timeout_reason = f"the device did not check in before the deployment's deadline {deadline_text}"
        try:
            outcome: CheckInOutcome | None = await workflow.execute_activity(
                AWAIT_DEVICE_CHECK_IN_ACTIVITY,
                StageJobInput(update.deployment_id, update.device_id, "check_in",
                              required_package_managers=list(plan.required_package_managers)),
                result_type=CheckInOutcome,
                activity_id="check_in",
                start_to_close_timeout=timedelta(seconds=deadline),
                retry_policy=NO_RETRY,
                summary=f"wait up to {deadline} s for {update.device_id} to check in",
            )
        except asyncio.CancelledError as error:
            raise StageFailure("check_in", "the workflow was cancelled before the device started",
                               cancelled=True) from error
        except ActivityError as error:
            if isinstance(error.cause, CancelledError):
                raise StageFailure("check_in", "the workflow was cancelled before the device started",
                                   cancelled=True) from error
            if is_abort(error):
                raise StageFailure("check_in", "aborted before the device started", aborted=True) from error
            if isinstance(error.cause, TimeoutError):
                raise StageFailure("check_in", timeout_reason, timed_out=True) from error
            raise StageFailure("check_in", f"waiting for the device failed: {error.cause or error}") from error
        # A worker or API of an older version completes the check-in without a result.
        return outcome or CheckInOutcome()

    async def _run_stages(self, update: DeviceUpdateInput, compensations: list[str]) -> None:
        plan = update.plan
        for stage in plan.stages:
            compensation = compensation_for(stage, plan)
            if compensation is not None:
                # Registered before the stage runs, so a stage that fails half-way is reverted too.
                compensations.append(compensation)

            outcome = await self._run_stage_with_retries(update, stage)
            if outcome.status != STAGE_SUCCEEDED:
                reason = outcome.error or f"the {stage} stage ended with status {outcome.status}"
                attempts = self._stage_attempts.get(stage, 1)
                if attempts > 1:
                    reason = f"{reason} (after {attempts} attempts)"
                raise StageFailure(stage, reason, aborted=outcome.status == STAGE_ABORTED)

    async def _run_stage_with_retries(self, update: DeviceUpdateInput, stage: str) -> StageOutcome:
        """Run a stage, and run it again after a transient failure until the plan's attempts are used up."""

        plan = update.plan
        attempt = 1
        while True:
            outcome = await self._run_stage(update, stage, attempt)
            if attempt > 1:
                self._stage_attempts[stage] = attempt
            if outcome.status == STAGE_SUCCEEDED or not is_transient(outcome) or attempt >= plan.stage_max_attempts:
                return outcome

            delay = retry_interval_seconds(plan, attempt)
            workflow.logger.info(
                "Stage %s failed transiently on device %s of deployment %s (attempt %d of %d): %s; "
                "running it again in %d s",
                stage, update.device_id, update.deployment_id, attempt, plan.stage_max_attempts, outcome.error,
                delay,
            )
            try:
                await workflow.sleep(timedelta(seconds=delay))
            except asyncio.CancelledError as error:
                raise StageFailure(stage, f"the workflow was cancelled while the {stage} stage waited to run again",
                                   cancelled=True) from error
            attempt += 1

    async def _run_stage(self, update: DeviceUpdateInput, stage: str, attempt: int = 1) -> StageOutcome:
        plan = update.plan
        stage_timeout = plan.stage_timeout_seconds[stage]
        try:
            return await workflow.execute_activity(
                RUN_DEVICE_STAGE_ACTIVITY,
                StageJobInput(update.deployment_id, update.device_id, stage, attempt),
                result_type=StageOutcome,
                activity_id=stage if attempt == 1 else f"{stage}-attempt-{attempt}",
                start_to_close_timeout=timedelta(seconds=stage_timeout + STAGE_PICKUP_ALLOWANCE_SECONDS),
                heartbeat_timeout=timedelta(seconds=plan.heartbeat_timeout_seconds),
                retry_policy=NO_RETRY,
                summary=stage_summary(stage, plan, update.device_id),
            )
        except asyncio.CancelledError as error:
            raise StageFailure(stage, f"the workflow was cancelled during the {stage} stage", cancelled=True) from error
        except ActivityError as error:
            if isinstance(error.cause, CancelledError):
                raise StageFailure(stage, f"the workflow was cancelled during the {stage} stage",
                                   cancelled=True) from error
            if is_abort(error):
                raise StageFailure(stage, f"aborted before the {stage} stage started", aborted=True) from error
            reason = describe_stage_error(stage, error, plan.heartbeat_timeout_seconds, stage_timeout)
            workflow.logger.info(
                "Stage %s failed on device %s of deployment %s: %s",
                stage, update.device_id, update.deployment_id, reason,
            )
            raise StageFailure(stage, reason) from error

    async def _roll_back(
        self, update: DeviceUpdateInput, compensations: list[str], failure: StageFailure
    ) -> DeviceUpdateResult:
        """Run the registered reverts in reverse order, then the rollback command and reboot."""

        steps = list(reversed(compensations))
        if update.plan.rollback_command_timeout_seconds is not None:
            steps.append(ROLLBACK_COMMAND_STAGE)
        if update.plan.reboot:
            steps.append(REBOOT_STAGE)

        final_status = DEVICE_ABORTED if failure.aborted else DEVICE_ROLLED_BACK
        if not steps:
            final_status = DEVICE_ABORTED if failure.aborted else DEVICE_FAILED
            return DeviceUpdateResult(update.device_id, final_status, failure.stage, failure.reason)

        workflow.logger.info(
            "Rolling back device %s of deployment %s after %s: %s",
            update.device_id, update.deployment_id, failure.stage, ", ".join(steps),
        )
        # The reverts may wait a long time for a lost device; the operator sees the failure meanwhile.
        await workflow.execute_activity(
            RECORD_DEVICE_ROLLBACK_START_ACTIVITY,
            RecordDeviceRollbackStartInput(update.deployment_id, update.device_id, failure.stage, failure.reason),
            start_to_close_timeout=RECORD_TIMEOUT,
            retry_policy=RECORD_RETRY,
        )
        for step in steps:
            error = await self._run_compensation(update, step)
            if error is not None:
                workflow.logger.warning(
                    "Rollback step %s failed on device %s of deployment %s: %s",
                    step, update.device_id, update.deployment_id, error,
                )
                # The agent's errors may already start with the step's name.
                rollback_error = error if error.startswith(f"{step}:") else f"{step}: {error}"
                return DeviceUpdateResult(
                    update.device_id, DEVICE_ROLLBACK_FAILED, failure.stage, failure.reason, rollback_error
                )
        return DeviceUpdateResult(update.device_id, final_status, failure.stage, failure.reason)

    async def _run_compensation(self, update: DeviceUpdateInput, step: str) -> str | None:
        """Run one compensation on the device; return why it failed, or None."""

        plan = update.plan
        # A lost device may come back later, so a compensation waits as long as
        # a first check-in would, and has no heartbeat timeout while it waits.
        wait_seconds = plan.check_in_deadline_seconds + compensation_seconds(step, plan)
        try:
            outcome: StageOutcome = await workflow.execute_activity(
                RUN_DEVICE_STAGE_ACTIVITY,
                StageJobInput(update.deployment_id, update.device_id, step),
                result_type=StageOutcome,
                activity_id=step,
                start_to_close_timeout=timedelta(seconds=wait_seconds),
                retry_policy=NO_RETRY,
                summary=f"rollback: {step} on {update.device_id}",
            )
        except ActivityError as error:
            if isinstance(error.cause, TimeoutError):
                return f"the device did not complete it within {wait_seconds} s"
            return str(error.cause or error)
        if outcome.status != STAGE_SUCCEEDED:
            return outcome.error or f"ended with status {outcome.status}"
        return None


def stage_summary(stage: str, plan: DeploymentPlan, device_id: str) -> str:
    summary = f"{stage} of update {plan.update_version} on {device_id}"
    description = plan.stage_descriptions.get(stage)
    return f"{summary}: {description}" if description else summary


def compensation_for(stage: str, plan: DeploymentPlan) -> str | None:
    if stage == "files" and plan.revert_files:
        return REVERT_FILES_STAGE
    if stage == "dependencies" and plan.revert_packages:
        return REVERT_PACKAGES_STAGE
    return None


def compensation_seconds(step: str, plan: DeploymentPlan) -> int:
    if step == ROLLBACK_COMMAND_STAGE and plan.rollback_command_timeout_seconds is not None:
        return plan.rollback_command_timeout_seconds + STAGE_PICKUP_ALLOWANCE_SECONDS
    return REVERT_STAGE_SECONDS


def is_transient(outcome: StageOutcome) -> bool:
    """Check whether running the stage again may succeed: it was marked transient, or interrupted by a restart."""

    return outcome.transient or outcome.status == STAGE_INTERRUPTED


def retry_interval_seconds(plan: DeploymentPlan, failed_attempt: int) -> int:
    """Return the wait after the given failed attempt: the initial interval, doubled each time, capped."""

    interval = plan.retry_initial_interval_seconds * 2 ** min(failed_attempt - 1, 16)
    return min(interval, MAX_RETRY_INTERVAL_SECONDS)


def format_epoch(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_abort(error: ActivityError) -> bool:
    cause = error.cause
    return isinstance(cause, ApplicationError) and cause.type == ABORTED_ERROR_TYPE


def describe_stage_error(stage: str, error: ActivityError, heartbeat_seconds: int, stage_seconds: int) -> str:
    cause = error.cause
    if isinstance(cause, TimeoutError):
        if cause.type == TimeoutType.HEARTBEAT:
            return f"the device stopped reporting during the {stage} stage (no heartbeat for {heartbeat_seconds} s)"
        return (
            f"the {stage} stage did not finish within {stage_seconds} s "
            f"plus {STAGE_PICKUP_ALLOWANCE_SECONDS} s to pick it up"
        )
    return f"the {stage} stage failed: {cause or error}"
