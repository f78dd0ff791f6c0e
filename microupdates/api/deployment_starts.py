"""Starting deployment workflows, and starting those whose start was lost.

The API writes the deployment row first and starts its workflow second. A
process that dies between the two leaves a row in `pending` with no
workflow. Every API process looks for such rows every
`RECONCILE_INTERVAL_SECONDS` and starts their workflows. The workflow id is
derived from the deployment id, so a deployment never runs twice: Temporal
rejects a second start of the same id, from this process or another one.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from microupdates import search_attributes
from microupdates.db import deployments as deployment_store
from microupdates.db.models import utc_now
from microupdates.db.session import Database
from microupdates.protocol.recipe import TargetSelection
from microupdates.rollout import RolloutOptions
from microupdates.workflows.contracts import DEPLOYMENT_WORKFLOW, DeploymentInput, deployment_workflow_id

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL_SECONDS = 30.0
# A create request starts its workflow within a second; a row pending longer than this lost its start.
LOST_START_AFTER_SECONDS = 30.0
RECONCILE_BATCH = 100


async def start_deployment_workflow(
    temporal: Client,
    task_queue: str,
    deployment_id: str,
    update_id: str,
    version: str,
    targets: TargetSelection,
    max_concurrent_devices: int,
) -> str:
    """Start the deployment's workflow and return its id; raises WorkflowAlreadyStartedError on a second start."""

    workflow_id = deployment_workflow_id(deployment_id)
    await temporal.start_workflow(
        DEPLOYMENT_WORKFLOW,
        DeploymentInput(deployment_id=deployment_id, max_concurrent_devices=max_concurrent_devices),
        id=workflow_id,
        task_queue=task_queue,
        # A closed workflow with this id has already run the deployment.
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        static_summary=f"deployment {deployment_id} of update {update_id} (version {version})",
        search_attributes=TypedSearchAttributes([
            SearchAttributePair(search_attributes.DEPLOYMENT_ID, deployment_id),
            SearchAttributePair(search_attributes.UPDATE_VERSION, version),
            SearchAttributePair(search_attributes.TARGET_GROUPS, targets.groups),
            SearchAttributePair(search_attributes.STATUS, "in_progress"),
        ]),
    )
    return workflow_id


class LostStartReconciler:
    """Background task of an API process that starts the workflows of deployments left pending."""

    def __init__(self, database: Database, temporal: Client, task_queue: str,
                 interval_seconds: float = RECONCILE_INTERVAL_SECONDS,
                 lost_after_seconds: float = LOST_START_AFTER_SECONDS) -> None:
        self.database = database
        self.temporal = temporal
        self.task_queue = task_queue
        self.interval_seconds = interval_seconds
        self.lost_after_seconds = lost_after_seconds
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lost-start-reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                await self.start_lost_deployments()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the reconciler must outlive a database or Temporal hiccup
                logger.exception("Looking for deployments without a workflow failed; retrying in %s s",
                                 self.interval_seconds)
            await asyncio.sleep(self.interval_seconds)

    async def start_lost_deployments(self) -> int:
        """Start the workflow of every deployment pending for too long; return how many were started."""

        cutoff = utc_now() - timedelta(seconds=self.lost_after_seconds)
        pending = await asyncio.to_thread(self._read_pending, cutoff)
        started = 0
        for deployment_id, update_id, version, targets, max_concurrent in pending:
            try:
                await start_deployment_workflow(self.temporal, self.task_queue, deployment_id, update_id, version,
                                                targets, max_concurrent)
            except WorkflowAlreadyStartedError:
                continue
            except RPCError as error:
                logger.warning("Starting the workflow of pending deployment %s failed: %s", deployment_id, error)
                continue
            started += 1
            logger.warning("Deployment %s was pending without a workflow; started it", deployment_id,
                           extra={"deployment_id": deployment_id})
        return started

    def _read_pending(self, cutoff) -> list[tuple[str, str, str, TargetSelection, int]]:
        with self.database.session() as session:
            rows = deployment_store.list_pending_deployments(session, cutoff, RECONCILE_BATCH)
            return [
                (
                    row.id,
                    row.update_id,
                    deployment_store.load_recipe(session, row.update_id).version,
                    TargetSelection.model_validate(row.targets),
                    RolloutOptions.model_validate(row.rollout or {}).max_concurrent,
                )
                for row in rows
            ]
