"""The worker process: hosts the deployment workflows and the server-side activities."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from temporalio.worker import Worker

from microupdates.activities.deployments import DeploymentActivities
from microupdates.activities.stages import StageActivities
from microupdates.db.session import Database
from microupdates.logs import configure_logging
from microupdates.search_attributes import ensure_search_attributes
from microupdates.settings import ServerSettings
from microupdates.temporal_client import connect_temporal, metrics_runtime
from microupdates.workflows.deployment import DeploymentWorkflow
from microupdates.workflows.device_update import DeviceUpdateWorkflow

logger = logging.getLogger(__name__)


def build_worker(client, database: Database, task_queue: str) -> Worker:
    deployment_activities = DeploymentActivities(database)
    stage_activities = StageActivities(database)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[DeploymentWorkflow, DeviceUpdateWorkflow],
        activities=[
            deployment_activities.start_deployment,
            deployment_activities.list_deployment_devices,
            deployment_activities.record_device_outcome,
            deployment_activities.record_device_rollback_start,
            deployment_activities.record_rollout_state,
            deployment_activities.stop_deployment,
            deployment_activities.finish_deployment,
            deployment_activities.mark_unstarted_devices_aborted,
            deployment_activities.request_deployment_abort,
            stage_activities.await_device_check_in,
            stage_activities.run_device_stage,
        ],
        activity_executor=ThreadPoolExecutor(max_workers=16),
        max_concurrent_activities=200,
    )


async def run_worker(settings: ServerSettings) -> None:
    database = Database(settings.resolved_database_url())
    database.create_schema()
    client = await connect_temporal(settings, metrics_runtime(settings.worker_metrics_address))
    await ensure_search_attributes(client)
    worker = build_worker(client, database, settings.task_queue)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    logger.info("Worker started on task queue %s at %s; metrics at %s", settings.task_queue,
                settings.temporal_address, settings.worker_metrics_address or "(off)")
    async with worker:
        await stop.wait()
        logger.info("Worker stopping")
    database.dispose()


def main() -> None:
    settings = ServerSettings()
    configure_logging(settings.log_format)
    asyncio.run(run_worker(settings))


if __name__ == "__main__":
    main()
