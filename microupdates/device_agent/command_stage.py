"""Stages that run the job's bash command: before, after and rollback_command."""

from __future__ import annotations

from typing import Dict, List

from microupdates.device_agent.executors.commands import run_command
from microupdates.device_agent.stage_context import StageContext
from microupdates.protocol.device_api import StageJob, StepResult
from microupdates.protocol.secret_references import MissingSecretError, resolve_secret_references


def run_command_stage(job: StageJob, context: StageContext, env: Dict[str, str], cwd: str) -> List[StepResult]:
    """Run job.command.run with bash and return its one step; a job without script text gives one failed step."""

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

    try:
        script, secret_env = resolve_secret_references(job.command.run, job.secrets)
    except MissingSecretError as error:
        return [StepResult(name=job.stage, error=str(error))]

    result = run_command(
        script,
        name=job.stage,
        timeout_seconds=job.command.timeout_seconds,
        env=dict(env, **secret_env),
        cwd=cwd,
        abort_event=context.abort_event,
        on_output=context.on_output,
    )
    return [result]
