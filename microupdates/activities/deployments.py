"""Server-side steps of a deployment: load and freeze it, page through its devices, record results."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timezone

from temporalio import activity

from microupdates.db import deployments as deployment_store
from microupdates.db import jobs as job_store
from microupdates.db.session import Database
from microupdates.device_requirements import required_package_managers
from microupdates.job_aborts import end_queued_jobs
from microupdates.protocol.recipe import CommandStage, PackageGroup, Recipe
from microupdates.workflows.contracts import (
    FINISH_DEPLOYMENT_ACTIVITY,
    LIST_DEPLOYMENT_DEVICES_ACTIVITY,
    MARK_UNSTARTED_DEVICES_ABORTED_ACTIVITY,
    REQUEST_DEPLOYMENT_ABORT_ACTIVITY,
    RECORD_DEVICE_OUTCOME_ACTIVITY,
    RECORD_DEVICE_ROLLBACK_START_ACTIVITY,
    RECORD_ROLLOUT_STATE_ACTIVITY,
    START_DEPLOYMENT_ACTIVITY,
    STOP_DEPLOYMENT_ACTIVITY,
    DeploymentPlan,
    PhaseSettings,
    RecordRolloutStateInput,
    RolloutSettings,
    StopDeploymentInput,
    DevicePage,
    FinishDeploymentInput,
    FinishDeploymentResult,
    ListDeploymentDevicesInput,
    MarkUnstartedDevicesAbortedInput,
    RecordDeviceOutcomeInput,
    RecordDeviceRollbackStartInput,
    RequestDeploymentAbortInput,
    StartDeploymentInput,
)

# Downloads and writes of the files stage; the device's progress reports keep
# the stage alive, so this bounds only a stage that never ends.
FILES_STAGE_TIMEOUT_SECONDS = 1800


class DeploymentActivities:
    """Activities that read and write the application database; each is safe to retry."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @activity.defn(name=START_DEPLOYMENT_ACTIVITY)
    async def start_deployment(self, request: StartDeploymentInput) -> DeploymentPlan:
        return await asyncio.to_thread(self._start_deployment, request.deployment_id)

    def _start_deployment(self, deployment_id: str) -> DeploymentPlan:
        with self.database.session() as session:
            deployment = deployment_store.load_deployment(session, deployment_id)
            recipe = deployment_store.load_recipe(session, deployment.update_id)
            device_count = deployment_store.freeze_deployment_targets(session, deployment_id)
            timeouts = deployment_store.effective_timeouts(deployment, recipe)
            rollout = rollout_settings(deployment, deployment_store.count_phase_devices(session, deployment_id))
            retries = deployment_store.effective_retries(deployment, recipe)
            deadline_at = deployment.check_in_deadline_at

        stage_timeouts = {
            "before": recipe.before.timeout_seconds if recipe.before else 0,
            "files": FILES_STAGE_TIMEOUT_SECONDS,
            "dependencies": sum(
                group.timeout_seconds
                for group in (recipe.dependencies.apt, recipe.dependencies.pip,
                              recipe.dependencies.pip3, recipe.dependencies.npm)
                if group is not None
            ),
            "after": recipe.after.timeout_seconds if recipe.after else 0,
        }
        activity.logger.info("Deployment %s starts on %d devices", deployment_id, device_count)
        return DeploymentPlan(
            update_id=deployment.update_id,
            update_version=recipe.version,
            stages=recipe.stages(),
            stage_timeout_seconds=stage_timeouts,
            check_in_deadline_seconds=timeouts.check_in_deadline_seconds,
            heartbeat_timeout_seconds=timeouts.heartbeat_timeout_seconds,
            device_count=device_count,
            revert_files=recipe.rollback.revert_files,
            revert_packages=recipe.rollback.revert_packages,
            rollback_command_timeout_seconds=(
                recipe.rollback.command_timeout_seconds if recipe.rollback.command else None
            ),
            reboot=recipe.rollback.reboot,
            target_groups=list(deployment.targets.get("groups", [])),
            stage_descriptions=describe_stages(recipe),
            rollout=rollout,
            required_package_managers=required_package_managers(recipe.dependencies),
            stage_max_attempts=retries.max_attempts,
            retry_initial_interval_seconds=retries.initial_interval_seconds,
            check_in_deadline_epoch_seconds=epoch_seconds(deadline_at) if deadline_at is not None else None,
        )

    @activity.defn(name=LIST_DEPLOYMENT_DEVICES_ACTIVITY)
    async def list_deployment_devices(self, request: ListDeploymentDevicesInput) -> DevicePage:
        def read() -> DevicePage:
            with self.database.session() as session:
                device_ids = deployment_store.list_deployment_device_ids(
                    session, request.deployment_id, request.after_device_id, request.limit, request.phase
                )
                deployment = deployment_store.load_deployment(session, request.deployment_id)
                return DevicePage(device_ids, deployment.abort_requested_at is not None)

        return await asyncio.to_thread(read)

    @activity.defn(name=MARK_UNSTARTED_DEVICES_ABORTED_ACTIVITY)
    async def mark_unstarted_devices_aborted(self, request: MarkUnstartedDevicesAbortedInput) -> int:
        def write() -> int:
            with self.database.session() as session:
                return deployment_store.mark_unstarted_devices_aborted(
                    session, request.deployment_id, request.after_device_id, request.error
                )

        count = await asyncio.to_thread(write)
        activity.logger.info("Deployment %s aborted: %d devices never started", request.deployment_id, count)
        return count

    @activity.defn(name=REQUEST_DEPLOYMENT_ABORT_ACTIVITY)
    async def request_deployment_abort(self, request: RequestDeploymentAbortInput) -> int:
        """Flag the deployment as aborted and end its queued jobs, as the API's abort does."""

        def flag() -> None:
            with self.database.session() as session:
                deployment_store.request_abort(session, request.deployment_id, None)

        await asyncio.to_thread(flag)
        ended = await end_queued_jobs(self.database, activity.client(), request.deployment_id, None)
        activity.logger.info("Deployment %s aborted by a cancel: %d queued jobs ended", request.deployment_id, ended)
        return ended

    @activity.defn(name=STOP_DEPLOYMENT_ACTIVITY)
    async def stop_deployment(self, request: StopDeploymentInput) -> int:
        """Record why the rollout stopped, flag it aborted and end its queued jobs."""

        def flag() -> None:
            with self.database.session() as session:
                deployment_store.stop_deployment(session, request.deployment_id, request.reason)

        await asyncio.to_thread(flag)
        ended = await end_queued_jobs(self.database, activity.client(), request.deployment_id, None)
        activity.logger.info("Deployment %s %s; %d queued jobs ended", request.deployment_id, request.reason, ended)
        return ended

    @activity.defn(name=RECORD_ROLLOUT_STATE_ACTIVITY)
    async def record_rollout_state(self, request: RecordRolloutStateInput) -> None:
        def write() -> None:
            with self.database.session() as session:
                deployment_store.record_rollout_state(
                    session, request.deployment_id, dataclasses.asdict(request.progress)
                )

        await asyncio.to_thread(write)

    @activity.defn(name=RECORD_DEVICE_ROLLBACK_START_ACTIVITY)
    async def record_device_rollback_start(self, request: RecordDeviceRollbackStartInput) -> None:
        """Show the failure at once, and expire the failed stage's job, before the reverts wait for the device."""

        def write() -> None:
            with self.database.session() as session:
                deployment_store.record_rollback_start(
                    session, request.deployment_id, request.device_id, request.stage, request.error
                )
                job_store.expire_stage_jobs(session, request.deployment_id, request.device_id, request.stage)

        await asyncio.to_thread(write)

    @activity.defn(name=RECORD_DEVICE_OUTCOME_ACTIVITY)
    async def record_device_outcome(self, request: RecordDeviceOutcomeInput) -> None:
        def write() -> None:
            with self.database.session() as session:
                deployment_store.record_device_outcome(
                    session, request.deployment_id, request.device_id, request.status, request.stage, request.error,
                    request.rollback_error, request.stage_attempts,
                )
                job_store.expire_open_jobs(session, request.deployment_id, request.device_id)

        await asyncio.to_thread(write)
        activity.logger.info(
            "Device %s of deployment %s ended %s (stage %s): %s",
            request.device_id, request.deployment_id, request.status, request.stage, request.error,
        )

    @activity.defn(name=FINISH_DEPLOYMENT_ACTIVITY)
    async def finish_deployment(self, request: FinishDeploymentInput) -> FinishDeploymentResult:
        def write() -> FinishDeploymentResult:
            with self.database.session() as session:
                status, counts = deployment_store.finish_deployment(session, request.deployment_id)
            return FinishDeploymentResult(status, counts)

        return await asyncio.to_thread(write)


