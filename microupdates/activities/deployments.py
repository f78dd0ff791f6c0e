"""Server-side steps of a deployment: load and freeze it, page through its devices, record results."""

from __future__ import annotations

import asyncio

from temporalio import activity

from microupdates.db import deployments as deployment_store
from microupdates.db import jobs as job_store
from microupdates.db.session import Database
from microupdates.workflows.contracts import (
    FINISH_DEPLOYMENT_ACTIVITY,
    LIST_DEPLOYMENT_DEVICES_ACTIVITY,
    RECORD_DEVICE_OUTCOME_ACTIVITY,
    START_DEPLOYMENT_ACTIVITY,
    DeploymentPlan,
    FinishDeploymentInput,
    FinishDeploymentResult,
    ListDeploymentDevicesInput,
    RecordDeviceOutcomeInput,
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
            check_in_deadline_seconds=recipe.timeouts.check_in_deadline_seconds,
            heartbeat_timeout_seconds=recipe.timeouts.heartbeat_timeout_seconds,
            device_count=device_count,
        )

    @activity.defn(name=LIST_DEPLOYMENT_DEVICES_ACTIVITY)
    async def list_deployment_devices(self, request: ListDeploymentDevicesInput) -> list[str]:
        def read() -> list[str]:
            with self.database.session() as session:
                return deployment_store.list_deployment_device_ids(
                    session, request.deployment_id, request.after_device_id, request.limit
                )

        return await asyncio.to_thread(read)

    @activity.defn(name=RECORD_DEVICE_OUTCOME_ACTIVITY)
    async def record_device_outcome(self, request: RecordDeviceOutcomeInput) -> None:
        def write() -> None:
            with self.database.session() as session:
                deployment_store.record_device_outcome(
                    session, request.deployment_id, request.device_id, request.status, request.stage, request.error
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
