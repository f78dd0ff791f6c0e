"""Running one stage job on the device and turning its steps into a StageReport.

Update stages (before, files, dependencies, after) write what they change
to the deployment's change log under the state directory, and the
compensation stages (revert_packages, revert_files, rollback_command) undo
it. The change log is found from job.deployment_id alone, so a compensation
works in a new agent process after a crash.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

from microupdates.device_agent.change_log import ChangeLog
from microupdates.device_agent.command_stage import run_command_stage
from microupdates.device_agent.compensations import run_compensation_stage
from microupdates.device_agent.executors.commands import observe_process_starts
from microupdates.device_agent.executors.files import install_files
from microupdates.device_agent.executors.package_versions import (
    RECORD_STEP,
    describe_packages_record,
    record_package_versions,
)
from microupdates.device_agent.executors.packages import install_dependencies
from microupdates.device_agent.stage_context import StageContext, stage_environment
from microupdates.protocol.device_api import (
    COMPENSATION_STAGES,
    STAGE_ABORTED,
    STAGE_FAILED,
    STAGE_SUCCEEDED,
    StageJob,
    StageReport,
    StepResult,
)

__all__ = ["StageContext", "run_stage"]

logger = logging.getLogger(__name__)

COMMAND_STAGES = ("before", "after")


def _record_package_versions(
    job: StageJob, context: StageContext, change_log: ChangeLog, env: Dict[str, str]
) -> StepResult:
    """Write the versions of the job's packages, as installed now, to the change log as one step."""

    assert job.dependencies is not None
    started = time.monotonic()
    record = record_package_versions(
        job.dependencies, device_root=context.device_root, env=env, abort_event=context.abort_event
    )
    try:
        change_log.append_packages(record)
    except OSError as error:
        return StepResult(
            name=RECORD_STEP,
            duration_seconds=time.monotonic() - started,
            error=f"could not write the change log in {change_log.directory}, so no package was installed: {error}",
        )
    return StepResult(
        name=RECORD_STEP, duration_seconds=time.monotonic() - started, output=describe_packages_record(record)
    )


def _run_dependencies_stage(
    job: StageJob, context: StageContext, change_log: Optional[ChangeLog], env: Dict[str, str]
) -> List[StepResult]:
    if job.dependencies is None or job.dependencies.is_empty():
        return []

    steps = []
    if change_log is not None:
        steps.append(_record_package_versions(job, context, change_log, env))
        if steps[-1].error is not None:
            return steps

    steps.extend(
        install_dependencies(
            job.dependencies,
            device_root=context.device_root,
            env=env,
            abort_event=context.abort_event,
            on_output=context.on_output,
        )
    )
    return steps


def _run_steps(job: StageJob, context: StageContext) -> List[StepResult]:
    """Run the job's stage and return its steps. An unknown stage gives one failed step."""

    env = stage_environment(job, context)
    cwd = context.device_root or "/"

    if context.is_aborted():
        return [StepResult(name=job.stage, error="aborted")]

    change_log = None
    if context.state_dir is not None:
        try:
            change_log = ChangeLog(context.state_dir, job.deployment_id)
        except ValueError as error:
            return [StepResult(name=job.stage, error=str(error))]

    if job.stage in COMPENSATION_STAGES:
        return run_compensation_stage(job, context, change_log, env, cwd)

    if job.stage in COMMAND_STAGES:
        return run_command_stage(job, context, env, cwd)

    if job.stage == "files":
        return install_files(
            job.files,
            device_root=context.device_root,
            open_artifact=context.open_artifact,
            abort_event=context.abort_event,
            change_log=change_log,
        )

    if job.stage == "dependencies":
        return _run_dependencies_stage(job, context, change_log, env)

    unknown = (
        f"unknown stage {job.stage!r}; this agent runs before, files, dependencies, after, "
        "revert_packages, revert_files and rollback_command"
    )
    return [StepResult(name=job.stage, error=unknown)]


def _aborted_report(job: StageJob, duration: float, steps: List[StepResult]) -> StageReport:
    error = f"aborted by the server during the {job.stage} stage"
    logger.warning("Stage %s of deployment %s was aborted by the server", job.stage, job.deployment_id)
    failed = next((step for step in steps if step.error is not None), None)
    return StageReport(
        status=STAGE_ABORTED,
        exit_code=failed.exit_code if failed is not None else None,
        duration_seconds=duration,
        error=error,
        steps=steps,
    )


def run_stage(job: StageJob, context: StageContext) -> StageReport:
    """Run one stage job and return its report.

    The status is "aborted" when context.abort_event is set by the time the
    stage returns. Otherwise it is "failed" when a step has an error, and
    exit_code and error then come from the first such step. An Exception
    raised inside the stage becomes a failed report with its text, so a bug
    in a stage does not stop the agent. Every process the stage starts is
    passed to context.on_process_start.
    """

    started = time.monotonic()
    logger.info("Running stage %s of deployment %s (job %d)", job.stage, job.deployment_id, job.job_id)

    try:
        with observe_process_starts(context.on_process_start):
            steps = _run_steps(job, context)
    except Exception as error:
        logger.exception("Stage %s of deployment %s (job %d) raised", job.stage, job.deployment_id, job.job_id)
        if context.is_aborted():
            return _aborted_report(job, time.monotonic() - started, [])
        return StageReport(
            status=STAGE_FAILED,
            duration_seconds=time.monotonic() - started,
            error=f"unexpected error in the {job.stage} stage: {type(error).__name__}: {error}",
        )

    duration = time.monotonic() - started
    if context.is_aborted():
        return _aborted_report(job, duration, steps)

    failed = next((step for step in steps if step.error is not None), None)
    if failed is None:
        logger.info("Stage %s of deployment %s succeeded in %.1f s", job.stage, job.deployment_id, duration)
        return StageReport(status=STAGE_SUCCEEDED, duration_seconds=duration, steps=steps)

    error = f"{failed.name}: {failed.error}"
    logger.warning("Stage %s of deployment %s failed: %s", job.stage, job.deployment_id, error)
    return StageReport(
        status=STAGE_FAILED,
        transient=failed.transient,
        exit_code=failed.exit_code,
        duration_seconds=duration,
        error=error,
        steps=steps,
    )