def rollout_settings(deployment, phase_counts: dict[int, dict[str, int]]) -> RolloutSettings:
    """Reduce the deployment's rollout options to what the workflow decides on: no device ids."""

    options = deployment_store.rollout_options(deployment)
    max_failures, max_failures_percent = options.failure_limits()
    specs = options.phases
    phases = [
        PhaseSettings(
            name=spec.name or spec.describe(),
            device_count=sum(phase_counts.get(index, {}).values()),
            min_success_rate=spec.min_success_rate,
            soak_seconds=spec.soak_seconds,
        )
        for index, spec in enumerate(specs)
    ] or [PhaseSettings("all devices", sum(phase_counts.get(0, {}).values()))]
    return RolloutSettings(
        phases=phases,
        max_start_rate_per_second=options.start_rate_per_second(),
        max_failures=max_failures,
        max_failures_percent=max_failures_percent,
        min_finished=options.min_finished,
    )


MAX_STAGE_DESCRIPTION_CHARS = 300


def epoch_seconds(moment: datetime) -> float:
    """Return Unix time; SQLite returns times without a zone, which the database stores as UTC."""

    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def describe_stages(recipe: Recipe) -> dict[str, str]:
    """Say in one line what each stage runs.

    Commands are described by size and timeout, never by their text, so
    nothing a script contains reaches the workflow history.
    """

    descriptions = {}
    for stage, command in (("before", recipe.before), ("after", recipe.after)):
        if command is not None:
            descriptions[stage] = describe_command(command)
    if recipe.files:
        destinations = ", ".join(entry.destination for entry in recipe.files)
        descriptions["files"] = f"{len(recipe.files)} files or directories: {destinations}"
    managers = []
    for name in ("apt", "pip", "pip3", "npm"):
        group = getattr(recipe.dependencies, name)
        if group is not None and group.packages:
            managers.append(f"{name}{describe_location(group)}: {describe_packages(name, group)}")
    if managers:
        descriptions["dependencies"] = "; ".join(managers)
    return {stage: shorten(text) for stage, text in descriptions.items()}


def describe_command(command: CommandStage) -> str:
    lines = len((command.run or "").splitlines())
    return f"bash script of {lines} line{'' if lines == 1 else 's'}, timeout {command.timeout_seconds} s"


def describe_location(group: PackageGroup) -> str:
    location = getattr(group, "virtualenv", None) or getattr(group, "directory", None)
    return f" in {location}" if location else ""


def describe_packages(manager: str, group: PackageGroup) -> str:
    separator = {"apt": "=", "npm": "@"}.get(manager, "==")
    return ", ".join(
        package.name + (separator + package.version if package.version else "") for package in group.packages
    )


def shorten(text: str) -> str:
    if len(text) <= MAX_STAGE_DESCRIPTION_CHARS:
        return text
    return text[: MAX_STAGE_DESCRIPTION_CHARS - 3] + "..."
