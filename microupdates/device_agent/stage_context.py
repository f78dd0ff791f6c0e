"""The inputs a stage gets from the agent besides the job (paths and callbacks), and the stage environment."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from microupdates.device_agent.executors.commands import OutputCallback, ProcessStartCallback, minimal_environment
from microupdates.protocol.device_api import StageJob


@dataclass
class StageContext:
    """Inputs of a stage from the agent, besides the job itself.

    `open_artifact(sha256)` returns the local path of a downloaded, verified
    artifact. `extra_env` is added to every stage process's environment.
    `state_dir` is where the agent keeps its state, and the change log of
    each deployment goes below it; None turns rollback recording off, and
    then revert_files and revert_packages fail. `on_process_start` gets the
    pid (and process group id) of every process the stage starts.
    """

    device_root: Optional[str]
    open_artifact: Callable[[str], str]
    abort_event: Optional[threading.Event] = None
    extra_env: Dict[str, str] = field(default_factory=dict)
    on_output: Optional[OutputCallback] = None
    state_dir: Optional[str] = None
    on_process_start: Optional[ProcessStartCallback] = None

    def is_aborted(self) -> bool:
        return self.abort_event is not None and self.abort_event.is_set()


def stage_environment(job: StageJob, context: StageContext) -> Dict[str, str]:
    """Build the environment of the job's processes: minimal_environment plus the job's MICROUPDATES_* variables."""

    extra = dict(context.extra_env)
    extra["MICROUPDATES_DEPLOYMENT_ID"] = job.deployment_id
    extra["MICROUPDATES_STAGE"] = job.stage
    extra["MICROUPDATES_UPDATE_VERSION"] = job.update_version
    return minimal_environment(extra, context.device_root)
