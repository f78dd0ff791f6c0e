"""Recording what the files stage is about to change, with a backup of content it overwrites.

A regular file about to be replaced is backed up by a hard link into the
change log's backup directory when both are on the same file system. The files
stage replaces a file by renaming a new one over it, so the old inode leaves
the destination but lives on through the link, unchanged: content, mode,
owner, timestamps and other hard links to it. A link costs no space.
NOTE: a process that keeps the old file open and writes to it after the
update also changes the backup, so revert_files restores those writes too.
When linking fails (another file system, or fs.protected_hardlinks for an
agent that is not root), the content is copied with its mode, owner and
modification time. Special files (FIFO, socket, device) can only be linked.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from typing import List, Optional

from microupdates.device_agent.change_log import ACTION_WRITE, ChangeLog, PathRecord
from microupdates.device_agent.filesystem import (
    KIND_FILE,
    KIND_OTHER,
    KIND_SYMLINK,
    TEMPORARY_PREFIX,
    FileInstallError,
    apply_metadata,
    copy_file_contents,
    kind_of,
    lstat_or_none,
    remove_quietly,
)

logger = logging.getLogger(__name__)


def describe_path(path: str, action: str) -> PathRecord:
    """Return a PathRecord of what is at path now, without a backup."""

    status = lstat_or_none(path)
    if status is None:
        return PathRecord(path=path, action=action, existed=False)

    kind = kind_of(status)
    return PathRecord(
        path=path,
        action=action,
        existed=True,
        kind=kind,
        mode=stat.S_IMODE(status.st_mode),
        uid=status.st_uid,
        gid=status.st_gid,
        mtime_ns=status.st_mtime_ns,
        link_target=os.readlink(path) if kind == KIND_SYMLINK else None,
    )


class PathRecorder:
    """Writes PathRecords to a change log before the files stage changes the paths they name.

    Without a change log (rollback recording is off) it records nothing and makes no backups.
    """

    def __init__(self, change_log: Optional[ChangeLog]) -> None:
        self.change_log = change_log

    def capture(self, path: str, action: str) -> PathRecord:
        """Describe path and, when a file is about to be overwritten, back up its content."""

        record = describe_path(path, action)
        if self.change_log is None or action != ACTION_WRITE or record.kind not in (KIND_FILE, KIND_OTHER):
            return record

        record.backup = self._back_up_content(path)
        return record

    def commit(self, records: List[PathRecord]) -> None:
        """Make records durable in the change log; the caller changes the paths only after this returns."""

        if self.change_log is not None and records:
            self.change_log.append_path_records(records)

    def aside_path(self, directory: str) -> str:
        """Return where `replace: true` moves the existing directory at `directory`.

        That is a new name in the backup directory when it is on the same file
        system, because a directory can only be renamed within one. Otherwise,
        and without a change log, it is a new hidden name next to the directory.
        """

        if self.change_log is not None:
            self.change_log.ensure_created()
            same_device = os.stat(self.change_log.backup_directory).st_dev == os.lstat(directory).st_dev
            if same_device:
                return self.change_log.new_backup_path(directory)

        parent = os.path.dirname(directory)
        base_name = os.path.basename(directory)
        return os.path.join(parent, f"{TEMPORARY_PREFIX}previous-{secrets.token_hex(6)}-{base_name}")

    def _back_up_content(self, path: str) -> str:
        assert self.change_log is not None
        self.change_log.ensure_created()
        backup = self.change_log.new_backup_path(path)
        status = os.lstat(path)

        try:
            os.link(path, backup, follow_symlinks=False)
            return backup
        except OSError as error:
            if not stat.S_ISREG(status.st_mode):
                raise FileInstallError(
                    f"could not back up the special file {path} before replacing it, because linking it "
                    f"into {self.change_log.backup_directory} failed: {error.strerror or error}"
                ) from error
            logger.info("Copying %s to the backup area, because a hard link failed: %s", path, error)

        try:
            copy_file_contents(path, backup)
            apply_metadata(backup, stat.S_IMODE(status.st_mode), status.st_uid, status.st_gid)
            os.utime(backup, ns=(status.st_atime_ns, status.st_mtime_ns))
        except OSError as error:
            remove_quietly(backup)
            raise FileInstallError(
                f"could not back up {path} to {backup} before replacing it: {error.strerror or error}"
            ) from error
        return backup
