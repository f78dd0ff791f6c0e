"""The agent's journal on disk: which job is running and which result still has to be reported.

Every change is written to a temporary file, fsynced and renamed over the
journal, so a crash or power loss leaves either the old or the new content.
After a restart the agent reads it to report an interrupted stage, or a
finished stage whose report never got through, exactly once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from microupdates.protocol.device_api import StageJob, StageReport

JOURNAL_FILE = "journal.json"


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / JOURNAL_FILE

    def read(self) -> Optional[dict]:
        """Return the open entry, or None when no job is in flight."""

        try:
            with open(self.path, "r", encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def record_started(self, job: StageJob, boot_id: str) -> None:
        """Record a stage about to run; `boot_id` shows after a restart whether its processes can still exist."""

        self._write({"job": job_on_disk(job), "state": "running", "process_groups": [], "boot_id": boot_id})

    def record_process_group(self, process_group: int) -> None:
        """Remember a stage's process group, so one left running by a crash is killed at the next start."""

        entry = self.read()
        if entry is None or entry["state"] != "running":
            return
        entry.setdefault("process_groups", []).append(process_group)
        self._write(entry)

    def record_rebooting(self, job: StageJob, boot_id: str) -> None:
        self._write({"job": job_on_disk(job), "state": "rebooting", "boot_id": boot_id})

    def record_finished(self, job: StageJob, report: StageReport) -> None:
        self._write({"job": job_on_disk(job), "state": "finished", "report": report.model_dump(mode="json")})

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fsync_directory(self.path.parent)

    def _write(self, content: dict) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(content, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        fsync_directory(self.path.parent)


def job_on_disk(job: StageJob) -> dict:
    # Secret values stay in memory only; a job read back from the journal is
    # used to report it, never to run it again.
    return job.model_dump(mode="json", exclude={"secrets"})


def fsync_directory(path: Path) -> None:
    descriptor = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
