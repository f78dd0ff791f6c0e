"""Running one stage job on the device and turning its steps into a StageReport."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from microupdates.device_agent.executors.commands import OutputCallback, minimal_environment, run_command
from microupdates.device_agent.executors.files import FileChange, install_files
from microupdates.device_agent.executors.packages import install_dependencies
from microupdates.protocol.device_api import StageJob, StageReport, StepResult

logger = logging.getLogger(__name__)

COMMAND_STAGES = ("before", "after")


@dataclass
class StageContext:
    """Inputs of a stage from the agent, besides the job itself.

    `open_artifact(sha256)` returns the local path of a downloaded, verified
    artifact. `extra_env` is added to every stage process's environment.
    `file_changes` collects what the files stage is about to overwrite, for rollback.
    """

    device_root: Optional[str]
    open_artifact: Callable[[str], str]
    abort_event: Optional[threading.Event] = None
    extra_env: Dict[str, str] = field(default_factory=dict)
    on_output: Optional[OutputCallback] = None
    file_changes: List[FileChange] = field(default_factory=list)


def _stage_environment(job: StageJob, context: StageContext) -> Dict[str, str]:
    extra = dict(context.extra_env)
    extra["MICROUPDATES_DEPLOYMENT_ID"] = job.deployment_id
    extra["MICROUPDATES_STAGE"] = job.stage
    extra["MICROUPDATES_UPDATE_VERSION"] = job.update_version
    return minimal_environment(extra, context.device_root)


def _run_command_stage(job: StageJob, context: StageContext, env: Dict[str, str], cwd: str) -> List[StepResult]:
    if job.command is None:
        return [StepResult(name=job.stage, error=f"the {job.stage} stage job has no command")]
    if job.command.run is None:
        return [
            StepResult(
                name=job.stage,
                error=(
                    f"the {job.stage} command has no script text to run, "
                    "because the server did not resolve 'script' to 'run'"
                ),
            )
        ]

    result = run_command(
        job.command.run,
        name=job.stage,
        timeout_seconds=job.command.timeout_seconds,
        env=env,
        cwd=cwd,
        abort_event=context.abort_event,
        on_output=context.on_output,
    )
    return [result]


def _run_steps(job: StageJob, context: StageContext) -> List[StepResult]:
    """Run the job's stage and return its steps. An unknown stage gives one failed step."""

    env = _stage_environment(job, context)
    cwd = context.device_root or "/"

    if context.abort_event is not None and context.abort_event.is_set():
        return [StepResult(name=job.stage, error="aborted")]

    if job.stage in COMMAND_STAGES:
        return _run_command_stage(job, context, env, cwd)

    if job.stage == "files":
        return install_files(
            job.files,
            device_root=context.device_root,
            open_artifact=context.open_artifact,
            abort_event=context.abort_event,
            changes=context.file_changes,
        )

    if job.stage == "dependencies":
        if job.dependencies is None:
            return []
        return install_dependencies(
            job.dependencies,
            device_root=context.device_root,
            env=env,
            abort_event=context.abort_event,
            on_output=context.on_output,
        )

    unknown = f"unknown stage {job.stage!r}; this agent runs before, files, dependencies and after"
    return [StepResult(name=job.stage, error=unknown)]


def run_stage(job: StageJob, context: StageContext) -> StageReport:
    """Run one stage job and return its report.

    The status is "failed" when a step has an error, and exit_code and error
    then come from the first such step. An Exception raised inside the stage
    becomes a failed report with its text, so a bug in a stage does not stop the agent.
    """

    started = time.monotonic()
    logger.info("Running stage %s of deployment %s (job %d)", job.stage, job.deployment_id, job.job_id)

    try:
        steps = _run_steps(job, context)
    except Exception as error:
        logger.exception("Stage %s of deployment %s (job %d) raised", job.stage, job.deployment_id, job.job_id)
        return StageReport(
            status="failed",
            duration_seconds=time.monotonic() - started,
            error=f"unexpected error in the {job.stage} stage: {type(error).__name__}: {error}",
        )

    duration = time.monotonic() - started
    failed = next((step for step in steps if step.error is not None), None)
    if failed is None:
        logger.info("Stage %s of deployment %s succeeded in %.1f s", job.stage, job.deployment_id, duration)
        return StageReport(status="succeeded", duration_seconds=duration, steps=steps)

    error = f"{failed.name}: {failed.error}"
    logger.warning("Stage %s of deployment %s failed: %s", job.stage, job.deployment_id, error)
    return StageReport(
        status="failed",
        exit_code=failed.exit_code,
        duration_seconds=duration,
        error=error,
        steps=steps,
    )
