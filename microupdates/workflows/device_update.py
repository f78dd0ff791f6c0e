"""One device's update: wait for the device to check in, then run each stage on it."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, TimeoutError, TimeoutType

with workflow.unsafe.imports_passed_through():
    from microupdates.workflows.contracts import (
        AWAIT_DEVICE_CHECK_IN_ACTIVITY,
        DEVICE_UPDATE_WORKFLOW,
        RECORD_DEVICE_OUTCOME_ACTIVITY,
        RUN_DEVICE_STAGE_ACTIVITY,
        STAGE_PICKUP_ALLOWANCE_SECONDS,
        DeviceUpdateInput,
        DeviceUpdateResult,
        RecordDeviceOutcomeInput,
        StageJobInput,
        StageOutcome,
    )

# Device stages are not retried by Temporal: a non-zero exit is a result, and
# running a half-done stage again is the device's decision, not the server's.
NO_RETRY = RetryPolicy(maximum_attempts=1)
RECORD_TIMEOUT = timedelta(seconds=60)
RECORD_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


@workflow.defn(name=DEVICE_UPDATE_WORKFLOW)
class DeviceUpdateWorkflow:
    @workflow.run
    async def run(self, update: DeviceUpdateInput) -> DeviceUpdateResult:
        result = await self._await_check_in(update)
        if result is None:
            result = await self._run_stages(update)

        await workflow.execute_activity(
            RECORD_DEVICE_OUTCOME_ACTIVITY,
            RecordDeviceOutcomeInput(update.deployment_id, update.device_id, result.status, result.stage, result.error),
            start_to_close_timeout=RECORD_TIMEOUT,
            retry_policy=RECORD_RETRY,
        )
        return result

    async def _await_check_in(self, update: DeviceUpdateInput) -> DeviceUpdateResult | None:
        """Wait until the device checks in; return a timed_out result when it never does."""

        deadline = update.plan.check_in_deadline_seconds
        try:
            await workflow.execute_activity(
                AWAIT_DEVICE_CHECK_IN_ACTIVITY,
                StageJobInput(update.deployment_id, update.device_id, "check_in"),
                activity_id="check_in",
                start_to_close_timeout=timedelta(seconds=deadline),
                retry_policy=NO_RETRY,
                summary=f"wait up to {deadline} s for {update.device_id} to check in",
            )
        except ActivityError as error:
            if isinstance(error.cause, TimeoutError):
                workflow.logger.info(
                    "Device %s of deployment %s did not check in within %s s",
                    update.device_id, update.deployment_id, deadline,
                )
                return DeviceUpdateResult(
                    update.device_id, "timed_out", "check_in", f"the device did not check in within {deadline} s"
                )
            raise
        return None

    async def _run_stages(self, update: DeviceUpdateInput) -> DeviceUpdateResult:
        plan = update.plan
        for stage in plan.stages:
            stage_timeout = plan.stage_timeout_seconds[stage]
            try:
                outcome: StageOutcome = await workflow.execute_activity(
                    RUN_DEVICE_STAGE_ACTIVITY,
                    StageJobInput(update.deployment_id, update.device_id, stage),
                    result_type=StageOutcome,
                    activity_id=stage,
                    start_to_close_timeout=timedelta(seconds=stage_timeout + STAGE_PICKUP_ALLOWANCE_SECONDS),
                    heartbeat_timeout=timedelta(seconds=plan.heartbeat_timeout_seconds),
                    retry_policy=NO_RETRY,
                    summary=f"{stage} of update {plan.update_version} on {update.device_id}",
                )
            except ActivityError as error:
                reason = describe_stage_error(stage, error, plan.heartbeat_timeout_seconds, stage_timeout)
                workflow.logger.info(
                    "Stage %s failed on device %s of deployment %s: %s",
                    stage, update.device_id, update.deployment_id, reason,
                )
                return DeviceUpdateResult(update.device_id, "failed", stage, reason)

            if outcome.status != "succeeded":
                reason = outcome.error or f"the {stage} stage ended with status {outcome.status}"
                return DeviceUpdateResult(update.device_id, "failed", stage, reason)

        return DeviceUpdateResult(update.device_id, "succeeded")


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
