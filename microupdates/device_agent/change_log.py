"""The change log of one deployment: what the update changed on this device, for the compensation stages.

Layout under `<state_dir>/changes/<deployment_id>/`:

- `files/000001.json`: a list of PathRecord, one file per batch of changes
  of the files stage, each written before the changes it describes.
- `packages/000001.json`: a PackagesRecord, written by each dependencies
  stage before it installs anything.
- `backup/`: the previous content of overwritten files, and directories
  moved aside by `replace: true` when they are on the same file system.
- `completed-<stage>.json`: marks a compensation stage as done up to a
  record number, so running it again changes nothing.

Every JSON file is written to a temporary file, fsynced and renamed into
place, and its directory is fsynced, so after a crash a record is either
complete or absent. Records are numbered in the order they were written and
compensations undo them in reverse order. One stage at a time writes to a
log, because the agent runs one stage at a time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from typing import List, Optional, Tuple, Type, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from microupdates.device_agent.filesystem import (
    TEMPORARY_PREFIX,
    fsync_directory,
    lstat_or_none,
    write_file_atomically,
)

logger = logging.getLogger(__name__)

CHANGES_DIRECTORY = "changes"
FILES_DIRECTORY = "files"
PACKAGES_DIRECTORY = "packages"
BACKUP_DIRECTORY = "backup"
RECORD_NAME_PATTERN = re.compile(r"^([0-9]{6,})\.json\Z")
DEPLOYMENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
MAX_BACKUP_NAME_CHARS = 80

# PathRecord.action values.
# A file or symbolic link is placed at the path, replacing whatever non-directory was there.
ACTION_WRITE = "write"
# A directory is created at the path, which did not exist.
ACTION_CREATE_DIRECTORY = "create_directory"
# The mode of the existing directory at the path may change.
ACTION_SET_MODE = "set_mode"
# The whole directory at the path is swapped for the update's tree.
ACTION_REPLACE_DIRECTORY = "replace_directory"
# A temporary file or staging directory of the files stage. It is gone when
# the stage ends normally, and revert_files deletes what a crash leaves of it.
ACTION_TEMPORARY = "temporary"


class LogModel(BaseModel):
    """Base for change log records: fields added by a newer agent are ignored by an older one."""

    model_config = ConfigDict(extra="ignore")


class PathRecord(LogModel):
    """One path as it was before the files stage changed it.

    `path` is the path on this machine (device root applied). `kind`, `mode`
    (permission bits including setuid, setgid and sticky), `uid`, `gid` and
    `mtime_ns` come from lstat and are None when the path did not exist.
    `backup` is the absolute path of the kept previous content: a hard link
    or copy of a file, or the moved-aside directory of ACTION_REPLACE_DIRECTORY.
    """

    path: str
    action: str
    existed: bool
    kind: Optional[str] = None
    mode: Optional[int] = None
    uid: Optional[int] = None
    gid: Optional[int] = None
    mtime_ns: Optional[int] = None
    link_target: Optional[str] = None
    backup: Optional[str] = None


class PackageVersion(LogModel):
    """A package's installed version before the update; None when it was not installed.

    `error` is set when the version could not be found out, and then `version` means nothing.
    """

    name: str
    version: Optional[str] = None
    error: Optional[str] = None


class ManagerRecord(LogModel):
    """The packages of one manager (apt, pip, pip3 or npm) before the dependencies stage.

    `interpreter` is the Python whose pip installs (pip and pip3), `virtualenv`
    and `npm_directory` are paths on this machine, and `npm_directory` None
    means global npm. `created_directory` is the top-most directory of the
    virtualenv or npm directory that did not exist before, so the update created it.
    """

    manager: str
    timeout_seconds: float
    packages: List[PackageVersion] = Field(default_factory=list)
    interpreter: Optional[str] = None
    virtualenv: Optional[str] = None
    npm_directory: Optional[str] = None
    created_directory: Optional[str] = None


class PackagesRecord(LogModel):
    """Package versions seen by one run of the dependencies stage, in the order apt, pip, pip3, npm."""

    managers: List[ManagerRecord] = Field(default_factory=list)


class CompletionMarker(LogModel):
    """Marks a compensation stage as done for every record numbered up to `through_sequence`."""

    through_sequence: int = 0


RecordModel = TypeVar("RecordModel", bound=BaseModel)


def check_deployment_id(deployment_id: str) -> str:
    """Return the id when it is safe as one path component, else raise ValueError."""

    if not DEPLOYMENT_ID_PATTERN.match(deployment_id):
        raise ValueError(
            f"deployment id {deployment_id!r} cannot name a change log directory: "
            "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return deployment_id


class ChangeLog:
    """The change log of one deployment under the agent's state directory.

    Creating the object touches nothing on disk; `ensure_created()` makes the
    directories before the first record is written.
    """

    def __init__(self, state_dir: str, deployment_id: str) -> None:
        self.deployment_id = check_deployment_id(deployment_id)
        self.directory = os.path.join(os.path.abspath(state_dir), CHANGES_DIRECTORY, deployment_id)
        self.files_directory = os.path.join(self.directory, FILES_DIRECTORY)
        self.packages_directory = os.path.join(self.directory, PACKAGES_DIRECTORY)
        self.backup_directory = os.path.join(self.directory, BACKUP_DIRECTORY)

    def ensure_created(self) -> None:
        """Create the log's directories (mode 0700, because backups may hold secrets) and fsync their parents."""

        for directory in (self.files_directory, self.packages_directory, self.backup_directory):
            if os.path.isdir(directory):
                continue
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fsync_directory(os.path.dirname(directory))
        fsync_directory(os.path.dirname(self.directory))

    def exists(self) -> bool:
        return os.path.isdir(self.directory)

    def new_backup_path(self, original_path: str) -> str:
        """Return an unused path in the backup directory, named after original_path for readers of the log."""

        base_name = os.path.basename(original_path.rstrip("/"))[:MAX_BACKUP_NAME_CHARS] or "root"
        while True:
            candidate = os.path.join(self.backup_directory, f"{secrets.token_hex(6)}-{base_name}")
            if lstat_or_none(candidate) is None:
                return candidate

    def append_path_records(self, records: List[PathRecord]) -> int:
        """Write records as the next files-stage batch and return its sequence number.

        The backup directory is fsynced first, so the backups that the records
        name are on disk before the records are.
        """

        self.ensure_created()
        fsync_directory(self.backup_directory)
        content = [record.model_dump(mode="json") for record in records]
        return self._append(self.files_directory, _json_bytes(content))

    def read_path_records(self) -> List[Tuple[int, List[PathRecord]]]:
        """Return every files-stage batch as (sequence number, records), oldest first."""

        batches = []
        for sequence, path in self._record_files(self.files_directory):
            with open(path, "rb") as reader:
                raw_records = _parse_json(reader.read(), path)
            batches.append((sequence, [PathRecord.model_validate(item) for item in raw_records]))
        return batches

    def append_packages(self, record: PackagesRecord) -> int:
        return self._append(self.packages_directory, record.model_dump_json().encode("utf-8"))

    def read_packages(self) -> List[Tuple[int, PackagesRecord]]:
        """Return every dependencies-stage record as (sequence number, record), oldest first."""

        return [
            (sequence, _read_model(path, PackagesRecord))
            for sequence, path in self._record_files(self.packages_directory)
        ]

    def completed_through(self, stage: str) -> Optional[int]:
        """Return the record number up to which `stage` completed, or None when it never completed."""

        path = self._marker_path(stage)
        if lstat_or_none(path) is None:
            return None
        return _read_model(path, CompletionMarker).through_sequence

    def mark_completed(self, stage: str, through_sequence: int) -> None:
        self.ensure_created()
        marker = CompletionMarker(through_sequence=through_sequence)
        write_file_atomically(self._marker_path(stage), marker.model_dump_json().encode("utf-8"))

    def remove_backups(self) -> None:
        """Delete the content of the backup directory, after revert_files no longer needs it."""

        if not os.path.isdir(self.backup_directory):
            return
        for name in os.listdir(self.backup_directory):
            path = os.path.join(self.backup_directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        fsync_directory(self.backup_directory)

    def discard(self) -> None:
        """Delete the whole log, and directories that `replace: true` moved aside outside it.

        After this no compensation can undo the deployment, so call it only
        once the deployment has ended for good.
        """

        if not self.exists():
            return
        for _, records in self.read_path_records():
            for record in records:
                outside = record.backup is not None and not record.backup.startswith(self.directory + "/")
                if outside and os.path.isdir(record.backup):
                    shutil.rmtree(record.backup, ignore_errors=True)
        shutil.rmtree(self.directory)
        fsync_directory(os.path.dirname(self.directory))

    def _marker_path(self, stage: str) -> str:
        return os.path.join(self.directory, f"completed-{stage}.json")

    def _record_files(self, directory: str) -> List[Tuple[int, str]]:
        """Return (sequence number, path) of the record files in directory, in order.

        Temporary files left by a crash before their rename are skipped.
        """

        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []

        numbered = []
        for name in names:
            match = RECORD_NAME_PATTERN.match(name)
            if match is not None:
                numbered.append((int(match.group(1)), os.path.join(directory, name)))
            elif name.startswith(TEMPORARY_PREFIX):
                logger.info("Ignoring %s, left by an interrupted write to the change log", name)
        numbered.sort()
        return numbered

    def _append(self, directory: str, data: bytes) -> int:
        self.ensure_created()
        existing = self._record_files(directory)
        sequence = existing[-1][0] + 1 if existing else 1
        write_file_atomically(os.path.join(directory, f"{sequence:06d}.json"), data)
        return sequence


def _json_bytes(content) -> bytes:
    return json.dumps(content, separators=(",", ":")).encode("utf-8")


def _parse_json(data: bytes, path: str):
    try:
        return json.loads(data)
    except ValueError as error:
        raise ValueError(f"change log file {path} is not valid JSON: {error}") from error


def _read_model(path: str, model: Type[RecordModel]) -> RecordModel:
    with open(path, "rb") as reader:
        return model.model_validate(_parse_json(reader.read(), path))
