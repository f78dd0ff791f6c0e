"""Workflows of the bare fan-out benchmark: a parent with the Deployment workflow's shape, and no-op children.

The parent reads child ids from an activity one page at a time, keeps at
most `window` children running, and continues as new after
`max_children_per_run` children, like `DeploymentWorkflow`. Each child runs
four no-op activities in sequence, one per update stage. Nothing touches a
database or the API, so this is what Temporal alone costs on the machine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow

ACTIVITY_TIMEOUT = timedelta(seconds=120)
STAGES = ("before", "files", "dependencies", "after")


@dataclass
class BareParentInput:
    children: int
    window: int
    page_size: int
    max_children_per_run: int
    next_index: int = 0
    completed: int = 0


@dataclass
class ChildPageInput:
    start: int
    size: int
    total: int


@activity.defn(name="bare_child_page")
async def child_page(page: ChildPageInput) -> list[int]:
    """Return the next page of child numbers, as the deployment's device-page activity returns device ids."""

    return list(range(page.start, min(page.total, page.start + page.size)))


@activity.defn(name="bare_stage")
async def stage(name: str) -> str:
    return name


@workflow.defn(name="BareChild")
class BareChildWorkflow:
    @workflow.run
    async def run(self, number: int) -> int:
        for name in STAGES:
            await workflow.execute_activity(stage, name, start_to_close_timeout=ACTIVITY_TIMEOUT)
        return number


@workflow.defn(name="BareParent")
class BareParentWorkflow:
    def __init__(self) -> None:
        self._running = 0
        self._completed = 0

    @workflow.run
    async def run(self, parent: BareParentInput) -> int:
        self._completed = parent.completed
        next_index = parent.next_index
        started_this_run = 0
        while next_index < parent.children:
            numbers = await workflow.execute_activity(
                child_page, ChildPageInput(next_index, parent.page_size, parent.children),
                start_to_close_timeout=ACTIVITY_TIMEOUT,
            )
            for number in numbers:
                await workflow.wait_condition(lambda: self._running < parent.window)
                # As in the deployment workflow, the start is not awaited here, so many starts go out
                # in one workflow task.
                self._running += 1
                asyncio.create_task(self._run_child(number))
                next_index = number + 1
                started_this_run += 1

            more = next_index < parent.children
            if more and (started_this_run >= parent.max_children_per_run
                         or workflow.info().is_continue_as_new_suggested()):
                await workflow.wait_condition(lambda: self._running == 0)
                workflow.continue_as_new(BareParentInput(
                    parent.children, parent.window, parent.page_size, parent.max_children_per_run,
                    next_index, self._completed,
                ))

        await workflow.wait_condition(lambda: self._running == 0)
        return self._completed

    async def _run_child(self, number: int) -> None:
        await workflow.execute_child_workflow(
            BareChildWorkflow.run, number, id=f"{workflow.info().workflow_id}-child-{number}",
        )
        self._completed += 1
        self._running -= 1
