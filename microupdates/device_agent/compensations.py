"""Compensation stages, which undo a failed or aborted update with the deployment's change log.

revert_packages and revert_files need the change log, so they fail when
the agent has no state directory. rollback_command runs the job's command
like before and after. Each marks the log when it completes, and a later run
of the same stage for the deployment then succeeds without doing anything.
The reboot stage belongs to the agent's main loop, which must not pass it here.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

from microupdates.device_agent.change_log import ChangeLog
from microupdates.device_agent.command_stage import run_command_stage
from microupdates.device_agent.executors.revert_files import revert_files
from microupdates.device_agent.executors.revert_packages import revert_packages
from microupdates.device_agent.stage_context import StageContext
from microupdates.protocol.device_api import (
    REBOOT_STAGE,
    REVERT_FILES_STAGE,
    REVERT_PACKAGES_STAGE,
    ROLLBACK_COMMAND_STAGE,
    StageJob,
    StepResult,
)

logger = logging.getLogger(__name__)

REBOOT_ERROR = "the reboot stage is run by the agent's main loop, not by run_stage"
ROLLBACK_COMMAND_DONE = "the rollback command already completed for this deployment, so it did not run again\n"


def _missing_state_dir_error(stage: str) -> str:
    return (
        f"the {stage} stage cannot undo anything, because the agent has no state directory, "
        "so rollback recording was off and no change of this deployment was recorded"
    )


def _run_rollback_command(
    job: StageJob, context: StageContext, change_log: Optional[ChangeLog], env: Dict[str, str], cwd: str
) -> List[StepResult]:
    """Run the rollback command once per deployment; without a change log it runs every time."""

    if change_log is not None and change_log.completed_through(ROLLBACK_COMMAND_STAGE) is not None:
        logger.info("The rollback command of deployment %s already completed", job.deployment_id)
        return [StepResult(name=job.stage, output=ROLLBACK_COMMAND_DONE)]

    steps = run_command_stage(job, context, env, cwd)
    if change_log is not None and all(step.error is None for step in steps):
        change_log.mark_completed(ROLLBACK_COMMAND_STAGE, 0)
    return steps


def run_compensation_stage(
    job: StageJob, context: StageContext, change_log: Optional[ChangeLog], env: Dict[str, str], cwd: str
) -> List[StepResult]:
    """Run one compensation stage and return its steps; change_log is None when recording is off."""

    if job.stage == REBOOT_STAGE:
        return [StepResult(name=job.stage, error=REBOOT_ERROR)]
    if job.stage == ROLLBACK_COMMAND_STAGE:
        return _run_rollback_command(job, context, change_log, env, cwd)
    if change_log is None:
        return [StepResult(name=job.stage, error=_missing_state_dir_error(job.stage))]

    if job.stage == REVERT_PACKAGES_STAGE:
        return revert_packages(
            change_log, env=env, cwd=cwd, abort_event=context.abort_event, on_output=context.on_output
        )
    assert job.stage == REVERT_FILES_STAGE, job.stage
    return revert_files(change_log)
